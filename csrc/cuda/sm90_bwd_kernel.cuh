// Hopper dK/dV kernel body (sm_90a): one CTA per (key tile of 128 keys, K/V head, batch) adds its
// keys' gradients over every query row of the K/V head's query heads (GQA group) to dk_acc and
// dv_acc, as block_bwd_body (bwd_kernel.cuh) does in its deterministic mode, with
// warp-specialised warpgroups. Keys are wgmma's M dimension, so every product is transposed:
//
//   producer warpgroup (registers lowered by setmaxnreg; its first warp works, the others exit)
//     TMA-loads K and V once, then walks the query tiles of 64 rows in order: classifies each
//     from its rows' bounds and the keys' positions (core/mask.h classify_tile, as tile_table.cuh)
//     and skips the invisible ones; for a live tile, for each query head of the group in turn, it
//     waits for a free stage (empty mbarrier), writes the rows' lse (in exp2 units), scale delta
//     and, for a partial tile, their bounds into the stage, then the entry (tile << 1 | partial)
//     and, with kFusedDq, the query head, and TMA-loads Q and dO there (full mbarrier,
//     expect_tx). The last query tile's loads complete on the tail mbarrier instead: the producer
//     waits for them, zeroes the rows past Sq (generic stores, published to wgmma by
//     fence.proxy.async) and then arrives on the full mbarrier. After the last tile it writes the
//     end entry into the next stage and arrives on its full mbarrier.
//   two consumer warpgroups of 64 keys (registers raised by setmaxnreg), per stage:
//     S^T = K Q^T, then dP^T = V dO^T by wgmma as a second group (both operands in shared
//     memory, 128-byte swizzle);
//     P^T = exp(scale S^T - lse)                  (once S^T is in, while dP^T runs: wgmma_wait<1>;
//                                                   partial tiles only: 0 where a row does not
//                                                   see a key)
//     dS^T = scale P^T (dP^T - delta)             (once dP^T is in; the softmax scale applied
//                                                   here, once)
//     dV += P^T dO, dK += dS^T Q by wgmma (P^T, dS^T rounded to 16 bits in the register-A
//     fragment; dO, Q MN-major in shared memory). With kDvBeforeDs (d = 64) dV += P^T dO is
//     issued as soon as P^T is packed, as a third group that runs while dS^T is computed
//     (wgmma_wait<1> before dS^T reads dP^T); otherwise it shares dK's group. Once every group
//     is in (wgmma_wait<0>), one arrival per warp on the stage's empty mbarrier.
//   epilogue  dk_acc += dK, dv_acc += dV for the keys below Sk: the CTA owns its rows, so the
//             sums need no reduction and run in a fixed order.
// With kFusedDq (the non-deterministic mode) the consumers also add each stage's dQ to dq_acc:
//   each warpgroup stores its dS^T (64 keys x 64 rows, 16 bits) into the stage's dS^T tile (128
//     keys x 64 rows, 128-byte swizzled: a valid MN-major wgmma operand), fence.proxy.async, then
//     a named barrier over the warpgroups that read it;
//   dQ = dS K by wgmma (dS: A, MN-major from the dS^T tile; K: B, MN-major from sK), 64 rows x 64
//     columns of dQ per warpgroup: at d = 128 warpgroup wg takes columns 64 wg .. 64 wg + 63 over
//     all 128 keys, at d = 64 every column over its own 64 keys (the two partial sums both added);
//   each warp stages its 16 rows of the fp32 result in shared memory as a box of the dq_acc map,
//     laid out as the TMA lands it (128-byte swizzle; fence.proxy.async), and one lane adds it by
//     one TMA tensor reduction (cp.reduce.async.bulk.tensor .add) through that map, a 5-D tensor
//     (32 columns, seqlen_q, head dim / 32 column blocks, heads, batch):
//       dq_acc[b, m0 + 16 w : m0 + 16 w + 16, h, c0 : c0 + 64] += dQ[16 w : 16 w + 16, :]
//     (m0 the stage's first row, h its query head, c0 the warpgroup's first column, 0 at
//     d = 64); rows past Sq lie outside the map, so the TMA leaves them out. The warp waits for
//     those reads (wait_group.read) before it stages the next stage's rows.
//   The dS^T tiles alternate with the stages, so one barrier per stage also keeps a warpgroup from
//   overwriting a tile the other still reads. Keys past Sk are zeroed in K and V once (their s
//   and dp are 0, their K rows 0), so that they add nothing to dQ.
// Without kFusedDq dQ is left to block_dq_body (sm90_dq_kernel.cuh). Q and dO go through kStages
// stages. Operands are read as 2-D matrices (sm90_fwd_geometry.h), so the boxes of a sequence's
// last tiles also hold the rows that follow it: keys past Sk only reach their own rows of dK and
// dV, never stored; query rows past Sq are zeroed in the stage and get lse = inf, so that their s
// and dp are 0 and p and ds exactly 0.
#pragma once

