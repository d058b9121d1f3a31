"""ring-attention: exact attention over a sequence sharded across ranks in a ring."""
from ._ops import ops
from .functional import ring_attn_func
from .layouts import LAYOUTS, positions, shard, unshard
from .reference import attention_reference

__all__ = ["ring_attn_func", "shard", "unshard", "positions", "LAYOUTS", "attention_reference", "ops"]
__version__ = "0.1.0"
