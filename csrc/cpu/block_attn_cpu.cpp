// CPU block attention, flash-attention style: per (query tile, key tile) one BLAS GEMM for the
// scores, the softmax fused in between (vectorised with at::vec), one GEMM for P V (forward) or
// four for the gradients (backward). Tiles are classified from their position ranges
// (core/mask.h): skipped tiles are never computed, full tiles carry no per-element mask work.
//
// Operands whose rows are not already contiguous per head (row stride != headdim, e.g. the usual
// (batch, seq, heads, headdim) layout) or not of the accumulator type are first repacked once per
// call into head-major (batch, heads, seq, headdim) acc_t copies: GEMMs on dense tiles run ~20%
// faster than on strided ones, and a repack per tile would be paid once per tile pair.
#include "cpu/block_attn_cpu.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "core/mask.h"
#include "core/merge.h"
#include "cpu/blas.h"

// ATen's at::parallel_for is a header template: with the OpenMP backend it only runs in parallel
// when this file itself is compiled with OpenMP (-fopenmp, CMake's OpenMP::OpenMP_CXX).
// GCC flags the _mm512_undefined_*() inside ATen's AVX-512 vec code once it is inlined here
// (false positives, torch itself builds with -Wno-maybe-uninitialized).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#if AT_PARALLEL_OPENMP && !defined(_OPENMP)
#warning "block_attn_cpu.cpp built without -fopenmp: the CPU kernels will run single-threaded"
#endif

namespace ring_attn {
namespace cpu {

// Dispatch on the input dtype: scalar_t is the element type of q/k/v/dout, acc_t the type of the
// accumulators (out_acc, lse, delta, dq/dk/dv) and of all tile arithmetic. bf16/fp16 would map to
// (c10::BFloat16, float) / (c10::Half, float); head_rows() already converts when the types differ.
#define RA_CPU_DTYPE_SWITCH(DTYPE, SCALAR_T, ACC_T, ...)                          \
  [&] {                                                                          \
    switch (DTYPE) {                                                             \
      case ::ring_attn::DType::kFloat32: {                                       \
        using SCALAR_T = float;                                                  \
        using ACC_T = float;                                                     \
        return __VA_ARGS__();                                                    \
      }                                                                          \
      case ::ring_attn::DType::kFloat64: {                                       \
        using SCALAR_T = double;                                                 \
        using ACC_T = double;                                                    \
        return __VA_ARGS__();                                                    \
      }                                                                          \
      default:                                                                   \
        TORCH_CHECK(false, "ring_attn cpu block attention: unsupported dtype ", \
                    static_cast<int>(DTYPE));                                    \
    }                                                                            \
  }()

namespace {

// Tile sizes (rows of the query tile, columns of the key tile). The score tile (kBlockQ x
// kBlockK floats, 512 KiB) plus the operand tiles stay in a 2 MiB L2.
constexpr int64_t kBlockQ = 256;
constexpr int64_t kBlockK = 512;
constexpr int64_t kScorePad = 16;  // ld of score tiles = kBlockK + pad (avoids 4K aliasing)
constexpr int64_t kMinBlockQ = 64;
// With more than one thread, aim for at least this many tasks per thread (dynamic scheduling then
// evens out uneven task costs).
constexpr int64_t kTasksPerThread = 4;

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Scratch memory: per-thread, grow-only, 64-byte aligned arenas that live until the thread exits.
// Allocating per call would pay page faults on every call (large blocks are mmap'ed and unmapped
// by malloc), which the ring repeats once per step. Slot kTileSlot holds a worker's tile scratch;
// the other slots hold the per-call buffers of the calling thread (which is also worker 0).
enum ScratchSlot : int { kTileSlot = 0, kPackSlot0 = 1, kDqSlot = 5, kNumSlots = 6 };

inline void* thread_scratch(int slot, size_t bytes) {
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

// The rows of every (batch, head) of a (batch, seq, heads, headdim) operand as BLAS operands:
// row r of (b, h) at ptr(b, h) + r * ld, unit stride along headdim.
template <typename T>
struct HeadRows {
  const T* base;
  int64_t batch_stride, head_stride, ld;
  const T* ptr(int64_t b, int64_t h) const { return base + b * batch_stride + h * head_stride; }
};

// x as HeadRows<acc_t>: x itself when its rows are dense per head and already acc_t, else a
// head-major (batch, heads, seq, headdim) acc_t copy in the calling thread's scratch `slot`.
// (bf16/fp16 inputs will always take the converting path.)
template <typename scalar_t, typename acc_t>
HeadRows<acc_t> head_rows(const scalar_t* x, const Strides& st, int64_t B, int64_t S, int64_t Hn,
                          int64_t D, int slot) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (S <= 1 || st.row == D) return {x, st.batch, st.head, D};
  }
  acc_t* dst = static_cast<acc_t*>(thread_scratch(slot, sizeof(acc_t) * B * Hn * S * D));
  const int64_t rows = B * Hn * S;
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / D), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t i = r % S, bh = r / S, b = bh / Hn, h = bh % Hn;
      const scalar_t* src = x + b * st.batch + i * st.row + h * st.head;
      acc_t* out = dst + r * D;
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        std::memcpy(out, src, sizeof(acc_t) * D);
      } else {
        for (int64_t c = 0; c < D; ++c) out[c] = static_cast<acc_t>(src[c]);
      }
    }
  });
  return {dst, Hn * S * D, S * D, D};
}

