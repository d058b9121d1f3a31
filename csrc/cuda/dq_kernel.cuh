// Deterministic dQ kernel body: dq_acc += scale dS K for one (query tile, head, batch), with no
// reductions: the CTA owns its rows and visits the live key tiles (tile table, tile_table.cuh) in
// order. Per key tile (keys as MMA columns, as in the forward):
//   S = Q K^T, dP = dO V^T, P = exp(scale S - lse) (0 where a partial tile masks),
//   dS = scale P (dP - delta), dQ += dS K     (dS rounded to 16 bits, registers)
// K/V tiles are double buffered as in the forward; one read-modify-write of dq_acc at the end.
#pragma once

#include <cstdint>

#include "core/mask.h"
#include "core/params.h"
#include "cuda/bwd_kernel.cuh"
#include "cuda/kernel_traits.cuh"
#include "cuda/primitives.cuh"
#include "cuda/tile_copy.cuh"
#include "cuda/tile_table.cuh"
#include "cuda/warp_mma.cuh"

namespace ring_attn {
namespace cuda {

template <typename Traits>
RA_DEV void block_dq_body(const BlockBwdParams& p, char* smem) {
  constexpr bool kBF16 = Traits::kBF16;
  constexpr int kD = Traits::kHeadDim, kBM = Traits::kBlockM, kBN = Traits::kBlockN;
  constexpr int kStride = Traits::kStride;
  constexpr int kNT = Traits::kNThreads;
  constexpr int kNbS = kBN / 8;   // n-blocks of a score row (keys)
  constexpr int kKcD = kD / 16;   // k-chunks over the head dim (S, dP)
  constexpr int kNbO = kD / 8;    // n-blocks of a dQ row (head dim)
  constexpr int kKcK = kBN / 16;  // k-chunks over keys (dS K)

  // This preamble has the forward kernel's shape (its tile copies, the thread's lanes, the CTA's
  // query tile and heads); each kernel spells out its own so that what its main loop keeps in
  // registers reads in one place.
  using QCopy = TileCopy<kBM, kD, kStride, kNT>;   // query rows (Q, dO)
  using KvCopy = TileCopy<kBN, kD, kStride, kNT>;  // key rows (K, V)

  const int tid = thread_idx(), warp = tid / 32, lane = tid % 32, g = lane / 4, t4 = lane % 4;
  const int q0 = block_idx_x() * kBM, h = block_idx_y(), b = block_idx_z();
  const int Sq = p.shape.seqlen_q, Sk = p.shape.seqlen_k, d = p.shape.headdim;
  const int hk = h / (p.shape.nheads / p.shape.nheads_kv);
  const float scale = static_cast<float>(p.softmax_scale);
  const float exp2_mul = scale * kLog2eF;  // p = exp2(s exp2_mul - lse log2(e))

  // The regions of this kernel's shared-memory plan (kernel_traits.cuh), one cast each as in the
  // other kernels.
  uint16_t* sQ = reinterpret_cast<uint16_t*>(smem + Traits::kOffQ);
  uint16_t* sdO = reinterpret_cast<uint16_t*>(smem + Traits::kOffDo);
  // stage s at + s * kBN * kStride
  uint16_t* sK = reinterpret_cast<uint16_t*>(smem + Traits::kOffK);
  uint16_t* sV = reinterpret_cast<uint16_t*>(smem + Traits::kOffV);
  int32_t* sKpos = reinterpret_cast<int32_t*>(smem + Traits::kOffKpos);  // stage s at + s * kBN
  PositionRange32* sRows = reinterpret_cast<PositionRange32*>(smem + Traits::kOffRows);
  uint16_t* sTable = reinterpret_cast<uint16_t*>(smem + Traits::kOffTable);
  int32_t* scratch = reinterpret_cast<int32_t*>(smem + Traits::kOffScratch);

  const uint16_t* gQ = static_cast<const uint16_t*>(p.q) + b * p.q_strides.batch + h * p.q_strides.head;
  const uint16_t* gdO =
      static_cast<const uint16_t*>(p.dout) + b * p.dout_strides.batch + h * p.dout_strides.head;
  const uint16_t* gK = static_cast<const uint16_t*>(p.k) + b * p.k_strides.batch + hk * p.k_strides.head;
  const uint16_t* gV = static_cast<const uint16_t*>(p.v) + b * p.v_strides.batch + hk * p.v_strides.head;
  const int64_t stat_off = b * p.row_stat_batch_stride + h * p.row_stat_head_stride;
  const float* gL = static_cast<const float*>(p.lse) + stat_off;
  const float* gD = static_cast<const float*>(p.delta) + stat_off;
  float* gdQ = static_cast<float*>(p.dq_acc) + b * p.dq_strides.batch + h * p.dq_strides.head;

  {
    QCopy::template issue<true>(sQ, gQ + q0 * p.q_strides.row, p.q_strides.row, d, tid, Sq - q0);
    QCopy::template issue<true>(sdO, gdO + q0 * p.dout_strides.row, p.dout_strides.row, d, tid,
                                   Sq - q0);
    cp_async_commit();
  }
  const TileBounds q_bounds =
      cta_row_bounds<kNT>(p.mask, p.q_pos, p.q_seg, q0, kBM, Sq, sRows, scratch, tid);

  static_assert(kBN <= kNT, "one key position per thread");
  auto issue_tile = [&](int w0, uint16_t e, int stage) {
    KvCopy::issue_key_tile(sK + stage * kBN * kStride, sV + stage * kBN * kStride,
                           sKpos + stage * kBN, gK, gV, p, (w0 + entry_tile(e)) * kBN, Sk, d, tid);
  };

  // This thread's rows: warp*16 + g (r = 0) and + 8 (r = 1) of the tile. A row out of range or
  // that saw nothing gets lse = +inf (p = 0).
  const int row0 = 16 * warp;
  float lse2[2], delta_s[2];
  RA_UNROLL
  for (int r = 0; r < 2; ++r) {
    const int row = q0 + row0 + g + 8 * r;
    lse2[r] = row < Sq ? lse_exp2_unit(gL[row]) : pos_inf_f();
    delta_s[r] = row < Sq ? gD[row] * scale : 0.f;
  }
  float acc[1][kNbO][4];
  zero(acc);

  const int ntiles = (Sk + kBN - 1) / kBN;
  for (int w0 = 0; w0 < ntiles; w0 += kTableTiles) {
    const int n = build_key_tiles<kNT, kBN>(sTable, scratch, q_bounds, p.k_pos, Sk, false, w0,
                                            imin(w0 + kTableTiles, ntiles), tid);
    if (n == 0) continue;
    issue_tile(w0, sTable[0], 0);
    for (int i = 0; i < n; ++i) {
      cp_async_wait<0>();
      sync_threads();  // tile i is in stage i % 2; every warp is done with the other stage
      const uint16_t e = sTable[i];
      const int stage = i & 1;
      if (i + 1 < n) issue_tile(w0, sTable[i + 1], stage ^ 1);
      const uint16_t* tK = sK + stage * kBN * kStride;
      const uint16_t* tV = sV + stage * kBN * kStride;

      // S = Q K^T and dP = dO V^T (rows: this warp's 16 queries; columns: the tile's keys).
      float s[1][kNbS][4], dp[1][kNbS][4];
      zero(s);
      zero(dp);
      warp_gemm<kBF16, 1, kNbS, kKcD, false, kStride, false, kStride>(s, sQ, row0, 0, tK, 0, 0, lane);
      warp_gemm<kBF16, 1, kNbS, kKcD, false, kStride, false, kStride>(dp, sdO, row0, 0, tV, 0, 0, lane);

      // In place: dS = scale P (dP - delta), P = exp(scale S - lse), 0 where a partial tile masks.
      auto ds = [&]<bool kMasked>() {
        const int k0 = (w0 + entry_tile(e)) * kBN;
        const int32_t* kpos = sKpos + stage * kBN;
        PositionRange32 seen[2] = {{0, 0}, {0, 0}};
        if constexpr (kMasked) {
          seen[0] = sRows[row0 + g];
          seen[1] = sRows[row0 + g + 8];
        }
        RA_UNROLL
        for (int nb = 0; nb < kNbS; ++nb) {
          RA_UNROLL
          for (int j = 0; j < 4; ++j) {
            const int r = j / 2, kl = nb * 8 + t4 * 2 + j % 2;
            float pe = fast_exp2(fmaf(s[0][nb][j], exp2_mul, -lse2[r]));
            if constexpr (kMasked) pe = k0 + kl < Sk && is_visible(seen[r], kpos[kl]) ? pe : 0.f;
            s[0][nb][j] = pe * fmaf(dp[0][nb][j], scale, -delta_s[r]);
          }
        }
      };
      if (entry_partial(e)) {
        ds.template operator()<true>();
      } else {
        ds.template operator()<false>();
      }

      // dQ += dS K (dS rounded to 16 bits, as P before P V in the forward)
      warp_gemm_frag_a<kBF16, 1, kNbO, kKcK, kStride>(acc, s, tK, 0, 0, lane);
    }
  }
  cp_async_wait<0>();  // Q and dO when no tile was live

  // Epilogue: dq_acc += dQ (already scaled); each element has one owner thread.
  RA_UNROLL
  for (int r = 0; r < 2; ++r) {
    const int row = q0 + row0 + g + 8 * r;
    if (row >= Sq) continue;
    float* dq = gdQ + static_cast<int64_t>(row) * p.dq_strides.row;
    RA_UNROLL
    for (int nb = 0; nb < kNbO; ++nb) {
      const int c = nb * 8 + t4 * 2;
      if (c < d) {
        dq[c] += acc[0][nb][2 * r];
        dq[c + 1] += acc[0][nb][2 * r + 1];
      }
    }
  }
}

}  // namespace cuda
}  // namespace ring_attn
