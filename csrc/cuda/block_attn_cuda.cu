// Dispatch of the CUDA block kernels over dtype and head-dim bucket (static_switch.h). The kernels
// themselves are instantiated in csrc/cuda/inst/*.cu.
#include "cuda/block_attn_cuda.h"

#include <cuda_runtime_api.h>

#include "cuda/sm90_fwd_geometry.h"
#include "cuda/static_switch.h"

#ifndef RING_ATTN_CUDA_ARCHS_STR
#define RING_ATTN_CUDA_ARCHS_STR "?"
#endif

namespace ring_attn {
namespace cuda {

template <bool kBF16, int kHeadDim, bool kSmallSmem = false>
cudaError_t run_fwd(const FwdArgs& args, cudaStream_t stream);
template <bool kBF16, int kHeadDim, bool kSmallSmem = false>
cudaError_t run_bwd(const BlockBwdParams& p, cudaStream_t stream);

namespace sm90 {
template <bool kBF16, int kHeadDim>
cudaError_t run_fwd(const FwdArgs& args, cudaStream_t stream);
template <bool kBF16, int kHeadDim>
cudaError_t run_bwd(const BlockBwdParams& p, cudaStream_t stream);
}  // namespace sm90

namespace {

// RING_ATTN_CUDA_KERNEL=sm90a and a launch the Hopper kernels may run: a compute capability 9.0
// device, head dim 64, 128 or 256 (the forward's), q, k and v that their 2-D TMA loads read
// (sm90_fwd_geometry.h).
bool runs_sm90a(const BlockParams& p) {
  KernelChoice choice;
  if (!kernel_choice(&choice).empty() || choice != KernelChoice::kSm90a) return false;
  const BlockShape& s = p.shape;
  if (s.headdim != 64 && s.headdim != 128 && s.headdim != 256) return false;
  if (!sm90::operand_fits(p.q_strides, s.batch, s.seqlen_q, s.nheads, s.headdim) ||
      !sm90::operand_fits(p.k_strides, s.batch, s.seqlen_k, s.nheads_kv, s.headdim) ||
      !sm90::operand_fits(p.v_strides, s.batch, s.seqlen_k, s.nheads_kv, s.headdim)) {
    return false;
  }
  int device = 0, major = 0, minor = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return major == 9 && minor == 0;
}

// Whether a launch runs the kSmallSmem kernels: the device (or RING_ATTN_CUDA_MAX_SMEM_KIB) allows
// less shared memory per block than the usual ones need (the bindings have raised where neither
// fits; 0: the runtime cannot tell, the usual ones).
bool runs_small_smem(int headdim, bool backward, bool deterministic) {
  const int allowed = allowed_smem_bytes();
  return allowed > 0 &&
         smem_variant(headdim, backward, deterministic, allowed) == SmemVariant::kSmall;
}

}  // namespace

int block_fwd(const FwdArgs& args, void* stream) {
  const BlockShape& s = args.p.shape;
  if (s.batch == 0 || s.seqlen_q == 0 || s.seqlen_k == 0) return cudaSuccess;
  auto st = static_cast<cudaStream_t>(stream);
  if (runs_sm90a(args.p)) {
    return DTYPE_SWITCH(args.p.dtype, kBF16, [&] {
      switch (s.headdim) {
        case 64:
          return sm90::run_fwd<kBF16, 64>(args, st);
        case 128:
          return sm90::run_fwd<kBF16, 128>(args, st);
        default:
          return sm90::run_fwd<kBF16, 256>(args, st);
      }
    });
  }
  const bool small = runs_small_smem(s.headdim, false, false);
  return DTYPE_SWITCH(args.p.dtype, kBF16, [&] {
    return HEADDIM_SWITCH(s.headdim, kHeadDim, [&] {
      constexpr int kSmallBucket = small_smem_bucket(kHeadDim, false);
      if constexpr (kSmallBucket > 0) {
        if (small) return run_fwd<kBF16, kSmallBucket, true>(args, st);
      }
      return run_fwd<kBF16, kHeadDim>(args, st);
    });
  });
}

int block_bwd(const BlockBwdParams& p, void* stream) {
  const BlockShape& s = p.shape;
  if (s.batch == 0 || s.seqlen_q == 0 || s.seqlen_k == 0) return cudaSuccess;
  auto st = static_cast<cudaStream_t>(stream);
  // The Hopper backward (head dims 64 and 128; dO read by TMA too): dQ fused into the dK/dV kernel
  // and added by TMA reductions, or in the deterministic mode the dK/dV and dQ kernels without
  // reductions (sm90_bwd.cu).
  if (s.headdim != 256 && runs_sm90a(p) &&
      sm90::operand_fits(p.dout_strides, s.batch, s.seqlen_q, s.nheads, s.headdim)) {
    return DTYPE_SWITCH(p.dtype, kBF16, [&] {
      return s.headdim == 64 ? sm90::run_bwd<kBF16, 64>(p, st) : sm90::run_bwd<kBF16, 128>(p, st);
    });
  }
  const bool small = runs_small_smem(s.headdim, true, p.deterministic);
  return DTYPE_SWITCH(p.dtype, kBF16, [&] {
    return HEADDIM_SWITCH(s.headdim, kHeadDim, [&] {
      constexpr int kSmallBucket = small_smem_bucket(kHeadDim, true);
      if constexpr (kSmallBucket > 0) {
        if (small) return run_bwd<kBF16, kSmallBucket, true>(p, st);
      }
      return run_bwd<kBF16, kHeadDim>(p, st);
    });
  });
}

const char* error_string(int error) { return cudaGetErrorString(static_cast<cudaError_t>(error)); }

std::string device_pointer_error(const void* ptr, const char* name) {
  if (ptr == nullptr) return {};
  cudaPointerAttributes attr{};
  const cudaError_t err = cudaPointerGetAttributes(&attr, ptr);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return std::string(name) + ": " + cudaGetErrorString(err);
  }
  if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged) {
    return std::string(name) + " is not in CUDA device memory (all tensors must be on the GPU)";
  }
  int device = -1;
  cudaGetDevice(&device);
  if (attr.type == cudaMemoryTypeDevice && attr.device != device) {
    return std::string(name) + " is on cuda:" + std::to_string(attr.device) +
           " but the kernel runs on cuda:" + std::to_string(device);
  }
  return {};
}

