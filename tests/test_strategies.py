"""Strategies of exchanging K/V: kv_exchange="allgather" against the float64 reference and
against the ring, over gloo (1-4 ranks) and LocalRing, dense and packed, with windows and GQA."""
import itertools
import math
import re
import subprocess
import sys

import pytest
import torch

import ring_attention as ra
from ring_attention.testing import LocalRing
from cases import acc_dtype, assert_close, random_packed, random_qkv, reference, seed_of
from ring_cases import (bytes_sent, check_double_backward_raises, check_grid_unshard_rejected,
                        check_ring, check_ulysses, check_ulysses_backward_skipped,
                        check_ulysses_rejected,
                        opcheck_ulysses_ops, ring_param, ring_results, varlen_ring_results)
from test_varlen_window import local_varlen, random_seqlens

LOCAL_LENGTHS = {"contiguous": [1, 7], "striped": [1, 7], "zigzag": [2, 6]}
# (batch, heads, heads_kv, headdim, softmax_scale, window): MHA, GQA down to one K/V head.
SHAPES = [(1, 4, 2, 16, None, (-1, -1)), (2, 4, 1, 32, 0.3, (3, 0)), (1, 2, 2, 8, None, (2, 5)),
          (2, 3, 1, 24, 1.7, (-1, -1))]


def allgather_params():
    params = []
    for world, layout, causal in itertools.product([1, 2, 3, 4], LOCAL_LENGTHS, [False, True]):
        local_len = LOCAL_LENGTHS[layout][(world + causal) % 2]
        batch, heads, heads_kv, headdim, scale, window = SHAPES[seed_of(world, layout, causal) % 4]
        if causal and window[1] > 0:
            window = (window[0], 0)
        dtype = torch.float64 if (world + len(layout)) % 2 else torch.float32
        params.append(ring_param(world, f"win{window[0]},{window[1]}", layout=layout,
                                 causal=causal, dtype=dtype, local_len=local_len, batch=batch,
                                 heads=heads, heads_kv=heads_kv, headdim=headdim, scale=scale,
                                 window=window, kv_exchange="allgather",
                                 deterministic=world % 2 == 0))
    return params


@pytest.mark.parametrize("world,case", allgather_params())
def test_allgather_matches_reference(rank_pool, world, case):
    rank_pool(world).run(check_ring, case)


@pytest.mark.parametrize("world,layout,causal", [(2, "zigzag", True), (3, "contiguous", True),
                                                 (4, "striped", False)])
def test_allgather_agrees_with_ring(rank_pool, world, layout, causal):
    """float32: the two exchanges give the same out and lse (the same merges in the same order)
    and the same gradients within float32 rounding (dK/dV are summed in another order)."""
    seed = seed_of("allgather-vs-ring", world, layout)
    ring = rank_pool(world).run(ring_results, layout, causal, 6, seed, "ring", torch.float32)
    gathered = rank_pool(world).run(ring_results, layout, causal, 6, seed, "allgather",
                                    torch.float32)
    for rank in range(world):
        for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), ring[rank], gathered[rank]):
            if name in ("out", "lse", "dq"):
                assert torch.equal(a, b), f"rank {rank} {name}"
            else:
                torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6,
                                           msg=lambda m: f"rank {rank} {name}: {m}")


@pytest.mark.parametrize("world,layout,causal,window", [
    (2, "zigzag", True, (-1, -1)), (3, "contiguous", True, (5, 0)), (4, "striped", False, (3, 3)),
    (3, "packed", True, (-1, -1)), (2, "packed", False, (4, 0))])
