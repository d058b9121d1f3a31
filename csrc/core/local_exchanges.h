// The bookkeeping of an in-memory transport between the virtual ranks of one process, all driven
// in lockstep by one thread (run_lockstep in ring_scheduler.h), and each rank's Transport over it:
// LocalRing's transport (comm/local_transport.h) and the CPU ring benchmark's
// (benchmarks/cpp/bench_ring.cpp).
//
// A hop of an exchange (the sender's send slot into the receiver's receive slot) may be copied as
// soon as both ranks have posted that exchange, the sender with a send half and the receiver with
// a receive half: by the schedule's contract a posted send slot is written and a posted receive
// slot is free. The transport keeps a `Posted` value per posted exchange (its slots' memory,
// events, ...) and does the copying itself; this class matches the posts and tracks which hops
// were copied.
#pragma once

#include <map>
#include <optional>
#include <utility>
#include <vector>

#include "core/ring_scheduler.h"

namespace ring_attn {

template <typename Posted>
class LocalExchanges {
 public:
  struct Entry {
    Posted posted;
    bool sends = false;       // the exchange has a send half
    bool receives = false;    // and a receive half
    bool copied_in = false;   // the receive slot holds the sender's send
    bool copied_out = false;  // the send slot was copied to the receiver
  };

  explicit LocalExchanges(int world) : entries_(world) {}
  int world() const { return static_cast<int>(entries_.size()); }

  // Records `rank`'s post of `exchange`, then calls copy(sender's Posted, receiver's Posted,
  // receiver) for each hop of it that both ends have now posted: the one into `rank` and the one
  // out of it (the same hop at world size 1, copied once).
  template <typename Copy>
  void post(int rank, const Exchange& exchange, Posted posted, Copy&& copy) {
    entries_[rank][key(exchange)] =
        Entry{std::move(posted), exchange.sends(), exchange.receives()};
    copy_if_both_posted(mod(rank - exchange.offset, world()), rank, exchange, copy);
    copy_if_both_posted(rank, mod(rank + exchange.offset, world()), exchange, copy);
  }

  // Removes and returns `rank`'s entry of `exchange` once the hops of its halves were copied;
  // nothing when it was never posted or a peer never posted its end (a wait would deadlock).
  std::optional<Entry> complete(int rank, const Exchange& exchange) {
    const auto it = entries_[rank].find(key(exchange));
    if (it == entries_[rank].end()) return std::nullopt;
    const Entry& entry = it->second;
    if ((entry.receives && !entry.copied_in) || (entry.sends && !entry.copied_out)) {
      return std::nullopt;
    }
    std::optional<Entry> done(std::move(it->second));
    entries_[rank].erase(it);
    return done;
  }

  // How many of `rank`'s posted exchanges were not completed.
  size_t pending(int rank) const { return entries_[rank].size(); }

 private:
  using Key = std::pair<int, int>;  // (channel, step)
  static Key key(const Exchange& exchange) {
    return {static_cast<int>(exchange.channel), exchange.step};
  }

  template <typename Copy>
  void copy_if_both_posted(int sender, int receiver, const Exchange& exchange, Copy& copy) {
    const auto from = entries_[sender].find(key(exchange));
    const auto to = entries_[receiver].find(key(exchange));
    if (from == entries_[sender].end() || to == entries_[receiver].end()) return;
    if (!from->second.sends || !to->second.receives || to->second.copied_in) return;
    copy(from->second.posted, to->second.posted, receiver);
    to->second.copied_in = true;
    from->second.copied_out = true;
  }

  std::vector<std::map<Key, Entry>> entries_;  // per rank: its posted, not yet completed exchanges
};

// One virtual rank's Transport over a hub of in-memory exchanges between all the ranks (a hub has
// world(), post(rank, exchange, slots) and wait(rank, exchange)). `Slots`: the rank's buffers by
// scheduler slot.
template <typename Hub, typename Slots>
class HubTransport final : public Transport {
 public:
  // `hub` and `slots` must outlive the transport.
  HubTransport(Hub& hub, int rank, const Slots& slots) : hub_(hub), rank_(rank), slots_(slots) {}
  int rank() const override { return rank_; }
  int world_size() const override { return hub_.world(); }
  void post(const Exchange& exchange) override { hub_.post(rank_, exchange, slots_); }
  void wait(const Exchange& exchange) override { hub_.wait(rank_, exchange); }
  // Collectives where the hub has them (post_collective(rank, collective, slots) and
  // wait_collective(rank, collective)).
  void post_collective(const Collective& collective) override {
    if constexpr (requires { hub_.post_collective(rank_, collective, slots_); }) {
      hub_.post_collective(rank_, collective, slots_);
    } else {
      Transport::post_collective(collective);
    }
  }
  void wait_collective(const Collective& collective) override {
    if constexpr (requires { hub_.wait_collective(rank_, collective); }) {
      hub_.wait_collective(rank_, collective);
    } else {
      Transport::wait_collective(collective);
    }
  }

 private:
  Hub& hub_;
  int rank_;
  const Slots& slots_;
};

}  // namespace ring_attn
