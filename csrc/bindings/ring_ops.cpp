#include "bindings/ring_ops.h"

#include <ATen/ATen.h>
#include <torch/csrc/distributed/c10d/GroupRegistry.hpp>

#include <cstdlib>
#include <memory>
#include <vector>

#include "bindings/agreement.h"
#include "bindings/tensor_params.h"
#include "comm/c10d_transport.h"
#include "core/layout.h"
#include "core/ring_scheduler.h"

namespace ring_attn {

double ring_timeout_seconds() {
  const char* env = std::getenv("RING_ATTN_TIMEOUT");
  if (env == nullptr || *env == '\0') return 300.0;
  char* end = nullptr;
  const double value = std::strtod(env, &end);
  TORCH_CHECK_VALUE(end != env && *end == '\0', "RING_ATTN_TIMEOUT must be a number of seconds, got '",
                    env, "'");
  return value;
}

bool ring_check_enabled() {
  const char* env = std::getenv("RING_ATTN_CHECK");
  return env == nullptr || std::string(env) != "0";
}

namespace {

// World size 1: the scheduler never exchanges anything.
class SoloTransport final : public Transport {
 public:
  int rank() const override { return 0; }
  int world_size() const override { return 1; }
  void post(const Exchange&) override { TORCH_CHECK(false, "ring attention: internal error, solo post"); }
  void wait(const Exchange&) override { TORCH_CHECK(false, "ring attention: internal error, solo wait"); }
};

c10::intrusive_ptr<c10d::ProcessGroup> resolve_group(const std::string& name) {
  if (name.empty()) return {};
  return c10d::resolve_process_group(name);
}

// The K/V of a block packed as (2, batch, seqlen, heads_kv, headdim): one message per hop.
at::Tensor pack_kv(const at::Tensor& k, const at::Tensor& v, at::ScalarType dtype) {
  at::Tensor packed = at::empty({2, k.size(0), k.size(1), k.size(2), k.size(3)},
                                k.options().dtype(dtype));
  packed[0].copy_(k);
  packed[1].copy_(v);
  return packed;
}

// Everything a rank knows about the ring for one call.
struct RingContext {
  c10::intrusive_ptr<c10d::ProcessGroup> group;
  int rank = 0;
  int world = 1;
  Layout layout = Layout::kContiguous;
  MaskSpec mask;
  std::vector<at::Tensor> positions;   // per source rank, int32 (seqlen_local,), lazily filled
  std::vector<PositionRange> ranges;   // per source rank
  int64_t local_len = 0;

  RingContext(const std::string& group_name, const std::string& layout_name, bool causal,
              int64_t local_len_)
      : group(resolve_group(group_name)), local_len(local_len_) {
    if (group) {
      rank = group->getRank();
      world = group->getSize();
    }
    parse_layout(layout_name, &layout);
    mask.causal = causal;
    positions.resize(world);
    ranges.resize(world);
    for (int r = 0; r < world; ++r) {
      // Positions increase along a shard: the range is the first and last position.
      ranges[r] = local_len == 0 ? PositionRange{1, 0}
                                 : PositionRange{layout_position(layout, r, world, local_len, 0),
                                                 layout_position(layout, r, world, local_len,
                                                                 local_len - 1)};
    }
  }

  const at::Tensor& positions_of(int source, const at::Device& device) {
    if (!positions[source].defined()) {
      at::Tensor pos = at::empty({local_len}, at::kInt);
      fill_positions(layout, source, world, local_len, pos.data_ptr<int32_t>());
      positions[source] = pos.to(device);
    }
    return positions[source];
  }

  bool is_needed(int source) const {
    return classify_tile(mask, ranges[rank], ranges[source]) != TileKind::kSkip;
  }

  std::unique_ptr<Transport> transport(const std::vector<at::Tensor>& slots) const {
    if (world == 1) return std::make_unique<SoloTransport>();
    return std::make_unique<C10dTransport>(group, slots, ring_timeout_seconds());
  }
};

// BlockOps over tensors: slots hold packed K/V (input dtype) or packed dK/dV (accumulator dtype).
class TensorBlockOps final : public BlockOps {
 public:
  TensorBlockOps(const BlockKernels& kernels, RingContext& ring, std::vector<at::Tensor>& slots,
                 double scale)
      : kernels_(kernels), ring_(ring), slots_(slots), scale_(scale) {}

  // Forward state.
  at::Tensor q, out_acc, lse;
  // Backward state.
  at::Tensor dout, delta, dq_acc;

  bool is_needed(int source) const override { return ring_.is_needed(source); }

  void forward(int kv_slot, int source) override {
    const at::Tensor& kv = slots_.at(kv_slot);
    kernels_.fwd(make_fwd_params(q, kv[0], kv[1], q_pos(), ring_.positions_of(source, q.device()),
                                 out_acc, lse, ring_.mask.causal, scale_));
  }

