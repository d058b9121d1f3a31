// Ring attention microbenchmark on the CPU: the library's own ring for W virtual ranks in this
// process. Each rank runs the core scheduler (core/ring_scheduler.h) over the tensor block ops and
// buffers of a ring call (bindings/tensor_block_ops.h) with the CPU kernels (csrc/cpu), all ranks
// driven in lockstep from this thread as LocalRing drives them (run_lockstep). The transport is in
// memory (core/local_exchanges.h): each hop is a memcpy on a helper thread, overlapped with the
// kernels on this thread, as a real transport overlaps its exchanges with compute.
// nccl-tests style CLI (bench_cli.h) plus -W/--world.
//
// Lengths are tokens per rank (contiguous layout: rank r holds tokens [r*L, (r+1)*L)). For each
// length it reports, forward and backward:
//   step_ms     ring time / ring steps (all W ranks' work of a step)
//   compute_ms  the same ring whose exchanges move nothing: the kernels alone, per step
//   xchg_ms     the same ring whose blocks compute nothing: the exchanges alone, per step
//   hidden      fraction of the exchange time hidden under compute:
//               clamp((compute + exchange - ring) / exchange, 0, 1)
// -c 1 checks every rank's out, lse, dq, dk, dv against the same data at world size 1 in float64
// (relative max error; exit status 1 when above the tolerance).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <deque>
#include <future>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "bench_cli.h"
#include "bench_cpu.h"
#include "bindings/tensor_block_ops.h"
#include "core/local_exchanges.h"
#include "core/ring_scheduler.h"
#include "cpu/block_attn_cpu.h"

using namespace ring_attn;

namespace {

const BlockKernels kCpuKernels{&cpu::block_attn_fwd, &cpu::block_attn_bwd, &cpu::check_environment};

// Runs memcpys on one helper thread, in the order they were queued: never in the intra-op thread
// pool that the kernels use.
class CopyThread {
 public:
  CopyThread() : thread_([this] { run(); }) {}
  ~CopyThread() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
    }
    wake_.notify_one();
    thread_.join();
  }

  // Queues a copy of `bytes` bytes; the future is ready once it is done.
  std::shared_future<void> copy(void* dst, const void* src, size_t bytes) {
    std::packaged_task<void()> task([=] { std::memcpy(dst, src, bytes); });
    std::shared_future<void> done = task.get_future().share();
    {
      std::lock_guard<std::mutex> lock(mutex_);
      queue_.push_back(std::move(task));
    }
    wake_.notify_one();
    return done;
  }

 private:
  void run() {
    for (;;) {
      std::packaged_task<void()> task;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
        if (queue_.empty()) return;
        task = std::move(queue_.front());
        queue_.pop_front();
      }
      task();
    }
  }

  std::mutex mutex_;
  std::condition_variable wake_;
  std::deque<std::packaged_task<void()>> queue_;
  bool stopping_ = false;
  std::thread thread_;  // last: starts once the members it uses exist
};

// What a rank's post of an exchange leaves for the copies and the wait.
struct PostedSlots {
  at::Tensor send, recv;
  std::shared_future<void> in_done, out_done;  // the copies into recv and out of send
};

// In-memory exchanges between the virtual ranks, copied on the helper thread.
class CopyThreadHub {
 public:
  explicit CopyThreadHub(int world) : exchanges_(world) {}
  int world() const { return exchanges_.world(); }

  void post(int rank, const Exchange& exchange, const std::vector<at::Tensor>& slots) {
    PostedSlots mine;
    if (exchange.sends()) mine.send = slots.at(exchange.send_slot);
    if (exchange.receives()) mine.recv = slots.at(exchange.recv_slot);
    exchanges_.post(rank, exchange, std::move(mine),
                    [this](PostedSlots& from, PostedSlots& to, int /*receiver*/) {
                      const std::shared_future<void> done =
                          copier_.copy(to.recv.data_ptr(), from.send.data_ptr(), from.send.nbytes());
                      to.in_done = done;
                      from.out_done = done;
                    });
  }

  void wait(int rank, const Exchange& exchange) {
    const auto done = exchanges_.complete(rank, exchange);
    if (!done) throw std::logic_error("bench_ring: a wait for an exchange that was never posted");
    if (done->receives) done->posted.in_done.wait();
    if (done->sends) done->posted.out_done.wait();
  }

