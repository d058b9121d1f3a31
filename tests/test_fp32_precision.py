"""float32 inputs follow torch.get_float32_matmul_precision(), as torch's own matmuls do:
"highest" (torch's default) is as accurate as torch's float32 attention, "high" may split the
operands into three bf16 planes (the AMX tile unit), "medium" into one. Forward and backward, at
world size 1 and through a LocalRing, against the float64 reference."""
import pytest
import torch
import torch.nn.functional as F

import ring_attention as ra
from ring_attention.testing import LocalRing

AMX = ra.ops.cpu_kernel_isa() == "avx512+amx"


@pytest.fixture
def matmul_precision():
    before = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(before)


def inputs(seed, batch=2, seqlen=96, heads=4, heads_kv=2, headdim=64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, seqlen, h, headdim, generator=g) for h in (heads, heads_kv, heads_kv, heads)]


def ours(q, k, v, dout, world):
    """out, dq, dk, dv of a causal ring (world 1: ring_attn_func; else a LocalRing, zigzag)."""
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    if world == 1:
        out = ra.ring_attn_func(*leaves, causal=True)
    else:
        ring = LocalRing(world)
        outs = ring.ring_attn_func(*(ring.shard(t, layout="zigzag") for t in leaves), causal=True,
                                   layout="zigzag")
        out = ring.unshard(outs, layout="zigzag")
    return [out.detach(), *torch.autograd.grad(out, leaves, dout)]


def sdpa(q, k, v, dout, dtype):
    """out, dq, dk, dv of torch's own attention in `dtype` (float64: the reference)."""
    leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in leaves), is_causal=True,
                                         enable_gqa=True).transpose(1, 2)
    return [out.detach(), *torch.autograd.grad(out, leaves, dout.to(dtype))]


def max_errors(results, reference):
    return [(r.double() - ref).abs().max().item() for r, ref in zip(results, reference)]


@pytest.mark.parametrize("world", [1, 3])
def test_each_precision_within_its_bound(matmul_precision, world):
    q, k, v, dout = inputs(world)
    reference = sdpa(q, k, v, dout, torch.float64)
    torch_fp32 = max_errors(sdpa(q, k, v, dout, torch.float32), reference)
    scale = [max(1.0, r.abs().max().item()) for r in reference]
    errors = {}
    for precision in ("highest", "high", "medium"):
        matmul_precision(precision)
        errors[precision] = max_errors(ours(q, k, v, dout, world), reference)
    names = ("out", "dq", "dk", "dv")
    for name, err, base, s in zip(names, errors["highest"], torch_fp32, scale):
        # as accurate as torch's own float32 attention (2x its error, plus a few float32 ulps)
        assert err <= 2 * base + 4e-7 * s, ("highest", name, err, base)
    for name, err, s in zip(names, errors["high"], scale):
        assert err <= 2e-5 * s, ("high", name, err)  # three planes: about float32
    for name, err, s in zip(names, errors["medium"], scale):
        assert err <= 2 ** -6 * s, ("medium", name, err)  # bf16 products, fp32 sums
    if AMX:  # the tile unit runs "high" and "medium", each visibly coarser than the one above
        assert errors["high"][0] > errors["highest"][0]
        assert errors["medium"][0] > 100 * errors["high"][0]
    else:  # no faster path: every setting computes in float32
        assert errors["high"] == errors["highest"] == errors["medium"], errors


def test_small_causal_case_is_as_accurate_as_torch(matmul_precision):
    """q, k, v of (1, 16, 2, 64), causal, at torch's default precision."""
    matmul_precision("highest")
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 16, 2, 64) for _ in range(3))
    want = ra.attention_reference(q.double(), k.double(), v.double(), causal=True)[0]
    torch_err = (sdpa(q, k, v, torch.zeros_like(q), torch.float32)[0].double() - want).abs().max()
    err = (ra.ring_attn_func(q, k, v, causal=True).double() - want).abs().max()
    assert err <= 2 * torch_err + 1e-7, (err.item(), torch_err.item())
