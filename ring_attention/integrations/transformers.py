"""Hugging Face transformers: ring attention as an attention implementation.

    from ring_attention.integrations import transformers as ra_hf
    ra_hf.register(group=cp_group, layout="zigzag")
    model = AutoModelForCausalLM.from_config(config, attn_implementation="ring_attention")
    input_ids, position_ids, labels = ra_hf.shard_inputs(input_ids, labels=labels, group=cp_group)
    logits = model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
    loss = cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")  # sum over ranks

The labels come back shifted already: to have the model compute the loss, pass them as
``labels=labels, shift_labels=labels`` (``labels`` alone would be shifted a second time).

Every rank feeds its shard of the sequence; the global position ids keep rotary embeddings right,
and attention runs over the whole sequence through the ring. Packed rows (batch 1, position_ids
restarting at 0 at every document, as DataCollatorWithFlattening makes them) are split by
shard_inputs into the documents' varlen shards; the attention then never crosses a document, and
unshard_outputs restores the packed order.

What the ring does not compute raises ValueError instead of being dropped: padding in an
attention_mask, masks transformers builds beyond causal, sliding-window and bidirectional ones
(chunked attention, image-token blocks), attention arguments such as logit soft-capping or
attention sinks, attention weights (output_attentions), KV caches, and position_ids counting from
0 on a rank whose shard starts elsewhere (the whole sequence on every rank, or shards without
their global position_ids).
"""
import weakref
import zlib
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch

from .. import _group
from ..functional import ring_attn_func, ring_attn_varlen_func
from ..layouts import _decode, _encode, shard, shard_varlen, unshard, unshard_varlen

ATTN_IMPLEMENTATION = "ring_attention"

# Arguments transformers passes to attention functions that do not change what the attention
# computes here (dropout, scaling, is_causal, sliding_window and s_aux are applied; position_ids
# checks the shards and packed documents; output_attentions is checked apart; the rest are output,
# cache and kernel switches or loss bookkeeping: a causal LM's forward hands its loss keywords,
# such as the pre-shifted shift_labels, to every layer too).
_HARMLESS_KWARGS = frozenset({
    "position_ids", "sliding_window", "use_cache", "cache_position", "output_attentions",
    "output_hidden_states", "output_router_logits", "num_items_in_batch", "shift_labels",
    "deterministic", "s_aux"})

# Arguments whose meaning the ring does not implement, with what they are.
_UNSUPPORTED_KWARGS = {
    "softcap": "attention logit soft-capping (e.g. Gemma 2's attn_logit_softcapping)",
    "cu_seq_lens_q": "packed documents as flash-attention arguments",
    "cu_seq_lens_k": "packed documents as flash-attention arguments",
    "max_length_q": "packed documents as flash-attention arguments",
    "max_length_k": "packed documents as flash-attention arguments",
    "seq_idx": "packed documents as sequence indices",
}


def _reject_unsupported_kwargs(kwargs) -> None:
    """Raises ValueError for an attention argument that is set and would change the attention."""
    for name, value in kwargs.items():
        if value is None or name in _HARMLESS_KWARGS:
            continue
        what = _UNSUPPORTED_KWARGS.get(name, "an attention argument ring_attention does not know")
        hint = (" (give shard_inputs the packed position_ids instead)"
                if name in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")
                else "; use another attn_implementation for this model")
        raise ValueError(f"ring_attention: {name}= is {what}, which is not supported{hint}")


@dataclass
class _Sharding:
    """What the last shard_inputs call did for a group: its grid and, for packed rows, the
    documents (cu_seqlens) and the local position_ids it returned (a weak reference)."""
    layout: str
    ulysses: str
    documents: Optional[torch.Tensor] = None
    position_ids: Optional[Callable[[], Optional[torch.Tensor]]] = None

    def returned(self, position_ids: torch.Tensor) -> bool:
        """Whether ``position_ids`` are (a view of the same memory as) those shard_inputs returned."""
        recorded = self.position_ids()
        if recorded is None:
            return False
        return position_ids is recorded or (
            position_ids.shape == recorded.shape and position_ids.device == recorded.device
            and position_ids.data_ptr() == recorded.data_ptr())


