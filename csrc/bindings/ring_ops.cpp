#include "bindings/ring_ops.h"

#include <ATen/ATen.h>
#include <torch/csrc/distributed/c10d/GroupRegistry.hpp>

#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "bindings/agreement.h"
#include "bindings/tensor_params.h"
#include "comm/c10d_transport.h"
#include "comm/group_devices.h"
#if defined(RING_ATTN_WITH_NCCL)
#include "comm/nccl_transport.h"
#endif
#if defined(RING_ATTN_WITH_CUDA)
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <type_traits>
#include <nvtx3/nvToolsExt.h>  // header-only; a no-op unless a profiler is attached
#endif
#include "core/bounded_cache.h"
#include "core/layout.h"
#include "core/ring_scheduler.h"

namespace ring_attn {

double ring_timeout_seconds() {
  const char* env = std::getenv("RING_ATTN_TIMEOUT");
  if (env == nullptr || *env == '\0') return 300.0;
  char* end = nullptr;
  const double value = std::strtod(env, &end);
  TORCH_CHECK_VALUE(end != env && *end == '\0', "RING_ATTN_TIMEOUT must be a number of seconds, got '",
                    env, "'");
  return value;
}

bool ring_check_enabled() {
  const char* env = std::getenv("RING_ATTN_CHECK");
  return env == nullptr || std::string(env) != "0";
}

namespace {

thread_local RingStats g_last_stats;

enum class TransportKind { kC10d, kNccl };

template <typename Schedule>
void record_stats(const std::vector<Schedule>& schedules) {
  RingStats stats;
  for (const Schedule& s : schedules) {
    stats.steps = s.num_steps();
    stats.blocks_computed += s.blocks_computed();
    stats.exchanges_posted += s.exchanges_posted();
  }
  g_last_stats = stats;
}

// World size 1: the scheduler never exchanges anything.
class SoloTransport final : public Transport {
 public:
  int rank() const override { return 0; }
  int world_size() const override { return 1; }
  void post(const Exchange&) override { TORCH_CHECK(false, "ring attention: internal error, solo post"); }
  void wait(const Exchange&) override { TORCH_CHECK(false, "ring attention: internal error, solo wait"); }
};

c10::intrusive_ptr<c10d::ProcessGroup> resolve_group(const std::string& name) {
  if (name.empty()) return {};
  return c10d::resolve_process_group(name);
}

// The K/V of a block packed as (2, batch, seqlen, heads_kv, headdim): one message per hop.
at::Tensor pack_kv(const at::Tensor& k, const at::Tensor& v, at::ScalarType dtype) {
  at::Tensor packed = at::empty({2, k.size(0), k.size(1), k.size(2), k.size(3)},
                                k.options().dtype(dtype));
  packed[0].copy_(k);
  packed[1].copy_(v);
  return packed;
}

// Device copies of the rings' token positions and sequence ranges, kept across calls and keyed
// by what determines them (device, layout, world size, rank, local length, cu_seqlens), within
// 64 MiB (least recently used first). Once a configuration has run, a ring call copies nothing
// from host to device: no pageable copy that holds up the host, and the call can be captured in
// a CUDA graph. A copy used under capture is pinned: the graph keeps its address.
at::Tensor device_copy(const std::string& key, const at::Tensor& host, const at::Device& device) {
  static std::mutex mutex;
  static BoundedCache<at::Tensor> copies(size_t{64} << 20);
  const std::string full_key = device.str() + "|" + key;
  bool capturing = false;
#if defined(RING_ATTN_WITH_CUDA)
  if (device.is_cuda()) {
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    C10_CUDA_CHECK(cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream(device.index()).stream(),
                                         &status));
    capturing = status != cudaStreamCaptureStatusNone;
  }
#endif
  std::lock_guard<std::mutex> lock(mutex);
  if (const at::Tensor* found = copies.find(full_key, capturing)) return *found;
  TORCH_CHECK(!capturing,
              "ring attention: this ring configuration (layout, world size, lengths, cu_seqlens) "
              "has not run on ", device, " yet, so its token positions would be copied from the "
              "host during CUDA graph capture; run one call of the same configuration before "
              "capturing");
  return copies.insert(full_key, host.to(device), host.nbytes(), false);
}

// Everything a rank knows about the ring for one call: every rank's positions (and, for packed
// sequences, every query's sequence range), which blocks each rank needs, and how many steps the
// ring runs. All of it is derived from the agreed arguments, so it is the same on every rank.
struct RingContext {
  int rank;
  int world;
  Layout layout = Layout::kContiguous;
  MaskSpec mask;
  int64_t local_len;
  bool packed;                          // packed variable-length sequences
  std::vector<at::Tensor> positions;    // per rank, int32 (local_len,)
  std::vector<at::Tensor> segments;     // per rank, int32 (local_len, 2) when packed
  std::vector<TileBounds> query_bounds; // per rank: its queries' visible-key bounds
  std::vector<PositionRange> key_ranges;// per rank: its keys' positions
  int steps;

