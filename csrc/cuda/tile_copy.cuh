// Copies between global memory and the kernels' shared-memory tiles; each thread's place in a
// tile (a row, a column chunk) follows from its index, one pointer add per chunk:
//   TileCopy:   a kRows x d 16-bit tile (rows of one (batch, head)) into smem with cp.async;
//   TileReduce: a kRows x d fp32 smem tile added into global rows with vector reductions.
// Thread `tid` owns one column chunk and rows r0 + i * kRowStep (i < kPasses). Columns at or
// beyond the real head dim d are zero-filled (copy) or skipped (reduce).
#pragma once

#include <cstdint>

#include "cuda/primitives.cuh"
#include "cuda/warp_mma.cuh"

namespace ring_attn {
namespace cuda {

constexpr int pow2_at_least(int n) { return n <= 1 ? 1 : 2 * pow2_at_least((n + 1) / 2); }

// How kNThreads threads share a tile of kRows rows of kChunks chunks each: the chunks of a row
// are rounded up to a power of two (kChunksP; the chunks beyond kChunks idle) so that a thread
// keeps its column; thread tid takes column tid % kChunksP of rows tid / kChunksP + i kRowStep for
// i < kPasses.
template <int kRows, int kChunksPerRow, int kNThreads>
struct ChunkedRows {
  static constexpr int kChunks = kChunksPerRow;
  static constexpr int kChunksP = pow2_at_least(kChunks);
  static constexpr int kRowStep = kNThreads / kChunksP;
  static constexpr int kPasses = kRows / kRowStep;
  static_assert(kNThreads % kChunksP == 0 && kRows % kRowStep == 0, "tile thread layout");
};

template <int kRows, int kHeadDim, int kStride, int kNThreads>
struct TileCopy {
  using Rows = ChunkedRows<kRows, kHeadDim / 8, kNThreads>;  // 16-byte chunks (8 halves)

  // Rows [0, kRows) of the tile whose first row is at g (kChecked: only rows < rows exist, the rest
  // is zero-filled). Thread `tid` copies the chunks (row tid / kChunksP + i kRowStep, column
  // (tid % kChunksP) * 8); d: the real head dim (columns beyond it are zero-filled from an
  // address in range). Everything per thread is derived from tid here, so that no register holds
  // it across the caller's loop.
  template <bool kChecked = false>
  RA_DEV static void issue(uint16_t* s, const uint16_t* g, int64_t row_stride, int d, int tid,
                           int rows = kRows) {
    const int row0 = tid / Rows::kChunksP, c = (tid % Rows::kChunksP) * 8;
    if (Rows::kChunksP != Rows::kChunks && c >= kHeadDim) return;
    const int src_bytes = c < d ? 16 : 0;
    const uint16_t* src = g + row0 * row_stride + (c < d ? c : 0);
    uint16_t* dst = s + row0 * kStride + c;
    RA_UNROLL
    for (int i = 0; i < Rows::kPasses; ++i) {
      const bool in = !kChecked || row0 + i * Rows::kRowStep < rows;
      cp_async_16(dst + i * Rows::kRowStep * kStride, in ? src : g, in ? src_bytes : 0);
      src += Rows::kRowStep * row_stride;
    }
  }

  // One key tile into a pipeline stage, as the forward and the deterministic dQ kernel load it:
  // K and V rows [k0, k0 + kRows) (rows past sk zero-filled) into tk and tv, and their positions
  // into tk_pos (thread t < kRows copies position k0 + t; a row past sk copies position 0, which
  // only a partial tile, masked, could read). Commits one cp.async group. p: the kernel's
  // arguments (k_strides, v_strides, k_pos).
  template <class Args>
  RA_DEV static void issue_key_tile(uint16_t* tk, uint16_t* tv, int32_t* tk_pos,
                                    const uint16_t* k_base, const uint16_t* v_base, const Args& p,
                                    int k0, int sk, int d, int tid) {
    if (k0 + kRows <= sk) {
      issue(tk, k_base + k0 * p.k_strides.row, p.k_strides.row, d, tid);
      issue(tv, v_base + k0 * p.v_strides.row, p.v_strides.row, d, tid);
    } else {
      issue<true>(tk, k_base + k0 * p.k_strides.row, p.k_strides.row, d, tid, sk - k0);
      issue<true>(tv, v_base + k0 * p.v_strides.row, p.v_strides.row, d, tid, sk - k0);
    }
    if (tid < kRows) {  // key positions (read by partial tiles only; copied for all, no branch)
      const bool in = k0 + tid < sk;
      cp_async_4(tk_pos + tid, p.k_pos + (in ? k0 + tid : 0), in);
    }
    cp_async_commit();
  }
};

// Adds a kRows x d fp32 smem tile (pitch kPitch floats) into global rows: four columns per
// reduction (red.global.add.v4.f32 on sm_90). Global rows must be 16-byte aligned.
template <int kRows, int kHeadDim, int kPitch, int kNThreads>
struct TileReduce {
  using Rows = ChunkedRows<kRows, kHeadDim / 4, kNThreads>;  // four floats a chunk

  // g[r] += s[r] for the tile's rows r (kChecked: only rows r < rows), global row 0 at g. Thread
  // `tid` adds the chunks (row tid / kChunksP + i kRowStep, column (tid % kChunksP) * 4) that lie
  // in the real head dim d.
  template <bool kChecked = false>
  RA_DEV static void add(float* g, int64_t row_stride, const float* s, int d, int tid,
                         int rows = kRows) {
    const int row0 = tid / Rows::kChunksP, col = (tid % Rows::kChunksP) * 4;
    if (col >= d) return;
    float* dst = g + row0 * row_stride + col;
    RA_UNROLL
    for (int i = 0; i < Rows::kPasses; ++i) {
      if (!kChecked || row0 + i * Rows::kRowStep < rows) {
        const float4 v =
            *reinterpret_cast<const float4*>(s + (row0 + i * Rows::kRowStep) * kPitch + col);
        const float vals[4] = {v.x, v.y, v.z, v.w};
        red_add<4>(dst, vals);
      }
      dst += Rows::kRowStep * row_stride;
    }
  }
};

}  // namespace cuda
}  // namespace ring_attn
