// One kernel instantiation per translation unit, so that the build compiles them in parallel
// (the dispatch that picks it: csrc/cuda/static_switch.h).
#include "cuda/launch_template.cuh"

namespace ring_attn {
namespace cuda {
template cudaError_t run_bwd<false, 64>(const BlockBwdParams&, cudaStream_t);
}  // namespace cuda
}  // namespace ring_attn
