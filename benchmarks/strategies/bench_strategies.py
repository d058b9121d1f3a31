"""The strategies of exchanging K/V side by side, on CPU ranks over gloo or as the virtual ranks
of one LocalRing on one GPU.

Strategies (ring_attention.ring_attn_func, causal, zigzag, float32 unless --dtype, 1 thread per
rank):
  ring              kv_exchange="ring" over all ranks
  allgather         kv_exchange="allgather" over all ranks
  ring + U2         ulysses_group of 2 ranks, the ring over world / 2
  allgather + U2    ulysses_group of 2 ranks, the all-gather over world / 2
  ulysses U<world>  (world 4) ulysses_group of all ranks, no K/V exchange (R = 1)

Each world size is one set of spawned ranks; every iteration runs each strategy once in turn
(forward then backward with a random output gradient), a barrier before each, so that load from
elsewhere on the machine hits them alike. A row is the slowest rank's median of --iters calls.
Same-work check: every strategy computes the same out, dq, dk and dv (max |a - ring| / max |ring|
within 1e-4 in float32, by global token) from the same attention blocks (the ring and the all-gather compute
the same number of blocks); the bytes each rank sent come from last_ring_stats() and the Ulysses
all-to-all count (MB sent / rank: the most any rank sent). A failed check marks the row FAIL and
the exit status is 1.

--local-ring DEVICE runs each world size as `world` virtual ranks of one LocalRing on DEVICE
(Ulysses strategies as LocalRing(world, DEVICE, ulysses_size=U)) in this process instead:
    python benchmarks/strategies/bench_strategies.py --local-ring cuda
The virtual ranks run in turn, so a row is the median time of the whole call on the one device
(on CUDA synchronized before each call and at its end). The CUDA kernels take bfloat16 and
float16 only: on cuda --dtype defaults to bfloat16 (same-work tolerance 2e-2; float16 4e-3). The
same-work check is the same; LocalRing's last_ring_stats() sums over its virtual ranks and its
all-to-all runs in memory (counted as the gloo ranks count it), so MB sent / rank (total / W) is
the bytes all ranks sent over W. --local-ring cpu runs the same on one CPU thread. With DEVICE
cuda and no GPU the script exits with status 2.
"""
import math
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from benchmarks import harness as h  # noqa: E402

TOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 2e-2}


def _strategies(world):
    """name -> (U, kv_exchange)"""
    names = {"ring": (1, "ring"), "allgather": (1, "allgather"), "ring + U2": (2, "ring"),
             "allgather + U2": (2, "allgather")}
    if world > 2:
        names[f"ulysses U{world}"] = (world, "ring")
    return names


