// Ring transport over any torch c10d::ProcessGroup (gloo on CPU; NCCL groups work too).
// Each exchange is a send to rank+offset and/or a recv from rank-offset, tagged by (step, channel)
// so that the K/V and dK/dV rings never match each other's messages; collectives are the group's
// own.
// Where the group's backend for the slots' device coalesces (NCCL), each exchange is one coalesced
// batch, as torch's batch_isend_irecv: NCCL ignores tags and runs unbatched sends and receives
// between two ranks (with eager initialisation: all of a group's operations) one after another on
// one stream, so two ranks that both post their receive first would wait for each other forever
// (world size 2, a hop home to the rank received from, or any ring under eager initialisation).
// In one batch NCCL runs both halves together.
// Every wait has a deadline.
#pragma once

#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include <map>
#include <optional>
#include <utility>
#include <vector>

#include "core/ring_scheduler.h"

namespace ring_attn {

// Waits for `work` until `timeout_s` (<= 0: forever). Returns false on deadline; rethrows a
// backend failure (a dead peer, a closed connection) as std::runtime_error with `what` prefixed.
bool wait_with_deadline(const c10::intrusive_ptr<c10d::Work>& work, double timeout_s,
                        const std::string& what);

// Waits for a collective of the library function `caller` over `group` until `timeout_s`. A
// backend failure raises "<caller>: rank <rank> failed <doing>: ..."; on the deadline the work is
// abandoned and a c10::Error says "<caller>: rank <rank> timed out after <timeout_s> s
// (RING_ATTN_TIMEOUT) <doing><why>." and that the process group may be unusable.
void wait_or_raise(const c10::intrusive_ptr<c10d::Work>& work, c10d::ProcessGroup& group,
                   double timeout_s, const std::string& caller, const std::string& doing,
                   const std::string& why = "");

// Keeps a work of `group` that never completed (and the buffers it holds) alive while the group
// lives: a backend may still write into a buffer after its wait gave up. It is released by a
// later abandon once it completed or its group was destroyed, so timeouts each followed by a new
// group, as their error advises, do not pile up buffers, connections and threads.
void abandon(c10d::ProcessGroup& group, const c10::intrusive_ptr<c10d::Work>& work);

// Releases the abandoned works that completed or whose group was destroyed, now rather than at the
// next abandon. Python runs it at exit (ring_attention/_ops.py), so that no connection or thread of
// a destroyed group is still running while the process tears down its statics.
void release_abandoned_works();

// What caches per process group hold: the group may be destroyed, and a new one allocated at its
// address, while the entry lives.
using WeakGroup = c10::weak_intrusive_ptr<c10d::ProcessGroup>;

// Whether `weak` refers to the live `group` itself, not to a destroyed group at its address.
bool refers_to(const WeakGroup& weak, const c10d::ProcessGroup& group);

class C10dTransport final : public Transport {
 public:
  // `slots` maps scheduler slots to tensors; it must outlive the transport.
  C10dTransport(c10::intrusive_ptr<c10d::ProcessGroup> group, const std::vector<at::Tensor>& slots,
                double timeout_s);
  ~C10dTransport() override;
  int rank() const override { return rank_; }
  int world_size() const override { return world_; }
  void post(const Exchange& exchange) override;
  void wait(const Exchange& exchange) override;  // identifies the exchange by (channel, step)
  // all_gather_single / reduce_scatter_single (sum) over the group.
  void post_collective(const Collective& collective) override;
  void wait_collective(const Collective& collective) override;

 private:
  // "ring attention: rank R failed at ring step S receiving K/V from rank P"
  std::string describe(const Exchange& exchange, bool receiving) const;

  struct Pending {  // a half the exchange does not have stays empty
    c10::intrusive_ptr<c10d::Work> send;
    c10::intrusive_ptr<c10d::Work> recv;
    c10::intrusive_ptr<c10d::Work> batch;  // both halves, when coalesced
  };
  // Posts the halves of `exchange` into `pending` (one batch when coalescing).
  void post_halves(const Exchange& exchange, Pending& pending);
  c10::intrusive_ptr<c10d::ProcessGroup> group_;
  const std::vector<at::Tensor>& slots_;
  double timeout_s_;
  int rank_;
  int world_;
  std::optional<c10::DeviceType> coalesce_;  // the backend's device type, when it coalesces
  std::map<std::pair<int, int>, Pending> pending_;
  std::map<int, c10::intrusive_ptr<c10d::Work>> collectives_;  // by kind
};

}  // namespace ring_attn
