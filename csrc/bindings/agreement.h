// Input validation and the ranks' agreement, in one small collective before the first send.
//
// Each rank checks its own inputs and writes a descriptor (shapes, dtype, device, layout, causal,
// scale, kv_exchange, transport) plus its verdict (an error message or nothing). The ranks all-gather the descriptors; if
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
  // The transport of the ring's messages (transport_select.h's TransportKind: 0 c10d, 1 nccl), from
  // this rank's RING_ATTN_TRANSPORT: ranks that pick different ones would never meet.
  int transport = 0;
  // Why RING_ATTN_TRANSPORT picks no transport on this rank (transport_select.h), or empty.
  std::string transport_choice_error = {};

  static const at::Tensor kNoTensor;
};

// Empty when this rank's inputs are valid; otherwise what is wrong, phrased for the user.
std::string validate_local(const RingCall& call);

// One rank's call as a small int64 descriptor: shapes, dtype, device, layout, causal, scale and
// the local verdict with its message.
at::Tensor describe(const RingCall& call);

// Every rank's `descriptor` (int64, at most 188 words) over `group`, on the CPU, gathered on
// `device` (the group's collective device) in one all-gather whose size is the same for every
// call, with the name of the function making it (`call`, under 32 bytes). Ranks that make
// different calls over the group all raise the same ValueError naming each rank's call; a rank
// that does not take part makes the others raise RuntimeError after `timeout_s`.
std::vector<at::Tensor> all_gather_descriptors(const at::Tensor& descriptor,
                                               const std::string& call,
                                               c10d::ProcessGroup& group,
                                               const at::Device& device, double timeout_s);

// The public function a ring call comes from, as errors name it: ring_attn_varlen_func for packed
// sequences (cu_seqlens defined), else ring_attn_func.
std::string ring_call_name(const at::Tensor& cu_seqlens);

// Raises ValueError naming the ranks if any descriptor carries an error or the ranks disagree;
// the message begins with `call` (the function's name).
void check_descriptors(const std::vector<at::Tensor>& descriptors, const std::string& call);

// Raises ValueError (on every rank when `group` is set and checking is on) if any rank's input is
// invalid or the ranks disagree. With check=false only the local verdict is raised, locally. The
// descriptors travel on comm/group_devices.h's collective_device of the group (the CPU for gloo
// groups, the GPU for NCCL-only groups).
// Returns the number of the forward calls agreed on over `group` so far, this one included (the
// same on every rank, as the ranks agree on each call in order), which the backward's agreement
// compares; 0 when nothing was agreed (check=false or one rank).
int64_t agree_or_throw(const RingCall& call, const c10::intrusive_ptr<c10d::ProcessGroup>& group,
                       bool check, double timeout_s);

// Before the backward of `call` (a function's name, under 39 bytes) sends anything over `group`:
// one small all-gather of the call's name, so that a rank making another call over the group
// meanwhile (a rank that skipped the backward) raises the same ValueError as the ranks in the
// backward, with the number agree_or_throw gave its forward call, so that ranks running the
// backwards of different calls raise ValueError too. Nothing with check=false or a group of one
// rank.
void agree_on_backward(const std::string& call,
                       const c10::intrusive_ptr<c10d::ProcessGroup>& group,
                       const at::Tensor& sample, bool check, double timeout_s,
                       int64_t forward_call);

// A rank's place in a U x R grid: its ulysses_group of U ranks and its ring group of R ranks (a
// null group: size 1).
struct UlyssesGrid {
  std::string call;  // the function called, as its errors name it (ring_call_name)
  c10::intrusive_ptr<c10d::ProcessGroup> ulysses;
  c10::intrusive_ptr<c10d::ProcessGroup> ring;
  int ulysses_rank = 0;
  int ulysses_size = 1;
  int ring_rank = 0;
  int ring_size = 1;
};

// The K/V heads a rank holds after the all-to-all over U ranks: lcm(U, heads_kv) / U (K/V heads
// are repeated to lcm(U, heads_kv) so that every rank holds whole GQA groups).
int64_t ulysses_heads_kv(int64_t heads_kv, int ulysses_size);

// Tokens of one rank's ring shard of the packed batch `cu_seqlens` (int32 global boundaries) over
// `ring_size` ranks: what the all-to-all over a ulysses_group gathers, without the pad that made
// it divide by U.
int64_t ulysses_ring_tokens(const at::Tensor& cu_seqlens, Layout layout, int ring_size);

// Raises the same ValueError on every rank of the grid unless every rank's inputs are valid (as
// the ring over the exchanged tensors sees them, too), the ranks of each ulysses_group agree on
// them and on return_lse, and the groups form a U x R grid: every rank of a ulysses_group has the
// same rank in its ring group, every rank of a ring group the same rank in its ulysses_group.
// `call`: this rank's inputs before the all-to-all, world = R. Two small all-gathers (over the
// ulysses_group, then the ring group) before anything else is sent; with check=false only the
// local verdict is raised, locally.
// Returns the number of the forward calls agreed on over the ulysses_group, as agree_or_throw.
int64_t agree_on_grid_or_throw(const RingCall& call, const UlyssesGrid& grid, bool return_lse,
                               bool check, double timeout_s);

// agree_on_backward for the backward of grid.call: over the ulysses_group, then over the ring
// group, so that a rank making another call over either group (a rank that skipped the backward)
// makes every rank of the grid raise ValueError. `sample`: a tensor on the inputs' device.
// Nothing with check=false.
void agree_on_grid_backward(const UlyssesGrid& grid, const at::Tensor& sample, bool check,
                            double timeout_s, int64_t forward_call);

}  // namespace ring_attn
