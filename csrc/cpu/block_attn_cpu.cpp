// CPU block attention, flash-attention style, on our own register-blocked GEMM micro-kernels
// (block_attn_cpu_tiles.inc): per (query tile, key tile) the scores S = scale * Q K^T (the row
// maxima come out of the same pass on full tiles), the online softmax (base 2), and O += P V
// (forward), or the five products of the gradients (backward). Tiles are classified once per call
// from the rows' bounds and the keys' positions (core/mask.h): skipped tiles cost nothing, full
// tiles carry no per-element mask work, partial tiles (the causal diagonal, window edges,
// sequence boundaries) are worked in sub-tiles of 32 rows x 64 keys, each computing only the keys
// its rows may see and masking with vector compares of the key positions only where needed.
//
// Instruction sets: the tile kernels are compiled three times (portable, AVX2+FMA, AVX-512) in
// this one file, the vector ones inside `#pragma GCC target` regions, and the best one the CPU
// supports is picked at the first call (env RING_ATTN_CPU_KERNEL=generic|avx2|avx512|amx caps it).
// Where the CPU has AMX-BF16, the GEMMs (the forward's two, the backward's five) run on the AMX
// tile unit (block_attn_amx.inc): bfloat16 inputs always, float32 inputs when
// torch.set_float32_matmul_precision allows it ("high": operands split into three bf16 planes;
// "medium": one); "avx512" turns it off.
// The rest of the file is compiled for the build's baseline, so the library runs on any x86-64 and
// is fast where AVX-512 is available.
//
// Layouts per call (copies are O(seq * headdim), paid once per call, never per tile):
//   K (and V in backward) as K^T packed in panels of kPanel keys (Tiles::kPanel): panel p of head
//     (b, h) is a dense headdim x kPanel block, zero beyond the last key, so the score micro-kernel
//     streams it contiguously from L1.
//   Operands read as rows (Q, V, dout, K in backward) are used in place when they are already of
//     the accumulator type, dense per head (row stride = headdim) and their headdim is a multiple
//     of the vector width; else they are copied head-major in the accumulator type, headdim
//     zero-padded to that multiple (bf16/fp16 inputs always are: all arithmetic is fp32).
//
// Determinism: every output element is written by exactly one task, and tasks compute in a fixed
// order, so results are bitwise reproducible from run to run at a given thread count. (Backward
// splits the keys of a head over tasks when there are few heads per thread; the dq partials of the
// splits are then added in split order, so dq can differ in the last bits between thread counts.)
#include "cpu/block_attn_cpu.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "core/mask.h"
#include "core/merge.h"

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define RA_CPU_X86 1
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#else
#define RA_CPU_X86 0
#endif
// AMX intrinsics: GCC 11, clang 12.
#if RA_CPU_X86 && ((defined(__clang__) && __clang_major__ >= 12) || \
                   (!defined(__clang__) && __GNUC__ >= 11))
#define RA_CPU_AMX 1
#else
#define RA_CPU_AMX 0
#endif

// ATen's at::parallel_for is a header template: with the OpenMP backend it only runs in parallel
// when this file itself is compiled with OpenMP (-fopenmp, CMake's OpenMP::OpenMP_CXX).
#if AT_PARALLEL_OPENMP && !defined(_OPENMP)
#warning "block_attn_cpu.cpp built without -fopenmp: the CPU kernels will run single-threaded"
#endif

// GCC flags the _mm512_undefined_*() inside its own AVX-512 intrinsics (e.g. _mm512_reduce_max_pd)
// once they are inlined here: false positives.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#define RA_VI inline __attribute__((always_inline))

namespace ring_attn {
namespace cpu {

// ---- the tile kernels, once per instruction set ----------------------------------------------

namespace generic {
#include "cpu/block_attn_cpu_tiles.inc"
}  // namespace generic

#if RA_CPU_X86
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
namespace avx2 {
#define RA_TILES_AVX2 1
#include "cpu/block_attn_cpu_tiles.inc"
#undef RA_TILES_AVX2
}  // namespace avx2
#if defined(__clang__)
#pragma clang attribute pop
#pragma clang attribute push(__attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma"))), apply_to = function)
#else
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")
#endif
namespace avx512 {
#define RA_TILES_AVX512 1
#include "cpu/block_attn_cpu_tiles.inc"
#undef RA_TILES_AVX512
}  // namespace avx512
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif  // RA_CPU_X86

namespace {

// ---- instruction set and tuning ------------------------------------------------------------

enum class Isa : int { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };

Isa best_isa() {
#if RA_CPU_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
    return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kGeneric;
}

Isa active_isa() {
  static const Isa isa = [] {
    Isa best = best_isa();
    if (const char* env = std::getenv("RING_ATTN_CPU_KERNEL")) {
      const std::string s(env);
      Isa want = best;
      if (s == "generic" || s == "scalar") want = Isa::kGeneric;
      else if (s == "avx2") want = Isa::kAvx2;
      else if (s == "avx512") want = Isa::kAvx512;
      if (static_cast<int>(want) < static_cast<int>(best)) best = want;
    }
    return best;
  }();
  return isa;
}

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t round_up(int64_t a, int64_t b) { return cdiv(a, b) * b; }

// Tile sizes: query rows x keys per tile (query tiles are multiples of 32 rows, key tiles of 64
// keys: see kSubRows, kSubCols), and the depth of the P V / gradient GEMM chunks. A key tile's K^T
// and V panels stay in L2 and each micro-kernel's B panel in L1. The forward takes taller query
// tiles when no mask restricts the pairs (every tile full: a K/V tile then serves more rows) and
// shorter ones otherwise (less work on the partial tiles of the diagonal or band).
// RING_ATTN_CPU_TILES="fwd_q,fwd_k,bwd_q,bwd_k,kc" overrides them (tuning only).
struct Tuning {
  int64_t fwd_q = 128, fwd_q_unmasked = 256, fwd_k = 256, bwd_q = 64, bwd_k = 256, kc = 128;
};

const Tuning& tuning() {
  static const Tuning t = [] {
    Tuning t;
    if (const char* env = std::getenv("RING_ATTN_CPU_TILES")) {
      long v[5];
      if (std::sscanf(env, "%ld,%ld,%ld,%ld,%ld", &v[0], &v[1], &v[2], &v[3], &v[4]) == 5 &&
          std::min({v[0], v[1], v[2], v[3], v[4]}) > 0) {
        t = Tuning{round_up(v[0], 32), round_up(v[0], 32), round_up(v[1], 64), round_up(v[2], 32),
                   round_up(v[3], 64), v[4]};
      }
    }
    return t;
  }();
  return t;
}

constexpr double kLog2e = 1.44269504088896340736;
constexpr double kLn2 = 0.693147180559945309417;
constexpr int64_t kScorePad = 16;  // ld of score tiles = key tile + pad (avoids 4K aliasing)
// With more than one thread, aim for at least this many forward tasks per thread (dynamic
// scheduling then evens out uneven task costs).
constexpr int64_t kTasksPerThread = 4;

// ---- scratch memory ------------------------------------------------------------------------

// Per-thread, grow-only, 64-byte aligned arenas that live until the thread exits. Allocating per
// call would pay page faults on every call (large blocks are mmap'ed and unmapped by malloc), which
// the ring repeats once per step. Slot kTileSlot holds a worker's tile scratch; the other slots
// hold the per-call buffers of the calling thread (which is also worker 0).
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

void* thread_scratch(int slot, size_t bytes) {
  struct Free {
    void operator()(void* p) const { std::free(p); }
  };
  struct Arena {
    std::unique_ptr<void, Free> ptr;
    size_t bytes = 0;
  };
  thread_local Arena arenas[kNumSlots];
  Arena& a = arenas[slot];
  if (a.bytes < bytes) {
    const size_t rounded = ((bytes + 4095) / 4096) * 4096;
    a.ptr.reset();
    a.ptr.reset(std::aligned_alloc(64, rounded));
    TORCH_CHECK(a.ptr, "ring_attn cpu: out of memory for ", rounded, " bytes of scratch");
    a.bytes = rounded;
  }
  return a.ptr.get();
}

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
    T* p = reinterpret_cast<T*>(base_ + off_);
    off_ += bytes_for<T>(n);
    return p;
  }

