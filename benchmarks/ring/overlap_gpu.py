"""Overlap check on one GPU (scripts/gpu_check.sh stage `overlap`): the LocalRing forward and
backward, 4 virtual ranks, 8K tokens per rank, bf16, d=128, non-causal, against the sum of the
same block kernels run alone, and the K/V (dK/dV) exchanges run alone.

    overhead = ring / kernels - 1                         must be <= 5% (exit status 1 otherwise)
    hidden   = clamp((kernels + exchanges - ring) / exchanges, 0, 1)   (harness.hidden_fraction,
               the overlap metric of every benchmark)
    timeline = a confirmation of `hidden` from a trace: the fraction of the exchange copies' GPU time that ran while a kernel of another
               stream was running, read off a torch.profiler trace of one ring call

LocalRing copies each exchange on the receiver's communication stream as soon as both virtual
ranks have posted it, and the compute stream waits for that copy only where it uses the slot, so a
copy can run beside the kernels of the step in hand; on one GPU both share its SMs and memory
bandwidth, so `hidden` is a lower bound of what separate GPUs would hide. Overlap across GPUs is
measured by tests/gpu/test_ring_nccl.py's machine (NCCL transport). The ring's forward output is
checked against its kernels' (exit status 1 when off). Writes --json.
"""
import json
import os
import sys
import tempfile

import torch

import ring_attention  # noqa: F401  (loads the ops)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from benchmarks import harness as h  # noqa: E402

OPS = torch.ops.ring_attention


def median_ms(fn, iters, warmup):
    """Median CUDA-event milliseconds of fn() over `iters` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def timeline_hidden(fn):
    """(hidden fraction, copies, mean copy ms) of the device-to-device copies in one call of fn:
    how much of their GPU time overlapped a kernel running on another stream."""
    fn()
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    kernels, copies = [], []
    for e in events:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        span = (float(e["ts"]), float(e["ts"]) + float(e["dur"]), e.get("args", {}).get("stream"))
        if e.get("cat") == "kernel":
            kernels.append(span)
        elif e.get("cat") == "gpu_memcpy":
            copies.append(span)
    if not copies:
        return 0.0, 0, 0.0
    total = sum(c1 - c0 for c0, c1, _ in copies)
    return kernel_covered_fraction(kernels, copies), len(copies), total / len(copies) / 1000


def kernel_covered_fraction(kernels, copies):
    """Fraction of the copies' time (start, end, stream) covered by kernels of other streams."""
    total = hidden = 0.0
    for c0, c1, stream in copies:
        # union of the other streams' kernels over [c0, c1]
        spans = sorted((max(k0, c0), min(k1, c1)) for k0, k1, ks in kernels
                       if ks != stream and k1 > c0 and k0 < c1)
        covered, end = 0.0, c0
        for a, b in spans:
            if b > end:
                covered += b - max(a, end)
                end = b
        total += c1 - c0
        hidden += covered
    return hidden / total if total else 0.0


