// CPU block attention, flash-attention style: per (query tile, key tile) the scores
// S = scale * Q K^T (the row maxima come out of the same pass on full tiles), the online softmax
// (base 2), and O += P V (forward), or the five products of the gradients (backward). Tiles are
// classified once per call (mask_plan.h): skipped tiles cost nothing, full tiles carry no
// per-element mask work, partial tiles are worked in sub-tiles, each computing only the keys its
// rows may see and masking with vector compares of the key positions only where needed.
//
// The forward and backward are written once over two kinds of parts:
//   TileOps  the tile kernels of one vector instruction set (tile_kernels.h: portable, AVX2+FMA
//            or AVX-512): mask, softmax passes, dS, and the vector GEMMs;
//   Gemms    the tile GEMMs' backend (tile_gemms.h): the vector units (VectorFwdGemms /
//            VectorBwdGemms over TileOps) or, where the CPU has AMX-BF16, the AMX tile unit
//            (gemm_amx.h): bfloat16 inputs always, float32 inputs when
//            torch.set_float32_matmul_precision allows it ("high": operands split into three bf16
//            planes; "medium": one).
// isa.h picks the instruction set at the first call (RING_ATTN_CPU_KERNEL caps it, env.h); the
// rest of this file is compiled for the build's baseline, so the library runs on any x86-64 and
// is fast where AVX-512 is available. Operand copies: operand_layout.h (vector) and
// block_attn_amx.inc (AMX); scratch memory: scratch.h; threads: task_pool.h.
//
// Determinism: every output element is written by exactly one task, and tasks compute in a fixed
// order, so results are bitwise reproducible from run to run at a given thread count. (Backward
// splits the keys of a head over tasks when there are few heads per thread; the dq partials of the
// splits are then added in split order, so dq can differ in the last bits between thread counts.)
#include "cpu/block_attn_cpu.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "core/mask.h"
#include "core/merge.h"
#include "core/rounding.h"
#include "cpu/env.h"
#include "cpu/gemm_amx.h"
#include "cpu/isa.h"
#include "cpu/mask_plan.h"
#include "cpu/operand_layout.h"
#include "cpu/scratch.h"
#include "cpu/task_pool.h"
#include "cpu/tile_gemms.h"
#include "cpu/tile_kernels.h"
#include "cpu/tuning.h"
#include "cpu/x86.h"

// ATen's at::parallel_for is a header template: with the OpenMP backend it only runs in parallel
// when this file itself is compiled with OpenMP (-fopenmp, CMake's OpenMP::OpenMP_CXX).
#if AT_PARALLEL_OPENMP && !defined(_OPENMP)
#warning "block_attn_cpu.cpp built without -fopenmp: the CPU kernels will run single-threaded"
#endif

