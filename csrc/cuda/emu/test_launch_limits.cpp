// Host-only check of the launch limits in block_attn_cuda.h: every mma.sync kernel's shared memory
// fits sm_80's 163 KiB per block (kernel_traits.cuh also asserts it at compile time), and
// shared_memory_error accepts a device exactly when it allows the kernels' shared memory, naming
// the direction, head dim, both sizes and the device otherwise (GPUs of compute capability 8.6 and
// 8.9 allow 99 KiB: the backward at head dim 128 does not fit there).
// Exit status 0 when every check passes.
#include <string>

#include "cuda/block_attn_cuda.h"
#include "cuda/emu/test_check.h"

using namespace ring_attn::cuda;
using ring_attn::emu_test::check;
using ring_attn::emu_test::g_failures;

namespace {

constexpr int kSm80 = 163 * 1024;  // cudaDevAttrMaxSharedMemoryPerBlockOptin of an A100
constexpr int kSm89 = 99 * 1024;   // of an L40S or an RTX 4090

bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

}  // namespace

int main() {
  for (int d = 8; d <= kMaxHeadDim; d += 8) {
    for (int mode = 0; mode < 3; ++mode) {
      const bool backward = mode > 0, deterministic = mode == 2;
      std::string what = "d";  // (a literal + std::to_string trips GCC 12's -Wrestrict)
      what += std::to_string(d);
      what += backward ? " backward" : " forward";
      what += deterministic ? " deterministic" : "";
      const int need = kernel_smem_bytes(d, backward, deterministic);
      check(need > 48 * 1024 && need <= kSm80, what + ": " + std::to_string(need) + " bytes");
      check(shared_memory_error(d, backward, deterministic, kSm80, "A100").empty(), what);
      check(shared_memory_error(d, backward, deterministic, need, "a GPU").empty(),
            what + ": exactly enough");
      const std::string error = shared_memory_error(d, backward, deterministic, need - 1, "a GPU");
      std::string kernels = backward ? "backward" : "forward";
      kernels += " kernels at head dim ";
      kernels += std::to_string(d);
      check(contains(error, kernels) && contains(error, "a GPU allows"),
            what + ": one byte short: '" + error + "'");
    }
  }
  // The deterministic backward adds the dQ kernel, never less than the backward alone.
  check(kernel_smem_bytes(128, true, true) >= kernel_smem_bytes(128, true, false), "dQ kernel");
  const std::string l40s = "NVIDIA L40S (compute capability 8.9)";
  const std::string error = shared_memory_error(128, true, false, kSm89, l40s);
  check(contains(error, "the CUDA backward kernels at head dim 128 need ") &&
            contains(error, "KiB of shared memory per block, but " + l40s + " allows 99 KiB"),
        "99 KiB device, backward d128: '" + error + "'");
  const int need = kernel_smem_bytes(128, true, false);
  check(contains(error, std::to_string((need + 1023) / 1024) + " KiB"), "rounded up KiB: " + error);
  return g_failures == 0 ? 0 : 1;
}
