#!/usr/bin/env python3
"""Static instruction budget of the CUDA block kernels' main loops, from their sm_90 SASS, beside
FlashAttention-2's kernels in torch's own libtorch_cuda.so.

    benchmarks/kernels/sass_budget.py [--so ring_attention/_C.so] [--json OUT] [--no-fa2]

For each kernel: disassemble it (cuobjdump -sass, the copy in triton's wheel unless --cuobjdump),
split it into basic blocks, find the natural loops (back edge u -> h with h dominating u) and take
as the main loop the one with the most tensor-core work (the smallest on ties). Its "hot cycle" is
one steady-state iteration: the path from the header around to a back edge, through the loop's
blocks with inner back edges dropped, that passes through as many "must" blocks as a path can
(blocks holding MMAs, cp.async or TMA issue, barriers, or global reductions), the cheapest such
path in instructions. Where two must blocks exclude each other (no path holds both, e.g. the copy
of a full tile and that of a partial one), the path takes the cheaper; a partial tile's mask code,
holding none of them, stays off it.

Reported per kernel (hot cycle, per HMMA-equivalent = the work of one mma.sync.m16n8k16, 4096 FLOP
per warp; an HGMMA.64xNx16 counts N/8): instructions, spill loads (LDL) and stores (STL), global
loads (LDG), barriers, reductions and atomics (RED, ATOM, bulk and TMA reductions). "loop LDL/LDG"
count the whole loop body, cold paths included.

Our kernels are labelled fwd / fwd-sm90a (the Hopper forward, wgmma) / bwd (atomic dQ) / bwd-det
(deterministic dK, dV) / dkdv-sm90a (the Hopper dK, dV, wgmma) / dkdvq-sm90a (the Hopper dK, dV
with dQ fused, added by TMA reductions) / dq-det (deterministic dQ) / dq-sm90a (the Hopper dQ,
wgmma), dtype and head-dim bucket; FA2's fa2-fwd / fa2-bwd (non-causal, even shapes:
the variants torch's SDPA runs for the benchmarked shapes on sm_90).
"""
import argparse
import collections
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
FUNCTION = re.compile(r"^\s*Function : (\S+)")

# Must-block instructions: tensor cores, copy issue, barriers, global reductions.
TENSOR = ("HMMA", "HGMMA")
MUST = TENSOR + ("LDGSTS", "UTMALDG", "UBLKCP", "UBLKRED", "UTMAREDG", "BAR.SYNC", "BAR.ARV",
                 "BAR.RED", "SYNCS", "RED", "REDG", "ATOM", "ATOMG")
REDUCTIONS = ("RED", "REDG", "ATOM", "ATOMG", "UBLKRED", "UTMAREDG")

# FlashAttention-2 in torch (pytorch_flash namespace), sm_90: the non-causal, even-shape variants.
_FA2_FWD = ("_ZN13pytorch_flash16flash_fwd_kernelI23Flash_fwd_kernel_traitsILi{d}ELi{m}ELi{n}ELi{w}"
            "ELb0ELb0EN7cutlass{t}E19Flash_kernel_traitsILi{d}ELi{m}ELi{n}ELi{w}ES3_EELb0ELb0ELb0"
            "ELb0ELb{e}ELb1ELb0ELb0EEEvNS_16Flash_fwd_paramsE")
_FA2_BWD = ("_ZN13pytorch_flash44flash_bwd_dq_dk_dv_loop_seqk_parallel_kernelI23Flash_bwd_kernel_"
            "traitsILi{d}ELi{m}ELi{n}ELi{w}ELi{a}ELi{b}ELi{c}ELb{v}ELb0EN7cutlass{t}E19Flash_kernel_"
            "traitsILi{d}ELi{m}ELi{n}ELi{w}ES3_EELb0ELb0ELb0ELb0ELb{e}ELb1ELb0EEEvNS_16Flash_bwd_paramsE")
_FA2_TILES = {  # head dim: forward (kBlockM, kBlockN, warps; even M/N variant compiled),
    #                           backward (+ warp layouts, V in registers)
    64: (dict(m=128, n=128, w=4, e=1), dict(m=128, n=128, w=8, a=4, b=4, c=4, v=0, e=1)),
    128: (dict(m=128, n=64, w=4, e=1), dict(m=64, n=128, w=8, a=2, b=4, c=2, v=0, e=1)),
    256: (dict(m=128, n=64, w=8, e=0), dict(m=64, n=64, w=8, a=4, b=2, c=2, v=0, e=0)),
}
_DTYPES = {"bf16": "10bfloat16_t", "fp16": "6half_t"}


