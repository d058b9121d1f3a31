"""Resolving the process group a call runs over."""
from typing import Optional, Tuple

import torch.distributed as dist


def resolve(group) -> Tuple[Optional[dist.ProcessGroup], int, int]:
    """Returns (group, rank, world_size); (None, 0, 1) when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError("ring_attention: a group was given but torch.distributed is not initialised")
        return None, 0, 1
    if group is None:
        group = dist.group.WORLD
    return group, dist.get_rank(group), dist.get_world_size(group)


def group_name(group) -> str:
    """Name under which C++ resolves the group; "" means world size 1 without a group."""
    if group is None:
        return ""
    return group.group_name
