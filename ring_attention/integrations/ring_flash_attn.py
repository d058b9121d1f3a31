"""ring-flash-attention's public functions, computed by ring attention: switch by the import.

    # from ring_flash_attn import zigzag_ring_flash_attn_func
    from ring_attention.integrations.ring_flash_attn import zigzag_ring_flash_attn_func
    out = zigzag_ring_flash_attn_func(q, k, v, causal=True, group=cp_group)

Same names, argument order, defaults and return values: ``out``, or with
``return_attn_probs=True`` ``(out, softmax_lse, None)`` (no probabilities, as there). Shards are
laid out token for token as ring-flash-attention's tests split them, which are ring attention's
layouts: ``ring_*`` contiguous, ``zigzag_*`` zigzag (chunks r and 2*world-1-r of 2*world),
``stripe_*`` striped (tokens r, r+world, ...); the varlen functions split every sequence alike and
take this rank's ``cu_seqlens`` (the global ones divided by world).

Differences: masks are by global position on every layout, so ``window_size`` is a true sliding
window (ring-flash-attention applies it inside each block), and the zigzag and stripe functions
also compute ``causal=False``. ``max_seqlen`` is not needed and is ignored. ``dropout_p`` other
than 0 and ``alibi_slopes`` raise ValueError on every rank. softmax_lse of a varlen function is
(nheads, tokens_local), flash-attn 2's current varlen form.
"""
import torch

from .. import _group
from ..functional import _ARGUMENT_ERROR, ring_attn_func, ring_attn_varlen_func


def _layout(layout, dropout_p, alibi_slopes, error=""):
    """The layout for the ring call; an argument it cannot honour becomes the error that the ops
    raise on every rank."""
    if not error and alibi_slopes is not None:
        error = "alibi_slopes is not supported (ring attention adds no ALiBi bias); pass None"
    if not error and (isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float))
                      or dropout_p != 0):
        error = f"dropout_p must be 0 (ring attention has no attention dropout), got {dropout_p!r}"
    return _ARGUMENT_ERROR + error if error else layout


def _unpack(packed, name, count):
    """(tensors, "") of ``packed`` split along its dim -3 of size ``count``; else (empty tensors,
    the error every rank raises)."""
    if isinstance(packed, torch.Tensor) and packed.dim() >= 3 and packed.shape[-3] == count:
        return packed.unbind(-3), ""
    got = tuple(packed.shape) if isinstance(packed, torch.Tensor) else type(packed).__name__
    return (torch.empty(0),) * count, f"{name} must hold its {count} tensors along dim -3, got {got}"


def _dense(layout, q, k, v, dropout_p, softmax_scale, causal, window_size, alibi_slopes,
           deterministic, return_attn_probs, group, error=""):
    out, lse = ring_attn_func(q, k, v, causal=causal, softmax_scale=softmax_scale,
                              window_size=window_size, group=group,
                              layout=_layout(layout, dropout_p, alibi_slopes, error),
                              return_lse=True, deterministic=deterministic)
    return (out, lse, None) if return_attn_probs else out


def _varlen(layout, q, k, v, cu_seqlens, dropout_p, softmax_scale, causal, window_size,
            alibi_slopes, deterministic, return_attn_probs, group, error=""):
    """cu_seqlens of this rank (each sequence split evenly) times world: the global ones."""
    _, _, world = _group.resolve(group)
    if isinstance(cu_seqlens, torch.Tensor) and cu_seqlens.dtype == torch.int32 \
            and cu_seqlens.dim() == 1:
        if not error and layout == "zigzag" and bool((cu_seqlens.diff() % 2 != 0).any()):
            error = (f"zigzag needs every sequence's local length even (2*world chunks), got "
                     f"cu_seqlens {cu_seqlens.tolist()}")
        cu_seqlens = cu_seqlens * world
    out, lse = ring_attn_varlen_func(q, k, v, cu_seqlens, causal=causal,
                                     softmax_scale=softmax_scale, window_size=window_size,
                                     group=group,
                                     layout=_layout(layout, dropout_p, alibi_slopes, error),
                                     return_lse=True, deterministic=deterministic)
    return (out, lse, None) if return_attn_probs else out


