// The conformance cases of the sm_90a primitives (sm90_primitives.cuh): each primitive the Hopper
// kernels use, run once on fixed inputs, its raw results (accumulator registers in fragment order,
// shared-memory bytes after a TMA load) written to an output buffer. The same bodies run under
// the emulator (sm90_conformance_emu.cpp, which also checks them against a plain host reference)
// and on an sm_90a device (sm90_conformance_gpu.cu, which compares its bytes with the
// emulator's), so a difference between the emulator and the card shows up as differing bytes.
//
// Cases:
//   wgmma_ss / wgmma_rs  bf16 and fp16, N = 64, 128, 256: D = A[:, 0:16] B[:, 0:16].T, then
//     D += A[:, 16:32] B[:, 16:32].T (one commit group), A (64 x 32) and B (N x 32) written to
//     128-byte-swizzled shared memory with generic stores and fence.proxy.async; ss: both operands
//     K-major from shared memory (the forward's S = Q K^T), rs: A from registers and B MN-major
//     (the forward's O += P V). Inputs are k * 2^e (|k| <= 15, |e| <= 2), so every sum is exact
//     in float whatever the order of the additions: the bytes must match exactly.
//   wgmma_ss_mn  bf16 and fp16, N = 64, 128: the same D from both operands MN-major in shared
//     memory, laid out as the fused dQ's dQ = dS K reads dS (from the dS^T tile) and K: 128-byte-
//     swizzled tiles whose rows are the K dimension, 64-column blocks LBO apart, the second k16
//     step's descriptors reached by desc_advance.
//   stmatrix_x4  the fused dQ's store of dS^T: a warpgroup's register-A fragments of 64 keys x 64
//     rows, one stmatrix.x4 per warp and k16 step of rows at the kernel's XOR-ed addresses, into
//     a 128-byte-swizzled tile (key k, row m at swizzle(128 k + 2 m)); the tile's bytes.
//   tma_oob  two 128-byte-swizzled TMA boxes of 16 rows x 64 bf16 columns of a 37 x 100 tensor
//     (row pitch 112): one straddling the tensor's end (columns 64.., rows 30..), one its start
//     (columns -24.., rows -5..): out-of-bounds elements read as zero; then the mbarrier's phase
//     parity (try_wait on parity 0 and 1).
//   pipeline  the forward's warp specialisation: a producer warpgroup (setmaxnreg.dec) issues the
//     TMA load and arrives at a named barrier, two consumer warpgroups (setmaxnreg.inc) sync on it
//     and wait on the mbarrier; the box's bytes.
//   tensor_reduce  cp.reduce.async.bulk.tensor.5d .add through the Hopper backward's fp32
//     accumulator map (sm90_tensor_map.h make_accumulator_map: 32 columns, seq, column blocks,
//     heads, batch; 128-byte swizzle) of a (kRedBatch, kRedSeq, kRedHeads, 64) tensor with rows
//     kRedPitch floats apart: kRedCtas CTAs of one warp each add two boxes of 16 rows x 2 column
//     blocks, staged swizzled (generic stores, fence.proxy.async), one straddling the tensor's end
//     (rows kRedSeq - 8.., column blocks 1..), one its start (rows -5..), twice, the staging
//     reused after wait_group.read; the tensor's final bytes (elements outside the tensor, and the
//     row padding, unchanged).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "core/params.h"
#include "cuda/sm90_primitives.cuh"
#include "cuda/warp_mma.cuh"  // RA_UNROLL

