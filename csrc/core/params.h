// Plain parameter structs for the block kernels (CPU and CUDA), in the style of Flash_fwd_params.
// All strides are in elements. Tensors follow the (batch, seq, heads, headdim) convention with a
// unit stride on headdim; accumulators are fp32 for fp32/bf16/fp16 inputs and fp64 for fp64.
#pragma once

#include <cstdint>

#include "mask.h"

namespace ring_attn {

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

// How float32 inputs may be multiplied, after torch.get_float32_matmul_precision():
//   kHighest: in float32 (torch's default);
//   kHigh:    operands split into three bf16 planes (x = x0 + x1 + x2, about float32's 24 bits;
//             the CPU's AMX tile unit multiplies bf16 only);
//   kMedium:  one bf16 plane per operand (bf16 products, float32 accumulation).
// Other dtypes ignore it; a kernel with no faster path for a setting computes in float32.
enum class Fp32Precision : int { kHighest = 0, kHigh = 1, kMedium = 2 };

// Strides of a (batch, seq, heads, headdim) tensor.
struct Strides {
  int64_t batch;
  int64_t row;
  int64_t head;
};

// One query block against one K/V block. Shapes:
//   q: (batch, seqlen_q, nheads, headdim)      k, v: (batch, seqlen_k, nheads_kv, headdim)
//   q_pos: (seqlen_q,)  k_pos: (seqlen_k,)      global positions, shared by every batch entry
struct BlockShape {
  int batch;
  int seqlen_q;
  int seqlen_k;
  int nheads;
  int nheads_kv;  // nheads % nheads_kv == 0; query head h reads K/V head h / (nheads / nheads_kv)
  int headdim;
};

// What the forward and the backward of a block share: the shape, q, k, v and the mask (as
// FlashAttention's Qkv_params under Flash_fwd_params / Flash_bwd_params).
struct BlockParams {
  BlockShape shape;
  DType dtype;  // of q, k, v (and dout)
  const void* q;
  const void* k;
  const void* v;
  Strides q_strides, k_strides, v_strides;
  const int32_t* q_pos;
  const int32_t* k_pos;
  // Packed sequences: per query row, its sequence's real tokens as inclusive (lo, hi) positions,
  // 2 * seqlen_q int32 (mask.h); null for one unpacked sequence.
  const int32_t* q_seg;
  MaskSpec mask;
  double softmax_scale;
  Fp32Precision fp32_precision = Fp32Precision::kHighest;
};

struct BlockFwdParams : BlockParams {
  // Running state, read and written: out_acc (batch, seqlen_q, nheads, headdim) normalised output,
  // lse (batch, nheads, seqlen_q) with unit stride on seq. Start: out_acc = 0, lse = -inf.
  void* out_acc;
  Strides out_strides;
  void* lse;
  int64_t lse_batch_stride;
  int64_t lse_head_stride;
};

struct BlockBwdParams : BlockParams {
  const void* dout;  // (batch, seqlen_q, nheads, headdim), dtype
  Strides dout_strides;
  // Final lse and delta = rowsum(dout * out), both (batch, nheads, seqlen_q) accumulator type.
  const void* lse;
  const void* delta;
  int64_t row_stat_batch_stride;
  int64_t row_stat_head_stride;
  // Gradients, accumulated into (+=), accumulator type:
  //   dq_acc (batch, seqlen_q, nheads, headdim); dk_acc, dv_acc (batch, seqlen_k, nheads_kv, headdim)
  void* dq_acc;
  void* dk_acc;
  void* dv_acc;
  Strides dq_strides, dk_strides, dv_strides;
  // CUDA: accumulate without atomics, so results are bitwise reproducible (slower). The CPU
  // kernels are always deterministic and ignore it.
  bool deterministic;
};

}  // namespace ring_attn
