"""scripts/gpu_check.sh's baseline stage, run here with a stand-in cmake and a stand-in baseline
benchmark: it builds the baseline tree (not this one) for the extension alone, runs that tree's
own benchmark with that tree on the path and the bench stage's rows, and puts the two runs side
by side in the summary. The stage's real work needs a GPU; what it calls, and in which tree, is
what this checks."""
import json
import os
import random
import stat
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FAKE_CMAKE = """#!/bin/sh
echo "$*" >> "$FAKE_CMAKE_LOG"
[ "$1" = --version ] && echo "cmake version 3.31.6"
exit 0
"""

# A baseline benchmark: writes one configuration's rows (the times given in FAKE_BENCH_MS) where
# its command line says, in the JSON of its version, and records its arguments and path.
FAKE_BENCH = """import json, os, sys
from pathlib import Path
args = sys.argv[1:]
Path(os.environ["FAKE_BENCH_LOG"]).write_text(json.dumps(dict(
    args=args, pythonpath=os.environ.get("PYTHONPATH"), cwd=os.getcwd())))
fwd, flash = json.loads(os.environ["FAKE_BENCH_MS"])
rows = [dict(headdim=128, seqlen=8192, causal=False, impl=impl, direction="fwd", ms=ms)
        for impl, ms in (("ring block_fwd", fwd), ("sdpa flash", flash))]
out = Path(args[args.index("--json") + 1]) if "--json" in args else Path(args[args.index("--out") + 1]) / "bench.json"
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(json.dumps(dict(device="card", rows=rows)))
"""


def _executable(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.mark.parametrize("bench_path, quick", [("scripts/bench_cuda.py", False),
                                               ("benchmarks/kernels/bench_cuda.py", True)])
def test_baseline_stage_builds_the_baseline_tree_and_compares(tmp_path, bench_path, quick):
    base = tmp_path / "baseline-src"
    _executable(base / bench_path, FAKE_BENCH)
    _executable(tmp_path / "bin" / "cmake", FAKE_CMAKE)
    out = tmp_path / "out"
    out.mkdir()
    old_fwd, new_fwd, old_flash, new_flash = (random.uniform(1.0, 9.0) for _ in range(4))
    # This build's bench stage (not run here: no GPU) left its rows.
    (out / "bench.json").write_text(json.dumps(dict(device="card", kernel="auto", rows=[
        dict(headdim=128, seqlen=8192, causal=False, impl=impl, direction="fwd", ms=ms)
        for impl, ms in (("ring block_fwd", new_fwd), ("sdpa flash", new_flash))])))
    env = dict(os.environ, PATH=f"{tmp_path / 'bin'}:/usr/bin:/bin", PYTHON=sys.executable,
               GPU_CHECK_ONLY="baseline", GPU_CHECK_BASELINE=str(base),
               RING_ATTN_GPU_BUILD_DIR=str(tmp_path / "build"),
               FAKE_CMAKE_LOG=str(tmp_path / "cmake.log"), FAKE_BENCH_LOG=str(tmp_path / "bench.log"),
               FAKE_BENCH_MS=json.dumps([old_fwd, old_flash]))
    cmd = ["bash", os.path.join(ROOT, "scripts/gpu_check.sh"), str(out)] + (["--quick"] if quick else [])
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]

    summary = (out / "summary.md").read_text()
    assert "| baseline | pass |" in summary and "| bench | skipped: not in GPU_CHECK_ONLY" in summary
    speedup = round(old_fwd / new_fwd, 3)
    assert f"| {speedup} |" in summary  # compare.md in the summary
    row = json.loads((out / "compare.json").read_text())["rows"][0]
    assert row["speedup"] == speedup and row["vs flash"] == round(new_flash / new_fwd, 3)

    # The baseline tree configured and built for the extension alone, in a build folder of its own.
    configure, build = [line for line in (tmp_path / "cmake.log").read_text().splitlines()
                        if str(base) in line]
    assert f"-S {base} -B {base}/build-gpu-check" in configure and "-DRING_ATTN_CUDA=ON" in configure
    assert build.startswith(f"--build {base}/build-gpu-check") and build.endswith("--target _C")
    # Its benchmark ran from its tree, with that tree (not this one) on the path, on the rows of
    # this build's bench stage.
    bench = json.loads((tmp_path / "bench.log").read_text())
    assert bench["pythonpath"] == str(base) and bench["cwd"] == str(base)
    rows_args = ["--quick"] if quick else ["--headdims", "128", "--seqlens", "8192"]
    assert bench["args"][-len(rows_args):] == rows_args
