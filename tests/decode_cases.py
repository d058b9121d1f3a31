"""The functions that every rank of a RankPool runs for tests/test_decode.py (see dist_pool.py):
decode_attn_func over a KV cache spread over the ranks, against the float64 reference of the
whole cache."""
import pytest
import torch
import torch.distributed as dist

import ring_attention as ra
from cases import (acc_dtype, assert_matches, low_precision, random_qkv, random_sinks, reference,
                   seed_of, visible)
from ring_cases import rank_and_world


def cache_split(layout, cached, new, world):
    """Each rank's key positions: `cached` prefill tokens in `layout` (as a ring's prefill leaves
    them; "uneven": rank 1 holds none, the others contiguous runs), then `new` decoded tokens
    appended to the last rank's cache."""
    if layout == "uneven":
        owners = [r for r in range(world) if r != 1 or world == 1]
        runs = torch.arange(cached).tensor_split(len(owners))
        parts = [torch.zeros(0, dtype=torch.long) for _ in range(world)]
        for r, run in zip(owners, runs):
            parts[r] = run
    else:
        parts = [ra.positions(layout, r, world, cached // world) for r in range(world)]
    parts[-1] = torch.cat([parts[-1], torch.arange(cached, cached + new)])
    return parts


def decode_case(case):
    """This rank's decode_attn_func (out, lse) and the float64 reference (and the same-precision
    one for bf16/fp16). case: layout, cached, new (the queries: the newest `new` tokens), causal,
    window, dtype, heads, heads_kv, headdim, sinks (bool), positions (bool: pass them; False:
    every key visible)."""
    rank, world = rank_and_world()
    dtype, total = case["dtype"], case["cached"] + case["new"]
    seed = seed_of("decode", world, sorted(case.items(), key=str))
    q, k, v, dout = random_qkv(seed, 2, total, total, case["heads"], case["heads_kv"],
                               case["headdim"], dtype)
    sinks = random_sinks(seed, case["heads"], dtype) if case["sinks"] else None
    q_pos = torch.arange(case["cached"], total)
    mine = cache_split(case["layout"], case["cached"], case["new"], world)[rank]
    seen = visible(q_pos, torch.arange(total), case["causal"], *case["window"])
    args = (q[:, q_pos], k, v, dout[:, q_pos], seen)
    ref = reference(*args, sinks=sinks)
    low = reference(*args, dtype=dtype, sinks=sinks) if low_precision(dtype) else [None] * 2
    positions = dict(q_positions=q_pos, k_positions=mine) if case["positions"] else {}
    with torch.no_grad():
        out, lse = ra.decode_attn_func(q[:, q_pos], k[:, mine], v[:, mine], causal=case["causal"],
                                       window_size=case["window"], sinks=sinks, return_lse=True,
                                       **positions)
    assert out.dtype == dtype and lse.dtype == acc_dtype(dtype), (out.dtype, lse.dtype)
    for name, ours, want, want_low in zip(("out", "lse"), (out, lse), ref, low):
        assert_matches(f"rank {rank}/{world} {name}", ours, want, want_low, dtype)
    return out, lse


def check_decode(case):
    """decode_attn_func matches the reference on every rank, and every rank returns the same
    bits."""
    out, lse = decode_case(case)
    _, world = rank_and_world()
    if world > 1:
        for mine in (out, lse):
            every = [torch.empty_like(mine) for _ in range(world)]
            dist.all_gather(every, mine)
            assert all(torch.equal(every[0], t) for t in every), "ranks returned different bits"
    return True


def _without_positions(q, k, v, kw):
    return q, k, v, {**kw, "q_positions": None, "k_positions": None}


# kind: (how the inputs of a "bad" rank change, what the error must say)
DECODE_INVALID = {
    "q_3d": (lambda q, k, v, kw: (q[0], k, v, kw), "q must be a 4-D tensor"),
    "kv_shapes_differ": (lambda q, k, v, kw: (q, k, v[:, :1], kw),
                         "k and v must have the same shape"),
    "headdim_mismatch": (lambda q, k, v, kw: (q, k[..., :8], v[..., :8], kw),
                         "the same batch size and head dimension"),
    "dtype_mismatch": (lambda q, k, v, kw: (q, k.double(), v.double(), kw),
                       "q, k and v must have the same dtype"),
    "requires_grad": (lambda q, k, v, kw: (q.requires_grad_(), k, v, kw),
                      "an input requires grad, but no gradients are computed"),
    "positions_missing": (_without_positions, "q_positions and k_positions are needed together"),
    "positions_float": (lambda q, k, v, kw: (q, k, v, {**kw, "k_positions": kw["k_positions"].float()}),
                        "k_positions must be an integer tensor"),
    "positions_negative": (lambda q, k, v, kw: (q, k, v, {**kw, "q_positions": kw["q_positions"] - 99}),
                           "q_positions must lie in [0, 2**31 - 1]"),
    "window_causal_right": (lambda q, k, v, kw: (q, k, v, {**kw, "window_size": (3, 2)}),
                            "with causal=True the right window must be -1 or 0"),
    "sinks_wrong_shape": (lambda q, k, v, kw: (q, k, v, {**kw, "sinks": torch.zeros(3)}),
                          "sinks must have shape (nheads,) = (4,)"),
    "positions_meta": (lambda q, k, v, kw: (q, k, v, {**kw, "k_positions": kw["k_positions"].to("meta")}),
                       "k_positions is on the meta device (no values)"),
    "scale_infinite": (lambda q, k, v, kw: (q, k, v, {**kw, "softmax_scale": float("inf")}),
                       "softmax_scale must be finite, got inf"),
    "return_lse_not_a_bool": (lambda q, k, v, kw: (q, k, v, {**kw, "return_lse": "no"}),
                              "return_lse must be True or False, got 'no'"),
}
DECODE_DISAGREEMENTS = {
    "causal": (lambda q, k, v, kw: (q, k, v, {**kw, "causal": False}), "ranks disagree on the arguments"),
    "q_shape": (lambda q, k, v, kw: (q[:, :1], k, v, {**kw, "q_positions": kw["q_positions"][:1]}),
                "different shapes"),
}


def _decode_inputs(rank, world):
    """Rank `rank`'s valid decode call: 2 queries after 6 cached tokens per rank."""
    q, k, v, _ = random_qkv(seed_of("decode rejected", rank), 1, 2, 6, 4, 2, 16, torch.float32)
    cached = 6 * world
    kw = dict(q_positions=torch.arange(cached, cached + 2),
              k_positions=torch.arange(6 * rank, 6 * rank + 6), causal=True)
    return q, k, v, kw


def check_decode_rejected(kind, bad_ranks):
    """Ranks in `bad_ranks` call with the inputs of `kind` (DECODE_INVALID or
    DECODE_DISAGREEMENTS); every rank must raise ValueError. Then a valid call works on the same
    group. Returns the message."""
    rank, world = rank_and_world()
    change, _ = {**DECODE_INVALID, **DECODE_DISAGREEMENTS}[kind]
    q, k, v, kw = _decode_inputs(rank, world)
    if rank in bad_ranks:
        q, k, v, kw = change(q, k, v, kw)
    with pytest.raises(ValueError) as error:
        ra.decode_attn_func(q, k, v, **kw)
    q, k, v, kw = _decode_inputs(rank, world)
    with torch.no_grad():
        ra.decode_attn_func(q, k, v, **kw)
    return str(error.value)
