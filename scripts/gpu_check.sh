#!/usr/bin/env bash
# One-command check of the CUDA half on a machine with one GPU and no network:
#
#   scripts/gpu_check.sh OUTDIR [--quick] [--bundle]
#
# Stages (each under its own `timeout`; a stage whose tool is missing is skipped with a message;
# the summary is written whatever happens):
#   env        GPU, driver, torch, nvcc, cmake, compute-sanitizer versions
#   build      CMake + Ninja against this machine's torch ($PYTHON, default python3, runs every
#              Python stage), RING_ATTN_CUDA=ON, archs from RING_ATTN_CUDA_ARCHS (default 9.0),
#              MAX_JOBS jobs (default 16), ptxas -v in the log; _C.so goes to the source tree's
#              ring_attention/ (the build dir: $RING_ATTN_GPU_BUILD_DIR, default build/gpu-check/)
#   conformance the emulator against the card, first on any GPU (compute capability 9.x; skipped
#              elsewhere): sm90_conformance_emu writes the emulated results of each sm_90a primitive
#              the kernels use (wgmma m64nNk16 at N = 64/128/256, bf16 and fp16, shared and register
#              A, and both operands MN-major as the fused dQ reads them; the fused dQ's stmatrix
#              store into a swizzled tile; a 128-byte-swizzled TMA load of boxes past the tensor's
#              edges; the forward's setmaxnreg / named-barrier / mbarrier pipeline; the fused dQ's
#              TMA tensor reduce-add) to OUTDIR/sm90_conformance_emu.bin and
#              sm90_conformance_gpu runs the same cases on the GPU and compares the bytes (one line
#              per case: OK, or MISMATCH and the first differing word); cap 120 s
#   ctest      C++ tests that touch the GPU or are quick: the CUDA microbenchmark's check
#              (bench_block_attn_cuda against a float64 host reference), the conformance pair, the
#              core and CPU checks; not the emulated kernels (test_cuda_emu*: CPU-only, minutes, run
#              by `make test`)
#   import     import ring_attention; torch.ops.ring_attention.cuda_build_info()
#   tests      pytest tests/gpu (junit XML in OUTDIR)
#   memcheck   compute-sanitizer --tool memcheck  on scripts/cuda_sanitize_case.py
#   overlap    benchmarks/ring/overlap_gpu.py: LocalRing, 4 virtual ranks, 8K tokens/rank, bf16, d=128, vs
#              its kernels alone (overhead <= 5%) and its exchanges alone (hidden fraction)
#   bench      benchmarks/kernels/bench_cuda.py: vs SDPA flash / cuDNN, bf16, d 64/128, 4K/8K/16K, causal or
#              not, fwd and bwd, merge overhead (--quick: d=128, 8K, non-causal)
#   baseline   with GPU_CHECK_BASELINE=DIR (the source tree of an earlier commit, e.g.
#              `git archive REV | tar -x -C build/baseline-src`, carried to the card): builds its
#              extension for the same archs in DIR/build-gpu-check and runs its own CUDA benchmark
#              (benchmarks/kernels/bench_cuda.py, or scripts/bench_cuda.py in older trees) on
#              d=128, 8K, causal and not (--quick: non-causal), right after the bench stage; then
#              benchmarks/kernels/compare_builds.py puts the two runs side by side (speedup per
#              row, each run against its own SDPA, SDPA's drift between them; OUTDIR/compare.md)
#   bench-sm90a the same rows with RING_ATTN_CUDA_KERNEL=sm90a (the Hopper forward and backward),
#              SDPA timed again beside them: d=128 and 64 at 8K (--quick: d=128, 8K, non-causal)
#              (OUTDIR/bench_sm90a.json; compute capability 9.0 only)
#   merge      benchmarks/kernels/merge_probe.py: the forward from several incoming states (why merging slows
#              the d=64 forward; OUTDIR/merge_probe.json) (skipped with --quick)
#   merge-order benchmarks/kernels/merge_probe.py --orders: the same two launches timed in several call orders
#              (OUTDIR/merge_order.json) (skipped with --quick)
#   ncu        Nsight Compute sections (speed of light, occupancy, warp stalls, memory) of one launch
#              of each kernel at d=128, 8K tokens, and of SDPA's flash kernels (skipped with --quick)
#   ncu-merge  Nsight Compute (warp states, source counters, instructions, memory) of the d=64
#              forward with and without the merge (skipped with --quick)
#   racecheck  compute-sanitizer --tool racecheck on cuda_sanitize_case.py (skipped with --quick)
# GPU_CHECK_BUDGET (seconds, default 560): every stage's cap is cut to what is left of it, so the
# whole check ends within that time and later stages are skipped rather than killed.
# GPU_CHECK_BASELINE (a directory): the source tree the baseline stage builds and times.
# GPU_CHECK_ONLY (stage names, space-separated): run only those stages, and env, build and import
# (e.g. GPU_CHECK_ONLY="conformance tests bench-sm90a" to rerun what a first call left out).
# Writes OUTDIR/summary.md (stage table + benchmark tables), OUTDIR/<stage>.log, OUTDIR/bench.json,
# OUTDIR/bench.md, OUTDIR/bench_sm90a.json, OUTDIR/gpu_tests.xml, OUTDIR/overlap.json,
# OUTDIR/baseline/ and OUTDIR/compare.{json,md} (with GPU_CHECK_BASELINE). Installs
# nothing. Exit status: 0 when every stage that ran passed. Budget: full <= 8 min, --quick <= 4
# min on one H100 (build included).
# --bundle: at the end, every file but summary.md goes into OUTDIR/gpu_check.tgz (one file to copy
# back from a remote machine).
set -u

