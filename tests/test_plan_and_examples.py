"""The schedule picture (python -m ring_attention.plan) and the example training script."""
import itertools
import os
import re
import subprocess
import sys

import pytest
import torch

import ring_attention as ra
from ring_attention.plan import FULL, SKIP, main, make_plan
from ring_attention.testing import LocalRing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_zigzag_balances_causal_work_and_contiguous_does_not():
    assert make_plan(4, "zigzag", True, 64).imbalance() < 1.02
    assert make_plan(4, "striped", True, 64).imbalance() < 1.05
    contiguous = make_plan(4, "contiguous", True, 64)
    assert contiguous.imbalance() > 1.7
    # rank 0 sees only its own block; rank 3 all of them, fully except its own diagonal
    assert [b.kind for b in contiguous.blocks if b.rank == 0][1:] == [SKIP] * 3
    assert [b.kind for b in contiguous.blocks if b.rank == 3][1:] == [FULL] * 3


@pytest.mark.parametrize("layout,causal,window,seqlens", [
    ("contiguous", True, (16, 0), None), ("contiguous", True, (40, 0), None),
    ("contiguous", False, (8, 8), None), ("zigzag", True, (16, 0), None),
    ("striped", True, (-1, -1), [30, 1, 50]), ("contiguous", True, (-1, -1), [3, 9, 1, 70]),
    ("zigzag", True, (2, 0), None), ("striped", True, (0, 0), None),
    ("zigzag", True, (1, 0), [30, 1, 50]), ("zigzag", False, (2 ** 63 - 1, 2 ** 63 - 1), None)])
def test_plan_steps_agree_with_the_scheduler(layout, causal, window, seqlens):
    """The picture's ring steps and computed blocks equal what the C++ scheduler runs: under a
    narrow window zigzag and striped shards need no pair of some blocks, but the ring, which
    bounds a block by its lowest and highest key positions, still computes them."""
    world, local = 4, 16
    plan = make_plan(world, layout, causal, local, window, seqlens)
    ring = LocalRing(world)
    if seqlens is None:
        shards = ring.shard(torch.randn(1, world * local, 2, 8), layout=layout)
        ring.ring_attn_func(shards, shards, shards, causal=causal, window_size=window, layout=layout)
    else:
        cu = torch.tensor([0, *itertools.accumulate(seqlens)], dtype=torch.int32)
        shards = ring.shard_varlen(torch.randn(sum(seqlens), 2, 8), cu, layout=layout)
        ring.ring_attn_varlen_func(shards, shards, shards, cu, causal=causal, window_size=window,
                                   layout=layout)
    assert ra.last_ring_stats()["steps"] == plan.steps()
    assert ra.last_ring_stats()["blocks_computed"] == sum(b.kind != SKIP for b in plan.blocks)


def test_plan_cli_prints_table_and_draws(tmp_path):
    png = tmp_path / "plan.png"
    result = subprocess.run([sys.executable, "-m", "ring_attention.plan", "--world", "3", "--layout",
                             "zigzag", "--causal", "--out", str(png)], capture_output=True, text=True,
                            check=True, cwd=ROOT)
    assert "imbalance (max/mean work): 1.0" in result.stdout
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("argv,message", [
    ("--world 0", "argument --world: must be >= 1, got 0"),
    ("--world 3 --layout striped --causal --local-len 0", "argument --local-len: must be >= 1, got 0"),
    ("--world 2 --layout zigzag --seqlens 5,-3", "argument --seqlens: lengths must be >= 0"),
    ("--seqlens 0,0", "argument --seqlens: lengths must be >= 0 and not all 0"),
    ("--seqlens 3,x", "argument --seqlens: must be comma-separated ints, got '3,x'"),
    ("--strategies --world 8 --ulysses 0", "argument --ulysses: must be >= 1, got 0"),
    ("--strategies --world 8 --ulysses 3", "must divide by U (3)"),
    ("--strategies --heads 6 --heads-kv 4", "--heads (6) must be a multiple of --heads-kv (4)"),
    ("--world 2 --window -3 0", "argument --window: must be >= -1, got -3"),
    ("--world 2 --causal --window 2 4", "with --causal the right window must be -1 or 0, got 4"),
    ("--world 2 --layout zigzag --local-len 3", "layout 'zigzag' needs an even local length, got 3"),
    ("--world x", "argument --world: invalid int >= 1 value: 'x'"),
    ("--world 2 --out /no_such_dir/plan.png", "--out /no_such_dir/plan.png: [Errno 2] No such file"),
    ("--world 2 --out plan.txt", "--out plan.txt: Format 'txt' is not supported"),
])
def test_plan_cli_rejects_invalid_arguments(capsys, argv, message):
    """What ring_attn_func would reject, or what has no schedule, is a usage error (exit status 2,
    one error line), never a traceback or a picture."""
    with pytest.raises(SystemExit) as exit_:
        main(argv.split())
    assert exit_.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    last = captured.err.strip().splitlines()[-1]
    assert last.startswith("python -m ring_attention.plan: error: ") and message in last, captured.err


def test_example_trains_tiny_llama_under_torchrun():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                             "--standalone", "examples/train_llama_cp.py", "--steps", "2",
                             "--seqlen", "64"], capture_output=True, text=True, cwd=ROOT, env=env,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"step \d+: loss ([0-9.]+)", result.stdout)]
    assert len(losses) == 2 and all(0 < loss < 10 for loss in losses), result.stdout


def test_gpu_example_runs_on_cpu_over_gloo():
    """CPU twin of tests/gpu/test_nccl_group.py's run of the GPU example: the same script, which
    falls back to gloo and the CPU without GPUs, checks itself against SDPA on rank 0."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                             "--standalone", "examples/ring_attn_gpu.py", "--seqlen", "512",
                             "--heads", "4", "--kv-heads", "2", "--headdim", "64"],
                            capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 1/2 on cpu" in result.stdout and "check against SDPA: ok" in result.stdout, result.stdout


def test_serving_example_runs_on_cpu_over_gloo():
    """CPU twin of tests/gpu/test_nccl_group.py's run of the serving example: a ring prefill over 3
    ranks, then tokens decoded against the cache they hold, checked against SDPA on rank 0."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "3",
                             "--standalone", "examples/serve_decode.py", "--prompt", "510",
                             "--new-tokens", "7", "--heads", "4", "--kv-heads", "1",
                             "--headdim", "32"],
                            capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 2/3 on cpu: prompt 510 tokens, 7 decoded" in result.stdout, result.stdout
    assert "check against SDPA: ok" in result.stdout, result.stdout


def test_gpu_example_rejects_a_length_the_ranks_cannot_split():
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                             "--standalone", "examples/ring_attn_gpu.py", "--seqlen", "510"],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode != 0
    assert result.stderr.count("error: --seqlen (510) must divide by 2 x ranks (4)") == 2, result.stderr
    assert 'ring_attn_gpu.py", line' not in result.stderr, result.stderr[-3000:]  # no rank traceback
