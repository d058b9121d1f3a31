// Hopper forward kernel body (sm_90a): one CTA per (query tile of 128 rows, head, batch) merges
// its rows' attention over one K/V block into the running fp32 state, as block_fwd_body
// (fwd_kernel.cuh) does, with warp-specialised warpgroups:
//
//   producer warpgroup (registers lowered by setmaxnreg; its first warp works, the others exit)
//     TMA-loads Q once, then walks the key tiles in order: classifies each from the rows' bounds
//     and the keys' positions (core/mask.h classify_tile, as tile_table.cuh) and skips the
//     invisible ones; for a live tile it waits for a free stage (empty mbarrier), writes the
//     tile's entry (tile << 2 | tail << 1 | partial; tail: the tile reaches past Sk) and, for a
//     partial tile, its keys' positions into the stage, and TMA-loads K and V there (full
//     mbarrier, expect_tx). After the last tile it writes the end entry into the next stage and
//     arrives on its full mbarrier.
//   two consumer warpgroups of 64 query rows (registers raised by setmaxnreg), per stage:
//     S = Q K^T by wgmma (both operands in shared memory, 128-byte swizzle); partial tiles only:
//     -inf where a row does not see a key (and the scale, unless folded into the exponential);
//     online softmax in registers, P rounded to 16 bits in the register-A fragment of wgmma;
//     O += P V by wgmma (P from registers, V MN-major in shared memory; in the last tile its rows
//     past the keys zeroed first); then one arrival per warp on the stage's empty mbarrier.
//     With kOverlap (d = 128, 256) a tile's S = Q K^T is issued first and the previous tile's
//     P V behind it, so that the P V runs during this tile's softmax: wgmma_wait<1> before the
//     scores are read, wgmma_wait<0> before o is rescaled and that tile's stage released. The
//     two warpgroups take turns to issue their wgmma (named barriers), so that one's softmax
//     runs while the other's products do.
//   prologue  the rows' bounds into shared memory (cta_row_bounds, all warpgroups); consumers:
//             acc = o, m = lse, l = 1 from the state when merging (else the empty state)
//   epilogue  o = acc / l, lse = m + log(l); rows that see nothing: out 0, lse -inf
// K/V go through kStages stages of kBlockN keys. Operands are read as 2-D matrices
// (sm90_fwd_geometry.h), so the boxes of a sequence's last tiles also hold the rows that follow
// it: Q rows past Sq are never stored, K columns past Sk are masked, V rows past Sk are zeroed.
#pragma once

#include <cstdint>
#include <limits>

#include "core/mask.h"
#include "core/merge.h"
#include "core/params.h"
#include "cuda/block_attn_cuda.h"
#include "cuda/primitives.cuh"
#include "cuda/sm90_fwd_geometry.h"
#include "cuda/sm90_pipeline.cuh"
#include "cuda/sm90_primitives.cuh"
#include "cuda/tile_table.cuh"
#include "cuda/warp_mma.cuh"

