"""Peak memory per rank of each strategy, forward and backward, at two or more sequence lengths, on
CPU ranks over gloo (1 thread per rank).

Per rank and call: the growth of the resident set (VmHWM after a reset, minus VmRSS before) during
one forward, and during the backward that follows it, after a warm-up call of the same shape
(the kernels' per-thread scratch, which grows to the largest call and stays, is left out); the
median over --repeats calls, as one call's pages may already be resident. The ranks run
with MALLOC_MMAP_THRESHOLD_=65536 so that every buffer of 64 KiB or more is mapped on allocation
and unmapped on release: the resident set then follows the tensors alive, instead of hiding
buffers in heap memory freed by an earlier call. Peaks are given in MB and in K/V blocks
(KV = 2·b·L·hk·d·e bytes, the unit of the K/V buffers in docs/api.md "Strategies"), beside what
one rank's rows of the score matrix would take (h·L·S fp32). Ulysses runs over every rank
(U = world) around a ring of one. The script fails if a peak grows faster than the sequence (by
more than 25% over linear from the shortest length to the longest) or if a forward's peak reaches
its score rows.
"""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from benchmarks import harness as h  # noqa: E402

STRATEGIES = ("ring", "allgather", "ulysses")
MMAP_THRESHOLD = "65536"


def _peaks(q, k, v, dout, kw):
    """(forward peak, resident after the forward, backward peak) growth in bytes of one call."""
    import ring_attention as ra
    dist.barrier()
    base = h.rss_bytes()
    h.reset_peak_rss()
    out = ra.ring_attn_func(q, k, v, **kw)
    forward = h.peak_rss_bytes() - base
    kept = h.rss_bytes() - base
    dist.barrier()
    base = h.rss_bytes()
    h.reset_peak_rss()
    out.backward(dout)
    backward = h.peak_rss_bytes() - base
    q.grad = k.grad = v.grad = None
    return forward, kept, backward


def _rank(rank, world, seqlens, heads, heads_kv, headdim, repeats):
    import ring_attention as ra
    single = dist.new_subgroups(1)[0]  # Ulysses' ring of one rank
    kwargs = {"ring": {}, "allgather": {"kv_exchange": "allgather"},
              "ulysses": {"ulysses_group": dist.group.WORLD, "group": single}}
    results = {}
    for seqlen in seqlens:
        gen = torch.Generator().manual_seed(seqlen)
        local = seqlen // world
        q = torch.randn(1, local, heads, headdim, generator=gen).requires_grad_()
        k, v = (torch.randn(1, local, heads_kv, headdim, generator=gen).requires_grad_() for _ in range(2))
        dout = torch.randn(1, local, heads, headdim, generator=gen)
        for name in STRATEGIES:
            kw = dict(causal=True, layout="zigzag", **kwargs[name])
            ra.ring_attn_func(q, k, v, **kw).backward(dout)  # first-call costs are not the call's
            calls = [_peaks(q, k, v, dout, kw) for _ in range(repeats)]
            results[(name, seqlen)] = tuple(sorted(c[i] for c in calls)[repeats // 2]
                                            for i in range(3))
    return results


def main(argv=None) -> int:
    p = h.parser(__doc__, json_default="bench_out/memory.json")
    p.add_argument("--world", type=h.positive_int, default=2, help="ranks")
    p.add_argument("--seqlens", type=h.positive_ints, default=[8192, 16384],
                   help="tokens of the whole sequence, comma-separated")
    p.add_argument("--heads", type=h.positive_int, default=8)
    p.add_argument("--heads-kv", type=h.positive_int, default=8)
    p.add_argument("--headdim", type=h.positive_int, default=64)
    p.add_argument("--repeats", type=h.positive_int, default=3,
                   help="measured calls per strategy and length (their median is reported)")
    args = p.parse_args(argv)
    for seqlen in args.seqlens:
        if seqlen % (2 * args.world) or seqlen // args.world < 8:
            p.error(f"--seqlens {seqlen} is not divisible by 2 x world ({2 * args.world}) into "
                    "shards of 8 tokens or more")
    if args.heads % args.heads_kv or args.heads % args.world:
        p.error(f"--heads {args.heads} must divide by --heads-kv {args.heads_kv} and by world "
                f"{args.world} (Ulysses)")
    h.set_fp32_precision(args)
    os.environ["MALLOC_MMAP_THRESHOLD_"] = MMAP_THRESHOLD  # read by the spawned ranks' malloc

    res = h.run_ranks(args.world, _rank, args.seqlens, args.heads, args.heads_kv, args.headdim,
                      args.repeats)
    mb = 2 ** 20
    rows, failures = [], []
    for name in STRATEGIES:
        for seqlen in args.seqlens:
            local = seqlen // args.world
            kv = 2 * local * args.heads_kv * args.headdim * 4
            scores = args.heads * local * seqlen * 4
            forward, kept, backward = (max(r[(name, seqlen)][i] for r in res) for i in range(3))
            rows.append({"strategy": name, "tokens": seqlen, "KV MB": f"{kv / mb:.1f}",
                         "fwd peak MB": f"{forward / mb:.1f}", "fwd peak / KV": f"{forward / kv:.2f}",
                         "kept after fwd MB": f"{kept / mb:.1f}",
                         "bwd peak MB": f"{backward / mb:.1f}", "bwd peak / KV": f"{backward / kv:.2f}",
                         "score rows MB": f"{scores / mb:,.0f}"})
            if forward >= scores:
                failures.append(f"{name} at {seqlen} tokens: forward peak {forward / mb:.1f} MB "
                                f"reaches the score rows ({scores / mb:.1f} MB)")
        first, last = min(args.seqlens), max(args.seqlens)
        for phase, i in (("forward", 0), ("backward", 2)):
            grown = max(r[(name, last)][i] for r in res) / max(max(r[(name, first)][i] for r in res), 1)
            if grown > 1.25 * last / first:
                failures.append(f"{name} {phase} peak grew {grown:.2f}x from {first} to {last} tokens "
                                f"(linear: {last / first:.2f}x)")

    print(f"\nPeak memory growth per rank (the largest over ranks), {args.world} ranks, causal zigzag, "
          f"batch 1, {args.heads} heads ({args.heads_kv} K/V), dim {args.headdim}, fp32, "
          f"1 thread per rank; Ulysses over all {args.world} ranks")
    h.print_table(rows, list(rows[0].keys()))
    h.write_json(args.json, {"machine": h.machine(), "args": vars(args), "rows": rows,
                             "failures": failures})
    if failures:
        raise SystemExit("memory check failed:\n  " + "\n  ".join(failures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