 private:
  char* base_;
  size_t off_ = 0;
};

// ---- operand layouts -----------------------------------------------------------------------

// The rows of every (batch, head) of a (batch, seq, heads, headdim) operand: row r of (b, h) at
// ptr(b, h) + r * ld, unit stride along headdim, `width` readable columns (>= headdim, zero beyond).
template <typename T>
struct HeadRows {
  const T* base;
  int64_t batch_stride, head_stride, ld;
  const T* ptr(int64_t b, int64_t h) const { return base + b * batch_stride + h * head_stride; }
};

template <typename acc_t, typename scalar_t>
inline acc_t to_acc(scalar_t x) {
  return static_cast<acc_t>(x);
}

// Fetches rows [0, n) of a strided (row stride ld) matrix, `width` elements per row, into the
// cache (for writing: kWrite). Rows of the usual (batch, seq, heads, headdim) layout are
// heads * headdim apart, a stride the hardware prefetchers do not follow: the operand copies fetch
// their source rows kRowsAhead ahead, and tasks fetch the accumulator rows they write last (whose
// write-allocate misses would otherwise stall the final stores).
template <bool kWrite = false, typename T>
void prefetch_rows(const T* base, int64_t ld, int64_t n, int64_t width) {
  for (int64_t i = 0; i < n; ++i) {
    const char* row = reinterpret_cast<const char*>(base + i * ld);
    for (int64_t c = 0; c < static_cast<int64_t>(sizeof(T)) * width; c += 64)
      __builtin_prefetch(row + c, kWrite ? 1 : 0, 3);
  }
}
constexpr int64_t kRowsAhead = 8;

// x as HeadRows<acc_t> of `width` columns: x itself when it is already acc_t, width == D and its
// rows are dense per head (row stride D), else a head-major (batch, heads, seq, width) acc_t copy
// (zero-padded) in the calling thread's `slot`. Rows of the usual (batch, seq, heads, headdim)
// layout are heads * headdim apart: read in place, a tile's rows would fall into a fraction of the
// L1 sets (4 KB aliasing) and the GEMMs run ~25% slower.
template <typename scalar_t, typename acc_t>
HeadRows<acc_t> head_rows(const scalar_t* x, const Strides& st, int64_t B, int64_t S, int64_t Hn,
                          int64_t D, int64_t width, int slot) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (width == D && (S <= 1 || st.row == D)) return {x, st.batch, st.head, D};
  }
  acc_t* dst = static_cast<acc_t*>(thread_scratch(slot, sizeof(acc_t) * B * Hn * S * width));
  at::parallel_for(0, B * Hn, 1, [&](int64_t bh0, int64_t bh1) {
    for (int64_t bh = bh0; bh < bh1; ++bh) {
      const int64_t b = bh / Hn, h = bh % Hn;
      const scalar_t* src = x + b * st.batch + h * st.head;
      acc_t* out = dst + bh * S * width;
      for (int64_t i = 0; i < S; ++i, src += st.row, out += width) {
        if (i + kRowsAhead < S) prefetch_rows(src + kRowsAhead * st.row, st.row, 1, D);
        if constexpr (std::is_same_v<scalar_t, acc_t>) {
          std::memcpy(out, src, sizeof(acc_t) * D);
        } else {
          for (int64_t c = 0; c < D; ++c) out[c] = to_acc<acc_t>(src[c]);
        }
        if (width > D) std::memset(out + D, 0, sizeof(acc_t) * (width - D));
      }
    }
  });
  return {dst, Hn * S * width, S * width, width};
}

// x^T packed in panels of `panel` rows: for head (b, h), panel j (rows [j * panel, (j + 1) * panel))
// is a dense D x panel block at base + (b * Hn + h) * head_stride + j * D * panel; rows beyond S are
// zero. Returns base; head_stride = cdiv(S, panel) * D * panel.
template <typename scalar_t, typename acc_t>
const acc_t* pack_panels(const scalar_t* x, const Strides& st, int64_t B, int64_t S, int64_t Hn,
                         int64_t D, int64_t panel, int slot) {
  const int64_t np = cdiv(S, panel);
  const int64_t head_stride = np * D * panel;
  acc_t* dst = static_cast<acc_t*>(thread_scratch(slot, sizeof(acc_t) * B * Hn * head_stride));
  at::parallel_for(0, B * Hn * np, std::max<int64_t>(1, 8192 / (D * panel)), [&](int64_t t0,
                                                                                 int64_t t1) {
    // Source rows of panel t: rows [r0, r0 + nr) of head (b, h).
    auto source = [&](int64_t t, int64_t* nr) {
      const int64_t j = t % np, bh = t / np, b = bh / Hn, h = bh % Hn;
      const int64_t r0 = j * panel;
      *nr = std::min(panel, S - r0);
      return x + b * st.batch + r0 * st.row + h * st.head;
    };
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t j = t % np, bh = t / np;
      acc_t* out = dst + bh * head_stride + j * D * panel;
      int64_t nr;
      const scalar_t* src = source(t, &nr);
      if (t + 1 < t1) {  // fetch the next panel's rows while this one runs
        int64_t nr_next;
        const scalar_t* next = source(t + 1, &nr_next);
        prefetch_rows(next, st.row, nr_next, D);
      }
      // Column by column: contiguous stores, the panel's source rows stay in L1.
      for (int64_t c = 0; c < D; ++c, out += panel) {
        for (int64_t rr = 0; rr < nr; ++rr) out[rr] = to_acc<acc_t>(src[rr * st.row + c]);
        for (int64_t rr = nr; rr < panel; ++rr) out[rr] = acc_t(0);
      }
    }
  });
  return dst;
}

