// __global__ entry points and launchers of the block kernels, instantiated per (dtype, head-dim
// bucket) in csrc/cuda/inst/*.cu (one translation unit each, so that builds parallelise).
#pragma once

#include <cuda_runtime_api.h>

#include "cuda/bwd_kernel.cuh"
#include "cuda/dq_kernel.cuh"
#include "cuda/fwd_kernel.cuh"

namespace ring_attn {
namespace cuda {

template <typename Kt>
__global__ void __launch_bounds__(Kt::kNThreads, 1) block_fwd_kernel(const FwdArgs args) {
  extern __shared__ __align__(16) char smem[];
  block_fwd_body<Kt>(args, smem);
}

template <typename Kt, bool kDeterministic>
__global__ void __launch_bounds__(Kt::kNThreads, 1) block_bwd_kernel(const BlockBwdParams p) {
  extern __shared__ __align__(16) char smem[];
  block_bwd_body<Kt, kDeterministic>(p, smem);
}

template <typename Kt>
__global__ void __launch_bounds__(Kt::kNThreads, 1) block_dq_kernel(const BlockBwdParams p) {
  extern __shared__ __align__(16) char smem[];
  block_dq_body<Kt>(p, smem);
}

template <typename Kernel>
cudaError_t set_smem(Kernel kernel, int bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
}

template <bool kBF16, int kHeadDim>
cudaError_t run_fwd(const FwdArgs& args, cudaStream_t stream) {
  using Kt = FwdTraits<kBF16, kHeadDim>;
  const BlockShape& s = args.p.shape;
  const dim3 grid((s.seqlen_q + Kt::kBlockM - 1) / Kt::kBlockM, s.nheads, s.batch);
  cudaError_t err = set_smem(block_fwd_kernel<Kt>, Kt::kSmemBytes);
  if (err != cudaSuccess) return err;
  block_fwd_kernel<Kt><<<grid, Kt::kNThreads, Kt::kSmemBytes, stream>>>(args);
  return cudaGetLastError();
}

// Atomic mode: one backward CTA per (key tile, query head, batch). Deterministic: one per (key
// tile, K/V head, batch), then the dQ kernel, one CTA per (query tile, head, batch).
template <bool kBF16, int kHeadDim>
cudaError_t run_bwd(const BlockBwdParams& p, cudaStream_t stream) {
  using Kt = BwdTraits<kBF16, kHeadDim>;
  const BlockShape& s = p.shape;
  const dim3 grid((s.seqlen_k + Kt::kBlockN - 1) / Kt::kBlockN,
                  p.deterministic ? s.nheads_kv : s.nheads, s.batch);
  if (!p.deterministic) {
    cudaError_t err = set_smem(block_bwd_kernel<Kt, false>, Kt::kSmemBytes);
    if (err != cudaSuccess) return err;
    block_bwd_kernel<Kt, false><<<grid, Kt::kNThreads, Kt::kSmemBytes, stream>>>(p);
    return cudaGetLastError();
  }
  cudaError_t err = set_smem(block_bwd_kernel<Kt, true>, Kt::kSmemBytes);
  if (err != cudaSuccess) return err;
  block_bwd_kernel<Kt, true><<<grid, Kt::kNThreads, Kt::kSmemBytes, stream>>>(p);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  using Dt = DqTraits<kBF16, kHeadDim>;
  const dim3 dq_grid((s.seqlen_q + Dt::kBlockM - 1) / Dt::kBlockM, s.nheads, s.batch);
  err = set_smem(block_dq_kernel<Dt>, Dt::kSmemBytes);
  if (err != cudaSuccess) return err;
  block_dq_kernel<Dt><<<dq_grid, Dt::kNThreads, Dt::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace ring_attn
