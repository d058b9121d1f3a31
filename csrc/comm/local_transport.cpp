#include "comm/local_transport.h"

#include <c10/util/Exception.h>

#include <map>
#include <optional>
#include <string>

#include "core/local_exchanges.h"

#if defined(RING_ATTN_WITH_CUDA)
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <type_traits>
#endif

namespace ring_attn {

namespace {

#if defined(RING_ATTN_WITH_CUDA)
// A CUDA event recorded on `stream` now, destroyed with its last owner.
using Event = std::shared_ptr<std::remove_pointer_t<cudaEvent_t>>;
Event record_event(cudaStream_t stream) {
  cudaEvent_t event = nullptr;
  C10_CUDA_CHECK(cudaEventCreateWithFlags(&event, cudaEventDisableTiming));
  C10_CUDA_CHECK(cudaEventRecord(event, stream));
  return Event(event, [](cudaEvent_t e) { cudaEventDestroy(e); });
}
void stream_wait(cudaStream_t stream, const Event& event) {
  C10_CUDA_CHECK(cudaStreamWaitEvent(stream, event.get(), 0));
}
cudaStream_t current_stream(const at::Tensor& on_device) {
  return c10::cuda::getCurrentCUDAStream(on_device.get_device()).stream();
}
#endif

// What a rank's post of an exchange leaves for the copies and the wait (a half the exchange does
// not have stays undefined).
struct PostedSlots {
  at::Tensor send;
  at::Tensor recv;
#if defined(RING_ATTN_WITH_CUDA)
  Event posted;    // on the poster's stream at the post: its slots are ready
  Event in_done;   // the copy into recv
  Event out_done;  // the copy out of send
#endif
};

}  // namespace

struct LocalHub::State {
  explicit State(int world) : exchanges(world) {
#if defined(RING_ATTN_WITH_CUDA)
    comm_streams.resize(world);
#endif
  }

