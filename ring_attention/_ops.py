"""Loads the compiled ops (``torch.ops.ring_attention.*``) and registers their fake kernels."""
import atexit
import math
from pathlib import Path

import torch

_LIB = Path(__file__).with_name("_C.so")
if not _LIB.exists():
    raise ImportError(
        f"ring_attention: compiled extension {_LIB} not found. Build it with `make build` "
        "(or `pip install --no-build-isolation .`)."
    )
torch.ops.load_library(str(_LIB))
ops = torch.ops.ring_attention
# At exit, while Python still runs: drop the ring's abandoned works (timed-out exchanges) of
# destroyed groups, with the connections and threads they hold (csrc/comm/c10d_transport.h).
atexit.register(ops.release_abandoned_works)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulator dtype: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _lse_like(q: torch.Tensor) -> torch.Tensor:
    """lse for q: (batch, heads, seqlen) for 4-D q, (heads, tokens) for packed 3-D q."""
    shape = (q.shape[0], q.shape[2], q.shape[1]) if q.dim() == 4 else (q.shape[1], q.shape[0])
    return q.new_empty(shape, dtype=acc_dtype(q.dtype))


def _check_devices(q: torch.Tensor, cu_seqlens=None, /, **tensors) -> None:
    """ValueError unless every tensor (None: absent) is on q's device (cu_seqlens: or on the
    CPU). The fake kernels also run as meta kernels, which the dispatcher picks when any one
    argument is a meta tensor: unchecked, a CPU q with a meta k got an uninitialised output."""
    call = "ring_attn_func" if cu_seqlens is None else "ring_attn_varlen_func"
    for name, t in tensors.items():
        if t is not None and t.device != q.device:
            raise ValueError(f"{call}: every tensor must be on q's device ({q.device}); "
                             f"got {name} on {t.device}")
    if cu_seqlens is not None and cu_seqlens.device not in (q.device, torch.device("cpu")):
        raise ValueError(f"{call}: cu_seqlens must be on the CPU or on q's device "
                         f"({q.device}); got cu_seqlens on {cu_seqlens.device}")


def _like(tensors):
    return [torch.empty_like(t, memory_format=torch.contiguous_format) for t in tensors]


@torch.library.register_fake("ring_attention::ring_fwd")
def _ring_fwd_fake(q, k, v, cu_seqlens, group_name, causal, softmax_scale, window_left, window_right,
                   layout, kv_exchange="ring"):
    _check_devices(q, cu_seqlens, k=k, v=v)
    dims = 3 if cu_seqlens is not None else 4
    if q.dim() != dims or k.dim() != dims or v.dim() != dims:
        raise ValueError(f"ring attention: q, k and v must be {dims}-D")
    return (torch.empty_like(q, memory_format=torch.contiguous_format), _lse_like(q),
            _forward_calls(1))


def _forward_calls(count):
    """The forward ops' call numbers: a CPU int64 tensor (count,)."""
    return torch.empty(count, dtype=torch.int64, device="cpu")


@torch.library.register_fake("ring_attention::ring_bwd")
def _ring_bwd_fake(dout, q, k, v, out, lse, cu_seqlens, group_name, causal, softmax_scale,
                   window_left, window_right, layout, deterministic=False, kv_exchange="ring",
                   dlse=None, forward_call=None):
    _check_devices(q, cu_seqlens, dout=dout, k=k, v=v, out=out, lse=lse, dlse=dlse)
    return tuple(_like((q, k, v)))


def _group_size(group_name: str) -> int:
    """Size of the process group registered as group_name ("": 1)."""
    if not group_name:
        return 1
    from torch.distributed.distributed_c10d import _resolve_process_group
    return _resolve_process_group(group_name).size()


