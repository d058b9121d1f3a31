#include "bindings/agreement.h"

#include <ATen/ATen.h>

#include <cmath>
#include <cstring>
#include <sstream>

#include "comm/c10d_transport.h"
#include "core/allgather_scheduler.h"
#include "comm/group_devices.h"
#include "cuda/block_attn_cuda.h"  // kMaxHeadDim (plain C++, no CUDA needed)

namespace ring_attn {

namespace {

// Descriptor layout: kFields int64 fields, then a NUL-padded message of kMessageBytes.
enum Field : int {
  kBatch = 0, kSeqlen, kHeads, kHeadsKV, kHeadDim, kDType, kDevice, kLayout, kCausal, kScale,
  kWindowLeft, kWindowRight, kNumSeqs, kSeqlensHash, kKVExchange, kHasError, kFields
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

}  // namespace

const at::Tensor RingCall::kNoTensor;

// Packed sequences: the problem with cu_seqlens or the shard's length, or empty.
static std::string validate_varlen(const RingCall& call, Layout layout) {
  const at::Tensor& cu = call.cu_seqlens;
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

std::string validate_local(const RingCall& call) {
  KVExchange exchange;
  if (!parse_kv_exchange(call.kv_exchange, &exchange)) {
    return "unknown kv_exchange '" + call.kv_exchange + "' (expected 'ring' or 'allgather')";
  }
  const at::Tensor& q = call.q;
  const at::Tensor& k = call.k;
  const at::Tensor& v = call.v;
  const bool varlen = call.cu_seqlens.defined();
  if (varlen && (q.dim() != 3 || k.dim() != 3 || v.dim() != 3)) {
    return "ring_attn_varlen_func: q, k and v must be 3-D (tokens_local, heads, headdim); got q " +
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
  Layout layout;
  if (!parse_layout(call.layout, &layout)) {
    return "unknown layout '" + call.layout + "' (expected 'contiguous', 'zigzag', 'striped' or 'packed')";
  }
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
    d[kHasError] = 1;
    std::strncpy(reinterpret_cast<char*>(d + kFields), local_error.c_str(), kMessageBytes - 1);
  }
  return descriptor;
}

void check_descriptors(const std::vector<at::Tensor>& all) {
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
  TORCH_CHECK_VALUE(invalid.empty(), "ring_attn_func: invalid input (every rank raises this):",
                    invalid);

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
    TORCH_CHECK_VALUE(false, "ring_attn_func: ranks disagree on the ", field_name(field), " (",
                      os.str(), "); every rank must call with matching arguments");
  }
}

void agree_or_throw(const RingCall& call, const c10::intrusive_ptr<c10d::ProcessGroup>& group,
                    bool check, double timeout_s) {
  const int world = group ? group->getSize() : 1;
  if (!check || world == 1) {
    const std::string local_error = validate_local(call);
    TORCH_CHECK_VALUE(local_error.empty(), "ring_attn_func: ", local_error);
    return;
  }
  const int rank = group->getRank();
  const std::optional<at::Device> device = collective_device(*group, call.q.device());
  if (!device) {  // a CUDA-only group in a process without a CUDA device: no rank can take part
    const std::string local_error = validate_local(call);
    TORCH_CHECK_VALUE(local_error.empty(), "ring_attn_func: ", local_error);
    TORCH_CHECK_VALUE(false, "ring_attn_func: the ranks cannot agree on inputs: ",
                      collective_device_error(*group, at::Device(at::kCPU)),
                      " and this process has no CUDA device");
  }
  const at::TensorOptions options = at::TensorOptions(at::kLong).device(*device);
  std::vector<std::vector<at::Tensor>> outputs(1);
  for (int r = 0; r < world; ++r) outputs[0].push_back(at::empty({kDescriptorLen}, options));
  std::vector<at::Tensor> inputs{describe(call).to(*device)};
  auto work = group->allgather(outputs, inputs);
  if (!wait_with_deadline(work, timeout_s,
                          "ring_attn_func: rank " + std::to_string(rank) +
                              " failed while agreeing on inputs with the other ranks")) {
    abandon(work);
    TORCH_CHECK(false, "ring_attn_func: rank ", rank, " timed out after ", timeout_s,
                " s (RING_ATTN_TIMEOUT) agreeing on inputs with the other ranks: some rank did "
                "not call ring attention. The process group may be unusable after this error, as "
                "after any collective timeout.");
  }
  for (at::Tensor& descriptor : outputs[0]) descriptor = descriptor.cpu();
  check_descriptors(outputs[0]);
}

}  // namespace ring_attn