  // The sender's send slot into the receiver's receive slot.
  void copy(PostedSlots& from, PostedSlots& to, int receiver) {
#if defined(RING_ATTN_WITH_CUDA)
    if (to.recv.is_cuda()) {
      const c10::cuda::CUDAStream comm = comm_stream(receiver, to.recv.get_device());
      stream_wait(comm.stream(), from.posted);
      stream_wait(comm.stream(), to.posted);
      {
        c10::cuda::CUDAStreamGuard guard(comm);
        to.recv.copy_(from.send, /*non_blocking=*/true);
      }
      const Event done = record_event(comm.stream());
      to.in_done = done;
      from.out_done = done;
      return;
    }
#endif
    (void)receiver;
    to.recv.copy_(from.send);
  }

#if defined(RING_ATTN_WITH_CUDA)
  // Virtual rank `rank`'s communication stream (from torch's pool, created on first use).
  c10::cuda::CUDAStream comm_stream(int rank, int device) {
    if (!comm_streams[rank]) {
      comm_streams[rank] =
          c10::cuda::getStreamFromPool(false, static_cast<c10::DeviceIndex>(device));
    }
    return *comm_streams[rank];
  }
  std::vector<std::optional<c10::cuda::CUDAStream>> comm_streams;
#endif
  LocalExchanges<PostedSlots> exchanges;
  // Per collective kind: every rank's (send, recv) once posted, and which ranks still wait.
  std::map<int, std::vector<PostedSlots>> collective_slots;
  std::map<int, std::vector<bool>> collective_waiting;
};

LocalHub::LocalHub(int world) : state_(std::make_unique<State>(world)) {}
LocalHub::~LocalHub() = default;

int LocalHub::world() const { return state_->exchanges.world(); }

void LocalHub::post(int rank, const Exchange& exchange, const std::vector<at::Tensor>& slots) {
  PostedSlots mine;
  if (exchange.sends()) mine.send = slots.at(exchange.send_slot);
  if (exchange.receives()) mine.recv = slots.at(exchange.recv_slot);
#if defined(RING_ATTN_WITH_CUDA)
  const at::Tensor& either = exchange.sends() ? mine.send : mine.recv;
  if (either.is_cuda()) mine.posted = record_event(current_stream(either));
#endif
  state_->exchanges.post(rank, exchange, std::move(mine),
                         [this](PostedSlots& from, PostedSlots& to, int receiver) {
                           state_->copy(from, to, receiver);
                         });
}

void LocalHub::wait(int rank, const Exchange& exchange) {
  const auto done = state_->exchanges.complete(rank, exchange);
  if (!done.has_value()) {
    // The peer of a half that did not complete: the sender for a receive, else the receiver.
    const int peer = mod(rank + (exchange.receives() ? -exchange.offset : exchange.offset), world());
    TORCH_CHECK(false, "LocalRing: virtual rank ", rank, " waits for ",
                channel_name(exchange.channel), " of ring step ", exchange.step,
                exchange.receives() ? " from" : " to", " rank ", peer,
                exchange.receives() && exchange.sends()
                    ? " (or sending to rank " +
                          std::to_string(mod(rank + exchange.offset, world())) + ")"
                    : std::string(),
                ", which never posted its end: the schedule would deadlock");
  }
#if defined(RING_ATTN_WITH_CUDA)
  const PostedSlots& mine = done->posted;
  const at::Tensor& either = done->receives ? mine.recv : mine.send;
  if (either.is_cuda()) {
    const cudaStream_t stream = current_stream(either);
    if (done->receives) stream_wait(stream, mine.in_done);   // the receive slot is filled
    if (done->sends) stream_wait(stream, mine.out_done);     // the send slot may be written again
  }
#endif
}

void LocalHub::post_collective(int rank, const Collective& collective,
                               const std::vector<at::Tensor>& slots) {
  const int kind = static_cast<int>(collective.kind);
  auto& posted = state_->collective_slots[kind];
  auto& waiting = state_->collective_waiting[kind];
  if (posted.empty()) {
    posted.resize(world());
    waiting.assign(world(), false);
  }
  TORCH_CHECK(!waiting[rank] && !posted[rank].send.defined(), "LocalRing: virtual rank ", rank,
              " posted the ", collective_name(collective.kind), " twice");
  posted[rank].send = slots.at(collective.send_slot);
  posted[rank].recv = slots.at(collective.recv_slot);
  waiting[rank] = true;
  for (const PostedSlots& p : posted) {
    if (!p.send.defined()) return;
  }
  // Every rank has posted: run it.
  for (int r = 0; r < world(); ++r) {
    if (collective.kind == CollectiveKind::kAllGather) {
      for (int source = 0; source < world(); ++source) posted[r].recv[source].copy_(posted[source].send);
    } else {
      posted[r].recv.copy_(posted[0].send[r]);
      for (int source = 1; source < world(); ++source) posted[r].recv.add_(posted[source].send[r]);
    }
  }
  for (PostedSlots& p : posted) p = PostedSlots{};
}

void LocalHub::wait_collective(int rank, const Collective& collective) {
  const int kind = static_cast<int>(collective.kind);
  auto& posted = state_->collective_slots[kind];
  auto& waiting = state_->collective_waiting[kind];
  const bool done = !waiting.empty() && waiting[rank] && !posted[rank].send.defined();
  TORCH_CHECK(done, "LocalRing: virtual rank ", rank, " waits for the ",
              collective_name(collective.kind), " before every rank posted it: the schedule "
              "would deadlock");
  waiting[rank] = false;
}

void LocalHub::check_drained() const {
  for (int rank = 0; rank < world(); ++rank) {
    const size_t pending = state_->exchanges.pending(rank);
    TORCH_CHECK(pending == 0, "LocalRing: rank ", rank, " has ", pending,
                " exchanges that never completed");
  }
  for (const auto& [kind, waiting] : state_->collective_waiting) {
    for (int rank = 0; rank < world(); ++rank) {
      TORCH_CHECK(!waiting[rank], "LocalRing: rank ", rank, " never waited for the ",
                  collective_name(static_cast<CollectiveKind>(kind)));
    }
  }
}

}  // namespace ring_attn