  void backward(int kv_slot, int source, int grad_slot) override {
    const at::Tensor& kv = slots_.at(kv_slot);
    at::Tensor& grad = slots_.at(grad_slot);
    grad.zero_();
    kernels_.bwd(make_bwd_params(dout, q, kv[0], kv[1], q_pos(),
                                 ring_.positions_of(source, q.device()), lse, delta, dq_acc,
                                 grad[0], grad[1], ring_.mask.causal, scale_));
  }

  void zero_grad(int grad_slot) override { slots_.at(grad_slot).zero_(); }

  void add_grad(int dst_slot, int src_slot) override {
    slots_.at(dst_slot).add_(slots_.at(src_slot));
  }

 private:
  const at::Tensor& q_pos() { return ring_.positions_of(ring_.rank, q.device()); }

  const BlockKernels& kernels_;
  RingContext& ring_;
  std::vector<at::Tensor>& slots_;
  double scale_;
};

// Headdim must have unit stride for the kernels; anything else is copied once.
at::Tensor unit_last_stride(const at::Tensor& t) {
  return (t.size(-1) <= 1 || t.stride(-1) == 1) ? t : t.contiguous();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> ring_forward(const BlockKernels& kernels, const at::Tensor& q_in,
                                                const at::Tensor& k, const at::Tensor& v,
                                                const std::string& group_name, bool causal,
                                                double softmax_scale, const std::string& layout) {
  RingContext ring(group_name, layout, causal, q_in.dim() == 4 ? q_in.size(1) : 0);
  agree_or_throw(RingCall{q_in, k, v, layout, causal, softmax_scale}, ring.group,
                 ring_check_enabled(), ring_timeout_seconds());

  const at::ScalarType acc = acc_dtype(q_in.scalar_type());
  std::vector<at::Tensor> slots(slot::kCount);
  slots[slot::kOwnKV] = pack_kv(k, v, k.scalar_type());
  for (int i = 0; i < std::min(2, ring.world - 1); ++i) {
    slots[slot::kKVRecv0 + i] = at::empty_like(slots[slot::kOwnKV]);
  }
  TensorBlockOps ops(kernels, ring, slots, softmax_scale);
  ops.q = unit_last_stride(q_in);
  ops.out_acc = at::zeros(q_in.sizes(), q_in.options().dtype(acc));
  ops.lse = at::full({q_in.size(0), q_in.size(2), q_in.size(1)},
                     -std::numeric_limits<double>::infinity(), q_in.options().dtype(acc));

  auto transport = ring.transport(slots);
  RingForward(*transport, ops).run();
  return {ops.out_acc.to(q_in.scalar_type()), ops.lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ring_backward(
    const BlockKernels& kernels, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
    const std::string& group_name, bool causal, double softmax_scale, const std::string& layout) {
  // Inputs were validated and agreed on in the forward; autograd guarantees matching shapes.
  RingContext ring(group_name, layout, causal, q.size(1));
  const at::ScalarType acc = acc_dtype(q.scalar_type());

  std::vector<at::Tensor> slots(slot::kCount);
  slots[slot::kOwnKV] = pack_kv(k, v, k.scalar_type());
  for (int i = 0; i < std::min(2, ring.world - 1); ++i) {
    slots[slot::kKVRecv0 + i] = at::empty_like(slots[slot::kOwnKV]);
  }
  for (int i = 0; i < 2; ++i) {
    // Accumulators double-buffer only when a later step can overwrite one still being sent.
    if (i == 0 || ring.world > 1) slots[slot::kGradAcc0 + i] = at::empty_like(slots[slot::kOwnKV], acc);
    if (ring.world > 1) slots[slot::kGradRecv0 + i] = at::empty_like(slots[slot::kOwnKV], acc);
  }

  TensorBlockOps ops(kernels, ring, slots, softmax_scale);
  ops.q = unit_last_stride(q);
  ops.dout = unit_last_stride(dout);
  ops.lse = lse;
  // delta = (dout * out).sum(-1), as (batch, heads, seqlen) like lse
  ops.delta = (dout.to(acc) * out.to(acc)).sum(-1).transpose(1, 2).contiguous();
  ops.dq_acc = at::zeros(q.sizes(), q.options().dtype(acc));

  auto transport = ring.transport(slots);
  RingBackward schedule(*transport, ops);
  schedule.run();
  const at::Tensor& grad_kv = slots.at(schedule.grad_result_slot());
  // dK and dV are views of one packed buffer: copy them out so that the outputs do not alias.
  return {ops.dq_acc.to(q.scalar_type()), grad_kv[0].to(k.scalar_type(), false, /*copy=*/true),
          grad_kv[1].to(v.scalar_type(), false, /*copy=*/true)};
}

}  // namespace ring_attn