namespace ring_attn {
namespace cuda {
namespace sm90 {

// Shapes and the shared-memory layout (offsets from a 1024-byte aligned base; 16-bit tiles are
// stored as 64-column blocks of rows x 128 bytes, 128-byte swizzled, as the TMA boxes land).
template <bool kBF16_, int kHeadDim_>
struct FwdTraits : WarpSpecializedTraits<kBF16_, kHeadDim_> {
  using Base = WarpSpecializedTraits<kBF16_, kHeadDim_>;
  using Base::kConsumerWarpgroups, Base::kHeadDim, Base::kNThreads, Base::kStages;
  static constexpr int kBlockM = 64 * kConsumerWarpgroups;
  // Keys per tile: 128; 256 at d = 64, so that the fixed costs of a tile (waits, descriptors,
  // the softmax's row reductions) spread over twice the work; 64 at d = 256, where Q (64 KiB) and
  // two stages of 128 keys of K and V would not fit in the shared memory of a CTA.
  static constexpr int kBlockN = kHeadDim == 64 ? 256 : kHeadDim == 128 ? 128 : 64;
  // The consumers issue S = Q K^T of a tile before the P V of the one before, so that P V runs
  // during the softmax: P of one tile and S of the next in registers at once, which the 256-key
  // tiles of d = 64 (192 registers for the pair) leave no room for.
  static constexpr bool kOverlap = kHeadDim != 64;
  static constexpr int kQBytes = kBlockM * kHeadDim * 2;
  static constexpr int kKvBytes = kBlockN * kHeadDim * 2;  // one K or V stage
  static constexpr int kOffQ = 0;
  static constexpr int kOffK = kOffQ + kQBytes;
  static constexpr int kOffV = kOffK + kStages * kKvBytes;
  static constexpr int kOffKpos = kOffV + kStages * kKvBytes;
  static constexpr int kOffRows = kOffKpos + kStages * kBlockN * 4;
  static constexpr int kOffEntry = kOffRows + kBlockM * 8;
  static constexpr int kOffBars = kOffEntry + 16 * kStages;  // full[kStages], empty[kStages], q
  static constexpr int kOffScratch = kOffBars + 8 * (2 * kStages + 1);
  static constexpr int kScratchBytes = 4 * (5 * (kNThreads / 32) + 1);
  // The dynamic shared memory to ask for: the layout plus the alignment of its base.
  static constexpr int kSmemBytes = kOffScratch + kScratchBytes + kSwizzleAtomBytes;
  static_assert(kHeadDim == 64 || kHeadDim == 128 || kHeadDim == 256, "Hopper forward head dims");
  static_assert(kSmemBytes <= 227 * 1024, "shared memory of a CTA");
  static_assert(kOffK % kSwizzleAtomBytes == 0 && kKvBytes % kSwizzleAtomBytes == 0, "alignment");
  static_assert(kOffBars % 8 == 0, "mbarrier alignment");
};

// The tensor maps of Q, K and V: matrices of sm90_fwd_geometry.h read in boxes of 64 columns x
// kBlockM (Q) or kBlockN (K, V) rows with the 128-byte swizzle. A kernel parameter
// (__grid_constant__) on the device.
struct FwdMaps {
  TensorMap q, k, v;
};

RA_DEV float neg_inf_f32() { return -std::numeric_limits<float>::infinity(); }

template <typename Traits>
RA_DEV void block_fwd_body(const FwdArgs& args, const FwdMaps& maps, char* smem_unaligned) {
  constexpr bool kBF16 = Traits::kBF16;
  constexpr int kD = Traits::kHeadDim, kBM = Traits::kBlockM, kBN = Traits::kBlockN;
  constexpr int kStages = Traits::kStages, kNT = Traits::kNThreads;
  constexpr int kConsumerThreads = Traits::kConsumerThreads;

  const BlockFwdParams& p = args.p;
  const int tid = thread_idx();
  const int q0 = block_idx_x() * kBM, h = block_idx_y(), b = block_idx_z();
  const int Sq = p.shape.seqlen_q, Sk = p.shape.seqlen_k;
  const int hk = h / (p.shape.nheads / p.shape.nheads_kv);
  const float scale = static_cast<float>(p.softmax_scale);
  // With scale > 0 the scores stay unscaled until the exponential (max(scale s) = scale max(s));
  // otherwise the mask pass applies it and every live tile is partial.
  const bool fold_scale = scale > 0.f;

  char* smem = layout_base(smem_unaligned);
  char* sQ = smem + Traits::kOffQ;
  char* sK = smem + Traits::kOffK;  // stage s at + s * kKvBytes
  char* sV = smem + Traits::kOffV;
  int32_t* sKpos = reinterpret_cast<int32_t*>(smem + Traits::kOffKpos);  // stage s at + s * kBN
  PositionRange32* sRows = reinterpret_cast<PositionRange32*>(smem + Traits::kOffRows);
  volatile uint32_t* sEntry = reinterpret_cast<volatile uint32_t*>(smem + Traits::kOffEntry);
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + Traits::kOffBars);
  uint64_t* empty = full + kStages;
  uint64_t* q_bar = empty + kStages;
  int32_t* scratch = reinterpret_cast<int32_t*>(smem + Traits::kOffScratch);

