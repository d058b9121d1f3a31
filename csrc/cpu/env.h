// The environment variables of the CPU kernels, parsed once:
//   RING_ATTN_CPU_KERNEL=generic|scalar|avx2|avx512|amx  caps the instruction set (testing,
//     comparisons): generic/scalar, avx2 and avx512 cap the vector code and turn AMX off; amx (or
//     an empty value) leaves both as the CPU allows; any other value turns AMX off only.
//   RING_ATTN_CPU_TILES="fwd_q,fwd_k,bwd_q,bwd_k,kc"  overrides the tile sizes (tuning.h).
#pragma once

#include <optional>

#include "cpu/isa.h"

namespace ring_attn {
namespace cpu {

struct KernelRequest {
  std::optional<Isa> isa_cap;  // none: the CPU's best
  bool amx_allowed = true;
};

// RING_ATTN_CPU_KERNEL.
const KernelRequest& kernel_request();

// RING_ATTN_CPU_TILES: five positive integers, as given (tuning.h rounds them).
struct TileRequest {
  long fwd_q, fwd_k, bwd_q, bwd_k, kc;
};
const std::optional<TileRequest>& tile_request();

}  // namespace cpu
}  // namespace ring_attn
