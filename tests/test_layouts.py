"""shard / unshard / positions: round trips, permutations, divisibility errors, gradients."""
import pytest
import torch

import ring_attention as ra
from ring_cases import (UNSHARD_REJECTED, check_double_backward_raises, check_layouts,
                        check_unshard_compiled, check_unshard_many_dims,
                        check_unshard_rejected, check_shard_rejects, check_unshard_shapes_differ)

WORLDS = [1, 2, 3, 4]


@pytest.mark.parametrize("local_len", [2, 6])
@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("layout", ra.LAYOUTS)
def test_positions_of_all_ranks_form_a_permutation(layout, world, local_len):
    gathered = torch.cat([ra.positions(layout, r, world, local_len) for r in range(world)])
    assert gathered.dtype == torch.int64
    assert torch.equal(gathered.sort().values, torch.arange(world * local_len))


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("layout", ra.LAYOUTS)
def test_positions_increase_within_a_shard(layout, world):
    """The ring skips a step from the first and last positions of a shard alone."""
    for rank in range(world):
        assert torch.all(ra.positions(layout, rank, world, 6).diff() > 0), (layout, rank)


def test_zigzag_positions_need_even_local_length():
    with pytest.raises(ValueError, match="even local length"):
        ra.positions("zigzag", 0, 2, 3)


@pytest.mark.parametrize("rank,world,local_len", [(2, 2, 4), (-1, 2, 4), (0, 0, 4), (0, 2, -1)])
def test_positions_reject_ranks_outside_the_world(rank, world, local_len):
    with pytest.raises(ValueError, match=r"rank must be in \[0, world\)|local_len must be >= 0"):
        ra.positions("striped", rank, world, local_len)
    if local_len >= 0:
        with pytest.raises(ValueError, match=r"rank must be in \[0, world\)"):
            ra.varlen_positions(torch.tensor([0, 3, 8], dtype=torch.int32), "zigzag", rank, world)


def test_unknown_layout_is_rejected():
    for call in (lambda: ra.positions("diagonal", 0, 1, 2),
                 lambda: ra.shard(torch.zeros(1, 4), layout="diagonal"),
                 lambda: ra.unshard(torch.zeros(1, 4), layout="diagonal")):
        with pytest.raises(ValueError, match="unknown layout 'diagonal'"):
            call()


@pytest.mark.parametrize("world", WORLDS)
def test_shard_unshard_round_trip(rank_pool, world):
    """unshard(shard(x)) == x along several dims, shard matches positions(), and unshard is
    differentiable (every rank's gradient is the sum over ranks)."""
    pool = rank_pool(world)
    pool.run(check_layouts, 6, ra.LAYOUTS)
    pool.run(check_layouts, 5, ("contiguous", "striped"))


@pytest.mark.parametrize("layout,world", [(layout, world) for layout in ra.LAYOUTS
                                          for world in WORLDS if layout == "zigzag" or world > 1])
def test_shard_rejects_indivisible_length(rank_pool, layout, world):
    """The length must divide by world (contiguous, striped) or 2 * world (zigzag)."""
    parts = 2 * world if layout == "zigzag" else world
    # Zigzag also rejects an odd multiple of world.
    bad_lengths = [parts * 3 + 1] + ([world * 3] if layout == "zigzag" else [])
    pool = rank_pool(world)
    for seqlen in bad_lengths:
        for message in pool.run(check_shard_rejects, seqlen, layout):
            assert f"sequence length {seqlen} is not divisible by {parts}" in message, message


@pytest.mark.parametrize("world", [2, 3])
def test_unshard_rejects_different_shard_shapes(rank_pool, world):
    for message in rank_pool(world).run(check_unshard_shapes_differ):
        assert "ranks hold shards of different shapes" in message and "rank 1: (1, 6, 2)" in message


def test_unshard_compares_every_dimension(rank_pool):
    """Shards of more than 8 dimensions gather along any of them, and ranks whose shards differ
    only beyond the eighth raise ValueError on every rank (not a collective of mismatched sizes)."""
    for zigzag, packed, message in rank_pool(2).run(check_unshard_many_dims):
        assert zigzag == [0.0, 1.0, 1.0, 0.0]
        assert packed == [0.0, 1.0, 2.0, 3.0]
        assert "ranks hold shards of different shapes" in message, message
        assert "rank 1: (1, 1, 1, 1, 1, 1, 1, 1, 4)" in message, message


def test_unshard_compiled(rank_pool):
    """Compiled, unshard's agreement runs eagerly between graphs; fullgraph says why it cannot."""
    for message in rank_pool(2).run(check_unshard_compiled):
        assert "_shard_verdict" in message and "with its peers on the host" in message, message


def test_unshard_double_backward_raises(rank_pool):
    """The gradient of unshard (an all-reduce) is not differentiable again: RuntimeError."""
    assert all(rank_pool(2).run(check_double_backward_raises, "unshard"))


@pytest.mark.parametrize("kind", sorted(UNSHARD_REJECTED))
def test_unshard_rejects_one_bad_rank_on_every_rank(rank_pool, kind):
    """Rank 1 of 3 passes a bad argument, a shard of another dtype, or another layout or
    cu_seqlens: every rank raises the same ValueError before any data is sent (no hang, no abort),
    and the group stays usable."""
    messages = rank_pool(3).run(check_unshard_rejected, kind)
    assert len(set(messages)) == 1, messages
    assert UNSHARD_REJECTED[kind][1] in messages[0], messages[0]
