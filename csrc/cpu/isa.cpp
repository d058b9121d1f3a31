#include "cpu/isa.h"

#include <algorithm>

#include "cpu/env.h"
#include "cpu/x86.h"

#if RA_CPU_X86
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace ring_attn {
namespace cpu {
namespace {

Isa best_isa() {
#if RA_CPU_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
    return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kGeneric;
}

}  // namespace

Isa active_isa() {
  static const Isa isa = [] {
    const Isa best = best_isa();
    const KernelRequest request = kernel_request();
    return request.isa_cap ? std::min(best, *request.isa_cap) : best;
  }();
  return isa;
}

bool amx_usable() {
#if RA_CPU_AMX
  static const bool usable = [] {
    if (!kernel_request().amx_allowed) return false;
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("amx-tile") || !__builtin_cpu_supports("amx-bf16") ||
        !__builtin_cpu_supports("avx512bf16") || best_isa() != Isa::kAvx512)
      return false;
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return usable;
#else
  return false;
#endif
}

}  // namespace cpu
}  // namespace ring_attn
