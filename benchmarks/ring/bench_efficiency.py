"""Ring efficiency, memory and agreement-check cost on CPU ranks over gloo (1 thread per rank).

Efficiency: the same attention on 1 rank (T1) and on `world` ranks (Tw, slowest rank's median),
    efficiency = T1 / (world * Tw); 1.0 means the ring adds nothing to the work. T1 and Tw are
    timed in the same processes, alternating call by call (rank 0 alone, the others waiting,
    then every rank), so both see the same machine.
Ceiling: in the same alternation, every rank at once runs just the block kernels of its share
    (its queries against the whole K/V, with the layout's positions: the same FLOPs and mask as
    its ring steps) with no exchange and no ring (Tk). T1 / (world * Tk) is what the machine
    allows when `world` ranks compute side by side (shared caches, memory bandwidth, clocks); a
    ring cannot beat it.
Steps: the same kernels split as the ring splits them (its queries against each rank's K/V block
    in ring order, merged; the backward adds each block's dK/dV into its own buffers) with no
    exchange (Ts). Ts - Tk is what splitting the work into ring steps costs; Tw - Ts is what the
    ring adds on top (its exchanges, on cores that are busy computing, and its bookkeeping).
Exchange: the ring's transfers alone, every rank at once (Tx): one K|V-sized message to the next
    rank per hop, world - 1 hops in the forward and 2 (world - 1) more in the backward (K/V, dK/dV).
Hidden: the fraction of the exchange time the ring hides under its steps, the overlap metric every
    benchmark reports: clamp((Ts + Tx - Tw) / Tx, 0, 1).
Checks: the ring's output against the kernels alone and against the steps (max abs difference
    below 1e-4), and a hop's received K|V against what the previous rank holds; the exit status is
    1 when one fails.
Memory: each rank's peak resident-memory growth during a forward call.
Check cost: a call with RING_ATTN_CHECK=1 minus the same call with RING_ATTN_CHECK=0.
"""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from benchmarks import harness as h  # noqa: E402

CASES = [("non-causal", False, "contiguous"), ("causal zigzag", True, "zigzag"),
         ("causal striped", True, "striped"), ("causal contiguous", True, "contiguous")]