def test_allgather_packed_sequences(rank_pool, world, layout, causal, window):
    """Packed sequences with windows: LocalRing's all-gather against the float64 reference, and
    the gloo all-gather against LocalRing's."""
    seqlens = random_seqlens(seed_of("allgather-varlen", world), world)
    seed = seed_of("allgather-varlen-data", world, layout)
    cu, q, k, v, dout = random_packed(seed, seqlens, 4, 2, 16, torch.float64)
    from cases import sequence_visible
    expected = reference(q, k, v, dout, sequence_visible(seqlens, causal, window))
    local, outs, lses, grads = local_varlen(world, layout, cu, q, k, v, dout, causal=causal,
                                            window_size=window, kv_exchange="allgather")
    for name, got, want in zip(("out", "lse", "dq", "dk", "dv"), local, expected):
        assert_close(got, want, name)
    results = rank_pool(world).run(varlen_ring_results, layout, causal, window, seqlens, seed,
                                   "allgather")
    for rank, (tensors, stats) in enumerate(results):
        mine = [outs[rank], lses[rank]] + [grads[i * world + rank] for i in range(3)]
        for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), tensors, mine):
            torch.testing.assert_close(a, b.detach(), rtol=1e-12, atol=1e-12,
                                       msg=lambda m: f"rank {rank} {name}: {m}")
        assert stats["steps"] == 1


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "striped"])
def test_local_ring_allgather_matches_reference(world, layout):
    """LocalRing, causal, GQA with one K/V head, float32 and float64."""
    from cases import sequence_visible
    for dtype in (torch.float64, torch.float32):
        seqlen = world * 6
        q, k, v, dout = random_qkv(seed_of("local-allgather", world, layout, str(dtype)), 2,
                                   seqlen, seqlen, 4, 1, 16, dtype)
        expected = reference(q, k, v, dout, sequence_visible(seqlen, True), None)
        ring = LocalRing(world)
        shards = [ring.shard(t, layout=layout) for t in (q, k, v, dout)]
        for t in itertools.chain(*shards[:3]):
            t.requires_grad_()
        outs, lses = ring.ring_attn_func(*shards[:3], causal=True, layout=layout,
                                         return_lse=True, kv_exchange="allgather")
        grads = torch.autograd.grad(outs, list(itertools.chain(*shards[:3])), shards[3])
        got = [ring.unshard(outs, layout=layout), ring.unshard(lses, layout=layout, dim=2)]
        got += [ring.unshard(list(grads[i * world:(i + 1) * world]), layout=layout)
                for i in range(3)]
        for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, expected):
            assert a.dtype == (acc_dtype(dtype) if name == "lse" else dtype)
            assert_close(a, b, name)


def test_opcheck_allgather_ops():
    """torch.library.opcheck on ring_fwd/ring_bwd (world size 1) and local_ring_fwd/bwd (three
    virtual ranks) with kv_exchange="allgather"."""
    q, k, v, dout = random_qkv(seed_of("opcheck-allgather"), 2, 6, 6, 4, 2, 16, torch.float32)
    fwd_args = (q, k, v, None, "", True, 0.3, 3, -1, "zigzag")
    torch.library.opcheck(ra.ops.ring_fwd.default, fwd_args, {"kv_exchange": "allgather"})
    out, lse, _ = ra.ops.ring_fwd(*fwd_args, kv_exchange="allgather")
    torch.library.opcheck(ra.ops.ring_bwd.default, (dout, q, k, v, out, lse, *fwd_args[3:]),
                          {"kv_exchange": "allgather"})
    shards = [random_qkv(seed_of("opcheck-allgather", r), 2, 6, 6, 4, 2, 16, torch.float64)
              for r in range(3)]
    qs, ks, vs, douts = (list(per_rank) for per_rank in zip(*shards))
    fwd_args = (qs, ks, vs, None, False, 0.3, 3, 2, "striped")
    torch.library.opcheck(ra.ops.local_ring_fwd.default, fwd_args, {"kv_exchange": "allgather"})
    outs, lses = ra.ops.local_ring_fwd(*fwd_args, kv_exchange="allgather")
    torch.library.opcheck(ra.ops.local_ring_bwd.default,
                          (douts, qs, ks, vs, outs, lses, *fwd_args[3:]),
                          {"kv_exchange": "allgather"})


def test_unknown_kv_exchange_raises_locally():
    q, k, v, _ = random_qkv(seed_of("bad-exchange"), 1, 4, 4, 2, 1, 16, torch.float32)
    for bad in ("tree", None, 3):
        with pytest.raises(ValueError, match="unknown kv_exchange"):
            ra.ring_attn_func(q, k, v, kv_exchange=bad)
    with pytest.raises(ValueError, match="unknown kv_exchange 'tree'"):
        LocalRing(2).ring_attn_func([q, q], [k, k], [v, v], kv_exchange="tree")