// Runs f(task, scratch) for task in [0, ntasks) on at::parallel_for threads, handing out tasks
// dynamically in increasing order (callers put the heaviest first). Each thread builds its own
// scratch with make_scratch() and runs BLAS single-threaded.
template <typename MakeScratch, typename F>
void parallel_tasks(int64_t ntasks, MakeScratch&& make_scratch, F&& f) {
  if (ntasks <= 0) return;
  const int64_t nthreads =
      at::in_parallel_region() ? 1 : std::min<int64_t>(at::get_num_threads(), ntasks);
  std::atomic<int64_t> next{0};
  auto worker = [&](int64_t, int64_t) {
    blas::ScopedSingleThreadBlas single_thread_blas;
    auto scratch = make_scratch();
    for (int64_t t = next.fetch_add(1); t < ntasks; t = next.fetch_add(1)) f(t, scratch);
  };
  if (nthreads <= 1) {
    worker(0, 1);
  } else {
    at::parallel_for(0, nthreads, 1, worker);
  }
}

int64_t available_threads() {
  return at::in_parallel_region() ? 1 : std::max<int>(at::get_num_threads(), 1);
}

std::vector<PositionRange> tile_ranges(const int32_t* pos, int64_t len, int64_t block) {
  std::vector<PositionRange> r(static_cast<size_t>(cdiv(len, block)));
  for (size_t t = 0; t < r.size(); ++t) {
    const int64_t b = static_cast<int64_t>(t) * block;
    r[t] = range_of(pos, b, std::min(len, b + block));
  }
  return r;
}

// Masks the invisible entries of a partial tile's score rows to -inf.
template <typename acc_t>
void apply_mask(const MaskSpec& mask, const int32_t* q_pos, const int32_t* k_pos, int64_t nq,
                int64_t nk, acc_t* s, int64_t lds) {
  const acc_t ninf = neg_inf<acc_t>();
  for (int64_t i = 0; i < nq; ++i) {
    const int64_t qp = q_pos[i];
    acc_t* row = s + i * lds;
    for (int64_t j = 0; j < nk; ++j) {
      if (!is_visible(mask, qp, k_pos[j])) row[j] = ninf;
    }
  }
}

