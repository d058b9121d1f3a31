"""What every Python benchmark shares: its command line, spawning gloo ranks (or the device of a
LocalRing), timing, the hidden fraction of an exchange, memory probes, the machine record, tables
and JSON.

A script in benchmarks/<group>/ imports it after putting the repository root on sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from benchmarks import harness as h
"""
import argparse
import json
import os
import platform
import resource
import socket
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def positive_int(text: str) -> int:
    """argparse type of sizes and counts: an int >= 1 (anything else is a usage error)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type of counts that may be 0 (untimed warm-up calls)."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text}")
    return value


def positive_ints(text: str) -> list:
    """argparse type of a comma-separated list of positive ints, e.g. "1,2,4"."""
    values = [positive_int(part) for part in text.split(",") if part]
    if not values:
        raise argparse.ArgumentTypeError("needs at least one value")
    return values


def parser(doc: str, *, json_default: str, iters: int = 5, warmup: int = 1) -> argparse.ArgumentParser:
    """The command line every benchmark starts from: --iters and --warmup (timed and untimed calls
    per point), --json (where the results go) and --fp32-precision; scripts add their own sizes."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=positive_int, default=iters, help="timed calls per point (medians reported)")
    p.add_argument("--warmup", type=non_negative_int, default=warmup, help="untimed calls before timing")
    p.add_argument("--json", default=json_default, help="write the results here")
    add_fp32_precision_arg(p)
    return p


def add_shape_args(parser, *, seqlen: int, heads: int = 4, headdim: int = 64,
                   world: int = None) -> None:
    """--seqlen (tokens of the whole sequence), --heads and --headdim, and --world (ranks) when a
    default is given."""
    if world is not None:
        parser.add_argument("--world", type=positive_int, default=world, help="ranks")
    parser.add_argument("--seqlen", type=positive_int, default=seqlen,
                        help="tokens of the whole sequence")
    parser.add_argument("--heads", type=positive_int, default=heads)
    parser.add_argument("--headdim", type=positive_int, default=headdim)


def add_fp32_precision_arg(parser) -> None:
    """--fp32-precision: torch.set_float32_matmul_precision for the run (the CPU kernel follows it
    for float32 inputs: highest = fp32, high = three bf16 planes on AMX, medium = one)."""
    parser.add_argument("--fp32-precision", choices=["highest", "high", "medium"], default="highest",
                        help="float32 matmul precision (torch's default: highest)")


def set_fp32_precision(args) -> None:
    torch.set_float32_matmul_precision(args.fp32_precision)


def _local_ring_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"LocalRing runs on cpu or cuda, not {name}")
    return device


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_local_ring_args(parser) -> None:
    """--local-ring DEVICE ("cuda", "cuda:N" or "cpu"): every world size as virtual ranks of one
    LocalRing on DEVICE instead of spawned gloo CPU ranks; --dtype of the inputs."""
    parser.add_argument("--local-ring", metavar="DEVICE", type=_local_ring_device, default=None,
                        help="run each world size as virtual ranks of one LocalRing on DEVICE "
                             "(cuda or cpu) instead of spawned gloo ranks")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None,
                        help="float32, or bfloat16 with --local-ring cuda (its kernels' dtypes)")


def local_ring_setup(parser, args):
    """(device, sync) of --local-ring (None, None for gloo ranks); sets --dtype's default
    (bfloat16 on CUDA, else float32), rejects float32 on CUDA, and runs the virtual ranks of a CPU
    LocalRing on one thread, as a gloo rank runs."""
    device = args.local_ring
    on_cuda = device is not None and device.type == "cuda"
    if args.dtype is None:
        args.dtype = "bfloat16" if on_cuda else "float32"
    if on_cuda and args.dtype == "float32":
        parser.error("--local-ring cuda: the CUDA kernels take bfloat16 or float16, not float32")
    if device is not None and device.type == "cpu":
        torch.set_num_threads(1)
    return device, (local_ring_sync(device) if device is not None else None)


def local_ring_sync(device: torch.device):
    """The sync callable of timed calls on `device`: torch.cuda.synchronize on CUDA, None on CPU.
    Exits with status 2 and a message when `device` is CUDA and no GPU is present."""
    if device.type != "cuda":
        return None
    if not torch.cuda.is_available():
        print(f"--local-ring {device}: no CUDA GPU is available here (torch.cuda.is_available() is "
              f"False); run on a machine with a GPU, or use --local-ring cpu", file=sys.stderr)
        raise SystemExit(2)
    return lambda: torch.cuda.synchronize(device)


def device_record(device) -> dict:
    """Where the ranks ran, for the JSON: "gloo cpu" (device None) or "LocalRing <device>", with
    the GPU's name on CUDA."""
    if device is None:
        return {"device": "gloo cpu"}
    record = {"device": f"LocalRing {device.type}"}
    if device.type == "cuda":
        record["gpu"] = torch.cuda.get_device_name(device)
    return record