 private:
  LocalExchanges<PostedSlots> exchanges_;
  CopyThread copier_;
};

using CopyThreadTransport = HubTransport<CopyThreadHub, std::vector<at::Tensor>>;

// Exchanges that move nothing (the kernels alone; world size 1).
class NoExchange final : public Transport {
 public:
  NoExchange(int rank, int world) : rank_(rank), world_(world) {}
  int rank() const override { return rank_; }
  int world_size() const override { return world_; }
  void post(const Exchange&) override {}
  void wait(const Exchange&) override {}

 private:
  int rank_, world_;
};

// Blocks that compute nothing (the exchanges alone), needed as in the rank's ring.
class NoCompute final : public BlockOps {
 public:
  explicit NoCompute(const RingContext& ring) : ring_(ring) {}  // `ring` must outlive this
  bool is_needed(int source) const override { return ring_.needs(ring_.rank, source); }
  void forward(int, int) override {}
  void backward(int, int, int) override {}
  void zero_grad(int) override {}
  void add_grad(int, int) override {}

 private:
  const RingContext& ring_;
};

enum class Mode { kRing, kComputeOnly, kExchangeOnly };

// The receive slots hold what a hop would have brought (the own K/V; zero dK/dV), for a ring whose
// exchanges move nothing.
void fill_receive_slots(std::vector<at::Tensor>& slots, const TensorBlockOps& ops) {
  for (int i = slot::kKVRecv0; i < slot::kKVRecv0 + 2; ++i) {
    if (!slots[i].defined()) continue;
    slots[i][0].copy_(ops.own_k);
    slots[i][1].copy_(ops.own_v);
  }
  for (int i : {slot::kGradAcc0, slot::kGradAcc0 + 1, slot::kGradRecv0, slot::kGradRecv0 + 1,
                slot::kGradHomeRecv}) {
    if (slots[i].defined()) slots[i].zero_();
  }
}

// One ring pass of every rank (RankForward with RingForward, or RankBackward with RingBackward);
// returns its milliseconds. The ranks are built before the clock starts.
template <typename Schedule, typename Rank>
double run_ring(std::vector<std::unique_ptr<Rank>>& ranks, Mode mode, bool cpu_clock) {
  const int world = static_cast<int>(ranks.size());
  CopyThreadHub hub(world);
  std::vector<std::unique_ptr<NoCompute>> no_compute;
  std::vector<std::unique_ptr<Transport>> transports;
  std::vector<Schedule> schedules;
  for (int r = 0; r < world; ++r) {
    if (mode == Mode::kComputeOnly) {
      fill_receive_slots(ranks[r]->slots, ranks[r]->ops);
      transports.push_back(std::make_unique<NoExchange>(r, world));
    } else {
      transports.push_back(std::make_unique<CopyThreadTransport>(hub, r, ranks[r]->slots));
    }
    no_compute.push_back(std::make_unique<NoCompute>(ranks[r]->ring));
    BlockOps& ops = mode == Mode::kExchangeOnly ? static_cast<BlockOps&>(*no_compute[r])
                                                : ranks[r]->ops;
    schedules.emplace_back(*transports[r], ops, ranks[r]->ring.reaches);
  }
  const double start = bench::now_ms(cpu_clock);
  run_lockstep(schedules);
  return bench::now_ms(cpu_clock) - start;
}

// Every rank's shard of the whole inputs (contiguous layout) and its results.
struct Shards {
  std::vector<at::Tensor> q, k, v, dout;
  std::vector<at::Tensor> out, lse, dq, dk, dv;  // of the last ring pass (Mode::kRing)

  Shards(const std::vector<at::Tensor>& whole, int world)
      : out(world), lse(world), dq(world), dk(world), dv(world) {
    const int64_t local_len = whole[0].size(1) / world;
    for (int r = 0; r < world; ++r) {
      std::vector<at::Tensor>* parts[] = {&q, &k, &v, &dout};
      for (int i = 0; i < 4; ++i) {
        parts[i]->push_back(whole[i].narrow(1, r * local_len, local_len).contiguous());
      }
    }
  }
  int world() const { return static_cast<int>(q.size()); }

