#include "allgather_scheduler.h"

namespace ring_attn {

bool parse_kv_exchange(const std::string& name, KVExchange* out) {
  if (name == "ring") {
    *out = KVExchange::kRing;
  } else if (name == "allgather") {
    *out = KVExchange::kAllGather;
  } else {
    return false;
  }
  return true;
}

const char* kv_exchange_name(KVExchange exchange) {
  return exchange == KVExchange::kRing ? "ring" : "allgather";
}

namespace {

const Collective kGatherKV{CollectiveKind::kAllGather, slot::kOwnKV, slot::kAllKV};
const Collective kScatterGrad{CollectiveKind::kReduceScatter, slot::kAllGrad, slot::kGradRecv0};

}  // namespace

AllGatherSchedule::AllGatherSchedule(Transport& transport, BlockOps& ops)
    : transport_(transport), ops_(ops), rank_(transport.rank()), world_(transport.world_size()) {}

void AllGatherSchedule::begin_step(int) {
  if (world_ > 1) {
    transport_.post_collective(kGatherKV);
    ++posted_;
  }
}

// ---------------------------------------------------------------------------------------------
// Forward

void AllGatherForward::compute_step(int) {
  if (ops_.is_needed(rank_)) {
    ops_.forward(slot::kOwnKV, rank_);
    ++computed_;
  }
  if (world_ == 1) return;
  transport_.wait_collective(kGatherKV);
  for (int step = 1; step < world_; ++step) {
    const int source = source_at(rank_, world_, step);
    if (ops_.is_needed(source)) {
      ops_.forward(slot::kAllKV, source);
      ++computed_;
    }
  }
}

void AllGatherForward::run() {
  begin_step(0);
  compute_step(0);
  end_step(0);
}

// ---------------------------------------------------------------------------------------------
// Backward

void AllGatherBackward::compute_step(int) {
  const bool own_needed = ops_.is_needed(rank_);
  if (world_ == 1) {  // nothing to gather or scatter: the own block's dK/dV are the result
    if (own_needed) {
      ops_.backward(slot::kOwnKV, rank_, slot::kGradHome);
      ++computed_;
    } else {
      ops_.zero_grad(slot::kGradHome);
    }
    return;
  }
  ops_.zero_grad(slot::kAllGrad);  // blocks this rank does not need contribute zero
  if (own_needed) {
    ops_.backward(slot::kOwnKV, rank_, slot::kAllGrad);
    ++computed_;
  }
  transport_.wait_collective(kGatherKV);
  for (int step = 1; step < world_; ++step) {
    const int source = source_at(rank_, world_, step);
    if (ops_.is_needed(source)) {
      ops_.backward(slot::kAllKV, source, slot::kAllGrad);
      ++computed_;
    }
  }
}

void AllGatherBackward::end_step(int) {
  if (world_ > 1) {
    transport_.post_collective(kScatterGrad);
    ++posted_;
  }
}

void AllGatherBackward::finish() {
  if (world_ == 1) return;
  transport_.wait_collective(kScatterGrad);
  ops_.zero_grad(slot::kGradHome);
  ops_.add_grad(slot::kGradHome, slot::kGradRecv0);
}

void AllGatherBackward::run() {
  begin_step(0);
  compute_step(0);
  end_step(0);
  finish();
}

}  // namespace ring_attn
