// sm_90a building blocks of the Hopper block kernels: wgmma.mma_async (m64nNk16, bf16/fp16 with
// fp32 accumulators, both operands from shared memory or A from registers), TMA 2D tensor loads
// completing on mbarriers, TMA 5D tensor reduce-adds from shared to global memory,
// mbarriers, fence.proxy.async, named barriers and setmaxnreg.
//
// Compiled two ways, as primitives.cuh:
//  * by nvcc for sm_90a (inline PTX where __CUDA_ARCH_FEAT_SM90_ALL: sm_90a with its `a` features);
//  * by a host compiler with RA_CUDA_EMULATE (emu/emu_sm90.h), where every asynchronous operation
//    completes only at its wait, so a missing wait or fence fails the emulated tests.
//
// Shared-memory operands use the 128-byte swizzle (sm90_layout.h). Fragment of thread 4g + q of
// warp w of a warpgroup, accumulator register i of m64nNk16 (N / 2 per thread):
//   D (row 16w + g + 8 ((i / 2) % 2), column 8 (i / 4) + 2q + i % 2)
// register A a[j] of m64k16: (row 16w + g + 8 (j % 2), k 2q + 8 (j / 2) + {0, 1}), the lower k in
// the low half, as mma.m16n8k16's A fragment.
//
// Descriptors: kTransA / kTransB false means the operand is K-major (B stored N x K), true that
// it is MN-major. scale_d false: D = A B, true: D += A B.
#pragma once

#include <cstdint>

#include "cuda/primitives.cuh"
#include "cuda/sm90_layout.h"
#include "cuda/warp_mma.cuh"  // RA_UNROLL

#if defined(RA_CUDA_EMULATE)
#include "cuda/emu/emu_sm90.h"
#else
#include <cuda.h>
#endif

// The device pass of an sm_90a build: the PTX bodies. Device passes for other targets compile
// bodies that trap (the sm_90a kernels are launched only where their sm_90a code exists).
#if !defined(RA_CUDA_EMULATE) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define RA_SM90A 1
#endif

namespace ring_attn {
namespace cuda {
namespace sm90 {

#if defined(RA_CUDA_EMULATE)
using TensorMap = emu::TensorMap;
#else
using TensorMap = CUtensorMap;
#endif

// ---- shared-memory addresses and descriptors ----------------------------------------------------
// The shared-window address of p (p must lie in shared memory).
RA_DEV uint32_t smem_address(const void* p) {
#if defined(RA_CUDA_EMULATE)
  return emu::smem_address(p, 1, 1, "shared-memory address of a pointer outside shared memory");
#else
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
#endif
}

// The descriptor of a 128-byte-swizzled operand that starts at p (lbo, sbo: sm90_layout.h).
RA_DEV uint64_t smem_desc(const void* p, uint32_t lbo, uint32_t sbo) {
  return make_smem_desc(smem_address(p), lbo, sbo);
}

// ---- mbarriers --------------------------------------------------------------------------------
// Phase 0 starts with `count` arrivals expected.
RA_DEV void mbar_init(uint64_t* bar, int count) {
#if defined(RA_CUDA_EMULATE)
  emu::mbar_init(bar, count);
#elif defined(RA_SM90A)
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_address(bar)), "r"(count)
               : "memory");
#else
  __trap();
#endif
}

// One arrival on the current phase, which also expects `bytes` more transaction bytes.
RA_DEV void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
#if defined(RA_CUDA_EMULATE)
  emu::mbar_arrive(bar, bytes);
#elif defined(RA_SM90A)
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_address(bar)),
               "r"(bytes)
               : "memory");
#else
  __trap();
#endif
}

RA_DEV void mbar_arrive(uint64_t* bar) {
#if defined(RA_CUDA_EMULATE)
  emu::mbar_arrive(bar, 0);
#elif defined(RA_SM90A)
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_address(bar)) : "memory");
#else
  __trap();
#endif
}

// Whether the phase of parity `parity` has completed (the barrier's phases alternate 0, 1, 0, ..).
RA_DEV bool mbar_try_wait(uint64_t* bar, int parity) {
#if defined(RA_CUDA_EMULATE)
  return emu::mbar_try_wait(bar, parity);
#elif defined(RA_SM90A)
  uint32_t done;
  asm volatile(
      "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
      "selp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(done)
      : "r"(smem_address(bar)), "r"(parity)
      : "memory");
  return done != 0;
#else
  __trap();
  return false;
#endif
}

