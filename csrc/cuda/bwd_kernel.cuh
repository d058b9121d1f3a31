// Backward kernel body (FlashAttention-2 style): one CTA per (key tile of kBlockN keys, head, batch),
// kernel_traits.cuh BwdTraits' warps. K and V stay in shared memory; the query stages that see
// the keys (tile table, tile_table.cuh) stream through it. Per stage of kBlockM query rows:
//   S = Q K^T, dP = dO V^T                      (fp32, registers)
//   P = exp(scale S - lse), 0 where masked      (partial stages only evaluate the mask)
//   dS = scale P (dP - delta)                   (one FFMA and one FMUL: P * fma(dP, scale, -scale delta))
//   P, dS -> shared memory (16-bit)
//   dV += P^T dO, dK += dS^T Q                  (registers, the whole kernel)
//   dQ = dS K -> dq_acc                         (fp32 staging tile in shared memory, then vector
//                                                reductions; d = 256: reductions from registers)
// The softmax scale is applied once, when dS is formed, so dK and dQ need none afterwards.
// The epilogue adds dK, dV to dk_acc, dv_acc (reductions when several CTAs' query heads share the
// K/V head).
//
// Deterministic (kDeterministic): no reductions, so every sum runs in a fixed order. One CTA per
// (key tile, K/V head) takes the group's query heads in turn (dK/dV summed in registers) and
// skips dQ; block_dq_body (dq_kernel.cuh) computes dQ.
#pragma once

#include <cstdint>

#include "core/mask.h"
#include "core/params.h"
#include "cuda/fwd_kernel.cuh"
#include "cuda/kernel_traits.cuh"
#include "cuda/primitives.cuh"
#include "cuda/tile_copy.cuh"
#include "cuda/tile_table.cuh"
#include "cuda/warp_mma.cuh"

