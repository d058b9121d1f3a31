"""Single-process multi-rank mode: every virtual rank of a ring in one process.

``LocalRing(world_size).ring_attn_func(qs, ks, vs, ...)`` runs the same C++ scheduler as the
distributed ring, each virtual rank's steps driven in turn from this thread over an in-memory
transport, so nothing can deadlock on the autograd engine's per-device thread. It is how the ring
is tested without spawning processes and on a single GPU.
"""
from typing import List, Optional, Sequence

import torch

from ._ops import ops


class _LocalRingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, world: int, causal: bool, softmax_scale: float, layout: str, *tensors):
        qs, ks, vs = tensors[:world], tensors[world:2 * world], tensors[2 * world:]
        outs, lses = ops.local_ring_fwd(list(qs), list(ks), list(vs), causal, softmax_scale, layout)
        ctx.save_for_backward(*qs, *ks, *vs, *outs, *lses)
        ctx.ring_args = (world, causal, softmax_scale, layout)
        ctx.mark_non_differentiable(*lses)
        return (*outs, *lses)

    @staticmethod
    def backward(ctx, *grads):
        world, causal, softmax_scale, layout = ctx.ring_args
        saved = ctx.saved_tensors
        qs, ks, vs, outs, lses = (list(saved[i * world:(i + 1) * world]) for i in range(5))
        douts = [g if g is not None else torch.zeros_like(o) for g, o in zip(grads[:world], outs)]
        dqs, dks, dvs = ops.local_ring_bwd(douts, qs, ks, vs, outs, lses, causal, softmax_scale, layout)
        return (None, None, None, None, *dqs, *dks, *dvs)


class LocalRing:
    """``world_size`` virtual ranks of a ring in this process, on ``device`` ("cpu" or "cuda")."""

    def __init__(self, world_size: int, device: str = "cpu"):
        if world_size < 1:
            raise ValueError(f"LocalRing: world_size must be >= 1, got {world_size}")
        self.world_size = world_size
        self.device = torch.device(device)

    def ring_attn_func(self, qs: Sequence[torch.Tensor], ks: Sequence[torch.Tensor],
                       vs: Sequence[torch.Tensor], *, causal: bool = False,
                       softmax_scale: Optional[float] = None, layout: str = "contiguous",
                       return_lse: bool = False):
        """Ring attention of every virtual rank's shard.

        qs, ks, vs: one shard per virtual rank, shapes as for ``ring_attn_func``. Returns the list
        of outputs, or (outputs, lses). Gradients flow back to every shard.
        """
        world = self.world_size
        for name, shards in (("qs", qs), ("ks", ks), ("vs", vs)):
            if len(shards) != world:
                raise ValueError(f"LocalRing: {name} needs {world} shards (one per virtual rank), got {len(shards)}")
            for t in shards:
                if t.device.type != self.device.type:
                    raise ValueError(f"LocalRing on {self.device}: {name} has a tensor on {t.device}")
        if softmax_scale is None:
            headdim = qs[0].shape[-1] if qs[0].dim() > 0 else 0
            softmax_scale = headdim ** -0.5 if headdim > 0 else 1.0
        results = _LocalRingAttention.apply(world, bool(causal), float(softmax_scale), layout, *qs, *ks, *vs)
        outs: List[torch.Tensor] = list(results[:world])
        lses: List[torch.Tensor] = list(results[world:])
        return (outs, lses) if return_lse else outs

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
