"""Block-kernel and ring cases shared by the CUDA tests (tests/gpu) and their CPU twins
(tests/test_cuda_build.py): one case list, run on either device. The inputs, mask cases,
reference, tolerance rules (FlashAttention's for bf16/fp16) and the block checks they share with
the CPU tests come from tests/cases.py.

Precision over merges: the mean error after merging 8 key blocks into one running state is at most
1.2x the mean error of the same keys in one block (fixed seeds).
"""
import torch

import ring_attention as ra
from cases import (MASKS, assert_fa_rule, block_bwd, block_case, block_fwd,  # noqa: F401
                   check_block, check_bwd_accumulates, check_merge_order, mask_case, random_packed,
                   random_qkv, random_sinks, reference, seed_of, sequence_visible, strided, visible)

LENGTHS = [(1, 1), (7, 7), (97, 97), (128, 128), (1, 128), (128, 1), (7, 97), (97, 128), (128, 7),
           (200, 333)]
HEADDIMS = [32, 40, 64, 96, 128, 256]     # 40 runs padded in the 64 bucket on CUDA
GQA = [(1, 1), (2, 2), (4, 2), (4, 1)]    # (heads, heads_kv)


def check_deterministic_bwd(device, dtype, mask, heads=4, heads_kv=2, headdim=64):
    """block_bwd(deterministic=True) (CUDA: no atomics) meets the float64 reference and gives the
    same bits on every run, also when adding into accumulators that already hold values."""
    sq, sk, scale = 150, 200, 0.3
    seed = seed_of("deterministic", mask, heads, heads_kv, str(dtype))
    q, k, v, dout, case, ref, low = block_case(seed, 2, sq, sk, heads, heads_kv, headdim, mask,
                                               dtype, scale)
    out, lse = block_fwd(device, q, [(k, v, case["k_pos"])], case, scale)
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(t.shape, generator=gen) for t in (q, k, v)]
    runs = [block_bwd(device, dout, q, k, v, case, out, lse, scale, init=init, deterministic=True)
            for _ in range(3)]
    for name, got, r, lo in zip(("dq", "dk", "dv"), runs[0], ref[2:], low[2:]):
        assert_fa_rule(name, got, r, lo, dtype)
    for run in runs[1:]:
        for name, a, b in zip(("dq", "dk", "dv"), runs[0], run):
            assert torch.equal(a, b), f"{name} differs between deterministic runs"


def merge_errors(device, dtype, nblocks=8, seeds=(0, 1, 2), sq=256, block_keys=128, headdim=64):
    """Mean |out - ref| for the keys in one block and for the same keys in `nblocks` merged
    blocks, summed over `seeds`: (err_one, err_merged)."""
    err_one = err_merged = 0.0
    sk = nblocks * block_keys
    for seed in seeds:
        q, k, v, _ = random_qkv(seed_of("merges", seed), 1, sq, sk, 4, 2, headdim, dtype)
        case = mask_case("none", sq, sk, seed)
        ref = reference(q, k, v, q, visible(**case), headdim ** -0.5)[0]
        one, _ = block_fwd(device, q, [(k, v, case["k_pos"])], case, headdim ** -0.5)
        blocks = [(k[:, i * block_keys:(i + 1) * block_keys], v[:, i * block_keys:(i + 1) * block_keys],
                   case["k_pos"][i * block_keys:(i + 1) * block_keys]) for i in range(nblocks)]
        merged, _ = block_fwd(device, q, blocks, case, headdim ** -0.5)
        err_one += (one.double() - ref).abs().mean().item()
        err_merged += (merged.double() - ref).abs().mean().item()
    return err_one, err_merged


