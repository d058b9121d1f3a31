#include "ring_scheduler.h"

#include <cstdio>

namespace ring_attn {

const char* channel_name(Channel channel) {
  return channel == Channel::kKV ? "K/V" : "dK/dV";
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
// Forward

static int checked_steps(int num_steps, int world) {
  if (num_steps <= 0) return world;
  if (num_steps > world) throw std::invalid_argument("ring attention: more steps than ranks");
  return num_steps;
}

RingForward::RingForward(Transport& transport, BlockOps& ops, int num_steps)
    : transport_(transport),
      ops_(ops),
      rank_(transport.rank()),
      world_(transport.world_size()),
      steps_(checked_steps(num_steps, world_)) {}

Exchange RingForward::kv_exchange(int step) const {
  return Exchange{Channel::kKV, step, kv_slot(step), kv_slot(step + 1)};
}

void RingForward::begin_step(int step) {
  if (step + 1 < steps_) {
    transport_.post(kv_exchange(step));
    ++posted_;
  }
}

void RingForward::compute_step(int step) {
  const int source = source_at(rank_, world_, step);
  if (ops_.is_needed(source)) {
    ops_.forward(kv_slot(step), source);
    ++computed_;
  }
}

void RingForward::end_step(int step) {
  if (step + 1 < steps_) transport_.wait(kv_exchange(step));
}

void RingForward::run() {
  for (int step = 0; step < steps_; ++step) {
    begin_step(step);
    compute_step(step);
    end_step(step);
  }
}

// ---------------------------------------------------------------------------------------------
// Backward

RingBackward::RingBackward(Transport& transport, BlockOps& ops, int num_steps)
    : transport_(transport),
      ops_(ops),
      rank_(transport.rank()),
      world_(transport.world_size()),
      steps_(checked_steps(num_steps, world_)) {}

Exchange RingBackward::kv_exchange(int step) const {
  return Exchange{Channel::kKV, step, kv_slot(step), kv_slot(step + 1)};
}

Exchange RingBackward::grad_exchange(int step) const {
  // The last hop brings each block's dK/dV home: steps_-1 ranks back (one forward in a full ring).
  const int offset = step + 1 == steps_ ? 1 - steps_ : 1;
  return Exchange{Channel::kGradKV, step, send_slot_, grad_recv(step), offset};
}

void RingBackward::begin_step(int step) {
  if (step + 1 < steps_) {
    transport_.post(kv_exchange(step));
    ++posted_;
  }
}

void RingBackward::compute_step(int step) {
  const int source = source_at(rank_, world_, step);
  const bool needed = ops_.is_needed(source);
  if (step == 0) {  // the own block: its dK/dV stay here
    if (needed) {
      ops_.backward(kv_slot(0), source, slot::kGradHome);
      ++computed_;
    } else {
      ops_.zero_grad(slot::kGradHome);
    }
    return;
  }
  if (needed) {
    ops_.backward(kv_slot(step), source, grad_acc(step));
    send_slot_ = grad_acc(step);
    ++computed_;
  } else if (step == 1) {
    ops_.zero_grad(grad_acc(step));  // the travelling sum starts here, empty
    send_slot_ = grad_acc(step);
  } else {
    send_slot_ = -1;  // nothing added here: pass on what r-1 sent
  }
}

void RingBackward::end_step(int step) {
  if (step > 0) {
    if (step > 1) {
      // The travelling sum that r-1 sent at the end of step-1, for the block we hold now.
      const Exchange previous{Channel::kGradKV, step - 1, -1, grad_recv(step - 1)};
      transport_.wait(previous);
      if (send_slot_ < 0) {
        send_slot_ = grad_recv(step - 1);
      } else {
        ops_.add_grad(send_slot_, grad_recv(step - 1));
      }
    }
    transport_.post(grad_exchange(step));
    ++posted_;
  }
  if (step + 1 < steps_) transport_.wait(kv_exchange(step));
}

void RingBackward::finish() {
  if (steps_ > 1) {
    // The other ranks' contributions to our block, brought home by the last hop.
    const int last = steps_ - 1;
    transport_.wait(Exchange{Channel::kGradKV, last, -1, grad_recv(last), 1 - steps_});
    ops_.add_grad(slot::kGradHome, grad_recv(last));
  }
}

void RingBackward::run() {
  for (int step = 0; step < steps_; ++step) {
    begin_step(step);
    compute_step(step);
    end_step(step);
  }
  finish();
}

}  // namespace ring_attn
