"""Attention sinks (one logit per head in every row's softmax, as GPT-OSS has them):
ring_attn_func, ring_attn_varlen_func and LocalRing against the float64 reference of
cases.attention, which appends the sink column to the scores as GPT-OSS's eager attention does,
forward and backward (the sinks' gradient included), at world sizes 1 to 4, on Ulysses grids, with
pads and rows that see nothing, and under torch.compile."""
import pytest
import torch

import ring_attention as ra
from cases import (acc_dtype, assert_close, assert_matches, low_precision, randn, random_packed,
                   random_qkv, random_sinks, reference, seed_of, sequence_visible)
from ring_attention.testing import LocalRing
from ring_cases import INVALID_INPUTS, check_ring, check_ulysses

HEADS, HEADS_KV, HEADDIM = 4, 2, 16
NAMES = ("out", "lse", "dq", "dk", "dv", "dsinks")
SINK_INPUTS = sorted(kind for kind in INVALID_INPUTS if kind.startswith("sinks_"))


def leaves_of(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


@pytest.mark.parametrize("causal,window", [(True, (-1, -1)), (False, (-1, -1)), (True, (5, 0)),
                                           (False, (3, 2))], ids=["causal", "full", "causal-w5", "w3-2"])
@pytest.mark.parametrize("seqlen", [1, 7, 97])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_sinks_single_device_match_reference(dtype, seqlen, causal, window):
    """World size 1: out, lse and the gradients of both, of q, k, v and the sinks."""
    seed = seed_of("sinks", str(dtype), seqlen, causal, window)
    q, k, v, dout = random_qkv(seed, 2, seqlen, seqlen, HEADS, HEADS_KV, HEADDIM, dtype)
    dlse = randn(torch.Generator().manual_seed(seed + 1), 2, HEADS, seqlen)
    sinks = random_sinks(seed + 2, HEADS, dtype)
    seen = sequence_visible(seqlen, causal, window)
    ref = reference(q, k, v, dout, seen, dlse=dlse, sinks=sinks)
    low = (reference(q, k, v, dout, seen, dtype=dtype, dlse=dlse, sinks=sinks)
           if low_precision(dtype) else [None] * len(NAMES))
    leaves = leaves_of(q, k, v, sinks)
    out, lse = ra.ring_attn_func(*leaves[:3], causal=causal, window_size=window, return_lse=True,
                                 sinks=leaves[3])
    assert out.dtype == dtype and lse.dtype == acc_dtype(dtype), (out.dtype, lse.dtype)
    grads = torch.autograd.grad((out, lse), leaves, (dout, dlse.to(lse.dtype)))
    assert grads[3].dtype == sinks.dtype
    for name, ours, want, want_low in zip(NAMES, (out, lse, *grads), ref, low):
        assert_matches(name, ours, want, want_low, dtype)


def test_sinks_without_return_lse_match_reference():
    """return_lse=False: the sinks still change out, and the gradients are of out alone."""
    q, k, v, dout = random_qkv(seed_of("sinks out only"), 1, 9, 9, HEADS, HEADS_KV, HEADDIM,
                               torch.float64)
    sinks = random_sinks(3, HEADS, torch.float64)
    ref = reference(q, k, v, dout, sequence_visible(9, True), sinks=sinks)
    leaves = leaves_of(q, k, v, sinks)
    out = ra.ring_attn_func(*leaves[:3], causal=True, sinks=leaves[3])
    assert isinstance(out, torch.Tensor)
    grads = torch.autograd.grad(out, leaves, dout)
    for name, ours, want in zip(("out", "dq", "dk", "dv", "dsinks"), (out, *grads),
                                (ref[0], *ref[2:])):
        assert_close(ours, want, name)


def _local_ring_case(world, ulysses, layout, packed, sinks_of):
    """LocalRing's out, lse and gradients (of q, k, v and sinks) gathered in global order, beside
    the float64 reference of the whole sequence; sinks_of(seed) gives the sinks (None: none).
    Returns (ours, ref, local) with local = the virtual ranks' (outs, lses)."""
    seed = seed_of("sinks local ring", world, ulysses, layout, packed)
    ring = LocalRing(world, ulysses_size=ulysses)
    if packed:
        cu, q, k, v, dout = random_packed(seed, (7, 1, 23, 2), HEADS, HEADS_KV, HEADDIM,
                                          torch.float64)
        seen = sequence_visible((7, 1, 23, 2), True)
        dlse = randn(torch.Generator().manual_seed(seed + 1), HEADS, q.shape[0])
        split = lambda t, dim=0: ring.shard_varlen(t, cu, layout=layout, dim=dim)  # noqa: E731
        join = lambda ts, dim=0: ring.unshard_varlen(ts, cu, layout=layout, dim=dim)  # noqa: E731
        attend = lambda *qkv, **kw: ring.ring_attn_varlen_func(*qkv, cu, **kw)  # noqa: E731
        lse_dim = 1
    else:
        seqlen = world * 6
        q, k, v, dout = random_qkv(seed, 2, seqlen, seqlen, HEADS, HEADS_KV, HEADDIM, torch.float64)
        seen = sequence_visible(seqlen, True)
        dlse = randn(torch.Generator().manual_seed(seed + 1), 2, HEADS, seqlen)
        split = lambda t, dim=1: ring.shard(t, layout=layout, dim=dim)  # noqa: E731
        join = lambda ts, dim=1: ring.unshard(ts, layout=layout, dim=dim)  # noqa: E731
        attend = ring.ring_attn_func
        lse_dim = 2
    sinks = sinks_of(seed + 2)
    ref = reference(q, k, v, dout, seen, dlse=dlse, sinks=sinks)
    shards = [[t.requires_grad_() for t in split(x)] for x in (q, k, v)]
    leaves = [t for part in shards for t in part]
    if sinks is not None:
        sinks = sinks.clone().requires_grad_()
        leaves.append(sinks)
    outs, lses = attend(*shards, causal=True, layout=layout, return_lse=True, sinks=sinks)
    grads = torch.autograd.grad((*outs, *lses), leaves,
                                (*split(dout), *split(dlse, lse_dim)), allow_unused=True)
    gathered = [join(outs), join(lses, lse_dim)]
    gathered += [join(grads[i * world:(i + 1) * world]) for i in range(3)]
    return gathered + list(grads[3 * world:]), ref, (outs, lses)


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "striped"])
@pytest.mark.parametrize("world,ulysses", [(2, 1), (3, 1), (4, 1), (4, 2)],
                         ids=["w2", "w3", "w4", "U2xR2"])
