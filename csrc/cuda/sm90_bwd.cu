// The Hopper backward: the dK/dV kernel (sm90_bwd_kernel.cuh), with dQ fused or not, and the dQ
// kernel (sm90_dq_kernel.cuh), their __global__ entry points, tensor maps and launcher,
// instantiated for bf16 and fp16 at head dims 64 and 128. Compiled for sm_90a only;
// block_attn_cuda.cu launches it on devices of compute capability 9.0 when
// RING_ATTN_CUDA_KERNEL=sm90a.
#include "cuda/sm90_bwd_kernel.cuh"
#include "cuda/sm90_dq_kernel.cuh"
#include "cuda/sm90_tensor_map.h"

namespace ring_attn {
namespace cuda {
namespace sm90 {

template <typename Traits>
__global__ void __launch_bounds__(Traits::kNThreads, 1)
    block_dkdv_kernel(const BlockBwdParams p, const __grid_constant__ DkdvMaps maps) {
  extern __shared__ __align__(1024) char smem[];
  block_dkdv_body<Traits>(p, maps, smem);
}

template <typename Traits>
__global__ void __launch_bounds__(Traits::kNThreads, 1)
    block_dq_kernel(const BlockBwdParams p, const __grid_constant__ DqMaps maps) {
  extern __shared__ __align__(1024) char smem[];
  block_dq_body<Traits>(p, maps, smem);
}

namespace {

// The dK/dV kernel's maps: K, V in boxes of block_n rows, Q, dO in boxes of block_m rows.
cudaError_t make_dkdv_maps(DkdvMaps* maps, const BlockBwdParams& p, bool bf16, int block_n,
                           int block_m) {
  const BlockShape& s = p.shape;
  cudaError_t err = make_operand_map(&maps->k, p.k, p.k_strides, s.batch, s.seqlen_k,
                                     s.nheads_kv, bf16, block_n);
  if (err == cudaSuccess) {
    err = make_operand_map(&maps->v, p.v, p.v_strides, s.batch, s.seqlen_k, s.nheads_kv, bf16,
                           block_n);
  }
  if (err == cudaSuccess) {
    err = make_operand_map(&maps->q, p.q, p.q_strides, s.batch, s.seqlen_q, s.nheads, bf16,
                           block_m);
  }
  if (err == cudaSuccess) {
    err = make_operand_map(&maps->dout, p.dout, p.dout_strides, s.batch, s.seqlen_q, s.nheads,
                           bf16, block_m);
  }
  return err;
}

// The dK/dV kernel (Traits: fused dQ or not), one CTA per (key tile, K/V head, batch).
template <typename Traits>
cudaError_t launch_dkdv(const BlockBwdParams& p, const DkdvMaps& maps, cudaStream_t stream) {
  const cudaError_t err = cudaFuncSetAttribute(
      block_dkdv_kernel<Traits>, cudaFuncAttributeMaxDynamicSharedMemorySize, Traits::kSmemBytes);
  if (err != cudaSuccess) return err;
  const BlockShape& s = p.shape;
  const dim3 grid((s.seqlen_k + Traits::kBlockN - 1) / Traits::kBlockN, s.nheads_kv, s.batch);
  block_dkdv_kernel<Traits><<<grid, Traits::kNThreads, Traits::kSmemBytes, stream>>>(p, maps);
  return cudaGetLastError();
}

}  // namespace

// Not deterministic (and dq_acc expressible as its tensor map: 16-byte aligned base and strides):
// the dK/dV kernel with dQ fused, added by TMA reductions through that map. Otherwise the dK/dV
// kernel, then the dQ kernel, one CTA per (query tile, head, batch); no reductions, every sum in
// a fixed order.
template <bool kBF16, int kHeadDim>
cudaError_t run_bwd(const BlockBwdParams& p, cudaStream_t stream) {
  using Traits = DkdvTraits<kBF16, kHeadDim, false>;
  using FusedTraits = DkdvTraits<kBF16, kHeadDim, true>;
  using DqKernelTraits = DqTraits<kBF16, kHeadDim>;
  static_assert(Traits::kBlockN == DqKernelTraits::kBlockN, "one K and one V map for both kernels");
  static_assert(Traits::kBlockN == FusedTraits::kBlockN && Traits::kBlockM == FusedTraits::kBlockM,
                "one set of maps for both dK/dV kernels");
  const BlockShape& s = p.shape;
  DkdvMaps maps{};
  cudaError_t err = make_dkdv_maps(&maps, p, kBF16, Traits::kBlockN, Traits::kBlockM);
  if (err != cudaSuccess) return err;
  if (!p.deterministic && accumulator_mappable(p.dq_acc, p.dq_strides) &&
      make_accumulator_map(&maps.dq_acc, p.dq_acc, p.dq_strides, s.batch, s.seqlen_q, s.nheads,
                           kHeadDim, FusedTraits::kDqBoxRows,
                           FusedTraits::kDqBoxBlocks) == cudaSuccess) {
    return launch_dkdv<FusedTraits>(p, maps, stream);
  }
  DqMaps dq_maps;
  err = make_operand_map(&dq_maps.q, p.q, p.q_strides, s.batch, s.seqlen_q, s.nheads, kBF16,
                         DqKernelTraits::kBlockM);
  if (err == cudaSuccess) {
    err = make_operand_map(&dq_maps.dout, p.dout, p.dout_strides, s.batch, s.seqlen_q, s.nheads,
                           kBF16, DqKernelTraits::kBlockM);
  }
  if (err == cudaSuccess) err = launch_dkdv<Traits>(p, maps, stream);
  if (err == cudaSuccess) {
    err = cudaFuncSetAttribute(block_dq_kernel<DqKernelTraits>,
                               cudaFuncAttributeMaxDynamicSharedMemorySize,
                               DqKernelTraits::kSmemBytes);
  }
  if (err != cudaSuccess) return err;
  dq_maps.k = maps.k;
  dq_maps.v = maps.v;
  const dim3 dq_grid((s.seqlen_q + DqKernelTraits::kBlockM - 1) / DqKernelTraits::kBlockM,
                     s.nheads, s.batch);
  block_dq_kernel<DqKernelTraits>
      <<<dq_grid, DqKernelTraits::kNThreads, DqKernelTraits::kSmemBytes, stream>>>(p, dq_maps);
  return cudaGetLastError();
}

template cudaError_t run_bwd<true, 64>(const BlockBwdParams&, cudaStream_t);
template cudaError_t run_bwd<false, 64>(const BlockBwdParams&, cudaStream_t);
template cudaError_t run_bwd<true, 128>(const BlockBwdParams&, cudaStream_t);
template cudaError_t run_bwd<false, 128>(const BlockBwdParams&, cudaStream_t);

}  // namespace sm90
}  // namespace cuda
}  // namespace ring_attn
