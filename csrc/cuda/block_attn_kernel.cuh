// Kernel bodies of the CUDA block attention (FlashAttention-2 style, mma.sync m16n8k16).
//
// Forward: one CTA per (query tile of kBlockM = 128 rows, head, batch), 4 warps of 2 m-tiles of 16
//   query rows each (every K/V fragment read from shared memory feeds both m-tiles' MMAs).
//   Q is staged in shared memory once and kept in registers as MMA A fragments; K/V tiles of
//   kBlockN = 64 keys go through shared memory with cp.async, double buffered (the next live tile
//   is fetched while the current one is computed). Per tile: S = Q K^T (fp32), scale, mask,
//   online softmax in registers (core/merge.h OnlineRow), P rounded to bf16/fp16, O += P V.
//   Prologue and epilogue implement the fused LSE merge with the running (out_acc, lse).
// Backward: one CTA per (key tile of kBlockN = 64 keys, query head, batch), 4 warps of 16 keys;
//   K/V stay in shared memory, query tiles (Q, dO, lse, delta) stream through double-buffered
//   shared memory. Per query tile (warp-local, keys as MMA rows): S^T = K Q^T, P^T = exp(S^T -
//   lse), dP^T = V dO^T, dS^T = P^T (dP^T - delta); dV += P^T dO and dK += dS^T Q in registers;
//   dS^T goes to shared memory, and after a barrier each warp computes a slice of dQ = dS K and
//   adds it to dq_acc with fp32 atomics. dK/dV are added to dk_acc/dv_acc at the end (atomics when
//   several query heads share the K/V head).
// Deterministic backward (params.deterministic, kDeterministic): no atomics, so the sums run in a fixed order. The
//   backward kernel runs one CTA per K/V head that takes the group's query heads in turn (dK/dV
//   summed in registers) and skips dQ; a second kernel, one CTA per (query tile, head, batch) as in
//   the forward, recomputes P and dS per key tile and owns its dQ rows. Costs about one more
//   pass of Q K^T and dO V^T.
//
// Masking (core/mask.h, the same code as the CPU kernels): a query tile's rows are summarised by
// tile_bounds (windows, packed sequences via q_seg, causal), a key tile by range_of, and
// classify_tile decides skip / full / partial; skipped tiles are never loaded, full tiles evaluate
// no per-element mask, partial tiles and tiles with out-of-range keys evaluate is_visible against
// each row's row_bounds. Rows that see nothing keep out = 0 and lse = -inf (never -inf - -inf).
// Out-of-range rows and head-dim columns beyond the real head dim are zero-filled in shared memory
// and never stored.
#pragma once

#include <cstdint>
#include <limits>

#include "core/mask.h"
#include "core/merge.h"
#include "core/params.h"
#include "cuda/block_attn_cuda.h"
#include "cuda/primitives.cuh"

#if defined(RA_CUDA_EMULATE)
#define RA_UNROLL
#else
#define RA_UNROLL _Pragma("unroll")
#endif