# Per process group name: (a weak reference to the group, None without torch.distributed; what
# the last shard_inputs call recorded for it). A record goes with its group: a new group that takes
# a destroyed group's name starts without one.
_shardings = {}


def _group_key(group) -> str:
    return _group.group_name(_group.resolve(group)[0])


def _ulysses_key(ulysses_group) -> str:
    return "" if ulysses_group is None else _group_key(ulysses_group)


def _recorded(group) -> Optional[_Sharding]:
    """What shard_inputs recorded for ``group``; None when nothing (or only for a destroyed group
    of the same name)."""
    resolved = _group.resolve(group)[0]
    group_ref, sharding = _shardings.get(_group.group_name(resolved), (None, None))
    if sharding is None or (None if group_ref is None else group_ref()) is not resolved:
        return None
    return sharding


def _record(group, sharding: _Sharding) -> None:
    """Records ``sharding`` for ``group`` and drops the records of groups that are gone."""
    for name in [name for name, (ref, _) in _shardings.items() if ref is not None and ref() is None]:
        del _shardings[name]
    resolved = _group.resolve(group)[0]
    _shardings[_group.group_name(resolved)] = (
        None if resolved is None else weakref.ref(resolved), sharding)


def clear_inputs(group=None) -> None:
    """Forgets what shard_inputs recorded for ``group`` (its layout and packed documents), e.g.
    before a forward on rows sharded by other means."""
    _shardings.pop(_group_key(group), None)


# Pieces of transformers' mask functions that the attention computes from is_causal and
# sliding_window (or from shard_inputs' documents): anything else in a mask raises ValueError.
_MASK_PARTS = frozenset({
    "causal_mask_function", "bidirectional_mask_function", "and_masks.<locals>.and_mask",
    "or_masks.<locals>.or_mask", "sliding_window_overlay.<locals>.inner_mask",
    "sliding_window_bidirectional_overlay.<locals>.inner_mask",
    "packed_sequence_mask_function.<locals>.inner_mask",
    "remap_positions_for_packed_sequence.<locals>.inner_mask",
    "add_offsets_to_mask_function.<locals>.inner_mask"})
# Bidirectional overlays that models (Gemma 3 with use_bidirectional_attention) add to a causal
# mask; their attention modules are not causal, which the attention follows.
_BIDIRECTIONAL_OVERLAYS = frozenset({"_bidirectional_window_overlay.<locals>.inner_mask"})


def _mask_parts(mask_function):
    """mask_function and the mask functions it combines (and_masks, or_masks and overlays keep
    them in their closures)."""
    yield mask_function
    for cell in mask_function.__closure__ or ():
        try:
            contents = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        for inner in contents if isinstance(contents, tuple) else (contents,):
            if callable(inner) and hasattr(inner, "__code__"):
                yield from _mask_parts(inner)


def _closure_value(function, name):
    return function.__closure__[function.__code__.co_freevars.index(name)].cell_contents


def _is_full_visibility(function) -> bool:
    """Whether an overlay lets every query see every key (a bidirectional model's overlay)."""
    probes = torch.tensor([0, 1, 3])
    zero = torch.tensor(0)
    try:
        return all(bool(function(zero, zero, q, k)) for q in probes for k in probes)
    except Exception:  # an overlay that needs more than indices
        return False


def _check_mask(mask_function, tokens_local: int, ranks: int) -> None:
    """Raises ValueError unless the attention computes the mask described by ``mask_function``."""
    for part in _mask_parts(mask_function):
        module, name = getattr(part, "__module__", ""), part.__qualname__
        if module == "transformers.masking_utils" and name in _MASK_PARTS:
            continue
        if module == "transformers.masking_utils" and name == "chunked_overlay.<locals>.inner_mask":
            chunk = _closure_value(part, "chunk_size")
            if chunk >= tokens_local * ranks:  # one chunk covers the whole sequence: causal
                continue
            raise ValueError(f"ring_attention: chunked attention (attention_chunk_size={chunk}) over "
                             f"{tokens_local * ranks} tokens is not supported; use another "
                             "attn_implementation for this model")
        if module.startswith("transformers.models.") and (
                name in _BIDIRECTIONAL_OVERLAYS or (name.endswith("<lambda>") and _is_full_visibility(part))):
            continue
        raise ValueError(f"ring_attention: the attention mask this model builds ({module}.{name}) is "
                         "not supported: only causal, sliding-window and bidirectional attention, and "
                         "packed documents through shard_inputs")


