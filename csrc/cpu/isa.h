// Instruction-set selection of the CPU kernels: the best vector instruction set the CPU supports
// (AVX-512, AVX2+FMA or portable code), capped by RING_ATTN_CPU_KERNEL (env.h), decided once at
// the first call; and whether the AMX tile unit may run the GEMMs.
#pragma once

namespace ring_attn {
namespace cpu {

// Ordered: a cap keeps the lower of the cap and the CPU's best.
enum class Isa : int { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };

// The vector instruction set the kernels run.
Isa active_isa();

// Whether the GEMMs may run on the AMX tile unit: the CPU has amx-tile, amx-bf16 and avx512-bf16
// (and AVX-512), RING_ATTN_CPU_KERNEL is unset or "amx", this build has the AMX intrinsics, and
// Linux grants this process the tile state.
bool amx_usable();

}  // namespace cpu
}  // namespace ring_attn
