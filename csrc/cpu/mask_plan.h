// The mask of a CPU kernel call, worked out once per call from the rows' bounds and the keys'
// positions (core/mask.h): each (query tile, key tile) is skipped, full (no per-element mask
// work) or partial. Partial tiles (the causal diagonal, window edges, sequence boundaries) are
// worked in sub-tiles of kSubRows rows x kSubCols keys: each row group computes only the hull of
// its non-skipped key blocks, and masks only when one of them is not full. On the causal diagonal
// this halves the partial tiles' work; for windows and packed sequences it confines the work to
// the band.
#pragma once

#include <algorithm>
#include <climits>
#include <cstdint>
#include <vector>

#include "core/mask.h"
#include "core/rounding.h"
#include "cpu/tuning.h"

namespace ring_attn {
namespace cpu {

struct MaskPlan {
  std::vector<int32_t> bounds;      // 2 * Sq: per row (lo, hi) clamped to int32, (1, 0) if empty
  std::vector<TileBounds> tiles;    // per query tile
  std::vector<TileBounds> subs;     // per kSubRows query rows
  std::vector<PositionRange> keys;  // per kSubCols keys: min/max position
  std::vector<TileKind> kinds;      // per (query tile, key tile): kinds[qt * nkt + kt]
  int64_t nkt = 0;
  TileKind kind(int64_t qt, int64_t kt) const { return kinds[qt * nkt + kt]; }
};

// block_q: a multiple of kSubRows; block_k: a multiple of kSubCols.
inline MaskPlan mask_plan(const MaskSpec& mask, const int32_t* q_pos, const int32_t* q_seg,
                          int64_t Sq, const int32_t* k_pos, int64_t Sk, int64_t block_q,
                          int64_t block_k) {
  MaskPlan r;
  r.bounds.resize(static_cast<size_t>(2 * Sq));
  r.tiles.assign(static_cast<size_t>(cdiv(Sq, block_q)), empty_tile_bounds());
  r.subs.assign(static_cast<size_t>(cdiv(Sq, kSubRows)), empty_tile_bounds());
  for (int64_t i = 0; i < Sq; ++i) {
    const PositionRange seg =
        q_seg ? PositionRange{q_seg[2 * i], q_seg[2 * i + 1]} : unbounded_range();
    const PositionRange row = row_bounds(mask, q_pos[i], seg);
    add_row(r.tiles[static_cast<size_t>(i / block_q)], row);
    add_row(r.subs[static_cast<size_t>(i / kSubRows)], row);
    if (row.empty()) {
      r.bounds[2 * i] = 1;
      r.bounds[2 * i + 1] = 0;
    } else {
      r.bounds[2 * i] = static_cast<int32_t>(std::clamp<int64_t>(row.lo, INT32_MIN, INT32_MAX));
      r.bounds[2 * i + 1] = static_cast<int32_t>(std::clamp<int64_t>(row.hi, INT32_MIN, INT32_MAX));
    }
  }
  const int64_t ncb = cdiv(Sk, kSubCols);
  r.keys.resize(static_cast<size_t>(ncb));
  for (int64_t cb = 0; cb < ncb; ++cb)
    r.keys[cb] = range_of(k_pos, cb * kSubCols, std::min(Sk, (cb + 1) * kSubCols));
  const int64_t nqt = static_cast<int64_t>(r.tiles.size());
  r.nkt = cdiv(Sk, block_k);
  r.kinds.resize(static_cast<size_t>(nqt * r.nkt));
  for (int64_t kt = 0; kt < r.nkt; ++kt) {
    const PositionRange kr = range_of(k_pos, kt * block_k, std::min(Sk, (kt + 1) * block_k));
    for (int64_t qt = 0; qt < nqt; ++qt) r.kinds[qt * r.nkt + kt] = classify_tile(r.tiles[qt], kr);
  }
  return r;
}

// One row group of a partial tile: rows [r0, r0 + nr) and columns [c0, c1) of the tile (the hull
// of its non-skipped key blocks); mask: some of those blocks are not full.
struct SubTile {
  int64_t r0, nr, c0, c1;
  bool mask;
};

// The row groups of the partial tile at (q0, k0) of nq x nk that see any key; returns their count.
inline int64_t plan_partial(const MaskPlan& plan, int64_t q0, int64_t nq, int64_t k0, int64_t nk,
                            SubTile* out) {
  int64_t n = 0;
  for (int64_t r0 = 0; r0 < nq; r0 += kSubRows) {
    const TileBounds& rows = plan.subs[static_cast<size_t>((q0 + r0) / kSubRows)];
    int64_t c0 = -1, c1 = -1;
    bool mask = false;
    for (int64_t c = 0; c < nk; c += kSubCols) {
      const TileKind kind =
          classify_tile(rows, plan.keys[static_cast<size_t>((k0 + c) / kSubCols)]);
      if (kind == TileKind::kSkip) continue;
      if (c0 < 0) c0 = c;
      c1 = std::min(nk, c + kSubCols);
      mask |= kind == TileKind::kPartial;
    }
    if (c0 < 0) continue;
    // A skipped block inside the hull is computed too, and then needs the mask.
    for (int64_t c = c0; c < c1 && !mask; c += kSubCols)
      mask = classify_tile(rows, plan.keys[static_cast<size_t>((k0 + c) / kSubCols)]) !=
             TileKind::kFull;
    out[n++] = SubTile{r0, std::min(kSubRows, nq - r0), c0, c1, mask};
  }
  return n;
}

}  // namespace cpu
}  // namespace ring_attn
