// Microbenchmark and correctness check of the CPU block-attention kernels (forward, backward).
// For each length L: one query block and one K/V block of L tokens, positions 0..L-1 for both.
// FLOPs: forward 4 * B * H * V * D, backward 2.5x that, where V is the number of visible
// (query, key) pairs (L*L, or L*(L+1)/2 causal).
// With -c 1 the results are checked against a float64 reference computed here (all rows for
// L <= 512, else 64 sampled rows/key columns); the exit status is 1 on a mismatch.
// --dtype bfloat16: bf16 q, k, v, dout with fp32 out, lse and gradients (the kernels' contract).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "bench_cli.h"
#include "bench_cpu.h"
#include "core/params.h"
#include "cpu/block_attn_cpu.h"

using namespace ring_attn;

namespace {

struct Result {
  int64_t len;
  double fwd_ms, fwd_gflops, bwd_ms, bwd_gflops, max_err;
  bool checked, ok;
};

template <typename F>
double time_ms(const bench::Options& opt, F&& f, std::function<void()> reset = nullptr) {
  for (int i = 0; i < opt.warmup; ++i) {
    if (reset) reset();
    f();
  }
  std::vector<double> samples;
  for (int i = 0; i < opt.iters; ++i) {
    if (reset) reset();
    const double start = bench::now_ms(opt.cpu_clock);
    f();
    samples.push_back(bench::now_ms(opt.cpu_clock) - start);
  }
  return bench::summary(samples, opt.stat_min);
}

// Rows (or columns) to check: all when n is small, else a spread sample with both ends.
std::vector<int64_t> sample(int64_t n) {
  std::vector<int64_t> s;
  if (n <= 512) {
    for (int64_t i = 0; i < n; ++i) s.push_back(i);
    return s;
  }
  const int64_t m = 64;
  for (int64_t i = 0; i < m; ++i) s.push_back(i * (n - 1) / (m - 1));
  s.erase(std::unique(s.begin(), s.end()), s.end());
  return s;
}

// T: the dtype of q, k, v, dout; Acc: of out, lse, delta and the gradients.
template <typename T, typename Acc>
Result run_len(const bench::Options& opt, int64_t L) {
  const int64_t B = opt.batch, H = opt.heads, Hkv = opt.nheads_kv(), D = opt.headdim;
  const int64_t G = H / Hkv;
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  const double ninf = -std::numeric_limits<double>::infinity();

  std::mt19937_64 rng(1234 + L);
  std::normal_distribution<double> nd(0.0, 1.0);
  auto randn = [&](int64_t n) {
    std::vector<T> x(static_cast<size_t>(n));
    for (auto& e : x) e = static_cast<T>(static_cast<Acc>(nd(rng)));
    return x;
  };
  // q, dout, out: (B, L, H, D); k, v, dk, dv: (B, L, Hkv, D); lse, delta: (B, H, L)
  std::vector<T> q = randn(B * L * H * D), k = randn(B * L * Hkv * D), v = randn(B * L * Hkv * D),
                 dout = randn(B * L * H * D);
  std::vector<Acc> out(B * L * H * D), lse(B * H * L), delta(B * H * L);
  std::vector<Acc> dq(B * L * H * D), dk(B * L * Hkv * D), dv(B * L * Hkv * D);
  std::vector<int32_t> pos(static_cast<size_t>(L));
  for (int64_t i = 0; i < L; ++i) pos[i] = static_cast<int32_t>(i);

  const DType dt = std::is_same<T, double>::value     ? DType::kFloat64
                   : std::is_same<T, c10::BFloat16>::value ? DType::kBFloat16
                                                         : DType::kFloat32;
  const BlockShape shape{static_cast<int>(B), static_cast<int>(L), static_cast<int>(L),
                         static_cast<int>(H), static_cast<int>(Hkv), static_cast<int>(D)};
  const Strides sq{L * H * D, H * D, D}, skv{L * Hkv * D, Hkv * D, D};
  MaskSpec mask;
  mask.causal = opt.causal;

  BlockFwdParams fp{};
  fp.shape = shape;
  fp.dtype = dt;
  fp.q = q.data(); fp.k = k.data(); fp.v = v.data();
  fp.q_strides = sq; fp.k_strides = skv; fp.v_strides = skv;
  fp.q_pos = pos.data(); fp.k_pos = pos.data();
  fp.mask = mask;
  fp.softmax_scale = scale;
  fp.out_acc = out.data(); fp.out_strides = sq;
  fp.lse = lse.data(); fp.lse_batch_stride = H * L; fp.lse_head_stride = L;

  auto reset_state = [&] {
    std::fill(out.begin(), out.end(), Acc(0));
    std::fill(lse.begin(), lse.end(), static_cast<Acc>(ninf));
  };
  const double fwd_ms = time_ms(opt, [&] { cpu::block_attn_fwd(fp); }, reset_state);
  reset_state();
  cpu::block_attn_fwd(fp);

  // delta = rowsum(dout * out)
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < L; ++i)
      for (int64_t h = 0; h < H; ++h) {
        double s = 0;
        const int64_t o = ((b * L + i) * H + h) * D;
        for (int64_t c = 0; c < D; ++c) s += double(dout[o + c]) * double(out[o + c]);
        delta[(b * H + h) * L + i] = static_cast<Acc>(s);
      }