int allowed_smem_bytes() {
  int device = 0, allowed = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&allowed, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) !=
          cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  int cap_kib = 0;
  max_smem_kib(&cap_kib);  // validated by the bindings before any launch
  return cap_kib > 0 ? std::min(allowed, cap_kib * 1024) : allowed;
}

std::string device_shared_memory_error(int headdim, bool backward, bool deterministic) {
  const int allowed = allowed_smem_bytes();
  if (allowed == 0) return {};  // the launch reports what the runtime says
  if (smem_variant(headdim, backward, deterministic, allowed) != SmemVariant::kNone) return {};
  int device = 0;
  cudaGetDevice(&device);
  cudaDeviceProp prop{};
  std::string name = "this GPU";
  if (cudaGetDeviceProperties(&prop, device) == cudaSuccess) {
    name = std::string(prop.name) + " (compute capability " + std::to_string(prop.major) + "." +
           std::to_string(prop.minor) + ")";
  } else {
    cudaGetLastError();
  }
  int cap_kib = 0;
  max_smem_kib(&cap_kib);
  if (cap_kib > 0) name += " under RING_ATTN_CUDA_MAX_SMEM_KIB=" + std::to_string(cap_kib);
  return shared_memory_error(headdim, backward, deterministic, allowed, name);
}

std::string build_info() {
  int runtime = 0;
  cudaRuntimeGetVersion(&runtime);
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  std::string devices = err == cudaSuccess ? std::to_string(count)
                                           : std::string("0 (") + cudaGetErrorString(err) + ")";
  if (err != cudaSuccess) cudaGetLastError();  // clear the sticky-free error state
  return std::string("archs=") + RING_ATTN_CUDA_ARCHS_STR + " nvcc=" +
         std::to_string(__CUDACC_VER_MAJOR__) + "." + std::to_string(__CUDACC_VER_MINOR__) +
         " runtime=" + std::to_string(runtime) + " devices=" + devices +
         " headdims<=" + std::to_string(kMaxHeadDim) + " dtypes=bfloat16,float16";
}

}  // namespace cuda
}  // namespace ring_attn