namespace ring_attn {
namespace cpu {
namespace {

constexpr double kLog2e = 1.44269504088896340736;
constexpr double kLn2 = 0.693147180559945309417;

void check_shape(const BlockShape& s) {
  TORCH_CHECK(s.batch >= 0 && s.seqlen_q >= 0 && s.seqlen_k >= 0, "ring_attn cpu: negative size");
  TORCH_CHECK(s.headdim >= 1, "ring_attn cpu: headdim must be >= 1, got ", s.headdim);
  TORCH_CHECK(s.nheads >= 1 && s.nheads_kv >= 1 && s.nheads % s.nheads_kv == 0,
              "ring_attn cpu: nheads (", s.nheads, ") must be a multiple of nheads_kv (",
              s.nheads_kv, ")");
}

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------

template <class TileOps, typename scalar_t, class Gemms>
void fwd_impl(const BlockFwdParams& p) {
  using acc_t = typename TileOps::T;
  constexpr int64_t W = TileOps::W;
  const BlockShape& sh = p.shape;
  const int64_t B = sh.batch, Sq = sh.seqlen_q, Sk = sh.seqlen_k, H = sh.nheads, D = sh.headdim;
  const int64_t Hkv = sh.nheads_kv, group = H / Hkv;
  if (B == 0 || Sq == 0 || Sk == 0) return;  // nothing visible: the state is unchanged

  const Tuning& tiles = tuning();
  const int64_t Dp = round_up(D, W);
  // Smaller query tiles when there would be too few tasks to keep every thread busy.
  const int64_t nthreads = available_threads();
  const bool unmasked = !p.mask.causal && p.mask.window_left < 0 && p.mask.window_right < 0 &&
                        p.q_seg == nullptr;
  int64_t BQ = unmasked ? tiles.fwd_q_unmasked : tiles.fwd_q;
  while (nthreads > 1 && BQ > kSubRows && cdiv(Sq, BQ) * B * H < kTasksPerThread * nthreads)
    BQ = round_up(BQ / 2, kSubRows);
  const int64_t BK = tiles.fwd_k, score_ld = BK + kScorePad;
  const int64_t nqt = cdiv(Sq, BQ), nkt = cdiv(Sk, BK);
  const MaskPlan plan = mask_plan(p.mask, p.q_pos, p.q_seg, Sq, p.k_pos, Sk, BQ, BK);

  // Query tiles with at least one non-skipped key tile, the heaviest first; the others keep
  // their state untouched.
  std::vector<int64_t> work(static_cast<size_t>(nqt), 0);
  std::vector<int64_t> live_qt;
  for (int64_t qt = 0; qt < nqt; ++qt) {
    for (int64_t kt = 0; kt < nkt; ++kt) work[qt] += plan.kind(qt, kt) != TileKind::kSkip;
    if (work[qt] > 0) live_qt.push_back(qt);
  }
  if (live_qt.empty()) return;
  std::stable_sort(live_qt.begin(), live_qt.end(),
                   [&](int64_t a, int64_t b) { return work[a] > work[b]; });

  // The softmax runs in base 2: scores come out of the GEMM as log2(e) * scale * q.k, the running
  // max m is in those units, and lse = ln(2) * (m + log2(l)).
  const acc_t scale2 = static_cast<acc_t>(p.softmax_scale * kLog2e);
  const Gemms gemms(p, scale2, tiles);

  auto* out = static_cast<acc_t*>(p.out_acc);
  auto* lse = static_cast<acc_t*>(p.lse);

  struct Scratch {
    acc_t *s, *rowmax, *o, *m, *l;
    uint8_t* seen;
    SubTile* sub;
    uint16_t* planes;  // operands split into bf16 planes (AMX)
  };
  auto make_scratch = [&] {
    const int64_t plane_elems = Gemms::plane_elems(BQ, BK);
    const size_t bytes =
        Carver::bytes_for<acc_t>(BQ * score_ld) + Carver::bytes_for<acc_t>(BQ * W) +
        Carver::bytes_for<acc_t>(BQ * Dp) + 2 * Carver::bytes_for<acc_t>(BQ) +
        Carver::bytes_for<uint8_t>(BQ) + Carver::bytes_for<SubTile>(cdiv(BQ, kSubRows)) +
        Carver::bytes_for<uint16_t>(plane_elems);
    Carver c(kTileSlot, bytes);
    Scratch scratch;
    scratch.s = c.take<acc_t>(BQ * score_ld);
    scratch.rowmax = c.take<acc_t>(BQ * W);
    scratch.o = c.take<acc_t>(BQ * Dp);
    scratch.m = c.take<acc_t>(BQ);
    scratch.l = c.take<acc_t>(BQ);
    scratch.seen = c.take<uint8_t>(BQ);
    scratch.sub = c.take<SubTile>(cdiv(BQ, kSubRows));
    scratch.planes = c.take<uint16_t>(plane_elems);
    return scratch;
  };

  // Tasks of one head run back to back (its K^T and V panels stay warm in L2), heaviest first.
  const int64_t nlive = static_cast<int64_t>(live_qt.size());
  parallel_tasks(nlive * B * H, make_scratch, [&](int64_t task, Scratch& scratch) {
    const int64_t qt = live_qt[task % nlive];
    const int64_t bh = task / nlive;
    const int64_t b = bh / H, h = bh % H, hk = h / group;
    const int64_t q0 = qt * BQ, nq = std::min(BQ, Sq - q0);
    acc_t* S = scratch.s;
    acc_t* O = scratch.o;

    // Prologue: the running state (o, lse) as O = o, m = log2(e) * lse, l = 1 (l = 0, O = 0
    // when empty).
    acc_t* out_base =
        out + b * p.out_strides.batch + q0 * p.out_strides.row + h * p.out_strides.head;
    acc_t* lse_base = lse + b * p.lse_batch_stride + h * p.lse_head_stride + q0;
    for (int64_t i = 0; i < nq; ++i) {
      const OnlineRow<acc_t> state = OnlineRow<acc_t>::from_lse(lse_base[i]);
      scratch.m[i] = state.l > acc_t(0) ? state.m * acc_t(kLog2e) : state.m;
      scratch.l[i] = state.l;
      scratch.seen[i] = 0;
      acc_t* o = O + i * Dp;
      if (state.l > acc_t(0)) {
        std::memcpy(o, out_base + i * p.out_strides.row, sizeof(acc_t) * D);
        std::fill(o + D, o + Dp, acc_t(0));
      } else {
        std::fill(o, o + Dp, acc_t(0));
      }
    }

    // One block of rows [r0, r0 + nr) x columns [c0, c1) of the tile at key k0: scores, mask,
    // online softmax, O += P V. Row maxima come out of the score pass when every computed column
    // is a visible key (and the backend can).
    auto block = [&](int64_t k0, int64_t r0, int64_t nr, int64_t c0, int64_t c1, bool masked) {
      const int64_t ncol = c1 - c0, ncolp = round_up(ncol, W);
      acc_t* S_block = S + r0 * score_ld + c0;
      acc_t* rowmax =
          Gemms::kScoresGiveRowMax && !masked && ncol == ncolp ? scratch.rowmax : nullptr;
      const acc_t score_scale =
          gemms.scores(b, h, hk, q0 + r0, nr, k0 + c0, ncolp, S_block, score_ld, rowmax);
      if (masked)
        TileOps::mask(S_block, score_ld, nr, ncol, plan.bounds.data() + 2 * (q0 + r0),
                      p.k_pos + k0 + c0);
      if (!TileOps::fwd_softmax(S_block, score_ld, nr, ncol, rowmax, masked, scratch.m + r0,
                                scratch.l + r0, scratch.seen + r0, O + r0 * Dp, Dp, Dp,
                                score_scale))
        return;
      gemms.add_pv(b, hk, k0 + c0, nr, ncol, S_block, score_ld, O + r0 * Dp, Dp, scratch.planes);
    };

    int64_t last_kt = -1;
    for (int64_t kt = 0; kt < nkt; ++kt)
      if (plan.kind(qt, kt) != TileKind::kSkip) last_kt = kt;
    gemms.begin_task();
    for (int64_t kt = 0; kt < nkt; ++kt) {
      const TileKind kind = plan.kind(qt, kt);
      if (kind == TileKind::kSkip) continue;
      const int64_t k0 = kt * BK, nk = std::min(BK, Sk - k0);
      // The epilogue writes the output rows: fetch them while the last tile runs.
      if (kt == last_kt) prefetch_rows<true>(out_base, p.out_strides.row, nq, D);
      if (kind == TileKind::kFull) {
        block(k0, 0, nq, 0, nk, false);
      } else {
        const int64_t nsub = plan_partial(plan, q0, nq, k0, nk, scratch.sub);
        for (int64_t g = 0; g < nsub; ++g) {
          const SubTile& sub = scratch.sub[g];
          block(k0, sub.r0, sub.nr, sub.c0, sub.c1, sub.mask);
        }
      }
    }
    gemms.end_task();

    // Epilogue: the normalised output and lse of the rows that saw a key (the others keep their
    // state bit for bit); NaN where a score was NaN.
    for (int64_t i = 0; i < nq; ++i) {
      if (!scratch.seen[i]) continue;
      const acc_t l = scratch.l[i];
      const acc_t inv_l = l == acc_t(0) ? acc_t(0) : acc_t(1) / l;
      acc_t* o = out_base + i * p.out_strides.row;
      const acc_t* a = O + i * Dp;
      for (int64_t c = 0; c < D; ++c) o[c] = a[c] * inv_l;
      lse_base[i] = l == acc_t(0) ? neg_inf<acc_t>() : acc_t(kLn2) * (scratch.m[i] + std::log2(l));
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

// It opens as fwd_impl does (the sizes, the early exit when a block is empty): each pass names
// its own sizes so that its task loops read alone.
template <class TileOps, typename scalar_t, class Gemms>
void bwd_impl(const BlockBwdParams& p) {
  using acc_t = typename TileOps::T;
  constexpr int64_t W = TileOps::W;
  const BlockShape& sh = p.shape;
  const int64_t B = sh.batch, Sq = sh.seqlen_q, Sk = sh.seqlen_k, H = sh.nheads, D = sh.headdim;
  const int64_t Hkv = sh.nheads_kv, group = H / Hkv;
  if (B == 0 || Sq == 0 || Sk == 0) return;

  const Tuning& tiles = tuning();
  const int64_t Dp = round_up(D, W);
  const int64_t BQ = tiles.bwd_q, BK = tiles.bwd_k, score_ld = BK + kScorePad;
  const int64_t nqt = cdiv(Sq, BQ), nkt = cdiv(Sk, BK);
  const MaskPlan plan = mask_plan(p.mask, p.q_pos, p.q_seg, Sq, p.k_pos, Sk, BQ, BK);

  // Key tiles that meet at least one query tile.
  std::vector<int64_t> live_kt;
  for (int64_t kt = 0; kt < nkt; ++kt) {
    for (int64_t qt = 0; qt < nqt; ++qt) {
      if (plan.kind(qt, kt) != TileKind::kSkip) {
        live_kt.push_back(kt);
        break;
      }
    }
  }
  if (live_kt.empty()) return;
  const int64_t nlive = static_cast<int64_t>(live_kt.size());

  const acc_t scale = static_cast<acc_t>(p.softmax_scale);
  const acc_t scale2 = static_cast<acc_t>(p.softmax_scale * kLog2e);  // base-2 scores, see fwd
  const Gemms gemms(p, scale2, tiles);

  const auto* lse = static_cast<const acc_t*>(p.lse);
  const auto* delta = static_cast<const acc_t*>(p.delta);
  auto* dq = static_cast<acc_t*>(p.dq_acc);
  auto* dk = static_cast<acc_t*>(p.dk_acc);
  auto* dv = static_cast<acc_t*>(p.dv_acc);

  // Tasks own (batch, kv head, key split): the dk/dv rows of a task are disjoint from every other
  // task's. Each task accumulates dq of its query heads into a private dense partial (one per
  // split, zero-initialised) that is added into dq_acc at the end, in split order; dk/dv of a key
  // tile build up in a dense tile scratch and are added into dk_acc/dv_acc once per key tile.
  // Key splits cost a dq partial (the size of dq) each: split only until every thread has two
  // tasks (enough for dynamic scheduling to even out odd unit counts).
  const int64_t units = B * Hkv;
  const int64_t nthreads = available_threads();
  const int64_t nsplit =
      nthreads <= 1 ? 1 : std::min(nlive, std::max<int64_t>(1, cdiv(2 * nthreads, units)));
  const int64_t dq_rows = round_up(Sq, Gemms::kRowAlign);  // rows of a dq partial
  const int64_t dq_task_elems = group * dq_rows * Dp;
  auto* const dq_part = static_cast<acc_t*>(
      thread_scratch(kDqSlot, sizeof(acc_t) * units * nsplit * dq_task_elems));

  struct Scratch {
    acc_t *s, *dp, *dk, *dv;  // dk, dv: BK x Dp, or Dp x BK (Gemms::kGradTilesTransposed)
    SubTile* sub;
    uint16_t* planes;  // operands split into bf16 planes (AMX)
  };
  auto make_scratch = [&] {
    const int64_t plane_elems = Gemms::plane_elems(BQ, BK);
    const size_t bytes = 2 * Carver::bytes_for<acc_t>(BQ * score_ld) +
                         2 * Carver::bytes_for<acc_t>(BK * Dp) +
                         Carver::bytes_for<SubTile>(cdiv(BQ, kSubRows)) +
                         Carver::bytes_for<uint16_t>(plane_elems);
    Carver c(kTileSlot, bytes);
    Scratch scratch;
    scratch.s = c.take<acc_t>(BQ * score_ld);
    scratch.dp = c.take<acc_t>(BQ * score_ld);
    scratch.dk = c.take<acc_t>(BK * Dp);
    scratch.dv = c.take<acc_t>(BK * Dp);
    scratch.sub = c.take<SubTile>(cdiv(BQ, kSubRows));
    scratch.planes = c.take<uint16_t>(plane_elems);
    return scratch;
  };

  parallel_tasks(units * nsplit, make_scratch, [&](int64_t task, Scratch& scratch) {
    const int64_t unit = task / nsplit, split = task % nsplit;
    const int64_t b = unit / Hkv, hk = unit % Hkv;
    acc_t* S = scratch.s;
    acc_t* dP = scratch.dp;
    acc_t* dK_tile = scratch.dk;
    acc_t* dV_tile = scratch.dv;
    acc_t* dq_task = dq_part + task * dq_task_elems;
    std::memset(dq_task, 0, sizeof(acc_t) * dq_task_elems);
    gemms.begin_task();

    for (int64_t li = split; li < nlive; li += nsplit) {
      const int64_t kt = live_kt[li];
      const int64_t k0 = kt * BK, nk = std::min(BK, Sk - k0);
      bool touched = false;
      int64_t last_qt = -1;  // the last query tile to meet this key tile
      for (int64_t qt = 0; qt < nqt; ++qt)
        if (plan.kind(qt, kt) != TileKind::kSkip) last_qt = qt;

      for (int64_t g = 0; g < group; ++g) {
        const int64_t h = hk * group + g;
        const acc_t* lse_h = lse + b * p.row_stat_batch_stride + h * p.row_stat_head_stride;
        const acc_t* delta_h = delta + b * p.row_stat_batch_stride + h * p.row_stat_head_stride;
        acc_t* dq_h = dq_task + g * dq_rows * Dp;

        for (int64_t qt = 0; qt < nqt; ++qt) {
          const TileKind kind = plan.kind(qt, kt);
          if (kind == TileKind::kSkip) continue;
          const int64_t q0 = qt * BQ, nq = std::min(BQ, Sq - q0);
          int64_t nsub = 1;
          if (kind == TileKind::kFull) {
            scratch.sub[0] = SubTile{0, nq, 0, nk, false};
          } else {
            nsub = plan_partial(plan, q0, nq, k0, nk, scratch.sub);
            if (nsub == 0) continue;
          }
          if (!touched) {  // dK/dV of this key tile start at zero
            std::memset(dK_tile, 0, sizeof(acc_t) * BK * Dp);
            std::memset(dV_tile, 0, sizeof(acc_t) * BK * Dp);
            touched = true;
          }
          if (g == group - 1 && qt == last_qt) {  // dk_acc/dv_acc rows are updated next
            prefetch_rows<true>(dk + b * p.dk_strides.batch + k0 * p.dk_strides.row +
                                    hk * p.dk_strides.head,
                                p.dk_strides.row, nk, D);
            prefetch_rows<true>(dv + b * p.dv_strides.batch + k0 * p.dv_strides.row +
                                    hk * p.dv_strides.head,
                                p.dv_strides.row, nk, D);
          }
          for (int64_t gi = 0; gi < nsub; ++gi) {
            const SubTile& sub = scratch.sub[gi];
            const int64_t r0 = sub.r0, nr = sub.nr, c0 = sub.c0, ncol = sub.c1 - sub.c0;
            const int64_t ncolp = round_up(ncol, W);
            acc_t* S_block = S + r0 * score_ld + c0;
            acc_t* dP_block = dP + r0 * score_ld + c0;
            // P = exp(scale * Q K^T - lse) = 2^(scale2 * Q K^T - log2(e) * lse); 0 where masked
            // and on rows that saw nothing.
            gemms.scores(b, h, hk, q0 + r0, nr, k0 + c0, ncolp, S_block, score_ld);
            if (sub.mask)
              TileOps::mask(S_block, score_ld, nr, ncol, plan.bounds.data() + 2 * (q0 + r0),
                            p.k_pos + k0 + c0);
            TileOps::bwd_probs(S_block, score_ld, nr, ncol, lse_h + q0 + r0, sub.mask);
            // dP = dO V^T;  dS = scale * P * (dP - delta);  dQ += dS K
            gemms.dprobs(b, h, hk, q0 + r0, nr, k0 + c0, ncolp, dP_block, score_ld);
            TileOps::bwd_ds(S_block, dP_block, score_ld, nr, ncol, delta_h + q0 + r0, scale);
            gemms.add_dq(b, hk, k0 + c0, nr, ncol, dP_block, score_ld, dq_h + (q0 + r0) * Dp, Dp,
                         scratch.planes);
          }
          // dV += P^T dO;  dK += dS^T Q. Per block of kSubCols keys over the rows of the row groups
          // that computed it (all of them on a full tile, which some backends take in one block);
          // P and dS of a row group in between that did not (possible only for unsorted
          // positions) are zeroed first.
          const int64_t cstep = Gemms::kFullTileOneBlock && kind == TileKind::kFull ? nk : kSubCols;
          for (int64_t c = 0; c < nk; c += cstep) {
            int64_t first = -1, last = -1;
            for (int64_t gi = 0; gi < nsub; ++gi) {
              if (scratch.sub[gi].c0 <= c && c < scratch.sub[gi].c1) {
                if (first < 0) first = gi;
                last = gi;
              }
            }
            if (first < 0) continue;
            const int64_t ncol = std::min(cstep, nk - c);
            for (int64_t gi = first + 1; gi < last; ++gi) {
              const SubTile& sub = scratch.sub[gi];
              if (sub.c0 <= c && c < sub.c1) continue;
              for (int64_t i = sub.r0; i < sub.r0 + sub.nr; ++i) {
                std::fill(S + i * score_ld + c, S + i * score_ld + c + ncol, acc_t(0));
                std::fill(dP + i * score_ld + c, dP + i * score_ld + c + ncol, acc_t(0));
              }
            }
            const int64_t r0 = scratch.sub[first].r0;
            const int64_t nr = scratch.sub[last].r0 + scratch.sub[last].nr - r0;
            gemms.add_dv_dk(b, h, q0 + r0, nr, c, ncol, cstep, S + r0 * score_ld + c,
                            dP + r0 * score_ld + c, score_ld, dV_tile, dK_tile, scratch.planes);
          }
        }
      }
      if (!touched) continue;  // no query tile met this key tile in this kv group
      // dk_acc/dv_acc rows of this key tile += the tile's dK/dV.
      for (int64_t j = 0; j < nk; ++j) {
        const int64_t r = k0 + j;
        acc_t* dk_row = dk + b * p.dk_strides.batch + r * p.dk_strides.row + hk * p.dk_strides.head;
        acc_t* dv_row = dv + b * p.dv_strides.batch + r * p.dv_strides.row + hk * p.dv_strides.head;
        if constexpr (Gemms::kGradTilesTransposed) {  // column j
          for (int64_t c = 0; c < D; ++c) dk_row[c] += dK_tile[c * BK + j];
          for (int64_t c = 0; c < D; ++c) dv_row[c] += dV_tile[c * BK + j];
        } else {
          const acc_t* dk_src = dK_tile + j * Dp;
          const acc_t* dv_src = dV_tile + j * Dp;
          for (int64_t c = 0; c < D; ++c) dk_row[c] += dk_src[c];
          for (int64_t c = 0; c < D; ++c) dv_row[c] += dv_src[c];
        }
      }
    }
    gemms.end_task();
  });

  // dq_acc += the dq partials of all splits, in split order.
  const int64_t rows = B * H * Sq;
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / Dp), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t i = r % Sq, bh = r / Sq, b = bh / H, h = bh % H;
      const int64_t hk = h / group, g = h % group;
      acc_t* dst = dq + b * p.dq_strides.batch + i * p.dq_strides.row + h * p.dq_strides.head;
      if (i + kRowsAhead < Sq)
        prefetch_rows<true>(dst + kRowsAhead * p.dq_strides.row, p.dq_strides.row, 1, D);
      for (int64_t s = 0; s < nsplit; ++s) {
        const int64_t task = (b * Hkv + hk) * nsplit + s;
        const acc_t* src = dq_part + task * dq_task_elems + (g * dq_rows + i) * Dp;
        for (int64_t c = 0; c < D; ++c) dst[c] += src[c];
      }
    }
  });
}

// ---- dispatch --------------------------------------------------------------------------------

// The forward (Params = BlockFwdParams) or the backward pass as the dispatch runs it: on the
// vector GEMMs of one instruction set's TileOps, or on the AMX GEMMs (AVX-512 tiles around them).
template <class Params>
struct Pass {
  static constexpr bool kForward = std::is_same_v<Params, BlockFwdParams>;

