"""Single-process multi-rank mode: every virtual rank of a ring in one process.

``LocalRing(world_size).ring_attn_func(qs, ks, vs, ...)`` runs the same C++ scheduler as the
distributed ring, each virtual rank's steps driven in turn from this thread over an in-memory
transport, so nothing can deadlock on the autograd engine's per-device thread. It is how the ring
is tested without spawning processes and on a single GPU.
"""
from typing import List, Optional, Sequence

import torch

from ._autograd import once_differentiable
from ._ops import ops
from .functional import _autocast, _op_arguments
from .sinks import apply_sinks, sinks_error
from .strategies import _as_int


class _LocalRingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, world: int, cu_seqlens, causal: bool, softmax_scale: float, window: tuple, layout: str,
                deterministic: bool, kv_exchange: str, *tensors):
        qs, ks, vs = tensors[:world], tensors[world:2 * world], tensors[2 * world:]
        args = (cu_seqlens, causal, softmax_scale, *window, layout)
        outs, lses = ops.local_ring_fwd(list(qs), list(ks), list(vs), *args, kv_exchange=kv_exchange)
        ctx.save_for_backward(*qs, *ks, *vs, *outs, *lses)
        ctx.world, ctx.ring_args, ctx.deterministic = world, args, deterministic
        ctx.kv_exchange = kv_exchange
        ctx.set_materialize_grads(False)  # gradients None where an output is unused
        return (*outs, *lses)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        world = ctx.world
        saved = ctx.saved
        qs, ks, vs, outs, lses = (list(saved[i * world:(i + 1) * world]) for i in range(5))
        douts = [g if g is not None else torch.zeros_like(o) for g, o in zip(grads[:world], outs)]
        dlses = None
        if any(g is not None for g in grads[world:]):
            dlses = [g if g is not None else torch.zeros_like(lse)
                     for g, lse in zip(grads[world:], lses)]
        dqs, dks, dvs = ops.local_ring_bwd(douts, qs, ks, vs, outs, lses, *ctx.ring_args,
                                           deterministic=ctx.deterministic, kv_exchange=ctx.kv_exchange,
                                           dlses=dlses)
        return (None, None, None, None, None, None, None, None, *dqs, *dks, *dvs)