# ---- Ulysses: all-to-all over heads inside ulysses_group, composed with group ------------------

def ulysses_params():
    params = []
    # (U, R, layout, causal, window, kv_exchange, dtype, local_len, heads, heads_kv, seqlens)
    for grid, layout, causal, window, exchange, dtype, local_len, heads, heads_kv, seqlens in [
            ((2, 1), "contiguous", True, (-1, -1), "ring", torch.float64, 7, 4, 1, None),
            ((2, 1), "zigzag", True, (5, 0), "allgather", torch.float32, 4, 6, 3, None),
            ((2, 1), "striped", False, (-1, -1), "ring", torch.float64, 1, 2, 2, [5, 1, 6]),
            ((4, 1), "zigzag", True, (-1, -1), "ring", torch.float32, 2, 8, 2, None),
            ((4, 1), "contiguous", True, (-1, -1), "allgather", torch.float64, 3, 4, 1, None),
            ((4, 1), "contiguous", True, (3, 0), "ring", torch.float64, 1, 4, 2, [7, 1, 5]),
            ((2, 2), "zigzag", True, (-1, -1), "ring", torch.float64, 4, 4, 1, None),
            ((2, 2), "striped", False, (2, 3), "allgather", torch.float32, 5, 6, 2, None),
            ((2, 2), "contiguous", True, (-1, -1), "allgather", torch.float64, 1, 4, 2, [9, 2, 4]),
            ((2, 2), "packed", True, (-1, -1), "ring", torch.float64, 1, 4, 2, [9, 2, 4]),
            ((2, 1), "packed", True, (3, 0), "allgather", torch.float64, 1, 4, 1, [5, 1, 6]),
            ((1, 4), "zigzag", True, (-1, -1), "ring", torch.float32, 6, 4, 2, None),
            ((1, 4), "contiguous", False, (-1, -1), "allgather", torch.float64, 7, 3, 1, None)]:
        case = dict(ulysses=grid[0], ring=grid[1], layout=layout, causal=causal, window=window,
                    kv_exchange=exchange, dtype=dtype, local_len=local_len, heads=heads,
                    heads_kv=heads_kv, headdim=16, seqlens=seqlens)
        case_id = (f"U{grid[0]}xR{grid[1]}-{layout}-{'causal' if causal else 'full'}-{exchange}"
                   f"-h{heads}/{heads_kv}-{'packed' if seqlens else f'L{local_len}'}")
        params.append(pytest.param(case, id=case_id))
    return params


@pytest.mark.parametrize("case", ulysses_params())
def test_ulysses_matches_reference(rank_pool, case):
    rank_pool(case["ulysses"] * case["ring"]).run(check_ulysses, case)


@pytest.mark.parametrize("kind,message", [
    ("heads_not_divisible", "must be divisible by the size of the ulysses_group (2)"),
    ("kv_exchange_disagrees", "disagree on the kv_exchange"),
    ("unknown_kv_exchange", "unknown kv_exchange 'tree'"),
    ("not_a_grid", "but they must form a U x R grid and share this rank alone"),
    ("default_group", "group and ulysses_group share the ranks [0, 1], but they must form a U x R "
                      "grid and share this rank alone; group defaults to the whole world"),
    ("seqlen_disagrees", "disagree on the local tokens"),
    ("window_disagrees_in_ulysses_group",
     "ranks of one ulysses_group disagree on the window_size[0] (left)"),
    ("causal_disagrees_in_group", "ranks of one group disagree on the causal"),
    ("heads_kv_disagrees_in_group", "ranks of one group disagree on the number of K/V heads"),
    ("bad_window", "rank (ring 1, ulysses 1): window_size values must be >= 0"),
    ("scale_not_a_number", "rank (ring 1, ulysses 1): softmax_scale must be a number or None, got"),
    ("return_lse_not_a_bool", "rank (ring 1, ulysses 1): return_lse must be True or False"),
    ("return_lse_disagrees", "ranks of one ulysses_group disagree on the return_lse"),
])
def test_ulysses_errors_raise_on_every_rank(rank_pool, kind, message):
    messages = rank_pool(4).run(check_ulysses_rejected, kind)
    assert all(message in m for m in messages), messages