  RingContext(int rank_, int world_, const RingOptions& options, int64_t local_len_)
      : rank(rank_), world(world_), local_len(local_len_), packed(options.cu_seqlens.defined()),
        positions(world_), segments(world_), query_bounds(world_), key_ranges(world_) {
    parse_layout(options.layout, &layout);
    mask.causal = options.causal;
    mask.window_left = options.window_left;
    mask.window_right = options.window_right;
    const at::Tensor cu = packed ? options.cu_seqlens.cpu().contiguous() : at::Tensor();
    cu_host = cu;
    for (int r = 0; r < world; ++r) {
      positions[r] = at::empty({local_len}, at::kInt);
      int32_t* pos = positions[r].data_ptr<int32_t>();
      const int32_t* seg = nullptr;
      if (packed) {
        segments[r] = at::empty({local_len, 2}, at::kInt);
        fill_varlen_positions(layout, r, world, cu.data_ptr<int32_t>(), cu.size(0) - 1, pos,
                              segments[r].data_ptr<int32_t>());
        seg = segments[r].data_ptr<int32_t>();
      } else {
        fill_positions(layout, r, world, local_len, pos);
      }
      query_bounds[r] = tile_bounds(mask, pos, seg, 0, local_len);
      key_ranges[r] = range_of(pos, 0, local_len);
    }
    steps = steps_needed(world, [this](int r, int source) { return needs(r, source); });
  }

  // Does rank r's queries see any key of `source`?
  bool needs(int r, int source) const {
    return classify_tile(query_bounds[r], key_ranges[source]) != TileKind::kSkip;
  }

  // Positions of `source`'s tokens and this rank's sequence ranges, on `device`.
  const at::Tensor& positions_of(int source, const at::Device& device) {
    return on_device(positions[source], "positions", source, device);
  }
  at::Tensor segments_of_rank(const at::Device& device) {
    return packed ? on_device(segments[rank], "segments", rank, device) : at::Tensor();
  }

 private:
  at::Tensor cu_host;  // packed: cu_seqlens on the host
  // What the positions depend on (layout, world size, local length, cu_seqlens), built by the
  // first device copy, so that host-only rings never build it.
  std::string key;

  // t (rank r's `what`), replaced by its device copy on the first call for another device.
  const at::Tensor& on_device(at::Tensor& t, const char* what, int r, const at::Device& device) {
    if (t.device() == device) return t;
    if (key.empty()) {
      key = std::to_string(static_cast<int>(layout)) + "|" + std::to_string(world) + "|" +
            std::to_string(local_len);
      for (int64_t i = 0; packed && i < cu_host.size(0); ++i) {
        key += "|" + std::to_string(cu_host.data_ptr<int32_t>()[i]);
      }
    }
    t = device_copy(std::string(what) + "|" + std::to_string(r) + "|" + key, t, device);
    return t;
  }
};

// An NVTX range around one ring step's block computation (CUDA builds; shows in Nsight Systems).
struct StepRange {
#if defined(RING_ATTN_WITH_CUDA)
  StepRange(const char* what, int source) {
    const std::string name = std::string("ring step: ") + what + " block of rank " +
                             std::to_string(source);
    nvtxRangePushA(name.c_str());
  }
  ~StepRange() { nvtxRangePop(); }
#else
  StepRange(const char*, int) {}
#endif
};

// BlockOps over tensors: slots hold packed K/V (input dtype) or packed dK/dV (accumulator dtype),
// the messages of the ring. Two blocks never travel and are kept apart instead: the own K/V on
// the CPU (own_k, own_v: the inputs themselves, packed only when they are sent) and the own
// dK/dV (home_dk, home_dv: the results, so no copy out of a packed buffer).
class TensorBlockOps final : public BlockOps {
 public:
  TensorBlockOps(const BlockKernels& kernels, RingContext& ring, std::vector<at::Tensor>& slots,
                 double scale)
      : kernels_(kernels), ring_(ring), slots_(slots), scale_(scale) {}

