"""The differentiable ring attention entry points."""
import math
from typing import Optional, Sequence, Tuple

import torch

from . import _group, ulysses
from ._autograd import once_differentiable
from ._ops import ops
from .sinks import apply_sinks, sinks_error


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, group_name: str, causal: bool, softmax_scale: float,
                window_left: int, window_right: int, layout: str, deterministic: bool,
                kv_exchange: str):
        args = (cu_seqlens, group_name, causal, softmax_scale, window_left, window_right, layout)
        out, lse, forward_call = ops.ring_fwd(q, k, v, *args, kv_exchange=kv_exchange)
        ctx.save_for_backward(q, k, v, out, lse, forward_call)
        ctx.ring_args = args
        ctx.deterministic, ctx.kv_exchange = deterministic, kv_exchange
        ctx.set_materialize_grads(False)  # dlse None when lse is unused
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, forward_call = ctx.saved
        dout = torch.zeros_like(out) if dout is None else dout
        dq, dk, dv = ops.ring_bwd(dout, q, k, v, out, lse, *ctx.ring_args,
                                  deterministic=ctx.deterministic, kv_exchange=ctx.kv_exchange,
                                  dlse=dlse, forward_call=forward_call)
        return dq, dk, dv, None, None, None, None, None, None, None, None, None


def _flag(value):
    """value as a bool; None when it is not bool-like (a str, or an object without one truth
    value, such as a tensor of several elements)."""
    if isinstance(value, (str, bytes)):
        return None
    try:
        return bool(value)
    except (RuntimeError, TypeError, ValueError):
        return None


def _deterministic(deterministic) -> bool:
    """The keyword, or torch.use_deterministic_algorithms(True); False when it is not bool-like
    (the caller rejects that on every rank)."""
    return bool(_flag(deterministic)) or torch.are_deterministic_algorithms_enabled()


