"""Smoke runs of the Python benchmarks at tiny sizes: they run, check their own results and write
the JSON they document. Counts are asserted, never times."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script, *args, timeout=240):
    """Runs `script` (a path from the repository root) and returns its stdout; it must exit 0."""
    cmd = [sys.executable, os.path.join(ROOT, script), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout


def _run_json(tmp_path, script, *args):
    """_run of `script` with --json into tmp_path; returns (stdout, the JSON it wrote)."""
    out = tmp_path / os.path.basename(script).replace(".py", ".json")
    stdout = _run(script, *args, "--json", str(out))
    return stdout, json.loads(out.read_text())


def test_bench_window_truncates_the_ring(tmp_path):
    stdout, res = _run_json(tmp_path, "benchmarks/ring/bench_window.py", "--world", "4", "--seqlen",
                            "256", "--iters", "1", "--warmup", "0")
    assert "window / full time" in stdout
    assert res["window"] == 32
    full, windowed = res["rows"]
    # 4 contiguous shards of 64 tokens: causal, block j travels to the 3 - j ranks after it (6
    # hops); a window of 32 reaches back one shard: one hop per block but the last rank's.
    assert full["fwd exchanges"] == 6 and windowed["fwd exchanges"] == 3
    assert full["blocks per rank"] == "1/2/3/4" and windowed["blocks per rank"] == "1/2/2/2"
    assert res["max_abs_err"] < 1e-5


def test_bench_decode_reports_every_cache_length(tmp_path):
    stdout, res = _run_json(tmp_path, "benchmarks/ring/bench_decode.py", "--world", "3",
                            "--cache-lens", "7,300", "--iters", "1", "--warmup", "0", "--dtype",
                            "float32")
    assert "max |err| vs float64" in stdout
    assert [row["cache tokens"] for row in res["rows"]] == [7, 300]
    assert all(float(row["ours, world 3 ms"]) > 0 for row in res["rows"])
    assert res["max_abs_err"] < 1e-4


def test_bench_memory_reports_every_strategy_and_length(tmp_path):
    stdout, res = _run_json(tmp_path, "benchmarks/ring/bench_memory.py", "--world", "2",
                            "--seqlens", "1024,4096", "--heads", "4", "--heads-kv", "2",
                            "--headdim", "32")
    assert "Peak memory growth per rank" in stdout
    assert [(row["strategy"], row["tokens"]) for row in res["rows"]] == [
        (name, n) for name in ("ring", "allgather", "ulysses") for n in (1024, 4096)]
    assert res["failures"] == []
    # 512 tokens per rank, 2 K/V heads of 32 float32: a 256 KiB K/V block.
    assert res["rows"][0]["KV MB"] == "0.2"


def test_bench_ring_quick_checks_all_implementations(tmp_path):
    stdout, res = _run_json(tmp_path, "benchmarks/ring/bench_ring.py", "--quick", "--no-progress",
                            "--fp32-precision", "high", "--png", str(tmp_path / "ring.png"))
    assert res["rows"], "no rows written"
    assert res["machine"]["fp32_precision"] == "high" and "precision high" in stdout
    assert (tmp_path / "ring.png").stat().st_size > 0


def test_bench_efficiency_runs_the_chosen_cases(tmp_path):
    stdout, res = _run_json(tmp_path, "benchmarks/ring/bench_efficiency.py", "--seqlen", "256",
                            "--iters", "1", "--warmup", "0", "--memory-seqlen", "256", "--cases",
                            "non-causal,zigzag")
    assert [row["case"] for row in res["efficiency"]] == ["non-causal", "causal zigzag"]
    for row in res["efficiency"]:
        for phase in ("fwd", "fwd+bwd"):
            for col in ("eff", "ceiling", "steps"):
                assert float(row[f"{phase} {col}"]) > 0
            assert float(row[f"{phase} exch ms"]) > 0
            assert 0 <= float(row[f"{phase} hidden"]) <= 1
    assert res["checks"]["kernels"] < 1e-4 and res["checks"]["steps"] < 1e-4
    assert res["checks"]["exchange"] == 0
    assert len(res["memory_peak_bytes"]) == 2


def test_bench_cpu_vs_sdpa_checks_against_sdpa(tmp_path):
    stdout, res = _run_json(tmp_path, "benchmarks/kernels/bench_cpu_vs_sdpa.py", "--seqlen", "97",
                            "--heads", "2", "--iters", "1", "--warmup", "0")
    assert "check: ring vs sdpa" in stdout and "ok" in stdout
    assert [r["case"] for r in res["rows"]] == ["non-causal fwd", "non-causal fwd+bwd", "causal fwd",
                                               "causal fwd+bwd"]
    assert res["max_rel_err"] < 1e-4 and res["machine"]["fp32_precision"] == "highest"


def test_demo_runs_and_passes_its_check():
    stdout = _run("examples/demo.py", "--world", "2", "--seqlen", "196")
    assert stdout.rstrip().endswith("PASS")
    rows = [line.split() for line in stdout.splitlines() if line.startswith(("   0 ", "   1 "))]
    assert len(rows) == 2  # one row per rank
    # 98 tokens per rank: the measured peak is the ring's few hundred KB, not first-call costs
    # (the warm-up runs the backward as the timed call does)
    assert all(int(row[4]) < 16 for row in rows), stdout


def test_hidden_fraction_is_the_clamped_overlap():
    sys.path.insert(0, ROOT)
    from benchmarks import harness as h
    assert h.hidden_fraction(ring=10.0, compute=10.0, exchange=2.0) == 1.0   # all hidden
    assert h.hidden_fraction(ring=12.0, compute=10.0, exchange=2.0) == 0.0   # none hidden
    assert abs(h.hidden_fraction(ring=11.5, compute=10.0, exchange=2.0) - 0.25) < 1e-12
    assert h.hidden_fraction(ring=13.0, compute=10.0, exchange=2.0) == 0.0   # clamped
    assert h.hidden_fraction(ring=1.0, compute=1.0, exchange=0.0) == 1.0     # nothing to hide


def test_bench_cuda_check_fails_off_sdpa_or_without_it():
    """bench_cuda's check of its GPU rows: the forward within the bound of SDPA's, and compared."""
    sys.path.insert(0, ROOT)
    from benchmarks.kernels import bench_cuda
    rows = [{"max_abs_diff": None}, {"max_abs_diff": 3.9e-3}, {"max_abs_diff": 1e-3}]
    assert bench_cuda.sdpa_check(rows) == (3.9e-3, True)
    assert bench_cuda.sdpa_check(rows + [{"max_abs_diff": 0.5}]) == (0.5, False)
    assert not bench_cuda.sdpa_check([{"max_abs_diff": None}])[1]


def test_bench_cuda_table_names_the_shared_memory_cap():
    """bench_cuda's table says when RING_ATTN_CUDA_MAX_SMEM_KIB picked the kernels it timed."""
    from benchmarks.kernels import bench_cuda
    rows = _bench_cuda_rows({("ring block_bwd", "bwd"): 1.0})
    assert "RING_ATTN_CUDA_MAX_SMEM_KIB=99)" in bench_cuda.markdown(rows, "card", "auto", "99")
    for unset in ("", "0"):
        assert "MAX_SMEM" not in bench_cuda.markdown(rows, "card", "auto", unset)


