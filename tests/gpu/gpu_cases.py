"""Block-kernel and ring cases shared by the CUDA tests (tests/gpu) and their CPU twins
(tests/test_cuda_build.py): one case list, run on either device.

Rule (FlashAttention's): for every output, the error of the kernel against a float64 reference
computed from the same rounded inputs must be at most twice the error of a PyTorch reference
computed in the input precision (bf16/fp16 with torch ops), plus a floor of FLOOR[dtype] x
max(1, max |reference|) so that a case whose low-precision reference happens to be exact (one key,
say) does not demand an exact kernel. Any indexing or masking slip errs by O(0.1..1), far above.
Precision over merges: the mean error after merging 8 key blocks into one running state is at most
1.2x the mean error of the same keys in one block (fixed seeds).
"""
import itertools
import zlib

import torch

import ring_attention as ra

NEG_INF = float("-inf")
FLOOR = {torch.bfloat16: 1e-3, torch.float16: 2e-4, torch.float32: 5e-5}

MASKS = ["none", "full", "diagonal", "partial", "skipped", "masked_rows", "random", "window",
         "window2", "packed"]
LENGTHS = [(1, 1), (7, 7), (97, 97), (128, 128), (1, 128), (128, 1), (7, 97), (97, 128), (128, 7),
           (200, 333)]
HEADDIMS = [32, 40, 64, 96, 128, 256]     # 40 runs padded in the 64 bucket on CUDA
GQA = [(1, 1), (2, 2), (4, 2), (4, 1)]    # (heads, heads_kv)


def seed_of(*params):
    return zlib.crc32(repr(params).encode())


def mask_case(mask, sq, sk, seed):
    """The mask of a named case: dict(causal, window_left, window_right, q_pos, k_pos, q_seg) with
    int32 CPU positions and q_seg None or the packed sequences' (sq, 2) int32 ranges."""
    q, k = torch.arange(sq, dtype=torch.int32), torch.arange(sk, dtype=torch.int32)
    c = dict(causal=True, window_left=-1, window_right=-1, q_pos=q, k_pos=k, q_seg=None)
    if mask == "none":  # every pair visible
        c["causal"] = False
    elif mask == "full":  # causal, every key before every query
        c["q_pos"] = q + sk
    elif mask == "diagonal":  # same positions: row i sees keys 0..i
        pass
    elif mask == "partial":  # interleaved, like striped shards
        c["q_pos"], c["k_pos"] = 2 * q + 1, 3 * k
    elif mask == "skipped":  # every key after every query: all rows see nothing
        c["k_pos"] = k + sq
    elif mask == "masked_rows":  # the first half of the rows sees nothing
        c["k_pos"] = k + (sq + 1) // 2
    elif mask == "random":  # unsorted positions, disjoint between q and k
        perm = torch.randperm(sq + sk, generator=torch.Generator().manual_seed(seed)).int()
        c["q_pos"], c["k_pos"] = perm[:sq].contiguous(), perm[sq:].contiguous()
    elif mask == "window":  # causal sliding window of 20 keys back
        c["window_left"] = 20
    elif mask == "window2":  # two-sided window, not causal
        c.update(causal=False, window_left=15, window_right=7)
    elif mask == "packed":  # sequences [0, 30), [30, 55), [55, ...); the last 3 rows are padding
        bounds = [0, 30, 55, max(sq, sk)]
        seg = torch.zeros(sq, 2, dtype=torch.int32)
        for s in range(3):
            seg[bounds[s]:bounds[s + 1], 0] = bounds[s]
            seg[bounds[s]:bounds[s + 1], 1] = bounds[s + 1] - 1
        if sq > 3:
            seg[-3:, 0], seg[-3:, 1] = 1, 0
        c["q_seg"] = seg
    else:
        raise ValueError(mask)
    return c


def visible(c):
    """(sq, sk) bool: which keys each query sees, written out independently of the kernels."""
    qp, kp = c["q_pos"].long().view(-1, 1), c["k_pos"].long().view(1, -1)
    vis = torch.ones(qp.shape[0], kp.shape[1], dtype=torch.bool)
    if c["causal"]:
        vis &= kp <= qp
    if c["window_left"] >= 0:
        vis &= kp >= qp - c["window_left"]
    if c["window_right"] >= 0:
        vis &= kp <= qp + c["window_right"]
    if c["q_seg"] is not None:
        seg = c["q_seg"].long()
        vis &= (kp >= seg[:, :1]) & (kp <= seg[:, 1:])
    return vis