RA_DEV void mbar_wait(uint64_t* bar, int parity) {
#if defined(RA_CUDA_EMULATE)
  emu::mbar_wait(bar, parity);
#elif defined(RA_SM90A)
  while (!mbar_try_wait(bar, parity)) {
  }
#else
  __trap();
#endif
}

// Makes this thread's generic shared-memory writes (stores, mbarrier.init) visible to the async
// proxy (wgmma operand reads, TMA).
RA_DEV void fence_proxy_async() {
#if defined(RA_CUDA_EMULATE)
  emu::fence_proxy_async();
#elif defined(RA_SM90A)
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#else
  __trap();
#endif
}

// ---- TMA ----------------------------------------------------------------------------------------
// The box whose first element is (column c0, row c1) of the tensor `map` describes into shared
// memory at dst (1024-byte aligned with the 128-byte swizzle, else 128); elements outside the
// tensor read as zero. Completes its bytes on `bar` (to be expected there with
// mbar_arrive_expect_tx). map: a kernel parameter (__grid_constant__) or in global memory.
RA_DEV void tma_load_2d(void* dst, const TensorMap* map, uint64_t* bar, int c0, int c1) {
#if defined(RA_CUDA_EMULATE)
  emu::tma_load_2d(dst, map, bar, c0, c1);
#elif defined(RA_SM90A)
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, "
      "%4}], [%2];\n" ::"r"(smem_address(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(smem_address(bar)), "r"(c0), "r"(c1)
      : "memory");
#else
  __trap();
#endif
}

// ---- TMA tensor reductions ---------------------------------------------------------------------
// The box of the fp32 tensor `map` whose first element is (c0, .., c4) += the box at src, laid
// out as a TMA load of it lands (1024-byte aligned with the 128-byte swizzle, else 128),
// element-wise atomic in global memory; elements outside the tensor are left out. Read from
// shared memory by the async proxy: src written by generic stores must be published by
// fence.proxy.async first, and must stay unchanged until a bulk_wait_group_read has retired the
// group (bulk_commit_group) holding the reduction. map: a kernel parameter (__grid_constant__) or
// in global memory.
RA_DEV void tma_reduce_add_5d(const void* src, const TensorMap* map, int c0, int c1, int c2,
                              int c3, int c4) {
#if defined(RA_CUDA_EMULATE)
  const int coords[5] = {c0, c1, c2, c3, c4};
  emu::tma_reduce_add_f32(src, map, coords, 5);
#elif defined(RA_SM90A)
  asm volatile(
      "cp.reduce.async.bulk.tensor.5d.global.shared::cta.add.tile.bulk_group [%0, {%2, %3, %4, "
      "%5, %6}], [%1];\n" ::"l"(reinterpret_cast<uint64_t>(map)),
      "r"(smem_address(src)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(c4)
      : "memory");
#else
  __trap();
#endif
}

// Closes this thread's group of the TMA tensor reductions issued since its last commit.
RA_DEV void bulk_commit_group() {
#if defined(RA_CUDA_EMULATE)
  emu::bulk_commit_group();
#elif defined(RA_SM90A)
  asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
#else
  __trap();
#endif
}

// Waits until at most N of this thread's committed bulk groups still read their shared-memory
// sources; the sources of the others may then be overwritten.
template <int N>
RA_DEV void bulk_wait_group_read() {
#if defined(RA_CUDA_EMULATE)
  emu::bulk_wait_group_read(N);
#elif defined(RA_SM90A)
  asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(N) : "memory");
#else
  __trap();
#endif
}

// ---- named barriers (ids 1..15; 0 is __syncthreads) -------------------------------------------
// Waits until `nthreads` threads (a multiple of 32) have arrived at barrier `id`.
RA_DEV void named_sync(int id, int nthreads) {
#if defined(RA_CUDA_EMULATE)
  emu::named_barrier(id, nthreads, true);
#elif defined(RA_SM90A)
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(nthreads) : "memory");
#else
  __trap();
#endif
}

