"""Ulysses: an all-to-all over heads inside ``ulysses_group``, around the K/V exchange over ``group``.

U ranks in ulysses_group and R in group form a U x R grid of U*R ranks. A rank holds a contiguous
1/U of its ring shard (all heads); the all-to-all gives it the whole ring shard (U * L tokens) for
nheads / U query heads and their K/V heads, the ring (or all-gather) runs over group on those, and
the inverse all-to-all brings the output (and lse) back. K/V heads are first repeated to
lcm(U, nheads_kv) when U does not divide nheads_kv, so every rank holds whole GQA groups; autograd
sums the repeated heads' gradients.
"""
import math
import threading
from typing import Callable, Optional, Tuple

import torch
import torch.distributed as dist

from . import _group
from .layouts import _check_cu_seqlens, varlen_positions
from .strategies import KV_EXCHANGES
_COUNTS = threading.local()
_MESSAGE_BYTES = 384


def all_to_all_bytes_sent() -> int:
    """Bytes this thread has sent in Ulysses all-to-alls so far: (U - 1) / U of every exchanged
    tensor (q, k, v and out forward, with return_lse lse too; dout, dq, dk and dv backward)."""
    return getattr(_COUNTS, "bytes", 0)


def _all_to_all(parts: torch.Tensor, group, world: int) -> torch.Tensor:
    """parts: (world, ...); returns out with out[j] = rank j's parts[this rank]."""
    parts = parts.contiguous()
    out = torch.empty_like(parts)
    dist.all_to_all_single(out, parts, group=group)
    _COUNTS.bytes = all_to_all_bytes_sent() + parts.nbytes // world * (world - 1)
    return out


