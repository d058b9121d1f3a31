#include "cpu/env.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>

namespace ring_attn {
namespace cpu {

const KernelRequest& kernel_request() {
  static const KernelRequest request = [] {
    KernelRequest r;
    const char* env = std::getenv("RING_ATTN_CPU_KERNEL");
    if (env == nullptr) return r;
    const std::string s(env);
    if (s == "generic" || s == "scalar") r.isa_cap = Isa::kGeneric;
    else if (s == "avx2") r.isa_cap = Isa::kAvx2;
    else if (s == "avx512") r.isa_cap = Isa::kAvx512;
    r.amx_allowed = s.empty() || s == "amx";
    return r;
  }();
  return request;
}

const std::optional<TileRequest>& tile_request() {
  static const std::optional<TileRequest> request = []() -> std::optional<TileRequest> {
    const char* env = std::getenv("RING_ATTN_CPU_TILES");
    if (env == nullptr) return std::nullopt;
    TileRequest t;
    if (std::sscanf(env, "%ld,%ld,%ld,%ld,%ld", &t.fwd_q, &t.fwd_k, &t.bwd_q, &t.bwd_k, &t.kc) !=
            5 ||
        std::min({t.fwd_q, t.fwd_k, t.bwd_q, t.bwd_k, t.kc}) <= 0)
      return std::nullopt;
    return t;
  }();
  return request;
}

}  // namespace cpu
}  // namespace ring_attn