if [ $# -lt 1 ]; then
  echo "usage: $0 OUTDIR [--quick] [--bundle]" >&2
  exit 2
fi
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
QUICK=0
BUNDLE=0
for arg in "${@:2}"; do
  case $arg in
    --quick) QUICK=1 ;;
    --bundle) BUNDLE=1 ;;
    *) echo "gpu_check: unknown option $arg" >&2; exit 2 ;;
  esac
done
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

PY=${PYTHON:-python3}
JOBS=${MAX_JOBS:-16}
ARCHS=${RING_ATTN_CUDA_ARCHS:-9.0}
BUILD=${RING_ATTN_GPU_BUILD_DIR:-$ROOT/build/gpu-check}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PATH="$PATH:$CUDA_HOME/bin"

SUMMARY="$OUT/summary.md"
STAGES="$OUT/stages.tmp"
: > "$STAGES"
FAILED=0
START_ALL=$(date +%s)

BUDGET=${GPU_CHECK_BUDGET:-560}
ONLY=${GPU_CHECK_ONLY:-}
BASELINE=${GPU_CHECK_BASELINE:-}
[ -n "$BASELINE" ] && BASELINE=$(cd "$BASELINE" && pwd)

# stage NAME CAP_SECONDS COMMAND...  (output to OUTDIR/NAME.log); the cap is cut to the budget left
stage() {
  local name=$1 cap=$2
  shift 2
  local t0 rc status left
  t0=$(date +%s)
  left=$(( BUDGET - (t0 - START_ALL) - 5 ))
  if [ -n "$ONLY" ] && [[ " env build import $ONLY " != *" $name "* ]]; then
    skip "$name" "not in GPU_CHECK_ONLY"
    return 1
  fi
  if [ $left -lt 20 ]; then
    skip "$name" "budget of ${BUDGET}s spent"
    return 1
  fi
  [ $left -lt $cap ] && cap=$left
  echo "== $name (cap ${cap}s)"
  timeout --kill-after=15 "$cap" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  if [ $rc -eq 0 ]; then
    status=pass
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    status="TIMEOUT (${cap}s)"
    FAILED=1
  else
    status="FAIL (exit $rc)"
    FAILED=1
  fi
  echo "   $status in $(( $(date +%s) - t0 )) s; log: $OUT/$name.log"
  tail -n 3 "$OUT/$name.log" | sed 's/^/   | /'
  echo "| $name | $status | $(( $(date +%s) - t0 )) s | $name.log |" >> "$STAGES"
  return $rc
}

