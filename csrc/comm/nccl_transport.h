// Ring transport over a raw NCCL communicator (RING_ATTN_TRANSPORT=nccl; CUDA builds with the
// nvidia-nccl wheel only: RING_ATTN_WITH_NCCL).
//
// The communicator: one per torch process group, created on first use from the group (rank 0's
// ncclUniqueId broadcast through it) and cached while the group lives. The NCCL library is
// torch's own libnccl.so.2 (import torch first).
//
// Streams and events, per exchange (channel, step):
//   compute stream: ... kernels --record(ready)-->                 --wait(done)--> kernels using recv
//   comm stream   :               --wait(ready)--> ncclGroupStart; ncclSend(next); ncclRecv(prev);
//                                                  ncclGroupEnd --record(done)-->
// (ncclSend or ncclRecv only where the exchange has only that half). NCCL pairs the sends and
// receives between two ranks in the order they are issued (no tags): every rank posts its
// exchanges in the same (step, channel) order, so each hop's send meets its receive.
// `ready` is recorded on the compute stream when the exchange is posted: the send buffer is written
// and the receive buffer's previous contents consumed (the slot's 'consumed' event) by then. wait()
// makes the compute stream wait on `done` and never blocks the host. The send buffer is not
// rewritten before `done` either: the scheduler writes a slot only after waiting for its exchange.
//
// Deadlines: a watchdog thread polls the events of outstanding exchanges. An exchange whose `ready`
// completed more than RING_ATTN_TIMEOUT seconds ago without `done` aborts the communicator
// (ncclCommAbort, which also releases the stream), prints the error on stderr at once (the call
// whose exchange hung has returned already: its outputs are invalid), and the next
// post()/wait()/ring call of any transport over that group raises RingTimeoutError on the host
// thread. RING_ATTN_NCCL_ABORT_ON_ERROR=1 ends the process instead, as torch's NCCL watchdog does.
// NCCL fuses the send and the receive of an exchange into one kernel, so the error of an exchange
// with both halves names both peers.
// Under CUDA graph capture exchanges carry no deadline (captured events cannot be queried), and
// the communicator must exist before capture (run one ring call first): creating it communicates.
#pragma once

#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include <memory>
#include <vector>

#include "core/ring_scheduler.h"

namespace ring_attn {

// `slots` (CUDA tensors of the current device) must outlive the transport.
std::unique_ptr<Transport> make_nccl_transport(const c10::intrusive_ptr<c10d::ProcessGroup>& group,
                                               const std::vector<at::Tensor>& slots,
                                               double timeout_s);

}  // namespace ring_attn