  init_pipeline_barriers<kStages, 1>(full, kConsumerThreads / 32, tid);  // then q
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
      mbar_arrive_expect_tx(q_bar, Traits::kQBytes);
      tma_load_rows<kBM, Traits::kColBlocks>(sQ, &maps.q, q_bar, qo, q0);
    }
    const OperandOrigin ko = operand_origin(p.k_strides, b, hk);
    const OperandOrigin vo = operand_origin(p.v_strides, b, hk);
    const int ntiles = (Sk + kBN - 1) / kBN;
    int it = 0;  // live tiles issued
    for (int t = 0; t < ntiles; ++t) {
      const int k0 = t * kBN, k1 = imin(k0 + kBN, Sk);
      TileKind kind = classify_tile(q_bounds, warp_range(p.k_pos, k0, k1, lane));
      if (kind == TileKind::kSkip) continue;
      const bool tail = k0 + kBN > Sk;
      const bool partial = kind == TileKind::kPartial || !fold_scale || tail;
      const int stage = it % kStages;
      if (it >= kStages) mbar_wait(empty + stage, (it / kStages - 1) & 1);
      if (partial) {
        for (int i = lane; i < kBN; i += 32) sKpos[stage * kBN + i] = k0 + i < Sk ? p.k_pos[k0 + i] : 0;
      }
      sync_warp();  // the positions are written before lane 0's arrival publishes them
      if (lane == 0) {
        sEntry[stage] = static_cast<uint32_t>(t) << 2 | (tail ? 2u : 0u) | (partial ? 1u : 0u);
        mbar_arrive_expect_tx(full + stage, 2 * Traits::kKvBytes);
        // Rolled loops: unrolled, their boxes' coordinates would outgrow the producer's registers.
        tma_load_rows<kBN, Traits::kColBlocks, true>(sK + stage * Traits::kKvBytes, &maps.k,
                                                     full + stage, ko, k0);
        tma_load_rows<kBN, Traits::kColBlocks, true>(sV + stage * Traits::kKvBytes, &maps.v,
                                                     full + stage, vo, k0);
      }
      ++it;
    }
    end_stream<kStages>(sEntry, full, empty, it, lane);
    return;
  }

  // ---- consumers: warpgroup wg takes rows 64 wg .. 64 wg + 63 of the tile ----
  setmaxnreg_inc<Traits::kConsumerRegs>();
  const int wg = warpgroup_idx(), lane = tid % 32, g = lane / 4, t4 = lane % 4;
  // This thread's rows: row0 and row0 + 8, row0 = 64 wg + 16 (warp in the warpgroup) + g.
  const int row0 = 16 * (tid / 32) + g;
  const float ninf = neg_inf_f32();
  const float score_unit = fold_scale ? scale : 1.f;
  const float mask_mul = fold_scale ? 1.f : scale;
  const float exp2_mul = score_unit * kLog2eF;
  float* gO = static_cast<float*>(p.out_acc) + b * p.out_strides.batch + h * p.out_strides.head;
  float* gL = static_cast<float*>(p.lse) + b * p.lse_batch_stride + h * p.lse_head_stride;

  // Accumulator register i of a m64nNk16 fragment: row row0 + 8 ((i / 2) % 2), column
  // 8 (i / 4) + 2 t4 + i % 2 (sm90_primitives.cuh).
  float o[kD / 2];
  float m[2], l[2];  // l summed per lane (the quad's sum at the end)
  for (int r = 0; r < 2; ++r) {
    const int row = q0 + row0 + 8 * r;
    const float lse = args.merge && row < Sq ? gL[row] : ninf;
    m[r] = lse;
    const bool load = lse != ninf;
    l[r] = load && t4 == 0 ? 1.f : 0.f;  // the state's l = 1 counted once per quad
    const float* src = gO + static_cast<int64_t>(load ? row : 0) * p.out_strides.row;
    RA_UNROLL
    for (int nb = 0; nb < kD / 8; ++nb) {
      const int c = 8 * nb + 2 * t4;
      o[4 * nb + 2 * r] = load ? src[c] : 0.f;
      o[4 * nb + 2 * r + 1] = load ? src[c + 1] : 0.f;
    }
  }
  const PositionRange32 seen[2] = {sRows[row0], sRows[row0 + 8]};

