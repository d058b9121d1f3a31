// Masks from global token positions: one mechanism for every layout.
//
// Every query row and key column carries its position in the global sequence. A pair (i, j) is
// visible iff (causal) k_pos[j] <= q_pos[i]. A tile of rows x columns is classified from the
// min/max positions of its rows and columns alone, so only partial tiles touch elements:
//   skip    : no pair visible          (causal: k.lo > q.hi)
//   full    : every pair visible       (causal: k.hi <= q.lo)
//   partial : otherwise (evaluate is_visible per element)
// The classification is exact for "full" and conservative for "skip" (a tile classified partial
// may still contain no visible pair; it is then computed with every element masked).
#pragma once

#include <cstdint>

#include "macros.h"

namespace ring_attn {

// What the mask depends on besides positions.
struct MaskSpec {
  bool causal = false;
};

// Inclusive [lo, hi] range of positions of a set of tokens; empty when lo > hi.
struct PositionRange {
  int64_t lo;
  int64_t hi;
  RA_HD bool empty() const { return lo > hi; }
};

enum class TileKind : uint8_t { kSkip = 0, kPartial = 1, kFull = 2 };

RA_HD bool is_visible(const MaskSpec& mask, int64_t q_pos, int64_t k_pos) {
  return !mask.causal || k_pos <= q_pos;
}

RA_HD TileKind classify_tile(const MaskSpec& mask, PositionRange q, PositionRange k) {
  if (q.empty() || k.empty()) return TileKind::kSkip;
  if (!mask.causal) return TileKind::kFull;
  if (k.lo > q.hi) return TileKind::kSkip;
  if (k.hi <= q.lo) return TileKind::kFull;
  return TileKind::kPartial;
}

// min/max of pos[begin:end) (positions need not be sorted).
RA_HD PositionRange range_of(const int32_t* pos, int64_t begin, int64_t end) {
  PositionRange r{INT64_MAX, INT64_MIN};
  for (int64_t i = begin; i < end; ++i) {
    const int64_t p = pos[i];
    r.lo = p < r.lo ? p : r.lo;
    r.hi = p > r.hi ? p : r.hi;
  }
  return r;
}

}  // namespace ring_attn