def _short_repr(value, limit: int = 80) -> str:
    """repr(value), cut to `limit` characters (an error message carries it to every rank)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


_INT64_MAX = 2 ** 63 - 1


def _window_error(window_size) -> str:
    """Why window_size cannot reach the ops as a pair of int64 ("" when it can): not a pair of
    ints (inf and nan included), or a value beyond int64. Values below -1 are left to the ops,
    which name them."""
    try:
        left, right = window_size
        if isinstance(left, bool) or isinstance(right, bool) or int(left) != left or int(right) != right:
            raise TypeError
        left, right = int(left), int(right)
    except (TypeError, ValueError, OverflowError):
        return f"window_size must be a pair of ints, got {_short_repr(window_size)}"
    if not (-_INT64_MAX - 1 <= left <= _INT64_MAX and -_INT64_MAX - 1 <= right <= _INT64_MAX):
        return ("window_size values must be >= 0 and at most 2**63 - 1, or -1 for unbounded; got "
                f"{_short_repr(window_size)}")
    return ""


def _window(window_size) -> Tuple[int, int]:
    """(left, right) as ints; a value that _window_error rejects becomes (-2, -2), which the ops
    reject on every rank (raising here, on one rank only, would leave its peers waiting; _layout
    carries the reason)."""
    if _window_error(window_size):
        return -2, -2
    left, right = window_size
    return int(left), int(right)


def _kv_exchange(kv_exchange) -> str:
    """The keyword as the ops take it; anything but a str becomes a name the ops reject on every
    rank."""
    return kv_exchange if isinstance(kv_exchange, str) else repr(kv_exchange)


# A layout of this prefix carries an argument error to the ops, which report it on every rank
# (csrc/bindings/agreement.cpp kArgumentErrorPrefix).
_ARGUMENT_ERROR = "invalid argument: "


# The kernels of every dtype but float64 accumulate in float32 and fold log2(e) into the scale
# (scores in base 2: softmax_scale * log2(e) * q.k, csrc/cpu/block_attn_cpu.cpp and the CUDA
# kernels); a scale whose product with log2(e) is no float32 turns every score into inf or NaN.
_FLOAT32_SCALE_MAX = torch.finfo(torch.float32).max / math.log2(math.e)


def _scale_error(value, dtype=None) -> str:
    """Why softmax_scale (not None) cannot reach the ops as a float ("" when it can): not a
    number, a number beyond the range of a float (an int such as 10**400), or, for inputs of
    `dtype` other than float64, a number whose product with log2(e) overflows float32."""
    if isinstance(value, (bool, str, bytes)):
        return f"softmax_scale must be a number or None, got {_short_repr(value)}"
    try:
        scale = float(value)
    except OverflowError:
        return f"softmax_scale must be finite, got {_short_repr(value)}"
    except (RuntimeError, TypeError, ValueError):
        return f"softmax_scale must be a number or None, got {_short_repr(value)}"
    if (dtype is not None and dtype != torch.float64 and math.isfinite(scale)
            and abs(scale) >= _FLOAT32_SCALE_MAX):
        return (f"softmax_scale {_short_repr(value)} is too large for {dtype} inputs: the "
                f"kernels compute softmax_scale * log2(e) in float32, so |softmax_scale| must be "
                f"below {_FLOAT32_SCALE_MAX:.4g} (float64 inputs take any finite scale)")
    return ""


def _layout(layout, softmax_scale=None, window_size=(-1, -1), dtype=None, **flags) -> str:
    """The layout as the ops take it. A layout that is not a str, a softmax_scale that is not a
    number (or overflows a float, or for inputs of `dtype` other than float64 the float32
    accumulators), a window_size that is not a pair of int64, or a flag (causal, ...) that is not
    bool-like becomes the argument error that the ops raise on every rank."""
    for name, value in flags.items():
        if _flag(value) is None:
            return f"{_ARGUMENT_ERROR}{name} must be True or False, got {value!r}"
    scale_error = _scale_error(softmax_scale, dtype) if softmax_scale is not None else ""
    if scale_error:
        return _ARGUMENT_ERROR + scale_error
    window_error = _window_error(window_size)
    if window_error:
        return _ARGUMENT_ERROR + window_error
    if not isinstance(layout, str):
        return f"{_ARGUMENT_ERROR}layout must be a str, got {layout!r}"
    return layout


def _tensor(t) -> torch.Tensor:
    """t, or an empty tensor (which the ops reject on every rank) when t is not a tensor."""
    return t if isinstance(t, torch.Tensor) else torch.empty(0)


def _default_scale(q: torch.Tensor, softmax_scale: Optional[float]) -> float:
    """softmax_scale as a float (None: 1 / sqrt(headdim)); 1 when it is not a number (_layout
    then carries that error)."""
    if softmax_scale is None:
        headdim = q.shape[-1] if q.dim() > 0 else 0
        return headdim ** -0.5 if headdim > 0 else 1.0
    return 1.0 if _scale_error(softmax_scale) else float(softmax_scale)


def _autocast(*tensors):
    """Under torch.autocast for the tensors' device, the floating-point ones but float64 in its
    dtype, as scaled_dot_product_attention takes them (q, k and v may then arrive in different
    dtypes, e.g. q and k from an fp32 rotary embedding and v from a bf16 projection); else as
    they are."""
    device_type = tensors[0].device.type
    # Autocast exists for the devices the ops run on, not for meta tensors (which the ops trace
    # with); torch.amp.is_autocast_available would say so, but torch.compile before torch 2.14
    # cannot trace it.
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t.is_floating_point() and t.dtype != torch.float64 else t
                 for t in tensors)


def _op_arguments(q, causal, softmax_scale, window_size, layout, return_lse, deterministic,
                  kv_exchange):
    """The keywords as the ops take them: (causal, softmax_scale, (left, right), layout,
    deterministic, kv_exchange, return_lse). An argument of the wrong type becomes a value that
    the ops' agreement rejects on every rank."""
    layout = _layout(layout, softmax_scale, window_size, q.dtype, causal=causal,
                     deterministic=deterministic, return_lse=return_lse)
    return (bool(_flag(causal)), _default_scale(q, softmax_scale), _window(window_size), layout,
            _deterministic(deterministic), _kv_exchange(kv_exchange), bool(_flag(return_lse)))


def _ring(q, k, v, cu_seqlens, causal, softmax_scale, window_size, group, layout, return_lse,
          deterministic, kv_exchange, ulysses_group, sinks):
    """ring_attn_func (cu_seqlens None) and ring_attn_varlen_func: the arguments as the ops take
    them, then the differentiable call (the Ulysses op with a ulysses_group) and the sinks. An
    argument of the wrong type becomes a value that the ops' agreement rejects on every rank."""
    group, _, _ = _group.resolve(group)
    q, k, v = _autocast(*(_tensor(t) for t in (q, k, v)))
    causal, scale, (left, right), layout, deterministic, kv_exchange, return_lse = _op_arguments(
        q, causal, softmax_scale, window_size, layout, return_lse, deterministic, kv_exchange)
    sink_error = sinks_error(sinks, q)
    if sink_error and not layout.startswith(_ARGUMENT_ERROR):  # reported on every rank
        layout = _ARGUMENT_ERROR + sink_error
    args = (causal, scale, left, right, layout, deterministic, kv_exchange)
    if ulysses_group is None:
        out, lse = _RingAttention.apply(q, k, v, cu_seqlens, _group.group_name(group), *args)
    else:
        ulysses_group, _, _ = _group.resolve(ulysses_group)
        grid_error = _group.grid_error(group, ulysses_group)
        if grid_error and not layout.startswith(_ARGUMENT_ERROR):  # reported on every rank
            args = (*args[:4], _ARGUMENT_ERROR + grid_error, *args[5:])
        out, lse = ulysses.attention(q, k, v, cu_seqlens, _group.group_name(group),
                                     _group.group_name(ulysses_group), *args,
                                     return_lse or sinks is not None)
    out, lse = apply_sinks(out, lse, sinks)
    return (out, lse) if return_lse else out