  // Forward state.
  at::Tensor q, out_acc, lse;
  // Backward state.
  at::Tensor dout, delta, dq_acc;
  bool deterministic = false;
  // Set: the own block's K and V (else slot kOwnKV); the own block's dK and dV (slot kGradHome).
  at::Tensor own_k, own_v, home_dk, home_dv;

  bool is_needed(int source) const override { return ring_.needs(ring_.rank, source); }

  void forward(int kv_slot, int source) override {
    StepRange range("forward", source);
    const auto [k, v] = kv_of(kv_slot);
    kernels_.fwd(make_fwd_params(q, k, v, q_pos(), ring_.positions_of(source, q.device()),
                                 ring_.segments_of_rank(q.device()), out_acc, lse, ring_.mask,
                                 scale_));
  }

  void backward(int kv_slot, int source, int grad_slot) override {
    StepRange range("backward", source);
    const auto [k, v] = kv_of(kv_slot);
    zero_grad(grad_slot);
    const auto [dk, dv] = grad_of(grad_slot);
    BlockBwdParams params = make_bwd_params(dout, q, k, v, q_pos(),
                                            ring_.positions_of(source, q.device()),
                                            ring_.segments_of_rank(q.device()), lse, delta,
                                            dq_acc, dk, dv, ring_.mask, scale_);
    params.deterministic = deterministic;
    kernels_.bwd(params);
  }

  void zero_grad(int grad_slot) override {
    const auto [dk, dv] = grad_of(grad_slot);
    dk.zero_();
    dv.zero_();
  }

  void add_grad(int dst_slot, int src_slot) override {
    const auto [dk, dv] = grad_of(dst_slot);
    const auto [sk, sv] = grad_of(src_slot);
    dk.add_(sk);
    dv.add_(sv);
  }

 private:
  const at::Tensor& q_pos() { return ring_.positions_of(ring_.rank, q.device()); }

  std::pair<at::Tensor, at::Tensor> kv_of(int kv_slot) const {
    if (kv_slot == slot::kOwnKV && own_k.defined()) return {own_k, own_v};
    const at::Tensor& kv = slots_.at(kv_slot);
    return {kv[0], kv[1]};
  }

  std::pair<at::Tensor, at::Tensor> grad_of(int grad_slot) const {
    if (grad_slot == slot::kGradHome) return {home_dk, home_dv};
    const at::Tensor& grad = slots_.at(grad_slot);
    return {grad[0], grad[1]};
  }

  const BlockKernels& kernels_;
  RingContext& ring_;
  std::vector<at::Tensor>& slots_;
  double scale_;
};

// Headdim must have unit stride for the kernels; anything else is copied once.
at::Tensor unit_last_stride(const at::Tensor& t) {
  return (t.size(-1) <= 1 || t.stride(-1) == 1) ? t : t.contiguous();
}

// Packed sequences are one (1, tokens, heads, headdim) batch to the kernels.
at::Tensor as_batch(const at::Tensor& t, const RingOptions& options) {
  return options.cu_seqlens.defined() ? t.unsqueeze(0) : t;
}
at::Tensor from_batch(const at::Tensor& t, const RingOptions& options) {
  return options.cu_seqlens.defined() ? t.squeeze(0) : t;
}

// The own block's K/V: packed into slot kOwnKV (one message per hop) when the ring sends it, and
// on the CPU read in place by the kernels (which take any strides) rather than from that copy.
// The receive slots are shaped like the packed block.
void own_kv(TensorBlockOps& ops, std::vector<at::Tensor>& slots, const at::Tensor& k,
            const at::Tensor& v, int steps) {
  if (k.is_cpu()) {
    ops.own_k = unit_last_stride(k);
    ops.own_v = unit_last_stride(v);
  }
  if (steps > 1 || !k.is_cpu()) slots[slot::kOwnKV] = pack_kv(k, v, k.scalar_type());
  for (int i = 0; i < std::min(2, steps - 1); ++i) {
    slots[slot::kKVRecv0 + i] = at::empty_like(slots[slot::kOwnKV]);
  }
}

// One rank's part of a forward call: its ring view, buffers and block ops. Tensors in batch form.
struct RankForward {
  RingContext ring;
  std::vector<at::Tensor> slots = std::vector<at::Tensor>(slot::kCount);
  TensorBlockOps ops;

