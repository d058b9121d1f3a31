// Warp-level GEMMs of the block kernels on mma.sync m16n8k16 fragments (primitives.cuh):
// fragment loads from shared-memory tiles (ldmatrix), the GEMM loops over them, and the stores of
// fp32 C fragments into 16-bit tiles (stmatrix on sm_90).
//
// Naming: a tile is "row-major" when its rows are the GEMM's m (for A) or n (for B) and its
// columns are k; "k-major" when its rows are k. Pitches are in 16-bit elements.
#pragma once

#include <cstdint>

#include "cuda/primitives.cuh"

// Loops that nvcc unrolls, and loops that it keeps rolled.
#if defined(RA_CUDA_EMULATE)
#define RA_UNROLL
#define RA_ROLLED
#else
#define RA_UNROLL _Pragma("unroll")
#define RA_ROLLED _Pragma("unroll 1")
#endif

namespace ring_attn {
namespace cuda {

// A fragment (rows row0..row0+15, k col0..col0+15) of a row-major tile.
template <int kPitch>
RA_DEV void load_a(uint32_t (&a)[4], const uint16_t* s, int row0, int col0, int lane) {
  ldmatrix_x4(a, s + (row0 + (lane % 8) + ((lane / 8) % 2) * 8) * kPitch + col0 + (lane / 16) * 8);
}

// A fragment (rows m0..m0+15, k k0..k0+15) of a k-major tile (A^T stored row-major).
template <int kPitch>
RA_DEV void load_a_trans(uint32_t (&a)[4], const uint16_t* s, int k0, int m0, int lane) {
  ldmatrix_x4<true>(a, s + (k0 + (lane / 16) * 8 + (lane % 8)) * kPitch + m0 + ((lane / 8) % 2) * 8);
}

// B fragments of n-blocks n0 (b[0], b[1]) and n0 + 8 (b[2], b[3]), k from k0, of a row-major
// (n-major) tile, as K in Q K^T.
template <int kPitch>
RA_DEV void load_b_nk(uint32_t (&b)[4], const uint16_t* s, int n0, int k0, int lane) {
  ldmatrix_x4(b, s + (n0 + (lane / 16) * 8 + (lane % 8)) * kPitch + k0 + ((lane / 8) % 2) * 8);
}

// The same from a k-major tile, as V in P V.
template <int kPitch>
RA_DEV void load_b_kn(uint32_t (&b)[4], const uint16_t* s, int k0, int n0, int lane) {
  ldmatrix_x4<true>(b, s + (k0 + ((lane / 8) % 2) * 8 + (lane % 8)) * kPitch + n0 + (lane / 16) * 8);
}

// The A fragment of a 16 x 16 block (columns 16j..16j+15) from the C fragments c[2j], c[2j+1],
// rounded to 16 bits.
template <bool kBF16, int N>
RA_DEV void c_to_a(uint32_t (&a)[4], const float (&c)[N][4], int j) {
  a[0] = pack2<kBF16>(c[2 * j][0], c[2 * j][1]);
  a[1] = pack2<kBF16>(c[2 * j][2], c[2 * j][3]);
  a[2] = pack2<kBF16>(c[2 * j + 1][0], c[2 * j + 1][1]);
  a[3] = pack2<kBF16>(c[2 * j + 1][2], c[2 * j + 1][3]);
}

template <int kMt, int kNb>
RA_DEV void zero(float (&c)[kMt][kNb][4]) {
  RA_UNROLL
  for (int mt = 0; mt < kMt; ++mt) {
    RA_UNROLL
    for (int nb = 0; nb < kNb; ++nb) c[mt][nb][0] = c[mt][nb][1] = c[mt][nb][2] = c[mt][nb][3] = 0.f;
  }
}

// c[mt][2j], c[mt][2j + 1] += a[mt] x (b[0], b[1]), (b[2], b[3]) for every m-tile: one B fragment
// pair feeding 2 kMt MMAs.
template <bool kBF16, int kMt, int kNb>
RA_DEV void mma_b_pair(float (&c)[kMt][kNb][4], int j, const uint32_t (&a)[kMt][4],
                       const uint32_t (&b)[4]) {
  RA_UNROLL
  for (int mt = 0; mt < kMt; ++mt) {
    mma_16816<kBF16>(c[mt][2 * j], a[mt], b[0], b[1]);
    mma_16816<kBF16>(c[mt][2 * j + 1], a[mt], b[2], b[3]);
  }
}

// c[mt][0 .. kNb) += a[mt] B for one k-chunk of 16: B rows b_k.. (k) and columns b_n0.. (n) of sb,
// row-major (kBKMajor: k-major), loaded one fragment pair at a time.
template <bool kBF16, bool kBKMajor, int kPitchB, int kMt, int kNb>
RA_DEV void mma_k_chunk(float (&c)[kMt][kNb][4], const uint32_t (&a)[kMt][4], const uint16_t* sb,
                        int b_n0, int b_k, int lane) {
  RA_UNROLL
  for (int j = 0; j < kNb / 2; ++j) {
    uint32_t b[4];
    if constexpr (kBKMajor) {
      load_b_kn<kPitchB>(b, sb, b_k, b_n0 + 16 * j, lane);
    } else {
      load_b_nk<kPitchB>(b, sb, b_n0 + 16 * j, b_k, lane);
    }
    mma_b_pair<kBF16>(c, j, a, b);
  }
}

// c (kMt m-tiles x kNb n-blocks) += A B over kKc k-chunks of 16, both from shared memory:
//   A: rows a_m0.., k a_k0.. of sa, row-major (kATrans: k-major);
//   B: n b_n0.., k b_k0.. of sb, row-major (kBKMajor: k-major).
template <bool kBF16, int kMt, int kNb, int kKc, bool kATrans, int kPitchA, bool kBKMajor,
          int kPitchB>
RA_DEV void warp_gemm(float (&c)[kMt][kNb][4], const uint16_t* sa, int a_m0, int a_k0,
                      const uint16_t* sb, int b_n0, int b_k0, int lane) {
  static_assert(kNb % 2 == 0, "n-blocks in pairs");
  RA_UNROLL
  for (int kc = 0; kc < kKc; ++kc) {
    uint32_t a[kMt][4];
    RA_UNROLL
    for (int mt = 0; mt < kMt; ++mt) {
      if constexpr (kATrans) {
        load_a_trans<kPitchA>(a[mt], sa, a_k0 + 16 * kc, a_m0 + 16 * mt, lane);
      } else {
        load_a<kPitchA>(a[mt], sa, a_m0 + 16 * mt, a_k0 + 16 * kc, lane);
      }
    }
    mma_k_chunk<kBF16, kBKMajor, kPitchB>(c, a, sb, b_n0, b_k0 + 16 * kc, lane);
  }
}

// The same with A held in registers as fragments a[kMt][kKc][4].
template <bool kBF16, int kMt, int kNb, int kKc, bool kBKMajor, int kPitchB>
RA_DEV void warp_gemm_reg_a(float (&c)[kMt][kNb][4], const uint32_t (&a)[kMt][kKc][4],
                            const uint16_t* sb, int b_n0, int b_k0, int lane) {
  RA_UNROLL
  for (int kc = 0; kc < kKc; ++kc) {
    uint32_t ak[kMt][4];
    RA_UNROLL
    for (int mt = 0; mt < kMt; ++mt) {
      RA_UNROLL
      for (int i = 0; i < 4; ++i) ak[mt][i] = a[mt][kc][i];
    }
    mma_k_chunk<kBF16, kBKMajor, kPitchB>(c, ak, sb, b_n0, b_k0 + 16 * kc, lane);
  }
}

// acc (kMt m-tiles x kNb n-blocks) += A B with A the fp32 C fragments a[kMt][2 kKc] (rounded to 16
// bits: P in P V, dS in dS K) and B rows b_k0.. (k), columns b_n0.. of a k-major tile.
template <bool kBF16, int kMt, int kNb, int kKc, int kPitchB, int kNbA>
RA_DEV void warp_gemm_frag_a(float (&acc)[kMt][kNb][4], const float (&a)[kMt][kNbA][4],
                             const uint16_t* sb, int b_k0, int b_n0, int lane) {
  static_assert(kNbA == 2 * kKc, "A fragments: two n-blocks per k-chunk");
  RA_UNROLL
  for (int kc = 0; kc < kKc; ++kc) {
    uint32_t ak[kMt][4];
    RA_UNROLL
    for (int mt = 0; mt < kMt; ++mt) c_to_a<kBF16>(ak[mt], a[mt], kc);
    mma_k_chunk<kBF16, true, kPitchB>(acc, ak, sb, b_n0, b_k0 + 16 * kc, lane);
  }
}

// The C fragments c (rows m0 + 16 mt.., columns n0 + 8 nb..) rounded to 16 bits into a row-major
// tile: one stmatrix per 16 x 16 block on sm_90, four 32-bit stores before.
template <bool kBF16, int kMt, int kNb, int kPitch>
RA_DEV void store_frags(const float (&c)[kMt][kNb][4], uint16_t* s, int m0, int n0, int lane) {
  RA_UNROLL
  for (int mt = 0; mt < kMt; ++mt) {
    RA_UNROLL
    for (int j = 0; j < kNb / 2; ++j) {
      uint32_t a[4];
      c_to_a<kBF16>(a, c[mt], j);
      if constexpr (kSm90) {
        stmatrix_x4(a, s + (m0 + 16 * mt + (lane % 8) + ((lane / 8) % 2) * 8) * kPitch + n0 +
                           16 * j + (lane / 16) * 8);
      } else {
        uint16_t* p = s + (m0 + 16 * mt + lane / 4) * kPitch + n0 + 16 * j + (lane % 4) * 2;
        *reinterpret_cast<uint32_t*>(p) = a[0];
        *reinterpret_cast<uint32_t*>(p + 8 * kPitch) = a[1];
        *reinterpret_cast<uint32_t*>(p + 8) = a[2];
        *reinterpret_cast<uint32_t*>(p + 8 * kPitch + 8) = a[3];
      }
    }
  }
}

}  // namespace cuda
}  // namespace ring_attn
