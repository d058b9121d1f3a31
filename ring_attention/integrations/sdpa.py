"""torch.nn.functional.scaled_dot_product_attention as ring attention, inside a context:

    from ring_attention.integrations.sdpa import context_parallel
    with context_parallel(group=cp_group, layout="zigzag"):
        loss = model(ra.shard(input_ids, group=cp_group, layout="zigzag"), ...)  # SDPA inside
        loss.backward()

A model that calls F.scaled_dot_product_attention (by any import) on this rank's shard of the
sequence gets ring attention over ``group`` instead, as PyTorch's own context_parallel replaces
SDPA; its other inputs (positions, rotary tables, labels) are sharded by the caller with ``shard``
in the same layout. The SDPA call's (batch, heads, seqlen_local, headdim) q, k, v become
ring_attn_func's (batch, seqlen_local, heads, headdim) and back; ``is_causal`` becomes
``causal``, ``scale`` ``softmax_scale``; K/V with fewer heads need ``enable_gqa=True``, as SDPA
requires. What the ring cannot compute (an ``attn_mask``, a ``dropout_p`` other than 0, queries
and keys of different lengths) raises ValueError on every rank of the group. Every SDPA call in
the context runs over the ring, in every thread of the process: leave the context around
attention over sequences that are not sharded.
"""
import contextlib

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..functional import _ARGUMENT_ERROR, ring_attn_func


def _sdpa_error(q, k, v, attn_mask, dropout_p, enable_gqa) -> str:
    """What of an SDPA call the ring cannot compute ("" when it can)."""
    if attn_mask is not None:
        return ("an attn_mask of scaled_dot_product_attention is not supported under "
                "context_parallel (ring attention masks by position: is_causal=True, or call "
                "ring_attn_func for windows and packed documents)")
    if dropout_p:
        return (f"dropout_p of scaled_dot_product_attention must be 0 under context_parallel, "
                f"got {dropout_p!r}")
    if all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (q, k, v)):
        if q.shape[2] != k.shape[2]:
            return (f"scaled_dot_product_attention got queries ({q.shape[2]}) and keys "
                    f"({k.shape[2]}) of different lengths, which context_parallel does not compute")
        if q.shape[1] != k.shape[1] and not enable_gqa:
            return (f"scaled_dot_product_attention got q with {q.shape[1]} heads and k/v with "
                    f"{k.shape[1]}; pass enable_gqa=True, as SDPA requires")
    return ""


class _RingSDPA(TorchFunctionMode):
    """Routes F.scaled_dot_product_attention to ring_attn_func; every other function runs as is."""

    def __init__(self, options: dict):
        super().__init__()
        self.options = options

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        return self._attend(*args, **kwargs)

    def _attend(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                scale=None, enable_gqa=False):
        options = dict(self.options)
        error = _sdpa_error(query, key, value, attn_mask, dropout_p, enable_gqa)
        if error:  # raised by the ops' agreement on every rank
            options["layout"] = _ARGUMENT_ERROR + error
        by_head = [t.transpose(1, 2) if isinstance(t, torch.Tensor) and t.dim() == 4 else t
                   for t in (query, key, value)]
        out = ring_attn_func(*by_head, causal=is_causal, softmax_scale=scale, **options)
        return out.transpose(1, 2)


@contextlib.contextmanager
def context_parallel(group=None, *, layout: str = "zigzag", kv_exchange: str = "ring",
                     ulysses_group=None):
    """Within the block, F.scaled_dot_product_attention runs as ring attention over ``group`` on
    shards in ``layout`` (``kv_exchange`` and ``ulysses_group`` as for ring_attn_func)."""
    with _RingSDPA(dict(group=group, layout=layout, kv_exchange=kv_exchange,
                        ulysses_group=ulysses_group)):
        yield
