"""tests/gpu: the CUDA kernels on a GPU (skipped without one); gpu_cases.py and the cases it builds
on (tests/cases.py) are importable here."""
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