  RankForward(const BlockKernels& kernels, int rank, int world, const at::Tensor& q,
              const at::Tensor& k, const at::Tensor& v, const RingOptions& options)
      : ring(rank, world, options, q.size(1)), ops(kernels, ring, slots, options.softmax_scale) {
    const at::ScalarType acc = acc_dtype(q.scalar_type());
    own_kv(ops, slots, k, v, ring.steps);
    ops.q = unit_last_stride(q);
    ops.out_acc = at::zeros(q.sizes(), q.options().dtype(acc));
    ops.lse = at::full({q.size(0), q.size(2), q.size(1)}, -std::numeric_limits<double>::infinity(),
                       q.options().dtype(acc));
  }

  // (out in the input dtype, lse in the accumulator dtype)
  std::tuple<at::Tensor, at::Tensor> result(at::ScalarType dtype) const {
    return {ops.out_acc.to(dtype), ops.lse};
  }
};

// One rank's part of a backward call. Tensors in batch form.
struct RankBackward {
  RingContext ring;
  std::vector<at::Tensor> slots = std::vector<at::Tensor>(slot::kCount);
  TensorBlockOps ops;

  RankBackward(const BlockKernels& kernels, int rank, int world, const at::Tensor& dout,
               const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
               const at::Tensor& out, const at::Tensor& lse, const RingOptions& options)
      : ring(rank, world, options, q.size(1)), ops(kernels, ring, slots, options.softmax_scale) {
    const at::ScalarType acc = acc_dtype(q.scalar_type());
    ops.deterministic = options.deterministic;
    own_kv(ops, slots, k, v, ring.steps);
    ops.home_dk = at::empty(k.sizes(), k.options().dtype(acc));
    ops.home_dv = at::empty(v.sizes(), v.options().dtype(acc));
    for (int i = 0; i < 2; ++i) {
      // Travelling sums and their receive buffers of steps 1 .. steps-1 (slot i: steps t % 2 == i).
      if (i == 0 ? ring.steps > 2 : ring.steps > 1) {
        slots[slot::kGradAcc0 + i] = at::empty_like(slots[slot::kOwnKV], acc);
        slots[slot::kGradRecv0 + i] = at::empty_like(slots[slot::kOwnKV], acc);
      }
    }
    ops.q = unit_last_stride(q);
    ops.dout = unit_last_stride(dout);
    ops.lse = lse;
    // delta = (dout * out).sum(-1), as (batch, heads, seqlen) like lse
    ops.delta = (dout.to(acc) * out.to(acc)).sum(-1).transpose(1, 2).contiguous();
    ops.dq_acc = at::zeros(q.sizes(), q.options().dtype(acc));
  }

