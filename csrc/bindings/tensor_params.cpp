#include "bindings/tensor_params.h"

#include <ATen/Context.h>
#include <c10/util/Exception.h>

namespace ring_attn {

DType to_dtype(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default: TORCH_CHECK_VALUE(false, "ring attention: unsupported dtype ", type);
  }
}

Fp32Precision current_fp32_precision() {
  switch (at::globalContext().float32MatmulPrecision()) {
    case at::Float32MatmulPrecision::HIGH: return Fp32Precision::kHigh;
    case at::Float32MatmulPrecision::MEDIUM: return Fp32Precision::kMedium;
    default: return Fp32Precision::kHighest;
  }
}

at::ScalarType acc_dtype(at::ScalarType type) {
  return type == at::kDouble ? at::kDouble : at::kFloat;
}

Strides strides_of(const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.dim() == 4 && (t.size(3) <= 1 || t.stride(3) == 1),
                    "ring attention: block tensors must be (batch, seq, heads, headdim) with a unit "
                    "stride on headdim; got sizes ", t.sizes(), " strides ", t.strides());
  return Strides{t.stride(0), t.stride(1), t.stride(2)};
}

static void check_row_stats(const at::Tensor& t, const at::Tensor& q, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 3 && t.size(0) == q.size(0) && t.size(1) == q.size(2) &&
                        t.size(2) == q.size(1) && (t.size(2) <= 1 || t.stride(2) == 1),
                    "ring attention: ", name, " must be (batch, heads, seqlen) with unit stride on "
                    "seqlen; got ", t.sizes());
  TORCH_CHECK_VALUE(t.scalar_type() == acc_dtype(q.scalar_type()), "ring attention: ", name,
                    " must be ", acc_dtype(q.scalar_type()), ", got ", t.scalar_type());
}

static void check_positions(const at::Tensor& pos, int64_t len, const char* name) {
  TORCH_CHECK_VALUE(pos.dim() == 1 && pos.size(0) == len && pos.scalar_type() == at::kInt &&
                        pos.is_contiguous(),
                    "ring attention: ", name, " must be a contiguous int32 tensor of length ", len,
                    "; got ", pos.sizes(), " ", pos.scalar_type());
}

static void check_like(const at::Tensor& t, const at::Tensor& ref, at::ScalarType dtype,
                       const char* name) {
  TORCH_CHECK_VALUE(t.sizes() == ref.sizes() && t.scalar_type() == dtype, "ring attention: ", name,
                    " must have shape ", ref.sizes(), " and dtype ", dtype, "; got ", t.sizes(),
                    " ", t.scalar_type());
}

// Equal strides on every dim of size > 1 (a size-1 dim's stride is never used); a and b have
// equal sizes.
static bool same_strides(const at::Tensor& a, const at::Tensor& b) {
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  }
  return true;
}

static BlockShape shape_of(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK_VALUE(q.dim() == 4 && k.dim() == 4 && k.sizes() == v.sizes() &&
                        q.size(0) == k.size(0) && q.size(3) == k.size(3) && k.size(2) > 0 &&
                        q.size(2) % k.size(2) == 0,
                    "ring attention: incompatible block shapes q ", q.sizes(), ", k ", k.sizes(),
                    ", v ", v.sizes());
  TORCH_CHECK_VALUE(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
                    "ring attention: q, k, v dtypes differ");
  return BlockShape{static_cast<int>(q.size(0)), static_cast<int>(q.size(1)),
                    static_cast<int>(k.size(1)), static_cast<int>(q.size(2)),
                    static_cast<int>(k.size(2)), static_cast<int>(q.size(3))};
}

static const int32_t* segments_of(const at::Tensor& q_seg, int64_t len) {
  if (!q_seg.defined()) return nullptr;
  TORCH_CHECK_VALUE(q_seg.dim() == 2 && q_seg.size(0) == len && q_seg.size(1) == 2 &&
                        q_seg.scalar_type() == at::kInt && q_seg.is_contiguous(),
                    "ring attention: q_seg must be a contiguous int32 tensor of shape (", len,
                    ", 2); got ", q_seg.sizes(), " ", q_seg.scalar_type());
  return q_seg.data_ptr<int32_t>();
}

