"""Our ring attention vs PyTorch's ring attention vs single-process ATen SDPA, on CPU ranks over gloo.

Implementations (1 thread per rank, each rank a spawned process):
  ours   ring_attention.ring_attn_func; (batch, seq, heads, dim) shards; layout "zigzag" for causal,
         "contiguous" otherwise.
  torch  PyTorch's private ring, torch.distributed.tensor.experimental._context_parallel:
         _templated_ring_attention / _templated_ring_attention_backward called directly with ATen's
         CPU flash op (aten._scaled_dot_product_flash_attention_for_cpu[_backward]) over the gloo
         world group; (batch, heads, seq, dim) shards. Causal runs with their load balancing on
         (_cp_options.enable_load_balance, shards from _HeadTailLoadBalancer: rank r holds chunks r
         and 2*world-1-r, the same tokens as our zigzag); non-causal with it off (contiguous shards).
         Their default rotate method (all-gather of K/V) unless --torch-rotate alltoall.
         (The public context_parallel() does not run on CPU.)
  sdpa   torch.nn.functional.scaled_dot_product_attention on the whole sequence in one process
         (1 thread): the single-process baseline.

Times: one set of max(worlds) spawned ranks runs everything: world w on ranks 0..w-1 (a subgroup),
sdpa on rank 0. Each iteration runs every (implementation, world) once in turn, a barrier of all
ranks before each call (ranks outside the world wait in it, idle), so ratios and efficiencies
compare calls made seconds apart, not separate runs. A row reports the slowest rank's median of
--iters calls. The run also reports how many cores other programs kept busy meanwhile.
fwd: forward only (no autograd); fwd+bwd: forward then backward with a random output gradient.
FLOPs: forward 4*b*s^2*h*d (half for causal), backward 2.5x forward. %pk: GFLOP/s per rank over
one core's fp32 FMA peak measured at the start (cpu_fma_peak_gflops: the vector width the kernels
use, at the clock the core really runs); the nominal peak (32 FLOP/cycle per AVX-512 FMA unit x 2
units x /proc/cpuinfo's clock) is printed beside it.
eff: ring efficiency T1 / (world * Tw) of the same implementation (needs world 1 in --worlds).
Checks, as max |a - b| / max |b| over the output (and dq, dk, dv for fwd+bwd), by global token
position: "err ours/torch/sdpa" each implementation against the reference (fp32 SDPA on the same
inputs: the sdpa result itself for fp32, an extra fp32 run for bf16); "err cross" the worst of ours
vs sdpa, torch vs sdpa and ours vs torch. Tolerance (fp32 1e-4, bf16 2e-2) for ours vs the
reference, twice it for PyTorch's results vs the reference and for the cross pairs (ATen's own bf16
flash backward reaches ~2e-2 at 16K tokens). A row outside them is marked FAIL (naming the pairs)
and the exit status is 1.

Default sweep: the headline points (8K tokens, worlds 1 and 2, fp32 and bf16, causal and not, fwd
and fwd+bwd), about 5 minutes on 2 cores. --full: worlds 1,2,4 x 2K,4K,8K,16K, 35-60 minutes (add
--iters 3 to shorten; world 4 oversubscribes a 2-core machine). --quick: a tiny smoke test (~20 s).
An implementation that cannot run a point is reported "n/a" with the reason; BENCH_RING_TRACE=1
also prints its traceback.
"""
import math
import os
import statistics
import sys
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from benchmarks import harness as h  # noqa: E402

IMPLS = ("ours", "torch", "sdpa")
TOL = {"float32": 1e-4, "bfloat16": 2e-2}
MODES = ("fwd", "fwd+bwd")
# checked pairs: each implementation against the fp32 reference, and against each other; limits in _limit
REF_PAIRS = (("ours", "ref"), ("torch", "ref"), ("sdpa", "ref"))
CROSS_PAIRS = (("ours", "sdpa"), ("torch", "sdpa"), ("ours", "torch"))
PAIRS = REF_PAIRS + CROSS_PAIRS