  // The operands' descriptors at their first k16 step of stage 0; other steps and stages lie a
  // constant offset further (desc_advance: one add each).
  const uint64_t dq0 = smem_desc(sQ + 64 * wg * 128, 16, 1024);
  const uint64_t dk0 = smem_desc(sK, 16, 1024);
  const uint64_t dv0 = smem_desc(sV, kBN * 128, 1024);

  // O += P V for the tile in `stage` (P in pa), one wgmma group: V (keys x head dim) is the
  // MN-major B operand, 64-column blocks LBO apart.
  uint32_t pa[kBN / 16][4];
  auto issue_pv = [&](int stage) {
    const uint64_t dv_stage = desc_advance(dv0, stage * Traits::kKvBytes);
    RA_UNROLL
    for (int kc = 0; kc < kBN / 16; ++kc) {
      wgmma_rs<kBF16, kD, true>(o, pa[kc], desc_advance(dv_stage, kc * 16 * 128), true);
    }
    wgmma_commit();
  };
  // A stage is released once every wgmma that reads it has completed: one arrival per warp.
  auto release = [&](int stage) {
    if (lane == 0) mbar_arrive(empty + stage);
  };
  // The warpgroups take turns to issue their wgmma (named barrier 2 + wg: the other's turn has
  // ended), so that one's softmax runs while the other's products do. Warpgroup 0 starts.
  auto wait_turn = [&] { named_sync(2 + wg, kConsumerThreads); };
  auto end_turn = [&] { named_arrive(3 - wg, kConsumerThreads); };

  // One live tile, the it-th: false at the end entry. kPvInFlight: the P V of the tile before,
  // in `held`, is issued behind this tile's S and completes during its softmax (kOverlap, every
  // tile but the first); otherwise this tile's own P V follows its softmax (without kOverlap).
  int held = -1;  // kOverlap: the stage of the last tile, its P in pa, its P V not yet issued
  auto tile = [&]<bool kPvInFlight>(int it) {
    const int stage = it % kStages;
    mbar_wait(full + stage, (it / kStages) & 1);
    const uint32_t e = sEntry[stage];
    if (e == kEndEntry) return false;
    const uint64_t dk_stage = desc_advance(dk0, stage * Traits::kKvBytes);

    // S = Q K^T: k16 steps over the head dim, both operands K-major. With kOverlap the previous
    // tile's P V follows as a second group, which runs during this tile's softmax.
    float s[kBN / 2];
    wait_turn();
    wgmma_fence();
    RA_UNROLL
    for (int kc = 0; kc < kD / 16; ++kc) {
      const uint64_t dq = desc_advance(dq0, (kc / 4) * kBM * 128 + (kc % 4) * 32);
      const uint64_t dk = desc_advance(dk_stage, (kc / 4) * kBN * 128 + (kc % 4) * 32);
      wgmma_ss<kBF16, kBN, false, false>(s, dq, dk, kc > 0);
    }
    wgmma_commit();
    if constexpr (kPvInFlight) issue_pv(held);
    end_turn();
    if constexpr (kPvInFlight) {
      wgmma_wait<1>();  // S is in (groups complete in order); the P V may still run
    } else {
      wgmma_wait<0>();
    }

    const int k0 = static_cast<int>(e >> 2) * kBN;
    if (e & 1u) {  // partial: -inf where a row does not see a key, or a key lies past Sk
      const int32_t* kpos = sKpos + stage * kBN;
      RA_UNROLL
      for (int nb = 0; nb < kBN / 8; ++nb) {
        RA_UNROLL
        for (int e2 = 0; e2 < 2; ++e2) {
          const int kl = 8 * nb + 2 * t4 + e2;
          const bool in = k0 + kl < Sk;
          const int32_t kp = kpos[kl];
          RA_UNROLL
          for (int r = 0; r < 2; ++r) {
            float& x = s[4 * nb + 2 * r + e2];
            x = in && is_visible(seen[r], kp) ? x * mask_mul : ninf;
          }
        }
      }
    }

    // Online softmax (a row's scores live in the 4 lanes of a quad):
    //   m' = max(m, max_j s_j), acc *= exp(m - m'), l = l exp(m - m') + sum_j exp(s_j - m').
    float mref[2], factor[2], sum[2] = {0.f, 0.f};
    RA_UNROLL
    for (int r = 0; r < 2; ++r) {
      float mx = fmax_f(s[2 * r], s[2 * r + 1]);
      RA_UNROLL
      for (int nb = 1; nb < kBN / 8; ++nb) {
        mx = fmax_f(mx, fmax_f(s[4 * nb + 2 * r], s[4 * nb + 2 * r + 1]));
      }
      mx = fmax_f(mx, shfl_xor(mx, 1));
      mx = fmax_f(mx, shfl_xor(mx, 2));
      const float m_new = fmax_f(m[r], mx * score_unit);
      // m' log2(e); a row that has seen nothing: 0, so that every p is exp2(-inf) = 0
      mref[r] = m_new == ninf ? 0.f : m_new * kLog2eF;
      factor[r] = fast_exp2(fmaf(m[r], kLog2eF, -mref[r]));  // 0 when m = -inf
      m[r] = m_new;
    }
    RA_UNROLL
    for (int i = 0; i < kBN / 2; ++i) {
      const float pe = fast_exp2(fmaf(s[i], exp2_mul, -mref[(i / 2) % 2]));
      s[i] = pe;
      sum[(i / 2) % 2] += pe;
    }
    if constexpr (kPvInFlight) {
      wgmma_wait<0>();  // the previous tile's P V is done: o may be rescaled, pa rewritten
      release(held);
    }
    RA_UNROLL
    for (int r = 0; r < 2; ++r) l[r] = l[r] * factor[r] + sum[r];
    RA_UNROLL
    for (int i = 0; i < kD / 2; ++i) o[i] *= factor[(i / 2) % 2];

    // P (16 bits) as the register-A fragments of the k16 steps over the keys: a[j] of step kc
    // holds row row0 + 8 (j % 2), keys 16 kc + 8 (j / 2) + 2 t4 + {0, 1}.
    pack_a_fragments<kBF16>(s, pa);
    if (e & 2u) {
      // The tail tile: its V rows past Sk hold what follows the sequence in memory (any bits);
      // zeroed, so that their p = 0 adds exactly nothing. Generic stores by the first consumer
      // warpgroup, published to wgmma by fence.proxy.async before either warpgroup reads V.
      if (wg == 0) {
        zero_tile_rows<kBN, Traits::kColBlocks, 128>(sV + stage * Traits::kKvBytes, Sk - k0, tid);
        fence_proxy_async();
      }
      named_sync(1, kConsumerThreads);
    }
    if constexpr (Traits::kOverlap) {
      held = stage;
    } else {
      wgmma_fence();
      issue_pv(stage);
      wgmma_wait<0>();
      release(stage);
    }
    return true;
  };

