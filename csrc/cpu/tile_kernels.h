// The vector tile kernels (block_attn_cpu_tiles.inc: register-blocked GEMM micro-kernels, the
// mask and the fused softmax passes), compiled once per instruction set in namespaces generic
// (portable), avx2 (AVX2+FMA) and avx512 (AVX-512F/VL/BW/DQ), the vector ones inside
// `#pragma GCC target` regions: only the functions defined there carry the instruction set, so
// the includer is compiled for the build's baseline and runs on any x86-64. isa.h picks the one
// to run. Include once, in the kernel's file.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "cpu/x86.h"

namespace ring_attn {
namespace cpu {

namespace generic {
#include "cpu/block_attn_cpu_tiles.inc"
}  // namespace generic

#if RA_CPU_X86
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
namespace avx2 {
#define RA_TILES_AVX2 1
#include "cpu/block_attn_cpu_tiles.inc"
#undef RA_TILES_AVX2
}  // namespace avx2
#if defined(__clang__)
#pragma clang attribute pop
#pragma clang attribute push(__attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma"))), apply_to = function)
#else
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")
#endif
namespace avx512 {
#define RA_TILES_AVX512 1
#include "cpu/block_attn_cpu_tiles.inc"
#undef RA_TILES_AVX512
}  // namespace avx512
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif  // RA_CPU_X86

}  // namespace cpu
}  // namespace ring_attn