// Arrives at barrier `id` without waiting.
RA_DEV void named_arrive(int id, int nthreads) {
#if defined(RA_CUDA_EMULATE)
  emu::named_barrier(id, nthreads, false);
#elif defined(RA_SM90A)
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(nthreads) : "memory");
#else
  __trap();
#endif
}

// ---- warpgroups ---------------------------------------------------------------------------------
// This thread's warpgroup (thread index / 128), read from lane 0: the compiler then knows it to be
// the same across the warp and keeps what derives from it (descriptors) in uniform registers.
RA_DEV int warpgroup_idx() {
#if defined(RA_CUDA_EMULATE)
  return thread_idx() / 128;
#else
  return __shfl_sync(0xffffffffu, thread_idx() / 128, 0);
#endif
}

// ---- register reallocation between warpgroups (no-ops under emulation) -------------------------
template <int kRegs>
RA_DEV void setmaxnreg_inc() {
  static_assert(kRegs >= 24 && kRegs <= 256 && kRegs % 8 == 0, "setmaxnreg count");
#if defined(RA_SM90A)
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs));
#elif !defined(RA_CUDA_EMULATE)
  __trap();
#endif
}

template <int kRegs>
RA_DEV void setmaxnreg_dec() {
  static_assert(kRegs >= 24 && kRegs <= 256 && kRegs % 8 == 0, "setmaxnreg count");
#if defined(RA_SM90A)
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs));
#elif !defined(RA_CUDA_EMULATE)
  __trap();
#endif
}

// ---- wgmma ------------------------------------------------------------------------------------
// Orders this warpgroup's register accesses before the wgmma.mma_async that follow: needed before
// the first wgmma after the accumulators or A registers were touched by other instructions.
RA_DEV void wgmma_fence() {
#if defined(RA_CUDA_EMULATE)
  emu::wgmma_fence();
#elif defined(RA_SM90A)
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#else
  __trap();
#endif
}

// Closes the group of the wgmma.mma_async issued since the last commit.
RA_DEV void wgmma_commit() {
#if defined(RA_CUDA_EMULATE)
  emu::wgmma_commit();
#elif defined(RA_SM90A)
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#else
  __trap();
#endif
}

// Waits until at most N committed groups are in flight; their accumulators are then readable.
template <int N>
RA_DEV void wgmma_wait() {
#if defined(RA_CUDA_EMULATE)
  emu::wgmma_wait(N);
#elif defined(RA_SM90A)
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#else
  __trap();
#endif
}

// The inline PTX of wgmma m64nNk16: operands %0 .. %(N/2 - 1) are the accumulators ("+f"), then
// (shared A) descriptor A, descriptor B, scale-d, trans-A, trans-B or (register A) the four A
// registers, descriptor B, scale-d, trans-B; scale-d becomes the predicate p.
// clang-format off
#if defined(RA_SM90A)
#define RA_WGMMA_D64 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define RA_WGMMA_SS_TAIL64 "%32, %33, p, 1, 1, %35, %36"
#define RA_WGMMA_SS_SETP64 "%34"
#define RA_WGMMA_RS_TAIL64 "{%32, %33, %34, %35}, %36, p, 1, 1, %38"
#define RA_WGMMA_RS_SETP64 "%37"
#define RA_WGMMA_D128 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"
#define RA_WGMMA_SS_TAIL128 "%64, %65, p, 1, 1, %67, %68"
#define RA_WGMMA_SS_SETP128 "%66"
#define RA_WGMMA_RS_TAIL128 "{%64, %65, %66, %67}, %68, p, 1, 1, %70"
#define RA_WGMMA_RS_SETP128 "%69"
#define RA_WGMMA_D256 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}"
#define RA_WGMMA_SS_TAIL256 "%128, %129, p, 1, 1, %131, %132"
#define RA_WGMMA_SS_SETP256 "%130"
#define RA_WGMMA_RS_TAIL256 "{%128, %129, %130, %131}, %132, p, 1, 1, %134"
#define RA_WGMMA_RS_SETP256 "%133"
#define RA_F4(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3])
#define RA_F16(i) RA_F4(i), RA_F4(i + 4), RA_F4(i + 8), RA_F4(i + 12)
#define RA_F32(i) RA_F16(i), RA_F16(i + 16)
#define RA_F64(i) RA_F32(i), RA_F32(i + 32)
#define RA_F128(i) RA_F64(i), RA_F64(i + 64)
#define RA_WGMMA_SS(N, TY, DOPS)                                                                  \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " RA_WGMMA_SS_SETP##N ", 0;\n"                \
               "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TY "." TY " " RA_WGMMA_D##N   \
               ", " RA_WGMMA_SS_TAIL##N ";\n}\n"                                                \
               : DOPS                                                                           \
               : "l"(desc_a), "l"(desc_b), "r"(static_cast<int>(scale_d)),                      \
                 "n"(static_cast<int>(kTransA)), "n"(static_cast<int>(kTransB)))
