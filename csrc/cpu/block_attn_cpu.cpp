// CPU block attention, flash-attention style: per (query tile, key tile) one BLAS GEMM for the
// scores, the softmax fused in between (vectorised with at::vec), one GEMM for P V (forward) or
// four for the gradients (backward). Tiles are classified from their position ranges
// (core/mask.h): skipped tiles are never computed, full tiles carry no per-element mask work.
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

namespace ring_attn {
namespace cpu {

// Dispatch on the input dtype: scalar_t is the element type of q/k/v/dout, acc_t the type of the
// accumulators (out_acc, lse, delta, dq/dk/dv) and of all tile arithmetic. bf16/fp16 would map to
// (c10::BFloat16, float) / (c10::Half, float); tile_view() already converts when the types differ.
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
static int64_t env_or(const char* n, int64_t d) { const char* e = std::getenv(n); return e ? std::atoll(e) : d; }
static const int64_t kBlockQ = env_or("RA_BQ", 256);
static const int64_t kBlockK = env_or("RA_BK", 512);
static const int64_t kScorePad = env_or("RA_PAD", 16);  // ld of score tiles = kBlockK + pad (avoids 4K aliasing)

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// 64-byte aligned scratch array.
template <typename T>
struct Buffer {
  struct Free {
    void operator()(T* p) const { std::free(p); }
  };
  std::unique_ptr<T, Free> ptr;
  explicit Buffer(int64_t n) {
    const size_t bytes = ((static_cast<size_t>(std::max<int64_t>(n, 1)) * sizeof(T) + 63) / 64) * 64;
    ptr.reset(static_cast<T*>(std::aligned_alloc(64, bytes)));
    TORCH_CHECK(ptr, "ring_attn cpu: out of memory for scratch");
  }
  T* get() const { return ptr.get(); }
};

// A row-major (rows x headdim) operand as BLAS sees it.
template <typename T>
struct MatView {
  const T* ptr;
  int64_t ld;
};

// Rows [0, n) of a matrix with row stride `row_stride` and unit column stride, as acc_t with a
// BLAS-legal leading dimension: the input itself when possible, else a packed copy in `scratch`
// (n x d). (bf16/fp16 inputs will always take the converting path.)
template <typename scalar_t, typename acc_t>
MatView<acc_t> tile_view(const scalar_t* base, int64_t row_stride, int64_t n, int64_t d,
                         acc_t* scratch) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (n <= 1) return {base, d};
    if (row_stride >= d && row_stride <= INT_MAX) return {base, row_stride};
  }
  for (int64_t i = 0; i < n; ++i) {
    const scalar_t* src = base + i * row_stride;
    acc_t* dst = scratch + i * d;
    for (int64_t c = 0; c < d; ++c) dst[c] = static_cast<acc_t>(src[c]);
  }
  return {scratch, d};
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

template <typename acc_t>
acc_t row_max(const acc_t* s, int64_t n) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  acc_t m = neg_inf<acc_t>();
  int64_t j = 0;
  if (n >= W) {
    Vec vm = Vec::loadu(s);
    for (j = W; j + W <= n; j += W) vm = at::vec::maximum(vm, Vec::loadu(s + j));
    m = at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vm);
  }
  for (; j < n; ++j) m = std::max(m, s[j]);
  return m;
}

