// NCCL ring transport: see nccl_transport.h for the stream/event protocol and the watchdog.
#include "comm/nccl_transport.h"

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <nccl.h>
#include <nvtx3/nvToolsExt.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <list>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <utility>

#include "comm/c10d_transport.h"
#include "comm/group_devices.h"

namespace ring_attn {
namespace {

using Clock = std::chrono::steady_clock;

// Raises with the failing call and the library's message unless expr returned `ok`.
#define RA_STATUS_CHECK(expr, ok, message_of)                                                 \
  do {                                                                                         \
    const auto _status = (expr);                                                               \
    TORCH_CHECK(_status == ok, "ring attention (NCCL transport): ", #expr, ": ",               \
                message_of(_status));                                                          \
  } while (0)
#define RA_CUDA_CHECK(expr) RA_STATUS_CHECK(expr, cudaSuccess, cudaGetErrorString)
#define RA_NCCL_CHECK(expr) RA_STATUS_CHECK(expr, ncclSuccess, ncclGetErrorString)

// One NCCL communicator per (process group, device). Once aborted it stays in the cache while its
// group lives, so every later ring call over the group raises the error instead of hanging or
// creating a new one. The cache holds the group weakly: destroying the group (as a failure's
// error advises) drops the entry, and the communicator is aborted once nothing uses it.
struct Communicator {
  WeakGroup group;
  ncclComm_t comm = nullptr;
  int rank = 0;
  int world = 1;
  int device = 0;
  std::mutex mutex;
  std::atomic<bool> failed{false};
  // What failed (for RingTimeoutError or a plain runtime_error).
  bool timed_out = false;
  double timeout_s = 0;
  int step = 0;
  Channel channel = Channel::kKV;
  bool receiving = true;  // the hop has a receive half: `peer` is the rank received from
  int peer = 0;           // received from, or sent to for a send alone
  int send_peer = 0;      // sent to when the hop has both halves, else -1
  std::string error;

  explicit Communicator(const c10::intrusive_ptr<c10d::ProcessGroup>& group_) : group(group_) {}

  // ncclCommAbort, not ncclCommDestroy: destroying finalizes, which waits for the operations still
  // queued on the communicator, forever where a peer died; abort returns without the peers.
  ~Communicator() {
    try {
      abort();
    } catch (...) {  // a failing CUDA device: nothing more to free
    }
  }

  // Aborts the communicator (NCCL frees it) unless that happened already; releases the kernels
  // of its exchanges still in flight.
  void abort() {
    std::lock_guard<std::mutex> lock(mutex);
    if (aborted || comm == nullptr) return;
    aborted = true;
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
    ncclCommAbort(comm);
  }

  // The communicator's asynchronous error; ncclSuccess once it was aborted (its handle is freed).
  ncclResult_t async_error() {
    std::lock_guard<std::mutex> lock(mutex);
    ncclResult_t async = ncclSuccess;
    if (aborted || ncclCommGetAsyncError(comm, &async) != ncclSuccess) return ncclSuccess;
    return async;
  }

  void fail_timeout(double seconds, int step_, Channel channel_, bool receiving_, int peer_,
                    int send_peer_) {
    {
      std::lock_guard<std::mutex> lock(mutex);
      if (failed || aborted) return;  // aborted: its group is gone, nobody to tell
      failed = timed_out = true;
      timeout_s = seconds;
      step = step_;
      channel = channel_;
      receiving = receiving_;
      peer = peer_;
      send_peer = send_peer_;
    }
    abort();  // releases the kernels stuck in the exchange
    report();
  }

  void fail_async(const std::string& what) {
    {
      std::lock_guard<std::mutex> lock(mutex);
      if (failed || aborted) return;  // aborted: its group is gone, nobody to tell
      failed = true;
      error = what;
    }
    abort();
    report();
  }

  // Raises the recorded failure on the calling (host) thread.
  void check() {
    std::lock_guard<std::mutex> lock(mutex);
    if (!failed) return;
    throw_failure();
  }

 private:
  bool aborted = false;  // guarded by `mutex`

  RingTimeoutError timeout_error() const {
    return RingTimeoutError(timeout_s, step, channel, receiving, peer, send_peer);
  }
  std::string abort_message() const {
    return "ring attention (NCCL transport): rank " + std::to_string(rank) +
           ": the communicator failed and was aborted: " + error;
  }
  [[noreturn]] void throw_failure() const {
    if (timed_out) throw timeout_error();
    throw std::runtime_error(abort_message());
  }

