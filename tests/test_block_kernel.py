"""The block ops (torch.ops.ring_attention.block_fwd / block_bwd) against the float64 reference.

Masks come from explicit global positions; attention_reference gets the same positions.
"""
import pytest
import torch

import ring_attention as ra
from ring_cases import (acc_dtype, assert_close, assert_forward_close, random_qkv, randn, reference,
                        seed_of, strided)

DTYPES = [torch.float64, torch.float32]
NEG_INF = float("-inf")


def mask_positions(mask, sq, sk, seed):
    """(causal, q_positions, k_positions) giving the named mask case."""
    q, k = torch.arange(sq), torch.arange(sk)
    if mask == "none":  # non-causal: every pair visible
        return False, q, k
    if mask == "full":  # causal, every key before every query
        return True, q + sk, k
    if mask == "diagonal":  # same positions: row i sees keys 0..i
        return True, q, k
    if mask == "partial":  # interleaved, like striped shards
        return True, 2 * q + 1, 3 * k
    if mask == "skipped":  # every key after every query: all rows fully masked
        return True, q, k + sq
    if mask == "masked_rows":  # the first half of the rows sees nothing
        return True, q, k + (sq + 1) // 2
    if mask == "random":  # unsorted positions, disjoint between q and k
        perm = torch.randperm(sq + sk, generator=torch.Generator().manual_seed(seed))
        return True, perm[:sq], perm[sq:]
    raise ValueError(mask)


def block_fwd(q, blocks, q_pos, causal, scale):
    """Runs block_fwd for each (k, v, k_pos) of `blocks` on one running state; (out_acc, lse)."""
    b, sq, h, _ = q.shape
    out = torch.zeros(q.shape, dtype=acc_dtype(q.dtype))
    lse = torch.full((b, h, sq), NEG_INF, dtype=acc_dtype(q.dtype))
    for k, v, k_pos in blocks:
        ra.ops.block_fwd(q, k, v, q_pos.int(), k_pos.int(), None, out, lse, causal, -1, -1, scale)
    return out, lse


def block_bwd(dout, q, k, v, q_pos, k_pos, out, lse, causal, scale, init):
    """block_bwd into accumulators holding `init` (dq, dk, dv); returns the accumulators."""
    acc = acc_dtype(q.dtype)
    delta = (dout.to(acc) * out.to(acc)).sum(-1).transpose(1, 2).contiguous()
    dq, dk, dv = (t.to(acc).clone() for t in init)
    ra.ops.block_bwd(dout, q, k, v, q_pos.int(), k_pos.int(), None, lse, delta, dq, dk, dv, causal,
                     -1, -1, scale)
    return dq, dk, dv


def check_block(sq, sk, heads, heads_kv, headdim, mask, dtype, scale=0.3):
    """Forward and backward of one block pair against the reference, including masked rows."""
    seed = seed_of(sq, sk, heads, heads_kv, headdim, mask, str(dtype))
    q, k, v, dout = random_qkv(seed, 2, sq, sk, heads, heads_kv, headdim, dtype)
    causal, q_pos, k_pos = mask_positions(mask, sq, sk, seed)
    ref_out, ref_lse, *ref_grads = reference(q, k, v, dout, causal=causal, softmax_scale=scale,
                                             q_positions=q_pos, k_positions=k_pos)

    out, lse = block_fwd(q, [(k, v, k_pos)], q_pos, causal, scale)
    assert_close(out, ref_out, "out")
    assert_close(lse, ref_lse, "lse")
    masked = torch.isinf(ref_lse)  # (b, h, sq): rows with no visible key
    assert torch.all(lse[masked] == NEG_INF) and torch.all(torch.isfinite(lse[~masked]))
    assert torch.all(out.transpose(1, 2)[masked] == 0)
    assert not out.isnan().any()

    zeros = [torch.zeros_like(t) for t in (q, k, v)]
    grads = block_bwd(dout, q, k, v, q_pos, k_pos, out.to(dtype), lse, causal, scale, zeros)
    for name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert torch.isfinite(got).all(), name
        assert_close(got, want, name)


