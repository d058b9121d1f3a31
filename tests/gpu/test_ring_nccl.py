"""The NCCL transport (RING_ATTN_TRANSPORT=nccl) on several GPUs, against the c10d transport over
the same NCCL group and the float64 reference. Run on a machine with N >= 2 GPUs:

    torchrun --nproc-per-node N -m pytest -q tests/gpu/test_ring_nccl.py

Skips cleanly when not launched by torchrun or with fewer than 2 GPUs (e.g. in scripts/gpu_check.sh
on one H100). CPU twin that always runs: tests/test_transport_select.py (nccl on CPU/gloo tensors
raises the same ValueError on every rank; auto picks c10d).
"""
import os

import pytest
import torch
import torch.distributed as dist

import gpu_cases as gc

WORLD = int(os.environ.get("WORLD_SIZE", "1"))
pytestmark = pytest.mark.skipif(
    WORLD < 2 or not torch.cuda.is_available() or torch.cuda.device_count() < WORLD,
    reason="needs torchrun --nproc-per-node N with N >= 2 GPUs")


@pytest.fixture(scope="module")
def nccl_group():
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    yield dist.group.WORLD


def run_ring(transport, q, k, v, dout, layout, causal):
    import ring_attention as ra
    os.environ["RING_ATTN_TRANSPORT"] = transport
    try:
        leaves = [ra.shard(t, layout=layout).cuda().requires_grad_() for t in (q, k, v)]
        out, lse = ra.ring_attn_func(*leaves, causal=causal, layout=layout, return_lse=True)
        grads = torch.autograd.grad(out, leaves, ra.shard(dout, layout=layout).cuda())
        torch.cuda.synchronize()
    finally:
        os.environ.pop("RING_ATTN_TRANSPORT", None)
    return [t.detach().cpu() for t in (out, lse, *grads)]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_nccl_matches_c10d_and_reference(nccl_group, layout, causal):
    import ring_attention as ra
    dtype, heads, heads_kv, headdim, local_len = torch.bfloat16, 4, 2, 128, 256
    seqlen = WORLD * local_len
    seed = gc.seed_of("nccl", WORLD, layout, causal)
    q, k, v, dout = gc.random_qkv(seed, 2, seqlen, seqlen, heads, heads_kv, headdim, dtype)
    seen = gc.sequence_visible(seqlen, causal)
    scale = headdim ** -0.5
    ref = gc.reference(q, k, v, dout, seen, scale)
    low = gc.reference(q, k, v, dout, seen, scale, dtype)

    nccl = run_ring("nccl", q, k, v, dout, layout, causal)
    c10d = run_ring("c10d", q, k, v, dout, layout, causal)
    names = ("out", "lse", "dq", "dk", "dv")
    for name, a, b in zip(names, nccl, c10d):  # same kernels, same order: same bits
        assert torch.equal(a, b), f"{name}: nccl and c10d transports differ"
    for name, got, r, lo in zip(names, nccl, ref, low):
        dim = 2 if name == "lse" else 1
        gc.assert_fa_rule(f"rank {dist.get_rank()} {name}", got, ra.shard(r, layout=layout, dim=dim),
                          ra.shard(lo, layout=layout, dim=dim), dtype)


def test_nccl_rejects_cpu_tensors_on_every_rank(nccl_group):
    import ring_attention as ra
    os.environ["RING_ATTN_TRANSPORT"] = "nccl"
    try:
        q = torch.randn(1, 8, 2, 16)
        with pytest.raises(ValueError, match="RING_ATTN_TRANSPORT=nccl needs CUDA tensors"):
            ra.ring_attn_func(q, q, q)
    finally:
        os.environ.pop("RING_ATTN_TRANSPORT", None)


def test_ranks_on_different_transports_raise_on_every_rank(nccl_group):
    """Rank 0 asks for the NCCL transport, the others for c10d: every rank raises ValueError in
    the agreement (naming the transports) instead of waiting for peers that never come, and the
    group stays usable."""
    import ring_attention as ra
    os.environ["RING_ATTN_TRANSPORT"] = "nccl" if dist.get_rank() == 0 else "c10d"
    try:
        q = torch.randn(1, 8, 2, 16, device="cuda", dtype=torch.bfloat16)
        with pytest.raises(ValueError, match=r"ranks disagree on the transport \(RING_ATTN_TRANSPORT\)"):
            ra.ring_attn_func(q, q, q)
    finally:
        os.environ.pop("RING_ATTN_TRANSPORT", None)
    t = torch.ones(1, device="cuda")
    dist.all_reduce(t)
    assert t.item() == WORLD