  // The watchdog notices a failure after the ring call has returned (the host never waits on the
  // streams), and the outputs of the calls in flight are garbage. So it says so at once on stderr,
  // and with RING_ATTN_NCCL_ABORT_ON_ERROR=1 ends the process, as torch's NCCL watchdog does;
  // otherwise the next ring call over this group raises the error.
  void report() const {
    const std::string message = timed_out ? timeout_error().what() : abort_message();
    std::fprintf(stderr,
                 "[ring_attention rank %d] %s The outputs of ring calls still in flight on this "
                 "group are invalid; the next ring call over it raises this error.\n",
                 rank, message.c_str());
    std::fflush(stderr);
    const char* abort_env = std::getenv("RING_ATTN_NCCL_ABORT_ON_ERROR");
    if (abort_env != nullptr && std::string(abort_env) == "1") std::abort();
  }
};

// One exchange in flight: its events and what to say if it never completes.
struct Pending {
  std::shared_ptr<Communicator> comm;
  cudaEvent_t ready = nullptr;
  cudaEvent_t done = nullptr;
  int step = 0;
  Channel channel = Channel::kKV;
  bool receiving = true;  // as in Communicator
  int peer = 0;
  int send_peer = 0;
  double timeout_s = 0;
  std::atomic<bool> finished{false};
  Clock::time_point started;  // when `ready` was first seen complete (watchdog only)
  bool started_known = false;

  ~Pending() {
    if (ready) cudaEventDestroy(ready);  // released by the runtime once the event completes
    if (done) cudaEventDestroy(done);
  }
};

// Polls the events of outstanding exchanges; never synchronises a stream. Lives (and its thread
// runs) for the process lifetime.
class Watchdog {
 public:
  static Watchdog& get() {
    static Watchdog* instance = new Watchdog();  // never destroyed: its thread is detached
    return *instance;
  }

  void add(std::shared_ptr<Pending> pending) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      pending_.push_back(std::move(pending));
    }
    cv_.notify_one();
  }

 private:
  Watchdog() { std::thread([this] { loop(); }).detach(); }

  void loop() {
    std::unique_lock<std::mutex> lock(mutex_);
    while (true) {
      cv_.wait(lock, [this] { return !pending_.empty(); });
      const auto now = Clock::now();
      for (auto it = pending_.begin(); it != pending_.end();) {
        Pending& p = **it;
        if (p.finished || p.comm->failed) {
          it = pending_.erase(it);
          continue;
        }
        c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(p.comm->device));
        if (cudaEventQuery(p.done) == cudaSuccess) {
          p.finished = true;
          it = pending_.erase(it);
          continue;
        }
        const ncclResult_t async = p.comm->async_error();
        if (async != ncclSuccess && async != ncclInProgress) {
          p.comm->fail_async(ncclGetErrorString(async));
          it = pending_.erase(it);
          continue;
        }
        if (!p.started_known && cudaEventQuery(p.ready) == cudaSuccess) {
          p.started_known = true;  // the deadline counts from when the exchange could start
          p.started = now;
        }
        if (p.started_known && p.timeout_s > 0 &&
            std::chrono::duration<double>(now - p.started).count() > p.timeout_s) {
          p.comm->fail_timeout(p.timeout_s, p.step, p.channel, p.receiving, p.peer, p.send_peer);
          it = pending_.erase(it);
          continue;
        }
        ++it;
      }
      lock.unlock();
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
      lock.lock();
    }
  }

  std::mutex mutex_;
  std::condition_variable cv_;
  std::list<std::shared_ptr<Pending>> pending_;
};

// The dedicated communication stream of a device (created once, never destroyed).
cudaStream_t comm_stream(int device) {
  static std::mutex mutex;
  static std::map<int, cudaStream_t> streams;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = streams.find(device);
  if (it != streams.end()) return it->second;
  int low = 0, high = 0;
  RA_CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&low, &high));
  cudaStream_t stream = nullptr;
  RA_CUDA_CHECK(cudaStreamCreateWithPriority(&stream, cudaStreamNonBlocking, high));
  streams[device] = stream;
  return stream;
}

