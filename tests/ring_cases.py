"""The functions that every rank of a RankPool runs (see dist_pool.py), for the ring and layout
tests; the inputs, reference and tolerances come from cases.py.

Rank functions draw the whole global input from a seed derived from the case, so every rank holds
the same tensors and computes the float64 reference of the full sequence itself; each rank then
checks its own shard and raises on a mismatch (the pool reports the traceback).
"""
import os
import threading
import time
from functools import partial

import pytest
import torch
import torch.distributed as dist

import ring_attention as ra
from cases import (acc_dtype, assert_close, randn, random_packed, random_qkv, random_sinks,
                   reference, seed_of, sequence_visible, strided)


def rank_and_world():
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def ring_param(world, detail, **case):
    """pytest.param(world, case) for check_ring, with the id
    w{world}-{layout}-{causal|full}-{dtype}-L{local_len}-h{heads}/{heads_kv}-{detail}."""
    case.setdefault("memory", "contiguous")
    case_id = (f"w{world}-{case['layout']}-{'causal' if case['causal'] else 'full'}-"
               f"{str(case['dtype'])[6:]}-L{case['local_len']}-h{case['heads']}/{case['heads_kv']}")
    return pytest.param(world, case, id=f"{case_id}-{detail}")


def check_ring(case):
    """ring_attn_func forward and backward (gradients of out and lse) on this rank's shard against
    the float64 reference.

    case: dict with layout, causal, dtype, local_len, batch, heads, heads_kv, headdim, scale
    (None: default) and memory ("contiguous" or a `strided` kind for the local q, k, v, dout);
    optionally window, kv_exchange, deterministic and sinks (True: attention sinks drawn per
    head, their gradient summed over the ranks).
    """
    rank, world = rank_and_world()
    layout, dtype = case["layout"], case["dtype"]
    window = case.get("window", (-1, -1))
    seqlen = world * case["local_len"]
    q, k, v, dout = random_qkv(seed_of(world, sorted(case.items(), key=str)), case["batch"], seqlen,
                               seqlen, case["heads"], case["heads_kv"], case["headdim"], dtype)
    dlse = randn(torch.Generator().manual_seed(seed_of("dlse", world, str(case))), case["batch"],
                 case["heads"], seqlen)
    sinks = (random_sinks(seed_of("sinks", world, str(case)), case["heads"], dtype)
             if case.get("sinks") else None)
    expected = reference(q, k, v, dout, sequence_visible(seqlen, case["causal"], window),
                         case["scale"], dlse=dlse, sinks=sinks)

    local = [strided(ra.shard(t, layout=layout), case["memory"]) for t in (q, k, v, dout)]
    leaves = local[:3] + ([sinks] if sinks is not None else [])
    for t in leaves:
        t.requires_grad_()
    out, lse = ra.ring_attn_func(*local[:3], causal=case["causal"], softmax_scale=case["scale"],
                                 layout=layout, return_lse=True, window_size=window,
                                 kv_exchange=case.get("kv_exchange", "ring"),
                                 deterministic=case.get("deterministic", False), sinks=sinks)
    assert out.dtype == dtype and lse.dtype == acc_dtype(dtype), (out.dtype, lse.dtype)
    dlse_local = ra.shard(dlse, layout=layout, dim=2).to(lse.dtype)
    grads = torch.autograd.grad((out, lse), leaves, (local[3], dlse_local))

    names = ("out", "lse", "dq", "dk", "dv")
    for name, got, want in zip(names, (out, lse, *grads), expected):
        want_local = ra.shard(want, layout=layout, dim=2 if name == "lse" else 1)
        assert_close(got, want_local, f"rank {rank}/{world} {name}")
    if sinks is not None:  # each rank's rows give part of the sinks' gradient
        dsinks = grads[3].clone()
        if dist.is_initialized():
            dist.all_reduce(dsinks)
        assert_close(dsinks, expected[5], f"rank {rank}/{world} dsinks")
    return True


SMALL_CASE = dict(layout="contiguous", causal=True, dtype=torch.float32, local_len=8, batch=1,
                  heads=4, heads_kv=2, headdim=16, scale=None, memory="contiguous")


def _with(**changes):
    """A change of the call that keeps q, k and v and overrides keyword arguments."""
    return lambda q, k, v, kw: (q, k, v, {**kw, **changes})


def _tensors(change):
    """A change of the call that maps q, k and v by change(q, k, v) and keeps the arguments."""
    return lambda q, k, v, kw: (*change(q, k, v), kw)


