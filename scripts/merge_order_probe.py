#!/usr/bin/env python3
"""Is the fused merge's cost a property of the kernel or of how a benchmark orders its calls?
(docs/benchmarks.md, "H100"). The forward with and without the merge (bf16, 16K tokens in all,
non-causal) timed in several orders: alternated call by call (as bench_cuda.py does), with a host
synchronisation between calls, each variant alone in a run of calls, and alternated between two
separate state buffers. Medians of CUDA-event timings, one column per call of the sequence.

    python3 scripts/merge_order_probe.py --out OUTDIR     # table + OUTDIR/merge_order.json
"""
import argparse
import json
import os
import sys

import torch

CONFIGS = [(64, 16384), (64, 4096), (128, 16384)]  # (headdim, seqlen); batch = 16K / seqlen


def probe(d, s, reps):
    b, h = 16384 // s, 2048 // d
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, generator=g)
               for _ in range(3))
    pos = torch.arange(s, device="cuda", dtype=torch.int32)
    mask = dict(q_pos=pos, k_pos=pos, q_seg=None, causal=False, window_left=-1, window_right=-1,
                softmax_scale=d ** -0.5)
    states = [(torch.zeros(b, s, h, d, device="cuda"),
               torch.full((b, h, s), float("-inf"), device="cuda")) for _ in range(2)]

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
    return {"headdim": d, "seqlen": s, "batch": b, "heads": h,
            "ms": {name: sequence_ms(calls, sync) for name, (calls, sync) in orders.items()}}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="folder for merge_order.json")
    p.add_argument("--reps", type=int, default=21)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("merge_order_probe: no CUDA device")
        return 0
    import ring_attention  # noqa: F401  (registers the ops)

    rows = [probe(d, s, args.reps) for d, s in CONFIGS]
    for r in rows:
        print(f"d={r['headdim']} seqlen {r['seqlen']} batch {r['batch']} heads {r['heads']} (ms per call):")
        for name, ms in r["ms"].items():
            print(f"  {name:32} " + "  ".join(f"{t:7.3f}" for t in ms))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "merge_order.json"), "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