namespace ring_attn {
namespace cuda {
namespace sm90 {
namespace conformance {

enum class Kind {
  kWgmmaSS,
  kWgmmaRS,
  kWgmmaSSMN,
  kStmatrix,
  kTma,
  kPipeline,
  kTensorReduce
};

struct Case {
  const char* name;
  Kind kind;
  bool bf16;
  int n;  // wgmma N
};

inline constexpr Case kCases[] = {
    {"wgmma_ss bf16 n64", Kind::kWgmmaSS, true, 64},
    {"wgmma_ss bf16 n128", Kind::kWgmmaSS, true, 128},
    {"wgmma_ss bf16 n256", Kind::kWgmmaSS, true, 256},
    {"wgmma_ss fp16 n64", Kind::kWgmmaSS, false, 64},
    {"wgmma_ss fp16 n128", Kind::kWgmmaSS, false, 128},
    {"wgmma_ss fp16 n256", Kind::kWgmmaSS, false, 256},
    {"wgmma_rs bf16 n64", Kind::kWgmmaRS, true, 64},
    {"wgmma_rs bf16 n128", Kind::kWgmmaRS, true, 128},
    {"wgmma_rs bf16 n256", Kind::kWgmmaRS, true, 256},
    {"wgmma_rs fp16 n64", Kind::kWgmmaRS, false, 64},
    {"wgmma_rs fp16 n128", Kind::kWgmmaRS, false, 128},
    {"wgmma_rs fp16 n256", Kind::kWgmmaRS, false, 256},
    {"wgmma_ss_mn bf16 n64", Kind::kWgmmaSSMN, true, 64},
    {"wgmma_ss_mn bf16 n128", Kind::kWgmmaSSMN, true, 128},
    {"wgmma_ss_mn fp16 n64", Kind::kWgmmaSSMN, false, 64},
    {"wgmma_ss_mn fp16 n128", Kind::kWgmmaSSMN, false, 128},
    {"stmatrix_x4 swizzle128", Kind::kStmatrix, false, 0},
    {"tma_oob swizzle128", Kind::kTma, true, 0},
    {"pipeline setmaxnreg named_barrier", Kind::kPipeline, true, 0},
    {"tensor_reduce 5d add.f32 swizzle128", Kind::kTensorReduce, false, 0},
};

// ---- wgmma -------------------------------------------------------------------------------------
constexpr int kK = 32;             // two k16 steps
constexpr int kBOffset = 64 * 128;  // B's tile after A's (64 rows of 128 bytes)
constexpr int kWgmmaThreads = 128;

constexpr int wgmma_smem_bytes(int n) { return kBOffset + n * 128; }
constexpr int wgmma_out_floats(int n) { return kWgmmaThreads * n / 2; }

// The value of element i of operand `which` (0: A, 1: B): k * 2^e, k in -15..15, e in -2..2.
inline float operand_value(int which, int i) {
  uint32_t h = static_cast<uint32_t>(i) * 2654435761u + static_cast<uint32_t>(which) * 40503u;
  h ^= h >> 15;
  h *= 2246822519u;
  h ^= h >> 13;
  const int k = static_cast<int>(h % 31u) - 15, e = static_cast<int>((h / 31u) % 5u) - 2;
  return static_cast<float>(k) * std::ldexp(1.0f, e);
}

// The 16-bit pattern of v, exact for the operand values above.
inline uint16_t bits16(float v, bool bf16) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  if (bf16) return static_cast<uint16_t>(u >> 16);
  if (v == 0.0f) return static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const int exponent = static_cast<int>((u >> 23) & 0xffu) - 127 + 15;
  const uint32_t mantissa = (u & 0x7fffffu) >> 13;
  return static_cast<uint16_t>(sign | static_cast<uint32_t>(exponent) << 10 | mantissa);
}

// Operand `which` (A: 64 x kK, B: n x kK, row-major) as values and as 16-bit patterns.
inline std::vector<float> operand_values(int which, int rows) {
  std::vector<float> v(static_cast<size_t>(rows) * kK);
  for (size_t i = 0; i < v.size(); ++i) v[i] = operand_value(which, static_cast<int>(i));
  return v;
}
inline std::vector<uint16_t> operand_bits(int which, int rows, bool bf16) {
  const std::vector<float> v = operand_values(which, rows);
  std::vector<uint16_t> b(v.size());
  for (size_t i = 0; i < v.size(); ++i) b[i] = bits16(v[i], bf16);
  return b;
}

// Byte offsets in the 128-byte-swizzled tiles (the TMA box layout: chunk c of row r at chunk
// c ^ (r % 8)), written from the layout rather than from the descriptor decoding under test.
// K-major (rows of 64 k): element (mn, k).
RA_DEV uint32_t k_major_offset(int mn, int k) {
  return swizzle128(static_cast<uint32_t>((mn % 8) * 128 + (mn / 8) * 1024 + k * 2));
}
// MN-major (rows of 64 mn, column blocks of kK rows): element (mn, k).
RA_DEV uint32_t mn_major_offset(int mn, int k) {
  return swizzle128(static_cast<uint32_t>((k % 8) * 128 + (k / 8) * 1024 + (mn / 64) * kK * 128 +
                                          (mn % 64) * 2));
}

// One warpgroup: out[tid * N / 2 + i] = accumulator register i of thread tid. kForm: kWgmmaSS,
// kWgmmaRS or kWgmmaSSMN (the operands' sources and layouts, as the cases above).
// a: 64 x kK, b: N x kK (row-major 16-bit patterns); smem: wgmma_smem_bytes(N), 1024-aligned.
template <bool kBF16, int N, Kind kForm>
RA_DEV void wgmma_case(const uint16_t* a, const uint16_t* b, float* out, char* smem) {
  constexpr bool kMnMajorA = kForm == Kind::kWgmmaSSMN, kMnMajorB = kForm != Kind::kWgmmaSS;
  const int tid = thread_idx();
  uint16_t* sa = reinterpret_cast<uint16_t*>(smem);
  uint16_t* sb = reinterpret_cast<uint16_t*>(smem + kBOffset);
  for (int i = tid; i < 64 * kK; i += kWgmmaThreads) {
    const uint32_t off =
        kMnMajorA ? mn_major_offset(i / kK, i % kK) : k_major_offset(i / kK, i % kK);
    sa[off / 2] = a[i];
  }
  for (int i = tid; i < N * kK; i += kWgmmaThreads) {
    const uint32_t off =
        kMnMajorB ? mn_major_offset(i / kK, i % kK) : k_major_offset(i / kK, i % kK);
    sb[off / 2] = b[i];
  }
  sm90::fence_proxy_async();
  sync_threads();
  float d[N / 2];
  RA_UNROLL
  for (int i = 0; i < N / 2; ++i) d[i] = 1000.0f;  // scale_d false must discard these
  const int w = tid / 32, g = (tid % 32) / 4, q = tid % 4;
  uint32_t ra[2][4];
  RA_UNROLL
  for (int s = 0; s < 2; ++s) {
    RA_UNROLL
    for (int j = 0; j < 4; ++j) {
      const int row = 16 * w + g + 8 * (j % 2), k = 16 * s + 2 * q + 8 * (j / 2);
      ra[s][j] = static_cast<uint32_t>(a[row * kK + k]) |
                 static_cast<uint32_t>(a[row * kK + k + 1]) << 16;
    }
  }
  // The MN-major descriptors of the first k16 step (64-column blocks kK rows apart); the second
  // step lies 16 rows (of 128 bytes) further in both.
  const uint64_t desc_a_mn = sm90::smem_desc(smem, kK * 128, 1024);
  const uint64_t desc_b_mn = sm90::smem_desc(smem + kBOffset, kK * 128, 1024);
  sm90::wgmma_fence();
  RA_UNROLL
  for (int s = 0; s < 2; ++s) {
    if constexpr (kForm == Kind::kWgmmaRS) {
      const uint64_t desc_b = sm90::smem_desc(smem + kBOffset + s * 16 * 128, kK * 128, 1024);
      sm90::wgmma_rs<kBF16, N, true>(d, ra[s], desc_b, s > 0);
    } else if constexpr (kForm == Kind::kWgmmaSS) {
      const uint64_t desc_a = sm90::smem_desc(smem + s * 32, 16, 1024);
      const uint64_t desc_b = sm90::smem_desc(smem + kBOffset + s * 32, 16, 1024);
      sm90::wgmma_ss<kBF16, N, false, false>(d, desc_a, desc_b, s > 0);
    } else {
      sm90::wgmma_ss<kBF16, N, true, true>(d, desc_advance(desc_a_mn, s * 16 * 128),
                                           desc_advance(desc_b_mn, s * 16 * 128), s > 0);
    }
  }
  sm90::wgmma_commit();
  sm90::wgmma_wait<0>();
  RA_UNROLL
  for (int i = 0; i < N / 2; ++i) out[tid * (N / 2) + i] = d[i];
}

// The host reference of wgmma_case: float(A B^T) in fragment order.
inline std::vector<float> wgmma_reference(int n) {
  const std::vector<float> a = operand_values(0, 64), b = operand_values(1, n);
  std::vector<float> out(wgmma_out_floats(n));
  for (int t = 0; t < kWgmmaThreads; ++t) {
    const int w = t / 32, g = (t % 32) / 4, q = t % 4;
    for (int i = 0; i < n / 2; ++i) {
      const int row = 16 * w + g + 8 * ((i / 2) % 2), col = 8 * (i / 4) + 2 * q + i % 2;
      double sum = 0.0;
      for (int k = 0; k < kK; ++k) sum += double(a[row * kK + k]) * b[col * kK + k];
      out[t * (n / 2) + i] = static_cast<float>(sum);
    }
  }
  return out;
}

// ---- TMA ----------------------------------------------------------------------------------------
constexpr int kTmaCols = 100, kTmaRows = 37, kTmaPitch = 112;  // elements
constexpr int kBoxCols = 64, kBoxRows = 16, kBoxBytes = kBoxCols * kBoxRows * 2;
// The first column and row of box b (0: across the tensor's end, 1: across its start).
RA_HOST_DEVICE constexpr int box_col(int b) { return b == 0 ? 64 : -24; }
RA_HOST_DEVICE constexpr int box_row(int b) { return b == 0 ? 30 : -5; }
constexpr int kTmaThreads = 128;
constexpr int kTmaSmemBytes = 2 * kBoxBytes + 8;
constexpr int kTmaOutWords = 2 * kBoxBytes / 4 + 2;  // the boxes, then try_wait(0), try_wait(1)
constexpr uint16_t kPitchPadding = 0xeeee;          // between a row's end and the next row
constexpr uint64_t kWaitLimitNs = 2000000000;       // a wait that does not end is a mismatch

// The tensor: element (r, c) = r * kTmaCols + c + 1 (no zero: the out-of-bounds fill shows).
inline std::vector<uint16_t> tma_tensor() {
  std::vector<uint16_t> t(static_cast<size_t>(kTmaRows) * kTmaPitch, kPitchPadding);
  for (int r = 0; r < kTmaRows; ++r) {
    for (int c = 0; c < kTmaCols; ++c) {
      t[r * kTmaPitch + c] = static_cast<uint16_t>(r * kTmaCols + c + 1);
    }
  }
  return t;
}

// Waits for phase `parity` of bar for at most kWaitLimitNs; whether it completed.
RA_DEV bool bounded_wait(uint64_t* bar, int parity) {
#if defined(RA_CUDA_EMULATE)
  const emu::Deadline deadline;
  while (!sm90::mbar_try_wait(bar, parity)) {
    if (deadline.passed()) return false;
  }
#else
  uint64_t start, now;
  asm volatile("mov.u64 %0, %%globaltimer;\n" : "=l"(start));
  while (!sm90::mbar_try_wait(bar, parity)) {
    asm volatile("mov.u64 %0, %%globaltimer;\n" : "=l"(now));
    if (now - start > kWaitLimitNs) return false;
  }
#endif
  return true;
}

// Copies `bytes` bytes of shared memory to out, 16 per thread and step.
RA_DEV void copy_out(const char* smem, uint32_t* out, int bytes, int tid, int nthreads) {
  const uint32_t* words = reinterpret_cast<const uint32_t*>(smem);
  for (int i = tid; i < bytes / 16; i += nthreads) {
    for (int j = 0; j < 4; ++j) out[4 * i + j] = words[4 * i + j];
  }
}

// kTmaThreads threads: out[0 .. kTmaOutWords) (box bytes; 0 in the flags when a wait never ends).
RA_DEV void tma_case(const TensorMap* map, uint32_t* out, char* smem) {
  const int tid = thread_idx();
  uint64_t* bar = reinterpret_cast<uint64_t*>(smem + 2 * kBoxBytes);
  if (tid == 0) {
    sm90::mbar_init(bar, 1);
    sm90::fence_proxy_async();
  }
  sync_threads();
  if (tid == 0) {
    sm90::mbar_arrive_expect_tx(bar, 2 * kBoxBytes);
    RA_UNROLL
    for (int b = 0; b < 2; ++b) {
      sm90::tma_load_2d(smem + b * kBoxBytes, map, bar, box_col(b), box_row(b));
    }
  }
  const bool done = bounded_wait(bar, 0);
  copy_out(smem, out, 2 * kBoxBytes, tid, kTmaThreads);
  sync_threads();
  if (tid == 0) {
    out[2 * kBoxBytes / 4] = done && sm90::mbar_try_wait(bar, 0) ? 1u : 0u;
    out[2 * kBoxBytes / 4 + 1] = done && sm90::mbar_try_wait(bar, 1) ? 1u : 0u;
  }
}

// The forward's warpgroups: consumers 0 and 1, the producer last.
constexpr int kPipelineThreads = 384;
constexpr int kPipelineSmemBytes = kBoxBytes + 8;
constexpr int kPipelineOutWords = kBoxBytes / 4 + 1;  // the first box's bytes, then completion

RA_DEV void pipeline_case(const TensorMap* map, uint32_t* out, char* smem) {
  const int tid = thread_idx();
  uint64_t* bar = reinterpret_cast<uint64_t*>(smem + kBoxBytes);
  if (tid == 0) {
    sm90::mbar_init(bar, 1);
    sm90::fence_proxy_async();
  }
  sync_threads();
  if (tid >= 256) {
    sm90::setmaxnreg_dec<40>();
    if (tid == 256) {
      sm90::mbar_arrive_expect_tx(bar, kBoxBytes);
      sm90::tma_load_2d(smem, map, bar, box_col(0), box_row(0));
    }
    sm90::named_arrive(1, kPipelineThreads);
    return;
  }
  sm90::setmaxnreg_inc<232>();
  sm90::named_sync(1, kPipelineThreads);
  const bool done = bounded_wait(bar, 0);
  copy_out(smem, out, kBoxBytes, tid, 256);
  if (tid == 0) out[kBoxBytes / 4] = done ? 1u : 0u;
}

// ---- stmatrix -----------------------------------------------------------------------------------
// The fused dQ's dS^T tile of one warpgroup: kDsKeys keys x kDsRows query rows of 16 bits.
constexpr int kDsKeys = 64, kDsRows = 64, kDsTileBytes = kDsKeys * kDsRows * 2;
constexpr int kStmatrixThreads = 128;
constexpr uint16_t kUnwritten = 0xeeee;  // the tile's fill before the stores

// The 16-bit pattern of element (key, row) of dS^T: distinct, never kUnwritten.
RA_HOST_DEVICE constexpr uint16_t ds_pattern(int key, int row) {
  return static_cast<uint16_t>(key * kDsRows + row + 1);
}

// One warpgroup (warpgroup 0 of the fused dQ, stage 0): out[0 .. kDsTileBytes / 4) = the tile's
// bytes after the stores. smem: kDsTileBytes, 1024-aligned.
RA_DEV void stmatrix_case(uint32_t* out, char* smem) {
  const int tid = thread_idx(), w = tid / 32, lane = tid % 32, g = lane / 4, t4 = lane % 4;
  uint16_t* tile = reinterpret_cast<uint16_t*>(smem);
  for (int i = tid; i < kDsTileBytes / 2; i += kStmatrixThreads) tile[i] = kUnwritten;
  sync_threads();
  // dsa[kc][j]: the register-A fragment of k16 step kc over the rows, key 16 w + g + 8 (j % 2),
  // rows 16 kc + 8 (j / 2) + 2 t4 + {0, 1} (the lower row in the low half).
  uint32_t dsa[kDsRows / 16][4];
  RA_UNROLL
  for (int kc = 0; kc < kDsRows / 16; ++kc) {
    RA_UNROLL
    for (int j = 0; j < 4; ++j) {
      const int key = 16 * w + g + 8 * (j % 2), row = 16 * kc + 8 * (j / 2) + 2 * t4;
      dsa[kc][j] = static_cast<uint32_t>(ds_pattern(key, row)) |
                   static_cast<uint32_t>(ds_pattern(key, row + 1)) << 16;
    }
  }
  // The fused dQ's addresses (sm90_bwd_kernel.cuh): lane l gives the row of key
  // 16 w + 8 ((l / 8) % 2) + l % 8 whose chunk 2 kc + l / 16 it stores.
  const int ds_key = 16 * w + 8 * ((lane / 8) % 2) + lane % 8;
  const uint32_t ds_row = ds_key * 128 + 16 * ((lane / 16) ^ (lane % 8));
  RA_UNROLL
  for (int kc = 0; kc < kDsRows / 16; ++kc) {
    stmatrix_x4(dsa[kc], reinterpret_cast<uint16_t*>(smem + (ds_row ^ (32 * kc))));
  }
  sync_threads();
  copy_out(smem, out, kDsTileBytes, tid, kStmatrixThreads);
}

// The host reference of stmatrix_case: element (key, row) of dS^T, whichever fragment register
// holds it, at swizzle128(128 key + 2 row).
inline std::vector<uint16_t> stmatrix_reference() {
  std::vector<uint16_t> tile(kDsTileBytes / 2, kUnwritten);
  for (int key = 0; key < kDsKeys; ++key) {
    for (int row = 0; row < kDsRows; ++row) {
      tile[swizzle128(static_cast<uint32_t>(128 * key + 2 * row)) / 2] = ds_pattern(key, row);
    }
  }
  return tile;
}

// ---- TMA tensor reductions ---------------------------------------------------------------------
constexpr int kRedBatch = 2, kRedSeq = 21, kRedHeads = 3, kRedCols = 64, kRedPitch = 68;  // floats
constexpr int kRedCtas = 2, kRedThreads = 32, kRedRounds = 2, kRedBoxes = 2;
constexpr int kRedBoxRows = 16, kRedBoxBlocks = 2;
constexpr int kRedBoxFloats = 32 * kRedBoxRows * kRedBoxBlocks;
constexpr int kRedBoxBytes = 4 * kRedBoxFloats;
constexpr int kRedSmemBytes = kRedBoxes * kRedBoxBytes;
constexpr int kRedTensorFloats = kRedBatch * kRedSeq * kRedHeads * kRedPitch;
constexpr int kRedSrcFloats = kRedCtas * kRedRounds * kRedBoxes * kRedBoxFloats;

// Coordinate `dim` (column, row, column block, head, batch) of box b's first element: box 0
// reaches past the last row and the last column block, box 1 starts before the first row.
RA_HOST_DEVICE constexpr int red_origin(int b, int dim) {
  return dim == 0   ? 0
         : dim == 1 ? (b == 0 ? kRedSeq - 8 : -5)
         : dim == 2 ? (b == 0 ? 1 : 0)
         : dim == 3 ? (b == 0 ? kRedHeads - 1 : 1)
                    : (b == 0 ? kRedBatch - 1 : 0);
}

// The tensor's strides (elements): sequence-major (batch, seq, heads, columns), rows padded.
inline Strides red_strides() {
  return Strides{int64_t(kRedSeq) * kRedHeads * kRedPitch, int64_t(kRedHeads) * kRedPitch,
                 kRedPitch};
}

// The tensor's initial values (padding included), then the boxes each CTA, round and box adds:
// src[((cta * kRedRounds + round) * kRedBoxes + box) * kRedBoxFloats + i], element i of the box
// in row-major (column block, row, column) order.
inline std::vector<float> red_initial() {
  std::vector<float> v(kRedTensorFloats);
  for (int i = 0; i < kRedTensorFloats; ++i) v[i] = operand_value(4, i);
  return v;
}
inline std::vector<float> red_sources() {
  std::vector<float> v(kRedSrcFloats);
  for (int i = 0; i < kRedSrcFloats; ++i) v[i] = operand_value(5, i);
  return v;
}

// kRedThreads threads (one warp) of CTA block_idx_x(); smem: kRedSmemBytes, 1024-byte aligned.
// Element i of a box is staged where the TMA lands it: column block i / (32 kRedBoxRows) a
// swizzled tile of kRedBoxRows rows of 128 bytes.
RA_DEV void tensor_reduce_case(const TensorMap* map, const float* src, char* smem) {
  const int lane = thread_idx() % 32;
  for (int round = 0; round < kRedRounds; ++round) {
    sm90::bulk_wait_group_read<0>();  // the previous round's boxes are read
    sync_warp();
    for (int box = 0; box < kRedBoxes; ++box) {
      const float* vals =
          src + ((block_idx_x() * kRedRounds + round) * kRedBoxes + box) * kRedBoxFloats;
      for (int i = lane; i < kRedBoxFloats; i += kRedThreads) {
        const uint32_t off = swizzle128(static_cast<uint32_t>((i / 32) * 128 + (i % 32) * 4));
        *reinterpret_cast<float*>(smem + box * kRedBoxBytes + off) = vals[i];
      }
    }
    sm90::fence_proxy_async();
    sync_warp();
    if (lane == 0) {
      for (int box = 0; box < kRedBoxes; ++box) {
        sm90::tma_reduce_add_5d(smem + box * kRedBoxBytes, map, red_origin(box, 0),
                                red_origin(box, 1), red_origin(box, 2), red_origin(box, 3),
                                red_origin(box, 4));
      }
      sm90::bulk_commit_group();
    }
  }
  sm90::bulk_wait_group_read<0>();
}

// The host reference: the initial tensor plus every box element inside the tensor.
inline std::vector<float> red_reference() {
  std::vector<float> dst = red_initial();
  const std::vector<float> src = red_sources();
  const Strides st = red_strides();
  for (int n = 0; n < kRedCtas * kRedRounds; ++n) {
    for (int box = 0; box < kRedBoxes; ++box) {
      for (int i = 0; i < kRedBoxFloats; ++i) {
        const int col = 32 * (red_origin(box, 2) + i / (32 * kRedBoxRows)) + i % 32;
        const int row = red_origin(box, 1) + (i / 32) % kRedBoxRows;
        const int h = red_origin(box, 3), b = red_origin(box, 4);
        if (col >= kRedCols || row < 0 || row >= kRedSeq) continue;
        dst[b * st.batch + row * st.row + h * st.head + col] +=
            src[(n * kRedBoxes + box) * kRedBoxFloats + i];
      }
    }
  }
  return dst;
}

// The host reference of box b: the swizzled box's shared-memory bytes, zero outside the tensor.
inline std::vector<uint16_t> tma_box_reference(int b) {
  const std::vector<uint16_t> t = tma_tensor();
  std::vector<uint16_t> box(kBoxBytes / 2);
  for (int r = 0; r < kBoxRows; ++r) {
    for (int e = 0; e < kBoxCols; ++e) {
      const int x = box_col(b) + e, y = box_row(b) + r;
      const bool inside = x >= 0 && x < kTmaCols && y >= 0 && y < kTmaRows;
      const uint32_t offset = swizzle128(static_cast<uint32_t>(r * 128 + e * 2));
      box[offset / 2] = inside ? t[y * kTmaPitch + x] : 0;
    }
  }
  return box;
}

// ---- results ------------------------------------------------------------------------------------
inline std::vector<uint8_t> as_bytes(const void* p, size_t bytes) {
  const uint8_t* c = static_cast<const uint8_t*>(p);
  return std::vector<uint8_t>(c, c + bytes);
}

// The reference bytes of case c.
inline std::vector<uint8_t> reference_bytes(const Case& c) {
  if (c.kind == Kind::kWgmmaSS || c.kind == Kind::kWgmmaRS || c.kind == Kind::kWgmmaSSMN) {
    const std::vector<float> d = wgmma_reference(c.n);
    return as_bytes(d.data(), d.size() * 4);
  }
  if (c.kind == Kind::kStmatrix) {
    const std::vector<uint16_t> tile = stmatrix_reference();
    return as_bytes(tile.data(), kDsTileBytes);
  }
  if (c.kind == Kind::kTensorReduce) {
    const std::vector<float> d = red_reference();
    return as_bytes(d.data(), d.size() * 4);
  }
  std::vector<uint16_t> box = tma_box_reference(0);
  std::vector<uint8_t> out = as_bytes(box.data(), kBoxBytes);
  std::vector<uint32_t> flags = {1u};
  if (c.kind == Kind::kTma) {
    box = tma_box_reference(1);
    const std::vector<uint8_t> second = as_bytes(box.data(), kBoxBytes);
    out.insert(out.end(), second.begin(), second.end());
    flags = {1u, 0u};
  }
  const std::vector<uint8_t> f = as_bytes(flags.data(), flags.size() * 4);
  out.insert(out.end(), f.begin(), f.end());
  return out;
}

// Prints "name: OK" or "name: MISMATCH at word i (got, expected)"; whether they match.
inline bool report(const char* name, const std::vector<uint8_t>& got,
                   const std::vector<uint8_t>& expected, const char* expected_name) {
  if (got.size() != expected.size()) {
    std::printf("%-36s MISMATCH: %zu bytes, %s has %zu\n", name, got.size(), expected_name,
                expected.size());
    return false;
  }
  for (size_t i = 0; i + 4 <= got.size(); i += 4) {
    if (std::memcmp(got.data() + i, expected.data() + i, 4) != 0) {
      uint32_t g, e;
      std::memcpy(&g, got.data() + i, 4);
      std::memcpy(&e, expected.data() + i, 4);
      std::printf("%-36s MISMATCH at 32-bit word %zu: 0x%08x, %s 0x%08x\n", name, i / 4, g,
                  expected_name, e);
      return false;
    }
  }
  std::printf("%-36s OK (%zu bytes)\n", name, got.size());
  return true;
}

// The results file: per case, a line "name<TAB>byte count" and then the bytes.
inline bool write_results(const char* path, const std::vector<std::vector<uint8_t>>& results) {
  FILE* f = std::fopen(path, "wb");
  if (f == nullptr) return false;
  bool ok = true;
  for (size_t i = 0; i < results.size(); ++i) {
    ok &= std::fprintf(f, "%s\t%zu\n", kCases[i].name, results[i].size()) > 0;
    ok &= std::fwrite(results[i].data(), 1, results[i].size(), f) == results[i].size();
  }
  return std::fclose(f) == 0 && ok;
}

// The results file's bytes of each case of kCases, in order; empty when the file does not hold
// exactly those cases.
inline std::vector<std::vector<uint8_t>> read_results(const char* path) {
  std::vector<std::vector<uint8_t>> results;
  FILE* f = std::fopen(path, "rb");
  if (f == nullptr) return results;
  for (const Case& c : kCases) {
    char line[128];
    if (std::fgets(line, sizeof line, f) == nullptr) break;
    const std::string s(line);
    const size_t tab = s.find('\t');
    if (tab == std::string::npos || s.substr(0, tab) != c.name) break;
    std::vector<uint8_t> bytes(std::stoul(s.substr(tab + 1)));
    if (std::fread(bytes.data(), 1, bytes.size(), f) != bytes.size()) break;
    results.push_back(std::move(bytes));
  }
  std::fclose(f);
  if (results.size() != sizeof kCases / sizeof kCases[0]) results.clear();
  return results;
}

// The bytes of case c, from Runner::template wgmma<kBF16, N, kForm>(), Runner::stmatrix(),
// Runner::tma(pipeline) and Runner::tensor_reduce(), which run the bodies
// above under the emulator or on the device.
template <class Runner, Kind kForm>
std::vector<uint8_t> run_wgmma_case(bool bf16, int n) {
  if (bf16) {
    return n == 64    ? Runner::template wgmma<true, 64, kForm>()
           : n == 128 ? Runner::template wgmma<true, 128, kForm>()
                      : Runner::template wgmma<true, 256, kForm>();
  }
  return n == 64    ? Runner::template wgmma<false, 64, kForm>()
         : n == 128 ? Runner::template wgmma<false, 128, kForm>()
                    : Runner::template wgmma<false, 256, kForm>();
}

template <class Runner>
std::vector<uint8_t> run_case(const Case& c) {
  switch (c.kind) {
    case Kind::kWgmmaSS:
      return run_wgmma_case<Runner, Kind::kWgmmaSS>(c.bf16, c.n);
    case Kind::kWgmmaRS:
      return run_wgmma_case<Runner, Kind::kWgmmaRS>(c.bf16, c.n);
    case Kind::kWgmmaSSMN:
      return run_wgmma_case<Runner, Kind::kWgmmaSSMN>(c.bf16, c.n);
    case Kind::kStmatrix:
      return Runner::stmatrix();
    case Kind::kTma:
      return Runner::tma(false);
    case Kind::kPipeline:
      return Runner::tma(true);
    case Kind::kTensorReduce:
      return Runner::tensor_reduce();
  }
  return {};
}

}  // namespace conformance
}  // namespace sm90
}  // namespace cuda
}  // namespace ring_attn
