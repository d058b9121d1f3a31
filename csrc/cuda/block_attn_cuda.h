// CUDA block attention: one query block against one K/V block, masked by global positions, with
// the same semantics as the CPU kernels (csrc/cpu/block_attn_cpu.h):
//   block_fwd merges the block into the running fp32 state (out_acc normalised, lse) in one pass
//     (prologue loads acc = o, m = lse, l = 1; epilogue stores o = acc / l, lse = m + log l);
//   block_bwd accumulates (+=) dq, dk, dv in fp32 given the FINAL lse and delta = rowsum(dout*out).
// dtypes: bf16 and fp16 (fp32 accumulation). Head dims: multiples of 8 up to kMaxHeadDim.
// Rows: 16-byte aligned (q, k, v, dout pointers and their batch/row/head strides multiples of 8
// elements; dq_acc, dk_acc, dv_acc multiples of 4). Launches on `stream`; returns the launch's
// cudaError_t (no synchronisation).
//
// This header is plain C++ (no torch, no CUDA headers): the bindings and the CPU emulation test
// include it.
#pragma once

#include <algorithm>
#include <cstdlib>
#include <string>

#include "core/params.h"
#include "cuda/kernel_traits.cuh"
#include "cuda/static_switch.h"

namespace ring_attn {
namespace cuda {

constexpr int kMaxHeadDim = 256;

// The forward launch: merge = false skips the prologue (starts from o = 0, lse = -inf) and so
// computes the plain attention of the block; used to time what the fused merge costs.
struct FwdArgs {
  BlockFwdParams p;
  bool merge;
};

// RING_ATTN_CUDA_KERNEL (read at every call): which kernels run on the GPU.
//   auto, sm80 (or unset): the mma.sync kernels everywhere;
//   sm90a: on devices of compute capability 9.0, for bf16/fp16, the Hopper forward
//          (sm90_fwd_kernel.cuh) at head dims 64, 128 and 256 and the Hopper backward
//          (sm90_bwd_kernel.cuh dK/dV, sm90_dq_kernel.cuh dQ) at head dims 64 and 128 (other
//          shapes and devices: mma.sync).
enum class KernelChoice { kAuto, kSm80, kSm90a };

// Sets *choice from the environment; a message for the user when the value is unknown.
inline std::string kernel_choice(KernelChoice* choice) {
  const char* env = std::getenv("RING_ATTN_CUDA_KERNEL");
  const std::string v = env ? env : "";
  if (v.empty() || v == "auto") {
    *choice = KernelChoice::kAuto;
  } else if (v == "sm80") {
    *choice = KernelChoice::kSm80;
  } else if (v == "sm90a") {
    *choice = KernelChoice::kSm90a;
  } else {
    *choice = KernelChoice::kAuto;
    return "RING_ATTN_CUDA_KERNEL must be auto, sm80 or sm90a, got '" + v + "'";
  }
  return {};
}

// Empty when the CUDA kernels support these params; otherwise a message for the user.
inline std::string support_error(DType dtype, const BlockShape& s) {
  if (dtype != DType::kBFloat16 && dtype != DType::kFloat16) {
    return std::string("the CUDA kernels support bfloat16 and float16 inputs, got ") +
           (dtype == DType::kFloat32 ? "float32" : "float64") +
           " (cast q, k, v to bfloat16 or float16)";
  }
  if (s.headdim < 8 || s.headdim > kMaxHeadDim || s.headdim % 8 != 0) {
    return "the CUDA kernels support head dimensions that are multiples of 8 up to " +
           std::to_string(kMaxHeadDim) + ", got " + std::to_string(s.headdim);
  }
  if (s.nheads > 65535 || s.batch > 65535) {
    return "the CUDA kernels support at most 65535 heads and 65535 batch entries";
  }
  return {};
}

// Empty when a (batch, seq, heads, headdim) operand with strides `st` (in elements of elem_bytes
// bytes) at `ptr` has 16-byte aligned rows (sizes of 1 ignore their stride). The kernels need it of
// q, k, v, dout (16-byte copies) and of the fp32 gradient accumulators (vector reductions).
inline std::string alignment_error(const void* ptr, const Strides& st, int batch, int seqlen,
                                   int heads, const char* name, int elem_bytes = 2) {
  const int64_t per16 = 16 / elem_bytes;
  const bool ok = reinterpret_cast<uintptr_t>(ptr) % 16 == 0 &&
                  (batch <= 1 || st.batch % per16 == 0) && (seqlen <= 1 || st.row % per16 == 0) &&
                  (heads <= 1 || st.head % per16 == 0);
  if (ok) return {};
  return std::string("the CUDA kernels need 16-byte aligned rows: ") + name +
         " must start on a 16-byte boundary with batch/seq/head strides that are multiples of " +
         std::to_string(per16) + " elements (call .contiguous())";
}

// The head-dim bucket whose kSmallSmem kernels (kernel_traits.cuh: within kSmallSmemPerBlock) a
// launch at `bucket` runs where its usual ones exceed that, or 0 where there are none: the forward
// at d = 128 and 256, the backward at d = 64, 128 and 256, and at d = 96 the backward of d = 128
// (its 64-key dK/dV warp slices of 24 columns are not a layout the kernel has; the columns past 96
// are zero, as for every head dim between buckets).
constexpr int small_smem_bucket(int bucket, bool backward) {
  if (!backward) return bucket == 128 || bucket == 256 ? bucket : 0;
  return bucket == 64 || bucket == 256 ? bucket : bucket == 96 || bucket == 128 ? 128 : 0;
}

// The dynamic shared memory per CTA (bytes) of the largest mma.sync kernel that a forward, or a
// backward (deterministic: with the dQ kernel), launches at this head dim (bf16 and fp16 alike),
// in the kSmallSmem variant where `small` (0 where there is none: small_smem_bucket).
inline int kernel_smem_bytes(int headdim, bool backward, bool deterministic, bool small = false) {
  return HEADDIM_SWITCH(headdim, kD, [&] {
    const auto bytes = [&]<int kBucket, bool kSmall>() {
      if constexpr (kBucket == 0) {
        return 0;
      } else if (!backward) {
        return FwdTraits<true, kBucket, kSmall>::kSmemBytes;
      } else {
        const int bwd = BwdTraits<true, kBucket, kSmall>::kSmemBytes;
        return deterministic ? std::max(bwd, DqTraits<true, kBucket, kSmall>::kSmemBytes) : bwd;
      }
    };
    if (!small) return bytes.template operator()<kD, false>();
    return backward ? bytes.template operator()<small_smem_bucket(kD, true), true>()
                    : bytes.template operator()<small_smem_bucket(kD, false), true>();
  });
}

// Which kernels a launch runs on a device that allows `allowed` bytes of shared memory per block:
// the usual ones where they fit, else the kSmallSmem variant where it exists and fits, else none.
enum class SmemVariant { kDefault, kSmall, kNone };
inline SmemVariant smem_variant(int headdim, bool backward, bool deterministic, int allowed) {
  if (kernel_smem_bytes(headdim, backward, deterministic) <= allowed) return SmemVariant::kDefault;
  const int small = kernel_smem_bytes(headdim, backward, deterministic, true);
  if (small > 0 && small <= allowed) {
    return SmemVariant::kSmall;
  }
  return SmemVariant::kNone;
}

// Empty when a device that allows `allowed` bytes of shared memory per block (its opt-in maximum,
// or RING_ATTN_CUDA_MAX_SMEM_KIB) runs the kernels of a launch; otherwise a message for the user
// naming `device` (e.g. "NVIDIA L40S (compute capability 8.9)") and the least the kernels need.
inline std::string shared_memory_error(int headdim, bool backward, bool deterministic, int allowed,
                                       const std::string& device) {
  if (smem_variant(headdim, backward, deterministic, allowed) != SmemVariant::kNone) return {};
  const int small = kernel_smem_bytes(headdim, backward, deterministic, true);
  const int need = small > 0 ? small : kernel_smem_bytes(headdim, backward, deterministic);
  const auto kib = [](int bytes) { return std::to_string((bytes + 1023) / 1024) + " KiB"; };
  return std::string("the CUDA ") + (backward ? "backward" : "forward") + " kernels at head dim " +
         std::to_string(headdim) + " need " + kib(need) + " of shared memory per block, but " +
         device + " allows " + kib(allowed) +
         ": they run on GPUs that allow at least that much (A100: 163 KiB, H100 and H200: "
         "227 KiB)";
}

// RING_ATTN_CUDA_MAX_SMEM_KIB (read at every call): the most shared memory per block, in KiB, that
// the kernels may ask for (0 or unset: the device's maximum). Sets *kib; a message for the user
// when the value is not a non-negative integer.
inline std::string max_smem_kib(int* kib) {
  const char* env = std::getenv("RING_ATTN_CUDA_MAX_SMEM_KIB");
  *kib = 0;
  if (env == nullptr || *env == '\0') return {};
  char* end = nullptr;
  const long v = std::strtol(env, &end, 10);
  if (*end != '\0' || v < 0 || v > (1 << 20)) {
    return std::string("RING_ATTN_CUDA_MAX_SMEM_KIB must be a non-negative integer (KiB), got '") +
           env + "'";
  }
  *kib = static_cast<int>(v);
  return {};
}

#if !defined(RA_CUDA_EMULATE)
// Defined in block_attn_cuda.cu. `stream` is a cudaStream_t.
int block_fwd(const FwdArgs& args, void* stream);
int block_bwd(const BlockBwdParams& p, void* stream);
// The CUDA runtime's description of an error code returned above.
const char* error_string(int error);
// Empty when `ptr` (null: nothing to check) is device or managed memory of the current device;
// otherwise a message naming `name`.
std::string device_pointer_error(const void* ptr, const char* name);
// The shared memory per block that launches on the current device may ask for: its opt-in
// maximum, capped by RING_ATTN_CUDA_MAX_SMEM_KIB (0 when the runtime cannot tell).
int allowed_smem_bytes();
// shared_memory_error for the current device (its name and compute capability in the message).
std::string device_shared_memory_error(int headdim, bool backward, bool deterministic);
// "archs=80;90 nvcc=13.0 runtime=13000 devices=1" (devices: cudaGetDeviceCount, or the error).
std::string build_info();
#endif

}  // namespace cuda
}  // namespace ring_attn
