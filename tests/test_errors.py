"""Errors across ranks: invalid or mismatched inputs raise ValueError on every rank (and the group
stays usable); a peer that never takes part makes the others raise RuntimeError, not hang."""
import re

import pytest

from dist_pool import RankPool
from ring_cases import (DISAGREEMENTS, INVALID_INPUTS, OTHER_CALLS, call_unless_absent,
                        check_backward_against_forward, check_backward_of_other_call, check_other_call, check_rejected,
                        check_ring_with_timeout, dying_mid_ring, skipping_unshard_backward,
                        timeouts_on_new_groups, ulysses_call_unless_absent)

WORLD = 3


def assert_same_everywhere(messages):
    assert len(set(messages)) == 1, f"ranks raised different messages: {messages}"
    return messages[0]


@pytest.mark.parametrize("bad_ranks", [(1,), (0, 1, 2)], ids=["one_rank", "all_ranks"])
@pytest.mark.parametrize("kind", sorted(INVALID_INPUTS))
def test_invalid_input_raises_on_every_rank(rank_pool, kind, bad_ranks):
    """Every rank raises the same ValueError, listing each bad rank and its problem."""
    message = assert_same_everywhere(rank_pool(WORLD).run(check_rejected, kind, bad_ranks))
    header, *lines = message.splitlines()
    assert header == "ring_attn_func: invalid input (every rank raises this):", message
    listed = [line.split(":")[0].strip() for line in lines]
    assert listed == [f"rank {rank}" for rank in bad_ranks], message
    assert all(INVALID_INPUTS[kind][1] in line for line in lines), message


@pytest.mark.parametrize("kind", sorted(DISAGREEMENTS))
def test_disagreeing_ranks_raise_on_every_rank(rank_pool, kind):
    """Rank 1 differs from ranks 0 and 2 in one argument: every rank raises the same ValueError
    naming the argument and each rank's value."""
    message = assert_same_everywhere(rank_pool(WORLD).run(check_rejected, kind, (1,)))
    assert DISAGREEMENTS[kind][1] in message, message
    assert "rank 0: " in message and "rank 1: " in message and "rank 2: " in message, message
    values = {
        "seqlen": ("8", "6"), "causal": ("True", "False"), "layout": ("contiguous", "striped"),
        "softmax_scale": ("0.25", "0.5"), "dtype": ("Float", "Double"), "window": ("-1", "3"),
        "kv_exchange": ("ring", "allgather"),
    }[kind]
    assert f"rank 0: {values[0]}, rank 1: {values[1]}, rank 2: {values[0]}" in message, message


@pytest.mark.parametrize("kind", sorted(OTHER_CALLS))
def test_ranks_making_different_calls_raise_on_every_rank(rank_pool, kind):
    """Rank 1 calls another function of the library over the group while ranks 0 and 2 call
    ring_attn_func: every rank raises the same ValueError naming each rank's call (no crash of
    the backend, no hang), and the group stays usable."""
    message = assert_same_everywhere(rank_pool(WORLD).run(check_other_call, kind))
    other = OTHER_CALLS[kind][1]
    assert ("ranks called different functions over one process group (rank 0: ring_attn_func, "
            f"rank 1: {other}, rank 2: ring_attn_func)") in message, message


@pytest.mark.parametrize("kv_exchange", ["ring", "allgather"])
def test_rank_skipping_the_backward_raises_on_every_rank(rank_pool, kv_exchange):
    """Rank 1 calls ring_attn_func again while ranks 0 and 2 run the backward of the last call:
    every rank raises the same ValueError (the all-gather backward's collectives would otherwise
    meet the forward's agreement, which ends the process under gloo), and the group stays
    usable."""
    message = assert_same_everywhere(rank_pool(WORLD).run(check_backward_against_forward,
                                                          kv_exchange))
    assert ("ranks called different functions over one process group (rank 0: ring_attn_func "
            "backward, rank 1: ring_attn_func, rank 2: ring_attn_func backward)") in message, message


