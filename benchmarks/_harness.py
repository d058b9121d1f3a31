"""Shared helpers for the Python benchmarks: spawning gloo ranks, timing, tables and JSON."""
import json
import os
import platform
import socket
import statistics
import time
from datetime import date

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, threads, fn, args, results):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(threads)
    try:
        results[rank] = fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_ranks(world: int, fn, *args, threads: int = 1):
    """Runs fn(rank, world, *args) on `world` spawned gloo ranks; returns the per-rank results."""
    results = mp.Manager().dict()
    mp.spawn(_entry, args=(world, free_port(), threads, fn, args, results), nprocs=world)
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


def machine() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "date": date.today().isoformat()}


def print_table(rows: list, columns: list) -> None:
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in columns]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(str(r[c]).rjust(w) for c, w in zip(columns, widths)))


def write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    print(f"wrote {path}")
