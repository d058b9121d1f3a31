"""decode_attn_func: queries that every rank holds against a KV cache spread over the ranks, at
world size 1 and over gloo with 2 to 4 ranks (rank functions in decode_cases.py), against the
float64 reference of the whole cache; every rank returns the same bits; invalid or mismatched
inputs raise ValueError on every rank."""
import pytest
import torch

from decode_cases import DECODE_DISAGREEMENTS, DECODE_INVALID, check_decode, check_decode_rejected

BASE = dict(causal=True, window=(-1, -1), dtype=torch.float64, heads=4, heads_kv=2, headdim=16,
            sinks=False, positions=True)


def case_of(**changes):
    return {**BASE, **changes}


@pytest.mark.parametrize("new", [1, 7])
@pytest.mark.parametrize("cached", [0, 1, 97])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_decode_single_device(dtype, cached, new):
    check_decode(case_of(layout="contiguous", cached=cached, new=new, dtype=dtype))


@pytest.mark.parametrize("case", [
    case_of(causal=True, window=(5, 0)),
    case_of(causal=False, window=(3, 2)),
    case_of(causal=False, positions=False),
    case_of(heads=3, heads_kv=1, sinks=True),
    case_of(dtype=torch.float16, sinks=True, window=(20, 0)),
], ids=["causal-window", "window-both-sides", "no-positions", "mqa-sinks", "fp16-sinks-window"])
def test_decode_single_device_masks(case):
    check_decode({**case, "layout": "contiguous", "cached": 33, "new": 3})


@pytest.mark.parametrize("world,layout,changes", [
    (2, "zigzag", {}),
    (3, "contiguous", dict(window=(9, 0), sinks=True)),
    (3, "uneven", dict(dtype=torch.float32)),
    (4, "striped", dict(heads=4, heads_kv=1, causal=False, positions=False)),
    (4, "uneven", dict(dtype=torch.bfloat16, sinks=True)),
], ids=["w2-zigzag", "w3-window-sinks", "w3-rank-without-keys", "w4-mqa-full", "w4-bf16-sinks"])
def test_decode_over_gloo(rank_pool, world, layout, changes):
    rank_pool(world).run(check_decode, case_of(layout=layout, cached=12 * world, new=2, **changes))


def test_decode_new_tokens_on_a_rank_without_cache(rank_pool):
    """A single query whose only keys sit on the last rank: the other ranks' partials are empty."""
    rank_pool(3).run(check_decode, case_of(layout="uneven", cached=0, new=1))


@pytest.mark.parametrize("bad_ranks", [(1,), (0, 1, 2)], ids=["one_rank", "all_ranks"])
@pytest.mark.parametrize("kind", sorted(DECODE_INVALID))
def test_decode_invalid_input_raises_on_every_rank(rank_pool, kind, bad_ranks):
    messages = rank_pool(3).run(check_decode_rejected, kind, bad_ranks)
    assert len(set(messages)) == 1, messages
    header, *lines = messages[0].splitlines()
    assert header == "decode_attn_func: invalid input (every rank raises this):", messages[0]
    assert [line.split(":")[0].strip() for line in lines] == [f"rank {r}" for r in bad_ranks]
    assert all(DECODE_INVALID[kind][1] in line for line in lines), messages[0]


@pytest.mark.parametrize("kind", sorted(DECODE_DISAGREEMENTS))
def test_decode_disagreeing_ranks_raise_on_every_rank(rank_pool, kind):
    messages = rank_pool(3).run(check_decode_rejected, kind, (1,))
    assert len(set(messages)) == 1, messages
    assert messages[0].startswith("decode_attn_func: ") and DECODE_DISAGREEMENTS[kind][1] in messages[0]


@pytest.mark.parametrize("kind", ["q_3d", "requires_grad", "positions_missing"])
def test_decode_invalid_input_without_a_group(kind):
    from decode_cases import _decode_inputs
    import ring_attention as ra
    change, message = DECODE_INVALID[kind]
    q, k, v, kw = change(*_decode_inputs(0, 1))
    with pytest.raises(ValueError, match="^decode_attn_func: ") as error:
        ra.decode_attn_func(q, k, v, **kw)
    assert message in str(error.value)


def test_decode_reads_a_cache_sliced_from_a_larger_buffer():
    """The first n tokens of a preallocated (batch, capacity, hk, d) cache, a view with gaps
    between its rows, give what a contiguous copy gives, bitwise."""
    import ring_attention as ra
    from cases import random_qkv
    q, k, v, _ = random_qkv(5, 2, 1, 40, 4, 2, 16, torch.float32)
    k_view, v_view = k[:, :29], v[:, :29]
    assert not k_view.is_contiguous()
    kw = dict(q_positions=torch.tensor([29]), k_positions=torch.arange(29), causal=True)
    with torch.no_grad():
        in_place = ra.decode_attn_func(q, k_view, v_view, **kw)
        copied = ra.decode_attn_func(q, k_view.contiguous(), v_view.contiguous(), **kw)
    assert torch.equal(in_place, copied)


def test_decode_under_autocast_runs_in_the_autocast_dtype():
    """As ring_attn_func: float32 inputs under bf16 autocast give what bf16 inputs give."""
    import ring_attention as ra
    from cases import random_qkv
    q, k, v, _ = random_qkv(6, 1, 2, 30, 4, 2, 16, torch.float32)
    kw = dict(q_positions=torch.tensor([30, 31]), k_positions=torch.arange(30), causal=True)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = ra.decode_attn_func(q, k, v, **kw)
        cast = ra.decode_attn_func(q.bfloat16(), k.bfloat16(), v.bfloat16(), **kw)
    assert autocast.dtype == torch.bfloat16 and torch.equal(autocast, cast)
