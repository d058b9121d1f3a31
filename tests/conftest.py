"""Session-wide pools of ranks for the multi-process tests (see dist_pool.py)."""
import pytest

from dist_pool import RankPools

# A ring step that hangs fails inside the ranks (RuntimeError with the step and peer) well
# before a pool's task timeout kills the ranks.
POOL_ENV = {"RING_ATTN_TIMEOUT": "20"}


@pytest.fixture(scope="session")
def rank_pool():
    """rank_pool(world) -> the shared RankPool of that world size, created on first use."""
    pools = RankPools(POOL_ENV)
    yield pools.get
    pools.close()