  // (dq, dk, dv) in the input dtypes (separate buffers: the outputs never alias).
  std::tuple<at::Tensor, at::Tensor, at::Tensor> result(at::ScalarType dtype) const {
    return {ops.dq_acc.to(dtype), ops.home_dk.to(dtype), ops.home_dv.to(dtype)};
  }
};

// RING_ATTN_TRANSPORT: auto (default) | c10d | nccl. Decided from the environment and the tensors
// only, so every rank decides alike and raises alike, before any communication. auto picks c10d
// until the NCCL transport has passed its multi-GPU tests.
TransportKind transport_kind(const at::Tensor& sample) {
  const char* env = std::getenv("RING_ATTN_TRANSPORT");
  const std::string value = (env == nullptr || *env == '\0') ? "auto" : env;
  TORCH_CHECK_VALUE(value == "auto" || value == "c10d" || value == "nccl",
                    "RING_ATTN_TRANSPORT must be auto, c10d or nccl, got '", value, "'");
  if (value != "nccl") return TransportKind::kC10d;
#if defined(RING_ATTN_WITH_NCCL)
  TORCH_CHECK_VALUE(sample.is_cuda(), "RING_ATTN_TRANSPORT=nccl needs CUDA tensors, got ",
                    sample.device(), " tensors (use auto or c10d, e.g. with a gloo group)");
  return TransportKind::kNccl;
#else
  (void)sample;
  TORCH_CHECK_VALUE(false, "RING_ATTN_TRANSPORT=nccl: this build of ring_attention has no NCCL "
                    "transport (built without CUDA or without the nvidia-nccl wheel); use auto or c10d");
  return TransportKind::kC10d;
#endif
}

std::unique_ptr<Transport> group_transport(const c10::intrusive_ptr<c10d::ProcessGroup>& group,
                                           const std::vector<at::Tensor>& slots,
                                           TransportKind kind) {
  if (!group || group->getSize() == 1) return std::make_unique<SoloTransport>();
#if defined(RING_ATTN_WITH_NCCL)
  if (kind == TransportKind::kNccl) return make_nccl_transport(group, slots, ring_timeout_seconds());
#endif
  (void)kind;
  return std::make_unique<C10dTransport>(group, slots, ring_timeout_seconds());
}

int rank_of(const c10::intrusive_ptr<c10d::ProcessGroup>& group) { return group ? group->getRank() : 0; }
int world_of(const c10::intrusive_ptr<c10d::ProcessGroup>& group) { return group ? group->getSize() : 1; }

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
#endif

// In-memory exchanges between the virtual ranks of a LocalRing, all driven in lockstep by one
// thread. A hop's copy (the sender's send slot into the receiver's receive slot) is issued as soon
// as both ranks have posted the exchange: by the schedule's contract a posted send slot is written
// and a posted receive slot is free. On CPU the copy runs there and then. On CUDA it runs on the
// receiver's communication stream after events recorded at both posts, so it overlaps the
// computation queued behind them; wait() makes the current stream wait for the copies into and
// out of this rank's slots (never the host).
class LocalHub {
 public:
  explicit LocalHub(int world) : posted_(world) {
#if defined(RING_ATTN_WITH_CUDA)
    comm_streams_.resize(world);
#endif
  }
  int world() const { return static_cast<int>(posted_.size()); }

  void post(int rank, const Exchange& x, const std::vector<at::Tensor>& slots) {
    Posted& mine = posted_[rank][key(x)];
    mine.send = slots.at(x.send_slot);
    mine.recv = slots.at(x.recv_slot);
#if defined(RING_ATTN_WITH_CUDA)
    if (mine.send.is_cuda()) {
      mine.posted = record_event(c10::cuda::getCurrentCUDAStream(mine.send.get_device()).stream());
    }
#endif
    const int prev = mod(rank - x.offset, world()), next = mod(rank + x.offset, world());
    copy_if_both_posted(prev, rank, x);  // into this rank
    copy_if_both_posted(rank, next, x);  // out of it (a no-op when already done, e.g. world 1)
  }

  void wait(int rank, const Exchange& x) {
    const int prev = mod(rank - x.offset, world());
    auto mine = posted_[rank].find(key(x));
    TORCH_CHECK(mine != posted_[rank].end() && mine->second.copied_in && mine->second.copied_out,
                "LocalRing: virtual rank ", rank, " waits for ", channel_name(x.channel),
                " of ring step ", x.step, " that rank ", prev,
                " never posted: the schedule would deadlock");
#if defined(RING_ATTN_WITH_CUDA)
    if (mine->second.recv.is_cuda()) {
      const cudaStream_t stream =
          c10::cuda::getCurrentCUDAStream(mine->second.recv.get_device()).stream();
      stream_wait(stream, mine->second.in_done);   // the receive slot is filled
      stream_wait(stream, mine->second.out_done);  // the send slot may be written again
    }
#endif
    posted_[rank].erase(mine);
  }

  // Every posted exchange was copied and waited for.
  void check_drained() const {
    for (int r = 0; r < world(); ++r) {
      TORCH_CHECK(posted_[r].empty(), "LocalRing: rank ", r, " has ", posted_[r].size(),
                  " exchanges that never completed");
    }
  }

 private:
  struct Posted {
    at::Tensor send;
    at::Tensor recv;
    bool copied_in = false;   // recv holds the previous rank's send
    bool copied_out = false;  // send was copied to the next rank
#if defined(RING_ATTN_WITH_CUDA)
    Event posted, in_done, out_done;
#endif
  };
  using Key = std::pair<int, int>;
  static Key key(const Exchange& x) { return {static_cast<int>(x.channel), x.step}; }

