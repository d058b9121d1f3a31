#!/usr/bin/env python3
"""Why merging into a loaded state slows the d=64 forward (docs/benchmarks.md, "The fused merge's
cost (CUDA forward)"): the same block_fwd launch timed from several incoming states; with
--orders, the launches with and without the merge timed in several call orders (is the cost the
kernel's or the benchmark's?); with --ncu, one launch of each of the two that differ (merge=False
and the merge into the block's own result) for Nsight Compute.

    python3 benchmarks/kernels/merge_probe.py --json OUT/merge_probe.json
    python3 benchmarks/kernels/merge_probe.py --orders --json OUT/merge_order.json
    ncu --profile-from-start off ... python3 benchmarks/kernels/merge_probe.py --ncu

bf16, 16K tokens in all (d=64: 32 heads; d=128: 16 heads), non-causal; medians of CUDA-event
timings. In the states table each call is preceded by a copy of its incoming state (not timed),
and the results of the merging calls are checked against the merge of the two states in float64.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from benchmarks import harness as h  # noqa: E402

CONFIGS = [(64, 16384), (64, 4096), (128, 16384)]  # (headdim, seqlen); batch = 16K / seqlen


def event_ms(prepare, run, reps):
    times = []
    for i in range(reps + 2):
        prepare()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        if i >= 2:
            times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def problem(d, s):
    """Batch, heads, bf16 q, k, v (batch, s, heads, d; 16K tokens and heads * d = 2048 in all),
    block_fwd's mask arguments (non-causal), and an empty fp32 state (out 0, lse -inf)."""
    b, heads = 16384 // s, 2048 // d
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(b, s, heads, d, device="cuda", dtype=torch.bfloat16, generator=g)
               for _ in range(3))
    pos = torch.arange(s, device="cuda", dtype=torch.int32)
    mask = dict(q_pos=pos, k_pos=pos, q_seg=None, causal=False, window_left=-1, window_right=-1,
                softmax_scale=d ** -0.5)
    state = (torch.zeros(b, s, heads, d, device="cuda"), torch.full((b, heads, s), float("-inf"), device="cuda"))
    return b, heads, (q, k, v), mask, state


def probe(d, s, reps, ncu):
    b, heads, (q, k, v), mask, (out, lse) = problem(d, s)

    def launch(merge):
        torch.ops.ring_attention._cuda_block_fwd(q=q, k=k, v=v, out_acc=out, lse=lse, **mask,
                                                 merge=merge)

    launch(False)
    own = (out.clone(), lse.clone())
    states = {
        "merge=False": (torch.zeros_like(out), torch.full_like(lse, float("-inf")), False),
        "merge, empty state": (torch.zeros_like(out), torch.full_like(lse, float("-inf")), True),
        "merge, own result": (own[0], own[1], True),
        "merge, out 0 and lse -1e4": (torch.zeros_like(out), torch.full_like(lse, -1e4), True),
        "merge, own result, lse + 20": (own[0], own[1] + 20.0, True),
    }

    def prepare(name):
        o, l, _ = states[name]
        return lambda: (out.copy_(o), lse.copy_(l))

    if ncu:
        for name in ("merge=False", "merge, own result"):
            prepare(name)()
            torch.cuda.synchronize()
            torch.cuda.profiler.start()
            torch.cuda.nvtx.range_push(f"d={d} {name}")
            launch(states[name][2])
            torch.cuda.nvtx.range_pop()
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()
        return None

    # Check: merging the own result into itself gives the same output and lse + log(2).
    prepare("merge, own result")()
    launch(True)
    err_out = (out - own[0]).abs().max().item()
    err_lse = (lse - (own[1] + torch.log(torch.tensor(2.0)).item())).abs().max().item()
    assert err_out < 1e-2 and err_lse < 1e-3, (d, s, err_out, err_lse)

    times = {name: event_ms(prepare(name), lambda m=st[2]: launch(m), reps)
             for name, st in states.items()}
    base = times["merge=False"]
    return {"headdim": d, "seqlen": s, "batch": b, "heads": heads, "ms": times,
            "vs_no_merge_pct": {n: (t / base - 1) * 100 for n, t in times.items()},
            "check": {"max_abs_out": err_out, "max_abs_lse": err_lse}}


def orders_probe(d, s, reps):
    """The forward with and without the merge timed in several call orders: alternated call by
    call (as bench_cuda.py does), with a host synchronisation between calls, each variant alone in
    a run of calls, and alternated between two separate state buffers; median ms per call of the
    sequence."""
    b, heads, (q, k, v), mask, state = problem(d, s)
    states = [state, tuple(t.clone() for t in state)]

    def launch(merge, state=0):
        out, lse = states[state]
        return lambda: torch.ops.ring_attention._cuda_block_fwd(q=q, k=k, v=v, out_acc=out, lse=lse,
                                                                **mask, merge=merge)

    def sequence_ms(calls, sync=False):
        """Median ms of each call of `calls`, the sequence repeated `reps` times."""
        for call in calls * 2:
            call()
        events = [[torch.cuda.Event(enable_timing=True) for _ in range(len(calls) + 1)]
                  for _ in range(reps)]
        for row in events:
            row[0].record()
            for i, call in enumerate(calls):
                call()
                row[i + 1].record()
                if sync:
                    torch.cuda.synchronize()
        torch.cuda.synchronize()
        return [sorted(r[i].elapsed_time(r[i + 1]) for r in events)[reps // 2]
                for i in range(len(calls))]

    orders = {
        "no merge, merge (alternated)": ([launch(False), launch(True)], False),
        "no merge, merge (synchronised)": ([launch(False), launch(True)], True),
        "merge only": ([launch(True)], False),
        "no merge only": ([launch(False)], False),
        "merge (state 2), no merge": ([launch(True, 1), launch(False)], False),
        "no merge (state 2), no merge": ([launch(False, 1), launch(False)], False),
        "merge (state 2), merge": ([launch(True, 1), launch(True)], False),
    }
    return {"headdim": d, "seqlen": s, "batch": b, "heads": heads,
            "ms": {name: sequence_ms(calls, sync) for name, (calls, sync) in orders.items()}}


def main():
    p = h.parser(__doc__, json_default="bench_out/merge_probe.json", iters=15)
    p.add_argument("--ncu", action="store_true", help="profile the d=64, 16K pair only")
    p.add_argument("--orders", action="store_true", help="time the call orders instead of the states")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("merge_probe: no CUDA device")
        return 0
    import ring_attention  # noqa: F401  (registers the ops)

    if args.ncu:
        probe(64, 16384, 0, ncu=True)
        print("merge_probe: profiled d=64 16K merge=False and merge into its own result")
        return 0
    if args.orders:
        rows = [orders_probe(d, s, args.iters) for d, s in CONFIGS]
    else:
        rows = [probe(d, s, args.iters, ncu=False) for d, s in CONFIGS]
    for r in rows:
        print(f"d={r['headdim']} seqlen {r['seqlen']} batch {r['batch']} heads {r['heads']} (ms):")
        for state, ms in r["ms"].items():
            if args.orders:
                print(f"  {state:32} " + "  ".join(f"{t:7.3f}" for t in ms))
            else:
                print(f"  {state:32} {ms:8.3f}  {r['vs_no_merge_pct'][state]:+6.1f}%")
    h.write_json(args.json, {"machine": h.machine(), "device": torch.cuda.get_device_name(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
