// The c10d::ProcessGroup calls whose names differ between the torch releases the extension builds
// against. torch 2.13 and newer name the flat collectives all_gather_single, reduce_scatter_single
// and all_to_all_single (the older _allgather_base, _reduce_scatter_base and alltoall_base stay as
// deprecated aliases) and add hasBackendForDeviceType; older releases (2.11) have the older names
// alone. Each call below picks whichever its torch has.
#pragma once

#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include <vector>

namespace ring_attn::c10d_compat {

// Whether `group` has a backend for tensors of `type`.
inline bool has_backend(const c10d::ProcessGroup& group, c10::DeviceType type) {
  for (const c10::Device& device : group.getDeviceTypes()) {
    if (device.type() == type) return true;
  }
  return false;
}

// output = the ranks' `input`s concatenated along dim 0 (every rank's input the same size).
template <typename Group>
c10::intrusive_ptr<c10d::Work> all_gather_single(Group& group, at::Tensor& output,
                                                 at::Tensor& input) {
  if constexpr (requires { group.all_gather_single(output, input); }) {
    return group.all_gather_single(output, input);
  } else {
    return group._allgather_base(output, input);
  }
}

// output = this rank's part (dim 0) of the sum over ranks of `input`.
template <typename Group>
c10::intrusive_ptr<c10d::Work> reduce_scatter_single(Group& group, at::Tensor& output,
                                                     at::Tensor& input) {
  if constexpr (requires { group.reduce_scatter_single(output, input); }) {
    return group.reduce_scatter_single(output, input);
  } else {
    return group._reduce_scatter_base(output, input);
  }
}

// output part j = rank j's `input` part (this rank); `splits` empty: equal parts along dim 0.
template <typename Group>
c10::intrusive_ptr<c10d::Work> all_to_all_single(Group& group, at::Tensor& output,
                                                 at::Tensor& input, std::vector<int64_t>& splits) {
  if constexpr (requires { group.all_to_all_single(output, input, splits, splits); }) {
    return group.all_to_all_single(output, input, splits, splits);
  } else {
    return group.alltoall_base(output, input, splits, splits);
  }
}

}  // namespace ring_attn::c10d_compat
