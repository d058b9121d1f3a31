// One kernel instantiation per translation unit, so that the build compiles them in parallel
// (the dispatch that picks it: csrc/cuda/block_attn_cuda.cu, on GPUs that allow 99 KiB of shared
// memory per block).
#include "cuda/launch_template.cuh"

namespace ring_attn {
namespace cuda {
template cudaError_t run_fwd<true, 256, true>(const FwdArgs&, cudaStream_t);
}  // namespace cuda
}  // namespace ring_attn
