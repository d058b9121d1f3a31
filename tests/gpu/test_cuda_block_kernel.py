"""The CUDA block ops (block_fwd / block_bwd) against the float64 reference, FlashAttention's rule
(gpu_cases.py). The same cases run on the CPU in tests/test_cuda_build.py."""
import pytest
import torch

import gpu_cases as gc

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DTYPES = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask", gc.MASKS)
@pytest.mark.parametrize("sq,sk", gc.LENGTHS)
def test_block_mask_cases(sq, sk, mask, dtype):
    """Every mask kind for block lengths 1, 7, 97, 128, 200, 333 (tails, sq != sk)."""
    gc.check_block("cuda", dtype, sq, sk, 4, 2, 64, mask)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("headdim", [64, 128, 256])
@pytest.mark.parametrize("mask", gc.MASKS)
@pytest.mark.parametrize("sq,sk", [(1, 1), (7, 97), (97, 128), (200, 333)])
def test_block_sm90a(sq, sk, mask, headdim, dtype, monkeypatch):
    """RING_ATTN_CUDA_KERNEL=sm90a: the Hopper forward and (d = 64, 128) backward on compute
    capability 9.0 (elsewhere the mma.sync kernels), against the same reference. Their CPU twin:
    the emulator's sm90a cases (csrc/cuda/emu/test_cuda_emu.cpp)."""
    monkeypatch.setenv("RING_ATTN_CUDA_KERNEL", "sm90a")
    gc.check_block("cuda", dtype, sq, sk, 4, 2, headdim, mask)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask", ["none", "partial", "window", "packed"])
def test_block_sm90a_forward_merges_key_blocks(mask, dtype, monkeypatch):
    monkeypatch.setenv("RING_ATTN_CUDA_KERNEL", "sm90a")
    gc.check_merge_order("cuda", dtype, mask)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask", ["none", "partial", "window2"])
def test_block_sm90a_bwd_accumulates_over_key_blocks(mask, dtype, monkeypatch):
    monkeypatch.setenv("RING_ATTN_CUDA_KERNEL", "sm90a")
    gc.check_bwd_accumulates("cuda", dtype, mask)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask", ["none", "partial", "packed"])
@pytest.mark.parametrize("heads,heads_kv", [(4, 4), (4, 1)])
def test_block_sm90a_bwd_deterministic(heads, heads_kv, mask, dtype, monkeypatch):
    """The Hopper backward with deterministic=True: the dK/dV and dQ kernels, no reductions."""
    monkeypatch.setenv("RING_ATTN_CUDA_KERNEL", "sm90a")
    gc.check_deterministic_bwd("cuda", dtype, mask, heads, heads_kv)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads,heads_kv", gc.GQA)
@pytest.mark.parametrize("headdim", gc.HEADDIMS)
def test_block_headdims_and_gqa(headdim, heads, heads_kv, dtype):
    gc.check_block("cuda", dtype, 97, 200, heads, heads_kv, headdim, "partial")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask", ["none", "partial", "masked_rows", "random", "window", "packed"])
def test_block_fwd_merges_key_blocks(mask, dtype):
    gc.check_merge_order("cuda", dtype, mask)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask", ["none", "partial", "masked_rows", "random", "window2"])
def test_block_bwd_accumulates_over_key_blocks(mask, dtype):
    gc.check_bwd_accumulates("cuda", dtype, mask)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask", ["none", "partial", "packed"])
@pytest.mark.parametrize("heads,heads_kv", [(4, 4), (4, 1)])
def test_block_bwd_deterministic(heads, heads_kv, mask, dtype):
    """deterministic=True: atomic-free dQ kernel and per-K/V-head dK/dV, same bits every run."""
    gc.check_deterministic_bwd("cuda", dtype, mask, heads, heads_kv)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_precision_does_not_decay_with_merges(dtype):
    """Mean error after 8 merges <= 1.2 x the error of one block (fp32 running state)."""
    err_one, err_merged = gc.merge_errors("cuda", dtype)
    assert err_merged <= 1.2 * err_one, (err_one, err_merged)


def test_unmerged_forward_is_plain_attention():
    """_cuda_block_fwd(merge=False) ignores the incoming state (the merge-cost benchmark's twin)."""
    q, k, v, _ = gc.random_qkv(1, 1, 70, 90, 2, 1, 64, torch.bfloat16)
    mask = gc.mask_case("diagonal", 70, 90, 1)
    want, want_lse = gc.block_fwd("cuda", q, [(k, v, mask["k_pos"])], mask, 0.125)
    got, got_lse = gc.block_fwd("cuda", q, [(k, v, mask["k_pos"]), (k, v, mask["k_pos"])], mask,
                                0.125, merge=False)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_lse, want_lse)


@pytest.mark.parametrize("kind", ["transposed", "sliced"])
def test_block_ops_strided_inputs(kind):
    """Strided q, k, v, dout with 16-byte aligned rows give the contiguous results."""
    q, k, v, dout = gc.random_qkv(2, 2, 50, 70, 4, 2, 64, torch.bfloat16)
    mask = gc.mask_case("random", 50, 70, 2)
    qs, ks, vs, douts = (gc.strided(t, kind) for t in (q, k, v, dout))
    want = gc.block_fwd("cuda", q, [(k, v, mask["k_pos"])], mask, 0.3)
    got = gc.block_fwd("cuda", qs, [(ks, vs, mask["k_pos"])], mask, 0.3)
    torch.testing.assert_close(got, want)
    want_g = gc.block_bwd("cuda", dout, q, k, v, mask, *want, 0.3)
    got_g = gc.block_bwd("cuda", douts, qs, ks, vs, mask, *want, 0.3)
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # dq atomics: order may differ


