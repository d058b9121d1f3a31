"""Ulysses: an all-to-all over heads inside ``ulysses_group``, around the K/V exchange over ``group``.

U ranks in ulysses_group and R in group form a U x R grid of U*R ranks. A rank holds a contiguous
1/U of its ring shard (all heads); the all-to-all gives it the whole ring shard (U * L tokens) for
nheads / U query heads and their K/V heads, the ring (or all-gather) runs over group on those, and
the inverse all-to-all brings the output (and lse) back. K/V heads are first repeated to
lcm(U, nheads_kv) when U does not divide nheads_kv, so every rank holds whole GQA groups; the
backward sums the repeated heads' gradients. The grid's agreement, the all-to-alls and the ring run
inside one op per direction (``ulysses_fwd``, ``ulysses_bwd``; csrc/bindings/ulysses_ops.h), so a
call traces under ``torch.compile(fullgraph=True)``.
"""
from typing import Optional, Tuple

import torch

from ._autograd import once_differentiable
from ._ops import ops


def all_to_all_bytes_sent() -> int:
    """Bytes this thread has sent in Ulysses all-to-alls so far: (U - 1) / U of every exchanged
    tensor (q, k, v and out forward, dout, dq, dk and dv backward; with return_lse, lse and its
    gradient too)."""
    return ops.all_to_all_bytes_sent()


class _UlyssesAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, group_name: str, ulysses_group_name: str, causal: bool,
                softmax_scale: float, window_left: int, window_right: int, layout: str,
                deterministic: bool, kv_exchange: str, return_lse: bool):
        args = (cu_seqlens, group_name, ulysses_group_name, causal, softmax_scale, window_left,
                window_right, layout)
        out, lse, *exchanged = ops.ulysses_fwd(q, k, v, *args, kv_exchange=kv_exchange,
                                               return_lse=return_lse)
        ctx.save_for_backward(*exchanged)
        ctx.ring_args, ctx.heads_kv = args, k.shape[-2]
        ctx.out_shape = out.shape
        ctx.deterministic, ctx.kv_exchange = deterministic, kv_exchange
        # With return_lse every rank of the grid exchanges dlse (zeros where lse is unused).
        ctx.lse_shape = lse.shape if return_lse else None
        if not return_lse:
            ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, dlse):
        saved = ctx.saved
        q_heads, lse_heads = saved[0], saved[4]
        if dout is None:
            dout = q_heads.new_zeros(ctx.out_shape)
        if ctx.lse_shape is None:  # lse was an empty placeholder (a traced backward may pass one)
            dlse = None
        elif dlse is None:
            dlse = lse_heads.new_zeros(ctx.lse_shape)
        dq, dk, dv = ops.ulysses_bwd(dout, *saved[:5], *ctx.ring_args, ctx.heads_kv,
                                     deterministic=ctx.deterministic, kv_exchange=ctx.kv_exchange,
                                     dlse=dlse, forward_calls=saved[5])
        return (dq, dk, dv) + (None,) * 11


def attention(q, k, v, cu_seqlens, group_name: str, ulysses_group_name: str, causal: bool,
              softmax_scale: float, window_left: int, window_right: int, layout: str,
              deterministic: bool, kv_exchange: str,
              return_lse: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """out (like q) and lse (or None) of attention with the all-to-all over the ulysses_group
    registered as ulysses_group_name, around the ring over group_name."""
    out, lse = _UlyssesAttention.apply(q, k, v, cu_seqlens, group_name, ulysses_group_name,
                                       causal, softmax_scale, window_left, window_right, layout,
                                       deterministic, kv_exchange, return_lse)
    return out, lse if return_lse else None
