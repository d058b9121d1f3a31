"""What the tests share: seeded inputs, the named mask cases, THE visible-pair mask and the
float64 attention reference built on it, the tolerance rules, and runners of the block ops.
Used by the CPU tests (tests/*.py), by the functions that the ranks of a RankPool run
(ring_cases.py and the other *_cases.py) and by the CUDA tests and their CPU twins
(tests/gpu/gpu_cases.py).

Tolerances, two rules (assert_matches picks the one of the dtype):
- float64 and float32 (assert_close): |actual - reference| <= tol * max(1, max |reference|) +
  tol * |reference|.
  float64: 1e-10. The kernels accumulate in float64; the errors are a few ulp times the O(100)
    additions of a row (observed <= 2e-14), so 1e-10 leaves four orders of magnitude of margin,
    while any algorithmic slip (a wrong mask element, a lost merge term) is O(1e-2) or larger.
  float32: 2e-5. Inputs are of unit scale and sums have <= a few hundred terms, so float32
    accumulation errs by ~sqrt(n) * eps32 * |terms|: observed <= 1.2e-6 for out and lse and
    <= 5e-6 for gradients of the ring cases. The worst case seen is 1e-5 for dk of a block
    with a single key, whose exact value is 0: p = 1 and ds = dout.v - dout.out is pure
    rounding, summed over 256 query rows. Still 2e-5 is far below any real bug.
- bfloat16 and float16 (assert_fa_rule, FlashAttention's rule): for every output, the error
  against the float64 reference computed from the same rounded inputs must be at most twice the
  error of the same attention computed by PyTorch ops in the input precision, plus a floor of
  FLOOR[dtype] x max(1, max |reference|) so that a case whose low-precision reference happens to
  be exact (one key, say) does not demand an exact kernel. Any indexing or masking slip errs by
  O(0.1..1), far above.
"""
import itertools
import zlib

import torch

import ring_attention as ra

NEG_INF = float("-inf")
TOL = {torch.float64: 1e-10, torch.float32: 2e-5}
FLOOR = {torch.bfloat16: 1e-3, torch.float16: 2e-4, torch.float32: 5e-5}


def acc_dtype(dtype):
    """Accumulator (and lse) dtype of the ops for inputs of `dtype`."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def seed_of(*params):
    """A deterministic seed from the parameters of a case."""
    return zlib.crc32(repr(params).encode())


def randn(generator, *shape, dtype=torch.float64):
    """Standard normal values drawn in float64 (so every dtype's cases see the same data)."""
    return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)


def random_qkv(seed, batch, seqlen_q, seqlen_k, heads, heads_kv, headdim, dtype):
    """q and dout (batch, seqlen_q, heads, headdim); k, v (batch, seqlen_k, heads_kv, headdim),
    drawn in float64 and rounded to `dtype`, on the CPU."""
    generator = torch.Generator().manual_seed(seed)
    q = randn(generator, batch, seqlen_q, heads, headdim, dtype=dtype)
    k = randn(generator, batch, seqlen_k, heads_kv, headdim, dtype=dtype)
    v = randn(generator, batch, seqlen_k, heads_kv, headdim, dtype=dtype)
    dout = randn(generator, batch, seqlen_q, heads, headdim, dtype=dtype)
    return q, k, v, dout


def random_sinks(seed, heads, dtype):
    """Attention sinks (heads,): logits of either sign, several times the scores' spread, drawn
    in float64 and rounded to `dtype`."""
    return (3 * randn(torch.Generator().manual_seed(seed), heads)).to(dtype)


def random_packed(seed, seqlens, heads, heads_kv, headdim, dtype):
    """cu_seqlens (int32) and packed q, k, v, dout (tokens, heads(_kv), headdim) of sequences of
    `seqlens`: random_qkv's values for one batch of all the tokens."""
    cu = torch.tensor([0, *itertools.accumulate(seqlens)], dtype=torch.int32)
    total = int(cu[-1])
    return (cu, *(t[0] for t in random_qkv(seed, 1, total, total, heads, heads_kv, headdim, dtype)))