def ring_attn_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                   softmax_scale: Optional[float] = None, window_size: Sequence[int] = (-1, -1),
                   group=None, layout: str = "contiguous", return_lse: bool = False,
                   deterministic: bool = False, kv_exchange: str = "ring", ulysses_group=None,
                   sinks: Optional[torch.Tensor] = None):
    """Exact attention of this rank's queries against the whole sharded sequence.

    q: (batch, seqlen_local, nheads, headdim); k, v: (batch, seqlen_local, nheads_kv, headdim) with
    nheads % nheads_kv == 0. Every rank of ``group`` (default: the default group; world size 1
    when torch.distributed is not initialised) calls this with its shard in ``layout``
    ("contiguous", "zigzag", "striped" or "packed", as produced by ``shard``). Masks are by global token
    position: ``causal`` hides later keys, ``window_size=(left, right)`` limits a query at
    position i to keys in [i - left, i + right] (-1: unbounded). Returns out like q, or (out, lse)
    with lse (batch, nheads, seqlen_local) in float32 (float64 for float64 inputs), natural log,
    differentiable. ``deterministic=True`` (or ``torch.use_deterministic_algorithms(True)``)
    makes the CUDA backward atomic-free and bitwise reproducible, at some speed; the CPU path is
    bitwise deterministic at a fixed thread count. ``kv_exchange``: "ring" passes K/V around the
    ring, "allgather" gathers every rank's K/V once (backward: dK/dV reduce-scattered).
    ``ulysses_group`` (a ProcessGroup or 1-D DeviceMesh of U ranks) adds an all-to-all over heads inside it: the
    sequence is spread over the U x R grid of ``ulysses_group`` and ``group`` as ``shard(...,
    ulysses_group=...)`` spreads it, and nheads must divide by U. ``sinks`` (nheads,): attention
    sinks, one logit per head that joins every row's softmax without a value (GPT-OSS), applied
    to this rank's rows after the ring; gradients flow to them. Invalid or mismatched inputs
    raise ValueError on every rank.
    """
    return _ring(q, k, v, None, causal, softmax_scale, window_size, group, layout, return_lse,
                 deterministic, kv_exchange, ulysses_group, sinks)


def ring_attn_varlen_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          cu_seqlens: torch.Tensor, *, causal: bool = False,
                          softmax_scale: Optional[float] = None,
                          window_size: Sequence[int] = (-1, -1), group=None,
                          layout: str = "contiguous", return_lse: bool = False,
                          deterministic: bool = False, kv_exchange: str = "ring",
                          ulysses_group=None, sinks: Optional[torch.Tensor] = None):
    """Ring attention over packed variable-length sequences; attention never crosses a boundary.

    q: (tokens_local, nheads, headdim); k, v: (tokens_local, nheads_kv, headdim), this rank's part
    as produced by ``shard_varlen(x, cu_seqlens, layout=layout)``. cu_seqlens: int32
    (num_seqs + 1,), the global boundaries of the packed, unpadded batch, identical on every rank
    (checked). Pad tokens that shard_varlen inserted attend to nothing, get output 0 and LSE -inf,
    and receive no gradient. Returns out like q, or (out, lse) with lse (nheads, tokens_local).
    ``deterministic``, ``kv_exchange``, ``ulysses_group`` (shards from ``shard_varlen(...,
    ulysses_group=...)``) and ``sinks`` as for ``ring_attn_func``.
    """
    if not isinstance(cu_seqlens, torch.Tensor):  # rejected on every rank, like a bad tensor
        if isinstance(layout, str):
            layout = (f"{_ARGUMENT_ERROR}cu_seqlens must be a 1-D int32 tensor, got "
                      f"{_short_repr(cu_seqlens)}")
        cu_seqlens = torch.empty(0, dtype=torch.int32)
    return _ring(q, k, v, cu_seqlens, causal, softmax_scale, window_size, group, layout,
                 return_lse, deterministic, kv_exchange, ulysses_group, sinks)


def last_ring_stats() -> dict:
    """What this thread's last ring call (forward or backward) did on this rank: schedule steps,
    blocks computed (blocks wholly hidden by the mask are skipped), exchanges posted (the K/V and
    dK/dV hops this rank sent: a block travels only as far as some rank needs it; or
    collectives), and the bytes and messages this rank sent: a hop sends its message, an
    all-gather or reduce-scatter (world - 1) blocks. LocalRing sums them over its ranks; on a
    U x R grid (ulysses_size > 1) over the R ranks of one head chunk's ring (the U rings are
    alike, and the in-memory all-to-all is not counted)."""
    steps, blocks, exchanges, sent, messages = ops.last_ring_stats()
    return {"steps": steps, "blocks_computed": blocks, "exchanges_posted": exchanges,
            "bytes_sent": sent, "messages_sent": messages}
