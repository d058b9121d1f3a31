#!/usr/bin/env python3
"""Injected bugs that the emulated CUDA kernel test (test_cuda_emu.cpp) must catch.

Each mutant replaces one snippet of the kernel sources (csrc/cuda, csrc/core) in a copy of csrc/,
builds test_cuda_emu from the copy and runs it on the cases that exercise the bug. A mutant is
caught when the test fails: a result off the float64 reference, a NaN, non-deterministic bits, an
emulator abort (out-of-bounds shared memory, misaligned copy), or a hang past the timeout. The
snippet must occur exactly once, so a change to the kernels that removes it fails here too and
the list is kept in step with the code.

    mutants.py [--cxx g++] [--jobs N] [--ci | --only NAME ...] [--list]

Without --ci or --only, every mutant runs (about 20 s of compiling each). `make test` runs the
representative subset marked `ci` (--ci: one mutant each for the tile table, the mask, the copy
pipeline, the fragment layouts, the determinism check, the d = 256 reduction path, the Hopper
forward's mbarrier pipeline and its overlapped wgmma waits, the Hopper dK/dV's partial
tiles, its fused dQ's reuse of the TMA-reduction staging), so that
the test suite stays short; run the whole list after changing the kernels.

Exit status 0 when every mutant run is caught.
"""
import argparse
import concurrent.futures
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

CSRC = Path(__file__).resolve().parents[2]


@dataclass
class Mutant:
    name: str
    file: str      # under csrc/
    snippet: str   # occurs exactly once
    mutation: str
    bug: str       # what the mutant breaks
    cases: tuple   # test_cuda_emu case-name substrings that exercise it
    ci: bool = False     # in the subset that `make test` runs
    sm80: bool = False   # in the sm_80 code path (built with RA_EMU_SM80)