#define RA_WGMMA_RS(N, TY, DOPS)                                                                  \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " RA_WGMMA_RS_SETP##N ", 0;\n"                \
               "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TY "." TY " " RA_WGMMA_D##N   \
               ", " RA_WGMMA_RS_TAIL##N ";\n}\n"                                                \
               : DOPS                                                                           \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b),                       \
                 "r"(static_cast<int>(scale_d)), "n"(static_cast<int>(kTransB)))
// WGMMA(N, type, accumulator operands) for the template's N (64, 128, 256) and kBF16.
#define RA_WGMMA_FOR_N_AND_TYPE(WGMMA)                                                     \
  if constexpr (N == 64) {                                                                  \
    if constexpr (kBF16) WGMMA(64, "bf16", RA_F32(0)); else WGMMA(64, "f16", RA_F32(0));    \
  } else if constexpr (N == 128) {                                                          \
    if constexpr (kBF16) WGMMA(128, "bf16", RA_F64(0)); else WGMMA(128, "f16", RA_F64(0));  \
  } else {                                                                                  \
    if constexpr (kBF16) WGMMA(256, "bf16", RA_F128(0)); else WGMMA(256, "f16", RA_F128(0)); \
  }
#endif
// clang-format on

// D (64 x N) (+)= A (64 x 16) B (16 x N), both operands in shared memory. N: 64, 128 or 256.
template <bool kBF16, int N, bool kTransA, bool kTransB>
RA_DEV void wgmma_ss(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b, bool scale_d) {
  static_assert(N == 64 || N == 128 || N == 256, "wgmma N");
#if defined(RA_CUDA_EMULATE)
  emu::WgmmaOp op{N, kBF16, false, desc_a, desc_b, kTransA, kTransB, {0, 0, 0, 0}, d, scale_d};
  emu::wgmma_issue(op);
#elif defined(RA_SM90A)
  RA_WGMMA_FOR_N_AND_TYPE(RA_WGMMA_SS);
#else
  __trap();
#endif
}

// The same with A (64 x 16) from registers (the fragment layout above), B in shared memory.
template <bool kBF16, int N, bool kTransB>
RA_DEV void wgmma_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t desc_b, bool scale_d) {
  static_assert(N == 64 || N == 128 || N == 256, "wgmma N");
#if defined(RA_CUDA_EMULATE)
  emu::WgmmaOp op{N, kBF16, true, 0, desc_b, false, kTransB, {a[0], a[1], a[2], a[3]}, d, scale_d};
  emu::wgmma_issue(op);
#elif defined(RA_SM90A)
  RA_WGMMA_FOR_N_AND_TYPE(RA_WGMMA_RS);
#else
  __trap();
#endif
}

// A thread's kRegs accumulator registers of a 64 x (4 kRegs) fragment rounded to 16 bits as the
// register-A fragments of wgmma_rs for the kRegs / 8 k16 steps over its columns: a[kc][j] holds
// fragment row half j % 2, columns 16 kc + 8 (j / 2) + 2 t4 + {0, 1}.
template <bool kBF16, int kRegs>
RA_DEV void pack_a_fragments(const float (&x)[kRegs], uint32_t (&a)[kRegs / 8][4]) {
  RA_UNROLL
  for (int kc = 0; kc < kRegs / 8; ++kc) {
    RA_UNROLL
    for (int j = 0; j < 4; ++j) {
      const int i = 4 * (2 * kc + j / 2) + 2 * (j % 2);
      a[kc][j] = pack2<kBF16>(x[i], x[i + 1]);
    }
  }
}

}  // namespace sm90
}  // namespace cuda
}  // namespace ring_attn
