// Hopper dQ kernel body (sm_90a): one CTA per (query tile of 128 rows, head, batch) adds its rows'
// dQ over one K/V block to dq_acc, as block_dq_body (dq_kernel.cuh) does, with the forward's
// warp-specialised warpgroups (sm90_fwd_kernel.cuh):
//
//   producer warpgroup (registers lowered by setmaxnreg; its first warp works, the others exit)
//     TMA-loads Q and dO once, then walks the key tiles of 128 keys in order: classifies each from
//     the rows' bounds and the keys' positions (core/mask.h classify_tile, as tile_table.cuh) and
//     skips the invisible ones; for a live tile it waits for a free stage (empty mbarrier), writes
//     the tile's entry (tile << 1 | partial) and, for a partial tile, its keys' positions into the
//     stage, and TMA-loads K and V there (full mbarrier, expect_tx). The last key tile's loads
//     complete on the tail mbarrier instead: the producer waits for them, zeroes the K and V rows
//     past Sk (generic stores, published to wgmma by fence.proxy.async) and then arrives on the
//     full mbarrier. After the last tile it writes the end entry into the next stage and arrives
//     on its full mbarrier.
//   two consumer warpgroups of 64 query rows (registers raised by setmaxnreg), per stage:
//     S = Q K^T, then dP = dO V^T by wgmma as a second group (both operands in shared memory,
//     128-byte swizzle);
//     P = exp(scale S - lse)               (once S is in, while dP runs: wgmma_wait<1>; partial
//                                            tiles only: 0 where a row does not see a key)
//     dS = scale P (dP - delta)            (once dP is in; the softmax scale applied here, once)
//     dQ += dS K by wgmma (dS rounded to 16 bits in the register-A fragment, K MN-major in shared
//     memory); once it is in, one arrival per warp on the stage's empty mbarrier. With
//     kDqInFlight (d = 64) it is waited for only after the next stage's S and dP are issued
//     behind it (that wgmma_wait<1> retires it with S), so that it runs meanwhile.
//   prologue  the rows' bounds into shared memory (cta_row_bounds, all warpgroups); consumers:
//             their rows' lse (exp2 units) and scale delta into registers
//   epilogue  dq_acc += dQ for the rows below Sq: one owner per element, no reduction.
// K/V go through kStages stages. Operands are read as 2-D matrices (sm90_fwd_geometry.h), so the
// boxes of a sequence's last tiles also hold the rows that follow it: Q and dO rows past Sq only
// reach their own rows of dQ, never stored; K and V rows past Sk are zeroed, so that their keys'
// ds K adds exactly nothing (whatever their p).
#pragma once

#include <cstdint>

#include "core/mask.h"
#include "core/params.h"
#include "cuda/bwd_kernel.cuh"
#include "cuda/primitives.cuh"
#include "cuda/sm90_bwd_common.cuh"
#include "cuda/sm90_fwd_geometry.h"
#include "cuda/sm90_primitives.cuh"
#include "cuda/tile_table.cuh"

