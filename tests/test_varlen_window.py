"""Sliding windows, packed variable-length sequences, low precision and determinism.

The reference sees the pairs that cases.sequence_visible derives from first principles (same
sequence, causal, window over global positions); it never uses the library's positions.
"""
import itertools
import random

import pytest
import torch

import ring_attention as ra
from ring_attention.testing import LocalRing
from cases import assert_close, random_packed, reference, seed_of, sequence_visible

LAYOUTS = ["contiguous", "zigzag", "striped", "packed"]


def local_varlen(world, layout, cu, q, k, v, dout, **kwargs):
    """(out, lse, dq, dk, dv) of LocalRing varlen unsharded to packed order, plus raw shards."""
    ring = LocalRing(world)
    shards = [ring.shard_varlen(t, cu, layout=layout) for t in (q, k, v, dout)]
    for t in itertools.chain(*shards[:3]):
        t.requires_grad_()
    outs, lses = ring.ring_attn_varlen_func(*shards[:3], cu, layout=layout, return_lse=True, **kwargs)
    grads = torch.autograd.grad(outs, list(itertools.chain(*shards[:3])), shards[3])
    gathered = [ring.unshard_varlen(outs, cu, layout=layout),
                ring.unshard_varlen([l.transpose(0, 1) for l in lses], cu, layout=layout).transpose(0, 1)]
    for i in range(3):
        gathered.append(ring.unshard_varlen(grads[i * world:(i + 1) * world], cu, layout=layout))
    return gathered, outs, lses, grads


# ---- windows on the dense API ----------------------------------------------------------------

INT64_MAX = 2 ** 63 - 1  # the widest window: as good as unbounded
WINDOWS = [(True, (3, -1)), (True, (0, 0)), (True, (5, 0)), (False, (2, 4)), (False, (-1, 1)),
           (False, (6, -1)), (False, (-1, INT64_MAX)), (True, (INT64_MAX, 0)),
           (False, (INT64_MAX, INT64_MAX))]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("causal,window", WINDOWS, ids=[f"{'c' if c else 'f'}{w}" for c, w in WINDOWS])
def test_window_matches_reference(world, layout, causal, window):
    seqlen = 6 * world
    cu, q, k, v, dout = random_packed(seed_of("window", world, layout, causal, window), [seqlen], 4,
                                      2, 16, torch.float64)
    expected = reference(q, k, v, dout, sequence_visible(seqlen, causal, window), 0.25)
    ring = LocalRing(world)
    shards = [ring.shard(t.unsqueeze(0), layout=layout) for t in (q, k, v, dout)]
    for t in itertools.chain(*shards[:3]):
        t.requires_grad_()
    outs, lses = ring.ring_attn_func(*shards[:3], causal=causal, window_size=window, layout=layout,
                                     softmax_scale=0.25, return_lse=True)
    grads = torch.autograd.grad(outs, list(itertools.chain(*shards[:3])), shards[3])
    got = [ring.unshard(outs, layout=layout)[0], ring.unshard(lses, layout=layout, dim=2)[0]]
    got += [ring.unshard(grads[i * world:(i + 1) * world], layout=layout)[0] for i in range(3)]
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, expected):
        assert_close(a, b, name)