skip() {
  echo "== $1: skipped: $2"
  echo "| $1 | skipped: $2 | - | - |" >> "$STAGES"
}

write_summary() {
  {
    echo "# gpu_check $( [ $QUICK = 1 ] && echo '--quick' ) ($(date -u +%FT%TZ), $(( $(date +%s) - START_ALL )) s)"
    echo
    echo "| stage | result | time | log |"
    echo "|---|---|---|---|"
    cat "$STAGES"
    echo
    if [ -f "$OUT/build.log" ]; then
      echo "ptxas (registers, spills) of the kernels:"
      echo '```'
      grep -E "Compiling entry function|Used [0-9]+ registers|bytes spill" "$OUT/build.log" |
        grep -E "block_(fwd|bwd)_kernel|registers|spill" | sed 's/^ *ptxas info *: *//' | head -n 80
      echo '```'
      echo
    fi
    [ -f "$OUT/bench.md" ] && cat "$OUT/bench.md"
    [ -f "$OUT/compare.md" ] && echo && cat "$OUT/compare.md"
    [ -f "$OUT/bench_sm90a.md" ] && echo && cat "$OUT/bench_sm90a.md"
  } > "$SUMMARY"
  if [ $BUNDLE = 1 ]; then
    (cd "$OUT" && rm -f stages.tmp && tar czf gpu_check.tgz --exclude gpu_check.tgz --exclude summary.md . &&
      find . -type f ! -name gpu_check.tgz ! -name summary.md -delete)
  fi
}
trap write_summary EXIT

# ---- env -------------------------------------------------------------------------------------
stage env 60 bash -c "
  nvidia-smi || echo 'nvidia-smi: not found'
  $PY -c 'import torch; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"available\", torch.cuda.is_available()); print(torch.cuda.get_device_name() if torch.cuda.is_available() else \"no device\")'
  command -v nvcc && nvcc --version | tail -n 2
  command -v cmake && cmake --version | head -n 1
  command -v ninja && ninja --version
  command -v compute-sanitizer || echo 'compute-sanitizer: not found'
"

# ---- build -----------------------------------------------------------------------------------
# A cmake >= 3.26 (CMakeLists.txt's minimum): the one on PATH, next to python3, or python3 -m cmake.
cmake_ok() {
  local v
  v=$($1 --version 2> /dev/null | head -n 1 | grep -oE "[0-9]+\.[0-9]+" | head -n 1)
  [ -n "$v" ] && [ "$(printf '%s\n3.26\n' "$v" | sort -V | head -n 1)" = "3.26" ]
}
CMAKE=""
for c in "$(command -v cmake)" "$(dirname "$(command -v "$PY")")/cmake" "$PY -m cmake"; do
  if [ -n "${c// /}" ] && cmake_ok "$c"; then CMAKE=$c; break; fi
done
GEN=()
command -v ninja > /dev/null && GEN=(-G Ninja)
BUILT=0
if [ -z "$CMAKE" ]; then
  skip build "no cmake >= 3.26 found (PATH, next to $PY, or $PY -m cmake)"
