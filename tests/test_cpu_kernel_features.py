"""CPU block kernel features: sliding windows, packed sequences with pad rows, bf16/fp16 inputs,
bitwise determinism, NaN inputs, and every instruction-set variant of the kernel.

The ops (torch.ops.ring_attention.block_fwd / block_bwd) are checked against the float64
reference of the pairs that cases.visible derives, independently of the kernel, from the mask
contract of csrc/core/mask.h: a query at position i of a sequence spanning [seg_lo, seg_hi] sees
the keys at positions [max(seg_lo, i - left), min(seg_hi, causal ? i : +inf, i + right)] (-1:
unbounded), a pad query (empty segment) sees nothing.

Sizes exceed the kernel's tiles (query tiles of 64/128 rows, key tiles of 256 keys), so the cases
contain skipped, full and partial tiles, tiles with pad rows, and key-tile tails.
"""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import ring_attention as ra
from cases import (NEG_INF, acc_dtype, assert_close, assert_forward_close, block_bwd, block_fwd,
                   block_mask, random_qkv, reference, seed_of, sequence_ranges, sequence_visible,
                   visible)
from ring_attention.testing import LocalRing


def check_against_reference(q, k, v, dout, q_pos, k_pos, q_seg, causal, left, right, scale):
    """Forward and backward of the block ops against the float64 reference with the same mask."""
    mask = block_mask(q_pos, k_pos, causal, left, right, q_seg)
    seen = visible(**mask)
    ref_out, ref_lse, *ref_grads = reference(q, k, v, dout, seen, scale)
    out, lse = block_fwd("cpu", q, [(k, v, k_pos)], mask, scale)
    assert_forward_close(out, ref_out, v)
    assert_close(lse, ref_lse, "lse")
    empty = ~seen.any(1)  # rows that see nothing: exactly out 0, lse -inf
    assert torch.all(lse[:, :, empty] == NEG_INF)
    assert torch.all(out[:, empty] == 0)
    # delta from the reference output in the accumulator dtype: the backward kernel alone, whose
    # gradients are then fp32-accurate for bf16/fp16 inputs too
    grads = block_bwd("cpu", dout, q, k, v, mask, ref_out.to(out.dtype), lse, scale)
    for name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert torch.isfinite(got).all(), name
        assert_close(got, want, name)
    assert torch.all(grads[0][:, empty] == 0)  # no gradient into rows that see nothing
    unseen = ~seen.any(0)  # keys no query sees
    assert torch.all(grads[1][:, unseen] == 0) and torch.all(grads[2][:, unseen] == 0)
    return out, lse, grads


# ---- windows ---------------------------------------------------------------------------------

