// The tile GEMMs of the CPU kernels behind one interface, so that the forward and backward
// (block_attn_cpu.cpp) are written once for every backend: VectorFwdGemms / VectorBwdGemms here
// run them on the vector units (TileOps: the generic, avx2 or avx512 Tiles<acc_t> of
// tile_kernels.h), AmxFwdGemms / AmxBwdGemms (gemm_amx.h) on the AMX tile unit.
//
// A backend packs its operands when constructed (once per call, in the calling thread's scratch)
// and offers, for a block of query rows [row0, row0 + nr) of query head (b, h) and keys
// [key0, key0 + ncol) of K/V head (b, hk):
//   forward:  scores  S = log2(e) * scale * Q K^T   (returns the factor the softmax still applies)
//             add_pv  O += P V
//   backward: scores  S as above;  dprobs  dP = dO V^T;  add_dq  dQ += dS K;
//             add_dv_dk  dV += P^T dO, dK += dS^T Q  (into the key tile's gradient tiles)
// begin_task() / end_task() bracket each task on its thread. The static members say how the
// rest of the kernel has to work with it:
//   kScoresGiveRowMax    the score pass can produce the row maxima (unmasked full blocks)
//   kRowAlign            the GEMMs write rows in multiples of this (scratch rows are padded)
//   kGradTilesTransposed the key tile's dK / dV build up transposed (head dim x keys, ld block_k)
//                        rather than as rows (keys x head dim, ld Dp)
//   kFullTileOneBlock    dV / dK of a full tile take one add_dv_dk over all its keys (else per
//                        kSubCols keys)
//   plane_elems(bq, bk)  uint16 scratch per task for operands split into bf16 planes
#pragma once

#include <cstdint>

#include "core/params.h"
#include "core/rounding.h"
#include "cpu/operand_layout.h"
#include "cpu/scratch.h"
#include "cpu/tuning.h"

namespace ring_attn {
namespace cpu {

// The vector backends' common parts: the interface's constants, the score scale, the head dim
// (padded to the vector width) and the GEMM depth.
template <class TileOps>
class VectorGemmsBase {
 public:
  using acc_t = typename TileOps::T;
  static constexpr bool kScoresGiveRowMax = true;
  static constexpr int64_t kRowAlign = 1;
  static constexpr bool kGradTilesTransposed = false;
  static constexpr bool kFullTileOneBlock = false;
  static int64_t plane_elems(int64_t, int64_t) { return 0; }
  void begin_task() const {}
  void end_task() const {}

 protected:
  VectorGemmsBase(const BlockShape& shape, acc_t scale2, const Tuning& tuning)
      : scale2_(scale2),
        headdim_(shape.headdim),
        padded_headdim_(round_up<int64_t>(shape.headdim, TileOps::W)),
        nheads_kv_(shape.nheads_kv),
        depth_chunk_(tuning.kc) {}

  acc_t scale2_;
  int64_t headdim_, padded_headdim_, nheads_kv_, depth_chunk_;
};

template <class TileOps, typename scalar_t>
class VectorFwdGemms : public VectorGemmsBase<TileOps> {
  using Base = VectorGemmsBase<TileOps>;
  using Base::scale2_, Base::headdim_, Base::padded_headdim_, Base::nheads_kv_, Base::depth_chunk_;

 public:
  using acc_t = typename TileOps::T;

  VectorFwdGemms(const BlockFwdParams& p, acc_t scale2, const Tuning& tuning)
      : Base(p.shape, scale2, tuning) {
    const BlockShape& sh = p.shape;
    using In = const scalar_t*;
    q_rows_ = head_rows<scalar_t, acc_t>(In(p.q), p.q_strides, sh.batch, sh.seqlen_q, sh.nheads,
                                         headdim_, headdim_, kPackQ);
    k_transposed_ = pack_panels<scalar_t, acc_t>(In(p.k), p.k_strides, sh.batch, sh.seqlen_k,
                                                 nheads_kv_, headdim_, TileOps::kPanel, kPackK);
    k_head_stride_ = cdiv<int64_t>(sh.seqlen_k, TileOps::kPanel) * headdim_ * TileOps::kPanel;
    v_rows_ = head_rows<scalar_t, acc_t>(In(p.v), p.v_strides, sh.batch, sh.seqlen_k, nheads_kv_,
                                         headdim_, padded_headdim_, kPackV);
  }

  // S (nr x ncolp, ld lds); ncolp a multiple of the vector width; rowmax as Tiles::scores.
  acc_t scores(int64_t b, int64_t h, int64_t hk, int64_t row0, int64_t nr, int64_t key0,
               int64_t ncolp, acc_t* s, int64_t lds, acc_t* rowmax) const {
    const acc_t* k_head = k_transposed_ + (b * nheads_kv_ + hk) * k_head_stride_;
    TileOps::scores(nr, ncolp, headdim_, scale2_, q_rows_.ptr(b, h) + row0 * q_rows_.ld,
                    q_rows_.ld, k_head + key0 * headdim_, s, lds, rowmax);
    return acc_t(1);
  }

  // O (nr x Dp, ld ldo) += P (nr x ncol, ld lds) V.
  void add_pv(int64_t b, int64_t hk, int64_t key0, int64_t nr, int64_t ncol, const acc_t* p,
              int64_t lds, acc_t* o, int64_t ldo, uint16_t*) const {
    TileOps::gemm_nn(nr, padded_headdim_, ncol, acc_t(1), p, lds,
                     v_rows_.ptr(b, hk) + key0 * v_rows_.ld, v_rows_.ld, 1, o, ldo, true, nullptr,
                     depth_chunk_);
  }