def ring_flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False,
                         window_size=(-1, -1), alibi_slopes=None, deterministic=False,
                         return_attn_probs=False, group=None):
    """q (batch, seqlen_local, nheads, headdim), k, v (batch, seqlen_local, nheads_kv, headdim),
    contiguous shards. Returns out like q, or (out, lse (batch, nheads, seqlen_local), None)."""
    return _dense("contiguous", q, k, v, dropout_p, softmax_scale, causal, window_size,
                  alibi_slopes, deterministic, return_attn_probs, group)


def ring_flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False,
                                  window_size=(-1, -1), alibi_slopes=None, deterministic=False,
                                  return_attn_probs=False, group=None):
    """kv (batch, seqlen_local, 2, nheads_kv, headdim); as ring_flash_attn_func."""
    (k, v), error = _unpack(kv, "kv", 2)
    return _dense("contiguous", q, k, v, dropout_p, softmax_scale, causal, window_size,
                  alibi_slopes, deterministic, return_attn_probs, group, error)


def ring_flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False,
                                   window_size=(-1, -1), alibi_slopes=None, deterministic=False,
                                   return_attn_probs=False, group=None):
    """qkv (batch, seqlen_local, 3, nheads, headdim); as ring_flash_attn_func."""
    (q, k, v), error = _unpack(qkv, "qkv", 3)
    return _dense("contiguous", q, k, v, dropout_p, softmax_scale, causal, window_size,
                  alibi_slopes, deterministic, return_attn_probs, group, error)


def zigzag_ring_flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False,
                                window_size=(-1, -1), alibi_slopes=None, deterministic=False,
                                return_attn_probs=False, group=None):
    """As ring_flash_attn_func on zigzag shards (seqlen_local even)."""
    return _dense("zigzag", q, k, v, dropout_p, softmax_scale, causal, window_size,
                  alibi_slopes, deterministic, return_attn_probs, group)


def zigzag_ring_flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False,
                                         window_size=(-1, -1), alibi_slopes=None,
                                         deterministic=False, return_attn_probs=False,
                                         group=None):
    """As ring_flash_attn_kvpacked_func on zigzag shards."""
    (k, v), error = _unpack(kv, "kv", 2)
    return _dense("zigzag", q, k, v, dropout_p, softmax_scale, causal, window_size,
                  alibi_slopes, deterministic, return_attn_probs, group, error)


def zigzag_ring_flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False,
                                          window_size=(-1, -1), alibi_slopes=None,
                                          deterministic=False, return_attn_probs=False,
                                          group=None):
    """As ring_flash_attn_qkvpacked_func on zigzag shards."""
    (q, k, v), error = _unpack(qkv, "qkv", 3)
    return _dense("zigzag", q, k, v, dropout_p, softmax_scale, causal, window_size,
                  alibi_slopes, deterministic, return_attn_probs, group, error)


def stripe_flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False,
                           window_size=(-1, -1), alibi_slopes=None, deterministic=False,
                           return_attn_probs=False, group=None):
    """As ring_flash_attn_func on striped shards (rank r: tokens r, r+world, ...)."""
    return _dense("striped", q, k, v, dropout_p, softmax_scale, causal, window_size,
                  alibi_slopes, deterministic, return_attn_probs, group)


def stripe_flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False,
                                    window_size=(-1, -1), alibi_slopes=None, deterministic=False,
                                    return_attn_probs=False, group=None):
    """As ring_flash_attn_kvpacked_func on striped shards."""
    (k, v), error = _unpack(kv, "kv", 2)
    return _dense("striped", q, k, v, dropout_p, softmax_scale, causal, window_size,
                  alibi_slopes, deterministic, return_attn_probs, group, error)


