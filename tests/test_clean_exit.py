"""A multi-rank program of many ring calls (forward, backward, an agreement error, a timeout)
exits with status 0 every time: no thread, pending work or abandoned exchange aborts a rank at
exit ("terminate called without an active exception")."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = 10


def test_ranks_exit_cleanly_every_time():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for run in range(RUNS):
        result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                 "--nproc-per-node", "2", "tests/clean_exit_program.py"],
                                capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
        output = result.stdout + result.stderr
        assert result.returncode == 0 and "terminate called" not in output, \
            f"run {run + 1} of {RUNS}: exit status {result.returncode}\n{output[-4000:]}"
        assert "rank 0: done" in result.stdout and "rank 1: done" in result.stdout, output[-2000:]
