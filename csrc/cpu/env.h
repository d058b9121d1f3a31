// The environment variables of the CPU kernels, parsed once (unset and empty alike: the defaults):
//   RING_ATTN_CPU_KERNEL=generic|scalar|avx2|avx512|amx  caps the instruction set (testing,
//     comparisons): generic/scalar, avx2 and avx512 cap the vector code and turn AMX off; amx
//     leaves both as the CPU allows.
//   RING_ATTN_CPU_TILES="fwd_q,fwd_k,bwd_q,bwd_k,kc"  overrides the tile sizes (tuning.h).
// The ops check them (environment_error) before any communication, so the kernels never see an
// unknown value.
#pragma once

#include <optional>
#include <string>

#include "cpu/isa.h"

namespace ring_attn {
namespace cpu {

struct KernelRequest {
  std::optional<Isa> isa_cap;  // none: the CPU's best
  bool amx_allowed = true;
};

// Empty when both variables hold known values; otherwise a message for the user. Read at every
// call.
std::string environment_error();

// RING_ATTN_CPU_KERNEL.
const KernelRequest& kernel_request();

// RING_ATTN_CPU_TILES: five positive integers, as given (tuning.h rounds them).
struct TileRequest {
  long fwd_q, fwd_k, bwd_q, bwd_k, kc;
};
const std::optional<TileRequest>& tile_request();

}  // namespace cpu
}  // namespace ring_attn
