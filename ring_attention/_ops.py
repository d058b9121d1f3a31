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


@torch.library.register_fake("ring_attention::ring_fwd")
def _ring_fwd_fake(q, k, v, group_name, causal, softmax_scale, layout):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("ring_attn_func: q, k and v must be 4-D (batch, seqlen_local, heads, headdim)")
    lse = q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=acc_dtype(q.dtype))
    return torch.empty_like(q, memory_format=torch.contiguous_format), lse


@torch.library.register_fake("ring_attention::ring_bwd")
def _ring_bwd_fake(dout, q, k, v, out, lse, group_name, causal, softmax_scale, layout):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format))


@torch.library.register_fake("ring_attention::block_fwd")
def _block_fwd_fake(q, k, v, q_pos, k_pos, out_acc, lse, causal, softmax_scale):
    return None


@torch.library.register_fake("ring_attention::block_bwd")
def _block_bwd_fake(dout, q, k, v, q_pos, k_pos, lse, delta, dq_acc, dk_acc, dv_acc, causal,
                    softmax_scale):
    return None


@torch.library.register_fake("ring_attention::local_ring_fwd")
def _local_ring_fwd_fake(qs, ks, vs, causal, softmax_scale, layout):
    outs = [torch.empty_like(q, memory_format=torch.contiguous_format) for q in qs]
    lses = [q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=acc_dtype(q.dtype)) for q in qs]
    return outs, lses


@torch.library.register_fake("ring_attention::local_ring_bwd")
def _local_ring_bwd_fake(douts, qs, ks, vs, outs, lses, causal, softmax_scale, layout):
    def like(ts):
        return [torch.empty_like(t, memory_format=torch.contiguous_format) for t in ts]
    return like(qs), like(ks), like(vs)