@pytest.mark.parametrize("grid", [False, True], ids=["ring", "ulysses"])
def test_ranks_in_backwards_of_different_calls_raise_on_every_rank(rank_pool, grid):
    """Rank 1 runs the backward of the first of two calls while the other ranks run the second's:
    every rank raises ValueError naming the calls by their number (on a 2 x 2 grid too), and the
    groups stay usable."""
    message = assert_same_everywhere(rank_pool(4).run(check_backward_of_other_call, grid))
    assert message.startswith("ring_attn_func backward: "), message
    # The calls are numbered from the group's first forward (the pool's ranks made others).
    if grid:  # found in the ulysses_group of ranks 0 and 1, passed on over the ring groups
        found = re.search(r"ranks of one ulysses_group disagree on the call whose backward runs "
                          r"\(counting the group's forward calls\) \(rank \(ring 0, ulysses 0\): "
                          r"(\d+), rank \(ring 0, ulysses 1\): (\d+)\)", message)
    else:
        found = re.search(r"ranks run the backward of different calls over one process group "
                          r"\(rank 0: call (\d+), rank 1: call (\d+), rank 2: call \1, rank 3: "
                          r"call \1, counting", message)
    assert found and int(found[1]) == int(found[2]) + 1, message


@pytest.mark.parametrize("seconds", ["1e30", "0"])
def test_long_or_no_ring_timeout_still_runs(rank_pool, seconds):
    """RING_ATTN_TIMEOUT of 10^30 s (longer than any clock counts) or 0 (wait forever): the ring
    and the agreement wait as asked and the call completes."""
    assert all(rank_pool(WORLD).run(check_ring_with_timeout, seconds))


# A fault leaves its process group unusable, so each fault test spawns its own ranks.
FAULT_TIMEOUT_S = 3
POOL_TIMEOUT_S = 60


@pytest.fixture
def fault_pool(request):
    pool = RankPool(request.param, env={"RING_ATTN_TIMEOUT": str(FAULT_TIMEOUT_S)})
    yield pool
    pool.close(kill=True)


@pytest.mark.parametrize("fault_pool", [2], indirect=True)
def test_peer_that_never_sends_times_out_in_ring_step(fault_pool):
    """Checks off: rank 1 never calls; rank 0 raises RuntimeError naming the step, the peer and
    the direction once RING_ATTN_TIMEOUT has passed."""
    error, message, elapsed = fault_pool.run(call_unless_absent, 1, "0", timeout=POOL_TIMEOUT_S)[0]
    assert error == "RuntimeError", message
    assert "ring step 0" in message and "receiving K/V from rank 1" in message, message
    assert "RING_ATTN_TIMEOUT" in message, message
    assert FAULT_TIMEOUT_S * 0.9 <= elapsed < FAULT_TIMEOUT_S + 5 < POOL_TIMEOUT_S, elapsed


@pytest.mark.parametrize("fault_pool", [3], indirect=True)
@pytest.mark.parametrize("call", ["ring_attn_func", "unshard", "decode_attn_func"])
def test_absent_rank_times_out_in_agreement(fault_pool, call):
    """Checks on: rank 1 never calls; ranks 0 and 2 raise RuntimeError from the agreement, naming
    the function they called."""
    results = fault_pool.run(call_unless_absent, 1, "1", call, timeout=POOL_TIMEOUT_S)
    assert results[1] is None
    for rank in (0, 2):
        error, message, elapsed = results[rank]
        assert error == "RuntimeError", message
        assert message.startswith(f"{call}: rank {rank} timed out"), message
        assert "agreeing on inputs" in message, message
        assert f"some rank of the group did not call {call}." in message, message
        assert FAULT_TIMEOUT_S * 0.9 <= elapsed < FAULT_TIMEOUT_S + 5 < POOL_TIMEOUT_S, elapsed


