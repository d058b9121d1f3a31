// The steps the Hopper backward kernels (sm90_bwd_kernel.cuh dK/dV, sm90_dq_kernel.cuh dQ) share
// beyond the pipeline (sm90_pipeline.cuh): the consumers' products of two tiles over the head dim
// (S and dP) and their softmax gradient on a wgmma accumulator fragment of scores:
//   P = exp(scale S - lse)       (partial tiles: 0 where a query row does not see a key)
//   dS = scale P (dP - delta)
// (P and dS then become register-A fragments by sm90_primitives.cuh pack_a_fragments).
// The fragment is either S^T (kKeyRows: its rows are keys, its columns query rows, as in the dK/dV
// kernel) or S (its rows are query rows, as in the dQ kernel). Accumulator register i of a thread
// (sm90_primitives.cuh) lies in the thread's fragment row (i / 2) % 2 of two and column
// 8 (i / 4) + 2 t4 + i % 2 (t4 = lane % 4): a thread keeps its two rows' values in registers and
// reads its columns' from shared memory.
#pragma once

#include <cstdint>
#include <type_traits>

#include "core/mask.h"
#include "cuda/primitives.cuh"
#include "cuda/sm90_pipeline.cuh"
#include "cuda/sm90_primitives.cuh"
#include "cuda/warp_mma.cuh"

