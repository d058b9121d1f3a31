// How the Hopper forward (sm90_fwd_kernel.cuh) reads a (batch, seq, heads, headdim) operand with
// 2-D TMA loads: as a matrix of rows `st.row` elements wide (row stride st.row), in which the
// rows of (batch b, head h) start at row (b st.batch + h st.head) / st.row, column
// (b st.batch + h st.head) % st.row. This holds the sequence-major (batch, seq, heads, headdim)
// and head-major (batch, heads, seq, headdim) layouts alike. A box reaching past the operand's
// sequence reads the neighbouring rows of the same tensor (finite values that the kernel masks
// or never stores), or zeros past the tensor's last row.
// The Hopper backward adds dQ to its fp32 accumulator through a 5-D view of it (accumulator_tensor
// below). Plain C++: used by the dispatch (block_attn_cuda.cu), the launchers' tensor maps
// (sm90_tensor_map.h), the kernels and the emulator test.
#pragma once

#include <cstdint>

#include "core/params.h"
#include "cuda/sm90_layout.h"

namespace ring_attn {
namespace cuda {
namespace sm90 {

// The 2-D matrix of an operand: `cols` elements per row, `rows` rows (16-bit elements).
struct OperandMatrix {
  int64_t cols;
  int64_t rows;
};

RA_HOST_DEVICE constexpr OperandMatrix operand_matrix(const Strides& st, int batch, int seqlen,
                                                      int heads) {
  const int64_t last_row_start = (batch - 1) * st.batch + (heads - 1) * st.head +
                                 static_cast<int64_t>(seqlen - 1) * st.row;
  return OperandMatrix{st.row, last_row_start / st.row + 1};
}

// Whether every (batch, head) slice of the operand lies within one matrix row per sequence row:
// its start column plus `headdim` stays within st.row, for every batch and head; rows 16-byte
// aligned (the TMA global stride); row indices within int32 (the TMA coordinates).
RA_HOST_DEVICE constexpr bool operand_fits(const Strides& st, int batch, int seqlen, int heads,
                                           int headdim) {
  if (st.row < headdim || st.row % 8 != 0 || st.batch < 0 || st.head < 0 || seqlen < 1) {
    return false;
  }
  const bool batch_ok = batch == 1 || st.batch % st.row == 0;
  const bool heads_ok =
      heads == 1 || st.head % st.row == 0 || (heads - 1) * st.head + headdim <= st.row;
  return batch_ok && heads_ok && operand_matrix(st, batch, seqlen, heads).rows < (int64_t(1) << 31);
}

// The (column, row) of the matrix at which the slice of (batch b, head h) starts.
struct OperandOrigin {
  int col;
  int row;
};

RA_HOST_DEVICE constexpr OperandOrigin operand_origin(const Strides& st, int b, int h) {
  const int64_t start = b * st.batch + h * st.head;
  return OperandOrigin{static_cast<int>(start % st.row), static_cast<int>(start / st.row)};
}

// An fp32 (batch, seq, heads, headdim) accumulator with strides st (elements) as the 5-D tensor
// (32 columns, seqlen, headdim / 32 column blocks, heads, batch), read in boxes of
// 32 x box_rows x box_blocks x 1 x 1. 32 fp32 columns are one 128-byte swizzle row, the widest box
// row the swizzle allows; the column blocks as a dimension of their own let one box span
// box_blocks of them, landing as box_blocks swizzled tiles of box_rows x 128 bytes in turn. A box
// reaching past a sequence's end, the last index of its dimension, is clipped there. headdim: a
// multiple of 32.
struct AccumulatorTensor {
  int64_t dims[5];
  int64_t outer_strides[4];  // bytes, of dimensions 1 .. 4
  int box[5];
};

inline AccumulatorTensor accumulator_tensor(const Strides& st, int batch, int seqlen, int heads,
                                            int headdim, int box_rows, int box_blocks) {
  return AccumulatorTensor{{32, seqlen, headdim / 32, heads, batch},
                           {st.row * 4, 128, st.head * 4, st.batch * 4},
                           {32, box_rows, box_blocks, 1, 1}};
}

// Whether such an accumulator suits the view: base and strides 16-byte aligned, as the TMA
// requires.
inline bool accumulator_mappable(const void* base, const Strides& st) {
  return reinterpret_cast<uintptr_t>(base) % 16 == 0 && st.batch % 4 == 0 && st.head % 4 == 0 &&
         st.row % 4 == 0 && st.batch >= 0 && st.head >= 0 && st.row > 0;
}

}  // namespace sm90
}  // namespace cuda
}  // namespace ring_attn