def _configs(args):
    return [(dt, s, c) for dt in args.dtypes for s in args.seqlens for c in args.causal]


def _key(dtype, seqlen, causal):
    return f"{dtype}-{seqlen}-{'causal' if causal else 'full'}"


def _full_inputs(spec, dtype, seqlen):
    """q, k, v, dout over the whole sequence, (batch, seq, heads, dim), identical on every rank."""
    gen = torch.Generator().manual_seed(1234 + seqlen)
    shape = (spec["batch"], seqlen, spec["heads"], spec["headdim"])
    return [torch.randn(shape, generator=gen).to(getattr(torch, dtype)) for _ in range(4)]


def _short(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"[:160]


# ----------------------------------------------------------------------------------------------
# The three implementations. Each builder returns (positions, {mode: fn}, results) where fn runs
# one timed call and leaves the latest out/grads in `results`, as (batch, seq_local, heads, dim).
# ----------------------------------------------------------------------------------------------

def _build_ours(rank, world, group, full, causal):
    import ring_attention as ra
    layout = "zigzag" if causal else "contiguous"
    q, k, v, dout = (ra.shard(t, group=group, layout=layout).contiguous() for t in full)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    res = {}

    def fwd():
        with torch.no_grad():
            res["out"] = ra.ring_attn_func(q, k, v, causal=causal, layout=layout, group=group)

    def fwd_bwd():
        qg.grad = kg.grad = vg.grad = None
        out = ra.ring_attn_func(qg, kg, vg, causal=causal, layout=layout, group=group)
        out.backward(dout)
        res.update(out=out.detach(), dq=qg.grad, dk=kg.grad, dv=vg.grad)

    pos = ra.positions(layout, rank, world, q.shape[1])
    return pos, {"fwd": fwd, "fwd+bwd": fwd_bwd}, res


def _torch_cp():
    from torch.distributed.tensor.experimental._context_parallel import _attention as cp
    from torch.distributed.tensor.experimental._context_parallel._load_balancer import _HeadTailLoadBalancer
    return cp, _HeadTailLoadBalancer


def _build_torch(rank, world, group, full, causal, rotate):
    cp, HeadTail = _torch_cp()
    aten = torch.ops.aten
    seqlen = full[0].shape[1]
    local = seqlen // world
    if causal:  # their load-balanced layout, as context_parallel() would shard it
        order = HeadTail(seqlen, world, "cpu")._generate_indices()[0].long()
        pos = order[rank * local:(rank + 1) * local]
    else:
        pos = torch.arange(rank * local, (rank + 1) * local)
    q, k, v, dout = (t.index_select(1, pos).transpose(1, 2).contiguous() for t in full)  # (b, h, s, d)
    res = {}

    def options():
        # Global options of their module: load balancing must be on exactly for causal.
        cp._cp_options.enable_load_balance = bool(causal)
        cp._cp_options.rotate_method = (cp._RotateMethod.ALL_TO_ALL if rotate == "alltoall"
                                        else cp._RotateMethod.ALL_GATHER)

    def forward():
        options()
        out, lse = cp._templated_ring_attention(
            group, 2, aten._scaled_dot_product_flash_attention_for_cpu.default,
            query=q, key=k, value=v, is_causal=causal, dropout_p=0.0, scale=None)[:2]
        return out, lse

    def fwd():
        res["out"] = forward()[0].transpose(1, 2)

    def fwd_bwd():
        out, lse = forward()
        dq, dk, dv = cp._templated_ring_attention_backward(
            group, 2, aten._scaled_dot_product_flash_attention_for_cpu_backward.default,
            grad_out=dout, grad_out_name="grad_out", query=q, key=k, value=v, out=out,
            logsumexp=lse, is_causal=causal, dropout_p=0.0, scale=None)[:3]
        res.update(out=out.transpose(1, 2), dq=dq.transpose(1, 2), dk=dk.transpose(1, 2),
                   dv=dv.transpose(1, 2))

    return pos, {"fwd": fwd, "fwd+bwd": fwd_bwd}, res


def _build_sdpa(full, causal):
    q, k, v, dout = (t.transpose(1, 2).contiguous() for t in full)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    res = {}

    def fwd():
        with torch.no_grad():
            res["out"] = F.scaled_dot_product_attention(q, k, v, is_causal=causal).transpose(1, 2)

    def fwd_bwd():
        qg.grad = kg.grad = vg.grad = None
        out = F.scaled_dot_product_attention(qg, kg, vg, is_causal=causal)
        out.backward(dout)
        res.update(out=out.detach().transpose(1, 2), dq=qg.grad.transpose(1, 2),
                   dk=kg.grad.transpose(1, 2), dv=vg.grad.transpose(1, 2))

    return torch.arange(full[0].shape[1]), {"fwd": fwd, "fwd+bwd": fwd_bwd}, res


# ----------------------------------------------------------------------------------------------

def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _compare(results: dict, positions: dict, pairs) -> dict:
    """Worst relative error per (a, b) pair over the tensors both hold, by global position."""
    errs = {}
    for a, b in pairs:
        ra, rb = results.get(a), results.get(b)
        if not ra or not rb:
            continue
        pa, pb = positions[a], positions[b]
        # b may cover the whole sequence (the sdpa reference) or the same tokens as a
        idx = pa if len(pb) != len(pa) else torch.argsort(pb)[torch.argsort(torch.argsort(pa))]
        if len(pb) == len(pa) and not torch.equal(pb[idx], pa):
            raise AssertionError(f"{a} and {b} hold different tokens")
        names = [n for n in ("out", "dq", "dk", "dv") if n in ra and n in rb]
        errs[f"{a}~{b}"] = max(_rel_err(ra[n], rb[n].index_select(1, idx)) for n in names)
    return errs


def _run_mode(fns: dict, iters: int, warmup: int) -> dict:
    """Times the entries of `fns` ((impl, world) -> fn, or None where this rank sits that one out)
    side by side: every iteration runs each entry once in turn, a barrier of all ranks before each.
    Returns this rank's median seconds per entry it ran."""
    times = {k: [] for k, fn in fns.items() if fn is not None}
    for it in range(warmup + iters):
        for k, fn in fns.items():
            dist.barrier()
            if fn is None:
                continue
            t0 = time.perf_counter()
            fn()
            if it >= warmup:
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(t) for k, t in times.items()}


