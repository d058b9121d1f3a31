"""The ring on CUDA: world size 1 through the scheduler (ring_attn_func) and LocalRing's virtual
ranks on one GPU, against the float64 reference (gpu_cases.py). CPU twins in
tests/test_cuda_build.py."""
import pytest
import torch

import gpu_cases as gc

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("headdim", [64, 128])
def test_world_one(headdim, causal, dtype):
    gc.check_ring("cuda", dtype, 1, "contiguous", causal, headdim=headdim)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "striped"])
@pytest.mark.parametrize("world", [2, 3, 4])
def test_local_ring(world, layout, causal):
    gc.check_ring("cuda", torch.bfloat16, world, layout, causal, local_len=64)


@pytest.mark.parametrize("world", [1, 3])
def test_ring_deterministic(world):
    gc.check_ring("cuda", torch.bfloat16, world, "zigzag", True, heads=4, heads_kv=1, local_len=64,
                  deterministic=True)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "striped"])
@pytest.mark.parametrize("world", [1, 3])
def test_varlen_ring(world, layout, causal):
    gc.check_varlen_ring("cuda", torch.bfloat16, world, layout, causal)


def test_varlen_ring_window_and_mqa():
    gc.check_varlen_ring("cuda", torch.float16, 4, "zigzag", True, window=(20, 0), heads=4,
                         heads_kv=1, headdim=128)


def test_local_ring_window_and_mqa():
    gc.check_ring("cuda", torch.bfloat16, 3, "zigzag", True, window=(50, 0), heads=4, heads_kv=1,
                  headdim=128, local_len=64)


@pytest.mark.parametrize("world,layout", [(1, "contiguous"), (3, "zigzag")])
def test_sinks(world, layout):
    gc.check_ring("cuda", torch.bfloat16, world, layout, True, local_len=64, sinks=True)
    gc.check_varlen_ring("cuda", torch.bfloat16, world, layout, True, sinks=True)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_cuda_graph_capture_and_replay(world):
    """Forward + deterministic backward captured in one CUDA graph; replays match eager calls."""
    gc.check_graph_replay("cuda", torch.bfloat16, world)