@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_rank_skipping_the_ulysses_backward_raises_on_every_rank(rank_pool, varlen):
    """Rank 1 of a 2 x 2 grid calls again while the others run the backward of the last call:
    every rank raises ValueError naming the calls, the ranks of the other ulysses_group too (they
    would otherwise wait for rank 0 in the ring's backward), and the groups stay usable."""
    call = "ring_attn_varlen_func" if varlen else "ring_attn_func"
    for message in rank_pool(4).run(check_ulysses_backward_skipped, varlen):
        assert message.startswith("ring attention: ranks called different functions over one "
                                  "process group ("), message
        calls = re.findall(r"rank \d: ([a-z_]+ \(Ulysses\)(?: backward)?)", message)
        assert sorted(calls) == [f"{call} (Ulysses)", f"{call} (Ulysses) backward"], message


@pytest.mark.parametrize("kind,parts", [
    ("unknown_layout", ["unknown layout 'bogus'"]),
    ("not_a_grid", ["ranks disagree on the arguments (rank 0: layout 'zigzag'",
                    "rank 0 of 2 in group, rank 1: layout 'zigzag'", "rank 1 of 2 in group)"])])
@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_grid_unshard_rejects_one_bad_rank_on_every_rank(rank_pool, varlen, kind, parts):
    """A bad layout on one rank of a 2 x 2 grid, or groups that do not form a grid: every rank
    raises ValueError (the ranks of the other ulysses_group learn it in the agreement over the
    ring group), none waits, and none gathers a wrong tensor."""
    messages = rank_pool(4).run(check_grid_unshard_rejected, varlen, kind)
    assert len(set(messages)) == 1 and all(part in messages[0] for part in parts), messages


@pytest.mark.parametrize("kind", ["ring", "ulysses"])
def test_double_backward_raises_on_every_rank(rank_pool, kind):
    """A gradient of the ring (or of the Ulysses op) is not differentiable again: RuntimeError."""
    assert all(rank_pool(2).run(check_double_backward_raises, kind))


@pytest.mark.parametrize("ulysses,ring", [(2, 1), (2, 2)], ids=str)
@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_opcheck_ulysses_ops(rank_pool, ulysses, ring, varlen):
    """torch.library.opcheck on ulysses_fwd/ulysses_bwd with a ulysses_group on gloo ranks."""
    assert all(rank_pool(ulysses * ring).run(opcheck_ulysses_ops, ulysses, ring, varlen,
                                             timeout=300))


# ---- bytes each rank sends ---------------------------------------------------------------------

@pytest.mark.parametrize("ulysses,ring,heads,heads_kv", [
    (1, 2, 4, 2), (1, 3, 4, 1), (1, 4, 4, 1), (2, 1, 4, 1), (2, 2, 4, 2), (4, 1, 8, 2),
    (2, 2, 6, 3)], ids=lambda p: str(p))
@pytest.mark.parametrize("kv_exchange", ["ring", "allgather"])
def test_bytes_sent_per_rank(rank_pool, ulysses, ring, heads, heads_kv, kv_exchange):
    """Every rank sends, per call, what the formulas say: K/V blocks of 2 * L * hk' * d float32
    (hk' = lcm(U, hk) when U does not divide hk, U * L tokens of hk' / U heads per ring-group
    block), R - 1 of them forward and R - 1 plus as many float32 dK/dV backward, for the ring and
    the all-gather alike (causal zigzag needs every ring step); Ulysses adds (U - 1) / U of
    q, k, v and out (dout, dq, dk, dv). ring_attention.strategies.cost says the same."""
    from ring_attention.strategies import cost
    local_len, batch, headdim, elem = 4, 2, 16, 4
    heads_kv_ex = heads_kv if heads_kv % ulysses == 0 else math.lcm(heads_kv, ulysses)
    block = 2 * batch * local_len * heads_kv_ex * headdim * elem
    all_to_all = (ulysses - 1) * batch * local_len * headdim * elem * (2 * heads + 2 * heads_kv_ex)
    all_to_all //= ulysses
    expected = {"fwd": ((ring - 1) * block, ring - 1, all_to_all),
                "bwd": (2 * (ring - 1) * block, 2 * (ring - 1), all_to_all)}
    results = rank_pool(ulysses * ring).run(bytes_sent, ulysses, ring, kv_exchange, heads,
                                            heads_kv, local_len)
    for rank, sent in enumerate(results):
        assert {k: tuple(v) for k, v in sent.items()} == expected, f"rank {rank}: {sent}"
    planned = cost(kv_exchange, ulysses * ring, ulysses, heads, heads_kv, headdim,
                   ulysses * ring * local_len, batch=batch, elem_bytes=elem)
    assert (planned.fwd_bytes, planned.bwd_bytes) == (
        expected["fwd"][0] + all_to_all, expected["bwd"][0] + all_to_all)