  // Times one forward pass.
  double forward(const RingOptions& options, Mode mode, bool cpu_clock) {
    std::vector<std::unique_ptr<RankForward>> ranks;
    for (int r = 0; r < world(); ++r) {
      ranks.push_back(
          std::make_unique<RankForward>(kCpuKernels, r, world(), q[r], k[r], v[r], options));
    }
    const double ms = run_ring<RingForward>(ranks, mode, cpu_clock);
    for (int r = 0; mode == Mode::kRing && r < world(); ++r) {
      std::tie(out[r], lse[r]) = ranks[r]->result(q[r].scalar_type());
    }
    return ms;
  }

  // Times one backward pass of the last ring forward.
  double backward(const RingOptions& options, Mode mode, bool cpu_clock) {
    std::vector<std::unique_ptr<RankBackward>> ranks;
    for (int r = 0; r < world(); ++r) {
      ranks.push_back(std::make_unique<RankBackward>(kCpuKernels, r, world(), dout[r], q[r], k[r],
                                                     v[r], out[r], lse[r], options));
    }
    const double ms = run_ring<RingBackward>(ranks, mode, cpu_clock);
    for (int r = 0; mode == Mode::kRing && r < world(); ++r) {
      std::tie(dq[r], dk[r], dv[r]) = ranks[r]->result(q[r].scalar_type());
    }
    return ms;
  }
};

// max |got - want| / max(1, max |want|) over the entries where `want` is finite.
double relative_error(const at::Tensor& got, const at::Tensor& want) {
  const at::Tensor got64 = got.to(at::kDouble), want64 = want.to(at::kDouble);
  const at::Tensor finite = at::isfinite(want64);
  const double scale = std::max(1.0, at::where(finite, want64.abs(), 0.0).max().item<double>());
  return at::where(finite, (got64 - want64).abs(), 0.0).max().item<double>() / scale;
}

// The largest relative error of the ring's results against `reference` (world size 1).
double max_error(const Shards& ring, const Shards& reference, bool with_backward) {
  const int64_t local_len = ring.q[0].size(1);
  double error = 0;
  for (int r = 0; r < ring.world(); ++r) {
    const int64_t first = r * local_len;
    auto rank_part = [&](const at::Tensor& whole, int dim) {
      return whole.narrow(dim, first, local_len);
    };
    error = std::max(error, relative_error(ring.out[r], rank_part(reference.out[0], 1)));
    error = std::max(error, relative_error(ring.lse[r], rank_part(reference.lse[0], 2)));
    if (with_backward) {
      error = std::max(error, relative_error(ring.dq[r], rank_part(reference.dq[0], 1)));
      error = std::max(error, relative_error(ring.dk[r], rank_part(reference.dk[0], 1)));
      error = std::max(error, relative_error(ring.dv[r], rank_part(reference.dv[0], 1)));
    }
  }
  return error;
}

// Per-step milliseconds (median or min over the timed iterations) of the three modes.
struct StepTimes {
  double ring = 0, compute = 0, exchange = 0;

  double hidden() const {
    if (exchange <= 0) return 1.0;
    return std::clamp((compute + exchange - ring) / exchange, 0.0, 1.0);
  }
};

}  // namespace

