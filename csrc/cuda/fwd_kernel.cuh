// Forward kernel body (FlashAttention-2 style, mma.sync m16n8k16): one CTA per (query tile, head,
// batch) merges its rows' attention over one K/V block into the running fp32 state.
//
//   prologue  the rows' bounds (core/mask.h row_bounds) into shared memory and the tile table of
//             the key tiles they see (tile_table.cuh); acc = o, m = lse, l = 1 from the state
//   per tile  S = Q K^T (fp32); partial tiles only: -inf where a row does not see a key; online
//             softmax in registers (core/merge.h OnlineRow), P rounded to 16 bits, O += P V
//   epilogue  o = acc / l, lse = m + log(l)
// K/V tiles are double buffered: the next live tile's cp.async is issued right after the barrier
// that starts a tile, each thread's offsets derived from its index at each copy (tile_copy.cuh). A
// partial tile's key positions come along into shared memory, so the loop reads no global memory.
// Rows that see nothing keep out = 0 and lse = -inf (never -inf - -inf).
#pragma once

#include <cstdint>
#include <limits>

#include "core/mask.h"
#include "core/merge.h"
#include "core/params.h"
#include "cuda/block_attn_cuda.h"
#include "cuda/kernel_traits.cuh"
#include "cuda/primitives.cuh"
#include "cuda/tile_copy.cuh"
#include "cuda/tile_table.cuh"
#include "cuda/warp_mma.cuh"