def _bench_cuda_rows(ms, d=128, s=8192, causal=False):
    """bench_cuda rows of one configuration, from {(impl, direction): ms or None}."""
    return [dict(headdim=d, seqlen=s, batch=2, heads=16, causal=causal, impl=impl, direction=dir_,
                 ms=t, tflops=None, note="") for (impl, dir_), t in ms.items()]


def test_compare_builds_matches_rows_of_either_benchmark_version(tmp_path):
    """compare_builds reads the old and new bench_cuda JSON, keeps the rows timed in both and
    computes speedup, each run's ratio to SDPA flash and SDPA's drift from their times."""
    import random
    t = {name: random.uniform(0.5, 30.0) for name in ("old fwd", "new fwd", "old bwd", "new bwd",
                                                     "old flash fwd", "new flash fwd",
                                                     "old flash bwd", "new flash bwd", "causal")}
    baseline = {"device": "card", "torch": "2.11.0", "rows": _bench_cuda_rows({
        ("ring block_fwd", "fwd"): t["old fwd"], ("ring block_bwd", "bwd"): t["old bwd"],
        ("ring block_bwd deterministic", "bwd"): 1.0,  # not in the new run
        ("sdpa flash", "fwd"): t["old flash fwd"], ("sdpa flash", "bwd"): t["old flash bwd"],
        ("sdpa cudnn", "fwd"): None}) + _bench_cuda_rows({("ring block_fwd", "fwd"): 2.0}, causal=True)}
    new = {"machine": {}, "device": "card", "kernel": "auto", "rows": _bench_cuda_rows({
        ("ring block_fwd", "fwd"): t["new fwd"], ("ring block_fwd nomerge", "fwd"): 1.0,
        ("ring block_bwd", "bwd"): t["new bwd"],
        ("sdpa flash", "fwd"): t["new flash fwd"], ("sdpa flash", "bwd"): t["new flash bwd"],
        ("sdpa cudnn", "fwd"): 1.0}) + _bench_cuda_rows({("ring block_fwd", "fwd"): t["causal"]},
                                                         causal=True)}
    (tmp_path / "old.json").write_text(json.dumps(baseline))
    (tmp_path / "new.json").write_text(json.dumps(new))
    stdout, res = _run_json(tmp_path, "benchmarks/kernels/compare_builds.py",
                            str(tmp_path / "old.json"), str(tmp_path / "new.json"))
    assert "check: 3 rows of ours timed in both runs: ok" in stdout
    rows = {(r["mask"], r["impl"], r["dir"]): r for r in res["rows"]}
    assert sorted(rows) == [("causal", "ring block_fwd", "fwd"), ("full", "ring block_bwd", "bwd"),
                            ("full", "ring block_fwd", "fwd")]
    for dir_ in ("fwd", "bwd"):
        row = rows[("full", f"ring block_{dir_}", dir_)]
        assert row["speedup"] == round(t[f"old {dir_}"] / t[f"new {dir_}"], 3)
        assert row["vs flash"] == round(t[f"new flash {dir_}"] / t[f"new {dir_}"], 3)
        assert row["baseline vs flash"] == round(t[f"old flash {dir_}"] / t[f"old {dir_}"], 3)
    causal = rows[("causal", "ring block_fwd", "fwd")]
    assert causal["speedup"] == round(2.0 / t["causal"], 3) and causal["vs flash"] == "-"
    drift = {r["dir"]: r["drift"] for r in res["sdpa"]}
    assert [r["impl"] for r in res["sdpa"]] == ["sdpa flash", "sdpa flash"]  # cuDNN: one time only
    assert drift == {d: round(t[f"new flash {d}"] / t[f"old flash {d}"], 3) for d in ("fwd", "bwd")}
    assert (tmp_path / "compare_builds.md").read_text().startswith("# This build vs the baseline build (card)")

    # No row of ours in both runs: the check fails.
    (tmp_path / "other.json").write_text(json.dumps({"rows": _bench_cuda_rows(
        {("ring block_fwd", "fwd"): 1.0}, d=64)}))
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks/kernels/compare_builds.py"),
                           str(tmp_path / "old.json"), str(tmp_path / "other.json"), "--json",
                           str(tmp_path / "none.json")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "FAILED" in done.stdout