def _raise_on_every_rank(local_error: str, device: str, groups, check: str) -> None:
    """Raises one ValueError on every rank of the grid when any rank's ``local_error`` (what this
    rank found wrong, "" if nothing) is set: one small all-gather per group of more than one rank
    (on the device its backend accepts for tensors on ``device``) through the ranks' agreement
    (RING_ATTN_TIMEOUT; a rank making another call raises), made by every rank whatever it found.
    So ranks that check in different orders (a model's mask functions run in set order, which
    differs between processes) still meet in one collective per check. ``check`` names it."""
    error = local_error
    for group in groups:
        group, _, world = _group.resolve(group)
        if world == 1:
            continue
        errors = [_decode(g) for g in _group.gather_agreement(_encode(error), group, device, check,
                                                              "ring_attention")]
        error = "; ".join(f"rank {r}: {e}" for r, e in enumerate(errors) if e)
    if error:
        raise ValueError(f"ring_attention: unsupported use (every rank raises this): {error}")


def _grid_groups(group, ulysses_group):
    """The groups of the grid, for _raise_on_every_rank."""
    return [group] if ulysses_group is None else [group, ulysses_group]


def _grid_ranks(group, ulysses_group) -> int:
    """The ranks of the grid: the ring's times the Ulysses group's."""
    return _group.resolve(group)[2] * (1 if ulysses_group is None else _group.resolve(ulysses_group)[2])


def _whole_sequence_positions(position_ids: torch.Tensor, grid) -> bool:
    """Whether position_ids (batch, tokens_local) count 0, 1, ... on a rank whose shard of a
    sequence holds other positions: the model got a whole sequence, or shards without their
    global position_ids. False where the layout cannot shard the sequence (the ring raises)."""
    tokens = position_ids.shape[-1]
    counting = torch.arange(tokens, device=position_ids.device)
    if not bool((position_ids == counting).all()):
        return False
    ranks = _grid_ranks(grid["group"], grid["ulysses_group"])
    try:
        own = shard(torch.arange(tokens * ranks).unsqueeze(0), dim=1, **grid)[0]
    except ValueError:
        return False
    return not torch.equal(own, counting.cpu())


def _mask_for(group, ulysses_group):
    """The mask function transformers calls for "ring_attention": checks the mask and builds none
    (the ring applies causality, windows and documents itself)."""

    @torch.compiler.disable(reason="ring_attention checks the mask with its peers on the host")
    def ring_attention_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
                            mask_function=None, attention_mask: Optional[torch.Tensor] = None,
                            **kwargs) -> None:
        error = ""
        if mask_function is not None:
            try:
                _check_mask(mask_function, kv_length, _grid_ranks(group, ulysses_group))
            except ValueError as e:
                error = str(e).removeprefix("ring_attention: ")
        if not error and attention_mask is not None and not bool(attention_mask.all()):
            error = ("its attention_mask pads some tokens, which is not supported; pack the sequences "
                     "without padding (shard_inputs with position_ids restarting at 0 at every "
                     "document) instead")
        device = str(attention_mask.device) if attention_mask is not None else "cpu"
        _raise_on_every_rank(error, device, _grid_groups(group, ulysses_group), "attention_mask check")
        return None

    return ring_attention_mask


