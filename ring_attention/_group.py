"""Resolving the process group a call runs over."""
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist


def resolve(group) -> Tuple[Optional[dist.ProcessGroup], int, int]:
    """Returns (group, rank, world_size); (None, 0, 1) when torch.distributed is not initialised.

    ``group``: a ProcessGroup, a 1-D DeviceMesh (e.g. ``mesh["cp"]``) or None (the default group).
    """
    if dist.is_available() and isinstance(group, dist.ProcessGroup):
        _check_live(group)
        # Its registered members only: what torch.compile traces of a ProcessGroup.
        return group, group.rank(), group.size()
    if hasattr(group, "get_group") and hasattr(group, "ndim"):  # a DeviceMesh
        if group.ndim != 1:
            raise ValueError(f"ring_attention: a DeviceMesh group must be 1-D (e.g. mesh['cp']), got {group.ndim}-D")
        return resolve(group.get_group())
    if dist.is_available() and isinstance(group, int) and group == dist.GroupMember.NON_GROUP_MEMBER:
        raise ValueError("ring_attention: this rank is not a member of the process group it was "
                         "given (torch.distributed.new_group returns GroupMember.NON_GROUP_MEMBER "
                         "on the ranks it leaves out); call with a group this rank belongs to")
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError("ring_attention: a group was given but torch.distributed is not initialised")
        return None, 0, 1
    if group is None:
        group = dist.group.WORLD
    elif not isinstance(group, dist.ProcessGroup):
        raise ValueError("ring_attention: group must be a ProcessGroup, a 1-D DeviceMesh or None, "
                         f"got {type(group).__name__}")
    return group, dist.get_rank(group), dist.get_world_size(group)


def _check_live(group: dist.ProcessGroup) -> None:
    """ValueError unless ``group`` belongs to the current process group. The ops find a group by
    its name, and the groups made after destroy_process_group and init_process_group reuse the
    names of the destroyed ones: a destroyed group would otherwise run over a newer group. Not
    checked while torch.compile traces (it traces a ProcessGroup's rank, size and name only);
    there the ops reject only a name that no group holds (bindings/transport_select.h)."""
    if torch.compiler.is_compiling() or group in dist.distributed_c10d._world.pg_map:
        return
    raise ValueError("ring_attention: the group was destroyed (torch.distributed."
                     "destroy_process_group); pass a group of the current process group, created "
                     "after init_process_group")


def grid_error(group, ulysses_group) -> str:
    """Why group and ulysses_group (resolved) cannot form a U x R grid, from their ranks ("" when
    they may): a rank's group and ulysses_group of a grid share that rank alone. Not checked
    while torch.compile traces (the ops' agreement still rejects such groups)."""
    if group is None or ulysses_group is None or torch.compiler.is_compiling():
        return ""
    shared = sorted(set(dist.get_process_group_ranks(group))
                    & set(dist.get_process_group_ranks(ulysses_group)))
    if len(shared) <= 1:
        return ""
    return (f"group and ulysses_group share the ranks {shared}, but they must form a U x R grid "
            "and share this rank alone; group defaults to the whole world, so for Ulysses alone "
            "pass as group a group of this rank alone (e.g. torch.distributed."
            "new_subgroups_by_enumeration([[r] for r in range(world)])[0])")


def group_name(group) -> str:
    """Name under which C++ resolves the group; "" means world size 1 without a group."""
    if group is None:
        return ""
    return group.group_name


@torch.compiler.disable(reason="the ranks' agreement reads every rank's values on the host")
def gather_agreement(values: List[int], group: dist.ProcessGroup, device, call: str,
                     caller: str) -> List[List[int]]:
    """Every rank's int64 ``values`` (as many on every rank) over ``group`` (resolved, more than
    one rank), in one small all-gather through the ranks' agreement (bindings/agreement.h:
    RING_ATTN_TIMEOUT applies; a rank making another ``call`` raises ValueError), on the device
    the group's backend accepts for tensors on ``device``. ValueError, prefixed ``caller``, where
    it accepts none. torch.compile runs it eagerly, between graphs."""
    from ._ops import ops
    name = group_name(group)
    collective_device = ops.group_collective_device(name, str(device))
    if not collective_device:  # no rank can take part: every rank raises this alone
        raise ValueError(f"{caller}: {ops.group_device_error(name, str(device), False)}, and this "
                         "process has no device on which the group's backend could agree")
    descriptor = torch.tensor(values, dtype=torch.int64, device=collective_device)
    return [g.tolist() for g in ops.gather_agreement(descriptor, name, call)]