def test_bench_strategies_checks_same_work(tmp_path):
    stdout, res = _run_json(tmp_path, "benchmarks/strategies/bench_strategies.py", "--worlds", "2",
                            "--seqlen", "64", "--iters", "1", "--warmup", "0")
    assert "allgather + U2" in stdout
    assert [row["strategy"] for row in res["rows"]] == ["ring", "allgather", "ring + U2",
                                                        "allgather + U2"]
    assert all(row["check"] == "ok" for row in res["rows"])
    # 64 tokens, 2 K/V heads of 64 float32 on 2 ranks: one 32 KiB K/V block forward, it and its
    # dK/dV backward; ring and all-gather send the same.
    assert [row["MB sent / rank"] for row in res["rows"][:2]] == [round(3 * 32768 / 2**20, 2)] * 2


def test_bench_packed_checks_and_counts(tmp_path):
    stdout, res = _run_json(tmp_path, "benchmarks/strategies/bench_packed.py", "--worlds", "2",
                            "--total", "1024", "--min-len", "16", "--max-len", "512", "--iters",
                            "1", "--warmup", "0")
    assert "max |err| between variants" in stdout
    assert sum(res["lengths"]) == 1024 and res["max_abs_err"] < 1e-5
    rows = {row["variant"]: row for row in res["rows"]}
    # Two ranks: zigzag computes every document on both ranks, both blocks each; the packed
    # stream crosses one rank boundary (one more block); one device per document sends nothing.
    assert rows["zigzag"]["fwd blocks"] == 4 and rows["zigzag"]["steps"] == 2
    assert rows["packed"]["fwd blocks"] <= 3
    assert float(rows["packed"]["fwd MB sent"]) <= float(rows["zigzag"]["fwd MB sent"])
    assert rows["per-document"]["fwd blocks"] == 2 and float(rows["per-document"]["fwd+bwd MB sent"]) == 0