// Max of a score row. Plain max instructions (clamp_min), 4 independent chains; NaN scores are not
// expected (they would poison the output anyway).
template <typename acc_t>
acc_t row_max(const acc_t* s, int64_t n) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  const acc_t ninf = neg_inf<acc_t>();
  Vec m0(ninf), m1(ninf), m2(ninf), m3(ninf);
  int64_t j = 0;
  for (; j + 4 * W <= n; j += 4 * W) {
    m0 = at::vec::clamp_min(m0, Vec::loadu(s + j));
    m1 = at::vec::clamp_min(m1, Vec::loadu(s + j + W));
    m2 = at::vec::clamp_min(m2, Vec::loadu(s + j + 2 * W));
    m3 = at::vec::clamp_min(m3, Vec::loadu(s + j + 3 * W));
  }
  for (; j + W <= n; j += W) m0 = at::vec::clamp_min(m0, Vec::loadu(s + j));
  m0 = at::vec::clamp_min(at::vec::clamp_min(m0, m1), at::vec::clamp_min(m2, m3));
  acc_t m = at::vec::vec_reduce_all<acc_t>(
      [](Vec& a, Vec& b) { return at::vec::clamp_min(a, b); }, m0);
  for (; j < n; ++j) m = s[j] > m ? s[j] : m;
  return m;
}

// s[j] = exp(s[j] - m) in place (m finite), returns the row sum.
template <typename acc_t>
acc_t exp_row_sum(acc_t* s, int64_t n, acc_t m) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  const Vec vm(m);
  Vec sum0(acc_t(0)), sum1(acc_t(0));
  int64_t j = 0;
  for (; j + 2 * W <= n; j += 2 * W) {
    const Vec e0 = (Vec::loadu(s + j) - vm).exp_u20();
    const Vec e1 = (Vec::loadu(s + j + W) - vm).exp_u20();
    e0.store(s + j);
    e1.store(s + j + W);
    sum0 = sum0 + e0;
    sum1 = sum1 + e1;
  }
  for (; j + W <= n; j += W) {
    const Vec e = (Vec::loadu(s + j) - vm).exp_u20();
    e.store(s + j);
    sum0 = sum0 + e;
  }
  if (j < n) {
    const int64_t c = n - j;
    const Vec x = Vec::set(Vec(neg_inf<acc_t>()), Vec::loadu(s + j, c), c);
    const Vec e = (x - vm).exp_u20();
    e.store(s + j, c);
    sum1 = sum1 + e;
  }
  sum0 = sum0 + sum1;
  return at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return a + b; }, sum0);
}

// s[j] = exp(s[j] - m) in place (m finite), no sum.
template <typename acc_t>
void exp_row(acc_t* s, int64_t n, acc_t m) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  const Vec vm(m);
  int64_t j = 0;
  for (; j + W <= n; j += W) (Vec::loadu(s + j) - vm).exp_u20().store(s + j);
  if (j < n) {
    const int64_t c = n - j;
    const Vec x = Vec::set(Vec(neg_inf<acc_t>()), Vec::loadu(s + j, c), c);
    (x - vm).exp_u20().store(s + j, c);
  }
}

template <typename acc_t>
void scale_row(acc_t* x, int64_t n, acc_t f) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  const Vec vf(f);
  int64_t j = 0;
  for (; j + W <= n; j += W) (Vec::loadu(x + j) * vf).store(x + j);
  for (; j < n; ++j) x[j] *= f;
}

// ds[j] = p[j] * (dp[j] - delta), written over dp.
template <typename acc_t>
void ds_row(const acc_t* p, acc_t* dp, int64_t n, acc_t delta) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  const Vec vd(delta);
  int64_t j = 0;
  for (; j + W <= n; j += W) (Vec::loadu(p + j) * (Vec::loadu(dp + j) - vd)).store(dp + j);
  for (; j < n; ++j) dp[j] = p[j] * (dp[j] - delta);
}

// dst[c] += src[c]
template <typename acc_t>
void add_row(acc_t* dst, const acc_t* src, int64_t n) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  int64_t j = 0;
  for (; j + W <= n; j += W) (Vec::loadu(dst + j) + Vec::loadu(src + j)).store(dst + j);
  for (; j < n; ++j) dst[j] += src[j];
}

