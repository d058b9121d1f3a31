// A CPU emulation of the few CUDA features the block kernels use, so that their bodies
// (csrc/cuda/*_kernel.cuh, compiled with RA_CUDA_EMULATE) run and are checked on a machine
// without a GPU. Every CUDA thread is a std::thread; a CTA's threads share a barrier
// (__syncthreads) and each warp has a barrier and an exchange area for its collective instructions:
//   mma.sync m16n8k16, ldmatrix(.trans) and stmatrix follow the fragment layouts of the PTX ISA;
//   cp.async copies are deferred until the issuing thread waits for their group (so reading a tile
//   before cp.async.wait_group + barrier reads stale data), and every copy and ldmatrix checks
//   alignment and shared-memory bounds;
//   shared memory starts filled with 0xFF bytes (NaN as bf16/fp16/fp32), so reading what nobody
//   wrote shows up as NaN.
// The sm_90a instructions (wgmma, TMA, mbarriers, named barriers) are emulated in emu_sm90.h on the
// per-CTA and per-thread state declared here.
// A violation prints a message and aborts. This tests index math, masking, merging and
// synchronisation structure; it says nothing about speed, and real-hardware races that the
// emulated timing does not hit are left to compute-sanitizer on a GPU (scripts/gpu_check.sh).
#pragma once

#include <atomic>
#include <barrier>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

// CUDA's vector types that the kernels use.
struct alignas(8) float2 {
  float x, y;
};

struct alignas(16) float4 {
  float x, y, z, w;
};

