"""Ring attention across 1-4 spawned ranks (gloo) against the float64 reference of the whole
sequence: out, lse, dq, dk, dv of every rank's shard (see ring_cases.check_ring)."""
import itertools

import pytest
import torch

from cases import seed_of
from ring_cases import check_ring, ring_param

WORLDS = [1, 2, 3, 4]
LAYOUTS = ["contiguous", "zigzag", "striped"]
DTYPES = [torch.float64, torch.float32]
# Zigzag splits a shard into two chunks, so it needs even local lengths.
LOCAL_LENGTHS = {"contiguous": [1, 7, 16], "striped": [1, 7, 16], "zigzag": [2, 6, 16]}
# (batch, heads, heads_kv, headdim, softmax_scale): MHA and GQA, default and custom scales.
SHAPES = [(1, 4, 2, 16, None), (2, 4, 1, 32, 0.3), (1, 2, 2, 64, None), (2, 3, 1, 24, 1.7),
          (2, 1, 1, 16, None)]


def ring_params():
    params = []
    for world, layout, causal, dtype in itertools.product(WORLDS, LAYOUTS, [False, True], DTYPES):
        for local_len in LOCAL_LENGTHS[layout]:
            # The shape varies with the case, so that every combination meets several shapes.
            batch, heads, heads_kv, headdim, scale = SHAPES[
                seed_of(world, layout, causal, str(dtype), local_len) % len(SHAPES)]
            params.append(ring_param(world, f"d{headdim}", layout=layout, causal=causal,
                                     dtype=dtype, local_len=local_len, batch=batch, heads=heads,
                                     heads_kv=heads_kv, headdim=headdim, scale=scale))
    return params


@pytest.mark.parametrize("world,case", ring_params())
def test_ring_matches_reference(rank_pool, world, case):
    rank_pool(world).run(check_ring, case)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("memory", ["transposed", "sliced", "headdim_strided"])
def test_ring_non_contiguous_inputs(rank_pool, world, memory):
    rank_pool(world).run(check_ring, dict(
        layout="zigzag", causal=True, dtype=torch.float64, local_len=6, batch=2, heads=4,
        heads_kv=2, headdim=16, scale=None, memory=memory))


@pytest.mark.parametrize("world,case", [
    (4, dict(layout="zigzag", causal=True, dtype=torch.float32, local_len=64, batch=2, heads=4,
             heads_kv=2, headdim=64, scale=None, memory="contiguous")),
    (3, dict(layout="striped", causal=True, dtype=torch.float64, local_len=48, batch=1, heads=4,
             heads_kv=1, headdim=128, scale=None, memory="contiguous")),
], ids=["w4-zigzag-float32-L64-d64", "w3-striped-float64-L48-d128"])
def test_ring_larger_cases(rank_pool, world, case):
    rank_pool(world).run(check_ring, case)


@pytest.mark.parametrize("world", [1, 3])
@pytest.mark.parametrize("batch,local_len", [(0, 6), (2, 0)], ids=["batch0", "seqlen0"])
def test_ring_empty_inputs(rank_pool, world, batch, local_len):
    """An empty batch or sequence: empty outputs and gradients, forward and backward."""
    rank_pool(world).run(check_ring, dict(
        layout="zigzag", causal=True, dtype=torch.float32, local_len=local_len, batch=batch,
        heads=4, heads_kv=2, headdim=16, scale=None, memory="contiguous"))