def test_narrow_causal_window_skips_hops():
    """Contiguous layout, causal window of 1/8 of the sequence on 4 ranks: each rank needs K/V
    only from itself and the rank before it, so the ring runs 2 steps: every block but the last
    rank's (which no rank needs: no wrap-around) makes 1 K/V hop forward; backward 1 K/V hop and
    1 dK/dV hop home (the own block's dK/dV stay home); rank 0 computes 1 block, the others 2."""
    world, local = 4, 16
    seqlen = world * local
    cu, q, k, v, dout = random_packed(7, [seqlen], 2, 2, 16, torch.float64)
    window = (seqlen // 8, -1)
    ring = LocalRing(world)
    shards = [ring.shard(t.unsqueeze(0)) for t in (q, k, v, dout)]
    for t in itertools.chain(*shards[:3]):
        t.requires_grad_()
    hop = 2 * local * 2 * 16 * 8  # one packed float64 K/V (or dK/dV) block in bytes
    outs = ring.ring_attn_func(*shards[:3], causal=True, window_size=window)
    hops = world - 1
    assert ra.last_ring_stats() == {"steps": 2, "blocks_computed": 7, "exchanges_posted": hops,
                                    "bytes_sent": hops * hop, "messages_sent": hops}
    grads = torch.autograd.grad(outs, list(itertools.chain(*shards[:3])), shards[3])
    assert ra.last_ring_stats() == {"steps": 2, "blocks_computed": 7, "exchanges_posted": 2 * hops,
                                    "bytes_sent": 2 * hops * hop, "messages_sent": 2 * hops}
    expected = reference(q, k, v, dout, sequence_visible(seqlen, True, window))
    assert_close(ring.unshard(outs)[0], expected[0], "out")
    for i, name in enumerate(("dq", "dk", "dv")):
        assert_close(ring.unshard(grads[i * world:(i + 1) * world])[0], expected[2 + i], name)


# ---- packed variable-length sequences --------------------------------------------------------

def random_seqlens(seed, world):
    """Lengths including 1, lengths not divisible by 2*world, one long among short ones."""
    rng = random.Random(seed)
    lengths = [1, rng.randint(2, 2 * world + 3), 1, rng.randint(5 * world, 9 * world)]
    lengths += [rng.randint(1, 7) for _ in range(rng.randint(0, 3))]
    rng.shuffle(lengths)
    return lengths


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (True, (4, 0)),
                                           (False, (3, 2)), (False, (INT64_MAX, INT64_MAX))],
                         ids=["full", "causal", "cwin", "win", "win-int64-max"])
def test_varlen_matches_reference(world, layout, causal, window):
    seed = seed_of("varlen", world, layout, causal, window)
    seqlens = random_seqlens(seed, world)
    cu, q, k, v, dout = random_packed(seed, seqlens, 4, 2, 16, torch.float64)
    expected = reference(q, k, v, dout, sequence_visible(seqlens, causal, window), 0.3)
    got, outs, lses, grads = local_varlen(world, layout, cu, q, k, v, dout, causal=causal,
                                          window_size=window, softmax_scale=0.3)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, expected):
        assert_close(a, b, f"{name} (seqlens {seqlens})")
    # Pad tokens: zero output, lse -inf, no gradient.
    for rank in range(world):
        pad = ra.varlen_positions(cu, layout, rank, world)[1] < 0
        assert torch.equal(outs[rank][pad], torch.zeros_like(outs[rank][pad]))
        assert torch.isneginf(lses[rank][:, pad]).all()
        for i in range(3):
            g = grads[i * world + rank][pad]
            assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("causal,window", [(True, (-1, -1)), (False, (-1, -1)), (True, (300, 0))],
                         ids=["causal", "full", "cwin"])
def test_long_packed_batch_every_layout(causal, window):
    """A packed batch of 1 to ~1500-token documents (one longer than a rank's share) at world 3,
    every layout, forward and backward against the float64 reference."""
    rng = random.Random(seed_of("long-packed", causal, window))
    seqlens = [1, rng.randint(900, 1500), 7, rng.randint(2, 97), 1, rng.randint(100, 400)]
    cu, q, k, v, dout = random_packed(rng.randint(0, 1 << 30), seqlens, 2, 1, 16, torch.float64)
    expected = reference(q, k, v, dout, sequence_visible(seqlens, causal, window))
    for layout in LAYOUTS:
        got = local_varlen(3, layout, cu, q, k, v, dout, causal=causal, window_size=window)[0]
        for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, expected):
            assert_close(a, b, f"{layout} {name} (seqlens {seqlens})")


def packed_stats(seqlens, world, causal):
    """Steps, blocks and exchanges in last_ring_stats() of a LocalRing forward, then of its
    backward, over the packed layout."""
    cu, q, k, v, _ = random_packed(seed_of("packed-stats", seqlens), seqlens, 2, 1, 8, torch.float64)
    ring = LocalRing(world)
    shards = [[t.requires_grad_() for t in ring.shard_varlen(x, cu, layout="packed")] for x in (q, k, v)]
    outs = ring.ring_attn_varlen_func(*shards, cu, layout="packed", causal=causal)
    keys = ("steps", "blocks_computed", "exchanges_posted")
    forward = {key: ra.last_ring_stats()[key] for key in keys}
    torch.stack(outs).sum().backward()
    return forward, {key: ra.last_ring_stats()[key] for key in keys}


