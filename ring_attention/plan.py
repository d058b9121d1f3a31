"""A picture of the ring schedule: which (rank, step) block pairs are computed, and how much work.

    python -m ring_attention.plan --world 4 --layout zigzag --causal --out plan.png
    python -m ring_attention.plan --world 4 --layout contiguous --causal --window 32 0
    python -m ring_attention.plan --world 4 --layout zigzag --causal --seqlens 100,7,1,300
    python -m ring_attention.plan --strategies --world 8 --ulysses 2 --heads 32 --heads-kv 8 \
        --headdim 128 --seqlen 65536

For every ring step and rank it classifies the block pair (this rank's queries against the K/V
that started on rank (rank - step) mod world) as skipped where the ring skips it (from the
queries' bounds and the keys' lowest and highest positions, as csrc/core/mask.h does), else full
or partial (some pairs masked: the diagonal; under a narrow window a zigzag or striped block may
be computed with no pair visible, work 0), counts the visible (query, key) pairs as the work,
prints the table and the imbalance (max / mean work over ranks), and draws it when --out is
given (needs matplotlib). With --strategies it prints instead what each way of exchanging K/V
(ring, allgather, each with and without Ulysses over --ulysses ranks) sends per rank and call,
and which it would pick (ring_attention/strategies.py).
"""
import argparse
import sys
from dataclasses import dataclass
from typing import List

import torch

from .layouts import LAYOUTS, positions, varlen_positions

FULL, PARTIAL, SKIP = "full", "partial", "skip"


@dataclass
class Block:
    rank: int
    step: int
    source: int
    kind: str      # FULL, PARTIAL or SKIP
    work: float    # visible pairs / (local_len * local_len)


@dataclass
class Plan:
    world: int
    layout: str
    causal: bool
    local_len: int
    blocks: List[Block]
    window: tuple = (-1, -1)

    def steps(self) -> int:
        """Ring steps needed: 1 + the last step at which some rank computes something."""
        return 1 + max(b.step for b in self.blocks if b.kind != SKIP)

    def work_per_rank(self) -> List[float]:
        totals = [0.0] * self.world
        for b in self.blocks:
            totals[b.rank] += b.work
        return totals

    def imbalance(self) -> float:
        """max / mean of the ranks' work: 1.0 is perfectly balanced."""
        work = self.work_per_rank()
        mean = sum(work) / len(work)
        return max(work) / mean if mean > 0 else 1.0


def _tokens(world, layout, local_len, seqlens):
    """Per rank: (positions, sequence id) of its tokens; sequence id -1 marks a pad token."""
    if seqlens is None:
        return [(positions(layout, r, world, local_len), torch.zeros(local_len, dtype=torch.int64))
                for r in range(world)]
    cu = torch.tensor([0, *torch.tensor(seqlens).cumsum(0).tolist()], dtype=torch.int32)
    seq_of = torch.repeat_interleave(torch.arange(len(seqlens)), torch.tensor(seqlens))
    out = []
    for r in range(world):
        pos, src = varlen_positions(cu, layout, r, world)
        out.append((pos, torch.where(src >= 0, seq_of[src.clamp(min=0)], torch.full_like(src, -1))))
    return out


def _row_bounds(tokens, causal, window):
    """Per rank: the (lo, hi) positions of the keys each of its queries may see, as the ring
    bounds them (csrc/core/mask.h row_bounds): its sequence's positions, narrowed by causal and
    the window; lo > hi for a pad token."""
    far = 1 << 62
    seq_lo, seq_hi = {}, {}
    for pos, seq in tokens:
        for s in seq[seq >= 0].unique().tolist():
            seq_lo[s] = min(seq_lo.get(s, far), int(pos[seq == s].min()))
            seq_hi[s] = max(seq_hi.get(s, -far), int(pos[seq == s].max()))
    left, right = (min(w, far) for w in window)  # a wider window is as good as unbounded
    bounds = []
    for pos, seq in tokens:
        lo = torch.tensor([seq_lo.get(s, 1) for s in seq.tolist()], dtype=torch.int64)
        hi = torch.tensor([seq_hi.get(s, 0) for s in seq.tolist()], dtype=torch.int64)
        if left >= 0:
            lo = torch.maximum(lo, pos - left)
        if causal:
            hi = torch.minimum(hi, pos)
        if right >= 0:
            hi = torch.minimum(hi, pos + right)
        bounds.append((lo, hi))
    return bounds


