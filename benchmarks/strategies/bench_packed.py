"""Packed documents: the `packed` layout against `zigzag` per document and against one device per
document, causal, on CPU ranks over gloo (1 thread per rank) or as the virtual ranks of one
LocalRing on one GPU.

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
the documents of up to 2048 tokens (within 1e-4 in float32).

--local-ring DEVICE runs each world size as `world` virtual ranks of one LocalRing on DEVICE in
this process instead (per-document: each virtual rank's documents as a LocalRing of one rank):
    python benchmarks/strategies/bench_packed.py --local-ring cuda
The virtual ranks run in turn, so a time is the whole batch's on the one device (on CUDA
synchronized before each call and at its end). Bytes and blocks are summed over the virtual
ranks as over gloo ranks (LocalRing's last_ring_stats() sums them), and the checks are the same.
The CUDA kernels take bfloat16 and float16 only: on cuda --dtype defaults to bfloat16 (check
tolerance 5e-2; float16 1e-2). --local-ring cpu runs the same on one CPU thread. With DEVICE cuda
and no GPU the script exits with status 2.
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
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


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


def full_inputs(lengths, heads, headdim, dtype=torch.float32):
    """q, k, v, dout of the packed batch: (tokens, heads, headdim) in `dtype`, on the CPU."""
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(sum(lengths), heads, headdim, generator=gen).to(dtype) for _ in range(4)]


def cu_of(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def _rank(rank, world, lengths, heads, headdim, iters, warmup, dtype):
    import ring_attention as ra
    q, k, v, dout = full_inputs(lengths, heads, headdim, dtype)
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


def _summed(per_part):
    """The ring counts of several ranks (or rings): steps the most, blocks and bytes the sum."""
    return {"steps": max(s["steps"] for s in per_part),
            "blocks_computed": sum(s["blocks_computed"] for s in per_part),
            "bytes_sent": sum(s["bytes_sent"] for s in per_part)}


def _gloo(world, lengths, args):
    """Every variant on `world` spawned gloo ranks: {"times": (variant, phase) -> the slowest
    rank's median, "stats": (variant, phase) -> counts summed over ranks, "docs": every rank's
    documents, "outs": packed and zigzag outputs in global order, per-document every rank's}."""
    res = h.run_ranks(world, _rank, lengths, args.heads, args.headdim, args.iters, args.warmup,
                      h.DTYPES[args.dtype])
    return {"times": {key: max(r["times"][key] for r in res) for key in res[0]["times"]},
            "stats": {key: _summed([r["stats"][key] for r in res]) for key in res[0]["stats"]},
            "docs": [r["docs"] for r in res],
            "outs": {**{layout: res[0]["outs"][layout] for layout in ("packed", "zigzag")},
                     "per-document": [r["outs"]["per-document"] for r in res]}}


def _local_ring(world, lengths, args, device, sync):
    """Every variant on `world` virtual ranks of one LocalRing on `device`, as _gloo returns them,
    with times of the whole batch on the device (all virtual ranks in turn)."""
    import ring_attention as ra
    from ring_attention.testing import LocalRing
    q, k, v, dout = (t.to(device) for t in full_inputs(lengths, args.heads, args.headdim,
                                                        h.DTYPES[args.dtype]))
    cu = cu_of(lengths)
    ring, single = LocalRing(world, str(device)), LocalRing(1, str(device))
    docs = deal(lengths, world)
    # variant -> its rings: (LocalRing, [qs, ks, vs, douts], cu_seqlens, layout)
    setups = {layout: [(ring, [ring.shard_varlen(t, cu, layout=layout) for t in (q, k, v, dout)],
                        cu, layout)] for layout in ("packed", "zigzag")}
    setups["per-document"] = []
    for mine in docs:
        spans = [(int(cu[i]), int(cu[i + 1])) for i in mine]
        own = [[torch.cat([t[a:b] for a, b in spans])] for t in (q, k, v, dout)]
        setups["per-document"].append((single, own, cu_of([b - a for a, b in spans]), "contiguous"))

    fns, stats, outs = {}, {}, {}
    for name, rings in setups.items():
        leaves = [[[t.clone().requires_grad_() for t in shards] for shards in local[:3]]
                  for _, local, _, _ in rings]

        def fwd(rings=rings, leaves=leaves):
            with torch.no_grad():
                return [r.ring_attn_varlen_func(*qkv, c, causal=True, layout=layout)
                        for (r, _, c, layout), qkv in zip(rings, leaves)]

        def fwd_bwd(rings=rings, leaves=leaves):
            for (r, local, c, layout), qkv in zip(rings, leaves):
                torch.autograd.backward(r.ring_attn_varlen_func(*qkv, c, causal=True, layout=layout),
                                        local[3])

        fns[(name, "fwd")], fns[(name, "fwd+bwd")] = fwd, fwd_bwd
        counted = {"fwd": [], "bwd": []}
        outs[name] = []
        for (r, local, c, layout), qkv in zip(rings, leaves):  # one call of each ring, counted
            got = r.ring_attn_varlen_func(*qkv, c, causal=True, layout=layout)
            counted["fwd"].append(ra.last_ring_stats())
            torch.autograd.backward(got, local[3])
            counted["bwd"].append(ra.last_ring_stats())
            outs[name].append([t.detach() for t in got])
        for phase, per_ring in counted.items():
            stats[(name, phase)] = _summed(per_ring)
    times = h.median_times_synced(fns, args.iters, args.warmup, sync)
    return {"times": times, "stats": stats, "docs": docs,
            "outs": {**{layout: ring.unshard_varlen(outs[layout][0], cu, layout=layout).cpu()
                        for layout in ("packed", "zigzag")},
                     "per-document": [got[0].cpu() for got in outs["per-document"]]}}


def check(lengths, heads, headdim, res, dtype=torch.float32) -> float:
    """Max |difference| between the variants on every token and against float64 (of the inputs
    in `dtype`) on the documents of up to CHECKED_LEN tokens."""
    from ring_attention.reference import attention_reference
    q, k, v, _ = full_inputs(lengths, heads, headdim, dtype)
    cu = cu_of(lengths).tolist()
    per_doc = torch.empty_like(q)
    for mine, got in zip(res["docs"], res["outs"]["per-document"]):
        offset = 0
        for i in mine:
            n = lengths[i]
            per_doc[cu[i]:cu[i + 1]] = got[offset:offset + n]
            offset += n
    err = max((res["outs"][layout] - per_doc).abs().max().item() for layout in ("packed", "zigzag"))
    for i, n in enumerate(lengths):
        if n <= CHECKED_LEN:
            a, b = cu[i], cu[i + 1]
            ref, _ = attention_reference(*(t[a:b].double().unsqueeze(0) for t in (q, k, v)), causal=True)
            err = max(err, (per_doc[a:b].double() - ref[0]).abs().max().item())
    return err


def rows_of(world, res, device="gloo cpu"):
    rows = []
    for name in VARIANTS:
        fwd, bwd = res["stats"][(name, "fwd")], res["stats"][(name, "bwd")]
        fwd_mb, bwd_mb = fwd["bytes_sent"] / 1e6, bwd["bytes_sent"] / 1e6
        rows.append({
            "world": world, "variant": name, "device": device,
            "fwd ms": f"{res['times'][(name, 'fwd')] * 1e3:.1f}",
            "fwd+bwd ms": f"{res['times'][(name, 'fwd+bwd')] * 1e3:.1f}",
            "steps": fwd["steps"],
            "fwd blocks": fwd["blocks_computed"],
            "fwd MB sent": f"{fwd_mb:.2f}",
            "fwd+bwd MB sent": f"{fwd_mb + bwd_mb:.2f}",
        })
    return rows


def main(argv=None) -> int:
    p = h.parser(__doc__, json_default="bench_out/packed.json", iters=3)
    p.add_argument("--worlds", type=h.positive_ints, default=[2, 4], help="comma-separated world sizes")
    p.add_argument("--total", type=h.positive_int, default=16384, help="tokens in the packed batch")
    p.add_argument("--min-len", type=h.positive_int, default=128)
    p.add_argument("--max-len", type=h.positive_int, default=8192)
    p.add_argument("--heads", type=h.positive_int, default=2)
    p.add_argument("--headdim", type=h.positive_int, default=64)
    p.add_argument("--seed", type=int, default=0, help="seed of the document lengths")
    h.add_local_ring_args(p)
    args = p.parse_args(argv)
    if args.min_len > args.max_len:
        p.error(f"--min-len {args.min_len} is above --max-len {args.max_len}")
    device, sync = h.local_ring_setup(p, args)
    h.set_fp32_precision(args)
    where = h.device_record(device)
    lengths = long_tailed_lengths(args.total, args.min_len, args.max_len, args.seed)
    if len(lengths) < max(args.worlds):
        p.error(f"{len(lengths)} documents cannot give every one of {max(args.worlds)} ranks one")

    rows, err = [], 0.0
    start = h.cpu_snapshot()
    for world in args.worlds:
        res = (_gloo(world, lengths, args) if device is None
               else _local_ring(world, lengths, args, device, sync))
        err = max(err, check(lengths, args.heads, args.headdim, res, h.DTYPES[args.dtype]))
        rows += rows_of(world, res, where["device"])
    load = h.foreign_load(start, h.cpu_snapshot())
    tol = TOL[h.DTYPES[args.dtype]]
    if err > tol:
        raise SystemExit(f"the variants' outputs differ from each other or from float64 by {err:.2e}")

    short = sum(n <= 512 for n in lengths)
    timing = ("1 thread per rank (slowest rank, median of {}, interleaved)" if device is None else
              f"LocalRing on {device}, {torch.get_num_threads()} CPU threads (all virtual ranks in "
              "turn, median of {}, interleaved)").format(args.iters)
    print(f"\n{len(lengths)} causal documents, {args.total} tokens (lengths {min(lengths)}..{max(lengths)}, "
          f"{short} of at most 512), {args.heads} heads, dim {args.headdim}, {args.dtype}, {timing}; "
          f"MB sent and blocks summed over ranks; other programs kept {load:.1f} cores busy")
    h.print_table(rows, list(rows[0].keys()))
    print(f"max |err| between variants and vs float64: {err:.1e} (check within {tol:g}: ok)")
    h.write_json(args.json, {"machine": h.machine(), **where,
                             "args": {**vars(args), "local_ring": None if device is None else str(device)},
                             "lengths": lengths, "rows": rows, "max_abs_err": err,
                             "foreign_load_cores": load})
    return 0


if __name__ == "__main__":
    sys.exit(main())
