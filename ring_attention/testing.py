"""Single-process multi-rank mode: every virtual rank of a ring in one process.

``LocalRing(world_size).ring_attn_func(qs, ks, vs, ...)`` runs the same C++ scheduler as the
distributed ring, each virtual rank's steps driven in turn from this thread over an in-memory
transport, so nothing can deadlock on the autograd engine's per-device thread. It is how the ring
is tested without spawning processes and on a single GPU.
"""
from typing import List, Optional, Sequence

import torch

from ._ops import ops
from .functional import _default_scale, _deterministic, _kv_exchange, _window


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
        ctx.mark_non_differentiable(*lses)
        return (*outs, *lses)

    @staticmethod
    def backward(ctx, *grads):
        world = ctx.world
        saved = ctx.saved_tensors
        qs, ks, vs, outs, lses = (list(saved[i * world:(i + 1) * world]) for i in range(5))
        douts = [g if g is not None else torch.zeros_like(o) for g, o in zip(grads[:world], outs)]
        dqs, dks, dvs = ops.local_ring_bwd(douts, qs, ks, vs, outs, lses, *ctx.ring_args,
                                           deterministic=ctx.deterministic, kv_exchange=ctx.kv_exchange)
        return (None, None, None, None, None, None, None, None, *dqs, *dks, *dvs)


class LocalRing:
    """``world_size`` virtual ranks of a ring in this process, on ``device`` ("cpu" or "cuda")."""

    def __init__(self, world_size: int, device: str = "cpu"):
        if world_size < 1:
            raise ValueError(f"LocalRing: world_size must be >= 1, got {world_size}")
        self.world_size = world_size
        self.device = torch.device(device)

    def ring_attn_func(self, qs: Sequence[torch.Tensor], ks: Sequence[torch.Tensor],
                       vs: Sequence[torch.Tensor], *, causal: bool = False,
                       softmax_scale: Optional[float] = None, window_size=(-1, -1),
                       layout: str = "contiguous", return_lse: bool = False, deterministic: bool = False,
                       kv_exchange: str = "ring"):
        """Ring attention of every virtual rank's shard.

        qs, ks, vs: one shard per virtual rank, shapes as for ``ring_attn_func``. Returns the list
        of outputs, or (outputs, lses). Gradients flow back to every shard.
        """
        return self._run(qs, ks, vs, None, causal, softmax_scale, window_size, layout, return_lse,
                         deterministic, kv_exchange)

    def ring_attn_varlen_func(self, qs: Sequence[torch.Tensor], ks: Sequence[torch.Tensor],
                              vs: Sequence[torch.Tensor], cu_seqlens: torch.Tensor, *,
                              causal: bool = False, softmax_scale: Optional[float] = None,
                              window_size=(-1, -1), layout: str = "contiguous", return_lse: bool = False,
                              deterministic: bool = False, kv_exchange: str = "ring"):
        """Packed sequences as ``ring_attn_varlen_func``: one (tokens_local, heads, headdim) shard
        per virtual rank, as made by ``shard_varlen``."""
        return self._run(qs, ks, vs, cu_seqlens, causal, softmax_scale, window_size, layout, return_lse,
                         deterministic, kv_exchange)

    def _run(self, qs, ks, vs, cu_seqlens, causal, softmax_scale, window_size, layout, return_lse,
             deterministic, kv_exchange):
        world = self.world_size
        for name, shards in (("qs", qs), ("ks", ks), ("vs", vs)):
            if len(shards) != world:
                raise ValueError(f"LocalRing: {name} needs {world} shards (one per virtual rank), got {len(shards)}")
            for t in shards:
                if t.device.type != self.device.type:
                    raise ValueError(f"LocalRing on {self.device}: {name} has a tensor on {t.device}")
        results = _LocalRingAttention.apply(world, cu_seqlens, bool(causal), _default_scale(qs[0], softmax_scale),
                                            _window(window_size), layout, _deterministic(deterministic),
                                            _kv_exchange(kv_exchange), *qs, *ks, *vs)
        outs: List[torch.Tensor] = list(results[:world])
        lses: List[torch.Tensor] = list(results[world:])
        return (outs, lses) if return_lse else outs

    def shard_varlen(self, x: torch.Tensor, cu_seqlens: torch.Tensor, *, layout: str = "contiguous",
                     dim: int = 0) -> List[torch.Tensor]:
        """Every virtual rank's part of the packed tensor ``x`` (see ``shard_varlen``)."""
        from .layouts import _padded_source
        return [_padded_source(x, cu_seqlens, layout, r, self.world_size, dim) for r in range(self.world_size)]

    def unshard_varlen(self, shards: Sequence[torch.Tensor], cu_seqlens: torch.Tensor, *,
                       layout: str = "contiguous", dim: int = 0) -> torch.Tensor:
        """The packed tensor in original order from every virtual rank's part, pads removed."""
        from .layouts import _varlen_order
        order = _varlen_order(cu_seqlens, layout, self.world_size).to(shards[0].device)
        return torch.cat(list(shards), dim=dim).index_select(dim, order)

    def shard(self, x: torch.Tensor, *, layout: str = "contiguous", dim: int = 1) -> List[torch.Tensor]:
        """Every virtual rank's part of the full tensor ``x``."""
        from .layouts import _local_len, positions
        local_len = _local_len(x.shape[dim], self.world_size, layout)
        return [x.index_select(dim, positions(layout, r, self.world_size, local_len).to(x.device))
                for r in range(self.world_size)]

    def unshard(self, shards: Sequence[torch.Tensor], *, layout: str = "contiguous", dim: int = 1) -> torch.Tensor:
        """The full tensor in global order from every virtual rank's part."""
        from .layouts import _inverse_order
        inverse = _inverse_order(layout, self.world_size, shards[0].shape[dim]).to(shards[0].device)
        return torch.cat(list(shards), dim=dim).index_select(dim, inverse)
