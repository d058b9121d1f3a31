"""Sliding-window saving: causal attention with a window of 1/8 of the sequence vs full causal
attention, contiguous layout, on CPU ranks over gloo (1 thread per rank).

With a causal window and the contiguous layout, rank r needs K/V only from the ranks just before
it, so each block travels only to the ranks just after it and the ring stops early: fewer hops and
fewer blocks, not only fewer FLOPs inside a block.
The two variants are timed side by side (interleaved, a barrier before each call); a call's time
is its slowest rank's. Each rank also reports the steps, blocks and exchanges of its last call,
and the windowed output is checked against a float64 reference of the whole sequence.
"""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from benchmarks import harness as h  # noqa: E402


def _rank(rank, world, seqlen, heads, headdim, window, iters, warmup):
    import ring_attention as ra
    from ring_attention.reference import attention_reference
    gen = torch.Generator().manual_seed(0)
    full = [torch.randn(1, seqlen, heads, headdim, generator=gen) for _ in range(4)]
    q, k, v, dout = (ra.shard(t, layout="contiguous").contiguous() for t in full)
    q.requires_grad_(); k.requires_grad_(); v.requires_grad_()
    variants = {"full causal": (-1, -1), f"window {window}": (window, 0)}

    fns, stats = {}, {}
    for name, win in variants.items():
        def fwd(win=win):
            with torch.no_grad():
                ra.ring_attn_func(q, k, v, causal=True, window_size=win)

        def fwd_bwd(win=win):
            ra.ring_attn_func(q, k, v, causal=True, window_size=win).backward(dout)

        fns[(name, "fwd")] = fwd
        fns[(name, "fwd+bwd")] = fwd_bwd
        fwd()
        stats[(name, "fwd")] = ra.last_ring_stats()
        fwd_bwd()
        stats[(name, "fwd+bwd")] = ra.last_ring_stats()  # the backward ring's counts
    times = h.median_times_interleaved(fns, iters, warmup, dist.barrier if world > 1 else None)

    with torch.no_grad():  # this rank's windowed rows against float64 on the whole sequence
        out = ra.ring_attn_func(q, k, v, causal=True, window_size=(window, 0))
        q_pos = ra.shard(torch.arange(seqlen)[None], layout="contiguous")[0]
        k_pos = torch.arange(seqlen)
        in_window = (q_pos[:, None] - k_pos[None, :]) <= window  # causal adds key <= query
        ref, _ = attention_reference(q.detach().double(), full[1].double(), full[2].double(), causal=True,
                                     q_positions=q_pos, k_positions=k_pos, mask=in_window)
        err = (out.double() - ref).abs().max().item()
    return {"times": times, "stats": stats, "max_abs_err": err}


def main(argv=None) -> int:
    p = h.parser(__doc__, json_default="bench_out/window.json")
    h.add_shape_args(p, world=4, seqlen=8192)
    p.add_argument("--window-fraction", type=float, default=1 / 8,
                   help="left window as a fraction of the global sequence length")
    args = p.parse_args(argv)
    if args.seqlen % args.world:
        p.error(f"--seqlen {args.seqlen} is not divisible by --world {args.world}")
    if not 0 < args.window_fraction <= 1:
        p.error(f"--window-fraction must be in (0, 1], got {args.window_fraction:g}")
    h.set_fp32_precision(args)
    window = max(1, int(args.seqlen * args.window_fraction))

    res = h.run_ranks(args.world, _rank, args.seqlen, args.heads, args.headdim, window, args.iters, args.warmup)
    err = max(r["max_abs_err"] for r in res)
    if err > 1e-4:
        raise SystemExit(f"windowed ring output differs from the float64 reference by {err:.2e}")

    names = ["full causal", f"window {window}"]
    rows = []
    for name in names:
        row = {"variant": name}
        for phase in ("fwd", "fwd+bwd"):
            row[f"{phase} ms"] = f"{max(r['times'][(name, phase)] for r in res) * 1e3:.1f}"
        row["steps per rank"] = "/".join(str(r["stats"][(name, "fwd")]["steps"]) for r in res)
        row["blocks per rank"] = "/".join(str(r["stats"][(name, "fwd")]["blocks_computed"]) for r in res)
        row["fwd exchanges"] = sum(r["stats"][(name, "fwd")]["exchanges_posted"] for r in res)
        rows.append(row)
    ratios = {phase: max(r["times"][(names[1], phase)] for r in res) / max(r["times"][(names[0], phase)] for r in res)
              for phase in ("fwd", "fwd+bwd")}
    print(f"\nCausal window of {window} ({args.window_fraction:g} of {args.seqlen} tokens) vs full causal, "
          f"{args.world} ranks, contiguous, batch 1, {args.heads} heads, dim {args.headdim}, fp32, "
          f"1 thread per rank (slowest rank, median of {args.iters}, interleaved)")
    h.print_table(rows, list(rows[0].keys()))
    print("window / full time: " + ", ".join(f"{ph} {r:.3f}" for ph, r in ratios.items())
          + f"; max |err| vs float64 {err:.1e}")
    h.write_json(args.json, {"machine": h.machine(), "args": vars(args), "window": window, "rows": rows,
                             "ratio_window_over_full": ratios, "max_abs_err": err})
    return 0


if __name__ == "__main__":
    sys.exit(main())
