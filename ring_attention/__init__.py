"""ring-attention: exact attention over a sequence sharded across ranks in a ring."""
from ._ops import ops
from .decode import decode_attn_func
from .functional import last_ring_stats, ring_attn_func, ring_attn_varlen_func
from .layouts import LAYOUTS, positions, shard, shard_varlen, unshard, unshard_varlen, varlen_positions
from .reference import attention_reference

__all__ = ["ring_attn_func", "ring_attn_varlen_func", "decode_attn_func", "shard", "unshard",
           "shard_varlen", "unshard_varlen", "positions", "varlen_positions", "last_ring_stats",
           "LAYOUTS", "attention_reference", "ops"]
__version__ = "0.1.0"
