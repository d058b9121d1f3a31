#include "ring_scheduler.h"

#include <algorithm>
#include <cstdio>
#include <utility>

namespace ring_attn {

const char* channel_name(Channel channel) {
  return channel == Channel::kKV ? "K/V" : "dK/dV";  // kGradHome: the same data, sent home
}

const char* collective_name(CollectiveKind kind) {
  return kind == CollectiveKind::kAllGather ? "all-gather of K/V" : "reduce-scatter of dK/dV";
}

void Transport::post_collective(const Collective& collective) {
  throw std::logic_error(std::string("ring attention: this transport has no ") +
                         collective_name(collective.kind));
}

void Transport::wait_collective(const Collective& collective) {
  throw std::logic_error(std::string("ring attention: this transport has no ") +
                         collective_name(collective.kind));
}

static std::string timeout_message(double seconds, int step, Channel channel, bool receiving,
                                   int peer, int send_peer) {
  char what[160];
  if (send_peer >= 0) {  // one fused operation (NCCL): either half may be the stuck one
    std::snprintf(what, sizeof(what), "exchanging %s (sending to rank %d, receiving from rank %d "
                  "in one NCCL operation)", channel_name(channel), send_peer, peer);
  } else {
    std::snprintf(what, sizeof(what), "%s %s %s rank %d", receiving ? "receiving" : "sending",
                  channel_name(channel), receiving ? "from" : "to", peer);
  }
  char buf[512];
  std::snprintf(buf, sizeof(buf),
                "ring attention: timed out after %.3g s at ring step %d while %s "
                "(RING_ATTN_TIMEOUT). A peer may have died, diverged or not called the same "
                "function; the process group may be unusable after this error, as after any "
                "collective timeout.",
                seconds, step, what);
  return buf;
}

RingTimeoutError::RingTimeoutError(double seconds, int step_, Channel channel, bool receiving_,
                                   int peer_, int send_peer_)
    : std::runtime_error(timeout_message(seconds, step_, channel, receiving_, peer_, send_peer_)),
      step(step_),
      peer(peer_),
      receiving(receiving_),
      send_peer(send_peer_) {}

// ---------------------------------------------------------------------------------------------
// Route

int ring_steps(const std::vector<int>& reaches) {
  int steps = 1;
  for (int reach : reaches) steps = std::max(steps, reach + 1);
  return steps;
}

static std::vector<int> checked_reaches(std::vector<int> reaches, int world) {
  if (reaches.empty()) return std::vector<int>(world, world - 1);
  if (static_cast<int>(reaches.size()) != world) {
    throw std::invalid_argument("ring attention: one reach per rank is needed");
  }
  for (int reach : reaches) {
    if (reach < 0 || reach >= world) {
      throw std::invalid_argument("ring attention: a block cannot travel past the ring");
    }
  }
  return reaches;
}

RingRoute::RingRoute(int rank, int world, std::vector<int> reaches)
    : rank_(rank),
      world_(world),
      reaches_(checked_reaches(std::move(reaches), world)),
      steps_(ring_steps(reaches_)) {}

Exchange RingRoute::kv_exchange(int step) const {
  return Exchange{Channel::kKV, step, passes_on(step) ? kv_slot(step) : slot::kNone,
                  takes_in(step) ? kv_slot(step + 1) : slot::kNone};
}

// Posts `exchange` unless it has no half (then returns false); counts a send half in `hops_sent`.
static bool post_halves(Transport& transport, const Exchange& exchange, int& hops_sent) {
  if (!exchange.sends() && !exchange.receives()) return false;
  transport.post(exchange);
  hops_sent += exchange.sends();
  return true;
}

static void wait_halves(Transport& transport, const Exchange& exchange) {
  if (exchange.sends() || exchange.receives()) transport.wait(exchange);
}

// A rank computes on the block of `step` only if it holds it; it never needs one it does not hold
// (see ring_scheduler.h), which a mismatched `needed` would break.
static bool compute_here(const RingRoute& route, const BlockOps& ops, int step) {
  const bool needed = ops.is_needed(route.source(step));
  if (needed && !route.holds(step)) {
    throw std::logic_error("ring attention: internal error, rank " + std::to_string(route.rank()) +
                           " needs the block of rank " + std::to_string(route.source(step)) +
                           " that does not travel to it");
  }
  return needed;
}

// ---------------------------------------------------------------------------------------------
// Forward

RingForward::RingForward(Transport& transport, BlockOps& ops, std::vector<int> reaches)
    : transport_(transport),
      ops_(ops),
      route_(transport.rank(), transport.world_size(), std::move(reaches)) {}

void RingForward::begin_step(int step) {
  if (step + 1 < route_.steps()) post_halves(transport_, route_.kv_exchange(step), posted_);
}

void RingForward::compute_step(int step) {
  if (compute_here(route_, ops_, step)) {
    ops_.forward(RingRoute::kv_slot(step), route_.source(step));
    ++computed_;
  }
}

void RingForward::end_step(int step) {
  if (step + 1 < route_.steps()) wait_halves(transport_, route_.kv_exchange(step));
}

void RingForward::run() {
  for (int step = 0; step < route_.steps(); ++step) {
    begin_step(step);
    compute_step(step);
    end_step(step);
  }
}

// ---------------------------------------------------------------------------------------------
// Backward

RingBackward::RingBackward(Transport& transport, BlockOps& ops, std::vector<int> reaches)
    : transport_(transport),
      ops_(ops),
      route_(transport.rank(), transport.world_size(), std::move(reaches)) {}

Exchange RingBackward::travel_exchange(int step) const {
  return Exchange{Channel::kGradKV, step, route_.passes_on(step) ? send_slot_ : slot::kNone,
                  route_.takes_in(step) ? grad_recv(step) : slot::kNone, 1};
}

Exchange RingBackward::home_exchange(int step) const {
  const bool sends = route_.reach(route_.source(step)) == step;
  const bool receives = route_.reach(route_.rank()) == step;
  return Exchange{Channel::kGradHome, step, sends ? send_slot_ : slot::kNone,
                  receives ? slot::kGradHomeRecv : slot::kNone, -step};
}

void RingBackward::begin_step(int step) {
  if (step + 1 < route_.steps()) post_halves(transport_, route_.kv_exchange(step), posted_);
}

void RingBackward::compute_step(int step) {
  const int source = route_.source(step);
  const bool needed = compute_here(route_, ops_, step);
  if (step == 0) {  // the own block: its dK/dV stay here
    if (needed) {
      ops_.backward(RingRoute::kv_slot(0), source, slot::kGradHome);
      ++computed_;
    } else {
      ops_.zero_grad(slot::kGradHome);
    }
    return;
  }
  if (needed) {
    ops_.backward(RingRoute::kv_slot(step), source, grad_acc(step));
    send_slot_ = grad_acc(step);
    ++computed_;
  } else if (step == 1 && route_.holds(step)) {
    ops_.zero_grad(grad_acc(step));  // the travelling sum starts here, empty
    send_slot_ = grad_acc(step);
  } else {
    send_slot_ = slot::kNone;  // nothing added here: pass on what r-1 sent (if anything)
  }
}

void RingBackward::complete_grad_exchanges() {
  for (const Exchange& exchange : grad_in_flight_) {
    transport_.wait(exchange);
    if (!exchange.receives()) continue;
    if (exchange.channel == Channel::kGradHome) {
      ops_.add_grad(slot::kGradHome, exchange.recv_slot);
    } else if (send_slot_ == slot::kNone) {  // the sum of the block in hand, from r-1
      send_slot_ = exchange.recv_slot;
    } else {
      ops_.add_grad(send_slot_, exchange.recv_slot);
    }
  }
  grad_in_flight_.clear();
}

void RingBackward::end_step(int step) {
  if (step > 0) {
    complete_grad_exchanges();
    for (const Exchange& exchange : {travel_exchange(step), home_exchange(step)}) {
      if (post_halves(transport_, exchange, posted_)) grad_in_flight_.push_back(exchange);
    }
  }
  if (step + 1 < route_.steps()) wait_halves(transport_, route_.kv_exchange(step));
}

void RingBackward::finish() { complete_grad_exchanges(); }

void RingBackward::run() {
  for (int step = 0; step < route_.steps(); ++step) {
    begin_step(step);
    compute_step(step);
    end_step(step);
  }
  finish();
}

}  // namespace ring_attn
