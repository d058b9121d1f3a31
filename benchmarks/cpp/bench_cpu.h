// What the CPU benchmarks (bench_block_attn, bench_ring: linked with torch and the CPU kernels)
// share beyond bench_cli.h: the check of the kernels' environment variables and the one-line
// report of a failure that ends a run.
#pragma once

#include <c10/util/Exception.h>

#include <cstdio>
#include <exception>
#include <string>

#include "bench_cli.h"
#include "cpu/env.h"

namespace ring_attn {
namespace bench {

// A usage error (exit status 2) when RING_ATTN_CPU_KERNEL or RING_ATTN_CPU_TILES holds an
// unknown value.
inline void check_cpu_environment(const char* program) {
  const std::string error = cpu::environment_error();
  if (!error.empty()) usage_error(std::string(program) + ": " + error);
}

// Called from main's handler of std::exception (e.g. sizes beyond memory): `program: message` on
// one line (torch's errors without their backtrace), exit status 1, never an abort.
inline int report_failure(const char* program) {
  try {
    throw;
  } catch (const c10::Error& e) {
    std::fprintf(stderr, "%s: %s\n", program, e.what_without_backtrace());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: %s\n", program, e.what());
  }
  return 1;
}

}  // namespace bench
}  // namespace ring_attn
