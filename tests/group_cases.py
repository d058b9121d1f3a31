"""Rank functions for the tests of process groups whose backends carry only some devices
(test_group_devices.py). Without a GPU, "cuda:gloo" stands for an NCCL-only group: a group with
a backend for CUDA tensors and none for CPU tensors, as init_process_group("nccl") makes."""
import torch
import torch.distributed as dist

import ring_attention as ra
from cases import random_qkv
from ring_cases import SMALL_CASE, check_ring, rank_and_world

_GROUPS = {}


def group_for(backend):
    """A subgroup of every rank with backend `backend` (e.g. "cpu:gloo"), created once per pool.
    Every rank calls this in the same order (new_group is collective)."""
    if backend not in _GROUPS:
        _GROUPS[backend] = dist.new_group(backend=backend)
    return _GROUPS[backend]


def device_rules(backend):
    """What the library decides for a group of `backend`: its collectives' device for CPU inputs
    ("" when this process has none) and why CPU or CUDA tensors could not travel point to point
    or in a collective ("" when they can)."""
    name = group_for(backend).group_name
    ops = ra.ops
    return {
        "collective_device_for_cpu_inputs": ops.group_collective_device(name, "cpu"),
        "p2p_cpu": ops.group_device_error(name, "cpu", True),
        "p2p_cuda": ops.group_device_error(name, "cuda:0", True),
        "collective_cpu": ops.group_device_error(name, "cpu", False),
        "collective_cuda": ops.group_device_error(name, "cuda:0", False),
    }


def ring_on(backend):
    """check_ring over a subgroup of `backend` (CPU tensors)."""
    group = group_for(backend)
    rank, world = rank_and_world()
    q, k, v, dout = random_qkv(7, 1, 8 * world, 8 * world, 4, 2, 16, torch.float32)
    expected = ra.attention_reference(q.double(), k.double(), v.double(), causal=True)[0]
    local = [ra.shard(t, group=group, layout="zigzag").requires_grad_() for t in (q, k, v)]
    out = ra.ring_attn_func(*local, causal=True, layout="zigzag", group=group)
    out.backward(ra.shard(dout, group=group, layout="zigzag"))
    full = ra.unshard(out.detach(), group=group, layout="zigzag")
    torch.testing.assert_close(full.double(), expected, rtol=2e-5, atol=2e-5)
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in local)
    return check_ring(dict(SMALL_CASE, layout="striped"))  # and the default group still works


def rejected_on(backend, call):
    """The error `call` ("ring", "unshard" or "unshard_varlen") raises for CPU tensors on a
    subgroup of `backend`: (type name, message); then proves the default group still usable."""
    group = group_for(backend)
    x = torch.randn(1, 8, 2, 16)
    try:
        if call == "ring":
            ra.ring_attn_func(x, x, x, causal=True, group=group)
        elif call == "unshard":
            ra.unshard(x, group=group)
        else:
            world = dist.get_world_size()
            cu = torch.tensor([0, 5 * world], dtype=torch.int32)
            ra.unshard_varlen(x[0], cu, group=group)
        outcome = ("ok", "")
    except Exception as e:  # noqa: BLE001 - the test inspects it
        outcome = (type(e).__name__, str(e))
    t = torch.ones(1)
    dist.all_reduce(t)
    assert t.item() == dist.get_world_size()
    return outcome


def nonmember_calls_rejected():
    """Rank 2 calls every entry point with a group of ranks 0 and 1 (GroupMember.NON_GROUP_MEMBER
    there), as group and as ulysses_group: each raises ValueError at once (no peer is involved).
    Ranks 0 and 1 run the ring over that group. Returns rank 2's messages."""
    if "members 0, 1" not in _GROUPS:
        _GROUPS["members 0, 1"] = dist.new_group([0, 1])
    group = _GROUPS["members 0, 1"]
    rank, _ = rank_and_world()
    q, k, v, _ = random_qkv(0, 1, 4, 4, 2, 1, 8, torch.float32)
    if rank != 2:
        return torch.isfinite(ra.ring_attn_func(q, k, v, group=group)).all().item()
    cu = torch.tensor([0, 4], dtype=torch.int32)
    calls = {
        "ring_attn_func": lambda kw: ra.ring_attn_func(q, k, v, **kw),
        "ring_attn_varlen_func": lambda kw: ra.ring_attn_varlen_func(q[0], k[0], v[0], cu, **kw),
        "shard": lambda kw: ra.shard(q, **kw),
        "unshard": lambda kw: ra.unshard(q, **kw),
        "shard_varlen": lambda kw: ra.shard_varlen(q[0], cu, **kw),
        "unshard_varlen": lambda kw: ra.unshard_varlen(q[0], cu, **kw),
    }
    messages = {}
    for name, call in calls.items():
        for keyword in ("group", "ulysses_group"):
            try:
                call({keyword: group})
                messages[f"{name}({keyword}=...)"] = "no error"
            except ValueError as error:
                messages[f"{name}({keyword}=...)"] = str(error)
    return messages


def calls_after_destroy():
    """Destroys the default group, then calls with a subgroup made before and with the old
    default group: each call raises ValueError at once. Then init_process_group again: the ring
    works over the new default group, and the old one, whose name the new one took, still
    raises. Returns {call: message}."""
    subgroup = dist.new_group([0, 1])
    old_world = dist.group.WORLD
    rank, world = rank_and_world()
    store = dist.distributed_c10d._get_default_store()
    dist.destroy_process_group()
    q, k, v, _ = random_qkv(0, 1, 4, 4, 2, 1, 8, torch.float32)
    cu = torch.tensor([0, 4 * world], dtype=torch.int32)
    calls = {
        "ring_attn_func": lambda group: ra.ring_attn_func(q, k, v, group=group),
        "ring_attn_varlen_func": lambda group: ra.ring_attn_varlen_func(q[0], k[0], v[0], cu,
                                                                        group=group),
        "unshard": lambda group: ra.unshard(q, group=group),
        "unshard_varlen": lambda group: ra.unshard_varlen(q[0], cu, group=group),
    }
    messages = {}

    def call_each(groups):
        for name, call in calls.items():
            for which, group in groups:
                try:
                    call(group)
                    messages[f"{name}({which})"] = "no error"
                except ValueError as error:
                    messages[f"{name}({which})"] = str(error)

    call_each((("subgroup", subgroup), ("old default group", old_world)))
    dist.init_process_group("gloo", store=dist.PrefixStore("again", store), rank=rank,
                            world_size=world)
    check_ring(SMALL_CASE)
    call_each((("old default group after init_process_group", old_world),))
    return messages