  mbar_wait(q_bar, 0);
  if (wg == 1) end_turn();
  if (tile.template operator()<false>(0)) {
    for (int it = 1; tile.template operator()<Traits::kOverlap>(it); ++it) {
    }
  }
  if (held >= 0) {  // the last tile's P V
    wait_turn();
    wgmma_fence();
    issue_pv(held);
    end_turn();
    wgmma_wait<0>();
    release(held);
  }
  if (wg == 0) wait_turn();  // takes the other warpgroup's last end_turn

  // Epilogue: o = acc / l, lse = m + log(l) (0 and -inf for a row that saw nothing).
  RA_UNROLL
  for (int r = 0; r < 2; ++r) {
    l[r] += shfl_xor(l[r], 1);
    l[r] += shfl_xor(l[r], 2);
    const int row = q0 + row0 + 8 * r;
    if (row >= Sq) continue;
    const OnlineRow<float> st{m[r], l[r]};
    const float inv_l = st.inv_l();
    float* dst = gO + static_cast<int64_t>(row) * p.out_strides.row;
    RA_UNROLL
    for (int nb = 0; nb < kD / 8; ++nb) {
      const int c = 8 * nb + 2 * t4;
      dst[c] = o[4 * nb + 2 * r] * inv_l;
      dst[c + 1] = o[4 * nb + 2 * r + 1] * inv_l;
    }
    if (t4 == 0) gL[row] = st.lse();
  }
}

}  // namespace sm90
}  // namespace cuda
}  // namespace ring_attn