namespace ring_attn {
namespace cuda {

template <bool kBF16_, int kHeadDim_>
struct FwdTraits {
  static constexpr bool kBF16 = kBF16_;
  static constexpr int kHeadDim = kHeadDim_;  // compiled bucket; the real head dim is <= this
  static constexpr int kNWarps = 4;
  static constexpr int kNThreads = 32 * kNWarps;
  // Query m-tiles of 16 rows per warp: each K/V fragment read from shared memory feeds kMTiles
  // MMAs, and a K/V tile's copy and bookkeeping serve kMTiles x as many rows.
  static constexpr int kMTiles = 2;
  static constexpr int kBlockM = 16 * kMTiles * kNWarps;  // query rows per CTA
  static constexpr int kBlockN = 64;                      // keys per tile
  static constexpr int kStride = kHeadDim + 8;  // smem row pitch (elements): conflict-free ldmatrix
  // Q as MMA fragments in registers for the whole kernel (else re-read from smem per key tile):
  // for larger head dims the registers are needed for the output accumulator.
  static constexpr bool kQInRegs = kHeadDim <= 32;
  // Q, 2 x (K, V) (16-bit elements), then each row's visible key range (two int64).
  static constexpr int kSmemElems = kBlockM * kStride + 4 * kBlockN * kStride;
  static constexpr int kSmemBytes = kSmemElems * 2 + kBlockM * 16;
  static_assert(kHeadDim % 16 == 0 && kHeadDim <= 128, "head dim bucket");
  static_assert((kSmemElems * 2) % 16 == 0, "row range alignment");
};

template <bool kBF16_, int kHeadDim_>
struct BwdTraits {
  static constexpr bool kBF16 = kBF16_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kNWarps = 4;
  static constexpr int kNThreads = 32 * kNWarps;
  static constexpr int kBlockN = 16 * kNWarps;              // keys per CTA (16 per warp)
  static constexpr int kBlockM = 32;  // query rows per tile (64 would spill registers)
  static constexpr int kStride = kHeadDim + 8;
  static constexpr int kStrideS = kBlockM + 8;  // dS^T tile pitch
  // K, V, 2 x (Q, dO), dS^T (16-bit elements), then 2 x (lse, delta) floats.
  static constexpr int kSmemElems =
      2 * kBlockN * kStride + 4 * kBlockM * kStride + kBlockN * kStrideS;
  static constexpr int kSmemBytes = kSmemElems * 2 + 4 * kBlockM * 4;
  static_assert(kHeadDim % 16 == 0 && kHeadDim <= 128, "head dim bucket");
  static_assert((kSmemElems * 2) % 16 == 0, "float tail alignment");
};

// Deterministic dQ (block_dq_body): one CTA per (query tile, head, batch) as in the forward.
template <bool kBF16_, int kHeadDim_>
struct DqTraits {
  static constexpr bool kBF16 = kBF16_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kNWarps = 4;
  static constexpr int kNThreads = 32 * kNWarps;
  static constexpr int kBlockM = 16 * kNWarps;  // query rows per CTA
  static constexpr int kBlockN = 64;            // keys per tile
  static constexpr int kStride = kHeadDim + 8;
  // Q, dO, 2 x (K, V)
  static constexpr int kSmemElems = 2 * kBlockM * kStride + 4 * kBlockN * kStride;
  static constexpr int kSmemBytes = kSmemElems * 2;
  static_assert(kHeadDim % 16 == 0 && kHeadDim <= 128, "head dim bucket");
};

RA_DEV int imin(int a, int b) { return a < b ? a : b; }

RA_DEV float neg_inf_f() { return -std::numeric_limits<float>::infinity(); }
RA_DEV float pos_inf_f() { return std::numeric_limits<float>::infinity(); }

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

// Bounds of query rows [begin, end) (core/mask.h row_bounds per row, lane i taking rows
// begin + i + 32j), reduced in 32 bits (core/mask.h TileBounds32: exact, or more conservative at
// int32's ends): every lane returns the same TileBounds.
RA_DEV TileBounds warp_tile_bounds(const MaskSpec& mask, const int32_t* q_pos,
                                   const int32_t* q_seg, int begin, int end, int lane) {
  TileBounds t = empty_tile_bounds();
  for (int i = begin + lane; i < end; i += 32) {
    const PositionRange seg =
        q_seg ? PositionRange{q_seg[2 * i], q_seg[2 * i + 1]} : unbounded_range();
    add_row(t, row_bounds(mask, q_pos[i], seg));
  }
  const TileBounds32 n = narrow(t);
  return widen(TileBounds32{warp_min(n.min_lo), warp_max(n.max_lo), warp_min(n.min_hi),
                            warp_max(n.max_hi), warp_any(n.any_empty_row)});
}

// The keys query row i sees (core/mask.h row_bounds); an empty range for rows out of range.
RA_DEV PositionRange query_bounds(const MaskSpec& mask, const int32_t* q_pos, const int32_t* q_seg,
                                  int i, int len) {
  if (i >= len) return PositionRange{1, 0};
  const PositionRange seg =
      q_seg ? PositionRange{q_seg[2 * i], q_seg[2 * i + 1]} : unbounded_range();
  return row_bounds(mask, q_pos[i], seg);
}

struct LiveTile {
  int index;  // -1: none left
  TileKind kind;
};

// Forward: the first key tile t' >= t (tiles of `block` keys, `len` in all) not skipped by the
// query tile's bounds. Warp-uniform, and the same in every warp.
RA_DEV LiveTile next_live_keys(const TileBounds& q, const int32_t* k_pos, int len, int block, int t,
                               int lane) {
  const int ntiles = (len + block - 1) / block;
  for (; t < ntiles; ++t) {
    const PositionRange k = warp_range(k_pos, t * block, imin(t * block + block, len), lane);
    const TileKind kind = classify_tile(q, k);
    if (kind != TileKind::kSkip) return {t, kind};
  }
  return {-1, TileKind::kSkip};
}

// Backward: the first query tile t' >= t (tiles of `block` rows, `len` in all) that sees some key
// of the range `k`. Warp-uniform, and the same in every warp.
RA_DEV LiveTile next_live_queries(const MaskSpec& mask, const int32_t* q_pos, const int32_t* q_seg,
                                  int len, int block, const PositionRange& k, int t, int lane) {
  const int ntiles = (len + block - 1) / block;
  for (; t < ntiles; ++t) {
    const TileBounds q =
        warp_tile_bounds(mask, q_pos, q_seg, t * block, imin(t * block + block, len), lane);
    const TileKind kind = classify_tile(q, k);
    if (kind != TileKind::kSkip) return {t, kind};
  }
  return {-1, TileKind::kSkip};
}

// cp.async of rows [row0, row0 + kRows) of a (rows, headdim) operand into a smem tile with pitch
// kStride: rows >= nrows and columns >= d are zero-filled. One commit group is left open.
template <int kRows, int kHeadDim, int kStride, int kNThreads>
RA_DEV void load_rows(uint16_t* s, const uint16_t* g, int64_t row_stride, int row0, int nrows,
                      int d, int tid) {
  constexpr int kChunks = kHeadDim / 8;  // 16-byte chunks per row
  constexpr int kTotal = kRows * kChunks;
  static_assert(kTotal % kNThreads == 0, "tile chunks");
  RA_UNROLL
  for (int it = 0; it < kTotal / kNThreads; ++it) {
    const int i = it * kNThreads + tid;
    const int r = i / kChunks;
    const int c = (i % kChunks) * 8;
    const bool valid = row0 + r < nrows && c < d;
    const uint16_t* src = valid ? g + static_cast<int64_t>(row0 + r) * row_stride + c : g;
    cp_async_16(s + r * kStride + c, src, valid);
  }
}

// cp.async of key tile `tile` (kRows keys of K and of V, pitch kStride) into stage `stage` of sK
// and sV (stage s at + s * kRows * kStride; single-buffered tiles use stage 0); the commit is the
// caller's.
template <int kRows, int kHeadDim, int kStride, int kNThreads, typename Params>
RA_DEV void load_kv_tile(uint16_t* sK, uint16_t* sV, int stage, const uint16_t* gK,
                         const uint16_t* gV, const Params& p, int tile, int d, int tid) {
  const int Sk = p.shape.seqlen_k;
  const int offset = stage * kRows * kStride, row0 = tile * kRows;
  load_rows<kRows, kHeadDim, kStride, kNThreads>(sK + offset, gK, p.k_strides.row, row0, Sk, d,
                                                 tid);
  load_rows<kRows, kHeadDim, kStride, kNThreads>(sV + offset, gV, p.v_strides.row, row0, Sk, d,
                                                 tid);
}

// One step of the key-tile pipeline of the forward and dQ kernels (K/V tiles of kRows keys,
// double-buffered in sK/sV): finds the next live tile after `cur` (its position loads overlap the
// wait), waits until tile `cur` is in stage `stage` and every warp is done with the other stage,
// then starts copying the next live tile there. Returns it (index -1: none left).
template <int kRows, int kHeadDim, int kStride, int kNThreads, typename Params>
RA_DEV LiveTile kv_pipeline_step(const TileBounds& q_bounds, const Params& p, const LiveTile& cur,
                                 int stage, uint16_t* sK, uint16_t* sV, const uint16_t* gK,
                                 const uint16_t* gV, int d, int tid, int lane) {
  const LiveTile nxt =
      next_live_keys(q_bounds, p.k_pos, p.shape.seqlen_k, kRows, cur.index + 1, lane);
  cp_async_wait<0>();
  sync_threads();
  if (nxt.index >= 0) {
    load_kv_tile<kRows, kHeadDim, kStride, kNThreads>(sK, sV, stage ^ 1, gK, gV, p, nxt.index, d,
                                                      tid);
    cp_async_commit();
  }
  return nxt;
}

// A fragment (16 rows x 16 columns at (row0, col0)) of a row-major smem tile.
template <int kPitch>
RA_DEV void load_a(uint32_t (&a)[4], const uint16_t* s, int row0, int col0, int lane) {
  ldmatrix_x4(a, s + (row0 + (lane % 8) + ((lane / 8) % 2) * 8) * kPitch + col0 + (lane / 16) * 8);
}

// B fragments of two adjacent n-blocks where the smem tile is stored n-major (rows = n, columns =
// k, as K in Q K^T): b[0], b[1] for n-block n0, b[2], b[3] for n-block n0 + 8; k from col0.
template <int kPitch>
RA_DEV void load_b_nk(uint32_t (&b)[4], const uint16_t* s, int n0, int col0, int lane) {
  ldmatrix_x4(b, s + (n0 + (lane / 16) * 8 + (lane % 8)) * kPitch + col0 + ((lane / 8) % 2) * 8);
}

// B fragments of two adjacent n-blocks where the smem tile is stored k-major (rows = k, columns =
// n, as V in P V): b[0], b[1] for columns n0..n0+7, b[2], b[3] for n0+8..n0+15; k from row0.
template <int kPitch>
RA_DEV void load_b_kn(uint32_t (&b)[4], const uint16_t* s, int row0, int n0, int lane) {
  ldmatrix_x4_trans(b, s + (row0 + ((lane / 8) % 2) * 8 + (lane % 8)) * kPitch + n0 + (lane / 16) * 8);
}

// A fragment (rows m0..m0+15, k k0..k0+15) of the transpose of a smem tile stored k-major (rows =
// k, columns = m, as dS^T for dQ = dS K).
template <int kPitch>
RA_DEV void load_a_trans(uint32_t (&a)[4], const uint16_t* s, int k0, int m0, int lane) {
  ldmatrix_x4_trans(a, s + (k0 + (lane / 16) * 8 + (lane % 8)) * kPitch + m0 + ((lane / 8) % 2) * 8);
}

// A fragment of a 16 x 16 block (columns 16j..16j+15) from C fragments c[2j], c[2j+1].
template <bool kBF16, int N>
RA_DEV void c_to_a(uint32_t (&a)[4], const float (&c)[N][4], int j) {
  a[0] = pack2<kBF16>(c[2 * j][0], c[2 * j][1]);
  a[1] = pack2<kBF16>(c[2 * j][2], c[2 * j][3]);
  a[2] = pack2<kBF16>(c[2 * j + 1][0], c[2 * j + 1][1]);
  a[3] = pack2<kBF16>(c[2 * j + 1][2], c[2 * j + 1][3]);
}

// Calls f(nb, i, r, visible) for each score fragment element s[nb][i] of this thread: i = 2r + e
// is row r (of the two) and key k0 + nb*8 + 2*t4 + e; visible says whether the row sees the key
// (true throughout when !need_mask, i.e. a full tile with every key in range).
template <int kNb, typename F>
RA_DEV void for_each_score(int k0, int Sk, bool need_mask, const PositionRange (&seen)[2],
                           const int32_t* k_pos, int t4, F&& f) {
  RA_UNROLL
  for (int nb = 0; nb < kNb; ++nb) {
    RA_UNROLL
    for (int e = 0; e < 2; ++e) {
      const int key = k0 + nb * 8 + t4 * 2 + e;
      const bool in_range = key < Sk;
      const int64_t kpos = need_mask && in_range ? k_pos[key] : 0;
      RA_UNROLL
      for (int r = 0; r < 2; ++r) {
        f(nb, 2 * r + e, r, !need_mask || (in_range && is_visible(seen[r], kpos)));
      }
    }
  }
}

// c[mt][2n] += af[mt] x (bf[0], bf[1]) and c[mt][2n + 1] += af[mt] x (bf[2], bf[3]) for every
// m-tile mt: one B fragment pair (two n-blocks) feeding kMT MMAs each.
template <bool kBF16, int kMT, int kN>
RA_DEV void mma_b_pair(float (&c)[kMT][kN][4], int n, const uint32_t (&af)[kMT][4],
                       const uint32_t (&bf)[4]) {
  RA_UNROLL
  for (int mt = 0; mt < kMT; ++mt) {
    mma_16816<kBF16>(c[mt][2 * n], af[mt], bf[0], bf[1]);
    mma_16816<kBF16>(c[mt][2 * n + 1], af[mt], bf[2], bf[3]);
  }
}

// The forward's two GEMMs over kMT m-tiles of 16 rows per warp: every B fragment loaded from
// shared memory feeds kMT MMAs. c[mt] = Q K^T for Q rows [a_row0 + 16 mt, + 16) of a row-major
// smem tile (or Q fragments held in registers, qf), K rows [0, kNb * 8) of an n-major tile.
template <bool kBF16, int kKc, int kNb, int kPitch, int kMT, bool kAInRegs, int kQf>
RA_DEV void mma_tiles_by_nk(float (&c)[kMT][kNb][4], const uint16_t* a, int a_row0,
                            const uint32_t (&qf)[kQf][kKc][4], const uint16_t* b, int lane) {
  RA_UNROLL
  for (int mt = 0; mt < kMT; ++mt) {
    RA_UNROLL
    for (int nb = 0; nb < kNb; ++nb) c[mt][nb][0] = c[mt][nb][1] = c[mt][nb][2] = c[mt][nb][3] = 0.f;
  }
  RA_UNROLL
  for (int kc = 0; kc < kKc; ++kc) {
    uint32_t af[kMT][4];
    RA_UNROLL
    for (int mt = 0; mt < kMT; ++mt) {
      if constexpr (kAInRegs) {
        RA_UNROLL
        for (int i = 0; i < 4; ++i) af[mt][i] = qf[mt][kc][i];
      } else {
        load_a<kPitch>(af[mt], a, a_row0 + 16 * mt, kc * 16, lane);
      }
    }
    RA_UNROLL
    for (int j = 0; j < kNb / 2; ++j) {
      uint32_t bf[4];
      load_b_nk<kPitch>(bf, b, j * 16, kc * 16, lane);
      mma_b_pair<kBF16>(c, j, af, bf);
    }
  }
}

// acc[mt] += P[mt] V over kMT m-tiles: P from C fragments (rounded to 16 bits), V rows
// [0, kKc * 16) of a k-major smem tile; every V fragment feeds kMT MMAs.
template <bool kBF16, int kKc, int kNbO, int kPitch, int kMT, int kNbA>
RA_DEV void mma_tiles_by_kn(float (&acc)[kMT][kNbO][4], const float (&a)[kMT][kNbA][4],
                            const uint16_t* b, int lane) {
  static_assert(kNbA == 2 * kKc, "A fragments: two n-blocks per k-chunk");
  RA_UNROLL
  for (int j = 0; j < kKc; ++j) {
    uint32_t af[kMT][4];
    RA_UNROLL
    for (int mt = 0; mt < kMT; ++mt) c_to_a<kBF16>(af[mt], a[mt], j);
    RA_UNROLL
    for (int t = 0; t < kNbO / 2; ++t) {
      uint32_t bf[4];
      load_b_kn<kPitch>(bf, b, j * 16, t * 16, lane);
      mma_b_pair<kBF16>(acc, t, af, bf);
    }
  }
}

// The one-m-tile forms (kMT = 1) for the backward, whose warps take 16 rows.
// c (16 rows x kNb * 8 columns) = A B^T: A rows [a_row0, a_row0 + 16) of a row-major smem tile,
// B rows [0, kNb * 8) of an n-major smem tile: S^T = K Q^T, dP^T = V dO^T, S = Q K^T, dP = dO V^T.
template <bool kBF16, int kKc, int kNb, int kPitch>
RA_DEV void mma_smem_by_nk(float (&c)[kNb][4], const uint16_t* a, int a_row0, const uint16_t* b,
                           int lane) {
  const uint32_t no_fragments[1][kKc][4] = {};  // A comes from shared memory
  mma_tiles_by_nk<kBF16, kKc, kNb, kPitch, 1, false>(reinterpret_cast<float(&)[1][kNb][4]>(c), a,
                                                      a_row0, no_fragments, b, lane);
}

// acc (16 rows x kNbO * 8 columns) += A B, A from the C fragments a (rounded to 16 bits), B rows
// [0, kKc * 16) of a k-major smem tile: dQ += dS K.
template <bool kBF16, int kKc, int kNbO, int kPitch, int kNbA>
RA_DEV void mma_frags_by_kn(float (&acc)[kNbO][4], const float (&a)[kNbA][4], const uint16_t* b,
                            int lane) {
  mma_tiles_by_kn<kBF16, kKc, kNbO, kPitch, 1>(reinterpret_cast<float(&)[1][kNbO][4]>(acc),
                                               reinterpret_cast<const float(&)[1][kNbA][4]>(a), b,
                                               lane);
}

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------
template <typename Kt>
RA_DEV void block_fwd_body(const FwdArgs& args, char* smem_raw) {
  constexpr bool kBF16 = Kt::kBF16;
  constexpr int kD = Kt::kHeadDim, kBM = Kt::kBlockM, kBN = Kt::kBlockN, kStride = Kt::kStride;
  constexpr int kNT = Kt::kNThreads, kMT = Kt::kMTiles;
  constexpr int kNbS = kBN / 8;   // n-blocks of a score row (keys)
  constexpr int kKcQK = kD / 16;  // k-chunks of Q K^T (head dim)
  constexpr int kNbO = kD / 8;    // n-blocks of an output row (head dim)
  constexpr int kKcPV = kBN / 16; // k-chunks of P V (keys)

  const BlockFwdParams& p = args.p;
  const int tid = thread_idx(), warp = tid / 32, lane = tid % 32, g = lane / 4, t4 = lane % 4;
  const int q0 = block_idx_x() * kBM, h = block_idx_y(), b = block_idx_z();
  const int Sq = p.shape.seqlen_q, Sk = p.shape.seqlen_k, d = p.shape.headdim;
  const int hk = h / (p.shape.nheads / p.shape.nheads_kv);
  const float scale = static_cast<float>(p.softmax_scale);
  const float ninf = neg_inf_f();
  // With scale > 0 the scores stay unscaled until the exponential (max(scale s) = scale max(s)):
  // the true score is score_unit * s after the mask pass, and p = exp2(s * exp2_mul - m log2(e)).
  const bool fold_scale = scale > 0.f;
  const float score_unit = fold_scale ? scale : 1.f;
  const float mask_mul = fold_scale ? 1.f : scale;
  const float exp2_mul = score_unit * kLog2eF;

  const TileBounds q_bounds = warp_tile_bounds(p.mask, p.q_pos, p.q_seg, q0, imin(q0 + kBM, Sq), lane);
  LiveTile cur = next_live_keys(q_bounds, p.k_pos, Sk, kBN, 0, lane);
  float* gO = static_cast<float*>(p.out_acc) + b * p.out_strides.batch + h * p.out_strides.head;
  float* gL = static_cast<float*>(p.lse) + b * p.lse_batch_stride + h * p.lse_head_stride;
  if (cur.index < 0) {
    // Nothing visible: the running state is unchanged (with merge off: the empty state).
    if (!args.merge) {
      for (int i = tid; i < kBM * d; i += Kt::kNThreads) {
        const int r = q0 + i / d;
        if (r < Sq) gO[static_cast<int64_t>(r) * p.out_strides.row + i % d] = 0.f;
      }
      for (int i = tid; i < kBM; i += Kt::kNThreads) {
        if (q0 + i < Sq) gL[q0 + i] = ninf;
      }
    }
    return;
  }

  uint16_t* sQ = reinterpret_cast<uint16_t*>(smem_raw);
  uint16_t* sK = sQ + kBM * kStride;      // stage s at sK + s * kBN * kStride
  uint16_t* sV = sK + 2 * kBN * kStride;  // likewise
  // Row i's visible keys (read by partial tiles only, so they need no registers).
  PositionRange* sSeen = reinterpret_cast<PositionRange*>(smem_raw + Kt::kSmemElems * 2);
  const uint16_t* gQ = static_cast<const uint16_t*>(p.q) + b * p.q_strides.batch + h * p.q_strides.head;
  const uint16_t* gK = static_cast<const uint16_t*>(p.k) + b * p.k_strides.batch + hk * p.k_strides.head;
  const uint16_t* gV = static_cast<const uint16_t*>(p.v) + b * p.v_strides.batch + hk * p.v_strides.head;

  load_rows<kBM, kD, kStride, kNT>(sQ, gQ, p.q_strides.row, q0, Sq, d, tid);
  load_kv_tile<kBN, kD, kStride, kNT>(sK, sV, 0, gK, gV, p, cur.index, d, tid);
  cp_async_commit();

  // Prologue (overlaps the copies): this thread's rows are, per m-tile mt, row0 + 16 mt + g
  // (r = 0) and + 8 (r = 1), row0 = q0 + 16 kMT warp.
  const int row0 = q0 + 16 * kMT * warp;
  OnlineRow<float> st[kMT][2];
  float acc[kMT][kNbO][4];
  RA_UNROLL
  for (int mt = 0; mt < kMT; ++mt) {
    RA_UNROLL
    for (int r = 0; r < 2; ++r) {
      const int row = row0 + 16 * mt + g + 8 * r;
      const bool valid = row < Sq;
      if (t4 == 0) sSeen[row - q0] = query_bounds(p.mask, p.q_pos, p.q_seg, row, Sq);
      st[mt][r] = OnlineRow<float>::from_lse(args.merge && valid ? gL[row] : ninf);
      const bool load = st[mt][r].l > 0.f;  // acc = o when the state has seen something, else 0
      const float* o = gO + static_cast<int64_t>(load ? row : 0) * p.out_strides.row;
      RA_UNROLL
      for (int nb = 0; nb < kNbO; ++nb) {
        const int c = nb * 8 + t4 * 2;
        const bool ld = load && c < d;
        acc[mt][nb][2 * r] = ld ? o[c] : 0.f;
        acc[mt][nb][2 * r + 1] = ld ? o[c + 1] : 0.f;
      }
    }
  }

  uint32_t qf[Kt::kQInRegs ? kMT : 1][kKcQK][4];
  int stage = 0;
  for (bool first = true;; first = false) {
    const LiveTile nxt =
        kv_pipeline_step<kBN, kD, kStride, kNT>(q_bounds, p, cur, stage, sK, sV, gK, gV, d, tid, lane);
    if constexpr (Kt::kQInRegs) {
      if (first) {
        RA_UNROLL
        for (int mt = 0; mt < kMT; ++mt) {
          RA_UNROLL
          for (int kc = 0; kc < kKcQK; ++kc) {
            load_a<kStride>(qf[mt][kc], sQ, row0 - q0 + 16 * mt, kc * 16, lane);
          }
        }
      }
    }
    const uint16_t* tK = sK + stage * kBN * kStride;
    const uint16_t* tV = sV + stage * kBN * kStride;
    const int k0 = cur.index * kBN;

    // S = Q K^T
    float s[kMT][kNbS][4];
    mma_tiles_by_nk<kBF16, kKcQK, kNbS, kStride, kMT, Kt::kQInRegs>(s, sQ, row0 - q0, qf, tK, lane);

    // Mask (and scale, unless folded into the exponential).
    const bool need_mask = cur.kind == TileKind::kPartial || k0 + kBN > Sk;
    RA_UNROLL
    for (int mt = 0; mt < kMT; ++mt) {
      if (need_mask) {
        const int r = row0 - q0 + 16 * mt + g;
        const PositionRange seen[2] = {sSeen[r], sSeen[r + 8]};
        for_each_score<kNbS>(k0, Sk, true, seen, p.k_pos, t4,
                             [&](int nb, int i, int, bool visible) {
                               s[mt][nb][i] = visible ? s[mt][nb][i] * mask_mul : ninf;
                             });
      } else if (!fold_scale) {
        RA_UNROLL
        for (int nb = 0; nb < kNbS; ++nb) {
          RA_UNROLL
          for (int i = 0; i < 4; ++i) s[mt][nb][i] *= scale;
        }
      }
    }

    // Online softmax (a row's 64 scores live in the 4 lanes of a quad).
    RA_UNROLL
    for (int mt = 0; mt < kMT; ++mt) {
      float mx[2] = {ninf, ninf};
      RA_UNROLL
      for (int nb = 0; nb < kNbS; ++nb) {
        RA_UNROLL
        for (int r = 0; r < 2; ++r) {
          mx[r] = fmax_f(mx[r], fmax_f(s[mt][nb][2 * r], s[mt][nb][2 * r + 1]));
        }
      }
      float factor[2], mref[2], sum[2];
      RA_UNROLL
      for (int r = 0; r < 2; ++r) {
        mx[r] = fmax_f(mx[r], shfl_xor(mx[r], 1));
        mx[r] = fmax_f(mx[r], shfl_xor(mx[r], 2));
        factor[r] = st[mt][r].rescale_for(mx[r] * score_unit);
        // m log2(e); a row that saw nothing: every p is exp2(-inf) = 0
        mref[r] = st[mt][r].m == ninf ? 0.f : st[mt][r].m * kLog2eF;
        sum[r] = 0.f;
      }
      RA_UNROLL
      for (int nb = 0; nb < kNbS; ++nb) {
        RA_UNROLL
        for (int i = 0; i < 4; ++i) {
          // p = exp(score_unit s - m)
          const float pe = fast_exp2(fmaf(s[mt][nb][i], exp2_mul, -mref[i / 2]));
          s[mt][nb][i] = pe;
          sum[i / 2] += pe;
        }
      }
      RA_UNROLL
      for (int r = 0; r < 2; ++r) {
        sum[r] += shfl_xor(sum[r], 1);
        sum[r] += shfl_xor(sum[r], 2);
        st[mt][r].l += sum[r];
      }
      RA_UNROLL
      for (int nb = 0; nb < kNbO; ++nb) {
        RA_UNROLL
        for (int i = 0; i < 4; ++i) acc[mt][nb][i] *= factor[i / 2];
      }
    }

    // O += P V
    mma_tiles_by_kn<kBF16, kKcPV, kNbO, kStride, kMT>(acc, s, tV, lane);

    if (nxt.index < 0) break;
    cur = nxt;
    stage ^= 1;
  }

  // Epilogue: o = acc / l, lse = m + log(l) (0 and -inf for a row that saw nothing).
  RA_UNROLL
  for (int mt = 0; mt < kMT; ++mt) {
    RA_UNROLL
    for (int r = 0; r < 2; ++r) {
      const int row = row0 + 16 * mt + g + 8 * r;
      if (row >= Sq) continue;
      const float inv_l = st[mt][r].inv_l();
      float* o = gO + static_cast<int64_t>(row) * p.out_strides.row;
      RA_UNROLL
      for (int nb = 0; nb < kNbO; ++nb) {
        const int c = nb * 8 + t4 * 2;
        if (c < d) {
          o[c] = acc[mt][nb][2 * r] * inv_l;
          o[c + 1] = acc[mt][nb][2 * r + 1] * inv_l;
        }
      }
      if (t4 == 0) gL[row] = st[mt][r].lse();
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

// lse and delta of query rows [m0, m0 + kBM) into smem. Rows out of range or with lse = -inf (saw
// nothing) get lse = +inf, so that p = exp(s - lse) = 0 for them.
template <int kBM, int kNThreads>
RA_DEV void load_row_stats(float* sL, float* sD, const float* gL, const float* gD, int m0, int Sq,
                           int tid) {
  for (int i = tid; i < kBM; i += kNThreads) {
    const int q = m0 + i;
    float l = pos_inf_f(), dl = 0.f;
    if (q < Sq) {
      l = gL[q];
      dl = gD[q];
      if (l == neg_inf_f()) l = pos_inf_f();
    }
    sL[i] = l * kLog2eF;  // lse log2(e), the exponentials' unit
    sD[i] = dl;
  }
}

template <typename Kt, bool kDeterministic>
RA_DEV void block_bwd_body(const BlockBwdParams& p, char* smem_raw) {
  constexpr bool kBF16 = Kt::kBF16;
  constexpr int kD = Kt::kHeadDim, kBM = Kt::kBlockM, kBN = Kt::kBlockN;
  constexpr int kStride = Kt::kStride, kStrideS = Kt::kStrideS, kNT = Kt::kNThreads;
  constexpr int kNbQ = kBM / 8;   // n-blocks of an S^T row (queries)
  constexpr int kKcD = kD / 16;   // k-chunks over the head dim (S^T, dP^T)
  constexpr int kNbD = kD / 8;    // n-blocks over the head dim (dK, dV)
  constexpr int kKcQ = kBM / 16;  // k-chunks over queries (dK, dV)
  constexpr int kKcK = kBN / 16;  // k-chunks over keys (dQ)
  constexpr int kWarpsM = kBM / 16;                 // dQ: warps along the query rows
  constexpr int kWarpsD = Kt::kNWarps / kWarpsM;    //     and along the head dim
  constexpr int kDW = kD / kWarpsD;                 //     head-dim columns per warp
  static_assert(kDW % 16 == 0, "dQ slice");

  const int tid = thread_idx(), warp = tid / 32, lane = tid % 32, g = lane / 4, t4 = lane % 4;
  const int k0 = block_idx_x() * kBN, b = block_idx_z();
  const int Sq = p.shape.seqlen_q, Sk = p.shape.seqlen_k, d = p.shape.headdim;
  const int group = p.shape.nheads / p.shape.nheads_kv;
  // Atomic mode: one CTA per query head h (grid y = nheads). Deterministic mode: one CTA per K/V
  // head (grid y = nheads_kv) runs the group's query heads in turn, so dK/dV are summed in a fixed
  // order in registers, and leaves dQ to block_dq_body.
  const int hk = kDeterministic ? block_idx_y() : block_idx_y() / group;
  const int h_begin = kDeterministic ? hk * group : block_idx_y();
  const int h_end = kDeterministic ? h_begin + group : h_begin + 1;
  const float scale = static_cast<float>(p.softmax_scale);
  const float exp2_mul = scale * kLog2eF;  // p = exp(scale s - lse) = exp2(s exp2_mul - lse log2(e))

  const PositionRange k_range = warp_range(p.k_pos, k0, imin(k0 + kBN, Sk), lane);
  // The mask does not depend on the head: every head's first live query tile is this one.
  const LiveTile first = next_live_queries(p.mask, p.q_pos, p.q_seg, Sq, kBM, k_range, 0, lane);
  if (first.index < 0) return;  // no query sees these keys: nothing to add

  uint16_t* sK = reinterpret_cast<uint16_t*>(smem_raw);
  uint16_t* sV = sK + kBN * kStride;
  uint16_t* sQ = sV + kBN * kStride;        // stage s at sQ + s * kBM * kStride
  uint16_t* sdO = sQ + 2 * kBM * kStride;   // likewise
  uint16_t* sdS = sdO + 2 * kBM * kStride;  // dS^T: kBN rows (keys) x kBM columns (queries)
  float* sL = reinterpret_cast<float*>(sdS + kBN * kStrideS);  // stage s at sL + s * kBM
  float* sD = sL + 2 * kBM;

  const uint16_t* gK = static_cast<const uint16_t*>(p.k) + b * p.k_strides.batch + hk * p.k_strides.head;
  const uint16_t* gV = static_cast<const uint16_t*>(p.v) + b * p.v_strides.batch + hk * p.v_strides.head;
  // Query tile `tile` of head h into `stage`: Q and dO (one cp.async commit group), lse and delta.
  auto load_query_tile = [&](int h, int tile, int stage) {
    const uint16_t* gQ =
        static_cast<const uint16_t*>(p.q) + b * p.q_strides.batch + h * p.q_strides.head;
    const uint16_t* gdO =
        static_cast<const uint16_t*>(p.dout) + b * p.dout_strides.batch + h * p.dout_strides.head;
    const int64_t stat_off = b * p.row_stat_batch_stride + h * p.row_stat_head_stride;
    load_rows<kBM, kD, kStride, kNT>(sQ + stage * kBM * kStride, gQ, p.q_strides.row, tile * kBM,
                                     Sq, d, tid);
    load_rows<kBM, kD, kStride, kNT>(sdO + stage * kBM * kStride, gdO, p.dout_strides.row,
                                     tile * kBM, Sq, d, tid);
    cp_async_commit();
    load_row_stats<kBM, kNT>(sL + stage * kBM, sD + stage * kBM,
                             static_cast<const float*>(p.lse) + stat_off,
                             static_cast<const float*>(p.delta) + stat_off, tile * kBM, Sq, tid);
  };
  load_kv_tile<kBN, kD, kStride, kNT>(sK, sV, 0, gK, gV, p, k0 / kBN, d, tid);
  load_query_tile(h_begin, first.index, 0);  // with K/V: one commit group

  // This warp's key rows: r = 0: k0 + warp*16 + g, r = 1: + 8.
  int key[2];
  int64_t kpos[2];
  RA_UNROLL
  for (int r = 0; r < 2; ++r) {
    key[r] = k0 + warp * 16 + g + 8 * r;
    kpos[r] = key[r] < Sk ? p.k_pos[key[r]] : 0;
  }
  float dk[kNbD][4], dv[kNbD][4];
  RA_UNROLL
  for (int nb = 0; nb < kNbD; ++nb) {
    RA_UNROLL
    for (int i = 0; i < 4; ++i) dk[nb][i] = dv[nb][i] = 0.f;
  }

  // dQ slice of this warp: query rows wm*16.. of a tile, head-dim columns [wd*kDW, +kDW).
  const int wm = warp % kWarpsM, wd = warp / kWarpsM;

  for (int h = h_begin; h < h_end; ++h) {
    LiveTile cur = first;
    float* gdQ = static_cast<float*>(p.dq_acc) + b * p.dq_strides.batch + h * p.dq_strides.head;

    if (kDeterministic && h != h_begin) {
      sync_threads();  // every warp is done with head h - 1
      load_query_tile(h, first.index, 0);
    }

    int stage = 0;
    for (;;) {
      cp_async_wait<0>();
      sync_threads();  // query tile `cur` is in stage `stage`; every warp is done with the last tile
      const LiveTile nxt =
          next_live_queries(p.mask, p.q_pos, p.q_seg, Sq, kBM, k_range, cur.index + 1, lane);
      if (nxt.index >= 0) load_query_tile(h, nxt.index, stage ^ 1);
      const uint16_t* tQ = sQ + stage * kBM * kStride;
      const uint16_t* tdO = sdO + stage * kBM * kStride;
      const float* tL = sL + stage * kBM;
      const float* tD = sD + stage * kBM;
      const int m0 = cur.index * kBM;
      const bool need_mask = cur.kind == TileKind::kPartial || k0 + kBN > Sk;

      // S^T = K Q^T (rows: this warp's 16 keys; columns: the tile's queries), then in place
      // P^T = exp(scale S^T - lse), 0 where masked. Element (nb, 2r + e) is key row r, query
      // m0 + nb*8 + 2*t4 + e.
      float s[kNbQ][4];
      mma_smem_by_nk<kBF16, kKcD, kNbQ, kStride>(s, sK, warp * 16, tQ, lane);
      RA_UNROLL
      for (int nb = 0; nb < kNbQ; ++nb) {
        RA_UNROLL
        for (int e = 0; e < 2; ++e) {
          const int qc = nb * 8 + t4 * 2 + e;
          const float l = tL[qc];
          const PositionRange seen =
              need_mask ? query_bounds(p.mask, p.q_pos, p.q_seg, m0 + qc, Sq) : PositionRange{1, 0};
          RA_UNROLL
          for (int r = 0; r < 2; ++r) {
            const bool visible = !need_mask || (key[r] < Sk && is_visible(seen, kpos[r]));
            s[nb][2 * r + e] = visible ? fast_exp2(fmaf(s[nb][2 * r + e], exp2_mul, -l)) : 0.f;
          }
        }
      }

      // dP^T = V dO^T, then in place dS^T = P^T (dP^T - delta).
      float dp[kNbQ][4];
      mma_smem_by_nk<kBF16, kKcD, kNbQ, kStride>(dp, sV, warp * 16, tdO, lane);
      RA_UNROLL
      for (int nb = 0; nb < kNbQ; ++nb) {
        RA_UNROLL
        for (int i = 0; i < 4; ++i) dp[nb][i] = s[nb][i] * (dp[nb][i] - tD[nb * 8 + t4 * 2 + i % 2]);
      }

      // dV += P^T dO, dK += dS^T Q (unscaled; scaled once at the end); dS^T to smem for dQ.
      RA_UNROLL
      for (int j = 0; j < kKcQ; ++j) {
        uint32_t pa[4], da[4];
        c_to_a<kBF16>(pa, s, j);
        c_to_a<kBF16>(da, dp, j);
        uint16_t* ds_row = sdS + (warp * 16 + g) * kStrideS + j * 16 + t4 * 2;
        *reinterpret_cast<uint32_t*>(ds_row) = da[0];
        *reinterpret_cast<uint32_t*>(ds_row + 8 * kStrideS) = da[1];
        *reinterpret_cast<uint32_t*>(ds_row + 8) = da[2];
        *reinterpret_cast<uint32_t*>(ds_row + 8 * kStrideS + 8) = da[3];
        RA_UNROLL
        for (int t = 0; t < kNbD / 2; ++t) {
          uint32_t ob[4], qb[4];
          load_b_kn<kStride>(ob, tdO, j * 16, t * 16, lane);
          load_b_kn<kStride>(qb, tQ, j * 16, t * 16, lane);
          mma_16816<kBF16>(dv[2 * t], pa, ob[0], ob[1]);
          mma_16816<kBF16>(dv[2 * t + 1], pa, ob[2], ob[3]);
          mma_16816<kBF16>(dk[2 * t], da, qb[0], qb[1]);
          mma_16816<kBF16>(dk[2 * t + 1], da, qb[2], qb[3]);
        }
      }
      sync_threads();  // dS^T of every warp is in smem

      // dQ[m0 + wm*16 .., wd*kDW ..] += scale * dS K (fp32 atomics); block_dq_body computes dQ
      // instead when deterministic.
      if constexpr (!kDeterministic) {
        // dS^T fragments: loaded once per tile for d = 128 (fewer spills), per head-dim chunk below
        // (fewer registers) otherwise; ptxas -v picked this.
        constexpr bool kCacheDs = kD > 96;
        uint32_t dsc[kCacheDs ? kKcK : 1][4];
        if constexpr (kCacheDs) {
          RA_UNROLL
          for (int kc = 0; kc < kKcK; ++kc) {
            load_a_trans<kStrideS>(dsc[kc], sdS, kc * 16, wm * 16, lane);
          }
        }
        const int qrow0 = m0 + wm * 16 + g;
        RA_UNROLL
        for (int dc = 0; dc < kDW / 16; ++dc) {
          const int c0 = wd * kDW + dc * 16;
          float a2[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
          RA_UNROLL
          for (int kc = 0; kc < kKcK; ++kc) {
            uint32_t kb[4];
            uint32_t(&dsa)[4] = dsc[kCacheDs ? kc : 0];
            if constexpr (!kCacheDs) load_a_trans<kStrideS>(dsa, sdS, kc * 16, wm * 16, lane);
            load_b_kn<kStride>(kb, sK, kc * 16, c0, lane);
            mma_16816<kBF16>(a2[0], dsa, kb[0], kb[1]);
            mma_16816<kBF16>(a2[1], dsa, kb[2], kb[3]);
          }
          RA_UNROLL
          for (int n = 0; n < 2; ++n) {
            const int c = c0 + n * 8 + t4 * 2;
            if (c >= d) continue;
            RA_UNROLL
            for (int r = 0; r < 2; ++r) {
              const int q = qrow0 + 8 * r;
              if (q >= Sq) continue;
              float* dst = gdQ + static_cast<int64_t>(q) * p.dq_strides.row + c;
              atomic_add(dst, a2[n][2 * r] * scale);
              atomic_add(dst + 1, a2[n][2 * r + 1] * scale);
            }
          }
        }
      }

      if (nxt.index < 0) break;
      cur = nxt;
      stage ^= 1;
    }
  }

  // Epilogue: dk_acc += scale * dK, dv_acc += dV (atomics when several CTAs' query heads share the
  // K/V head).
  float* gdK = static_cast<float*>(p.dk_acc) + b * p.dk_strides.batch + hk * p.dk_strides.head;
  float* gdV = static_cast<float*>(p.dv_acc) + b * p.dv_strides.batch + hk * p.dv_strides.head;
  const bool shared_kv = group > 1 && !kDeterministic;
  RA_UNROLL
  for (int r = 0; r < 2; ++r) {
    if (key[r] >= Sk) continue;
    float* krow = gdK + static_cast<int64_t>(key[r]) * p.dk_strides.row;
    float* vrow = gdV + static_cast<int64_t>(key[r]) * p.dv_strides.row;
    RA_UNROLL
    for (int nb = 0; nb < kNbD; ++nb) {
      const int c = nb * 8 + t4 * 2;
      if (c >= d) continue;
      RA_UNROLL
      for (int e = 0; e < 2; ++e) {
        const float vk = dk[nb][2 * r + e] * scale, vv = dv[nb][2 * r + e];
        if (shared_kv) {
          atomic_add(krow + c + e, vk);
          atomic_add(vrow + c + e, vv);
        } else {
          krow[c + e] += vk;
          vrow[c + e] += vv;
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Deterministic dQ
// ---------------------------------------------------------------------------------------------

// dq_acc += scale * dS K for one (query tile, head, batch), with no atomics: the CTA owns its rows
// and visits the live key tiles in order. Per key tile (keys as MMA columns, as in the forward):
// S = Q K^T, P = exp(scale S - lse) (0 where masked), dP = dO V^T, dS = P (dP - delta), then
// dQ += dS K in registers; one read-modify-write of dq_acc at the end.
template <typename Kt>
RA_DEV void block_dq_body(const BlockBwdParams& p, char* smem_raw) {
  constexpr bool kBF16 = Kt::kBF16;
  constexpr int kD = Kt::kHeadDim, kBM = Kt::kBlockM, kBN = Kt::kBlockN, kStride = Kt::kStride;
  constexpr int kNT = Kt::kNThreads;
  constexpr int kNbS = kBN / 8;   // n-blocks of a score row (keys)
  constexpr int kKcD = kD / 16;   // k-chunks over the head dim (S, dP)
  constexpr int kNbO = kD / 8;    // n-blocks of a dQ row (head dim)
  constexpr int kKcK = kBN / 16;  // k-chunks over keys (dS K)

  const int tid = thread_idx(), warp = tid / 32, lane = tid % 32, g = lane / 4, t4 = lane % 4;
  const int q0 = block_idx_x() * kBM, h = block_idx_y(), b = block_idx_z();
  const int Sq = p.shape.seqlen_q, Sk = p.shape.seqlen_k, d = p.shape.headdim;
  const int hk = h / (p.shape.nheads / p.shape.nheads_kv);
  const float scale = static_cast<float>(p.softmax_scale);
  const float exp2_mul = scale * kLog2eF;  // p = exp(scale s - lse) = exp2(s exp2_mul - lse log2(e))

  const TileBounds q_bounds = warp_tile_bounds(p.mask, p.q_pos, p.q_seg, q0, imin(q0 + kBM, Sq), lane);
  LiveTile cur = next_live_keys(q_bounds, p.k_pos, Sk, kBN, 0, lane);
  if (cur.index < 0) return;  // no row sees a key: dQ += 0

  uint16_t* sQ = reinterpret_cast<uint16_t*>(smem_raw);
  uint16_t* sdO = sQ + kBM * kStride;
  uint16_t* sK = sdO + kBM * kStride;     // stage s at sK + s * kBN * kStride
  uint16_t* sV = sK + 2 * kBN * kStride;  // likewise
  const uint16_t* gQ = static_cast<const uint16_t*>(p.q) + b * p.q_strides.batch + h * p.q_strides.head;
  const uint16_t* gdO =
      static_cast<const uint16_t*>(p.dout) + b * p.dout_strides.batch + h * p.dout_strides.head;
  const uint16_t* gK = static_cast<const uint16_t*>(p.k) + b * p.k_strides.batch + hk * p.k_strides.head;
  const uint16_t* gV = static_cast<const uint16_t*>(p.v) + b * p.v_strides.batch + hk * p.v_strides.head;
  const int64_t stat_off = b * p.row_stat_batch_stride + h * p.row_stat_head_stride;
  const float* gL = static_cast<const float*>(p.lse) + stat_off;
  const float* gD = static_cast<const float*>(p.delta) + stat_off;
  float* gdQ = static_cast<float*>(p.dq_acc) + b * p.dq_strides.batch + h * p.dq_strides.head;

  load_rows<kBM, kD, kStride, kNT>(sQ, gQ, p.q_strides.row, q0, Sq, d, tid);
  load_rows<kBM, kD, kStride, kNT>(sdO, gdO, p.dout_strides.row, q0, Sq, d, tid);
  load_kv_tile<kBN, kD, kStride, kNT>(sK, sV, 0, gK, gV, p, cur.index, d, tid);
  cp_async_commit();

  // This thread's rows r = 0: warp*16 + g, r = 1: + 8. A row out of range or that saw nothing
  // (lse = -inf) gets lse = +inf, so that p = exp(s - lse) = 0.
  int row[2];
  PositionRange seen[2];
  float lse[2], delta[2];
  RA_UNROLL
  for (int r = 0; r < 2; ++r) {
    row[r] = q0 + warp * 16 + g + 8 * r;
    const bool valid = row[r] < Sq;
    seen[r] = query_bounds(p.mask, p.q_pos, p.q_seg, row[r], Sq);
    const float l = valid ? gL[row[r]] : pos_inf_f();
    lse[r] = (l == neg_inf_f() ? pos_inf_f() : l) * kLog2eF;  // the exponentials' unit
    delta[r] = valid ? gD[row[r]] : 0.f;
  }
  float acc[kNbO][4];
  RA_UNROLL
  for (int nb = 0; nb < kNbO; ++nb) acc[nb][0] = acc[nb][1] = acc[nb][2] = acc[nb][3] = 0.f;

  int stage = 0;
  for (;;) {
    const LiveTile nxt =
        kv_pipeline_step<kBN, kD, kStride, kNT>(q_bounds, p, cur, stage, sK, sV, gK, gV, d, tid, lane);
    const uint16_t* tK = sK + stage * kBN * kStride;
    const uint16_t* tV = sV + stage * kBN * kStride;
    const int k0 = cur.index * kBN;

    // S = Q K^T and dP = dO V^T (rows: this warp's 16 queries; columns: the tile's keys).
    float s[kNbS][4], dp[kNbS][4];
    mma_smem_by_nk<kBF16, kKcD, kNbS, kStride>(s, sQ, warp * 16, tK, lane);
    mma_smem_by_nk<kBF16, kKcD, kNbS, kStride>(dp, sdO, warp * 16, tV, lane);

    // In place: dS = P (dP - delta), P = exp(scale S - lse), 0 where masked.
    const bool need_mask = cur.kind == TileKind::kPartial || k0 + kBN > Sk;
    for_each_score<kNbS>(k0, Sk, need_mask, seen, p.k_pos, t4,
                         [&](int nb, int i, int r, bool visible) {
                           const float pe = visible ? fast_exp2(fmaf(s[nb][i], exp2_mul, -lse[r])) : 0.f;
                           s[nb][i] = pe * (dp[nb][i] - delta[r]);
                         });

    // dQ += dS K (dS rounded to 16 bits, as P before P V in the forward)
    mma_frags_by_kn<kBF16, kKcK, kNbO, kStride>(acc, s, tK, lane);

    if (nxt.index < 0) break;
    cur = nxt;
    stage ^= 1;
  }

  // Epilogue: dq_acc += scale * dQ; each element has one owner thread.
  RA_UNROLL
  for (int r = 0; r < 2; ++r) {
    if (row[r] >= Sq) continue;
    float* dq = gdQ + static_cast<int64_t>(row[r]) * p.dq_strides.row;
    RA_UNROLL
    for (int nb = 0; nb < kNbO; ++nb) {
      const int c = nb * 8 + t4 * 2;
      if (c < d) {
        dq[c] += acc[nb][2 * r] * scale;
        dq[c + 1] += acc[nb][2 * r + 1] * scale;
      }
    }
  }
}

}  // namespace cuda
}  // namespace ring_attn