def test_plan_prints_strategies_and_picks_the_fewest_bytes():
    """python -m ring_attention.plan --strategies: one row per strategy with the bytes of
    ring_attention.strategies.cost, and the pick marked. With 8 K/V heads of 32 on 8 ranks,
    Ulysses over 2 ranks sends less than the plain ring (the ring runs over 4 ranks only)."""
    from ring_attention.strategies import cost
    args = ["--world", "8", "--ulysses", "2", "--heads", "32", "--heads-kv", "8",
            "--headdim", "128", "--seqlen", "65536"]
    printed = subprocess.run([sys.executable, "-m", "ring_attention.plan", "--strategies", *args],
                             check=True, capture_output=True, text=True).stdout
    rows = {line.split("|")[0].strip(): line for line in printed.splitlines() if "|" in line}
    for name, u in (("ring", 1), ("allgather", 1), ("ring + ulysses", 2),
                    ("allgather + ulysses", 2)):
        row = next(line for key, line in rows.items() if key.startswith(name) and
                   key.split()[-2] == str(u))
        planned = cost(name.split()[0], 8, u, 32, 8, 128, 65536)
        assert f"{planned.fwd_bytes:,}" in row and f"{planned.bwd_bytes:,}" in row, row
    picked = [line for line in printed.splitlines() if line.endswith("<- pick")]
    assert len(picked) == 1 and picked[0].startswith("ring + ulysses"), printed
    assert cost("ring", 8, 2, 32, 8, 128, 65536).total_bytes < cost("ring", 8, 1, 32, 8, 128,
                                                                      65536).total_bytes


@pytest.mark.parametrize("world,ulysses,window", [(8, 2, 5), (8, 2, 13), (8, 4, 9), (4, 2, 2),
                                                    (8, 4, 40)], ids=str)
def test_costs_scale_a_window_to_the_ulysses_ring(world, ulysses, window):
    """costs(..., ring_steps=s) with s the steps of the ring over all ranks under a causal window
    over contiguous shards: its Ulysses candidates count the steps the ring over world / U ranks
    runs (LocalRing's grid) for the same window."""
    from ring_attention.strategies import costs
    x = torch.randn(1, world * 4, 4, 8)
    steps = {}
    for u in (1, ulysses):
        ring = LocalRing(world, ulysses_size=u)
        shards = ring.shard(x)
        ring.ring_attn_func(shards, shards, shards, causal=True, window_size=(window, 0))
        steps[u] = ra.last_ring_stats()["steps"]
    planned = {c.ulysses: c for c in costs(world, ulysses, 4, 4, 8, world * 4,
                                           ring_steps=steps[1]) if c.kv_exchange == "ring"}
    assert planned[1].fwd_messages == steps[1] - 1
    assert planned[ulysses].fwd_messages - 4 * (ulysses - 1) == steps[ulysses] - 1, steps