def _worker(rank, nranks, configs, spec, refdir, worlds):
    """All implementations and world sizes in one set of `nranks` processes: world w runs on ranks
    0..w-1 (a subgroup), sdpa on rank 0, all timed side by side. Returns, per configuration key,
    {"times": {mode: {"impl@w": s}}, "errors": {mode: {"w": {pair: err}}}, "na": {"impl@w": reason}}
    for what this rank took part in."""
    from tqdm import tqdm
    torch.manual_seed(0)
    groups = {w: dist.group.WORLD if w == nranks else dist.new_group(list(range(w))) for w in sorted(worlds)}
    out = {}
    bar = tqdm(total=len(configs) * len(spec["modes"]), desc=f"ranks {nranks}", unit="run",
               disable=rank != 0 or not spec["progress"], leave=True, dynamic_ncols=True)
    for dtype, seqlen, causal in configs:
        key = _key(dtype, seqlen, causal)
        full = _full_inputs(spec, dtype, seqlen)
        entry = {"times": {}, "errors": {}, "na": {}}
        builds = {}  # (impl, w) -> (positions, {mode: fn}, results), or None: not on this rank
        for w in worlds:
            for impl, build in (("ours", lambda: _build_ours(rank, w, groups[w], full, causal)),
                                ("torch", lambda: _build_torch(rank, w, groups[w], full, causal,
                                                               spec["torch_rotate"]))):
                builds[(impl, w)] = None
                if rank < w:
                    try:
                        builds[(impl, w)] = build()
                    except Exception as e:  # noqa: BLE001 (symmetric on the group's ranks)
                        entry["na"][f"{impl}@{w}"] = _short(e)
        builds[("sdpa", 1)] = _build_sdpa(full, causal) if rank == 0 else None
        ref_path = os.path.join(refdir, key + ".pt")
        for mode in spec["modes"]:
            # first call of each: a support check (e.g. bf16 "not supported") and the first warmup
            for (impl, w), b in builds.items():
                dist.barrier()
                if b is None or f"{impl}@{w}" in entry["na"]:
                    continue
                try:
                    b[1][mode]()
                except Exception as e:  # noqa: BLE001
                    entry["na"][f"{impl}@{w}"] = _short(e)
                    if os.environ.get("BENCH_RING_TRACE"):
                        traceback.print_exc()
            gathered = [None] * nranks
            dist.all_gather_object(gathered, entry["na"])
            for na in gathered:
                entry["na"].update(na)
            fns = {k: (b[1][mode] if b is not None else None) for k, b in builds.items()
                   if f"{k[0]}@{k[1]}" not in entry["na"]}
            medians = _run_mode(fns, spec["iters"], max(spec["warmup"] - 1, 0))
            entry["times"][mode] = {f"{i}@{w}": t for (i, w), t in medians.items()}

            # checks, on the results of the last timed calls
            held = {k: b for k, b in builds.items() if b is not None and k in medians}
            if ("sdpa", 1) in held:
                sdpa = dict(held[("sdpa", 1)][2])
                if mode == "fwd":
                    sdpa = {"out": sdpa["out"]}
                if dtype == "float32":
                    ref = sdpa
                else:  # the reference: fp32 SDPA on the same (bf16-rounded) inputs
                    _, ref_fns, ref_res = _build_sdpa([t.float() for t in full], causal)
                    ref_fns[mode]()
                    ref = {n: t for n, t in ref_res.items() if n in sdpa}
                torch.save({"sdpa": sdpa, "ref": ref}, ref_path)
            dist.barrier()
            saved = torch.load(ref_path) if os.path.exists(ref_path) else {}
            entry["errors"][mode] = {}
            for w in worlds:
                if rank >= w:
                    continue
                results, positions = dict(saved), {n: torch.arange(seqlen) for n in saved}
                for impl in ("ours", "torch"):
                    if (impl, w) in held:
                        pos, _, res = held[(impl, w)]
                        results[impl] = {n: t for n, t in res.items() if mode != "fwd" or n == "out"}
                        positions[impl] = pos
                entry["errors"][mode][str(w)] = _compare(results, positions, PAIRS)
            dist.barrier()
            if rank == 0 and os.path.exists(ref_path):
                os.remove(ref_path)
            bar.update(1)
        out[key] = entry
        del builds, full
    bar.close()
    return out


