"""The library on real NCCL process groups (world size 1 on one GPU), and the GPU example as
written. CPU twins: tests/test_group_devices.py (groups with only a CUDA or only a CPU backend)
and tests/test_plan_and_examples.py (the example over gloo)."""
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def torchrun(*args):
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1",
                             "--standalone", *args], capture_output=True, text=True, cwd=ROOT,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


def test_nccl_only_and_mixed_groups():
    assert "nccl group check: ok" in torchrun("tests/gpu/nccl_group_check.py")


def test_gpu_example_runs_as_written():
    out = torchrun("examples/ring_attn_gpu.py", "--seqlen", "4096")
    assert "on cuda:0" in out and "check against SDPA: ok" in out, out


def test_serving_example_runs_as_written():
    out = torchrun("examples/serve_decode.py", "--prompt", "4096", "--new-tokens", "8")
    assert "on cuda:0" in out and "check against SDPA: ok" in out, out
