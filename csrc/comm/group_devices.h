// Which tensors a process group's backends accept: the device of the library's own collectives
// (the ranks' agreement, unshard's shape check, the NCCL transport's id broadcast) and whether the
// ring's point-to-point messages can travel on the inputs' device.
//
// A group made by init_process_group("nccl") has a backend for CUDA tensors only; "gloo" has one
// for CPU tensors (its CUDA collectives stage through the host, but its send/recv read host
// memory only); "cpu:gloo,cuda:nccl" has both.
#pragma once

#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include <optional>
#include <string>

namespace ring_attn {

// The device on which the library's own small collectives over `group` run: the CPU when the
// group has a CPU backend, else `inputs` when the group has a backend for its type, else the
// group's CUDA device (its bound device, or the current CUDA device). nullopt when no such device
// exists in this process (a CUDA-only group and no CUDA device). The same device type on every
// rank of the group (it depends on the group and on which devices exist).
std::optional<at::Device> collective_device(c10d::ProcessGroup& group, const at::Device& inputs);

// Empty when `group` can run collectives on tensors of `device`; otherwise why not, naming the
// group's backends.
std::string collective_device_error(c10d::ProcessGroup& group, const at::Device& device);

// Empty when `group` can send and receive tensors of `device` point to point (the ring's
// messages over the c10d transport); otherwise why not, naming the group's backends.
std::string p2p_device_error(c10d::ProcessGroup& group, const at::Device& device);

// "cpu: gloo, cuda: nccl": the group's backend per device type.
std::string describe_backends(c10d::ProcessGroup& group);

}  // namespace ring_attn
