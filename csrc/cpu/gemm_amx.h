// The tile GEMMs on the AMX tile unit (block_attn_amx.inc), behind the interface of
// tile_gemms.h: AmxFwdGemms and AmxBwdGemms, for float32 and bfloat16 inputs. Everything else
// (masks, softmax, merge) stays with the AVX-512 tile kernels. Defined where this build has the
// AMX intrinsics (RA_CPU_AMX); isa.h amx_usable() says whether the CPU may run them.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <cstdint>
#include <type_traits>

#include "core/params.h"
#include "core/rounding.h"
#include "cpu/operand_layout.h"
#include "cpu/scratch.h"
#include "cpu/tuning.h"
#include "cpu/x86.h"

#if RA_CPU_AMX
namespace ring_attn {
namespace cpu {

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx512bf16,amx-tile,amx-bf16,avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx512bf16,amx-tile,amx-bf16,avx2,fma")
#endif
namespace amx {
#include "cpu/block_attn_amx.inc"
}  // namespace amx
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

// Head dims up to this take the AMX path (its packing rows live on the stack).
constexpr int64_t kAmxMaxHeadDim = 512;

// The AMX backends' common parts. The tile state is live only while a task runs: configured at
// its start, released at its end.
// Both hold the heads and the bf16 planes the inputs and P / dS are split into.
class AmxGemmsBase {
 public:
  using acc_t = float;
  static constexpr bool kScoresGiveRowMax = false;  // the tile unit has no max
  static constexpr int64_t kRowAlign = 16;          // tiles of 16 rows
  void begin_task() const { amx::configure(); }
  void end_task() const { amx::release(); }

 protected:
  AmxGemmsBase(const BlockShape& shape, amx::Planes planes)
      : nheads_(shape.nheads), nheads_kv_(shape.nheads_kv), planes_(planes) {}

  int64_t nheads_, nheads_kv_;
  amx::Planes planes_;
};

// Forward: Q rows, K groups and V pairs (block_attn_amx.inc Layout); P is split into
// planes.p_fwd bf16 planes per block.
template <typename scalar_t>
class AmxFwdGemms : public AmxGemmsBase {
 public:
  static constexpr bool kGradTilesTransposed = false;
  static constexpr bool kFullTileOneBlock = false;
  static int64_t plane_elems(int64_t block_q, int64_t block_k) {
    return amx::kPPlanes * block_q * round_up<int64_t>(block_k, 32);
  }

  AmxFwdGemms(const BlockFwdParams& p, float scale2, const Tuning&)
      : AmxGemmsBase(p.shape, amx::planes_for<scalar_t>(p.fp32_precision)),
        operands_(amx::pack_fwd<scalar_t>(p, scale2, kPackQ, kPackK, kPackV)) {}

  // bf16 inputs: S comes out unscaled and the softmax applies the scale (returned) on the fly.
  float scores(int64_t b, int64_t h, int64_t hk, int64_t row0, int64_t nr, int64_t key0,
               int64_t ncolp, float* s, int64_t lds, float*) const {
    const bool scale_in_softmax = operands_.q.post_scale > 0.f;
    amx::rows_by_groups(operands_.q, operands_.q.head(b * nheads_ + h), operands_.k,
                        operands_.k.head(b * nheads_kv_ + hk), row0, round_up<int64_t>(nr, 16),
                        key0, ncolp, s, lds, !scale_in_softmax);
    return scale_in_softmax ? operands_.q.post_scale : 1.f;
  }

  void add_pv(int64_t b, int64_t hk, int64_t key0, int64_t nr, int64_t ncol, const float* p,
              int64_t lds, float* o, int64_t ldo, uint16_t* planes) const {
    amx::split_by_pairs(p, lds, nr, round_up<int64_t>(nr, 16), ncol, planes_.p_fwd, planes,
                        operands_.v, operands_.v.head(b * nheads_kv_ + hk), key0, o, ldo);
  }

 private:
  amx::FwdOperands operands_;
};

// Backward: dK and dV of a key tile build up transposed (dK^T = Q^T dS, dV^T = dO^T P: the
// queries become the tile unit's depth). Operands: Q rows (scores, amx::pack_scores_q), dO rows
// (dP), K and V groups (scores, dP), K pairs (dQ), Q^T and dO^T (dK^T, dV^T).
template <typename scalar_t>
class AmxBwdGemms : public AmxGemmsBase {
 public:
  static constexpr bool kGradTilesTransposed = true;
  static constexpr bool kFullTileOneBlock = true;
  // The bf16 planes of dS rows (dQ) or of P / dS row pairs (dV^T, dK^T), one at a time.
  static int64_t plane_elems(int64_t block_q, int64_t block_k) {
    return amx::kMaxPlanes * round_up<int64_t>(block_q, 32) *
           std::max(round_up<int64_t>(block_k, 32), kSubCols);
  }