def strided(t, kind):
    """A view with the values of `t` (batch, seq, heads, headdim) but another memory layout."""
    if kind == "contiguous":
        return t.contiguous()
    if kind == "transposed":  # stored as (batch, heads, seq, headdim)
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    if kind == "sliced":  # every other token and head of a larger tensor
        b, s, h, d = t.shape
        wide = t.new_zeros(b, 2 * s, 2 * h, d)
        wide[:, 1::2, ::2] = t
        return wide[:, 1::2, ::2]
    if kind == "headdim_strided":  # headdim not unit-stride
        wide = t.new_zeros(*t.shape, 2)
        wide[..., 1] = t
        return wide[..., 1]
    raise ValueError(kind)


# ---- masks -------------------------------------------------------------------------------------

def block_mask(q_pos, k_pos, causal, window_left=-1, window_right=-1, q_seg=None):
    """A block's mask as the block ops take it: int32 positions, causal, window (-1: unbounded)
    and q_seg, the packed sequences' (sq, 2) int32 ranges (core/mask.h) or None."""
    return dict(q_pos=q_pos.int(), k_pos=k_pos.int(), causal=causal, window_left=window_left,
                window_right=window_right, q_seg=None if q_seg is None else q_seg.int())


MASKS = ["none", "full", "diagonal", "partial", "skipped", "masked_rows", "random", "window",
         "window2", "packed"]


