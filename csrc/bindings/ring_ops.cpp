// The ring calls: one rank of a process group (ring_forward / ring_backward) or every virtual rank
// of a LocalRing in this process (local_ring_forward / local_ring_backward). Each validates and
// agrees on the arguments, builds the ranks' buffers and block ops (tensor_block_ops.h), picks a
// transport (transport_select.h, or comm/local_transport.h) and runs the core scheduler.
#include "bindings/ring_ops.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "bindings/agreement.h"
#include "bindings/counting_transport.h"
#include "bindings/transport_select.h"
#include "comm/group_devices.h"
#include "comm/local_transport.h"

namespace ring_attn {

bool ring_check_enabled() {
  const char* env = std::getenv("RING_ATTN_CHECK");
  return env == nullptr || std::string(env) != "0";
}

namespace {

thread_local RingStats g_last_stats;

template <typename Schedule>
void record_stats(const std::vector<Schedule>& schedules,
                  const std::vector<std::unique_ptr<CountingTransport>>& transports) {
  RingStats stats;
  for (size_t r = 0; r < schedules.size(); ++r) {
    stats.steps = schedules[r].num_steps();
    stats.blocks_computed += schedules[r].blocks_computed();
    stats.exchanges_posted += schedules[r].exchanges_posted();
    stats.bytes_sent += transports[r]->bytes_sent();
    stats.messages_sent += transports[r]->messages_sent();
  }
  g_last_stats = stats;
}

// The schedule of one rank: the ring's blocks travel ring.reaches.
template <typename Schedule>
Schedule make_schedule(Transport& transport, BlockOps& ops, const RingContext& ring) {
  if constexpr (std::is_constructible_v<Schedule, Transport&, BlockOps&, std::vector<int>>) {
    return Schedule(transport, ops, ring.reaches);
  } else {
    return Schedule(transport, ops);
  }
}

// Calls run.template operator()<Schedule>() with the schedule of `exchange`.
template <typename RingSchedule, typename GatherSchedule, typename Run>
auto with_schedule(KVExchange exchange, Run&& run) {
  if (exchange == KVExchange::kAllGather) return run.template operator()<GatherSchedule>();
  return run.template operator()<RingSchedule>();
}

// Runs one rank's schedule over `transport` (counted) and records its stats.
template <typename Schedule, typename Rank>
void run_rank(Rank& rank, Transport& transport) {
  std::vector<std::unique_ptr<CountingTransport>> counted;
  counted.push_back(std::make_unique<CountingTransport>(transport, rank.slots));
  std::vector<Schedule> schedule{make_schedule<Schedule>(*counted[0], rank.ops, rank.ring)};
  schedule[0].run();
  record_stats(schedule, counted);
}

RingCall ring_call(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const RingOptions& options, int world) {
  RingCall call{q, k, v, options.layout, options.causal, options.softmax_scale,
                options.window_left, options.window_right, options.cu_seqlens, world};
  call.kv_exchange = options.kv_exchange;
  return call;
}

// Packed sequences are one (1, tokens, heads, headdim) batch to the kernels.
at::Tensor as_batch(const at::Tensor& t, const RingOptions& options) {
  return options.cu_seqlens.defined() ? t.unsqueeze(0) : t;
}
at::Tensor from_batch(const at::Tensor& t, const RingOptions& options) {
  return options.cu_seqlens.defined() ? t.squeeze(0) : t;
}

void check_local_ring_lists(size_t world, std::initializer_list<size_t> sizes) {
  TORCH_CHECK_VALUE(world >= 1, "LocalRing: at least one virtual rank is needed");
  for (size_t n : sizes) {
    TORCH_CHECK_VALUE(n == world, "LocalRing: every list needs one tensor per virtual rank (",
                      world, "), got ", n);
  }
}

// Runs `world` virtual ranks (make_rank(r): a RankForward or RankBackward) of one call in
// lockstep over a LocalHub and returns them, holding their results.
template <typename Schedule, typename MakeRank>
auto run_local_ring(int world, MakeRank&& make_rank) {
  LocalHub hub(world);
  std::vector<decltype(make_rank(0))> ranks;
  std::vector<std::unique_ptr<LocalTransport>> transports;
  std::vector<std::unique_ptr<CountingTransport>> counted;
  std::vector<Schedule> schedules;
  for (int r = 0; r < world; ++r) {
    ranks.push_back(make_rank(r));
    transports.push_back(std::make_unique<LocalTransport>(hub, r, ranks[r]->slots));
    counted.push_back(std::make_unique<CountingTransport>(*transports[r], ranks[r]->slots));
    schedules.push_back(make_schedule<Schedule>(*counted[r], ranks[r]->ops, ranks[r]->ring));
  }
  run_lockstep(schedules);
  hub.check_drained();
  record_stats(schedules, counted);
  return ranks;
}

KVExchange kv_exchange_of(const RingOptions& options) {
  KVExchange exchange = KVExchange::kRing;
  parse_kv_exchange(options.kv_exchange, &exchange);  // validated before
  return exchange;
}

}  // namespace

RingStats last_ring_stats() { return g_last_stats; }

std::tuple<at::Tensor, at::Tensor, at::Tensor> ring_forward(const BlockKernels& kernels,
                                                            const at::Tensor& q,
                                                            const at::Tensor& k,
                                                            const at::Tensor& v,
                                                            const RingOptions& options) {
  std::string transport_choice_error;
  const TransportKind kind = transport_kind(q, &transport_choice_error);
  const auto group = resolve_group(options.group_name);
  RingCall call = ring_call(q, k, v, options, world_of(group));
  call.transport = static_cast<int>(kind);
  call.transport_choice_error = transport_choice_error;
  if (call.world > 1 && kind == TransportKind::kC10d) {
    call.transport_error = p2p_device_error(*group, q.device());
  }
  const int64_t forward_call = agree_or_throw(call, group, ring_check_enabled(),
                                              ring_timeout_seconds());
  RankForward rank(kernels, rank_of(group), world_of(group), as_batch(q, options),
                   as_batch(k, options), as_batch(v, options), options);
  auto transport = group_transport(group, rank.slots, kind);
  with_schedule<RingForward, AllGatherForward>(rank.ring.kv_exchange, [&]<typename Schedule>() {
    run_rank<Schedule>(rank, *transport);
  });
  auto [out, lse] = rank.result(q.scalar_type());
  return {from_batch(out, options), from_batch(lse, options),
          at::full({1}, forward_call, at::kLong)};
}

int64_t forward_call_number(const at::Tensor& forward_call) {
  return forward_call.defined() && forward_call.numel() == 1 ? forward_call.item<int64_t>() : 0;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ring_backward(
    const BlockKernels& kernels, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, const RingOptions& options,
    const at::Tensor& dlse, const at::Tensor& forward_call) {
  // Inputs were validated and agreed on in the forward; autograd guarantees matching shapes.
  const TransportKind kind = transport_kind(q);  // before any communication
  const auto group = resolve_group(options.group_name);
  agree_on_backward(ring_call_name(options.cu_seqlens), group, q, ring_check_enabled(),
                    ring_timeout_seconds(), forward_call_number(forward_call));
  RankBackward rank(kernels, rank_of(group), world_of(group), as_batch(dout, options),
                    as_batch(q, options), as_batch(k, options), as_batch(v, options),
                    as_batch(out, options), as_batch(lse, options), options,
                    dlse.defined() ? as_batch(dlse, options) : dlse);
  auto transport = group_transport(group, rank.slots, kind);
  with_schedule<RingBackward, AllGatherBackward>(rank.ring.kv_exchange, [&]<typename Schedule>() {
    run_rank<Schedule>(rank, *transport);
  });
  auto [dq, dk, dv] = rank.result(q.scalar_type());
  return {from_batch(dq, options), from_batch(dk, options), from_batch(dv, options)};
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> local_ring_forward(
    const BlockKernels& kernels, const std::vector<at::Tensor>& qs,
    const std::vector<at::Tensor>& ks, const std::vector<at::Tensor>& vs,
    const RingOptions& options) {
  const int world = static_cast<int>(qs.size());
  check_local_ring_lists(qs.size(), {ks.size(), vs.size()});
  std::vector<at::Tensor> descriptors;
  for (int r = 0; r < world; ++r) {
    descriptors.push_back(describe(ring_call(qs[r], ks[r], vs[r], options, world)));
  }
  check_descriptors(descriptors, ring_call_name(options.cu_seqlens));
  const auto ranks = with_schedule<RingForward, AllGatherForward>(
      kv_exchange_of(options), [&]<typename Schedule>() {
        return run_local_ring<Schedule>(world, [&](int r) {
          return std::make_unique<RankForward>(kernels, r, world, as_batch(qs[r], options),
                                               as_batch(ks[r], options), as_batch(vs[r], options),
                                               options);
        });
      });
  std::vector<at::Tensor> outs, lses;
  for (int r = 0; r < world; ++r) {
    auto [out, lse] = ranks[r]->result(qs[r].scalar_type());
    outs.push_back(from_batch(out, options));
    lses.push_back(from_batch(lse, options));
  }
  return {outs, lses};
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>
local_ring_backward(const BlockKernels& kernels, const std::vector<at::Tensor>& douts,
                    const std::vector<at::Tensor>& qs, const std::vector<at::Tensor>& ks,
                    const std::vector<at::Tensor>& vs, const std::vector<at::Tensor>& outs,
                    const std::vector<at::Tensor>& lses, const RingOptions& options,
                    const std::vector<at::Tensor>& dlses) {
  const int world = static_cast<int>(qs.size());
  check_local_ring_lists(qs.size(), {douts.size(), ks.size(), vs.size(), outs.size(), lses.size()});
  if (!dlses.empty()) check_local_ring_lists(qs.size(), {dlses.size()});
  const auto ranks = with_schedule<RingBackward, AllGatherBackward>(
      kv_exchange_of(options), [&]<typename Schedule>() {
        return run_local_ring<Schedule>(world, [&](int r) {
          return std::make_unique<RankBackward>(
              kernels, r, world, as_batch(douts[r], options), as_batch(qs[r], options),
              as_batch(ks[r], options), as_batch(vs[r], options), as_batch(outs[r], options),
              as_batch(lses[r], options), options,
              dlses.empty() ? at::Tensor() : as_batch(dlses[r], options));
        });
      });
  std::vector<at::Tensor> dqs, dks, dvs;
  for (int r = 0; r < world; ++r) {
    auto [dq, dk, dv] = ranks[r]->result(qs[r].scalar_type());
    dqs.push_back(from_batch(dq, options));
    dks.push_back(from_batch(dk, options));
    dvs.push_back(from_batch(dv, options));
  }
  return {dqs, dks, dvs};
}

}  // namespace ring_attn