// One exchange given up after an error, with its buffers: a late or aborted kernel may still
// touch them until its `done` event fires.
struct KeptExchange {
  std::shared_ptr<Pending> pending;
  at::Tensor send;
  at::Tensor recv;
};

std::mutex g_kept_mutex;
auto* g_kept = new std::vector<KeptExchange>();  // never freed

// Whether the kernels of a kept exchange ended; aborts its communicator first where its group is
// gone. False where CUDA cannot tell (it throws), so the exchange is kept.
bool exchange_finished(const KeptExchange& kept) noexcept {
  try {
    Communicator& comm = *kept.pending->comm;
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(comm.device));
    if (cudaEventQuery(kept.pending->done) == cudaSuccess) return true;
    if (comm.group.expired()) comm.abort();
    return false;
  } catch (...) {
    return false;
  }
}

// Drops the kept exchanges whose `done` fired: their kernels ended, so their buffers (and, with
// the last of them, the communicator) may go. An exchange whose group is gone will never be waited
// for, and no ring call can reach its communicator again, so that communicator is aborted: this
// ends its kernels (NCCL releases them), `done` fires and a later call releases the exchange.
// Freeing the buffers before `done` would let the allocator hand them out while a kernel writes.
// Events cannot be queried during CUDA graph capture, so nothing is released then.
// The caller locks g_kept_mutex.
void release_finished_exchanges(bool capturing) {
  if (capturing) return;
  auto& kept = *g_kept;
  kept.erase(std::remove_if(kept.begin(), kept.end(), exchange_finished), kept.end());
}

void keep_until_finished(KeptExchange exchange, bool capturing) {
  std::lock_guard<std::mutex> lock(g_kept_mutex);
  release_finished_exchanges(capturing);
  g_kept->push_back(std::move(exchange));
}

// The group's communicator on `device`, created collectively on first use: every rank of the group
// must call this (they do when every rank sets the same RING_ATTN_TRANSPORT; where one does not,
// the others raise at the deadline rather than wait for it forever).
// Entries of destroyed groups are dropped first, and an entry is only reused when it refers to
// `group` itself: a new group allocated at a destroyed group's address (the key) gets a new
// communicator, never the old one, whose peers may be gone.
std::shared_ptr<Communicator> communicator(const c10::intrusive_ptr<c10d::ProcessGroup>& group,
                                           int device, double timeout_s) {
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  RA_CUDA_CHECK(cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream(device).stream(), &capture));
  {
    std::lock_guard<std::mutex> lock(g_kept_mutex);
    release_finished_exchanges(capture != cudaStreamCaptureStatusNone);
  }
  static std::mutex mutex;
  static auto* cache = new std::map<std::pair<const void*, int>, std::shared_ptr<Communicator>>();
  std::lock_guard<std::mutex> lock(mutex);
  for (auto it = cache->begin(); it != cache->end();) {
    it = it->second->group.expired() ? cache->erase(it) : std::next(it);
  }
  const auto key = std::make_pair(static_cast<const void*>(group.get()), device);
  auto it = cache->find(key);
  if (it != cache->end() && refers_to(it->second->group, *group)) return it->second;

  TORCH_CHECK(capture == cudaStreamCaptureStatusNone,
              "ring attention (NCCL transport): the NCCL communicator of this process group does "
              "not exist yet and cannot be created during CUDA graph capture; run one ring call "
              "before capturing");

  auto c = std::make_shared<Communicator>(group);
  c->rank = group->getRank();
  c->world = group->getSize();
  c->device = device;
  // Rank 0's unique id travels through the user's group, on the device its backends accept (the
  // CPU where it has a CPU backend, this GPU for an NCCL-only group).
  const at::Device cuda_device(at::kCUDA, static_cast<c10::DeviceIndex>(device));
  const at::Device id_device = collective_device(*group, cuda_device).value_or(cuda_device);
  at::Tensor id = at::zeros({NCCL_UNIQUE_ID_BYTES}, at::TensorOptions().dtype(at::kByte));
  if (c->rank == 0) {
    ncclUniqueId unique;
    RA_NCCL_CHECK(ncclGetUniqueId(&unique));
    std::memcpy(id.data_ptr(), &unique, sizeof(unique));
  }
  std::vector<at::Tensor> tensors{id.to(id_device)};
  c10d::BroadcastOptions options;
  options.rootRank = 0;
  wait_or_raise(group->broadcast(tensors, options), *group, timeout_s, "ring attention",
                "creating the NCCL transport's communicator (every rank must use "
                "RING_ATTN_TRANSPORT=nccl)");
  const at::Tensor host = tensors[0].cpu();
  ncclUniqueId unique;
  std::memcpy(&unique, host.data_ptr(), sizeof(unique));
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  RA_NCCL_CHECK(ncclCommInitRank(&c->comm, c->world, unique, c->rank));
  cache->insert_or_assign(key, c);
  return c;
}

