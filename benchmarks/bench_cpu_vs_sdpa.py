"""The CPU kernel against ATen's fused attention, side by side in one process.

Ours: the ring at world size 1 (ring_attention.ring_attn_func without a process group: one block
kernel call forward, one backward, plus the ring's O(seq) bookkeeping). Theirs:
torch.nn.functional.scaled_dot_product_attention on (batch, heads, seq, headdim) tensors (ATen's
flash-attention CPU kernel). Both forward (no grad) and forward+backward, causal and not.

Timing: the two implementations alternate, each case `--rounds` times, and the fastest round is
kept (on a shared machine the minimum is the least disturbed). --clock cpu uses the process CPU
time (steadier when other processes compete for the cores; meaningful with 1 thread); --clock wall
the wall clock. GFLOP/s count visible (query, key) pairs: forward 4 * B * H * pairs * D, forward +
backward 3.5x that (the backward is 2.5x the forward: 5 products instead of 2).

    python benchmarks/bench_cpu_vs_sdpa.py --threads 1 --seqlen 4096
"""
import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

import ring_attention as ra

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as h  # noqa: E402


def clock(kind):
    return time.process_time if kind == "cpu" else time.perf_counter


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--headdim", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=4096)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"])
    p.add_argument("--peak-ghz", type=float, default=None,
                   help="clock for the peak line (default: /proc/cpuinfo's 'cpu MHz')")
    h.add_fp32_precision_arg(p)
    args = p.parse_args()
    h.set_fp32_precision(args)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    B, H, D, L = args.batch, args.heads, args.headdim, args.seqlen
    now = clock(args.clock)

    ghz = args.peak_ghz
    if ghz is None:
        try:
            with open("/proc/cpuinfo") as f:
                ghz = next(float(line.split(":")[1]) for line in f if line.startswith("cpu MHz")) / 1e3
        except (OSError, StopIteration):
            ghz = float("nan")
    nominal = 2 * 16 * 2 * ghz * args.threads  # 2 AVX-512 FMA units x 16 fp32 lanes x 2 FLOP
    peak = h.measured_peak_gflops(0.3) * args.threads  # one core, times threads
    print(f"# B={B} H={H} D={D} L={L} {args.dtype} (float32 matmul precision {args.fp32_precision}) threads={torch.get_num_threads()} "
          f"clock={args.clock} best of {args.rounds} rounds; fp32 peak {peak:.1f} GFLOP/s measured "
          f"(FMA loop, %peak's base), {nominal:.1f} nominal ({ghz:.2f} GHz)")

    g = torch.Generator().manual_seed(0)
    # The practical peak of this core right now: MKL's fp32 GEMM (the clock varies with load and
    # turbo, so the nominal peak above is only a rough yardstick).
    a, b = torch.randn(2048, 2048, generator=g), torch.randn(2048, 2048, generator=g)
    torch.mm(a, b)
    best_mm = float("inf")
    for _ in range(args.rounds):
        t0 = now()
        torch.mm(a, b)
        best_mm = min(best_mm, now() - t0)
    mm_gflops = 2 * 2048 ** 3 / best_mm / 1e9
    print(f"# torch.mm 2048^3 fp32: {mm_gflops:.1f} GFLOP/s")
    q, k, v, dout = (torch.randn(B, L, H, D, generator=g).to(dtype) for _ in range(4))
    print(f"{'case':22} {'ring ms':>9} {'GFLOP/s':>8} {'%peak':>6} {'%mm':>5} | {'sdpa ms':>9} "
          f"{'GFLOP/s':>8} | {'speedup':>7}")
    for causal in (False, True):
        pairs = L * L if not causal else L * (L + 1) / 2
        fwd_flop = 4 * B * H * pairs * D
        qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
        qs, ks, vs = (t.transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
        dos = dout.transpose(1, 2).contiguous()

        def ring_fwd():
            with torch.no_grad():
                ra.ring_attn_func(q, k, v, causal=causal)

        def ring_fwd_bwd():
            ra.ring_attn_func(qr, kr, vr, causal=causal).backward(dout)

        def sdpa_fwd():
            with torch.no_grad():
                F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal)

        def sdpa_fwd_bwd():
            F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal).backward(dos)

        for kind, flop, ours, theirs in (("fwd", fwd_flop, ring_fwd, sdpa_fwd),
                                         ("fwd+bwd", 3.5 * fwd_flop, ring_fwd_bwd, sdpa_fwd_bwd)):
            best = {ours: float("inf"), theirs: float("inf")}
            for f in best:  # warm-up (first-call allocations, thread pools)
                f()
            for _ in range(args.rounds):
                for f in best:
                    t0 = now()
                    f()
                    best[f] = min(best[f], now() - t0)
            a, b = best[ours] * 1e3, best[theirs] * 1e3
            name = f"{'causal' if causal else 'non-causal'} {kind}"
            print(f"{name:22} {a:9.1f} {flop / a / 1e6:8.1f} {100 * flop / a / 1e6 / peak:5.0f}% "
                  f"{100 * flop / a / 1e6 / mm_gflops:4.0f}% | {b:9.1f} {flop / b / 1e6:8.1f} | "
                  f"{b / a:6.2f}x", flush=True)


if __name__ == "__main__":
    main()
