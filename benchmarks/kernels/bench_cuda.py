#!/usr/bin/env python3
"""Times the CUDA block kernels against torch SDPA's FlashAttention and cuDNN backends.

For each (head dim, total length, causal): bf16, batch x seqlen = 16K tokens, heads x headdim =
2048 (FlashAttention's benchmark shapes). Rows:
  ring block_fwd          the fused kernel (prologue load + online softmax + merge epilogue)
  ring block_fwd nomerge  the same kernel with the merge off (_cuda_block_fwd(merge=False)); the
                          two alternate call by call from the same state (merge_pair_ms)
  ring block_bwd          the backward kernel (given lse and delta, as the ring calls it)
  ring block_bwd determ.  the same with deterministic=True (no atomics; a separate dQ kernel)
  ring op fwd / bwd       ring_fwd / ring_bwd at world size 1 (buffers, delta, casts included)
  sdpa flash / cudnn      F.scaled_dot_product_attention forward, and its backward alone
TFLOP/s: forward 4 b s^2 h d (half for causal), backward 2.5x that. The merge overhead is
(fwd - fwd nomerge) / fwd nomerge. Also checks our forward's output against SDPA's: the largest
absolute difference must be at most 2e-2 (exit status 1 otherwise; not checked with --forward-only).
Writes --json and the same table as markdown beside it (.md) after every configuration, so a
timeout keeps what is done. --kernel sets RING_ATTN_CUDA_KERNEL for the run (sm90a: the Hopper
forward and backward on compute capability 9.0); --max-smem-kib sets RING_ATTN_CUDA_MAX_SMEM_KIB
(99: the kernels that GPUs of compute capability 8.6 and 8.9 run, timed on a larger GPU);
--forward-only times the block_fwd rows alone. --iters: the alternated merge/no-merge calls; the other rows take the
median of 3 batches of calls of about 0.08 s each.

usage: bench_cuda.py [--json PATH] [--quick] [--headdims 64,128] [--seqlens 4096,8192,16384]
                     [--kernel auto|sm80|sm90a] [--max-smem-kib KIB] [--forward-only]
"""
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import ring_attention as ra

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks import harness as h  # noqa: E402


SDPA_BOUND = 2e-2  # a few bf16 roundings of outputs of magnitude about 1


def sdpa_check(rows):
    """(the largest |ours - sdpa| of the rows, whether it is within SDPA_BOUND); rows with no
    comparison at all (every SDPA backend unsupported) fail it."""
    worst = max((r["max_abs_diff"] for r in rows if r["max_abs_diff"] is not None), default=math.nan)
    return worst, worst <= SDPA_BOUND


