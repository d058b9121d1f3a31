// Ulysses: an all-to-all over heads inside a ulysses_group of U ranks around the ring over the ring
// group (R ranks), the U x R grid's ranks agreeing first (agreement.h). A rank holds a contiguous
// 1/U of its ring shard with all heads; the all-to-all gives it the whole ring shard (U * L
// tokens) for heads / U query heads and their K/V heads, the ring (ring_ops.h) runs on those, and
// the inverse all-to-all brings the output (and lse) back. K/V heads are repeated to
// lcm(U, heads_kv) first, so every rank holds whole GQA groups; the backward sums their gradients.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>
#include <tuple>

#include "bindings/ring_context.h"      // RingOptions
#include "bindings/tensor_block_ops.h"  // BlockKernels

namespace ring_attn {

// q (batch, L, heads, headdim), k and v (batch, L, heads_kv, headdim); packed sequences
// (options.cu_seqlens): every tensor without the batch dimension, L = ceil(ring tokens / U).
// Returns (out, lse, q_heads, k_heads, v_heads, out_heads, lse_heads, forward_calls): out like
// q; lse
// (batch, heads, L) in the accumulator dtype, or an empty tensor unless return_lse; and what the
// backward needs: the exchanged q_heads (batch, U * L, heads / U, headdim), k_heads and v_heads
// (batch, U * L, lcm(U, heads_kv) / U, headdim), the ring's out_heads like q_heads and lse_heads
// (batch, heads / U, U * L) (packed: the pad after the ring shard's tokens included), and
// forward_calls, a CPU int64 tensor (2,): the call's numbers over the ulysses_group and over the
// ring group (agree_or_throw), which the backward's agreements compare.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor>
ulysses_forward(const BlockKernels& kernels, const at::Tensor& q, const at::Tensor& k,
                const at::Tensor& v, const RingOptions& options,
                const std::string& ulysses_group_name, bool return_lse);

// Returns (dq, dk, dv): dq like dout, dk and dv with the forward's heads_kv K/V heads; dlse, the
// gradient of the forward's lse (undefined: 0), is exchanged like it; forward_calls: the
// forward's (undefined: 0 and 0).
std::tuple<at::Tensor, at::Tensor, at::Tensor> ulysses_backward(
    const BlockKernels& kernels, const at::Tensor& dout, const at::Tensor& q_heads,
    const at::Tensor& k_heads, const at::Tensor& v_heads, const at::Tensor& out_heads,
    const at::Tensor& lse_heads, const RingOptions& options,
    const std::string& ulysses_group_name, int64_t heads_kv, const at::Tensor& dlse = {},
    const at::Tensor& forward_calls = {});

// Bytes this thread has sent in Ulysses all-to-alls so far: (U - 1) / U of every exchanged tensor.
int64_t all_to_all_bytes_sent();

}  // namespace ring_attn