void check_shape(const BlockShape& s) {
  TORCH_CHECK(s.batch >= 0 && s.seqlen_q >= 0 && s.seqlen_k >= 0, "ring_attn cpu: negative size");
  TORCH_CHECK(s.headdim >= 1, "ring_attn cpu: headdim must be >= 1, got ", s.headdim);
  TORCH_CHECK(s.nheads >= 1 && s.nheads_kv >= 1 && s.nheads % s.nheads_kv == 0,
              "ring_attn cpu: nheads (", s.nheads, ") must be a multiple of nheads_kv (",
              s.nheads_kv, ")");
}

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------

template <typename scalar_t, typename acc_t>
void fwd_impl(const BlockFwdParams& p) {
  const BlockShape& sh = p.shape;
  const int64_t B = sh.batch, Sq = sh.seqlen_q, Sk = sh.seqlen_k, H = sh.nheads, D = sh.headdim;
  const int64_t Hkv = sh.nheads_kv, group = H / Hkv;
  if (B == 0 || Sq == 0 || Sk == 0) return;  // nothing visible: the state is unchanged

  // Smaller query tiles when there would be too few tasks to keep every thread busy.
  const int64_t nthreads = available_threads();
  int64_t BQ = kBlockQ;
  while (nthreads > 1 && BQ > kMinBlockQ && cdiv(Sq, BQ) * B * H < kTasksPerThread * nthreads)
    BQ /= 2;
  const int64_t BK = kBlockK, LDS = kBlockK + kScorePad;
  const int64_t nqt = cdiv(Sq, BQ), nkt = cdiv(Sk, BK);
  const std::vector<PositionRange> qr = tile_ranges(p.q_pos, Sq, BQ);
  const std::vector<PositionRange> kr = tile_ranges(p.k_pos, Sk, BK);

  // Query tiles with at least one non-skipped key tile; the others keep their state untouched.
  std::vector<int64_t> live_qt;
  for (int64_t qt = nqt - 1; qt >= 0; --qt) {  // late tiles first: the heavy ones under causal
    for (int64_t kt = 0; kt < nkt; ++kt) {
      if (classify_tile(p.mask, qr[qt], kr[kt]) != TileKind::kSkip) {
        live_qt.push_back(qt);
        break;
      }
    }
  }
  if (live_qt.empty()) return;

  using In = const scalar_t*;
  const auto Qr = head_rows<scalar_t, acc_t>(In(p.q), p.q_strides, B, Sq, H, D, kPackSlot0);
  const auto Kr = head_rows<scalar_t, acc_t>(In(p.k), p.k_strides, B, Sk, Hkv, D, kPackSlot0 + 1);
  const auto Vr = head_rows<scalar_t, acc_t>(In(p.v), p.v_strides, B, Sk, Hkv, D, kPackSlot0 + 2);

  auto* out = static_cast<acc_t*>(p.out_acc);
  auto* lse = static_cast<acc_t*>(p.lse);
  const acc_t scale = static_cast<acc_t>(p.softmax_scale);
  const acc_t ninf = neg_inf<acc_t>();

  struct Scratch {
    acc_t* s;
    acc_t* acc;
    OnlineRow<acc_t>* st;
  };
  auto make_scratch = [&] {
    const size_t bytes = Carver::bytes_for<acc_t>(BQ * LDS) + Carver::bytes_for<acc_t>(BQ * D) +
                         Carver::bytes_for<OnlineRow<acc_t>>(BQ);
    Carver c(kTileSlot, bytes);
    Scratch ws;
    ws.s = c.take<acc_t>(BQ * LDS);
    ws.acc = c.take<acc_t>(BQ * D);
    ws.st = c.take<OnlineRow<acc_t>>(BQ);
    return ws;
  };

  const int64_t nbh = B * H;
  parallel_tasks(static_cast<int64_t>(live_qt.size()) * nbh, make_scratch, [&](int64_t task,
                                                                               Scratch& ws) {
    const int64_t qt = live_qt[task / nbh];
    const int64_t bh = task % nbh;
    const int64_t b = bh / H, h = bh % H, hk = h / group;
    const int64_t q0 = qt * BQ, nq = std::min(BQ, Sq - q0);
    acc_t* S = ws.s;
    acc_t* acc = ws.acc;
    OnlineRow<acc_t>* st = ws.st;

    // Prologue: load the running state (o, lse) as acc = o, m = lse, l = 1.
    acc_t* out_base =
        out + b * p.out_strides.batch + q0 * p.out_strides.row + h * p.out_strides.head;
    acc_t* lse_base = lse + b * p.lse_batch_stride + h * p.lse_head_stride + q0;
    for (int64_t i = 0; i < nq; ++i) {
      st[i] = OnlineRow<acc_t>::from_lse(lse_base[i]);
      if (st[i].l > acc_t(0)) {
        std::memcpy(acc + i * D, out_base + i * p.out_strides.row, sizeof(acc_t) * D);
      } else {
        std::fill(acc + i * D, acc + (i + 1) * D, acc_t(0));
      }
    }

    const acc_t* Q = Qr.ptr(b, h) + q0 * Qr.ld;
    const acc_t* K_head = Kr.ptr(b, hk);
    const acc_t* V_head = Vr.ptr(b, hk);

    for (int64_t kt = 0; kt < nkt; ++kt) {
      const TileKind kind = classify_tile(p.mask, qr[qt], kr[kt]);
      if (kind == TileKind::kSkip) continue;
      const int64_t k0 = kt * BK, nk = std::min(BK, Sk - k0);

      // S = scale * Q K^T
      blas::gemm<acc_t>(false, true, nq, nk, D, scale, Q, Qr.ld, K_head + k0 * Kr.ld, Kr.ld,
                        acc_t(0), S, LDS);
      if (kind == TileKind::kPartial)
        apply_mask(p.mask, p.q_pos + q0, p.k_pos + k0, nq, nk, S, LDS);

      // Online softmax: P = exp(S - m'), l = l * factor + rowsum(P), acc *= factor.
      bool any_row = false;
      for (int64_t i = 0; i < nq; ++i) {
        acc_t* s = S + i * LDS;
        const acc_t mx = row_max(s, nk);
        if (mx == ninf) {  // nothing visible in this row of the tile: P row = 0, state unchanged
          std::fill(s, s + nk, acc_t(0));
          continue;
        }
        any_row = true;
        const acc_t factor = st[i].rescale_for(mx);
        st[i].l += exp_row_sum(s, nk, st[i].m);
        if (factor == acc_t(0)) {
          std::fill(acc + i * D, acc + (i + 1) * D, acc_t(0));
        } else if (factor != acc_t(1)) {
          scale_row(acc + i * D, D, factor);
        }
      }
      if (!any_row) continue;

      // acc += P V
      blas::gemm<acc_t>(false, false, nq, D, nk, acc_t(1), S, LDS, V_head + k0 * Vr.ld, Vr.ld,
                        acc_t(1), acc, D);
    }

    // Epilogue: store the normalised output and lse.
    for (int64_t i = 0; i < nq; ++i) {
      const acc_t inv_l = st[i].inv_l();
      acc_t* o = out_base + i * p.out_strides.row;
      const acc_t* a = acc + i * D;
      for (int64_t c = 0; c < D; ++c) o[c] = a[c] * inv_l;
      lse_base[i] = st[i].lse();
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

template <typename scalar_t, typename acc_t>
void bwd_impl(const BlockBwdParams& p) {
  const BlockShape& sh = p.shape;
  const int64_t B = sh.batch, Sq = sh.seqlen_q, Sk = sh.seqlen_k, H = sh.nheads, D = sh.headdim;
  const int64_t Hkv = sh.nheads_kv, group = H / Hkv;
  if (B == 0 || Sq == 0 || Sk == 0) return;

  const int64_t BQ = kBlockQ, BK = kBlockK, LDS = kBlockK + kScorePad;
  const int64_t nqt = cdiv(Sq, BQ), nkt = cdiv(Sk, BK);
  const std::vector<PositionRange> qr = tile_ranges(p.q_pos, Sq, BQ);
  const std::vector<PositionRange> kr = tile_ranges(p.k_pos, Sk, BK);

  // Key tiles that meet at least one query tile.
  std::vector<int64_t> live_kt;
  for (int64_t kt = 0; kt < nkt; ++kt) {
    for (int64_t qt = 0; qt < nqt; ++qt) {
      if (classify_tile(p.mask, qr[qt], kr[kt]) != TileKind::kSkip) {
        live_kt.push_back(kt);
        break;
      }
    }
  }
  if (live_kt.empty()) return;
  const int64_t nlive = static_cast<int64_t>(live_kt.size());

  using In = const scalar_t*;
  const auto Qr = head_rows<scalar_t, acc_t>(In(p.q), p.q_strides, B, Sq, H, D, kPackSlot0);
  const auto Or = head_rows<scalar_t, acc_t>(In(p.dout), p.dout_strides, B, Sq, H, D, kPackSlot0 + 3);
  const auto Kr = head_rows<scalar_t, acc_t>(In(p.k), p.k_strides, B, Sk, Hkv, D, kPackSlot0 + 1);
  const auto Vr = head_rows<scalar_t, acc_t>(In(p.v), p.v_strides, B, Sk, Hkv, D, kPackSlot0 + 2);

  const auto* lse = static_cast<const acc_t*>(p.lse);
  const auto* delta = static_cast<const acc_t*>(p.delta);
  auto* dq = static_cast<acc_t*>(p.dq_acc);
  auto* dk = static_cast<acc_t*>(p.dk_acc);
  auto* dv = static_cast<acc_t*>(p.dv_acc);
  const acc_t scale = static_cast<acc_t>(p.softmax_scale);
  const acc_t ninf = neg_inf<acc_t>();

  // Tasks own (batch, kv head, key split): the dk/dv rows of a task are disjoint from every other
  // task's. Each task accumulates dq of its query heads into a private dense partial (one per
  // split, all zero-initialised) that is added into dq_acc at the end; dk/dv of a key tile build up
  // in a dense tile scratch and are added into dk_acc/dv_acc once per key tile.
  // Key splits cost a dq partial (the size of dq) each: split only until every thread has two
  // tasks (enough for dynamic scheduling to even out odd unit counts).
  const int64_t units = B * Hkv;
  const int64_t nthreads = available_threads();
  const int64_t nsplit =
      nthreads <= 1 ? 1 : std::min(nlive, std::max<int64_t>(1, cdiv(2 * nthreads, units)));
  const int64_t dq_task_elems = group * Sq * D;
  auto* const dq_part = static_cast<acc_t*>(
      thread_scratch(kDqSlot, sizeof(acc_t) * units * nsplit * dq_task_elems));

  struct Scratch {
    acc_t *s, *dp, *dk, *dv;
  };
  auto make_scratch = [&] {
    const size_t bytes =
        2 * Carver::bytes_for<acc_t>(BQ * LDS) + 2 * Carver::bytes_for<acc_t>(BK * D);
    Carver c(kTileSlot, bytes);
    Scratch ws;
    ws.s = c.take<acc_t>(BQ * LDS);
    ws.dp = c.take<acc_t>(BQ * LDS);
    ws.dk = c.take<acc_t>(BK * D);
    ws.dv = c.take<acc_t>(BK * D);
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

    const acc_t* K_head = Kr.ptr(b, hk);
    const acc_t* V_head = Vr.ptr(b, hk);

    for (int64_t li = split; li < nlive; li += nsplit) {
      const int64_t kt = live_kt[li];
      const int64_t k0 = kt * BK, nk = std::min(BK, Sk - k0);
      const acc_t* K = K_head + k0 * Kr.ld;
      const acc_t* V = V_head + k0 * Vr.ld;
      acc_t beta_kv = acc_t(0);  // the first GEMM into dKt/dVt overwrites it

      for (int64_t g = 0; g < group; ++g) {
        const int64_t h = hk * group + g;
        const acc_t* lse_h = lse + b * p.row_stat_batch_stride + h * p.row_stat_head_stride;
        const acc_t* delta_h = delta + b * p.row_stat_batch_stride + h * p.row_stat_head_stride;
        acc_t* dq_h = dq_task + g * Sq * D;
        const acc_t* Q_h = Qr.ptr(b, h);
        const acc_t* dO_h = Or.ptr(b, h);

        for (int64_t qt = 0; qt < nqt; ++qt) {
          const TileKind kind = classify_tile(p.mask, qr[qt], kr[kt]);
          if (kind == TileKind::kSkip) continue;
          const int64_t q0 = qt * BQ, nq = std::min(BQ, Sq - q0);
          const acc_t* Q = Q_h + q0 * Qr.ld;
          const acc_t* dO = dO_h + q0 * Or.ld;

          // P = exp(scale * Q K^T - lse); 0 where masked and on rows that saw nothing (lse -inf).
          blas::gemm<acc_t>(false, true, nq, nk, D, scale, Q, Qr.ld, K, Kr.ld, acc_t(0), S, LDS);
          if (kind == TileKind::kPartial)
            apply_mask(p.mask, p.q_pos + q0, p.k_pos + k0, nq, nk, S, LDS);
          for (int64_t i = 0; i < nq; ++i) {
            acc_t* s = S + i * LDS;
            const acc_t l = lse_h[q0 + i];
            if (l == ninf) {
              std::fill(s, s + nk, acc_t(0));
            } else {
              exp_row(s, nk, l);
            }
          }
          // dV += P^T dO
          blas::gemm<acc_t>(true, false, nk, D, nq, acc_t(1), S, LDS, dO, Or.ld, beta_kv, dVt, D);
          // dP = dO V^T
          blas::gemm<acc_t>(false, true, nq, nk, D, acc_t(1), dO, Or.ld, V, Vr.ld, acc_t(0), dP,
                            LDS);
          // dS = P * (dP - delta)
          for (int64_t i = 0; i < nq; ++i) ds_row(S + i * LDS, dP + i * LDS, nk, delta_h[q0 + i]);
          // dQ += scale * dS K
          blas::gemm<acc_t>(false, false, nq, D, nk, scale, dP, LDS, K, Kr.ld, acc_t(1),
                            dq_h + q0 * D, D);
          // dK += scale * dS^T Q
          blas::gemm<acc_t>(true, false, nk, D, nq, scale, dP, LDS, Q, Qr.ld, beta_kv, dKt, D);
          beta_kv = acc_t(1);
        }
      }
      if (beta_kv == acc_t(0)) continue;  // no query tile met this key tile in this kv group
      // dk_acc/dv_acc rows of this key tile += the tile's dK/dV.
      for (int64_t j = 0; j < nk; ++j) {
        const int64_t r = k0 + j;
        add_row(dk + b * p.dk_strides.batch + r * p.dk_strides.row + hk * p.dk_strides.head,
                dKt + j * D, D);
        add_row(dv + b * p.dv_strides.batch + r * p.dv_strides.row + hk * p.dv_strides.head,
                dVt + j * D, D);
      }
    }
  });

  // dq_acc += the dq partials of all splits.
  const int64_t rows = B * H * Sq;
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / D), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t i = r % Sq, bh = r / Sq, b = bh / H, h = bh % H;
      const int64_t hk = h / group, g = h % group;
      acc_t* dst = dq + b * p.dq_strides.batch + i * p.dq_strides.row + h * p.dq_strides.head;
      for (int64_t s = 0; s < nsplit; ++s) {
        const int64_t task = (b * Hkv + hk) * nsplit + s;
        add_row(dst, dq_part + task * dq_task_elems + (g * Sq + i) * D, D);
      }
    }
  });
}

}  // namespace

void block_attn_fwd(const BlockFwdParams& p) {
  check_shape(p.shape);
  RA_CPU_DTYPE_SWITCH(p.dtype, scalar_t, acc_t, [&] { fwd_impl<scalar_t, acc_t>(p); });
}

void block_attn_bwd(const BlockBwdParams& p) {
  check_shape(p.shape);
  RA_CPU_DTYPE_SWITCH(p.dtype, scalar_t, acc_t, [&] { bwd_impl<scalar_t, acc_t>(p); });
}

}  // namespace cpu
}  // namespace ring_attn