namespace ring_attn {
namespace cuda {
namespace sm90 {

// Shapes and the shared-memory layout (offsets from a 1024-byte aligned base; 16-bit tiles are
// stored as 64-column blocks of rows x 128 bytes, 128-byte swizzled, as the TMA boxes land).
template <bool kBF16_, int kHeadDim_>
struct DqTraits : WarpSpecializedTraits<kBF16_, kHeadDim_> {
  using Base = WarpSpecializedTraits<kBF16_, kHeadDim_>;
  using Base::kConsumerWarpgroups, Base::kHeadDim, Base::kNThreads, Base::kStages;
  static constexpr int kBlockM = 64 * kConsumerWarpgroups;
  static constexpr int kBlockN = 128;
  // A stage's dQ += dS K is waited for only once the next stage's S and dP are issued behind it,
  // so that no wait separates them: its dS fragments then live beside S, dP and dQ, which the 64
  // accumulator registers of dQ at d = 128 leave no room for (ptxas would serialise the wgmma).
  static constexpr bool kDqInFlight = kHeadDim == 64;
  static constexpr int kQBytes = kBlockM * kHeadDim * 2;   // Q or dO
  static constexpr int kKvBytes = kBlockN * kHeadDim * 2;  // one K or V stage
  static constexpr int kOffQ = 0;
  static constexpr int kOffDo = kOffQ + kQBytes;
  static constexpr int kOffK = kOffDo + kQBytes;
  static constexpr int kOffV = kOffK + kStages * kKvBytes;
  static constexpr int kOffKpos = kOffV + kStages * kKvBytes;
  static constexpr int kOffRows = kOffKpos + kStages * kBlockN * 4;
  static constexpr int kOffEntry = kOffRows + kBlockM * 8;
  // full[kStages], empty[kStages], q (Q and dO), tail
  static constexpr int kOffBars = kOffEntry + 8 * kStages;
  static constexpr int kOffScratch = kOffBars + 8 * (2 * kStages + 2);
  static constexpr int kScratchBytes = 4 * (5 * (kNThreads / 32) + 1);
  // The dynamic shared memory to ask for: the layout plus the alignment of its base.
  static constexpr int kSmemBytes = kOffScratch + kScratchBytes + kSwizzleAtomBytes;
  static_assert(kHeadDim == 64 || kHeadDim == 128, "Hopper backward head dims");
  static_assert(kQBytes % kSwizzleAtomBytes == 0 && kKvBytes % kSwizzleAtomBytes == 0, "alignment");
  static_assert(kOffBars % 8 == 0, "mbarrier alignment");
};

// The tensor maps of Q, dO (boxes of 64 columns x kBlockM rows), K and V (64 x kBlockN), all
// with the 128-byte swizzle. A kernel parameter (__grid_constant__) on the device.
struct DqMaps {
  TensorMap q, dout, k, v;
};

template <typename Traits>
RA_DEV void block_dq_body(const BlockBwdParams& p, const DqMaps& maps, char* smem_unaligned) {
  constexpr bool kBF16 = Traits::kBF16;
  constexpr int kD = Traits::kHeadDim, kBM = Traits::kBlockM, kBN = Traits::kBlockN;
  constexpr int kStages = Traits::kStages, kNT = Traits::kNThreads;
  constexpr int kConsumerThreads = Traits::kConsumerThreads;

  const int tid = thread_idx();
  const int q0 = block_idx_x() * kBM, h = block_idx_y(), b = block_idx_z();
  const int Sq = p.shape.seqlen_q, Sk = p.shape.seqlen_k;
  const int hk = h / (p.shape.nheads / p.shape.nheads_kv);
  const float scale = static_cast<float>(p.softmax_scale);

  char* smem = layout_base(smem_unaligned);
  char* sQ = smem + Traits::kOffQ;
  char* sdO = smem + Traits::kOffDo;
  char* sK = smem + Traits::kOffK;  // stage s at + s * kKvBytes
  char* sV = smem + Traits::kOffV;
  int32_t* sKpos = reinterpret_cast<int32_t*>(smem + Traits::kOffKpos);  // stage s at + s * kBN
  PositionRange32* sRows = reinterpret_cast<PositionRange32*>(smem + Traits::kOffRows);
  volatile uint32_t* sEntry = reinterpret_cast<volatile uint32_t*>(smem + Traits::kOffEntry);
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + Traits::kOffBars);
  uint64_t* empty = full + kStages;
  uint64_t* q_bar = empty + kStages;
  uint64_t* tail_bar = q_bar + 1;
  int32_t* scratch = reinterpret_cast<int32_t*>(smem + Traits::kOffScratch);

  init_pipeline_barriers<kStages, 2>(full, kConsumerThreads / 32, tid);  // then q, tail
  // Ends with a barrier: the mbarriers and the rows' bounds are ready for every warp.
  const TileBounds q_bounds =
      cta_row_bounds<kNT>(p.mask, p.q_pos, p.q_seg, q0, kBM, Sq, sRows, scratch, tid);

