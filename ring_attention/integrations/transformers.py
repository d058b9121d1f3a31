"""Hugging Face transformers: ring attention as an attention implementation.

    from ring_attention.integrations import transformers as ra_hf
    ra_hf.register(group=cp_group, layout="zigzag")
    model = AutoModelForCausalLM.from_config(config, attn_implementation="ring_attention")
    input_ids, position_ids, labels = ra_hf.shard_inputs(input_ids, labels=labels, group=cp_group)
    logits = model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
    loss = cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")  # sum over ranks

Every rank feeds its shard of the sequence; the global position ids keep rotary embeddings right,
and attention runs over the whole sequence through the ring. Packed rows (batch 1, position_ids
restarting at 0 at every document, as DataCollatorWithFlattening makes them) are split by
shard_inputs into the documents' varlen shards; the attention then never crosses a document, and
unshard_outputs restores the packed order.
"""
import zlib
from typing import Optional, Tuple

import torch
import torch.distributed as dist

from .. import _group
from ..functional import ring_attn_func, ring_attn_varlen_func
from ..layouts import shard, shard_varlen, unshard, unshard_varlen

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
        q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        options = dict(causal=bool(causal), softmax_scale=scaling, window_size=window, group=group,
                       layout=layout, kv_exchange=kv_exchange, ulysses_group=ulysses_group)
        cu_seqlens = _documents.get(_group_key(group))
        if cu_seqlens is not None:  # packed rows: (1, tokens_local, ...) as varlen tokens
            if q.shape[0] != 1:
                raise ValueError("ring_attention: shard_inputs recorded packed documents for this "
                                 f"group, so the batch must be 1, got {q.shape[0]}")
            return ring_attn_varlen_func(q[0], k[0], v[0], cu_seqlens, **options).unsqueeze(0), None
        return ring_attn_func(q, k, v, **options), None

    AttentionInterface.register(ATTN_IMPLEMENTATION, ring_attention_forward)


# Per process group: the packed documents (cu_seqlens) recorded by the last shard_inputs call,
# absent when its rows were not packed.
_documents = {}


def _group_key(group) -> str:
    return _group.group_name(_group.resolve(group)[0])


def packed_documents(position_ids: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """cu_seqlens (int32, (docs + 1,)) of a packed row, or None when the rows are not packed.

    A row is packed when position_ids restart at 0 after its first token; documents start at
    index 0 and wherever position_ids == 0. position_ids: (batch, seq); packed rows need batch 1.
    """
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[1] < 2:
        return None
    restarts = position_ids[:, 1:] == 0
    if not bool(restarts.any()):
        return None
    if position_ids.shape[0] != 1:
        raise ValueError("shard_inputs: position_ids restart at 0 inside a row (packed documents), "
                         f"which needs batch 1, got batch {position_ids.shape[0]}")
    starts = (torch.nonzero(restarts[0]).flatten() + 1).tolist()
    return torch.tensor([0, *starts, position_ids.shape[1]], dtype=torch.int32)


def _agree_on_documents(cu_seqlens: Optional[torch.Tensor], device: torch.device, group) -> None:
    """Raises the same ValueError on every rank unless all hold the same documents (or all
    unpacked rows): one small all-gather of (packed, documents, tokens, checksum)."""
    from .._ops import ops
    group, _, world = _group.resolve(group)
    if world == 1:
        return
    name = _group.group_name(group)
    collective_device = ops.group_collective_device(name, str(device))
    if not collective_device:
        raise ValueError(f"shard_inputs: {ops.group_device_error(name, str(device), False)}")
    cu = [] if cu_seqlens is None else cu_seqlens.tolist()
    desc = torch.tensor([int(cu_seqlens is not None), len(cu), cu[-1] if cu else 0,
                         zlib.crc32(repr(cu).encode())], dtype=torch.int64, device=collective_device)
    gathered = [torch.empty_like(desc) for _ in range(world)]
    dist.all_gather(gathered, desc, group=group)
    described = [tuple(g.cpu().tolist()) for g in gathered]
    if len(set(described)) > 1:
        listing = "\n  ".join(f"rank {r}: " + (f"{n - 1} packed documents, {t} tokens" if p else "unpacked rows")
                              for r, (p, n, t, _) in enumerate(described))
        raise ValueError("shard_inputs: ranks disagree on the documents of the batch (every rank "
                         "raises this):\n  " + listing)


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

    Packed rows (position_ids restarting at 0 inside the row; batch 1, else ValueError): every
    document is split by the layout as shard_varlen does, padded inside the library; the returned
    position_ids are the per-document positions (pads 0), labels are shifted inside each document
    (its last token and the pads get -100), and the documents are recorded for ``group`` so that
    the registered attention never crosses a document. Ranks that disagree on the documents raise
    ValueError on every rank.
    """
    grid = dict(group=group, layout=layout, dim=1, ulysses_group=ulysses_group)
    cu_seqlens = packed_documents(position_ids)
    _agree_on_documents(cu_seqlens, input_ids.device, group)
    key = _group_key(group)
    if cu_seqlens is None:
        _documents.pop(key, None)
        return _shard_rows(input_ids, position_ids, labels, grid)
    _documents[key] = cu_seqlens
    local_labels = None
    if labels is not None:
        shifted = torch.full_like(labels, -100)
        shifted[:, :-1] = labels[:, 1:]
        shifted[:, cu_seqlens[1:-1].long() - 1] = -100  # never predict the next document
        # shard_varlen pads with zeros: shift the labels so that the pads come out as -100
        local_labels = shard_varlen(shifted + 100, cu_seqlens, **grid) - 100
    return (shard_varlen(input_ids, cu_seqlens, **grid), shard_varlen(position_ids, cu_seqlens, **grid),
            local_labels)


def _shard_rows(input_ids, position_ids, labels, grid):
    """shard_inputs of unpacked rows."""
    if position_ids is None:
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    local_labels = None
    if labels is not None:
        shifted = torch.full_like(labels, -100)
        shifted[:, :-1] = labels[:, 1:]
        local_labels = shard(shifted, **grid)
    return shard(input_ids, **grid), shard(position_ids, **grid), local_labels


def unshard_outputs(x: torch.Tensor, position_ids: Optional[torch.Tensor] = None, *, group=None,
                    layout: str = "zigzag", dim: int = 1, ulysses_group=None) -> torch.Tensor:
    """The full (batch, seq, ...) tensor from every rank's output of shard_inputs' shards.

    position_ids: the global (batch, seq) position ids given to shard_inputs. For packed rows the
    packed order is restored and the pads dropped; otherwise this is ``unshard``. Differentiable.
    """
    cu_seqlens = packed_documents(position_ids)
    grid = dict(group=group, layout=layout, dim=dim, ulysses_group=ulysses_group)
    if cu_seqlens is None:
        return unshard(x, **grid)
    return unshard_varlen(x, cu_seqlens, **grid)
