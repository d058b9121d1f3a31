"""Attention of queries that every rank holds against keys spread over the ranks: decoding, or a
chunked prefill, with a KV cache sharded over a group as a ring's prefill leaves it.

Each rank attends the queries to its own keys with the block kernel (masks by global position, as
in the ring), the ranks all-gather their partial (out, lse), and every rank merges them in rank
order, so that every rank returns the same bits:
    lse = max_r lse_r + log(sum_r exp(lse_r - max_r lse_r))
    out = sum_r out_r * exp(lse_r - lse)
Forward only: serving computes no gradients.
"""
import math
import os
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from . import _group
from ._ops import ops
from .functional import (_autocast, _default_scale, _flag, _scale_error, _short_repr, _window,
                         _window_error)
from .layouts import _agree_on_shards, _wait
from .sinks import apply_sinks, by_row, neginf_to_zero, sinks_error

_CALL = "decode_attn_func"
_CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_CUDA_DTYPES = (torch.bfloat16, torch.float16)
_CUDA_MAX_HEADDIM = 256
_POSITION_MAX = 2 ** 31 - 1  # the kernels take int32 positions


def _positions_error(name: str, positions, length: int, q: torch.Tensor) -> str:
    """Why `positions` are not `length` global positions for queries `q` ("" when they are)."""
    if not isinstance(positions, torch.Tensor):
        return f"{name} must be a 1-D integer tensor, got {_short_repr(positions)}"
    if positions.dim() != 1 or positions.shape[0] != length:
        return f"{name} must have shape ({length},), got {tuple(positions.shape)}"
    if positions.is_floating_point() or positions.is_complex() or positions.dtype == torch.bool:
        return f"{name} must be an integer tensor, got {positions.dtype}"
    if positions.device.type == "meta":
        return "" if q.device.type == "meta" else f"{name} is on the meta device (no values)"
    if length and (positions.min().item() < 0 or positions.max().item() > _POSITION_MAX):
        return f"{name} must lie in [0, 2**31 - 1]"
    return ""


def _tensors_error(q, k, v) -> str:
    """Why q (b, sq, h, d), k and v (b, sk, hk, d) cannot be attended ("" when they can)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            what = f"{t.dim()}-D" if isinstance(t, torch.Tensor) else type(t).__name__
            return f"{name} must be a 4-D tensor (batch, seqlen, heads, headdim), got {what}"
    if k.shape != v.shape:
        return f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}"
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        return (f"q and k/v must have the same batch size and head dimension, got q "
                f"{tuple(q.shape)} and k {tuple(k.shape)}")
    if q.shape[2] == 0 or q.shape[3] == 0:
        return f"q must have at least one head and a positive head dimension, got {tuple(q.shape)}"
    if k.shape[2] == 0 or q.shape[2] % k.shape[2]:
        return (f"the number of query heads ({q.shape[2]}) must be a multiple of the number of "
                f"K/V heads ({k.shape[2]})")
    if not q.dtype == k.dtype == v.dtype:
        return f"q, k and v must have the same dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
    if not q.device == k.device == v.device:
        return f"q, k and v must be on the same device, got {q.device}, {k.device}, {v.device}"
    on_cuda = q.device.type == "cuda"
    if q.dtype not in (_CUDA_DTYPES if on_cuda else _CPU_DTYPES):
        return f"dtype {q.dtype} is not supported on {q.device.type}"
    if on_cuda and (q.shape[3] % 8 or q.shape[3] > _CUDA_MAX_HEADDIM):
        return (f"head dimension {q.shape[3]} is not supported on CUDA (multiples of 8 up to "
                f"{_CUDA_MAX_HEADDIM} are)")
    return ""


@torch.compiler.disable(reason="decode_attn_func checks its arguments' values on the host")
def _local_error(q, k, v, q_positions, k_positions, causal, softmax_scale, window_size, sinks,
                 return_lse, group) -> str:
    """What this rank finds wrong with its own arguments ("" if nothing)."""
    error = _tensors_error(q, k, v)
    if error:
        return error
    for flag, value in (("causal", causal), ("return_lse", return_lse)):
        if _flag(value) is None:
            return f"{flag} must be True or False, got {_short_repr(value)}"
    causal = bool(causal)
    error = _window_error(window_size)
    if error:
        return error
    left, right = _window(window_size)
    if left < -1 or right < -1:
        return f"window_size values must be >= 0, or -1 for unbounded; got {window_size}"
    if causal and right > 0:
        return f"with causal=True the right window must be -1 or 0, got {right}"
    masked = causal or left >= 0 or right >= 0
    if (q_positions is None) != (k_positions is None) or (masked and q_positions is None):
        return ("q_positions and k_positions are needed together, and whenever causal or a "
                "window masks by position")
    if q_positions is not None:
        error = (_positions_error("q_positions", q_positions, q.shape[1], q)
                 or _positions_error("k_positions", k_positions, k.shape[1], q))
        if error:
            return error
    if softmax_scale is not None:
        error = _scale_error(softmax_scale, q.dtype)
        if error:
            return error
        if not math.isfinite(float(softmax_scale)):
            return f"softmax_scale must be finite, got {_short_repr(softmax_scale)}"
    error = sinks_error(sinks, q)
    if error:
        return error
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad
                                       for t in (q, k, v, sinks)):
        return ("an input requires grad, but no gradients are computed (inference); call under "
                "torch.no_grad() or torch.inference_mode()")
    if group is not None:
        device_error = ops.group_device_error(_group.group_name(group), str(q.device), False)
        if device_error:
            return f"q, k and v are on {q.device}, but {device_error}"
    return ""


def _merge(outs, lses):
    """The rank-order merge of every rank's partial (out, lse) (module docstring)."""
    top = lses[0]
    for lse in lses[1:]:
        top = torch.maximum(top, lse)
    top = neginf_to_zero(top)  # no key anywhere
    total = torch.zeros_like(top)
    for lse in lses:
        total += torch.exp(lse - top)
    lse = top + torch.log(total)  # -inf where no rank saw a key
    safe = neginf_to_zero(lse)
    out = torch.zeros_like(outs[0])
    for part, part_lse in zip(outs, lses):
        out += part * by_row(torch.exp(part_lse - safe))
    return out, lse