  template <class TileOps, typename scalar_t>
  static void on_vector_units(const Params& p) {
    if constexpr (kForward) {
      fwd_impl<TileOps, scalar_t, VectorFwdGemms<TileOps, scalar_t>>(p);
    } else {
      bwd_impl<TileOps, scalar_t, VectorBwdGemms<TileOps, scalar_t>>(p);
    }
  }
#if RA_CPU_AMX
  template <typename scalar_t>
  static void on_amx(const Params& p) {
    if constexpr (kForward) {
      fwd_impl<avx512::Tiles<float>, scalar_t, AmxFwdGemms<scalar_t>>(p);
    } else {
      bwd_impl<avx512::Tiles<float>, scalar_t, AmxBwdGemms<scalar_t>>(p);
    }
  }
#endif
};

// The vector GEMMs of TileOps = Tiles<acc_t> of one instruction set, per input dtype.
template <template <typename> class Tiles, class Params>
void run_on_vector_units(const Params& p) {
  using P = Pass<Params>;
  switch (p.dtype) {
    case DType::kFloat32: return P::template on_vector_units<Tiles<float>, float>(p);
    case DType::kFloat64: return P::template on_vector_units<Tiles<double>, double>(p);
    case DType::kBFloat16: return P::template on_vector_units<Tiles<float>, c10::BFloat16>(p);
    case DType::kFloat16: return P::template on_vector_units<Tiles<float>, c10::Half>(p);
  }
  TORCH_CHECK(false, "ring_attn cpu block attention: unsupported dtype ", static_cast<int>(p.dtype));
}

// The AMX GEMMs, where usable, for float32 and bfloat16 inputs; float32 only at Fp32Precision
// kHigh (three bf16 planes per operand) or kMedium (one), since at kHighest (torch's default) it
// multiplies in float32 on AVX-512. Returns whether it ran.
template <class Params>
bool run_on_amx(const Params& p) {
#if RA_CPU_AMX
  using P = Pass<Params>;
  if (!amx_usable() || p.shape.headdim > kAmxMaxHeadDim) return false;
  switch (p.dtype) {
    case DType::kFloat32:
      if (p.fp32_precision == Fp32Precision::kHighest) return false;
      P::template on_amx<float>(p);
      return true;
    case DType::kBFloat16: P::template on_amx<c10::BFloat16>(p); return true;
    default: break;
  }
#endif
  (void)p;
  return false;
}

// One pass on the best instruction set this CPU has (isa.h).
template <class Params>
void run_pass(const Params& p) {
  check_shape(p.shape);
  switch (active_isa()) {
#if RA_CPU_X86
    case Isa::kAvx512:
      if (!run_on_amx(p)) run_on_vector_units<avx512::Tiles>(p);
      return;
    case Isa::kAvx2: return run_on_vector_units<avx2::Tiles>(p);
#endif
    default: return run_on_vector_units<generic::Tiles>(p);
  }
}

}  // namespace

void check_environment() {
  const std::string error = environment_error();
  TORCH_CHECK_VALUE(error.empty(), "ring attention: ", error);
}

void block_attn_fwd(const BlockFwdParams& p) { run_pass(p); }

void block_attn_bwd(const BlockBwdParams& p) { run_pass(p); }

// ---- measured FMA throughput ----------------------------------------------------------------

double fma_peak_gflops(double seconds) {
  float sink = 0.f;
  auto loop = [&](int64_t iters) {
    switch (active_isa()) {
#if RA_CPU_X86
      case Isa::kAvx512: return avx512::fma_loop(iters, &sink);
      case Isa::kAvx2: return avx2::fma_loop(iters, &sink);
#endif
      default: return generic::fma_loop(iters, &sink);
    }
  };
  using clock = std::chrono::steady_clock;
  loop(int64_t{1} << 16);  // wake the vector units (AVX-512 frequency licence)
  double flop = 0.0;
  const auto start = clock::now();
  double elapsed = 0.0;
  do {
    flop += loop(int64_t{1} << 20);
    elapsed = std::chrono::duration<double>(clock::now() - start).count();
  } while (elapsed < seconds);
  static volatile float observed;
  observed = sink;
  return flop / elapsed / 1e9;
}

const char* cpu_kernel_isa() {
  switch (active_isa()) {
    case Isa::kAvx512: return amx_usable() ? "avx512+amx" : "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "generic";
  }
}

}  // namespace cpu
}  // namespace ring_attn
