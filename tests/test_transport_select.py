"""RING_ATTN_TRANSPORT (auto | c10d | nccl) on CPU tensors over gloo: the CPU twin of
tests/gpu/test_ring_nccl.py. nccl on CPU tensors raises the same ValueError on every rank (also where
only some ranks ask for it) before any exchange (the group stays usable); auto picks c10d (same bits); a bad value is a
ValueError naming it."""
import pytest
import torch

from transport_cases import group_still_usable, transport_check_ring, transport_outcome, with_transport
from transport_cases import batched_ring_posts, ring_outputs

WORLD = 2


def test_auto_and_c10d_agree_bitwise(rank_pool):
    pool = rank_pool(WORLD)
    auto = pool.run(transport_outcome, "auto")
    unset = pool.run(transport_outcome, None)
    c10d = pool.run(transport_outcome, "c10d")
    for rank in range(WORLD):
        for name, got in (("auto", auto), ("unset", unset), ("c10d", c10d)):
            assert got[rank][0] == "ok", (name, got[rank])
        for a, b, c in zip(auto[rank][1], unset[rank][1], c10d[rank][1]):
            assert torch.equal(a, c) and torch.equal(b, c)


def test_c10d_matches_reference(rank_pool):
    for status, result in rank_pool(WORLD).run(transport_check_ring, "c10d"):
        assert status == "ok" and result is True, (status, result)


@pytest.mark.parametrize("value,kind,needle", [
    ("nccl", "ValueError", "RING_ATTN_TRANSPORT=nccl"),
    ("mpi", "ValueError", "RING_ATTN_TRANSPORT must be auto, c10d or nccl, got 'mpi'"),
    (["nccl", None], "ValueError", "rank 0: RING_ATTN_TRANSPORT=nccl"),  # rank 1's is unset
    (["c10d", "mpi"], "ValueError", "rank 1: RING_ATTN_TRANSPORT must be auto, c10d or nccl"),
], ids=["nccl", "mpi", "nccl_on_rank_0", "mpi_on_rank_1"])
def test_rejected_on_every_rank(rank_pool, value, kind, needle):
    """value: every rank's RING_ATTN_TRANSPORT, or a list of each rank's."""
    pool = rank_pool(WORLD)
    outcomes = pool.run(transport_outcome, value)
    assert len(set(outcomes)) == 1, f"ranks raised differently: {outcomes}"
    got_kind, message = outcomes[0]
    assert got_kind == kind and needle in message, outcomes[0]
    if "nccl" in value:  # CPU tensors, or a build without NCCL: either way a clear reason
        assert "CUDA tensors" in message or "no NCCL transport" in message, message
    assert pool.run(group_still_usable) == [float(WORLD)] * WORLD


@pytest.mark.parametrize("value", ["nccl", "bogus"])
def test_rejected_without_group(value):
    kind, message = with_transport(value, ring_outputs, False)
    assert kind == "ValueError" and "RING_ATTN_TRANSPORT" in message, (kind, message)


@pytest.mark.parametrize("world", [2, 3])
def test_coalescing_backend_gets_one_batch_per_exchange(rank_pool, world):
    """Over a backend that coalesces (NCCL), each exchange's send and receive are posted in one
    batch of their own: unbatched, two ranks that both receive first wait for each other forever."""
    for rank, (same, posts) in enumerate(rank_pool(world).run(batched_ring_posts)):
        assert same, rank
        assert posts and all(batch is not None for _, _, batch in posts), (rank, posts)
        batches = {}
        for kind, peer, batch in posts:
            batches.setdefault(batch, []).append(kind)
        assert all(sorted(kinds) in (["recv"], ["send"], ["recv", "send"])
                   for kinds in batches.values()), (rank, posts)
        # The full ring of world w: w-1 K/V hops out and in, forward and backward, and the dK/dV
        # sums' w-1 hops (the last one home).
        assert sum(kind == "send" for kind, _, _ in posts) == 3 * (world - 1), (rank, posts)