MUTANTS = [
    Mutant("partial-listed-full", "cuda/tile_table.cuh",
           "i << 1 | (kind == static_cast<uint16_t>(TileKind::kPartial))", "i << 1 | 0",
           "tile table: a partial tile listed as full (its mask skipped)",
           ("sq70 sk100 h2/1 d64 diagonal",), ci=True),
    Mutant("key-tail-full", "cuda/tile_table.cuh",
           "(all_partial || k0 + kBlockN > Sk)", "all_partial",
           "tile table: the last key tile, reaching past Sk, listed as full (zero keys unmasked)",
           ("sq70 sk100 h2/1 d64 none",)),
    Mutant("window-off-by-one", "core/mask.h",
           "lo = q_pos - mask.window_left;", "lo = q_pos - mask.window_left + 1;",
           "core/mask.h: row_bounds drops the first key of a sliding window",
           ("sq130 sk130 h2/1 d64 window",), ci=True),
    Mutant("next-tile-same-stage", "cuda/fwd_kernel.cuh",
           "issue_tile(w0, sTable[i + 1], stage ^ 1)", "issue_tile(w0, sTable[i + 1], stage)",
           "forward pipeline: the next tile copied into the stage being computed",
           ("sq200 sk300 h2/1 d64 window",)),
    Mutant("wait-one-group-short", "cuda/fwd_kernel.cuh",
           "      cp_async_wait<0>();\n      sync_threads();  // tile i is in stage i % 2",
           "      cp_async_wait<1>();\n      sync_threads();  // tile i is in stage i % 2",
           "forward pipeline: the tile read before its copy group has landed",
           ("sq200 sk300 h2/1 d64 window",), ci=True),
    Mutant("row-sum-every-lane", "cuda/fwd_kernel.cuh",
           "sL[2 * mt + r] = t4 == 0 ? st[mt][r].l : 0.f;", "sL[2 * mt + r] = st[mt][r].l;",
           "fused merge: the incoming state's row sum counted once per lane of the quad",
           ("sq64 sk64 h4/1 d128 diagonal split2",)),
    Mutant("ds-unscaled", "cuda/bwd_kernel.cuh",
           "dp[mt][nb][j] = pe * fmaf(dp[mt][nb][j], scale, -delta_s);",
           "dp[mt][nb][j] = pe * (dp[mt][nb][j] - delta_s);",
           "backward: dS without the softmax scale (dK and dQ off by 1 / scale)",
           ("sq70 sk100 h2/1 d64 partial",)),
    Mutant("lse-not-base-2", "cuda/bwd_kernel.cuh",
           "lse == neg_inf_f() ? pos_inf_f() : lse * kLog2eF", "lse == neg_inf_f() ? pos_inf_f() : lse",
           "backward: P = exp2(s log2(e) scale - lse) with lse left in base e",
           ("sq70 sk100 h2/1 d64 partial",)),
    Mutant("q-seg-hi-is-lo", "cuda/bwd_kernel.cuh",
           "p.q_seg + (in ? 2 * row + 1 : 0)", "p.q_seg + (in ? 2 * row : 0)",
           "backward row data: a packed row's sequence end read from its start",
           ("sq70 sk100 h2/1 d64 packed",)),
    Mutant("stmatrix-layout", "cuda/warp_mma.cuh",
           "16 * j + (lane / 16) * 8);", "16 * j + ((lane / 8) % 2) * 8);",
           "backward: P and dS stored with the ldmatrix (A fragment) lane layout swapped",
           ("sq64 sk64 h4/1 d128 diagonal split2",), ci=True),
    Mutant("dq-mask-dropped", "cuda/dq_kernel.cuh",
           "ds.template operator()<true>();", "ds.template operator()<false>();",
           "deterministic dQ: partial key tiles computed without their mask",
           ("sq70 sk100 h2/1 d64 diagonal",)),
    Mutant("det-first-head-only", "cuda/bwd_kernel.cuh",
           "const int h_end = kDeterministic ? h_begin + group : h_begin + 1;",
           "const int h_end = h_begin + 1;",
           "deterministic backward: dK, dV of a K/V head summed over its first query head only",
           ("sq7 sk97 h4/2 d128 diagonal",)),
    Mutant("det-uses-reduction", "cuda/bwd_kernel.cuh",
           "const bool shared_kv = group > 1 && !kDeterministic;", "const bool shared_kv = group > 1;",
           "deterministic backward: dK, dV added with reductions (same values, order not fixed)",
           ("sq7 sk97 h4/2 d128 diagonal",), ci=True),
    Mutant("dq256-pair-swapped", "cuda/bwd_kernel.cuh",
           "const float v[2] = {dq[mt][nb][2 * r], dq[mt][nb][2 * r + 1]};",
           "const float v[2] = {dq[mt][nb][2 * r + 1], dq[mt][nb][2 * r]};",
           "backward, d = 256: dQ reduced from registers with a column pair swapped",
           ("sq70 sk100 h2/1 d256 partial",), ci=True),
    Mutant("smem99-sdp-warp-keys", "cuda/bwd_kernel.cuh",
           "sn0 = (warp / Traits::kSdpWarpsM) * Traits::kSdpKeys;",
           "sn0 = (warp / Traits::kSdpWarpsM) * 32;",
           "backward on a 99 KiB GPU, d = 256: S and dP warps placed 32 keys apart (16 per warp)",
           ("smem99 bf16 b1 sq97 sk130 h4/2 d256 diagonal",)),
    Mutant("pad-columns-copied", "cuda/tile_copy.cuh",
           "const int src_bytes = c < d ? 16 : 0;", "const int src_bytes = 16;",
           "tile copy: columns past a padded head dim (40 in the 64 bucket) copied, not zeroed",
           ("sq50 sk40 h2/2 d40 none",)),
    Mutant("consts-v-is-k", "cuda/fwd_kernel.cuh",
           "*sConsts = FwdConsts{gK, gV, mask_mul};", "*sConsts = FwdConsts{gK, gK, mask_mul};",
           "forward, d <= 64: the V base kept in shared memory is K's",
           ("sq70 sk100 h2/1 d64 none",)),
    Mutant("sm90-full-wait-dropped", "cuda/sm90_fwd_kernel.cuh",
           "    mbar_wait(full + stage, (it / kStages) & 1);\n", "",
           "Hopper forward: a stage read without waiting for its full mbarrier (TMA not landed)",
           ("sm90a bf16 b1 sq200 sk300 h2/1 d64 window",), ci=True),
    Mutant("sm90-full-parity", "cuda/sm90_fwd_kernel.cuh",
           "mbar_wait(full + stage, (it / kStages) & 1);",
           "mbar_wait(full + stage, (it / kStages + 1) & 1);",
           "Hopper forward: consumers wait for the wrong phase of a stage's full mbarrier",
           ("sm90a fp16 b1 sq200 sk600 h4/2 d128 diagonal",)),
    Mutant("sm90-stage-not-released", "cuda/sm90_fwd_kernel.cuh",
           "if (lane == 0) mbar_arrive(empty + stage);", "",
           "Hopper forward: consumers never arrive on a stage's empty mbarrier (producer hangs)",
           ("sm90a fp16 b1 sq200 sk600 h4/2 d128 diagonal",)),
    Mutant("sm90-p-fragment", "cuda/sm90_primitives.cuh",
           "const int i = 4 * (2 * kc + j / 2) + 2 * (j % 2);",
           "const int i = 4 * (2 * kc + j % 2) + 2 * (j / 2);",
           "Hopper kernels: P (and dS) packed into the register-A fragment with rows and halves swapped",
           ("sm90a fp16 b1 sq200 sk300 h2/2 d64 window",)),
    Mutant("sm90-tail-fence-dropped", "cuda/sm90_fwd_kernel.cuh",
           "        fence_proxy_async();\n      }\n      named_sync(1, kConsumerThreads);",
           "      }\n      named_sync(1, kConsumerThreads);",
           "Hopper forward: the zeroed V rows past the keys not published to wgmma "
           "(fence.proxy.async dropped; NaN rows follow the sequence)",
           ("sm90a bf16 b2 sq45 sk290 h4/2 d64 random head-major",)),
    Mutant("sm90-pv-wait-short", "cuda/sm90_fwd_kernel.cuh",
           "      wgmma_wait<0>();  // the previous tile's P V is done",
           "      wgmma_wait<1>();  // the previous tile's P V is done",
           "Hopper forward, overlapped: o rescaled (and the stage released) while the previous "
           "tile's P V may still run",
           ("sm90a fp16 b1 sq200 sk600 h4/2 d128 diagonal",), ci=True),
    Mutant("sm90-turns-unbalanced", "cuda/sm90_fwd_kernel.cuh",
           "  if (wg == 0) wait_turn();", "",
           "Hopper forward: the second warpgroup's last end of turn never taken (a named barrier "
           "left incomplete at exit)",
           ("sm90a bf16 b1 sq70 sk150 h4/2 d256 diagonal",)),
    Mutant("sm90-bwd-empty-parity", "cuda/sm90_bwd_kernel.cuh",
           "        if (it >= kStages) mbar_wait(empty + stage, (it / kStages - 1) & 1);",
           "        if (it >= kStages) mbar_wait(empty + stage, (it / kStages) & 1);",
           "Hopper dK/dV: the producer waits for the wrong phase of a stage's empty mbarrier "
           "(refills a stage still being read)",
           ("sm90a bf16 b1 sq130 sk260 h2/1 d128 window",)),
    Mutant("sm90-bwd-delta-dropped", "cuda/sm90_bwd_common.cuh",
           "dp[i] = p[i] * fmaf(dp[i], scale, -delta_s[query_of<kKeyRows>(i, t4)]);",
           "dp[i] = p[i] * dp[i] * scale;",
           "Hopper backward: dS = scale P dP, delta not subtracted",
           ("sm90a fp16 b1 sq70 sk100 h2/2 d64 packed",)),
    Mutant("sm90-bwd-partial-as-full", "cuda/sm90_bwd_kernel.cuh",
           "const bool partial = kind == TileKind::kPartial;", "const bool partial = false;",
           "Hopper dK/dV: a partial query tile treated as full (its mask skipped)",
           ("sm90a fp16 b1 sq7 sk97 h4/2 d64 diagonal",), ci=True),
    Mutant("sm90-bwd-s-wait-short", "cuda/sm90_bwd_kernel.cuh",
           "wgmma_wait<1>();  // S^T is in", "wgmma_wait<2>();  // S^T is in",
           "Hopper dK/dV, overlapped: P^T computed from S^T while its wgmma group may still run "
           "(both groups allowed in flight)",
           ("sm90a bf16 b1 sq130 sk260 h2/1 d128 window",)),
    Mutant("sm90-bwd-dp-wait-short", "cuda/sm90_bwd_kernel.cuh",
           "wgmma_wait<1>();  // dP^T is in; dV", "wgmma_wait<2>();  // dP^T is in; dV",
           "Hopper dK/dV, d = 64: dS^T computed from dP^T while its wgmma group may still run "
           "(dP^T and dV += P^T dO allowed in flight)",
           ("sm90a bf16 b1 sq200 sk300 h2/1 d64 window",)),
    Mutant("sm90-bwd-tail-fence-dropped", "cuda/sm90_pipeline.cuh",
           "  fence_proxy_async();\n  sync_warp();  // every lane's zeros",
           "  sync_warp();  // every lane's zeros",
           "Hopper backward: the zeroed rows past the sequence of a tail stage (Q and dO, K and V) "
           "not published to wgmma (fence.proxy.async dropped; NaN rows follow the sequence)",
           ("sm90a bf16 b2 sq45 sk290 h4/2 d64 random head-major",)),
    Mutant("sm90-fused-dq-read-wait-dropped", "cuda/sm90_bwd_kernel.cuh",
           "      bulk_wait_group_read<0>();\n      sync_warp();\n", "      sync_warp();\n",
           "Hopper dK/dV with dQ fused: the dQ staging overwritten before the TMA reduction of "
           "the previous stage has read it (wait_group.read dropped)",
           ("sm90a bf16 b1 sq200 sk300 h2/1 d64 window",), ci=True),
    Mutant("sm90-fused-dq-kv-tail-not-zeroed", "cuda/sm90_bwd_kernel.cuh",
           "      if (tid < 32) zero_tile_rows<kBN, Traits::kColBlocks>(sK, Sk - k0, lane);\n", "",
           "Hopper dK/dV with dQ fused: the K rows past Sk not zeroed (the keys that follow the "
           "sequence in memory reach dQ)",
           ("sm90a bf16 b2 sq45 sk290 h4/2 d64 random head-major",)),
    Mutant("sm90-fused-dq-first-head", "cuda/sm90_bwd_kernel.cuh",
           "if constexpr (Traits::kFusedDq) sDqHead[stage] = h;",
           "if constexpr (Traits::kFusedDq) sDqHead[stage] = hk * group;",
           "Hopper dK/dV with dQ fused: every query head's dQ added to the group's first head",
           ("sm90a fp16 b1 sq200 sk600 h4/2 d128 diagonal",)),
    Mutant("sm90-fused-dq-ds-unswizzled", "cuda/sm90_bwd_kernel.cuh",
           "16 * ((lane / 16) ^ (lane % 8));", "16 * (lane / 16);",
           "Hopper dK/dV with dQ fused: dS^T stored without the 128-byte swizzle its wgmma "
           "descriptor reads",
           ("sm90a bf16 b1 sq130 sk260 h2/1 d128 window",)),
    Mutant("sm90-fused-dq-reduce-fence-dropped", "cuda/sm90_bwd_kernel.cuh",
           "      fence_proxy_async();\n      sync_warp();\n      if (lane == 0) {\n"
           "        const int row0",
           "      sync_warp();\n      if (lane == 0) {\n        const int row0",
           "Hopper dK/dV with dQ fused: the staged dQ not published to the TMA reduction "
           "(fence.proxy.async dropped)",
           ("sm90a bf16 b1 sq200 sk300 h2/1 d64 window",)),
    Mutant("sm90-fused-dq-staging-unswizzled", "cuda/sm90_bwd_kernel.cuh",
           "g * kSwizzleBytes + ((8 * t4) ^ (16 * g));", "g * kSwizzleBytes + 8 * t4;",
           "Hopper dK/dV with dQ fused: dQ staged without the 128-byte swizzle its TMA box "
           "lands with",
           ("sm90a fp16 b1 sq200 sk600 h4/2 d128 diagonal",)),
    Mutant("sm90-dq-mask-dropped", "cuda/sm90_dq_kernel.cuh",
           "    if (e & 1u) mask_probs<false>", "    if (false) mask_probs<false>",
           "Hopper dQ: partial key tiles computed without their mask",
           ("sm90a fp16 b1 sq7 sk97 h4/2 d64 diagonal",)),
    Mutant("sm90-dq-dp-wait-dropped", "cuda/sm90_dq_kernel.cuh",
           "    wgmma_wait<0>();\n    ds_from_probs<false>", "    ds_from_probs<false>",
           "Hopper dQ, overlapped: dS computed from dP while its wgmma group may still run",
           ("sm90a fp16 b1 sq7 sk97 h4/2 d64 diagonal",)),
    Mutant("sm90-dq-last-wait-dropped", "cuda/sm90_dq_kernel.cuh",
           "  if constexpr (Traits::kDqInFlight) wgmma_wait<0>();\n", "",
           "Hopper dQ, d = 64: the last stage's dQ += dS K, left in flight across the loop, never "
           "waited for (dQ stored from accumulators still in flight)",
           ("sm90a fp16 b1 sq7 sk97 h4/2 d64 diagonal",)),
    Mutant("sm90-dq-tail-v-not-zeroed", "cuda/sm90_pipeline.cuh",
           "  zero_tile_rows<kRows, kColBlocks>(tile_b, valid, lane);\n", "",
           "Hopper backward: a tail stage's second tile not zeroed past the sequence (V in the dQ "
           "kernel, dO in the dK/dV kernel: NaN rows follow the sequence reach dS)",
           ("sm90a bf16 b2 sq45 sk290 h4/2 d64 random head-major",)),
    Mutant("sm80-store-swapped", "cuda/warp_mma.cuh",
           "*reinterpret_cast<uint32_t*>(p + 8 * kPitch) = a[1];\n"
           "        *reinterpret_cast<uint32_t*>(p + 8) = a[2];",
           "*reinterpret_cast<uint32_t*>(p + 8 * kPitch) = a[2];\n"
           "        *reinterpret_cast<uint32_t*>(p + 8) = a[1];",
           "sm_80 path: P and dS fragments stored with two 8 x 8 quarters swapped",
           ("sq64 sk64 h4/1 d128 diagonal split2",), sm80=True),
]


