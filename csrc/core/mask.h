// Masks from global token positions: one mechanism for every layout, packed sequences and windows.
//
// Every query row and key column carries its position in the global sequence. A query sees the
// keys whose positions lie in its bounds [lo, hi]:
//   lo = max(seg.lo, q_pos - window_left)                    (window_left  = -1: no limit)
//   hi = min(seg.hi, causal ? q_pos : q_pos + window_right)  (window_right = -1: no limit)
// where seg is the query's sequence as a range of positions (packed sequences; unbounded for one
// sequence; empty for a pad token, which then sees nothing). A pad key's position lies in no
// query's sequence, so no query sees it.
//
// A tile of query rows x key columns is classified from the rows' bounds and the keys' min/max
// positions alone, so only partial tiles touch elements:
//   skip    : no pair visible          (max_hi < k.lo or min_lo > k.hi, or every row empty)
//   full    : every pair visible       (max_lo <= k.lo and k.hi <= min_hi, no empty row)
//   partial : otherwise (evaluate is_visible per element)
// "full" is exact; "skip" is conservative (a partial tile may still show nothing).
#pragma once

#include <cstdint>

#include "macros.h"

namespace ring_attn {

constexpr int64_t kNoLimit = INT64_MAX / 4;  // far beyond any position, safe to add to

struct MaskSpec {
  bool causal = false;
  int64_t window_left = -1;   // keys at positions >= q_pos - window_left; -1: unbounded
  int64_t window_right = -1;  // keys at positions <= q_pos + window_right; -1: unbounded
};

// Inclusive [lo, hi] range of positions; empty when lo > hi.
struct PositionRange {
  int64_t lo;
  int64_t hi;
  RA_HD bool empty() const { return lo > hi; }
};

RA_HD PositionRange unbounded_range() { return PositionRange{-kNoLimit, kNoLimit}; }

enum class TileKind : uint8_t { kSkip = 0, kPartial = 1, kFull = 2 };

// Positions of the keys one query sees. `seg`: the query's sequence (unbounded_range() when the
// sequence is not packed).
RA_HD PositionRange row_bounds(const MaskSpec& mask, int64_t q_pos, PositionRange seg) {
  int64_t lo = seg.lo;
  int64_t hi = seg.hi;
  // Compared as distances (q_pos - lo, hi - q_pos, both within ±2 * kNoLimit), never as
  // q_pos ± window, which overflows for windows near int64's max.
  if (mask.window_left >= 0 && q_pos - lo > mask.window_left) lo = q_pos - mask.window_left;
  if (mask.causal && q_pos < hi) hi = q_pos;
  if (mask.window_right >= 0 && hi - q_pos > mask.window_right) hi = q_pos + mask.window_right;
  return PositionRange{lo, hi};
}

RA_HD bool is_visible(const PositionRange& bounds, int64_t k_pos) {
  return bounds.lo <= k_pos && k_pos <= bounds.hi;
}

// One sequence (no packing): visibility from the two positions alone.
RA_HD bool is_visible(const MaskSpec& mask, int64_t q_pos, int64_t k_pos) {
  return is_visible(row_bounds(mask, q_pos, unbounded_range()), k_pos);
}

// [min, max] of the rows' lo and hi bounds over the non-empty rows of a tile.
struct TileBounds {
  int64_t min_lo, max_lo, min_hi, max_hi;
  bool any_empty_row;
  RA_HD bool all_rows_empty() const { return min_lo > max_lo; }
};

RA_HD TileBounds empty_tile_bounds() {
  return TileBounds{kNoLimit, -kNoLimit, kNoLimit, -kNoLimit, false};
}

RA_HD void add_row(TileBounds& t, PositionRange row) {
  if (row.empty()) {
    t.any_empty_row = true;
    return;
  }
  t.min_lo = row.lo < t.min_lo ? row.lo : t.min_lo;
  t.max_lo = row.lo > t.max_lo ? row.lo : t.max_lo;
  t.min_hi = row.hi < t.min_hi ? row.hi : t.min_hi;
  t.max_hi = row.hi > t.max_hi ? row.hi : t.max_hi;
}

// Bounds of query rows [begin, end). q_seg: per row its sequence as (lo, hi) int32 pairs, or null
// for one unpacked sequence.
RA_HD TileBounds tile_bounds(const MaskSpec& mask, const int32_t* q_pos, const int32_t* q_seg,
                             int64_t begin, int64_t end) {
  TileBounds t = empty_tile_bounds();
  for (int64_t i = begin; i < end; ++i) {
    const PositionRange seg =
        q_seg ? PositionRange{q_seg[2 * i], q_seg[2 * i + 1]} : unbounded_range();
    add_row(t, row_bounds(mask, q_pos[i], seg));
  }
  return t;
}

RA_HD TileKind classify_tile(const TileBounds& q, PositionRange k) {
  if (q.all_rows_empty() || k.empty()) return TileKind::kSkip;
  if (q.max_hi < k.lo || q.min_lo > k.hi) return TileKind::kSkip;
  if (!q.any_empty_row && q.max_lo <= k.lo && k.hi <= q.min_hi) return TileKind::kFull;
  return TileKind::kPartial;
}

// One unpacked sequence: the rows' bounds grow with their positions, so a query range decides.
RA_HD TileKind classify_tile(const MaskSpec& mask, PositionRange q, PositionRange k) {
  if (q.empty()) return TileKind::kSkip;
  TileBounds t = empty_tile_bounds();
  add_row(t, row_bounds(mask, q.lo, unbounded_range()));
  add_row(t, row_bounds(mask, q.hi, unbounded_range()));
  return classify_tile(t, k);
}

// TileBounds in 32 bits, for GPU warps that reduce them with one 32-bit instruction per field
// (positions are int32; a row's bounds are int64 only through the window offsets and the
// kNoLimit sentinels). Each field is saturated to int32 and reduced; widen() then returns
// bounds that classify_tile treats exactly or more conservatively (never a wrong skip or full):
// the saturation is monotone, so every skip test and the all-empty test are unchanged, and of the
// two full tests only max_lo == INT32_MAX (a row starting at or beyond the largest position) and
// min_hi == INT32_MIN could claim too much: widen() moves those out of reach.
struct TileBounds32 {
  int32_t min_lo, max_lo, min_hi, max_hi;
  bool any_empty_row;
};

RA_HD int32_t saturate_i32(int64_t v) {
  return v < INT32_MIN ? INT32_MIN : (v > INT32_MAX ? INT32_MAX : static_cast<int32_t>(v));
}

RA_HD TileBounds32 narrow(const TileBounds& t) {
  return TileBounds32{saturate_i32(t.min_lo), saturate_i32(t.max_lo), saturate_i32(t.min_hi),
                      saturate_i32(t.max_hi), t.any_empty_row};
}

RA_HD TileBounds widen(const TileBounds32& t) {
  return TileBounds{t.min_lo, t.max_lo == INT32_MAX ? kNoLimit : t.max_lo,
                    t.min_hi == INT32_MIN ? -kNoLimit : t.min_hi, t.max_hi, t.any_empty_row};
}

// One row's bounds in 32 bits, for GPU kernels that test int32 key positions element by element.
// Exact for every int32 key: saturating lo and hi to int32 changes no comparison with an int32,
// and an empty row stays empty (lo = INT32_MAX > hi = INT32_MIN) where saturation would close it.
struct PositionRange32 {
  int32_t lo;
  int32_t hi;
};

RA_HD PositionRange32 narrow(const PositionRange& r) {
  if (r.empty()) return PositionRange32{INT32_MAX, INT32_MIN};
  return PositionRange32{saturate_i32(r.lo), saturate_i32(r.hi)};
}

RA_HD bool is_visible(const PositionRange32& bounds, int32_t k_pos) {
  return bounds.lo <= k_pos && k_pos <= bounds.hi;
}

// min/max of pos[begin:end) (positions need not be sorted).
RA_HD PositionRange range_of(const int32_t* pos, int64_t begin, int64_t end) {
  PositionRange r{kNoLimit, -kNoLimit};
  for (int64_t i = begin; i < end; ++i) {
    const int64_t p = pos[i];
    r.lo = p < r.lo ? p : r.lo;
    r.hi = p > r.hi ? p : r.hi;
  }
  return r;
}

}  // namespace ring_attn
