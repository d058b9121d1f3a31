"""Packed documents: the `packed` layout against `zigzag` per document and against one device per
document, causal, on CPU ranks over gloo (1 thread per rank).

Document lengths are drawn from a long-tailed distribution (Pareto, from --min-len to --max-len
tokens, most short) until --total tokens. Three ways to run the same packed batch:
  packed        ring_attn_varlen_func(layout="packed"): the stream split into world contiguous
                parts; short documents stay on one rank, the ring makes only the hops needed
  zigzag        ring_attn_varlen_func(layout="zigzag"): every document split over every rank
  per-document  every document whole on one rank (documents dealt to ranks by causal work, the
                largest first), attention over a one-rank group: no communication at all
A call's time is its slowest rank's (median of --iters, variants interleaved, a barrier before
each call). Bytes are those the ring sends (last_ring_stats: K/V messages in the input dtype,
dK/dV in float32), summed over ranks; blocks are the (rank, source) block pairs computed, summed over ranks. The
three outputs are checked against each other on every token and against a float64 reference on
the documents of up to 2048 tokens.
"""
import os
import random
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from benchmarks import harness as h  # noqa: E402

VARIANTS = ("packed", "zigzag", "per-document")
CHECKED_LEN = 2048


def long_tailed_lengths(total, min_len, max_len, seed):
    """Document lengths min_len * Pareto(1.2) clipped to max_len, drawn until `total` tokens (the
    last one cut to fit)."""
    rng = random.Random(seed)
    lengths = []
    while sum(lengths) < total:
        n = min(max_len, int(min_len * rng.paretovariate(1.2)))
        lengths.append(min(n, total - sum(lengths)))
    return lengths


def deal(lengths, world):
    """Documents per rank, the largest causal work (n^2) first to the least loaded rank."""
    load, docs = [0] * world, [[] for _ in range(world)]
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        r = min(range(world), key=lambda r: load[r])
        docs[r].append(i)
        load[r] += lengths[i] ** 2
    return [sorted(d) for d in docs]


def full_inputs(lengths, heads, headdim):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(sum(lengths), heads, headdim, generator=gen) for _ in range(4)]