  AmxBwdGemms(const BlockBwdParams& p, float scale2, const Tuning& tuning)
      : AmxGemmsBase(p.shape, amx::planes_for<scalar_t>(p.fp32_precision)),
        block_k_(tuning.bwd_k) {
    using amx::Layout;
    using In = const scalar_t*;
    const BlockShape& sh = p.shape;
    const int64_t B = sh.batch, Sq = sh.seqlen_q, Sk = sh.seqlen_k, H = sh.nheads;
    const int64_t D = sh.headdim, Hkv = sh.nheads_kv;
    const int in = planes_.input;
    q_rows_ = amx::pack_scores_q(In(p.q), p.q_strides, B, Sq, H, D, scale2, in, kPackQ);
    dout_rows_ =
        amx::pack(In(p.dout), p.dout_strides, B, Sq, H, D, 1.f, in, Layout::kRows, kPackO);
    k_groups_ = amx::pack(In(p.k), p.k_strides, B, Sk, Hkv, D, 1.f, in, Layout::kGroups, kPackK);
    v_groups_ = amx::pack(In(p.v), p.v_strides, B, Sk, Hkv, D, 1.f, in, Layout::kGroups, kPackV);
    k_pairs_ =
        amx::pack(In(p.k), p.k_strides, B, Sk, Hkv, D, 1.f, in, Layout::kPairs, kPackKRows);
    q_transposed_ =
        amx::pack(In(p.q), p.q_strides, B, Sq, H, D, 1.f, in, Layout::kTransposed, kPackQT);
    dout_transposed_ = amx::pack(In(p.dout), p.dout_strides, B, Sq, H, D, 1.f, in,
                                 Layout::kTransposed, kPackOT);
  }

  void scores(int64_t b, int64_t h, int64_t hk, int64_t row0, int64_t nr, int64_t key0,
              int64_t ncolp, float* s, int64_t lds) const {
    amx::rows_by_groups(q_rows_, q_rows_.head(b * nheads_ + h), k_groups_,
                        k_groups_.head(b * nheads_kv_ + hk), row0, round_up<int64_t>(nr, 16),
                        key0, ncolp, s, lds);
  }

  void dprobs(int64_t b, int64_t h, int64_t hk, int64_t row0, int64_t nr, int64_t key0,
              int64_t ncolp, float* dp, int64_t lds) const {
    amx::rows_by_groups(dout_rows_, dout_rows_.head(b * nheads_ + h), v_groups_,
                        v_groups_.head(b * nheads_kv_ + hk), row0, round_up<int64_t>(nr, 16),
                        key0, ncolp, dp, lds);
  }

  void add_dq(int64_t b, int64_t hk, int64_t key0, int64_t nr, int64_t ncol, const float* ds,
              int64_t lds, float* dq, int64_t ldq, uint16_t* planes) const {
    amx::split_by_pairs(ds, lds, nr, round_up<int64_t>(nr, 16), ncol, planes_.ds, planes,
                        k_pairs_, k_pairs_.head(b * nheads_kv_ + hk), key0, dq, ldq);
  }

  // Key columns [col, col + ncol) of the key tile's dV^T and dK^T (Dp x block_k) += dO^T P and
  // Q^T dS over query rows [row0, row0 + nr); block_cols: the keys of the block the caller steps
  // by (the plane layout's width).
  void add_dv_dk(int64_t b, int64_t h, int64_t row0, int64_t nr, int64_t col, int64_t ncol,
                 int64_t block_cols, const float* p, const float* ds, int64_t lds, float* dv_tile,
                 float* dk_tile, uint16_t* planes) const {
    const int64_t ldk = round_up<int64_t>(block_cols, 16);
    amx::transposed_by_split(dout_transposed_, dout_transposed_.head(b * nheads_ + h), row0, p,
                             lds, nr, ncol, planes_.p_bwd, planes, ldk, dv_tile + col, block_k_);
    amx::transposed_by_split(q_transposed_, q_transposed_.head(b * nheads_ + h), row0, ds, lds,
                             nr, ncol, planes_.ds, planes, ldk, dk_tile + col, block_k_);
  }

 private:
  int64_t block_k_;
  amx::Packed q_rows_, dout_rows_, k_groups_, v_groups_, k_pairs_, q_transposed_,
      dout_transposed_;
};

}  // namespace cpu
}  // namespace ring_attn
#endif  // RA_CPU_AMX