def attention(q, k, v, vis, scale, dtype):
    """Materialised attention computed in `dtype` (differentiable): (out, lse); rows that see
    nothing get out 0 and lse -inf."""
    heads, heads_kv = q.shape[2], k.shape[2]
    qd, kd, vd = (t.to(dtype).transpose(1, 2) for t in (q, k, v))  # (b, h, s, d)
    kd = kd.repeat_interleave(heads // heads_kv, dim=1)
    vd = vd.repeat_interleave(heads // heads_kv, dim=1)
    s = (qd @ kd.transpose(-1, -2)) * scale
    s = s.masked_fill(~vis.to(s.device), NEG_INF)
    lse = torch.logsumexp(s, dim=-1)
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    p = torch.exp(s - safe.unsqueeze(-1))
    return (p @ vd).transpose(1, 2), lse


def reference(q, k, v, dout, vis, scale, dtype):
    """(out, lse, dq, dk, dv) of `attention` in `dtype`, on the CPU, returned as float64."""
    leaves = [t.detach().cpu().to(dtype).requires_grad_() for t in (q, k, v)]
    out, lse = attention(*leaves, vis, scale, dtype)
    grads = torch.autograd.grad(out, leaves, dout.detach().cpu().to(dtype))
    return tuple(t.detach().double() for t in (out, lse, *grads))


def random_inputs(seed, batch, sq, sk, heads, heads_kv, headdim, dtype):
    """q, dout (batch, sq, heads, headdim) and k, v (batch, sk, heads_kv, headdim): standard
    normal values drawn in float64 and rounded to `dtype`, on the CPU."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(batch, sq, heads, headdim), (batch, sk, heads_kv, headdim),
              (batch, sk, heads_kv, headdim), (batch, sq, heads, headdim)]
    return [torch.randn(*s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]


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


def acc_zeros(t, device, fill=0.0):
    return torch.full(t.shape, fill, dtype=torch.float32, device=device)


def block_fwd(device, q, blocks, c, scale, merge=True):
    """block_fwd of each (k, v, k_pos) in `blocks` into one running state on `device`; returns
    (out_acc, lse) as float32 CPU tensors. merge=False uses the CUDA-only _cuda_block_fwd."""
    b, sq, h, _ = q.shape
    qd = q.to(device)
    out = acc_zeros(q, device)
    lse = torch.full((b, h, sq), NEG_INF, dtype=torch.float32, device=device)
    mask = dict(q_pos=c["q_pos"].to(device),
                q_seg=None if c["q_seg"] is None else c["q_seg"].to(device),
                causal=c["causal"], window_left=c["window_left"], window_right=c["window_right"],
                softmax_scale=scale)
    for k, v, k_pos in blocks:
        args = dict(q=qd, k=k.to(device), v=v.to(device), k_pos=k_pos.to(device), out_acc=out,
                    lse=lse, **mask)
        if merge:
            ra.ops.block_fwd(**args)
        else:
            torch.ops.ring_attention._cuda_block_fwd(**args, merge=False)
    return out.cpu(), lse.cpu()


def block_bwd(device, dout, q, k, v, c, out, lse, scale, init=None, deterministic=False):
    """block_bwd on `device` into accumulators holding `init` (default zeros); returns (dq, dk, dv)
    minus `init`, float32 CPU tensors. delta = rowsum(dout * out) as the ring computes it."""
    delta = (dout.float() * out.float()).sum(-1).transpose(1, 2).contiguous()
    init = init or [torch.zeros(t.shape, dtype=torch.float32) for t in (q, k, v)]
    acc = [t.clone().to(device) for t in init]
    ra.ops.block_bwd(dout=dout.to(device), q=q.to(device), k=k.to(device), v=v.to(device),
                     q_pos=c["q_pos"].to(device), k_pos=c["k_pos"].to(device),
                     q_seg=None if c["q_seg"] is None else c["q_seg"].to(device),
                     lse=lse.to(device), delta=delta.to(device), dq_acc=acc[0], dk_acc=acc[1],
                     dv_acc=acc[2], causal=c["causal"], window_left=c["window_left"],
                     window_right=c["window_right"], softmax_scale=scale,
                     deterministic=deterministic)
    return [a.cpu() - i for a, i in zip(acc, init)]


def block_case(seed, batch, sq, sk, heads, heads_kv, headdim, mask, dtype, scale):
    """A block case: random (q, k, v, dout), its mask case and the float64 and same-precision
    references (FA rule) -> (q, k, v, dout, c, ref, low)."""
    q, k, v, dout = random_inputs(seed, batch, sq, sk, heads, heads_kv, headdim, dtype)
    c = mask_case(mask, sq, sk, seed)
    vis = visible(c)
    return (q, k, v, dout, c, reference(q, k, v, dout, vis, scale, torch.float64),
            reference(q, k, v, dout, vis, scale, dtype))


def check_block(device, dtype, sq, sk, heads, heads_kv, headdim, mask, batch=2, scale=0.3):
    """Forward and backward of one block pair against the float64 reference (FA rule), including
    rows that see nothing (out exactly 0, lse -inf, no NaN)."""
    seed = seed_of(sq, sk, heads, heads_kv, headdim, mask, str(dtype))
    q, k, v, dout, c, ref, low = block_case(seed, batch, sq, sk, heads, heads_kv, headdim, mask,
                                            dtype, scale)
    out, lse = block_fwd(device, q, [(k, v, c["k_pos"])], c, scale)
    assert_fa_rule("out", out, ref[0], low[0], dtype)
    assert_fa_rule("lse", lse, ref[1], low[1], dtype)
    masked = torch.isinf(ref[1])  # (b, h, sq)
    assert torch.all(out.transpose(1, 2)[masked] == 0)

    grads = block_bwd(device, dout, q, k, v, c, out, lse, scale)
    for name, got, r, lo in zip(("dq", "dk", "dv"), grads, ref[2:], low[2:]):
        assert_fa_rule(name, got, r, lo, dtype)


def check_deterministic_bwd(device, dtype, mask, heads=4, heads_kv=2):
    """block_bwd(deterministic=True) (CUDA: no atomics) meets the float64 reference and gives the
    same bits on every run, also when adding into accumulators that already hold values."""
    sq, sk, headdim, scale = 150, 200, 64, 0.3
    seed = seed_of("deterministic", mask, heads, heads_kv, str(dtype))
    q, k, v, dout, c, ref, low = block_case(seed, 2, sq, sk, heads, heads_kv, headdim, mask, dtype,
                                            scale)
    out, lse = block_fwd(device, q, [(k, v, c["k_pos"])], c, scale)
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(t.shape, generator=gen) for t in (q, k, v)]
    runs = [block_bwd(device, dout, q, k, v, c, out, lse, scale, init=init, deterministic=True)
            for _ in range(3)]
    for name, got, r, lo in zip(("dq", "dk", "dv"), runs[0], ref[2:], low[2:]):
        assert_fa_rule(name, got, r, lo, dtype)
    for run in runs[1:]:
        for name, a, b in zip(("dq", "dk", "dv"), runs[0], run):
            assert torch.equal(a, b), f"{name} differs between deterministic runs"


def check_merge_order(device, dtype, mask):
    """block_fwd over two key blocks (either order) equals attention over their concatenation."""
    sq, sk1, sk2, scale = 37, 20, 45, 0.25
    q, k, v, _, c, ref, low = block_case(seed_of("merge", mask, str(dtype)), 2, sq, sk1 + sk2, 4, 2,
                                         64, mask, dtype, scale)
    first = (k[:, :sk1], v[:, :sk1], c["k_pos"][:sk1])
    second = (k[:, sk1:], v[:, sk1:], c["k_pos"][sk1:])
    far = (k[:, :sk1], v[:, :sk1], c["k_pos"][:sk1] + 10 ** 6)  # seen by no query when causal
    orders = [[first, second], [second, first]]
    if c["causal"]:
        orders.append([far, second, far, first, far])
    for blocks in orders:
        out, lse = block_fwd(device, q, blocks, c, scale)
        assert_fa_rule("out", out, ref[0], low[0], dtype)
        assert_fa_rule("lse", lse, ref[1], low[1], dtype)


def check_bwd_accumulates(device, dtype, mask):
    """block_bwd adds into accumulators that already hold values; with the final lse the key
    blocks are independent: dq sums over them, dk/dv are each block's slice."""
    sq, sk1, sk2, scale = 33, 16, 57, 0.2
    seed = seed_of("bwd-acc", mask, str(dtype))
    q, k, v, dout, c, ref, low = block_case(seed, 2, sq, sk1 + sk2, 4, 1, 64, mask, dtype, scale)
    out, lse = block_fwd(device, q, [(k, v, c["k_pos"])], c, scale)
    g = torch.Generator().manual_seed(seed)
    dq_total = torch.zeros(q.shape, dtype=torch.float32)
    for lo, hi in ((0, sk1), (sk1, sk1 + sk2)):
        part = dict(c, k_pos=c["k_pos"][lo:hi])
        init = [torch.randn(*t.shape, generator=g) for t in (q, k[:, lo:hi], v[:, lo:hi])]
        dq, dk, dv = block_bwd(device, dout, q, k[:, lo:hi], v[:, lo:hi], part, out, lse, scale,
                               init)
        dq_total += dq
        assert_fa_rule("dk", dk, ref[3][:, lo:hi], low[3][:, lo:hi], dtype)
        assert_fa_rule("dv", dv, ref[4][:, lo:hi], low[4][:, lo:hi], dtype)
    assert_fa_rule("dq", dq_total, ref[2], low[2], dtype)


def merge_errors(device, dtype, nblocks=8, seeds=(0, 1, 2), sq=256, block_keys=128, headdim=64):
    """Mean |out - ref| for the keys in one block and for the same keys in `nblocks` merged
    blocks, summed over `seeds`: (err_one, err_merged)."""
    err_one = err_merged = 0.0
    sk = nblocks * block_keys
    for seed in seeds:
        q, k, v, _ = random_inputs(seed_of("merges", seed), 1, sq, sk, 4, 2, headdim, dtype)
        c = mask_case("none", sq, sk, seed)
        ref = reference(q, k, v, q, visible(c), headdim ** -0.5, torch.float64)[0]
        one, _ = block_fwd(device, q, [(k, v, c["k_pos"])], c, headdim ** -0.5)
        blocks = [(k[:, i * block_keys:(i + 1) * block_keys], v[:, i * block_keys:(i + 1) * block_keys],
                   c["k_pos"][i * block_keys:(i + 1) * block_keys]) for i in range(nblocks)]
        merged, _ = block_fwd(device, q, blocks, c, headdim ** -0.5)
        err_one += (one.double() - ref).abs().mean().item()
        err_merged += (merged.double() - ref).abs().mean().item()
    return err_one, err_merged


def check_ring(device, dtype, world, layout, causal, window=(-1, -1), heads=4, heads_kv=2,
               headdim=64, local_len=96, batch=2, deterministic=False):
    """The ring (world 1: ring_attn_func; else LocalRing's virtual ranks on `device`) forward and
    backward against the float64 reference of the full sequence (FA rule). With `deterministic`,
    the backward runs twice and must give the same bits."""
    seqlen = world * local_len
    seed = seed_of("ring", world, layout, causal, window, heads, heads_kv, headdim, str(dtype))
    q, k, v, dout = random_inputs(seed, batch, seqlen, seqlen, heads, heads_kv, headdim, dtype)
    c = mask_case("diagonal" if causal else "none", seqlen, seqlen, seed)
    c["window_left"], c["window_right"] = window
    vis = visible(c)
    scale = headdim ** -0.5
    ref = reference(q, k, v, dout, vis, scale, torch.float64)
    low = reference(q, k, v, dout, vis, scale, dtype)

    leaves = [t.to(device).requires_grad_() for t in (q, k, v)]
    kw = dict(causal=causal, window_size=window, layout=layout, return_lse=True,
              deterministic=deterministic)
    if world == 1:
        out, lse = ra.ring_attn_func(*leaves, **kw)
    else:
        from ring_attention.testing import LocalRing
        ring = LocalRing(world, device=device)
        shards = [ring.shard(t, layout=layout) for t in leaves]
        outs, lses = ring.ring_attn_func(*shards, **kw)
        out = ring.unshard(outs, layout=layout)
        lse = ring.unshard(lses, layout=layout, dim=2)
    grads = torch.autograd.grad(out, leaves, dout.to(device), retain_graph=deterministic)
    if deterministic:
        again = torch.autograd.grad(out, leaves, dout.to(device))
        for name, a, b in zip(("dq", "dk", "dv"), grads, again):
            assert torch.equal(a, b), f"world {world} {layout}: {name} differs between runs"
    assert out.dtype == dtype and lse.dtype == torch.float32
    for name, got, r, lo in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads), ref, low):
        assert_fa_rule(f"world {world} {layout} {name}", got, r, lo, dtype)