# kind: (how the inputs of a "bad" rank change, what the error message must say)
INVALID_INPUTS = {
    "q_3d": (_tensors(lambda q, k, v: (q[0], k, v)), "must be 4-D"),
    "headdim_mismatch": (_tensors(lambda q, k, v: (q, k[..., :8], v[..., :8])),
                         "head dimension mismatch: q has 16, k/v have 8"),
    "heads_not_divisible": (
        _tensors(lambda q, k, v: (q[:, :, :3], k, v)),
        "number of query heads (3) must be a multiple of the number of K/V heads (2)"),
    "dtype_mismatch": (_tensors(lambda q, k, v: (q, k.double(), v)),
                       "q, k and v must have the same dtype"),
    "int_dtype": (_tensors(lambda q, k, v: (q.int(), k.int(), v.int())),
                  "dtype Int is not supported on CPU"),
    "window_negative": (_with(window_size=(-3, -1)), "window_size values must be >= 0, or -1"),
    "window_causal_right": (_with(window_size=(4, 2)),
                            "with causal=True the right window must be -1 or 0"),
    "window_not_a_pair": (_with(window_size=5), "window_size must be a pair of ints, got 5"),
    # Values the ops cannot take (no int64, no float): ValueError on every rank, not an error of
    # the argument conversion on the bad rank alone while its peers wait.
    "window_infinite": (_with(window_size=(float("inf"), 0)),
                        "window_size must be a pair of ints, got (inf, 0)"),
    "window_beyond_int64": (_with(window_size=(2 ** 63, 0)),
                            "window_size values must be >= 0 and at most 2**63 - 1"),
    "scale_beyond_float": (_with(softmax_scale=10 ** 400), "softmax_scale must be finite, got 1000"),
    # The float32 accumulators take softmax_scale * log2(e): beyond float32 every score is inf.
    "scale_beyond_float32": (_with(softmax_scale=3e38),
                             "softmax_scale 3e+38 is too large for torch.float32 inputs"),
    "zigzag_odd_length": (
        lambda q, k, v, kw: (q[:, :7], k[:, :7], v[:, :7], {**kw, "layout": "zigzag"}),
        "layout 'zigzag' needs an even local sequence length"),
    "unknown_layout": (_with(layout="diagonal"), "unknown layout 'diagonal'"),
    "unknown_kv_exchange": (_with(kv_exchange="tree"), "unknown kv_exchange 'tree'"),
    "zero_heads": (_tensors(lambda q, k, v: (q[:, :, :0], k, v)), "q must have at least one head"),
    # Arguments of the wrong type: rejected in the agreement like any other invalid input.
    "q_not_a_tensor": (_tensors(lambda q, k, v: (q.tolist(), k, v)), "must be 4-D"),
    "layout_not_a_str": (_with(layout=None), "layout must be a str, got None"),
    "kv_exchange_not_a_str": (_with(kv_exchange=None), "unknown kv_exchange 'None'"),
    "scale_not_a_number": (_with(softmax_scale="abc"),
                           "softmax_scale must be a number or None, got 'abc'"),
    "window_of_strings": (_with(window_size=("a", "b")),
                          "window_size must be a pair of ints, got ('a', 'b')"),
    "causal_not_a_bool": (_with(causal="yes"), "causal must be True or False, got 'yes'"),
    "causal_without_one_truth_value": (_with(causal=torch.ones(2)), "causal must be True or False"),
    "deterministic_not_a_bool": (_with(deterministic="no"),
                                 "deterministic must be True or False, got 'no'"),
    "return_lse_not_a_bool": (_with(return_lse=b"yes"),
                              "return_lse must be True or False, got b'yes'"),
    "sinks_wrong_shape": (_with(sinks=torch.zeros(3)),
                          "sinks must have shape (nheads,) = (4,), one logit per query head, got (3,)"),
    "sinks_int": (_with(sinks=torch.zeros(4, dtype=torch.int64)),
                  "sinks must be a floating-point tensor, got torch.int64"),
    "sinks_other_device": (_with(sinks=torch.zeros(4, device="meta")),
                           "sinks must be on q's device (cpu), got meta"),
    "sinks_not_a_tensor": (_with(sinks=[0.0] * 4),
                           "sinks must be a tensor of shape (nheads,) or None, got list"),
}
DISAGREEMENTS = {
    "seqlen": (_tensors(lambda q, k, v: (q[:, :6], k[:, :6], v[:, :6])),
               "ranks disagree on the local sequence length"),
    "causal": (_with(causal=False), "ranks disagree on the causal"),
    "layout": (_with(layout="striped"), "ranks disagree on the layout"),
    "softmax_scale": (_with(softmax_scale=0.5), "ranks disagree on the softmax_scale"),
    "dtype": (_tensors(lambda q, k, v: (q.double(), k.double(), v.double())),
              "ranks disagree on the dtype"),
    "window": (_with(window_size=(3, 0)), "ranks disagree on the window_size[0] (left)"),
    "kv_exchange": (_with(kv_exchange="allgather"), "ranks disagree on the kv_exchange"),
}


def check_rejected(kind, bad_ranks):
    """Ranks in `bad_ranks` call with the inputs of `kind`; every rank must raise ValueError.

    Then a valid call must still work on the same process group. Returns the error message.
    """
    rank, _ = rank_and_world()
    change, _ = {**INVALID_INPUTS, **DISAGREEMENTS}[kind]
    q, k, v, _ = random_qkv(seed_of(kind, rank), 1, 8, 8, 4, 2, 16, torch.float32)
    kwargs = dict(causal=True, softmax_scale=None, layout="contiguous")
    if rank in bad_ranks:
        q, k, v, kwargs = change(q, k, v, kwargs)
    with pytest.raises(ValueError) as error:
        ra.ring_attn_func(q, k, v, **kwargs)
    check_ring(SMALL_CASE)
    return str(error.value)


# What rank 1 calls instead of ring_attn_func over the same group: call(q, k, v, cu_seqlens) with
# cu_seqlens packing q's tokens of every rank into one sequence; the name the error gives it.
OTHER_CALLS = {
    "unshard": (lambda q, k, v, cu: ra.unshard(q), "unshard"),
    "unshard_varlen": (lambda q, k, v, cu: ra.unshard_varlen(q[0], cu), "unshard_varlen"),
    "varlen": (lambda q, k, v, cu: ra.ring_attn_varlen_func(q[0], k[0], v[0], cu, causal=True),
               "ring_attn_varlen_func"),
    "ulysses": (lambda q, k, v, cu: ra.ring_attn_func(q, k, v, causal=True,
                                                      ulysses_group=dist.group.WORLD),
                "ring_attn_func (Ulysses)"),
    "decode": (lambda q, k, v, cu: ra.decode_attn_func(q, k, v), "decode_attn_func"),
}


def check_other_call(kind):
    """Rank 1 makes the call of `kind` while the other ranks call ring_attn_func over the same
    group: every rank must raise ValueError, then a valid call still works. Returns the message."""
    rank, world = rank_and_world()
    q, k, v, _ = random_qkv(seed_of(kind, rank), 1, 8, 8, 4, 2, 16, torch.float32)
    cu = torch.tensor([0, 8 * world], dtype=torch.int32)
    with pytest.raises(ValueError) as error:
        if rank == 1:
            OTHER_CALLS[kind][0](q, k, v, cu)
        else:
            ra.ring_attn_func(q, k, v, causal=True)
    check_ring(SMALL_CASE)
    return str(error.value)


