"""The wheel that `pip wheel --no-build-isolation .` builds holds the whole package: installed into
a folder of its own and imported with the source tree off the path, every module of the source
tree imports from it and a world-size-1 call runs. It requires the torch release it was built with.

The wheel is built from a copy of the tracked files; when `make build` has configured build/, the
wheel reuses it (RING_ATTN_CMAKE_BUILD_DIR: only what changed is rebuilt) instead of compiling the
extension a second time."""
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent

CHECK = """
import importlib, pathlib, sys
import torch
target, modules = sys.argv[1], sys.argv[2].split(",")
for name in modules:
    module = importlib.import_module(name)
    assert pathlib.Path(module.__file__).is_relative_to(target), (name, module.__file__)
import ring_attention as ra
q, k, v = (torch.randn(1, 33, h, 16, dtype=torch.float64) for h in (4, 2, 2))
out, lse = ra.ring_attn_func(q, k, v, causal=True, return_lse=True)
want, want_lse = ra.attention_reference(q, k, v, causal=True)
assert torch.allclose(out, want, atol=1e-10) and torch.allclose(lse, want_lse, atol=1e-10)
print("wheel ok:", ra.__file__)
"""


def source_modules():
    """Dotted names of every module of the package in the source tree."""
    package = ROOT / "ring_attention"
    names = []
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def run(cmd, **kwargs):
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900, **kwargs)
    assert result.returncode == 0, f"{cmd}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def test_wheel_holds_every_module(tmp_path):
    source = tmp_path / "source"
    tracked = run(["git", "-C", str(ROOT), "ls-files", "-z"]).split("\0")
    for name in filter(None, tracked):
        dest = source / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes((ROOT / name).read_bytes())

    env = dict(os.environ)
    if (ROOT / "build" / "CMakeCache.txt").exists():
        env["RING_ATTN_CMAKE_BUILD_DIR"] = str(ROOT / "build")
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps", "-w",
         str(tmp_path / "wheels"), str(source)], env=env)
    wheels = list((tmp_path / "wheels").glob("ring_attention-*.whl"))
    assert len(wheels) == 1, wheels
    # The extension links torch's C++ API: the wheel asks for the torch release it was built with.
    with zipfile.ZipFile(wheels[0]) as wheel:
        metadata = next(wheel.read(n).decode() for n in wheel.namelist() if n.endswith("/METADATA"))
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist: torch")]
    major, minor = (int(part) for part in torch.__version__.split(".")[:2])
    assert len(requires) == 1 and f">={major}.{minor}" in requires[0], requires
    assert f"<{major}.{minor + 1}" in requires[0], requires
    target = tmp_path / "installed"
    run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
         str(wheels[0])])

    # python -S: no site module, so no .pth file (the development checkout's) puts the source
    # tree on the path; the installed folder comes first, then the environment's packages.
    clean_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    clean_env["PYTHONPATH"] = os.pathsep.join([str(target), sysconfig.get_paths()["purelib"]])
    modules = source_modules()
    assert "ring_attention.integrations.transformers" in modules, modules
    out = run([sys.executable, "-S", "-c", CHECK, str(target), ",".join(modules)], cwd=tmp_path,
              env=clean_env)
    assert f"wheel ok: {target}" in out, out
