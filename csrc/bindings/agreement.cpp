#include "bindings/agreement.h"

#include <ATen/ATen.h>

#include <cmath>
#include <cstring>
#include <sstream>

#include "comm/c10d_transport.h"

namespace ring_attn {

namespace {

// Descriptor layout: kFields int64 fields, then a NUL-padded message of kMessageBytes.
enum Field : int {
  kBatch = 0, kSeqlen, kHeads, kHeadsKV, kHeadDim, kDType, kDevice, kLayout, kCausal, kScale,
  kHasError, kFields
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

std::string validate_local(const RingCall& call) {
  const at::Tensor& q = call.q;
  const at::Tensor& k = call.k;
  const at::Tensor& v = call.v;
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
  if (q.is_cpu() && q.scalar_type() != at::kFloat && q.scalar_type() != at::kDouble) {
    return std::string("dtype ") + c10::toString(q.scalar_type()) +
           " is not supported on CPU (float32 and float64 are)";
  }
  Layout layout;
  if (!parse_layout(call.layout, &layout)) {
    return "unknown layout '" + call.layout + "' (expected 'contiguous', 'zigzag' or 'striped')";
  }
  std::string len_error = check_local_len(layout, q.size(1));
  if (!len_error.empty()) return len_error;
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
    d[kBatch] = call.q.size(0);
    d[kSeqlen] = call.q.size(1);
    d[kHeads] = call.q.size(2);
    d[kHeadsKV] = call.k.size(2);
    d[kHeadDim] = call.q.size(3);
    d[kDType] = static_cast<int64_t>(call.q.scalar_type());
    d[kDevice] = static_cast<int64_t>(call.q.device().type());
    d[kLayout] = static_cast<int64_t>(layout);
    d[kCausal] = call.causal;
    std::memcpy(&d[kScale], &call.softmax_scale, sizeof(double));
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
  std::vector<std::vector<at::Tensor>> outputs(1);
  for (int r = 0; r < world; ++r) outputs[0].push_back(at::empty({kDescriptorLen}, at::kLong));
  std::vector<at::Tensor> inputs{describe(call)};
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
  check_descriptors(outputs[0]);
}

}  // namespace ring_attn