def check_varlen_ring(device, dtype, world, layout, causal, window=(-1, -1),
                      seqlens=(1, 7, 97, 40), heads=4, heads_kv=2, headdim=64):
    """Packed sequences (ring_attn_varlen_func at world 1; else LocalRing's virtual ranks on
    `device`) forward and backward against the float64 reference of the packed batch, in which no
    query sees a key of another sequence (FA rule). Pads of shard_varlen never surface."""
    cu = torch.tensor([0, *itertools.accumulate(seqlens)], dtype=torch.int32)
    total = int(cu[-1])
    seed = seed_of("varlen", world, layout, causal, window, seqlens, heads, heads_kv, str(dtype))
    q, k, v, dout = (t[0] for t in random_inputs(seed, 1, total, total, heads, heads_kv, headdim, dtype))
    sequence = torch.repeat_interleave(torch.arange(len(seqlens)), torch.tensor(seqlens))
    i = torch.arange(total)
    vis = sequence[:, None] == sequence[None, :]
    if causal:
        vis &= i[None, :] <= i[:, None]
    if window[0] >= 0:
        vis &= i[None, :] >= i[:, None] - window[0]
    if window[1] >= 0:
        vis &= i[None, :] <= i[:, None] + window[1]
    scale = headdim ** -0.5
    batched = [t.unsqueeze(0) for t in (q, k, v, dout)]
    ref = [t[0] for t in reference(*batched, vis, scale, torch.float64)]
    low = [t[0] for t in reference(*batched, vis, scale, dtype)]

    leaves = [t.to(device).requires_grad_() for t in (q, k, v)]
    kw = dict(causal=causal, window_size=window, layout=layout, return_lse=True)
    if world == 1:
        out, lse = ra.ring_attn_varlen_func(*leaves, cu, **kw)
    else:
        from ring_attention.testing import LocalRing
        ring = LocalRing(world, device=device)
        shards = [ring.shard_varlen(t, cu, layout=layout) for t in leaves]
        outs, lses = ring.ring_attn_varlen_func(*shards, cu, **kw)
        out = ring.unshard_varlen(outs, cu, layout=layout)
        lse = ring.unshard_varlen([x.transpose(0, 1) for x in lses], cu, layout=layout).transpose(0, 1)
    grads = torch.autograd.grad(out, leaves, dout.to(device))
    assert out.dtype == dtype and lse.dtype == torch.float32
    for name, got, r, lo in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads), ref, low):
        assert_fa_rule(f"varlen world {world} {layout} {name}", got, r, lo, dtype)