def test_packed_layout_makes_only_needed_hops():
    """Packed layout on 4 ranks: documents that never cross a rank boundary need no hop at all
    (one step, every rank one block); a document crossing one boundary needs one step more and
    one hop of its first rank's K/V forward (backward that K/V hop and one dK/dV hop home); one
    document over every rank needs the causal ring: block j travels to the 3 - j ranks after it,
    6 hops (zigzag would have made 12)."""
    world = 4  # 10 tokens per rank below
    fwd, bwd = packed_stats([3, 7, 10, 1, 9, 5, 5], world, causal=True)
    assert fwd == {"steps": 1, "blocks_computed": world, "exchanges_posted": 0}
    assert bwd == {"steps": 1, "blocks_computed": world, "exchanges_posted": 0}
    fwd, bwd = packed_stats([3, 7, 10, 4, 12, 4], world, causal=True)  # [24, 36) crosses 30
    assert fwd == {"steps": 2, "blocks_computed": world + 1, "exchanges_posted": 1}
    assert bwd == {"steps": 2, "blocks_computed": world + 1, "exchanges_posted": 2}
    fwd, bwd = packed_stats([40], world, causal=True)
    assert fwd == {"steps": world, "blocks_computed": world * (world + 1) // 2,
                   "exchanges_posted": world * (world - 1) // 2}
    assert bwd["exchanges_posted"] == world * (world - 1)


def packed_needs(seqlens, world):
    """The (rank, source) pairs of distinct ranks whose tokens share a document, under the packed
    layout (the token stream split into world equal contiguous parts): rank's queries may see
    source's keys (causal: when source < rank)."""
    per = sum(seqlens) // world
    pairs, start = set(), 0
    for length in seqlens:
        first, last = start // per, (start + length - 1) // per
        pairs |= {(r, s) for r in range(first, last + 1) for s in range(first, last + 1) if r != s}
        start += length
    return pairs


def hop_messages(pairs, world, causal):
    """How far each block's K/V must travel round the ring (to the farthest rank ahead of it that
    needs it) and the messages each rank then sends: (reach, K/V messages, dK/dV messages). Block
    j's K/V leave ranks j .. j+reach-1; its dK/dV sum leaves ranks j+1 .. j+reach (the last hop
    home to j)."""
    reach = [0] * world
    for rank, source in pairs:
        if source < rank or not causal:
            reach[source] = max(reach[source], (rank - source) % world)
    kv = [sum(0 <= (r - j) % world < reach[j] for j in range(world)) for r in range(world)]
    grad = [sum(1 <= (r - j) % world <= reach[j] for j in range(world)) for r in range(world)]
    return reach, kv, grad


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_packed_sends_only_needed_hops(rank_pool, causal):
    """Packed layout on 4 ranks, one document crossing one rank boundary (ranks 2 and 3): LocalRing
    matches the float64 reference forward and backward, the gloo ring matches LocalRing bit for
    bit, and each rank sends exactly the bytes of the hops the documents need: causal, block 2's
    K/V one hop to rank 3 and its dK/dV one hop home; non-causal also block 3's K/V the 3 hops
    round the ring to rank 2 and its dK/dV back."""
    world, seqlens = 4, [3, 7, 10, 4, 12, 4]  # 10 tokens per rank; [24, 36) crosses 30
    pairs = packed_needs(seqlens, world)
    reach, kv, grad = hop_messages(pairs, world, causal)
    assert reach == ([0, 0, 1, 0] if causal else [0, 0, 1, 3])
    per, heads_kv, headdim = sum(seqlens) // world, 2, 16
    block = 2 * per * heads_kv * headdim * 8  # one rank's packed float64 K/V, or dK/dV
    seed = seed_of("packed-hops", causal)
    cu, q, k, v, dout = random_packed(seed, seqlens, 4, heads_kv, headdim, torch.float64)
    expected = reference(q, k, v, dout, sequence_visible(seqlens, causal, (-1, -1)))

    ring = LocalRing(world)
    shards = [ring.shard_varlen(t, cu, layout="packed") for t in (q, k, v, dout)]
    assert all(shard.shape[0] == per for shard in shards[0])
    for t in itertools.chain(*shards[:3]):
        t.requires_grad_()
    outs, lses = ring.ring_attn_varlen_func(*shards[:3], cu, layout="packed", causal=causal,
                                            return_lse=True)
    blocks = world + sum(1 for r, s in pairs if s < r or not causal)
    assert ra.last_ring_stats() == {
        "steps": 1 + max(reach), "blocks_computed": blocks, "exchanges_posted": sum(kv),
        "bytes_sent": sum(kv) * block, "messages_sent": sum(kv)}
    grads = torch.autograd.grad(outs, list(itertools.chain(*shards[:3])), shards[3])
    sent = sum(kv) + sum(grad)
    assert ra.last_ring_stats() == {
        "steps": 1 + max(reach), "blocks_computed": blocks, "exchanges_posted": sent,
        "bytes_sent": sent * block, "messages_sent": sent}
    got = [ring.unshard_varlen(outs, cu, layout="packed"),
           ring.unshard_varlen([l.transpose(0, 1) for l in lses], cu, layout="packed").transpose(0, 1)]
    got += [ring.unshard_varlen(grads[i * world:(i + 1) * world], cu, layout="packed")
            for i in range(3)]
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, expected):
        assert_close(a, b, name)

    from ring_cases import varlen_ring_stats
    results = rank_pool(world).run(varlen_ring_stats, "packed", causal, (-1, -1), seqlens, seed)
    for rank, (tensors, forward, backward) in enumerate(results):
        local = [outs[rank], lses[rank]] + [grads[i * world + rank] for i in range(3)]
        for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), tensors, local):
            assert torch.equal(a, b.detach()), f"rank {rank} {name}"
        assert (forward["bytes_sent"], forward["messages_sent"]) == (kv[rank] * block, kv[rank])
        assert (backward["bytes_sent"], backward["messages_sent"]) == (
            (kv[rank] + grad[rank]) * block, kv[rank] + grad[rank]), f"rank {rank}"


