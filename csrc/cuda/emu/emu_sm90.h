// CPU emulation of the sm_90a instructions of csrc/cuda/sm90_primitives.cuh, on the CTA and thread
// state of emu_runtime.h. Every asynchronous operation completes only at the wait that the PTX
// ISA makes responsible for it, so code that skips that wait or a fence reads wrong data:
//   wgmma.mma_async: recorded at issue, its accumulator registers set to NaN; it runs at the
//     wgmma.wait_group that retires its group, reading its shared-memory operands then (through
//     the descriptors: 128-byte swizzle, K- or MN-major) and writing the accumulators back. It must
//     follow a wgmma.fence issued since the thread's last wait, and the 128 threads of the
//     warpgroup must issue the same operations.
//   Shared memory has two views: the generic one (plain loads and stores) and the async proxy's
//     (what wgmma reads). TMA loads write both; generic stores reach the async view only at a
//     fence.proxy.async (which publishes the whole CTA's shared memory).
//   cp.async.bulk.tensor (TMA) 2D loads: recorded on their mbarrier at issue; they land (box
//     read with out-of-bounds elements zero, optional 128-byte swizzle) and complete their
//     transaction bytes when a thread waits on that mbarrier. An mbarrier's phase completes when
//     its arrivals and transaction bytes are both in; a TMA load on a barrier whose init no
//     fence.proxy.async followed is an error.
//   cp.reduce.async.bulk.tensor (fp32 add of a box to a tensor of rank up to 5: elements outside
//     the tensor are not written; optional 128-byte swizzle of the box in shared memory):
//     recorded at issue, where the source must hold no generic store that a fence.proxy.async
//     has not published; it reads its source from the async view and adds it (atomically, one
//     count in atomic_adds per instruction) at the cp.async.bulk.wait_group.read that retires its
//     group, where the source must still be unchanged. A thread must wait for all of its bulk
//     groups before it exits.
//   Named barriers (bar.sync / bar.arrive, ids 1..15) with a thread count that all users agree on.
// Waits that do not complete within wait_timeout_s seconds abort (a missing arrive, an
// expect_tx that does not match the bytes loaded), as does a CTA that exits with a TMA load or a
// wgmma never waited for.
#pragma once

#include <algorithm>
#include <chrono>

#include "cuda/emu/emu_runtime.h"
#include "cuda/sm90_layout.h"

namespace ring_attn {
namespace cuda {
namespace emu {

inline double wait_timeout_s = 30.0;

// The shared-memory address (offset from the CTA's shared memory) of p; an access of `bytes`
// bytes there must lie in shared memory and be aligned to `align`.
inline uint32_t smem_address(const void* p, size_t bytes, size_t align, const char* what) {
  const char* c = static_cast<const char*>(p);
  const Cta& cta = *tls->cta;
  if (c < cta.smem || c + bytes > cta.smem + cta.smem_bytes) fail(what);
  const uint32_t a = static_cast<uint32_t>(c - cta.smem);
  if (a % align != 0) fail(what);
  return a;
}

class Deadline {
 public:
  Deadline()
      : end_(std::chrono::steady_clock::now() +
             std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                 std::chrono::duration<double>(wait_timeout_s))) {}
  bool passed() const { return std::chrono::steady_clock::now() > end_; }
  std::chrono::steady_clock::time_point at() const { return end_; }