WINDOWS = [  # (left, right, causal)
    (40, -1, False), (-1, 40, False), (30, 70, False), (0, 0, False), (-1, 0, False),
    (300, 300, False), (40, -1, True), (30, 70, True), (0, -1, True), (280, -1, True),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("left,right,causal", WINDOWS)
def test_windows(left, right, causal, dtype):
    """Sliding windows (left only, right only, both, with and without causal) on sequences of
    several tiles; q positions offset from k positions like a later shard of a ring."""
    sq, sk = 300, 620
    seed = seed_of("window", left, right, causal, str(dtype))
    q, k, v, dout = random_qkv(seed, 1, sq, sk, 2, 1, 32, dtype)
    q_pos, k_pos = torch.arange(sq) + 250, torch.arange(sk)
    check_against_reference(q, k, v, dout, q_pos, k_pos, None, causal, left, right, 0.3)


@pytest.mark.parametrize("left,right,causal", [(24, 24, False), (50, -1, True)])
def test_windows_strided_positions(left, right, causal):
    """Windows with non-contiguous and with unsorted positions (striped shards, random order)."""
    sq, sk = 200, 330
    seed = seed_of("window-positions", left, right, causal)
    q, k, v, dout = random_qkv(seed, 2, sq, sk, 2, 2, 48, torch.float32)
    check_against_reference(q, k, v, dout, 2 * torch.arange(sq) + 1, 2 * torch.arange(sk), None,
                            causal, left, right, 0.2)
    perm = torch.randperm(sq + sk, generator=torch.Generator().manual_seed(seed))
    check_against_reference(q, k, v, dout, perm[:sq], perm[sq:], None, causal, left, right, 0.2)


# ---- packed sequences --------------------------------------------------------------------------

def packed(lengths, pads, pad_base):
    """Positions and q_seg of sequences of `lengths` packed back to back, then `pads` pad tokens
    (empty segment (1, 0), positions from pad_base: outside every sequence)."""
    positions = torch.cat([torch.arange(sum(lengths)), torch.arange(pad_base, pad_base + pads)])
    pad_ranges = torch.tensor([[1, 0]], dtype=torch.int32).expand(pads, 2)
    return positions.int(), torch.cat([sequence_ranges(lengths), pad_ranges])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("left,right,causal", [(-1, -1, True), (-1, -1, False), (20, -1, True),
                                               (15, 15, False)])
def test_packed_sequences_with_pads(left, right, causal, dtype):
    """Several sequences in one block (one of a single token), followed by pad rows: queries see only
    their own sequence, pad rows give out 0 / lse -inf and no gradient, pad keys get no gradient."""
    lengths, pads = [70, 1, 200, 33, 130], 46
    total = sum(lengths)
    q_pos, q_seg = packed(lengths, pads, total + 10)
    k_pos = torch.cat([torch.arange(total), torch.arange(pads) + total + 10]).int()
    n = q_pos.numel()
    seed = seed_of("packed", left, right, causal, str(dtype))
    q, k, v, dout = random_qkv(seed, 1, n, n, 4, 2, 64, dtype)
    check_against_reference(q, k, v, dout, q_pos, k_pos, q_seg, causal, left, right, 0.125)


def test_rows_that_see_nothing_keep_merged_state():
    """Merging a block into the running state leaves the rows that see none of its keys exactly as
    they were (bit for bit), also when other rows of the same tile do see keys: here the second
    block holds keys of the first sequence only, so the second sequence and the pad rows keep their
    state."""
    q_pos, q_seg = packed([30, 20], 14, 200)
    seed = seed_of("packed-merge")
    q, k, v, dout = random_qkv(seed, 1, 64, 50, 2, 2, 32, torch.float32)
    k2, v2 = torch.randn(2, 1, 30, 2, 32, generator=torch.Generator().manual_seed(seed))
    both = block_mask(q_pos, torch.cat([torch.arange(50), torch.arange(30)]), True, q_seg=q_seg)
    first, second = (k, v, both["k_pos"][:50]), (k2, v2, both["k_pos"][50:])
    out, lse = block_fwd("cpu", q, [first], both, 0.2)
    out2, lse2 = block_fwd("cpu", q, [first, second], both, 0.2)
    assert torch.equal(out[:, 30:], out2[:, 30:]) and torch.equal(lse[:, :, 30:], lse2[:, :, 30:])
    assert not torch.equal(out[:, :30], out2[:, :30])
    assert torch.all(lse2[:, :, 50:] == NEG_INF) and torch.all(out2[:, 50:] == 0)
    # and the merged state is attention over both blocks
    ref_out, ref_lse, *_ = reference(q, torch.cat([k, k2], 1), torch.cat([v, v2], 1), dout,
                                     visible(**both), 0.2)
    assert_close(out2, ref_out, "out")
    assert_close(lse2, ref_lse, "lse")


# ---- bf16 / fp16 -------------------------------------------------------------------------------

LOW_PRECISION = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("left,right,causal", [(-1, -1, False), (-1, -1, True), (60, 10, False)])
def test_low_precision_inputs(dtype, left, right, causal):
    """bf16/fp16 inputs with fp32 accumulation.

    Tolerances, two rules:
    1. The accumulators (out_acc, lse, dq/dk/dv, all fp32) against the float64 reference of the same
       (low-precision-valued) inputs, with the float32 tolerance of cases.py (2e-5 relative to the
       largest reference value): the inputs convert to fp32 exactly and everything after is fp32
       arithmetic, so the only error is fp32 rounding, as for fp32 inputs. One exception, bounded:
       with bf16 inputs the AMX forward rounds P to bf16 once before P V (as FlashAttention, ATen and
       our CUDA kernels do), so out_acc is within 2^-8 max|v| (cases.assert_forward_close);
       lse and the backward (given delta) stay fp32-accurate. A kernel that rounded scores or dS, or
       rounded P more than once, would fail these.
    2. Flash-attention's rule for what a caller gets back in the input dtype (out and gradients
       rounded once to it, delta from the rounded out, as the ring does): the max error vs float64
       is at most 2x the max error of the same attention computed by plain PyTorch ops in that
       dtype (cases.reference in that dtype, softmax form). Observed: ours is dominated by the final rounding (half an
       ulp) and is 0.2x-0.65x of PyTorch's, whose every intermediate (scores, P, P V) is rounded.
    """
    sq, sk = 150, 300
    seed = seed_of("low-precision", str(dtype), left, right, causal)
    q, k, v, dout = random_qkv(seed, 1, sq, sk, 4, 2, 64, dtype)
    mask = block_mask(torch.arange(sq) + 150, torch.arange(sk), causal, left, right)
    scale = 0.125
    ref_out, ref_lse, *ref_grads = reference(q, k, v, dout, visible(**mask), scale)

    # Rule 1: fp32 accumulators, fp32 accuracy (bf16 out: within P's rounding, see
    # assert_forward_close).
    out, lse = block_fwd("cpu", q, [(k, v, mask["k_pos"])], mask, scale)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert_forward_close(out, ref_out, v)
    assert_close(lse, ref_lse, "lse")
    delta_out = ref_out.float()  # fp32 delta: the backward kernel's gradients are fp32-accurate
    grads = block_bwd("cpu", dout, q, k, v, mask, delta_out, lse, scale)
    for name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert got.dtype == torch.float32
        assert_close(got, want, name)

    # Rule 2: results rounded to the input dtype vs plain low-precision PyTorch.
    out_lp = out.to(dtype)
    grads_lp = block_bwd("cpu", dout, q, k, v, mask, out_lp, lse, scale)
    pt_out, _, *pt_grads = reference(q, k, v, dout, visible(**mask), scale, dtype, softmax=True)
    ours = (out_lp, *(g.to(dtype) for g in grads_lp))
    for name, got, base, want in zip(("out", "dq", "dk", "dv"), ours, (pt_out, *pt_grads),
                                     (ref_out, *ref_grads)):
        err = (got.double() - want).abs().max().item()
        err_pt = (base.double() - want).abs().max().item()
        assert err <= 2 * err_pt, (name, err, err_pt)


# ---- determinism ----------------------------------------------------------------------------

@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.parametrize("nthreads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_deterministic(threads, nthreads, dtype):
    """Forward and backward are bitwise identical from run to run, also with 2 threads, where tasks
    are handed out dynamically and the backward splits each head's keys over tasks (1 kv head, so
    several splits whose dq partials are summed)."""
    threads(nthreads)
    sq = sk = 1000
    seed = seed_of("determinism", nthreads, str(dtype))
    q, k, v, dout = random_qkv(seed, 1, sq, sk, 2, 1, 64, dtype)
    mask = block_mask(torch.arange(sq), torch.arange(sk), True, 300, -1,
                      q_seg=packed([400, 560], 40, 5000)[1])
    runs = []
    for _ in range(3):
        out, lse = block_fwd("cpu", q, [(k, v, mask["k_pos"])], mask, 0.125)
        grads = block_bwd("cpu", dout, q, k, v, mask, out.to(dtype), lse, 0.125)
        runs.append((out, lse, *grads))
    for again in runs[1:]:
        for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), runs[0], again):
            assert torch.equal(a, b), name