def fa2_kernels():
    """{mangled name: label} of the FA2 kernels compared against."""
    out = {}
    for d, (fwd, bwd) in _FA2_TILES.items():
        for dt, t in _DTYPES.items():
            out[_FA2_FWD.format(d=d, t=t, **fwd)] = f"fa2-fwd {dt} d{d}"
            out[_FA2_BWD.format(d=d, t=t, **bwd)] = f"fa2-bwd {dt} d{d}"
    return out


def our_label(name):
    """fwd / fwd-sm90a (the Hopper forward) / bwd / bwd-det / dkdv-sm90a (the Hopper dK, dV) /
    dkdvq-sm90a (the same with dQ fused) / dq-det / dq-sm90a (the Hopper dQ), dtype, head dim of
    one of our kernels' mangled names; None for the kSmallSmem variants (GPUs that allow 99 KiB of
    shared memory per block)."""
    if "ring_attn" not in name:
        return None
    hopper = re.search(
        r"sm90\d+block_(fwd|dkdv|dq)_kernelINS1_\d+(?:Fwd|Dkdv|Dq)TraitsILb([01])ELi(\d+)E"
        r"(?:Lb([01])E)?EE", name)
    if hopper:
        kind, bf16, d, fused_dq = hopper.groups()
        kind += "q" if fused_dq == "1" else ""
        return f"{kind}-sm90a {'bf16' if bf16 == '1' else 'fp16'} d{d}"
    m = re.search(r"block_(fwd|bwd|dq)_kernelINS0_\d+(?:Fwd|Bwd|Dq)TraitsILb([01])ELi(\d+)E"
                  r"(?:Lb([01])E)?EE(Lb([01])E)?", name)
    if not m or m.group(4) == "1":  # the variants for 99 KiB of shared memory are not budgeted
        return None
    kind, bf16, d, _, _, det = m.groups()
    kind = {"fwd": "fwd", "dq": "dq-det", "bwd": "bwd-det" if det == "1" else "bwd"}[kind]
    return f"{kind} {'bf16' if bf16 == '1' else 'fp16'} d{d}"


# ---- SASS -> functions -> basic blocks ------------------------------------------------------------
def parse_sass(text):
    """{function name: [(address, predicate, opcode, text)]}; a function that several cubins hold
    (one template instantiated by several translation units) keeps its first copy."""
    funcs, cur = {}, None
    for line in text.splitlines():
        m = FUNCTION.match(line)
        if m:
            cur = [] if m.group(1) not in funcs else None
            if cur is not None:
                funcs[m.group(1)] = cur
            continue
        m = LINE.search(line)
        if m and cur is not None:
            body = m.group(2).strip()
            pred = None
            if body.startswith("@"):
                pred, body = body.split(None, 1)
            cur.append((int(m.group(1), 16), pred, body.split()[0], body))
    return funcs


def _branch_target(text):
    m = re.search(r"0x([0-9a-f]+)", text.split(None, 1)[1] if " " in text else "")
    return int(m.group(1), 16) if m else None


def basic_blocks(ins):
    """([(first, last) instruction index], successors per block)"""
    index = {a: i for i, (a, _, _, _) in enumerate(ins)}
    leaders = {0}
    for i, (_, _, op, text) in enumerate(ins):
        if op.startswith(("BRA", "EXIT", "RET", "BRX", "JMP")):
            t = _branch_target(text) if op.startswith("BRA") else None
            if t in index:
                leaders.add(index[t])
            if i + 1 < len(ins):
                leaders.add(i + 1)
    starts = sorted(leaders)
    blocks = [(s, (starts[k + 1] - 1) if k + 1 < len(starts) else len(ins) - 1) for k, s in enumerate(starts)]
    block_at = {s: k for k, (s, _) in enumerate(blocks)}
    succ = []
    for k, (_, e) in enumerate(blocks):
        _, pred, op, text = ins[e]
        nxt = [k + 1] if k + 1 < len(blocks) else []
        if op.startswith("BRA"):
            t = _branch_target(text)
            out = [block_at[index[t]]] if t in index and index[t] in block_at else []
            succ.append(out + (nxt if pred is not None else []))
        elif op.startswith(("EXIT", "RET", "BRX", "JMP")):
            succ.append(nxt if pred is not None else [])
        else:
            succ.append(nxt)
    return blocks, succ


def dominators(n, succ):
    preds = [[] for _ in range(n)]
    for u in range(n):
        for v in succ[u]:
            preds[v].append(u)
    dom = [set(range(n)) for _ in range(n)]
    dom[0] = {0}
    changed = True
    while changed:
        changed = False
        for v in range(1, n):
            new = (set.intersection(*(dom[p] for p in preds[v])) if preds[v] else set()) | {v}
            if new != dom[v]:
                dom[v], changed = new, True
    return dom, preds