def mask_case(mask, sq, sk, seed):
    """The block_mask of a named case, for sq queries and sk keys."""
    q, k = torch.arange(sq), torch.arange(sk)
    if mask == "none":  # every pair visible
        return block_mask(q, k, causal=False)
    if mask == "full":  # causal, every key before every query
        return block_mask(q + sk, k, causal=True)
    if mask == "diagonal":  # same positions: row i sees keys 0..i
        return block_mask(q, k, causal=True)
    if mask == "partial":  # interleaved, like striped shards
        return block_mask(2 * q + 1, 3 * k, causal=True)
    if mask == "skipped":  # every key after every query: all rows see nothing
        return block_mask(q, k + sq, causal=True)
    if mask == "masked_rows":  # the first half of the rows sees nothing
        return block_mask(q, k + (sq + 1) // 2, causal=True)
    if mask == "random":  # unsorted positions, disjoint between q and k
        perm = torch.randperm(sq + sk, generator=torch.Generator().manual_seed(seed))
        return block_mask(perm[:sq], perm[sq:], causal=True)
    if mask == "window":  # causal sliding window of 20 keys back
        return block_mask(q, k, causal=True, window_left=20)
    if mask == "window2":  # two-sided window, not causal
        return block_mask(q, k, causal=False, window_left=15, window_right=7)
    if mask == "packed":  # sequences [0, 30), [30, 55), [55, ...); the last 3 rows are padding
        bounds = [0, 30, 55, max(sq, sk)]
        seg = torch.zeros(sq, 2, dtype=torch.int32)
        for seq in range(3):
            seg[bounds[seq]:bounds[seq + 1], 0] = bounds[seq]
            seg[bounds[seq]:bounds[seq + 1], 1] = bounds[seq + 1] - 1
        if sq > 3:
            seg[-3:, 0], seg[-3:, 1] = 1, 0
        return block_mask(q, k, causal=True, q_seg=seg)
    raise ValueError(mask)


def visible(q_pos, k_pos, causal, window_left=-1, window_right=-1, q_seg=None):
    """(sq, sk) bool: which keys each query sees, written out from the mask contract of
    csrc/core/mask.h independently of the kernels. A query at position i of a sequence spanning
    [seg_lo, seg_hi] (q_seg; the whole line without it) sees the keys at positions j with
    seg_lo <= j <= seg_hi, j <= i when causal, i - window_left <= j and j <= i + window_right
    (-1: unbounded); a pad query (empty range, seg_lo > seg_hi) sees nothing. visible(**mask)
    takes a block_mask."""
    q = q_pos.long().view(-1, 1)
    k = k_pos.long().view(1, -1)
    seen = torch.ones(q.shape[0], k.shape[1], dtype=torch.bool)
    if causal:
        seen &= k <= q
    if window_left >= 0:  # as distances: windows up to int64's max must not overflow
        seen &= q - k <= window_left
    if window_right >= 0:
        seen &= k - q <= window_right
    if q_seg is not None:
        seg = q_seg.long()
        seen &= (k >= seg[:, :1]) & (k <= seg[:, 1:])
    return seen


def sequence_ranges(seqlens):
    """(tokens, 2) int32: each token's sequence as [first, last] global position, for sequences
    of `seqlens` packed back to back."""
    cu = torch.tensor([0, *itertools.accumulate(seqlens)])
    lengths = torch.tensor(seqlens)
    return torch.stack([cu[:-1].repeat_interleave(lengths),
                        (cu[1:] - 1).repeat_interleave(lengths)], 1).int()


def sequence_visible(seqlens, causal, window=(-1, -1)):
    """visible() of a whole ring's tokens at their global positions 0, 1, ...: one sequence of
    `seqlens` tokens, or packed sequences of those lengths (no query sees another sequence)."""
    seqlens = [seqlens] if isinstance(seqlens, int) else list(seqlens)
    positions = torch.arange(sum(seqlens))
    return visible(positions, positions, causal, *window, q_seg=sequence_ranges(seqlens))


# ---- the reference -----------------------------------------------------------------------------

def attention(q, k, v, seen, scale, dtype, softmax=False, sinks=None):
    """Materialised attention computed in `dtype` (differentiable), every op's result rounded to
    it: (out, lse); rows that see nothing get out 0 and lse -inf. q (batch, sq, heads, d); k, v
    (batch, sk, heads_kv, d); seen: (sq, sk) bool from visible(). The probabilities are
    exp(scores - lse), or with `softmax` torch.softmax(scores) (one rounding to `dtype` where the
    other form has two, as in FlashAttention's attention_ref: the tighter same-precision bound).
    sinks (heads,): attention sinks as GPT-OSS's eager attention writes them, a column of one
    logit per head appended to the scores and dropped after the softmax."""
    heads, heads_kv = q.shape[2], k.shape[2]
    # (batch, heads, seq, headdim)
    q_by_head, k_by_head, v_by_head = (t.to(dtype).transpose(1, 2) for t in (q, k, v))
    k_by_head = k_by_head.repeat_interleave(heads // heads_kv, dim=1)
    v_by_head = v_by_head.repeat_interleave(heads // heads_kv, dim=1)
    scores = (q_by_head @ k_by_head.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~seen.to(scores.device), NEG_INF)
    if sinks is not None:
        column = sinks.to(dtype).view(1, heads, 1, 1).expand(*scores.shape[:3], 1)
        scores = torch.cat([scores, column], dim=-1)
    lse = torch.logsumexp(scores, dim=-1)
    if softmax:
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row that sees nothing: 0/0
    else:
        finite_lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
        probs = torch.exp(scores - finite_lse.unsqueeze(-1))
    if sinks is not None:
        probs = probs[..., :-1]
    return (probs @ v_by_head).transpose(1, 2), lse


def reference(q, k, v, dout, seen, scale=None, dtype=torch.float64, softmax=False, dlse=None,
              sinks=None):
    """(out, lse, dq, dk, dv) of `attention` in `dtype` (default float64: the reference; a lower
    precision: the same-precision PyTorch of the FA rule), on the CPU, returned as float64.
    Dense q (batch, sq, heads, d), or packed tokens (tokens, heads, d) with lse (heads, tokens).
    scale None: 1/sqrt(d). The gradients are of out by dout, plus of lse by dlse if given. With
    sinks (heads,), their gradient (heads,) follows dv."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    packed = q.dim() == 3
    leaves = [t.detach().cpu().to(dtype) for t in (q, k, v)]
    leaves = [(t.unsqueeze(0) if packed else t).requires_grad_() for t in leaves]
    if sinks is not None:
        sinks = sinks.detach().cpu().to(dtype).requires_grad_()
    grad_out = dout.detach().cpu().to(dtype)
    out, lse = attention(*leaves, seen, scale, dtype, softmax, sinks)
    outputs, grad_outputs = [out], [grad_out.unsqueeze(0) if packed else grad_out]
    if dlse is not None:
        outputs.append(lse)
        grad_outputs.append(dlse.detach().cpu().to(dtype).unsqueeze(0) if packed else
                            dlse.detach().cpu().to(dtype))
    grads = torch.autograd.grad(outputs, leaves + ([sinks] if sinks is not None else []),
                                grad_outputs)
    results = tuple(t[0] if packed else t for t in (out, lse, *grads[:3])) + grads[3:]
    return tuple(t.detach().double() for t in results)


# ---- tolerance rules ---------------------------------------------------------------------------

def assert_close(actual, expected, name):
    """`actual` against a float64 `expected`, with the tolerance of actual's dtype (see above)."""
    tol = TOL[actual.dtype]
    finite = expected[torch.isfinite(expected)]
    scale = max(1.0, finite.abs().max().item()) if finite.numel() else 1.0
    assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
    torch.testing.assert_close(actual.to(torch.float64), expected.to(torch.float64), rtol=tol,
                               atol=tol * scale, msg=lambda m: f"{name}: {m}")


def assert_forward_close(out, expected, v):
    """The forward's out_acc against a float64 `expected`. bf16 inputs: P may be rounded to bf16
    once before P V (the AMX CPU kernel and the CUDA kernels do, as FlashAttention and ATen do), so
    |out - expected| <= 2^-8 max|v| plus the fp32 tolerance: out is a combination of v's rows
    whose weights p / l are each off by at most 2^-9 of themselves. Other dtypes: assert_close."""
    if v.dtype != torch.bfloat16:
        return assert_close(out, expected, "out")
    assert out.shape == expected.shape, (out.shape, expected.shape)
    scale = max(1.0, expected.abs().max().item())
    bound = 2.0 ** -8 * v.float().abs().max().item() + TOL[torch.float32] * scale
    err = (out.double() - expected.double()).abs().max().item()
    assert err <= bound, f"out: max error {err:.3g} > {bound:.3g} (P rounded to bf16 once)"


def assert_fa_rule(name, ours, ref, low, dtype):
    """|ours - ref| <= 2 |low - ref| + FLOOR x max(1, |ref|) on finite ref entries; infinite ref
    entries (lse of rows that see nothing) must be matched exactly."""
    ours = ours.detach().cpu().double()
    assert ours.shape == ref.shape, (name, ours.shape, ref.shape)
    assert not torch.isnan(ours).any(), f"{name}: NaN"
    finite = torch.isfinite(ref)
    assert torch.equal(ours[~finite], ref[~finite]), f"{name}: infinite entries differ"
    if not finite.any():
        return
    scale = max(1.0, ref[finite].abs().max().item())
    err = (ours - ref)[finite].abs().max().item()
    err_low = (low - ref)[finite].abs().max().item()
    bound = 2 * err_low + FLOOR[dtype] * scale
    assert err <= bound, f"{name}: error {err:.3g} > {bound:.3g} (2 x same-precision error {err_low:.3g} + floor)"


def low_precision(dtype):
    """Does `dtype` take the FA rule (rather than a fixed tolerance)?"""
    return dtype not in TOL


def references(q, k, v, dout, seen, scale, dtype):
    """(ref, low): the float64 reference and, for a low-precision dtype, the same-precision one
    that its FA rule needs (None otherwise)."""
    ref = reference(q, k, v, dout, seen, scale)
    return ref, reference(q, k, v, dout, seen, scale, dtype) if low_precision(dtype) else None


def assert_matches(name, ours, ref, low, dtype):
    """The tolerance rule of `dtype` (see above): ours against the float64 `ref` (and `low`, the
    same-precision result, for bf16/fp16)."""
    if low_precision(dtype):
        assert_fa_rule(name, ours, ref, low, dtype)
    else:
        assert_close(ours.detach().cpu(), ref, name)


# ---- the block ops -----------------------------------------------------------------------------

def block_fwd(device, q, blocks, mask, scale, merge=True):
    """block_fwd of each (k, v, k_pos) in `blocks` into one running state on `device`, started
    empty; mask: a block_mask (its k_pos unused). Returns (out_acc, lse) on the CPU. merge=False
    uses the CUDA-only _cuda_block_fwd, which ignores the incoming state."""
    batch, seqlen_q, heads, _ = q.shape
    acc = acc_dtype(q.dtype)
    out = torch.zeros(q.shape, dtype=acc, device=device)
    lse = torch.full((batch, heads, seqlen_q), NEG_INF, dtype=acc, device=device)
    query_mask = dict(q_pos=mask["q_pos"].to(device),
                      q_seg=None if mask["q_seg"] is None else mask["q_seg"].to(device),
                      causal=mask["causal"], window_left=mask["window_left"],
                      window_right=mask["window_right"], softmax_scale=scale)
    for k, v, k_pos in blocks:
        args = dict(q=q.to(device), k=k.to(device), v=v.to(device), k_pos=k_pos.int().to(device),
                    out_acc=out, lse=lse, **query_mask)
        if merge:
            ra.ops.block_fwd(**args)
        else:
            torch.ops.ring_attention._cuda_block_fwd(**args, merge=False)
    return out.cpu(), lse.cpu()


def block_bwd(device, dout, q, k, v, mask, out, lse, scale, init=None, deterministic=False):
    """block_bwd on `device` into accumulators holding `init` (default zeros); returns what it
    added to them, (dq, dk, dv) in the accumulator dtype on the CPU. delta = rowsum(dout * out) as
    the ring computes it."""
    acc = acc_dtype(q.dtype)
    delta = (dout.to(acc) * out.to(acc)).sum(-1).transpose(1, 2).contiguous()
    init = [torch.zeros(t.shape, dtype=acc) for t in (q, k, v)] if init is None else init
    init = [t.to(acc) for t in init]
    accumulators = [t.clone().to(device) for t in init]
    ra.ops.block_bwd(dout=dout.to(device), q=q.to(device), k=k.to(device), v=v.to(device),
                     q_pos=mask["q_pos"].to(device), k_pos=mask["k_pos"].to(device),
                     q_seg=None if mask["q_seg"] is None else mask["q_seg"].to(device),
                     lse=lse.to(device), delta=delta.to(device), dq_acc=accumulators[0],
                     dk_acc=accumulators[1], dv_acc=accumulators[2], causal=mask["causal"],
                     window_left=mask["window_left"], window_right=mask["window_right"],
                     softmax_scale=scale, deterministic=deterministic)
    return [a.cpu() - i for a, i in zip(accumulators, init)]


def block_case(seed, batch, sq, sk, heads, heads_kv, headdim, mask, dtype, scale):
    """A block case: random (q, k, v, dout), its mask case and references ->
    (q, k, v, dout, mask, ref, low); low: see references()."""
    q, k, v, dout = random_qkv(seed, batch, sq, sk, heads, heads_kv, headdim, dtype)
    case = mask_case(mask, sq, sk, seed)
    return (q, k, v, dout, case, *references(q, k, v, dout, visible(**case), scale, dtype))


def check_block(device, dtype, sq, sk, heads, heads_kv, headdim, mask, batch=2, scale=0.3):
    """Forward and backward of one block pair against the float64 reference, including rows that
    see nothing (out exactly 0, lse -inf, no NaN)."""
    seed = seed_of(sq, sk, heads, heads_kv, headdim, mask, str(dtype))
    q, k, v, dout, case, ref, low = block_case(seed, batch, sq, sk, heads, heads_kv, headdim, mask,
                                               dtype, scale)
    out, lse = block_fwd(device, q, [(k, v, case["k_pos"])], case, scale)
    assert_matches("out", out, ref[0], low and low[0], dtype)
    assert_matches("lse", lse, ref[1], low and low[1], dtype)
    masked = torch.isinf(ref[1])  # (b, h, sq)
    assert torch.all(out.transpose(1, 2)[masked] == 0)

    grads = block_bwd(device, dout, q, k, v, case, out, lse, scale)
    for i, (name, got) in enumerate(zip(("dq", "dk", "dv"), grads)):
        assert_matches(name, got, ref[2 + i], low and low[2 + i], dtype)


def check_merge_order(device, dtype, mask):
    """block_fwd over two key blocks (either order) equals attention over their concatenation;
    with a causal mask, key blocks that no query sees change nothing, before or between them."""
    sq, sk1, sk2, scale = 37, 20, 45, 0.25
    q, k, v, _, case, ref, low = block_case(seed_of("merge", mask, str(dtype)), 2, sq, sk1 + sk2,
                                            4, 2, 64, mask, dtype, scale)
    first = (k[:, :sk1], v[:, :sk1], case["k_pos"][:sk1])
    second = (k[:, sk1:], v[:, sk1:], case["k_pos"][sk1:])
    far = (k[:, :sk1], v[:, :sk1], case["k_pos"][:sk1] + 10 ** 6)  # seen by no query when causal
    orders = [[first, second], [second, first]]
    if case["causal"]:
        orders.append([far, second, far, first, far])
    for blocks in orders:
        out, lse = block_fwd(device, q, blocks, case, scale)
        assert_matches("out", out, ref[0], low and low[0], dtype)
        assert_matches("lse", lse, ref[1], low and low[1], dtype)


def check_bwd_accumulates(device, dtype, mask):
    """block_bwd adds into accumulators that already hold values; with the final lse the key
    blocks are independent: dq sums over them, dk/dv are each block's slice."""
    sq, sk1, sk2, scale = 33, 16, 57, 0.2
    seed = seed_of("bwd-acc", mask, str(dtype))
    q, k, v, dout, case, ref, low = block_case(seed, 2, sq, sk1 + sk2, 4, 1, 64, mask, dtype,
                                               scale)
    out, lse = block_fwd(device, q, [(k, v, case["k_pos"])], case, scale)
    generator = torch.Generator().manual_seed(seed)
    dq_total = torch.zeros(q.shape, dtype=acc_dtype(dtype))
    for lo, hi in ((0, sk1), (sk1, sk1 + sk2)):
        part = dict(case, k_pos=case["k_pos"][lo:hi])
        init = [torch.randn(t.shape, generator=generator, dtype=acc_dtype(dtype))
                for t in (q, k[:, lo:hi], v[:, lo:hi])]
        dq, dk, dv = block_bwd(device, dout, q, k[:, lo:hi], v[:, lo:hi], part, out, lse, scale,
                               init)
        dq_total += dq
        assert_matches("dk", dk, ref[3][:, lo:hi], low and low[3][:, lo:hi], dtype)
        assert_matches("dv", dv, ref[4][:, lo:hi], low and low[4][:, lo:hi], dtype)
    assert_matches("dq", dq_total, ref[2], low and low[2], dtype)