def test_sinks_local_ring_match_reference(world, ulysses, layout, packed):
    """Every virtual rank applies the sinks to its rows; the sinks' gradient sums them all."""
    ours, ref, _ = _local_ring_case(world, ulysses, layout, packed,
                                    lambda seed: random_sinks(seed, HEADS, torch.float64))
    for name, got, want in zip(NAMES, ours, ref):
        assert_close(got, want, name)


def test_sinks_of_minus_infinity_change_nothing():
    """A sink of -inf adds nothing to a softmax: out, lse and gradients are bitwise those without
    sinks (pads included), and the sinks' gradient is 0."""
    minus_inf = lambda seed: torch.full((HEADS,), float("-inf"), dtype=torch.float64)  # noqa: E731
    with_sinks, _, _ = _local_ring_case(3, 1, "zigzag", True, minus_inf)
    without, _, _ = _local_ring_case(3, 1, "zigzag", True, lambda seed: None)
    for name, a, b in zip(NAMES, with_sinks, without):
        assert torch.equal(a, b), name
    assert torch.equal(with_sinks[5], torch.zeros(HEADS, dtype=torch.float64))


def test_sinks_on_rows_that_see_nothing():
    """Pad rows (shard_varlen's, seeing no key) get out 0 and lse = the sink, or -inf for a sink of
    -inf; no NaN reaches any output or gradient, and the real rows match the reference."""
    def sinks_of(seed):
        sinks = random_sinks(seed, HEADS, torch.float64)
        sinks[1] = float("-inf")
        sinks[2] = 1e4  # far above every score: out 0 on every row
        return sinks
    ours, ref, (outs, lses) = _local_ring_case(3, 1, "zigzag", True, sinks_of)
    _, _, (_, plain_lses) = _local_ring_case(3, 1, "zigzag", True, lambda seed: None)
    sinks = sinks_of(seed_of("sinks local ring", 3, 1, "zigzag", True) + 2)
    pads = [torch.isneginf(lse[0]) for lse in plain_lses]  # (tokens,): every head alike
    assert sum(int(p.sum()) for p in pads) > 0, "the case must hold pads"
    for out, lse, pad in zip(outs, lses, pads):
        assert torch.equal(out[pad], torch.zeros_like(out[pad]))
        assert torch.equal(lse[:, pad], sinks.view(-1, 1).expand(-1, int(pad.sum())))
    for name, got, want in zip(NAMES, ours, ref):
        assert not torch.isnan(got).any(), name
        assert_close(got, want, name)