def register(*, group=None, layout: str = "zigzag", kv_exchange: str = "ring",
             ulysses_group=None) -> None:
    """Registers the attention implementation "ring_attention" over ``group`` (a ProcessGroup, a
    1-D DeviceMesh or None for the default group) with inputs sharded in ``layout``;
    ``kv_exchange`` and ``ulysses_group`` as for ``ring_attn_func``. Also registers its mask
    function, which rejects padding and masks the ring does not compute."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    grid = dict(group=group, layout=layout, ulysses_group=ulysses_group)

    def ring_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                               value: torch.Tensor, attention_mask: Optional[torch.Tensor],
                               dropout: float = 0.0, scaling: Optional[float] = None,
                               is_causal: Optional[bool] = None, **kwargs) -> Tuple[torch.Tensor, None]:
        """query: (batch, heads, seqlen_local, dim); key/value: (batch, heads_kv, seqlen_local, dim).
        Returns (batch, seqlen_local, heads, dim) and no attention weights."""
        if dropout:
            raise ValueError("ring_attention: attention dropout is not supported")
        config = getattr(module, "config", None)
        if kwargs.get("output_attentions", getattr(config, "output_attentions", False)):
            raise ValueError("ring_attention: output_attentions=True is not supported (the ring computes "
                             "no attention weights); use attn_implementation='eager' for them")
        if attention_mask is not None:
            raise ValueError("ring_attention: a prepared attention mask is not supported; pack the "
                             "sequences without padding (shard_inputs with packed position_ids) instead")
        _reject_unsupported_kwargs(kwargs)
        if query.shape[2] != key.shape[2]:
            raise ValueError("ring_attention: queries and keys differ in length (decoding with a KV "
                             "cache, or cross-attention), which is not supported; call the model with "
                             "use_cache=False (generate() is not supported)")
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        # a layer's sliding_window argument (None on full layers) before its module's attribute,
        # which some models (Exaone 4) set on full layers too
        sliding = (kwargs["sliding_window"] if "sliding_window" in kwargs
                   else getattr(module, "sliding_window", None))
        window = (sliding - 1, 0 if causal else sliding - 1) if sliding else (-1, -1)
        q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        # s_aux: GPT-OSS's attention sinks, one logit per query head
        options = dict(causal=bool(causal), softmax_scale=scaling, window_size=window,
                       kv_exchange=kv_exchange, sinks=kwargs.get("s_aux"), **grid)
        cu_seqlens = _recorded_documents(kwargs)
        if cu_seqlens is not None:  # packed rows: (1, tokens_local, ...) as varlen tokens
            if q.shape[0] != 1:
                raise ValueError("ring_attention: shard_inputs recorded packed documents for this "
                                 f"group, so the batch must be 1, got {q.shape[0]}")
            return ring_attn_varlen_func(q[0], k[0], v[0], cu_seqlens, **options).unsqueeze(0), None
        position_ids = kwargs.get("position_ids")
        if getattr(module, "layer_idx", 0) == 0 and position_ids is not None:
            _check_positions(position_ids, grid)
        return ring_attn_func(q, k, v, **options), None

    @torch.compiler.disable(reason="ring_attention checks the position_ids with its peers on the host")
    def _check_positions(position_ids: torch.Tensor, grid) -> None:
        """Raises ValueError on every rank when a rank's position_ids count from 0 on a shard
        that holds other positions."""
        error = ("its position_ids count 0, 1, ... as for a whole sequence, but its shard holds "
                 "other positions; feed every rank its shard of the sequence and the shard's "
                 "global position_ids (shard_inputs)"
                 if _whole_sequence_positions(position_ids, grid) else "")
        _raise_on_every_rank(error, str(position_ids.device), _grid_groups(group, ulysses_group),
                             "position_ids check")

    @torch.compiler.disable(reason="ring_attention compares the position_ids with shard_inputs' record")
    def _recorded_documents(kwargs) -> Optional[torch.Tensor]:
        """The documents shard_inputs recorded for the model's position_ids, None for unpacked rows;
        ValueError where shard_inputs used another grid or recorded another batch."""
        sharding = _recorded(group)
        if sharding is None:
            return None
        if (sharding.layout, sharding.ulysses) != (layout, _ulysses_key(ulysses_group)):
            raise ValueError(f"ring_attention: register() was given layout {layout!r} and "
                             f"shard_inputs {sharding.layout!r} (or another ulysses_group); pass the "
                             "same layout and ulysses_group to register, shard_inputs and unshard_outputs")
        if sharding.documents is None:
            return None
        position_ids = kwargs.get("position_ids")
        if "position_ids" in kwargs and (position_ids is None or not sharding.returned(position_ids)):
            raise ValueError("ring_attention: shard_inputs recorded packed documents for this group, "
                             "but the model was not given the position_ids that call returned; call "
                             "shard_inputs for every batch (or clear_inputs() before a forward on "
                             "rows sharded otherwise)")
        return sharding.documents

    AttentionInterface.register(ATTN_IMPLEMENTATION, ring_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _mask_for(group, ulysses_group))


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


def _agree_on_documents(cu_seqlens: Optional[torch.Tensor], device: torch.device, group,
                        ulysses_group) -> None:
    """Raises the same ValueError on every rank of `group` (of the grid, with a ulysses_group)
    unless all hold the same documents (or all unpacked rows): one small all-gather of (packed,
    documents, tokens, checksum) over the ulysses_group, then one over group that also carries
    whether each rank's ulysses_group agreed, as the ring's grid agreement does."""
    cu = [] if cu_seqlens is None else cu_seqlens.tolist()
    mine = [int(cu_seqlens is not None), len(cu), cu[-1] if cu else 0, zlib.crc32(repr(cu).encode())]
    in_ulysses = [mine]
    if ulysses_group is not None:
        ulysses_group, _, size = _group.resolve(ulysses_group)
        if size > 1:
            in_ulysses = _group.gather_agreement(mine, ulysses_group, device, "shard_inputs",
                                                 "shard_inputs")
    agreed = int(all(d == mine for d in in_ulysses))
    group, _, world = _group.resolve(group)
    if world > 1:
        described = _group.gather_agreement(mine + [agreed], group, device, "shard_inputs",
                                            "shard_inputs")
        if all(d == described[0] for d in described) and described[0][-1]:
            return
        listing = _documents_listing([d[:-1] for d in described], "in group", [d[-1] for d in described])
    elif agreed:
        return
    else:
        listing = _documents_listing(in_ulysses, "in its ulysses_group")
    raise ValueError("shard_inputs: ranks disagree on the documents of the batch (every rank "
                     "raises this):\n  " + listing)


def _documents_listing(described, where, agreed=None):
    """One line per rank of the gathered (packed, documents, tokens, checksum)."""
    def line(r, p, n, t):
        documents = f"{n - 1} packed documents, {t} tokens" if p else "unpacked rows"
        disagrees = "" if agreed is None or agreed[r] else " (its ulysses_group disagrees)"
        return f"rank {r} {where}: {documents}{disagrees}"
    return "\n  ".join(line(r, p, n, t) for r, (p, n, t, _) in enumerate(described))


def shard_inputs(input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                 labels: Optional[torch.Tensor] = None, *, group=None, layout: str = "zigzag",
                 ulysses_group=None):
    """This rank's (input_ids, position_ids, labels) of a full (batch, seq) batch.

    position_ids ((batch, seq), or (seq,) for every row) are the global positions of the local
    tokens (default arange(seq)), so rotary embeddings stay right. labels are shifted for next-token prediction over the GLOBAL sequence
    before sharding (the label of a local token is the token at the next global position; the last
    global position gets -100), so that cross_entropy(local_logits, local_labels, reduction="sum")
    summed over ranks is the full-sequence loss. labels is None when not given. With a
    ``ulysses_group`` the tokens are spread over its grid with ``group`` as ``shard`` does.

    Packed rows (position_ids restarting at 0 inside the row; batch 1, else ValueError): every
    document is split by the layout as shard_varlen does, padded inside the library; the returned
    position_ids are the per-document positions (pads 0), labels are shifted inside each document
    (its last token and the pads get -100), and the documents are recorded for ``group`` so that
    the registered attention never crosses a document; a forward whose position_ids are not the
    ones returned here raises ValueError (call shard_inputs for every batch, or clear_inputs).
    Ranks that disagree on the documents raise ValueError on every rank. The layout and
    ulysses_group are recorded too: a registered attention or unshard_outputs given others raises.
    """
    grid = dict(group=group, layout=layout, dim=1, ulysses_group=ulysses_group)
    position_ids = _rows_of(position_ids, input_ids, "shard_inputs")
    cu_seqlens = packed_documents(position_ids)
    _agree_on_documents(cu_seqlens, input_ids.device, group, ulysses_group)
    sharding = _Sharding(layout, _ulysses_key(ulysses_group))
    if cu_seqlens is None:
        local = _shard_rows(input_ids, position_ids, labels, grid)
        _record(group, sharding)
        return local
    local_labels = None
    if labels is not None:
        shifted = torch.full_like(labels, -100)
        shifted[:, :-1] = labels[:, 1:]
        shifted[:, cu_seqlens[1:-1].long() - 1] = -100  # never predict the next document
        # shard_varlen pads with zeros: shift the labels so that the pads come out as -100
        local_labels = shard_varlen(shifted + 100, cu_seqlens, **grid) - 100
    local_position_ids = shard_varlen(position_ids, cu_seqlens, **grid)
    local_input_ids = shard_varlen(input_ids, cu_seqlens, **grid)
    sharding.documents, sharding.position_ids = cu_seqlens, weakref.ref(local_position_ids)
    _record(group, sharding)
    return local_input_ids, local_position_ids, local_labels


def _rows_of(position_ids: Optional[torch.Tensor], input_ids: Optional[torch.Tensor], caller: str):
    """position_ids as (batch, seq) rows: (seq,) is every row's; other shapes raise ValueError."""
    if position_ids is None:
        return None
    if position_ids.dim() == 1:
        position_ids = position_ids.unsqueeze(0)
        if input_ids is not None:
            position_ids = position_ids.expand(input_ids.shape[0], -1)
    if position_ids.dim() != 2 or (input_ids is not None and position_ids.shape != input_ids.shape[:2]):
        wanted = "(seq,) or (batch, seq)" if input_ids is None else f"{tuple(input_ids.shape[:2])} as input_ids"
        raise ValueError(f"{caller}: position_ids must be {wanted}, got shape {tuple(position_ids.shape)}")
    return position_ids


