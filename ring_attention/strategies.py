"""What each strategy of exchanging K/V sends per rank and call, from the shapes alone.

P = U * R ranks (U in the ulysses_group, R in the group), L = S / P tokens per rank, b the batch,
h query heads, hk K/V heads (hk' = lcm(U, hk) when U does not divide hk, else hk), d the head dim,
e the input's element size and a the accumulator's (4 bytes; 8 for float64). A K/V block of the
ring group holds U * L tokens of hk' / U heads: KV = 2 b L hk' d e bytes, its dK/dV G = 2 b L hk' d a.

  ring      forward (T - 1) KV in T - 1 messages (T = R ring steps, fewer when a window stops the
            ring early; ranks whose K/V no rank that far round needs send less still); backward
            (T - 1) (KV + G) in 2 (T - 1) messages. K/V memory: 3 KV.
  allgather forward (R - 1) KV in R - 1 messages (one all-gather); backward (R - 1) (KV + G) in
            2 (R - 1) messages (an all-gather and a reduce-scatter). K/V memory: R KV, and R G
            for the backward's dK/dV contributions.
  Ulysses   adds (U - 1) / U of q, k, v and out forward (of dout, dq, dk and dv backward):
            (U - 1) / U * b L d e (2 h + 2 hk') bytes each way, in U - 1 messages per tensor.
"""
import math
import operator
from dataclasses import dataclass
from typing import List, Optional

KV_EXCHANGES = ("ring", "allgather")


@dataclass
class Cost:
    kv_exchange: str
    ulysses: int
    ring: int
    fwd_bytes: int      # bytes this rank sends in the forward
    bwd_bytes: int      # and in the backward
    fwd_messages: int
    bwd_messages: int
    kv_memory: int      # bytes of K/V (and dK/dV) buffers the exchange holds per rank

    @property
    def total_bytes(self) -> int:
        return self.fwd_bytes + self.bwd_bytes


def _as_int(value) -> Optional[int]:
    """value as a Python int when it is an integer (numpy's and 0-d integer tensors included, not
    a bool); else None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def cost(kv_exchange: str, world: int, ulysses: int, heads: int, heads_kv: int, headdim: int,
         seqlen: int, batch: int = 1, elem_bytes: int = 2, acc_bytes: int = 4,
         ring_steps: int = 0) -> Cost:
    """Bytes and messages per rank of one call (see the module docstring); ring_steps: the ring's
    steps when a window stops it early (0: R)."""
    if kv_exchange not in KV_EXCHANGES:
        raise ValueError(f"unknown kv_exchange {kv_exchange!r}")
    sizes = dict(world=world, ulysses=ulysses, heads=heads, heads_kv=heads_kv, headdim=headdim,
                 seqlen=seqlen, batch=batch, elem_bytes=elem_bytes, acc_bytes=acc_bytes)
    for name, value in sizes.items():
        if _as_int(value) is None or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    world, ulysses, heads, heads_kv, headdim, seqlen, batch, elem_bytes, acc_bytes = (
        _as_int(value) for value in sizes.values())
    for name, value, divisor, divisor_name in (
            ("world", world, ulysses, "U"), ("heads", heads, ulysses, "U"),
            ("heads", heads, heads_kv, "heads_kv"), ("seqlen", seqlen, world, "world")):
        if value % divisor:
            raise ValueError(f"{name} ({value}) must divide by {divisor_name} ({divisor})")
    ring = world // ulysses
    if _as_int(ring_steps) is None or not 0 <= ring_steps <= ring:
        raise ValueError(f"ring_steps must be 0 (all R = {ring} steps) or an int in [1, {ring}], "
                         f"got {ring_steps!r}")
    ring_steps = _as_int(ring_steps)
    local = seqlen // world
    heads_kv_ex = heads_kv if heads_kv % ulysses == 0 else math.lcm(ulysses, heads_kv)
    kv = 2 * batch * local * heads_kv_ex * headdim * elem_bytes
    grad = 2 * batch * local * heads_kv_ex * headdim * acc_bytes
    hops = (ring_steps or ring) - 1 if kv_exchange == "ring" else ring - 1
    fwd, bwd = hops * kv, hops * (kv + grad)
    fwd_msgs, bwd_msgs = hops, 2 * hops
    memory = 3 * kv if kv_exchange == "ring" else ring * (kv + grad)
    if ulysses > 1:
        exchanged = batch * local * headdim * elem_bytes * (2 * heads + 2 * heads_kv_ex)
        fwd += exchanged * (ulysses - 1) // ulysses
        bwd += exchanged * (ulysses - 1) // ulysses
        fwd_msgs += 4 * (ulysses - 1)
        bwd_msgs += 4 * (ulysses - 1)
    return Cost(kv_exchange, ulysses, ring, fwd, bwd, fwd_msgs, bwd_msgs, memory)


def costs(world: int, ulysses: int, heads: int, heads_kv: int, headdim: int, seqlen: int,
          ring_steps: int = 0, **kwargs) -> List[Cost]:
    """Every kv_exchange without Ulysses and, with ulysses > 1, with it. ring_steps: those of the
    ring over all world ranks when a window stops it early (0: world); a causal window over
    contiguous shards, U times as long on the ring of world / U ranks, stops that one after
    min(world / U, 1 + ceil((ring_steps - 1) / U)) steps."""
    grid = [1] if ulysses == 1 else [1, ulysses]
    steps = {u: ring_steps for u in grid}  # cost() rejects a ring_steps outside [0, world]
    if type(ring_steps) is int and 1 <= ring_steps <= world and ulysses > 1:
        steps[ulysses] = min(world // ulysses, 1 + -(-(ring_steps - 1) // ulysses))
    return [cost(exchange, world, u, heads, heads_kv, headdim, seqlen, ring_steps=steps[u],
                 **kwargs)
            for u in grid for exchange in KV_EXCHANGES]


def pick(candidates: List[Cost]) -> Cost:
    """The fewest bytes per rank (forward + backward), then the fewest messages, then the least
    K/V memory."""
    return min(candidates, key=lambda c: (c.total_bytes, c.fwd_messages + c.bwd_messages,
                                          c.kv_memory))


def format_costs(candidates: List[Cost]) -> str:
    best = pick(candidates)
    lines = ["strategy             U  R | fwd bytes   msgs | bwd bytes   msgs | K/V memory",
             "-" * 78]
    for c in candidates:
        name = c.kv_exchange + (" + ulysses" if c.ulysses > 1 else "")
        mark = "  <- pick" if c is best else ""
        lines.append(f"{name:<19} {c.ulysses:>2} {c.ring:>2} | {c.fwd_bytes:>11,} {c.fwd_messages:>4} | "
                     f"{c.bwd_bytes:>11,} {c.bwd_messages:>4} | {c.kv_memory:>11,}{mark}")
    lines.append("pick: fewest bytes per rank (forward + backward), then fewest messages, then least "
                 "K/V memory")
    return "\n".join(lines)