def check_backward_against_forward(kv_exchange):
    """After a forward on every rank, rank 1 skips the backward and calls ring_attn_func again
    while the other ranks run the backward: every rank must raise ValueError, then a valid call
    still works. Returns the message."""
    rank, _ = rank_and_world()
    q, k, v, dout = random_qkv(seed_of("skipped backward", rank), 1, 8, 8, 4, 2, 16,
                               torch.float32)
    for t in (q, k, v):
        t.requires_grad_()
    out = ra.ring_attn_func(q, k, v, causal=True, kv_exchange=kv_exchange)
    with pytest.raises(ValueError) as error:
        if rank == 1:
            ra.ring_attn_func(q, k, v, causal=True, kv_exchange=kv_exchange)
        else:
            out.backward(dout)
    check_ring(SMALL_CASE)
    return str(error.value)


def check_ring_with_timeout(seconds):
    """SMALL_CASE's ring, forward and backward, with RING_ATTN_TIMEOUT set to `seconds` (read at
    every call), then restored."""
    before = os.environ.get("RING_ATTN_TIMEOUT")
    os.environ["RING_ATTN_TIMEOUT"] = seconds
    try:
        return check_ring(SMALL_CASE)
    finally:
        if before is None:
            del os.environ["RING_ATTN_TIMEOUT"]
        else:
            os.environ["RING_ATTN_TIMEOUT"] = before


def call_unless_absent(absent_rank, check, call="ring_attn_func"):
    """Every rank but `absent_rank` calls `call` (ring_attn_func, unshard or decode_attn_func;
    with RING_ATTN_CHECK=`check`).

    Returns (exception type name, message, seconds until it was raised) on the calling ranks;
    `absent_rank` returns None at once and idles, like a peer that never reaches the call.
    """
    rank, _ = rank_and_world()
    if rank == absent_rank:
        return None
    os.environ["RING_ATTN_CHECK"] = check
    q, k, v, _ = random_qkv(0, 1, 4, 4, 2, 1, 16, torch.float32)
    start = time.monotonic()
    with pytest.raises(Exception) as error:
        if call == "unshard":
            ra.unshard(q)
        elif call == "decode_attn_func":
            ra.decode_attn_func(q, k, v)
        else:
            ra.ring_attn_func(q, k, v)
    return type(error.value).__name__, str(error.value), time.monotonic() - start


def timeouts_on_new_groups(absent_rank, cycles, check, call="ring_attn_func", seconds="0.5"):
    """`cycles` times: a new group of every rank, on which every rank but `absent_rank` calls
    ring_attn_func (RING_ATTN_CHECK=`check`, RING_ATTN_TIMEOUT=`seconds`), or every rank unshards
    and all but `absent_rank` run the backward through it (`call` "unshard backward"), and times
    out; then every rank destroys the group, as the timeout's message advises.

    Returns this process's (threads, open files) after each cycle."""
    rank, world = rank_and_world()
    os.environ["RING_ATTN_CHECK"], os.environ["RING_ATTN_TIMEOUT"] = check, seconds
    q, k, v, _ = random_qkv(0, 1, 64, 64, 2, 2, 16, torch.float32)
    counts = []
    for _ in range(cycles):
        group = dist.new_group(list(range(world)))
        full = ra.unshard(q.requires_grad_(), group=group) if call == "unshard backward" else None
        if rank != absent_rank:
            with pytest.raises(RuntimeError, match="RING_ATTN_TIMEOUT"):
                if full is None:
                    ra.ring_attn_func(q, k, v, group=group)
                else:
                    full.sum().backward()
        del full
        dist.barrier()
        dist.destroy_process_group(group)
        del group
        counts.append((len(os.listdir("/proc/self/task")), len(os.listdir("/proc/self/fd"))))
    return counts


def skipping_unshard_backward(absent_rank):
    """Every rank unshards; all but `absent_rank` then run the backward through it.

    Returns (exception type name, message, seconds until it was raised) on the others;
    `absent_rank` returns None at once and idles, like a peer that never reaches the backward."""
    rank, _ = rank_and_world()
    x = torch.randn(1, 4, 2, 8, requires_grad=True)
    # The forward's collectives have the same deadline: the ranks meet first, so that one rank
    # still importing this module in a fresh pool does not make the other time out there.
    dist.barrier()
    full = ra.unshard(x)
    if rank == absent_rank:
        return None
    start = time.monotonic()
    with pytest.raises(Exception) as error:
        full.sum().backward()
    return type(error.value).__name__, str(error.value), time.monotonic() - start


def dying_mid_ring(victim, delay_s):
    """`victim` exits abruptly `delay_s` into a ring forward long enough to still be running;
    the others raise SurvivorReport with the error they saw and how long it took."""
    rank, _ = rank_and_world()
    os.environ["RING_ATTN_CHECK"] = "0"  # every collective of the loop is a ring step
    q, k, v, _ = random_qkv(0, 1, 4096, 4096, 8, 8, 64, torch.float32)
    if rank == victim:
        threading.Timer(delay_s, os._exit, args=(17,)).start()
    start = time.monotonic()
    with pytest.raises(Exception) as error:
        for _ in range(100):  # only the victim's death ends this loop
            ra.ring_attn_func(q, k, v)
    raise SurvivorReport(f"after {time.monotonic() - start:.1f} s: "
                         f"{type(error.value).__name__}: {error.value}")


class SurvivorReport(Exception):
    """What a surviving rank saw when a peer died (raised so that the pool reports it)."""