def test_rejects_unsupported_inputs():
    """fp32/fp64, head dims that are not multiples of 8 or above 256, misaligned rows (inputs and
    fp32 accumulators), and tensors on different devices raise ValueError."""
    import ring_attention as ra
    q = torch.zeros(1, 8, 2, 64, device="cuda", dtype=torch.bfloat16)
    for bad, message in [(q.float(), "not supported on CUDA"), (q[..., :60], "not supported on CUDA"),
                         (torch.zeros(1, 8, 2, 264, device="cuda", dtype=torch.bfloat16),
                          "not supported on CUDA")]:
        with pytest.raises(ValueError, match=message):
            ra.ring_attn_func(bad, bad[:, :, :1], bad[:, :, :1])
    pos = torch.arange(8, dtype=torch.int32)
    out = torch.zeros(1, 8, 2, 64, device="cuda")
    lse = torch.full((1, 2, 8), float("-inf"), device="cuda")
    with pytest.raises(ValueError, match="not in CUDA device memory"):
        ra.ops.block_fwd(q=q, k=q, v=q, q_pos=pos, k_pos=pos.cuda(), q_seg=None, out_acc=out,
                         lse=lse, causal=True, window_left=-1, window_right=-1, softmax_scale=0.1)
    odd = torch.zeros(1, 8, 2, 68, device="cuda", dtype=torch.bfloat16)[..., 2:66]
    with pytest.raises(ValueError, match="16-byte aligned rows"):
        ra.ops.block_fwd(q=odd, k=q, v=q, q_pos=pos.cuda(), k_pos=pos.cuda(), q_seg=None,
                         out_acc=out, lse=lse, causal=True, window_left=-1, window_right=-1,
                         softmax_scale=0.1)
    odd_acc = torch.zeros(1, 8, 2, 66, device="cuda")[..., 1:65]  # fp32 rows 4 bytes off
    delta = torch.zeros(1, 2, 8, device="cuda")
    with pytest.raises(ValueError, match="16-byte aligned rows: dq_acc"):
        ra.ops.block_bwd(dout=q, q=q, k=q, v=q, q_pos=pos.cuda(), k_pos=pos.cuda(), q_seg=None,
                         lse=lse, delta=delta, dq_acc=odd_acc, dk_acc=out.clone(),
                         dv_acc=out.clone(), causal=True, window_left=-1, window_right=-1,
                         softmax_scale=0.1, deterministic=False)


def test_opcheck_block_ops():
    """torch.library.opcheck on the CUDA block ops (schemas, mutation annotations, fake kernels)."""
    import ring_attention as ra
    q, k, v, dout = (t.cuda() for t in gc.random_qkv(5, 2, 40, 30, 4, 2, 64, torch.bfloat16))
    pos_q = torch.arange(40, dtype=torch.int32, device="cuda")
    pos_k = torch.arange(30, dtype=torch.int32, device="cuda")
    out = torch.zeros(q.shape, device="cuda")
    lse = torch.full((2, 4, 40), float("-inf"), device="cuda")
    mask = dict(causal=True, window_left=-1, window_right=-1, softmax_scale=0.3)
    torch.library.opcheck(ra.ops.block_fwd.default, (q, k, v, pos_q, pos_k, None, out, lse),
                          mask)
    delta = (dout.float() * out).sum(-1).transpose(1, 2).contiguous()
    accs = [torch.zeros(t.shape, device="cuda") for t in (q, k, v)]
    torch.library.opcheck(ra.ops.block_bwd.default,
                          (dout, q, k, v, pos_q, pos_k, None, lse, delta, *accs), mask,
                          # dq/dk/dv use fp32 atomics: repeated runs may differ in the last bits
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("headdim", [64, 96, 128, 256])
@pytest.mark.parametrize("mask", ["none", "partial", "window", "packed"])
def test_block_kernels_within_99_kib(mask, headdim, dtype, monkeypatch):
    """RING_ATTN_CUDA_MAX_SMEM_KIB=99: the launches of a GPU of compute capability 8.6 or 8.9 (the
    kSmallSmem kernels where the usual ones need more), forward, both backward modes. Their CPU
    twin: the emulator's smem99 cases, on an emulated device that allows 99 KiB."""
    monkeypatch.setenv("RING_ATTN_CUDA_MAX_SMEM_KIB", "99")
    gc.check_block("cuda", dtype, 97, 200, 4, 2, headdim, mask)
    gc.check_deterministic_bwd("cuda", dtype, mask, 4, 1, headdim=headdim)


def test_block_kernels_beyond_the_device_raise(monkeypatch):
    """A head dim whose kernels need more shared memory per block than allowed (no GPU the
    kernels are built for allows this little): ValueError naming the direction, head dim and both
    sizes, before any launch."""
    monkeypatch.setenv("RING_ATTN_CUDA_MAX_SMEM_KIB", "64")
    q = torch.randn(1, 64, 2, 256, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"forward kernels at head dim 256 need \d+ KiB .* allows 64 KiB"):
        torch.ops.ring_attention.ring_fwd(q, q, q, None, "", True, 0.0625, -1, -1, "contiguous",
                                          "ring")
    monkeypatch.setenv("RING_ATTN_CUDA_MAX_SMEM_KIB", "ninety")
    with pytest.raises(ValueError, match="RING_ATTN_CUDA_MAX_SMEM_KIB must be a non-negative"):
        torch.ops.ring_attention.ring_fwd(q, q, q, None, "", True, 0.0625, -1, -1, "contiguous",
                                          "ring")