def run_mutant(m, cxx, flags, timeout):
    """(name, caught, detail)"""
    flags = [*flags, "-DRA_EMU_SM80=1"] if m.sm80 else flags
    with tempfile.TemporaryDirectory(prefix=f"mutant-{m.name}-") as tmp:
        root = Path(tmp) / "csrc"
        shutil.copytree(CSRC / "core", root / "core")
        shutil.copytree(CSRC / "cuda", root / "cuda")
        path = root / m.file
        text = path.read_text()
        count = text.count(m.snippet)
        if count != 1:
            return m.name, False, f"snippet occurs {count} times in {m.file} (the list is out of date)"
        path.write_text(text.replace(m.snippet, m.mutation))
        exe = Path(tmp) / "test_cuda_emu"
        build = subprocess.run([cxx, *flags, f"-I{root}", "-o", str(exe),
                                str(root / "cuda" / "emu" / "test_cuda_emu.cpp"), "-lpthread"],
                               capture_output=True, text=True)
        if build.returncode != 0:
            return m.name, False, "mutant does not compile: " + build.stderr.strip()[-300:]
        try:
            run = subprocess.run([str(exe), *m.cases], capture_output=True, text=True,
                                 timeout=timeout)
        except subprocess.TimeoutExpired:
            return m.name, True, f"hang (over {timeout} s)"
        out = run.stdout + run.stderr
        summary = re.search(r"(\d+) of (\d+) cases passed", out)
        if summary and summary.group(2) == "0":
            return m.name, False, f"no case matches {m.cases}"
        if run.returncode == 0:
            return m.name, False, "not caught: " + (summary.group(0) if summary else out[-200:])
        failed = [line.split(None, 1)[1][:60] for line in out.splitlines() if line.startswith("FAIL")]
        detail = (f"{len(failed)} case(s) failed, e.g. {failed[0]}" if failed
                  else out.strip().splitlines()[-1][:100] if out.strip() else f"exit {run.returncode}")
        return m.name, True, detail


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cxx", default="c++")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--ci", action="store_true", help="the subset that `make test` runs")
    ap.add_argument("--only", nargs="+", default=None, help="run the mutants of these names")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--timeout", type=int, default=300, help="seconds per mutant's test run")
    args = ap.parse_args(argv)
    flags = ["-std=c++20", "-O2", "-DRA_CUDA_EMULATE=1"]
    if args.list:
        for m in MUTANTS:
            print(f"{m.name:24s} {'ci ' if m.ci else '   '}{m.bug}")
        return 0
    unknown = set(args.only or ()) - {m.name for m in MUTANTS}
    if unknown:
        sys.exit(f"no mutant named {', '.join(sorted(unknown))}")
    mutants = [m for m in MUTANTS
               if (args.only is None or m.name in args.only) and (not args.ci or m.ci)]
    if not mutants:
        sys.exit("no mutant selected")
    t0 = time.time()
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(lambda m: run_mutant(m, args.cxx, flags, args.timeout), mutants))
    missed = 0
    for (name, caught, detail), m in zip(results, mutants):
        missed += not caught
        print(f"{'caught' if caught else 'MISSED'}  {name:24s} {m.bug}\n        {detail}")
    print(f"{len(results) - missed} of {len(results)} injected bugs caught ({time.time() - t0:.0f} s)")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