def test_varlen_shard_balances_tokens():
    """Every rank gets the same number of tokens; unshard_varlen(shard_varlen(x)) == x."""
    cu = torch.tensor([0, 1, 8, 9, 40], dtype=torch.int32)
    x = torch.randn(40, 3, 2)
    for world, layout in itertools.product([1, 2, 3, 4], LAYOUTS):
        ring = LocalRing(world)
        shards = ring.shard_varlen(x, cu, layout=layout)
        assert len({s.shape[0] for s in shards}) == 1
        assert torch.equal(ring.unshard_varlen(shards, cu, layout=layout), x)


# ---- low precision and determinism -----------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_does_not_decay_with_ring_size(dtype):
    """Mean |error| vs float64 at world size 4 <= 1.2x world size 1 (fp32 accumulation across
    tiles and hops: the ring adds merges, not roundings)."""
    seqlen = 256
    cu, q, k, v, dout = random_packed(11, [seqlen], 4, 2, 64, torch.float64)
    q, k, v, dout = (t.to(dtype) for t in (q, k, v, dout))
    expected = reference(q, k, v, dout, sequence_visible(seqlen, True), 0.125)
    errors = {}
    for world in (1, 4):
        ring = LocalRing(world)
        shards = [ring.shard(t.unsqueeze(0), layout="zigzag") for t in (q, k, v)]
        outs = ring.ring_attn_func(*shards, causal=True, layout="zigzag", softmax_scale=0.125)
        out = ring.unshard(outs, layout="zigzag")[0]
        assert out.dtype == dtype
        errors[world] = (out.double() - expected[0]).abs().mean().item()
    assert errors[4] <= 1.2 * errors[1], errors


