// The Hopper dK/dV kernel (sm90_bwd_kernel.cuh): its __global__ entry point, the tensor maps of K,
// V, Q and dO, and the launcher, instantiated for bf16 and fp16 at head dims 64 and 128. Compiled
// for sm_90a only; block_attn_cuda.cu launches it (then the deterministic dQ kernel) on devices
// of compute capability 9.0 when RING_ATTN_CUDA_KERNEL=sm90a.
#include "cuda/sm90_bwd_kernel.cuh"
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

namespace {

// The operand's matrix (sm90_fwd_geometry.h) in boxes of 64 columns x `box_rows` rows.
cudaError_t make_map(CUtensorMap* map, const void* base, const Strides& st, int batch, int seqlen,
                     int heads, bool bf16, int box_rows) {
  const OperandMatrix m = operand_matrix(st, batch, seqlen, heads);
  return make_tensor_map_2d(map, base, bf16, static_cast<uint64_t>(m.cols),
                            static_cast<uint64_t>(m.rows), static_cast<uint64_t>(m.cols) * 2, 64,
                            static_cast<uint32_t>(box_rows));
}

}  // namespace

template <bool kBF16, int kHeadDim>
cudaError_t run_dkdv(const BlockBwdParams& p, cudaStream_t stream) {
  using Traits = DkdvTraits<kBF16, kHeadDim>;
  const BlockShape& s = p.shape;
  DkdvMaps maps;
  cudaError_t err =
      make_map(&maps.k, p.k, p.k_strides, s.batch, s.seqlen_k, s.nheads_kv, kBF16, Traits::kBlockN);
  if (err == cudaSuccess) {
    err = make_map(&maps.v, p.v, p.v_strides, s.batch, s.seqlen_k, s.nheads_kv, kBF16,
                   Traits::kBlockN);
  }
  if (err == cudaSuccess) {
    err = make_map(&maps.q, p.q, p.q_strides, s.batch, s.seqlen_q, s.nheads, kBF16, Traits::kBlockM);
  }
  if (err == cudaSuccess) {
    err = make_map(&maps.dout, p.dout, p.dout_strides, s.batch, s.seqlen_q, s.nheads, kBF16,
                   Traits::kBlockM);
  }
  if (err != cudaSuccess) return err;
  err = cudaFuncSetAttribute(block_dkdv_kernel<Traits>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             Traits::kSmemBytes);
  if (err != cudaSuccess) return err;
  const dim3 grid((s.seqlen_k + Traits::kBlockN - 1) / Traits::kBlockN, s.nheads_kv, s.batch);
  block_dkdv_kernel<Traits><<<grid, Traits::kNThreads, Traits::kSmemBytes, stream>>>(p, maps);
  return cudaGetLastError();
}

template cudaError_t run_dkdv<true, 64>(const BlockBwdParams&, cudaStream_t);
template cudaError_t run_dkdv<false, 64>(const BlockBwdParams&, cudaStream_t);
template cudaError_t run_dkdv<true, 128>(const BlockBwdParams&, cudaStream_t);
template cudaError_t run_dkdv<false, 128>(const BlockBwdParams&, cudaStream_t);

}  // namespace sm90
}  // namespace cuda
}  // namespace ring_attn
