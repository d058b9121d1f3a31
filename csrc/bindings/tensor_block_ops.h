// The ring's BlockOps over tensors, and one rank's buffers for a forward or backward call.
//
// Slots hold packed K/V (input dtype) or packed dK/dV (accumulator dtype), the messages of the
// ring: (2, batch, seqlen, heads_kv, headdim), one message per hop; the all-gather's slots
// (kAllKV, kAllGrad) hold every rank's block: (world, 2, batch, seqlen, heads_kv, headdim). Two blocks never travel and
// are kept apart instead: the own K/V on the CPU (own_k, own_v: the inputs themselves, packed
// only when they are sent) and the own dK/dV (home_dk, home_dv: the results, so no copy out of a
// packed buffer).
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>
#include <vector>

#include "bindings/ring_context.h"
#include "core/params.h"
#include "core/ring_scheduler.h"

namespace ring_attn {

// A device's block kernels, and the check of the environment variables they read: ValueError
// when one holds an unknown value (every op calls it first, before any communication).
struct BlockKernels {
  void (*fwd)(const BlockFwdParams&);
  void (*bwd)(const BlockBwdParams&);
  void (*check_environment)();
};

class TensorBlockOps final : public BlockOps {
 public:
  // `ring` and `slots` must outlive the ops.
  TensorBlockOps(const BlockKernels& kernels, RingContext& ring, std::vector<at::Tensor>& slots,
                 double scale)
      : kernels_(kernels), ring_(ring), slots_(slots), scale_(scale) {}

  // Forward state.
  at::Tensor q, out_acc, lse;
  // Backward state.
  at::Tensor dout, delta, dq_acc;
  bool deterministic = false;
  // Set: the own block's K and V (else slot kOwnKV); the own block's dK and dV (slot kGradHome).
  at::Tensor own_k, own_v, home_dk, home_dv;

  bool is_needed(int source) const override { return ring_.needs(ring_.rank, source); }
  void forward(int kv_slot, int source) override;
  void backward(int kv_slot, int source, int grad_slot) override;
  void zero_grad(int grad_slot) override;
  void add_grad(int dst_slot, int src_slot) override;

 private:
  const at::Tensor& query_positions() { return ring_.positions_of(ring_.rank, q.device()); }
  // K and V (dK and dV) of block `source` in a slot.
  std::pair<at::Tensor, at::Tensor> kv_of(int kv_slot, int source) const;
  std::pair<at::Tensor, at::Tensor> grad_of(int grad_slot, int source) const;

  const BlockKernels& kernels_;
  RingContext& ring_;
  std::vector<at::Tensor>& slots_;
  double scale_;
};

// One rank's part of a forward call: its ring view, buffers and block ops. Tensors in batch form
// (batch, seqlen_local, heads, headdim).
struct RankForward {
  RingContext ring;
  std::vector<at::Tensor> slots = std::vector<at::Tensor>(slot::kCount);
  TensorBlockOps ops;

  RankForward(const BlockKernels& kernels, int rank, int world, const at::Tensor& q,
              const at::Tensor& k, const at::Tensor& v, const RingOptions& options);

  // (out in the input dtype, lse in the accumulator dtype)
  std::tuple<at::Tensor, at::Tensor> result(at::ScalarType dtype) const;
};

// One rank's part of a backward call. Tensors in batch form.
struct RankBackward {
  RingContext ring;
  std::vector<at::Tensor> slots = std::vector<at::Tensor>(slot::kCount);
  TensorBlockOps ops;

  // dlse: the gradient of lse, like it, or undefined (0).
  RankBackward(const BlockKernels& kernels, int rank, int world, const at::Tensor& dout,
               const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
               const at::Tensor& out, const at::Tensor& lse, const RingOptions& options,
               const at::Tensor& dlse = {});

  // (dq, dk, dv) in the input dtypes (separate buffers: the outputs never alias).
  std::tuple<at::Tensor, at::Tensor, at::Tensor> result(at::ScalarType dtype) const;
};

}  // namespace ring_attn