def _ring_skips(bounds, k_pos) -> bool:
    """Whether the ring skips a block (csrc/core/mask.h classify_tile): from the queries' bounds
    and the keys' lowest and highest positions alone, so a block whose every pair is masked may
    still be computed (zigzag or striped shards under a narrow window)."""
    lo, hi = bounds
    rows = lo <= hi
    if not rows.any() or k_pos.numel() == 0:
        return True
    return int(hi[rows].max()) < int(k_pos.min()) or int(lo[rows].min()) > int(k_pos.max())


def make_plan(world: int, layout: str, causal: bool, local_len: int = 64, window=(-1, -1),
              seqlens=None) -> Plan:
    """Classifies every (rank, step) block pair by counting visible (query, key) pairs from global
    positions: causal, ``window=(left, right)`` (-1 unbounded) and, with ``seqlens``, packed
    sequences (split by shard_varlen; local_len is then derived)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}")
    tokens = _tokens(world, layout, local_len, seqlens)
    bounds = _row_bounds(tokens, causal, window)
    local_len = tokens[0][0].numel()
    left, right = window
    blocks = []
    for rank in range(world):
        q_pos, q_seq = tokens[rank]
        for step in range(world):
            source = (rank - step) % world
            k_pos, k_seq = tokens[source]
            rel = k_pos.view(1, -1) - q_pos.view(-1, 1)
            visible = (q_seq.view(-1, 1) == k_seq.view(1, -1)) & (q_seq.view(-1, 1) >= 0)
            if causal:
                visible &= rel <= 0
            if left >= 0:
                visible &= rel >= -left
            if right >= 0:
                visible &= rel <= right
            count, total = int(visible.sum()), max(1, local_len * local_len)
            if _ring_skips(bounds[rank], k_pos):
                kind = SKIP
            else:
                kind = FULL if count == total else PARTIAL
            blocks.append(Block(rank, step, source, kind, count / total))
    return Plan(world, layout, causal, local_len, blocks, tuple(window))


def format_table(plan: Plan) -> str:
    symbol = {FULL: "#", PARTIAL: "/", SKIP: "."}
    window = "" if plan.window == (-1, -1) else f", window {plan.window}"
    lines = [f"ring schedule: world {plan.world}, layout {plan.layout}, "
             f"{'causal' if plan.causal else 'non-causal'}{window}, {plan.local_len} tokens per rank",
             "  # full   / partial (work = visible fraction)   . skipped",
             "rank | " + " ".join(f"step {t:<5}" for t in range(plan.world)) + " | work"]
    work = plan.work_per_rank()
    for rank in range(plan.world):
        cells = []
        for b in (b for b in plan.blocks if b.rank == rank):
            cells.append(f"{symbol[b.kind]} {b.work:4.2f}<{b.source}".ljust(10))
        lines.append(f"{rank:>4} | " + " ".join(cells) + f" | {work[rank]:.2f}")
    lines.append(f"imbalance (max/mean work): {plan.imbalance():.3f}; ring steps needed: {plan.steps()} of {plan.world}")
    return "\n".join(lines)


def draw(plan: Plan, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    colors = {FULL: "#2b6cb0", PARTIAL: "#90cdf4", SKIP: "#edf2f7"}
    fig, (ax, bar) = plt.subplots(1, 2, figsize=(2 + 1.3 * plan.world + 3, 1 + 0.7 * plan.world),
                                  gridspec_kw={"width_ratios": [plan.world, 2]})
    for b in plan.blocks:
        ax.add_patch(plt.Rectangle((b.step, b.rank), 1, 1, color=colors[b.kind], ec="white", lw=2))
        ax.text(b.step + 0.5, b.rank + 0.5, f"K/V {b.source}\n{b.work:.2f}", ha="center", va="center",
                fontsize=8, color="white" if b.kind == FULL else "black")
    ax.set_xlim(0, plan.world)
    ax.set_ylim(plan.world, 0)
    ax.set_xticks([t + 0.5 for t in range(plan.world)], [f"step {t}" for t in range(plan.world)])
    ax.set_yticks([r + 0.5 for r in range(plan.world)], [f"rank {r}" for r in range(plan.world)])
    ax.set_title(f"{plan.layout}, {'causal' if plan.causal else 'non-causal'}, world {plan.world}")
    ax.legend(handles=[Patch(color=c, label=k) for k, c in colors.items()], loc="upper center",
              bbox_to_anchor=(0.5, -0.08), ncol=3, frameon=False)
    work = plan.work_per_rank()
    bar.barh(range(plan.world), work, color="#2b6cb0")
    bar.set_ylim(plan.world - 0.5, -0.5)
    bar.set_yticks(range(plan.world), [f"rank {r}" for r in range(plan.world)])
    bar.set_title(f"work per rank (imbalance {plan.imbalance():.2f})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _int_at_least(low: int):
    """An argparse type: an int >= low."""
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    parse.__name__ = f"int >= {low}"  # argparse names the type in "invalid ... value"
    return parse


def _seqlens(text: str) -> List[int]:
    """An argparse type: comma-separated sequence lengths >= 0, not all 0."""
    try:
        seqlens = [int(n) for n in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated ints, got {text!r}") from None
    if any(n < 0 for n in seqlens) or sum(seqlens) == 0:
        raise argparse.ArgumentTypeError(f"lengths must be >= 0 and not all 0, got {text!r}")
    return seqlens


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ring_attention.plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    positive = _int_at_least(1)
    p.add_argument("--world", type=positive, default=4)
    p.add_argument("--layout", default="zigzag", choices=LAYOUTS)
    p.add_argument("--causal", action="store_true")
    p.add_argument("--local-len", type=positive, default=64, help="tokens per rank")
    p.add_argument("--window", type=_int_at_least(-1), nargs=2, default=(-1, -1),
                   metavar=("LEFT", "RIGHT"), help="sliding window (-1: unbounded)")
    p.add_argument("--seqlens", type=_seqlens, help="packed sequence lengths, comma-separated (varlen)")
    p.add_argument("--out", help="PNG to draw (needs matplotlib)")
    p.add_argument("--strategies", action="store_true", help="bytes and messages per strategy")
    p.add_argument("--ulysses", type=positive, default=1, help="--strategies: Ulysses group size U")
    p.add_argument("--heads", type=positive, default=32)
    p.add_argument("--heads-kv", type=positive, default=8)
    p.add_argument("--headdim", type=positive, default=128)
    p.add_argument("--seqlen", type=positive, default=65536, help="--strategies: global tokens")
    p.add_argument("--batch", type=positive, default=1)
    p.add_argument("--elem-bytes", type=positive, default=2, help="2 for bf16/fp16, 4 for fp32")
    args = p.parse_args(argv)
    if args.causal and args.window[1] > 0:
        p.error(f"with --causal the right window must be -1 or 0, got {args.window[1]}")
    if args.heads % args.heads_kv:
        p.error(f"--heads ({args.heads}) must be a multiple of --heads-kv ({args.heads_kv})")
    try:
        if args.strategies:
            from .strategies import costs, format_costs
            table = format_costs(costs(args.world, args.ulysses, args.heads, args.heads_kv,
                                       args.headdim, args.seqlen, batch=args.batch,
                                       elem_bytes=args.elem_bytes))
        else:
            plan = make_plan(args.world, args.layout, args.causal, args.local_len,
                             tuple(args.window), args.seqlens)
    except ValueError as error:  # a combination the library rejects (e.g. odd zigzag length)
        p.error(str(error))
    if args.strategies:
        print(f"per rank and call: world {args.world}, {args.heads} heads, {args.heads_kv} K/V "
              f"heads, head dim {args.headdim}, {args.seqlen} tokens, batch {args.batch}, "
              f"{args.elem_bytes}-byte elements")
        print(table)
        return 0
    if args.out:
        try:
            draw(plan, args.out)
        except (OSError, ValueError) as error:  # an unwritable path, a format matplotlib lacks
            p.error(f"--out {args.out}: {error}")
    print(format_table(plan))
    if args.out:
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