#include <cstdint>
#include <limits>

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
// kFusedDq: the kernel also adds dQ to dq_acc by TMA reductions.
template <bool kBF16_, int kHeadDim_, bool kFusedDq_>
struct DkdvTraits : WarpSpecializedTraits<kBF16_, kHeadDim_> {
  using Base = WarpSpecializedTraits<kBF16_, kHeadDim_>;
  using Base::kConsumerWarpgroups, Base::kHeadDim, Base::kStages;
  static constexpr bool kFusedDq = kFusedDq_;
  static constexpr int kBlockN = 64 * kConsumerWarpgroups;  // keys
  static constexpr int kBlockM = 64;                        // query rows of a stage
  // dV += P^T dO issued before dS^T is computed, so that it runs meanwhile: P^T's register-A
  // fragments then live beside P^T, dP^T, dK and dV, which the 128 accumulator registers of
  // d = 128 leave no room for (ptxas would serialise the wgmma); there dV joins dK's group.
  static constexpr bool kDvBeforeDs = kHeadDim == 64;
  static constexpr int kKvBytes = kBlockN * kHeadDim * 2;  // K or V
  static constexpr int kQBytes = kBlockM * kHeadDim * 2;   // one Q or dO stage
  static constexpr int kOffK = 0;
  static constexpr int kOffV = kOffK + kKvBytes;
  static constexpr int kOffQ = kOffV + kKvBytes;
  static constexpr int kOffDo = kOffQ + kStages * kQBytes;
  // Fused dQ: a dS^T tile per stage (kBlockN keys x kBlockM rows, 16 bits) and each consumer
  // warp's fp32 dQ staging: its 16 rows x 64 columns as one box of the dq_acc map
  // (sm90_tensor_map.h make_accumulator_map: kDqBoxBlocks blocks of 32 columns x kDqBoxRows
  // rows), laid out as the TMA lands it with the 128-byte swizzle: column block j at
  // j * kDqBlockBytes, in rows of 128 bytes, the 16-byte chunk c of row r at chunk c ^ (r % 8).
  // 32 fp32 columns (128 bytes) are the widest row the swizzle allows; the swizzle keeps the
  // fragment stores free of bank conflicts: the 8 rows of a store land in 8 distinct chunks, so a
  // warp's 256 bytes take the minimum two wavefronts (unswizzled 128-byte rows would put the 8
  // rows in the same banks).
  static constexpr int kDsBytes = kFusedDq ? kBlockN * kBlockM * 2 : 0;
  static constexpr int kDqBoxRows = 16;
  static constexpr int kDqBoxBlocks = 64 / 32;
  static constexpr int kDqBlockBytes = kDqBoxRows * kSwizzleBytes;
  static constexpr int kDqWarpBytes = kDqBoxBlocks * kDqBlockBytes;
  static constexpr int kDqStageBytes = kFusedDq ? kConsumerWarpgroups * 4 * kDqWarpBytes : 0;
  static constexpr int kOffDs = kOffDo + kStages * kQBytes;  // stage s at + s * kDsBytes
  static constexpr int kOffDqStage = kOffDs + kStages * kDsBytes;  // warp w at + w * kDqWarpBytes
  // lse and delta: stage s at + s * kBlockM floats
  static constexpr int kOffLse = kOffDqStage + kDqStageBytes;
  static constexpr int kOffDelta = kOffLse + kStages * kBlockM * 4;
  static constexpr int kOffRows = kOffDelta + kStages * kBlockM * 4;
  static constexpr int kOffEntry = kOffRows + kStages * kBlockM * 8;
  // Fused dQ: per stage, its query head (int32).
  static constexpr int kOffDqHead = kOffEntry + 8 * kStages;
  // full[kStages], empty[kStages], kv, tail
  static constexpr int kOffBars = kOffDqHead + (kFusedDq ? 4 * kStages : 0);
  static constexpr int kBarBytes = 8 * (2 * kStages + 2);
  // The dynamic shared memory to ask for: the layout plus the alignment of its base.
  static constexpr int kSmemBytes = kOffBars + kBarBytes + kSwizzleAtomBytes;
  static_assert(kHeadDim == 64 || kHeadDim == 128, "Hopper backward head dims");
  static_assert(kQBytes % kSwizzleAtomBytes == 0 && kKvBytes % kSwizzleAtomBytes == 0, "alignment");
  static_assert(kOffBars % 8 == 0, "mbarrier alignment");
  static_assert(kOffDs % kSwizzleAtomBytes == 0 && kDsBytes % kSwizzleAtomBytes == 0, "alignment");
  static_assert(kOffDqStage % kSwizzleAtomBytes == 0 && kDqBlockBytes % kSwizzleAtomBytes == 0,
                "a dQ column block is a whole number of swizzle atoms");
  static_assert(kBlockM * 2 == 128, "a dS^T tile row is one 128-byte swizzle row");
};