def check_ring(device, dtype, world, layout, causal, window=(-1, -1), heads=4, heads_kv=2,
               headdim=64, local_len=96, batch=2, deterministic=False, sinks=False):
    """The ring (world 1: ring_attn_func; else LocalRing's virtual ranks on `device`) forward and
    backward against the float64 reference of the full sequence (FA rule). With `deterministic`,
    the backward runs twice and must give the same bits; with `sinks`, attention sinks join the
    softmax and their gradient is checked too."""
    seqlen = world * local_len
    seed = seed_of("ring", world, layout, causal, window, heads, heads_kv, headdim, str(dtype))
    q, k, v, dout = random_qkv(seed, batch, seqlen, seqlen, heads, heads_kv, headdim, dtype)
    sink_logits = random_sinks(seed + 1, heads, dtype) if sinks else None
    seen = sequence_visible(seqlen, causal, window)
    scale = headdim ** -0.5
    ref = reference(q, k, v, dout, seen, scale, sinks=sink_logits)
    low = reference(q, k, v, dout, seen, scale, dtype, sinks=sink_logits)

    leaves = [t.to(device).requires_grad_() for t in (q, k, v)]
    if sinks:
        leaves.append(sink_logits.to(device).requires_grad_())
    kw = dict(causal=causal, window_size=window, layout=layout, return_lse=True,
              deterministic=deterministic, sinks=leaves[3] if sinks else None)
    if world == 1:
        out, lse = ra.ring_attn_func(*leaves[:3], **kw)
    else:
        from ring_attention.testing import LocalRing
        ring = LocalRing(world, device=device)
        shards = [ring.shard(t, layout=layout) for t in leaves[:3]]
        outs, lses = ring.ring_attn_func(*shards, **kw)
        out = ring.unshard(outs, layout=layout)
        lse = ring.unshard(lses, layout=layout, dim=2)
    grads = torch.autograd.grad(out, leaves, dout.to(device), retain_graph=deterministic)
    if deterministic:
        again = torch.autograd.grad(out, leaves, dout.to(device))
        for name, a, b in zip(("dq", "dk", "dv"), grads, again):
            assert torch.equal(a, b), f"world {world} {layout}: {name} differs between runs"
    assert out.dtype == dtype and lse.dtype == torch.float32
    for name, got, r, lo in zip(("out", "lse", "dq", "dk", "dv", "dsinks"), (out, lse, *grads), ref,
                                low):
        assert_fa_rule(f"world {world} {layout} {name}", got, r, lo, dtype)


def check_varlen_ring(device, dtype, world, layout, causal, window=(-1, -1),
                      seqlens=(1, 7, 97, 40), heads=4, heads_kv=2, headdim=64, sinks=False):
    """Packed sequences (ring_attn_varlen_func at world 1; else LocalRing's virtual ranks on
    `device`) forward and backward against the float64 reference of the packed batch, in which no
    query sees a key of another sequence (FA rule). Pads of shard_varlen never surface. `sinks`
    as for check_ring."""
    seed = seed_of("varlen", world, layout, causal, window, seqlens, heads, heads_kv, str(dtype))
    cu, q, k, v, dout = random_packed(seed, seqlens, heads, heads_kv, headdim, dtype)
    sink_logits = random_sinks(seed + 1, heads, dtype) if sinks else None
    seen = sequence_visible(seqlens, causal, window)
    scale = headdim ** -0.5
    ref = reference(q, k, v, dout, seen, scale, sinks=sink_logits)
    low = reference(q, k, v, dout, seen, scale, dtype, sinks=sink_logits)

    leaves = [t.to(device).requires_grad_() for t in (q, k, v)]
    if sinks:
        leaves.append(sink_logits.to(device).requires_grad_())
    kw = dict(causal=causal, window_size=window, layout=layout, return_lse=True,
              sinks=leaves[3] if sinks else None)
    if world == 1:
        out, lse = ra.ring_attn_varlen_func(*leaves[:3], cu, **kw)
    else:
        from ring_attention.testing import LocalRing
        ring = LocalRing(world, device=device)
        shards = [ring.shard_varlen(t, cu, layout=layout) for t in leaves[:3]]
        outs, lses = ring.ring_attn_varlen_func(*shards, cu, **kw)
        out = ring.unshard_varlen(outs, cu, layout=layout)
        lse = ring.unshard_varlen([x.transpose(0, 1) for x in lses], cu, layout=layout).transpose(0, 1)
    grads = torch.autograd.grad(out, leaves, dout.to(device))
    assert out.dtype == dtype and lse.dtype == torch.float32
    for name, got, r, lo in zip(("out", "lse", "dq", "dk", "dv", "dsinks"), (out, lse, *grads), ref,
                                low):
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