def _shard_rows(input_ids, position_ids, labels, grid):
    """shard_inputs of unpacked rows, as contiguous tensors (shard gives views of rows for some
    layouts; transformers' loss flattens the labels with view)."""
    if position_ids is None:
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    local_labels = None
    if labels is not None:
        shifted = torch.full_like(labels, -100)
        shifted[:, :-1] = labels[:, 1:]
        local_labels = shard(shifted, **grid).contiguous()
    return (shard(input_ids, **grid).contiguous(), shard(position_ids, **grid).contiguous(),
            local_labels)


def unshard_outputs(x: torch.Tensor, position_ids: Optional[torch.Tensor] = None, *, group=None,
                    layout: str = "zigzag", dim: int = 1, ulysses_group=None) -> torch.Tensor:
    """The full (batch, seq, ...) tensor from every rank's output of shard_inputs' shards.

    position_ids: the global (batch, seq) or (seq,) position ids given to shard_inputs. For packed rows the
    packed order is restored and the pads dropped; otherwise this is ``unshard``. Differentiable.
    """
    sharding = _recorded(group)
    if sharding is not None and (sharding.layout, sharding.ulysses) != (layout, _ulysses_key(ulysses_group)):
        raise ValueError(f"unshard_outputs: shard_inputs sharded in layout {sharding.layout!r} (or over "
                         f"another ulysses_group), got layout {layout!r}; pass the same layout and "
                         "ulysses_group to register, shard_inputs and unshard_outputs")
    cu_seqlens = packed_documents(_rows_of(position_ids, None, "unshard_outputs"))
    grid = dict(group=group, layout=layout, dim=dim, ulysses_group=ulysses_group)
    if cu_seqlens is None:
        return unshard(x, **grid)
    return unshard_varlen(x, cu_seqlens, **grid)