// ---- masks -----------------------------------------------------------------------------------

// Partial tiles are worked in sub-tiles of kSubRows query rows x kSubCols keys: each row group
// computes only the hull of its non-skipped key blocks, and masks only when one of them is not
// full. On the causal diagonal this halves the partial tiles' work; for windows and packed
// sequences it confines the work to the band. kSubCols is a multiple of every panel width.
constexpr int64_t kSubRows = 32;
constexpr int64_t kSubCols = 64;

// Everything the tile loops need to know about the mask, computed once per call.
struct MaskPlan {
  std::vector<int32_t> bounds;      // 2 * Sq: per row (lo, hi) clamped to int32, (1, 0) if empty
  std::vector<TileBounds> tiles;    // per query tile
  std::vector<TileBounds> subs;     // per kSubRows query rows
  std::vector<PositionRange> keys;  // per kSubCols keys: min/max position
  std::vector<TileKind> kinds;      // per (query tile, key tile): kinds[qt * nkt + kt]
  int64_t nkt = 0;
  TileKind kind(int64_t qt, int64_t kt) const { return kinds[qt * nkt + kt]; }
};

// block_q: a multiple of kSubRows; block_k: a multiple of kSubCols.
MaskPlan mask_plan(const MaskSpec& mask, const int32_t* q_pos, const int32_t* q_seg, int64_t Sq,
                   const int32_t* k_pos, int64_t Sk, int64_t block_q, int64_t block_k) {
  MaskPlan r;
  r.bounds.resize(static_cast<size_t>(2 * Sq));
  r.tiles.assign(static_cast<size_t>(cdiv(Sq, block_q)), empty_tile_bounds());
  r.subs.assign(static_cast<size_t>(cdiv(Sq, kSubRows)), empty_tile_bounds());
  for (int64_t i = 0; i < Sq; ++i) {
    const PositionRange seg =
        q_seg ? PositionRange{q_seg[2 * i], q_seg[2 * i + 1]} : unbounded_range();
    const PositionRange row = row_bounds(mask, q_pos[i], seg);
    add_row(r.tiles[static_cast<size_t>(i / block_q)], row);
    add_row(r.subs[static_cast<size_t>(i / kSubRows)], row);
    if (row.empty()) {
      r.bounds[2 * i] = 1;
      r.bounds[2 * i + 1] = 0;
    } else {
      r.bounds[2 * i] = static_cast<int32_t>(std::clamp<int64_t>(row.lo, INT32_MIN, INT32_MAX));
      r.bounds[2 * i + 1] = static_cast<int32_t>(std::clamp<int64_t>(row.hi, INT32_MIN, INT32_MAX));
    }
  }
  const int64_t ncb = cdiv(Sk, kSubCols);
  r.keys.resize(static_cast<size_t>(ncb));
  for (int64_t cb = 0; cb < ncb; ++cb)
    r.keys[cb] = range_of(k_pos, cb * kSubCols, std::min(Sk, (cb + 1) * kSubCols));
  const int64_t nqt = static_cast<int64_t>(r.tiles.size());
  r.nkt = cdiv(Sk, block_k);
  r.kinds.resize(static_cast<size_t>(nqt * r.nkt));
  for (int64_t kt = 0; kt < r.nkt; ++kt) {
    const PositionRange kr = range_of(k_pos, kt * block_k, std::min(Sk, (kt + 1) * block_k));
    for (int64_t qt = 0; qt < nqt; ++qt) r.kinds[qt * r.nkt + kt] = classify_tile(r.tiles[qt], kr);
  }
  return r;
}

// One row group of a partial tile: rows [r0, r0 + nr) and columns [c0, c1) of the tile (the hull
// of its non-skipped key blocks); mask: some of those blocks are not full.
struct SubTile {
  int64_t r0, nr, c0, c1;
  bool mask;
};

// The row groups of the partial tile at (q0, k0) of nq x nk that see any key; returns their count.
int64_t plan_partial(const MaskPlan& mp, int64_t q0, int64_t nq, int64_t k0, int64_t nk,
                     SubTile* out) {
  int64_t n = 0;
  for (int64_t r0 = 0; r0 < nq; r0 += kSubRows) {
    const TileBounds& tb = mp.subs[static_cast<size_t>((q0 + r0) / kSubRows)];
    int64_t c0 = -1, c1 = -1;
    bool mask = false;
    for (int64_t c = 0; c < nk; c += kSubCols) {
      const TileKind kind = classify_tile(tb, mp.keys[static_cast<size_t>((k0 + c) / kSubCols)]);
      if (kind == TileKind::kSkip) continue;
      if (c0 < 0) c0 = c;
      c1 = std::min(nk, c + kSubCols);
      mask |= kind == TileKind::kPartial;
    }
    if (c0 < 0) continue;
    // A skipped block inside the hull is computed too, and then needs the mask.
    for (int64_t c = c0; c < c1 && !mask; c += kSubCols)
      mask = classify_tile(tb, mp.keys[static_cast<size_t>((k0 + c) / kSubCols)]) != TileKind::kFull;
    out[n++] = SubTile{r0, std::min(kSubRows, nq - r0), c0, c1, mask};
  }
  return n;
}

// ---- threads ---------------------------------------------------------------------------------

