"""Smoke runs of the Python benchmarks at tiny sizes: they run, check their own results and write
the JSON they document. Counts are asserted, never times."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script, *args, timeout=240):
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", script), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout


def test_bench_window_truncates_the_ring(tmp_path):
    out = tmp_path / "window.json"
    stdout = _run("bench_window.py", "--world", "4", "--seqlen", "256", "--iters", "1", "--warmup", "0",
                  "--json", str(out))
    assert "window / full time" in stdout
    res = json.loads(out.read_text())
    assert res["window"] == 32
    full, windowed = res["rows"]
    # 4 contiguous shards of 64 tokens; a window of 32 reaches back one shard: one hop per rank.
    assert full["fwd exchanges"] == 12 and windowed["fwd exchanges"] == 4
    assert full["blocks per rank"] == "1/2/3/4" and windowed["blocks per rank"] == "1/2/2/2"
    assert res["max_abs_err"] < 1e-5


def test_bench_ring_quick_checks_all_implementations(tmp_path):
    out = tmp_path / "ring.json"
    stdout = _run("bench_ring.py", "--quick", "--no-progress", "--fp32-precision", "high", "--json", str(out),
                  "--png", str(tmp_path / "ring.png"))
    res = json.loads(out.read_text())
    assert res["rows"], "no rows written"
    assert res["machine"]["fp32_precision"] == "high" and "precision high" in stdout
    assert (tmp_path / "ring.png").stat().st_size > 0


def test_bench_efficiency_runs_the_chosen_cases(tmp_path):
    out = tmp_path / "efficiency.json"
    _run("bench_efficiency.py", "--seqlen", "256", "--iters", "1", "--warmup", "0",
         "--memory-seqlen", "256", "--cases", "non-causal,zigzag", "--json", str(out))
    res = json.loads(out.read_text())
    assert [row["case"] for row in res["efficiency"]] == ["non-causal", "causal zigzag"]
    for row in res["efficiency"]:
        for phase in ("fwd", "fwd+bwd"):
            for col in ("eff", "ceiling", "steps"):
                assert float(row[f"{phase} {col}"]) > 0
            assert float(row[f"{phase} exch ms"]) > 0
    assert res["checks"]["kernels"] < 1e-4 and res["checks"]["steps"] < 1e-4
    assert res["checks"]["exchange"] == 0
    assert len(res["memory_peak_bytes"]) == 2


def test_bench_packed_checks_and_counts(tmp_path):
    out = tmp_path / "packed.json"
    stdout = _run("bench_packed.py", "--worlds", "2", "--total", "1024", "--min-len", "16", "--max-len",
                  "512", "--iters", "1", "--warmup", "0", "--json", str(out))
    assert "max |err| between variants" in stdout
    res = json.loads(out.read_text())
    assert sum(res["lengths"]) == 1024 and res["max_abs_err"] < 1e-5
    rows = {row["variant"]: row for row in res["rows"]}
    # Two ranks: zigzag computes every document on both ranks, both blocks each; the packed
    # stream crosses one rank boundary (one more block); one device per document sends nothing.
    assert rows["zigzag"]["fwd blocks"] == 4 and rows["zigzag"]["steps"] == 2
    assert rows["packed"]["fwd blocks"] <= 3
    assert float(rows["packed"]["fwd MB sent"]) <= float(rows["zigzag"]["fwd MB sent"])
    assert rows["per-document"]["fwd blocks"] == 2 and float(rows["per-document"]["fwd+bwd MB sent"]) == 0
