// Host-only check of the launch limits in block_attn_cuda.h: every mma.sync kernel's shared memory
// fits sm_80's 163 KiB per block (kernel_traits.cuh also asserts it at compile time); a device that
// allows less runs the kSmallSmem variant where one exists and fits, and nothing otherwise, with
// shared_memory_error naming the direction, head dim, both sizes and the device; a 99 KiB device
// (compute capability 8.6 and 8.9) runs every head dim, forward and backward.
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

std::string kib(int bytes) { return std::to_string((bytes + 1023) / 1024) + " KiB"; }

}  // namespace

int main() {
  for (int d = 8; d <= kMaxHeadDim; d += 8) {
    for (int mode = 0; mode < 3; ++mode) {
      const bool backward = mode > 0, deterministic = mode == 2;
      std::string what = "d";  // (a literal + std::to_string trips GCC 12's -Wrestrict)
      what += std::to_string(d);
      what += backward ? " backward" : " forward";
      what += deterministic ? " deterministic" : "";
      const auto variant = [&](int allowed) {
        return smem_variant(d, backward, deterministic, allowed);
      };
      const auto error = [&](int allowed) {
        return shared_memory_error(d, backward, deterministic, allowed, "a GPU");
      };
      const int need = kernel_smem_bytes(d, backward, deterministic);
      const int small = kernel_smem_bytes(d, backward, deterministic, true);
      check(need > 48 * 1024 && need <= kSm80, what + ": " + std::to_string(need) + " bytes");
      check(variant(kSm80) == SmemVariant::kDefault && variant(need) == SmemVariant::kDefault &&
                error(need).empty(),
            what + ": exactly enough");
      // The least a device may allow: the small variant's need where there is one.
      const int least = small > 0 ? small : need;
      if (small > 0) {
        check(small < need && small <= kSmallSmemPerBlock, what + ": small variant " +
                                                               std::to_string(small) + " bytes");
        check(variant(need - 1) == SmemVariant::kSmall && variant(small) == SmemVariant::kSmall,
              what + ": small variant picked");
      }
      check(variant(least - 1) == SmemVariant::kNone, what + ": one byte short of the least");
      std::string kernels = backward ? "backward" : "forward";
      kernels += " kernels at head dim ";
      kernels += std::to_string(d);
      const std::string short_error = error(least - 1);
      check(contains(short_error, kernels) && contains(short_error, "need " + kib(least)) &&
                contains(short_error, "a GPU allows"),
            what + ": one byte short: '" + short_error + "'");
      // A 99 KiB device runs every head dim.
      check(error(kSm89).empty(), what + " on a 99 KiB device: '" + error(kSm89) + "'");
    }
  }
  // The deterministic backward adds the dQ kernel, never less than the backward alone.
  check(kernel_smem_bytes(128, true, true) >= kernel_smem_bytes(128, true, false), "dQ kernel");
  check(small_smem_bucket(96, true) == 128 && small_smem_bucket(256, true) == 256 &&
            small_smem_bucket(256, false) == 256 && small_smem_bucket(64, false) == 0,
        "small buckets");
  // Below the small variants (RING_ATTN_CUDA_MAX_SMEM_KIB=64): the message names the device and
  // the cap as the bindings pass them.
  const std::string l40s = "NVIDIA L40S (compute capability 8.9) under RING_ATTN_CUDA_MAX_SMEM_KIB=64";
  const std::string error = shared_memory_error(256, true, false, 64 * 1024, l40s);
  check(contains(error, "the CUDA backward kernels at head dim 256 need " +
                            kib(kernel_smem_bytes(256, true, false, true))) &&
            contains(error, "KiB of shared memory per block, but " + l40s + " allows 64 KiB"),
        "64 KiB cap, backward d256: '" + error + "'");
  return g_failures == 0 ? 0 : 1;
}