namespace ring_attn {
namespace cuda {

RA_DEV float neg_inf_f() { return -std::numeric_limits<float>::infinity(); }
RA_DEV float pos_inf_f() { return std::numeric_limits<float>::infinity(); }

// The CTA's constants that the main loop needs once per tile: they wait in shared memory rather
// than in registers across the loop, whose accumulators (S and O: 192 of 255 registers per thread
// at d = 64 and 128) leave no room for them.
struct FwdConsts {
  const uint16_t* k;  // the CTA's (batch, K/V head) slices of K and V
  const uint16_t* v;
  float mask_mul;     // applied to the scores by the mask pass (1 when the scale is folded)
};

template <typename Traits>
RA_DEV void block_fwd_body(const FwdArgs& args, char* smem) {
  constexpr bool kBF16 = Traits::kBF16;
  constexpr int kD = Traits::kHeadDim, kBM = Traits::kBlockM, kBN = Traits::kBlockN;
  constexpr int kStride = Traits::kStride;
  constexpr int kNT = Traits::kNThreads, kMT = Traits::kMTiles;
  constexpr int kNbS = kBN / 8;   // n-blocks of a score row (keys)
  constexpr int kKcQK = kD / 16;  // k-chunks of Q K^T (head dim)
  constexpr int kNbO = kD / 8;    // n-blocks of an output row (head dim)
  constexpr int kKcPV = kBN / 16; // k-chunks of P V (keys)
  static_assert(sizeof(FwdConsts) <= 32, "FwdTraits::kOffConsts region");

  const BlockFwdParams& p = args.p;
  using QCopy = TileCopy<kBM, kD, kStride, kNT>;   // query rows (Q, dO)
  using KvCopy = TileCopy<kBN, kD, kStride, kNT>;  // key rows (K, V)

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

  uint16_t* sQ = reinterpret_cast<uint16_t*>(smem + Traits::kOffQ);
  // stage s at + s * kBN * kStride
  uint16_t* sK = reinterpret_cast<uint16_t*>(smem + Traits::kOffK);
  uint16_t* sV = reinterpret_cast<uint16_t*>(smem + Traits::kOffV);
  int32_t* sKpos = reinterpret_cast<int32_t*>(smem + Traits::kOffKpos);  // stage s at + s * kBN
  PositionRange32* sRows = reinterpret_cast<PositionRange32*>(smem + Traits::kOffRows);
  // This thread's softmax state, index 2 mt + r: l (summed per lane: the quad's sum is taken at
  // the end) and m.
  float* sL = reinterpret_cast<float*>(smem + Traits::kOffRowState) + tid * 4 * kMT;
  float* sM = sL + 2 * kMT;
  uint16_t* sTable = reinterpret_cast<uint16_t*>(smem + Traits::kOffTable);
  int32_t* scratch = reinterpret_cast<int32_t*>(smem + Traits::kOffScratch);

  const uint16_t* gQ = static_cast<const uint16_t*>(p.q) + b * p.q_strides.batch + h * p.q_strides.head;
  const uint16_t* gK = static_cast<const uint16_t*>(p.k) + b * p.k_strides.batch + hk * p.k_strides.head;
  const uint16_t* gV = static_cast<const uint16_t*>(p.v) + b * p.v_strides.batch + hk * p.v_strides.head;
  float* gO = static_cast<float*>(p.out_acc) + b * p.out_strides.batch + h * p.out_strides.head;
  float* gL = static_cast<float*>(p.lse) + b * p.lse_batch_stride + h * p.lse_head_stride;

  QCopy::template issue<true>(sQ, gQ + q0 * p.q_strides.row, p.q_strides.row, d, tid, Sq - q0);
  cp_async_commit();
  const TileBounds q_bounds =
      cta_row_bounds<kNT>(p.mask, p.q_pos, p.q_seg, q0, kBM, Sq, sRows, scratch, tid);

  static_assert(kBN <= kNT, "one key position per thread");
  FwdConsts* sConsts = reinterpret_cast<FwdConsts*>(smem + Traits::kOffConsts);
  if (tid == 0) *sConsts = FwdConsts{gK, gV, mask_mul};  // read after build_key_tiles' barriers
  // Copy of the tile of table entry `e` into stage `stage`, and its keys' positions.
  auto issue_tile = [&](int w0, uint16_t e, int stage) {
    // kConstsInSmem: the bases from shared memory and the thread index read again, so that no
    // register holds them across the main loop (kernel_traits.cuh)
    const uint16_t* k_base = Traits::kConstsInSmem ? sConsts->k : gK;
    const uint16_t* v_base = Traits::kConstsInSmem ? sConsts->v : gV;
    const int ct = Traits::kConstsInSmem ? thread_idx_reread() : tid;
    KvCopy::issue_key_tile(sK + stage * kBN * kStride, sV + stage * kBN * kStride,
                           sKpos + stage * kBN, k_base, v_base, p, (w0 + entry_tile(e)) * kBN, Sk,
                           d, ct);
  };

  // This thread's rows are, per m-tile mt, row0 + 16 mt + g (r = 0) and + 8 (r = 1).
  const int row0 = 16 * kMT * warp;  // in the CTA's tile
  OnlineRow<float> st[kMT][2];
  float acc[kMT][kNbO][4];
  uint32_t qf[Traits::kQInRegs ? kMT : 1][kKcQK][4];
  bool started = false;

  const int ntiles = (Sk + kBN - 1) / kBN;
  for (int w0 = 0; w0 < ntiles; w0 += kTableTiles) {
    const int n = build_key_tiles<kNT, kBN>(sTable, scratch, q_bounds, p.k_pos, Sk, !fold_scale, w0,
                                            imin(w0 + kTableTiles, ntiles), tid);
    if (n == 0) continue;
    issue_tile(w0, sTable[0], 0);
    if (!started) {
      // The running state (overlaps the copies): acc = o and l = 1 where it has seen something.
      RA_UNROLL
      for (int mt = 0; mt < kMT; ++mt) {
        RA_UNROLL
        for (int r = 0; r < 2; ++r) {
          const int row = q0 + row0 + 16 * mt + g + 8 * r;
          st[mt][r] = OnlineRow<float>::from_lse(args.merge && row < Sq ? gL[row] : ninf);
          const bool load = st[mt][r].l > 0.f;
          sL[2 * mt + r] = t4 == 0 ? st[mt][r].l : 0.f;  // summed per lane: the state's 1 counts once
          sM[2 * mt + r] = st[mt][r].m;
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
    }

    for (int i = 0; i < n; ++i) {
      cp_async_wait<0>();
      sync_threads();  // tile i is in stage i % 2; every warp is done with the other stage
      const uint16_t e = sTable[i];
      const int stage = i & 1;
      if (i + 1 < n) issue_tile(w0, sTable[i + 1], stage ^ 1);
      if constexpr (Traits::kQInRegs) {
        if (!started) {
          RA_UNROLL
          for (int mt = 0; mt < kMT; ++mt) {
            RA_UNROLL
            for (int kc = 0; kc < kKcQK; ++kc) load_a<kStride>(qf[mt][kc], sQ, row0 + 16 * mt, 16 * kc, lane);
          }
        }
      }
      started = true;
      // One tile: S = Q K^T; kMasked: the mask (-inf where a row does not see a key) and the scale
      // unless folded into the exponential; online softmax; O += P V. Full tiles (with the scale
      // folded) take the kMasked = false copy, which evaluates no mask.
      auto tile = [&]<bool kMasked>() {
        // kRederivePlace: this thread's lane and rows derived again rather than held across the
        // main loop (kernel_traits.cuh); the names shadow the kernel's
        const int me = Traits::kRederivePlace ? thread_idx_reread() : tid, lane = me % 32;
        const int row0 = 16 * kMT * (me / 32), g = lane / 4, t4 = lane % 4;
        const uint16_t* tK = sK + stage * kBN * kStride;
        const uint16_t* tV = sV + stage * kBN * kStride;
        float s[kMT][kNbS][4];
        zero(s);
        if constexpr (Traits::kQInRegs) {
          warp_gemm_reg_a<kBF16, kMT, kNbS, kKcQK, false, kStride>(s, qf, tK, 0, 0, lane);
        } else {
          warp_gemm<kBF16, kMT, kNbS, kKcQK, false, kStride, false, kStride>(s, sQ, row0, 0, tK, 0,
                                                                             0, lane);
        }
        if constexpr (kMasked) {
          // Key by key: each key position is read once and used for all the thread's 2 kMT rows,
          // so only the rows' bounds stay in registers.
          const int k0 = (w0 + entry_tile(e)) * kBN;
          const int32_t* kpos = sKpos + stage * kBN;
          const float mul = Traits::kConstsInSmem ? sConsts->mask_mul : mask_mul;
          PositionRange32 seen[kMT][2];
          RA_UNROLL
          for (int mt = 0; mt < kMT; ++mt) {
            seen[mt][0] = sRows[row0 + 16 * mt + g];
            seen[mt][1] = sRows[row0 + 16 * mt + g + 8];
          }
          RA_UNROLL
          for (int nb = 0; nb < kNbS; ++nb) {
            RA_UNROLL
            for (int e2 = 0; e2 < 2; ++e2) {
              const int kl = nb * 8 + t4 * 2 + e2;
              const bool in = k0 + kl < Sk;
              const int32_t kp = kpos[kl];
              RA_UNROLL
              for (int mt = 0; mt < kMT; ++mt) {
                RA_UNROLL
                for (int r = 0; r < 2; ++r) {
                  float& x = s[mt][nb][2 * r + e2];
                  x = in && is_visible(seen[mt][r], kp) ? x * mul : ninf;
                }
              }
            }
          }
        }

        // Online softmax (a row's scores live in the 4 lanes of a quad), branch-free:
        //   m' = max(m, max_j s_j), acc *= exp(m - m'), l = l exp(m - m') + sum_j exp(s_j - m'),
        // with l summed per lane (the quad's sum at the end). P is rounded to 16 bits as soon as
        // it is summed: the A fragments of P V.
        uint32_t pa[kMT][kKcPV][4];
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
            const float m_old = sM[2 * mt + r];
            const float m_new = fmax_f(m_old, mx[r] * score_unit);
            // m' log2(e); a row that has seen nothing: 0, so that every p is exp2(-inf) = 0
            mref[r] = m_new == ninf ? 0.f : m_new * kLog2eF;
            factor[r] = fast_exp2(fmaf(m_old, kLog2eF, -mref[r]));  // 0 when m = -inf
            sM[2 * mt + r] = m_new;
            sum[r] = 0.f;
          }
          RA_UNROLL
          for (int nb = 0; nb < kNbS; ++nb) {
            RA_UNROLL
            for (int j = 0; j < 4; ++j) {
              const float pe = fast_exp2(fmaf(s[mt][nb][j], exp2_mul, -mref[j / 2]));
              s[mt][nb][j] = pe;
              sum[j / 2] += pe;
            }
          }
          RA_UNROLL
          for (int kc = 0; kc < kKcPV; ++kc) c_to_a<kBF16>(pa[mt][kc], s[mt], kc);
          RA_UNROLL
          for (int r = 0; r < 2; ++r) sL[2 * mt + r] = sL[2 * mt + r] * factor[r] + sum[r];
          RA_UNROLL
          for (int nb = 0; nb < kNbO; ++nb) {
            RA_UNROLL
            for (int j = 0; j < 4; ++j) acc[mt][nb][j] *= factor[j / 2];
          }
        }
        warp_gemm_reg_a<kBF16, kMT, kNbO, kKcPV, true, kStride>(acc, pa, tV, 0, 0, lane);
      };
      if (entry_partial(e)) {  // every tile when the scale is not folded
        tile.template operator()<true>();
      } else {
        tile.template operator()<false>();
      }
    }
  }

  if (!started) {
    // No key visible to any row: the running state stays (merge = false: the empty state).
    cp_async_wait<0>();
    if (!args.merge) {
      for (int i = tid; i < kBM * d; i += kNT) {
        const int r = q0 + i / d;
        if (r < Sq) gO[static_cast<int64_t>(r) * p.out_strides.row + i % d] = 0.f;
      }
      for (int i = tid; i < kBM; i += kNT) {
        if (q0 + i < Sq) gL[q0 + i] = ninf;
      }
    }
    return;
  }

  // Epilogue: o = acc / l, lse = m + log(l) (0 and -inf for a row that saw nothing).
  RA_UNROLL
  for (int mt = 0; mt < kMT; ++mt) {
    RA_UNROLL
    for (int r = 0; r < 2; ++r) {
      st[mt][r].l = sL[2 * mt + r];
      st[mt][r].m = sM[2 * mt + r];
      st[mt][r].l += shfl_xor(st[mt][r].l, 1);  // the quad's partial sums (every lane takes part)
      st[mt][r].l += shfl_xor(st[mt][r].l, 2);
      const int row = q0 + row0 + 16 * mt + g + 8 * r;
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

}  // namespace cuda
}  // namespace ring_attn