 private:
  HeadRows<acc_t> q_rows_{}, v_rows_{};
  const acc_t* k_transposed_ = nullptr;  // K^T in panels (operand_layout.h pack_panels)
  int64_t k_head_stride_ = 0;
};

// Its head is VectorFwdGemms': a class template sees its base's members only through
// using-declarations.
template <class TileOps, typename scalar_t>
class VectorBwdGemms : public VectorGemmsBase<TileOps> {
  using Base = VectorGemmsBase<TileOps>;
  using Base::scale2_, Base::headdim_, Base::padded_headdim_, Base::nheads_kv_, Base::depth_chunk_;

 public:
  using acc_t = typename TileOps::T;

  VectorBwdGemms(const BlockBwdParams& p, acc_t scale2, const Tuning& tuning)
      : Base(p.shape, scale2, tuning) {
    const BlockShape& sh = p.shape;
    const int64_t B = sh.batch, Sq = sh.seqlen_q, Sk = sh.seqlen_k, H = sh.nheads;
    const int64_t D = headdim_, Dp = padded_headdim_, Hkv = nheads_kv_;
    using In = const scalar_t*;
    q_rows_ = head_rows<scalar_t, acc_t>(In(p.q), p.q_strides, B, Sq, H, D, Dp, kPackQ);
    dout_rows_ = head_rows<scalar_t, acc_t>(In(p.dout), p.dout_strides, B, Sq, H, D, Dp, kPackO);
    k_rows_ = head_rows<scalar_t, acc_t>(In(p.k), p.k_strides, B, Sk, Hkv, D, Dp, kPackKRows);
    k_transposed_ =
        pack_panels<scalar_t, acc_t>(In(p.k), p.k_strides, B, Sk, Hkv, D, TileOps::kPanel, kPackK);
    v_transposed_ =
        pack_panels<scalar_t, acc_t>(In(p.v), p.v_strides, B, Sk, Hkv, D, TileOps::kPanel, kPackV);
    kv_head_stride_ = cdiv<int64_t>(Sk, TileOps::kPanel) * D * TileOps::kPanel;
  }

  void scores(int64_t b, int64_t h, int64_t hk, int64_t row0, int64_t nr, int64_t key0,
              int64_t ncolp, acc_t* s, int64_t lds) const {
    TileOps::scores(nr, ncolp, headdim_, scale2_, q_rows_.ptr(b, h) + row0 * q_rows_.ld,
                    q_rows_.ld, transposed_head(k_transposed_, b, hk) + key0 * headdim_, s, lds,
                    nullptr);
  }

  void dprobs(int64_t b, int64_t h, int64_t hk, int64_t row0, int64_t nr, int64_t key0,
              int64_t ncolp, acc_t* dp, int64_t lds) const {
    TileOps::scores(nr, ncolp, headdim_, acc_t(1), dout_rows_.ptr(b, h) + row0 * dout_rows_.ld,
                    dout_rows_.ld, transposed_head(v_transposed_, b, hk) + key0 * headdim_, dp,
                    lds, nullptr);
  }

  // dQ (nr x Dp, ld ldq) += dS (nr x ncol, ld lds) K.
  void add_dq(int64_t b, int64_t hk, int64_t key0, int64_t nr, int64_t ncol, const acc_t* ds,
              int64_t lds, acc_t* dq, int64_t ldq, uint16_t*) const {
    TileOps::gemm_nn(nr, padded_headdim_, ncol, acc_t(1), ds, lds,
                     k_rows_.ptr(b, hk) + key0 * k_rows_.ld, k_rows_.ld, 1, dq, ldq, true,
                     nullptr, depth_chunk_);
  }

  // Key columns [col, col + ncol) of the key tile's dV and dK rows (ld Dp) += P^T dO and dS^T Q
  // over query rows [row0, row0 + nr) (P and dS: nr x ncol, ld lds).
  void add_dv_dk(int64_t b, int64_t h, int64_t row0, int64_t nr, int64_t col, int64_t ncol,
                 int64_t, const acc_t* p, const acc_t* ds, int64_t lds, acc_t* dv_tile,
                 acc_t* dk_tile, uint16_t*) const {
    const int64_t Dp = padded_headdim_;
    TileOps::gemm_tn(ncol, Dp, nr, acc_t(1), p, lds, dout_rows_.ptr(b, h) + row0 * dout_rows_.ld,
                     dout_rows_.ld, 1, dv_tile + col * Dp, Dp, true, nullptr, depth_chunk_);
    TileOps::gemm_tn(ncol, Dp, nr, acc_t(1), ds, lds, q_rows_.ptr(b, h) + row0 * q_rows_.ld,
                     q_rows_.ld, 1, dk_tile + col * Dp, Dp, true, nullptr, depth_chunk_);
  }

 private:
  const acc_t* transposed_head(const acc_t* x, int64_t b, int64_t hk) const {
    return x + (b * nheads_kv_ + hk) * kv_head_stride_;
  }

  HeadRows<acc_t> q_rows_{}, dout_rows_{}, k_rows_{};
  const acc_t* k_transposed_ = nullptr;  // K^T and V^T in panels (operand_layout.h pack_panels)
  const acc_t* v_transposed_ = nullptr;
  int64_t kv_head_stride_ = 0;
};

}  // namespace cpu
}  // namespace ring_attn