def test_deterministic_ring_world_size_1(threads):
    """The whole ring at world size 1 (ring_attn_func, forward and backward), 2 threads, twice."""
    threads(2)
    q, k, v, dout = random_qkv(seed_of("det-ring"), 1, 700, 700, 4, 2, 64, torch.float32)
    results = []
    for _ in range(2):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        out = ra.ring_attn_func(qq, kk, vv, causal=True)
        out.backward(dout)
        results.append((out.detach(), qq.grad, kk.grad, vv.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)


# ---- NaN inputs --------------------------------------------------------------------------------

NAN_PLACES = [("q", 5), ("k", 5), ("k", 290), ("v", 5)]  # (operand, token) holding one NaN


def nan_rows(t):
    """Which tokens of t (batch, seq, heads, headdim) hold a NaN."""
    return t.isnan().any(-1).any(-1).any(0)


def check_nan_propagates(dtype, world):
    """A NaN in q, k or v (one element of one token) makes exactly the rows that SDPA makes NaN
    NaN, in out and lse, and the gradients that it reaches: causal, several key tiles, at world
    size 1 and through a LocalRing (where the NaN crosses the merge of ring steps)."""
    for name, token in NAN_PLACES:
        q, k, v, dout = random_qkv(seed_of("nan", name, token), 1, 300, 300, 2, 1, 32, dtype)
        dict(q=q, k=k, v=v)[name][0, token, 0, 3] = float("nan")
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        if world == 1:
            out, lse = ra.ring_attn_func(*leaves, causal=True, return_lse=True)
        else:
            ring = LocalRing(world)
            outs, lses = ring.ring_attn_func(*(ring.shard(t) for t in leaves), causal=True,
                                             return_lse=True)
            out, lse = ring.unshard(outs), ring.unshard(lses, dim=2)
        grads = torch.autograd.grad(out, leaves, dout)
        sdpa_leaves = [t.to(acc_dtype(dtype)).requires_grad_() for t in (q, k, v)]
        want = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in sdpa_leaves),
                                              is_causal=True, enable_gqa=True).transpose(1, 2)
        want_grads = torch.autograd.grad(want, sdpa_leaves, dout.to(want.dtype))
        nan_out = nan_rows(want)
        assert 0 < nan_out.sum() < 300 or name == "v", (name, token)
        assert torch.equal(nan_rows(out), nan_out), (name, token, "out")
        nan_lse = nan_out if name != "v" else torch.zeros_like(nan_out)  # lse: of q and k only
        assert torch.equal(lse.isnan().any(1).any(0), nan_lse), (name, token, "lse")
        # The gradients are NaN where SDPA's are, but SDPA's dq and dk take a NaN through masked
        # pairs too (0 * NaN), the kernel only through the pairs it computes: so at least in the
        # NaN rows (dq) and the keys they see (dk, dv: SDPA's NaN dv rows).
        nan_keys = nan_rows(want_grads[2])
        for grad_name, got, ref in zip(("dq", "dk", "dv"), grads, want_grads):
            got_nan, ref_nan = nan_rows(got), nan_rows(ref)
            must = nan_out if grad_name == "dq" else nan_keys
            assert not (got_nan & ~ref_nan).any(), (name, token, grad_name)
            assert got_nan[must].all(), (name, token, grad_name)


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_nan_inputs_propagate_as_in_sdpa(dtype, world):
    check_nan_propagates(dtype, world)


