// Ring attention microbenchmark on the CPU: W virtual ranks in this process run the ring schedule
// (core/ring_scheduler.h) over an in-memory transport whose exchanges are memcpys on a helper
// thread, overlapped with the block kernels (csrc/cpu) on the calling thread, as the real ring
// overlaps its transport with compute. nccl-tests style CLI (bench_cli.h) plus -W/--world.
//
// Lengths are tokens per rank (contiguous layout: rank r holds tokens [r*L, (r+1)*L)). For each
// length it reports, forward and backward:
//   step_ms     ring time / ring steps (all W ranks' work of a step)
//   compute_ms  the same steps' kernels alone, per step
//   xchg_ms     the same steps' exchanges alone, per step
//   hidden      fraction of the exchange time hidden under compute:
//               clamp((compute + exchange - ring) / exchange, 0, 1)
// -c 1 checks every rank's out, lse, dq, dk, dv against a world-size-1 run of the same data
// through the same kernels (relative max error; exit status 1 when above the tolerance).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <string>
#include <thread>
#include <vector>

#include "bench_cli.h"
#include "bindings/tensor_params.h"
#include "core/ring_scheduler.h"
#include "cpu/block_attn_cpu.h"

using namespace ring_attn;

namespace {

using Clock = std::chrono::steady_clock;
double ms_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

// Copies of whole tensors (same shape, contiguous) on the exchange thread: raw memcpy, so that it
// never enters the intra-op thread pool the kernels use.
struct Copy {
  at::Tensor dst, src;
};
void run_copies(const std::vector<Copy>& copies) {
  for (const Copy& c : copies) std::memcpy(c.dst.data_ptr(), c.src.data_ptr(), c.src.nbytes());
}

// What a run measures: total ring time, kernels alone, exchanges alone (milliseconds).
struct Timing {
  double ring = 0, compute = 0, exchange = 0;
};

struct Ring {
  int W;
  int64_t B, L, H, Hkv, D;
  bool causal;
  double scale;
  at::ScalarType dtype;
  std::vector<at::Tensor> q, kv, dout, pos;  // per rank; kv packed (2, B, L, Hkv, D)
  // Forward state and results.
  std::vector<at::Tensor> out, lse, delta;
  // Double buffers.
  std::vector<at::Tensor> kv_buf[2], grad[2], grad_recv, dq;

  bool needed(int r, int s) const { return !causal || s <= r; }
  int source(int r, int t) const { return mod(r - t, W); }
  const at::Tensor& kv_at(int r, int t) const { return t == 0 ? kv[r] : kv_buf[t % 2][r]; }

  void alloc() {
    for (int i = 0; i < 2; ++i) {
      kv_buf[i].resize(W);
      grad[i].resize(W);
    }
    grad_recv.resize(W);
    out.resize(W);
    lse.resize(W);
    delta.resize(W);
    dq.resize(W);
    const at::ScalarType acc = acc_dtype(dtype);
    for (int r = 0; r < W; ++r) {
      for (int i = 0; i < 2; ++i) {
        kv_buf[i][r] = at::empty_like(kv[r]);
        grad[i][r] = at::empty_like(kv[r], acc);
      }
      grad_recv[r] = at::empty_like(kv[r], acc);
    }
  }

  // K/V exchange bringing step t+1's block: rank r receives what r-1 holds at step t.
  std::vector<Copy> kv_copies(int t) const {
    std::vector<Copy> c;
    for (int r = 0; r < W; ++r) c.push_back({kv_buf[(t + 1) % 2][r], kv_at(mod(r - 1, W), t)});
    return c;
  }
  // dK/dV exchange during step t: rank r receives the sum r-1 finished at step t-1.
  std::vector<Copy> grad_copies(int t) const {
    std::vector<Copy> c;
    for (int r = 0; r < W; ++r) c.push_back({grad_recv[r], grad[(t - 1) % 2][mod(r - 1, W)]});
    return c;
  }

  // Runs one ring pass. mode: 0 = ring (exchange overlapped with compute), 1 = compute only,
  // 2 = exchange only. Returns the elapsed milliseconds.
  double forward(int mode) {
    const at::ScalarType acc = acc_dtype(dtype);
    for (int r = 0; r < W; ++r) {
      out[r] = at::zeros({B, L, H, D}, q[r].options().dtype(acc));
      lse[r] = at::full({B, H, L}, -std::numeric_limits<double>::infinity(),
                        q[r].options().dtype(acc));
    }
    const auto t0 = Clock::now();
    for (int t = 0; t < W; ++t) {
      std::thread xchg;
      if (t + 1 < W && mode != 1) xchg = std::thread(run_copies, kv_copies(t));
      if (mode != 2) {
        for (int r = 0; r < W; ++r) {
          const int s = source(r, t);
          if (!needed(r, s)) continue;
          const at::Tensor& b = kv_at(r, t);
          cpu::block_attn_fwd(make_fwd_params(q[r], b[0], b[1], pos[r], pos[s], out[r], lse[r],
                                              causal, scale));
        }
      }
      if (xchg.joinable()) xchg.join();
    }
    return ms_since(t0);
  }

