#!/usr/bin/env python3
"""Compares two runs of the CUDA kernel benchmark on one card, row by row: a baseline build's
(an earlier commit's kernels) and this build's, timed one after the other in the same GPU check
(scripts/gpu_check.sh with GPU_CHECK_BASELINE).

Rows match on (head dim, tokens, causal, impl, direction). Per row of ours found in both runs:
the baseline's ms, this build's ms, speedup = baseline ms / this build's ms, and each run's
SDPA flash time / ours ("vs flash", the target's ratio, each run against its own SDPA). SDPA's
rows, timed in both runs, give the card's drift between them: this run's SDPA ms / the
baseline run's (1.00 when the card kept its speed; a speedup well beyond the drift is the
kernels'). Reads the JSON of every version of benchmarks/kernels/bench_cuda.py (and of its
earlier place, scripts/bench_cuda.py): `rows` of dicts with headdim, seqlen, causal, impl,
direction and ms (null where a backend was unsupported).
Check: at least one row of ours is timed in both runs (exit status 1 otherwise).

usage: compare_builds.py BASELINE.json NEW.json [--json OUT]  (also writes OUT's .md beside it)
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks import harness as h  # noqa: E402

FLASH = "sdpa flash"


def _key(row):
    return (row["headdim"], row["seqlen"], bool(row["causal"]), row["impl"], row["direction"])


def _timed(rows):
    """{key: ms} of the rows with a time."""
    return {_key(r): r["ms"] for r in rows if r.get("ms") is not None}


def compare(baseline_rows, rows):
    """(our rows timed in both runs, SDPA rows timed in both), each a list of table rows."""
    old, new = _timed(baseline_rows), _timed(rows)
    ours, sdpa = [], []
    for key in sorted(set(old) & set(new), key=lambda k: (k[0], k[1], k[2], k[4], k[3])):
        d, s, causal, impl, direction = key
        row = {"d": d, "tokens": s, "mask": "causal" if causal else "full", "impl": impl,
               "dir": direction, "baseline ms": round(old[key], 3), "ms": round(new[key], 3)}
        if impl.startswith("sdpa"):
            row["drift"] = round(new[key] / old[key], 3)
            sdpa.append(row)
            continue
        row["speedup"] = round(old[key] / new[key], 3)
        flash = (d, s, causal, FLASH, direction)
        row["baseline vs flash"] = round(old[flash] / old[key], 3) if flash in old else "-"
        row["vs flash"] = round(new[flash] / new[key], 3) if flash in new else "-"
        ours.append(row)
    return ours, sdpa


OURS_COLUMNS = ["d", "tokens", "mask", "impl", "dir", "baseline ms", "ms", "speedup",
                "baseline vs flash", "vs flash"]
SDPA_COLUMNS = ["d", "tokens", "mask", "impl", "dir", "baseline ms", "ms", "drift"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("baseline", help="the baseline build's bench_cuda JSON")
    ap.add_argument("new", help="this build's bench_cuda JSON")
    ap.add_argument("--json", default="bench_out/compare_builds.json", help="write the results here")
    args = ap.parse_args()
    runs = [json.loads(Path(p).read_text()) for p in (args.baseline, args.new)]
    ours, sdpa = compare(runs[0]["rows"], runs[1]["rows"])
    devices = [run.get("device", "unknown device") for run in runs]
    where = devices[1] if devices[0] == devices[1] else f"{devices[1]}; the baseline ran on {devices[0]}"
    title = f"# This build vs the baseline build ({where})\n\n"
    md = title + (h.markdown_table(ours, OURS_COLUMNS) if ours else "no row of ours in both runs\n")
    if sdpa:
        md += "\nSDPA in both runs (drift: this run's ms / the baseline run's):\n\n"
        md += h.markdown_table(sdpa, SDPA_COLUMNS)
    print(md)
    h.write_json(args.json, {"devices": devices, "rows": ours, "sdpa": sdpa})
    Path(args.json).with_suffix(".md").write_text(md)
    ok = bool(ours)
    print(f"check: {len(ours)} rows of ours timed in both runs: {'ok' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
