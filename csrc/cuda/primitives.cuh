// Warp-level building blocks of the CUDA block kernels: tensor-core MMA (mma.sync m16n8k16),
// ldmatrix / stmatrix, cp.async, shuffles and reductions, vector reductions into global memory and
// packing of fp32 pairs into bf16/fp16.
//
// Compiled two ways:
//  * by nvcc for the GPU (inline PTX, sm_80+);
//  * by a host C++ compiler with RA_CUDA_EMULATE defined (csrc/cuda/emu/emu_runtime.h): every CUDA
//    thread is a std::thread and the warp-collective instructions are emulated with the fragment
//    layouts of the PTX ISA. The kernel bodies are the same source either way, so the CPU test
//    csrc/cuda/emu/test_cuda_emu.cpp checks their index math, masking, merge and synchronisation
//    on a machine without a GPU.
//
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16"), lane = 4 * g + t:
//   A (16x16, row-major):  a[0] = (g, 2t..2t+1)  a[1] = (g+8, 2t..)  a[2] = (g, 2t+8..)  a[3] = (g+8, 2t+8..)
//   B (16x8, k x n):       b[0] = (k 2t..2t+1, n g)   b[1] = (k 2t+8..2t+9, n g)
//   C (16x8, fp32):        c[0..1] = (g, 2t..2t+1)    c[2..3] = (g+8, 2t..2t+1)
// A 32-bit register holds two 16-bit elements, the lower column (or k) in the low half.
// ldmatrix.x4: lanes 8i..8i+7 give the row addresses of 8x8 matrix i; register i of lane (4g + t)
// receives row g, columns 2t..2t+1 of matrix i (with .trans: rows 2t..2t+1, column g).
// stmatrix.x4 (sm_90) is its inverse: register i of lane (4g + t) goes to row g, columns 2t..2t+1.
//
// kSm90: whether the code is compiled for sm_90 or newer (stmatrix, red.global.add.v4.f32); the
// emulator takes the sm_90 path unless RA_EMU_SM80 is defined.
#pragma once

#include <cstdint>

#include "core/macros.h"

#if defined(RA_CUDA_EMULATE)
#include "cuda/emu/emu_runtime.h"
#define RA_DEV inline
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define RA_DEV __device__ __forceinline__
#endif

namespace ring_attn {
namespace cuda {

#if defined(RA_CUDA_EMULATE)
#if defined(RA_EMU_SM80)
constexpr bool kSm90 = false;
#else
constexpr bool kSm90 = true;
#endif
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
constexpr bool kSm90 = true;
#else
constexpr bool kSm90 = false;
#endif

// ---- thread and block indices ---------------------------------------------------------------
#if defined(RA_CUDA_EMULATE)
RA_DEV int thread_idx() { return emu::thread_idx(); }
RA_DEV int block_idx_x() { return emu::block_idx(0); }
RA_DEV int block_idx_y() { return emu::block_idx(1); }
RA_DEV int block_idx_z() { return emu::block_idx(2); }
RA_DEV void sync_threads() { emu::sync_threads(); }
RA_DEV int thread_idx_reread() { return emu::thread_idx(); }
#else
RA_DEV int thread_idx() { return static_cast<int>(threadIdx.x); }
RA_DEV int block_idx_x() { return static_cast<int>(blockIdx.x); }
RA_DEV int block_idx_y() { return static_cast<int>(blockIdx.y); }
RA_DEV int block_idx_z() { return static_cast<int>(blockIdx.z); }
RA_DEV void sync_threads() { __syncthreads(); }
// The thread index read from its special register at each call: the compiler can neither hoist it
// nor what is derived from it out of a loop, so a loop that needs a thread's place can derive it
// again (a few integer instructions) instead of holding it in registers.
RA_DEV int thread_idx_reread() {
  int t;
  asm volatile("mov.u32 %0, %%tid.x;" : "=r"(t));
  return t;
}
#endif

// ---- math -----------------------------------------------------------------------------------
// Exponentials run in base 2 with log2(e) folded into the argument's FMA:
// exp(c * s - m) = exp2(s * (c * log2(e)) - m * log2(e)), one FFMA and one ex2 per score.
constexpr float kLog2eF = 1.44269504088896341f;
#if defined(RA_CUDA_EMULATE)
RA_DEV float fast_exp2(float x) { return std::exp2(x); }
RA_DEV float fmax_f(float a, float b) { return std::fmax(a, b); }  // as fmaxf: NaN drops out
#else
RA_DEV float fast_exp2(float x) {  // ex2.approx.ftz: 2^-inf = +0
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
RA_DEV float fmax_f(float a, float b) { return fmaxf(a, b); }
#endif

// ---- warp barrier -------------------------------------------------------------------------------
// The warp's lanes meet here; their shared-memory writes before it are visible to each other after.
RA_DEV void sync_warp() {
#if defined(RA_CUDA_EMULATE)
  emu::warp().bar.arrive_and_wait();
#else
  __syncwarp();
#endif
}

// ---- shuffles ---------------------------------------------------------------------------------
template <typename T>
RA_DEV T shfl_xor(T v, int mask) {
#if defined(RA_CUDA_EMULATE)
  return emu::shfl_xor(v, mask);
#else
  return __shfl_xor_sync(0xffffffffu, v, mask);
#endif
}

// ---- warp reductions of 32-bit integers (redux.sync on sm_80+): every lane gets the result ------
#if defined(RA_CUDA_EMULATE)
// Butterfly over the warp; pick(a, b) returns the value kept.
template <typename Pick>
RA_DEV int32_t warp_reduce(int32_t v, Pick pick) {
  for (int off = 16; off > 0; off /= 2) v = pick(v, shfl_xor(v, off));
  return v;
}
#endif

RA_DEV int32_t warp_min(int32_t v) {
#if defined(RA_CUDA_EMULATE)
  return warp_reduce(v, [](int32_t a, int32_t b) { return b < a ? b : a; });
#else
  return __reduce_min_sync(0xffffffffu, v);
#endif
}

RA_DEV int32_t warp_max(int32_t v) {
#if defined(RA_CUDA_EMULATE)
  return warp_reduce(v, [](int32_t a, int32_t b) { return b > a ? b : a; });
#else
  return __reduce_max_sync(0xffffffffu, v);
#endif
}

RA_DEV bool warp_any(bool v) {
#if defined(RA_CUDA_EMULATE)
  return warp_max(v ? 1 : 0) != 0;
#else
  return __any_sync(0xffffffffu, v) != 0;
#endif
}

// Bit i: lane i's v. Every lane gets the same mask.
RA_DEV uint32_t warp_ballot(bool v) {
#if defined(RA_CUDA_EMULATE)
  return emu::ballot(v);
#else
  return __ballot_sync(0xffffffffu, v);
#endif
}

RA_DEV int popcount(uint32_t v) {
#if defined(RA_CUDA_EMULATE)
  return __builtin_popcount(v);
#else
  return __popc(v);
#endif
}

// ---- fp32 pair <-> 16-bit pair ----------------------------------------------------------------
// kBF16: bfloat16, else float16. Round to nearest even.
template <bool kBF16>
RA_DEV uint32_t pack2(float lo, float hi) {
#if defined(RA_CUDA_EMULATE)
  return emu::pack2<kBF16>(lo, hi);
#else
  if constexpr (kBF16) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  } else {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
#endif
}

// ---- tensor cores -----------------------------------------------------------------------------
// d += a * b  (16x8x16, fp32 accumulate)
template <bool kBF16>
RA_DEV void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(RA_CUDA_EMULATE)
  emu::mma_16816<kBF16>(d, a, b0, b1);
#else
#define RA_MMA_16816(TY)                                                                       \
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." TY "." TY ".f32 {%0,%1,%2,%3}, "         \
               "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"                                       \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                                \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1))
  if constexpr (kBF16) {
    RA_MMA_16816("bf16");
  } else {
    RA_MMA_16816("f16");
  }
#undef RA_MMA_16816
#endif
}

// Four 8x8 b16 matrices from shared memory (kTrans: each transposed); this lane supplies the
// address of row (lane % 8) of matrix (lane / 8).
template <bool kTrans = false>
RA_DEV void ldmatrix_x4(uint32_t (&r)[4], const uint16_t* smem_row) {
#if defined(RA_CUDA_EMULATE)
  emu::ldmatrix_x4(r, smem_row, kTrans);
#else
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem_row));
  if constexpr (kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
  }
#endif
}

