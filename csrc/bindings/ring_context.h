// One ring call as every rank sees it: the call's options, every rank's token positions (and,
// for packed sequences, every query's sequence range), which blocks each rank needs, how far each
// block travels and how many steps the ring runs. All of it is derived from the agreed arguments, so it is the same on every
// rank.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>
#include <vector>

#include "core/allgather_scheduler.h"
#include "core/layout.h"
#include "core/mask.h"

namespace ring_attn {

// Everything of a ring call but the tensors.
struct RingOptions {
  std::string group_name;  // process group registered under this name; "" = world size 1
  bool causal = false;
  double softmax_scale = 1.0;
  int64_t window_left = -1;  // -1: unbounded
  int64_t window_right = -1;
  std::string layout = "contiguous";
  std::string kv_exchange = "ring";  // "ring" | "allgather" (core/allgather_scheduler.h)
  at::Tensor cu_seqlens;  // packed sequences: int32 (num_seqs + 1,) global boundaries, or undefined
  bool deterministic = false;  // backward: no atomics in the CUDA kernels
};

struct RingContext {
  int rank;
  int world;
  Layout layout = Layout::kContiguous;
  KVExchange kv_exchange = KVExchange::kRing;
  MaskSpec mask;
  int64_t local_len;
  bool packed;                           // packed variable-length sequences
  std::vector<at::Tensor> positions;     // per rank, int32 (local_len,)
  std::vector<at::Tensor> segments;      // per rank, int32 (local_len, 2) when packed
  std::vector<TileBounds> query_bounds;  // per rank: its queries' visible-key bounds
  std::vector<PositionRange> key_ranges; // per rank: its keys' positions
  std::vector<int> reaches;  // per block: how many hops it travels (core/ring_scheduler.h)
  int steps;                 // of the ring schedule: 1 + the largest reach

  RingContext(int rank, int world, const RingOptions& options, int64_t local_len);

  // Does rank `query_rank`'s queries see any key of `source`?
  bool needs(int query_rank, int source) const;

  // Positions of `source`'s tokens and this rank's sequence ranges (undefined unless packed), on
  // `device`. Device copies are made once and kept across calls (see ring_context.cpp).
  const at::Tensor& positions_of(int source, const at::Device& device);
  at::Tensor segments_of_rank(const at::Device& device);

 private:
  at::Tensor cu_seqlens_host_;  // packed: cu_seqlens on the host
  // What the positions depend on (layout, world size, local length, cu_seqlens), built by the
  // first device copy, so that host-only rings never build it.
  std::string cache_key_;

  // `tensor` (rank `owner`'s `what`), replaced by its device copy on the first call for another
  // device.
  const at::Tensor& on_device(at::Tensor& tensor, const char* what, int owner,
                              const at::Device& device);
};

}  // namespace ring_attn