  BlockBwdParams bp{};
  bp.shape = shape;
  bp.dtype = dt;
  bp.q = q.data(); bp.k = k.data(); bp.v = v.data(); bp.dout = dout.data();
  bp.q_strides = sq; bp.k_strides = skv; bp.v_strides = skv; bp.dout_strides = sq;
  bp.q_pos = pos.data(); bp.k_pos = pos.data();
  bp.mask = mask;
  bp.softmax_scale = scale;
  bp.lse = lse.data(); bp.delta = delta.data();
  bp.row_stat_batch_stride = H * L; bp.row_stat_head_stride = L;
  bp.dq_acc = dq.data(); bp.dk_acc = dk.data(); bp.dv_acc = dv.data();
  bp.dq_strides = sq; bp.dk_strides = skv; bp.dv_strides = skv;

  auto reset_grads = [&] {
    std::fill(dq.begin(), dq.end(), Acc(0));
    std::fill(dk.begin(), dk.end(), Acc(0));
    std::fill(dv.begin(), dv.end(), Acc(0));
  };
  const double bwd_ms =
      opt.run_bwd ? time_ms(opt, [&] { cpu::block_attn_bwd(bp); }, reset_grads) : 0.0;

  double visible = 0;
  for (int64_t i = 0; i < L; ++i) visible += opt.causal ? double(i + 1) : double(L);
  const double fwd_flop = 4.0 * B * H * visible * D;
  Result r{L, fwd_ms, fwd_flop / (fwd_ms * 1e6), bwd_ms,
           opt.run_bwd ? 2.5 * fwd_flop / (bwd_ms * 1e6) : 0.0, 0.0, false, true};
  if (!opt.check || !opt.run_bwd) return r;

  // Clean backward result for the check.
  reset_grads();
  cpu::block_attn_bwd(bp);

  // float64 reference on sampled rows (forward, dq) and key columns (dk, dv). The backward
  // reference takes the kernel's inputs lse and delta as given (that is its contract).
  auto qv = [&](int64_t b, int64_t i, int64_t h) { return &q[((b * L + i) * H + h) * D]; };
  auto dov = [&](int64_t b, int64_t i, int64_t h) { return &dout[((b * L + i) * H + h) * D]; };
  auto kvp = [&](const auto& x, int64_t b, int64_t j, int64_t hk) {
    return &x[((b * L + j) * Hkv + hk) * D];
  };
  auto dot = [&](const T* a, const T* b) {
    double s = 0;
    for (int64_t c = 0; c < D; ++c) s += double(a[c]) * double(b[c]);
    return s;
  };
  auto visible_pair = [&](int64_t i, int64_t j) { return !opt.causal || pos[j] <= pos[i]; };