def _seq_to_heads(x, group, world):
    """(batch, L, heads, d) -> (batch, world * L, heads / world, d): the ring shard's tokens in
    Ulysses rank order, this rank's head chunk."""
    b, length, heads, d = x.shape
    parts = x.reshape(b, length, world, heads // world, d).permute(2, 0, 1, 3, 4)
    got = _all_to_all(parts, group, world)  # (world, batch, L, heads / world, d)
    return got.permute(1, 0, 2, 3, 4).reshape(b, world * length, heads // world, d)


def _heads_to_seq(x, group, world):
    """The inverse of _seq_to_heads: (batch, world * L, h, d) -> (batch, L, world * h, d)."""
    b, tokens, heads, d = x.shape
    parts = x.reshape(b, world, tokens // world, heads, d).permute(1, 0, 2, 3, 4)
    got = _all_to_all(parts, group, world)  # (world, batch, L, h, d): every rank's head chunk
    return got.permute(1, 2, 0, 3, 4).reshape(b, tokens // world, world * heads, d)


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, world):
        ctx.group, ctx.world = group, world
        return _seq_to_heads(x, group, world)

    @staticmethod
    def backward(ctx, grad):
        return _heads_to_seq(grad, ctx.group, ctx.world), None, None


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, world):
        ctx.group, ctx.world = group, world
        return _heads_to_seq(x, group, world)

    @staticmethod
    def backward(ctx, grad):
        return _seq_to_heads(grad, ctx.group, ctx.world), None, None


def _lse_to_seq(lse, group, world):
    """(batch, h, world * L) -> (batch, world * h, L), not differentiable."""
    b, heads, tokens = lse.shape
    parts = lse.reshape(b, heads, world, tokens // world).permute(2, 0, 1, 3)
    got = _all_to_all(parts, group, world)  # (world, batch, h, L)
    return got.permute(1, 0, 2, 3).reshape(b, world * heads, tokens // world)


def _ring_tokens(cu_seqlens, layout, ring_world):
    """Tokens of one rank's ring shard of a packed batch (shard_varlen over ring_world ranks)."""
    return varlen_positions(cu_seqlens, layout, 0, ring_world)[0].numel()


# ---- agreement -------------------------------------------------------------------------------

_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# Descriptor fields (int64), then the message bytes.
_FIELDS = ("q dims", "batch", "local tokens", "number of query heads", "number of K/V heads",
           "head dimension", "dtype", "kv_exchange", "Ulysses group size", "ring group size",
           "rank in the ring group", "rank in the ulysses_group", "global rank")
_AGREED = 8  # the first fields every rank of a ulysses_group must share


def _local_error(q, k, v, cu_seqlens, layout, kv_exchange, ulysses_world, ring_world) -> str:
    dims = 3 if cu_seqlens is not None else 4
    if q.dim() != dims or k.dim() != dims or v.dim() != dims or k.shape != v.shape \
            or q.shape[:-2] != k.shape[:-2] or q.shape[-1] != k.shape[-1]:
        return (f"q, k and v must be {dims}-D with matching tokens and head dimension; got q "
                f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    heads, heads_kv = q.shape[-2], k.shape[-2]
    if kv_exchange not in KV_EXCHANGES:
        return f"unknown kv_exchange {kv_exchange!r} (expected 'ring' or 'allgather')"
    if heads_kv == 0 or heads % heads_kv:
        return (f"the number of query heads ({heads}) must be a multiple of the number of K/V "
                f"heads ({heads_kv})")
    if heads % ulysses_world:
        return (f"the number of query heads ({heads}) must be divisible by the size of the "
                f"ulysses_group ({ulysses_world})")
    if cu_seqlens is not None:
        try:
            _check_cu_seqlens(cu_seqlens)
            ring_tokens = _ring_tokens(cu_seqlens, layout, ring_world)
        except ValueError as error:
            return str(error)
        expected = -(-ring_tokens // ulysses_world)
        if q.shape[0] != expected:
            return (f"q has {q.shape[0]} tokens, but shard_varlen with this ulysses_group gives "
                    f"{expected} per rank")
    return ""


def _describe(q, k, cu_seqlens, kv_exchange, ranks, error):
    tokens_dim = q.dim() - 3
    fields = [q.dim(), q.shape[0] if tokens_dim else 1, q.shape[tokens_dim] if q.dim() >= 3 else 0,
              q.shape[-2] if q.dim() >= 2 else 0, k.shape[-2] if k.dim() >= 2 else 0, q.shape[-1],
              _DTYPES.index(q.dtype) if q.dtype in _DTYPES else -1,
              KV_EXCHANGES.index(kv_exchange) if kv_exchange in KV_EXCHANGES else -1, *ranks]
    return fields, error


def _gather(fields, error, group, world, device):
    """Every rank's (fields, error) in the group."""
    message = list(error.encode()[:_MESSAGE_BYTES].ljust(_MESSAGE_BYTES, b"\0"))
    mine = torch.tensor(fields + message, dtype=torch.int64, device=device)
    everyone = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine, group=group)
    rows = [t.cpu().tolist() for t in everyone]
    n = len(fields)
    return [(row[:n], bytes(row[n:]).rstrip(b"\0").decode(errors="replace")) for row in rows]


def _first_error(described, agreed, what, name_rank=True):
    """The first rank's error (after its global rank with `name_rank`), or a disagreement on a
    field in `agreed`, or ""."""
    for fields, error in described:
        if error:
            return f"rank {fields[-1]}: {error}" if name_rank else error
    for field in agreed:
        values = [fields[field] for fields, _ in described]
        if len(set(values)) > 1:
            listing = ", ".join(f"rank {f[-1]}: {f[field]}" for f, _ in described)
            return f"ranks of one {what} disagree on the {_FIELDS[field]} ({listing})"
    return ""


def _agree(q, k, v, cu_seqlens, layout, kv_exchange, group, ulysses_group):
    """Raises the same ValueError on every rank of the grid unless every rank's inputs are valid,
    the ranks of each ulysses_group agree, and the groups form a U x R grid: every rank of a
    ulysses_group has the same rank in its group, every rank of a group the same rank in its
    ulysses_group. Two small all-gathers (over ulysses_group, then group), before anything else
    is sent."""
    from ._ops import ops
    ulysses, u_rank, u_world = _group.resolve(ulysses_group)
    _, r_rank, r_world = _group.resolve(group)
    error = _local_error(q, k, v, cu_seqlens, layout, kv_exchange, u_world, r_world)
    device = ops.group_collective_device(_group.group_name(ulysses), str(q.device))
    if not device:
        raise ValueError(f"ring_attn_func: {ops.group_device_error(_group.group_name(ulysses), str(q.device), False)}")
    fields, error = _describe(q, k, cu_seqlens, kv_exchange,
                              [u_world, r_world, r_rank, u_rank, dist.get_rank()], error)
    row = _gather(fields, error, ulysses, u_world, device)
    # The ranks of one ulysses_group share the inputs' shape, the kv_exchange, R and their rank in
    # the ring group.
    row_error = _first_error(row, list(range(_AGREED)) + [9, 10], "ulysses_group")
    if group is not None and r_world > 1:
        column = _gather(fields, row_error, group, r_world, device)
        row_error = _first_error(column, [8, 11], "group", name_rank=False)
    if row_error:
        raise ValueError(f"ring_attn_func: invalid input or groups (every rank raises this): "
                         f"{row_error}")


# ---- the call --------------------------------------------------------------------------------

def attention(q, k, v, cu_seqlens, group, ulysses_group, layout: str, kv_exchange: str,
              ring: Callable, return_lse: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """out (like q) and lse (or None) of attention with the all-to-all over ulysses_group and
    ring(q, k, v) -> (out, lse) over group on the exchanged tensors."""
    _agree(q, k, v, cu_seqlens, layout, kv_exchange, group, ulysses_group)
    ulysses, _, world = _group.resolve(ulysses_group)
    if world == 1:
        out, lse = ring(q, k, v)
        return out, lse if return_lse else None
    packed = cu_seqlens is not None
    if packed:  # one batch of tokens
        q, k, v = (t.unsqueeze(0) for t in (q, k, v))
    repeat = world // math.gcd(world, k.shape[2])
    if repeat > 1:  # lcm(world, heads_kv) K/V heads: whole GQA groups on every rank
        k, v = (t.repeat_interleave(repeat, dim=2) for t in (k, v))
    q_ex, k_ex, v_ex = (_SeqToHeads.apply(t, ulysses, world) for t in (q, k, v))
    tokens = q_ex.shape[1]
    if packed:  # the ring shard without the pad that made it divide by U
        _, _, ring_world = _group.resolve(group)
        ring_tokens = _ring_tokens(cu_seqlens, layout, ring_world)
        q_ex, k_ex, v_ex = (t[0, :ring_tokens] for t in (q_ex, k_ex, v_ex))
    out_ex, lse_ex = ring(q_ex, k_ex, v_ex)
    if packed:
        pad = tokens - out_ex.shape[0]
        out_ex = torch.nn.functional.pad(out_ex, (0, 0, 0, 0, 0, pad)).unsqueeze(0)
        lse_ex = torch.nn.functional.pad(lse_ex, (0, pad), value=float("-inf")).unsqueeze(0)
    out = _HeadsToSeq.apply(out_ex, ulysses, world)
    lse = _lse_to_seq(lse_ex, ulysses, world) if return_lse else None
    if packed:
        out = out[0]
        lse = lse[0] if lse is not None else None
    return out, lse
