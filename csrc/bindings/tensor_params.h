// Fills the plain kernel params from tensors (shared by every device's bindings).
#pragma once

#include <ATen/core/Tensor.h>

#include "core/params.h"

namespace ring_attn {

DType to_dtype(at::ScalarType type);
// torch.get_float32_matmul_precision() of this process (the params' fp32_precision).
Fp32Precision current_fp32_precision();
// Accumulator dtype for an input dtype: float64 for float64, else float32.
at::ScalarType acc_dtype(at::ScalarType type);
Strides strides_of(const at::Tensor& t);  // t: (batch, seq, heads, headdim), unit headdim stride

// q: (b, sq, h, d); k, v: (b, sk, hk, d); q_pos: (sq,), k_pos: (sk,) int32; q_seg: packed
// sequences' (sq, 2) int32 ranges or undefined (mask.h); out_acc: (b, sq, h, d) and
// lse: (b, h, sq), accumulator dtype.
BlockFwdParams make_fwd_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& q_pos, const at::Tensor& k_pos,
                               const at::Tensor& q_seg, const at::Tensor& out_acc,
                               const at::Tensor& lse, const MaskSpec& mask, double softmax_scale);

// dout like q; lse, delta: (b, h, sq) accumulator dtype; dq_acc like q, dk_acc/dv_acc like k.
BlockBwdParams make_bwd_params(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& v, const at::Tensor& q_pos,
                               const at::Tensor& k_pos, const at::Tensor& q_seg,
                               const at::Tensor& lse, const at::Tensor& delta,
                               const at::Tensor& dq_acc, const at::Tensor& dk_acc,
                               const at::Tensor& dv_acc, const MaskSpec& mask,
                               double softmax_scale);

}  // namespace ring_attn
