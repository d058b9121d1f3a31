// Which transport carries a ring call's exchanges: RING_ATTN_TRANSPORT and the process group.
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include <memory>
#include <string>
#include <vector>

#include "core/ring_scheduler.h"

namespace ring_attn {

// RING_ATTN_TIMEOUT: the deadline of every wait of a transport (and of the ranks' agreement), in
// seconds (default 300; <= 0 waits forever).
double ring_timeout_seconds();

enum class TransportKind { kC10d, kNccl };

// RING_ATTN_TRANSPORT: auto (default) | c10d | nccl. Decided from the environment and the tensors
// only, before any communication. auto picks c10d until the NCCL transport has passed its
// multi-GPU tests.
TransportKind transport_kind(const at::Tensor& sample);
// The same, for the ranks' agreement: where RING_ATTN_TRANSPORT picks no transport for `sample`,
// c10d and the reason in `error` (which the agreement raises on every rank, since another rank's
// environment may pick one).
TransportKind transport_kind(const at::Tensor& sample, std::string* error);

// The process group registered as `name`; none for "" (world size 1). ValueError when no group
// of that name exists (it was destroyed).
c10::intrusive_ptr<c10d::ProcessGroup> resolve_group(const std::string& name);
int rank_of(const c10::intrusive_ptr<c10d::ProcessGroup>& group);
int world_of(const c10::intrusive_ptr<c10d::ProcessGroup>& group);

// The transport of `kind` over `group` for the tensors `slots` (which must outlive it); at world
// size 1 one that is never asked to exchange anything.
std::unique_ptr<Transport> group_transport(const c10::intrusive_ptr<c10d::ProcessGroup>& group,
                                           const std::vector<at::Tensor>& slots,
                                           TransportKind kind);

}  // namespace ring_attn
