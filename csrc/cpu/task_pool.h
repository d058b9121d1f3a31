// The task scheduler of the CPU kernels: tasks handed out dynamically to at::parallel_for
// threads. Compiled into the kernel's file, which must be built with OpenMP (-fopenmp):
// at::parallel_for is a header template that runs serially otherwise.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace ring_attn {
namespace cpu {

// Threads a call may use: 1 inside a parallel region (no nested parallelism).
inline int64_t available_threads() {
  return at::in_parallel_region() ? 1 : std::max<int>(at::get_num_threads(), 1);
}

// Runs f(task, scratch) for task in [0, ntasks) on at::parallel_for threads, handing out tasks
// dynamically in increasing order (callers put the heaviest first). Each thread builds its own
// scratch with make_scratch(). Every task owns its outputs, so the handout order never changes
// a result.
template <typename MakeScratch, typename F>
void parallel_tasks(int64_t ntasks, MakeScratch&& make_scratch, F&& f) {
  if (ntasks <= 0) return;
  const int64_t nthreads = std::min<int64_t>(available_threads(), ntasks);
  std::atomic<int64_t> next{0};
  auto worker = [&](int64_t, int64_t) {
    auto scratch = make_scratch();
    for (int64_t t = next.fetch_add(1); t < ntasks; t = next.fetch_add(1)) f(t, scratch);
  };
  if (nthreads <= 1) {
    worker(0, 1);
  } else {
    at::parallel_for(0, nthreads, 1, worker);
  }
}

}  // namespace cpu
}  // namespace ring_attn
