// Compiles every sm_90a primitive of sm90_primitives.cuh for the GPU (each dtype, wgmma shape and
// operand form once), so that nvcc and ptxas check their inline PTX. Built as an object library
// for sm_90a; nothing links or launches it.
#include "cuda/sm90_primitives.cuh"

namespace ring_attn {
namespace cuda {
namespace sm90 {

// TMA, mbarriers, named barriers and register reallocation: a producer warpgroup loads a box,
// the consumer warpgroup waits for it.
__global__ void __launch_bounds__(256, 1)
    sm90_pipeline_kernel(const __grid_constant__ CUtensorMap map, float* out) {
  extern __shared__ __align__(1024) char smem[];
  uint64_t* bar = reinterpret_cast<uint64_t*>(smem + 16384);
  if (threadIdx.x >= 128) {
    setmaxnreg_dec<40>();
    if (threadIdx.x == 128) {
      mbar_init(bar, 1);
      fence_proxy_async();
      mbar_arrive_expect_tx(bar, 8192);
      tma_load_2d(smem, &map, bar, -3, 5);
    }
    named_arrive(1, 256);
    return;
  }
  setmaxnreg_inc<232>();
  named_sync(1, 256);
  mbar_wait(bar, 0);
  out[threadIdx.x] = reinterpret_cast<const float*>(smem)[threadIdx.x];
  if (mbar_try_wait(bar, 1)) mbar_arrive(bar);
}

// TMA reductions: a warp stages 32 floats and adds them to the tensor, then waits for the reads.
__global__ void __launch_bounds__(32, 1)
    sm90_reduce_kernel(const __grid_constant__ CUtensorMap map) {
  extern __shared__ __align__(1024) char smem[];
  reinterpret_cast<float*>(smem)[threadIdx.x] = 1.f;
  fence_proxy_async();
  __syncwarp();
  if (threadIdx.x == 0) {
    tma_reduce_add_5d(smem, &map, 0, 1, 2, 3, 4);
    bulk_commit_group();
  }
  bulk_wait_group_read<0>();
}

// wgmma of one dtype and shape, both operand forms, on one warpgroup.
template <bool kBF16, int N>
__global__ void __launch_bounds__(128, 1) sm90_wgmma_kernel(float* out) {
  extern __shared__ __align__(1024) char smem[];
  const uint32_t a[4] = {threadIdx.x, 1u, 2u, 3u};
  const uint64_t desc_a = smem_desc(smem, 16, 1024), desc_b = smem_desc(smem + 8192, 8192, 1024);
  float d[N / 2];
  wgmma_fence();
  wgmma_ss<kBF16, N, false, false>(d, desc_a, desc_b, false);
  wgmma_ss<kBF16, N, true, true>(d, desc_a, desc_b, true);
  wgmma_rs<kBF16, N, true>(d, a, desc_b, true);
  wgmma_commit();
  wgmma_wait<0>();
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < N / 2; ++i) sum += d[i];
  out[threadIdx.x] = sum;
}

template __global__ void sm90_wgmma_kernel<true, 64>(float*);
template __global__ void sm90_wgmma_kernel<false, 64>(float*);
template __global__ void sm90_wgmma_kernel<true, 128>(float*);
template __global__ void sm90_wgmma_kernel<false, 128>(float*);
template __global__ void sm90_wgmma_kernel<true, 256>(float*);
template __global__ void sm90_wgmma_kernel<false, 256>(float*);

}  // namespace sm90
}  // namespace cuda
}  // namespace ring_attn
