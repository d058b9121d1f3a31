"""Loads the compiled ops (``torch.ops.ring_attention.*``) and registers their fake kernels."""
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


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulator dtype: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _lse_like(q: torch.Tensor) -> torch.Tensor:
    """lse for q: (batch, heads, seqlen) for 4-D q, (heads, tokens) for packed 3-D q."""
    shape = (q.shape[0], q.shape[2], q.shape[1]) if q.dim() == 4 else (q.shape[1], q.shape[0])
    return q.new_empty(shape, dtype=acc_dtype(q.dtype))


def _like(tensors):
    return [torch.empty_like(t, memory_format=torch.contiguous_format) for t in tensors]


@torch.library.register_fake("ring_attention::ring_fwd")
def _ring_fwd_fake(q, k, v, cu_seqlens, group_name, causal, softmax_scale, window_left, window_right,
                   layout, kv_exchange="ring"):
    dims = 3 if cu_seqlens is not None else 4
    if q.dim() != dims or k.dim() != dims or v.dim() != dims:
        raise ValueError(f"ring attention: q, k and v must be {dims}-D")
    return torch.empty_like(q, memory_format=torch.contiguous_format), _lse_like(q)


@torch.library.register_fake("ring_attention::ring_bwd")
def _ring_bwd_fake(dout, q, k, v, out, lse, cu_seqlens, group_name, causal, softmax_scale,
                   window_left, window_right, layout, deterministic=False, kv_exchange="ring"):
    return tuple(_like((q, k, v)))


@torch.library.register_fake("ring_attention::local_ring_fwd")
def _local_ring_fwd_fake(qs, ks, vs, cu_seqlens, causal, softmax_scale, window_left, window_right,
                         layout, kv_exchange="ring"):
    return _like(qs), [_lse_like(q) for q in qs]


@torch.library.register_fake("ring_attention::local_ring_bwd")
def _local_ring_bwd_fake(douts, qs, ks, vs, outs, lses, cu_seqlens, causal, softmax_scale,
                         window_left, window_right, layout, deterministic=False,
                         kv_exchange="ring"):
    return _like(qs), _like(ks), _like(vs)


@torch.library.register_fake("ring_attention::block_fwd")
def _block_fwd_fake(q, k, v, q_pos, k_pos, q_seg, out_acc, lse, causal, window_left, window_right,
                    softmax_scale):
    return None


@torch.library.register_fake("ring_attention::block_bwd")
def _block_bwd_fake(dout, q, k, v, q_pos, k_pos, q_seg, lse, delta, dq_acc, dk_acc, dv_acc, causal,
                    window_left, window_right, softmax_scale, deterministic=False):
    return None
