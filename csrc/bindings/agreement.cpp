#include "bindings/agreement.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <mutex>
#include <numeric>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include "comm/c10d_transport.h"
#include "core/allgather_scheduler.h"
#include "comm/group_devices.h"
#include "cuda/block_attn_cuda.h"  // kMaxHeadDim (plain C++, no CUDA needed)

namespace ring_attn {

namespace {

// Descriptor layout: kFields int64 fields, then a NUL-padded message of kMessageBytes.
enum Field : int {
  kBatch = 0, kSeqlen, kHeads, kHeadsKV, kHeadDim, kDType, kDevice, kLayout, kCausal, kScale,
  kWindowLeft, kWindowRight, kNumSeqs, kSeqlensHash, kKVExchange, kTransport, kHasError, kFields
};
constexpr int kMessageBytes = 384;
constexpr int kDescriptorLen = kFields + kMessageBytes / 8;

const char* field_name(int field) {
  switch (field) {
    case kBatch: return "batch size";
    case kSeqlen: return "local sequence length";
    case kHeads: return "number of query heads";
    case kHeadsKV: return "number of K/V heads";
    case kHeadDim: return "head dimension";
    case kDType: return "dtype";
    case kDevice: return "device type";
    case kLayout: return "layout";
    case kCausal: return "causal";
    case kScale: return "softmax_scale";
    case kWindowLeft: return "window_size[0] (left)";
    case kWindowRight: return "window_size[1] (right)";
    case kNumSeqs: return "number of packed sequences (cu_seqlens)";
    case kSeqlensHash: return "cu_seqlens";
    case kKVExchange: return "kv_exchange";
    case kTransport: return "transport (RING_ATTN_TRANSPORT)";
    default: return "?";
  }
}

std::string shape_str(const at::Tensor& t) {
  std::ostringstream os;
  os << t.sizes();
  return os.str();
}

std::string field_value(int field, int64_t value) {
  switch (field) {
    case kDType: return c10::toString(static_cast<at::ScalarType>(value));
    case kDevice: return c10::DeviceTypeName(static_cast<c10::DeviceType>(value), true);
    case kLayout: return value < 0 ? "unknown" : layout_name(static_cast<Layout>(value));
    case kCausal: return value ? "True" : "False";
    case kSeqlensHash: return "hash " + std::to_string(value);
    case kKVExchange: return kv_exchange_name(static_cast<KVExchange>(value));
    case kTransport: return value == 1 ? "nccl" : "c10d";
    case kScale: {
      double d;
      std::memcpy(&d, &value, sizeof(d));
      std::ostringstream os;
      os << d;
      return os.str();
    }
    default: return std::to_string(value);
  }
}

// Marks the descriptor `d` as carrying `error` (its message truncated to kMessageBytes - 1).
void write_error(int64_t* d, const std::string& error) {
  d[kHasError] = 1;
  std::memset(d + kFields, 0, kMessageBytes);
  std::strncpy(reinterpret_cast<char*>(d + kFields), error.c_str(), kMessageBytes - 1);
}

std::string message_of(const int64_t* d) {
  const char* text = reinterpret_cast<const char*>(d + kFields);
  return std::string(text, strnlen(text, kMessageBytes));
}

// What an agreement's all-gather carries: the calling function's name (kCallNameBytes, NUL-padded),
// then its descriptor, zero-padded to kAgreementWords whatever the call. Every agreement sends the
// same number of bytes, so ranks that make different calls over one group (one ring_attn_func,
// another unshard) exchange well-formed messages and all see the difference.
constexpr int kCallNameBytes = 48;
constexpr int64_t kCallNameWords = kCallNameBytes / 8;
// The name and the largest descriptor (unshard's in ring_attention/layouts.py: 141 words).
constexpr int64_t kAgreementWords = 192;

std::string call_name_of(const at::Tensor& envelope) {
  const char* text = reinterpret_cast<const char*>(envelope.data_ptr<int64_t>());
  return std::string(text, strnlen(text, kCallNameBytes));
}

// all_gather_descriptors without the check of the calls: each rank's call name in *calls (the
// descriptors of ranks that made another call are not comparable).
std::vector<at::Tensor> gather_descriptors(const at::Tensor& descriptor, const std::string& call,
                                           c10d::ProcessGroup& group, const at::Device& device,
                                           double timeout_s, std::vector<std::string>* calls) {
  const int64_t words = descriptor.numel();
  TORCH_CHECK(words <= kAgreementWords - kCallNameWords && call.size() < kCallNameBytes,
              "ring attention: internal error, an agreement of ", words, " words for ", call);
  at::Tensor envelope = at::zeros({kAgreementWords}, at::kLong);
  std::memcpy(envelope.data_ptr<int64_t>(), call.data(), call.size());
  envelope.narrow(0, kCallNameWords, words).copy_(descriptor.reshape(-1));
  const at::TensorOptions options = at::TensorOptions(at::kLong).device(device);
  std::vector<std::vector<at::Tensor>> outputs(1);
  for (int r = 0; r < group.getSize(); ++r) {
    outputs[0].push_back(at::empty({kAgreementWords}, options));
  }
  std::vector<at::Tensor> inputs{envelope.to(device)};
  auto work = group.allgather(outputs, inputs);
  wait_or_raise(work, group, timeout_s, call, "while agreeing on inputs with the other ranks",
                ": some rank of the group did not call " + call);
  std::vector<at::Tensor> gathered;
  calls->clear();
  for (const at::Tensor& output : outputs[0]) {
    const at::Tensor envelope_r = output.cpu();
    calls->push_back(call_name_of(envelope_r));
    gathered.push_back(envelope_r.narrow(0, kCallNameWords, words));
  }
  return gathered;
}

// Unless every rank made `call` (then ""): the calls, rank by rank.
std::string calls_mismatch(const std::vector<std::string>& calls, const std::string& call) {
  bool same = true;
  std::ostringstream listing;
  for (size_t r = 0; r < calls.size(); ++r) {
    same &= calls[r] == call;
    listing << (r ? ", " : "") << "rank " << r << ": " << calls[r];
  }
  if (same) return {};
  return "ranks called different functions over one process group (" + listing.str() +
         "); every rank of a group must make the same calls in the same order";
}

}  // namespace

std::vector<at::Tensor> all_gather_descriptors(const at::Tensor& descriptor,
                                               const std::string& call,
                                               c10d::ProcessGroup& group,
                                               const at::Device& device, double timeout_s) {
  std::vector<std::string> calls;
  std::vector<at::Tensor> gathered =
      gather_descriptors(descriptor, call, group, device, timeout_s, &calls);
  const std::string mismatch = calls_mismatch(calls, call);
  TORCH_CHECK_VALUE(mismatch.empty(), "ring attention: ", mismatch);
  return gathered;
}

const at::Tensor RingCall::kNoTensor;

// The problem with the boundaries cu_seqlens, or empty.
static std::string cu_seqlens_error(const at::Tensor& cu) {
  if (cu.scalar_type() != at::kInt || cu.dim() != 1 || cu.size(0) < 2) {
    return std::string("cu_seqlens must be a 1-D int32 tensor of num_seqs + 1 >= 2 boundaries; got ") +
           c10::toString(cu.scalar_type()) + " of shape " + shape_str(cu);
  }
  const at::Tensor host = cu.cpu().contiguous();
  const int32_t* b = host.data_ptr<int32_t>();
  if (b[0] != 0) return "cu_seqlens must start at 0, got " + std::to_string(b[0]);
  for (int64_t i = 1; i < host.size(0); ++i) {
    if (b[i] < b[i - 1]) {
      return "cu_seqlens must be non-decreasing, but cu_seqlens[" + std::to_string(i) + "] = " +
             std::to_string(b[i]) + " < cu_seqlens[" + std::to_string(i - 1) + "] = " +
             std::to_string(b[i - 1]);
    }
  }
  return {};
}

// Packed sequences: the problem with cu_seqlens or the shard's length, or empty.
static std::string validate_varlen(const RingCall& call, Layout layout) {
  const at::Tensor& cu = call.cu_seqlens;
  const std::string error = cu_seqlens_error(cu);
  if (!error.empty()) return error;
  const at::Tensor host = cu.cpu().contiguous();
  const int32_t* b = host.data_ptr<int32_t>();
  const int64_t expected = varlen_local_len(layout, call.world, b, host.size(0) - 1);
  if (call.q.size(0) != expected) {
    return "q has " + std::to_string(call.q.size(0)) + " tokens, but shard_varlen of cu_seqlens (" +
           std::to_string(b[host.size(0) - 1]) + " tokens in " + std::to_string(host.size(0) - 1) +
           " sequences, layout '" + layout_name(layout) + "', world " + std::to_string(call.world) +
           ") gives " + std::to_string(expected) + " per rank; cu_seqlens must describe the global "
           "packed batch and be the same on every rank";
  }
  return {};
}

namespace {

// An argument the Python wrapper could not convert (a causal that is not a bool, a softmax_scale
// that is not a number, ...) arrives as a layout of this prefix and the problem
// (ring_attention/functional.py _layout), so that the ranks' agreement reports it on every rank.
constexpr std::string_view kArgumentErrorPrefix = "invalid argument: ";

// Why `layout` names no layout ("" when it does); an argument error as the wrapper phrased it.
std::string layout_error(const std::string& layout) {
  Layout parsed;
  if (parse_layout(layout, &parsed)) return {};
  if (layout.rfind(kArgumentErrorPrefix, 0) == 0) return layout.substr(kArgumentErrorPrefix.size());
  return "unknown layout '" + layout + "' (expected 'contiguous', 'zigzag', 'striped' or 'packed')";
}

}  // namespace

std::string validate_local(const RingCall& call) {
  if (call.layout.rfind(kArgumentErrorPrefix, 0) == 0) return layout_error(call.layout);
  if (!call.transport_choice_error.empty()) return call.transport_choice_error;
  KVExchange exchange;
  if (!parse_kv_exchange(call.kv_exchange, &exchange)) {
    return "unknown kv_exchange '" + call.kv_exchange + "' (expected 'ring' or 'allgather')";
  }
  const at::Tensor& q = call.q;
  const at::Tensor& k = call.k;
  const at::Tensor& v = call.v;
  const bool varlen = call.cu_seqlens.defined();
  if (varlen && (q.dim() != 3 || k.dim() != 3 || v.dim() != 3)) {
    return "q, k and v must be 3-D (tokens_local, heads, headdim); got q " +
           shape_str(q) + ", k " + shape_str(k) + ", v " + shape_str(v);
  }
  if (varlen) {
    // The same checks as the dense call, on the (1, tokens_local, heads, headdim) view.
    const at::Tensor q4 = q.unsqueeze(0), k4 = k.unsqueeze(0), v4 = v.unsqueeze(0);
    const std::string error = validate_local(RingCall{q4, k4, v4, call.layout, call.causal,
                                                      call.softmax_scale, call.window_left,
                                                      call.window_right, RingCall::kNoTensor,
                                                      call.world});
    if (!error.empty()) return error;
    Layout layout;
    parse_layout(call.layout, &layout);
    return validate_varlen(call, layout);
  }
  if (q.dim() != 4 || k.dim() != 4 || v.dim() != 4) {
    return "q, k and v must be 4-D (batch, seqlen_local, heads, headdim); got q " + shape_str(q) +
           ", k " + shape_str(k) + ", v " + shape_str(v);
  }
  if (k.sizes() != v.sizes()) {
    return "k and v must have the same shape; got k " + shape_str(k) + ", v " + shape_str(v);
  }
  if (q.size(0) != k.size(0)) {
    return "q and k/v have different batch sizes: q " + shape_str(q) + ", k " + shape_str(k);
  }
  if (q.size(1) != k.size(1)) {
    return "q and k/v have different local sequence lengths: q " + shape_str(q) + ", k " +
           shape_str(k);
  }
  if (q.size(3) != k.size(3)) {
    return "head dimension mismatch: q has " + std::to_string(q.size(3)) + ", k/v have " +
           std::to_string(k.size(3));
  }
  if (q.size(2) == 0) return "q must have at least one head; got q " + shape_str(q);
  if (k.size(2) == 0 || q.size(2) % k.size(2) != 0) {
    return "the number of query heads (" + std::to_string(q.size(2)) +
           ") must be a multiple of the number of K/V heads (" + std::to_string(k.size(2)) + ")";
  }
  if (q.size(3) == 0) return "head dimension must be positive";
  if (q.scalar_type() != k.scalar_type() || q.scalar_type() != v.scalar_type()) {
    return std::string("q, k and v must have the same dtype; got ") +
           c10::toString(q.scalar_type()) + ", " + c10::toString(k.scalar_type()) + ", " +
           c10::toString(v.scalar_type());
  }
  if (q.device() != k.device() || q.device() != v.device()) {
    return "q, k and v must be on the same device; got " + q.device().str() + ", " +
           k.device().str() + ", " + v.device().str();
  }
  if (!call.transport_error.empty()) {
    return "q, k and v are on " + q.device().str() + ", but " + call.transport_error +
           ": use tensors on a device the group's backend carries (CUDA for nccl, CPU for gloo), "
           "or a group with a backend for both (init_process_group(\"cpu:gloo,cuda:nccl\"))";
  }
  const at::ScalarType dtype = q.scalar_type();
  if (q.is_cpu() && dtype != at::kFloat && dtype != at::kDouble && dtype != at::kBFloat16 &&
      dtype != at::kHalf) {
    return std::string("dtype ") + c10::toString(q.scalar_type()) +
           " is not supported on CPU (float32, float64, bfloat16 and float16 are)";
  }
  if (q.is_cuda() && q.scalar_type() != at::kBFloat16 && q.scalar_type() != at::kHalf) {
    return std::string("dtype ") + c10::toString(q.scalar_type()) +
           " is not supported on CUDA (bfloat16 and float16 are)";
  }
  if (q.is_cuda() && (q.size(3) % 8 != 0 || q.size(3) > cuda::kMaxHeadDim)) {
    return "head dimension " + std::to_string(q.size(3)) +
           " is not supported on CUDA (multiples of 8 up to " + std::to_string(cuda::kMaxHeadDim) +
           " are)";
  }
  const std::string bad_layout = layout_error(call.layout);
  if (!bad_layout.empty()) return bad_layout;
  Layout layout;
  parse_layout(call.layout, &layout);
  std::string len_error = check_local_len(layout, q.size(1));
  if (!len_error.empty()) return len_error;
  if (call.window_left < -1 || call.window_right < -1) {
    return "window_size values must be >= 0, or -1 for unbounded; got (" +
           std::to_string(call.window_left) + ", " + std::to_string(call.window_right) + ")";
  }
  if (call.causal && call.window_right > 0) {
    return "with causal=True the right window must be -1 or 0, got " +
           std::to_string(call.window_right);
  }
  if (!std::isfinite(call.softmax_scale)) {
    return "softmax_scale must be finite, got " + std::to_string(call.softmax_scale);
  }
  return {};
}

at::Tensor describe(const RingCall& call) {
  const std::string local_error = validate_local(call);
  at::Tensor descriptor = at::zeros({kDescriptorLen}, at::kLong);
  int64_t* d = descriptor.data_ptr<int64_t>();
  if (local_error.empty()) {
    Layout layout;
    parse_layout(call.layout, &layout);
    const int64_t tokens_dim = call.q.dim() - 3;  // 0 for varlen (3-D), 1 for dense
    d[kBatch] = tokens_dim ? call.q.size(0) : 1;
    d[kSeqlen] = call.q.size(tokens_dim);
    d[kHeads] = call.q.size(tokens_dim + 1);
    d[kHeadsKV] = call.k.size(tokens_dim + 1);
    d[kHeadDim] = call.q.size(tokens_dim + 2);
    d[kDType] = static_cast<int64_t>(call.q.scalar_type());
    d[kDevice] = static_cast<int64_t>(call.q.device().type());
    d[kLayout] = static_cast<int64_t>(layout);
    d[kCausal] = call.causal;
    std::memcpy(&d[kScale], &call.softmax_scale, sizeof(double));
    d[kWindowLeft] = call.window_left;
    d[kWindowRight] = call.window_right;
    KVExchange exchange;
    parse_kv_exchange(call.kv_exchange, &exchange);
    d[kKVExchange] = static_cast<int64_t>(exchange);
    d[kTransport] = call.transport;
    if (call.cu_seqlens.defined()) {
      const at::Tensor host = call.cu_seqlens.cpu().contiguous();
      d[kNumSeqs] = host.size(0) - 1;
      // FNV-1a over the boundaries: equal on every rank iff (almost surely) the tensors are.
      uint64_t hash = 1469598103934665603ull;
      for (int64_t i = 0; i < host.size(0); ++i) {
        hash = (hash ^ static_cast<uint32_t>(host.data_ptr<int32_t>()[i])) * 1099511628211ull;
      }
      d[kSeqlensHash] = static_cast<int64_t>(hash >> 1);
    } else {
      d[kNumSeqs] = -1;
    }
  } else {
    write_error(d, local_error);
  }
  return descriptor;
}

std::string ring_call_name(const at::Tensor& cu_seqlens) {
  return cu_seqlens.defined() ? "ring_attn_varlen_func" : "ring_attn_func";
}

void check_descriptors(const std::vector<at::Tensor>& all, const std::string& call) {
  const int world = static_cast<int>(all.size());
  std::ostringstream errors;
  for (int r = 0; r < world; ++r) {
    const int64_t* g = all[r].data_ptr<int64_t>();
    if (g[kHasError]) {
      std::string msg(reinterpret_cast<const char*>(g + kFields),
                      strnlen(reinterpret_cast<const char*>(g + kFields), kMessageBytes));
      errors << "\n  rank " << r << ": " << msg;
    }
  }
  const std::string invalid = errors.str();
  TORCH_CHECK_VALUE(invalid.empty(), call, ": invalid input (every rank raises this):", invalid);

  for (int field = 0; field < kHasError; ++field) {
    bool same = true;
    for (int r = 1; r < world; ++r) {
      same &= all[r].data_ptr<int64_t>()[field] == all[0].data_ptr<int64_t>()[field];
    }
    if (same) continue;
    std::ostringstream os;
    for (int r = 0; r < world; ++r) {
      os << (r ? ", " : "") << "rank " << r << ": "
         << field_value(field, all[r].data_ptr<int64_t>()[field]);
    }
    TORCH_CHECK_VALUE(false, call, ": ranks disagree on the ", field_name(field), " (",
                      os.str(), "); every rank must call with matching arguments");
  }
}

namespace {

// The number of forward calls agreed on over `group` so far, this one included.
int64_t count_forward_call(const c10::intrusive_ptr<c10d::ProcessGroup>& group) {
  static std::mutex mutex;
  static auto* counts = new std::vector<std::pair<WeakGroup, int64_t>>();  // outlives exit
  std::lock_guard<std::mutex> lock(mutex);
  std::erase_if(*counts, [](const auto& entry) { return entry.first.expired(); });
  for (auto& [weak, count] : *counts) {
    if (refers_to(weak, *group)) return ++count;
  }
  counts->emplace_back(WeakGroup(group), 1);
  return 1;
}

}  // namespace

int64_t agree_or_throw(const RingCall& call, const c10::intrusive_ptr<c10d::ProcessGroup>& group,
                       bool check, double timeout_s) {
  const int world = group ? group->getSize() : 1;
  const std::string name = ring_call_name(call.cu_seqlens);
  if (!check || world == 1) {
    const std::string local_error = validate_local(call);
    TORCH_CHECK_VALUE(local_error.empty(), name, ": ", local_error);
    return 0;
  }
  const std::optional<at::Device> device = collective_device(*group, call.q.device());
  if (!device) {  // a CUDA-only group in a process without a CUDA device: no rank can take part
    const std::string local_error = validate_local(call);
    TORCH_CHECK_VALUE(local_error.empty(), name, ": ", local_error);
    TORCH_CHECK_VALUE(false, name, ": the ranks cannot agree on inputs: ",
                      collective_device_error(*group, at::Device(at::kCPU)),
                      " and this process has no CUDA device");
  }
  check_descriptors(all_gather_descriptors(describe(call), name, *group, *device, timeout_s),
                    name);
  return count_forward_call(group);
}

void agree_on_backward(const std::string& call,
                       const c10::intrusive_ptr<c10d::ProcessGroup>& group,
                       const at::Tensor& sample, bool check, double timeout_s,
                       int64_t forward_call) {
  if (!check || !group || group->getSize() == 1) return;
  const std::optional<at::Device> device = collective_device(*group, sample.device());
  TORCH_CHECK_VALUE(device, call, ": the ranks cannot agree on the backward: ",
                    collective_device_error(*group, at::Device(at::kCPU)),
                    " and this process has no CUDA device");
  const std::vector<at::Tensor> forward_calls = all_gather_descriptors(
      at::full({1}, forward_call, at::kLong), call + " backward", *group, *device, timeout_s);
  bool same = true;
  std::ostringstream listing;
  for (size_t r = 0; r < forward_calls.size(); ++r) {
    const int64_t number = forward_calls[r].data_ptr<int64_t>()[0];
    same &= number == forward_call;
    listing << (r ? ", " : "") << "rank " << r << ": call " << number;
  }
  TORCH_CHECK_VALUE(same, call, " backward: ranks run the backward of different calls over one "
                    "process group (", listing.str(), ", counting the group's forward calls); "
                    "every rank must run the backwards of its calls in the same order");
}

// ---- the U x R grid of Ulysses ---------------------------------------------------------------

namespace {

// Grid descriptor: kGridFields int64 fields of the call before the all-to-all and of the rank's
// place in the grid, then the descriptor of the ring call on the exchanged tensors (whose message
// carries the rank's verdict).
enum GridField : int {
  kGridDims = 0, kGridBatch, kGridTokens, kGridHeads, kGridHeadsKV, kGridHeadDim, kGridDType,
  kGridKVExchange, kGridUlyssesSize, kGridRingSize, kGridRingRank, kGridUlyssesRank,
  kGridReturnLse, kGridOtherCall, kGridForwardCall, kGridFields
};

const char* grid_field_name(int field) {
  switch (field) {
    case kGridDims: return "q dims";
    case kGridBatch: return "batch";
    case kGridTokens: return "local tokens";
    case kGridHeads: return "number of query heads";
    case kGridHeadsKV: return "number of K/V heads";
    case kGridHeadDim: return "head dimension";
    case kGridDType: return "dtype";
    case kGridKVExchange: return "kv_exchange";
    case kGridUlyssesSize: return "Ulysses group size";
    case kGridRingSize: return "ring group size";
    case kGridRingRank: return "rank in the ring group";
    case kGridUlyssesRank: return "rank in the ulysses_group";
    case kGridReturnLse: return "return_lse";
    case kGridForwardCall: return "call whose backward runs (counting the group's forward calls)";
    default: return "?";
  }
}

std::string grid_field_value(int field, int64_t value) {
  if (field == kGridDType) return c10::toString(static_cast<at::ScalarType>(value));
  if (field == kGridKVExchange) return kv_exchange_name(static_cast<KVExchange>(value));
  if (field == kGridReturnLse) return value ? "True" : "False";
  return std::to_string(value);
}

// A tensor of `shape` with t's dtype and device, all of it one element (the shape is what the
// checks read).
at::Tensor shaped_like(const at::Tensor& t, at::IntArrayRef shape) {
  return at::empty({1}, t.options()).expand(shape);
}

// What is wrong with this rank's call on the grid, or empty; `exchanged` is then the ring call on
// the tensors the all-to-all gives this rank (shapes only).
std::string grid_local_error(const RingCall& call, const UlyssesGrid& grid,
                             std::vector<at::Tensor>& exchanged) {
  const at::Tensor& q = call.q;
  const at::Tensor& k = call.k;
  const at::Tensor& v = call.v;
  const bool varlen = call.cu_seqlens.defined();
  const int64_t dims = varlen ? 3 : 4;
  if (q.dim() != dims || k.dim() != dims || v.dim() != dims || k.sizes() != v.sizes() ||
      q.sizes().slice(0, dims - 2) != k.sizes().slice(0, dims - 2) || q.size(-1) != k.size(-1)) {
    return "q, k and v must be " + std::to_string(dims) +
           "-D with matching tokens and head dimension; got q " + shape_str(q) + ", k " +
           shape_str(k) + ", v " + shape_str(v);
  }
  KVExchange exchange;
  if (!parse_kv_exchange(call.kv_exchange, &exchange)) {
    return "unknown kv_exchange '" + call.kv_exchange + "' (expected 'ring' or 'allgather')";
  }
  const int64_t heads = q.size(-2), heads_kv = k.size(-2);
  const int size = grid.ulysses_size;
  if (heads_kv == 0 || heads % heads_kv != 0) {
    return "the number of query heads (" + std::to_string(heads) +
           ") must be a multiple of the number of K/V heads (" + std::to_string(heads_kv) + ")";
  }
  if (heads % size != 0) {
    return "the number of query heads (" + std::to_string(heads) +
           ") must be divisible by the size of the ulysses_group (" + std::to_string(size) + ")";
  }
  if (grid.ulysses) {
    const std::string device_error = collective_device_error(*grid.ulysses, q.device());
    if (!device_error.empty()) {
      return "q, k and v are on " + q.device().str() + ", but the ulysses_group cannot exchange "
             "them: " + device_error;
    }
  }
  std::vector<int64_t> q_shape = q.sizes().vec(), kv_shape = k.sizes().vec();
  if (varlen) {
    const std::string error = cu_seqlens_error(call.cu_seqlens);
    if (!error.empty()) return error;
    const std::string bad_layout = layout_error(call.layout);
    if (!bad_layout.empty()) return bad_layout;
    Layout layout;
    parse_layout(call.layout, &layout);
    const int64_t ring_tokens = ulysses_ring_tokens(call.cu_seqlens, layout, grid.ring_size);
    const int64_t expected = (ring_tokens + size - 1) / size;
    if (q.size(0) != expected) {
      return "q has " + std::to_string(q.size(0)) + " tokens, but shard_varlen with this "
             "ulysses_group gives " + std::to_string(expected) + " per rank";
    }
    q_shape[0] = kv_shape[0] = ring_tokens;
  } else {
    q_shape[1] *= size;
    kv_shape[1] *= size;
  }
  q_shape[dims - 2] = heads / size;
  kv_shape[dims - 2] = ulysses_heads_kv(heads_kv, size);
  exchanged = {shaped_like(q, q_shape), shaped_like(k, kv_shape), shaped_like(v, kv_shape)};
  return validate_local(RingCall{exchanged[0], exchanged[1], exchanged[2], call.layout,
                                 call.causal, call.softmax_scale, call.window_left,
                                 call.window_right, call.cu_seqlens, grid.ring_size,
                                 call.transport_error, call.kv_exchange, call.transport,
                                 call.transport_choice_error});
}

at::Tensor describe_grid(const RingCall& call, const UlyssesGrid& grid, bool return_lse) {
  at::Tensor descriptor = at::zeros({kGridFields + kDescriptorLen}, at::kLong);
  int64_t* d = descriptor.data_ptr<int64_t>();
  const at::Tensor& q = call.q;
  const int64_t tokens_dim = call.cu_seqlens.defined() ? 0 : 1;
  d[kGridDims] = q.dim();
  d[kGridBatch] = tokens_dim && q.dim() > 0 ? q.size(0) : 1;
  d[kGridTokens] = q.dim() > tokens_dim ? q.size(tokens_dim) : 0;
  d[kGridHeads] = q.dim() >= 2 ? q.size(-2) : 0;
  d[kGridHeadsKV] = call.k.dim() >= 2 ? call.k.size(-2) : 0;
  d[kGridHeadDim] = q.dim() >= 1 ? q.size(-1) : 0;
  d[kGridDType] = static_cast<int64_t>(q.scalar_type());
  KVExchange exchange;
  d[kGridKVExchange] = parse_kv_exchange(call.kv_exchange, &exchange)
                           ? static_cast<int64_t>(exchange) : -1;
  d[kGridUlyssesSize] = grid.ulysses_size;
  d[kGridRingSize] = grid.ring_size;
  d[kGridRingRank] = grid.ring_rank;
  d[kGridUlyssesRank] = grid.ulysses_rank;
  d[kGridReturnLse] = return_lse;  // whether the lse travels back too: one more all-to-all
  std::vector<at::Tensor> exchanged;
  const std::string error = grid_local_error(call, grid, exchanged);
  if (error.empty()) {
    const at::Tensor ring = describe(RingCall{exchanged[0], exchanged[1], exchanged[2],
                                              call.layout, call.causal, call.softmax_scale,
                                              call.window_left, call.window_right,
                                              call.cu_seqlens, grid.ring_size,
                                              call.transport_error, call.kv_exchange,
                                              call.transport});
    std::memcpy(d + kGridFields, ring.data_ptr<int64_t>(), kDescriptorLen * sizeof(int64_t));
  } else {
    write_error(d + kGridFields, error);
  }
  return descriptor;
}

std::string grid_rank_name(const int64_t* d) {
  return "rank (ring " + std::to_string(d[kGridRingRank]) + ", ulysses " +
         std::to_string(d[kGridUlyssesRank]) + ")";
}

// The first grid descriptor in `all` that carries an error, or null.
const int64_t* first_with_error(const std::vector<at::Tensor>& all) {
  for (const at::Tensor& descriptor : all) {
    const int64_t* d = descriptor.data_ptr<int64_t>();
    if ((d + kGridFields)[kHasError]) return d;
  }
  return nullptr;
}

// The first rank's error (after its place in the grid with `name_rank`), or a disagreement on a
// grid field in `agreed` or on a field of the exchanged call, or "". `what` names the group.
std::string first_grid_error(const std::vector<at::Tensor>& all, std::vector<int> agreed,
                             const char* what, bool name_rank) {
  if (const int64_t* d = first_with_error(all)) {
    return name_rank ? grid_rank_name(d) + ": " + message_of(d + kGridFields)
                     : message_of(d + kGridFields);
  }
  for (int field = 0; field < kHasError; ++field) agreed.push_back(kGridFields + field);
  for (int field : agreed) {
    bool same = true;
    for (const at::Tensor& descriptor : all) {
      same &= descriptor.data_ptr<int64_t>()[field] == all[0].data_ptr<int64_t>()[field];
    }
    if (same) continue;
    std::ostringstream listing;
    for (size_t r = 0; r < all.size(); ++r) {
      const int64_t* d = all[r].data_ptr<int64_t>();
      listing << (r ? ", " : "") << grid_rank_name(d) << ": "
              << (field < kGridFields ? grid_field_value(field, d[field])
                                      : field_value(field - kGridFields, d[field]));
    }
    const char* name = field < kGridFields ? grid_field_name(field)
                                           : field_name(field - kGridFields);
    return std::string("ranks of one ") + what + " disagree on the " + name + " (" +
           listing.str() + ")";
  }
  return {};
}

// Every rank's descriptor over `group` (only this rank's without one), sent as the call `name`
// of the function grid.call; each rank's call in *calls.
std::vector<at::Tensor> gather_grid(const at::Tensor& descriptor,
                                    const c10::intrusive_ptr<c10d::ProcessGroup>& group,
                                    const UlyssesGrid& grid, const std::string& name,
                                    const at::Tensor& sample, double timeout_s,
                                    std::vector<std::string>* calls) {
  if (!group || group->getSize() == 1) {
    *calls = {name};
    return {descriptor};
  }
  const std::optional<at::Device> device = collective_device(*group, sample.device());
  TORCH_CHECK_VALUE(device, grid.call, ": the ranks cannot agree on inputs: ",
                    collective_device_error(*group, at::Device(at::kCPU)),
                    " and this process has no CUDA device");
  return gather_descriptors(descriptor, name, *group, *device, timeout_s, calls);
}

// What a grid's agreement found: the error every rank raises ("" for none); other_call when it
// is that ranks called different functions, which every call of the library reports alike.
struct GridVerdict {
  std::string error;
  bool other_call = false;
};

// The grid's two-stage agreement on `mine` (a grid descriptor whose exchanged-call part carries
// this rank's verdict) sent as the call `name`: over the ulysses_group, the ranks compare the
// fields `ulysses_agreed`; then every rank of a ring group learns its ulysses_groups' verdicts
// and compares `ring_agreed`. A ulysses_group whose ranks made different grid calls (one a
// forward, another a backward, which also agree over their ring groups) passes that on as its
// verdict, so that the other ulysses_groups raise too instead of waiting; with a rank in any
// other call it raises at once.
GridVerdict agree_on_grid(at::Tensor& mine, const UlyssesGrid& grid, const std::string& name,
                          const at::Tensor& sample, const std::vector<int>& ulysses_agreed,
                          const std::vector<int>& ring_agreed, double timeout_s) {
  int64_t* d = mine.data_ptr<int64_t>();
  std::vector<std::string> calls;
  const std::vector<at::Tensor> in_ulysses =
      gather_grid(mine, grid.ulysses, grid, name, sample, timeout_s, &calls);
  std::string mismatch = calls_mismatch(calls, name);
  const bool grid_calls = std::all_of(calls.begin(), calls.end(), [](const std::string& call) {
    return call.find(" (Ulysses)") != std::string::npos;
  });
  if (!mismatch.empty() && !grid_calls) return {mismatch, true};
  const GridVerdict verdict =
      mismatch.empty()
          ? GridVerdict{first_grid_error(in_ulysses, ulysses_agreed, "ulysses_group", true)}
          : GridVerdict{mismatch, true};
  if (grid.ring_size == 1) return verdict;
  if (verdict.error.empty()) {
    (d + kGridFields)[kHasError] = 0;
  } else {
    write_error(d + kGridFields, verdict.error);
  }
  d[kGridOtherCall] = verdict.other_call;
  const std::vector<at::Tensor> in_ring =
      gather_grid(mine, grid.ring, grid, name, sample, timeout_s, &calls);
  mismatch = calls_mismatch(calls, name);
  if (!mismatch.empty()) return {mismatch, true};
  const int64_t* first = first_with_error(in_ring);
  return {first_grid_error(in_ring, ring_agreed, "group", false),
          first != nullptr && first[kGridOtherCall] != 0};
}

}  // namespace

int64_t ulysses_heads_kv(int64_t heads_kv, int ulysses_size) {
  return std::lcm(heads_kv, static_cast<int64_t>(ulysses_size)) / ulysses_size;
}

int64_t ulysses_ring_tokens(const at::Tensor& cu_seqlens, Layout layout, int ring_size) {
  const at::Tensor host = cu_seqlens.cpu().contiguous();
  return varlen_local_len(layout, ring_size, host.data_ptr<int32_t>(), host.size(0) - 1);
}

int64_t agree_on_grid_or_throw(const RingCall& call, const UlyssesGrid& grid, bool return_lse,
                               bool check, double timeout_s) {
  at::Tensor mine = describe_grid(call, grid, return_lse);
  const int64_t* d = mine.data_ptr<int64_t>();
  if (!check) {
    TORCH_CHECK_VALUE(!(d + kGridFields)[kHasError], grid.call, ": ",
                      message_of(d + kGridFields));
    return 0;
  }
  // The ranks of one ulysses_group share the inputs' shapes, the kv_exchange, return_lse, the ring
  // call's arguments, R and their rank in the ring group; those of a ring group share U, their
  // rank in the ulysses_group, return_lse and the number of K/V heads (which the ring call's may
  // hide: 2 and 1 K/V heads both become 1 after an all-to-all over 2 ranks).
  const GridVerdict verdict = agree_on_grid(
      mine, grid, grid.call + " (Ulysses)", call.q,
      {kGridDims, kGridBatch, kGridTokens, kGridHeads, kGridHeadsKV, kGridHeadDim, kGridDType,
       kGridKVExchange, kGridRingSize, kGridRingRank, kGridReturnLse},
      {kGridUlyssesSize, kGridUlyssesRank, kGridReturnLse, kGridHeadsKV}, timeout_s);
  TORCH_CHECK_VALUE(!verdict.other_call, "ring attention: ", verdict.error);
  TORCH_CHECK_VALUE(verdict.error.empty(), grid.call,
                    ": invalid input or groups (every rank raises this): ", verdict.error);
  return grid.ulysses && grid.ulysses->getSize() > 1 ? count_forward_call(grid.ulysses) : 0;
}

void agree_on_grid_backward(const UlyssesGrid& grid, const at::Tensor& sample, bool check,
                            double timeout_s, int64_t forward_call) {
  if (!check) return;
  at::Tensor mine = at::zeros({kGridFields + kDescriptorLen}, at::kLong);
  int64_t* d = mine.data_ptr<int64_t>();
  d[kGridRingRank] = grid.ring_rank;
  d[kGridUlyssesRank] = grid.ulysses_rank;
  d[kGridForwardCall] = forward_call;
  // The ranks of a ulysses_group count the same calls over it (those of other ulysses_groups
  // may differ); the ring group's calls are compared by the ring's backward.
  const GridVerdict verdict = agree_on_grid(mine, grid, grid.call + " (Ulysses) backward", sample,
                                            {kGridForwardCall}, {}, timeout_s);
  TORCH_CHECK_VALUE(!verdict.other_call, "ring attention: ", verdict.error);
  TORCH_CHECK_VALUE(verdict.error.empty(), grid.call, " backward: ", verdict.error);
}

}  // namespace ring_attn
