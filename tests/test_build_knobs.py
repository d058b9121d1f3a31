"""The build knobs of docs/build.md act as documented: each configures a fresh CMake tree in a
temporary folder and checks what the knob changed (compile commands, targets, the CUDA compiler)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
CMAKE = Path(sys.executable).with_name("cmake")
NINJA = Path(sys.executable).with_name("ninja")


def configure(build_dir, *options, env=None):
    """cmake -S ROOT -B build_dir with `options`; returns the CompletedProcess (never raises)."""
    cmd = [str(CMAKE), "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
           f"-DCMAKE_MAKE_PROGRAM={NINJA}", f"-DPython3_EXECUTABLE={sys.executable}",
           f"-DRING_ATTN_OUTPUT_DIR={build_dir / 'out'}", "-DCMAKE_EXPORT_COMPILE_COMMANDS=ON",
           *options]
    full_env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDACXX")}
    full_env.update(env or {})
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=300)


def cpu_kernel_command(build_dir):
    commands = json.loads((build_dir / "compile_commands.json").read_text())
    [entry] = [c for c in commands if c["file"].endswith("csrc/cpu/block_attn_cpu.cpp")]
    return entry["command"]


def test_cpu_isa_native_adds_march_native_and_dispatch_does_not(tmp_path):
    native = configure(tmp_path / "native", "-DRING_ATTN_CUDA=OFF", "-DRING_ATTN_CPU_ISA=native")
    assert native.returncode == 0, native.stderr
    assert "-march=native" in cpu_kernel_command(tmp_path / "native")
    default = configure(tmp_path / "default", "-DRING_ATTN_CUDA=OFF")
    assert default.returncode == 0, default.stderr
    assert "-march" not in cpu_kernel_command(tmp_path / "default")


def test_cpu_isa_rejects_unknown_values(tmp_path):
    result = configure(tmp_path, "-DRING_ATTN_CUDA=OFF", "-DRING_ATTN_CPU_ISA=avx2")
    assert result.returncode != 0
    assert "RING_ATTN_CPU_ISA must be 'dispatch'" in " ".join(result.stderr.split()), result.stderr


@pytest.mark.parametrize("value", ["off", "0"])
def test_cuda_knob_rejects_unknown_values(tmp_path, value):
    """Only AUTO, ON and OFF: any other spelling would otherwise build as AUTO."""
    result = configure(tmp_path, f"-DRING_ATTN_CUDA={value}")
    assert result.returncode != 0
    message = f"RING_ATTN_CUDA must be AUTO, ON or OFF, got '{value}'"
    assert message in " ".join(result.stderr.split()), result.stderr


def test_cuda_emulator_test_is_built_without_nvcc(tmp_path):
    """test_cuda_emu and the conformance check's emulator half need a host compiler only: they are
    targets and ctests even with CUDA off; the conformance check's device half is not."""
    result = configure(tmp_path, "-DRING_ATTN_CUDA=OFF")
    assert result.returncode == 0, result.stderr
    ninja = (tmp_path / "build.ninja").read_text()
    assert "build test_cuda_emu:" in ninja
    assert "build sm90_conformance_emu:" in ninja
    assert "sm90_conformance_gpu" not in ninja
    listed = subprocess.run([str(CMAKE.with_name("ctest")), "-N"], cwd=tmp_path, capture_output=True,
                            text=True, check=True).stdout
    assert "test_cuda_emu" in listed, listed
    assert "sm90_conformance_emu" in listed, listed


@pytest.mark.skipif(not torch.version.cuda, reason="a CPU-only torch never builds the CUDA half")
def test_cuda_home_picks_nvcc(tmp_path):
    """CUDA_HOME names the toolkit: a missing nvcc there fails a forced CUDA build naming the path;
    a toolkit reached through another folder is the one CMake uses."""
    missing = configure(tmp_path / "missing", "-DRING_ATTN_CUDA=ON",
                        env={"CUDA_HOME": str(tmp_path / "no-toolkit")})
    assert missing.returncode != 0
    message = " ".join(missing.stderr.split())  # CMake wraps long messages
    assert f"nvcc was not found at {tmp_path / 'no-toolkit'}/bin/nvcc" in message, message

    toolkit = Path("/usr/local/cuda")
    if not (toolkit / "bin" / "nvcc").exists():
        pytest.skip("no CUDA toolkit at /usr/local/cuda to point CUDA_HOME at")
    linked = tmp_path / "toolkit"
    linked.symlink_to(toolkit)
    found = configure(tmp_path / "found", "-DRING_ATTN_CUDA=ON", "-DRING_ATTN_BUILD_BENCHMARKS=OFF",
                      env={"CUDA_HOME": str(linked)})
    assert found.returncode == 0, found.stderr
    [compiler] = (tmp_path / "found" / "CMakeFiles").glob("*/CMakeCUDACompiler.cmake")
    assert f'set(CMAKE_CUDA_COMPILER "{linked}/bin/nvcc")' in compiler.read_text()
