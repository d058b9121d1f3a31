"""Attention sinks: a learned logit per head that joins every row's softmax without a value.

With sinks s (heads,), a row with scores x_j over its visible keys and lse = logsumexp(x) gets
    lse' = logaddexp(lse, s)
    out' = sum_j exp(x_j - lse') v_j = out * exp(lse - lse')
as GPT-OSS's attention (a sink column appended to the scores, dropped after the softmax) and
TransformerEngine's learnable softmax offset compute. The ring's (out, lse) of every row is exact
once the ring has run, so the sink is applied afterwards, on this rank's own rows, with no extra
communication. Its backward passes the ring's backward the gradients of out and lse:
    w = exp(lse - lse')                      # in [0, 1]; 0 where lse' = -inf
    dout = w * dout'
    dw = (dout' * out).sum(-1)
    dlse = dw * w * (1 - w) + dlse' * w
    ds = (-dw * w * (1 - w) + dlse' * (1 - w)).sum(rows)
all finite whatever lse and s are (a row that sees nothing, a sink of -inf, or both).
"""
from typing import Optional

import torch

from ._autograd import once_differentiable


def sinks_error(sinks, q) -> str:
    """Why `sinks` cannot serve as the sinks of queries `q` ("" when it can): not a 1-D floating
    tensor of q.shape[-2] (heads) values on q's device. A q that is no tensor of at least 2 dims
    is left to the ops, which name it."""
    if sinks is None or not isinstance(q, torch.Tensor) or q.dim() < 2:
        return ""
    if not isinstance(sinks, torch.Tensor):
        return f"sinks must be a tensor of shape (nheads,) or None, got {type(sinks).__name__}"
    heads = q.shape[-2]
    if sinks.dim() != 1 or sinks.shape[0] != heads:
        return (f"sinks must have shape (nheads,) = ({heads},), one logit per query head, got "
                f"{tuple(sinks.shape)}")
    if not sinks.is_floating_point():
        return f"sinks must be a floating-point tensor, got {sinks.dtype}"
    if sinks.device != q.device:
        return f"sinks must be on q's device ({q.device}), got {sinks.device}"
    return ""


def neginf_to_zero(lse: torch.Tensor) -> torch.Tensor:
    """lse with -inf (a row that sees nothing) as 0: exp(x - it) stays finite (0 for x = -inf)."""
    return torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)


def _row_weight(lse: torch.Tensor, sinks: torch.Tensor):
    """(w, lse') of rows with `lse` (..., heads, rows) and sinks (heads,) in lse's dtype:
    lse' = logaddexp(lse, sinks), w = exp(lse - lse'), 0 where lse' = -inf (no key and no sink)."""
    sink = sinks.to(lse.dtype).unsqueeze(-1)  # (heads, 1), broadcast over the rows
    lse_sunk = torch.logaddexp(lse, sink)
    # lse' = -inf only where lse = -inf too; there out is 0 whatever w is.
    return torch.exp(lse - neginf_to_zero(lse_sunk)), lse_sunk


def by_row(w: torch.Tensor) -> torch.Tensor:
    """w (..., heads, rows) as a factor of out (..., rows, heads, headdim)."""
    return w.transpose(-1, -2).unsqueeze(-1)


class _AttentionSinks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out, lse, sinks):
        w, lse_sunk = _row_weight(lse, sinks)
        ctx.save_for_backward(out, w)
        ctx.sinks_dtype = sinks.dtype
        ctx.set_materialize_grads(False)
        return (out.to(lse.dtype) * by_row(w)).to(out.dtype), lse_sunk

    @staticmethod
    @once_differentiable
    def backward(ctx, dout_sunk, dlse_sunk):
        out, w = ctx.saved
        keep = w * (1 - w)  # dw/dlse = -dw/ds
        if dout_sunk is None:
            dout, dw = None, torch.zeros_like(w)
        else:
            dout = (dout_sunk.to(w.dtype) * by_row(w)).to(out.dtype)
            dw = (dout_sunk.to(w.dtype) * out.to(w.dtype)).sum(-1).transpose(-1, -2)
        dlse = dw * keep
        dsinks = -dlse
        if dlse_sunk is not None:
            dlse = dlse + dlse_sunk * w
            dsinks = dsinks + dlse_sunk * (1 - w)
        # every axis but the heads: (batch, heads, rows) or (heads, rows)
        dsinks = dsinks.sum(-1)
        if dsinks.dim() == 2:
            dsinks = dsinks.sum(0)
        return dout, dlse, dsinks.to(ctx.sinks_dtype)


def apply_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: Optional[torch.Tensor]):
    """(out', lse') of rows whose softmax also holds the sink logits `sinks` (heads,): out
    (batch, seq, heads, d) with lse (batch, heads, seq), or packed out (tokens, heads, d) with lse
    (heads, tokens). sinks None: (out, lse) as they are."""
    if sinks is None:
        return out, lse
    return _AttentionSinks.apply(out, lse, sinks)
