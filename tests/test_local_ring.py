"""LocalRing: every virtual rank of the ring in one process, over the in-memory transport. It must
match the float64 reference and, bit for bit, the gloo ring (same scheduler, same kernels)."""
import itertools

import pytest
import torch

import ring_attention as ra
from ring_attention.testing import LocalRing
from cases import (acc_dtype, assert_close, randn, random_packed, random_qkv, reference, seed_of,
                   sequence_visible)
from ring_cases import check_double_backward_raises, ring_results

LOCAL_LEN = {"contiguous": 7, "striped": 5, "zigzag": 6}


def local_ring_results(world, layout, causal, q, k, v, dout, softmax_scale=None, dlse=None):
    """(ring, [out, lse, dq, dk, dv] per rank); the gradients of out by dout and, if given, of
    lse by dlse."""
    ring = LocalRing(world)
    shards = [ring.shard(t, layout=layout) for t in (q, k, v, dout)]
    for t in itertools.chain(*shards[:3]):
        t.requires_grad_()
    outs, lses = ring.ring_attn_func(*shards[:3], causal=causal, layout=layout,
                                     softmax_scale=softmax_scale, return_lse=True)
    outputs, grad_outputs = list(outs), list(shards[3])
    if dlse is not None:
        outputs += lses
        grad_outputs += [t.to(lses[0].dtype) for t in ring.shard(dlse, layout=layout, dim=2)]
    grads = torch.autograd.grad(outputs, list(itertools.chain(*shards[:3])), grad_outputs)
    per_rank = [[outs[r], lses[r], grads[r], grads[world + r], grads[2 * world + r]]
                for r in range(world)]
    return ring, per_rank


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "striped"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_local_ring_matches_reference(world, layout, causal, dtype):
    seqlen = world * LOCAL_LEN[layout]
    q, k, v, dout = random_qkv(seed_of("local", world, layout, causal, str(dtype)), 2, seqlen,
                               seqlen, 4, 2, 16, dtype)
    dlse = randn(torch.Generator().manual_seed(seed_of("local-dlse", world, layout, causal)), 2, 4,
                 seqlen)
    expected = reference(q, k, v, dout, sequence_visible(seqlen, causal), 0.3, dlse=dlse)
    ring, per_rank = local_ring_results(world, layout, causal, q, k, v, dout, softmax_scale=0.3,
                                        dlse=dlse)
    for i, name in enumerate(("out", "lse", "dq", "dk", "dv")):
        dim = 2 if name == "lse" else 1
        got = ring.unshard([rank[i] for rank in per_rank], layout=layout, dim=dim)
        assert got.dtype == (dtype if name != "lse" or dtype == torch.float64 else torch.float32)
        assert_close(got, expected[i], name)


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("layout,causal", [("contiguous", True), ("zigzag", True), ("striped", False)])
def test_local_ring_equals_gloo_ring_bitwise(rank_pool, world, layout, causal):
    seed = seed_of("bitwise", world, layout, causal)
    gloo = rank_pool(world).run(ring_results, layout, causal, 6, seed)
    seqlen = world * 6
    q, k, v, dout = random_qkv(seed, 2, seqlen, seqlen, 4, 2, 16, torch.float64)
    _, local = local_ring_results(world, layout, causal, q, k, v, dout)
    for rank in range(world):
        for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), gloo[rank], local[rank]):
            assert torch.equal(a, b.detach()), f"rank {rank} {name} differs"


def test_local_ring_double_backward_raises():
    assert check_double_backward_raises("local_ring")


@pytest.mark.parametrize("world,ulysses,message", [
    (0, 1, "world_size must be an int >= 1, got 0"), (2.5, 1, "world_size must be an int >= 1, got 2.5"),
    ("2", 1, "world_size must be an int >= 1, got '2'"),
    (4, 3, r"ulysses_size must be an int dividing world_size \(4\), got 3"),
    (4, 2.0, r"ulysses_size must be an int dividing world_size \(4\), got 2.0")])
def test_local_ring_rejects_bad_sizes(world, ulysses, message):
    with pytest.raises(ValueError, match=message):
        LocalRing(world, ulysses_size=ulysses)


def test_local_ring_rejects_mismatched_shards():
    ring = LocalRing(3)
    q = [torch.randn(1, 4, 2, 8), torch.randn(1, 6, 2, 8), torch.randn(1, 4, 2, 8)]
    k = [torch.randn(1, 4, 2, 8), torch.randn(1, 6, 2, 8), torch.randn(1, 4, 2, 8)]
    with pytest.raises(ValueError, match=r"disagree on the local sequence length \(rank 0: 4, rank 1: 6"):
        ring.ring_attn_func(q, k, k)
    q[1], k[1] = torch.randn(1, 4, 2, 8), torch.randn(1, 4, 3, 8)
    with pytest.raises(ValueError, match=r"rank 1: the number of query heads \(2\) must be a multiple"):
        ring.ring_attn_func(q, k, k)
    with pytest.raises(ValueError, match="needs 3 shards"):
        ring.ring_attn_func(q[:2], k, k)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_opcheck_local_ring_ops(causal, dtype):
    """torch.library.opcheck on local_ring_fwd and local_ring_bwd: three virtual ranks, zigzag
    shards, a window."""
    shards = [random_qkv(seed_of("opcheck-local", rank, str(dtype)), 2, 6, 6, 4, 2, 16, dtype)
              for rank in range(3)]
    qs, ks, vs, douts = (list(per_rank) for per_rank in zip(*shards))
    fwd_args = (qs, ks, vs, None, causal, 0.3, 3, -1 if causal else 2, "zigzag")
    torch.library.opcheck(ra.ops.local_ring_fwd.default, fwd_args)
    outs, lses = ra.ops.local_ring_fwd(*fwd_args)
    assert [lse.dtype for lse in lses] == [acc_dtype(dtype)] * 3
    bwd_args = (douts, qs, ks, vs, outs, lses, *fwd_args[3:])
    for kwargs in ({}, {"dlses": [torch.randn_like(lse) for lse in lses]}):
        torch.library.opcheck(ra.ops.local_ring_bwd.default, bwd_args, kwargs)


def test_opcheck_local_ring_ops_packed_sequences():
    """The same for packed sequences (cu_seqlens): 3-D shards, lse (heads, tokens)."""
    cu, *packed = random_packed(seed_of("opcheck-local-packed"), [5, 1, 13], 4, 2, 16,
                                torch.float64)
    qs, ks, vs, douts = (LocalRing(3).shard_varlen(t, cu, layout="zigzag") for t in packed)
    fwd_args = (qs, ks, vs, cu, True, 0.25, -1, -1, "zigzag")
    torch.library.opcheck(ra.ops.local_ring_fwd.default, fwd_args)
    outs, lses = ra.ops.local_ring_fwd(*fwd_args)
    assert [lse.shape for lse in lses] == [(4, shard.shape[0]) for shard in qs]
    torch.library.opcheck(ra.ops.local_ring_bwd.default, (douts, qs, ks, vs, outs, lses,
                                                          *fwd_args[3:]))
