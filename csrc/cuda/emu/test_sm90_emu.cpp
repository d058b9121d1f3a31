// The sm_90a primitives (sm90_primitives.cuh) under emulation, each against a plain reference:
//   wgmma m64nNk16 (bf16, fp16; N = 64, 128, 256; A and B K- or MN-major in 128-byte-swizzled
//     shared memory, or A from registers; D = A B and D += A B) against a float64 GEMM of the
//     same operands, two warpgroups at once, over k = 128 (two swizzle column blocks);
//   TMA 2D loads (odd tensor sizes, boxes reaching past every edge, 128-byte swizzle or none)
//     against the tensor read element by element, with out-of-bounds elements zero;
//   a two-stage TMA pipeline with full/empty mbarriers and named barriers;
//   TMA tensor reduce-adds (fp32, 5-D, unswizzled and 128-byte swizzled boxes reaching past the
//     tensor's edges in three dimensions) against the sums in float64, elements outside the
//     tensor and the row padding left unchanged; a staging reused before wait_group.read is
//     read by the earlier rounds' reductions too;
//   and that what the PTX ISA forbids is caught: results read before wgmma.wait_group or before
//   the mbarrier wait, shared memory written without fence.proxy.async before wgmma or a TMA
//   reduction, a TMA reduction's source overwritten before wait_group.read, a wgmma without
//   wgmma.fence, a wgmma, TMA load or TMA reduction never waited for, an expect_tx that does not
//   match, a TMA load on an mbarrier whose init was not fenced, a misaligned TMA reduction, TMA
//   reduction coordinates of another rank than the map's, named barriers with different counts
//   (the last ones abort the emulator: run in a child process).
// Shared-memory operand placement is written here from the TMA box layout (64-column blocks,
// chunk c of row r at chunk c ^ (r % 8)), independently of the descriptor decoding under test.
// Exit status 0 when every check passes.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "cuda/emu/test_check.h"
#include "cuda/sm90_primitives.cuh"

using namespace ring_attn::cuda;
using namespace ring_attn::cuda::sm90;
using ring_attn::emu_test::check;
using ring_attn::emu_test::g_failures;