@pytest.mark.parametrize("fault_pool", [2], indirect=True)
def test_absent_rank_times_out_in_decode_gather(fault_pool):
    """Checks off: rank 1 never calls decode_attn_func; rank 0 raises RuntimeError from the
    all-gather of the partial results, naming the call."""
    error, message, elapsed = fault_pool.run(call_unless_absent, 1, "0", "decode_attn_func",
                                             timeout=POOL_TIMEOUT_S)[0]
    assert error == "RuntimeError", message
    assert message.startswith("decode_attn_func: rank 0 timed out"), message
    assert "gathering the partial attention" in message, message
    assert FAULT_TIMEOUT_S * 0.9 <= elapsed < FAULT_TIMEOUT_S + 5 < POOL_TIMEOUT_S, elapsed


@pytest.mark.parametrize("fault_pool", [2], indirect=True)
@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_absent_rank_times_out_in_ulysses_all_to_all(fault_pool, varlen):
    """Checks off, a ulysses_group of 2: rank 1 never calls; rank 0 raises RuntimeError in the
    all-to-all, naming the function it called."""
    call = "ring_attn_varlen_func" if varlen else "ring_attn_func"
    error, message, elapsed = fault_pool.run(ulysses_call_unless_absent, 1, varlen,
                                             timeout=POOL_TIMEOUT_S)[0]
    assert error == "RuntimeError", message
    assert message.startswith(f"{call}: rank 0 timed out"), message
    assert "in the all-to-all over the ulysses_group" in message, message
    assert FAULT_TIMEOUT_S * 0.9 <= elapsed < FAULT_TIMEOUT_S + 5 < POOL_TIMEOUT_S, elapsed


@pytest.mark.parametrize("fault_pool", [2], indirect=True)
def test_timed_out_groups_release_their_connections(fault_pool):
    """Timeouts, each on a new group that is then destroyed (a ring step's with checks off, the
    agreement's with checks on, unshard's backward; one pool, whose default group the timeouts
    leave alone): the works given up on go with their group, so the threads and open files of the
    rank that timed out stay flat instead of growing with every timeout."""
    cycles = 5
    for check, call in (("0", "ring_attn_func"), ("1", "ring_attn_func"),
                        ("1", "unshard backward")):
        counts = fault_pool.run(timeouts_on_new_groups, 1, cycles, check, call,
                                timeout=POOL_TIMEOUT_S)[0]
        (threads_first, files_first), (threads_last, files_last) = counts[0], counts[-1]
        assert threads_last - threads_first < cycles // 2, (check, call, counts)
        assert files_last - files_first < cycles // 2, (check, call, counts)


@pytest.mark.parametrize("fault_pool", [2], indirect=True)
def test_peer_skipping_unshard_backward_times_out(fault_pool):
    """Rank 1 never runs the backward through unshard: rank 0 raises RuntimeError once
    RING_ATTN_TIMEOUT has passed instead of waiting for the process group's own timeout."""
    error, message, elapsed = fault_pool.run(skipping_unshard_backward, 1,
                                             timeout=POOL_TIMEOUT_S)[0]
    assert error == "RuntimeError", message
    assert "unshard: rank 0 timed out" in message and "RING_ATTN_TIMEOUT" in message, message
    assert "summing the gradients in the backward" in message, message
    assert FAULT_TIMEOUT_S * 0.9 <= elapsed < FAULT_TIMEOUT_S + 5 < POOL_TIMEOUT_S, elapsed


@pytest.mark.parametrize("fault_pool", [2], indirect=True)
def test_peer_dying_mid_ring_fails_fast(fault_pool):
    """Rank 1 exits in the middle of a ring: rank 0 raises RuntimeError naming the ring step, the
    peer and the direction, and does not hang."""
    with pytest.raises(AssertionError) as failure:
        fault_pool.run(dying_mid_ring, 1, 0.3, timeout=POOL_TIMEOUT_S)
    report = str(failure.value)
    assert "rank 1 -----\nthe process died (exit code 17)" in report, report
    seen = re.search(r"SurvivorReport: after ([0-9.]+) s: (\w+): (.*)", report)
    assert seen, report
    seconds, error, message = float(seen[1]), seen[2], seen[3]
    assert error == "RuntimeError" and "ring step" in message and "rank 1" in message, report
    assert "receiving" in message or "sending" in message, report
    assert seconds < FAULT_TIMEOUT_S + 5, report