def test_bench_strategies_local_ring_checks_same_work(tmp_path):
    stdout, res = _run_json(tmp_path, "benchmarks/strategies/bench_strategies.py", "--local-ring",
                            "cpu", "--worlds", "2,4", "--seqlen", "64", "--iters", "1", "--warmup",
                            "0")
    assert "MB sent / rank (total / W)" in stdout and "FAIL" not in stdout
    assert res["device"] == "LocalRing cpu" and res["args"]["local_ring"] == "cpu"
    assert [(row["world"], row["strategy"]) for row in res["rows"]] == [
        (2, "ring"), (2, "allgather"), (2, "ring + U2"), (2, "allgather + U2"),
        (4, "ring"), (4, "allgather"), (4, "ring + U2"), (4, "allgather + U2"), (4, "ulysses U4")]
    assert all(row["device"] == "LocalRing cpu" and row["check"] == "ok" for row in res["rows"])
    # 64 tokens, 8 heads and 2 K/V heads of 64 float32, causal zigzag: the ring sends its K/V
    # block forward, it and its dK/dV backward, W - 1 hops each; the all-gather the same. Ulysses
    # U sends (U - 1) / U of q, k, v, out forward and dout, dq, dk, dv backward (K/V heads repeated
    # to lcm(U, 2)); its ring of W / U ranks carries U times the tokens and 1/U of the K/V heads.
    def kv_block(tokens, heads_kv):
        return 2 * tokens * heads_kv * 64 * 4

    def all_to_all(tokens, ulysses, repeat=1):
        return 4 * (tokens * 8 + repeat * tokens * 2) * 64 * 4 // ulysses * (ulysses - 1)

    expected = {(2, "ring"): 3 * kv_block(32, 2), (2, "ring + U2"): all_to_all(32, 2),
                (4, "ring"): 9 * kv_block(16, 2),
                (4, "ring + U2"): 3 * kv_block(32, 1) + all_to_all(16, 2),
                (4, "ulysses U4"): all_to_all(16, 4, repeat=2)}
    expected.update({(w, name.replace("ring", "allgather")): b for (w, name), b in expected.items()
                     if name != "ulysses U4"})
    for row in res["rows"]:
        mb = round(expected[row["world"], row["strategy"]] / 2**20, 2)
        assert row["MB sent / rank (total / W)"] == mb, row


