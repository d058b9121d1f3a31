"""Plain float64 attention, for tests and for users checking results."""
from typing import Optional, Tuple

import torch


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                        softmax_scale: Optional[float] = None,
                        q_positions: Optional[torch.Tensor] = None,
                        k_positions: Optional[torch.Tensor] = None,
                        mask: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Materialised attention in float64.

    q: (batch, sq, heads, d); k, v: (batch, sk, heads_kv, d), heads % heads_kv == 0.
    Positions (sq,) and (sk,) default to flash-attention's bottom-right alignment
    (q_positions = arange(sq) + sk - sq, k_positions = arange(sk)); causal hides keys whose
    position exceeds the query's. ``mask``: an optional (sq, sk) boolean tensor of the visible
    (query, key) pairs (windows, packed sequences, ...), combined with ``causal`` when both are
    given. Returns (out (batch, sq, heads, d), lse (batch, heads, sq)),
    both float64; a row with no visible key gets out 0 and lse -inf. Differentiable.
    """
    sq, sk, heads, heads_kv = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    if q_positions is None:
        q_positions = torch.arange(sq) + (sk - sq)
    if k_positions is None:
        k_positions = torch.arange(sk)
    qd, kd, vd = (t.to(torch.float64).transpose(1, 2) for t in (q, k, v))  # (b, h, s, d)
    kd = kd.repeat_interleave(heads // heads_kv, dim=1)
    vd = vd.repeat_interleave(heads // heads_kv, dim=1)
    scores = scale * qd @ kd.transpose(-1, -2)
    if causal:
        visible = k_positions.view(1, -1).to(q.device) <= q_positions.view(-1, 1).to(q.device)
        scores = scores.masked_fill(~visible, float("-inf"))
    if mask is not None:
        if mask.shape != (sq, sk) or mask.dtype != torch.bool:
            raise ValueError(f"attention_reference: mask must be a ({sq}, {sk}) bool tensor, got "
                             f"{tuple(mask.shape)} {mask.dtype}")
        scores = scores.masked_fill(~mask.to(q.device), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    # exp(scores - lse) with fully masked rows (lse = -inf) giving 0 instead of NaN
    safe_lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    probs = torch.exp(scores - safe_lse.unsqueeze(-1))
    out = (probs @ vd).transpose(1, 2)
    return out, lse
