"""pip install --no-build-isolation .   (drives CMake; see docs/build.md for the knobs)

RING_ATTN_CMAKE_BUILD_DIR=build reuses a configured CMake build tree (the one `make build` keeps)
instead of configuring a fresh one: only what changed is rebuilt, and its _C.so goes into the wheel.
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


def _cached_output_dir(build_dir: Path) -> Path:
    """RING_ATTN_OUTPUT_DIR of a configured build tree: where its _C.so is written."""
    cache = (build_dir / "CMakeCache.txt").read_text()
    found = re.search(r"^RING_ATTN_OUTPUT_DIR:\w+=(.*)$", cache, re.MULTILINE)
    if not found:
        raise RuntimeError(f"{build_dir} is not a configured ring-attention build tree")
    return Path(found.group(1))


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        reuse = os.environ.get("RING_ATTN_CMAKE_BUILD_DIR")
        if reuse:
            build_dir = Path(reuse).resolve()
            subprocess.check_call(["cmake", "--build", str(build_dir), "--target", "_C", "-j", jobs])
            out_dir.mkdir(parents=True, exist_ok=True)
            shutil.copy2(_cached_output_dir(build_dir) / "_C.so", out_dir / "_C.so")
            return
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        cfg = [
            "cmake", "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-DRING_ATTN_OUTPUT_DIR={out_dir}",
            "-DRING_ATTN_BUILD_TESTS=OFF", "-DRING_ATTN_BUILD_BENCHMARKS=OFF",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        subprocess.check_call(cfg)
        subprocess.check_call(["cmake", "--build", str(build_dir), "--target", "_C", "-j", jobs])


setup(ext_modules=[CMakeExtension("ring_attention._C")], cmdclass={"build_ext": CMakeBuild})