def test_cpu_results_are_bitwise_deterministic():
    """Forward and backward twice, with 2 threads: identical bits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seqlens = [37, 1, 90, 12]
        cu, q, k, v, dout = random_packed(3, seqlens, 4, 1, 32, torch.float32)
        runs = [local_varlen(3, "zigzag", cu, q, k, v, dout, causal=True)[0] for _ in range(2)]
        for a, b in zip(*runs):
            assert torch.equal(a, b)
        dense = []
        for _ in range(2):
            qq, kk, vv = (t.unsqueeze(0).clone().requires_grad_() for t in (q, k, v))
            out = ra.ring_attn_func(qq, kk, vv, causal=True, deterministic=True)
            out.backward(dout.unsqueeze(0))
            dense.append([out.detach(), qq.grad, kk.grad, vv.grad])
        for a, b in zip(*dense):
            assert torch.equal(a, b)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("kind", sorted(set(__import__("ring_cases").VARLEN_INVALID) - {"differs"}))
def test_bad_cu_seqlens_raises_without_a_group(kind):
    """One process: ValueError named after ring_attn_varlen_func, naming cu_seqlens."""
    from ring_cases import VARLEN_INVALID
    cu = torch.tensor([0, 3, 8, 9], dtype=torch.int32)
    q, k, v = (torch.randn(9, 2, 16) for _ in range(3))
    with pytest.raises(ValueError) as error:
        ra.ring_attn_varlen_func(q, k, v, VARLEN_INVALID[kind][0](cu), causal=True)
    message = str(error.value)
    assert message.startswith("ring_attn_varlen_func: ") and "cu_seqlens" in message, message
    if kind != "wrong_total":  # whose token counts are those of 3 ranks
        assert VARLEN_INVALID[kind][1] in message, message


def test_varlen_of_4d_inputs_names_the_function_once():
    q = torch.randn(1, 9, 2, 16)
    with pytest.raises(ValueError, match=r"^ring_attn_varlen_func: q, k and v must be 3-D "
                                         r"\(tokens_local, heads, headdim\); got q \[1, 9, 2, 16\]"):
        ra.ring_attn_varlen_func(q, q, q, torch.tensor([0, 9], dtype=torch.int32))


# ---- across processes (gloo) -----------------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(__import__("ring_cases").VARLEN_INVALID))
def test_bad_cu_seqlens_raises_on_every_rank(rank_pool, kind):
    """The same ValueError on every rank, named after ring_attn_varlen_func."""
    from ring_cases import VARLEN_INVALID, check_varlen_rejected
    messages = rank_pool(3).run(check_varlen_rejected, kind, (1,))
    assert len(set(messages)) == 1, messages
    assert messages[0].startswith("ring_attn_varlen_func: "), messages[0]
    assert VARLEN_INVALID[kind][1] in messages[0], messages[0]
    if kind != "differs":
        assert "rank 1: " in messages[0], messages[0]


@pytest.mark.parametrize("world,layout,causal,window", [
    (2, "zigzag", True, (-1, -1)), (3, "contiguous", True, (5, 0)), (4, "striped", False, (3, 3)),
    (3, "packed", True, (-1, -1)), (4, "packed", False, (4, 2))])
def test_varlen_gloo_ring_equals_local_ring(rank_pool, world, layout, causal, window):
    """The gloo ring and LocalRing agree bit for bit on packed sequences with windows."""
    from ring_cases import varlen_ring_results
    seqlens = random_seqlens(seed_of("gloo-varlen", world), world)
    seed = seed_of("gloo-varlen-data", world, layout)
    results = rank_pool(world).run(varlen_ring_results, layout, causal, window, seqlens, seed)
    cu, q, k, v, dout = random_packed(seed, seqlens, 4, 2, 16, torch.float64)
    _, outs, lses, grads = local_varlen(world, layout, cu, q, k, v, dout, causal=causal, window_size=window)
    for rank, (tensors, stats) in enumerate(results):
        local = [outs[rank], lses[rank]] + [grads[i * world + rank] for i in range(3)]
        for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), tensors, local):
            assert torch.equal(a, b.detach()), f"rank {rank} {name}"
        assert stats["steps"] <= world


def test_deterministic_follows_torch_setting():
    """torch.use_deterministic_algorithms(True) turns the deterministic backward on by itself."""
    from ring_attention.functional import _deterministic
    before = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        assert _deterministic(False)
        torch.use_deterministic_algorithms(False)
        assert not _deterministic(False) and _deterministic(True)
    finally:
        torch.use_deterministic_algorithms(before)
