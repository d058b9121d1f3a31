// Host side of the sm_90a TMA: the tensor maps, encoded by the driver's cuTensorMapEncodeTiled
// (found through the runtime, so nothing links against libcuda; needs CUDA 12.5 or newer), all in
// 128-byte-swizzled boxes: 2-D maps of 16-bit operands that the kernels load (out-of-bounds
// elements read as zero), and 5-D maps of fp32 accumulators that they add to by TMA reductions
// (out-of-bounds elements left out).
#pragma once

#include <cuda.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda/sm90_fwd_geometry.h"

namespace ring_attn {
namespace cuda {
namespace sm90 {

using EncodeTiled = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*,
                                 const cuuint64_t*, const cuuint64_t*, const cuuint32_t*,
                                 const cuuint32_t*, CUtensorMapInterleave, CUtensorMapSwizzle,
                                 CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

// cuTensorMapEncodeTiled from the driver, or null where the driver has none.
inline EncodeTiled encode_tiled() {
  static const EncodeTiled fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult found{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault,
                                         &found) != cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      cudaGetLastError();
      return static_cast<EncodeTiled>(nullptr);
    }
    return reinterpret_cast<EncodeTiled>(f);
  }();
  return fn;
}

// The tensor map of a `rank`-dimensional tensor (dims[0] elements contiguous, dimension i > 0
// outer_strides[i - 1] bytes apart) in 128-byte-swizzled boxes of box[0] x .. elements.
// cudaErrorNotSupported where the driver cannot encode tensor maps, cudaErrorInvalidValue where
// it rejects the arguments.
inline cudaError_t encode_swizzled_map(CUtensorMap* map, CUtensorMapDataType type, uint32_t rank,
                                       const void* base, const cuuint64_t* dims,
                                       const cuuint64_t* outer_strides, const cuuint32_t* box) {
  const EncodeTiled encode = encode_tiled();
  if (encode == nullptr) return cudaErrorNotSupported;
  const cuuint32_t elem_strides[5] = {1, 1, 1, 1, 1};
  const CUresult r = encode(map, type, rank, const_cast<void*>(base), dims, outer_strides, box,
                            elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                            CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
                            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

// The tensor map of a row-major matrix of `rows` x `cols` bf16 (or fp16) elements, rows
// `row_stride_bytes` apart, in boxes of box_rows x box_cols.
inline cudaError_t make_tensor_map_2d(CUtensorMap* map, const void* base, bool bf16,
                                      uint64_t cols, uint64_t rows, uint64_t row_stride_bytes,
                                      uint32_t box_cols, uint32_t box_rows) {
  const cuuint64_t dims[2] = {cols, rows};
  const cuuint64_t row_stride[1] = {row_stride_bytes};
  const cuuint32_t box[2] = {box_cols, box_rows};
  return encode_swizzled_map(
      map, bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 2, base,
      dims, row_stride, box);
}

// A (batch, seq, heads, headdim) operand's matrix (sm90_fwd_geometry.h) in boxes of 64 columns x
// `box_rows` rows, as the Hopper kernels read it.
inline cudaError_t make_operand_map(CUtensorMap* map, const void* base, const Strides& st,
                                    int batch, int seqlen, int heads, bool bf16, int box_rows) {
  const OperandMatrix m = operand_matrix(st, batch, seqlen, heads);
  return make_tensor_map_2d(map, base, bf16, static_cast<uint64_t>(m.cols),
                            static_cast<uint64_t>(m.rows), static_cast<uint64_t>(m.cols) * 2, 64,
                            static_cast<uint32_t>(box_rows));
}

// The tensor map of an fp32 (batch, seq, heads, headdim) accumulator with strides st (elements):
// its 5-D view (sm90_fwd_geometry.h accumulator_tensor).
inline cudaError_t make_accumulator_map(CUtensorMap* map, void* base, const Strides& st,
                                        int batch, int seqlen, int heads, int headdim,
                                        int box_rows, int box_blocks) {
  const AccumulatorTensor a =
      accumulator_tensor(st, batch, seqlen, heads, headdim, box_rows, box_blocks);
  cuuint64_t dims[5], strides[4];
  cuuint32_t box[5];
  for (int i = 0; i < 5; ++i) {
    dims[i] = static_cast<cuuint64_t>(a.dims[i]);
    box[i] = static_cast<cuuint32_t>(a.box[i]);
    if (i < 4) strides[i] = static_cast<cuuint64_t>(a.outer_strides[i]);
  }
  return encode_swizzled_map(map, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 5, base, dims, strides, box);
}

}  // namespace sm90
}  // namespace cuda
}  // namespace ring_attn
