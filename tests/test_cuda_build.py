"""CPU twins of the CUDA tests (tests/gpu), run on every machine:
- the extension was built with its CUDA half whenever that was possible (CUDA torch + nvcc), and
  registers the CUDA kernels of every op;
- without a driver, a call that reaches the CUDA kernels raises a clean Python error, and
  importing the package works;
- the shared case list of tests/gpu/gpu_cases.py (masks, lengths, head dims, GQA, merges,
  accumulation, precision over merges, the ring over virtual ranks; built on tests/cases.py)
  passes on the CPU path under the same FlashAttention rule, so the list itself stays exercised.
"""
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

import ring_attention as ra

sys.path.insert(0, str(Path(__file__).resolve().parent / "gpu"))
import gpu_cases as gc  # noqa: E402

# The CPU twins run the shared cases in bfloat16, the lowest precision both paths take, with every
# mask kind: a mask or dtype the CPU kernels reject fails here rather than being skipped.
CPU_DTYPE = torch.bfloat16


OPS = ["ring_fwd", "ring_bwd", "local_ring_fwd", "local_ring_bwd", "block_fwd", "block_bwd"]


def _nvcc_found():
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    return bool(os.environ.get("CUDACXX") or shutil.which("nvcc")
                or Path(cuda_home, "bin", "nvcc").exists())


def _has_cuda_kernel(op):
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"ring_attention::{op}", "CUDA")


def test_cuda_half_built_when_possible():
    """CUDA torch + nvcc (and RING_ATTN_CUDA not OFF) => every op has a CUDA kernel; a CPU-only
    torch => none has."""
    if not torch.version.cuda:
        assert not any(_has_cuda_kernel(op) for op in OPS)
        return
    if not _nvcc_found() or os.environ.get("RING_ATTN_CUDA", "").upper() == "OFF":
        pytest.skip("nvcc not found or RING_ATTN_CUDA=OFF: the CPU half alone is expected")
    missing = [op for op in OPS if not _has_cuda_kernel(op)]
    assert not missing, f"built without CUDA kernels for {missing} although torch has CUDA and nvcc exists"
    info = torch.ops.ring_attention.cuda_build_info()
    assert "archs=" in info and "nvcc=" in info, info


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_cuda_call_without_driver_raises_clean_error():
    if not _has_cuda_kernel("block_fwd"):
        pytest.skip("CUDA half not built")
    assert "devices=0" in torch.ops.ring_attention.cuda_build_info()
    q = torch.zeros(1, 8, 2, 64, dtype=CPU_DTYPE)
    pos = torch.arange(8, dtype=torch.int32)
    out = torch.zeros(1, 8, 2, 64)
    lse = torch.full((1, 2, 8), float("-inf"))
    cuda_only = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    with pytest.raises((ValueError, RuntimeError), match="ring attention"):
        ra.ops.block_fwd.default.redispatch(cuda_only, q, q, q, pos, pos, None, out, lse, True, -1,
                                            -1, 0.125)
    with pytest.raises(RuntimeError):
        torch.zeros(1, device="cuda")
    # and the CPU path still works afterwards
    ra.ops.block_fwd(q=q, k=q, v=q, q_pos=pos, k_pos=pos, q_seg=None, out_acc=out, lse=lse,
                     causal=True, window_left=-1, window_right=-1, softmax_scale=0.125)
    assert torch.isfinite(lse).all()


def test_unknown_cuda_kernel_choice_raises(monkeypatch):
    if not _has_cuda_kernel("block_fwd"):
        pytest.skip("CUDA half not built")
    monkeypatch.setenv("RING_ATTN_CUDA_KERNEL", "sm100")
    q = torch.zeros(1, 8, 2, 64, dtype=CPU_DTYPE)
    pos = torch.arange(8, dtype=torch.int32)
    out = torch.zeros(1, 8, 2, 64)
    lse = torch.full((1, 2, 8), float("-inf"))
    cuda_only = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    with pytest.raises(ValueError, match="RING_ATTN_CUDA_KERNEL must be auto, sm80 or sm90a"):
        ra.ops.block_fwd.default.redispatch(cuda_only, q, q, q, pos, pos, None, out, lse, True, -1,
                                            -1, 0.125)