def test_sinks_compile_fullgraph_matches_eager():
    """ring_attn_func with sinks traces whole under torch.compile(fullgraph=True)."""
    q, k, v, dout = random_qkv(seed_of("sinks compiled"), 1, 8, 8, HEADS, HEADS_KV, HEADDIM,
                               torch.float32)
    sinks = random_sinks(5, HEADS, torch.float32)

    def attend(q, k, v, sinks):
        return ra.ring_attn_func(q, k, v, causal=True, sinks=sinks)

    torch._dynamo.reset()
    compiled = torch.compile(attend, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (attend, compiled):
        leaves = leaves_of(q, k, v, sinks)
        out = fn(*leaves)
        results.append((out, *torch.autograd.grad(out, leaves, dout)))
    for name, a, b in zip(("out", "dq", "dk", "dv", "dsinks"), *results):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("kind", SINK_INPUTS)
def test_invalid_sinks_raise(kind):
    """Without a process group, and in LocalRing: ValueError naming the problem."""
    change, message = INVALID_INPUTS[kind]
    q, k, v, _ = random_qkv(seed_of(kind), 1, 8, 8, HEADS, HEADS_KV, HEADDIM, torch.float32)
    q, k, v, kwargs = change(q, k, v, dict(causal=True))
    with pytest.raises(ValueError, match="^ring_attn_func: ") as error:
        ra.ring_attn_func(q, k, v, **kwargs)
    assert message in str(error.value)
    with pytest.raises(ValueError, match="LocalRing: ") as error:
        LocalRing(2).ring_attn_func([q[:, :4], q[:, 4:]], [k[:, :4], k[:, 4:]],
                                    [v[:, :4], v[:, 4:]], **kwargs)
    assert message in str(error.value)


@pytest.mark.parametrize("world,layout,dtype,kv_exchange", [
    (2, "zigzag", torch.float64, "ring"), (3, "striped", torch.float32, "ring"),
    (4, "contiguous", torch.float64, "allgather")], ids=["w2-zigzag", "w3-striped", "w4-allgather"])
def test_sinks_ring_over_gloo_match_reference(rank_pool, world, layout, dtype, kv_exchange):
    rank_pool(world).run(check_ring, dict(
        layout=layout, causal=True, dtype=dtype, local_len=6, batch=2, heads=HEADS,
        heads_kv=HEADS_KV, headdim=HEADDIM, scale=None, memory="contiguous",
        kv_exchange=kv_exchange, window=(7, 0), sinks=True))


@pytest.mark.parametrize("seqlens", [None, [9, 2, 4]], ids=["dense", "packed"])
def test_sinks_ulysses_grid_match_reference(rank_pool, seqlens):
    rank_pool(4).run(check_ulysses, dict(
        ulysses=2, ring=2, layout="zigzag", causal=True, window=(-1, -1), kv_exchange="ring",
        dtype=torch.float64, local_len=4, heads=HEADS, heads_kv=HEADS_KV, headdim=HEADDIM,
        seqlens=seqlens, sinks=True))