def pairwise_reference(q, k, v, dout, seen, scale):
    """(out, lse, dq, dk, dv) in float64 where a value reaches a result only through the (query,
    key) pairs that `seen` (sq, sk) makes visible: a NaN or inf in q, k or v spreads to exactly
    what depends on it. q, k, v, dout (batch, seq, heads, d), as many K/V heads as query heads."""
    q, k, v, dout = (t.double().transpose(1, 2) for t in (q, k, v, dout))  # (b, h, s, d)
    pair = seen.view(1, 1, *seen.shape)
    pair5 = pair.unsqueeze(-1)
    scores = torch.where(pair, scale * q @ k.transpose(-1, -2), NEG_INF)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.where(pair, torch.exp(scores - lse.unsqueeze(-1)), 0.0)
    out = torch.where(pair5, probs.unsqueeze(-1) * v.unsqueeze(2), 0.0).sum(3)
    dprobs = torch.where(pair, (dout.unsqueeze(3) * v.unsqueeze(2)).sum(-1), 0.0)
    dscores = torch.where(pair, probs * (dprobs - (dout * out).sum(-1, keepdim=True)), 0.0)
    dq = scale * torch.where(pair5, dscores.unsqueeze(-1) * k.unsqueeze(2), 0.0).sum(3)
    dk = scale * torch.where(pair5, dscores.unsqueeze(-1) * q.unsqueeze(3), 0.0).sum(2)
    dv = torch.where(pair5, probs.unsqueeze(-1) * dout.unsqueeze(3), 0.0).sum(2)
    return (out.transpose(1, 2), lse, *(t.transpose(1, 2) for t in (dq, dk, dv)))


