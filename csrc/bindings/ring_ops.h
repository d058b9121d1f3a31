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

// Returns (out, lse): out like q, lse (batch, heads, seqlen_local) in the accumulator dtype.
std::tuple<at::Tensor, at::Tensor> ring_forward(const BlockKernels& kernels, const at::Tensor& q,
                                                const at::Tensor& k, const at::Tensor& v,
                                                const std::string& group_name, bool causal,
                                                double softmax_scale, const std::string& layout);

// Returns (dq, dk, dv) like q, k, v.
std::tuple<at::Tensor, at::Tensor, at::Tensor> ring_backward(
    const BlockKernels& kernels, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
    const std::string& group_name, bool causal, double softmax_scale, const std::string& layout);

// The same ring for `qs.size()` virtual ranks in this process (one shard per rank in each list),
// driven in lockstep from this thread over an in-memory transport: LocalRing.
std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> local_ring_forward(
    const BlockKernels& kernels, const std::vector<at::Tensor>& qs,
    const std::vector<at::Tensor>& ks, const std::vector<at::Tensor>& vs, bool causal,
    double softmax_scale, const std::string& layout);

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>
local_ring_backward(const BlockKernels& kernels, const std::vector<at::Tensor>& douts,
                    const std::vector<at::Tensor>& qs, const std::vector<at::Tensor>& ks,
                    const std::vector<at::Tensor>& vs, const std::vector<at::Tensor>& outs,
                    const std::vector<at::Tensor>& lses, bool causal, double softmax_scale,
                    const std::string& layout);

// RING_ATTN_TIMEOUT in seconds (default 300; <= 0 waits forever) and RING_ATTN_CHECK (default 1).
double ring_timeout_seconds();
bool ring_check_enabled();

}  // namespace ring_attn
