"""Hugging Face transformers: ring attention as an attention implementation.

    from ring_attention.integrations import transformers as ra_hf
    ra_hf.register(group=cp_group, layout="zigzag")
    model = AutoModelForCausalLM.from_config(config, attn_implementation="ring_attention")
    input_ids, position_ids, labels = ra_hf.shard_inputs(input_ids, labels=labels, group=cp_group)
    logits = model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
    loss = cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")  # sum over ranks

Every rank feeds its shard of the sequence; the global position ids keep rotary embeddings right,
and attention runs over the whole sequence through the ring.
"""
from typing import Optional, Tuple

import torch

from ..functional import ring_attn_func
from ..layouts import shard

ATTN_IMPLEMENTATION = "ring_attention"


def register(*, group=None, layout: str = "zigzag", kv_exchange: str = "ring",
             ulysses_group=None) -> None:
    """Registers the attention implementation "ring_attention" over ``group`` (a ProcessGroup, a
    1-D DeviceMesh or None for the default group) with inputs sharded in ``layout``;
    ``kv_exchange`` and ``ulysses_group`` as for ``ring_attn_func``."""
    from transformers import AttentionInterface

    def ring_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                               value: torch.Tensor, attention_mask: Optional[torch.Tensor],
                               dropout: float = 0.0, scaling: Optional[float] = None,
                               is_causal: Optional[bool] = None, **kwargs) -> Tuple[torch.Tensor, None]:
        """query: (batch, heads, seqlen_local, dim); key/value: (batch, heads_kv, seqlen_local, dim).
        Returns (batch, seqlen_local, heads, dim) and no attention weights."""
        if dropout:
            raise ValueError("ring_attention: attention dropout is not supported")
        if attention_mask is not None:
            raise ValueError("ring_attention: attention masks (padding) are not supported; pack the "
                             "sequences without padding (ring_attn_varlen_func) instead")
        if query.shape[2] != key.shape[2]:
            raise ValueError("ring_attention: queries and keys differ in length (a KV cache?); "
                             "call the model with use_cache=False")
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        sliding = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
        window = (sliding - 1, 0 if causal else sliding - 1) if sliding else (-1, -1)
        out = ring_attn_func(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                             causal=bool(causal), softmax_scale=scaling, window_size=window,
                             group=group, layout=layout, kv_exchange=kv_exchange,
                             ulysses_group=ulysses_group)
        return out, None

    AttentionInterface.register(ATTN_IMPLEMENTATION, ring_attention_forward)


def shard_inputs(input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                 labels: Optional[torch.Tensor] = None, *, group=None, layout: str = "zigzag",
                 ulysses_group=None):
    """This rank's (input_ids, position_ids, labels) of a full (batch, seq) batch.

    position_ids are the global positions of the local tokens (default arange(seq)), so rotary
    embeddings stay right. labels are shifted for next-token prediction over the GLOBAL sequence
    before sharding (the label of a local token is the token at the next global position; the last
    global position gets -100), so that cross_entropy(local_logits, local_labels, reduction="sum")
    summed over ranks is the full-sequence loss. labels is None when not given. With a
    ``ulysses_group`` the tokens are spread over its grid with ``group`` as ``shard`` does.
    """
    grid = dict(group=group, layout=layout, dim=1, ulysses_group=ulysses_group)
    if position_ids is None:
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    local_labels = None
    if labels is not None:
        shifted = torch.full_like(labels, -100)
        shifted[:, :-1] = labels[:, 1:]
        local_labels = shard(shifted, **grid)
    return shard(input_ids, **grid), shard(position_ids, **grid), local_labels
