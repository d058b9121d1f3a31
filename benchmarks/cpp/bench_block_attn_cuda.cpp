// Microbenchmark and check of the CUDA block-attention kernels (forward with fused merge, forward
// without it, backward), nccl-tests style (benchmarks/cpp/bench_cli.h). For each length L: one
// query block and one K/V block of L tokens, positions 0..L-1. FLOPs: forward 4 * B * H * V * D,
// backward 2.5x, V = visible pairs (L*L, or L*(L+1)/2 causal). Extra options:
//   --cuda-dtype bf16|fp16   (default bf16; --dtype is the CPU benchmark's and is ignored)
// With -c 1 the results are checked against a float64 host reference on sampled rows and keys of
// batch 0 (out, lse, dq by row; dk, dv by key); exit status 1 on a mismatch. Exit status 77 (a
// skipped test for ctest) when there is no CUDA device.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "bench_cli.h"
#include "core/params.h"
#include "cuda/block_attn_cuda.h"

using namespace ring_attn;

namespace {

#define CHECK_CUDA(x)                                                                  \
  do {                                                                                 \
    const cudaError_t e_ = (x);                                                        \
    if (e_ != cudaSuccess) {                                                           \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      std::exit(1);                                                                    \
    }                                                                                  \
  } while (0)

uint16_t to_half_bits(float f, bool bf16) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (bf16) return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  const _Float16 h = static_cast<_Float16>(f);
  uint16_t r;
  std::memcpy(&r, &h, 2);
  return r;
}
float from_half_bits(uint16_t b, bool bf16) {
  if (bf16) {
    const uint32_t u = static_cast<uint32_t>(b) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  _Float16 h;
  std::memcpy(&h, &b, 2);
  return static_cast<float>(h);
}

template <typename T>
T* device_copy(const std::vector<T>& h) {
  T* d = nullptr;
  CHECK_CUDA(cudaMalloc(reinterpret_cast<void**>(&d), h.size() * sizeof(T)));
  CHECK_CUDA(cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}
template <typename T>
std::vector<T> host_copy(const T* d, size_t n) {
  std::vector<T> h(n);
  CHECK_CUDA(cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost));
  return h;
}

template <typename F>
double time_ms(int warmup, int iters, F&& f) {
  for (int i = 0; i < warmup; ++i) f();
  cudaEvent_t a, b;
  CHECK_CUDA(cudaEventCreate(&a));
  CHECK_CUDA(cudaEventCreate(&b));
  std::vector<float> t;
  for (int i = 0; i < iters; ++i) {
    CHECK_CUDA(cudaEventRecord(a));
    f();
    CHECK_CUDA(cudaEventRecord(b));
    CHECK_CUDA(cudaEventSynchronize(b));
    float ms = 0;
    CHECK_CUDA(cudaEventElapsedTime(&ms, a, b));
    t.push_back(ms);
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

// Exits with the kernel's message when a launch returned an error code.
void exit_on_launch_error(const char* what, int error) {
  if (error != 0) {
    std::fprintf(stderr, "%s launch: %s\n", what, cuda::error_string(error));
    std::exit(1);
  }
}

std::vector<int64_t> sample(int64_t n) {
  std::vector<int64_t> s;
  const int64_t m = std::min<int64_t>(n, 24);
  for (int64_t i = 0; i < m; ++i) s.push_back(m == 1 ? 0 : i * (n - 1) / (m - 1));
  s.erase(std::unique(s.begin(), s.end()), s.end());
  return s;
}

struct Result {
  double fwd_ms, fwd_nomerge_ms, bwd_ms, max_err;
  bool ok;
};

Result run_len(const bench::Options& opt, bool bf16, int64_t L) {
  const int B = opt.batch, H = opt.heads, Hkv = opt.nheads_kv(), D = opt.headdim, G = H / Hkv;
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  std::mt19937_64 rng(4321 + L);
  std::normal_distribution<float> nd(0.f, 1.f);
  auto randh = [&](size_t n, std::vector<float>* vals) {
    std::vector<uint16_t> bits(n);
    vals->resize(n);
    for (size_t i = 0; i < n; ++i) {
      bits[i] = to_half_bits(nd(rng), bf16);
      (*vals)[i] = from_half_bits(bits[i], bf16);
    }
    return bits;
  };
  const size_t nq = size_t(B) * L * H * D, nk = size_t(B) * L * Hkv * D, nl = size_t(B) * H * L;
  std::vector<float> qv, kv, vv, ov;
  uint16_t* q = device_copy(randh(nq, &qv));
  uint16_t* k = device_copy(randh(nk, &kv));
  uint16_t* v = device_copy(randh(nk, &vv));
  uint16_t* dout = device_copy(randh(nq, &ov));
  std::vector<int32_t> pos(L);
  for (int64_t i = 0; i < L; ++i) pos[i] = static_cast<int32_t>(i);
  int32_t* d_pos = device_copy(pos);
  float* out = device_copy(std::vector<float>(nq, 0.f));
  float* lse = device_copy(std::vector<float>(nl, -std::numeric_limits<float>::infinity()));
  float* dq = device_copy(std::vector<float>(nq, 0.f));
  float* dk = device_copy(std::vector<float>(nk, 0.f));
  float* dv = device_copy(std::vector<float>(nk, 0.f));

  const Strides sq{int64_t(L) * H * D, int64_t(H) * D, D}, sk{int64_t(L) * Hkv * D, int64_t(Hkv) * D, D};
  // q, k and v self-attention over positions 0 .. L-1, the forward's and the backward's.
  const BlockParams attention{.shape = BlockShape{B, int(L), int(L), H, Hkv, D},
                              .dtype = bf16 ? DType::kBFloat16 : DType::kFloat16,
                              .q = q, .k = k, .v = v,
                              .q_strides = sq, .k_strides = sk, .v_strides = sk,
                              .q_pos = d_pos, .k_pos = d_pos, .q_seg = nullptr,
                              .mask = MaskSpec{.causal = opt.causal},
                              .softmax_scale = scale};
  BlockFwdParams fp{};
  static_cast<BlockParams&>(fp) = attention;
  fp.out_acc = out;
  fp.out_strides = sq;
  fp.lse = lse;
  fp.lse_batch_stride = int64_t(H) * L;
  fp.lse_head_stride = L;
  const std::string unsupported = cuda::support_error(fp.dtype, fp.shape);
  if (!unsupported.empty()) {
    std::fprintf(stderr, "%s\n", unsupported.c_str());
    std::exit(2);
  }
  auto launch_fwd = [&](bool merge) {
    exit_on_launch_error("forward", cuda::block_fwd(cuda::FwdArgs{fp, merge}, nullptr));
  };

  Result r{};
  r.fwd_ms = time_ms(opt.warmup, opt.iters, [&] { launch_fwd(true); });
  r.fwd_nomerge_ms = time_ms(opt.warmup, opt.iters, [&] { launch_fwd(false); });
  launch_fwd(false);  // out, lse = attention of the block
  CHECK_CUDA(cudaDeviceSynchronize());
  const std::vector<float> out_h = host_copy(out, nq), lse_h = host_copy(lse, nl);

  std::vector<float> delta(nl);
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h)
      for (int64_t i = 0; i < L; ++i) {
        double s = 0;
        for (int d = 0; d < D; ++d) {
          const size_t o = ((size_t(b) * L + i) * H + h) * D + d;
          s += double(ov[o]) * out_h[o];
        }
        delta[(size_t(b) * H + h) * L + i] = float(s);
      }
  float* d_delta = device_copy(delta);
  BlockBwdParams bp{};
  static_cast<BlockParams&>(bp) = attention;
  bp.dout = dout;
  bp.dout_strides = sq;
  bp.lse = lse;
  bp.delta = d_delta;
  bp.row_stat_batch_stride = fp.lse_batch_stride;
  bp.row_stat_head_stride = fp.lse_head_stride;
  bp.dq_acc = dq;
  bp.dk_acc = dk;
  bp.dv_acc = dv;
  bp.dq_strides = sq;
  bp.dk_strides = sk;
  bp.dv_strides = sk;
  auto launch_bwd = [&] { exit_on_launch_error("backward", cuda::block_bwd(bp, nullptr)); };
  r.bwd_ms = time_ms(opt.warmup, opt.iters, launch_bwd);

  r.ok = true;
  if (opt.check) {
    CHECK_CUDA(cudaMemset(dq, 0, nq * 4));
    CHECK_CUDA(cudaMemset(dk, 0, nk * 4));
    CHECK_CUDA(cudaMemset(dv, 0, nk * 4));
    launch_bwd();
    CHECK_CUDA(cudaDeviceSynchronize());
    const std::vector<float> dq_h = host_copy(dq, nq), dk_h = host_copy(dk, nk), dv_h = host_copy(dv, nk);
    auto qat = [&](const std::vector<float>& x, int64_t i, int h, int d) { return double(x[(size_t(i) * H + h) * D + d]); };
    auto kat = [&](const std::vector<float>& x, int64_t j, int hk, int d) { return double(x[(size_t(j) * Hkv + hk) * D + d]); };
    auto visible = [&](int64_t i, int64_t j) { return !opt.causal || j <= i; };
    auto score = [&](int64_t i, int64_t j, int h) {
      double s = 0;
      for (int d = 0; d < D; ++d) s += qat(qv, i, h, d) * kat(kv, j, h / G, d);
      return s * scale;
    };
    // batch 0: lse and p from the float64 scores; rows/keys sampled
    double err = 0, mag = 1;
    for (int h = 0; h < H; ++h) {
      for (int64_t i : sample(L)) {
        double m = -1e300, l = 0;
        std::vector<double> s(L);
        for (int64_t j = 0; j < L; ++j) {
          s[j] = visible(i, j) ? score(i, j, h) : -INFINITY;
          m = std::max(m, s[j]);
        }
        for (int64_t j = 0; j < L; ++j) l += visible(i, j) ? std::exp(s[j] - m) : 0;
        const double lse_ref = m + std::log(l);
        err = std::max(err, std::abs(lse_ref - lse_h[size_t(h) * L + i]));
        std::vector<double> pr(L, 0.0), ds(L, 0.0);
        for (int64_t j = 0; j < L; ++j) {
          if (!visible(i, j)) continue;
          pr[j] = std::exp(s[j] - lse_ref);
          double dp = 0;
          for (int e = 0; e < D; ++e) dp += qat(ov, i, h, e) * kat(vv, j, h / G, e);
          ds[j] = pr[j] * (dp - delta[size_t(h) * L + i]);
        }
        for (int d = 0; d < D; ++d) {
          double o = 0, g = 0;
          for (int64_t j = 0; j < L; ++j) {
            o += pr[j] * kat(vv, j, h / G, d);
            g += ds[j] * kat(kv, j, h / G, d) * scale;
          }
          mag = std::max({mag, std::abs(o), std::abs(g)});
          err = std::max({err, std::abs(o - qat(out_h, i, h, d)), std::abs(g - qat(dq_h, i, h, d))});
        }
      }
    }
    for (int hk = 0; hk < Hkv; ++hk) {
      for (int64_t j : sample(L)) {
        std::vector<double> gk(D, 0.0), gv(D, 0.0);
        for (int gq = 0; gq < G; ++gq) {
          const int h = hk * G + gq;
          for (int64_t i = 0; i < L; ++i) {
            if (!visible(i, j)) continue;
            const double p = std::exp(score(i, j, h) - lse_h[size_t(h) * L + i]);
            double dp = 0;
            for (int e = 0; e < D; ++e) dp += qat(ov, i, h, e) * kat(vv, j, hk, e);
            const double ds = p * (dp - delta[size_t(h) * L + i]);
            for (int d = 0; d < D; ++d) {
              gk[d] += ds * qat(qv, i, h, d) * scale;
              gv[d] += p * qat(ov, i, h, d);
            }
          }
        }
        for (int d = 0; d < D; ++d) {
          mag = std::max({mag, std::abs(gk[d]), std::abs(gv[d])});
          err = std::max({err, std::abs(gk[d] - kat(dk_h, j, hk, d)), std::abs(gv[d] - kat(dv_h, j, hk, d))});
        }
      }
    }
    r.max_err = err / mag;
    r.ok = r.max_err <= (bf16 ? 5e-2 : 1e-2);
  }
  for (void* p : {(void*)q, (void*)k, (void*)v, (void*)dout, (void*)d_pos, (void*)out, (void*)lse,
                  (void*)dq, (void*)dk, (void*)dv, (void*)d_delta})
    cudaFree(p);
  return r;
}

}  // namespace

int main(int argc, char** argv) try {
  bool bf16 = true;
  const bench::Options opt = bench::parse(
      argc, argv,
      [&](const char* name, const char* val) {
        if (std::strcmp(name, "--cuda-dtype") == 0 && val) {
          const std::string dtype =
              bench::one_of("--cuda-dtype", val, {"bf16", "fp16", "bfloat16", "float16"});
          bf16 = dtype == "bf16" || dtype == "bfloat16";
          return 2;
        }
        return 0;
      },
      "      --cuda-dtype T   bf16 | fp16                                  [bf16]\n"
      "  (--dtype, --threads, --clock, --stat, --fwd-only, --json: CPU benchmarks only)\n");
  if (opt.dtype != "float32" || opt.threads != 0 || opt.cpu_clock || opt.stat_min || !opt.run_bwd ||
      !opt.json.empty()) {
    bench::usage_error("bench_block_attn_cuda: --dtype, --threads, --clock, --stat, --fwd-only and "
                       "--json are the CPU benchmarks' options (the dtype here is --cuda-dtype)");
  }
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    std::printf("bench_block_attn_cuda: no CUDA device, skipping\n");
    return 77;
  }
  std::printf("# CUDA block attention: %s, B=%d H=%d Hkv=%d D=%d causal=%d\n", bf16 ? "bf16" : "fp16",
              opt.batch, opt.heads, opt.nheads_kv(), opt.headdim, int(opt.causal));
  std::printf("%10s %12s %10s %14s %10s %12s %10s %10s %6s\n", "len", "fwd_ms", "fwd_TF/s",
              "fwd_nomerge_ms", "merge_%", "bwd_ms", "bwd_TF/s", "max_err", "check");
  bool all_ok = true;
  for (int64_t L : opt.lengths()) {
    const Result r = run_len(opt, bf16, L);
    const double vis = opt.causal ? double(L) * (L + 1) / 2 : double(L) * L;
    const double flops = 4.0 * opt.batch * opt.heads * vis * opt.headdim;
    std::printf("%10lld %12.4f %10.1f %14.4f %10.2f %12.4f %10.1f %10.2e %6s\n", (long long)L,
                r.fwd_ms, flops / r.fwd_ms / 1e9, r.fwd_nomerge_ms,
                (r.fwd_ms - r.fwd_nomerge_ms) / r.fwd_nomerge_ms * 100, r.bwd_ms,
                2.5 * flops / r.bwd_ms / 1e9, opt.check ? r.max_err : 0.0,
                opt.check ? (r.ok ? "ok" : "FAIL") : "-");
    all_ok = all_ok && r.ok;
  }
  return all_ok ? 0 : 1;
} catch (const std::exception& e) {  // e.g. sizes beyond the device's memory: one line, no abort
  std::fprintf(stderr, "%s: %s\n", argv[0], e.what());
  return 1;
}
