"""tests/gpu: the CUDA kernels on a GPU (skipped without one); gpu_cases.py is importable here."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