def _grid(rank, world, ulysses):
    """(group, ulysses_group): consecutive ranks form a ulysses_group."""
    if ulysses == 1:
        return None, None
    rows = [list(range(r * ulysses, (r + 1) * ulysses)) for r in range(world // ulysses)]
    columns = [list(range(u, world, ulysses)) for u in range(ulysses)]
    ulysses_group, _ = dist.new_subgroups_by_enumeration(rows, backend="gloo")
    group, _ = dist.new_subgroups_by_enumeration(columns, backend="gloo")
    return group, ulysses_group


def _inputs(args):
    """q, dout (batch, seqlen, heads, headdim) and k, v (batch, seqlen, heads_kv, headdim) in
    --dtype, on the CPU: (q, k, v, dout)."""
    g = torch.Generator().manual_seed(0)
    shape = (args.batch, args.seqlen)
    q = torch.randn(*shape, args.heads, args.headdim, generator=g)
    k, v = (torch.randn(*shape, args.heads_kv, args.headdim, generator=g) for _ in range(2))
    dout = torch.randn(*shape, args.heads, args.headdim, generator=g)
    return [t.to(h.DTYPES[args.dtype]) for t in (q, k, v, dout)]


def _rank(rank, world, args):
    import ring_attention as ra
    from ring_attention.ulysses import all_to_all_bytes_sent
    q, k, v, dout = _inputs(args)
    calls, grids, results, sent = {}, {}, {}, {}
    for name, (ulysses, exchange) in _strategies(world).items():
        group, ulysses_group = _grid(rank, world, ulysses)
        grids[name] = dict(group=group, ulysses_group=ulysses_group, layout="zigzag")
        local = [ra.shard(t, **grids[name]).contiguous() for t in (q, k, v, dout)]

        def call(local=local, grid=grids[name], exchange=exchange):
            leaves = [t.clone().requires_grad_() for t in local[:3]]
            out = ra.ring_attn_func(*leaves, causal=True, kv_exchange=exchange, **grid)
            fwd = ra.last_ring_stats()
            grads = torch.autograd.grad(out, leaves, local[3])
            return out, grads, fwd, ra.last_ring_stats()

        calls[name] = call
    times = h.median_times_interleaved(calls, args.iters, args.warmup, sync=dist.barrier)
    for name, call in calls.items():  # one more call of each, counted and checked
        a2a = all_to_all_bytes_sent()
        out, grads, fwd, bwd = call()
        sent[name] = (fwd["bytes_sent"] + bwd["bytes_sent"] + all_to_all_bytes_sent() - a2a,
                      fwd["blocks_computed"] + bwd["blocks_computed"])
        results[name] = [ra.unshard(t.detach(), **grids[name]) for t in (out, *grads)]
    return {"times": times, "sent": dict(sent),
            "results": {n: [t for t in r] for n, r in results.items()} if rank == 0 else None}


def _gloo(world, args):
    """Every strategy on `world` spawned gloo ranks: name -> {"time": the slowest rank's median,
    "bytes": the most any rank sent, "blocks": blocks computed per rank, "results": out, dq, dk,
    dv in global order}."""
    per_rank = h.run_ranks(world, _rank, args)
    return {name: {"time": max(r["times"][name] for r in per_rank),
                   "bytes": max(r["sent"][name][0] for r in per_rank),
                   "blocks": [r["sent"][name][1] for r in per_rank],
                   "results": per_rank[0]["results"][name]} for name in _strategies(world)}


def _all_to_all_bytes(q, k, ulysses):
    """Bytes one rank's Ulysses all-to-alls send in a forward and backward (no lse), as
    all_to_all_bytes_sent() counts them over gloo: (U - 1) / U of q, k and v (K/V heads repeated
    to lcm(U, heads_kv)) and out forward, of dout, dq, dk and dv backward; q, k: the rank's shards."""
    if ulysses == 1:
        return 0
    repeat = ulysses // math.gcd(ulysses, k.shape[-2])
    return 4 * (q.nbytes // ulysses + repeat * k.nbytes // ulysses) * (ulysses - 1)


def _local_ring(world, args, device, sync):
    """Every strategy on `world` virtual ranks of one LocalRing on `device`: as _gloo, with "time"
    the median of the whole call, "bytes" the total over the virtual ranks / world and "blocks"
    the total."""
    import ring_attention as ra
    from ring_attention.testing import LocalRing
    full = [t.to(device) for t in _inputs(args)]
    calls, rings, shards = {}, {}, {}
    for name, (ulysses, exchange) in _strategies(world).items():
        rings[name] = LocalRing(world, str(device), ulysses_size=ulysses)
        shards[name] = [[s.contiguous() for s in rings[name].shard(t, layout="zigzag")] for t in full]

        def call(ring=rings[name], local=shards[name], exchange=exchange):
            leaves = [[s.clone().requires_grad_() for s in part] for part in local[:3]]
            outs = ring.ring_attn_func(*leaves, causal=True, layout="zigzag", kv_exchange=exchange)
            fwd = ra.last_ring_stats()
            grads = torch.autograd.grad(outs, [t for part in leaves for t in part], local[3])
            return outs, grads, fwd, ra.last_ring_stats()

        calls[name] = call
    times = h.median_times_synced(calls, args.iters, args.warmup, sync)
    strategies = {}
    for name, (ulysses, _) in _strategies(world).items():  # one more call of each, counted and checked
        outs, grads, fwd, bwd = calls[name]()
        # The U head chunks run as U rings of world / U ranks, alike; the stats hold the last one's.
        ring_bytes = ulysses * (fwd["bytes_sent"] + bwd["bytes_sent"])
        q, k = shards[name][0][0], shards[name][1][0]
        total = ring_bytes + world * _all_to_all_bytes(q, k, ulysses)
        parts = [outs] + [grads[i * world:(i + 1) * world] for i in range(3)]
        strategies[name] = {
            "time": times[name], "bytes": total / world,
            "blocks": ulysses * (fwd["blocks_computed"] + bwd["blocks_computed"]),
            "results": [rings[name].unshard([t.detach() for t in part], layout="zigzag").cpu() for part in parts]}
    return strategies


def main(argv=None) -> int:
    p = h.parser(__doc__, json_default="bench_out/strategies.json")
    p.add_argument("--worlds", type=h.positive_ints, default=[2, 4])
    p.add_argument("--seqlen", type=h.positive_int, default=2048)
    p.add_argument("--batch", type=h.positive_int, default=1)
    p.add_argument("--heads", type=h.positive_int, default=8)
    p.add_argument("--heads-kv", type=h.positive_int, default=2)
    p.add_argument("--headdim", type=h.positive_int, default=64)
    h.add_local_ring_args(p)
    args = p.parse_args(argv)
    for world in args.worlds:
        if args.seqlen % (2 * world):
            p.error(f"--seqlen {args.seqlen} is not divisible by 2 x world ({2 * world}): the "
                    "zigzag layout splits each rank's shard in two")
        for ulysses in sorted({u for u, _ in _strategies(world).values()} - {1}):
            if world % ulysses or args.heads % ulysses:
                p.error(f"world {world} and --heads {args.heads} must divide by {ulysses}: the "
                        f"Ulysses strategies split them over {ulysses} ranks")
    if args.heads % args.heads_kv:
        p.error(f"--heads ({args.heads}) must be a multiple of --heads-kv ({args.heads_kv})")
    device, sync = h.local_ring_setup(p, args)
    tol = TOL[h.DTYPES[args.dtype]]
    h.set_fp32_precision(args)
    where = h.device_record(device)
    bytes_column = "MB sent / rank" if device is None else "MB sent / rank (total / W)"
    start = h.cpu_snapshot()
    rows, failed = [], False
    for world in args.worlds:
        strategies = _gloo(world, args) if device is None else _local_ring(world, args, device, sync)
        ring = strategies["ring"]
        for name, s in strategies.items():
            worst = max(float((a - b).abs().max() / b.abs().max())
                        for a, b in zip(s["results"], ring["results"]))
            ok = worst < tol and (name not in ("ring", "allgather") or s["blocks"] == ring["blocks"])
            failed |= not ok
            rows.append({"world": world, "strategy": name, "device": where["device"],
                         "fwd+bwd ms": round(1e3 * s["time"], 1),
                         bytes_column: round(s["bytes"] / 2**20, 2),
                         "max err vs ring": f"{worst:.1e}", "check": "ok" if ok else "FAIL"})
    load = h.foreign_load(start, h.cpu_snapshot())
    columns = ["world", "strategy", "device", "fwd+bwd ms", bytes_column, "max err vs ring", "check"]
    timing = (f"slowest rank, median of {args.iters}; MB sent / rank: the most any rank sent"
              if device is None else
              f"LocalRing on {device} ({torch.get_num_threads()} CPU threads), median of "
              f"{args.iters} calls of all ranks in turn; MB sent / rank: total / W")
    print(f"causal zigzag {args.dtype}, {args.seqlen} tokens, batch {args.batch}, {args.heads} heads, "
          f"{args.heads_kv} K/V heads, head dim {args.headdim}; {timing}; "
          f"other programs kept {load:.1f} cores busy")
    h.print_table(rows, columns)
    h.write_json(args.json, {"machine": h.machine(), **where,
                             "args": {**vars(args), "local_ring": None if device is None else str(device)},
                             "foreign_load": load, "rows": rows})
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
