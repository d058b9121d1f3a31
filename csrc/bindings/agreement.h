// Input validation and the ranks' agreement, in one small collective before the first send.
//
// Each rank checks its own inputs and writes a descriptor (shapes, dtype, device, layout, causal,
// scale, kv_exchange) plus its verdict (an error message or nothing). The ranks all-gather the descriptors; if
// any rank's input is invalid or the ranks disagree, EVERY rank raises the same ValueError naming
// the ranks and the problem, so no rank is left waiting in the ring.
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include <string>
#include <vector>

#include "core/layout.h"

namespace ring_attn {

// One rank's call. Dense: q (batch, seqlen_local, heads, headdim). Packed sequences (cu_seqlens
// defined): q (tokens_local, heads, headdim) as produced by shard_varlen.
struct RingCall {
  const at::Tensor& q;
  const at::Tensor& k;
  const at::Tensor& v;
  const std::string& layout;
  bool causal;
  double softmax_scale;
  int64_t window_left = -1;
  int64_t window_right = -1;
  const at::Tensor& cu_seqlens = kNoTensor;  // int32 (num_seqs + 1,) on the CPU, or undefined
  int world = 1;
  // Why the ring's messages cannot travel on the inputs' device over this group (see
  // comm/group_devices.h), or empty.
  std::string transport_error = {};
  std::string kv_exchange = "ring";  // "ring" | "allgather"

  static const at::Tensor kNoTensor;
};

// Empty when this rank's inputs are valid; otherwise what is wrong, phrased for the user.
std::string validate_local(const RingCall& call);

// One rank's call as a small int64 descriptor: shapes, dtype, device, layout, causal, scale and
// the local verdict with its message.
at::Tensor describe(const RingCall& call);

// Raises ValueError naming the ranks if any descriptor carries an error or the ranks disagree.
void check_descriptors(const std::vector<at::Tensor>& descriptors);

// Raises ValueError (on every rank when `group` is set and checking is on) if any rank's input is
// invalid or the ranks disagree. With check=false only the local verdict is raised, locally. The
// descriptors travel on comm/group_devices.h's collective_device of the group (the CPU for gloo
// groups, the GPU for NCCL-only groups).
void agree_or_throw(const RingCall& call, const c10::intrusive_ptr<c10d::ProcessGroup>& group,
                    bool check, double timeout_s);

}  // namespace ring_attn