namespace ring_attn {
namespace cuda {
namespace sm90 {

// acc = A B^T (64 x kN) over the head dim kD, both operands K-major in shared memory as the TMA
// boxes land (64-column blocks of kARows, kBRows rows x 128 bytes, 128-byte swizzled): A's 64
// rows start at a, B's kN rows at b (each step's descriptors one add from the first). wgmma
// issued, neither fenced nor committed.
template <bool kBF16, int kN, int kD, int kARows, int kBRows>
RA_DEV void issue_head_dim_product(float (&acc)[kN / 2], const char* a, const char* b) {
  const uint64_t desc_a = smem_desc(a, 16, 1024), desc_b = smem_desc(b, 16, 1024);
  RA_UNROLL
  for (int kc = 0; kc < kD / 16; ++kc) {
    const uint32_t a_off = (kc / 4) * kARows * 128 + (kc % 4) * 32;
    const uint32_t b_off = (kc / 4) * kBRows * 128 + (kc % 4) * 32;
    wgmma_ss<kBF16, kN, false, false>(acc, desc_advance(desc_a, a_off), desc_advance(desc_b, b_off),
                                      kc > 0);
  }
}

// S = A B^T, then dP = dA dB^T as a second wgmma group, so that P can be computed once S is in
// (wgmma_wait<1>: groups complete in order) while dP still runs: the head-dim products of
// issue_head_dim_product with the operand pairs (a, b) and (da, db), fenced and committed.
template <bool kBF16, int kN, int kD, int kARows, int kBRows>
RA_DEV void issue_scores_and_dprobs(float (&s)[kN / 2], float (&dp)[kN / 2], const char* a,
                                    const char* b, const char* da, const char* db) {
  wgmma_fence();
  issue_head_dim_product<kBF16, kN, kD, kARows, kBRows>(s, a, b);
  wgmma_commit();
  issue_head_dim_product<kBF16, kN, kD, kARows, kBRows>(dp, da, db);
  wgmma_commit();
}

// acc += A B (64 x kN) over kSteps k16 steps: A from registers (step kc's fragment a[kc]), B
// MN-major in shared memory (64-column blocks of kBRows rows x 128 bytes, LBO apart), step kc at
// its row 16 kc from b (each step's descriptor one add from the first). wgmma issued, neither
// fenced nor committed.
template <bool kBF16, int kN, int kSteps, int kBRows>
RA_DEV void issue_register_a_product(float (&acc)[kN / 2], const uint32_t (&a)[kSteps][4],
                                     const char* b) {
  const uint64_t desc_b = smem_desc(b, kBRows * 128, 1024);
  RA_UNROLL
  for (int kc = 0; kc < kSteps; ++kc) {
    wgmma_rs<kBF16, kN, true>(acc, a[kc], desc_advance(desc_b, kc * 16 * 128), true);
  }
}

// The index of accumulator register i's query row among a thread's values of the query rows:
// the row half (0, 1) in S, the column (0 .. N - 1) in S^T.
template <bool kKeyRows>
RA_DEV int query_of(int i, int t4) {
  return kKeyRows ? 8 * (i / 4) + 2 * t4 + i % 2 : (i / 2) % 2;
}

// P = exp(scale S - lse) in place over the kRegs accumulator registers of scores s:
// exp2(s exp2_mul - lse2) with exp2_mul = scale log2(e) and lse2 the query rows' lse in exp2 units.
template <bool kKeyRows, int kRegs>
RA_DEV void probs_from_scores(float (&s)[kRegs], float exp2_mul, const float* lse2, int t4) {
  RA_UNROLL
  for (int i = 0; i < kRegs; ++i) {
    s[i] = fast_exp2(fmaf(s[i], exp2_mul, -lse2[query_of<kKeyRows>(i, t4)]));
  }
}

// A partial tile's p = 0 where the query row does not see the key (core/mask.h is_visible). The
// rows' values are the thread's two (kKeyRows: the keys' positions; else the query rows' bounds),
// the columns' are read from shared memory, each once (kKeyRows: the query rows' bounds; else the
// keys' positions).
template <bool kKeyRows, int kRegs>
RA_DEV void mask_probs(float (&p)[kRegs],
                       const std::conditional_t<kKeyRows, int32_t, PositionRange32> (&rows)[2],
                       const std::conditional_t<kKeyRows, PositionRange32, int32_t>* cols, int t4) {
  RA_UNROLL
  for (int c = 0; c < kRegs / 2; ++c) {  // this thread's columns 8 (c / 2) + 2 t4 + c % 2
    const auto col = cols[8 * (c / 2) + 2 * t4 + c % 2];
    RA_UNROLL
    for (int r = 0; r < 2; ++r) {
      const int i = 4 * (c / 2) + 2 * r + c % 2;
      bool seen;
      if constexpr (kKeyRows) {
        seen = is_visible(col, rows[r]);
      } else {
        seen = is_visible(rows[r], col);
      }
      p[i] = seen ? p[i] : 0.f;
    }
  }
}

// p = 0 for the keys at or beyond `valid` of a tail tile. Their K and V rows are zeros, but their
// p = exp(-lse) is not: for a row with lse < 0 it can overflow dS in 16 bits (or P in fp32), and
// inf times the zero K row is NaN in dQ. kKeyRows: the thread's rows are the keys (key0 and
// key0 + 8 of the tile); else its columns 8 (i / 4) + 2 t4 + i % 2 are.
template <bool kKeyRows, int kRegs>
RA_DEV void zero_probs_beyond(float (&p)[kRegs], int valid, int key0, int t4) {
  RA_UNROLL
  for (int i = 0; i < kRegs; ++i) {
    const int key = kKeyRows ? key0 + 8 * ((i / 2) % 2) : 8 * (i / 4) + 2 * t4 + i % 2;
    p[i] = key < valid ? p[i] : 0.f;
  }
}

// dS = scale P (dP - delta) in place over the accumulator registers of dP, from P's:
// p (dp scale - delta_s) with delta_s the query rows' scale delta.
template <bool kKeyRows, int kRegs>
RA_DEV void ds_from_probs(float (&dp)[kRegs], const float (&p)[kRegs], float scale,
                          const float* delta_s, int t4) {
  RA_UNROLL
  for (int i = 0; i < kRegs; ++i) {
    dp[i] = p[i] * fmaf(dp[i], scale, -delta_s[query_of<kKeyRows>(i, t4)]);
  }
}

}  // namespace sm90
}  // namespace cuda
}  // namespace ring_attn