// The tensor maps of K, V (boxes of 64 columns x kBlockN rows), Q and dO (64 x kBlockM), and, for
// the fused dQ, of dq_acc: fp32 (32 columns, seqlen_q, head dim / 32 column blocks, heads, batch)
// with dq_strides, in boxes of 32 x kDqBoxRows x kDqBoxBlocks x 1 x 1, so that the rows past Sq
// of every (batch, head) lie outside it. All with the 128-byte swizzle. A kernel parameter
// (__grid_constant__) on the device.
struct DkdvMaps {
  TensorMap k, v, q, dout, dq_acc;
};

template <typename Traits>
RA_DEV void block_dkdv_body(const BlockBwdParams& p, const DkdvMaps& maps, char* smem_unaligned) {
  constexpr bool kBF16 = Traits::kBF16;
  constexpr int kD = Traits::kHeadDim, kBM = Traits::kBlockM, kBN = Traits::kBlockN;
  constexpr int kStages = Traits::kStages;
  constexpr int kConsumerThreads = Traits::kConsumerThreads;
  constexpr int kKvZeroedBarrier = 3;  // named barrier: K and V rows past Sk zeroed

  const int tid = thread_idx();
  const int k0 = block_idx_x() * kBN, hk = block_idx_y(), b = block_idx_z();
  const int Sq = p.shape.seqlen_q, Sk = p.shape.seqlen_k;
  const int group = p.shape.nheads / p.shape.nheads_kv;
  const float scale = static_cast<float>(p.softmax_scale);

  char* smem = layout_base(smem_unaligned);
  char* sK = smem + Traits::kOffK;
  char* sV = smem + Traits::kOffV;
  char* sQ = smem + Traits::kOffQ;  // stage s at + s * kQBytes
  char* sdO = smem + Traits::kOffDo;
  float* sLse = reinterpret_cast<float*>(smem + Traits::kOffLse);  // stage s at + s * kBM
  float* sDelta = reinterpret_cast<float*>(smem + Traits::kOffDelta);
  PositionRange32* sRows = reinterpret_cast<PositionRange32*>(smem + Traits::kOffRows);
  volatile uint32_t* sEntry = reinterpret_cast<volatile uint32_t*>(smem + Traits::kOffEntry);
  volatile int32_t* sDqHead = reinterpret_cast<volatile int32_t*>(smem + Traits::kOffDqHead);
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + Traits::kOffBars);
  uint64_t* empty = full + kStages;
  uint64_t* kv_bar = empty + kStages;
  uint64_t* tail_bar = kv_bar + 1;

  init_pipeline_barriers<kStages, 2>(full, kConsumerThreads / 32, tid);  // then kv, tail
  sync_threads();  // the mbarriers are ready for every warp

  if (tid >= kConsumerThreads) {
    // ---- producer ----
    setmaxnreg_dec<Traits::kProducerRegs>();
    if (tid >= kConsumerThreads + 32) return;
    const int lane = tid % 32;
    if (lane == 0) {
      const OperandOrigin ko = operand_origin(p.k_strides, b, hk);
      const OperandOrigin vo = operand_origin(p.v_strides, b, hk);
      mbar_arrive_expect_tx(kv_bar, 2 * Traits::kKvBytes);
      tma_load_rows<kBN, Traits::kColBlocks>(sK, &maps.k, kv_bar, ko, k0);
      tma_load_rows<kBN, Traits::kColBlocks>(sV, &maps.v, kv_bar, vo, k0);
    }
    const PositionRange keys = warp_range(p.k_pos, k0, imin(k0 + kBN, Sk), lane);
    const int ntiles = (Sq + kBM - 1) / kBM;
    int it = 0;     // stages issued
    int tails = 0;  // last query tiles issued (phases of the tail mbarrier)
    for (int t = 0; t < ntiles; ++t) {
      const int m0 = t * kBM, m1 = imin(m0 + kBM, Sq);
      // The rows' bounds (tile_table.cuh warp_tile_bounds, with the lane's kBM / 32 rows unrolled).
      TileBounds rows = empty_tile_bounds();
      RA_UNROLL
      for (int r = 0; r < kBM / 32; ++r) {
        const int row = m0 + lane + 32 * r;
        if (row < m1) add_row(rows, query_bounds(p.mask, p.q_pos, p.q_seg, row));
      }
      const TileKind kind = classify_tile(widen(warp_reduce(rows)), keys);
      if (kind == TileKind::kSkip) continue;
      const bool partial = kind == TileKind::kPartial;
      for (int h = hk * group; h < (hk + 1) * group; ++h) {
        const int stage = it % kStages;
        if (it >= kStages) mbar_wait(empty + stage, (it / kStages - 1) & 1);
        // The rows' lse (exp2 units), scale delta and bounds; rows past Sq: p = 0, ds = 0.
        const int64_t stat_off = b * p.row_stat_batch_stride + h * p.row_stat_head_stride;
        const float* gL = static_cast<const float*>(p.lse) + stat_off;
        const float* gD = static_cast<const float*>(p.delta) + stat_off;
        for (int i = lane; i < kBM; i += 32) {
          const int row = m0 + i;
          const bool in = row < Sq;
          sLse[stage * kBM + i] = in ? lse_exp2_unit(gL[row]) : pos_inf_f();
          sDelta[stage * kBM + i] = in ? gD[row] * scale : 0.f;
          if (partial) {
            sRows[stage * kBM + i] = in ? narrow(query_bounds(p.mask, p.q_pos, p.q_seg, row))
                                        : PositionRange32{INT32_MAX, INT32_MIN};
          }
        }
        sync_warp();  // the row data are written before lane 0's arrival publishes them
        char* tQ = sQ + stage * Traits::kQBytes;
        char* tdO = sdO + stage * Traits::kQBytes;
        const bool tail = m1 < m0 + kBM;
        uint64_t* bar = tail ? tail_bar : full + stage;
        if (lane == 0) {
          const OperandOrigin qo = operand_origin(p.q_strides, b, h);
          const OperandOrigin oo = operand_origin(p.dout_strides, b, h);
          sEntry[stage] = static_cast<uint32_t>(t) << 1 | (partial ? 1u : 0u);
          if constexpr (Traits::kFusedDq) sDqHead[stage] = h;
          mbar_arrive_expect_tx(bar, 2 * Traits::kQBytes);
          tma_load_rows<kBM, Traits::kColBlocks>(tQ, &maps.q, bar, qo, m0);
          tma_load_rows<kBM, Traits::kColBlocks>(tdO, &maps.dout, bar, oo, m0);
        }
        if (tail) {
          publish_tail_stage<kBM, Traits::kColBlocks>(tail_bar, tails++ & 1, tQ, tdO, m1 - m0,
                                                      full + stage, lane);
        }
        ++it;
      }
    }
    end_stream<kStages>(sEntry, full, empty, it, lane);
    return;
  }

  // ---- consumers: warpgroup wg takes keys 64 wg .. 64 wg + 63 of the tile ----
  setmaxnreg_inc<Traits::kConsumerRegs>();
  const int wg = tid / 128, lane = tid % 32, g = lane / 4, t4 = lane % 4;
  const int key0 = 64 * wg + 16 * ((tid % 128) / 32) + g;  // this thread's keys: key0, key0 + 8
  const float exp2_mul = scale * kLog2eF;  // p = exp2(s exp2_mul - lse log2(e))
  int32_t kpos[2];
  for (int r = 0; r < 2; ++r) {
    const int key = k0 + key0 + 8 * r;
    kpos[r] = key < Sk ? p.k_pos[key] : 0;
  }

  // Accumulator register i of a m64nNk16 fragment: row (key) key0 + 8 ((i / 2) % 2), column
  // 8 (i / 4) + 2 t4 + i % 2 (sm90_primitives.cuh).
  float dk[kD / 2], dv[kD / 2];
  RA_UNROLL
  for (int i = 0; i < kD / 2; ++i) {
    dk[i] = 0.f;
    dv[i] = 0.f;
  }

  mbar_wait(kv_bar, 0);
  if constexpr (Traits::kFusedDq) {
    // K and V rows past Sk hold what follows the sequence in memory (any bits): zeroed, so that
    // those keys' s, dp and K rows are 0 and they add nothing to dQ.
    if (k0 + kBN > Sk) {
      if (tid < 32) zero_tile_rows<kBN, Traits::kColBlocks>(sK, Sk - k0, lane);
      if (tid >= 32 && tid < 64) zero_tile_rows<kBN, Traits::kColBlocks>(sV, Sk - k0, lane);
      fence_proxy_async();
      named_sync(kKvZeroedBarrier, kConsumerThreads);
    }
  }
  char* sDs = smem + Traits::kOffDs;  // fused dQ: the dS^T tile of stage s at + s * kDsBytes
  for (int it = 0;; ++it) {
    const int stage = it % kStages;
    mbar_wait(full + stage, (it / kStages) & 1);
    const uint32_t e = sEntry[stage];
    if (e == kEndEntry) break;
    const char* tQ = sQ + stage * Traits::kQBytes;
    const char* tdO = sdO + stage * Traits::kQBytes;

    // S^T = K Q^T, then dP^T = V dO^T as a second wgmma group, which runs while P^T is
    // computed: k16 steps over the head dim, all operands K-major.
    float s[kBM / 2], dp[kBM / 2];
    issue_scores_and_dprobs<kBF16, kBM, kD, kBN, kBM>(s, dp, sK + 64 * wg * 128, tQ,
                                                       sV + 64 * wg * 128, tdO);
    wgmma_wait<1>();  // S^T is in (groups complete in order); dP^T may still run

    // P^T = exp(scale S^T - lse), in place (the stage's rows' lse per column); a partial tile's
    // p is 0 where the row does not see the key.
    probs_from_scores<true>(s, exp2_mul, sLse + stage * kBM, t4);
    if (e & 1u) mask_probs<true>(s, kpos, sRows + stage * kBM, t4);
    if (Sk - k0 < kBN) zero_probs_beyond<true>(s, Sk - k0, key0, t4);

    // Once dP^T is in, dS^T = scale P^T (dP^T - delta), in place (the stage's rows' scale delta
    // per column). P^T and dS^T (16 bits) as the register-A fragments of the k16 steps over the
    // query rows: a[j] of step kc holds key key0 + 8 (j % 2), rows 16 kc + 8 (j / 2) + 2 t4 +
    // {0, 1}, left unchanged until its product has been waited for. dV += P^T dO and
    // dK += dS^T Q: dO and Q (rows x head dim) are MN-major B operands, 64-column blocks LBO
    // apart.
    const float* delta_s = sDelta + stage * kBM;
    uint32_t pa[kBM / 16][4], dsa[kBM / 16][4];
    if constexpr (Traits::kDvBeforeDs) {
      // dV += P^T dO at once, a third group, which runs while dS^T is computed.
      pack_a_fragments<kBF16>(s, pa);
      wgmma_fence();
      issue_register_a_product<kBF16, kD, kBM / 16, kBM>(dv, pa, tdO);
      wgmma_commit();
      wgmma_wait<1>();  // dP^T is in; dV += P^T dO may still run
      ds_from_probs<true>(dp, s, scale, delta_s, t4);
    } else {
      wgmma_wait<0>();  // dP^T is in
      ds_from_probs<true>(dp, s, scale, delta_s, t4);
      pack_a_fragments<kBF16>(s, pa);
    }
    pack_a_fragments<kBF16>(dp, dsa);
    if constexpr (Traits::kFusedDq) {
      // dS^T into the stage's tile (key k, row m at swizzle(128 k + 2 m)) by stmatrix: dsa[kc][j]
      // is 8 x 8 matrix j of keys 16 w + 8 (j % 2) .., rows 16 kc + 8 (j / 2) ..; lane l gives
      // key 16 w + 8 ((l / 8) % 2) + l % 8, whose 16-byte chunk 2 kc + l / 16 lands at
      // (2 kc + l / 16) ^ (l % 8): offset ds_row ^ 32 kc from sDs (the stage's tile offset, a
      // multiple of 1024, leaves the swizzle bits alone; taken into the XOR, it keeps the offsets
      // from being held across the loop).
      const int ds_key = key0 - g + 8 * ((lane / 8) % 2) + lane % 8;
      const uint32_t ds_row =
          stage * Traits::kDsBytes + ds_key * 128 + 16 * ((lane / 16) ^ (lane % 8));
      RA_UNROLL
      for (int kc = 0; kc < kBM / 16; ++kc) {
        stmatrix_x4(dsa[kc], reinterpret_cast<uint16_t*>(sDs + (ds_row ^ (32 * kc))));
      }
      fence_proxy_async();
    }
    // dK += dS^T Q, with dV += P^T dO unless it was issued before: one group.
    wgmma_fence();
    if constexpr (!Traits::kDvBeforeDs) {
      issue_register_a_product<kBF16, kD, kBM / 16, kBM>(dv, pa, tdO);
    }
    issue_register_a_product<kBF16, kD, kBM / 16, kBM>(dk, dsa, tQ);
    wgmma_commit();
    wgmma_wait<0>();  // dV and dK are in: the stage's Q and dO, pa and dsa are free
    if constexpr (!Traits::kFusedDq) {
      if (lane == 0) mbar_arrive(empty + stage);  // this warp is done with the stage
    } else {
      const int dq_head = sDqHead[stage];
      sync_warp();  // every lane has read the stage's head before the release
      if (lane == 0) mbar_arrive(empty + stage);  // this warp is done with the stage
      // This warpgroup's dQ columns, first k16 step over the keys, and the warpgroups that read
      // its dS^T tile (named barrier 1 for both at d = 128, 1 + wg for its own keys at d = 64).
      constexpr bool kDqSplitKeys = kD == 64;
      constexpr int kDqSteps = kDqSplitKeys ? 4 : kBN / 16;
      constexpr int kDsReaders = kDqSplitKeys ? 128 : kConsumerThreads;
      const int wg_uniform = warpgroup_idx();  // wg, kept in uniform registers with what derives
      const int dq_col0 = kDqSplitKeys ? 0 : 64 * wg_uniform;
      const int dq_kc0 = kDqSplitKeys ? 4 * wg_uniform : 0;
      // The operands' descriptors at this warpgroup's first k16 step; the next steps lie 16 rows
      // (of 128 bytes) further in both (desc_advance: one add each).
      const uint64_t ds_desc =
          smem_desc(sDs + stage * Traits::kDsBytes + dq_kc0 * 16 * 128, kBN * 128, 1024);
      const uint64_t k_desc =
          smem_desc(sK + (dq_col0 / 64) * kBN * 128 + dq_kc0 * 16 * 128, kBN * 128, 1024);
      // dQ (rows x this warpgroup's 64 columns) = dS K over its k16 steps of keys: dS (rows x
      // keys) the MN-major A operand (the dS^T tile), K (keys x head dim) the MN-major B operand.
      // Issued once P^T and dS^T have left the registers (dK, dV and dQ stay within the budget).
      named_sync(kDqSplitKeys ? 1 + wg_uniform : 1, kDsReaders);  // every reader's dS^T rows
      float dq[32];
      wgmma_fence();
      RA_UNROLL
      for (int kc = 0; kc < kDqSteps; ++kc) {
        wgmma_ss<kBF16, 64, true, true>(dq, desc_advance(ds_desc, kc * 16 * 128),
                                        desc_advance(k_desc, kc * 16 * 128), kc > 0);
      }
      wgmma_commit();
      wgmma_wait<0>();

      // This warp's rows 16 w .. 16 w + 15 of the stage, staged as its box once the previous
      // stage's box is read: element (row, col) at col / 32 * kDqBlockBytes + swizzle128(128 row +
      // 4 (col % 32)) (sm90_layout.h), i.e. for register i of a fragment at
      // dq_lane ^ 32 ((i / 4) % 4) + kDqBlockBytes (i / 16) + 1024 ((i / 2) % 2), dq_lane the
      // lane's first (row g, column 2 t4) (the warp's box offset, a multiple of 1024, leaves the
      // swizzle bits alone). Then lane 0 adds the box to dq_acc; rows past Sq lie outside the map,
      // so the TMA leaves them out.
      const int warp = (tid % 128) / 32;
      const uint32_t dq_box = Traits::kOffDqStage + (4 * wg_uniform + warp) * Traits::kDqWarpBytes;
      const uint32_t dq_lane = dq_box + g * kSwizzleBytes + ((8 * t4) ^ (16 * g));
      bulk_wait_group_read<0>();
      sync_warp();
      RA_UNROLL
      for (int i = 0; i < 32; i += 2) {
        float2 v;
        v.x = dq[i];
        v.y = dq[i + 1];
        *reinterpret_cast<float2*>(smem + (dq_lane ^ (32 * ((i / 4) % 4))) +
                                   (i / 16) * Traits::kDqBlockBytes + ((i / 2) % 2) * 1024) = v;
      }
      fence_proxy_async();
      sync_warp();
      if (lane == 0) {
        const int row0 = static_cast<int>(e >> 1) * kBM + 16 * warp;
        tma_reduce_add_5d(smem + dq_box, &maps.dq_acc, 0, row0, dq_col0 / 32, dq_head, b);
        bulk_commit_group();
      }
    }
  }
  if constexpr (Traits::kFusedDq) bulk_wait_group_read<0>();  // the staging outlives its reads

  // Epilogue: dk_acc += dK (already scaled), dv_acc += dV, keys below Sk.
  float* gdK = static_cast<float*>(p.dk_acc) + b * p.dk_strides.batch + hk * p.dk_strides.head;
  float* gdV = static_cast<float*>(p.dv_acc) + b * p.dv_strides.batch + hk * p.dv_strides.head;
  RA_UNROLL
  for (int r = 0; r < 2; ++r) {
    const int key = k0 + key0 + 8 * r;
    if (key >= Sk) continue;
    float* krow = gdK + static_cast<int64_t>(key) * p.dk_strides.row;
    float* vrow = gdV + static_cast<int64_t>(key) * p.dv_strides.row;
    RA_UNROLL
    for (int nb = 0; nb < kD / 8; ++nb) {
      const int c = 8 * nb + 2 * t4;
      krow[c] += dk[4 * nb + 2 * r];
      krow[c + 1] += dk[4 * nb + 2 * r + 1];
      vrow[c] += dv[4 * nb + 2 * r];
      vrow[c + 1] += dv[4 * nb + 2 * r + 1];
    }
  }
}

}  // namespace sm90
}  // namespace cuda
}  // namespace ring_attn
