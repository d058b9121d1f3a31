// One instantiation per translation unit (generated pattern; see csrc/cuda/static_switch.h).
#include "cuda/launch_template.cuh"

namespace ring_attn {
namespace cuda {
template cudaError_t run_bwd<false, 64>(const BlockBwdParams&, cudaStream_t);
}  // namespace cuda
}  // namespace ring_attn
