#include "comm/c10d_transport.h"

#include <algorithm>
#include <chrono>
#include <map>
#include <mutex>
#include <thread>

#include "comm/c10d_compat.h"

namespace ring_attn {

bool wait_with_deadline(const c10::intrusive_ptr<c10d::Work>& work, double timeout_s,
                        const std::string& what) {
  using clock = std::chrono::steady_clock;
  const auto start = clock::now();
  try {
    if (timeout_s <= 0) {
      work->wait();
      return true;
    }
    // Longer waits than about 31 years wait that long: their milliseconds stay far inside int64.
    constexpr double kLongestWaitS = 1e9;
    const double wait_s = std::min(timeout_s, kLongestWaitS);
    const auto ms = std::chrono::milliseconds(static_cast<int64_t>(wait_s * 1000.0) + 1);
    return work->wait(ms);
  } catch (const std::exception& e) {
    const double elapsed = std::chrono::duration<double>(clock::now() - start).count();
    if (timeout_s > 0 && elapsed >= timeout_s * 0.99) return false;  // the backend's own timeout
    throw std::runtime_error(what + ": " + e.what());
  }
}

void wait_or_raise(const c10::intrusive_ptr<c10d::Work>& work, c10d::ProcessGroup& group,
                   double timeout_s, const std::string& caller, const std::string& doing,
                   const std::string& why) {
  const int rank = group.getRank();
  if (wait_with_deadline(work, timeout_s,
                         caller + ": rank " + std::to_string(rank) + " failed " + doing)) {
    return;
  }
  abandon(group, work);
  TORCH_CHECK(false, caller, ": rank ", rank, " timed out after ", timeout_s,
              " s (RING_ATTN_TIMEOUT) ", doing, why, ". The process group may be unusable after "
              "this error, as after any collective timeout.");
}

bool refers_to(const WeakGroup& weak, const c10d::ProcessGroup& group) {
  return weak.lock().get() == &group;
}

namespace {

struct AbandonedWork {
  WeakGroup group;
  c10::intrusive_ptr<c10d::Work> work;
};

std::mutex g_abandoned_mutex;
std::vector<AbandonedWork>* g_abandoned = new std::vector<AbandonedWork>();  // never freed

// Whether `work` completed; false where the backend cannot tell (it throws), so it is kept.
bool completed(const c10::intrusive_ptr<c10d::Work>& work) noexcept {
  try {
    return work->isCompleted();
  } catch (...) {
    return false;
  }
}

// Drops the abandoned works that completed or whose group is gone; the caller locks.
void release_finished_works() {
  auto& works = *g_abandoned;
  works.erase(std::remove_if(works.begin(), works.end(),
                             [](const AbandonedWork& a) {
                               return a.group.expired() || completed(a.work);
                             }),
              works.end());
}

}  // namespace

void abandon(c10d::ProcessGroup& group, const c10::intrusive_ptr<c10d::Work>& work) {
  auto strong = c10::intrusive_ptr<c10d::ProcessGroup>::unsafe_reclaim_from_nonowning(&group);
  std::lock_guard<std::mutex> lock(g_abandoned_mutex);
  release_finished_works();
  g_abandoned->push_back({WeakGroup(strong), work});
}

void release_abandoned_works() {
  std::lock_guard<std::mutex> lock(g_abandoned_mutex);
  release_finished_works();
}

// The device type whose backend carries the ring's messages, if that backend coalesces.
static std::optional<c10::DeviceType> coalescing_type(c10d::ProcessGroup& group,
                                                      const at::Device& device) {
  if (!c10d_compat::has_backend(group, device.type())) return std::nullopt;
  if (!group.getBackend(device.type())->supportsCoalescing()) return std::nullopt;
  return device.type();
}

// A coalescing backend (NCCL) creates the communicator of its batches at the first batch or
// collective over the group on a device, and every rank of the group must take part in that. A
// rank whose schedule posts no exchange would never join, so every rank (all of them build the
// transport of a ring call) runs one small collective on the device first, once per group and
// device.
static void join_batch_communicator(const c10::intrusive_ptr<c10d::ProcessGroup>& group,
                                    const at::Device& device, double timeout_s) {
  static std::mutex mutex;
  static auto* joined = new std::map<std::pair<const void*, int>, WeakGroup>();
  const auto key = std::make_pair(static_cast<const void*>(group.get()),
                                  static_cast<int>(device.index()));
  {
    std::lock_guard<std::mutex> lock(mutex);
    auto it = joined->find(key);
    if (it != joined->end() && refers_to(it->second, *group)) return;
  }
  std::vector<at::Tensor> probe{at::zeros({1}, at::TensorOptions().device(device))};
  wait_or_raise(group->allreduce(probe), *group, timeout_s, "ring attention",
                "bringing up the process group's communicator on " + device.str());
  std::lock_guard<std::mutex> lock(mutex);
  std::erase_if(*joined, [](const auto& entry) { return entry.second.expired(); });
  joined->insert_or_assign(key, WeakGroup(group));
}

// The device of the ring's messages. A GPU rank always holds its own K/V slot; a CPU rank may
// hold no slot at all (it sends and receives nothing), and its messages would be CPU tensors.
static at::Device slots_device(const std::vector<at::Tensor>& slots) {
  for (const at::Tensor& slot : slots) {
    if (slot.defined()) return slot.device();
  }
  return at::Device(c10::DeviceType::CPU);
}

C10dTransport::C10dTransport(c10::intrusive_ptr<c10d::ProcessGroup> group,
                             const std::vector<at::Tensor>& slots, double timeout_s)
    : group_(std::move(group)),
      slots_(slots),
      timeout_s_(timeout_s),
      rank_(group_->getRank()),
      world_(group_->getSize()),
      coalesce_(coalescing_type(*group_, slots_device(slots_))) {
  if (coalesce_) join_batch_communicator(group_, slots_device(slots_), timeout_s_);
}

C10dTransport::~C10dTransport() {
  for (auto& [key, pending] : pending_) {  // only after an error: keep their buffers alive
    if (pending.send) abandon(*group_, pending.send);
    if (pending.recv) abandon(*group_, pending.recv);
    if (pending.batch) abandon(*group_, pending.batch);
  }
  for (auto& [kind, work] : collectives_) abandon(*group_, work);
}

static int exchange_tag(const Exchange& exchange) {
  return exchange.step * kChannelCount + static_cast<int>(exchange.channel);
}

std::string C10dTransport::describe(const Exchange& exchange, bool receiving) const {
  return std::string("ring attention: rank ") + std::to_string(rank_) + " failed at ring step " +
         std::to_string(exchange.step) + (receiving ? " receiving " : " sending ") +
         channel_name(exchange.channel) + (receiving ? " from rank " : " to rank ") +
         std::to_string(mod(rank_ + (receiving ? -exchange.offset : exchange.offset), world_));
}

void C10dTransport::post_halves(const Exchange& exchange, Pending& pending) {
  const int tag = exchange_tag(exchange);
  // Post the receive first: a peer's send can then land directly. A dead peer can fail the
  // posting itself.
  if (exchange.receives()) {
    std::vector<at::Tensor> recv{slots_.at(exchange.recv_slot)};
    try {
      pending.recv = group_->recv(recv, mod(rank_ - exchange.offset, world_), tag);
    } catch (const std::exception& e) {
      throw std::runtime_error(describe(exchange, true) + ": " + e.what());
    }
  }
  if (exchange.sends()) {
    std::vector<at::Tensor> send{slots_.at(exchange.send_slot)};
    try {
      pending.send = group_->send(send, mod(rank_ + exchange.offset, world_), tag);
    } catch (const std::exception& e) {
      if (pending.recv) abandon(*group_, pending.recv);
      throw std::runtime_error(describe(exchange, false) + ": " + e.what());
    }
  }
}

void C10dTransport::post(const Exchange& exchange) {
  Pending pending;
  if (!coalesce_) {
    post_halves(exchange, pending);
  } else {
    group_->startCoalescing(*coalesce_);
    try {
      post_halves(exchange, pending);
    } catch (...) {
      try {  // close the batch, so that the group stays usable
        abandon(*group_, group_->endCoalescing(*coalesce_));
      } catch (const std::exception&) {
      }
      throw;
    }
    try {
      pending.batch = group_->endCoalescing(*coalesce_);
    } catch (const std::exception& e) {
      throw std::runtime_error(describe(exchange, exchange.receives()) + ": " + e.what());
    }
    // The batch's work stands for both halves (the halves' own works may be placeholders).
    pending.send.reset();
    pending.recv.reset();
  }
  pending_[{static_cast<int>(exchange.channel), exchange.step}] = std::move(pending);
}

void C10dTransport::wait(const Exchange& exchange) {
  auto it = pending_.find({static_cast<int>(exchange.channel), exchange.step});
  TORCH_CHECK(it != pending_.end(), "ring attention: internal error, waiting for an exchange (",
              channel_name(exchange.channel), ", step ", exchange.step, ") that was never posted");
  if (it->second.batch &&
      !wait_with_deadline(it->second.batch, timeout_s_, describe(exchange, exchange.receives()))) {
    const int prev = mod(rank_ - exchange.offset, world_);
    const int next = mod(rank_ + exchange.offset, world_);
    throw RingTimeoutError(timeout_s_, exchange.step, exchange.channel, exchange.receives(),
                           exchange.receives() ? prev : next,
                           exchange.sends() && exchange.receives() ? next : -1);
  }
  if (it->second.recv &&
      !wait_with_deadline(it->second.recv, timeout_s_, describe(exchange, true))) {
    throw RingTimeoutError(timeout_s_, exchange.step, exchange.channel, true,
                           mod(rank_ - exchange.offset, world_));
  }
  if (it->second.send &&
      !wait_with_deadline(it->second.send, timeout_s_, describe(exchange, false))) {
    throw RingTimeoutError(timeout_s_, exchange.step, exchange.channel, false,
                           mod(rank_ + exchange.offset, world_));
  }
  pending_.erase(it);
}

void C10dTransport::post_collective(const Collective& collective) {
  // Flat: the backends concatenate the ranks' parts along dim 0.
  at::Tensor send = slots_.at(collective.send_slot).view(-1);
  at::Tensor recv = slots_.at(collective.recv_slot).view(-1);
  const std::string what = std::string("ring attention: rank ") + std::to_string(rank_) +
                           " failed to start the " + collective_name(collective.kind);
  try {
    collectives_[static_cast<int>(collective.kind)] =
        collective.kind == CollectiveKind::kAllGather
            ? c10d_compat::all_gather_single(*group_, recv, send)
            : c10d_compat::reduce_scatter_single(*group_, recv, send);
  } catch (const std::exception& e) {
    throw std::runtime_error(what + ": " + e.what());
  }
}

void C10dTransport::wait_collective(const Collective& collective) {
  auto it = collectives_.find(static_cast<int>(collective.kind));
  TORCH_CHECK(it != collectives_.end(), "ring attention: internal error, waiting for the ",
              collective_name(collective.kind), " that was never posted");
  const std::string what = std::string("ring attention: rank ") + std::to_string(rank_) +
                           " failed in the " + collective_name(collective.kind);
  if (!wait_with_deadline(it->second, timeout_s_, what)) {
    TORCH_CHECK(false, what, ": timed out after ", timeout_s_, " s (RING_ATTN_TIMEOUT). A peer "
                "may have died, diverged or not called the same function; the process group may "
                "be unusable after this error, as after any collective timeout.");
  }
  collectives_.erase(it);
}

}  // namespace ring_attn