def _limit(pair: str, tol: float) -> float:
    """ours vs the reference must be within tol; PyTorch's results vs the reference and every cross
    pair within 2 * tol (ATen's bf16 flash backward alone reaches ~2e-2 max-relative at 16K tokens)."""
    return tol if pair == "ours~ref" else 2 * tol


def _flops(spec, seqlen, causal, mode):
    f = 4 * spec["batch"] * seqlen ** 2 * spec["heads"] * spec["headdim"] * (0.5 if causal else 1.0)
    return f * (3.5 if mode == "fwd+bwd" else 1.0)


def _fmt_ms(t):
    return "n/a" if t is None else f"{t * 1e3:.1f}"


def main(argv=None) -> int:
    p = h.parser(__doc__, json_default="bench_out/ring.json")
    strs = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    p.add_argument("--worlds", type=h.positive_ints, default=None, help="world sizes (default 1,2; --full 1,2,4)")
    p.add_argument("--seqlens", type=h.positive_ints, default=None, help="total tokens (default 8192; --full 2K-16K)")
    p.add_argument("--dtypes", type=strs, default=["float32", "bfloat16"])
    p.add_argument("--modes", type=strs, default=list(MODES))
    p.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    p.add_argument("--batch", type=h.positive_int, default=1)
    p.add_argument("--heads", type=h.positive_int, default=4)
    p.add_argument("--headdim", type=h.positive_int, default=64)
    p.add_argument("--torch-rotate", choices=["allgather", "alltoall"], default="allgather",
                   help="PyTorch's K/V rotate method (their default: allgather)")
    p.add_argument("--png", default="bench_out/ring.png")
    p.add_argument("--md", default=None, help="also write the table as markdown to this file")
    p.add_argument("--full", action="store_true", help="worlds 1,2,4 x seqlens 2048..16384 (long)")
    p.add_argument("--quick", action="store_true", help="tiny smoke sweep")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    h.set_fp32_precision(args)

    if args.quick:
        args.worlds = args.worlds or [1, 2]
        args.seqlens = args.seqlens or [256]
        args.iters, args.warmup = min(args.iters, 2), 0
    elif args.full:
        args.worlds = args.worlds or [1, 2, 4]
        args.seqlens = args.seqlens or [2048, 4096, 8192, 16384]
    args.worlds = args.worlds or [1, 2]
    args.seqlens = args.seqlens or [8192]
    args.causal = {"both": [False, True], "yes": [True], "no": [False]}[args.causal]
    for d in args.dtypes:
        if d not in TOL:
            p.error(f"unsupported dtype {d!r} (float32, bfloat16)")
    for m in args.modes:
        if m not in MODES:
            p.error(f"unknown mode {m!r} (fwd, fwd+bwd)")
    for w in args.worlds:
        for s in args.seqlens:
            if s % (2 * w):
                p.error(f"seqlen {s} is not divisible by 2*world ({2 * w})")

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    spec = {"batch": args.batch, "heads": args.heads, "headdim": args.headdim, "iters": args.iters,
            "warmup": args.warmup, "modes": args.modes, "torch_rotate": args.torch_rotate,
            "progress": not args.no_progress}
    configs = _configs(args)
    nominal, peak = h.core_peak_gflops(), h.measured_peak_gflops()
    mach = h.machine()
    print(f"{mach['cpu']}, {mach['cores']} cores, {mach['cpu_mhz']:.0f} MHz, torch {mach['torch']}, "
          f"load average {mach['loadavg']}, float32 matmul precision {mach['fp32_precision']}; one core's fp32 peak: {peak:.1f} GFLOP/s measured "
          f"(FMA loop), {nominal:.1f} nominal")

    nranks = max(args.worlds)
    with tempfile.TemporaryDirectory(prefix="bench_ring_") as refdir:
        t0 = h.cpu_snapshot()
        per_rank = h.run_ranks(nranks, _worker, configs, spec, refdir, sorted(args.worlds))
        foreign = h.foreign_load(t0, h.cpu_snapshot())
    print(f"CPU used by other programs during the run: {foreign:.2f} cores on average"
          + ("  <- numbers disturbed" if foreign > 0.1 else ""))

    rows, raw = [], []
    failed = False
    for dtype, seqlen, causal in configs:
        key = _key(dtype, seqlen, causal)
        for mode in args.modes:
            sdpa_t = per_rank[0][key]["times"][mode].get("sdpa@1")
            t1 = {}
            for w in sorted(args.worlds):
                ranks = [r[key] for r in per_rank[:w]]
                na = {k: v for k, v in ranks[0]["na"].items() if k.endswith(f"@{w}") or k == "sdpa@1"}
                t = {i: max(r["times"][mode][f"{i}@{w}"] for r in ranks)
                     if f"{i}@{w}" in ranks[0]["times"][mode] else None for i in ("ours", "torch")}
                if w == 1:
                    t1 = t
                errs = {}
                for r in ranks:
                    for pair, e in r["errors"][mode].get(str(w), {}).items():
                        errs[pair] = max(errs.get(pair, 0.0), e)
                tol = TOL[dtype]
                bad = [pr for pr, e in errs.items() if not e <= _limit(pr, tol)]  # NaN fails too
                ok = bool(errs) and not bad
                failed |= bool(errs) and not ok
                cross = [errs[f"{a}~{b}"] for a, b in CROSS_PAIRS if f"{a}~{b}" in errs]
                fmt_err = lambda pr: f"{errs[pr]:.1e}" if pr in errs else "n/a"  # noqa: E731
                fl = _flops(spec, seqlen, causal, mode)
                eff = {i: (t1[i] / (w * t[i]) if t1.get(i) and t[i] else None) for i in ("ours", "torch")}
                rows.append({
                    "dtype": {"float32": "fp32", "bfloat16": "bf16"}[dtype], "seq": seqlen,
                    "mask": "causal" if causal else "full", "mode": mode, "world": w,
                    "ours ms": _fmt_ms(t["ours"]), "torch ms": _fmt_ms(t["torch"]), "sdpa ms": _fmt_ms(sdpa_t),
                    "torch/ours": f"{t['torch'] / t['ours']:.2f}x" if t["ours"] and t["torch"] else "n/a",
                    "ours GF/s": f"{fl / t['ours'] / 1e9:.1f}" if t["ours"] else "n/a",
                    "ours %pk": f"{100 * fl / (w * t['ours']) / 1e9 / peak:.0f}%" if t["ours"] else "n/a",
                    "torch GF/s": f"{fl / t['torch'] / 1e9:.1f}" if t["torch"] else "n/a",
                    "sdpa GF/s": f"{fl / sdpa_t / 1e9:.1f}" if sdpa_t else "n/a",
                    "ours eff": f"{eff['ours']:.3f}" if eff["ours"] else "-",
                    "torch eff": f"{eff['torch']:.3f}" if eff["torch"] else "-",
                    "err ours": fmt_err("ours~ref"), "err torch": fmt_err("torch~ref"),
                    "err sdpa": fmt_err("sdpa~ref"), "err cross": f"{max(cross):.1e}" if cross else "n/a",
                    "check": ("ok" if ok else "FAIL " + ",".join(bad)) if errs else "n/a",
                })
                raw.append({"dtype": dtype, "seqlen": seqlen, "causal": causal, "mode": mode, "world": w,
                            "ms": {"ours": t["ours"] and t["ours"] * 1e3, "torch": t["torch"] and t["torch"] * 1e3,
                                   "sdpa": sdpa_t and sdpa_t * 1e3},
                            "per_rank_ms": {i: [r["times"][mode].get(f"{i}@{w}", float("nan")) * 1e3
                                                for r in ranks] for i in ("ours", "torch")},
                            "gflops": fl / 1e9, "efficiency": eff, "errors": errs, "tolerance": TOL[dtype],
                            "check": rows[-1]["check"], "na": na})
                for impl, why in na.items():
                    print(f"note: {impl} n/a for {key} {mode} world {w}: {why}")

    print(f"\nRing attention on CPU over gloo: batch {args.batch}, {args.heads} heads, dim {args.headdim}, "
          f"1 thread per rank, median of {args.iters} (slowest rank); sdpa = one process, 1 thread; "
          f"torch rotate = {args.torch_rotate}; %pk of {peak:.1f} GFLOP/s per core (measured)")
    h.print_table(rows, list(rows[0].keys()))
    if args.md:
        os.makedirs(os.path.dirname(os.path.abspath(args.md)), exist_ok=True)
        with open(args.md, "w") as f:
            f.write(h.markdown_table(rows, list(rows[0].keys())))
        print(f"wrote {args.md}")
    mach["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    mach["foreign_cores_busy"] = round(foreign, 3)
    h.write_json(args.json, {"machine": mach, "core_peak_gflops": nominal, "measured_peak_gflops": peak,
                             "args": {k: v for k, v in vars(args).items()}, "rows": raw})
    if args.png:
        _plot(raw, args, mach, args.png)
    if failed:
        print("FAIL: some results disagree beyond tolerance", file=sys.stderr)
    return 1 if failed else 0


def _plot(raw, args, mach, path):
    """One panel per (mode, causal): ms vs sequence length per implementation, world and dtype
    (grouped bars when the sweep has a single sequence length)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [(m, c) for m in args.modes for c in args.causal]
    fig, axes = plt.subplots(len(args.modes), len(args.causal), squeeze=False,
                             figsize=(5.5 * len(args.causal), 3.8 * len(args.modes)))
    colors = {"ours": "tab:blue", "torch": "tab:orange", "sdpa": "tab:green"}
    markers = {1: "o", 2: "s", 4: "^", 8: "D"}
    styles = {"float32": "-", "bfloat16": "--"}
    short = {"float32": "fp32", "bfloat16": "bf16"}
    lines = [("sdpa", 1)] + [(i, w) for i in ("ours", "torch") for w in args.worlds]
    bars = len(args.seqlens) == 1
    for (mode, causal), ax in zip(panels, axes.flat):
        if bars:
            groups = [(d, w) for d in args.dtypes for w in args.worlds]
            width = 0.8 / 3
            for gi, (dtype, w) in enumerate(groups):
                for ii, impl in enumerate(IMPLS):
                    r = next((r for r in raw if r["mode"] == mode and r["causal"] == causal
                              and r["dtype"] == dtype and r["world"] == w), None)
                    ms = r and r["ms"][impl]
                    if ms and not (impl == "sdpa" and w != 1):
                        ax.bar(gi + (ii - 1) * width, ms, width, color=colors[impl],
                               label=impl if gi == 0 or (impl == "sdpa" and w == 1) else None)
                        ax.annotate(f"{ms:.0f}" if ms >= 10 else f"{ms:.2g}", (gi + (ii - 1) * width, ms),
                                    ha="center", va="bottom", fontsize=6)
            ax.set_xticks(range(len(groups)), [f"{short[d]}\n{w} rank{'s' if w > 1 else ''}" for d, w in groups])
            ax.set_xlabel(f"{args.seqlens[0]} tokens")
        else:
            for dtype in args.dtypes:
                sel = [r for r in raw if r["mode"] == mode and r["causal"] == causal and r["dtype"] == dtype]
                for impl, w in lines:
                    pts = sorted((r["seqlen"], r["ms"][impl]) for r in sel if r["world"] == w and r["ms"][impl])
                    if pts:
                        ax.plot([x for x, _ in pts], [y for _, y in pts], styles[dtype],
                                marker=markers.get(w, "x"), color=colors[impl],
                                label=impl + ("" if impl == "sdpa" else f" x{w}") + f" {short[dtype]}")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(args.seqlens, [f"{s // 1024}K" if s >= 1024 else str(s) for s in args.seqlens])
            ax.set_xlabel("total sequence length (tokens)")
        ax.set_ylabel("ms (slowest rank's median)")
        ax.set_title(f"{mode}, {'causal' if causal else 'non-causal'}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = {}, []
    for ax in axes.flat:
        for hd, lb in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lb, hd)
    fig.legend(list(handles.values()), list(handles.keys()), loc="lower center",
               ncol=min(len(handles), 6), fontsize=8, frameon=False)
    fig.suptitle(f"Ring attention on CPU over gloo, 1 thread per rank, batch {args.batch}, {args.heads} heads, "
                 f"dim {args.headdim}\n{mach['cpu']}, {mach['cores']} cores, torch {mach['torch']}, {mach['date']}",
                 fontsize=9)
    rows_of_legend = math.ceil(len(handles) / 6)
    fig.tight_layout(rect=(0, 0.03 + 0.03 * rows_of_legend, 1, 1))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