def check_layouts(local_len, layouts):
    """shard/unshard/positions of this rank for `layouts`, along dims 0, 1, 2 and -1."""
    rank, world = rank_and_world()
    g = torch.Generator().manual_seed(seed_of("layouts", world, local_len))
    seqlen = world * local_len
    for layout in layouts:
        local = ra.shard(torch.arange(seqlen), layout=layout, dim=0)
        assert torch.equal(local, ra.positions(layout, rank, world, local_len)), layout
        for dim, shape in ((1, (2, seqlen, 3)), (0, (seqlen, 2, 3)), (2, (2, 3, seqlen)),
                           (-1, (2, 1, 3, seqlen))):
            x = randn(g, *shape)
            part = ra.shard(x, layout=layout, dim=dim)
            assert part.shape[dim] == local_len, (layout, dim, part.shape)
            assert torch.equal(ra.unshard(part, layout=layout, dim=dim), x), (layout, dim)

        # Every rank computes the same loss of the full tensor; the gradient of a shard is the
        # sum over ranks of the gradient of its part: world * weight[shard].
        weight = randn(g, 2, seqlen, 3)
        part = ra.shard(randn(g, 2, seqlen, 3), layout=layout).clone().requires_grad_()
        (ra.unshard(part, layout=layout) * weight).sum().backward()
        assert torch.equal(part.grad, world * ra.shard(weight, layout=layout)), layout
    return True


def check_shard_rejects(seqlen, layout):
    """shard raises ValueError for a length that does not divide; returns its message."""
    with pytest.raises(ValueError) as error:
        ra.shard(torch.zeros(1, seqlen, 2), layout=layout)
    return str(error.value)


def check_unshard_shapes_differ():
    """Shards of different lengths: unshard raises ValueError on every rank."""
    rank, _ = rank_and_world()
    with pytest.raises(ValueError) as error:
        ra.unshard(torch.zeros(1, 4 + 2 * (rank == 1), 2))
    return str(error.value)


def check_unshard_many_dims():
    """Shards of more than 8 dimensions: unshard (zigzag) and unshard_varlen along dim 8, then
    shards that differ in their ninth dimension only, which must raise ValueError on every rank.
    Returns (the two gathered tensors flattened, the message)."""
    rank, world = rank_and_world()
    ninth = (1,) * 8 + (-1,)
    zigzag = ra.unshard(torch.full((1,) * 8 + (2,), float(rank)), layout="zigzag", dim=8)
    cu = torch.tensor([0, 2 * world], dtype=torch.int32)
    local = ra.shard_varlen(torch.arange(2.0 * world).reshape(ninth), cu, dim=8)
    packed = ra.unshard_varlen(local, cu, dim=8)
    with pytest.raises(ValueError) as error:
        ra.unshard(torch.zeros((1,) * 8 + (3 + (rank == 1),)))
    return zigzag.flatten().tolist(), packed.flatten().tolist(), str(error.value)


def check_unshard_compiled():
    """torch.compile of a function calling unshard: without fullgraph it equals eager, forward and
    backward; with fullgraph torch raises, naming the agreement that runs on the host. Returns
    that message."""
    rank, _ = rank_and_world()
    x = torch.arange(8.0, dtype=torch.float64).reshape(1, 4, 2) + 10 * rank

    def scaled_unshard(x_local):
        return ra.unshard(x_local, layout="zigzag") * 2

    results = []
    for fn in (scaled_unshard, torch.compile(scaled_unshard, backend="aot_eager")):
        x_local = x.clone().requires_grad_()
        out = fn(x_local)
        out.pow(2).sum().backward()
        results.append((out.detach(), x_local.grad))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    with pytest.raises(torch._dynamo.exc.Unsupported) as error:
        torch.compile(scaled_unshard, backend="eager", fullgraph=True)(x)
    return str(error.value)


def _keyword(name, change):
    """A change of an unshard call that maps keyword argument `name` by change."""
    return lambda x, kw: (x, {**kw, name: change(kw[name])})


# unshard (unshard_varlen for kinds "varlen_*") on one bad rank: (how the bad rank changes
# x_local and the keyword arguments, what the message must say).
UNSHARD_REJECTED = {
    "dtype": (lambda x, kw: (x.double(), kw),
              "ranks hold shards of different dtypes (rank 0: torch.float32, rank 1: torch.float64"),
    "unknown_layout": (_keyword("layout", lambda _: "bogus"), "rank 1: unknown layout 'bogus'"),
    "layout_differs": (_keyword("layout", lambda _: "striped"), "ranks disagree on the arguments"),
    "not_a_tensor": (lambda x, kw: (x.tolist(), kw), "rank 1: x_local must be a tensor, got list"),
    "dim_out_of_range": (_keyword("dim", lambda _: 3), "rank 1: dim must be an int in [-3, 3)"),
    "varlen_dtype": (lambda x, kw: (x.double(), kw), "ranks hold shards of different dtypes"),
    "varlen_cu_int64": (_keyword("cu_seqlens", lambda cu: cu.long()),
                        "rank 1: cu_seqlens must be a 1-D int32 tensor"),
    "varlen_cu_not_a_tensor": (_keyword("cu_seqlens", lambda cu: cu.tolist()),
                               "rank 1: cu_seqlens must be a 1-D int32 tensor"),
    "varlen_cu_differs": (_keyword("cu_seqlens", lambda cu: torch.tensor([0, 2, 8, 9], dtype=torch.int32)),
                          "ranks disagree on the arguments"),
    "varlen_unknown_layout": (_keyword("layout", lambda _: "bogus"), "rank 1: unknown layout 'bogus'"),
}


def check_unshard_rejected(kind):
    """Rank 1 calls unshard (or unshard_varlen) with the change of `kind`: every rank raises
    ValueError, then a valid call still works on the same group. Returns the message."""
    rank, world = rank_and_world()
    cu = torch.tensor([0, 3, 8, 9], dtype=torch.int32)
    varlen = kind.startswith("varlen_")
    full = torch.arange(9 if varlen else 2 * 4 * world * 3, dtype=torch.float32)
    full = full.reshape(9, 1, 1) if varlen else full.reshape(2, 4 * world, 3)
    kwargs = dict(layout="zigzag", dim=0, cu_seqlens=cu) if varlen else dict(layout="zigzag", dim=1)
    x = ra.shard_varlen(full, cu, layout="zigzag") if varlen else ra.shard(full, layout="zigzag")
    gather = (lambda x_local, cu_seqlens, **kw: ra.unshard_varlen(x_local, cu_seqlens, **kw)) \
        if varlen else ra.unshard
    bad_x, bad_kwargs = UNSHARD_REJECTED[kind][0](x, kwargs) if rank == 1 else (x, kwargs)
    with pytest.raises(ValueError) as error:
        gather(bad_x, **bad_kwargs)
    assert torch.equal(gather(x, **kwargs), full)
    return str(error.value)