int64_t available_threads() {
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

void check_shape(const BlockShape& s) {
  TORCH_CHECK(s.batch >= 0 && s.seqlen_q >= 0 && s.seqlen_k >= 0, "ring_attn cpu: negative size");
  TORCH_CHECK(s.headdim >= 1, "ring_attn cpu: headdim must be >= 1, got ", s.headdim);
  TORCH_CHECK(s.nheads >= 1 && s.nheads_kv >= 1 && s.nheads % s.nheads_kv == 0,
              "ring_attn cpu: nheads (", s.nheads, ") must be a multiple of nheads_kv (",
              s.nheads_kv, ")");
}

// ---- AMX ----------------------------------------------------------------------------------------

#if RA_CPU_AMX
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx512bf16,amx-tile,amx-bf16,avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx512bf16,amx-tile,amx-bf16,avx2,fma")
#endif
namespace amx {
#include "cpu/block_attn_amx.inc"
}  // namespace amx
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

// AMX is used when the CPU has it (amx-tile, amx-bf16, avx512-bf16), the kernel may use it
// (RING_ATTN_CPU_KERNEL unset or "amx") and Linux grants this process the tile state.
bool amx_usable() {
  static const bool usable = [] {
    if (const char* env = std::getenv("RING_ATTN_CPU_KERNEL")) {
      if (*env != '\0' && std::string(env) != "amx") return false;
    }
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("amx-tile") || !__builtin_cpu_supports("amx-bf16") ||
        !__builtin_cpu_supports("avx512bf16") || best_isa() != Isa::kAvx512)
      return false;
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return usable;
}
#else
bool amx_usable() { return false; }
#endif

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------

// kAmx: the GEMMs run on the AMX tile unit (block_attn_amx.inc; float32 and bfloat16 inputs);
// everything else (masks, softmax, merge) is Tl's.
template <class Tl, typename scalar_t, bool kAmx = false>
void fwd_impl(const BlockFwdParams& p) {
  using acc_t = typename Tl::T;
  constexpr int64_t W = Tl::W;
  const BlockShape& sh = p.shape;
  const int64_t B = sh.batch, Sq = sh.seqlen_q, Sk = sh.seqlen_k, H = sh.nheads, D = sh.headdim;
  const int64_t Hkv = sh.nheads_kv, group = H / Hkv;
  if (B == 0 || Sq == 0 || Sk == 0) return;  // nothing visible: the state is unchanged

  const Tuning& tu = tuning();
  const int64_t Dp = round_up(D, W);
  // Smaller query tiles when there would be too few tasks to keep every thread busy.
  const int64_t nthreads = available_threads();
  const bool unmasked = !p.mask.causal && p.mask.window_left < 0 && p.mask.window_right < 0 &&
                        p.q_seg == nullptr;
  int64_t BQ = unmasked ? tu.fwd_q_unmasked : tu.fwd_q;
  while (nthreads > 1 && BQ > kSubRows && cdiv(Sq, BQ) * B * H < kTasksPerThread * nthreads)
    BQ = round_up(BQ / 2, kSubRows);
  const int64_t BK = tu.fwd_k, LDS = BK + kScorePad;
  const int64_t nqt = cdiv(Sq, BQ), nkt = cdiv(Sk, BK);
  const MaskPlan mp = mask_plan(p.mask, p.q_pos, p.q_seg, Sq, p.k_pos, Sk, BQ, BK);

  // Query tiles with at least one non-skipped key tile, the heaviest first; the others keep
  // their state untouched.
  std::vector<int64_t> work(static_cast<size_t>(nqt), 0);
  std::vector<int64_t> live_qt;
  for (int64_t qt = 0; qt < nqt; ++qt) {
    for (int64_t kt = 0; kt < nkt; ++kt) work[qt] += mp.kind(qt, kt) != TileKind::kSkip;
    if (work[qt] > 0) live_qt.push_back(qt);
  }
  if (live_qt.empty()) return;
  std::stable_sort(live_qt.begin(), live_qt.end(),
                   [&](int64_t a, int64_t b) { return work[a] > work[b]; });

  // The softmax runs in base 2: scores come out of the GEMM as log2(e) * scale * q.k, the running
  // max m is in those units, and lse = ln(2) * (m + log2(l)).
  const acc_t scale2 = static_cast<acc_t>(p.softmax_scale * kLog2e);
  const int64_t kc = tu.kc;

  using In = const scalar_t*;
  HeadRows<acc_t> Qr{}, Vr{};
  const acc_t* Kt = nullptr;
  const int64_t kt_head = cdiv(Sk, Tl::kPanel) * D * Tl::kPanel;
#if RA_CPU_AMX
  amx::FwdOperands xo{};
  const amx::Planes planes = amx::planes_for<scalar_t>(p.fp32_precision);
#endif
  if constexpr (kAmx) {
#if RA_CPU_AMX
    xo = amx::pack_fwd<scalar_t>(p, static_cast<float>(scale2), kPackQ, kPackK, kPackV);
#endif
  } else {
    Qr = head_rows<scalar_t, acc_t>(In(p.q), p.q_strides, B, Sq, H, D, D, kPackQ);
    Kt = pack_panels<scalar_t, acc_t>(In(p.k), p.k_strides, B, Sk, Hkv, D, Tl::kPanel, kPackK);
    Vr = head_rows<scalar_t, acc_t>(In(p.v), p.v_strides, B, Sk, Hkv, D, Dp, kPackV);
  }

  auto* out = static_cast<acc_t*>(p.out_acc);
  auto* lse = static_cast<acc_t*>(p.lse);
  const int64_t LDP = round_up(BK, 32);  // AMX: bf16 planes of P

  struct Scratch {
    acc_t *s, *rowmax, *o, *m, *l;
    uint8_t* seen;
    SubTile* sub;
    uint16_t* p_planes;
  };
  auto make_scratch = [&] {
    const int64_t p_elems = kAmx ? 2 * BQ * LDP : 0;  // at most amx::kPPlanes
    const size_t bytes = Carver::bytes_for<acc_t>(BQ * LDS) + Carver::bytes_for<acc_t>(BQ * W) +
                         Carver::bytes_for<acc_t>(BQ * Dp) + 2 * Carver::bytes_for<acc_t>(BQ) +
                         Carver::bytes_for<uint8_t>(BQ) +
                         Carver::bytes_for<SubTile>(cdiv(BQ, kSubRows)) +
                         Carver::bytes_for<uint16_t>(p_elems);
    Carver c(kTileSlot, bytes);
    Scratch ws;
    ws.s = c.take<acc_t>(BQ * LDS);
    ws.rowmax = c.take<acc_t>(BQ * W);
    ws.o = c.take<acc_t>(BQ * Dp);
    ws.m = c.take<acc_t>(BQ);
    ws.l = c.take<acc_t>(BQ);
    ws.seen = c.take<uint8_t>(BQ);
    ws.sub = c.take<SubTile>(cdiv(BQ, kSubRows));
    ws.p_planes = c.take<uint16_t>(p_elems);
    return ws;
  };

  // Tasks of one head run back to back (its K^T and V panels stay warm in L2), heaviest first.
  const int64_t nlive = static_cast<int64_t>(live_qt.size());
  parallel_tasks(nlive * B * H, make_scratch, [&](int64_t task, Scratch& ws) {
    const int64_t qt = live_qt[task % nlive];
    const int64_t bh = task / nlive;
    const int64_t b = bh / H, h = bh % H, hk = h / group;
    const int64_t q0 = qt * BQ, nq = std::min(BQ, Sq - q0);
    acc_t* S = ws.s;
    acc_t* O = ws.o;

    // Prologue: the running state (o, lse) as O = o, m = log2(e) * lse, l = 1 (l = 0, O = 0
    // when empty).
    acc_t* out_base =
        out + b * p.out_strides.batch + q0 * p.out_strides.row + h * p.out_strides.head;
    acc_t* lse_base = lse + b * p.lse_batch_stride + h * p.lse_head_stride + q0;
    for (int64_t i = 0; i < nq; ++i) {
      const OnlineRow<acc_t> st = OnlineRow<acc_t>::from_lse(lse_base[i]);
      ws.m[i] = st.l > acc_t(0) ? st.m * acc_t(kLog2e) : st.m;
      ws.l[i] = st.l;
      ws.seen[i] = 0;
      acc_t* o = O + i * Dp;
      if (st.l > acc_t(0)) {
        std::memcpy(o, out_base + i * p.out_strides.row, sizeof(acc_t) * D);
        std::fill(o + D, o + Dp, acc_t(0));
      } else {
        std::fill(o, o + Dp, acc_t(0));
      }
    }

    // One block of rows [r0, r0 + nr) x columns [c0, c1) of the tile at key k0: scores, mask,
    // online softmax, O += P V. Row maxima come out of the score pass when every computed column
    // is a visible key (not with AMX: the tile unit has no max).
    auto block = [&](int64_t k0, int64_t r0, int64_t nr, int64_t c0, int64_t c1, bool masked) {
      const int64_t ncol = c1 - c0, ncolp = round_up(ncol, W);
      acc_t* Sb = S + r0 * LDS + c0;
      acc_t* rowmax = !kAmx && !masked && ncol == ncolp ? ws.rowmax : nullptr;
      [[maybe_unused]] const int64_t nr16 = round_up(nr, 16);
      acc_t score_scale = 1;  // bf16 AMX scores: scaled in the softmax pass (positive scales)
      if constexpr (kAmx) {
#if RA_CPU_AMX
        const bool fuse = xo.q.post_scale > 0.f;
        if (fuse) score_scale = xo.q.post_scale;
        amx::rows_by_groups(xo.q, xo.q.head(b * H + h), xo.k, xo.k.head(b * Hkv + hk), q0 + r0,
                            nr16, k0 + c0, ncolp, Sb, LDS, !fuse);
#endif
      } else {
        Tl::scores(nr, ncolp, D, scale2, Qr.ptr(b, h) + (q0 + r0) * Qr.ld, Qr.ld,
                   Kt + (b * Hkv + hk) * kt_head + (k0 + c0) * D, Sb, LDS, rowmax);
      }
      if (masked)
        Tl::mask(Sb, LDS, nr, ncol, mp.bounds.data() + 2 * (q0 + r0), p.k_pos + k0 + c0);
      if (!Tl::fwd_softmax(Sb, LDS, nr, ncol, rowmax, masked, ws.m + r0, ws.l + r0, ws.seen + r0,
                           O + r0 * Dp, Dp, Dp, score_scale))
        return;
      if constexpr (kAmx) {
#if RA_CPU_AMX
        amx::split_by_pairs(Sb, LDS, nr, nr16, ncol, planes.p_fwd, ws.p_planes,
                            xo.v, xo.v.head(b * Hkv + hk), k0 + c0, O + r0 * Dp, Dp);
#endif
      } else {
        const acc_t* V_head = Vr.ptr(b, hk);
        Tl::gemm_nn(nr, Dp, ncol, acc_t(1), Sb, LDS, V_head + (k0 + c0) * Vr.ld, Vr.ld, 1,
                    O + r0 * Dp, Dp, true, nullptr, kc);
      }
    };

    int64_t last_kt = -1;
    for (int64_t kt = 0; kt < nkt; ++kt)
      if (mp.kind(qt, kt) != TileKind::kSkip) last_kt = kt;
#if RA_CPU_AMX
    if constexpr (kAmx) amx::configure();  // per task: the tile state is live only while it runs
#endif
    for (int64_t kt = 0; kt < nkt; ++kt) {
      const TileKind kind = mp.kind(qt, kt);
      if (kind == TileKind::kSkip) continue;
      const int64_t k0 = kt * BK, nk = std::min(BK, Sk - k0);
      // The epilogue writes the output rows: fetch them while the last tile runs.
      if (kt == last_kt) prefetch_rows<true>(out_base, p.out_strides.row, nq, D);
      if (kind == TileKind::kFull) {
        block(k0, 0, nq, 0, nk, false);
      } else {
        const int64_t nsub = plan_partial(mp, q0, nq, k0, nk, ws.sub);
        for (int64_t g = 0; g < nsub; ++g) {
          const SubTile& st = ws.sub[g];
          block(k0, st.r0, st.nr, st.c0, st.c1, st.mask);
        }
      }
    }

#if RA_CPU_AMX
    if constexpr (kAmx) amx::release();
#endif

    // Epilogue: the normalised output and lse of the rows that saw a key (the others keep their
    // state bit for bit).
    for (int64_t i = 0; i < nq; ++i) {
      if (!ws.seen[i]) continue;
      const acc_t l = ws.l[i];
      const acc_t inv_l = l > acc_t(0) ? acc_t(1) / l : acc_t(0);
      acc_t* o = out_base + i * p.out_strides.row;
      const acc_t* a = O + i * Dp;
      for (int64_t c = 0; c < D; ++c) o[c] = a[c] * inv_l;
      lse_base[i] = l > acc_t(0) ? acc_t(kLn2) * (ws.m[i] + std::log2(l)) : neg_inf<acc_t>();
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

// kAmx: the five GEMMs run on the AMX tile unit (block_attn_amx.inc), dK and dV of a key tile
// built up transposed (dK^T = Q^T dS, dV^T = dO^T P: the queries become the tile unit's depth).
template <class Tl, typename scalar_t, bool kAmx = false>
void bwd_impl(const BlockBwdParams& p) {
  using acc_t = typename Tl::T;
  constexpr int64_t W = Tl::W;
  const BlockShape& sh = p.shape;
  const int64_t B = sh.batch, Sq = sh.seqlen_q, Sk = sh.seqlen_k, H = sh.nheads, D = sh.headdim;
  const int64_t Hkv = sh.nheads_kv, group = H / Hkv;
  if (B == 0 || Sq == 0 || Sk == 0) return;

  const Tuning& tu = tuning();
  const int64_t Dp = round_up(D, W);
  const int64_t BQ = tu.bwd_q, BK = tu.bwd_k, LDS = BK + kScorePad;
  const int64_t nqt = cdiv(Sq, BQ), nkt = cdiv(Sk, BK);
  const MaskPlan mp = mask_plan(p.mask, p.q_pos, p.q_seg, Sq, p.k_pos, Sk, BQ, BK);

  // Key tiles that meet at least one query tile.
  std::vector<int64_t> live_kt;
  for (int64_t kt = 0; kt < nkt; ++kt) {
    for (int64_t qt = 0; qt < nqt; ++qt) {
      if (mp.kind(qt, kt) != TileKind::kSkip) {
        live_kt.push_back(kt);
        break;
      }
    }
  }
  if (live_kt.empty()) return;
  const int64_t nlive = static_cast<int64_t>(live_kt.size());

  const acc_t scale = static_cast<acc_t>(p.softmax_scale);
  const acc_t scale2 = static_cast<acc_t>(p.softmax_scale * kLog2e);  // base-2 scores, see fwd
  const int64_t kc = tu.kc;

  using In = const scalar_t*;
  HeadRows<acc_t> Qr{}, Or{}, Kr{};
  const acc_t *Kt = nullptr, *Vt = nullptr;
  const int64_t kt_head = cdiv(Sk, Tl::kPanel) * D * Tl::kPanel;
#if RA_CPU_AMX
  // AMX operands: Q rows (scores, amx::pack_scores_q), dO rows (dP), K and V groups (scores, dP),
  // K pairs (dQ), Q^T and dO^T (dK^T, dV^T).
  amx::Packed xq, xo, xk, xv, xk_pairs, xq_t, xo_t;
  const amx::Planes planes = amx::planes_for<scalar_t>(p.fp32_precision);
#endif
  if constexpr (kAmx) {
#if RA_CPU_AMX
    using amx::Layout;
    const int in = planes.input;
    xq = amx::pack_scores_q(In(p.q), p.q_strides, B, Sq, H, D, static_cast<float>(scale2), in,
                            kPackQ);
    xo = amx::pack(In(p.dout), p.dout_strides, B, Sq, H, D, 1.f, in, Layout::kRows, kPackO);
    xk = amx::pack(In(p.k), p.k_strides, B, Sk, Hkv, D, 1.f, in, Layout::kGroups, kPackK);
    xv = amx::pack(In(p.v), p.v_strides, B, Sk, Hkv, D, 1.f, in, Layout::kGroups, kPackV);
    xk_pairs = amx::pack(In(p.k), p.k_strides, B, Sk, Hkv, D, 1.f, in, Layout::kPairs, kPackKRows);
    xq_t = amx::pack(In(p.q), p.q_strides, B, Sq, H, D, 1.f, in, Layout::kTransposed, kPackQT);
    xo_t = amx::pack(In(p.dout), p.dout_strides, B, Sq, H, D, 1.f, in, Layout::kTransposed, kPackOT);
#endif
  } else {
    Qr = head_rows<scalar_t, acc_t>(In(p.q), p.q_strides, B, Sq, H, D, Dp, kPackQ);
    Or = head_rows<scalar_t, acc_t>(In(p.dout), p.dout_strides, B, Sq, H, D, Dp, kPackO);
    Kr = head_rows<scalar_t, acc_t>(In(p.k), p.k_strides, B, Sk, Hkv, D, Dp, kPackKRows);
    Kt = pack_panels<scalar_t, acc_t>(In(p.k), p.k_strides, B, Sk, Hkv, D, Tl::kPanel, kPackK);
    Vt = pack_panels<scalar_t, acc_t>(In(p.v), p.v_strides, B, Sk, Hkv, D, Tl::kPanel, kPackV);
  }

  const auto* lse = static_cast<const acc_t*>(p.lse);
  const auto* delta = static_cast<const acc_t*>(p.delta);
  auto* dq = static_cast<acc_t*>(p.dq_acc);
  auto* dk = static_cast<acc_t*>(p.dk_acc);
  auto* dv = static_cast<acc_t*>(p.dv_acc);

  // Tasks own (batch, kv head, key split): the dk/dv rows of a task are disjoint from every other
  // task's. Each task accumulates dq of its query heads into a private dense partial (one per
  // split, zero-initialised) that is added into dq_acc at the end, in split order; dk/dv of a key
  // tile build up in a dense tile scratch and are added into dk_acc/dv_acc once per key tile.
  // Key splits cost a dq partial (the size of dq) each: split only until every thread has two
  // tasks (enough for dynamic scheduling to even out odd unit counts).
  const int64_t units = B * Hkv;
  const int64_t nthreads = available_threads();
  const int64_t nsplit =
      nthreads <= 1 ? 1 : std::min(nlive, std::max<int64_t>(1, cdiv(2 * nthreads, units)));
  const int64_t SqR = kAmx ? round_up(Sq, 16) : Sq;  // dq partial rows (AMX: 16-row tiles)
  const int64_t dq_task_elems = group * SqR * Dp;
  auto* const dq_part = static_cast<acc_t*>(
      thread_scratch(kDqSlot, sizeof(acc_t) * units * nsplit * dq_task_elems));

  // AMX: bf16 planes of dS rows (dQ) or of P / dS row pairs (dV^T, dK^T), one at a time.
  const int64_t LDP = round_up(BK, 32);
  const int64_t x_elems = kAmx ? 3 * round_up(BQ, 32) * std::max(LDP, kSubCols) : 0;

  struct Scratch {
    acc_t *s, *dp, *dk, *dv;  // dk, dv: BK x Dp, or Dp x BK (transposed) with AMX
    SubTile* sub;
    uint16_t* x_planes;
  };
  auto make_scratch = [&] {
    const size_t bytes = 2 * Carver::bytes_for<acc_t>(BQ * LDS) +
                         2 * Carver::bytes_for<acc_t>(BK * Dp) +
                         Carver::bytes_for<SubTile>(cdiv(BQ, kSubRows)) +
                         Carver::bytes_for<uint16_t>(x_elems);
    Carver c(kTileSlot, bytes);
    Scratch ws;
    ws.s = c.take<acc_t>(BQ * LDS);
    ws.dp = c.take<acc_t>(BQ * LDS);
    ws.dk = c.take<acc_t>(BK * Dp);
    ws.dv = c.take<acc_t>(BK * Dp);
    ws.sub = c.take<SubTile>(cdiv(BQ, kSubRows));
    ws.x_planes = c.take<uint16_t>(x_elems);
    return ws;
  };

  parallel_tasks(units * nsplit, make_scratch, [&](int64_t task, Scratch& ws) {
    const int64_t unit = task / nsplit, split = task % nsplit;
    const int64_t b = unit / Hkv, hk = unit % Hkv;
    acc_t* S = ws.s;
    acc_t* dP = ws.dp;
    acc_t* dKt = ws.dk;
    acc_t* dVt = ws.dv;
    acc_t* dq_task = dq_part + task * dq_task_elems;
    std::memset(dq_task, 0, sizeof(acc_t) * dq_task_elems);

    const acc_t* Kt_head = Kt + (b * Hkv + hk) * kt_head;
    const acc_t* Vt_head = Vt + (b * Hkv + hk) * kt_head;
#if RA_CPU_AMX
    if constexpr (kAmx) amx::configure();  // per task: the tile state is live only while it runs
#endif

    for (int64_t li = split; li < nlive; li += nsplit) {
      const int64_t kt = live_kt[li];
      const int64_t k0 = kt * BK, nk = std::min(BK, Sk - k0);
      bool touched = false;
      int64_t last_qt = -1;  // the last query tile to meet this key tile
      for (int64_t qt = 0; qt < nqt; ++qt)
        if (mp.kind(qt, kt) != TileKind::kSkip) last_qt = qt;

      for (int64_t g = 0; g < group; ++g) {
        const int64_t h = hk * group + g;
        const acc_t* lse_h = lse + b * p.row_stat_batch_stride + h * p.row_stat_head_stride;
        const acc_t* delta_h = delta + b * p.row_stat_batch_stride + h * p.row_stat_head_stride;
        acc_t* dq_h = dq_task + g * SqR * Dp;

        for (int64_t qt = 0; qt < nqt; ++qt) {
          const TileKind kind = mp.kind(qt, kt);
          if (kind == TileKind::kSkip) continue;
          const int64_t q0 = qt * BQ, nq = std::min(BQ, Sq - q0);
          int64_t nsub = 1;
          if (kind == TileKind::kFull) {
            ws.sub[0] = SubTile{0, nq, 0, nk, false};
          } else {
            nsub = plan_partial(mp, q0, nq, k0, nk, ws.sub);
            if (nsub == 0) continue;
          }
          if (!touched) {  // dK/dV of this key tile start at zero
            std::memset(dKt, 0, sizeof(acc_t) * BK * Dp);
            std::memset(dVt, 0, sizeof(acc_t) * BK * Dp);
            touched = true;
          }
          if (g == group - 1 && qt == last_qt) {  // dk_acc/dv_acc rows are updated next
            prefetch_rows<true>(dk + b * p.dk_strides.batch + k0 * p.dk_strides.row +
                                    hk * p.dk_strides.head,
                                p.dk_strides.row, nk, D);
            prefetch_rows<true>(dv + b * p.dv_strides.batch + k0 * p.dv_strides.row +
                                    hk * p.dv_strides.head,
                                p.dv_strides.row, nk, D);
          }
          for (int64_t gi = 0; gi < nsub; ++gi) {
            const SubTile& st = ws.sub[gi];
            const int64_t r0 = st.r0, nr = st.nr, c0 = st.c0, ncol = st.c1 - st.c0;
            const int64_t ncolp = round_up(ncol, W);
            acc_t* Sb = S + r0 * LDS + c0;
            acc_t* dPb = dP + r0 * LDS + c0;
            [[maybe_unused]] const int64_t nr16 = round_up(nr, 16);
            // P = exp(scale * Q K^T - lse) = 2^(scale2 * Q K^T - log2(e) * lse); 0 where masked
            // and on rows that saw nothing.
            if constexpr (kAmx) {
#if RA_CPU_AMX
              amx::rows_by_groups(xq, xq.head(b * H + h), xk, xk.head(b * Hkv + hk), q0 + r0, nr16,
                                  k0 + c0, ncolp, Sb, LDS);
#endif
            } else {
              Tl::scores(nr, ncolp, D, scale2, Qr.ptr(b, h) + (q0 + r0) * Qr.ld, Qr.ld,
                         Kt_head + (k0 + c0) * D, Sb, LDS, nullptr);
            }
            if (st.mask)
              Tl::mask(Sb, LDS, nr, ncol, mp.bounds.data() + 2 * (q0 + r0), p.k_pos + k0 + c0);
            Tl::bwd_probs(Sb, LDS, nr, ncol, lse_h + q0 + r0, st.mask);
            // dP = dO V^T;  dS = scale * P * (dP - delta);  dQ += dS K
            if constexpr (kAmx) {
#if RA_CPU_AMX
              amx::rows_by_groups(xo, xo.head(b * H + h), xv, xv.head(b * Hkv + hk), q0 + r0, nr16,
                                  k0 + c0, ncolp, dPb, LDS);
              Tl::bwd_ds(Sb, dPb, LDS, nr, ncol, delta_h + q0 + r0, scale);
              amx::split_by_pairs(dPb, LDS, nr, nr16, ncol, planes.ds, ws.x_planes, xk_pairs,
                                  xk_pairs.head(b * Hkv + hk), k0 + c0, dq_h + (q0 + r0) * Dp,
                                  Dp);
#endif
            } else {
              Tl::scores(nr, ncolp, D, acc_t(1), Or.ptr(b, h) + (q0 + r0) * Or.ld, Or.ld,
                         Vt_head + (k0 + c0) * D, dPb, LDS, nullptr);
              Tl::bwd_ds(Sb, dPb, LDS, nr, ncol, delta_h + q0 + r0, scale);
              Tl::gemm_nn(nr, Dp, ncol, acc_t(1), dPb, LDS, Kr.ptr(b, hk) + (k0 + c0) * Kr.ld,
                          Kr.ld, 1, dq_h + (q0 + r0) * Dp, Dp, true, nullptr, kc);
            }
          }
          // dV += P^T dO;  dK += dS^T Q. Per block of kSubCols keys over the rows of the row groups
          // that computed it (all of them on a full tile, which AMX takes in one block); P and dS
          // of a row group in between that did not (possible only for unsorted positions) are
          // zeroed first.
          const int64_t cstep = kAmx && kind == TileKind::kFull ? nk : kSubCols;
          for (int64_t c = 0; c < nk; c += cstep) {
            int64_t first = -1, last = -1;
            for (int64_t gi = 0; gi < nsub; ++gi) {
              if (ws.sub[gi].c0 <= c && c < ws.sub[gi].c1) {
                if (first < 0) first = gi;
                last = gi;
              }
            }
            if (first < 0) continue;
            const int64_t ncol = std::min(cstep, nk - c);
            for (int64_t gi = first + 1; gi < last; ++gi) {
              const SubTile& st = ws.sub[gi];
              if (st.c0 <= c && c < st.c1) continue;
              for (int64_t i = st.r0; i < st.r0 + st.nr; ++i) {
                std::fill(S + i * LDS + c, S + i * LDS + c + ncol, acc_t(0));
                std::fill(dP + i * LDS + c, dP + i * LDS + c + ncol, acc_t(0));
              }
            }
            const int64_t r0 = ws.sub[first].r0, nr = ws.sub[last].r0 + ws.sub[last].nr - r0;
            if constexpr (kAmx) {
#if RA_CPU_AMX
              const int64_t ldk = round_up(cstep, 16);
              amx::transposed_by_split(xo_t, xo_t.head(b * H + h), q0 + r0, S + r0 * LDS + c, LDS,
                                       nr, ncol, planes.p_bwd, ws.x_planes, ldk, dVt + c, BK);
              amx::transposed_by_split(xq_t, xq_t.head(b * H + h), q0 + r0, dP + r0 * LDS + c,
                                       LDS, nr, ncol, planes.ds, ws.x_planes, ldk, dKt + c, BK);
#endif
            } else {
              Tl::gemm_tn(ncol, Dp, nr, acc_t(1), S + r0 * LDS + c, LDS,
                          Or.ptr(b, h) + (q0 + r0) * Or.ld, Or.ld, 1, dVt + c * Dp, Dp, true,
                          nullptr, kc);
              Tl::gemm_tn(ncol, Dp, nr, acc_t(1), dP + r0 * LDS + c, LDS,
                          Qr.ptr(b, h) + (q0 + r0) * Qr.ld, Qr.ld, 1, dKt + c * Dp, Dp, true,
                          nullptr, kc);
            }
          }
        }
      }
      if (!touched) continue;  // no query tile met this key tile in this kv group
      // dk_acc/dv_acc rows of this key tile += the tile's dK/dV.
      for (int64_t j = 0; j < nk; ++j) {
        const int64_t r = k0 + j;
        acc_t* dkr = dk + b * p.dk_strides.batch + r * p.dk_strides.row + hk * p.dk_strides.head;
        acc_t* dvr = dv + b * p.dv_strides.batch + r * p.dv_strides.row + hk * p.dv_strides.head;
        if constexpr (kAmx) {  // transposed: column j
          for (int64_t c = 0; c < D; ++c) dkr[c] += dKt[c * BK + j];
          for (int64_t c = 0; c < D; ++c) dvr[c] += dVt[c * BK + j];
        } else {
          const acc_t* sk = dKt + j * Dp;
          const acc_t* sv = dVt + j * Dp;
          for (int64_t c = 0; c < D; ++c) dkr[c] += sk[c];
          for (int64_t c = 0; c < D; ++c) dvr[c] += sv[c];
        }
      }
    }
#if RA_CPU_AMX
    if constexpr (kAmx) amx::release();
#endif
  });

  // dq_acc += the dq partials of all splits, in split order.
  const int64_t rows = B * H * Sq;
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / Dp), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t i = r % Sq, bh = r / Sq, b = bh / H, h = bh % H;
      const int64_t hk = h / group, g = h % group;
      acc_t* dst = dq + b * p.dq_strides.batch + i * p.dq_strides.row + h * p.dq_strides.head;
      if (i + kRowsAhead < Sq)
        prefetch_rows<true>(dst + kRowsAhead * p.dq_strides.row, p.dq_strides.row, 1, D);
      for (int64_t s = 0; s < nsplit; ++s) {
        const int64_t task = (b * Hkv + hk) * nsplit + s;
        const acc_t* src = dq_part + task * dq_task_elems + (g * SqR + i) * Dp;
        for (int64_t c = 0; c < D; ++c) dst[c] += src[c];
      }
    }
  });
}

// ---- dispatch --------------------------------------------------------------------------------

// Head dims up to this take the AMX path (its packing rows live on the stack).
constexpr int64_t kAmxMaxHeadDim = 512;

template <template <typename> class Tl>
void fwd_dtype(const BlockFwdParams& p) {
  switch (p.dtype) {
    case DType::kFloat32: return fwd_impl<Tl<float>, float>(p);
    case DType::kFloat64: return fwd_impl<Tl<double>, double>(p);
    case DType::kBFloat16: return fwd_impl<Tl<float>, c10::BFloat16>(p);
    case DType::kFloat16: return fwd_impl<Tl<float>, c10::Half>(p);
  }
  TORCH_CHECK(false, "ring_attn cpu block attention: unsupported dtype ", static_cast<int>(p.dtype));
}

template <template <typename> class Tl>
void bwd_dtype(const BlockBwdParams& p) {
  switch (p.dtype) {
    case DType::kFloat32: return bwd_impl<Tl<float>, float>(p);
    case DType::kFloat64: return bwd_impl<Tl<double>, double>(p);
    case DType::kBFloat16: return bwd_impl<Tl<float>, c10::BFloat16>(p);
    case DType::kFloat16: return bwd_impl<Tl<float>, c10::Half>(p);
  }
  TORCH_CHECK(false, "ring_attn cpu block attention: unsupported dtype ", static_cast<int>(p.dtype));
}

// The AVX-512 tiles around AMX GEMMs, where usable, for float32 and bfloat16 inputs, forward
// and backward; float32 only at Fp32Precision kHigh (three bf16 planes per operand) or kMedium
// (one), since at kHighest (torch's default) it multiplies in float32 on AVX-512. Returns
// whether it ran.
bool amx_fwd(const BlockFwdParams& p) {
#if RA_CPU_AMX
  if (!amx_usable() || p.shape.headdim > kAmxMaxHeadDim) return false;
  switch (p.dtype) {
    case DType::kFloat32:
      if (p.fp32_precision == Fp32Precision::kHighest) return false;
      fwd_impl<avx512::Tiles<float>, float, true>(p);
      return true;
    case DType::kBFloat16: fwd_impl<avx512::Tiles<float>, c10::BFloat16, true>(p); return true;
    default: break;
  }
#endif
  (void)p;
  return false;
}

bool amx_bwd(const BlockBwdParams& p) {
#if RA_CPU_AMX
  if (!amx_usable() || p.shape.headdim > kAmxMaxHeadDim) return false;
  switch (p.dtype) {
    case DType::kFloat32:
      if (p.fp32_precision == Fp32Precision::kHighest) return false;
      bwd_impl<avx512::Tiles<float>, float, true>(p);
      return true;
    case DType::kBFloat16: bwd_impl<avx512::Tiles<float>, c10::BFloat16, true>(p); return true;
    default: break;
  }
#endif
  (void)p;
  return false;
}

}  // namespace