class LocalRing:
    """``world_size`` virtual ranks of a ring in this process, on ``device`` ("cpu" or "cuda").

    ``ulysses_size`` U > 1: the ranks form a U x R grid (R = world_size / U), virtual rank
    r * U + u being Ulysses rank u of ring rank r, as ``ulysses_group`` and ``group`` do: the
    all-to-all over heads runs in memory, and one ring of R ranks per head chunk."""

    def __init__(self, world_size: int, device: str = "cpu", ulysses_size: int = 1):
        world, ulysses = _as_int(world_size), _as_int(ulysses_size)
        if world is None or world < 1:
            raise ValueError(f"LocalRing: world_size must be an int >= 1, got {world_size!r}")
        if ulysses is None or ulysses < 1 or world % ulysses:
            raise ValueError(f"LocalRing: ulysses_size must be an int dividing world_size "
                             f"({world}), got {ulysses_size!r}")
        self.world_size = world
        self.ulysses_size = ulysses
        self.device = torch.device(device)

    def ring_attn_func(self, qs: Sequence[torch.Tensor], ks: Sequence[torch.Tensor],
                       vs: Sequence[torch.Tensor], *, causal: bool = False,
                       softmax_scale: Optional[float] = None, window_size=(-1, -1),
                       layout: str = "contiguous", return_lse: bool = False, deterministic: bool = False,
                       kv_exchange: str = "ring", sinks: Optional[torch.Tensor] = None):
        """Ring attention of every virtual rank's shard.

        qs, ks, vs: one shard per virtual rank, shapes as for ``ring_attn_func``; ``sinks``
        (nheads,) as there, the same for every rank. Returns the list of outputs, or (outputs,
        lses). Gradients flow back to every shard.
        """
        return self._run_with_sinks(qs, ks, vs, None, causal, softmax_scale, window_size, layout,
                                    return_lse, deterministic, kv_exchange, sinks)

    def ring_attn_varlen_func(self, qs: Sequence[torch.Tensor], ks: Sequence[torch.Tensor],
                              vs: Sequence[torch.Tensor], cu_seqlens: torch.Tensor, *,
                              causal: bool = False, softmax_scale: Optional[float] = None,
                              window_size=(-1, -1), layout: str = "contiguous", return_lse: bool = False,
                              deterministic: bool = False, kv_exchange: str = "ring",
                              sinks: Optional[torch.Tensor] = None):
        """Packed sequences as ``ring_attn_varlen_func``: one (tokens_local, heads, headdim) shard
        per virtual rank, as made by ``shard_varlen``."""
        return self._run_with_sinks(qs, ks, vs, cu_seqlens, causal, softmax_scale, window_size,
                                    layout, return_lse, deterministic, kv_exchange, sinks)

    def _run_with_sinks(self, qs, ks, vs, cu_seqlens, causal, softmax_scale, window_size, layout,
                        return_lse, deterministic, kv_exchange, sinks):
        """_run, then the sinks applied to every virtual rank's rows."""
        error = sinks_error(sinks, qs[0] if len(qs) else None)
        if error:
            raise ValueError(f"LocalRing: {error}")
        results = self._run(qs, ks, vs, cu_seqlens, causal, softmax_scale, window_size, layout,
                            return_lse or sinks is not None, deterministic, kv_exchange)
        if sinks is None:
            return results
        outs, lses = map(list, zip(*(apply_sinks(out, lse, sinks) for out, lse in zip(*results))))
        return (outs, lses) if return_lse else outs

    def _run(self, qs, ks, vs, cu_seqlens, causal, softmax_scale, window_size, layout, return_lse,
             deterministic, kv_exchange):
        if self.ulysses_size > 1:
            return self._run_grid(qs, ks, vs, cu_seqlens, causal, softmax_scale, window_size,
                                  layout, return_lse, deterministic, kv_exchange)
        world = self.world_size
        for name, shards in (("qs", qs), ("ks", ks), ("vs", vs)):
            if len(shards) != world:
                raise ValueError(f"LocalRing: {name} needs {world} shards (one per virtual rank), got {len(shards)}")
            for t in shards:
                if t.device.type != self.device.type:
                    raise ValueError(f"LocalRing on {self.device}: {name} has a tensor on {t.device}")
        cast = _autocast(*qs, *ks, *vs)
        qs, ks, vs = cast[:world], cast[world:2 * world], cast[2 * world:]
        *args, return_lse = _op_arguments(qs[0], causal, softmax_scale, window_size, layout,
                                          return_lse, deterministic, kv_exchange)
        results = _LocalRingAttention.apply(world, cu_seqlens, *args, *qs, *ks, *vs)
        outs: List[torch.Tensor] = list(results[:world])
        lses: List[torch.Tensor] = list(results[world:])
        return (outs, lses) if return_lse else outs

    def _run_grid(self, qs, ks, vs, cu_seqlens, causal, softmax_scale, window_size, layout,
                  return_lse, deterministic, kv_exchange):
        """The U x R grid: per Ulysses rank u, a ring of R ranks over head chunk u of every ring
        shard (the in-memory all-to-all: concatenations of slices), then the output back."""
        import math
        from .layouts import _ring_tokens
        size, ring = self.ulysses_size, self.world_size // self.ulysses_size
        for name, shards in (("qs", qs), ("ks", ks), ("vs", vs)):
            if len(shards) != self.world_size:
                raise ValueError(f"LocalRing: {name} needs {self.world_size} shards (one per virtual rank), "
                                 f"got {len(shards)}")
        packed = cu_seqlens is not None
        tokens, heads, heads_kv = qs[0].dim() - 3, qs[0].shape[-2], ks[0].shape[-2]
        if heads % size or heads % heads_kv:
            raise ValueError(f"LocalRing: {heads} query heads must divide by ulysses_size ({size}) "
                             f"and by the {heads_kv} K/V heads")
        repeat = size // math.gcd(size, heads_kv)
        ks, vs = ([t.repeat_interleave(repeat, dim=-2) for t in shards] for shards in (ks, vs))
        cut = _ring_tokens(cu_seqlens, layout, ring) if packed else None

        def ring_shard(shards, r, u):  # ring rank r's tokens, head chunk u
            chunk = shards[0].shape[-2] // size
            whole = torch.cat([shards[r * size + v].narrow(-2, u * chunk, chunk) for v in range(size)],
                              dim=tokens)
            return whole.narrow(0, 0, cut) if packed else whole

        columns = []
        for u in range(size):
            columns.append(LocalRing(ring, str(self.device))._run(
                *([ring_shard(shards, r, u) for r in range(ring)] for shards in (qs, ks, vs)),
                cu_seqlens, causal, softmax_scale, window_size, layout, True, deterministic,
                kv_exchange))
        outs, lses = [], []
        length = qs[0].shape[tokens]
        for r in range(ring):
            for u in range(size):
                out_parts, lse_parts = [], []
                for v in range(size):
                    out, lse = columns[v][0][r], columns[v][1][r]
                    if packed:  # restore the pad that made the ring shard divide by U
                        pad = size * length - out.shape[0]
                        out = torch.nn.functional.pad(out, (0, 0, 0, 0, 0, pad))
                        lse = torch.nn.functional.pad(lse, (0, pad), value=float("-inf"))
                    out_parts.append(out.narrow(tokens, u * length, length))
                    lse_parts.append(lse.narrow(-1, u * length, length))
                outs.append(torch.cat(out_parts, dim=-2))
                lses.append(torch.cat(lse_parts, dim=-2))
        return (outs, lses) if return_lse else outs

    def _split(self, ring_shards: List[torch.Tensor], dim: int) -> List[torch.Tensor]:
        """Every ring shard in U contiguous parts (padded at its end to divide): rank r * U + u."""
        size = self.ulysses_size
        parts = []
        for shard in ring_shards:
            part = -(-shard.shape[dim] // size)
            pad_shape = list(shard.shape)
            pad_shape[dim] = part * size - shard.shape[dim]
            shard = torch.cat([shard, shard.new_zeros(pad_shape)], dim=dim)
            parts += [shard.narrow(dim, u * part, part) for u in range(size)]
        return parts

    def _join(self, shards: Sequence[torch.Tensor], dim: int, length=None) -> List[torch.Tensor]:
        """The ring shards from every rank's part (the first `length` tokens of each)."""
        size = self.ulysses_size
        joined = [torch.cat(list(shards[r * size:(r + 1) * size]), dim=dim)
                  for r in range(len(shards) // size)]
        return [j.narrow(dim, 0, length) for j in joined] if length is not None else joined

    def shard_varlen(self, x: torch.Tensor, cu_seqlens: torch.Tensor, *, layout: str = "contiguous",
                     dim: int = 0) -> List[torch.Tensor]:
        """Every virtual rank's part of the packed tensor ``x`` (see ``shard_varlen``)."""
        from .layouts import _padded_source
        ring = self.world_size // self.ulysses_size
        dim = dim % x.dim()
        return self._split([_padded_source(x, cu_seqlens, layout, r, ring, dim) for r in range(ring)], dim)

    def unshard_varlen(self, shards: Sequence[torch.Tensor], cu_seqlens: torch.Tensor, *,
                       layout: str = "contiguous", dim: int = 0) -> torch.Tensor:
        """The packed tensor in original order from every virtual rank's part, pads removed."""
        from .layouts import _varlen_order
        from .layouts import _ring_tokens
        ring = self.world_size // self.ulysses_size
        dim = dim % shards[0].dim()
        ring_shards = self._join(shards, dim, _ring_tokens(cu_seqlens, layout, ring))
        order = _varlen_order(cu_seqlens, layout, ring).to(shards[0].device)
        return torch.cat(ring_shards, dim=dim).index_select(dim, order)

    def shard(self, x: torch.Tensor, *, layout: str = "contiguous", dim: int = 1) -> List[torch.Tensor]:
        """Every virtual rank's part of the full tensor ``x``."""
        from .layouts import _local_len, positions
        ring = self.world_size // self.ulysses_size
        local_len = _local_len(x.shape[dim], self.world_size, layout) * self.ulysses_size
        return self._split([x.index_select(dim, positions(layout, r, ring, local_len).to(x.device))
                            for r in range(ring)], dim % x.dim())

    def unshard(self, shards: Sequence[torch.Tensor], *, layout: str = "contiguous", dim: int = 1) -> torch.Tensor:
        """The full tensor in global order from every virtual rank's part."""
        from .layouts import _inverse_order
        ring = self.world_size // self.ulysses_size
        ring_shards = self._join(shards, dim % shards[0].dim())
        inverse = _inverse_order(layout, ring, ring_shards[0].shape[dim]).to(shards[0].device)
        return torch.cat(ring_shards, dim=dim).index_select(dim, inverse)
