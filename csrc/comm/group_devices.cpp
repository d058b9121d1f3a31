#include "comm/group_devices.h"

#include <ATen/Context.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <algorithm>
#include <vector>

#include "comm/c10d_compat.h"

namespace ring_attn {

using c10d_compat::has_backend;

namespace {

std::string backend_name(c10d::ProcessGroup& group, c10::DeviceType type) {
  return group.getBackend(type)->getBackendName();
}

}  // namespace

std::string describe_backends(c10d::ProcessGroup& group) {
  std::vector<std::string> entries;
  for (const c10::Device& device : group.getDeviceTypes()) {
    entries.push_back(c10::DeviceTypeName(device.type(), /*lower_case=*/true) + ": " +
                      backend_name(group, device.type()));
  }
  std::sort(entries.begin(), entries.end());  // cpu before cuda, the same on every rank
  std::string out;
  for (const std::string& entry : entries) out += (out.empty() ? "" : ", ") + entry;
  return out.empty() ? "none" : out;
}

std::optional<at::Device> collective_device(c10d::ProcessGroup& group, const at::Device& inputs) {
  if (has_backend(group, c10::DeviceType::CPU)) return at::Device(c10::DeviceType::CPU);
  if (has_backend(group, inputs.type())) return inputs;
  if (!has_backend(group, c10::DeviceType::CUDA)) return std::nullopt;
  const std::optional<at::Device> bound = group.getBoundDeviceId();
  if (bound && bound->is_cuda()) return bound;
  if (!at::globalContext().hasCUDA()) return std::nullopt;
  return c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getDevice();
}

std::string collective_device_error(c10d::ProcessGroup& group, const at::Device& device) {
  if (has_backend(group, device.type())) return {};
  return std::string("the process group has no backend for ") +
         c10::DeviceTypeName(device.type(), true) + " tensors (its backends: " +
         describe_backends(group) + ")";
}

std::string p2p_device_error(c10d::ProcessGroup& group, const at::Device& device) {
  std::string error = collective_device_error(group, device);
  if (!error.empty()) return error;
  if (device.type() != c10::DeviceType::CPU &&
      backend_name(group, device.type()) == "gloo") {
    return std::string("the process group's backend for ") +
           c10::DeviceTypeName(device.type(), true) +
           " tensors is gloo, which sends and receives CPU tensors only (its backends: " +
           describe_backends(group) + ")";
  }
  return {};
}

}  // namespace ring_attn
