// Compile-time dispatch of the CUDA block kernels (in the style of flash-attention's
// static_switch.h): each macro turns a runtime value into a constexpr name inside its lambda.
//
//   DTYPE_SWITCH(p.dtype, kBF16, [&] { return run<kBF16>(...); });
//   HEADDIM_SWITCH(p.shape.headdim, kHeadDim, [&] { ... });
//   BOOL_SWITCH(flag, kFlag, [&] { ... });
//
// Head dims are rounded up to the next compiled bucket (32, 64, 96, 128, 256); the kernels
// zero-fill the columns beyond the real head dim, so any multiple of 8 up to kMaxHeadDim runs.
// The callers check support (block_attn_cuda.h: support_error) before switching.
#pragma once

#include "core/params.h"

#define BOOL_SWITCH(COND, CONST_NAME, ...)      \
  [&] {                                         \
    if (COND) {                                 \
      constexpr static bool CONST_NAME = true;  \
      return __VA_ARGS__();                     \
    } else {                                    \
      constexpr static bool CONST_NAME = false; \
      return __VA_ARGS__();                     \
    }                                           \
  }()

// bf16 -> kBF16 = true, fp16 -> kBF16 = false (other dtypes are rejected before dispatch).
#define DTYPE_SWITCH(DTYPE, CONST_NAME, ...) \
  BOOL_SWITCH((DTYPE) == ::ring_attn::DType::kBFloat16, CONST_NAME, __VA_ARGS__)

#define HEADDIM_SWITCH(HEADDIM, CONST_NAME, ...) \
  [&] {                                          \
    if ((HEADDIM) <= 32) {                       \
      constexpr static int CONST_NAME = 32;      \
      return __VA_ARGS__();                      \
    } else if ((HEADDIM) <= 64) {                \
      constexpr static int CONST_NAME = 64;      \
      return __VA_ARGS__();                      \
    } else if ((HEADDIM) <= 96) {                \
      constexpr static int CONST_NAME = 96;      \
      return __VA_ARGS__();                      \
    } else if ((HEADDIM) <= 128) {               \
      constexpr static int CONST_NAME = 128;     \
      return __VA_ARGS__();                      \
    } else {                                     \
      constexpr static int CONST_NAME = 256;     \
      return __VA_ARGS__();                      \
    }                                            \
  }()