 private:
  std::chrono::steady_clock::time_point end_;
};

// ---- tensor maps (the emulated cuTensorMapEncodeTiled) ------------------------------------------
enum class TmaSwizzle { kNone, k128B };

constexpr int kTmaMaxRank = 5;

// A tensor of `rank` dimensions in global memory: dims[0] elements of elem_bytes bytes contiguous,
// dimension i > 0 strides[i] bytes apart (strides[0] = elem_bytes); read or reduced in boxes of
// box[0] x .. x box[rank - 1] elements, laid out in shared memory in that order (box[0] fastest).
struct TensorMap {
  const char* base;
  int elem_bytes;
  int rank;
  int64_t dims[kTmaMaxRank];
  int64_t strides[kTmaMaxRank];
  int box[kTmaMaxRank];
  TmaSwizzle swizzle;
};

// Checks what cuTensorMapEncodeTiled checks (and, with the 128-byte swizzle, that a box row is
// exactly one 128-byte swizzle row, the only form the emulation supports). outer_strides: the
// byte strides of dimensions 1 .. rank - 1.
inline TensorMap make_tensor_map(const void* base, int elem_bytes, int rank, const int64_t* dims,
                                 const int64_t* outer_strides, const int* box,
                                 TmaSwizzle swizzle) {
  if (reinterpret_cast<uintptr_t>(base) % 16 != 0) fail("tensor map: base not 16-byte aligned");
  if (elem_bytes != 1 && elem_bytes != 2 && elem_bytes != 4 && elem_bytes != 8)
    fail("tensor map: element size");
  if (rank < 1 || rank > kTmaMaxRank) fail("tensor map: rank outside 1..5");
  TensorMap t{static_cast<const char*>(base), elem_bytes, rank, {}, {}, {}, swizzle};
  t.strides[0] = elem_bytes;
  for (int i = 0; i < rank; ++i) {
    if (dims[i] < 1 || dims[i] > (int64_t(1) << 32)) fail("tensor map: dimension outside 1..2^32");
    if (box[i] < 1 || box[i] > 256) fail("tensor map: box size");
    t.dims[i] = dims[i];
    t.box[i] = box[i];
    if (i > 0) {
      const int64_t s = outer_strides[i - 1];
      if (s % 16 != 0 || s < 0 || s >= (int64_t(1) << 40)) fail("tensor map: stride");
      t.strides[i] = s;
    }
  }
  if (rank > 1 && t.strides[1] < dims[0] * elem_bytes) fail("tensor map: row stride");
  if (box[0] * elem_bytes % 16 != 0) fail("tensor map: box row not a multiple of 16 bytes");
  if (swizzle == TmaSwizzle::k128B && box[0] * elem_bytes != 128) {
    fail("tensor map: a 128-byte swizzled box row must be 128 bytes");
  }
  return t;
}

// A 2D tensor of `outer` rows of `inner` elements, rows row_stride_bytes apart, in boxes of
// box_outer rows of box_inner elements.
inline TensorMap make_tensor_map_2d(const void* base, int elem_bytes, int64_t inner, int64_t outer,
                                    int64_t row_stride_bytes, int box_inner, int box_outer,
                                    TmaSwizzle swizzle) {
  const int64_t dims[2] = {inner, outer};
  const int box[2] = {box_inner, box_outer};
  return make_tensor_map(base, elem_bytes, 2, dims, &row_stride_bytes, box, swizzle);
}

// The box's elements in shared-memory order: fn(offset of the element in the box's bytes, after
// the swizzle; the element's global address, or null outside the tensor). coords: the box's
// first element.
template <typename Fn>
void for_each_box_element(const TensorMap& t, const int* coords, Fn&& fn) {
  int64_t count = 1;
  for (int i = 0; i < t.rank; ++i) count *= t.box[i];
  for (int64_t n = 0; n < count; ++n) {
    int64_t rest = n, address = 0;
    bool inside = true;
    for (int i = 0; i < t.rank; ++i) {
      const int64_t x = int64_t(coords[i]) + rest % t.box[i];
      rest /= t.box[i];
      inside = inside && x >= 0 && x < t.dims[i];
      address += x * t.strides[i];
    }
    uint32_t off = static_cast<uint32_t>(n * t.elem_bytes);
    if (t.swizzle == TmaSwizzle::k128B) off = sm90::swizzle128(off);
    fn(off, inside ? t.base + address : nullptr);
  }
}

// The bytes of a box and the shared-memory alignment its swizzle needs.
inline int64_t box_bytes(const TensorMap& t) {
  int64_t bytes = t.elem_bytes;
  for (int i = 0; i < t.rank; ++i) bytes *= t.box[i];
  return bytes;
}
inline uint32_t box_alignment(const TensorMap& t) {
  return t.swizzle == TmaSwizzle::k128B ? sm90::kSwizzleAtomBytes : 128;
}

// ---- mbarriers ---------------------------------------------------------------------------------
// Callers hold cta.sm90_mutex.
inline Mbarrier& mbarrier_locked(const uint64_t* bar) {
  const uint32_t a = smem_address(bar, 8, 8, "mbarrier out of shared memory or not 8-byte aligned");
  auto it = tls->cta->mbarriers.find(a);
  if (it == tls->cta->mbarriers.end()) fail("mbarrier used before mbarrier.init");
  return it->second;
}

inline void complete_phase_if_done(Mbarrier& m) {
  if (m.pending == 0 && m.tx == 0) {
    m.phase ^= 1;
    m.pending = m.count;
  }
}

inline void mbar_init(uint64_t* bar, int count) {
  const uint32_t a = smem_address(bar, 8, 8, "mbarrier out of shared memory or not 8-byte aligned");
  if (count < 1) fail("mbarrier.init with a count below 1");
  std::lock_guard<std::mutex> lock(tls->cta->sm90_mutex);
  Mbarrier& m = tls->cta->mbarriers[a];
  if (!m.loads.empty()) fail("mbarrier.init on a barrier with TMA loads in flight");
  m = Mbarrier{};
  m.count = count;
  m.pending = count;
}

inline void mbar_arrive(uint64_t* bar, int64_t tx_bytes) {
  std::lock_guard<std::mutex> lock(tls->cta->sm90_mutex);
  Mbarrier& m = mbarrier_locked(bar);
  m.tx += tx_bytes;
  --m.pending;
  complete_phase_if_done(m);
}

// Lands the TMA loads on the barrier; true when the phase of the given parity has completed.
inline bool mbar_try_wait(uint64_t* bar, int parity) {
  std::lock_guard<std::mutex> lock(tls->cta->sm90_mutex);
  Mbarrier& m = mbarrier_locked(bar);
  if (m.phase != (parity & 1)) return true;
  for (Mbarrier::Load& load : m.loads) {
    if (!m.async_visible)
      fail("TMA load completes on an mbarrier whose init no fence.proxy.async made visible");
    load.copy();
    m.tx -= load.bytes;
  }
  m.loads.clear();
  complete_phase_if_done(m);
  return m.phase != (parity & 1);
}

inline void mbar_wait(uint64_t* bar, int parity) {
  const Deadline deadline;
  while (!mbar_try_wait(bar, parity)) {
    if (deadline.passed())
      fail("mbarrier wait timed out (an arrive missing, or expect_tx != bytes loaded)");
    std::this_thread::yield();
  }
}

inline void fence_proxy_async() {
  Cta& cta = *tls->cta;
  std::lock_guard<std::mutex> lock(cta.sm90_mutex);
  std::memcpy(cta.async_view.data(), cta.smem, cta.smem_bytes);
  for (auto& [offset, m] : cta.mbarriers) m.async_visible = true;
}

// ---- TMA ----------------------------------------------------------------------------------------
inline void tma_load_2d(void* dst, const TensorMap* map, uint64_t* bar, int c0, int c1) {
  const TensorMap t = *map;
  if (t.rank != 2) fail("2D TMA load with a tensor map of another rank");
  const int64_t bytes = box_bytes(t);
  const uint32_t a = smem_address(dst, bytes, box_alignment(t),
                                  "TMA destination out of shared memory or misaligned");
  Cta* cta = tls->cta;
  auto copy = [t, a, cta, c0, c1] {
    const int coords[2] = {c0, c1};
    for_each_box_element(t, coords, [&](uint32_t off, const char* src) {
      char* g = cta->smem + a + off;
      if (src != nullptr) {
        std::memcpy(g, src, t.elem_bytes);
      } else {
        std::memset(g, 0, t.elem_bytes);
      }
      std::memcpy(cta->async_view.data() + a + off, g, t.elem_bytes);
    });
  };
  std::lock_guard<std::mutex> lock(cta->sm90_mutex);
  mbarrier_locked(bar).loads.push_back({copy, bytes});
}

// ---- TMA tensor reductions ---------------------------------------------------------------------
// Whether the generic and the async views of shared memory agree on [a, a + bytes). Callers hold
// cta.sm90_mutex.
inline bool views_agree_locked(uint32_t a, uint32_t bytes) {
  const Cta& cta = *tls->cta;
  return std::memcmp(cta.smem + a, cta.async_view.data() + a, bytes) == 0;
}

// The box of `map` whose first element is at `coords` (map->rank of them) added element-wise
// (fp32) from shared memory at src to the tensor, elements outside the tensor left out.
inline void tma_reduce_add_f32(const void* src, const TensorMap* map, const int* coords,
                               int rank) {
  const TensorMap t = *map;
  if (t.rank != rank) fail("TMA reduction coordinates of another rank than the tensor map's");
  if (t.elem_bytes != 4) fail("emulated TMA reduction of elements other than fp32");
  const int64_t bytes = box_bytes(t);
  const uint32_t a = smem_address(src, bytes, box_alignment(t),
                                  "TMA reduction source out of shared memory or misaligned");
  BulkReduce r{a, static_cast<uint32_t>(bytes), {}};
  for_each_box_element(t, coords, [&](uint32_t off, const char* dst) {
    float* element = const_cast<float*>(reinterpret_cast<const float*>(dst));
    if (element != nullptr) r.adds.push_back({element, a + off});
  });
  std::lock_guard<std::mutex> lock(tls->cta->sm90_mutex);
  if (!views_agree_locked(a, r.bytes)) {
    fail("TMA reduction source holds generic stores no fence.proxy.async published");
  }
  tls->bulk_open.push_back(std::move(r));
  atomic_adds.fetch_add(1, std::memory_order_relaxed);
}

inline void bulk_commit_group() {
  tls->bulk_committed.push_back(std::move(tls->bulk_open));
  tls->bulk_open.clear();
}

inline void bulk_wait_group_read(int n) {
  Thread& t = *tls;
  Cta& cta = *t.cta;
  while (t.bulk_committed.size() > static_cast<size_t>(n)) {
    for (const BulkReduce& r : t.bulk_committed.front()) {
      std::vector<float> v(r.adds.size());
      {
        std::lock_guard<std::mutex> lock(cta.sm90_mutex);
        if (!views_agree_locked(r.src, r.bytes)) {
          fail("TMA reduction source overwritten before the wait_group.read that retires it");
        }
        for (size_t i = 0; i < v.size(); ++i)
          std::memcpy(&v[i], cta.async_view.data() + r.adds[i].second, 4);
      }
      for (size_t i = 0; i < v.size(); ++i) {
        std::atomic_ref<float>(*r.adds[i].first).fetch_add(v[i]);
      }
    }
    t.bulk_committed.pop_front();
  }
}

// ---- named barriers -----------------------------------------------------------------------------
inline void named_barrier(int id, int nthreads, bool wait) {
  Cta& cta = *tls->cta;
  if (id < 1 || id > 15) fail("named barrier id outside 1..15 (0 is __syncthreads)");
  if (nthreads < 32 || nthreads % 32 != 0 || nthreads > static_cast<int>(cta.threads.size())) {
    fail("named barrier thread count not a positive multiple of 32 within the CTA");
  }
  std::unique_lock<std::mutex> lock(cta.sm90_mutex);
  NamedBarrier& nb = cta.named[id];
  if (nb.arrived == 0) {
    nb.expected = nthreads;
  } else if (nb.expected != nthreads) {
    fail("named barrier used with different thread counts");
  }
  const uint64_t generation = nb.generation;
  if (++nb.arrived == nb.expected) {
    nb.arrived = 0;
    ++nb.generation;
    cta.sm90_cv.notify_all();
    return;
  }
  if (!wait) return;
  const Deadline deadline;
  while (nb.generation == generation) {
    if (cta.sm90_cv.wait_until(lock, deadline.at()) == std::cv_status::timeout &&
        nb.generation == generation) {
      fail("named barrier wait timed out (too few threads arrive)");
    }
  }
}

// ---- wgmma --------------------------------------------------------------------------------------
// The accumulator registers of an operation in flight hold this NaN.
constexpr uint32_t kInFlightBits = 0x7fcdead0u;

inline float in_flight_value() {
  float f;
  std::memcpy(&f, &kInFlightBits, 4);
  return f;
}

inline void wgmma_fence() { tls->wgmma_fenced = true; }

inline void wgmma_issue(const WgmmaOp& op) {
  Thread& t = *tls;
  if (t.cta->threads.size() % 128 != 0) fail("wgmma in a CTA that is not whole warpgroups");
  if (!t.wgmma_fenced)
    fail("wgmma.mma_async without a wgmma.fence since the last wgmma.wait_group");
  if (op.n < 8 || op.n > 256 || op.n % 8 != 0) fail("wgmma N not a multiple of 8 in 8..256");
  if (t.wgmma_acc.find(op.d) == t.wgmma_acc.end()) t.wgmma_acc[op.d].assign(op.d, op.d + op.n / 2);
  for (int i = 0; i < op.n / 2; ++i) op.d[i] = in_flight_value();
  t.wgmma_open.push_back(op);
}

inline void wgmma_commit() {
  tls->wgmma_committed.push_back(std::move(tls->wgmma_open));
  tls->wgmma_open.clear();
}

// A 16-bit element of the async view of shared memory.
inline float async_element(uint32_t address, bool bf16) {
  const Cta& cta = *tls->cta;
  if (address + 2 > cta.smem_bytes) fail("wgmma operand out of shared memory");
  uint16_t h;
  std::memcpy(&h, cta.async_view.data() + address, 2);
  return bf16 ? bf16_to_float(h) : fp16_to_float(h);
}

inline void check_descriptor(uint64_t d) {
  if (sm90::desc_layout(d) != sm90::kLayoutSwizzle128)
    fail("emulated wgmma descriptor is not 128-byte swizzled");
  if (sm90::desc_base_offset(d) != 0) fail("wgmma descriptor base offset other than 0");
}

// Runs op (the `index`-th operation of group `group` of every thread of this warpgroup) for this
// thread's accumulator fragment. m64nNk16, fragment of lane 4g + q of warp w, register i:
//   D (row 16w + g + 8 ((i / 2) % 2), column 8 (i / 4) + 2q + i % 2)
//   register A a[j]: (row 16w + g + 8 (j % 2), k 2q + 8 (j / 2) + {0, 1}) as in mma.m16n8k16.
inline void wgmma_run(const WgmmaOp& op, size_t group, size_t index) {
  Thread& t = *tls;
  Cta& cta = *t.cta;
  const int wg0 = t.tid / 128 * 128, lt = t.tid % 128;
  const int w = lt / 32, g = (lt % 32) / 4, q = lt % 4;
  for (int x = wg0; x < wg0 + 128; ++x) {
    const Thread& o = *cta.threads[x];
    if (o.wgmma_committed[group].size() != t.wgmma_committed[group].size()) {
      fail("the threads of a warpgroup commit different numbers of wgmma operations");
    }
    const WgmmaOp& p = o.wgmma_committed[group][index];
    if (p.n != op.n || p.bf16 != op.bf16 || p.a_in_regs != op.a_in_regs || p.desc_b != op.desc_b ||
        p.trans_b != op.trans_b ||
        (!op.a_in_regs && (p.desc_a != op.desc_a || p.trans_a != op.trans_a))) {
      fail("the threads of a warpgroup issue different wgmma operations");
    }
  }
  if (!op.a_in_regs) check_descriptor(op.desc_a);
  check_descriptor(op.desc_b);
  auto a_elem = [&](int row, int k) -> float {
    if (!op.a_in_regs)
      return async_element(sm90::operand_address(op.desc_a, op.trans_a, row, k), op.bf16);
    const int r = row % 16, lane = 4 * (r % 8) + (k % 8) / 2, reg = r / 8 + 2 * (k / 8);
    const uint32_t v =
        cta.threads[wg0 + 32 * (row / 16) + lane]->wgmma_committed[group][index].a_regs[reg];
    const uint16_t h = static_cast<uint16_t>(k % 2 ? v >> 16 : v & 0xffffu);
    return op.bf16 ? bf16_to_float(h) : fp16_to_float(h);
  };
  std::vector<float>& acc = t.wgmma_acc.at(op.d);
  std::lock_guard<std::mutex> lock(cta.sm90_mutex);
  for (int i = 0; i < op.n / 2; ++i) {
    const int row = 16 * w + g + 8 * ((i / 2) % 2), col = 8 * (i / 4) + 2 * q + i % 2;
    double sum = op.scale_d ? acc[i] : 0.0;
    for (int k = 0; k < 16; ++k) {
      sum += static_cast<double>(a_elem(row, k)) *
             async_element(sm90::operand_address(op.desc_b, op.trans_b, col, k), op.bf16);
    }
    acc[i] = static_cast<float>(sum);
  }
}

inline void wgmma_wait(int n) {
  Thread& t = *tls;
  if (t.cta->threads.size() % 128 != 0) fail("wgmma in a CTA that is not whole warpgroups");
  std::barrier<>& wg = *t.cta->warpgroups[t.tid / 128];
  wg.arrive_and_wait();  // every thread of the warpgroup has issued what it waits for
  const size_t groups = t.wgmma_committed.size();
  const size_t retire = groups > static_cast<size_t>(n) ? groups - n : 0;
  for (int x = t.tid / 128 * 128; x < t.tid / 128 * 128 + 128; ++x) {
    if (t.cta->threads[x]->wgmma_committed.size() != groups) {
      fail("the threads of a warpgroup wait for different numbers of wgmma groups");
    }
  }
  for (size_t gi = 0; gi < retire; ++gi) {
    for (size_t i = 0; i < t.wgmma_committed[gi].size(); ++i)
      wgmma_run(t.wgmma_committed[gi][i], gi, i);
  }
  wg.arrive_and_wait();  // nobody reads this thread's operations any more
  t.wgmma_committed.erase(t.wgmma_committed.begin(), t.wgmma_committed.begin() + retire);
  // Accumulators with nothing in flight get their values.
  for (auto it = t.wgmma_acc.begin(); it != t.wgmma_acc.end();) {
    bool busy = false;
    for (const auto& grp : t.wgmma_committed) {
      for (const WgmmaOp& op : grp) busy |= op.d == it->first;
    }
    for (const WgmmaOp& op : t.wgmma_open) busy |= op.d == it->first;
    if (busy) {
      ++it;
      continue;
    }
    for (size_t i = 0; i < it->second.size(); ++i) {
      uint32_t bits;
      std::memcpy(&bits, &it->first[i], 4);
      if (bits != kInFlightBits) fail("accumulator registers written while a wgmma was in flight");
    }
    std::copy(it->second.begin(), it->second.end(), it->first);
    it = t.wgmma_acc.erase(it);
  }
  t.wgmma_fenced = false;
}

}  // namespace emu
}  // namespace cuda
}  // namespace ring_attn
