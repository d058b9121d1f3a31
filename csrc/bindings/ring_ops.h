// Device-agnostic ring attention ops over the core scheduler. A device registers its block
// kernels; everything else (validation, agreement, buffers, transport, schedule) is shared.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>
#include <vector>

#include "bindings/ring_context.h"      // RingOptions
#include "bindings/tensor_block_ops.h"  // BlockKernels

namespace ring_attn {

// Returns (out, lse, forward_call): out like q, lse (batch, heads, seqlen_local) in the
// accumulator dtype; with cu_seqlens q is (tokens_local, heads, headdim) and lse (heads,
// tokens_local). forward_call: a CPU int64 tensor (1,), the call's number over the group
// (agree_or_throw), which ring_backward takes.
std::tuple<at::Tensor, at::Tensor, at::Tensor> ring_forward(const BlockKernels& kernels,
                                                            const at::Tensor& q,
                                                            const at::Tensor& k,
                                                            const at::Tensor& v,
                                                            const RingOptions& options);

// Returns (dq, dk, dv) like q, k, v; dlse, the gradient of lse, may be undefined (0);
// forward_call: ring_forward's (undefined: 0, as for a forward with checks off).
std::tuple<at::Tensor, at::Tensor, at::Tensor> ring_backward(
    const BlockKernels& kernels, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, const RingOptions& options,
    const at::Tensor& dlse = {}, const at::Tensor& forward_call = {});

// The number in a forward_call tensor (undefined: 0).
int64_t forward_call_number(const at::Tensor& forward_call);

// The same ring for `qs.size()` virtual ranks in this process (one shard per rank in each list),
// driven in lockstep from this thread over an in-memory transport: LocalRing.
std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> local_ring_forward(
    const BlockKernels& kernels, const std::vector<at::Tensor>& qs,
    const std::vector<at::Tensor>& ks, const std::vector<at::Tensor>& vs,
    const RingOptions& options);

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>
local_ring_backward(const BlockKernels& kernels, const std::vector<at::Tensor>& douts,
                    const std::vector<at::Tensor>& qs, const std::vector<at::Tensor>& ks,
                    const std::vector<at::Tensor>& vs, const std::vector<at::Tensor>& outs,
                    const std::vector<at::Tensor>& lses, const RingOptions& options,
                    const std::vector<at::Tensor>& dlses = {});

// What the last ring call of this thread did (this rank; summed over virtual ranks for LocalRing).
struct RingStats {
  int64_t steps = 0;             // schedule steps
  int64_t blocks_computed = 0;   // block kernel calls (blocks the mask hides are skipped)
  int64_t exchanges_posted = 0;  // the K/V and dK/dV hops sent, or collectives
  int64_t bytes_sent = 0;        // payload (bindings/counting_transport.h)
  int64_t messages_sent = 0;     // sends (a collective counts world - 1)
};
RingStats last_ring_stats();

// RING_ATTN_CHECK (default 1): whether the ranks agree on the arguments before the ring
// (agreement.h).
bool ring_check_enabled();

}  // namespace ring_attn