def _entry(rank, world, port, threads, precision, fn, args, results):
    import ring_attention  # noqa: F401  (before init_process_group: docs/design.md, at exit)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(threads)
    torch.set_float32_matmul_precision(precision)
    try:
        results[rank] = fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_ranks(world: int, fn, *args, threads: int = 1):
    """Runs fn(rank, world, *args) on `world` spawned gloo ranks, with this process's float32
    matmul precision; returns the per-rank results."""
    results = mp.Manager().dict()
    precision = torch.get_float32_matmul_precision()
    mp.spawn(_entry, args=(world, free_port(), threads, precision, fn, args, results), nprocs=world)
    return [results[r] for r in range(world)]


def median_time(fn, iters: int, warmup: int, sync=None) -> float:
    """Median wall time of fn() in seconds; `sync` (e.g. a barrier) runs before each timed call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if sync:
            sync()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def median_times_interleaved(fns: dict, iters: int, warmup: int, sync=None) -> dict:
    """Median wall time (s) of each fn in `fns` (name -> fn), timed side by side: every iteration
    runs each fn once in turn (`sync`, e.g. a barrier, before each timed call), so load changes
    from elsewhere on the machine hit all of them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            if sync:
                sync()
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def median_times_synced(fns: dict, iters: int, warmup: int, sync=None) -> dict:
    """median_times_interleaved of fns that run on one device: `sync` (e.g. torch.cuda.synchronize)
    before each timed call and at its end, so that the time counts the device's queued work."""
    if sync is None:
        return median_times_interleaved(fns, iters, warmup)

    def synced(fn):
        def call():
            fn()
            sync()
        return call

    return median_times_interleaved({name: synced(fn) for name, fn in fns.items()}, iters, warmup, sync)


def hidden_fraction(ring: float, compute: float, exchange: float) -> float:
    """The fraction of the exchange time the ring hides under compute, the one overlap metric of
    every benchmark (Python, C++ and GPU):
        hidden = clamp((compute + exchange - ring) / exchange, 0, 1)
    with `ring` the time of the ring, `compute` its kernels alone and `exchange` its transfers alone."""
    if exchange <= 0:
        return 1.0
    return min(1.0, max(0.0, (compute + exchange - ring) / exchange))


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def rss_bytes() -> int:
    """This process's resident set size now (Linux)."""
    return _status_kib("VmRSS") * 1024


def reset_peak_rss() -> None:
    """Resets the kernel's peak-RSS counter (VmHWM) to the current RSS."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss_bytes() -> int:
    """Peak resident set size since the last reset_peak_rss()."""
    return _status_kib("VmHWM") * 1024


def _cpuinfo_field(name: str):
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith(name):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def core_peak_gflops(fma_units: int = 2) -> float:
    """One core's fp32 peak in GFLOP/s: 32 FLOP/cycle per AVX-512 FMA unit (16 lanes x 2), 16 with
    AVX2 only, times `fma_units`, at the clock /proc/cpuinfo reports ("cpu MHz")."""
    flags = (_cpuinfo_field("flags") or "").split()
    per_unit = 32 if "avx512f" in flags else 16
    mhz = float(_cpuinfo_field("cpu MHz") or 0.0)
    return per_unit * fma_units * mhz / 1e3


def measured_peak_gflops(seconds: float = 0.3) -> float:
    """One core's fp32 FMA rate measured now: independent FMAs on the vector width the CPU kernels
    use, at the clock the core runs at (turbo included), so the reachable peak; the nominal one
    (core_peak_gflops) takes /proc/cpuinfo's base clock."""
    import ring_attention  # noqa: F401  (registers the ops)
    return float(torch.ops.ring_attention.cpu_fma_peak_gflops(seconds))


def cpu_snapshot() -> tuple:
    """(wall s, machine busy CPU s from /proc/stat, this process's + its reaped children's CPU s)."""
    busy = float("nan")
    try:
        with open("/proc/stat") as f:
            vals = [int(x) for x in f.readline().split()[1:9]]
        busy = (sum(vals) - vals[3] - vals[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait
    except (OSError, ValueError):
        pass
    own = sum(getattr(resource.getrusage(w), a) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for a in ("ru_utime", "ru_stime"))
    return time.perf_counter(), busy, own


def foreign_load(start: tuple, end: tuple) -> float:
    """Average number of cores other programs kept busy between two cpu_snapshot()s (needs this
    process's children to have been reaped, as run_ranks does)."""
    wall = end[0] - start[0]
    return max(0.0, ((end[1] - start[1]) - (end[2] - start[2])) / wall) if wall > 0 else float("nan")


def machine() -> dict:
    cpu = _cpuinfo_field("model name") or platform.processor() or "unknown"
    flags = (_cpuinfo_field("flags") or "").split()
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "date": date.today().isoformat(),
            "cpu_mhz": float(_cpuinfo_field("cpu MHz") or 0.0), "avx512f": "avx512f" in flags,
            "loadavg": load, "fp32_precision": torch.get_float32_matmul_precision()}


def print_table(rows: list, columns: list) -> None:
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in columns]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(str(r[c]).rjust(w) for c, w in zip(columns, widths)))


def markdown_table(rows: list, columns: list) -> str:
    """The rows as a GitHub-flavoured markdown table (numbers right-aligned)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---:" for _ in columns) + "|"]
    lines += ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    print(f"wrote {path}")