def decode_attn_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                     q_positions: Optional[torch.Tensor] = None,
                     k_positions: Optional[torch.Tensor] = None, causal: bool = False,
                     softmax_scale: Optional[float] = None,
                     window_size: Sequence[int] = (-1, -1), group=None,
                     sinks: Optional[torch.Tensor] = None, return_lse: bool = False):
    """Attention of the queries every rank holds against the keys spread over ``group``.

    q: (batch, seqlen_q, nheads, headdim), the same on every rank (e.g. the newest token); k, v:
    (batch, seqlen_k, nheads_kv, headdim), this rank's part of the cache (seqlen_k may differ
    between ranks, 0 included). q_positions (seqlen_q,) and k_positions (seqlen_k,): global
    integer positions, which ``causal`` and ``window_size`` mask by as ring_attn_func does; without
    them every key is seen. ``sinks`` (nheads,) as for ring_attn_func. Returns out like q, the
    same bits on every rank, or (out, lse) with lse (batch, nheads, seqlen_q) float32 (float64
    for float64 inputs). One kernel call over this rank's keys and one all-gather of the queries'
    (out, lse) per call, after the ranks' agreement (RING_ATTN_CHECK); invalid or mismatched
    inputs raise ValueError on every rank. No gradients (inference). Under torch.autocast q, k
    and v run in the autocast dtype, as in ring_attn_func.
    """
    group, rank, world = _group.resolve(group)
    if all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        q, k, v = _autocast(q, k, v)
    error = _local_error(q, k, v, q_positions, k_positions, causal, softmax_scale, window_size,
                         sinks, return_lse, group)
    settings = ""
    if not error:
        causal, scale = bool(causal), _default_scale(q, softmax_scale)
        left, right = _window(window_size)
        settings = (f"causal {causal}, softmax_scale {scale!r}, window_size {(left, right)}, "
                    f"nheads_kv {k.shape[2]}, positions {q_positions is not None}, sinks "
                    f"{sinks is not None}")
    if world > 1 and os.environ.get("RING_ATTN_CHECK") != "0":
        _agree_on_shards(q, group, _CALL, local_error=error, settings=settings)
    elif error:
        raise ValueError(f"{_CALL}: {error}")
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    batch, seqlen_q, heads, _ = q.shape
    out = torch.zeros(q.shape, dtype=acc, device=q.device)
    lse = torch.full((batch, heads, seqlen_q), float("-inf"), dtype=acc, device=q.device)
    if k.shape[1] and out.numel():
        q_pos, k_pos = ((p.to(q.device, torch.int32) if p is not None
                         else torch.zeros(n, dtype=torch.int32, device=q.device))
                        for p, n in ((q_positions, seqlen_q), (k_positions, k.shape[1])))
        # the kernel reads any strides but the head dim's: a cache sliced from a larger buffer
        # is read in place
        q, k, v = (t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()
                   for t in (q, k, v))
        ops.block_fwd(q, k, v, q_pos, k_pos, None, out, lse, causal, left, right, scale)
    if world > 1:  # one all-gather of (out, lse) flattened together
        mine = torch.cat([out.flatten(), lse.flatten()])
        parts = [torch.empty_like(mine) for _ in range(world)]
        _wait(dist.all_gather(parts, mine, group=group, async_op=True), group, rank,
              "gathering the partial attention", _CALL)
        out, lse = _merge([p[:out.numel()].view(out.shape) for p in parts],
                          [p[out.numel():].view(lse.shape) for p in parts])
    out, lse = apply_sinks(out, lse, sinks)
    out = out.to(q.dtype)
    return (out, lse) if _flag(return_lse) else out