def failing_on(rank_to_fail):
    """Raises on `rank_to_fail` only (tests the pool's error reporting)."""
    rank, _ = rank_and_world()
    if rank == rank_to_fail:
        raise RuntimeError(f"deliberate failure on rank {rank}")
    return rank


def sleeping_on(rank_to_sleep, seconds):
    """Sleeps on `rank_to_sleep` only (tests the pool's timeout)."""
    rank, _ = rank_and_world()
    if rank == rank_to_sleep:
        time.sleep(seconds)
    return rank


def ring_results(layout, causal, local_len, seed, kv_exchange="ring", dtype=torch.float64):
    """This rank's (out, lse, dq, dk, dv) of ring_attn_func on seeded inputs, for comparing the
    gloo ring with LocalRing bit for bit, or one kv_exchange with another."""
    rank, world = rank_and_world()
    seqlen = world * local_len
    q, k, v, dout = random_qkv(seed, 2, seqlen, seqlen, 4, 2, 16, dtype)
    local = [ra.shard(t, layout=layout).contiguous() for t in (q, k, v, dout)]
    for t in local[:3]:
        t.requires_grad_()
    out, lse = ra.ring_attn_func(*local[:3], causal=causal, layout=layout, return_lse=True,
                                 kv_exchange=kv_exchange)
    grads = torch.autograd.grad(out, local[:3], local[3])
    return [t.detach() for t in (out, lse, *grads)]


# Packed sequences: (how a bad rank changes cu_seqlens, what the message must say). The good
# cu_seqlens is [0, 3, 8, 9] on 3 ranks, contiguous: 12 padded tokens, 4 per rank.
VARLEN_INVALID = {
    "decreasing": (lambda cu: torch.tensor([0, 5, 3, 9], dtype=torch.int32), "must be non-decreasing"),
    "not_from_zero": (lambda cu: cu + 1, "must start at 0"),
    "wrong_total": (lambda cu: torch.tensor([0, 3, 8, 20], dtype=torch.int32), "q has 4 tokens, but shard_varlen"),
    "int64": (lambda cu: cu.long(), "cu_seqlens must be a 1-D int32 tensor"),
    "differs": (lambda cu: torch.tensor([0, 2, 8, 9], dtype=torch.int32), "ranks disagree on the cu_seqlens"),
    "not_a_tensor": (lambda cu: cu.tolist(),
                     "cu_seqlens must be a 1-D int32 tensor, got [0, 3, 8, 9]"),
    "none": (lambda cu: None, "cu_seqlens must be a 1-D int32 tensor, got None"),
}


def check_varlen_rejected(kind, bad_ranks):
    """Ranks in `bad_ranks` pass a bad cu_seqlens; every rank must raise ValueError, then a valid
    packed call still works on the same group. Returns the error message."""
    rank, world = rank_and_world()
    cu = torch.tensor([0, 3, 8, 9], dtype=torch.int32)
    g = torch.Generator().manual_seed(seed_of("varlen-bad", rank))
    q, k, v = (randn(g, 4, 2, 16, dtype=torch.float32) for _ in range(3))
    bad_cu = VARLEN_INVALID[kind][0](cu) if rank in bad_ranks else cu
    with pytest.raises(ValueError) as error:
        ra.ring_attn_varlen_func(q, k, v, bad_cu, causal=True)
    out = ra.ring_attn_varlen_func(q, k, v, cu, causal=True)
    assert out.shape == q.shape and torch.isfinite(out).all()
    return str(error.value)


def varlen_ring_stats(layout, causal, window, seqlens, seed, kv_exchange="ring"):
    """This rank's (out, lse, dq, dk, dv) of ring_attn_varlen_func on the float64 inputs of
    random_packed(seed, seqlens, 4, 2, 16), the ring's stats of the forward and of the backward."""
    cu, *full = random_packed(seed, seqlens, 4, 2, 16, torch.float64)
    q, k, v, dout = (ra.shard_varlen(t, cu, layout=layout) for t in full)
    for t in (q, k, v):
        t.requires_grad_()
    out, lse = ra.ring_attn_varlen_func(q, k, v, cu, causal=causal, window_size=window,
                                        layout=layout, return_lse=True, kv_exchange=kv_exchange)
    forward = ra.last_ring_stats()
    grads = torch.autograd.grad(out, (q, k, v), dout)
    return [t.detach() for t in (out, lse, *grads)], forward, ra.last_ring_stats()


def varlen_ring_results(layout, causal, window, seqlens, seed, kv_exchange="ring"):
    """This rank's (out, lse, dq, dk, dv) of varlen_ring_stats, and the backward's stats."""
    tensors, _, backward = varlen_ring_stats(layout, causal, window, seqlens, seed, kv_exchange)
    return tensors, backward


# ---- Ulysses x ring grids ----------------------------------------------------------------------

_GRIDS = {}


def grid_groups(ulysses, ring):
    """(group, ulysses_group) of this rank in a U x R grid of the pool's U * R ranks: the ranks of
    one ulysses_group are consecutive (global rank = ring rank * U + Ulysses rank). Made once per
    grid (every rank creates every subgroup, in the same order)."""
    if (ulysses, ring) not in _GRIDS:
        rows = [list(range(r * ulysses, (r + 1) * ulysses)) for r in range(ring)]
        columns = [list(range(u, ulysses * ring, ulysses)) for u in range(ulysses)]
        ulysses_group, _ = dist.new_subgroups_by_enumeration(rows, backend="gloo")
        group, _ = dist.new_subgroups_by_enumeration(columns, backend="gloo")
        _GRIDS[(ulysses, ring)] = (group, ulysses_group)
    return _GRIDS[(ulysses, ring)]


