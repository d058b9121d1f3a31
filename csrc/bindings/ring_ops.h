// Device-agnostic ring attention ops over the core scheduler. A device registers its block
// kernels; everything else (validation, agreement, buffers, transport, schedule) is shared.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>
#include <tuple>
#include <vector>

#include "core/params.h"

namespace ring_attn {

struct BlockKernels {
  void (*fwd)(const BlockFwdParams&);
  void (*bwd)(const BlockBwdParams&);
};

// Everything of a ring call but the tensors.
struct RingOptions {
  std::string group_name;  // process group registered under this name; "" = world size 1
  bool causal = false;
  double softmax_scale = 1.0;
  int64_t window_left = -1;  // -1: unbounded
  int64_t window_right = -1;
  std::string layout = "contiguous";
  at::Tensor cu_seqlens;  // packed sequences: int32 (num_seqs + 1,) global boundaries, or undefined
  bool deterministic = false;  // backward: no atomics in the CUDA kernels
};

// Returns (out, lse): out like q, lse (batch, heads, seqlen_local) in the accumulator dtype; with
// cu_seqlens q is (tokens_local, heads, headdim) and lse (heads, tokens_local).
std::tuple<at::Tensor, at::Tensor> ring_forward(const BlockKernels& kernels, const at::Tensor& q,
                                                const at::Tensor& k, const at::Tensor& v,
                                                const RingOptions& options);

// Returns (dq, dk, dv) like q, k, v.
std::tuple<at::Tensor, at::Tensor, at::Tensor> ring_backward(
    const BlockKernels& kernels, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, const RingOptions& options);

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
                    const std::vector<at::Tensor>& lses, const RingOptions& options);

// What the last ring call of this thread did (this rank; summed over virtual ranks for LocalRing):
// ring steps, blocks computed, exchanges posted (K/V and dK/dV hops).
struct RingStats {
  int64_t steps = 0;
  int64_t blocks_computed = 0;
  int64_t exchanges_posted = 0;
};
RingStats last_ring_stats();

// RING_ATTN_TIMEOUT in seconds (default 300; <= 0 waits forever) and RING_ATTN_CHECK (default 1).
double ring_timeout_seconds();
bool ring_check_enabled();

}  // namespace ring_attn
