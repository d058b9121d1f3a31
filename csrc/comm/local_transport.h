// In-memory transport between the virtual ranks of a LocalRing, all driven in lockstep by one
// thread (run_lockstep in core/ring_scheduler.h). The matching of posts is core/local_exchanges.h;
// this adds the copies. On CPU a hop's copy runs as soon as both its ranks have posted the
// exchange. On CUDA it runs on the receiver's communication stream after events recorded at both
// posts, so it overlaps the computation queued behind them; wait() makes the current stream wait
// for the copies into and out of this rank's slots (never the host).
#pragma once

#include <ATen/core/Tensor.h>

#include <memory>
#include <vector>

#include "core/local_exchanges.h"
#include "core/ring_scheduler.h"

namespace ring_attn {

// The exchanges of all the virtual ranks of one ring call.
class LocalHub {
 public:
  explicit LocalHub(int world);
  ~LocalHub();
  int world() const;
  // `slots`: the posting rank's tensors by scheduler slot.
  void post(int rank, const Exchange& exchange, const std::vector<at::Tensor>& slots);
  void wait(int rank, const Exchange& exchange);
  // Collectives run on the current stream once every rank has posted them, summing in rank order.
  void post_collective(int rank, const Collective& collective,
                       const std::vector<at::Tensor>& slots);
  void wait_collective(int rank, const Collective& collective);
  // Raises unless every posted exchange was copied and waited for.
  void check_drained() const;

 private:
  struct State;
  std::unique_ptr<State> state_;
};

// One virtual rank's view of a LocalHub.
using LocalTransport = HubTransport<LocalHub, std::vector<at::Tensor>>;

}  // namespace ring_attn