  if (tid >= kConsumerThreads) {
    // ---- producer ----
    setmaxnreg_dec<Traits::kProducerRegs>();
    if (tid >= kConsumerThreads + 32) return;
    const int lane = tid % 32;
    if (lane == 0) {
      const OperandOrigin qo = operand_origin(p.q_strides, b, h);
      const OperandOrigin oo = operand_origin(p.dout_strides, b, h);
      mbar_arrive_expect_tx(q_bar, 2 * Traits::kQBytes);
      tma_load_rows<kBM, Traits::kColBlocks>(sQ, &maps.q, q_bar, qo, q0);
      tma_load_rows<kBM, Traits::kColBlocks>(sdO, &maps.dout, q_bar, oo, q0);
    }
    const OperandOrigin ko = operand_origin(p.k_strides, b, hk);
    const OperandOrigin vo = operand_origin(p.v_strides, b, hk);
    const int ntiles = (Sk + kBN - 1) / kBN;
    int it = 0;  // live tiles issued
    for (int t = 0; t < ntiles; ++t) {
      const int k0 = t * kBN, k1 = imin(k0 + kBN, Sk);
      TileKind kind = classify_tile(q_bounds, warp_range(p.k_pos, k0, k1, lane));
      if (kind == TileKind::kSkip) continue;
      const bool tail = k1 < k0 + kBN;
      const bool partial = kind == TileKind::kPartial;
      const int stage = it % kStages;
      if (it >= kStages) mbar_wait(empty + stage, (it / kStages - 1) & 1);
      if (partial) {
        for (int i = lane; i < kBN; i += 32) {
          sKpos[stage * kBN + i] = k0 + i < Sk ? p.k_pos[k0 + i] : 0;
        }
      }
      sync_warp();  // the positions are written before lane 0's arrival publishes them
      char* tK = sK + stage * Traits::kKvBytes;
      char* tV = sV + stage * Traits::kKvBytes;
      uint64_t* bar = tail ? tail_bar : full + stage;
      if (lane == 0) {
        sEntry[stage] = static_cast<uint32_t>(t) << 1 | (partial ? 1u : 0u);
        mbar_arrive_expect_tx(bar, 2 * Traits::kKvBytes);
        tma_load_rows<kBN, Traits::kColBlocks>(tK, &maps.k, bar, ko, k0);
        tma_load_rows<kBN, Traits::kColBlocks>(tV, &maps.v, bar, vo, k0);
      }
      if (tail) {
        // K and V rows past Sk zeroed, so that those keys' s, dp and ds K are finite and ds K is
        // 0. One tail per CTA.
        publish_tail_stage<kBN, Traits::kColBlocks>(tail_bar, 0, tK, tV, k1 - k0, full + stage,
                                                    lane);
      }
      ++it;
    }
    end_stream<kStages>(sEntry, full, empty, it, lane);
    return;
  }

  // ---- consumers: warpgroup wg takes rows 64 wg .. 64 wg + 63 of the tile ----
  setmaxnreg_inc<Traits::kConsumerRegs>();
  const int wg = tid / 128, lane = tid % 32, g = lane / 4, t4 = lane % 4;
  const int row0 = 64 * wg + 16 * ((tid % 128) / 32) + g;  // this thread's rows: row0, row0 + 8
  const float exp2_mul = scale * kLog2eF;  // p = exp2(s exp2_mul - lse log2(e))
  const int64_t stat_off = b * p.row_stat_batch_stride + h * p.row_stat_head_stride;
  const float* gL = static_cast<const float*>(p.lse) + stat_off;
  const float* gD = static_cast<const float*>(p.delta) + stat_off;
  float lse2[2], delta_s[2];
  for (int r = 0; r < 2; ++r) {
    const int row = q0 + row0 + 8 * r;
    lse2[r] = row < Sq ? lse_exp2_unit(gL[row]) : pos_inf_f();
    delta_s[r] = row < Sq ? gD[row] * scale : 0.f;
  }
  const PositionRange32 seen[2] = {sRows[row0], sRows[row0 + 8]};