def time_ms(fn, warmup, min_time=0.25):
    """Median of 3 batches of calls, each batch long enough to take min_time/3 seconds."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    one = max(start.elapsed_time(end), 1e-3)
    n = max(1, min(200, int(min_time / 3 * 1000 / one)))
    batches = []
    for _ in range(3):
        start.record()
        for _ in range(n):
            fn()
        end.record()
        torch.cuda.synchronize()
        batches.append(start.elapsed_time(end) / n)
    return sorted(batches)[1]


def merge_pair_ms(merge, nomerge, reps, warmup):
    """Medians (ms) of the forward with and without the merge, alternated call by call and timed
    with CUDA events around each call. Each merging call merges into the state that the no-merge
    call just before it wrote (one block), so the running state is the same for every timed call
    and clocks and caches treat the two alike."""
    for _ in range(warmup):
        nomerge()
        merge()
    events = [[torch.cuda.Event(enable_timing=True) for _ in range(3)] for _ in range(reps)]
    for e0, e1, e2 in events:
        e0.record()
        nomerge()
        e1.record()
        merge()
        e2.record()
    torch.cuda.synchronize()
    t_nomerge = sorted(e0.elapsed_time(e1) for e0, e1, _ in events)[reps // 2]
    t_merge = sorted(e1.elapsed_time(e2) for _, e1, e2 in events)[reps // 2]
    return t_merge, t_nomerge


def sdpa_backend(name):
    from torch.nn.attention import SDPBackend
    return {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[name]


def bench_config(d, s, causal, iters, warmup, dtype=torch.bfloat16, forward_only=False):
    from torch.nn.attention import sdpa_kernel
    b, h = max(1, 16384 // s), max(1, 2048 // d)
    flops_fwd = 4.0 * b * s * s * h * d / (2 if causal else 1)
    flops_bwd = 2.5 * flops_fwd
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, dout = (torch.randn(b, s, h, d, device="cuda", dtype=dtype, generator=g) for _ in range(4))
    scale = d ** -0.5
    pos = torch.arange(s, device="cuda", dtype=torch.int32)
    out_acc = torch.zeros(b, s, h, d, device="cuda")
    lse = torch.full((b, h, s), float("-inf"), device="cuda")
    mask = dict(q_pos=pos, k_pos=pos, q_seg=None, causal=causal, window_left=-1, window_right=-1,
                softmax_scale=scale)
    rows = []

    def add(impl, direction, ms, flops, note="", max_abs_diff=None):
        rows.append(dict(headdim=d, seqlen=s, batch=b, heads=h, causal=causal, impl=impl,
                         direction=direction, ms=ms,
                         tflops=None if ms is None else flops / ms / 1e9, note=note,
                         max_abs_diff=max_abs_diff))

    fwd = lambda: ra.ops.block_fwd(q=q, k=k, v=v, out_acc=out_acc, lse=lse, **mask)
    fwd_nomerge = lambda: torch.ops.ring_attention._cuda_block_fwd(q=q, k=k, v=v, out_acc=out_acc,
                                                                   lse=lse, **mask, merge=False)
    t_fwd, t_nomerge = merge_pair_ms(fwd, fwd_nomerge, iters, warmup)
    overhead = (t_fwd - t_nomerge) / t_nomerge * 100
    add("ring block_fwd", "fwd", t_fwd, flops_fwd, f"merge overhead {overhead:+.1f}%")
    add("ring block_fwd nomerge", "fwd", t_nomerge, flops_fwd)
    if forward_only:
        return rows

    out_acc.zero_()
    lse.fill_(float("-inf"))
    fwd()
    ours = out_acc.to(dtype)
    delta = (dout.float() * out_acc).sum(-1).transpose(1, 2).contiguous()
    final_lse = lse.clone()
    dq, dk, dv = (torch.zeros(b, s, h, d, device="cuda") for _ in range(3))
    bwd = lambda: ra.ops.block_bwd(dout=dout, q=q, k=k, v=v, lse=final_lse, delta=delta, dq_acc=dq,
                                   dk_acc=dk, dv_acc=dv, **mask)
    add("ring block_bwd", "bwd", time_ms(bwd, warmup), flops_bwd)
    bwd_det = lambda: ra.ops.block_bwd(dout=dout, q=q, k=k, v=v, lse=final_lse, delta=delta,
                                       dq_acc=dq, dk_acc=dk, dv_acc=dv, deterministic=True, **mask)
    add("ring block_bwd deterministic", "bwd", time_ms(bwd_det, warmup), flops_bwd)

    held = {}

    def op_fwd():
        held["out"] = ra.ops.ring_fwd(q, k, v, None, "", causal, scale, -1, -1, "contiguous")

    add("ring op (world 1)", "fwd", time_ms(op_fwd, warmup), flops_fwd)
    o, l, _ = held.pop("out")
    op_bwd = lambda: ra.ops.ring_bwd(dout, q, k, v, o, l, None, "", causal, scale, -1, -1,
                                     "contiguous")
    add("ring op (world 1)", "bwd", time_ms(op_bwd, warmup), flops_bwd)
    del o, l

    qt, kt, vt, dt = (t.transpose(1, 2).detach() for t in (q, k, v, dout))
    for name in ("flash", "cudnn"):
        try:
            leaves = [t.clone().requires_grad_() for t in (qt, kt, vt)]
            with sdpa_kernel(sdpa_backend(name)):
                run = lambda: F.scaled_dot_product_attention(*leaves, is_causal=causal, scale=scale)
                t = time_ms(run, warmup)
                ref = run()
                diff = (ref.transpose(1, 2).float() - ours.float()).abs().max().item()
                add(f"sdpa {name}", "fwd", t, flops_fwd, f"max |ours - sdpa| {diff:.2e}", diff)
                grad = lambda: torch.autograd.grad(ref, leaves, dt, retain_graph=True)
                add(f"sdpa {name}", "bwd", time_ms(grad, warmup), flops_bwd)
            del ref
        except Exception as e:  # backend unavailable for this shape/GPU/torch
            add(f"sdpa {name}", "fwd", None, flops_fwd, f"unsupported: {str(e).splitlines()[0][:120]}")
    return rows


def markdown(rows, device, kernel, max_smem_kib=""):
    """The table of `rows`; its title names the device and the run's kernel settings
    (max_smem_kib: RING_ATTN_CUDA_MAX_SMEM_KIB as set, "" or "0" when unset)."""
    cap = f", RING_ATTN_CUDA_MAX_SMEM_KIB={max_smem_kib}" if max_smem_kib not in ("", "0") else ""
    lines = [f"# CUDA block kernels vs torch SDPA ({device}, bf16, 16K tokens, h*d = 2048, "
             f"RING_ATTN_CUDA_KERNEL={kernel}{cap})", "",
             "| d | seqlen | batch | heads | causal | impl | dir | ms | TFLOP/s | note |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ms = "-" if r["ms"] is None else f"{r['ms']:.3f}"
        tf = "-" if r["tflops"] is None else f"{r['tflops']:.1f}"
        lines.append(f"| {r['headdim']} | {r['seqlen']} | {r['batch']} | {r['heads']} | "
                     f"{r['causal']} | {r['impl']} | {r['direction']} | {ms} | {tf} | {r['note']} |")
    overheads = [r for r in rows if r["impl"] == "ring block_fwd"]
    if overheads:
        lines += ["", "Fused merge overhead (target <= 3%): " + ", ".join(
            f"d={r['headdim']} s={r['seqlen']} {'causal' if r['causal'] else 'full'}: {r['note'].split()[-1]}"
            for r in overheads)]
    return "\n".join(lines) + "\n"


def main():
    ap = h.parser(__doc__, json_default="bench_out/cuda.json", iters=21, warmup=2)
    ap.add_argument("--quick", action="store_true", help="d=128, 8K tokens, non-causal only")
    ap.add_argument("--headdims", type=h.positive_ints, default=[64, 128])
    ap.add_argument("--seqlens", type=h.positive_ints, default=[4096, 8192, 16384])
    ap.add_argument("--kernel", choices=("auto", "sm80", "sm90a"),
                    help="RING_ATTN_CUDA_KERNEL for the run (default: the environment's)")
    ap.add_argument("--max-smem-kib", type=h.positive_int,
                    help="RING_ATTN_CUDA_MAX_SMEM_KIB for the run (default: the environment's)")
    ap.add_argument("--forward-only", action="store_true", help="the block_fwd rows alone")
    args = ap.parse_args()
    if args.kernel:
        os.environ["RING_ATTN_CUDA_KERNEL"] = args.kernel
    if args.max_smem_kib:
        os.environ["RING_ATTN_CUDA_MAX_SMEM_KIB"] = str(args.max_smem_kib)
    kernel = os.environ.get("RING_ATTN_CUDA_KERNEL", "auto") or "auto"
    max_smem_kib = os.environ.get("RING_ATTN_CUDA_MAX_SMEM_KIB", "")
    if not torch.cuda.is_available():
        print("bench_cuda: no CUDA device, nothing to time")
        return 0
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.quick:
        configs = [(128, 8192, False)]
    else:
        configs = [(d, s, c) for d in args.headdims for s in args.seqlens for c in (False, True)]
    device = torch.cuda.get_device_name()
    rows = []
    for d, s, causal in configs:
        t0 = time.time()
        rows += bench_config(d, s, causal, args.iters, args.warmup, forward_only=args.forward_only)
        print(f"d={d} s={s} causal={causal}: {time.time() - t0:.1f} s", flush=True)
        out.write_text(json.dumps(dict(machine=h.machine(), device=device, kernel=kernel,
                                       max_smem_kib=max_smem_kib, rows=rows), indent=1))
        out.with_suffix(".md").write_text(markdown(rows, device, kernel, max_smem_kib))
        torch.cuda.empty_cache()
    print(markdown(rows, device, kernel, max_smem_kib))
    if args.forward_only:
        return 0
    worst, ok = sdpa_check(rows)
    print(f"check: max |ours - sdpa| {worst:.2e} (bound {SDPA_BOUND:g}): {'ok' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
