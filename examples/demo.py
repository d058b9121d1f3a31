"""The main job: `make demo` (python examples/demo.py).

4 CPU ranks over gloo run a 32K-token causal zigzag ring attention forward and backward, and rank 0
checks the result against single-process attention (ATen SDPA on the full sequence).
"""
import argparse
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import harness as h  # noqa: E402  (free ports, memory probes)
import ring_attention as ra  # noqa: E402  (before init_process_group: docs/design.md, at exit)


def _inputs(args):
    gen = torch.Generator().manual_seed(args.seed)
    shape_q = (args.batch, args.seqlen, args.heads, args.headdim)
    shape_kv = (args.batch, args.seqlen, args.kv_heads, args.headdim)
    q = torch.randn(shape_q, generator=gen)
    k = torch.randn(shape_kv, generator=gen)
    v = torch.randn(shape_kv, generator=gen)
    dout = torch.randn(shape_q, generator=gen)
    return q, k, v, dout


def _single_process(q, k, v, dout, causal):
    """Full-sequence attention with ATen SDPA; GQA by repeating K/V (autograd sums them back)."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    groups = q.shape[2] // k.shape[2]
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k.repeat_interleave(groups, 2), v.repeat_interleave(groups, 2)))
    out = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal).transpose(1, 2)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


def _worker(rank, world, port, args, results):
    os.environ.setdefault("RING_ATTN_TIMEOUT", "600")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)

    q, k, v, dout = _inputs(args)
    ql, kl, vl = (ra.shard(t, layout=args.layout).contiguous().requires_grad_() for t in (q, k, v))
    dl = ra.shard(dout, layout=args.layout).contiguous()

    # Warm-up on a tiny slice, called as the timed call is: first-call costs (thread pools, BLAS
    # buffers, what torch imports for a backward with a given gradient) are not the ring's.
    warm = ra.ring_attn_func(ql[:, :2], kl[:, :2], vl[:, :2], causal=args.causal, layout=args.layout)
    warm.backward(dl[:, :2])
    ql.grad = kl.grad = vl.grad = None
    dist.barrier()
    base = h.rss_bytes()
    h.reset_peak_rss()
    t0 = time.perf_counter()
    out = ra.ring_attn_func(ql, kl, vl, causal=args.causal, layout=args.layout)
    t1 = time.perf_counter()
    out.backward(dl)
    t2 = time.perf_counter()
    peak = h.peak_rss_bytes() - base
    results[rank] = (ql.shape[1], t1 - t0, t2 - t1, peak)

    full = [ra.unshard(t, layout=args.layout) for t in (out.detach(), ql.grad, kl.grad, vl.grad)]
    dist.barrier()
    if rank == 0:
        torch.set_num_threads(max(1, os.cpu_count() or 1))
        t3 = time.perf_counter()
        ref = _single_process(q, k, v, dout, args.causal)
        results["ref_s"] = time.perf_counter() - t3
        results["errors"] = [(a - b).abs().max().item() for a, b in zip(full, ref)]
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=h.positive_int, default=4)
    p.add_argument("--seqlen", type=h.positive_int, default=32768)
    p.add_argument("--batch", type=h.positive_int, default=1)
    p.add_argument("--heads", type=h.positive_int, default=4)
    p.add_argument("--kv-heads", type=h.positive_int, default=2)
    p.add_argument("--headdim", type=h.positive_int, default=64)
    p.add_argument("--layout", default="zigzag", choices=("contiguous", "zigzag", "striped", "packed"))
    p.add_argument("--no-causal", dest="causal", action="store_false")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tolerance", type=float, default=2e-4)
    args = p.parse_args(argv)
    parts = args.world * (2 if args.layout == "zigzag" else 1)
    if args.seqlen % parts:
        p.error(f"--seqlen {args.seqlen} is not divisible by {parts} (the {args.layout} shards of "
                f"{args.world} ranks)")
    if args.heads % args.kv_heads:
        p.error(f"--heads ({args.heads}) must be a multiple of --kv-heads ({args.kv_heads})")

    print(f"ring attention demo: {args.world} CPU ranks over gloo (1 thread each), {args.seqlen} tokens, "
          f"{'causal' if args.causal else 'non-causal'}, layout {args.layout}, batch {args.batch}, "
          f"{args.heads} heads ({args.kv_heads} K/V heads), head dim {args.headdim}, float32")
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(args.world, h.free_port(), args, results), nprocs=args.world)

    scores_mb = args.batch * args.heads * args.seqlen ** 2 * 4 / 2 ** 20
    print(f"\n{'rank':>4} {'tokens':>7} {'forward s':>10} {'backward s':>11} {'peak MB':>8}")
    for r in range(args.world):
        tokens, fwd, bwd, peak = results[r]
        print(f"{r:>4} {tokens:>7} {fwd:>10.2f} {bwd:>11.2f} {peak / 2 ** 20:>8.0f}")
    print(f"full attention score matrix (what a single device would materialise): {scores_mb:,.0f} MB")
    errors = results["errors"]
    print(f"single-process check (ATen SDPA, {results['ref_s']:.1f} s): max |error| "
          + ", ".join(f"{n} {e:.2e}" for n, e in zip(("out", "dq", "dk", "dv"), errors)))
    ok = max(errors) <= args.tolerance
    print("PASS" if ok else f"FAIL: error above {args.tolerance}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
