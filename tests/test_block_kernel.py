"""The block ops (torch.ops.ring_attention.block_fwd / block_bwd) against the float64 reference.

Masks come from explicit global positions (the named cases of cases.py); the reference sees the
pairs that cases.visible derives from the same positions.
"""
import pytest
import torch

import ring_attention as ra
from cases import (MASKS, NEG_INF, acc_dtype, assert_close, assert_forward_close, block_bwd,
                   block_fwd, block_mask, check_block, check_bwd_accumulates, check_merge_order,
                   mask_case, random_qkv, reference, seed_of, strided, visible)

DTYPES = [torch.float64, torch.float32]
LENGTHS = [(1, 1), (7, 7), (97, 97), (128, 128), (1, 128), (128, 1), (7, 97), (97, 128), (128, 7)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("sq,sk", LENGTHS)
def test_block_mask_cases(sq, sk, mask, dtype):
    """Every mask case for block lengths 1, 7, 97, 128 (equal and different q/k lengths)."""
    check_block("cpu", dtype, sq, sk, 4, 2, 32, mask)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads,heads_kv", [(1, 1), (2, 2), (4, 2), (4, 1)])
@pytest.mark.parametrize("headdim", [1, 3, 16, 32, 48, 64, 80, 96, 128, 200])
def test_block_headdims_and_gqa(headdim, heads, heads_kv, dtype):
    check_block("cpu", dtype, 97, 128, heads, heads_kv, headdim, "partial")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask", ["none", "full", "diagonal", "partial", "masked_rows", "random"])
@pytest.mark.parametrize("sq,sk", [(300, 700), (520, 260)])
def test_block_multi_tile(sq, sk, mask, dtype):
    """Blocks of several kernel tiles (query tiles of 64/128 rows, key tiles of 256 keys): skipped,
    full and partial tiles side by side, partial tiles worked in sub-tiles, ragged last tiles."""
    check_block("cpu", dtype, sq, sk, 2, 1, 64, mask, batch=2, scale=0.125)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("headdim", [40, 64])
def test_block_low_precision_inputs(headdim, dtype):
    """bf16/fp16 q, k, v, dout: fp32 accumulators, as accurate as for fp32 inputs (the inputs
    convert exactly) except bf16's out, within P's one rounding to bf16 (see
    test_cpu_kernel_features.py for the low-precision tolerance rules)."""
    sq, sk = 97, 300
    seed = seed_of("low-precision-block", headdim, str(dtype))
    q, k, v, dout = random_qkv(seed, 2, sq, sk, 4, 2, headdim, dtype)
    mask = mask_case("partial", sq, sk, seed)
    ref_out, ref_lse, *ref_grads = reference(q, k, v, dout, visible(**mask), 0.2)
    out, lse = block_fwd("cpu", q, [(k, v, mask["k_pos"])], mask, 0.2)
    assert out.dtype == lse.dtype == torch.float32
    assert_forward_close(out, ref_out, v)
    assert_close(lse, ref_lse, "lse")
    grads = block_bwd("cpu", dout, q, k, v, mask, ref_out.float(), lse, 0.2)
    for name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(got, want, name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask", ["none", "partial", "masked_rows", "random"])
def test_block_fwd_merges_key_blocks(mask, dtype):
    """block_fwd over two key blocks (either order) equals attention over their concatenation."""
    check_merge_order("cpu", dtype, mask)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_block_fwd_merge_with_invisible_block(dtype):
    """A key block that no query sees leaves the state untouched, before or after a visible one."""
    sq, sk = 16, 24
    q, k, v, dout = random_qkv(seed_of("invisible", str(dtype)), 1, sq, 2 * sk, 2, 1, 16, dtype)
    mask = block_mask(torch.arange(sq) + sk, torch.cat([torch.arange(sk), torch.arange(sk) + 100]),
                      causal=True)
    assert visible(**mask)[:, :sk].all() and not visible(**mask)[:, sk:].any()
    seen = (k[:, :sk], v[:, :sk], mask["k_pos"][:sk])
    unseen = (k[:, sk:], v[:, sk:], mask["k_pos"][sk:])
    ref_out, ref_lse, *_ = reference(q, k, v, dout, visible(**mask), 16 ** -0.5)
    for blocks in ([seen, unseen], [unseen, seen], [unseen, seen, unseen]):
        out, lse = block_fwd("cpu", q, blocks, mask, 16 ** -0.5)
        assert_close(out, ref_out, "out")
        assert_close(lse, ref_lse, "lse")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask", ["none", "partial", "masked_rows", "random"])
def test_block_bwd_accumulates_over_key_blocks(mask, dtype):
    """block_bwd adds (+=) into its accumulators; with the final lse, the blocks are independent:
    dq sums over key blocks, dk/dv of each block are that block's slice of the full gradient."""
    check_bwd_accumulates("cpu", dtype, mask)


@pytest.mark.parametrize("kind", ["transposed", "sliced"])
def test_block_ops_non_contiguous_inputs(kind):
    """Strided q, k, v, dout (unit headdim stride) give the same results as contiguous ones."""
    sq, sk = 19, 23
    seed = seed_of("strided-block", kind)
    q, k, v, dout = random_qkv(seed, 2, sq, sk, 4, 2, 32, torch.float64)
    mask = mask_case("random", sq, sk, seed)
    ref_out, ref_lse, *ref_grads = reference(q, k, v, dout, visible(**mask), 0.3)
    qs, ks, vs, douts = (strided(t, kind) for t in (q, k, v, dout))
    assert not any(t.is_contiguous() for t in (qs, ks, vs, douts))
    out, lse = block_fwd("cpu", qs, [(ks, vs, mask["k_pos"])], mask, 0.3)
    assert_close(out, ref_out, "out")
    assert_close(lse, ref_lse, "lse")
    grads = block_bwd("cpu", douts, qs, ks, vs, mask, strided(out, kind), lse, 0.3)
    for name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(got, want, name)


def test_block_ops_batch_stride_beyond_int32():
    """Every tensor of both ops (q, k, v, dout, out_acc, lse, delta and the gradient accumulators)
    with its second batch entry more than 2**31 elements after its first: views into one float32
    storage whose untouched pages cost no memory. q, k, v, dout are head-major (rows dense per
    head), which the kernels read in place, so every offset is the kernels' own (64-bit)."""
    batch, sq, sk, heads, heads_kv, headdim = 2, 37, 41, 2, 1, 16
    shapes = {"q": (sq, heads), "dout": (sq, heads), "out": (sq, heads), "dq": (sq, heads),
              "k": (sk, heads_kv), "v": (sk, heads_kv), "dk": (sk, heads_kv), "dv": (sk, heads_kv)}
    sizes = {name: s * h * headdim for name, (s, h) in shapes.items()}
    region = sum(sizes.values()) + 2 * heads * sq  # a batch entry of everything, lse and delta
    batch_stride = 2**31 + region
    try:
        storage = torch.empty(batch_stride + region)
    except RuntimeError:
        pytest.skip("no address space for a 8 GiB tensor")
    views, offset = {}, 0
    for name, (s, h) in shapes.items():  # (batch, seq, heads, headdim) over (batch, heads, seq)
        views[name] = storage.as_strided((batch, s, h, headdim),
                                         (batch_stride, headdim, s * headdim, 1), offset)
        offset += sizes[name]
    for name in ("lse", "delta"):
        views[name] = storage.as_strided((batch, heads, sq), (batch_stride, sq, 1), offset)
        offset += heads * sq
    q, k, v, dout = random_qkv(seed_of("int64-strides"), batch, sq, sk, heads, heads_kv, headdim,
                               torch.float32)
    mask = mask_case("partial", sq, sk, seed_of("int64-strides"))
    for name, value in (("q", q), ("k", k), ("v", v), ("dout", dout)):
        views[name].copy_(value)
    for name, value in (("out", 0.0), ("lse", NEG_INF), ("dq", 0.0), ("dk", 0.0), ("dv", 0.0)):
        views[name].fill_(value)
    query_mask = dict(q_pos=mask["q_pos"], k_pos=mask["k_pos"], q_seg=mask["q_seg"],
                      causal=mask["causal"], window_left=mask["window_left"],
                      window_right=mask["window_right"], softmax_scale=0.3)
    ra.ops.block_fwd(q=views["q"], k=views["k"], v=views["v"], out_acc=views["out"],
                     lse=views["lse"], **query_mask)
    out, lse = block_fwd("cpu", q, [(k, v, mask["k_pos"])], mask, 0.3)
    assert torch.equal(views["out"], out) and torch.equal(views["lse"], lse)
    views["delta"].copy_((dout * out).sum(-1).transpose(1, 2))
    ra.ops.block_bwd(dout=views["dout"], q=views["q"], k=views["k"], v=views["v"],
                     lse=views["lse"], delta=views["delta"], dq_acc=views["dq"],
                     dk_acc=views["dk"], dv_acc=views["dv"], deterministic=False, **query_mask)
    grads = block_bwd("cpu", dout, q, k, v, mask, out, lse, 0.3)
    for name, want in zip(("dq", "dk", "dv"), grads):
        assert torch.equal(views[name], want), name


def _block_fwd_args(dtype=torch.float32):
    q, k, v, _ = random_qkv(0, 1, 6, 5, 4, 2, 16, dtype)
    acc = acc_dtype(dtype)
    pos = torch.arange(6, dtype=torch.int32)
    return dict(q=q, k=k, v=v, q_pos=pos, k_pos=pos[:5], q_seg=None,
                out_acc=torch.zeros(q.shape, dtype=acc), lse=torch.full((1, 4, 6), NEG_INF, dtype=acc),
                causal=True, window_left=-1, window_right=-1, softmax_scale=0.25)


@pytest.mark.parametrize("change,message", [
    (dict(q_pos=torch.arange(6)), "q_pos must be a contiguous int32 tensor of length 6"),
    (dict(k_pos=torch.arange(6, dtype=torch.int32)),
     "k_pos must be a contiguous int32 tensor of length 5"),
    (dict(lse=torch.zeros(1, 4, 6, dtype=torch.float64)), "lse must be Float"),
    (dict(out_acc=torch.zeros(1, 6, 4, 8)), "out_acc must have shape"),
    (dict(k=torch.zeros(1, 5, 3, 16)), "incompatible block shapes"),
], ids=["q_pos_int64", "k_pos_length", "lse_dtype", "out_acc_shape", "heads_not_divisible"])
def test_block_fwd_rejects_bad_arguments(change, message):
    args = {**_block_fwd_args(), **change}
    with pytest.raises(ValueError, match=message):
        ra.ops.block_fwd(**args)
