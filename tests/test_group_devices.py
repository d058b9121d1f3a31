"""Process groups whose backends carry only some devices: the library's own collectives (the
ranks' agreement, unshard's shape check) run on a device the group accepts, the ring's messages
travel only where the backend can carry them, and tensors on a device the group cannot carry
raise ValueError on every rank before anything is sent.

An NCCL-only group (init_process_group("nccl")) has a backend for CUDA tensors only. Without a
GPU, a "cuda:gloo" group stands for it: if the library chose the CPU for a collective over such a
group, c10d would raise its own RuntimeError ("no backend for device type cpu") instead of the
library's ValueError, and these tests fail. tests/gpu/test_nccl_group.py runs a real NCCL group."""
import pytest

from dist_pool import RankPool
from group_cases import (calls_after_destroy, device_rules, nonmember_calls_rejected, rejected_on,
                         ring_on)

WORLD = 2


def test_device_rules_per_backend(rank_pool):
    pool = rank_pool(WORLD)
    gloo, cpu_only, cuda_only, both = (pool.run(device_rules, backend)[0] for backend in
                                       ("gloo", "cpu:gloo", "cuda:gloo", "cpu:gloo,cuda:gloo"))
    for rules in (gloo, cpu_only, both):
        assert rules["collective_device_for_cpu_inputs"] == "cpu", rules
        assert rules["p2p_cpu"] == "" and rules["collective_cpu"] == "", rules
    # gloo reads host memory in send/recv: CUDA tensors may not travel the ring over it
    for rules in (gloo, both):
        assert "is gloo, which sends and receives CPU tensors only" in rules["p2p_cuda"], rules
        assert rules["collective_cuda"] == "", rules
    assert "no backend for cuda tensors (its backends: cpu: gloo)" in cpu_only["p2p_cuda"], cpu_only
    # a CUDA-only group: no collective on the CPU, and no CUDA device in this process
    assert cuda_only["collective_device_for_cpu_inputs"] == "", cuda_only
    assert "no backend for cpu tensors (its backends: cuda: gloo)" in cuda_only["p2p_cpu"], cuda_only
    assert cuda_only["collective_cpu"] == cuda_only["p2p_cpu"], cuda_only


@pytest.mark.parametrize("backend", ["cpu:gloo", "cpu:gloo,cuda:gloo"])
def test_ring_over_a_group_with_a_cpu_backend(rank_pool, backend):
    assert rank_pool(WORLD).run(ring_on, backend) == [True] * WORLD


@pytest.mark.parametrize("call", ["ring", "unshard", "unshard_varlen"])
def test_cpu_tensors_on_a_cuda_only_group_raise_on_every_rank(rank_pool, call):
    results = rank_pool(WORLD).run(rejected_on, "cuda:gloo", call)
    assert len(set(results)) == 1, results
    error, message = results[0]
    assert error == "ValueError", message
    assert "no backend for cpu tensors (its backends: cuda: gloo)" in message, message


def test_group_this_rank_is_not_a_member_of_raises_value_error(rank_pool):
    """A group of ranks 0 and 1 passed on rank 2 (where new_group returns NON_GROUP_MEMBER): every
    entry point raises ValueError saying so, as group and as ulysses_group."""
    member_0, member_1, messages = rank_pool(3).run(nonmember_calls_rejected)
    assert member_0 and member_1
    for call, message in messages.items():
        assert "this rank is not a member of the process group" in message, (call, message)


def test_group_destroyed_raises_value_error():
    """After destroy_process_group, a subgroup made before and the old default group raise
    ValueError saying the group was destroyed, from every entry point; after init_process_group
    the ring works again, and the old default group still raises (the ops find a group by name,
    and the new default group has the old one's). The pool's default group is replaced, so it has
    its own ranks."""
    pool = RankPool(WORLD)
    try:
        results = pool.run(calls_after_destroy)
    finally:
        pool.close(kill=True)
    for messages in results:
        assert len(messages) == 12, messages
        for call, message in messages.items():
            assert "the group was destroyed" in message, (call, message)