// Inverse of ldmatrix_x4 (sm_90 and newer): this lane supplies the address of row (lane % 8) of
// matrix (lane / 8) and register i of lane (4g + t) holds row g, columns 2t..2t+1 of matrix i.
RA_DEV void stmatrix_x4(const uint32_t (&r)[4], uint16_t* smem_row) {
#if defined(RA_CUDA_EMULATE)
  emu::stmatrix_x4(r, smem_row);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem_row));
  asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1,%2,%3,%4};\n" ::"r"(addr),
               "r"(r[0]), "r"(r[1]), "r"(r[2]), "r"(r[3])
               : "memory");
#else
  __trap();  // callers check kSm90
#endif
}

// ---- asynchronous global -> shared copies -------------------------------------------------------
// 16 bytes, of which the first src_bytes (0 or 16) are read and the rest zero-filled (src must
// still be a valid address).
RA_DEV void cp_async_16(void* smem, const void* gmem, int src_bytes) {
#if defined(RA_CUDA_EMULATE)
  emu::cp_async_16(smem, gmem, src_bytes);
#else
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(addr), "l"(gmem),
               "r"(src_bytes)
               : "memory");
#endif
}

// 4 bytes (one int32 or float); when !valid the destination is zero-filled and nothing is read.
RA_DEV void cp_async_4(void* smem, const void* gmem, bool valid) {
#if defined(RA_CUDA_EMULATE)
  emu::cp_async_4(smem, gmem, valid);
#else
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const int bytes = valid ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(addr), "l"(gmem), "r"(bytes)
               : "memory");
#endif
}

RA_DEV void cp_async_commit() {
#if defined(RA_CUDA_EMULATE)
  emu::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
RA_DEV void cp_async_wait() {
#if defined(RA_CUDA_EMULATE)
  emu::cp_async_wait(N);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// ---- fp32 accumulation into global memory ----------------------------------------------------------
// p[0..N) += v[0..N) as one reduction (no return value): red.global.add.v{2,4}.f32 on sm_90, N
// scalar reductions before. p must be 4N-byte aligned.
template <int N>
RA_DEV void red_add(float* p, const float (&v)[N]) {
  static_assert(N == 1 || N == 2 || N == 4, "reduction width");
#if defined(RA_CUDA_EMULATE)
  emu::red_add(p, v, N, kSm90);
#else
  if constexpr (kSm90 && N == 4) {
    asm volatile("red.global.add.v4.f32 [%0], {%1,%2,%3,%4};\n" ::"l"(p), "f"(v[0]), "f"(v[1]),
                 "f"(v[2]), "f"(v[3])
                 : "memory");
  } else if constexpr (kSm90 && N == 2) {
    asm volatile("red.global.add.v2.f32 [%0], {%1,%2};\n" ::"l"(p), "f"(v[0]), "f"(v[1])
                 : "memory");
  } else {
    for (int i = 0; i < N; ++i) atomicAdd(p + i, v[i]);
  }
#endif
}

}  // namespace cuda
}  // namespace ring_attn