def check_ulysses(case):
    """ring_attn_func (or, with case["seqlens"], ring_attn_varlen_func) over a U x R grid against
    the float64 reference, forward and backward; unshard (unshard_varlen) restores the full
    tensors. The gradients are of out and lse. case: ulysses, ring, layout, causal, window,
    kv_exchange, dtype, local_len (dense: tokens per rank), heads, heads_kv, headdim, seqlens
    (packed) or None; optionally sinks (True: attention sinks, their gradient summed over the
    grid)."""
    group, ulysses_group = grid_groups(case["ulysses"], case["ring"])
    grid = dict(group=group, ulysses_group=ulysses_group, layout=case["layout"])
    dtype, window = case["dtype"], case["window"]
    seed = seed_of("ulysses", sorted(case.items(), key=str))
    sinks = random_sinks(seed + 1, case["heads"], dtype) if case.get("sinks") else None
    if case["seqlens"]:
        cu, q, k, v, dout = random_packed(seed, case["seqlens"], case["heads"], case["heads_kv"],
                                          case["headdim"], dtype)
        dlse = randn(torch.Generator().manual_seed(seed), case["heads"], q.shape[0])
        seen = sequence_visible(case["seqlens"], case["causal"], window)
        expected = reference(q, k, v, dout, seen, dlse=dlse, sinks=sinks)
        local = [ra.shard_varlen(t, cu, **grid) for t in (q, k, v, dout)]
        dlse_local = ra.shard_varlen(dlse, cu, dim=1, **grid)
        gather = lambda t, dim=0: ra.unshard_varlen(t, cu, dim=dim, **grid)  # noqa: E731
        attend = lambda *qkv, **kw: ra.ring_attn_varlen_func(*qkv, cu, **kw)  # noqa: E731
        lse_dim = 1
    else:
        seqlen = case["ulysses"] * case["ring"] * case["local_len"]
        q, k, v, dout = random_qkv(seed, 2, seqlen, seqlen, case["heads"], case["heads_kv"],
                                   case["headdim"], dtype)
        dlse = randn(torch.Generator().manual_seed(seed), 2, case["heads"], seqlen)
        expected = reference(q, k, v, dout, sequence_visible(seqlen, case["causal"], window),
                             dlse=dlse, sinks=sinks)
        local = [ra.shard(t, **grid) for t in (q, k, v, dout)]
        dlse_local = ra.shard(dlse, dim=2, **grid)
        gather = lambda t, dim=1: ra.unshard(t, dim=dim, **grid)  # noqa: E731
        attend = ra.ring_attn_func
        lse_dim = 2
    leaves = local[:3] + ([sinks] if sinks is not None else [])
    for t in leaves:
        t.requires_grad_()
    out, lse = attend(*local[:3], causal=case["causal"], window_size=window, return_lse=True,
                      kv_exchange=case["kv_exchange"], sinks=sinks, **grid)
    assert out.shape == local[0].shape and out.dtype == dtype
    grads = torch.autograd.grad((out, lse), leaves, (local[3], dlse_local.to(lse.dtype)))
    assert all(t.is_contiguous() for t in (out, lse, *grads)), "outputs and gradients contiguous"
    got = [gather(out), gather(lse, lse_dim), *(gather(g) for g in grads[:3])]
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, expected):
        assert_close(a, b, f"rank {dist.get_rank()} {name}")
    if sinks is not None:  # each rank's rows give part of the sinks' gradient
        dsinks = grads[3].clone()
        dist.all_reduce(dsinks)
        assert_close(dsinks, expected[5], f"rank {dist.get_rank()} dsinks")
    return True


def check_ulysses_rejected(kind):
    """Every rank of a 2 x 2 grid raises the same ValueError for `kind`; then a valid call works.
    Returns the message."""
    rank = dist.get_rank()
    group, ulysses_group = grid_groups(2, 2)
    q, k, v, _ = random_qkv(seed_of("ulysses-bad", rank), 1, 4, 4, 4, 2, 16, torch.float32)
    kwargs = dict(group=group, ulysses_group=ulysses_group, causal=True)
    if kind == "heads_not_divisible":  # 6 heads, U = 2 divides; rank 3 has 3 heads
        q, k, v = (t[:, :, :3] if rank == 3 else t for t in (q, k, v))
        k, v = k[:, :, :1], v[:, :, :1]
    elif kind == "kv_exchange_disagrees":
        kwargs["kv_exchange"] = "allgather" if rank == 0 else "ring"
    elif kind == "unknown_kv_exchange":
        kwargs["kv_exchange"] = "tree" if rank == 2 else "ring"
    elif kind == "not_a_grid":  # the same ranks as group and as ulysses_group
        kwargs["group"] = ulysses_group
    elif kind == "default_group":  # group left at its default, the world
        del kwargs["group"]
        for split in (lambda: ra.shard(q, ulysses_group=ulysses_group),  # local: raise alone
                      lambda: ra.shard_varlen(q[0], torch.tensor([0, 16], dtype=torch.int32),
                                              ulysses_group=ulysses_group)):
            with pytest.raises(ValueError, match=r"shard(_varlen)?: group and ulysses_group share"):
                split()
    elif kind == "seqlen_disagrees":
        q, k, v = (t[:, :2] if rank == 1 else t for t in (q, k, v))
    elif kind == "window_disagrees_in_ulysses_group":  # ranks 0 and 1 form one ulysses_group
        kwargs["window_size"] = (3, 0) if rank == 1 else (-1, -1)
    elif kind == "heads_kv_disagrees_in_group":  # 2 or 1 K/V heads: 1 each after the all-to-all
        k, v = (t[:, :, :1] if rank >= 2 else t for t in (k, v))
    elif kind == "causal_disagrees_in_group":  # each ulysses_group agrees, the ring groups do not
        kwargs["causal"] = rank < 2
    elif kind == "bad_window":
        kwargs["window_size"] = (-5, 0) if rank == 3 else (-1, -1)
    elif kind == "scale_not_a_number":
        kwargs["softmax_scale"] = "abc" if rank == 3 else None
    elif kind == "return_lse_disagrees":  # one more all-to-all (the lse's) on rank 1 alone
        kwargs["return_lse"] = rank == 1
    elif kind == "return_lse_not_a_bool":
        kwargs["return_lse"] = torch.ones(2) if rank == 3 else False
    with pytest.raises(ValueError) as error:
        ra.ring_attn_func(q, k, v, **kwargs)
    q, k, v, _ = random_qkv(seed_of("ulysses-good"), 1, 4, 4, 4, 2, 16, torch.float32)
    out = ra.ring_attn_func(q, k, v, group=group, ulysses_group=ulysses_group, causal=True)
    assert torch.isfinite(out).all()
    return str(error.value)