@torch.library.register_fake("ring_attention::ulysses_fwd")
def _ulysses_fwd_fake(q, k, v, cu_seqlens, group_name, ulysses_group_name, causal, softmax_scale,
                      window_left, window_right, layout, kv_exchange="ring", return_lse=False):
    _check_devices(q, cu_seqlens, k=k, v=v)
    dims = 3 if cu_seqlens is not None else 4
    if q.dim() != dims or k.dim() != dims or v.dim() != dims:
        raise ValueError(f"ring attention: q, k and v must be {dims}-D")
    size = _group_size(ulysses_group_name)
    heads, heads_kv = q.shape[-2], k.shape[-2]
    tokens = q.shape[-3] * size
    heads_kv_ex = math.lcm(size, heads_kv) // size if heads_kv else 0

    def exchanged(t, heads_ex):  # (batch, U * L, heads_ex, d), packed without batch
        return t.new_empty((*t.shape[:-3], tokens, heads_ex, t.shape[-1]))

    q_heads = exchanged(q, heads // size)
    lse = _lse_like(q) if return_lse else q.new_empty((0,), dtype=acc_dtype(q.dtype))
    return (torch.empty_like(q, memory_format=torch.contiguous_format), lse, q_heads,
            exchanged(k, heads_kv_ex), exchanged(v, heads_kv_ex), torch.empty_like(q_heads),
            _lse_like(q_heads), _forward_calls(2))


@torch.library.register_fake("ring_attention::ulysses_bwd")
def _ulysses_bwd_fake(dout, q_heads, k_heads, v_heads, out_heads, lse_heads, cu_seqlens,
                      group_name, ulysses_group_name, causal, softmax_scale, window_left,
                      window_right, layout, heads_kv, deterministic=False, kv_exchange="ring",
                      dlse=None, forward_calls=None):
    _check_devices(q_heads, cu_seqlens, dout=dout, k=k_heads, v=v_heads, out=out_heads,
                   lse=lse_heads, dlse=dlse)
    kv_shape = (*dout.shape[:-2], heads_kv, dout.shape[-1])
    return (torch.empty_like(dout, memory_format=torch.contiguous_format, dtype=q_heads.dtype),
            dout.new_empty(kv_shape, dtype=k_heads.dtype),
            dout.new_empty(kv_shape, dtype=v_heads.dtype))


@torch.library.register_fake("ring_attention::local_ring_fwd")
def _local_ring_fwd_fake(qs, ks, vs, cu_seqlens, causal, softmax_scale, window_left, window_right,
                         layout, kv_exchange="ring"):
    for q, k, v in zip(qs, ks, vs):
        _check_devices(qs[0], cu_seqlens, q=q, k=k, v=v)
    return _like(qs), [_lse_like(q) for q in qs]


@torch.library.register_fake("ring_attention::local_ring_bwd")
def _local_ring_bwd_fake(douts, qs, ks, vs, outs, lses, cu_seqlens, causal, softmax_scale,
                         window_left, window_right, layout, deterministic=False,
                         kv_exchange="ring", dlses=None):
    for dout, q, k, v, out, lse, dlse in zip(douts, qs, ks, vs, outs, lses,
                                             dlses or [None] * len(qs)):
        _check_devices(qs[0], cu_seqlens, dout=dout, q=q, k=k, v=v, out=out, lse=lse, dlse=dlse)
    return _like(qs), _like(ks), _like(vs)


@torch.library.register_fake("ring_attention::block_fwd")
def _block_fwd_fake(q, k, v, q_pos, k_pos, q_seg, out_acc, lse, causal, window_left, window_right,
                    softmax_scale):
    _check_devices(q, k=k, v=v, q_pos=q_pos, k_pos=k_pos, q_seg=q_seg, out_acc=out_acc, lse=lse)
    return None


@torch.library.register_fake("ring_attention::block_bwd")
def _block_bwd_fake(dout, q, k, v, q_pos, k_pos, q_seg, lse, delta, dq_acc, dk_acc, dv_acc, causal,
                    window_left, window_right, softmax_scale, deterministic=False):
    _check_devices(q, dout=dout, k=k, v=v, q_pos=q_pos, k_pos=k_pos, q_seg=q_seg, lse=lse,
                   delta=delta, dq_acc=dq_acc, dk_acc=dk_acc, dv_acc=dv_acc)
    return None
