"""The multi-process harness itself: results, error reporting, timeouts."""
import time

import pytest

import ring_cases
from dist_pool import RankPools


def test_results_in_rank_order(rank_pool):
    assert rank_pool(2).run(ring_cases.failing_on, -1) == [0, 1]


def test_failing_rank_traceback_is_reported(rank_pool):
    pool = rank_pool(2)
    with pytest.raises(AssertionError) as error:
        pool.run(ring_cases.failing_on, 1)
    message = str(error.value)
    assert "failed on 1 of 2 rank(s)" in message
    assert "----- rank 1 -----" in message and "----- rank 0 -----" not in message
    assert "Traceback" in message and "deliberate failure on rank 1" in message
    assert pool.run(ring_cases.failing_on, -1) == [0, 1]  # still usable


def test_timeout_names_silent_rank_and_replaces_pool():
    """A timeout kills the pool; the next request for that world size gets a fresh one."""
    pools = RankPools()
    try:
        pool = pools.get(2)
        assert pool.run(ring_cases.failing_on, -1) == [0, 1]  # imports ring_cases, outside the 2 s
        start = time.monotonic()
        with pytest.raises(TimeoutError, match=r"rank\(s\) 1 of 2 did not answer within 2 s"):
            pool.run(ring_cases.sleeping_on, 1, 60, timeout=2)
        assert time.monotonic() - start < 10
        assert not pool.alive
        assert pools.get(2) is not pool and pools.get(2).run(ring_cases.failing_on, -1) == [0, 1]
    finally:
        pools.close()
