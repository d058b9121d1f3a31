"""The strategies of exchanging K/V side by side, on CPU ranks over gloo.

Strategies (ring_attention.ring_attn_func, causal, zigzag, float32, 1 thread per rank):
  ring              kv_exchange="ring" over all ranks
  allgather         kv_exchange="allgather" over all ranks
  ring + U2         ulysses_group of 2 ranks, the ring over world / 2
  allgather + U2    ulysses_group of 2 ranks, the all-gather over world / 2
  ulysses U<world>  (world 4) ulysses_group of all ranks, no K/V exchange (R = 1)

Each world size is one set of spawned ranks; every iteration runs each strategy once in turn
(forward then backward with a random output gradient), a barrier before each, so that load from
elsewhere on the machine hits them alike. A row is the slowest rank's median of --iters calls.
Same-work check: every strategy computes the same out, dq, dk and dv (max |a - ring| / max |ring|
within 1e-4, by global token) from the same attention blocks (the ring and the all-gather compute
the same number of blocks); the bytes each rank sent come from last_ring_stats() and the Ulysses
all-to-all count. A failed check marks the row FAIL and the exit status is 1.
"""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from benchmarks import harness as h  # noqa: E402

TOL = 1e-4


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


def _rank(rank, world, args):
    import ring_attention as ra
    from ring_attention.ulysses import all_to_all_bytes_sent
    g = torch.Generator().manual_seed(0)
    shape = (args.batch, args.seqlen)
    q = torch.randn(*shape, args.heads, args.headdim, generator=g)
    k, v = (torch.randn(*shape, args.heads_kv, args.headdim, generator=g) for _ in range(2))
    dout = torch.randn(*shape, args.heads, args.headdim, generator=g)
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


def main(argv=None) -> int:
    p = h.parser(__doc__, json_default="bench_out/strategies.json")
    p.add_argument("--worlds", default="2,4")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--heads-kv", type=int, default=2)
    p.add_argument("--headdim", type=int, default=64)
    args = p.parse_args(argv)
    h.set_fp32_precision(args)
    start = h.cpu_snapshot()
    rows, failed = [], False
    for world in (int(w) for w in args.worlds.split(",")):
        per_rank = h.run_ranks(world, _rank, args)
        baseline = per_rank[0]["results"]["ring"]
        for name in _strategies(world):
            worst = max(float((a - b).abs().max() / b.abs().max())
                        for a, b in zip(per_rank[0]["results"][name], baseline))
            blocks = [r["sent"][name][1] for r in per_rank]
            ok = worst < TOL and (name not in ("ring", "allgather") or
                                  blocks == [r["sent"]["ring"][1] for r in per_rank])
            failed |= not ok
            rows.append({"world": world, "strategy": name,
                         "fwd+bwd ms": round(1e3 * max(r["times"][name] for r in per_rank), 1),
                         "MB sent / rank": round(max(r["sent"][name][0] for r in per_rank) / 2**20, 2),
                         "max err vs ring": f"{worst:.1e}", "check": "ok" if ok else "FAIL"})
    load = h.foreign_load(start, h.cpu_snapshot())
    columns = ["world", "strategy", "fwd+bwd ms", "MB sent / rank", "max err vs ring", "check"]
    print(f"causal zigzag float32, {args.seqlen} tokens, batch {args.batch}, {args.heads} heads, "
          f"{args.heads_kv} K/V heads, head dim {args.headdim}; median of {args.iters}; "
          f"other programs kept {load:.1f} cores busy")
    h.print_table(rows, columns)
    h.write_json(args.json, {"machine": h.machine(), "args": vars(args), "foreign_load": load,
                             "rows": rows})
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