def check_grid_unshard_rejected(varlen, kind):
    """On a 2 x 2 grid, unshard (unshard_varlen) with the problem of `kind`: "unknown_layout"
    (rank 3 passes one) or "not_a_grid" (every rank passes its ulysses_group as group too, so
    the ranks of one ulysses_group differ in their rank in group). Every rank raises ValueError,
    then a valid call restores the full tensor. Returns the message."""
    group, ulysses_group = grid_groups(2, 2)
    grid = dict(group=group, ulysses_group=ulysses_group)
    cu = torch.tensor([0, 5, 6, 19], dtype=torch.int32)
    full = torch.arange(19.0).reshape(19, 1) if varlen else torch.arange(32.0).reshape(1, 32, 1)
    if varlen:
        x = ra.shard_varlen(full, cu, layout="zigzag", **grid)
        gather = lambda layout, **kw: ra.unshard_varlen(x, cu, layout=layout, **{**grid, **kw})  # noqa: E731
    else:
        x = ra.shard(full, layout="zigzag", **grid)
        gather = lambda layout, **kw: ra.unshard(x, layout=layout, **{**grid, **kw})  # noqa: E731
    with pytest.raises(ValueError) as error:
        if kind == "not_a_grid":
            gather("zigzag", group=ulysses_group)
        else:
            gather("bogus" if dist.get_rank() == 3 else "zigzag")
    assert torch.equal(gather("zigzag"), full)
    return str(error.value)


def grid_call(varlen, seed, grid):
    """(q, k, v, dout, attend): this rank's shards of a float32 causal problem on `grid` (group,
    ulysses_group), packed sequences with `varlen`, and the function that attends them."""
    if varlen:
        cu, *full = random_packed(seed, [5, 1, 13], 4, 2, 16, torch.float32)
        q, k, v, dout = (ra.shard_varlen(t, cu, **grid) for t in full)
        return q, k, v, dout, partial(ra.ring_attn_varlen_func, cu_seqlens=cu, causal=True, **grid)
    full = random_qkv(seed, 1, 16, 16, 4, 2, 16, torch.float32)
    q, k, v, dout = (ra.shard(t, **grid) for t in full)
    return q, k, v, dout, partial(ra.ring_attn_func, causal=True, **grid)


def check_ulysses_backward_skipped(varlen):
    """On a 2 x 2 grid, after a forward on every rank, rank 1 skips the backward and calls again
    while the other ranks run the backward: every rank raises ValueError (the ranks of the other
    ulysses_group learn it over their ring group instead of waiting), then a forward and backward
    on every rank still work. Returns the message."""
    group, ulysses_group = grid_groups(2, 2)
    q, k, v, dout, attend = grid_call(varlen, seed_of("ulysses-skip", varlen),
                                      dict(group=group, ulysses_group=ulysses_group))
    inputs = [t.requires_grad_() for t in (q, k, v)]
    out = attend(*inputs)
    with pytest.raises(ValueError) as error:
        if dist.get_rank() == 1:
            attend(*inputs)
        else:
            out.backward(dout)
    grads = torch.autograd.grad(attend(*inputs), inputs, dout)
    assert all(torch.isfinite(g).all() for g in grads)
    return str(error.value)


def check_backward_of_other_call(grid):
    """Two calls A and B of the same shapes on every rank (over a 2 x 2 grid with `grid`); rank 1
    runs A's backward alone while the others run B's first (their loss needs both): every rank
    raises ValueError (the ring would otherwise mix A's and B's tensors: wrong gradients, or a
    crash where the shapes differ), then a forward and backward still work. Returns the
    message."""
    groups = dict(zip(("group", "ulysses_group"), grid_groups(2, 2))) if grid else {}
    q, k, v, dout, attend = grid_call(False, seed_of("backward-order", grid), groups)
    inputs = [t.requires_grad_() for t in (q, k, v)]
    first, second = attend(*inputs), attend(*inputs)
    with pytest.raises(ValueError) as error:
        loss = first if dist.get_rank() == 1 else first + second
        loss.backward(dout)
    grads = torch.autograd.grad(attend(*inputs), inputs, dout)
    assert all(torch.isfinite(g).all() for g in grads)
    return str(error.value)


def ulysses_call_unless_absent(absent_rank, varlen):
    """Checks off, on a U x 1 grid of the pool's ranks: every rank but `absent_rank` calls
    ring_attn_func (ring_attn_varlen_func with `varlen`) and waits in the all-to-all.

    Returns (exception type name, message, seconds until it was raised) on the calling ranks;
    `absent_rank` returns None once the groups exist."""
    group, ulysses_group = grid_groups(rank_and_world()[1], 1)
    if dist.get_rank() == absent_rank:
        return None
    os.environ["RING_ATTN_CHECK"] = "0"
    q, k, v, _, attend = grid_call(varlen, 0, dict(group=group, ulysses_group=ulysses_group))
    start = time.monotonic()
    with pytest.raises(Exception) as error:
        attend(q, k, v)
    return type(error.value).__name__, str(error.value), time.monotonic() - start