namespace {

std::mt19937_64 g_rng(20251206);

// A 16-bit matrix: bits and exact values.
struct Matrix {
  int rows, cols;
  bool bf16;
  std::vector<uint16_t> bits;
  std::vector<double> vals;
  double at(int r, int c) const { return vals[size_t(r) * cols + c]; }
};

Matrix random_matrix(int rows, int cols, bool bf16) {
  Matrix m{rows, cols, bf16, std::vector<uint16_t>(size_t(rows) * cols),
           std::vector<double>(size_t(rows) * cols)};
  std::normal_distribution<float> nd(0.f, 1.f);
  for (size_t i = 0; i < m.bits.size(); ++i) {
    m.bits[i] = bf16 ? emu::float_to_bf16(nd(g_rng)) : emu::float_to_fp16(nd(g_rng));
    m.vals[i] = bf16 ? emu::bf16_to_float(m.bits[i]) : emu::fp16_to_float(m.bits[i]);
  }
  return m;
}

// Byte offset of element (r, c) of a rows x cols 16-bit tile stored as TMA writes it with the
// 128-byte swizzle: 64-column blocks of rows x 128 bytes, 16-byte chunk j of row r at j ^ (r % 8).
size_t tile_offset(int rows, int r, int c) {
  const int block = c / 64, col = c % 64;
  return size_t(block) * rows * 128 + size_t(r) * 128 + ((col / 8) ^ (r % 8)) * 16 + (col % 8) * 2;
}

// Writes m into shared memory at base in that layout (a generic store per element).
void store_tile(char* base, const Matrix& m) {
  for (int r = 0; r < m.rows; ++r) {
    for (int c = 0; c < m.cols; ++c)
      std::memcpy(base + tile_offset(m.rows, r, c), &m.bits[size_t(r) * m.cols + c], 2);
  }
}

// Runs fn in a child process; true when the child aborts with a message containing `what`.
bool aborts_with(const std::string& what, const std::function<void()>& fn) {
  std::fflush(stdout);
  std::fflush(stderr);
  int fds[2];
  if (pipe(fds) != 0) return false;
  const pid_t pid = fork();
  if (pid == 0) {
    close(fds[0]);
    dup2(fds[1], 2);
    fn();
    _exit(0);
  }
  close(fds[1]);
  std::string out;
  char buf[256];
  ssize_t n;
  while ((n = read(fds[0], buf, sizeof buf)) > 0) out.append(buf, size_t(n));
  close(fds[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  const bool ok =
      WIFSIGNALED(status) && WTERMSIG(status) == SIGABRT && out.find(what) != std::string::npos;
  if (!ok) std::fprintf(stderr, "child output: %s", out.c_str());
  return ok;
}

// ---- wgmma ----------------------------------------------------------------------------------
constexpr int kM = 128, kK = 128;  // two warpgroups of 64 rows; k over two 64-column blocks

struct GemmCase {
  bool bf16;
  int n;
  bool a_regs, a_mn, b_mn, accumulate;
};

std::string name(const GemmCase& c) {
  return std::string(c.bf16 ? "bf16" : "fp16") + " n" + std::to_string(c.n) +
         (c.a_regs ? " A regs"
          : c.a_mn ? " A mn"
                   : " A k") +
         (c.b_mn ? " B mn" : " B k") + (c.accumulate ? " D+=" : " D=");
}

// D (kM x N) of every warpgroup's fragments, written by thread into d_out[row * N + col].
template <bool kBF16, int N>
void run_gemm(const GemmCase& c, const Matrix& a, const Matrix& b, const std::vector<float>& c_in,
              std::vector<float>& d_out) {
  // Shared memory: A tile, then B tile, both 1024-byte aligned.
  const size_t a_bytes = size_t(kM) * kK * 2, b_bytes = size_t(N) * kK * 2;
  emu::launch(1, 1, 1, 256, a_bytes + b_bytes, [&](char* smem) {
    const int tid = thread_idx(), wg = tid / 128, lt = tid % 128;
    char* sa = smem;
    char* sb = smem + a_bytes;
    if (tid == 0) {
      // Stored transposed where the operand is MN-major: A^T (k x m), B^T (k x n).
      if (c.a_mn) {
        Matrix t{kK, kM, a.bf16, std::vector<uint16_t>(a.bits.size()), {}};
        for (int r = 0; r < kM; ++r)
          for (int k = 0; k < kK; ++k) t.bits[size_t(k) * kM + r] = a.bits[size_t(r) * kK + k];
        store_tile(sa, t);
      } else {
        store_tile(sa, a);
      }
      if (c.b_mn) {
        Matrix t{kK, N, b.bf16, std::vector<uint16_t>(b.bits.size()), {}};
        for (int n = 0; n < N; ++n)
          for (int k = 0; k < kK; ++k) t.bits[size_t(k) * N + n] = b.bits[size_t(n) * kK + k];
        store_tile(sb, t);
      } else {
        store_tile(sb, b);
      }
      fence_proxy_async();
    }
    sync_threads();
    const int w = lt / 32, g = (lt % 32) / 4, q = lt % 4;
    auto row_of = [&](int i) { return 64 * wg + 16 * w + g + 8 * ((i / 2) % 2); };
    auto col_of = [&](int i) { return 8 * (i / 4) + 2 * q + i % 2; };
    float d[N / 2];
    for (int i = 0; i < N / 2; ++i) d[i] = c_in[size_t(row_of(i)) * N + col_of(i)];
    wgmma_fence();
    for (int k0 = 0; k0 < kK; k0 += 16) {
      // K-major: rows of 64 k per block; MN-major: rows of 64 mn per k, blocks LBO apart.
      const uint64_t db = c.b_mn
                              ? smem_desc(sb + size_t(k0) * 128, uint32_t(kK * 128), 1024)
                              : smem_desc(sb + size_t(k0 / 64) * N * 128 + (k0 % 64) * 2, 16, 1024);
      const bool scale = c.accumulate || k0 > 0;
      if (c.a_regs) {
        uint32_t ar[4];
        for (int j = 0; j < 4; ++j) {
          const int r = 64 * wg + 16 * w + g + 8 * (j % 2), k = k0 + 2 * q + 8 * (j / 2);
          ar[j] = uint32_t(a.bits[size_t(r) * kK + k]) | uint32_t(a.bits[size_t(r) * kK + k + 1])
                                                             << 16;
        }
        // The A registers may be reused once issued (here: go out of scope).
        if (c.b_mn) {
          wgmma_rs<kBF16, N, true>(d, ar, db, scale);
        } else {
          wgmma_rs<kBF16, N, false>(d, ar, db, scale);
        }
      } else {
        const uint64_t da =
            c.a_mn
                ? smem_desc(sa + size_t(k0) * 128 + size_t(wg) * kK * 128, uint32_t(kK * 128), 1024)
                : smem_desc(sa + size_t(k0 / 64) * kM * 128 + size_t(64 * wg) * 128 + (k0 % 64) * 2,
                            16, 1024);
        if (c.a_mn && c.b_mn) {
          wgmma_ss<kBF16, N, true, true>(d, da, db, scale);
        } else if (c.a_mn) {
          wgmma_ss<kBF16, N, true, false>(d, da, db, scale);
        } else if (c.b_mn) {
          wgmma_ss<kBF16, N, false, true>(d, da, db, scale);
        } else {
          wgmma_ss<kBF16, N, false, false>(d, da, db, scale);
        }
      }
    }
    wgmma_commit();
    wgmma_wait<0>();
    for (int i = 0; i < N / 2; ++i) d_out[size_t(row_of(i)) * N + col_of(i)] = d[i];
  });
}

template <bool kBF16, int N>
void test_gemm(GemmCase c) {
  const Matrix a = random_matrix(kM, kK, kBF16), b = random_matrix(N, kK, kBF16);
  std::vector<float> c_in(size_t(kM) * N), d(size_t(kM) * N, std::nanf(""));
  std::normal_distribution<float> nd(0.f, 1.f);
  for (float& x : c_in) x = nd(g_rng);
  run_gemm<kBF16, N>(c, a, b, c_in, d);
  double worst = 0;
  for (int r = 0; r < kM; ++r) {
    for (int n = 0; n < N; ++n) {
      double ref = c.accumulate ? c_in[size_t(r) * N + n] : 0.0, mag = std::fabs(ref);
      for (int k = 0; k < kK; ++k) {
        ref += a.at(r, k) * b.at(n, k);
        mag += std::fabs(a.at(r, k) * b.at(n, k));
      }
      const double err = std::fabs(d[size_t(r) * N + n] - ref) / (mag + 1e-30);
      if (!(err <= worst)) worst = std::isnan(err) ? INFINITY : err;
    }
  }
  check(worst <= 1e-6, "wgmma " + name(c) + ": relative error " + std::to_string(worst));
}

void test_gemms() {
  for (bool a_regs : {false, true}) {
    for (bool a_mn : {false, true}) {
      if (a_regs && a_mn) continue;
      for (bool b_mn : {false, true}) {
        const bool acc = b_mn != a_mn;
        test_gemm<true, 64>({true, 64, a_regs, a_mn, b_mn, acc});
        test_gemm<false, 64>({false, 64, a_regs, a_mn, b_mn, !acc});
        test_gemm<true, 128>({true, 128, a_regs, a_mn, b_mn, !acc});
        test_gemm<false, 128>({false, 128, a_regs, a_mn, b_mn, acc});
        test_gemm<true, 256>({true, 256, a_regs, a_mn, b_mn, acc});
        test_gemm<false, 256>({false, 256, a_regs, a_mn, b_mn, !acc});
      }
    }
  }
}

// ---- TMA ------------------------------------------------------------------------------------
// A rows x cols tensor of 16-bit values, rows `pitch` elements apart.
struct Tensor2d {
  int rows, cols, pitch;
  std::vector<uint16_t> bits;
  uint16_t at(int64_t r, int64_t c) const {  // 0 outside
    return r >= 0 && r < rows && c >= 0 && c < cols ? bits[size_t(r) * pitch + c] : uint16_t(0);
  }
};

Tensor2d random_tensor(int rows, int cols, int pitch) {
  Tensor2d t{rows, cols, pitch, std::vector<uint16_t>(size_t(rows) * pitch)};
  std::uniform_int_distribution<int> bits(1, 0x7bff);  // finite, nonzero fp16 / bf16 patterns
  for (auto& b : t.bits) b = uint16_t(bits(g_rng));
  return t;
}

// Boxes at the given corners (column, row) loaded onto one mbarrier; each box's bytes checked
// against the tensor (zero outside), and the boxes' destinations checked untouched before the wait.
void test_tma_boxes(bool swizzle) {
  const Tensor2d t = random_tensor(97, 75, 80);
  const int box_c = swizzle ? 64 : 24, box_r = swizzle ? 32 : 7;
  const emu::TensorMap map =
      emu::make_tensor_map_2d(t.bits.data(), 2, t.cols, t.rows, int64_t(t.pitch) * 2, box_c, box_r,
                              swizzle ? emu::TmaSwizzle::k128B : emu::TmaSwizzle::kNone);
  const std::vector<std::pair<int, int>> corners = {{0, 0},   {-5, -3}, {40, 80},
                                                    {11, 65}, {74, 96}, {-60, 90}};
  const size_t box_bytes = size_t(box_c) * box_r * 2, stride = (box_bytes + 1023) / 1024 * 1024;
  const std::string what = std::string("TMA ") + (swizzle ? "128B swizzle" : "no swizzle");
  std::vector<uint16_t> landed(corners.size() * stride / 2);
  bool untouched_before_wait = true;
  emu::launch(1, 1, 1, 128, corners.size() * stride + 8, [&](char* smem) {
    uint64_t* bar = reinterpret_cast<uint64_t*>(smem + corners.size() * stride);
    if (thread_idx() == 0) {
      mbar_init(bar, 1);
      fence_proxy_async();
      mbar_arrive_expect_tx(bar, uint32_t(box_bytes * corners.size()));
      for (size_t i = 0; i < corners.size(); ++i)
        sm90::tma_load_2d(smem + i * stride, &map, bar, corners[i].first, corners[i].second);
      for (size_t i = 0; i < corners.size() * stride; ++i)
        untouched_before_wait &= smem[i] == char(0xff);
    }
    sync_threads();
    mbar_wait(bar, 0);
    if (thread_idx() == 0) std::memcpy(landed.data(), smem, landed.size() * 2);
  });
  check(untouched_before_wait, what + ": data visible before the mbarrier wait");
  int bad = 0;
  for (size_t i = 0; i < corners.size(); ++i) {
    for (int r = 0; r < box_r; ++r) {
      for (int c = 0; c < box_c; ++c) {
        const size_t off = swizzle ? tile_offset(box_r, r, c) : size_t(r) * box_c * 2 + c * 2;
        bad += landed[(i * stride + off) / 2] != t.at(corners[i].second + r, corners[i].first + c);
      }
    }
  }
  check(bad == 0, what + ": " + std::to_string(bad) + " elements differ from the tensor");
}

// A producer warp streams the row tiles of a tensor through two stages (full / empty mbarriers)
// to four consumer warps, which sum their elements; the sums reach the producer warp through
// shared memory ordered by a named barrier (bar.arrive by the consumers, bar.sync by it).
void test_tma_pipeline() {
  const Tensor2d t = random_tensor(117, 64, 64);
  constexpr int kRows = 16, kTiles = (117 + kRows - 1) / kRows;
  const emu::TensorMap map = emu::make_tensor_map_2d(
      t.bits.data(), 2, t.cols, t.rows, int64_t(t.pitch) * 2, 64, kRows, emu::TmaSwizzle::k128B);
  const size_t stage_bytes = kRows * 128;
  std::vector<double> sums(128, -1.0);
  emu::launch(1, 1, 1, 160, 2048 * 2 + 64 + 128 * 8, [&](char* smem) {
    uint64_t* full = reinterpret_cast<uint64_t*>(smem + 4096);
    uint64_t* empty = full + 2;
    double* out = reinterpret_cast<double*>(smem + 4096 + 64);
    const int tid = thread_idx();
    if (tid == 0) {
      for (int s = 0; s < 2; ++s) {
        mbar_init(full + s, 1);
        mbar_init(empty + s, 1);
      }
      fence_proxy_async();
    }
    sync_threads();
    if (tid >= 128) {  // producer warp
      setmaxnreg_dec<40>();
      if (tid == 128) {
        for (int i = 0; i < kTiles; ++i) {
          const int s = i % 2;
          if (i >= 2) mbar_wait(empty + s, (i / 2 - 1) & 1);
          mbar_arrive_expect_tx(full + s, uint32_t(stage_bytes));
          sm90::tma_load_2d(smem + s * 2048, &map, full + s, 0, i * kRows);
        }
      }
      named_sync(2, 160);
      if (tid == 128) std::memcpy(sums.data(), out, 128 * sizeof(double));
      return;
    }
    setmaxnreg_inc<232>();
    const int r = tid / 8, c0 = (tid % 8) * 8;
    double sum = 0;
    for (int i = 0; i < kTiles; ++i) {
      const int s = i % 2;
      mbar_wait(full + s, (i / 2) & 1);
      for (int c = c0; c < c0 + 8; ++c) {
        uint16_t v;
        std::memcpy(&v, smem + s * 2048 + tile_offset(kRows, r, c), 2);
        sum += v;
      }
      named_sync(1, 128);  // every consumer has read the stage
      if (tid == 0) mbar_arrive(empty + s);
    }
    out[tid] = sum;
    named_arrive(2, 160);
  });
  int bad = 0;
  for (int tid = 0; tid < 128; ++tid) {
    double ref = 0;
    for (int i = 0; i < kTiles; ++i) {
      for (int c = (tid % 8) * 8; c < (tid % 8) * 8 + 8; ++c) ref += t.at(i * kRows + tid / 8, c);
    }
    bad += sums[tid] != ref;
  }
  check(bad == 0, "TMA pipeline: " + std::to_string(bad) + " consumer sums differ");
}

// ---- what must be caught ----------------------------------------------------------------------
// One warpgroup's D = A B (64 x 64 x 16, bf16, both K-major) with the steps that a test leaves
// out; early: D as read right after the commit; d: D after the wait.
struct SingleGemm {
  bool fence_generic = true, wgmma_fence = true, wait = true, write_in_flight = false;
};

void single_gemm(const SingleGemm& o, const Matrix& a, const Matrix& b, std::vector<float>& early,
                 std::vector<float>& d_out) {
  emu::launch(1, 1, 1, 128, 16384, [&](char* smem) {  // 64 rows of 128 bytes each
    const int tid = thread_idx();
    if (tid == 0) {
      store_tile(smem, a);
      store_tile(smem + 8192, b);
      if (o.fence_generic) fence_proxy_async();
    }
    sync_threads();
    float d[32];
    if (o.wgmma_fence) wgmma_fence();
    wgmma_ss<true, 64, false, false>(d, smem_desc(smem, 16, 1024), smem_desc(smem + 8192, 16, 1024),
                                     false);
    wgmma_commit();
    for (int i = 0; i < 32; ++i) early[size_t(tid) * 32 + i] = d[i];
    if (o.write_in_flight) d[3] = 1.f;
    if (o.wait) wgmma_wait<0>();
    for (int i = 0; i < 32; ++i) d_out[size_t(tid) * 32 + i] = d[i];
  });
}

void test_hazards() {
  const Matrix a = random_matrix(64, 16, true), b = random_matrix(64, 16, true);
  std::vector<float> early(128 * 32), d(128 * 32);
  single_gemm({}, a, b, early, d);
  int nan_early = 0, wrong = 0;
  for (int tid = 0; tid < 128; ++tid) {
    const int w = tid / 32, g = (tid % 32) / 4, q = tid % 4;
    for (int i = 0; i < 32; ++i) {
      const int r = 16 * w + g + 8 * ((i / 2) % 2), n = 8 * (i / 4) + 2 * q + i % 2;
      double ref = 0;
      for (int k = 0; k < 16; ++k) ref += a.at(r, k) * b.at(n, k);
      nan_early += std::isnan(early[size_t(tid) * 32 + i]);
      wrong += !(std::fabs(d[size_t(tid) * 32 + i] - ref) <= 1e-5 * (1 + std::fabs(ref)));
    }
  }
  check(nan_early == 128 * 32, "wgmma accumulators readable before wgmma.wait_group");
  check(wrong == 0, "single wgmma: " + std::to_string(wrong) + " elements wrong");

  SingleGemm no_fence;
  no_fence.fence_generic = false;
  single_gemm(no_fence, a, b, early, d);
  int nan_unfenced = 0;
  for (float x : d) nan_unfenced += std::isnan(x);
  check(nan_unfenced == 128 * 32, "wgmma read generic stores that no fence.proxy.async published");

  // Each misuse of a single wgmma, and the abort message the emulator must give for it.
  struct Misuse {
    const char* abort_message;
    void (*break_sequence)(SingleGemm&);
    const char* failure;
  };
  const Misuse misuses[] = {
      {"without a wgmma.fence", [](SingleGemm& o) { o.wgmma_fence = false; },
       "wgmma without wgmma.fence not caught"},
      {"wgmma.mma_async not waited for", [](SingleGemm& o) { o.wait = false; },
       "wgmma never waited for not caught"},
      {"written while a wgmma was in flight", [](SingleGemm& o) { o.write_in_flight = true; },
       "accumulator written in flight not caught"},
  };
  for (const Misuse& misuse : misuses) {
    check(aborts_with(misuse.abort_message,
                      [&] {
                        SingleGemm o;
                        misuse.break_sequence(o);
                        single_gemm(o, a, b, early, d);
                      }),
          misuse.failure);
  }

  // TMA loads: never waited for, expect_tx off by 16 bytes, mbarrier init not fenced.
  const Tensor2d t = random_tensor(8, 64, 64);
  const emu::TensorMap map =
      emu::make_tensor_map_2d(t.bits.data(), 2, 64, 8, 128, 64, 8, emu::TmaSwizzle::k128B);
  auto load = [&](bool wait, uint32_t extra_tx, bool fence) {
    emu::launch(1, 1, 1, 32, 2048, [&](char* smem) {
      uint64_t* bar = reinterpret_cast<uint64_t*>(smem + 1024);
      if (thread_idx() == 0) {
        mbar_init(bar, 1);
        if (fence) fence_proxy_async();
        mbar_arrive_expect_tx(bar, 1024 + extra_tx);
        sm90::tma_load_2d(smem, &map, bar, 0, 0);
        if (wait) mbar_wait(bar, 0);
      }
    });
  };
  load(true, 0, true);  // the correct sequence passes
  check(aborts_with("nobody waited for", [&] { load(false, 0, true); }),
        "TMA load never waited for not caught");
  check(aborts_with("timed out",
                    [&] {
                      emu::wait_timeout_s = 0.2;
                      load(true, 16, true);
                    }),
        "expect_tx mismatch not caught");
  check(aborts_with("no fence.proxy.async made visible", [&] { load(true, 0, false); }),
        "TMA on an unfenced mbarrier init not caught");
  check(aborts_with("different thread counts",
                    [&] {
                      emu::launch(1, 1, 1, 128, 0,
                                  [&](char*) { named_sync(3, thread_idx() < 32 ? 64 : 96); });
                    }),
        "named barrier count mismatch not caught");
}

// ---- TMA tensor reductions ---------------------------------------------------------------------
// A (kTrOuter, kTrHeads, kTrRows, kTrCols) fp32 tensor, rows kTrPitch floats apart, as the 5-D
// tensor (kTrCols, kTrRows, kTrHeads, kTrOuter, 1); one warp adds kTrRounds rounds of one box
// (box_cols x 5 rows x 2 heads) at `origin`, staged with generic stores where the TMA lands
// element i of the box (byte 4 i, swizzled with the 128-byte swizzle), the staging reused after
// wait_group.read. The options break that sequence.
constexpr int kTrCols = 40, kTrPitch = 44, kTrRows = 9, kTrHeads = 3, kTrOuter = 2, kTrRounds = 2;
constexpr int kTrTensorFloats = kTrOuter * kTrHeads * kTrRows * kTrPitch;

struct TensorReduce {
  bool swizzle = false;
  int origin[5] = {36, 6, 2, 1, 0};
  bool wait_before_reuse = true;
  bool fence = true;
  bool final_wait = true;
  bool overwrite_before_wait = false;  // the staging changed (unfenced) after the last issue
  int src_offset = 0;                  // bytes added to the source address
  bool rank4 = false;                  // coordinates given as a 4-D reduction
};

float tr_value(int round, int i) { return static_cast<float>((round * 5 + i * 3) % 13) - 6.f; }

std::vector<float> tensor_reduce_sums(const TensorReduce& o, const std::vector<float>& init) {
  std::vector<float> dst(init);
  const int box_cols = o.swizzle ? 32 : 8;
  const int64_t dims[5] = {kTrCols, kTrRows, kTrHeads, kTrOuter, 1};
  const int64_t strides[4] = {kTrPitch * 4, kTrRows * kTrPitch * 4,
                              kTrHeads * kTrRows * kTrPitch * 4, kTrTensorFloats * 4};
  const int box[5] = {box_cols, 5, 2, 1, 1};
  const emu::TensorMap map =
      emu::make_tensor_map(dst.data(), 4, 5, dims, strides, box,
                           o.swizzle ? emu::TmaSwizzle::k128B : emu::TmaSwizzle::kNone);
  const int box_floats = box_cols * 5 * 2;
  emu::launch(1, 1, 1, 32, 2048 + 1024, [&](char* smem) {
    const int lane = thread_idx() % 32;
    char* staging = smem + 1024 + o.src_offset;
    for (int round = 0; round < kTrRounds; ++round) {
      if (o.wait_before_reuse) bulk_wait_group_read<0>();
      sync_warp();
      for (int i = lane; i < box_floats; i += 32) {
        const uint32_t off = o.swizzle ? swizzle128(4u * i) : 4u * i;
        *reinterpret_cast<float*>(staging + off) = tr_value(round, i);
      }
      if (o.fence) fence_proxy_async();
      sync_warp();
      if (lane == 0) {
        const int* c = o.origin;
        if (o.rank4) {
          const int coords[4] = {c[0], c[1], c[2], c[3]};
          emu::tma_reduce_add_f32(staging, &map, coords, 4);
        } else {
          tma_reduce_add_5d(staging, &map, c[0], c[1], c[2], c[3], c[4]);
        }
        bulk_commit_group();
      }
    }
    if (o.overwrite_before_wait && lane == 0) *reinterpret_cast<float*>(staging) += 1.f;
    if (o.final_wait) bulk_wait_group_read<0>();
  });
  return dst;
}

// The tensor after o's reductions when every round's reduction reads the staging of round
// source_round(round), in float64.
template <class SourceRound>
std::vector<double> tensor_reduce_want(const TensorReduce& o, const std::vector<float>& init,
                                       SourceRound source_round) {
  const int box_cols = o.swizzle ? 32 : 8;
  std::vector<double> want(init.begin(), init.end());
  for (int round = 0; round < kTrRounds; ++round) {
    for (int i = 0; i < box_cols * 5 * 2; ++i) {
      const int col = o.origin[0] + i % box_cols, row = o.origin[1] + (i / box_cols) % 5;
      const int head = o.origin[2] + i / (box_cols * 5), outer = o.origin[3];
      if (col >= kTrCols || row >= kTrRows || head >= kTrHeads) continue;
      want[((outer * kTrHeads + head) * kTrRows + row) * kTrPitch + col] +=
          tr_value(source_round(round), i);
    }
  }
  return want;
}

int elements_wrong(const std::vector<float>& got, const std::vector<double>& want) {
  int wrong = 0;
  for (size_t i = 0; i < got.size(); ++i) wrong += got[i] != static_cast<float>(want[i]);
  return wrong;
}

void test_tensor_reductions() {
  std::vector<float> init(kTrTensorFloats);
  for (size_t i = 0; i < init.size(); ++i) init[i] = 0.25f * static_cast<float>(i % 97);
  for (bool swizzle : {false, true}) {
    TensorReduce o;
    o.swizzle = swizzle;
    const std::vector<double> want = tensor_reduce_want(o, init, [](int round) { return round; });
    const int64_t adds_before = emu::atomic_adds.load();
    const std::vector<float> got = tensor_reduce_sums(o, init);
    const int wrong = elements_wrong(got, want);
    const std::string what = swizzle ? "swizzled" : "unswizzled";
    check(wrong == 0, what + " TMA reductions: " + std::to_string(wrong) + " elements wrong");
    check(got != init, what + " TMA reductions added nothing");
    check(emu::atomic_adds.load() - adds_before == kTrRounds,
          "TMA reductions not counted one per instruction");

    // The staging reused (and fenced) before wait_group.read: every round's reduction reads the
    // last round's box.
    TensorReduce reused = o;
    reused.wait_before_reuse = false;
    const std::vector<double> want_reused =
        tensor_reduce_want(o, init, [](int) { return kTrRounds - 1; });
    const std::vector<float> got_reused = tensor_reduce_sums(reused, init);
    check(elements_wrong(got_reused, want) > 0 && elements_wrong(got_reused, want_reused) == 0,
          what + " TMA reduction source reused before wait_group.read not read at the wait");
  }
  TensorReduce no_fence;
  no_fence.fence = false;
  std::vector<float> zeros(kTrTensorFloats, 0.f);
  check(aborts_with("no fence.proxy.async published", [&] { tensor_reduce_sums(no_fence, zeros); }),
        "TMA reduction of unfenced generic stores not caught");
  TensorReduce never_waited;
  never_waited.final_wait = false;
  check(aborts_with("TMA reductions not waited for",
                    [&] { tensor_reduce_sums(never_waited, zeros); }),
        "TMA reduction never waited for not caught");
  TensorReduce overwritten;
  overwritten.overwrite_before_wait = true;
  check(aborts_with("overwritten before the wait_group.read",
                    [&] { tensor_reduce_sums(overwritten, zeros); }),
        "TMA reduction source overwritten before wait_group.read not caught");
  TensorReduce misaligned;
  misaligned.swizzle = true;
  misaligned.src_offset = 512;
  check(aborts_with("source out of shared memory or misaligned",
                    [&] { tensor_reduce_sums(misaligned, zeros); }),
        "TMA reduction from a swizzled source not 1024-byte aligned not caught");
  TensorReduce rank4;
  rank4.rank4 = true;
  check(aborts_with("another rank", [&] { tensor_reduce_sums(rank4, zeros); }),
        "TMA reduction coordinates of another rank not caught");
}

}  // namespace

int main() {
  test_gemms();
  test_tma_boxes(true);
  test_tma_boxes(false);
  test_tma_pipeline();
  test_hazards();
  test_tensor_reductions();
  if (g_failures == 0) std::printf("test_sm90_emu: all checks passed\n");
  return g_failures == 0 ? 0 : 1;
}
