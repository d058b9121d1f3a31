"""The differentiable ring attention entry point."""
from typing import Optional

import torch

from . import _group
from ._ops import ops


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group_name: str, causal: bool, softmax_scale: float, layout: str):
        out, lse = ops.ring_fwd(q, k, v, group_name, causal, softmax_scale, layout)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.ring_args = (group_name, causal, softmax_scale, layout)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ops.ring_bwd(dout, q, k, v, out, lse, *ctx.ring_args)
        return dq, dk, dv, None, None, None, None


def ring_attn_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                   softmax_scale: Optional[float] = None, group=None, layout: str = "contiguous",
                   return_lse: bool = False):
    """Exact attention of this rank's queries against the whole sharded sequence.

    q: (batch, seqlen_local, nheads, headdim); k, v: (batch, seqlen_local, nheads_kv, headdim) with
    nheads % nheads_kv == 0. Every rank of ``group`` (default: the default group; world size 1
    when torch.distributed is not initialised) calls this with its shard in ``layout``
    ("contiguous", "zigzag" or "striped", as produced by ``shard``). Causal masking is by global
    token position. Returns out like q, or (out, lse) with lse (batch, nheads, seqlen_local) in
    float32 (float64 for float64 inputs), natural log, not differentiable.
    Invalid or mismatched inputs raise ValueError on every rank.
    """
    group, _, _ = _group.resolve(group)
    if softmax_scale is None:
        headdim = q.shape[-1] if q.dim() > 0 else 0
        softmax_scale = headdim ** -0.5 if headdim > 0 else 1.0
    out, lse = _RingAttention.apply(q, k, v, _group.group_name(group), bool(causal),
                                    float(softmax_scale), layout)
    return (out, lse) if return_lse else out