else
  if stage build 420 bash -c "
      set -e
      export RING_ATTN_CUDA_ARCHS='$ARCHS' RING_ATTN_CUDA_FLAGS='-Xptxas=-v'
      $CMAKE -S '$ROOT' -B '$BUILD' ${GEN[*]:-} -DPython3_EXECUTABLE=\$(command -v $PY) \
        -DRING_ATTN_CUDA=ON -DRING_ATTN_CUDA_ARCHS='$ARCHS' -DCMAKE_BUILD_TYPE=Release \
        -DRING_ATTN_BUILD_TESTS=ON -DRING_ATTN_BUILD_BENCHMARKS=ON
      time $CMAKE --build '$BUILD' -j $JOBS
    "; then
    BUILT=1
  fi
fi

# The GPU's compute capability (e.g. 9.0), empty when unknown.
CC=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2> /dev/null | head -n 1 | tr -d ' ')
[ -z "$CC" ] && CC=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2> /dev/null)

# ---- conformance: the emulator's sm_90a primitives against the card, before anything is timed --
if [ $BUILT = 0 ]; then
  skip conformance "no build"
elif [[ "$CC" != 9.* ]]; then
  skip conformance "compute capability '${CC:-unknown}' is not 9.x"
else
  stage conformance 120 bash -c "
    set -e
    '$BUILD/sm90_conformance_emu' --write '$OUT/sm90_conformance_emu.bin'
    '$BUILD/sm90_conformance_gpu' '$OUT/sm90_conformance_emu.bin'
  "
fi

if [ $BUILT = 1 ]; then
  if command -v ctest > /dev/null; then
    stage ctest 90 bash -c "cd '$BUILD' && ctest --output-on-failure -E '^test_cuda_emu'"
  else
    skip ctest "ctest not found"
  fi
else
  skip ctest "no build"
fi

