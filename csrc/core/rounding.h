// Integer rounding of sizes into tiles, shared by the CPU and CUDA kernels and their launchers.
#pragma once

#include "macros.h"

namespace ring_attn {

// Tiles of `tile` needed to cover `n`: ceil(n / tile), for n >= 0 and tile > 0.
template <typename Int>
RA_HD constexpr Int cdiv(Int n, Int tile) {
  return (n + tile - 1) / tile;
}

// n rounded up to a multiple of `tile`.
template <typename Int>
RA_HD constexpr Int round_up(Int n, Int tile) {
  return cdiv(n, tile) * tile;
}

}  // namespace ring_attn