  // sender's send slot -> receiver's receive slot, once both have posted exchange x.
  void copy_if_both_posted(int sender, int receiver, const Exchange& x) {
    auto from = posted_[sender].find(key(x));
    auto to = posted_[receiver].find(key(x));
    if (from == posted_[sender].end() || to == posted_[receiver].end()) return;
    Posted& src = from->second;
    Posted& dst = to->second;
    if (dst.copied_in) return;
#if defined(RING_ATTN_WITH_CUDA)
    if (dst.recv.is_cuda()) {
      const int device = dst.recv.get_device();
      const c10::cuda::CUDAStream comm = comm_stream(receiver, device);
      stream_wait(comm.stream(), src.posted);
      stream_wait(comm.stream(), dst.posted);
      {
        c10::cuda::CUDAStreamGuard guard(comm);
        dst.recv.copy_(src.send, /*non_blocking=*/true);
      }
      const Event done = record_event(comm.stream());
      dst.in_done = done;
      src.out_done = done;
    } else
#endif
    {
      dst.recv.copy_(src.send);
    }
    dst.copied_in = true;
    src.copied_out = true;
  }

#if defined(RING_ATTN_WITH_CUDA)
  // Virtual rank r's communication stream (from torch's pool, created on first use).
  c10::cuda::CUDAStream comm_stream(int rank, int device) {
    if (!comm_streams_[rank]) {
      comm_streams_[rank] =
          c10::cuda::getStreamFromPool(false, static_cast<c10::DeviceIndex>(device));
    }
    return *comm_streams_[rank];
  }
  std::vector<std::optional<c10::cuda::CUDAStream>> comm_streams_;
#endif
  std::vector<std::map<Key, Posted>> posted_;
};

class LocalTransport final : public Transport {
 public:
  LocalTransport(LocalHub& hub, int rank, const std::vector<at::Tensor>& slots)
      : hub_(hub), rank_(rank), slots_(slots) {}
  int rank() const override { return rank_; }
  int world_size() const override { return hub_.world(); }
  void post(const Exchange& x) override { hub_.post(rank_, x, slots_); }
  void wait(const Exchange& x) override { hub_.wait(rank_, x); }

 private:
  LocalHub& hub_;
  int rank_;
  const std::vector<at::Tensor>& slots_;
};

// Every virtual rank's schedule, phase by phase: all begin a step, then all compute, then all end.
template <typename Schedule>
void run_lockstep(std::vector<Schedule>& schedules) {
  const int steps = schedules[0].num_steps();
  for (int step = 0; step < steps; ++step) {
    for (auto& s : schedules) s.begin_step(step);
    for (auto& s : schedules) s.compute_step(step);
    for (auto& s : schedules) s.end_step(step);
  }
}

void check_local_ring_lists(size_t world, std::initializer_list<size_t> sizes) {
  TORCH_CHECK_VALUE(world >= 1, "LocalRing: at least one virtual rank is needed");
  for (size_t n : sizes) {
    TORCH_CHECK_VALUE(n == world, "LocalRing: every list needs one tensor per virtual rank (",
                      world, "), got ", n);
  }
}

}  // namespace

RingStats last_ring_stats() { return g_last_stats; }