def main():
    parser = h.parser(__doc__, json_default="bench_out/overlap_gpu.json", warmup=2)
    parser.add_argument("--world", type=h.positive_int, default=4)
    parser.add_argument("--len", type=h.positive_int, default=8192)
    parser.add_argument("--heads", type=h.positive_int, default=16)
    parser.add_argument("--headdim", type=h.positive_int, default=128)
    parser.add_argument("--max-overhead", type=float, default=0.05)
    a = parser.parse_args()
    if not torch.cuda.is_available():
        print("overlap_gpu: no GPU, nothing to time")
        return 0
    W, L, H, D = a.world, a.len, a.heads, a.headdim
    dev, dt = "cuda", torch.bfloat16
    scale = D ** -0.5
    g = torch.Generator(device=dev).manual_seed(0)
    mk = lambda: torch.randn(1, L, H, D, device=dev, dtype=dt, generator=g)  # noqa: E731
    qs, ks, vs, douts = ([mk() for _ in range(W)] for _ in range(4))
    pos = [torch.arange(r * L, (r + 1) * L, device=dev, dtype=torch.int32) for r in range(W)]

    ring_fwd = lambda: OPS.local_ring_fwd(qs, ks, vs, None, False, scale, -1, -1, "contiguous")  # noqa: E731
    outs, lses = ring_fwd()

    def ring_bwd():
        return OPS.local_ring_bwd(douts, qs, ks, vs, outs, lses, None, False, scale, -1, -1,
                                  "contiguous")

    out_acc = [torch.zeros(1, L, H, D, device=dev) for _ in range(W)]
    lse = [torch.full((1, H, L), float("-inf"), device=dev) for _ in range(W)]

    def kernels_fwd():
        for r in range(W):
            for s in range(W):
                OPS.block_fwd(qs[r], ks[s], vs[s], pos[r], pos[s], None, out_acc[r], lse[r], False,
                              -1, -1, scale)

    delta = [(douts[r].float() * outs[r].float()).sum(-1).transpose(1, 2).contiguous()
             for r in range(W)]
    dq = [torch.zeros(1, L, H, D, device=dev) for _ in range(W)]
    dk = [torch.zeros(1, L, H, D, device=dev) for _ in range(W)]
    dv = [torch.zeros(1, L, H, D, device=dev) for _ in range(W)]

    def kernels_bwd():
        for r in range(W):
            for s in range(W):
                OPS.block_bwd(douts[r], qs[r], ks[s], vs[s], pos[r], pos[s], None, lses[r],
                              delta[r], dq[r], dk[s], dv[s], False, -1, -1, scale)

    kv = [torch.stack([ks[r], vs[r]]) for r in range(W)]
    kv_recv = [torch.empty_like(t) for t in kv]
    grad = [torch.zeros(2, 1, L, H, D, device=dev) for _ in range(W)]
    grad_recv = [torch.empty_like(t) for t in grad]

    def exchanges_fwd():  # W-1 hops of packed K/V per rank
        for _ in range(W - 1):
            for r in range(W):
                kv_recv[r].copy_(kv[(r - 1) % W])

    def exchanges_bwd():  # plus W hops of packed fp32 dK/dV
        exchanges_fwd()
        for _ in range(W):
            for r in range(W):
                grad_recv[r].copy_(grad[(r - 1) % W])

    # Check: the ring's output is its block kernels' output (bf16 inputs, fp32 states).
    kernels_fwd()
    error = max((out_acc[r] - outs[r].float()).abs().max().item() for r in range(W))
    ok = error <= 2e-2
    print(f"check: max |ring out - kernels alone| {error:.1e} (bound 2e-2): {'ok' if ok else 'FAILED'}")

    timed = lambda fn: median_ms(fn, a.iters, a.warmup)  # noqa: E731
    report = {"machine": h.machine(), "device": torch.cuda.get_device_name(), "max_abs_err": error,
              "world": W, "len_per_rank": L, "heads": H, "headdim": D, "dtype": "bfloat16"}
    for name, ring, kern, xchg in (("fwd", ring_fwd, kernels_fwd, exchanges_fwd),
                                   ("bwd", ring_bwd, kernels_bwd, exchanges_bwd)):
        t_ring, t_kern, t_x = timed(ring), timed(kern), timed(xchg)
        overhead = t_ring / t_kern - 1
        hops = (W - 1) if name == "fwd" else (2 * W - 1)
        hidden = h.hidden_fraction(t_ring, t_kern, t_x)
        seen_hidden, ncopies, copy_ms = timeline_hidden(ring)
        report[name] = dict(ring_ms=t_ring, kernels_ms=t_kern, exchanges_ms=t_x,
                            exchange_ms_per_hop=t_x / hops, overhead=overhead, hidden=hidden,
                            timeline_hidden=seen_hidden, timeline_copies=ncopies,
                            timeline_copy_ms=copy_ms)
        passed = overhead <= a.max_overhead
        ok &= passed
        print(f"{name}: ring {t_ring:.2f} ms, kernels alone {t_kern:.2f} ms, exchanges alone "
              f"{t_x:.2f} ms ({t_x / hops:.3f} ms/hop); overhead {overhead * 100:.1f}% "
              f"(<= {a.max_overhead * 100:.0f}%: {'pass' if passed else 'FAIL'}); "
              f"hidden {hidden * 100:.0f}% of each exchange; timeline: {ncopies} copies of "
              f"{copy_ms:.3f} ms, {seen_hidden * 100:.0f}% of their time beside a kernel")
    h.write_json(a.json, report)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
