// The check of the emulator's host tests: a failed check prints and is counted, the test goes on.
#pragma once

#include <cstdio>
#include <string>

namespace ring_attn::emu_test {

inline int g_failures = 0;

inline void check(bool ok, const std::string& what) {
  if (!ok) {
    std::fprintf(stderr, "FAIL: %s\n", what.c_str());
    ++g_failures;
  }
}

}  // namespace ring_attn::emu_test