def bytes_sent(ulysses, ring, kv_exchange, heads, heads_kv, local_len):
    """What this rank sent in one causal zigzag call (float32, batch 2, head dim 16) over a U x R
    grid (U = 1: the default group): per direction, (bytes the K/V exchange sent, its messages,
    bytes the Ulysses all-to-alls sent)."""
    from ring_attention.ulysses import all_to_all_bytes_sent
    group, ulysses_group = grid_groups(ulysses, ring) if ulysses > 1 else (None, None)
    q, k, v, dout = random_qkv(seed_of("bytes", dist.get_rank()), 2, local_len, local_len, heads,
                               heads_kv, 16, torch.float32)
    for t in (q, k, v):
        t.requires_grad_()
    sent = {}
    before = all_to_all_bytes_sent()
    out = ra.ring_attn_func(q, k, v, causal=True, layout="zigzag", group=group,
                            ulysses_group=ulysses_group, kv_exchange=kv_exchange)
    stats = ra.last_ring_stats()
    sent["fwd"] = (stats["bytes_sent"], stats["messages_sent"], all_to_all_bytes_sent() - before)
    before = all_to_all_bytes_sent()
    torch.autograd.grad(out, (q, k, v), dout)
    stats = ra.last_ring_stats()
    sent["bwd"] = (stats["bytes_sent"], stats["messages_sent"], all_to_all_bytes_sent() - before)
    return sent


def opcheck_ulysses_ops(ulysses, ring, varlen):
    """torch.library.opcheck on ulysses_fwd and ulysses_bwd over a U x R grid (float64, causal
    zigzag with a window, one K/V head repeated to U; varlen: packed sequences)."""
    group, ulysses_group = grid_groups(ulysses, ring)
    grid = dict(group=group, ulysses_group=ulysses_group, layout="zigzag")
    seed = seed_of("opcheck-ulysses", ulysses, ring, varlen)
    if varlen:
        cu, *full = random_packed(seed, [5, 1, 6], 4, 1, 16, torch.float64)
        q, k, v, dout = (ra.shard_varlen(t, cu, **grid) for t in full)
    else:
        cu = None
        full = random_qkv(seed, 2, 4 * ulysses * ring, 4 * ulysses * ring, 4, 1, 16, torch.float64)
        q, k, v, dout = (ra.shard(t, **grid) for t in full)
    fwd_args = (q, k, v, cu, group.group_name, ulysses_group.group_name, True, 0.3, 3, 0, "zigzag")
    # With checks off nothing is agreed or numbered: opcheck compares repeated calls' outputs,
    # which the call numbers would tell apart.
    check, os.environ["RING_ATTN_CHECK"] = os.environ.get("RING_ATTN_CHECK", "1"), "0"
    try:
        for kwargs in ({"kv_exchange": "allgather"}, {"return_lse": True}):
            torch.library.opcheck(ra.ops.ulysses_fwd.default, fwd_args, kwargs)
    finally:
        os.environ["RING_ATTN_CHECK"] = check
    numbers = []
    for _ in range(2):
        out, lse, *exchanged, forward_calls = ra.ops.ulysses_fwd(*fwd_args, return_lse=True)
        numbers.append(forward_calls.tolist())
    lse_shape = (q.shape[1], q.shape[0]) if varlen else (q.shape[0], q.shape[2], q.shape[1])
    assert out.shape == q.shape and lse.shape == lse_shape
    assert forward_calls.dtype == torch.int64 and forward_calls.device.type == "cpu"
    # The ulysses_group's and the ring group's counts of calls: one more for the second call.
    assert numbers[1] == [numbers[0][0] + 1, numbers[0][1] + (ring > 1)] and numbers[0][0] > 0
    for kwargs in ({"deterministic": True}, {"dlse": torch.randn_like(lse)},
                   {"forward_calls": forward_calls}):
        torch.library.opcheck(ra.ops.ulysses_bwd.default,
                              (dout, *exchanged, *fwd_args[3:], k.shape[-2]), kwargs)
    return True


def check_double_backward_raises(kind):
    """Differentiating a gradient of ring attention (create_graph=True) raises RuntimeError on
    this rank, through .backward() and through torch.autograd.grad with respect to q, k and v.
    kind: "ring" or "varlen" (the default group, or none), "checkpointed" (the ring under
    non-reentrant activation checkpointing, which unpacks each saved tensor once), "local_ring"
    (LocalRing(2), in this process), "ulysses" (a U x 1 grid of the pool's ranks) or "unshard"."""
    from ring_attention.testing import LocalRing
    g = torch.Generator().manual_seed(seed_of("double-backward", kind))
    q, k, v = (randn(g, 1, 4 * rank_and_world()[1], 2, 8, dtype=torch.float64) for _ in range(3))
    if kind == "varlen":
        inputs = [t[0].requires_grad_() for t in (q, k, v)]
        cu = torch.tensor([0, 1, inputs[0].shape[0]], dtype=torch.int32)
        outs = [ra.ring_attn_varlen_func(*inputs, cu, causal=True)]
    elif kind == "local_ring":
        inputs = [t.requires_grad_() for t in (q, k, v)]
        ring = LocalRing(2)
        outs = ring.ring_attn_func(*(ring.shard(t, layout="zigzag") for t in inputs), causal=True,
                                   layout="zigzag")
    elif kind == "ulysses":
        inputs = [t.requires_grad_() for t in (q, k, v)]
        group, ulysses_group = grid_groups(dist.get_world_size(), 1)
        outs = [ra.ring_attn_func(*inputs, causal=True, group=group, ulysses_group=ulysses_group)]
    elif kind == "checkpointed":
        inputs = [t.requires_grad_() for t in (q, k, v)]
        outs = [torch.utils.checkpoint.checkpoint(partial(ra.ring_attn_func, causal=True), *inputs,
                                                  use_reentrant=False)]
    elif kind == "unshard":
        inputs = [q.requires_grad_()]
        outs = [ra.unshard(inputs[0] * 2)]
    else:
        inputs = [t.requires_grad_() for t in (q, k, v)]
        outs = [ra.ring_attn_func(*inputs, causal=True)]
    (grad,) = torch.autograd.grad(sum(o.pow(2).sum() for o in outs), inputs[0], create_graph=True)
    for differentiate in (lambda: grad.sum().backward(retain_graph=True),
                         lambda: torch.autograd.grad(grad.sum(), inputs)):
        with pytest.raises(RuntimeError, match="double backward .* is not supported"):
            differentiate()
    return True