def cu_of(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def _rank(rank, world, lengths, heads, headdim, iters, warmup):
    import ring_attention as ra
    q, k, v, dout = full_inputs(lengths, heads, headdim)
    cu = cu_of(lengths)
    singles = [dist.new_group([r]) for r in range(world)]  # every rank creates every group
    mine = deal(lengths, world)[rank]
    spans = [(int(cu[i]), int(cu[i + 1])) for i in mine]

    setups = {}
    for layout in ("packed", "zigzag"):
        local = [ra.shard_varlen(t, cu, layout=layout) for t in (q, k, v, dout)]
        setups[layout] = (local, cu, layout, None)
    own = [torch.cat([t[a:b] for a, b in spans]) for t in (q, k, v, dout)]
    setups["per-document"] = (own, cu_of([b - a for a, b in spans]), "contiguous", singles[rank])

    fns, stats, outs = {}, {}, {}
    for name, (local, local_cu, layout, group) in setups.items():
        leaves = [t.clone().requires_grad_() for t in local[:3]]

        def fwd(leaves=leaves, local_cu=local_cu, layout=layout, group=group):
            with torch.no_grad():
                return ra.ring_attn_varlen_func(*leaves, local_cu, causal=True, layout=layout, group=group)

        def fwd_bwd(leaves=leaves, local_cu=local_cu, layout=layout, group=group, dout=local[3]):
            ra.ring_attn_varlen_func(*leaves, local_cu, causal=True, layout=layout,
                                     group=group).backward(dout)

        fns[(name, "fwd")], fns[(name, "fwd+bwd")] = fwd, fwd_bwd
        outs[name] = fwd()
        stats[(name, "fwd")] = ra.last_ring_stats()
        fwd_bwd()
        stats[(name, "bwd")] = ra.last_ring_stats()  # the backward ring's counts
    times = h.median_times_interleaved(fns, iters, warmup, dist.barrier)
    gathered = {layout: ra.unshard_varlen(outs[layout], cu, layout=layout) for layout in ("packed", "zigzag")}
    return {"times": times, "stats": stats, "docs": mine,
            "outs": {**(gathered if rank == 0 else {}), "per-document": outs["per-document"]}}


def check(lengths, heads, headdim, res) -> float:
    """Max |difference| between the variants on every token and against float64 on the documents
    of up to CHECKED_LEN tokens."""
    from ring_attention.reference import attention_reference
    q, k, v, _ = full_inputs(lengths, heads, headdim)
    cu = cu_of(lengths).tolist()
    per_doc = torch.empty_like(q)
    for r in res:
        offset = 0
        for i in r["docs"]:
            n = lengths[i]
            per_doc[cu[i]:cu[i + 1]] = r["outs"]["per-document"][offset:offset + n]
            offset += n
    err = max((res[0]["outs"][layout] - per_doc).abs().max().item() for layout in ("packed", "zigzag"))
    for i, n in enumerate(lengths):
        if n <= CHECKED_LEN:
            a, b = cu[i], cu[i + 1]
            ref, _ = attention_reference(*(t[a:b].double().unsqueeze(0) for t in (q, k, v)), causal=True)
            err = max(err, (per_doc[a:b].double() - ref[0]).abs().max().item())
    return err


def rows_of(world, res):
    rows = []
    for name in VARIANTS:
        fwd_mb = sum(r["stats"][(name, "fwd")]["bytes_sent"] for r in res) / 1e6
        bwd_mb = sum(r["stats"][(name, "bwd")]["bytes_sent"] for r in res) / 1e6
        rows.append({
            "world": world, "variant": name,
            "fwd ms": f"{max(r['times'][(name, 'fwd')] for r in res) * 1e3:.1f}",
            "fwd+bwd ms": f"{max(r['times'][(name, 'fwd+bwd')] for r in res) * 1e3:.1f}",
            "steps": max(r["stats"][(name, "fwd")]["steps"] for r in res),
            "fwd blocks": sum(r["stats"][(name, "fwd")]["blocks_computed"] for r in res),
            "fwd MB sent": f"{fwd_mb:.2f}",
            "fwd+bwd MB sent": f"{fwd_mb + bwd_mb:.2f}",
        })
    return rows


def main(argv=None) -> int:
    p = h.parser(__doc__, json_default="bench_out/packed.json", iters=3)
    p.add_argument("--worlds", default="2,4", help="comma-separated world sizes")
    p.add_argument("--total", type=int, default=16384, help="tokens in the packed batch")
    p.add_argument("--min-len", type=int, default=128)
    p.add_argument("--max-len", type=int, default=8192)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--headdim", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="seed of the document lengths")
    args = p.parse_args(argv)
    h.set_fp32_precision(args)
    lengths = long_tailed_lengths(args.total, args.min_len, args.max_len, args.seed)
    worlds = [int(w) for w in args.worlds.split(",")]
    if len(lengths) < max(worlds):
        raise SystemExit(f"{len(lengths)} documents cannot give every one of {max(worlds)} ranks one")

    rows, err = [], 0.0
    start = h.cpu_snapshot()
    for world in worlds:
        res = h.run_ranks(world, _rank, lengths, args.heads, args.headdim, args.iters, args.warmup)
        err = max(err, check(lengths, args.heads, args.headdim, res))
        rows += rows_of(world, res)
    load = h.foreign_load(start, h.cpu_snapshot())
    if err > 1e-4:
        raise SystemExit(f"the variants' outputs differ from each other or from float64 by {err:.2e}")

    short = sum(n <= 512 for n in lengths)
    print(f"\n{len(lengths)} causal documents, {args.total} tokens (lengths {min(lengths)}..{max(lengths)}, "
          f"{short} of at most 512), {args.heads} heads, dim {args.headdim}, fp32, 1 thread per rank "
          f"(slowest rank, median of {args.iters}, interleaved); other programs kept {load:.1f} cores busy")
    h.print_table(rows, list(rows[0].keys()))
    print(f"max |err| between variants and vs float64: {err:.1e}")
    h.write_json(args.json, {"machine": h.machine(), "args": vars(args), "lengths": lengths, "rows": rows,
                             "max_abs_err": err, "foreign_load_cores": load})
    return 0


if __name__ == "__main__":
    sys.exit(main())