def check_graph_replay(device, dtype, world, layout="zigzag", local_len=48, heads=4, heads_kv=2,
                       headdim=64):
    """The ring's forward and deterministic backward (world 1: ring_attn_func; else LocalRing)
    captured once in a CUDA graph on "cuda" (called directly on "cpu", the twin), then replayed on
    fresh inputs copied into the captured ones: each replay gives the bits of an eager call."""
    from ring_attention.testing import LocalRing
    ring = LocalRing(world, device=device) if world > 1 else None
    gen = torch.Generator().manual_seed(seed_of("graph", world, layout, str(dtype)))

    def draw():  # per input: world shards of (1, local_len, heads(_kv), headdim)
        shape = lambda h: (1, local_len, h, headdim)  # noqa: E731
        return [[torch.randn(shape(h), generator=gen).to(device, dtype) for _ in range(world)]
                for h in (heads, heads_kv, heads_kv, heads)]

    def step(q, k, v, dout):
        leaves = q + k + v
        kw = dict(causal=True, layout=layout, deterministic=True)
        outs = ring.ring_attn_func(q, k, v, **kw) if ring else [ra.ring_attn_func(*leaves, **kw)]
        return [o.detach() for o in outs] + list(torch.autograd.grad(outs, leaves, dout))

    static = draw()
    leaves = [[t.clone().requires_grad_() for t in group] for group in static[:3]]
    run = lambda: step(*leaves, static[3])  # noqa: E731
    if device == "cuda":
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture stream, as CUDA graphs need
            run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = run()

        def replay():
            graph.replay()
            return captured
    else:
        replay = run
    for trial in range(2):
        fresh = draw()
        with torch.no_grad():
            for group, new in zip(leaves + [static[3]], fresh):
                for t, x in zip(group, new):
                    t.copy_(x)
        got = [t.clone() for t in replay()]
        want = step(*[[t.clone().requires_grad_() for t in group] for group in fresh[:3]], fresh[3])
        assert len(got) == len(want) == 4 * world
        for i, (a, b) in enumerate(zip(got, want)):
            assert torch.equal(a, b), f"world {world} trial {trial}: output {i} differs from eager"
