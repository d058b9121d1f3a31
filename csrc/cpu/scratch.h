// Scratch memory of the CPU kernels: per-thread, grow-only, 64-byte aligned arenas that live
// until the thread exits. Allocating per call would pay page faults on every call (large blocks
// are mmap'ed and unmapped by malloc), which the ring repeats once per step.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

namespace ring_attn {
namespace cpu {

// Slot kTileSlot holds a worker's tile scratch; the other slots hold the per-call buffers of the
// calling thread (which is also worker 0).
enum ScratchSlot : int {
  kTileSlot = 0,
  kPackQ = 1,
  kPackK = 2,
  kPackV = 3,
  kPackO = 4,
  kPackKRows = 5,
  kDqSlot = 6,
  kPackQT = 7,  // AMX backward: Q^T
  kPackOT = 8,  // AMX backward: dO^T
  kNumSlots = 9
};

// At least `bytes` of this thread's arena `slot`; its contents are kept only until the next call
// with the same slot on this thread.
void* thread_scratch(int slot, size_t bytes);

// Carves 64-byte aligned arrays out of one arena.
class Carver {
 public:
  Carver(int slot, size_t total_bytes)
      : base_(static_cast<char*>(thread_scratch(slot, total_bytes))) {}
  template <typename T>
  static size_t bytes_for(int64_t n) {
    return ((static_cast<size_t>(std::max<int64_t>(n, 1)) * sizeof(T) + 63) / 64) * 64;
  }
  template <typename T>
  T* take(int64_t n) {
    T* p = reinterpret_cast<T*>(base_ + offset_);
    offset_ += bytes_for<T>(n);
    return p;
  }

 private:
  char* base_;
  size_t offset_ = 0;
};

}  // namespace cpu
}  // namespace ring_attn