// s[j] = exp(s[j] - m) in place (m finite), returns the row sum.
template <typename acc_t>
acc_t exp_row_sum(acc_t* s, int64_t n, acc_t m) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  const Vec vm(m);
  Vec vsum(acc_t(0));
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    const Vec e = (Vec::loadu(s + j) - vm).exp_u20();
    e.store(s + j);
    vsum = vsum + e;
  }
  if (j < n) {
    const int64_t c = n - j;
    const Vec x = Vec::set(Vec(neg_inf<acc_t>()), Vec::loadu(s + j, c), c);
    const Vec e = (x - vm).exp_u20();
    e.store(s + j, c);
    vsum = vsum + e;
  }
  return at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return a + b; }, vsum);
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
  const int64_t group = sh.nheads / sh.nheads_kv;
  if (B == 0 || Sq == 0 || Sk == 0) return;  // nothing visible: the state is unchanged

  const int64_t BQ = kBlockQ, BK = kBlockK, LDS = kBlockK + kScorePad;
  const int64_t nqt = cdiv(Sq, BQ), nkt = cdiv(Sk, BK);
  const std::vector<PositionRange> qr = tile_ranges(p.q_pos, Sq, BQ);
  const std::vector<PositionRange> kr = tile_ranges(p.k_pos, Sk, BK);

  const auto* q = static_cast<const scalar_t*>(p.q);
  const auto* k = static_cast<const scalar_t*>(p.k);
  const auto* v = static_cast<const scalar_t*>(p.v);
  auto* out = static_cast<acc_t*>(p.out_acc);
  auto* lse = static_cast<acc_t*>(p.lse);
  const acc_t scale = static_cast<acc_t>(p.softmax_scale);
  const acc_t ninf = neg_inf<acc_t>();

  struct Scratch {
    Buffer<acc_t> s, acc, qpack, kpack, vpack;
    std::vector<OnlineRow<acc_t>> st;
    std::vector<uint8_t> kind;
  };
  auto make_scratch = [&] {
    const bool pack = !std::is_same_v<scalar_t, acc_t>;
    return Scratch{Buffer<acc_t>(BQ * LDS), Buffer<acc_t>(BQ * D),
                   Buffer<acc_t>(pack || p.q_strides.row < D ? BQ * D : 1),
                   Buffer<acc_t>(pack || p.k_strides.row < D ? BK * D : 1),
                   Buffer<acc_t>(pack || p.v_strides.row < D ? BK * D : 1),
                   std::vector<OnlineRow<acc_t>>(static_cast<size_t>(BQ)),
                   std::vector<uint8_t>(static_cast<size_t>(nkt))};
  };

  // Task order: query tile descending (with causal masks the late tiles are the heavy ones), then
  // batch x head.
  const int64_t nbh = B * H;
  parallel_tasks(nqt * nbh, make_scratch, [&](int64_t task, Scratch& ws) {
    const int64_t qt = nqt - 1 - task / nbh;
    const int64_t bh = task % nbh;
    const int64_t b = bh / H, h = bh % H, hk = h / group;
    const int64_t q0 = qt * BQ, nq = std::min(BQ, Sq - q0);

    bool any_tile = false;
    for (int64_t kt = 0; kt < nkt; ++kt) {
      ws.kind[kt] = static_cast<uint8_t>(classify_tile(p.mask, qr[qt], kr[kt]));
      any_tile |= ws.kind[kt] != static_cast<uint8_t>(TileKind::kSkip);
    }
    if (!any_tile) return;

    acc_t* S = ws.s.get();
    acc_t* acc = ws.acc.get();
    OnlineRow<acc_t>* st = ws.st.data();

    // Prologue: load the running state.
    acc_t* out_base = out + b * p.out_strides.batch + q0 * p.out_strides.row + h * p.out_strides.head;
    acc_t* lse_base = lse + b * p.lse_batch_stride + h * p.lse_head_stride + q0;
    for (int64_t i = 0; i < nq; ++i) {
      st[i] = OnlineRow<acc_t>::from_lse(lse_base[i]);
      if (st[i].l > acc_t(0)) {
        std::memcpy(acc + i * D, out_base + i * p.out_strides.row, sizeof(acc_t) * D);
      } else {
        std::fill(acc + i * D, acc + (i + 1) * D, acc_t(0));
      }
    }

    const MatView<acc_t> Q =
        tile_view(q + b * p.q_strides.batch + q0 * p.q_strides.row + h * p.q_strides.head,
                  p.q_strides.row, nq, D, ws.qpack.get());
    const scalar_t* k_head = k + b * p.k_strides.batch + hk * p.k_strides.head;
    const scalar_t* v_head = v + b * p.v_strides.batch + hk * p.v_strides.head;

    for (int64_t kt = 0; kt < nkt; ++kt) {
      const auto kind = static_cast<TileKind>(ws.kind[kt]);
      if (kind == TileKind::kSkip) continue;
      const int64_t k0 = kt * BK, nk = std::min(BK, Sk - k0);

      const MatView<acc_t> K =
          tile_view(k_head + k0 * p.k_strides.row, p.k_strides.row, nk, D, ws.kpack.get());
      // S = scale * Q K^T
      blas::gemm<acc_t>(false, true, nq, nk, D, scale, Q.ptr, Q.ld, K.ptr, K.ld, acc_t(0), S, LDS);
      if (kind == TileKind::kPartial) apply_mask(p.mask, p.q_pos + q0, p.k_pos + k0, nq, nk, S, LDS);

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

      const MatView<acc_t> V =
          tile_view(v_head + k0 * p.v_strides.row, p.v_strides.row, nk, D, ws.vpack.get());
      // acc += P V
      blas::gemm<acc_t>(false, false, nq, D, nk, acc_t(1), S, LDS, V.ptr, V.ld, acc_t(1), acc, D);
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
  // Gradients are written by BLAS in place: their rows must not overlap.
  TORCH_CHECK((Sq <= 1 || p.dq_strides.row >= D) && (Sk <= 1 || p.dk_strides.row >= D) &&
                  (Sk <= 1 || p.dv_strides.row >= D),
              "ring_attn cpu bwd: dq/dk/dv row strides must be >= headdim");
  TORCH_CHECK(p.dq_strides.row <= INT_MAX && p.dk_strides.row <= INT_MAX &&
                  p.dv_strides.row <= INT_MAX,
              "ring_attn cpu bwd: gradient row strides too large for BLAS");

  const int64_t BQ = kBlockQ, BK = kBlockK, LDS = kBlockK + kScorePad;
  const int64_t nqt = cdiv(Sq, BQ), nkt = cdiv(Sk, BK);
  const std::vector<PositionRange> qr = tile_ranges(p.q_pos, Sq, BQ);
  const std::vector<PositionRange> kr = tile_ranges(p.k_pos, Sk, BK);

  const auto* q = static_cast<const scalar_t*>(p.q);
  const auto* k = static_cast<const scalar_t*>(p.k);
  const auto* v = static_cast<const scalar_t*>(p.v);
  const auto* dout = static_cast<const scalar_t*>(p.dout);
  const auto* lse = static_cast<const acc_t*>(p.lse);
  const auto* delta = static_cast<const acc_t*>(p.delta);
  auto* dq = static_cast<acc_t*>(p.dq_acc);
  auto* dk = static_cast<acc_t*>(p.dk_acc);
  auto* dv = static_cast<acc_t*>(p.dv_acc);
  const acc_t scale = static_cast<acc_t>(p.softmax_scale);
  const acc_t ninf = neg_inf<acc_t>();

  // Tasks own (batch, kv head, key split): dk/dv rows of a task are disjoint from every other
  // task's. With one split dq is also owned (its query heads belong to one kv head); with several,
  // each split writes a private dq partial that is summed afterwards.
  const int64_t units = B * Hkv;
  const int64_t nthreads = available_threads();
  const int64_t nsplit = units >= nthreads ? 1 : std::min(nkt, cdiv(nthreads, units));
  std::unique_ptr<Buffer<acc_t>> dq_part;
  if (nsplit > 1) {
    const int64_t n = units * nsplit * group * Sq * D;
    dq_part = std::make_unique<Buffer<acc_t>>(n);
    std::memset(dq_part->get(), 0, sizeof(acc_t) * n);
  }

  struct Scratch {
    Buffer<acc_t> s, dp, qpack, opack, kpack, vpack;
  };
  auto make_scratch = [&] {
    const bool pack = !std::is_same_v<scalar_t, acc_t>;
    return Scratch{Buffer<acc_t>(BQ * LDS), Buffer<acc_t>(BQ * LDS),
                   Buffer<acc_t>(pack || p.q_strides.row < D ? BQ * D : 1),
                   Buffer<acc_t>(pack || p.dout_strides.row < D ? BQ * D : 1),
                   Buffer<acc_t>(pack || p.k_strides.row < D ? BK * D : 1),
                   Buffer<acc_t>(pack || p.v_strides.row < D ? BK * D : 1)};
  };

  parallel_tasks(units * nsplit, make_scratch, [&](int64_t task, Scratch& ws) {
    const int64_t unit = task / nsplit, split = task % nsplit;
    const int64_t b = unit / Hkv, hk = unit % Hkv;
    acc_t* S = ws.s.get();
    acc_t* dP = ws.dp.get();

    const scalar_t* k_head = k + b * p.k_strides.batch + hk * p.k_strides.head;
    const scalar_t* v_head = v + b * p.v_strides.batch + hk * p.v_strides.head;
    acc_t* dk_head = dk + b * p.dk_strides.batch + hk * p.dk_strides.head;
    acc_t* dv_head = dv + b * p.dv_strides.batch + hk * p.dv_strides.head;

    for (int64_t kt = split; kt < nkt; kt += nsplit) {
      const int64_t k0 = kt * BK, nk = std::min(BK, Sk - k0);
      bool any = false;
      for (int64_t qt = 0; qt < nqt && !any; ++qt)
        any = classify_tile(p.mask, qr[qt], kr[kt]) != TileKind::kSkip;
      if (!any) continue;

      const MatView<acc_t> K =
          tile_view(k_head + k0 * p.k_strides.row, p.k_strides.row, nk, D, ws.kpack.get());
      const MatView<acc_t> V =
          tile_view(v_head + k0 * p.v_strides.row, p.v_strides.row, nk, D, ws.vpack.get());
      acc_t* dK = dk_head + k0 * p.dk_strides.row;
      acc_t* dV = dv_head + k0 * p.dv_strides.row;

      for (int64_t g = 0; g < group; ++g) {
        const int64_t h = hk * group + g;
        const acc_t* lse_h = lse + b * p.row_stat_batch_stride + h * p.row_stat_head_stride;
        const acc_t* delta_h = delta + b * p.row_stat_batch_stride + h * p.row_stat_head_stride;
        acc_t* dq_h;
        int64_t ld_dq;
        if (nsplit > 1) {
          dq_h = dq_part->get() + ((task * group) + g) * Sq * D;
          ld_dq = D;
        } else {
          dq_h = dq + b * p.dq_strides.batch + h * p.dq_strides.head;
          ld_dq = p.dq_strides.row;
        }

        for (int64_t qt = 0; qt < nqt; ++qt) {
          const TileKind kind = classify_tile(p.mask, qr[qt], kr[kt]);
          if (kind == TileKind::kSkip) continue;
          const int64_t q0 = qt * BQ, nq = std::min(BQ, Sq - q0);
          const MatView<acc_t> Q =
              tile_view(q + b * p.q_strides.batch + q0 * p.q_strides.row + h * p.q_strides.head,
                        p.q_strides.row, nq, D, ws.qpack.get());
          const MatView<acc_t> dO = tile_view(
              dout + b * p.dout_strides.batch + q0 * p.dout_strides.row + h * p.dout_strides.head,
              p.dout_strides.row, nq, D, ws.opack.get());

          // P = exp(scale * Q K^T - lse)
          blas::gemm<acc_t>(false, true, nq, nk, D, scale, Q.ptr, Q.ld, K.ptr, K.ld, acc_t(0), S,
                            LDS);
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
          blas::gemm<acc_t>(true, false, nk, D, nq, acc_t(1), S, LDS, dO.ptr, dO.ld, acc_t(1), dV,
                            p.dv_strides.row);
          // dP = dO V^T
          blas::gemm<acc_t>(false, true, nq, nk, D, acc_t(1), dO.ptr, dO.ld, V.ptr, V.ld, acc_t(0),
                            dP, LDS);
          // dS = P * (dP - delta)
          for (int64_t i = 0; i < nq; ++i) ds_row(S + i * LDS, dP + i * LDS, nk, delta_h[q0 + i]);
          // dQ += scale * dS K
          blas::gemm<acc_t>(false, false, nq, D, nk, scale, dP, LDS, K.ptr, K.ld, acc_t(1),
                            dq_h + q0 * ld_dq, ld_dq);
          // dK += scale * dS^T Q
          blas::gemm<acc_t>(true, false, nk, D, nq, scale, dP, LDS, Q.ptr, Q.ld, acc_t(1), dK,
                            p.dk_strides.row);
        }
      }
    }
  });

  if (nsplit > 1) {
    // dq += sum over splits of the partials, rows split across threads.
    const int64_t rows = B * H * Sq;
    at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / D), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t i = r % Sq, bh = r / Sq, b = bh / H, h = bh % H;
        const int64_t hk = h / group, g = h % group;
        acc_t* dst = dq + b * p.dq_strides.batch + i * p.dq_strides.row + h * p.dq_strides.head;
        for (int64_t s = 0; s < nsplit; ++s) {
          const int64_t task = (b * Hkv + hk) * nsplit + s;
          const acc_t* src = dq_part->get() + ((task * group + g) * Sq + i) * D;
          for (int64_t c = 0; c < D; ++c) dst[c] += src[c];
        }
      }
    });
  }
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