int main(int argc, char** argv) try {
  int world = 4;
  const bench::Options opt = bench::parse(
      argc, argv,
      [&](const char* name, const char* value) {
        const std::string option = name;
        if ((option == "-W" || option == "--world") && value) {
          world = bench::parse_int(option, value);
          return 2;
        }
        return 0;
      },
      "  -W, --world W        virtual ranks in the ring                    [4]\n"
      "  (--dtype: float32 or float64 here)\n");
  if (world < 1) bench::usage_error("--world must be >= 1");
  if (opt.dtype == "bfloat16") bench::usage_error("bench_ring: --dtype must be float32 or float64");
  bench::check_cpu_environment("bench_ring");
  if (opt.threads > 0) at::set_num_threads(opt.threads);
  const at::ScalarType dtype = opt.dtype == "float64" ? at::kDouble : at::kFloat;
  const double tolerance = dtype == at::kDouble ? 1e-10 : 2e-4;
  RingOptions options;
  options.causal = opt.causal;
  options.softmax_scale = 1.0 / std::sqrt(static_cast<double>(opt.headdim));

  std::printf("# bench_ring: world %d, batch %d, heads %d/%d, headdim %d, %s, %s, %d threads, "
              "kernel %s\n",
              world, opt.batch, opt.heads, opt.nheads_kv(), opt.headdim, opt.dtype.c_str(),
              opt.causal ? "causal" : "full", at::get_num_threads(), cpu::cpu_kernel_isa());
  std::printf("# %8s %5s | %9s %10s %9s %7s | %9s %10s %9s %7s | %9s\n", "L/rank", "steps",
              "fwd_step", "fwd_comp", "fwd_xchg", "hidden", "bwd_step", "bwd_comp", "bwd_xchg",
              "hidden", "max_err");
  bool ok = true;
  std::string json = "[";
  for (const int64_t local_len : opt.lengths()) {
    at::manual_seed(local_len);
    const int64_t seqlen = local_len * world;
    const auto tensor_options = at::TensorOptions().dtype(dtype);
    const int64_t heads[] = {opt.heads, opt.nheads_kv(), opt.nheads_kv(), opt.heads};
    std::vector<at::Tensor> whole;  // q, k, v, dout
    for (const int64_t tensor_heads : heads) {
      whole.push_back(at::randn({opt.batch, seqlen, tensor_heads, opt.headdim}, tensor_options));
    }
    Shards ring(whole, world);  // its results: those of the last timed ring passes
    ring.forward(options, Mode::kRing, opt.cpu_clock);  // out and lse for the backward passes

    const Mode modes[] = {Mode::kRing, Mode::kComputeOnly, Mode::kExchangeOnly};
    std::vector<double> samples[2][3];  // [forward, backward][mode]
    for (int iter = 0; iter < opt.warmup + opt.iters; ++iter) {
      for (int mode = 0; mode < 3; ++mode) {
        const double fwd_ms = ring.forward(options, modes[mode], opt.cpu_clock);
        const double bwd_ms =
            opt.run_bwd ? ring.backward(options, modes[mode], opt.cpu_clock) : 0.0;
        if (iter >= opt.warmup) {
          samples[0][mode].push_back(fwd_ms);
          samples[1][mode].push_back(bwd_ms);
        }
      }
    }
    const int steps = RingContext(0, world, options, local_len).steps;
    auto step_times = [&](int pass) {
      auto per_step = [&](int mode) {
        return bench::summary(samples[pass][mode], opt.stat_min) / steps;
      };
      return StepTimes{per_step(0), per_step(1), per_step(2)};
    };
    const StepTimes fwd = step_times(0), bwd = step_times(1);

    double error = 0;
    if (opt.check) {
      std::vector<at::Tensor> whole64;
      for (const at::Tensor& t : whole) whole64.push_back(t.to(at::kDouble));
      Shards reference(whole64, 1);
      reference.forward(options, Mode::kRing, false);
      if (opt.run_bwd) reference.backward(options, Mode::kRing, false);
      error = max_error(ring, reference, opt.run_bwd);
      if (!(error <= tolerance)) ok = false;
    }
    std::printf("  %8lld %5d | %9.3f %10.3f %9.3f %7.3f | %9.3f %10.3f %9.3f %7.3f | %9.2e%s\n",
                static_cast<long long>(local_len), steps, fwd.ring, fwd.compute, fwd.exchange,
                fwd.hidden(), bwd.ring, bwd.compute, bwd.exchange,
                opt.run_bwd ? bwd.hidden() : 0.0, error,
                opt.check ? (error <= tolerance ? "" : "  FAIL") : "  (unchecked)");
    char line[512];
    std::snprintf(line, sizeof(line),
                  "%s{\"len_per_rank\": %lld, \"world\": %d, \"steps\": %d, \"fwd_step_ms\": %.6f, "
                  "\"fwd_compute_ms\": %.6f, \"fwd_exchange_ms\": %.6f, \"bwd_step_ms\": %.6f, "
                  "\"bwd_compute_ms\": %.6f, \"bwd_exchange_ms\": %.6f, \"max_err\": %.3e}",
                  json.size() > 1 ? ", " : "", static_cast<long long>(local_len), world, steps,
                  fwd.ring, fwd.compute, fwd.exchange, bwd.ring, bwd.compute, bwd.exchange, error);
    json += line;
  }
  json += "]\n";
  if (!opt.json.empty()) {
    FILE* file = bench::open_output(opt.json);
    std::fputs(json.c_str(), file);
    std::fclose(file);
  }
  std::printf("# %s\n", opt.check ? (ok ? "check passed" : "CHECK FAILED") : "no check");
  return ok ? 0 : 1;
} catch (const std::exception&) {
  return bench::report_failure(argv[0]);
}