# ---- python: import, tests ---------------------------------------------------------------------
if stage import 60 "$PY" -c "import torch, ring_attention; print(torch.ops.ring_attention.cuda_build_info())"; then
  if "$PY" -c "import pytest" 2> /dev/null; then
    # A hung test (a ring waiting on itself, say) fails alone when pytest-timeout is there.
    PYTEST=("$PY" -m pytest -q -p no:cacheprovider --durations=10 --junitxml="$OUT/gpu_tests.xml")
    "$PY" -c "import pytest_timeout" 2> /dev/null && PYTEST+=(--timeout=60)
    if [ $QUICK = 1 ]; then
      stage tests 150 "${PYTEST[@]}" tests/gpu -k "bfloat16 or world_one or local_ring"
    else
      stage tests 240 "${PYTEST[@]}" tests/gpu
    fi
  else
    skip tests "pytest not installed"
  fi

  # ---- compute-sanitizer -----------------------------------------------------------------------
  SAN=$(command -v compute-sanitizer || true)
  [ -z "$SAN" ] && [ -x "$CUDA_HOME/bin/compute-sanitizer" ] && SAN="$CUDA_HOME/bin/compute-sanitizer"
  # sanitize TOOL CAP: compute-sanitizer on scripts/cuda_sanitize_case.py, torch's caching off
  sanitize() {
    if [ -z "$SAN" ]; then
      skip "$1" "compute-sanitizer not found"
      return
    fi
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 stage "$1" "$2" "$SAN" --tool "$1" --error-exitcode 3 \
      $( [ "$1" = racecheck ] && echo --racecheck-report all ) "$PY" scripts/cuda_sanitize_case.py
  }
  sanitize memcheck 150

  # ---- overlap: LocalRing (4 ranks, 8K/rank, bf16, d=128) vs its kernels alone: overhead <= 5% ----
  stage overlap 90 "$PY" benchmarks/ring/overlap_gpu.py --json "$OUT/overlap.json"

  # ---- benchmark -------------------------------------------------------------------------------
  # bench_sm90a CAP [ARGS]: the bench stage's rows with the Hopper kernels
  bench_sm90a() {
    if [ "$CC" != 9.0 ]; then
      skip bench-sm90a "compute capability '${CC:-unknown}' is not 9.0"
      return
    fi
    stage bench-sm90a "$1" "$PY" benchmarks/kernels/bench_cuda.py --json "$OUT/bench_sm90a.json" \
      --kernel sm90a "${@:2}"
  }
  # baseline CAP ARGS: the baseline tree's build and its benchmark's ARGS rows, beside bench.json
  baseline() {
    if [ -z "$BASELINE" ]; then
      skip baseline "GPU_CHECK_BASELINE not set"
      return
    elif [ -z "$CMAKE" ]; then
      skip baseline "no cmake >= 3.26 found"
      return
    fi
    stage baseline "$1" bash -c "
      set -e
      $CMAKE -S '$BASELINE' -B '$BASELINE/build-gpu-check' ${GEN[*]:-} \
        -DPython3_EXECUTABLE=\$(command -v $PY) -DRING_ATTN_CUDA=ON -DRING_ATTN_CUDA_ARCHS='$ARCHS' \
        -DCMAKE_BUILD_TYPE=Release -DRING_ATTN_BUILD_TESTS=OFF -DRING_ATTN_BUILD_BENCHMARKS=OFF
      time $CMAKE --build '$BASELINE/build-gpu-check' -j $JOBS --target _C
      mkdir -p '$OUT/baseline'
      cd '$BASELINE'
      if [ -f benchmarks/kernels/bench_cuda.py ]; then
        PYTHONPATH='$BASELINE' $PY benchmarks/kernels/bench_cuda.py --json '$OUT/baseline/bench.json' ${*:2}
      else
        PYTHONPATH='$BASELINE' $PY scripts/bench_cuda.py --out '$OUT/baseline' ${*:2}
      fi
      cd '$ROOT'
      $PY benchmarks/kernels/compare_builds.py '$OUT/baseline/bench.json' '$OUT/bench.json' \
        --json '$OUT/compare.json'
    "
  }
  if [ $QUICK = 1 ]; then
    stage bench 90 "$PY" benchmarks/kernels/bench_cuda.py --json "$OUT/bench.json" --quick
    baseline 150 --quick
    bench_sm90a 60 --quick
    skip merge "--quick"
    skip merge-order "--quick"
    skip ncu "--quick"
    skip ncu-merge "--quick"
    skip racecheck "--quick"
  else
    stage bench 240 "$PY" benchmarks/kernels/bench_cuda.py --json "$OUT/bench.json"
    baseline 180 --headdims 128 --seqlens 8192
    bench_sm90a 150 --headdims 128,64 --seqlens 8192
    stage merge 60 "$PY" benchmarks/kernels/merge_probe.py --json "$OUT/merge_probe.json"
    stage merge-order 60 "$PY" benchmarks/kernels/merge_probe.py --orders --json "$OUT/merge_order.json"
    # ---- Nsight Compute: why the kernels run at the speed they do (vs SDPA's flash kernels) -----
    NCU=$(command -v ncu || ls "$CUDA_HOME"/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2> /dev/null | head -n 1)
    if [ -z "$NCU" ]; then
      skip ncu "ncu not found"
      skip ncu-merge "ncu not found"
    else
      stage ncu 150 "$NCU" --profile-from-start off --kernel-name "regex:block_|flash_" \
        --section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
        --section Occupancy --section LaunchStats --section SchedulerStats --section WarpStateStats \
        "$PY" scripts/ncu_case.py
      stage ncu-merge 90 "$NCU" --profile-from-start off --kernel-name "regex:block_fwd" \
        --section WarpStateStats --section SourceCounters --section InstructionStats \
        --section MemoryWorkloadAnalysis --section SpeedOfLight "$PY" benchmarks/kernels/merge_probe.py --ncu
    fi
    sanitize racecheck 180
  fi
else
  for s in tests memcheck overlap bench baseline bench-sm90a merge merge-order ncu ncu-merge racecheck; do skip $s "ring_attention does not import"; done
fi

echo "summary: $SUMMARY"
exit $FAILED