def test_bench_packed_local_ring_checks_and_counts(tmp_path):
    stdout, res = _run_json(tmp_path, "benchmarks/strategies/bench_packed.py", "--local-ring",
                            "cpu", "--worlds", "2,4", "--total", "1024", "--min-len", "16",
                            "--max-len", "512", "--iters", "1", "--warmup", "0")
    assert "LocalRing on cpu" in stdout and "max |err| between variants" in stdout
    assert res["device"] == "LocalRing cpu" and res["max_abs_err"] < 1e-5
    assert all(row["device"] == "LocalRing cpu" for row in res["rows"])
    rows = {(row["world"], row["variant"]): row for row in res["rows"]}
    # As over gloo ranks: zigzag computes every document on every rank, every block pair; the
    # packed stream crosses W - 1 rank boundaries; one device per document sends nothing.
    for world in (2, 4):
        zigzag, packed, alone = (rows[world, v] for v in ("zigzag", "packed", "per-document"))
        assert zigzag["fwd blocks"] == world * world and zigzag["steps"] == world
        assert world < packed["fwd blocks"] <= 2 * world - 1
        assert 0 < float(packed["fwd MB sent"]) < float(zigzag["fwd MB sent"])
        # backward: the K/V again, and their dK/dV (float32, as large) back
        assert abs(float(zigzag["fwd+bwd MB sent"]) - 3 * float(zigzag["fwd MB sent"])) < 0.02
        assert alone["fwd blocks"] == world and float(alone["fwd+bwd MB sent"]) == 0


@pytest.mark.parametrize("command,message", [
    ("examples/demo.py --world 0", "argument --world: must be a positive integer, got 0"),
    ("benchmarks/ring/bench_ring.py --worlds 2,0", "argument --worlds: must be a positive integer"),
    ("benchmarks/kernels/bench_cpu_vs_sdpa.py --seqlen 0", "argument --seqlen: must be a positive"),
    ("benchmarks/strategies/bench_strategies.py --worlds 3 --seqlen 256",
     "--seqlen 256 is not divisible by 2 x world (6)"),
    ("benchmarks/strategies/bench_packed.py --heads -1", "argument --heads: must be a positive"),
    ("examples/demo.py --world 3 --seqlen 100", "--seqlen 100 is not divisible by 6"),
    ("benchmarks/ring/bench_window.py --world 3 --seqlen 100", "--seqlen 100 is not divisible by --world 3"),
    ("benchmarks/ring/bench_memory.py --world 2 --seqlens 1024,102", "--seqlens 102 is not divisible by 2 x world"),
    ("benchmarks/ring/bench_efficiency.py --cases causal", "--cases must name some of non-causal,"),
    ("benchmarks/strategies/bench_strategies.py --worlds 3 --seqlen 12", "world 3 and --heads 8 must divide by 2"),
    ("benchmarks/strategies/bench_packed.py --min-len 50 --max-len 10", "--min-len 50 is above --max-len 10"),
    ("benchmarks/kernels/bench_cpu_vs_sdpa.py --warmup -1", "argument --warmup: must be a non-negative"),
    ("benchmarks/kernels/bench_cuda.py --headdims 64,x", "argument --headdims: invalid positive_ints"),
    ("benchmarks/ring/bench_decode.py --heads 6 --heads-kv 4", "--heads 6 is not a multiple of --heads-kv 4"),
], ids=["demo", "bench_ring", "bench_cpu_vs_sdpa", "bench_strategies", "bench_packed", "demo_seqlen",
        "bench_window_seqlen", "bench_memory_seqlens", "bench_efficiency_cases", "bench_strategies_ulysses",
        "bench_packed_lengths",
        "harness_warmup", "bench_cuda_headdims", "bench_decode_heads"])
def test_bad_sizes_are_usage_errors(command, message):
    """Sizes that cannot run: exit status 2 and argparse's one-line error, not a traceback."""
    script, *args = command.split()
    done = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and message in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-2000:]


def test_local_ring_cuda_without_a_gpu_exits_2():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    for script in ("benchmarks/strategies/bench_strategies.py", "benchmarks/strategies/bench_packed.py"):
        done = subprocess.run([sys.executable, os.path.join(ROOT, script), "--local-ring", "cuda"],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and "no CUDA GPU" in done.stderr, done.stderr[-2000:]


def test_sanitize_case_runs_its_calls_on_the_cpu():
    """scripts/cuda_sanitize_case.py (the compute-sanitizer workload of scripts/gpu_check.sh) with
    `--device cpu`: every case's forward and backward, then the LocalRing, finite."""
    out = _run("scripts/cuda_sanitize_case.py", "--device", "cpu")
    lines = out.splitlines()
    assert sum(line.startswith("ok cpu ") for line in lines) == 5, out
    assert "d=256" in out and lines[-1] == "ok LocalRing world 2 zigzag fwd+bwd", out
