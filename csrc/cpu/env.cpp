#include "cpu/env.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>

namespace ring_attn {
namespace cpu {
namespace {

// The environment variable's value; unset and empty are both nullptr.
const char* env_value(const char* name) {
  const char* env = std::getenv(name);
  return env != nullptr && *env != '\0' ? env : nullptr;
}

// RING_ATTN_CPU_KERNEL's value as a request; false when the value is unknown.
bool parse_kernel_request(const std::string& s, KernelRequest* r) {
  if (s == "generic" || s == "scalar") r->isa_cap = Isa::kGeneric;
  else if (s == "avx2") r->isa_cap = Isa::kAvx2;
  else if (s == "avx512") r->isa_cap = Isa::kAvx512;
  else if (s != "amx") return false;
  r->amx_allowed = s == "amx";
  return true;
}

// RING_ATTN_CPU_TILES's value: five positive integers separated by commas, nothing else.
bool parse_tile_request(const char* s, TileRequest* t) {
  int consumed = 0;
  return std::sscanf(s, "%ld,%ld,%ld,%ld,%ld%n", &t->fwd_q, &t->fwd_k, &t->bwd_q, &t->bwd_k,
                     &t->kc, &consumed) == 5 &&
         s[consumed] == '\0' && std::min({t->fwd_q, t->fwd_k, t->bwd_q, t->bwd_k, t->kc}) > 0;
}

}  // namespace

std::string environment_error() {
  KernelRequest r;
  if (const char* kernel = env_value("RING_ATTN_CPU_KERNEL");
      kernel != nullptr && !parse_kernel_request(kernel, &r)) {
    return std::string("RING_ATTN_CPU_KERNEL must be generic, scalar, avx2, avx512 or amx, got '") +
           kernel + "'";
  }
  TileRequest t;
  if (const char* tiles = env_value("RING_ATTN_CPU_TILES");
      tiles != nullptr && !parse_tile_request(tiles, &t)) {
    return std::string("RING_ATTN_CPU_TILES must be five positive integers "
                       "fwd_q,fwd_k,bwd_q,bwd_k,kc, got '") +
           tiles + "'";
  }
  return {};
}

const KernelRequest& kernel_request() {
  static const KernelRequest request = [] {
    KernelRequest r;
    const char* env = env_value("RING_ATTN_CPU_KERNEL");
    return env != nullptr && parse_kernel_request(env, &r) ? r : KernelRequest{};
  }();
  return request;
}

const std::optional<TileRequest>& tile_request() {
  static const std::optional<TileRequest> request = []() -> std::optional<TileRequest> {
    const char* env = env_value("RING_ATTN_CPU_TILES");
    TileRequest t;
    if (env == nullptr || !parse_tile_request(env, &t)) return std::nullopt;
    return t;
  }();
  return request;
}

}  // namespace cpu
}  // namespace ring_attn
