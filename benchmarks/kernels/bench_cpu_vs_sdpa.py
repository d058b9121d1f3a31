"""The CPU kernel against ATen's fused attention, side by side in one process.

Ours: the ring at world size 1 (ring_attention.ring_attn_func without a process group: one block
kernel call forward, one backward, plus the ring's O(seq) bookkeeping). Theirs:
torch.nn.functional.scaled_dot_product_attention on (batch, heads, seq, headdim) tensors (ATen's
flash-attention CPU kernel). Both forward (no grad) and forward+backward, causal and not.

Timing: the two implementations alternate call by call (harness.median_times_interleaved), and
each row reports the medians of --iters calls. GFLOP/s count visible (query, key) pairs: forward
4 * B * H * pairs * D, forward + backward 3.5x that (the backward is 2.5x the forward: 5 products
instead of 2). %peak: over one core's fp32 FMA rate measured at the start, times --threads.
Check: our output (and dq, dk, dv) against SDPA's, max |a - b| / max |b|, must stay under 1e-4
(fp32 at precision highest; 5e-2 otherwise); the exit status is 1 when a row fails.

    python benchmarks/kernels/bench_cpu_vs_sdpa.py --threads 1 --seqlen 4096
"""
import os
import sys

import torch
import torch.nn.functional as F

import ring_attention as ra

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from benchmarks import harness as h  # noqa: E402


def _relative_error(ours, theirs) -> float:
    return max(((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()
               for a, b in zip(ours, theirs))


def _fwd_and_fwd_bwd(attention, inputs, dout):
    """Two closures over attention(q, k, v): the forward without grad, and the forward and
    backward (returns out, dq, dk, dv) on leaf copies of inputs."""
    leaves = [t.clone().requires_grad_() for t in inputs]

    def fwd():
        with torch.no_grad():
            return attention(*inputs)

    def fwd_bwd():
        for t in leaves:
            t.grad = None
        out = attention(*leaves)
        out.backward(dout)
        return (out.detach(), *(t.grad for t in leaves))

    return fwd, fwd_bwd


def main(argv=None) -> int:
    p = h.parser(__doc__, json_default="bench_out/cpu_vs_sdpa.json")
    p.add_argument("--threads", type=h.positive_int, default=1)
    p.add_argument("--batch", type=h.positive_int, default=1)
    h.add_shape_args(p, seqlen=4096)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = p.parse_args(argv)
    h.set_fp32_precision(args)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    B, H, D, L = args.batch, args.heads, args.headdim, args.seqlen
    exact = dtype == torch.float32 and args.fp32_precision == "highest"
    tolerance = 1e-4 if exact else 5e-2

    peak = h.measured_peak_gflops(0.3) * args.threads  # one core, times threads
    print(f"# B={B} H={H} D={D} L={L} {args.dtype} (float32 matmul precision {args.fp32_precision}) "
          f"threads={torch.get_num_threads()}, medians of {args.iters} interleaved calls; fp32 peak "
          f"{peak:.1f} GFLOP/s measured (FMA loop, %peak's base)")

    g = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(B, L, H, D, generator=g).to(dtype) for _ in range(4))
    rows = []
    for causal in (False, True):
        pairs = L * L if not causal else L * (L + 1) / 2
        fwd_flop = 4 * B * H * pairs * D
        ring_fwd, ring_fwd_bwd = _fwd_and_fwd_bwd(
            lambda *qkv: ra.ring_attn_func(*qkv, causal=causal), (q, k, v), dout)
        sdpa_fwd, sdpa_fwd_bwd = _fwd_and_fwd_bwd(
            lambda *qkv: F.scaled_dot_product_attention(*qkv, is_causal=causal),
            [t.transpose(1, 2).contiguous() for t in (q, k, v)], dout.transpose(1, 2).contiguous())

        bshd = lambda t: t.transpose(1, 2)  # noqa: E731  (batch, heads, seq, d) -> (batch, seq, heads, d)
        error = max(_relative_error([ring_fwd()], [bshd(sdpa_fwd())]),
                    _relative_error(ring_fwd_bwd(), [bshd(t) for t in sdpa_fwd_bwd()]))
        for kind, flop, ours, theirs in (("fwd", fwd_flop, ring_fwd, sdpa_fwd),
                                         ("fwd+bwd", 3.5 * fwd_flop, ring_fwd_bwd, sdpa_fwd_bwd)):
            med = h.median_times_interleaved({"ring": ours, "sdpa": theirs}, args.iters, args.warmup)
            a, b = med["ring"] * 1e3, med["sdpa"] * 1e3
            rows.append({"case": f"{'causal' if causal else 'non-causal'} {kind}",
                         "ring ms": f"{a:.1f}", "ring GFLOP/s": f"{flop / a / 1e6:.1f}",
                         "%peak": f"{100 * flop / a / 1e6 / peak:.0f}", "sdpa ms": f"{b:.1f}",
                         "sdpa GFLOP/s": f"{flop / b / 1e6:.1f}", "speedup": f"{b / a:.2f}",
                         "max rel err": f"{error:.1e}"})
    h.print_table(rows, list(rows[0].keys()))
    worst = max(float(r["max rel err"]) for r in rows)
    ok = worst <= tolerance
    print(f"check: ring vs sdpa max relative error {worst:.1e} (bound {tolerance:g}): {'ok' if ok else 'FAILED'}")
    h.write_json(args.json, {"machine": h.machine(), "args": vars(args), "rows": rows,
                             "peak_gflops": peak, "max_rel_err": worst})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
