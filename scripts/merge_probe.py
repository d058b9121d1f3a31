#!/usr/bin/env python3
"""Why merging into a loaded state slows the d=64 forward (docs/benchmarks.md, "Second H200 lease"):
the same block_fwd launch timed from several incoming states, and, with --ncu, one launch of each
of the two that differ (merge=False and the merge into the block's own result) for Nsight Compute.

    python3 scripts/merge_probe.py --out OUTDIR                # table + OUTDIR/merge_probe.json
    ncu --profile-from-start off ... python3 scripts/merge_probe.py --ncu

bf16, 16K tokens in all (d=64: 32 heads; d=128: 16 heads), non-causal; medians of CUDA-event
timings, each call preceded by a copy of its incoming state (not timed). The results of the
merging calls are checked against the merge of the two states in float64.
"""
import argparse
import json
import os
import sys

import torch

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


def probe(d, s, reps, ncu):
    b, h = 16384 // s, 2048 // d
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, generator=g)
               for _ in range(3))
    pos = torch.arange(s, device="cuda", dtype=torch.int32)
    mask = dict(q_pos=pos, k_pos=pos, q_seg=None, causal=False, window_left=-1, window_right=-1,
                softmax_scale=d ** -0.5)
    out, lse = torch.zeros(b, s, h, d, device="cuda"), torch.full((b, h, s), float("-inf"), device="cuda")

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
    return {"headdim": d, "seqlen": s, "batch": b, "heads": h, "ms": times,
            "vs_no_merge_pct": {n: (t / base - 1) * 100 for n, t in times.items()},
            "check": {"max_abs_out": err_out, "max_abs_lse": err_lse}}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="folder for merge_probe.json")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--ncu", action="store_true", help="profile the d=64, 16K pair only")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("merge_probe: no CUDA device")
        return 0
    import ring_attention  # noqa: F401  (registers the ops)

    if args.ncu:
        probe(64, 16384, 0, ncu=True)
        print("merge_probe: profiled d=64 16K merge=False and merge into its own result")
        return 0
    rows = [probe(d, s, args.reps, ncu=False) for d, s in CONFIGS]
    for r in rows:
        print(f"d={r['headdim']} seqlen {r['seqlen']} batch {r['batch']} heads {r['heads']}:")
        for name, ms in r["ms"].items():
            print(f"  {name:30} {ms:8.3f} ms  {r['vs_no_merge_pct'][name]:+6.1f}%")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "merge_probe.json"), "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
