// The Hopper forward (sm90_fwd_kernel.cuh): its __global__ entry point, the tensor maps of Q, K
// and V, and the launcher, instantiated for bf16 and fp16 at head dims 64, 128 and 256. Compiled
// for sm_90a only; block_attn_cuda.cu launches it on devices of compute capability 9.0 when
// RING_ATTN_CUDA_KERNEL=sm90a.
#include "cuda/sm90_fwd_kernel.cuh"
#include "cuda/sm90_tensor_map.h"

namespace ring_attn {
namespace cuda {
namespace sm90 {

template <typename Traits>
__global__ void __launch_bounds__(Traits::kNThreads, 1)
    block_fwd_kernel(const FwdArgs args, const __grid_constant__ FwdMaps maps) {
  extern __shared__ __align__(1024) char smem[];
  block_fwd_body<Traits>(args, maps, smem);
}

template <bool kBF16, int kHeadDim>
cudaError_t run_fwd(const FwdArgs& args, cudaStream_t stream) {
  using Traits = FwdTraits<kBF16, kHeadDim>;
  const BlockFwdParams& p = args.p;
  const BlockShape& s = p.shape;
  FwdMaps maps;
  cudaError_t err = make_operand_map(&maps.q, p.q, p.q_strides, s.batch, s.seqlen_q, s.nheads,
                                     kBF16, Traits::kBlockM);
  if (err == cudaSuccess) {
    err = make_operand_map(&maps.k, p.k, p.k_strides, s.batch, s.seqlen_k, s.nheads_kv, kBF16,
                           Traits::kBlockN);
  }
  if (err == cudaSuccess) {
    err = make_operand_map(&maps.v, p.v, p.v_strides, s.batch, s.seqlen_k, s.nheads_kv, kBF16,
                           Traits::kBlockN);
  }
  if (err != cudaSuccess) return err;
  err = cudaFuncSetAttribute(block_fwd_kernel<Traits>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             Traits::kSmemBytes);
  if (err != cudaSuccess) return err;
  const dim3 grid((s.seqlen_q + Traits::kBlockM - 1) / Traits::kBlockM, s.nheads, s.batch);
  block_fwd_kernel<Traits><<<grid, Traits::kNThreads, Traits::kSmemBytes, stream>>>(args, maps);
  return cudaGetLastError();
}

template cudaError_t run_fwd<true, 64>(const FwdArgs&, cudaStream_t);
template cudaError_t run_fwd<false, 64>(const FwdArgs&, cudaStream_t);
template cudaError_t run_fwd<true, 128>(const FwdArgs&, cudaStream_t);
template cudaError_t run_fwd<false, 128>(const FwdArgs&, cudaStream_t);
template cudaError_t run_fwd<true, 256>(const FwdArgs&, cudaStream_t);
template cudaError_t run_fwd<false, 256>(const FwdArgs&, cudaStream_t);

}  // namespace sm90
}  // namespace cuda
}  // namespace ring_attn