LENGTHS = [(1, 1), (7, 7), (97, 97), (128, 128), (1, 128), (128, 1), (7, 97), (97, 128), (128, 7)]
MASKS = ["none", "full", "diagonal", "partial", "skipped", "masked_rows", "random"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("sq,sk", LENGTHS)
def test_block_mask_cases(sq, sk, mask, dtype):
    """Every mask case for block lengths 1, 7, 97, 128 (equal and different q/k lengths)."""
    check_block(sq, sk, 4, 2, 32, mask, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads,heads_kv", [(1, 1), (2, 2), (4, 2), (4, 1)])
@pytest.mark.parametrize("headdim", [1, 3, 16, 32, 48, 64, 80, 96, 128, 200])
def test_block_headdims_and_gqa(headdim, heads, heads_kv, dtype):
    check_block(97, 128, heads, heads_kv, headdim, "partial", dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask", ["none", "full", "diagonal", "partial", "masked_rows", "random"])
@pytest.mark.parametrize("sq,sk", [(300, 700), (520, 260)])
def test_block_multi_tile(sq, sk, mask, dtype):
    """Blocks of several kernel tiles (query tiles of 64/128 rows, key tiles of 256 keys): skipped,
    full and partial tiles side by side, partial tiles worked in sub-tiles, ragged last tiles."""
    check_block(sq, sk, 2, 1, 64, mask, dtype, scale=0.125)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("headdim", [40, 64])
def test_block_low_precision_inputs(headdim, dtype):
    """bf16/fp16 q, k, v, dout: fp32 accumulators, as accurate as for fp32 inputs (the inputs
    convert exactly) except bf16's out, within P's one rounding to bf16 (see
    test_cpu_kernel_features.py for the low-precision tolerance rules)."""
    sq, sk = 97, 300
    seed = seed_of("low-precision-block", headdim, str(dtype))
    q, k, v, dout = random_qkv(seed, 2, sq, sk, 4, 2, headdim, dtype)
    causal, q_pos, k_pos = mask_positions("partial", sq, sk, seed)
    ref_out, ref_lse, *ref_grads = reference(q, k, v, dout, causal=causal, softmax_scale=0.2,
                                             q_positions=q_pos, k_positions=k_pos)
    out, lse = block_fwd(q, [(k, v, k_pos)], q_pos, causal, 0.2)
    assert out.dtype == lse.dtype == torch.float32
    assert_forward_close(out, ref_out, v)
    assert_close(lse, ref_lse, "lse")
    zeros = [torch.zeros(t.shape, dtype=torch.float32) for t in (q, k, v)]
    grads = block_bwd(dout, q, k, v, q_pos, k_pos, ref_out.float(), lse, causal, 0.2, zeros)
    for name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(got, want, name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask", ["none", "partial", "masked_rows", "random"])
def test_block_fwd_merges_key_blocks(mask, dtype):
    """block_fwd over two key blocks (either order) equals attention over their concatenation."""
    sq, sk1, sk2 = 37, 20, 29
    seed = seed_of("merge", mask, str(dtype))
    q, k, v, _ = random_qkv(seed, 2, sq, sk1 + sk2, 4, 2, 32, dtype)
    causal, q_pos, k_pos = mask_positions(mask, sq, sk1 + sk2, seed)
    ref_out, ref_lse = ra.attention_reference(q, k, v, causal=causal, softmax_scale=0.25,
                                              q_positions=q_pos, k_positions=k_pos)
    first = (k[:, :sk1], v[:, :sk1], k_pos[:sk1])
    second = (k[:, sk1:], v[:, sk1:], k_pos[sk1:])
    for blocks in ([first, second], [second, first]):
        out, lse = block_fwd(q, blocks, q_pos, causal, 0.25)
        assert_close(out, ref_out, "out")
        assert_close(lse, ref_lse, "lse")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_block_fwd_merge_with_invisible_block(dtype):
    """A key block that no query sees leaves the state untouched, before or after a visible one."""
    sq, sk = 16, 24
    q, k, v, _ = random_qkv(seed_of("invisible", str(dtype)), 1, sq, 2 * sk, 2, 1, 16, dtype)
    q_pos, k_pos = torch.arange(sq) + sk, torch.cat([torch.arange(sk), torch.arange(sk) + 100])
    visible = (k[:, :sk], v[:, :sk], k_pos[:sk])
    invisible = (k[:, sk:], v[:, sk:], k_pos[sk:])
    ref_out, ref_lse = ra.attention_reference(q, k[:, :sk], v[:, :sk], causal=True,
                                              q_positions=q_pos, k_positions=k_pos[:sk])
    for blocks in ([visible, invisible], [invisible, visible], [invisible, visible, invisible]):
        out, lse = block_fwd(q, blocks, q_pos, True, 16 ** -0.5)
        assert_close(out, ref_out, "out")
        assert_close(lse, ref_lse, "lse")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask", ["none", "partial", "masked_rows", "random"])
def test_block_bwd_accumulates_over_key_blocks(mask, dtype):
    """block_bwd adds (+=) into its accumulators; with the final lse, the blocks are independent:
    dq sums over key blocks, dk/dv of each block are that block's slice of the full gradient."""
    sq, sk1, sk2 = 33, 16, 25
    seed = seed_of("bwd-acc", mask, str(dtype))
    q, k, v, dout = random_qkv(seed, 2, sq, sk1 + sk2, 4, 1, 32, dtype)
    causal, q_pos, k_pos = mask_positions(mask, sq, sk1 + sk2, seed)
    ref_out, ref_lse, ref_dq, ref_dk, ref_dv = reference(
        q, k, v, dout, causal=causal, softmax_scale=0.2, q_positions=q_pos, k_positions=k_pos)
    out, lse = block_fwd(q, [(k, v, k_pos)], q_pos, causal, 0.2)

    g = torch.Generator().manual_seed(seed)
    dq_init = randn(g, *q.shape)
    dq = dq_init
    for lo, hi in ((0, sk1), (sk1, sk1 + sk2)):
        dk_init, dv_init = randn(g, *k[:, lo:hi].shape), randn(g, *v[:, lo:hi].shape)
        dq, dk, dv = block_bwd(dout, q, k[:, lo:hi], v[:, lo:hi], q_pos, k_pos[lo:hi],
                               out.to(dtype), lse, causal, 0.2, (dq, dk_init, dv_init))
        assert_close(dk, dk_init + ref_dk[:, lo:hi], "dk")
        assert_close(dv, dv_init + ref_dv[:, lo:hi], "dv")
    assert_close(dq, dq_init + ref_dq, "dq")


@pytest.mark.parametrize("kind", ["transposed", "sliced"])
def test_block_ops_non_contiguous_inputs(kind):
    """Strided q, k, v, dout (unit headdim stride) give the same results as contiguous ones."""
    sq, sk = 19, 23
    seed = seed_of("strided-block", kind)
    q, k, v, dout = random_qkv(seed, 2, sq, sk, 4, 2, 32, torch.float64)
    causal, q_pos, k_pos = mask_positions("random", sq, sk, seed)
    ref_out, ref_lse, *ref_grads = reference(q, k, v, dout, causal=causal, softmax_scale=0.3,
                                             q_positions=q_pos, k_positions=k_pos)
    qs, ks, vs, douts = (strided(t, kind) for t in (q, k, v, dout))
    assert not any(t.is_contiguous() for t in (qs, ks, vs, douts))
    out, lse = block_fwd(qs, [(ks, vs, k_pos)], q_pos, causal, 0.3)
    assert_close(out, ref_out, "out")
    assert_close(lse, ref_lse, "lse")
    zeros = [torch.zeros_like(t) for t in (q, k, v)]
    grads = block_bwd(douts, qs, ks, vs, q_pos, k_pos, strided(out, kind), lse, causal, 0.3, zeros)
    for name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(got, want, name)


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