@pytest.mark.parametrize("changes,message", [
    ({"world": 0}, "world must be an int >= 1, got 0"),
    ({"ulysses": 0}, "ulysses must be an int >= 1, got 0"),
    ({"headdim": 16.0}, "headdim must be an int >= 1, got 16.0"),
    ({"batch": -1}, "batch must be an int >= 1, got -1"),
    ({"ulysses": 3}, "world (4) must divide by U (3)"),
    ({"heads_kv": 3}, "heads (4) must divide by heads_kv (3)"),
    ({"heads_kv": 8}, "heads (4) must divide by heads_kv (8)"),
    ({"seqlen": 6}, "seqlen (6) must divide by world (4)"),
    ({"ring_steps": 5}, "ring_steps must be 0 (all R = 4 steps) or an int in [1, 4], got 5"),
    ({"ulysses": 2, "ring_steps": 3}, "or an int in [1, 2], got 3"),
    ({"ring_steps": -1}, "got -1"),
], ids=str)
def test_cost_rejects_sizes_no_call_could_have(changes, message):
    """Sizes that no call could have raise ValueError naming the size (not a ZeroDivisionError,
    negative bytes, or the bytes of heads that do not form GQA groups)."""
    from ring_attention.strategies import cost
    sizes = {**dict(world=4, ulysses=1, heads=4, heads_kv=2, headdim=16, seqlen=8), **changes}
    with pytest.raises(ValueError) as error:
        cost("ring", **sizes)
    assert message in str(error.value)


def test_cost_takes_numpy_and_tensor_integers():
    """Sizes given as numpy integers or 0-d integer tensors (a config read from arrays) cost what
    the same Python ints do, in Python ints; floats and bools stay rejected."""
    import numpy as np
    from ring_attention.strategies import cost
    sizes = dict(world=4, ulysses=2, heads=8, heads_kv=2, headdim=64, seqlen=4096, ring_steps=1)
    want = cost("ring", **sizes)
    for wrap in (np.int64, np.int32, torch.tensor):
        got = cost("ring", **{name: wrap(value) for name, value in sizes.items()})
        assert got == want and all(type(getattr(got, f)) is int for f in ("fwd_bytes", "ring"))
    for bad in (4.0, True, np.float64(4)):
        with pytest.raises(ValueError, match="world must be an int >= 1"):
            cost("ring", **{**sizes, "world": bad})


@pytest.mark.parametrize("ulysses,ring", [(2, 1), (4, 1), (2, 2), (1, 4)], ids=str)
@pytest.mark.parametrize("kv_exchange", ["ring", "allgather"])
def test_local_ring_grid_matches_reference(ulysses, ring, kv_exchange):
    """LocalRing(U * R, ulysses_size=U): dense zigzag with one K/V head, and packed sequences with
    a window and 2 K/V heads of 6 (repeated to lcm(U, 2) when U = 4), forward and backward."""
    from cases import sequence_visible
    grid = LocalRing(ulysses * ring, ulysses_size=ulysses)
    seqlen = ulysses * ring * 4
    dense = random_qkv(seed_of("grid", ulysses, ring), 2, seqlen, seqlen, 4, 1, 16, torch.float64)
    seqlens = [7, 1, 12]
    cu, *packed = random_packed(seed_of("grid-packed", ulysses, ring), seqlens, 8 if ulysses == 4
                                else 6, 2, 16, torch.float64)
    for full, layout, window, visible in (
            (dense, "zigzag", (-1, -1), sequence_visible(seqlen, True)),
            (packed, "contiguous", (5, 0), sequence_visible(seqlens, True, (5, 0)))):
        expected = reference(*full, visible)
        if full is packed:
            shards = [grid.shard_varlen(t, cu, layout=layout) for t in full]
            gather = lambda ts, dim=0: grid.unshard_varlen(ts, cu, layout=layout, dim=dim)  # noqa: E731
            attend = lambda *qkv, **kw: grid.ring_attn_varlen_func(*qkv, cu, **kw)  # noqa: E731
            lse_dim = 1
        else:
            shards = [grid.shard(t, layout=layout) for t in full]
            gather = lambda ts, dim=1: grid.unshard(ts, layout=layout, dim=dim)  # noqa: E731
            attend, lse_dim = grid.ring_attn_func, 2
        leaves = list(itertools.chain(*shards[:3]))
        for t in leaves:
            t.requires_grad_()
        outs, lses = attend(*shards[:3], causal=True, window_size=window, layout=layout,
                            return_lse=True, kv_exchange=kv_exchange)
        grads = torch.autograd.grad(outs, leaves, shards[3])
        world = ulysses * ring
        got = [gather(outs), gather(lses, lse_dim)]
        got += [gather(list(grads[i * world:(i + 1) * world])) for i in range(3)]
        for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, expected):
            assert_close(a, b, f"{layout} {name}")