@pytest.mark.parametrize("value", ["ninety", "-1", "99k"])
def test_bad_cuda_shared_memory_cap_raises(monkeypatch, value):
    if not _has_cuda_kernel("block_fwd"):
        pytest.skip("CUDA half not built")
    monkeypatch.setenv("RING_ATTN_CUDA_MAX_SMEM_KIB", value)
    q = torch.zeros(1, 8, 2, 64, dtype=CPU_DTYPE)
    pos = torch.arange(8, dtype=torch.int32)
    out = torch.zeros(1, 8, 2, 64)
    lse = torch.full((1, 2, 8), float("-inf"))
    cuda_only = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    with pytest.raises(ValueError, match=f"RING_ATTN_CUDA_MAX_SMEM_KIB must be a non-negative "
                                         f"integer \\(KiB\\), got '{value}'"):
        ra.ops.block_fwd.default.redispatch(cuda_only, q, q, q, pos, pos, None, out, lse, True, -1,
                                            -1, 0.125)


# ---- the shared case list on the CPU (a subset of the lengths and head-dim x GQA grid, for time) --
CPU_LENGTHS = [(1, 1), (7, 97), (128, 1), (97, 128), (200, 333)]
assert all(sizes in gc.LENGTHS for sizes in CPU_LENGTHS)


@pytest.mark.parametrize("mask", gc.MASKS)
@pytest.mark.parametrize("sq,sk", CPU_LENGTHS)
def test_cpu_block_mask_cases(sq, sk, mask):
    gc.check_block("cpu", CPU_DTYPE, sq, sk, 4, 2, 64, mask)


@pytest.mark.parametrize("heads,heads_kv", [(4, 1), (2, 2)])
@pytest.mark.parametrize("headdim", gc.HEADDIMS)
def test_cpu_block_headdims_and_gqa(headdim, heads, heads_kv):
    gc.check_block("cpu", CPU_DTYPE, 97, 200, heads, heads_kv, headdim, "partial")


@pytest.mark.parametrize("mask", ["none", "partial", "masked_rows", "random", "window", "packed"])
def test_cpu_block_fwd_merges_key_blocks(mask):
    gc.check_merge_order("cpu", CPU_DTYPE, mask)


@pytest.mark.parametrize("mask", ["none", "partial", "masked_rows", "random", "window2"])
def test_cpu_block_bwd_accumulates_over_key_blocks(mask):
    gc.check_bwd_accumulates("cpu", CPU_DTYPE, mask)


@pytest.mark.parametrize("mask", ["none", "partial", "packed"])
def test_cpu_block_bwd_deterministic(mask):
    gc.check_deterministic_bwd("cpu", CPU_DTYPE, mask, heads=4, heads_kv=1)


def test_cpu_precision_does_not_decay_with_merges():
    """The CPU computes in fp32 from the rounded inputs, so both errors are rounding noise of
    ~1e-7: a floor of 1e-6 keeps the ratio check meaningful without flaking."""
    err_one, err_merged = gc.merge_errors("cpu", CPU_DTYPE, seeds=(0,))
    assert err_merged <= 1.2 * err_one + 1e-6, (err_one, err_merged)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("world,layout", [(1, "contiguous"), (3, "contiguous"), (3, "zigzag"),
                                          (3, "striped")])
def test_cpu_ring(world, layout, causal):
    gc.check_ring("cpu", CPU_DTYPE, world, layout, causal, local_len=32)


@pytest.mark.parametrize("world", [1, 3])
def test_cpu_ring_deterministic(world):
    gc.check_ring("cpu", CPU_DTYPE, world, "zigzag", True, heads=4, heads_kv=1, local_len=32,
                  deterministic=True)


def test_cpu_ring_window_and_mqa():
    gc.check_ring("cpu", CPU_DTYPE, 3, "zigzag", True, window=(50, 0), heads=4, heads_kv=1,
                  headdim=128, local_len=32)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("world,layout", [(1, "contiguous"), (3, "contiguous"), (3, "zigzag"),
                                          (3, "striped")])
def test_cpu_varlen_ring(world, layout, causal):
    gc.check_varlen_ring("cpu", CPU_DTYPE, world, layout, causal)


def test_cpu_varlen_ring_window_and_mqa():
    gc.check_varlen_ring("cpu", torch.float16, 4, "zigzag", True, window=(20, 0), heads=4,
                         heads_kv=1, headdim=128)


@pytest.mark.parametrize("world,layout", [(1, "contiguous"), (3, "zigzag")])
def test_cpu_sinks(world, layout):
    gc.check_ring("cpu", CPU_DTYPE, world, layout, True, local_len=32, sinks=True)
    gc.check_varlen_ring("cpu", CPU_DTYPE, world, layout, True, sinks=True)


@pytest.mark.parametrize("world", [1, 2])
def test_cpu_graph_replay_twin(world):
    """CPU twin of the CUDA graph test: the same static-input pattern, called instead of replayed."""
    gc.check_graph_replay("cpu", CPU_DTYPE, world)