namespace ring_attn {
namespace cuda {

// lse in the exponentials' unit (lse log2(e)); a row that saw nothing (lse = -inf) gets +inf, so
// that its p = exp(s - lse) = 0.
RA_DEV float lse_exp2_unit(float lse) { return lse == neg_inf_f() ? pos_inf_f() : lse * kLog2eF; }

template <typename Traits, bool kDeterministic>
RA_DEV void block_bwd_body(const BlockBwdParams& p, char* smem) {
  constexpr bool kBF16 = Traits::kBF16;
  constexpr int kD = Traits::kHeadDim, kBM = Traits::kBlockM, kBN = Traits::kBlockN;
  constexpr int kNT = Traits::kNThreads, kStride = Traits::kStride;
  constexpr int kStrideP = Traits::kStrideP, kStrideDq = Traits::kStrideDq;
  constexpr int kSdpMt = Traits::kSdpMTiles, kSdpRows = 16 * kSdpMt;
  constexpr int kSdpNb = Traits::kSdpKeys / 8;  // n-blocks of a warp's S, dP (keys)
  constexpr int kDkvCols = Traits::kDkvCols, kDqMt = Traits::kDqMTiles, kDqCols = Traits::kDqCols;

  using QCopy = TileCopy<kBM, kD, kStride, kNT>;   // query rows (Q, dO)
  using KvCopy = TileCopy<kBN, kD, kStride, kNT>;  // key rows (K, V)

  const int tid = thread_idx(), warp = tid / 32, lane = tid % 32, g = lane / 4, t4 = lane % 4;
  const int k0 = block_idx_x() * kBN, b = block_idx_z();
  const int Sq = p.shape.seqlen_q, Sk = p.shape.seqlen_k, d = p.shape.headdim;
  const int group = p.shape.nheads / p.shape.nheads_kv;
  // Atomic mode: one CTA per query head h (grid y = nheads). Deterministic: one CTA per K/V head
  // (grid y = nheads_kv) takes its group's query heads in turn.
  const int hk = kDeterministic ? block_idx_y() : block_idx_y() / group;
  const int h_begin = kDeterministic ? hk * group : block_idx_y();
  const int h_end = kDeterministic ? h_begin + group : h_begin + 1;
  const float scale = static_cast<float>(p.softmax_scale);
  const float exp2_mul = scale * kLog2eF;  // p = exp2(s exp2_mul - lse log2(e))

  uint16_t* sK = reinterpret_cast<uint16_t*>(smem + Traits::kOffK);
  uint16_t* sV = reinterpret_cast<uint16_t*>(smem + Traits::kOffV);
  uint16_t* sQ = reinterpret_cast<uint16_t*>(smem + Traits::kOffQ);  // stage s at + s * kTileBytes
  uint16_t* sdO = reinterpret_cast<uint16_t*>(smem + Traits::kOffDo);
  uint16_t* sP = reinterpret_cast<uint16_t*>(smem + Traits::kOffP);
  uint16_t* sdS = reinterpret_cast<uint16_t*>(smem + Traits::kOffDs);
  float* sDq = reinterpret_cast<float*>(smem + Traits::kOffDq);  // in place of P and dS
  // Row data of stage s at + s * kRowWords: lse, delta, q_pos [kBM], q_seg [kBM][2].
  int32_t* sRowData = reinterpret_cast<int32_t*>(smem + Traits::kOffRowData);
  int32_t* sKpos = reinterpret_cast<int32_t*>(smem + Traits::kOffKpos);
  uint16_t* sTable = reinterpret_cast<uint16_t*>(smem + Traits::kOffTable);
  int32_t* scratch = reinterpret_cast<int32_t*>(smem + Traits::kOffScratch);

  // The CTA's keys: K and V, their positions and range.
  const uint16_t* gK = static_cast<const uint16_t*>(p.k) + b * p.k_strides.batch + hk * p.k_strides.head;
  const uint16_t* gV = static_cast<const uint16_t*>(p.v) + b * p.v_strides.batch + hk * p.v_strides.head;
  KvCopy::template issue<true>(sK, gK + k0 * p.k_strides.row, p.k_strides.row, d, tid, Sk - k0);
  KvCopy::template issue<true>(sV, gV + k0 * p.v_strides.row, p.v_strides.row, d, tid, Sk - k0);
  cp_async_commit();
  for (int i = tid; i < kBN; i += kNT) sKpos[i] = k0 + i < Sk ? p.k_pos[k0 + i] : 0;
  const PositionRange k_range = warp_range(p.k_pos, k0, imin(k0 + kBN, Sk), lane);
  const bool keys_tail = k0 + kBN > Sk;

  // Warp layouts (kernel_traits.cuh): S/dP rows sm0.. x keys sn0..; dK/dV keys kn0.. x columns
  // kc0..; dQ rows qm0.. x columns qc0...
  const int sm0 = (warp % Traits::kSdpWarpsM) * kSdpRows, sn0 = (warp / Traits::kSdpWarpsM) * Traits::kSdpKeys;
  const int kn0 = (warp % Traits::kDkvWarpsN) * 32, kc0 = (warp / Traits::kDkvWarpsN) * kDkvCols;
  const int qm0 = (warp % Traits::kDqWarpsM) * 16 * kDqMt;
  const int qc0 = (warp / Traits::kDqWarpsM) * kDqCols;

  float dk[2][kDkvCols / 8][4], dv[2][kDkvCols / 8][4];
  zero(dk);
  zero(dv);

  using DqReduce = TileReduce<kBM, kD, kStrideDq, kNT>;
  const int nstages = (Sq + kBM - 1) / kBM;
  int n = 0;

  for (int h = h_begin; h < h_end; ++h) {
    const uint16_t* gQ = static_cast<const uint16_t*>(p.q) + b * p.q_strides.batch + h * p.q_strides.head;
    const uint16_t* gdO =
        static_cast<const uint16_t*>(p.dout) + b * p.dout_strides.batch + h * p.dout_strides.head;
    const int64_t stat_off = b * p.row_stat_batch_stride + h * p.row_stat_head_stride;
    const float* gL = static_cast<const float*>(p.lse) + stat_off;
    const float* gD = static_cast<const float*>(p.delta) + stat_off;
    float* gdQ = static_cast<float*>(p.dq_acc) + b * p.dq_strides.batch + h * p.dq_strides.head;

    // A stage's row data: 4-byte words w = part * kBM + r of row m0 + r, parts lse, delta, q_pos,
    // q_seg lo, q_seg hi. Thread tid copies word tid (the q_seg threads both words of their row),
    // every stage, so that no copy depends on the stage's kind.
    static_assert(kNT == 4 * kBM, "row data: a thread per word of lse, delta, q_pos, q_seg");
    // Q and the row data of stage m0 into buffers qb / sb; dO apart.
    auto issue_q = [&](int m0, int qb, int sb) {
      uint16_t* tQ = sQ + qb * Traits::kTileBytes / 2;
      if (m0 + kBM <= Sq) {
        QCopy::issue(tQ, gQ + m0 * p.q_strides.row, p.q_strides.row, d, tid);
      } else {
        QCopy::template issue<true>(tQ, gQ + m0 * p.q_strides.row, p.q_strides.row, d, tid, Sq - m0);
      }
      const int part = tid / kBM, row = m0 + tid % kBM;
      const bool in = row < Sq;
      int32_t* dst = sRowData + sb * Traits::kRowWords + tid;
      if (part < 3) {
        const int32_t* src = part == 0   ? reinterpret_cast<const int32_t*>(gL)
                             : part == 1 ? reinterpret_cast<const int32_t*>(gD)
                                         : p.q_pos;
        cp_async_4(dst, src + (in ? row : 0), in);
      } else if (p.q_seg) {
        cp_async_4(dst, p.q_seg + (in ? 2 * row : 0), in);  // lo, then hi kBM words on
        cp_async_4(dst + kBM, p.q_seg + (in ? 2 * row + 1 : 0), in);
      }
    };
    auto issue_do = [&](int m0) {
      if (m0 + kBM <= Sq) {
        QCopy::issue(sdO, gdO + m0 * p.dout_strides.row, p.dout_strides.row, d, tid);
      } else {
        QCopy::template issue<true>(sdO, gdO + m0 * p.dout_strides.row, p.dout_strides.row, d, tid,
                                       Sq - m0);
      }
    };

    for (int w0 = 0; w0 < nstages; w0 += kTableTiles) {
      const int w1 = imin(w0 + kTableTiles, nstages);
      if (h == h_begin || w1 - w0 < nstages) {
        n = build_query_tiles<kNT, kBM>(sTable, scratch, p.mask, p.q_pos, p.q_seg, Sq, k_range,
                                         keys_tail, w0, w1, tid);
      } else {
        sync_threads();  // every warp is done with the last head's buffers
      }
      if (n == 0) continue;
      {
        const uint16_t e = sTable[0];
        const int m0 = (w0 + entry_tile(e)) * kBM;
        issue_q(m0, 0, 0);
        issue_do(m0);
        cp_async_commit();
      }

      for (int i = 0; i < n; ++i) {
        cp_async_wait<0>();
        sync_threads();  // stage i's Q, dO and row stats are in; the last stage's flush is done
        // Stage i's first row m0; the table is read again where an entry is needed rather than
        // keeping it in registers across the stage.
        auto first_row = [&](int j) { return (w0 + entry_tile(sTable[j])) * kBM; };
        const int m0 = first_row(i);
        const bool partial = entry_partial(sTable[i]);
        const int sb = i & 1, qb = Traits::kQStages == 2 ? sb : 0;
        if (Traits::kQStages == 2 && i + 1 < n) {
          issue_q(first_row(i + 1), qb ^ 1, sb ^ 1);
          cp_async_commit();
        }
        const uint16_t* tQ = sQ + qb * Traits::kTileBytes / 2;

        // S = Q K^T and dP = dO V^T: rows sm0.. (queries) x keys sn0.. of this warp.
        float s[kSdpMt][kSdpNb][4], dp[kSdpMt][kSdpNb][4];
        zero(s);
        zero(dp);
        warp_gemm<kBF16, kSdpMt, kSdpNb, kD / 16, false, kStride, false, kStride>(s, tQ, sm0, 0, sK, sn0, 0, lane);
        warp_gemm<kBF16, kSdpMt, kSdpNb, kD / 16, false, kStride, false, kStride>(dp, sdO, sm0, 0, sV, sn0, 0, lane);

        // P and dS = scale P (dP - delta), in place; 0 where a partial stage's row does not see a
        // key (kMasked: the mask is evaluated at all).
        const int32_t* rows = sRowData + sb * Traits::kRowWords;
        auto p_and_ds = [&]<bool kMasked>() {
          RA_UNROLL
          for (int mt = 0; mt < kSdpMt; ++mt) {
            RA_UNROLL
            for (int r = 0; r < 2; ++r) {
              const int lr = sm0 + 16 * mt + g + 8 * r;
              const float lse2 = lse_exp2_unit(reinterpret_cast<const float*>(rows)[lr]);
              const float delta_s = reinterpret_cast<const float*>(rows)[kBM + lr] * scale;
              PositionRange32 seen{0, 0};
              if constexpr (kMasked) {
                const PositionRange seg = p.q_seg ? PositionRange{rows[3 * kBM + lr], rows[4 * kBM + lr]}
                                                  : unbounded_range();
                seen = m0 + lr < Sq ? narrow(row_bounds(p.mask, rows[2 * kBM + lr], seg))
                                    : PositionRange32{INT32_MAX, INT32_MIN};
              }
              RA_UNROLL
              for (int nb = 0; nb < kSdpNb; ++nb) {
                RA_UNROLL
                for (int e2 = 0; e2 < 2; ++e2) {
                  const int kl = sn0 + nb * 8 + t4 * 2 + e2, j = 2 * r + e2;
                  float pe = fast_exp2(fmaf(s[mt][nb][j], exp2_mul, -lse2));
                  if constexpr (kMasked) {
                    pe = k0 + kl < Sk && is_visible(seen, sKpos[kl]) ? pe : 0.f;
                  }
                  s[mt][nb][j] = pe;
                  dp[mt][nb][j] = pe * fmaf(dp[mt][nb][j], scale, -delta_s);
                }
              }
            }
          }
        };
        if (partial) {
          p_and_ds.template operator()<true>();
        } else {
          p_and_ds.template operator()<false>();
        }
        store_frags<kBF16, kSdpMt, kSdpNb, kStrideP>(s, sP, sm0, sn0, lane);
        store_frags<kBF16, kSdpMt, kSdpNb, kStrideP>(dp, sdS, sm0, sn0, lane);
        sync_threads();  // P and dS of every warp are in

        // dV += P^T dO, dK += dS^T Q: keys kn0.. x columns kc0.. of this warp.
        warp_gemm<kBF16, 2, kDkvCols / 8, kBM / 16, true, kStrideP, true, kStride>(dv, sP, kn0, 0, sdO, kc0, 0, lane);
        warp_gemm<kBF16, 2, kDkvCols / 8, kBM / 16, true, kStrideP, true, kStride>(dk, sdS, kn0, 0, tQ, kc0, 0, lane);
        float dq[kDqMt][kDqCols / 8][4];
        if constexpr (!kDeterministic) {
          // dQ = dS K: rows qm0.. x columns qc0.. of this warp.
          zero(dq);
          warp_gemm<kBF16, kDqMt, kDqCols / 8, kBN / 16, false, kStrideP, true, kStride>(dq, sdS, qm0, 0, sK, qc0, 0, lane);
        }
        sync_threads();  // every warp is done with P, dS, dO (and a single-buffered Q)
        if (i + 1 < n) {
          if (Traits::kQStages == 1) issue_q(first_row(i + 1), 0, sb ^ 1);
          issue_do(first_row(i + 1));
          cp_async_commit();
        }

        if constexpr (!kDeterministic) {
          if constexpr (Traits::kDqStaging) {
            RA_UNROLL
            for (int mt = 0; mt < kDqMt; ++mt) {
              RA_UNROLL
              for (int nb = 0; nb < kDqCols / 8; ++nb) {
                RA_UNROLL
                for (int r = 0; r < 2; ++r) {
                  float* dst = sDq + (qm0 + 16 * mt + g + 8 * r) * kStrideDq + qc0 + nb * 8 + t4 * 2;
                  dst[0] = dq[mt][nb][2 * r];
                  dst[1] = dq[mt][nb][2 * r + 1];
                }
              }
            }
            sync_threads();  // the dQ tile is in
            if (m0 + kBM <= Sq) {
              DqReduce::add(gdQ + m0 * p.dq_strides.row, p.dq_strides.row, sDq, d, tid);
            } else {
              DqReduce::template add<true>(gdQ + m0 * p.dq_strides.row, p.dq_strides.row, sDq, d, tid,
                                           Sq - m0);
            }
          } else {
            RA_UNROLL
            for (int mt = 0; mt < kDqMt; ++mt) {
              RA_UNROLL
              for (int r = 0; r < 2; ++r) {
                const int row = m0 + qm0 + 16 * mt + g + 8 * r;
                if (row >= Sq) continue;
                float* dst = gdQ + static_cast<int64_t>(row) * p.dq_strides.row;
                RA_UNROLL
                for (int nb = 0; nb < kDqCols / 8; ++nb) {
                  const int c = qc0 + nb * 8 + t4 * 2;
                  const float v[2] = {dq[mt][nb][2 * r], dq[mt][nb][2 * r + 1]};
                  if (c < d) red_add<2>(dst + c, v);
                }
              }
            }
          }
        }
      }
    }
  }
  cp_async_wait<0>();  // K and V when no stage was live

  // Epilogue: dk_acc += dK (already scaled), dv_acc += dV; reductions when several CTAs' query
  // heads share the K/V head.
  float* gdK = static_cast<float*>(p.dk_acc) + b * p.dk_strides.batch + hk * p.dk_strides.head;
  float* gdV = static_cast<float*>(p.dv_acc) + b * p.dv_strides.batch + hk * p.dv_strides.head;
  const bool shared_kv = group > 1 && !kDeterministic;
  RA_UNROLL
  for (int mt = 0; mt < 2; ++mt) {
    RA_UNROLL
    for (int r = 0; r < 2; ++r) {
      const int key = k0 + kn0 + 16 * mt + g + 8 * r;
      if (key >= Sk) continue;
      float* krow = gdK + static_cast<int64_t>(key) * p.dk_strides.row;
      float* vrow = gdV + static_cast<int64_t>(key) * p.dv_strides.row;
      RA_UNROLL
      for (int nb = 0; nb < kDkvCols / 8; ++nb) {
        const int c = kc0 + nb * 8 + t4 * 2;
        if (c >= d) continue;
        const float vk[2] = {dk[mt][nb][2 * r], dk[mt][nb][2 * r + 1]};
        const float vv[2] = {dv[mt][nb][2 * r], dv[mt][nb][2 * r + 1]};
        if (shared_kv) {
          red_add<2>(krow + c, vk);
          red_add<2>(vrow + c, vv);
        } else {
          krow[c] += vk[0];
          krow[c + 1] += vk[1];
          vrow[c] += vv[0];
          vrow[c + 1] += vv[1];
        }
      }
    }
  }
}

}  // namespace cuda
}  // namespace ring_attn