@pytest.mark.parametrize("world,layout,causal,window", [
    (1, "contiguous", True, (-1, -1)), (2, "zigzag", True, (-1, -1)),
    (3, "striped", True, (-1, -1)), (3, "contiguous", True, (5, 0)),
    (2, "contiguous", False, (4, 3)), (4, "zigzag", False, (-1, -1))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_non_finite_inputs_reach_every_result_that_depends_on_them(dtype, world, layout, causal,
                                                                   window):
    """A NaN, inf or -inf in one element of q, k or v, on any rank: every output, lse and gradient
    element that depends on it through a visible pair is NaN or inf (never a finite number), and
    the finite ones match the reference. Elements that do not depend on it may be non-finite too
    (a block that holds it multiplies masked pairs by it, as SDPA does for every row)."""
    seqlen, heads, headdim = 48, 2, 8
    seen = sequence_visible(seqlen, causal, window)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    for name, token, value in [("q", 7, float("nan")), ("k", 29, float("nan")),
                               ("v", 29, float("inf")), ("k", 40, float("-inf")),
                               ("v", 47, float("nan")), ("q", 30, float("inf"))]:
        q, k, v, dout = random_qkv(seed_of("non-finite", name, token), 1, seqlen, seqlen, heads,
                                   heads, headdim, dtype)
        dict(q=q, k=k, v=v)[name][0, token, 1, 2] = value
        ring = LocalRing(world)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        outs, lses = ring.ring_attn_func(*(ring.shard(t, layout=layout) for t in leaves),
                                         causal=causal, window_size=window, layout=layout,
                                         return_lse=True)
        out, lse = ring.unshard(outs, layout=layout), ring.unshard(lses, layout=layout, dim=2)
        grads = torch.autograd.grad(out, leaves, dout)
        want = pairwise_reference(q, k, v, dout, seen, headdim ** -0.5)
        for what, got, ref in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads), want):
            got = got.double()
            assert not (torch.isfinite(got) & ~torch.isfinite(ref)).any(), (name, token, what)
            both = torch.isfinite(got) & torch.isfinite(ref)
            if both.any():
                assert (got - ref)[both].abs().max() <= tol * max(1.0, ref[both].abs().max()), \
                    (name, token, what)


# ---- instruction sets --------------------------------------------------------------------------

_ISA_SCRIPT = r"""
import sys, torch
sys.path[:0] = [{tests!r}]
import ring_attention as ra
import test_cpu_kernel_features as t
from cases import random_qkv
torch.set_num_threads(2)
for dtype in (torch.float32, torch.float64, torch.bfloat16):
    q_pos, q_seg = t.packed([90, 1, 150], 19, 400)
    k_pos = torch.cat([torch.arange(241), torch.arange(19) + 400]).int()
    q, k, v, dout = random_qkv(7, 1, 260, 260, 4, 2, 40, dtype)  # headdim 40: padded vectors
    t.check_against_reference(q, k, v, dout, q_pos, k_pos, q_seg, True, 60, -1, 0.15)
    q, k, v, dout = random_qkv(8, 2, 97, 301, 2, 2, 64, dtype)
    t.check_against_reference(q, k, v, dout, torch.arange(97) + 150, torch.arange(301), None,
                              False, 40, 40, 0.15)
    t.check_nan_propagates(dtype, 1)
print(torch.ops.ring_attention.cpu_kernel_isa(), torch.ops.ring_attention.cpu_fma_peak_gflops(0.05))
print("ok")
"""

_ISA_ORDER = ["generic", "avx2", "avx512", "avx512+amx"]


@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512", "amx"])
def test_instruction_sets(isa):
    """Each compiled variant of the kernel (RING_ATTN_CPU_KERNEL caps the one the CPU would pick;
    on a CPU without AVX-512 or AMX those cases run the best available one). "avx512" is AVX-512
    without the AMX tile GEMMs; "amx" (the default where available) runs every GEMM, forward and
    backward, on the tile unit."""
    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, RING_ATTN_CPU_KERNEL=isa)
    result = subprocess.run([sys.executable, "-c", _ISA_SCRIPT.format(tests=tests)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
    # The kernels in use never exceed the cap, and the FMA loop on their vector width ran.
    used, gflops = result.stdout.split()[-3:-1]
    cap = {"amx": "avx512+amx"}.get(isa, isa)
    assert _ISA_ORDER.index(used) <= _ISA_ORDER.index(cap), (isa, used)
    assert float(gflops) > 0.1