std::tuple<at::Tensor, at::Tensor> ring_forward(const BlockKernels& kernels, const at::Tensor& q,
                                                const at::Tensor& k, const at::Tensor& v,
                                                const RingOptions& options) {
  const TransportKind kind = transport_kind(q);  // before any communication
  const auto group = resolve_group(options.group_name);
  RingCall call{q, k, v, options.layout, options.causal, options.softmax_scale,
                options.window_left, options.window_right, options.cu_seqlens, world_of(group)};
  if (call.world > 1 && kind == TransportKind::kC10d) {
    call.transport_error = p2p_device_error(*group, q.device());
  }
  agree_or_throw(call, group, ring_check_enabled(), ring_timeout_seconds());
  const at::Tensor qb = as_batch(q, options);
  RankForward rank(kernels, rank_of(group), world_of(group), qb, as_batch(k, options),
                   as_batch(v, options), options);
  auto transport = group_transport(group, rank.slots, kind);
  std::vector<RingForward> schedule{RingForward(*transport, rank.ops, rank.ring.steps)};
  schedule[0].run();
  record_stats(schedule);
  auto [out, lse] = rank.result(q.scalar_type());
  return {from_batch(out, options), from_batch(lse, options)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ring_backward(
    const BlockKernels& kernels, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, const RingOptions& options) {
  // Inputs were validated and agreed on in the forward; autograd guarantees matching shapes.
  const TransportKind kind = transport_kind(q);  // before any communication
  const auto group = resolve_group(options.group_name);
  RankBackward rank(kernels, rank_of(group), world_of(group), as_batch(dout, options),
                    as_batch(q, options), as_batch(k, options), as_batch(v, options),
                    as_batch(out, options), as_batch(lse, options), options);
  auto transport = group_transport(group, rank.slots, kind);
  std::vector<RingBackward> schedule{RingBackward(*transport, rank.ops, rank.ring.steps)};
  schedule[0].run();
  record_stats(schedule);
  auto [dq, dk, dv] = rank.result(q.scalar_type());
  return {from_batch(dq, options), from_batch(dk, options), from_batch(dv, options)};
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> local_ring_forward(
    const BlockKernels& kernels, const std::vector<at::Tensor>& qs,
    const std::vector<at::Tensor>& ks, const std::vector<at::Tensor>& vs,
    const RingOptions& options) {
  const int world = static_cast<int>(qs.size());
  check_local_ring_lists(qs.size(), {ks.size(), vs.size()});
  std::vector<at::Tensor> descriptors;
  for (int r = 0; r < world; ++r) {
    descriptors.push_back(describe(RingCall{qs[r], ks[r], vs[r], options.layout, options.causal,
                                            options.softmax_scale, options.window_left,
                                            options.window_right, options.cu_seqlens, world}));
  }
  check_descriptors(descriptors);

  LocalHub hub(world);
  std::vector<std::unique_ptr<RankForward>> ranks;
  std::vector<std::unique_ptr<LocalTransport>> transports;
  std::vector<RingForward> schedules;
  for (int r = 0; r < world; ++r) {
    ranks.push_back(std::make_unique<RankForward>(kernels, r, world, as_batch(qs[r], options),
                                                  as_batch(ks[r], options),
                                                  as_batch(vs[r], options), options));
    transports.push_back(std::make_unique<LocalTransport>(hub, r, ranks[r]->slots));
    schedules.emplace_back(*transports[r], ranks[r]->ops, ranks[r]->ring.steps);
  }
  run_lockstep(schedules);
  hub.check_drained();
  record_stats(schedules);
  std::vector<at::Tensor> outs, lses;
  for (int r = 0; r < world; ++r) {
    auto [out, lse] = ranks[r]->result(qs[r].scalar_type());
    outs.push_back(from_batch(out, options));
    lses.push_back(from_batch(lse, options));
  }
  return {outs, lses};
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>
local_ring_backward(const BlockKernels& kernels, const std::vector<at::Tensor>& douts,
                    const std::vector<at::Tensor>& qs, const std::vector<at::Tensor>& ks,
                    const std::vector<at::Tensor>& vs, const std::vector<at::Tensor>& outs,
                    const std::vector<at::Tensor>& lses, const RingOptions& options) {
  const int world = static_cast<int>(qs.size());
  check_local_ring_lists(qs.size(), {douts.size(), ks.size(), vs.size(), outs.size(), lses.size()});
  LocalHub hub(world);
  std::vector<std::unique_ptr<RankBackward>> ranks;
  std::vector<std::unique_ptr<LocalTransport>> transports;
  std::vector<RingBackward> schedules;
  for (int r = 0; r < world; ++r) {
    ranks.push_back(std::make_unique<RankBackward>(
        kernels, r, world, as_batch(douts[r], options), as_batch(qs[r], options),
        as_batch(ks[r], options), as_batch(vs[r], options), as_batch(outs[r], options),
        as_batch(lses[r], options), options));
    transports.push_back(std::make_unique<LocalTransport>(hub, r, ranks[r]->slots));
    schedules.emplace_back(*transports[r], ranks[r]->ops, ranks[r]->ring.steps);
  }
  run_lockstep(schedules);
  for (auto& s : schedules) s.finish();
  hub.check_drained();
  record_stats(schedules);
  std::vector<at::Tensor> dqs, dks, dvs;
  for (int r = 0; r < world; ++r) {
    auto [dq, dk, dv] = ranks[r]->result(qs[r].scalar_type());
    dqs.push_back(from_batch(dq, options));
    dks.push_back(from_batch(dk, options));
    dvs.push_back(from_batch(dv, options));
  }
  return {dqs, dks, dvs};
}

}  // namespace ring_attn
