#include "bindings/transport_select.h"

#include <torch/csrc/distributed/c10d/GroupRegistry.hpp>

#include <cmath>
#include <cstdlib>

#include "comm/c10d_transport.h"
#if defined(RING_ATTN_WITH_NCCL)
#include "comm/nccl_transport.h"
#endif

namespace ring_attn {

namespace {

// World size 1: the scheduler never exchanges anything.
class SoloTransport final : public Transport {
 public:
  int rank() const override { return 0; }
  int world_size() const override { return 1; }
  void post(const Exchange&) override { TORCH_CHECK(false, "ring attention: internal error, solo post"); }
  void wait(const Exchange&) override { TORCH_CHECK(false, "ring attention: internal error, solo wait"); }
};

}  // namespace

double ring_timeout_seconds() {
  const char* env = std::getenv("RING_ATTN_TIMEOUT");
  if (env == nullptr || *env == '\0') return 300.0;
  char* end = nullptr;
  const double value = std::strtod(env, &end);
  TORCH_CHECK_VALUE(end != env && *end == '\0' && std::isfinite(value) && value >= 0,
                    "RING_ATTN_TIMEOUT must be a number of seconds, finite and >= 0 (0 waits "
                    "forever), got '", env, "'");
  return value;
}

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

TransportKind transport_kind(const at::Tensor& sample, std::string* error) {
  try {
    return transport_kind(sample);
  } catch (const c10::ValueError& e) {
    *error = e.what_without_backtrace();
    return TransportKind::kC10d;
  }
}

c10::intrusive_ptr<c10d::ProcessGroup> resolve_group(const std::string& name) {
  if (name.empty()) return {};
  try {
    return c10d::resolve_process_group(name);
  } catch (const c10::Error&) {
    TORCH_CHECK_VALUE(false, "ring attention: no process group named '", name, "' exists in "
                      "this process: the group was destroyed (torch.distributed."
                      "destroy_process_group); pass a group of the current process group, "
                      "created after init_process_group");
  }
}

int rank_of(const c10::intrusive_ptr<c10d::ProcessGroup>& group) { return group ? group->getRank() : 0; }
int world_of(const c10::intrusive_ptr<c10d::ProcessGroup>& group) { return group ? group->getSize() : 1; }

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

}  // namespace ring_attn
