// Per-CTA tile tables: before its main loop, a CTA classifies every tile of the dimension it streams
// (key tiles for the forward and dQ kernels, query stages for the backward) with core/mask.h's
// classify_tile and keeps the live ones, in order, as a list in shared memory:
//   entry = (tile - window start) << 1 | partial
// so the main loop reads one entry per tile: no global loads, no warp reductions, no search.
// "full" is exact, so a full tile runs with no per-element mask; a tile that reaches past the end
// of its dimension is listed as partial (its out-of-range rows or keys must be masked).
// Tables cover windows of kTableTiles tiles (kernel_traits.cuh): a longer dimension is walked
// window by window, each window's list built when the previous one is done.
#pragma once

#include <cstdint>

#include "core/mask.h"
#include "cuda/kernel_traits.cuh"
#include "cuda/primitives.cuh"

namespace ring_attn {
namespace cuda {

RA_DEV int imin(int a, int b) { return a < b ? a : b; }

RA_DEV int entry_tile(uint16_t entry) { return entry >> 1; }
RA_DEV bool entry_partial(uint16_t entry) { return (entry & 1) != 0; }

// min/max of pos[begin:end), computed by one warp (lane i reads positions begin + i + 32j,
// coalesced, then one 32-bit reduction per end): every lane returns the same range.
RA_DEV PositionRange warp_range(const int32_t* pos, int begin, int end, int lane) {
  int32_t lo = INT32_MAX, hi = INT32_MIN;
  for (int i = begin + lane; i < end; i += 32) {
    const int32_t p = pos[i];
    lo = p < lo ? p : lo;
    hi = p > hi ? p : hi;
  }
  lo = warp_min(lo);
  hi = warp_max(hi);
  return lo > hi ? PositionRange{kNoLimit, -kNoLimit} : PositionRange{lo, hi};
}

// The keys query row i sees (core/mask.h row_bounds).
RA_DEV PositionRange query_bounds(const MaskSpec& mask, const int32_t* q_pos, const int32_t* q_seg,
                                  int i) {
  const PositionRange seg =
      q_seg ? PositionRange{q_seg[2 * i], q_seg[2 * i + 1]} : unbounded_range();
  return row_bounds(mask, q_pos[i], seg);
}

// TileBounds32 of this warp's rows reduced over the warp (one 32-bit reduction per field).
RA_DEV TileBounds32 warp_reduce(const TileBounds& t) {
  const TileBounds32 n = narrow(t);
  return TileBounds32{warp_min(n.min_lo), warp_max(n.max_lo), warp_min(n.min_hi),
                      warp_max(n.max_hi), warp_any(n.any_empty_row)};
}

// Bounds of query rows [begin, end) (lane i takes rows begin + i + 32j), reduced in 32 bits
// (core/mask.h TileBounds32: exact, or more conservative at int32's ends): every lane returns the
// same TileBounds.
RA_DEV TileBounds warp_tile_bounds(const MaskSpec& mask, const int32_t* q_pos,
                                   const int32_t* q_seg, int begin, int end, int lane) {
  TileBounds t = empty_tile_bounds();
  for (int i = begin + lane; i < end; i += 32) add_row(t, query_bounds(mask, q_pos, q_seg, i));
  return widen(warp_reduce(t));
}

// The CTA's query rows q0 + [0, rows): each row's bounds narrowed into s_rows (rows at or beyond
// `len` empty), and the bounds of all of them, returned to every thread. scratch: 5 * kNWarps ints.
template <int kNThreads>
RA_DEV TileBounds cta_row_bounds(const MaskSpec& mask, const int32_t* q_pos, const int32_t* q_seg,
                                 int q0, int rows, int len, PositionRange32* s_rows,
                                 int32_t* scratch, int tid) {
  constexpr int kNWarps = kNThreads / 32;
  TileBounds t = empty_tile_bounds();
  for (int i = tid; i < rows; i += kNThreads) {
    PositionRange r{1, 0};
    if (q0 + i < len) {
      r = query_bounds(mask, q_pos, q_seg, q0 + i);
      add_row(t, r);
    }
    s_rows[i] = narrow(r);
  }
  const TileBounds32 w = warp_reduce(t);
  if (tid % 32 == 0) {
    int32_t* slot = scratch + 5 * (tid / 32);
    slot[0] = w.min_lo;
    slot[1] = w.max_lo;
    slot[2] = w.min_hi;
    slot[3] = w.max_hi;
    slot[4] = w.any_empty_row;
  }
  sync_threads();
  TileBounds32 all = narrow(empty_tile_bounds());
  for (int i = 0; i < kNWarps; ++i) {
    const int32_t* slot = scratch + 5 * i;
    all.min_lo = slot[0] < all.min_lo ? slot[0] : all.min_lo;
    all.max_lo = slot[1] > all.max_lo ? slot[1] : all.max_lo;
    all.min_hi = slot[2] < all.min_hi ? slot[2] : all.min_hi;
    all.max_hi = slot[3] > all.max_hi ? slot[3] : all.max_hi;
    all.any_empty_row = all.any_empty_row || slot[4] != 0;
  }
  sync_threads();  // scratch is free again
  return widen(all);
}

// Builds the list of live tiles among [t_begin, t_end) (at most kTableTiles): warp w classifies
// tiles t_begin + w, + kNWarps, ... with classify(t, lane) (warp-uniform TileKind), then warp 0
// compacts them in order. Returns the number of entries, to every thread. Starts with a barrier,
// so the previous list may be read until the call.
template <int kNThreads, typename Classify>
RA_DEV int build_tile_list(uint16_t* list, int32_t* count, int t_begin, int t_end, int tid,
                           Classify&& classify) {
  constexpr int kNWarps = kNThreads / 32;
  const int warp = tid / 32, lane = tid % 32, n = t_end - t_begin;
  sync_threads();
  for (int t = t_begin + warp; t < t_end; t += kNWarps) {
    const TileKind kind = classify(t, lane);
    if (lane == 0) list[t - t_begin] = static_cast<uint16_t>(kind);
  }
  sync_threads();
  if (warp == 0) {
    int live = 0;
    for (int c = 0; c < n; c += 32) {
      const int i = c + lane;
      const uint16_t kind = i < n ? list[i] : static_cast<uint16_t>(TileKind::kSkip);
      const bool keep = kind != static_cast<uint16_t>(TileKind::kSkip);
      const uint32_t ballot = warp_ballot(keep);  // every lane has read its entry
      if (keep) {
        list[live + popcount(ballot & ((1u << lane) - 1u))] =
            static_cast<uint16_t>(i << 1 | (kind == static_cast<uint16_t>(TileKind::kPartial)));
      }
      live += popcount(ballot);
    }
    if (lane == 0) *count = live;
  }
  sync_threads();
  return *count;
}

// Forward and dQ kernels: the key tiles (kBlockN keys, Sk in all) of window [t_begin, t_end) that
// the query rows with bounds `q` see; all_partial: every live tile listed as partial.
template <int kNThreads, int kBlockN>
RA_DEV int build_key_tiles(uint16_t* list, int32_t* count, const TileBounds& q,
                           const int32_t* k_pos, int Sk, bool all_partial, int t_begin, int t_end,
                           int tid) {
  return build_tile_list<kNThreads>(list, count, t_begin, t_end, tid, [&](int t, int lane) {
    const int k0 = t * kBlockN, k1 = imin(k0 + kBlockN, Sk);
    const TileKind kind = classify_tile(q, warp_range(k_pos, k0, k1, lane));
    return kind == TileKind::kFull && (all_partial || k0 + kBlockN > Sk) ? TileKind::kPartial : kind;
  });
}

// Backward: the query stages (kBlockM rows, Sq in all) of window [t_begin, t_end) that see some key
// of the range `k`; every live stage is partial when the CTA's keys run past the end (keys_tail).
template <int kNThreads, int kBlockM>
RA_DEV int build_query_tiles(uint16_t* list, int32_t* count, const MaskSpec& mask,
                             const int32_t* q_pos, const int32_t* q_seg, int Sq,
                             const PositionRange& k, bool keys_tail, int t_begin, int t_end,
                             int tid) {
  return build_tile_list<kNThreads>(list, count, t_begin, t_end, tid, [&](int t, int lane) {
    const int m0 = t * kBlockM, m1 = imin(m0 + kBlockM, Sq);
    const TileKind kind = classify_tile(warp_tile_bounds(mask, q_pos, q_seg, m0, m1, lane), k);
    return kind == TileKind::kFull && (keys_tail || m0 + kBlockM > Sq) ? TileKind::kPartial : kind;
  });
}

}  // namespace cuda
}  // namespace ring_attn
