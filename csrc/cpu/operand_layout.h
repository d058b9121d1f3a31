// Per-call copies of the CPU kernels' operands (O(seq * headdim), paid once per call, never per
// tile), in the layouts the vector GEMMs read:
//   K (and V in backward) as K^T packed in panels of kPanel keys (Tiles::kPanel): panel p of head
//     (b, h) is a dense headdim x kPanel block, zero beyond the last key, so the score micro-kernel
//     streams it contiguously from L1 (pack_panels).
//   Operands read as rows (Q, V, dout, K in backward) are used in place when they are already of
//     the accumulator type, dense per head (row stride = headdim) and their headdim is a multiple
//     of the vector width; else they are copied head-major in the accumulator type, headdim
//     zero-padded to that multiple (bf16/fp16 inputs always are: all arithmetic is fp32)
//     (head_rows).
// Also the row prefetch both these copies and the kernels use.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "core/params.h"
#include "core/rounding.h"
#include "cpu/scratch.h"

namespace ring_attn {
namespace cpu {

// The rows of every (batch, head) of a (batch, seq, heads, headdim) operand: row r of (b, h) at
// ptr(b, h) + r * ld, unit stride along headdim, `width` readable columns (>= headdim, zero beyond).
template <typename T>
struct HeadRows {
  const T* base;
  int64_t batch_stride, head_stride, ld;
  const T* ptr(int64_t b, int64_t h) const { return base + b * batch_stride + h * head_stride; }
};

template <typename acc_t, typename scalar_t>
inline acc_t to_acc(scalar_t x) {
  return static_cast<acc_t>(x);
}

// Fetches rows [0, n) of a strided (row stride ld) matrix, `width` elements per row, into the
// cache (for writing: kWrite). Rows of the usual (batch, seq, heads, headdim) layout are
// heads * headdim apart, a stride the hardware prefetchers do not follow: the operand copies fetch
// their source rows kRowsAhead ahead, and tasks fetch the accumulator rows they write last (whose
// write-allocate misses would otherwise stall the final stores).
template <bool kWrite = false, typename T>
void prefetch_rows(const T* base, int64_t ld, int64_t n, int64_t width) {
  for (int64_t i = 0; i < n; ++i) {
    const char* row = reinterpret_cast<const char*>(base + i * ld);
    for (int64_t c = 0; c < static_cast<int64_t>(sizeof(T)) * width; c += 64)
      __builtin_prefetch(row + c, kWrite ? 1 : 0, 3);
  }
}
constexpr int64_t kRowsAhead = 8;

// x as HeadRows<acc_t> of `width` columns: x itself when it is already acc_t, width == D and its
// rows are dense per head (row stride D), else a head-major (batch, heads, seq, width) acc_t copy
// (zero-padded) in the calling thread's `slot`. Rows of the usual (batch, seq, heads, headdim)
// layout are heads * headdim apart: read in place, a tile's rows would fall into a fraction of the
// L1 sets (4 KB aliasing) and the GEMMs run ~25% slower.
template <typename scalar_t, typename acc_t>
HeadRows<acc_t> head_rows(const scalar_t* x, const Strides& strides, int64_t B, int64_t S,
                          int64_t Hn, int64_t D, int64_t width, int slot) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (width == D && (S <= 1 || strides.row == D)) return {x, strides.batch, strides.head, D};
  }
  acc_t* dst = static_cast<acc_t*>(thread_scratch(slot, sizeof(acc_t) * B * Hn * S * width));
  at::parallel_for(0, B * Hn, 1, [&](int64_t bh0, int64_t bh1) {
    for (int64_t bh = bh0; bh < bh1; ++bh) {
      const int64_t b = bh / Hn, h = bh % Hn;
      const scalar_t* src = x + b * strides.batch + h * strides.head;
      acc_t* out = dst + bh * S * width;
      for (int64_t i = 0; i < S; ++i, src += strides.row, out += width) {
        if (i + kRowsAhead < S) prefetch_rows(src + kRowsAhead * strides.row, strides.row, 1, D);
        if constexpr (std::is_same_v<scalar_t, acc_t>) {
          std::memcpy(out, src, sizeof(acc_t) * D);
        } else {
          for (int64_t c = 0; c < D; ++c) out[c] = to_acc<acc_t>(src[c]);
        }
        if (width > D) std::memset(out + D, 0, sizeof(acc_t) * (width - D));
      }
    }
  });
  return {dst, Hn * S * width, S * width, width};
}

// x^T packed in panels of `panel` rows: for head (b, h), panel j (rows [j * panel, (j + 1) * panel))
// is a dense D x panel block at base + (b * Hn + h) * head_stride + j * D * panel; rows beyond S are
// zero. Returns base; head_stride = cdiv(S, panel) * D * panel.
template <typename scalar_t, typename acc_t>
const acc_t* pack_panels(const scalar_t* x, const Strides& strides, int64_t B, int64_t S,
                         int64_t Hn, int64_t D, int64_t panel, int slot) {
  const int64_t np = cdiv(S, panel);
  const int64_t head_stride = np * D * panel;
  acc_t* dst = static_cast<acc_t*>(thread_scratch(slot, sizeof(acc_t) * B * Hn * head_stride));
  at::parallel_for(0, B * Hn * np, std::max<int64_t>(1, 8192 / (D * panel)), [&](int64_t t0,
                                                                                 int64_t t1) {
    // Source rows of panel t: rows [r0, r0 + nr) of head (b, h).
    auto source = [&](int64_t t, int64_t* nr) {
      const int64_t j = t % np, bh = t / np, b = bh / Hn, h = bh % Hn;
      const int64_t r0 = j * panel;
      *nr = std::min(panel, S - r0);
      return x + b * strides.batch + r0 * strides.row + h * strides.head;
    };
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t j = t % np, bh = t / np;
      acc_t* out = dst + bh * head_stride + j * D * panel;
      int64_t nr;
      const scalar_t* src = source(t, &nr);
      if (t + 1 < t1) {  // fetch the next panel's rows while this one runs
        int64_t nr_next;
        const scalar_t* next = source(t + 1, &nr_next);
        prefetch_rows(next, strides.row, nr_next, D);
      }
      // Column by column: contiguous stores, the panel's source rows stay in L1.
      for (int64_t c = 0; c < D; ++c, out += panel) {
        for (int64_t rr = 0; rr < nr; ++rr) out[rr] = to_acc<acc_t>(src[rr * strides.row + c]);
        for (int64_t rr = nr; rr < panel; ++rr) out[rr] = acc_t(0);
      }
    }
  });
  return dst;
}

}  // namespace cpu
}  // namespace ring_attn
