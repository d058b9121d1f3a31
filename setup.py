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


def _build_tool(module: str, bin_dir: str, name: str) -> str:
    """The build requirement's own binary (the cmake or ninja wheel in this environment, which
    `cmake>=3.26` asks for even when the environment is not activated), else `name` on PATH."""
    try:
        found = Path(getattr(__import__(module), bin_dir)) / name
    except ImportError:
        found = None
    if found is not None and found.exists():
        return str(found)
    on_path = shutil.which(name)
    if on_path is None:
        raise RuntimeError(f"ring-attention: building needs {name} (pip install {module})")
    return on_path


def _torch_requirement() -> str:
    """The torch release the extension is built against: it links torch's C++ API, which changes
    from release to release, so the wheel asks for the same major.minor."""
    try:
        import torch
    except ImportError as error:
        raise RuntimeError("ring-attention builds against the torch already installed: install "
                           "torch first and build with `pip install --no-build-isolation .`") from error
    major, minor = (int(part) for part in torch.__version__.split(".")[:2])
    return f"torch>={major}.{minor},<{major}.{minor + 1}"


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
        cmake = _build_tool("cmake", "CMAKE_BIN_DIR", "cmake")
        reuse = os.environ.get("RING_ATTN_CMAKE_BUILD_DIR")
        if reuse:
            build_dir = Path(reuse).resolve()
            subprocess.check_call([cmake, "--build", str(build_dir), "--target", "_C", "-j", jobs])
            out_dir.mkdir(parents=True, exist_ok=True)
            shutil.copy2(_cached_output_dir(build_dir) / "_C.so", out_dir / "_C.so")
            return
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        cfg = [
            cmake, "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
            f"-DCMAKE_MAKE_PROGRAM={_build_tool('ninja', 'BIN_DIR', 'ninja')}",
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-DRING_ATTN_OUTPUT_DIR={out_dir}",
            "-DRING_ATTN_BUILD_TESTS=OFF", "-DRING_ATTN_BUILD_BENCHMARKS=OFF",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        subprocess.check_call(cfg)
        subprocess.check_call([cmake, "--build", str(build_dir), "--target", "_C", "-j", jobs])


setup(ext_modules=[CMakeExtension("ring_attention._C")], cmdclass={"build_ext": CMakeBuild},
      install_requires=[_torch_requirement()])