// One (batch, seq, heads, headdim) operand: its data pointer and strides.
template <typename Pointer>
static void set_operand(Pointer& data, Strides& strides, const at::Tensor& t) {
  data = t.data_ptr();
  strides = strides_of(t);
}

// The fields the forward and backward params share: q, k, v and their strides...
static void set_qkv(BlockParams& p, const at::Tensor& q, const at::Tensor& k,
                    const at::Tensor& v) {
  set_operand(p.q, p.q_strides, q);
  set_operand(p.k, p.k_strides, k);
  set_operand(p.v, p.v_strides, v);
}

// ... and the mask (positions, packed sequences' ranges), scale and fp32 precision.
static void set_mask(BlockParams& p, const at::Tensor& q_pos, const at::Tensor& k_pos,
                     const at::Tensor& q_seg, const MaskSpec& mask, double softmax_scale) {
  p.q_pos = q_pos.data_ptr<int32_t>();
  p.k_pos = k_pos.data_ptr<int32_t>();
  p.q_seg = segments_of(q_seg, q_pos.size(0));
  p.mask = mask;
  p.softmax_scale = softmax_scale;
  p.fp32_precision = current_fp32_precision();
}

BlockFwdParams make_fwd_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& q_pos, const at::Tensor& k_pos,
                               const at::Tensor& q_seg, const at::Tensor& out_acc,
                               const at::Tensor& lse, const MaskSpec& mask, double softmax_scale) {
  BlockFwdParams p{};
  p.shape = shape_of(q, k, v);
  p.dtype = to_dtype(q.scalar_type());
  check_positions(q_pos, q.size(1), "q_pos");
  check_positions(k_pos, k.size(1), "k_pos");
  check_like(out_acc, q, acc_dtype(q.scalar_type()), "out_acc");
  check_row_stats(lse, q, "lse");
  set_qkv(p, q, k, v);
  set_mask(p, q_pos, k_pos, q_seg, mask, softmax_scale);
  set_operand(p.out_acc, p.out_strides, out_acc);
  p.lse = lse.data_ptr();
  p.lse_batch_stride = lse.stride(0);
  p.lse_head_stride = lse.stride(1);
  return p;
}

BlockBwdParams make_bwd_params(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& v, const at::Tensor& q_pos,
                               const at::Tensor& k_pos, const at::Tensor& q_seg,
                               const at::Tensor& lse, const at::Tensor& delta,
                               const at::Tensor& dq_acc, const at::Tensor& dk_acc,
                               const at::Tensor& dv_acc, const MaskSpec& mask,
                               double softmax_scale) {
  BlockBwdParams p{};
  p.shape = shape_of(q, k, v);
  p.dtype = to_dtype(q.scalar_type());
  const at::ScalarType acc = acc_dtype(q.scalar_type());
  check_positions(q_pos, q.size(1), "q_pos");
  check_positions(k_pos, k.size(1), "k_pos");
  check_like(dout, q, q.scalar_type(), "dout");
  check_row_stats(lse, q, "lse");
  check_row_stats(delta, q, "delta");
  TORCH_CHECK_VALUE(same_strides(lse, delta), "ring attention: lse and delta must share strides; got ",
                    lse.strides(), " and ", delta.strides());
  check_like(dq_acc, q, acc, "dq_acc");
  check_like(dk_acc, k, acc, "dk_acc");
  check_like(dv_acc, v, acc, "dv_acc");
  set_qkv(p, q, k, v);
  set_operand(p.dout, p.dout_strides, dout);
  set_mask(p, q_pos, k_pos, q_seg, mask, softmax_scale);
  p.lse = lse.data_ptr();
  p.delta = delta.data_ptr();
  p.row_stat_batch_stride = lse.stride(0);
  p.row_stat_head_stride = lse.stride(1);
  set_operand(p.dq_acc, p.dq_strides, dq_acc);
  set_operand(p.dk_acc, p.dk_strides, dk_acc);
  set_operand(p.dv_acc, p.dv_strides, dv_acc);
  return p;
}

}  // namespace ring_attn