  double err_o = 0, ref_o = 0, err_lse = 0, err_dq = 0, ref_dq = 0, err_dk = 0, ref_dk = 0,
         err_dv = 0, ref_dv = 0;
  const std::vector<int64_t> rows = sample(L);
  std::vector<double> s(static_cast<size_t>(L)), o(D), g(D);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t hk = h / G;
      for (int64_t i : rows) {
        double m = ninf;
        for (int64_t j = 0; j < L; ++j) {
          s[j] = visible_pair(i, j) ? scale * dot(qv(b, i, h), kvp(k, b, j, hk)) : ninf;
          m = std::max(m, s[j]);
        }
        double l = 0;
        std::fill(o.begin(), o.end(), 0.0);
        for (int64_t j = 0; j < L; ++j) {
          if (s[j] == ninf) continue;
          const double e = std::exp(s[j] - m);
          l += e;
          const T* vj = kvp(v, b, j, hk);
          for (int64_t c = 0; c < D; ++c) o[c] += e * double(vj[c]);
        }
        const double lse_ref = l > 0 ? m + std::log(l) : ninf;
        const Acc* oo = &out[((b * L + i) * H + h) * D];
        for (int64_t c = 0; c < D; ++c) {
          const double ref = l > 0 ? o[c] / l : 0.0;
          err_o = std::max(err_o, std::abs(double(oo[c]) - ref));
          ref_o = std::max(ref_o, std::abs(ref));
        }
        const double lk = double(lse[(b * H + h) * L + i]);
        err_lse = std::max(err_lse, lse_ref == ninf ? (lk == ninf ? 0.0 : 1e30)
                                                    : std::abs(lk - lse_ref) / std::max(1.0, std::abs(lse_ref)));
        // dq_i = scale * sum_j p_ij (dp_ij - delta_i) k_j  with the kernel's lse/delta
        const double li = lk, di = double(delta[(b * H + h) * L + i]);
        std::fill(g.begin(), g.end(), 0.0);
        if (li != ninf) {
          for (int64_t j = 0; j < L; ++j) {
            if (s[j] == ninf) continue;
            const double pij = std::exp(s[j] - li);
            const double dpij = dot(dov(b, i, h), kvp(v, b, j, hk));
            const T* kj = kvp(k, b, j, hk);
            for (int64_t c = 0; c < D; ++c) g[c] += scale * pij * (dpij - di) * double(kj[c]);
          }
        }
        const Acc* dqi = &dq[((b * L + i) * H + h) * D];
        for (int64_t c = 0; c < D; ++c) {
          err_dq = std::max(err_dq, std::abs(double(dqi[c]) - g[c]));
          ref_dq = std::max(ref_dq, std::abs(g[c]));
        }
      }
    }
  // dk_j, dv_j over all query rows of the kv group.
  std::vector<double> gk(D), gv(D);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t hk = 0; hk < Hkv; ++hk)
      for (int64_t j : rows) {
        std::fill(gk.begin(), gk.end(), 0.0);
        std::fill(gv.begin(), gv.end(), 0.0);
        for (int64_t h = hk * G; h < (hk + 1) * G; ++h)
          for (int64_t i = 0; i < L; ++i) {
            if (!visible_pair(i, j)) continue;
            const double li = double(lse[(b * H + h) * L + i]);
            if (li == ninf) continue;
            const double pij = std::exp(scale * dot(qv(b, i, h), kvp(k, b, j, hk)) - li);
            const double dpij = dot(dov(b, i, h), kvp(v, b, j, hk));
            const double dsij = pij * (dpij - double(delta[(b * H + h) * L + i]));
            const T* qi = qv(b, i, h);
            const T* doi = dov(b, i, h);
            for (int64_t c = 0; c < D; ++c) {
              gv[c] += pij * double(doi[c]);
              gk[c] += scale * dsij * double(qi[c]);
            }
          }
        const Acc* dkj = kvp(dk, b, j, hk);
        const Acc* dvj = kvp(dv, b, j, hk);
        for (int64_t c = 0; c < D; ++c) {
          err_dk = std::max(err_dk, std::abs(double(dkj[c]) - gk[c]));
          ref_dk = std::max(ref_dk, std::abs(gk[c]));
          err_dv = std::max(err_dv, std::abs(double(dvj[c]) - gv[c]));
          ref_dv = std::max(ref_dv, std::abs(gv[c]));
        }
      }
  auto rel = [](double e, double r) { return e / std::max(r, 1e-12); };
  r.max_err = std::max({rel(err_o, ref_o), err_lse, rel(err_dq, ref_dq), rel(err_dk, ref_dk),
                        rel(err_dv, ref_dv)});
  for (const std::vector<Acc>* x : {&out, &dq, &dk, &dv})
    for (const Acc e : *x)
      if (!std::isfinite(e)) r.max_err = std::numeric_limits<double>::quiet_NaN();
  // bf16: the kernels round P and dS to bf16 for their products.
  const double tol = std::is_same<T, double>::value ? 1e-10
                     : std::is_same<T, float>::value ? 2e-4
                                                     : 2e-2;
  r.checked = true;
  r.ok = r.max_err <= tol;  // false for NaN
  return r;
}

}  // namespace