def _time_ring(rank, world, seqlen, heads, headdim, iters, warmup, cases):
    """Per case (fwd, fwd+bwd) medians of T1 (rank 0 alone on the whole sequence, through a group
    of one, while the other ranks wait) and Tw (every rank on its shard). The two alternate call by
    call, so drifts in the machine's speed hit both alike."""
    import statistics
    import time

    import ring_attention as ra
    solo = [dist.new_group([r]) for r in range(world)]  # every rank creates every group
    gen = torch.Generator().manual_seed(0)
    full = [torch.randn(1, seqlen, heads, headdim, generator=gen) for _ in range(4)]
    out = {}
    ops, scale = torch.ops.ring_attention, headdim ** -0.5
    for name, causal, layout in cases:
        local = [ra.shard(t, layout=layout).contiguous() for t in full]
        whole = [t.clone() for t in full] if rank == 0 else None
        q_pos = ra.positions(layout, rank, world, seqlen // world).int()
        k_pos = torch.arange(seqlen, dtype=torch.int32)

        src_pos = [ra.positions(layout, r, world, seqlen // world).int() for r in range(world)]
        src_kv = [[t.index_select(1, src_pos[r].long()).contiguous() for t in full[1:3]]
                  for r in range(world)]
        # (k, v, k_pos) blocks: the whole K/V in one call (kernels alone), or each rank's block in
        # ring order (steps alone).
        whole_kv = [(full[1], full[2], k_pos)]
        ring_order = [(rank - step) % world for step in range(world)]
        ring_kv = [(*src_kv[r], src_pos[r]) for r in ring_order]

        def kernels_on(blocks, backward):
            """This rank's queries against `blocks` as bare block kernels (no ring, no exchange):
            the forward merged over the blocks, then the backward with one dK/dV pair per block.
            Returns the forward's output."""
            q, dout = local[0], local[3]
            acc = torch.zeros(q.shape)
            lse = torch.full((1, heads, q.shape[1]), float("-inf"))
            for k, v, pos in blocks:
                ops.block_fwd(q, k, v, q_pos, pos, None, acc, lse, causal, -1, -1, scale)
            if backward:
                delta = (dout * acc).sum(-1).transpose(1, 2).contiguous()
                dq = torch.zeros(q.shape)
                for k, v, pos in blocks:
                    dk, dv = torch.zeros(k.shape), torch.zeros(v.shape)
                    ops.block_bwd(dout, q, k, v, q_pos, pos, None, lse, delta, dq, dk, dv, causal,
                                  -1, -1, scale)
            return acc

        kv_send = torch.cat([local[1].flatten(), local[2].flatten()])  # K and V in one message
        kv_recv = torch.empty_like(kv_send)

        def exchanges_alone(backward):
            """The ring's transfers without its kernels, one K|V-sized message per hop: K/V make
            world - 1 hops in the forward; the backward adds world - 1 of K/V and world - 1 of dK/dV."""
            nxt, prv = (rank + 1) % world, (rank - 1) % world
            for _ in range((world - 1) * (3 if backward else 1)):
                for req in dist.batch_isend_irecv([dist.P2POp(dist.isend, kv_send, nxt),
                                                   dist.P2POp(dist.irecv, kv_recv, prv)]):
                    req.wait()

        def call(tensors, group, backward):
            q, k, v, dout = tensors
            if not backward:
                with torch.no_grad():
                    ra.ring_attn_func(q, k, v, causal=causal, layout=layout, group=group)
                return
            q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
            ra.ring_attn_func(q, k, v, causal=causal, layout=layout, group=group).backward(dout)

        # Checks: the kernels alone and split into steps give the ring's output, and a hop delivers
        # the previous rank's K|V.
        with torch.no_grad():
            ring_out = ra.ring_attn_func(*local[:3], causal=causal, layout=layout)
        exchanges_alone(False)
        prev_kv = torch.cat([t.flatten() for t in src_kv[(rank - 1) % world]])
        checks = {"kernels": (kernels_on(whole_kv, False) - ring_out).abs().max().item(),
                  "steps": (kernels_on(ring_kv, False) - ring_out).abs().max().item(),
                  "exchange": (kv_recv - prev_kv).abs().max().item() if world > 1 else 0.0}

        times = {}
        for backward in (False, True):
            # Each alternation: T1 (rank 0 alone), then every rank at once: Tw, Tk, Ts, Tx.
            together = [lambda: call(local, None, backward), lambda: kernels_on(whole_kv, backward),
                        lambda: kernels_on(ring_kv, backward), lambda: exchanges_alone(backward)]
            t1, samples = [], [[] for _ in together]
            for i in range(warmup + iters):
                dist.barrier()
                if rank == 0:
                    t0 = time.perf_counter()
                    call(whole, solo[0], backward)
                    if i >= warmup:
                        t1.append(time.perf_counter() - t0)
                for fn, sample in zip(together, samples):
                    dist.barrier()
                    t0 = time.perf_counter()
                    fn()
                    if i >= warmup:
                        sample.append(time.perf_counter() - t0)
            times[backward] = (statistics.median(t1) if t1 else None,
                               *(statistics.median(sample) for sample in samples))
        out[name] = {"times": times, "checks": checks}
    return out


def _memory(rank, world, seqlen, heads, headdim):
    import ring_attention as ra
    gen = torch.Generator().manual_seed(0)
    local = seqlen // world
    q, k, v = (torch.randn(1, local, heads, headdim, generator=gen) for _ in range(3))
    with torch.no_grad():
        ra.ring_attn_func(q[:, :8], k[:, :8], v[:, :8])  # first-call costs are not the ring's
        dist.barrier()
        base = h.rss_bytes()
        h.reset_peak_rss()
        ra.ring_attn_func(q, k, v)
        return h.peak_rss_bytes() - base


def _check_cost(rank, world, iters):
    import ring_attention as ra
    q = torch.randn(1, 16, 2, 16)
    times = {}
    for check in ("1", "0"):
        os.environ["RING_ATTN_CHECK"] = check
        with torch.no_grad():
            times[check] = h.median_time(lambda: ra.ring_attn_func(q, q, q), iters, 5, dist.barrier)
    return times


def main(argv=None) -> int:
    p = h.parser(__doc__, json_default="bench_out/efficiency.json")
    h.add_shape_args(p, world=2, seqlen=8192)
    names = [name.split()[-1] for name, _, _ in CASES]
    p.add_argument("--cases", type=lambda v: v.split(","), default=names,
                   help="cases to time (default all: non-causal,zigzag,striped,contiguous)")
    p.add_argument("--memory-seqlen", type=h.positive_int, default=16384)
    args = p.parse_args(argv)
    unknown = [c for c in args.cases if c not in names]
    if unknown or not args.cases:
        p.error(f"--cases must name some of {','.join(names)}, got {','.join(args.cases)!r}")
    parts = 2 * args.world if "zigzag" in args.cases else args.world  # zigzag: 2 chunks per rank
    if args.seqlen % parts:
        p.error(f"--seqlen {args.seqlen} is not divisible by {parts} (the shards of the cases' layouts)")
    h.set_fp32_precision(args)

    cases = [c for c in CASES if c[0].split()[-1] in args.cases]
    shape = (args.seqlen, args.heads, args.headdim, args.iters, args.warmup, cases)
    ring = h.run_ranks(args.world, _time_ring, *shape)
    rows, worst = [], {}
    for name, _, _ in cases:
        row = {"case": name}
        for backward, phase in ((False, "fwd"), (True, "fwd+bwd")):
            t1, tw, tk, ts, tx = (ring[0][name]["times"][backward][0],
                                  *(max(r[name]["times"][backward][j] for r in ring)
                                    for j in range(1, 5)))
            row[f"{phase} T1 ms"] = f"{t1 * 1e3:.1f}"
            row[f"{phase} T{args.world} ms"] = f"{tw * 1e3:.1f}"
            row[f"{phase} eff"] = f"{t1 / (args.world * tw):.3f}"
            row[f"{phase} ceiling"] = f"{t1 / (args.world * tk):.3f}"
            row[f"{phase} steps"] = f"{t1 / (args.world * ts):.3f}"
            row[f"{phase} exch ms"] = f"{tx * 1e3:.1f}"
            row[f"{phase} hidden"] = f"{h.hidden_fraction(tw, ts, tx):.2f}"
        rows.append(row)
        for what in ("kernels", "steps", "exchange"):
            worst[what] = max(worst.get(what, 0.0), *(r[name]["checks"][what] for r in ring))
    print(f"\nRing efficiency, {args.seqlen} tokens, batch 1, {args.heads} heads, dim {args.headdim}, fp32 ({args.fp32_precision}), "
          f"1 thread per rank, {args.world} ranks vs 1 (medians of {args.iters}, alternating; ceiling: "
          f"the ranks' block kernels side by side, no ring; steps: the same kernels split into the "
          f"ring's steps, no exchange; exch: the ring's transfers alone; hidden: the part of exch the ring "
          f"hides under its steps)")
    h.print_table(rows, list(rows[0].keys()))
    ok = worst["kernels"] < 1e-4 and worst["steps"] < 1e-4 and worst["exchange"] == 0
    print(f"check: max |ring out - kernels alone| {worst['kernels']:.1e}, |ring out - steps| "
          f"{worst['steps']:.1e} (bound 1e-4), |received - sent K|V| {worst['exchange']:.1e}: "
          f"{'ok' if ok else 'FAILED'}")

    peaks = h.run_ranks(args.world, _memory, args.memory_seqlen, args.heads, args.headdim)
    scores_mb = args.heads * (args.memory_seqlen // args.world) * args.memory_seqlen * 4 / 2 ** 20
    print(f"\nMemory, {args.memory_seqlen} tokens non-causal forward on {args.world} ranks: peak growth per rank "
          + ", ".join(f"{p / 2 ** 20:.0f} MB" for p in peaks) + f" (its score rows would be {scores_mb:,.0f} MB)")

    checks = h.run_ranks(args.world, _check_cost, 50)
    cost_us = max((c["1"] - c["0"]) * 1e6 for c in checks)
    print(f"\nAgreement check (RING_ATTN_CHECK=1) cost per call on {args.world} gloo ranks: {cost_us:.0f} us "
          f"(call with check {checks[0]['1'] * 1e6:.0f} us, without {checks[0]['0'] * 1e6:.0f} us, tiny input)")

    h.write_json(args.json, {"machine": h.machine(), "args": vars(args), "efficiency": rows,
                             "checks": worst, "memory_peak_bytes": peaks, "check_cost_us": cost_us})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