void block_attn_fwd(const BlockFwdParams& p) {
  check_shape(p.shape);
  switch (active_isa()) {
#if RA_CPU_X86
    case Isa::kAvx512:
      if (!amx_fwd(p)) fwd_dtype<avx512::Tiles>(p);
      return;
    case Isa::kAvx2: return fwd_dtype<avx2::Tiles>(p);
#endif
    default: return fwd_dtype<generic::Tiles>(p);
  }
}

void block_attn_bwd(const BlockBwdParams& p) {
  check_shape(p.shape);
  switch (active_isa()) {
#if RA_CPU_X86
    case Isa::kAvx512:
      if (!amx_bwd(p)) bwd_dtype<avx512::Tiles>(p);
      return;
    case Isa::kAvx2: return bwd_dtype<avx2::Tiles>(p);
#endif
    default: return bwd_dtype<generic::Tiles>(p);
  }
}

// ---- measured FMA throughput ----------------------------------------------------------------

double fma_peak_gflops(double seconds) {
  float sink = 0.f;
  auto loop = [&](int64_t iters) {
    switch (active_isa()) {
#if RA_CPU_X86
      case Isa::kAvx512: return avx512::fma_loop(iters, &sink);
      case Isa::kAvx2: return avx2::fma_loop(iters, &sink);
#endif
      default: return generic::fma_loop(iters, &sink);
    }
  };
  using clock = std::chrono::steady_clock;
  loop(int64_t{1} << 16);  // wake the vector units (AVX-512 frequency licence)
  double flop = 0.0;
  const auto start = clock::now();
  double elapsed = 0.0;
  do {
    flop += loop(int64_t{1} << 20);
    elapsed = std::chrono::duration<double>(clock::now() - start).count();
  } while (elapsed < seconds);
  static volatile float observed;
  observed = sink;
  return flop / elapsed / 1e9;
}

const char* cpu_kernel_isa() {
  switch (active_isa()) {
    case Isa::kAvx512: return amx_usable() ? "avx512+amx" : "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "generic";
  }
}

}  // namespace cpu
}  // namespace ring_attn
