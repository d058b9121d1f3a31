#include "bindings/tensor_block_ops.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <limits>
#include <string>

#include "bindings/tensor_params.h"

#if defined(RING_ATTN_WITH_CUDA)
#include <nvtx3/nvToolsExt.h>  // header-only; a no-op unless a profiler is attached
#endif

namespace ring_attn {

namespace {

// An NVTX range around one ring step's block computation (CUDA builds; shows in Nsight Systems).
struct StepRange {
#if defined(RING_ATTN_WITH_CUDA)
  StepRange(const char* what, int source) {
    const std::string name = std::string("ring step: ") + what + " block of rank " +
                             std::to_string(source);
    nvtxRangePushA(name.c_str());
  }
  ~StepRange() { nvtxRangePop(); }
#else
  StepRange(const char*, int) {}
#endif
};

// An uninitialised buffer for one block's K/V (or dK/dV) packed as (2, batch, seqlen, heads_kv,
// headdim), the shape of one hop's message, in `dtype`.
at::Tensor empty_packed(const at::Tensor& k, at::ScalarType dtype) {
  return at::empty({2, k.size(0), k.size(1), k.size(2), k.size(3)}, k.options().dtype(dtype));
}

// The K/V of a block packed: one message per hop.
at::Tensor pack_kv(const at::Tensor& k, const at::Tensor& v) {
  at::Tensor packed = empty_packed(k, k.scalar_type());
  packed[0].copy_(k);
  packed[1].copy_(v);
  return packed;
}

// Headdim must have unit stride for the kernels; anything else is copied once. An empty tensor
// gets standard strides: contiguous() keeps an empty tensor's own (an expanded one's zeros).
at::Tensor unit_last_stride(const at::Tensor& t) {
  if (t.numel() == 0) return at::empty(t.sizes(), t.options());
  return (t.size(-1) <= 1 || t.stride(-1) == 1) ? t : t.contiguous();
}

// The own block's K/V: packed into slot kOwnKV (one message per hop) when it is sent, and on the
// CPU read in place by the kernels (which take any strides) rather than from that copy. The ring's
// receive slots are shaped like the packed block; the all-gather's kAllKV holds every rank's.
void set_own_kv(TensorBlockOps& ops, std::vector<at::Tensor>& slots, const at::Tensor& k,
                const at::Tensor& v, const RingContext& ring) {
  const bool gather = ring.kv_exchange == KVExchange::kAllGather && ring.world > 1;
  const bool sent = gather || ring.reaches[ring.rank] > 0;
  if (k.is_cpu()) {
    ops.own_k = unit_last_stride(k);
    ops.own_v = unit_last_stride(v);
  }
  if (sent || !k.is_cpu()) slots[slot::kOwnKV] = pack_kv(k, v);
  if (gather) {
    std::vector<int64_t> all_shape{ring.world};
    for (int64_t size : slots[slot::kOwnKV].sizes()) all_shape.push_back(size);
    slots[slot::kAllKV] = at::empty(all_shape, k.options());
    return;
  }
  for (int i = 0; i < std::min(2, ring.steps - 1); ++i) {
    slots[slot::kKVRecv0 + i] = empty_packed(k, k.scalar_type());
  }
}

}  // namespace

void TensorBlockOps::forward(int kv_slot, int source) {
  StepRange range("forward", source);
  const auto [k, v] = kv_of(kv_slot, source);
  kernels_.fwd(make_fwd_params(q, k, v, query_positions(), ring_.positions_of(source, q.device()),
                               ring_.segments_of_rank(q.device()), out_acc, lse, ring_.mask,
                               scale_));
}

void TensorBlockOps::backward(int kv_slot, int source, int grad_slot) {
  StepRange range("backward", source);
  const auto [k, v] = kv_of(kv_slot, source);
  const auto [dk, dv] = grad_of(grad_slot, source);
  dk.zero_();
  dv.zero_();
  BlockBwdParams params = make_bwd_params(dout, q, k, v, query_positions(),
                                          ring_.positions_of(source, q.device()),
                                          ring_.segments_of_rank(q.device()), lse, delta, dq_acc,
                                          dk, dv, ring_.mask, scale_);
  params.deterministic = deterministic;
  kernels_.bwd(params);
}

void TensorBlockOps::zero_grad(int grad_slot) {
  if (grad_slot == slot::kGradHome) {
    home_dk.zero_();
    home_dv.zero_();
  } else {
    slots_.at(grad_slot).zero_();
  }
}

void TensorBlockOps::add_grad(int dst_slot, int src_slot) {
  const auto [dst_dk, dst_dv] = grad_of(dst_slot, ring_.rank);
  const auto [src_dk, src_dv] = grad_of(src_slot, ring_.rank);
  dst_dk.add_(src_dk);
  dst_dv.add_(src_dv);
}

std::pair<at::Tensor, at::Tensor> TensorBlockOps::kv_of(int kv_slot, int source) const {
  if (kv_slot == slot::kOwnKV && own_k.defined()) return {own_k, own_v};
  const at::Tensor& kv = kv_slot == slot::kAllKV ? slots_.at(kv_slot)[source] : slots_.at(kv_slot);
  return {kv[0], kv[1]};
}

std::pair<at::Tensor, at::Tensor> TensorBlockOps::grad_of(int grad_slot, int source) const {
  if (grad_slot == slot::kGradHome) return {home_dk, home_dv};
  const at::Tensor& grad =
      grad_slot == slot::kAllGrad ? slots_.at(grad_slot)[source] : slots_.at(grad_slot);
  return {grad[0], grad[1]};
}

RankForward::RankForward(const BlockKernels& kernels, int rank, int world, const at::Tensor& q,
                         const at::Tensor& k, const at::Tensor& v, const RingOptions& options)
    : ring(rank, world, options, q.size(1)), ops(kernels, ring, slots, options.softmax_scale) {
  const at::ScalarType acc = acc_dtype(q.scalar_type());
  set_own_kv(ops, slots, k, v, ring);
  ops.q = unit_last_stride(q);
  ops.out_acc = at::zeros(q.sizes(), q.options().dtype(acc));
  ops.lse = at::full({q.size(0), q.size(2), q.size(1)}, -std::numeric_limits<double>::infinity(),
                     q.options().dtype(acc));
}

std::tuple<at::Tensor, at::Tensor> RankForward::result(at::ScalarType dtype) const {
  return {ops.out_acc.to(dtype), ops.lse};
}

RankBackward::RankBackward(const BlockKernels& kernels, int rank, int world,
                           const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                           const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                           const RingOptions& options, const at::Tensor& dlse)
    : ring(rank, world, options, q.size(1)), ops(kernels, ring, slots, options.softmax_scale) {
  const at::ScalarType acc = acc_dtype(q.scalar_type());
  ops.deterministic = options.deterministic;
  set_own_kv(ops, slots, k, v, ring);
  ops.home_dk = at::empty(k.sizes(), k.options().dtype(acc));
  ops.home_dv = at::empty(v.sizes(), v.options().dtype(acc));
  if (ring.kv_exchange == KVExchange::kAllGather && ring.world > 1) {
    // This rank's contributions to every block, and its own block's sum over ranks.
    slots[slot::kAllGrad] = at::empty_like(slots[slot::kAllKV], acc);
    slots[slot::kGradRecv0] = empty_packed(k, acc);
  }
  for (int i = 0; i < 2 && ring.kv_exchange == KVExchange::kRing; ++i) {
    // Travelling sums of steps 1 .. steps-1 and their receive buffers of steps 1 .. steps-2 (slot
    // i: steps t % 2 == i).
    if (i == 0 ? ring.steps > 2 : ring.steps > 1) {
      slots[slot::kGradAcc0 + i] = empty_packed(k, acc);
    }
    if (i == 0 ? ring.steps > 3 : ring.steps > 2) {
      slots[slot::kGradRecv0 + i] = empty_packed(k, acc);
    }
  }
  if (ring.kv_exchange == KVExchange::kRing && ring.reaches[ring.rank] > 0) {
    // The other ranks' sum for the own block, brought home.
    slots[slot::kGradHomeRecv] = empty_packed(k, acc);
  }
  ops.q = unit_last_stride(q);
  ops.dout = unit_last_stride(dout);
  ops.lse = lse;
  // delta = (dout * out).sum(-1) - dlse, as (batch, heads, seqlen) with lse's strides (also when
  // empty): the score gradient p * (dout . v - delta) then includes lse's, p * dlse.
  ops.delta = at::empty_like(lse).copy_((dout.to(acc) * out.to(acc)).sum(-1).transpose(1, 2));
  if (dlse.defined()) {
    TORCH_CHECK_VALUE(dlse.sizes() == lse.sizes(), "ring attention: dlse must have lse's shape ",
                      lse.sizes(), "; got ", dlse.sizes());
    ops.delta.sub_(dlse);
  }
  ops.dq_acc = at::zeros(q.sizes(), q.options().dtype(acc));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> RankBackward::result(at::ScalarType dtype) const {
  return {ops.dq_acc.to(dtype), ops.home_dk.to(dtype), ops.home_dv.to(dtype)};
}

}  // namespace ring_attn