class NcclTransport final : public Transport {
 public:
  NcclTransport(const c10::intrusive_ptr<c10d::ProcessGroup>& group,
                const std::vector<at::Tensor>& slots, double timeout_s)
      : slots_(slots), timeout_s_(timeout_s) {
    const at::Tensor& own = slots.at(slot::kOwnKV);
    TORCH_CHECK_VALUE(own.is_cuda(), "RING_ATTN_TRANSPORT=nccl needs CUDA tensors");
    device_ = own.get_device();
    comm_ = communicator(group, device_, timeout_s);
    comm_->check();
    compute_ = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device_)).stream();
    stream_ = comm_stream(device_);
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    RA_CUDA_CHECK(cudaStreamIsCapturing(compute_, &capture));
    capturing_ = capture != cudaStreamCaptureStatusNone;
  }

  ~NcclTransport() override {
    for (auto& [key, entry] : pending_) {  // only after an error
      keep_until_finished({entry.pending, entry.send, entry.recv}, capturing_);
    }
  }

  int rank() const override { return comm_->rank; }
  int world_size() const override { return comm_->world; }

  void post(const Exchange& x) override {
    comm_->check();
    // A half the exchange does not have is an undefined tensor.
    const at::Tensor send = x.sends() ? slots_.at(x.send_slot) : at::Tensor();
    const at::Tensor recv = x.receives() ? slots_.at(x.recv_slot) : at::Tensor();
    TORCH_CHECK((!x.sends() || send.is_contiguous()) && (!x.receives() || recv.is_contiguous()) &&
                    (!x.sends() || !x.receives() || send.nbytes() == recv.nbytes()),
                "ring attention (NCCL transport): internal error, mismatched slots");
    const int next = mod(comm_->rank + x.offset, comm_->world);
    const int prev = mod(comm_->rank - x.offset, comm_->world);
    const std::string name = std::string("ring exchange ") + channel_name(x.channel) + " step " +
                             std::to_string(x.step);
    nvtxRangePushA(name.c_str());
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
    auto p = std::make_shared<Pending>();
    p->comm = comm_;
    p->step = x.step;
    p->channel = x.channel;
    p->receiving = x.receives();
    p->peer = x.receives() ? prev : next;
    p->send_peer = x.sends() && x.receives() ? next : -1;
    p->timeout_s = timeout_s_;
    RA_CUDA_CHECK(cudaEventCreateWithFlags(&p->ready, cudaEventDisableTiming));
    RA_CUDA_CHECK(cudaEventCreateWithFlags(&p->done, cudaEventDisableTiming));
    // ready: send buffer written, receive buffer consumed (all earlier compute-stream work).
    RA_CUDA_CHECK(cudaEventRecord(p->ready, compute_));
    RA_CUDA_CHECK(cudaStreamWaitEvent(stream_, p->ready, 0));
    RA_NCCL_CHECK(ncclGroupStart());
    // The group is closed even when a half fails: an open group would take in this thread's next
    // NCCL calls (torch's collectives too) and never launch them.
    ncclResult_t halves = ncclSuccess;
    if (x.sends()) {
      halves = ncclSend(send.data_ptr(), send.nbytes(), ncclUint8, next, comm_->comm, stream_);
    }
    if (halves == ncclSuccess && x.receives()) {
      halves = ncclRecv(recv.data_ptr(), recv.nbytes(), ncclUint8, prev, comm_->comm, stream_);
    }
    const ncclResult_t ended = ncclGroupEnd();
    TORCH_CHECK(halves == ncclSuccess, "ring attention (NCCL transport): ncclSend/ncclRecv: ",
                ncclGetErrorString(halves));
    RA_NCCL_CHECK(ended);
    RA_CUDA_CHECK(cudaEventRecord(p->done, stream_));
    nvtxRangePop();
    if (!capturing_ && timeout_s_ > 0) Watchdog::get().add(p);
    pending_[{static_cast<int>(x.channel), x.step}] = Entry{p, send, recv};
  }

  void wait(const Exchange& x) override {
    wait_for({static_cast<int>(x.channel), x.step}, channel_name(x.channel));
  }

  // ncclAllGather / ncclReduceScatter (sum) on the communication stream, with the same events and
  // deadline as an exchange; a timeout names the ring neighbours of NCCL's ring algorithm.
  void post_collective(const Collective& c) override {
    comm_->check();
    const at::Tensor& send = slots_.at(c.send_slot);
    const at::Tensor& recv = slots_.at(c.recv_slot);
    TORCH_CHECK(send.is_contiguous() && recv.is_contiguous(),
                "ring attention (NCCL transport): internal error, non-contiguous slots");
    const bool gather = c.kind == CollectiveKind::kAllGather;
    nvtxRangePushA(collective_name(c.kind));
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
    auto p = std::make_shared<Pending>();
    p->comm = comm_;
    p->step = 0;
    p->channel = gather ? Channel::kKV : Channel::kGradKV;
    p->peer = mod(comm_->rank - 1, comm_->world);
    p->send_peer = mod(comm_->rank + 1, comm_->world);
    p->timeout_s = timeout_s_;
    RA_CUDA_CHECK(cudaEventCreateWithFlags(&p->ready, cudaEventDisableTiming));
    RA_CUDA_CHECK(cudaEventCreateWithFlags(&p->done, cudaEventDisableTiming));
    RA_CUDA_CHECK(cudaEventRecord(p->ready, compute_));
    RA_CUDA_CHECK(cudaStreamWaitEvent(stream_, p->ready, 0));
    if (gather) {
      RA_NCCL_CHECK(ncclAllGather(send.data_ptr(), recv.data_ptr(), send.nbytes(), ncclUint8,
                                  comm_->comm, stream_));
    } else {
      TORCH_CHECK(send.numel() == recv.numel() * comm_->world,
                  "ring attention (NCCL transport): internal error, mismatched slots");
      const ncclDataType_t type = recv.scalar_type() == at::kDouble ? ncclFloat64 : ncclFloat32;
      RA_NCCL_CHECK(ncclReduceScatter(send.data_ptr(), recv.data_ptr(), recv.numel(), type,
                                      ncclSum, comm_->comm, stream_));
    }
    RA_CUDA_CHECK(cudaEventRecord(p->done, stream_));
    nvtxRangePop();
    if (!capturing_ && timeout_s_ > 0) Watchdog::get().add(p);
    pending_[collective_key(c)] = Entry{p, send, recv};
  }

  void wait_collective(const Collective& c) override {
    wait_for(collective_key(c), collective_name(c.kind));
  }

 private:
  struct Entry {
    std::shared_ptr<Pending> pending;
    at::Tensor send;
    at::Tensor recv;
  };
  // Collectives are keyed apart from the exchanges' (channel, step).
  static std::pair<int, int> collective_key(const Collective& c) {
    return {kChannelCount + static_cast<int>(c.kind), 0};
  }

  void wait_for(const std::pair<int, int>& key, const char* what) {
    comm_->check();
    auto it = pending_.find(key);
    TORCH_CHECK(it != pending_.end(), "ring attention: internal error, waiting for ", what,
                " (step ", key.second, ") that was never posted");
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
    // The compute stream (not the host) waits for the received buffer.
    RA_CUDA_CHECK(cudaStreamWaitEvent(compute_, it->second.pending->done, 0));
    pending_.erase(it);
  }

  const std::vector<at::Tensor>& slots_;
  double timeout_s_;
  int device_ = 0;
  bool capturing_ = false;
  std::shared_ptr<Communicator> comm_;
  cudaStream_t compute_ = nullptr;
  cudaStream_t stream_ = nullptr;
  std::map<std::pair<int, int>, Entry> pending_;
};

}  // namespace

std::unique_ptr<Transport> make_nccl_transport(const c10::intrusive_ptr<c10d::ProcessGroup>& group,
                                               const std::vector<at::Tensor>& slots,
                                               double timeout_s) {
  return std::make_unique<NcclTransport>(group, slots, timeout_s);
}

}  // namespace ring_attn