def natural_loops(n, succ):
    """{header: (body blocks, back-edge sources)}, loops sharing a header merged."""
    dom, preds = dominators(n, succ)
    loops = {}
    for u in range(n):
        for h in succ[u]:
            if h in dom[u]:
                body, latches = loops.setdefault(h, ({h}, set()))
                latches.add(u)
                stack = [u]
                body.add(u)
                while stack:
                    x = stack.pop()
                    if x == h:
                        continue
                    for p in preds[x]:
                        if p not in body:
                            body.add(p)
                            stack.append(p)
    return loops


def mma_equivalents(op):
    if op.startswith("HMMA.16816"):
        return 1.0
    if op.startswith("HMMA.1688"):
        return 0.5
    m = re.match(r"HGMMA\.(\d+)x(\d+)x(\d+)", op)
    if m:  # a warpgroup instruction, issued by each of its 4 warps
        mm, nn, kk = (int(x) for x in m.groups())
        return mm * nn * kk * 2 / 4 / 4096
    return 0.0


def counts(ins, blocks, ks):
    c = collections.Counter()
    for k in ks:
        s, e = blocks[k]
        for i in range(s, e + 1):
            op = ins[i][2]
            base = op.split(".")[0]
            c["instructions"] += 1
            c["hmma"] += mma_equivalents(op)
            c["ldl"] += base == "LDL"
            c["stl"] += base == "STL"
            c["ldg"] += base == "LDG"
            c["barriers"] += op.startswith(("BAR.SYNC", "BAR.ARV", "BAR.RED", "SYNCS"))
            c["reductions"] += base in REDUCTIONS
    return c


def hot_cycle(ins, blocks, succ, loops, header):
    """Blocks of one steady-state iteration of the loop at `header` (see the module docstring)."""
    body, latches = loops[header]
    back = {(u, h) for h, (_, ls) in loops.items() for u in ls}
    dag = {k: [v for v in succ[k] if v in body and (k, v) not in back] for k in body}
    size = {k: blocks[k][1] - blocks[k][0] + 1 for k in body}
    must = {k: any(ins[i][2].startswith(MUST) for i in range(blocks[k][0], blocks[k][1] + 1)) for k in body}
    order, seen = [], set()

    def visit(x):  # iterative DFS post-order
        stack = [(x, iter(dag[x]))]
        seen.add(x)
        while stack:
            node, it = stack[-1]
            nxt = next((v for v in it if v not in seen), None)
            if nxt is None:
                order.append(node)
                stack.pop()
            else:
                seen.add(nxt)
                stack.append((nxt, iter(dag[nxt])))

    visit(header)
    order.reverse()
    pos = {k: i for i, k in enumerate(order)}
    best = {header: ((int(must[header]), -size[header]), None)}
    for k in order:
        if k not in best:
            continue
        (m, c), _ = best[k]
        for v in dag[k]:
            if pos[v] <= pos[k]:  # a retreating edge of an irreducible inner cycle
                continue
            cand = (m + must[v], c - size[v])
            if v not in best or cand > best[v][0]:
                best[v] = (cand, k)
    end = max((u for u in latches if u in best), key=lambda u: best[u][0])
    path = [end]
    while best[path[-1]][1] is not None:
        path.append(best[path[-1]][1])
    return list(reversed(path))


def analyse(ins):
    """Budget of one function's main loop, or None when it has no loop with tensor-core work."""
    blocks, succ = basic_blocks(ins)
    loops = natural_loops(len(blocks), succ)
    work = {h: counts(ins, blocks, body)["hmma"] for h, (body, _) in loops.items()}
    loops = {h: v for h, v in loops.items() if work[h] > 0}
    if not loops:
        return None
    header = max(loops, key=lambda h: (work[h], -len(loops[h][0])))
    hot = counts(ins, blocks, hot_cycle(ins, blocks, succ, loops, header))
    body = counts(ins, blocks, loops[header][0])
    mma = hot["hmma"]
    return {
        "hmma_per_iteration": mma,
        "instructions_per_iteration": hot["instructions"],
        "instr_per_hmma": hot["instructions"] / mma,
        "spill_loads": hot["ldl"],
        "spill_stores": hot["stl"],
        "global_loads": hot["ldg"],
        "barriers_per_hmma": hot["barriers"] / mma,
        "reductions_per_hmma": hot["reductions"] / mma,
        "loop_spill_loads": body["ldl"],
        "loop_global_loads": body["ldg"],
    }


