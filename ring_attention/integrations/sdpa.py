"""torch.nn.functional.scaled_dot_product_attention as ring attention, inside a context:

    from ring_attention.integrations.sdpa import context_parallel
    with context_parallel(group=cp_group, layout="zigzag"):
        loss = model(ra.shard(input_ids, group=cp_group, layout="zigzag"), ...)  # SDPA inside
        loss.backward()

A model that calls F.scaled_dot_product_attention on this rank's shard of the sequence gets ring
attention over ``group`` instead, as PyTorch's own context_parallel replaces SDPA (the module's
attribute is replaced while a context is open, and in the thread that opened it a reference
taken before, such as ``from torch.nn.functional import scaled_dot_product_attention``, is
routed too); its other inputs (positions, rotary tables, labels) are sharded by the caller with
``shard`` in the same layout. The SDPA call's (batch, heads, seqlen_local, headdim) q, k, v become
ring_attn_func's (batch, seqlen_local, heads, headdim) and back; ``is_causal`` becomes
``causal``, ``scale`` ``softmax_scale``; K/V with fewer heads need ``enable_gqa=True``, as SDPA
requires. What the ring cannot compute (an ``attn_mask``, a ``dropout_p`` other than 0, queries
and keys of different lengths) raises ValueError on every rank of the group. Every SDPA call
while the context is open runs over the ring, in every thread of the process: leave the context
around attention over sequences that are not sharded. Run the backward inside the context too:
activation checkpointing recomputes the attention in the backward, and outside the context it
recomputes plain SDPA (wrong gradients with use_reentrant=True, a CheckpointError without).
Under torch.compile only calls through the module's attribute are replaced (a reference taken
before the context computes plain SDPA on the shard there); open the context outside compiled
code. Attention that does not call SDPA (nn.MultiheadAttention with need_weights=True, a
hand-written softmax) is not replaced.
"""
import contextlib
import threading

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
    shapes = [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
              for t in (q, k, v)]
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (q, k, v)):
        return ("scaled_dot_product_attention under context_parallel takes 4-D (batch, heads, "
                f"seqlen, headdim) q, k and v, got {', '.join(map(str, shapes))}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        return ("scaled_dot_product_attention under context_parallel needs k and v of one shape "
                "and q with their batch size and head dimension (a value head dimension of its "
                f"own is not supported), got q {shapes[0]}, k {shapes[1]}, v {shapes[2]}")
    if q.shape[2] != k.shape[2]:
        return (f"scaled_dot_product_attention got queries ({q.shape[2]}) and keys "
                f"({k.shape[2]}) of different lengths, which context_parallel does not compute")
    if q.shape[1] != k.shape[1] and not enable_gqa:
        return (f"scaled_dot_product_attention got q with {q.shape[1]} heads and k/v with "
                f"{k.shape[1]}; pass enable_gqa=True, as SDPA requires")
    return ""


# Every open context's options, in the order they were opened: process-wide, since a backward may
# recompute checkpointed attention on the autograd engine's device threads; and each thread's
# own, innermost last, which its calls take first.
_OPEN = []
_LOCK = threading.Lock()
_THREAD = threading.local()
_ORIGINAL_SDPA = F.scaled_dot_product_attention


def _ring_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
               enable_gqa=False):
    """scaled_dot_product_attention's signature, computed by ring_attn_func with the innermost
    open context's options (by the original SDPA once every context has closed)."""
    own = getattr(_THREAD, "open", None)
    if not own and not _OPEN:
        return _ORIGINAL_SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                              is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    options = dict(own[-1] if own else _OPEN[-1])
    error = _sdpa_error(query, key, value, attn_mask, dropout_p, enable_gqa)
    if error:  # raised by the ops' agreement on every rank
        options["layout"] = _ARGUMENT_ERROR + error
    by_head = [t.transpose(1, 2) if isinstance(t, torch.Tensor) and t.dim() == 4 else t
               for t in (query, key, value)]
    out = ring_attn_func(*by_head, causal=is_causal, softmax_scale=scale, **options)
    return out.transpose(1, 2)


class _RingSDPA(TorchFunctionMode):
    """Routes calls of the original F.scaled_dot_product_attention (a reference taken before the
    context, e.g. by ``from torch.nn.functional import ...``) to _ring_sdpa in this thread."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _ORIGINAL_SDPA:
            return _ring_sdpa(*args, **kwargs)
        return func(*args, **kwargs)


@contextlib.contextmanager
def context_parallel(group=None, *, layout: str = "zigzag", kv_exchange: str = "ring",
                     ulysses_group=None):
    """Within the block, F.scaled_dot_product_attention runs as ring attention over ``group`` on
    shards in ``layout`` (``kv_exchange`` and ``ulysses_group`` as for ring_attn_func)."""
    options = dict(group=group, layout=layout, kv_exchange=kv_exchange, ulysses_group=ulysses_group)
    if not hasattr(_THREAD, "open"):
        _THREAD.open = []
    with _LOCK:
        _OPEN.append(options)
        F.scaled_dot_product_attention = _ring_sdpa
    _THREAD.open.append(options)
    try:
        with _RingSDPA():
            yield
    finally:
        _THREAD.open.remove(options)
        with _LOCK:
            _OPEN.remove(options)
            if not _OPEN:
                F.scaled_dot_product_attention = _ORIGINAL_SDPA
