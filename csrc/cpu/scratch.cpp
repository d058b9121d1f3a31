#include "cpu/scratch.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <memory>

namespace ring_attn {
namespace cpu {

void* thread_scratch(int slot, size_t bytes) {
  struct Free {
    void operator()(void* p) const { std::free(p); }
  };
  struct Arena {
    std::unique_ptr<void, Free> ptr;
    size_t bytes = 0;
  };
  thread_local Arena arenas[kNumSlots];
  Arena& arena = arenas[slot];
  if (arena.bytes < bytes) {
    const size_t rounded = ((bytes + 4095) / 4096) * 4096;
    arena.ptr.reset();
    arena.ptr.reset(std::aligned_alloc(64, rounded));
    TORCH_CHECK(arena.ptr, "ring_attn cpu: out of memory for ", rounded, " bytes of scratch");
    arena.bytes = rounded;
  }
  return arena.ptr.get();
}

}  // namespace cpu
}  // namespace ring_attn