# ---- inputs ---------------------------------------------------------------------------------------
def find_cuobjdump():
    try:
        import triton
        p = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if p.exists():
            return str(p)
    except ImportError:
        pass
    for d in (os.environ.get("CUDA_HOME", "/usr/local/cuda"), "/usr/local/cuda"):
        p = Path(d, "bin", "cuobjdump")
        if p.exists():
            return str(p)
    return None


def default_so():
    try:
        import ring_attention
        return str(Path(ring_attention.__file__).parent / "_C.so")
    except ImportError:
        return str(ROOT / "ring_attention" / "_C.so")


def torch_cuda_lib():
    try:
        import torch
        p = Path(torch.__file__).parent / "lib" / "libtorch_cuda.so"
        return str(p) if p.exists() else None
    except ImportError:
        return None


def sass_of(cuobjdump, path, functions=None):
    cmd = [cuobjdump, "-arch", "sm_90", "-sass"]
    if functions:
        cmd += ["-fun", ",".join(functions)]
    run = subprocess.run(cmd + [path], capture_output=True, text=True)
    if run.returncode != 0 and not run.stdout:
        raise RuntimeError(f"{' '.join(cmd[:4])} {path}: {run.stderr.strip()[:300]}")
    return run.stdout


def ours(cuobjdump, so):
    """{label: budget} of our sm_90 kernels in the built extension."""
    out = {}
    for name, ins in parse_sass(sass_of(cuobjdump, so)).items():
        label = our_label(name)
        if label:
            budget = analyse(ins)
            if budget:
                out[label] = budget
    return out


def fa2(cuobjdump, lib, cache_dir=None):
    """{label: budget} of FA2's kernels in torch's library (cached per library file: reading it
    takes seconds)."""
    st = os.stat(lib)
    key = hashlib.sha1(f"{lib}:{st.st_size}:{st.st_mtime_ns}:{Path(__file__).stat().st_mtime_ns}".encode()).hexdigest()[:16]
    cache = Path(cache_dir or os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ring_attention"
    cache_file = cache / f"fa2_budget_{key}.json"
    if cache_file.exists():
        return json.loads(cache_file.read_text())
    names = fa2_kernels()
    out = {}
    for name, ins in parse_sass(sass_of(cuobjdump, lib, list(names))).items():
        if name in names:
            budget = analyse(ins)
            if budget:
                out[names[name]] = budget
    try:
        cache.mkdir(parents=True, exist_ok=True)
        cache_file.write_text(json.dumps(out))
    except OSError:
        pass
    return out


def table(rows):
    lines = ["| kernel | instr/HMMA | HMMA/iter | spill LD/ST | LDG | barriers/HMMA | red+atom/HMMA | loop LDL/LDG |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label, b in rows.items():
        lines.append(f"| {label} | {b['instr_per_hmma']:.2f} | {b['hmma_per_iteration']:g} | "
                     f"{b['spill_loads']}/{b['spill_stores']} | {b['global_loads']} | "
                     f"{b['barriers_per_hmma']:.3f} | {b['reductions_per_hmma']:.3f} | "
                     f"{b['loop_spill_loads']}/{b['loop_global_loads']} |")
    return "\n".join(lines)


def _sort_key(label):
    kind, dt, d = label.split()
    order = ["fwd", "fwd-sm90a", "fa2-fwd", "bwd", "bwd-det", "dkdv-sm90a", "dkdvq-sm90a", "dq-det",
             "dq-sm90a", "fa2-bwd"]
    return (int(d[1:]), dt, order.index(kind) if kind in order else 99)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--so", default=None, help="the extension (default: the imported package's _C.so)")
    ap.add_argument("--cuobjdump", default=None, help="default: triton's copy, else $CUDA_HOME/bin")
    ap.add_argument("--torch-lib", default=None, help="libtorch_cuda.so holding FA2 (default: torch's)")
    ap.add_argument("--no-fa2", action="store_true", help="our kernels only")
    ap.add_argument("--json", default=None, help="write {label: budget} here")
    args = ap.parse_args(argv)
    cuobjdump = args.cuobjdump or find_cuobjdump()
    if not cuobjdump:
        sys.exit("sass_budget: no cuobjdump (install triton or set CUDA_HOME)")
    rows = ours(cuobjdump, args.so or default_so())
    if not rows:
        sys.exit("sass_budget: no sm_90 block kernels in the extension (built without CUDA or sm_90?)")
    lib = args.torch_lib or torch_cuda_lib()
    if not args.no_fa2 and lib:
        rows.update(fa2(cuobjdump, lib))
    rows = dict(sorted(rows.items(), key=lambda kv: _sort_key(kv[0])))
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