  // Accumulator register i of a m64nNk16 fragment: row row0 + 8 ((i / 2) % 2), column
  // 8 (i / 4) + 2 t4 + i % 2 (sm90_primitives.cuh).
  float dq[kD / 2];
  RA_UNROLL
  for (int i = 0; i < kD / 2; ++i) dq[i] = 0.f;

  // dS (16 bits) as the register-A fragments of the k16 steps over the keys: a[j] of step kc
  // holds row row0 + 8 (j % 2), keys 16 kc + 8 (j / 2) + 2 t4 + {0, 1}; left unchanged until
  // its dQ += dS K has been waited for.
  uint32_t dsa[kBN / 16][4];
  auto release = [&](int stage) {
    if (lane == 0) mbar_arrive(empty + stage);  // this warp is done with the stage
  };

  mbar_wait(q_bar, 0);
  for (int it = 0;; ++it) {
    const int stage = it % kStages;
    mbar_wait(full + stage, (it / kStages) & 1);
    const uint32_t e = sEntry[stage];
    if (e == kEndEntry) break;
    const char* tK = sK + stage * Traits::kKvBytes;
    const char* tV = sV + stage * Traits::kKvBytes;

    // S = Q K^T, then dP = dO V^T as a second wgmma group, which runs while P is computed: k16
    // steps over the head dim, all operands K-major.
    float s[kBN / 2], dp[kBN / 2];
    issue_scores_and_dprobs<kBF16, kBN, kD, kBM, kBN>(s, dp, sQ + 64 * wg * 128, tK,
                                                       sdO + 64 * wg * 128, tV);
    wgmma_wait<1>();  // S is in (groups complete in order); dP may still run
    if constexpr (Traits::kDqInFlight) {
      if (it > 0) release((it - 1) % kStages);  // so is the previous stage's dQ += dS K
    }

    // P = exp(scale S - lse); a partial tile's p is 0 where the row does not see the key. Then,
    // once dP is in, dS = scale P (dP - delta), in place.
    probs_from_scores<false>(s, exp2_mul, lse2, t4);
    if (e & 1u) mask_probs<false>(s, seen, sKpos + stage * kBN, t4);
    const int valid = Sk - static_cast<int>(e >> 1) * kBN;  // the tile's keys below Sk
    if (valid < kBN) zero_probs_beyond<false>(s, valid, 0, t4);
    wgmma_wait<0>();
    ds_from_probs<false>(dp, s, scale, delta_s, t4);

    // dQ += dS K: K (keys x head dim) is the MN-major B operand, 64-column blocks LBO apart.
    pack_a_fragments<kBF16>(dp, dsa);
    wgmma_fence();
    issue_register_a_product<kBF16, kD, kBN / 16, kBN>(dq, dsa, tK);
    wgmma_commit();
    if constexpr (!Traits::kDqInFlight) {
      wgmma_wait<0>();
      release(stage);
    }
  }
  // The last stage's dQ += dS K (nothing refills its stage any more).
  if constexpr (Traits::kDqInFlight) wgmma_wait<0>();

  // Epilogue: dq_acc += dQ (already scaled), rows below Sq.
  float* gdQ = static_cast<float*>(p.dq_acc) + b * p.dq_strides.batch + h * p.dq_strides.head;
  RA_UNROLL
  for (int r = 0; r < 2; ++r) {
    const int row = q0 + row0 + 8 * r;
    if (row >= Sq) continue;
    float* dst = gdQ + static_cast<int64_t>(row) * p.dq_strides.row;
    RA_UNROLL
    for (int nb = 0; nb < kD / 8; ++nb) {
      const int c = 8 * nb + 2 * t4;
      dst[c] += dq[4 * nb + 2 * r];
      dst[c + 1] += dq[4 * nb + 2 * r + 1];
    }
  }
}

}  // namespace sm90
}  // namespace cuda
}  // namespace ring_attn