int main(int argc, char** argv) try {
  const bench::Options opt = bench::parse(argc, argv);
  bench::check_cpu_environment("bench_block_attn");
  if (opt.threads > 0) at::set_num_threads(opt.threads);

  std::printf("# bench_block_attn: batch %d heads %d kv_heads %d headdim %d causal %d dtype %s threads %d\n",
              opt.batch, opt.heads, opt.nheads_kv(), opt.headdim, int(opt.causal), opt.dtype.c_str(),
              at::get_num_threads());
  std::printf("# %s of %d iters after %d warmup, %s clock, %s kernels; GFLOP/s over visible pairs "
              "(fwd 4*B*H*V*D, bwd 2.5x); one core's measured fp32 FMA peak %.1f GFLOP/s\n",
              opt.stat_min ? "min" : "median", opt.iters, opt.warmup, opt.cpu_clock ? "cpu" : "wall",
              cpu::cpu_kernel_isa(), cpu::fma_peak_gflops(0.2));
  std::printf("%10s %12s %12s %12s %12s %12s %8s\n", "len", "fwd_ms", "fwd_GFLOP/s", "bwd_ms",
              "bwd_GFLOP/s", "max_err", "status");
  std::vector<Result> results;
  bool all_ok = true;
  for (int64_t L : opt.lengths()) {
    const Result r = opt.dtype == "float64"    ? run_len<double, double>(opt, L)
                     : opt.dtype == "bfloat16" ? run_len<c10::BFloat16, float>(opt, L)
                                               : run_len<float, float>(opt, L);
    results.push_back(r);
    all_ok &= r.ok;
    std::printf("%10lld %12.3f %12.2f %12.3f %12.2f %12.3e %8s\n", static_cast<long long>(r.len),
                r.fwd_ms, r.fwd_gflops, r.bwd_ms, r.bwd_gflops, r.max_err,
                !r.checked ? "-" : (r.ok ? "OK" : "FAIL"));
    std::fflush(stdout);
  }
  if (!opt.json.empty()) {
    FILE* f = bench::open_output(opt.json);
    std::fprintf(f,
                 "{\n  \"benchmark\": \"block_attn_cpu\",\n  \"batch\": %d, \"heads\": %d, "
                 "\"kv_heads\": %d, \"headdim\": %d, \"causal\": %s, \"dtype\": \"%s\", "
                 "\"threads\": %d, \"iters\": %d, \"warmup\": %d,\n  \"results\": [\n",
                 opt.batch, opt.heads, opt.nheads_kv(), opt.headdim, opt.causal ? "true" : "false",
                 opt.dtype.c_str(), at::get_num_threads(), opt.iters, opt.warmup);
    for (size_t i = 0; i < results.size(); ++i) {
      const Result& r = results[i];
      std::fprintf(f,
                   "    {\"len\": %lld, \"fwd_ms\": %.6f, \"fwd_gflops\": %.4f, \"bwd_ms\": %.6f, "
                   "\"bwd_gflops\": %.4f, \"max_err\": %.6e, \"checked\": %s, \"ok\": %s}%s\n",
                   static_cast<long long>(r.len), r.fwd_ms, r.fwd_gflops, r.bwd_ms, r.bwd_gflops,
                   r.max_err, r.checked ? "true" : "false", r.ok ? "true" : "false",
                   i + 1 < results.size() ? "," : "");
    }
    std::fprintf(f, "  ]\n}\n");
    std::fclose(f);
  }
  return all_ok ? 0 : 1;
} catch (const std::exception&) {
  return bench::report_failure(argv[0]);
}
