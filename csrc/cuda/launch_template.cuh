// __global__ entry points and launchers of the block kernels, instantiated per (dtype, head-dim
// bucket) in csrc/cuda/inst/*.cu (one translation unit each, so that builds parallelise).
#pragma once

#include <cuda_runtime_api.h>

#include "cuda/bwd_kernel.cuh"
#include "cuda/dq_kernel.cuh"
#include "cuda/fwd_kernel.cuh"

namespace ring_attn {
namespace cuda {

template <typename Traits>
__global__ void __launch_bounds__(Traits::kNThreads, 1) block_fwd_kernel(const FwdArgs args) {
  extern __shared__ __align__(16) char smem[];
  block_fwd_body<Traits>(args, smem);
}

template <typename Traits, bool kDeterministic>
__global__ void __launch_bounds__(Traits::kNThreads, 1) block_bwd_kernel(const BlockBwdParams p) {
  extern __shared__ __align__(16) char smem[];
  block_bwd_body<Traits, kDeterministic>(p, smem);
}

template <typename Traits>
__global__ void __launch_bounds__(Traits::kNThreads, 1) block_dq_kernel(const BlockBwdParams p) {
  extern __shared__ __align__(16) char smem[];
  block_dq_body<Traits>(p, smem);
}

template <typename Kernel>
cudaError_t set_smem(Kernel kernel, int bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
}

// kSmallSmem: the traits' variants within kSmallSmemPerBlock (block_attn_cuda.h small_smem_bucket).
template <bool kBF16, int kHeadDim, bool kSmallSmem = false>
cudaError_t run_fwd(const FwdArgs& args, cudaStream_t stream) {
  using Traits = FwdTraits<kBF16, kHeadDim, kSmallSmem>;
  const BlockShape& s = args.p.shape;
  const dim3 grid(cdiv(s.seqlen_q, Traits::kBlockM), s.nheads, s.batch);
  cudaError_t err = set_smem(block_fwd_kernel<Traits>, Traits::kSmemBytes);
  if (err != cudaSuccess) return err;
  block_fwd_kernel<Traits><<<grid, Traits::kNThreads, Traits::kSmemBytes, stream>>>(args);
  return cudaGetLastError();
}

// Atomic mode: one backward CTA per (key tile, query head, batch). Deterministic: one per (key
// tile, K/V head, batch), then the dQ kernel, one CTA per (query tile, head, batch).
template <bool kBF16, int kHeadDim, bool kSmallSmem = false>
cudaError_t run_bwd(const BlockBwdParams& p, cudaStream_t stream) {
  using Traits = BwdTraits<kBF16, kHeadDim, kSmallSmem>;
  const BlockShape& s = p.shape;
  const dim3 grid(cdiv(s.seqlen_k, Traits::kBlockN), p.deterministic ? s.nheads_kv : s.nheads,
                  s.batch);
  if (!p.deterministic) {
    cudaError_t err = set_smem(block_bwd_kernel<Traits, false>, Traits::kSmemBytes);
    if (err != cudaSuccess) return err;
    block_bwd_kernel<Traits, false><<<grid, Traits::kNThreads, Traits::kSmemBytes, stream>>>(p);
    return cudaGetLastError();
  }
  cudaError_t err = set_smem(block_bwd_kernel<Traits, true>, Traits::kSmemBytes);
  if (err != cudaSuccess) return err;
  block_bwd_kernel<Traits, true><<<grid, Traits::kNThreads, Traits::kSmemBytes, stream>>>(p);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  using DqKernelTraits = DqTraits<kBF16, kHeadDim, kSmallSmem>;
  const dim3 dq_grid(cdiv(s.seqlen_q, DqKernelTraits::kBlockM), s.nheads, s.batch);
  err = set_smem(block_dq_kernel<DqKernelTraits>, DqKernelTraits::kSmemBytes);
  if (err != cudaSuccess) return err;
  block_dq_kernel<DqKernelTraits>
      <<<dq_grid, DqKernelTraits::kNThreads, DqKernelTraits::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace ring_attn