  double backward(int mode) {
    const at::ScalarType acc = acc_dtype(dtype);
    for (int r = 0; r < W; ++r) {
      dq[r] = at::zeros({B, L, H, D}, q[r].options().dtype(acc));
      delta[r] = (dout[r].to(acc) * out[r]).sum(-1).transpose(1, 2).contiguous();
    }
    const auto t0 = Clock::now();
    for (int t = 0; t < W; ++t) {
      std::thread xchg;
      if (mode != 1) {
        std::vector<Copy> copies;
        if (t + 1 < W) copies = kv_copies(t);
        if (t > 0) {
          auto g = grad_copies(t);
          copies.insert(copies.end(), g.begin(), g.end());
        }
        xchg = std::thread(run_copies, std::move(copies));
      }
      if (mode != 2) {
        for (int r = 0; r < W; ++r) {
          at::Tensor& g = grad[t % 2][r];
          g.zero_();
          const int s = source(r, t);
          if (!needed(r, s)) continue;
          const at::Tensor& b = kv_at(r, t);
          cpu::block_attn_bwd(make_bwd_params(dout[r], q[r], b[0], b[1], pos[r], pos[s], lse[r],
                                              delta[r], dq[r], g[0], g[1], causal, scale));
        }
      }
      if (xchg.joinable()) xchg.join();
      if (t > 0 && mode != 2) {
        for (int r = 0; r < W; ++r) grad[t % 2][r].add_(grad_recv[r]);
      }
    }
    // The last hop brings every block's dK/dV home.
    if (mode != 1) run_copies(grad_copies(W));
    if (mode == 1) {  // keep the result usable for checks: nothing travelled
      for (int r = 0; r < W; ++r) grad_recv[r].copy_(grad[(W - 1) % 2][r]);
    }
    return ms_since(t0);
  }
};

Ring make_ring(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
               const at::Tensor& dout, int W, bool causal, double scale) {
  Ring ring;
  ring.W = W;
  ring.B = q.size(0);
  ring.L = q.size(1) / W;
  ring.H = q.size(2);
  ring.Hkv = k.size(2);
  ring.D = q.size(3);
  ring.causal = causal;
  ring.scale = scale;
  ring.dtype = q.scalar_type();
  for (int r = 0; r < W; ++r) {
    const int64_t a = r * ring.L;
    ring.q.push_back(q.narrow(1, a, ring.L).contiguous());
    ring.dout.push_back(dout.narrow(1, a, ring.L).contiguous());
    at::Tensor kv = at::empty({2, ring.B, ring.L, ring.Hkv, ring.D}, k.options());
    kv[0].copy_(k.narrow(1, a, ring.L));
    kv[1].copy_(v.narrow(1, a, ring.L));
    ring.kv.push_back(kv);
    ring.pos.push_back(at::arange(a, a + ring.L, at::kInt));
  }
  ring.alloc();
  return ring;
}

double rel_err(const at::Tensor& got, const at::Tensor& want) {
  const at::Tensor g = got.to(at::kDouble), w = want.to(at::kDouble);
  const at::Tensor finite = at::isfinite(w);
  const double scale = std::max(1.0, at::where(finite, w.abs(), 0.0).max().item<double>());
  return at::where(finite, (g - w).abs(), 0.0).max().item<double>() / scale;
}

double median_or_min(std::vector<double> v, bool use_min) {
  std::sort(v.begin(), v.end());
  return use_min ? v.front() : v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  int world = 4;
  const bench::Options opt = bench::parse(
      argc, argv,
      [&](const char* name, const char* value) {
        const std::string n = name;
        if ((n == "-W" || n == "--world") && value) {
          world = std::atoi(value);
          return 2;
        }
        return 0;
      },
      "  -W, --world W        virtual ranks in the ring                    [4]\n");
  if (world < 1) {
    std::fprintf(stderr, "--world must be >= 1\n");
    return 2;
  }
  if (opt.threads > 0) at::set_num_threads(opt.threads);
  const at::ScalarType dtype = opt.dtype == "float64" ? at::kDouble : at::kFloat;
  const double tol = dtype == at::kDouble ? 1e-10 : 2e-4;

  std::printf("# bench_ring: world %d, batch %d, heads %d/%d, headdim %d, %s, %s, %d threads, "
              "kernel %s\n",
              world, opt.batch, opt.heads, opt.nheads_kv(), opt.headdim, opt.dtype.c_str(),
              opt.causal ? "causal" : "full", at::get_num_threads(), cpu::cpu_kernel_isa());
  std::printf("# %8s %5s | %9s %10s %9s %7s | %9s %10s %9s %7s | %9s\n", "L/rank", "steps",
              "fwd_step", "fwd_comp", "fwd_xchg", "hidden", "bwd_step", "bwd_comp", "bwd_xchg",
              "hidden", "max_err");
  bool ok = true;
  std::string json = "[";
  for (const int64_t L : opt.lengths()) {
    at::manual_seed(L);
    const int64_t S = L * world;
    const auto options = at::TensorOptions().dtype(dtype);
    at::Tensor q = at::randn({opt.batch, S, opt.heads, opt.headdim}, options);
    at::Tensor k = at::randn({opt.batch, S, opt.nheads_kv(), opt.headdim}, options);
    at::Tensor v = at::randn({opt.batch, S, opt.nheads_kv(), opt.headdim}, options);
    at::Tensor dout = at::randn({opt.batch, S, opt.heads, opt.headdim}, options);
    const double scale = 1.0 / std::sqrt(static_cast<double>(opt.headdim));
    Ring ring = make_ring(q, k, v, dout, world, opt.causal, scale);

    Timing fwd, bwd;
    std::vector<double> samples[6];
    for (int it = 0; it < opt.warmup + opt.iters; ++it) {
      const double values[6] = {ring.forward(0), ring.forward(1), ring.forward(2),
                                opt.run_bwd ? (ring.forward(0), ring.backward(0)) : 0.0,
                                opt.run_bwd ? ring.backward(1) : 0.0,
                                opt.run_bwd ? ring.backward(2) : 0.0};
      if (it >= opt.warmup) {
        for (int i = 0; i < 6; ++i) samples[i].push_back(values[i]);
      }
    }
    double m[6];
    for (int i = 0; i < 6; ++i) m[i] = median_or_min(samples[i], opt.stat_min) / world;
    auto hidden = [](double ring_ms, double comp, double xchg) {
      if (xchg <= 0) return 1.0;
      return std::clamp((comp + xchg - ring_ms) / xchg, 0.0, 1.0);
    };

    double err = 0;
    if (opt.check) {
      ring.forward(0);
      if (opt.run_bwd) ring.backward(0);
      Ring solo = make_ring(q, k, v, dout, 1, opt.causal, scale);
      solo.forward(1);
      if (opt.run_bwd) solo.backward(1);
      for (int r = 0; r < world; ++r) {
        const int64_t a = r * L;
        err = std::max(err, rel_err(ring.out[r], solo.out[0].narrow(1, a, L)));
        err = std::max(err, rel_err(ring.lse[r], solo.lse[0].narrow(2, a, L)));
        if (opt.run_bwd) {
          err = std::max(err, rel_err(ring.dq[r], solo.dq[0].narrow(1, a, L)));
          // Rank r's own dK/dV came home in grad_recv[r].
          err = std::max(err, rel_err(ring.grad_recv[r], solo.grad_recv[0].narrow(2, a, L)));
        }
      }
      if (!(err <= tol)) ok = false;
    }
    std::printf("  %8lld %5d | %9.3f %10.3f %9.3f %7.3f | %9.3f %10.3f %9.3f %7.3f | %9.2e%s\n",
                static_cast<long long>(L), world, m[0], m[1], m[2], hidden(m[0], m[1], m[2]),
                m[3], m[4], m[5], opt.run_bwd ? hidden(m[3], m[4], m[5]) : 0.0, err,
                opt.check ? (err <= tol ? "" : "  FAIL") : "  (unchecked)");
    char buf[512];
    std::snprintf(buf, sizeof(buf),
                  "%s{\"len_per_rank\": %lld, \"world\": %d, \"fwd_step_ms\": %.6f, "
                  "\"fwd_compute_ms\": %.6f, \"fwd_exchange_ms\": %.6f, \"bwd_step_ms\": %.6f, "
                  "\"bwd_compute_ms\": %.6f, \"bwd_exchange_ms\": %.6f, \"max_err\": %.3e}",
                  json.size() > 1 ? ", " : "", static_cast<long long>(L), world, m[0], m[1], m[2],
                  m[3], m[4], m[5], err);
    json += buf;
  }
  json += "]\n";
  if (!opt.json.empty()) {
    if (FILE* f = std::fopen(opt.json.c_str(), "w")) {
      std::fputs(json.c_str(), f);
      std::fclose(f);
    }
  }
  std::printf("# %s\n", opt.check ? (ok ? "check passed" : "CHECK FAILED") : "no check");
  return ok ? 0 : 1;
}
