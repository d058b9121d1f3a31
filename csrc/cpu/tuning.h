// Tile sizes of the CPU kernels (the counterpart of the CUDA kernel traits' kBlockM / kBlockN,
// chosen at run time).
#pragma once

#include <cstdint>

#include "core/rounding.h"
#include "cpu/env.h"

namespace ring_attn {
namespace cpu {

// Partial tiles are worked in sub-tiles of kSubRows query rows x kSubCols keys (mask_plan.h).
// kSubCols is a multiple of every panel width.
constexpr int64_t kSubRows = 32;
constexpr int64_t kSubCols = 64;
// The ld of score tiles is the key tile + kScorePad (avoids 4K aliasing).
constexpr int64_t kScorePad = 16;
// With more than one thread, the forward aims for at least this many tasks per thread (dynamic
// scheduling then evens out uneven task costs).
constexpr int64_t kTasksPerThread = 4;

// Query rows x keys per tile (query tiles are multiples of kSubRows rows, key tiles of kSubCols
// keys), and the depth of the P V / gradient GEMM chunks. A key tile's K^T and V panels stay in
// L2 and each micro-kernel's B panel in L1. The forward takes taller query tiles when no mask
// restricts the pairs (every tile full: a K/V tile then serves more rows) and shorter ones
// otherwise (less work on the partial tiles of the diagonal or band).
struct Tuning {
  int64_t fwd_q = 128, fwd_q_unmasked = 256, fwd_k = 256, bwd_q = 64, bwd_k = 256, kc = 128;
};

// The defaults, or RING_ATTN_CPU_TILES (env.h) rounded to those multiples.
inline const Tuning& tuning() {
  static const Tuning t = [] {
    Tuning t;
    if (const auto& r = tile_request()) {
      t = Tuning{round_up<int64_t>(r->fwd_q, kSubRows), round_up<int64_t>(r->fwd_q, kSubRows),
                 round_up<int64_t>(r->fwd_k, kSubCols), round_up<int64_t>(r->bwd_q, kSubRows),
                 round_up<int64_t>(r->bwd_k, kSubCols), r->kc};
    }
    return t;
  }();
  return t;
}

}  // namespace cpu
}  // namespace ring_attn