namespace ring_attn {
namespace cuda {
namespace emu {

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "CUDA emulation: %s\n", what);
  std::abort();
}

// A warp's exchange area for its collective instructions: each collective writes its lanes'
// operands into one of two slot sets, meets the warp at one barrier and reads them back. The sets
// alternate, so a lane that runs ahead to the next collective writes the set nobody reads any
// more (every lane has passed this collective's barrier, hence finished reading the other set).
struct Warp {
  std::barrier<> bar{32};
  uint64_t slot[2][32][8];
};

// An mbarrier (sm_90) in its current phase: arrivals still expected, transaction bytes still
// expected (may run negative while loads complete before their expect_tx) and the TMA loads that
// complete on it, deferred until a thread waits for the barrier.
struct Mbarrier {
  struct Load {
    std::function<void()> copy;
    int64_t bytes;
  };
  int count = 0;
  int pending = 0;
  int64_t tx = 0;
  int phase = 0;
  bool async_visible = false;  // a fence.proxy.async followed the init
  std::vector<Load> loads;
};

// A named barrier (bar.sync / bar.arrive): threads arrived in the current generation.
struct NamedBarrier {
  int expected = 0;
  int arrived = 0;
  uint64_t generation = 0;
};

struct Thread;

struct Cta {
  explicit Cta(int nthreads) : bar(nthreads) {
    for (int w = 0; w < nthreads / 32; ++w) warps.push_back(std::make_unique<Warp>());
    for (int g = 0; g < nthreads / 128; ++g) {
      warpgroups.push_back(std::make_unique<std::barrier<>>(128));
    }
  }
  std::barrier<> bar;
  std::vector<std::unique_ptr<Warp>> warps;
  std::vector<std::unique_ptr<std::barrier<>>> warpgroups;
  int block[3] = {0, 0, 0};
  char* smem = nullptr;
  size_t smem_bytes = 0;
  // sm_90a state. async_view: shared memory as the async proxy (wgmma operand reads) sees it: TMA
  // loads write both views, generic stores reach it at a fence.proxy.async.
  std::vector<char> async_view;
  std::mutex sm90_mutex;  // guards everything below and async_view
  std::condition_variable sm90_cv;
  std::map<uintptr_t, Mbarrier> mbarriers;  // by shared-memory offset
  NamedBarrier named[16];
  std::vector<Thread*> threads;  // by thread index, for the warpgroup-collective wgmma
};

// One wgmma.mma_async of a thread, run when its group is waited for.
struct WgmmaOp {
  int n;
  bool bf16;
  bool a_in_regs;
  uint64_t desc_a, desc_b;
  bool trans_a, trans_b;
  uint32_t a_regs[4];  // the register A operand as issued
  float* d;
  bool scale_d;
};

struct PendingCopy {
  void* dst;
  const void* src;
  int bytes;
  bool valid;
};

// One cp.reduce.async.bulk.tensor (fp32 add) of a thread, run when its group is waited for: the
// source's bytes [src, src + bytes) (shared-memory offsets), which must stay unchanged until then,
// and the element-wise adds (destination, source offset).
struct BulkReduce {
  uint32_t src;
  uint32_t bytes;
  std::vector<std::pair<float*, uint32_t>> adds;
};

struct Thread {
  Cta* cta = nullptr;
  int tid = 0;
  int collectives = 0;  // warp collectives this thread has run (its slot set: the parity)
  std::vector<std::vector<PendingCopy>> committed;
  std::vector<PendingCopy> open;
  // wgmma: whether a wgmma.fence came since the last wait, the uncommitted and committed
  // operations, and the true value of each accumulator an operation in flight writes (the
  // registers themselves hold NaN until the wait).
  bool wgmma_fenced = false;
  std::vector<WgmmaOp> wgmma_open;
  std::deque<std::vector<WgmmaOp>> wgmma_committed;
  std::map<float*, std::vector<float>> wgmma_acc;
  // TMA reductions: the uncommitted and the committed groups whose sources are still to be read.
  std::vector<BulkReduce> bulk_open;
  std::deque<std::vector<BulkReduce>> bulk_committed;
};

inline thread_local Thread* tls = nullptr;

inline int thread_idx() { return tls->tid; }
inline int block_idx(int i) { return tls->cta->block[i]; }
inline void sync_threads() { tls->cta->bar.arrive_and_wait(); }
inline Warp& warp() { return *tls->cta->warps[tls->tid / 32]; }
inline int lane() { return tls->tid % 32; }
// The slot set of this thread's next collective.
inline uint64_t (&slots())[32][8] { return warp().slot[tls->collectives++ % 2]; }

// An access of `bytes` bytes must lie in the CTA's shared memory and be aligned to its size.
inline void check_smem(const void* p, size_t bytes, const char* what) {
  const char* c = static_cast<const char*>(p);
  const Cta& cta = *tls->cta;
  if (c < cta.smem || c + bytes > cta.smem + cta.smem_bytes) fail(what);
  if (reinterpret_cast<uintptr_t>(p) % bytes != 0) fail(what);
}

template <typename T>
T shfl_xor(T v, int mask) {
  static_assert(sizeof(T) <= 8, "shuffle width");
  Warp& w = warp();
  auto& slot = slots();
  const int l = lane();
  std::memcpy(&slot[l][0], &v, sizeof(T));
  w.bar.arrive_and_wait();
  T out;
  std::memcpy(&out, &slot[l ^ mask][0], sizeof(T));
  return out;
}

inline uint32_t ballot(bool v) {
  Warp& w = warp();
  auto& slot = slots();
  const int l = lane();
  slot[l][0] = v ? 1 : 0;
  w.bar.arrive_and_wait();
  uint32_t out = 0;
  for (int i = 0; i < 32; ++i) out |= static_cast<uint32_t>(slot[i][0] & 1u) << i;
  return out;
}

// ---- 16-bit floats (round to nearest even) ------------------------------------------------------
inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
inline float bf16_to_float(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t float_to_fp16(float f) {
  const _Float16 h = static_cast<_Float16>(f);
  uint16_t u;
  std::memcpy(&u, &h, 2);
  return u;
}
inline float fp16_to_float(uint16_t u) {
  _Float16 h;
  std::memcpy(&h, &u, 2);
  return static_cast<float>(h);
}
template <bool kBF16>
inline uint16_t from_float(float f) { return kBF16 ? float_to_bf16(f) : float_to_fp16(f); }
template <bool kBF16>
inline float to_float(uint16_t h) { return kBF16 ? bf16_to_float(h) : fp16_to_float(h); }

template <bool kBF16>
inline uint32_t pack2(float lo, float hi) {
  return static_cast<uint32_t>(from_float<kBF16>(lo)) |
         (static_cast<uint32_t>(from_float<kBF16>(hi)) << 16);
}

// ---- mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16} -------------------------------------------
template <bool kBF16>
void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  Warp& w = warp();
  auto& slot = slots();
  const int l = lane();
  for (int i = 0; i < 4; ++i) slot[l][i] = a[i];
  slot[l][4] = b0;
  slot[l][5] = b1;
  w.bar.arrive_and_wait();
  auto elem = [&](int ln, int reg, int k) {
    const uint32_t v = static_cast<uint32_t>(slot[ln][reg]);
    return to_float<kBF16>(static_cast<uint16_t>(k % 2 ? v >> 16 : v & 0xffffu));
  };
  // A (r, k): lane 4 * (r % 8) + (k % 8) / 2, register (r / 8) + 2 * (k / 8)
  // B (k, n): lane 4 * n + (k % 8) / 2, register 4 + k / 8
  const int g = l / 4, t = l % 4;
  for (int i = 0; i < 4; ++i) {
    const int r = g + 8 * (i / 2), n = 2 * t + i % 2;
    double acc = d[i];
    for (int k = 0; k < 16; ++k) {
      acc += static_cast<double>(elem(4 * (r % 8) + (k % 8) / 2, r / 8 + 2 * (k / 8), k)) *
             elem(4 * n + (k % 8) / 2, 4 + k / 8, k);
    }
    d[i] = static_cast<float>(acc);
  }
}

// ---- ldmatrix.sync.aligned.m8n8.x4(.trans).shared.b16 ---------------------------------------------
inline void ldmatrix_x4(uint32_t (&r)[4], const uint16_t* row, bool trans) {
  check_smem(row, 16, "ldmatrix row address out of shared memory or not 16-byte aligned");
  Warp& w = warp();
  auto& slot = slots();
  const int l = lane();
  std::memcpy(&slot[l][0], &row, sizeof(row));
  w.bar.arrive_and_wait();
  auto row_of = [&](int ln) {
    const uint16_t* p;
    std::memcpy(&p, &slot[ln][0], sizeof(p));
    return p;
  };
  const int g = l / 4, t = l % 4;
  for (int i = 0; i < 4; ++i) {
    uint16_t lo, hi;
    if (!trans) {
      const uint16_t* p = row_of(8 * i + g);
      lo = p[2 * t];
      hi = p[2 * t + 1];
    } else {
      lo = row_of(8 * i + 2 * t)[g];
      hi = row_of(8 * i + 2 * t + 1)[g];
    }
    r[i] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
  }
}

// ---- stmatrix.sync.aligned.m8n8.x4.shared.b16 ------------------------------------------------------
inline void stmatrix_x4(const uint32_t (&r)[4], uint16_t* row) {
  check_smem(row, 16, "stmatrix row address out of shared memory or not 16-byte aligned");
  Warp& w = warp();
  auto& slot = slots();
  const int l = lane();
  std::memcpy(&slot[l][0], &row, sizeof(row));
  for (int i = 0; i < 4; ++i) slot[l][1 + i] = r[i];
  w.bar.arrive_and_wait();
  // Lane l writes row l % 8 of matrix l / 8: column pair t comes from lane 4 * (l % 8) + t.
  uint16_t* p;
  std::memcpy(&p, &slot[l][0], sizeof(p));
  const int i = l / 8, g = l % 8;
  for (int t = 0; t < 4; ++t) {
    const uint32_t v = static_cast<uint32_t>(slot[4 * g + t][1 + i]);
    p[2 * t] = static_cast<uint16_t>(v & 0xffffu);
    p[2 * t + 1] = static_cast<uint16_t>(v >> 16);
  }
}

// ---- cp.async ----------------------------------------------------------------------------------
inline void cp_async_16(void* smem, const void* gmem, int src_bytes) {
  check_smem(smem, 16, "cp.async destination out of shared memory or not 16-byte aligned");
  if (src_bytes != 0 && src_bytes != 16) fail("cp.async source size other than 0 or 16");
  const bool valid = src_bytes == 16;
  if (valid && reinterpret_cast<uintptr_t>(gmem) % 16 != 0) fail("cp.async source not 16-byte aligned");
  tls->open.push_back({smem, gmem, 16, valid});
}
inline void cp_async_4(void* smem, const void* gmem, bool valid) {
  check_smem(smem, 4, "cp.async destination out of shared memory or not 4-byte aligned");
  if (valid && reinterpret_cast<uintptr_t>(gmem) % 4 != 0) fail("cp.async source not 4-byte aligned");
  tls->open.push_back({smem, gmem, 4, valid});
}
inline void cp_async_commit() {
  tls->committed.push_back(std::move(tls->open));
  tls->open.clear();
}
inline void cp_async_wait(int n) {
  auto& groups = tls->committed;
  while (static_cast<int>(groups.size()) > n) {
    for (const PendingCopy& c : groups.front()) {
      if (c.valid) {
        std::memcpy(c.dst, c.src, c.bytes);
      } else {
        std::memset(c.dst, 0, c.bytes);
      }
    }
    groups.erase(groups.begin());
  }
}

// Every reduction instruction of the emulated kernels is counted (the deterministic backward must
// issue none). A vector reduction (sm_90) must be aligned to its width, as on the GPU.
inline std::atomic<int64_t> atomic_adds{0};
inline void red_add(float* p, const float* v, int n, bool vector) {
  if (vector && reinterpret_cast<uintptr_t>(p) % (4 * n) != 0) fail("vector reduction not aligned");
  atomic_adds.fetch_add(vector ? 1 : n, std::memory_order_relaxed);
  for (int i = 0; i < n; ++i) std::atomic_ref<float>(p[i]).fetch_add(v[i]);
}

// The dynamic shared memory per block the emulated device allows (0: any), as
// cudaDevAttrMaxSharedMemoryPerBlockOptin: a launch that asks for more fails, as
// cudaFuncSetAttribute does on a GPU.
inline size_t max_dynamic_smem = 0;

// Runs body(smem) for every CTA of a (gx, gy, gz) grid of `nthreads` threads, one CTA at a time.
template <typename Body>
void launch(int gx, int gy, int gz, int nthreads, size_t smem_bytes, Body&& body) {
  if (max_dynamic_smem != 0 && smem_bytes > max_dynamic_smem) {
    fail("a launch asks for more dynamic shared memory than the emulated device allows");
  }
  std::vector<uint64_t> smem((smem_bytes + 7) / 8 + 2);
  for (int z = 0; z < gz; ++z) {
    for (int y = 0; y < gy; ++y) {
      for (int x = 0; x < gx; ++x) {
        Cta cta(nthreads);
        cta.block[0] = x;
        cta.block[1] = y;
        cta.block[2] = z;
        char* base = reinterpret_cast<char*>(smem.data());
        base += (16 - reinterpret_cast<uintptr_t>(base) % 16) % 16;
        std::memset(base, 0xff, smem_bytes);
        cta.smem = base;
        cta.smem_bytes = smem_bytes;
        cta.async_view.assign(smem_bytes, static_cast<char>(0xff));
        cta.threads.assign(nthreads, nullptr);
        std::vector<std::thread> threads;
        for (int tid = 0; tid < nthreads; ++tid) {
          threads.emplace_back([&cta, &body, tid] {
            Thread t;
            t.cta = &cta;
            t.tid = tid;
            cta.threads[tid] = &t;
            tls = &t;
            body(cta.smem);
            if (!t.open.empty() || !t.committed.empty()) fail("thread exited with cp.async in flight");
            if (!t.wgmma_open.empty() || !t.wgmma_committed.empty()) {
              fail("thread exited with wgmma.mma_async not waited for");
            }
            if (!t.bulk_open.empty() || !t.bulk_committed.empty()) {
              fail("thread exited with TMA reductions not waited for");
            }
            tls = nullptr;
          });
        }
        for (auto& th : threads) th.join();
        for (const auto& [offset, mbar] : cta.mbarriers) {
          if (!mbar.loads.empty()) {
            fail("CTA exited with a TMA load whose mbarrier nobody waited for");
          }
        }
        for (const NamedBarrier& nb : cta.named) {
          if (nb.arrived != 0) {
            fail("CTA exited with threads arrived at an incomplete named barrier");
          }
        }
      }
    }
  }
}

}  // namespace emu
}  // namespace cuda
}  // namespace ring_attn