def stripe_flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False, group=None):
    """As ring_flash_attn_qkvpacked_func on striped shards."""
    (q, k, v), error = _unpack(qkv, "qkv", 3)
    return _dense("striped", q, k, v, dropout_p, softmax_scale, causal, window_size,
                  alibi_slopes, deterministic, return_attn_probs, group, error)


def ring_flash_attn_varlen_func(q, k, v, cu_seqlens, max_seqlen, dropout_p=0.0,
                                softmax_scale=None, causal=False, window_size=(-1, -1),
                                alibi_slopes=None, deterministic=False, return_attn_probs=False,
                                group=None):
    """q (tokens_local, nheads, headdim), k, v (tokens_local, nheads_kv, headdim): chunk r of
    every packed sequence; cu_seqlens int32, this rank's boundaries (global / world). Returns out
    like q, or (out, lse (nheads, tokens_local), None)."""
    return _varlen("contiguous", q, k, v, cu_seqlens, dropout_p, softmax_scale, causal,
                   window_size, alibi_slopes, deterministic, return_attn_probs, group)


def ring_flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens, max_seqlen, dropout_p=0.0,
                                         softmax_scale=None, causal=False, window_size=(-1, -1),
                                         alibi_slopes=None, deterministic=False,
                                         return_attn_probs=False, group=None):
    """kv (tokens_local, 2, nheads_kv, headdim); as ring_flash_attn_varlen_func."""
    (k, v), error = _unpack(kv, "kv", 2)
    return _varlen("contiguous", q, k, v, cu_seqlens, dropout_p, softmax_scale, causal,
                   window_size, alibi_slopes, deterministic, return_attn_probs, group, error)


def ring_flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0,
                                          softmax_scale=None, causal=False, window_size=(-1, -1),
                                          alibi_slopes=None, deterministic=False,
                                          return_attn_probs=False, group=None):
    """qkv (tokens_local, 3, nheads, headdim); as ring_flash_attn_varlen_func."""
    (q, k, v), error = _unpack(qkv, "qkv", 3)
    return _varlen("contiguous", q, k, v, cu_seqlens, dropout_p, softmax_scale, causal,
                   window_size, alibi_slopes, deterministic, return_attn_probs, group, error)


def zigzag_ring_flash_attn_varlen_func(q, k, v, cu_seqlens, max_seqlen, dropout_p=0.0,
                                       softmax_scale=None, causal=False, window_size=(-1, -1),
                                       alibi_slopes=None, deterministic=False,
                                       return_attn_probs=False, group=None):
    """As ring_flash_attn_varlen_func with chunks r and 2*world-1-r of every sequence (local
    lengths even)."""
    return _varlen("zigzag", q, k, v, cu_seqlens, dropout_p, softmax_scale, causal,
                   window_size, alibi_slopes, deterministic, return_attn_probs, group)


def zigzag_ring_flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens, max_seqlen, dropout_p=0.0,
                                                softmax_scale=None, causal=False,
                                                window_size=(-1, -1), alibi_slopes=None,
                                                deterministic=False, return_attn_probs=False,
                                                group=None):
    """As ring_flash_attn_varlen_kvpacked_func on zigzag shards."""
    (k, v), error = _unpack(kv, "kv", 2)
    return _varlen("zigzag", q, k, v, cu_seqlens, dropout_p, softmax_scale, causal,
                   window_size, alibi_slopes, deterministic, return_attn_probs, group, error)


def zigzag_ring_flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0,
                                                 softmax_scale=None, causal=False,
                                                 window_size=(-1, -1), alibi_slopes=None,
                                                 deterministic=False, return_attn_probs=False,
                                                 group=None):
    """As ring_flash_attn_varlen_qkvpacked_func on zigzag shards."""
    (q, k, v), error = _unpack(qkv, "qkv", 3)
    return _varlen("zigzag", q, k, v, cu_seqlens, dropout_p, softmax_scale, causal,
                   window_size, alibi_slopes, deterministic, return_attn_probs, group, error)
