"""How a global sequence maps to ranks, and moving tensors between the two views.

Layouts of S = world * L tokens:
  contiguous: rank r holds [r*L, (r+1)*L)
  zigzag:     2*world chunks; rank r holds chunk r then chunk 2*world-1-r (balanced causal work)
  striped:    rank r holds r, r+world, r+2*world, ...
  packed:     as contiguous; packed sequences (shard_varlen) are split as one stream, so short
              sequences stay on one rank
"""
import atexit
import hashlib
import time
import weakref
from datetime import timedelta

import torch
import torch.distributed as dist

from . import _group
from ._autograd import once_differentiable

LAYOUTS = ("contiguous", "zigzag", "striped", "packed")


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r} (expected one of {', '.join(LAYOUTS)})")


def _check_rank(rank: int, world: int) -> None:
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, world) with world >= 1, got rank {rank} of world {world}")


def positions(layout: str, rank: int, world: int, local_len: int) -> torch.Tensor:
    """Global positions (int64, (local_len,)) of ``rank``'s tokens, in local order."""
    _check_layout(layout)
    _check_rank(rank, world)
    if local_len < 0:
        raise ValueError(f"local_len must be >= 0, got {local_len}")
    i = torch.arange(local_len)
    if layout in ("contiguous", "packed"):
        return rank * local_len + i
    if layout == "striped":
        return rank + i * world
    if local_len % 2:
        raise ValueError(f"layout 'zigzag' needs an even local length, got {local_len}")
    chunk = local_len // 2
    return torch.where(i < chunk, rank * chunk + i, (2 * world - 1 - rank) * chunk + (i - chunk))


def _local_len(total: int, world: int, layout: str) -> int:
    parts = 2 * world if layout == "zigzag" else world
    if total % parts:
        raise ValueError(
            f"sequence length {total} is not divisible by {parts} ({'2*world' if layout == 'zigzag' else 'world'} "
            f"for layout {layout!r}, world {world}); pad it, or use the varlen API for arbitrary lengths"
        )
    return total // world


def shard(x: torch.Tensor, *, group=None, layout: str = "contiguous", dim: int = 1,
          ulysses_group=None) -> torch.Tensor:
    """This rank's part of the full tensor ``x`` (same on every rank) along ``dim``.

    (batch, S, ...) -> (batch, S / world, ...) for dim=1. With a ``ulysses_group`` of U ranks,
    this rank's ring shard (S / world tokens, in layout order) is split contiguously into U parts
    and the part of this rank's Ulysses rank is returned. Differentiable (a local gather).
    """
    _check_layout(layout)
    rank, world, u_rank, u_world = _grid(group, ulysses_group, "shard")
    local_len = _local_len(x.shape[dim], world * u_world, layout) * u_world
    if layout in ("contiguous", "packed"):
        ring_shard = x.narrow(dim, rank * local_len, local_len)
    else:
        ring_shard = x.index_select(dim, positions(layout, rank, world, local_len).to(x.device))
    return ring_shard.narrow(dim, u_rank * (local_len // u_world), local_len // u_world)


def _ulysses(ulysses_group):
    """(group, rank, size) of a ulysses_group; (None, 0, 1) without one."""
    return _group.resolve(ulysses_group) if ulysses_group is not None else (None, 0, 1)


def _grid(group, ulysses_group, what: str):
    """(rank, world, Ulysses rank, U) of shard and shard_varlen; ValueError when the groups'
    ranks show they cannot form a U x R grid (a local split: no peer waits)."""
    group, rank, world = _group.resolve(group)
    u_group, u_rank, u_world = _ulysses(ulysses_group)
    error = _group.grid_error(group, u_group)
    if error:
        raise ValueError(f"{what}: {error}")
    return rank, world, u_rank, u_world


def _gather_ulysses(x_local, ulysses_group, dim, what, local_error="", settings=""):
    """(the ring shard, ""): every Ulysses rank's part concatenated along dim, differentiably; or
    (x_local, the message every rank of ulysses_group raises) when a rank's input is invalid."""
    group, rank, world = _ulysses(ulysses_group)
    if world == 1:
        return x_local, ""
    verdict = _shard_verdict(x_local, group, what, None, local_error, settings)
    if verdict:
        return x_local, verdict
    order = torch.arange(world * x_local.shape[dim])
    return _GatherInOrder.apply(x_local, group, rank, world, dim, order), ""


def _grid_settings(settings: str, rank: int, world: int, ulysses_group):
    """(settings as the ranks of ulysses_group compare them, as the ranks of group compare them):
    with a ulysses_group of more than one rank, each rank's place in the other group is added, so
    that groups which do not form a U x R grid (every rank of a ulysses_group at the same rank of
    its group, every rank of a group at the same rank of its ulysses_group) disagree."""
    _, u_rank, u_world = _ulysses(ulysses_group)
    if u_world == 1:
        return settings, settings
    return (f"{settings}, rank {rank} of {world} in group",
            f"{settings}, rank {u_rank} of {u_world} in ulysses_group")


def _in_ulysses_group(verdict: str, what: str) -> str:
    """A verdict of a ulysses_group as one rank's problem in the agreement over the ring group."""
    return "in its ulysses_group, " + verdict.removeprefix(f"{what}: ").replace("\n  ", " ")


def _inverse_order(layout: str, world: int, local_len: int) -> torch.Tensor:
    """Index that turns the rank-order concatenation of shards into global order."""
    gathered = torch.cat([positions(layout, r, world, local_len) for r in range(world)])
    inverse = torch.empty_like(gathered)
    inverse[gathered] = torch.arange(gathered.numel())
    return inverse


# Device types and dtypes in a shard's descriptor (by index), so that every rank can name every
# rank's device and dtype.
_DEVICE_TYPES = ("cpu", "cuda", "xpu", "mps", "hpu", "meta")
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex64,
           torch.complex128, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
           torch.bool)
# Bytes of each text (a rank's own error, its settings) in the descriptor, 8 to an int64; longer
# ones are cut.
_TEXT_BYTES = 512
# Dimensions of a shard's shape in the descriptor (every one compared across ranks); a shard of
# more is a local error. The descriptor (device, dtype, dims, sizes, two texts) must stay within
# the agreement's 188 words (bindings/agreement.h).
_MAX_DIMS = 32
# Words before the texts: device type, dtype, number of dims and _MAX_DIMS sizes.
_HEAD_WORDS = 3 + _MAX_DIMS


def _encode(text: str) -> list:
    data = text.encode()[:_TEXT_BYTES]
    padded = data.ljust(_TEXT_BYTES, b"\0")
    return [len(data), *(int.from_bytes(padded[i:i + 8], "little", signed=True)
                         for i in range(0, _TEXT_BYTES, 8))]


def _decode(values: list) -> str:
    data = b"".join(word.to_bytes(8, "little", signed=True)
                    for word in values[1:1 + _TEXT_BYTES // 8])
    return data[:values[0]].decode(errors="replace")


@torch.compiler.disable(reason="ring_attention agrees on the shards with its peers on the host")
def _shard_verdict(x, group, what: str, shard_error=None, local_error: str = "",
                   settings: str = "") -> str:
    """The ValueError message that every rank of ``group`` computes alike ("" when all is well).

    Every rank sends its shard's device, dtype and shape, ``local_error`` (what this rank found
    wrong with its own arguments, "" if nothing; x may then be anything) and ``settings`` (text
    that must be the same on every rank). A verdict names every rank's local error; else ranks
    whose settings differ; else each rank whose shard ``shard_error(rank, shape)`` (evaluated by
    every rank for every rank) rejects, or whose device the group's backend cannot carry; else
    shards of different shapes or dtypes.

    One small all-gather on the device the group's backends accept (the CPU for gloo, the GPU for
    an NCCL-only group), before any data is sent. torch.compile runs it eagerly, between graphs;
    under fullgraph=True it raises, naming this function and why it is skipped."""
    from ._ops import ops

    name = _group.group_name(group)
    is_tensor = isinstance(x, torch.Tensor)
    device = x.device if is_tensor else torch.device("cpu")
    if is_tensor:
        device_type = _DEVICE_TYPES.index(device.type) if device.type in _DEVICE_TYPES else -1
        dtype = _DTYPES.index(x.dtype) if x.dtype in _DTYPES else -1
        shape = [x.dim(), *x.shape, *([-1] * (_MAX_DIMS - x.dim()))][:_MAX_DIMS + 1]
        if x.dim() > _MAX_DIMS:
            local_error = local_error or (f"x_local has {x.dim()} dimensions; at most {_MAX_DIMS} "
                                          "are supported")
    else:
        device_type, dtype, shape = -1, -1, [0] + [-1] * _MAX_DIMS
    ranks = _group.gather_agreement(
        [device_type, dtype, *shape, *_encode(local_error), *_encode(settings)], group, device,
        what, what)
    errors = [_decode(r[_HEAD_WORDS:]) for r in ranks]
    header = f"{what}: invalid input (every rank raises this):\n  "
    if any(errors):
        return header + "\n  ".join(f"rank {r}: {e}" for r, e in enumerate(errors) if e)
    rank_settings = [_decode(r[_HEAD_WORDS + 1 + _TEXT_BYTES // 8:]) for r in ranks]
    if len(set(rank_settings)) > 1:
        listing = ", ".join(f"rank {r}: {s}" for r, s in enumerate(rank_settings))
        return f"{what}: ranks disagree on the arguments ({listing})"
    shapes, dtypes, problems = [], [], []
    for rank, (rank_device, rank_dtype, dims, *sizes) in enumerate(r[:_HEAD_WORDS] for r in ranks):
        shape = tuple(sizes[:dims])
        shapes.append(shape)
        dtypes.append(str(_DTYPES[rank_dtype]) if rank_dtype >= 0 else "a dtype the library does not list")
        device = _DEVICE_TYPES[rank_device] if rank_device >= 0 else None
        error = shard_error(rank, shape) if shard_error else ""
        if not error:
            error = ops.group_device_error(name, device, False) if device else \
                "its device type is not one the library knows"
            error = f"x_local is on {device}, but {error}" if error else ""
        if error:
            problems.append(f"rank {rank}: {error}")
    if problems:
        return header + "\n  ".join(problems)
    if len(set(shapes)) > 1:
        listing = ", ".join(f"rank {r}: {s}" for r, s in enumerate(shapes))
        return f"{what}: ranks hold shards of different shapes ({listing})"
    if len(set(dtypes)) > 1:
        listing = ", ".join(f"rank {r}: {d}" for r, d in enumerate(dtypes))
        return f"{what}: ranks hold shards of different dtypes ({listing})"
    return ""


def _agree_on_shards(x, group, what: str, shard_error=None, local_error: str = "",
                     settings: str = "") -> None:
    """Raises the same ValueError on every rank of ``group`` unless ``_shard_verdict`` finds
    every rank's input valid, the same settings everywhere and shards of one shape and dtype."""
    verdict = _shard_verdict(x, group, what, shard_error, local_error, settings)
    if verdict:
        raise ValueError(verdict)


def _check_before_gather(x_local, group, world: int, what: str, shard_error, local_error: str,
                         ulysses_verdict: str, settings: str) -> None:
    """The checks of unshard and unshard_varlen before they gather: at world size 1 here, else
    through _agree_on_shards, with a verdict of the ulysses_group passed on as this rank's error."""
    if world > 1:
        _agree_on_shards(x_local, group, what, shard_error,
                         _in_ulysses_group(ulysses_verdict, what) if ulysses_verdict else local_error,
                         settings)
        return
    if ulysses_verdict:
        raise ValueError(ulysses_verdict)
    error = local_error or shard_error(0, x_local.shape)
    if error:
        raise ValueError(f"{what}: {error}")


# Collectives of unshard whose wait gave up, as (a weak reference to the group, the work), kept
# alive with their buffers while their group lives: the backend may still write into them. A later
# timeout, and the interpreter's exit, drop those that completed or whose group is gone (as
# csrc/comm/c10d_transport.h abandon and release_abandoned_works do for the ring's).
_ABANDONED = []


def _release_finished() -> None:
    """Drops the abandoned works that completed or whose group is gone."""
    _ABANDONED[:] = [(ref, w) for ref, w in _ABANDONED if ref() is not None and not _completed(w)]


def _abandon(work, group) -> None:
    """Keeps `work` of `group` alive; drops the abandoned works that may go."""
    _release_finished()
    _ABANDONED.append((weakref.ref(group), work))


atexit.register(_release_finished)


def _completed(work) -> bool:
    """Whether `work` completed; False where the backend cannot tell (it raises), so that the
    timeout's own error is the one raised and the work is kept."""
    try:
        return work.is_completed()
    except RuntimeError:
        return False


@torch.compiler.disable(reason="ring_attention keeps the deadline of unshard's collectives on the host")
def _wait(work, group, rank: int, doing: str, what: str) -> None:
    """Waits for the collective `work` of the function `what` (unshard, ...) until
    RING_ATTN_TIMEOUT, as the ring's waits do; then raises RuntimeError saying what this rank was
    `doing`."""
    from ._ops import ops

    timeout = ops.ring_timeout_seconds()
    if timeout <= 0:
        work.wait()
        return
    start = time.monotonic()
    try:
        if work.wait(timedelta(seconds=min(timeout, 1e9))):
            return
    except RuntimeError:
        if time.monotonic() - start < 0.99 * timeout:  # a backend failure, not the deadline
            raise
    _abandon(work, group)
    raise RuntimeError(f"{what}: rank {rank} timed out after {timeout:g} s (RING_ATTN_TIMEOUT) "
                       f"{doing}: some rank did not take part. The process group may be unusable "
                       "after this error, as after any collective timeout.")


class _GatherInOrder(torch.autograd.Function):
    """All-gathers equal shards along `dim` and picks `order` (indices into the rank-order
    concatenation). Backward: the adjoint of an all-gather (gradients summed over ranks), scattered
    back through `order` (injective), then this rank's part."""

    @staticmethod
    def forward(ctx, x_local, group, rank, world, dim, order):
        ctx.meta = (group, rank, world, dim, x_local.shape[dim], order)
        parts = [torch.empty_like(x_local, memory_format=torch.contiguous_format) for _ in range(world)]
        _wait(dist.all_gather(parts, x_local.contiguous(), group=group, async_op=True), group, rank,
              "gathering the shards", "unshard")
        return torch.cat(parts, dim=dim).index_select(dim, order.to(x_local.device))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        group, rank, world, dim, local_len, order = ctx.meta
        grad_out = grad_out.contiguous()
        _wait(dist.all_reduce(grad_out, group=group, async_op=True), group, rank,
              "summing the gradients in the backward", "unshard")
        shape = list(grad_out.shape)
        shape[dim] = world * local_len
        grad_cat = grad_out.new_zeros(shape).index_copy(dim, order.to(grad_out.device), grad_out)
        return grad_cat.narrow(dim, rank * local_len, local_len), None, None, None, None, None


def _layout_error(layout) -> str:
    """Why layout is not a layout ("" if it is)."""
    try:
        _check_layout(layout)
    except ValueError as error:
        return str(error)
    return ""


def _x_local_error(x_local, dim) -> str:
    """Why x_local is not a tensor with a dimension dim ("" if it is)."""
    if not isinstance(x_local, torch.Tensor):
        return f"x_local must be a tensor, got {type(x_local).__name__}"
    dims = x_local.dim()
    if isinstance(dim, bool) or not isinstance(dim, int) or not -dims <= dim < dims:
        return f"dim must be an int in [-{dims}, {dims}) for a {dims}-D x_local, got {dim!r}"
    return ""


def unshard(x_local: torch.Tensor, *, group=None, layout: str = "contiguous", dim: int = 1,
            ulysses_group=None) -> torch.Tensor:
    """Gathers every rank's shard and restores global order along ``dim``: the inverse of ``shard``
    (with the same ``ulysses_group``).

    Differentiable; the gradient is the sum over ranks of the gradients of the full tensor.
    Invalid arguments on any rank, or ranks whose layout, dim, shard shape or dtype differ, raise
    ValueError on every rank before any data is sent.
    """
    group, rank, world = _group.resolve(group)
    local_error = _layout_error(layout) or _x_local_error(x_local, dim)
    dim = 0 if local_error else dim % x_local.dim()
    ulysses_settings, settings = _grid_settings(f"layout {layout!r}, dim {dim}", rank, world,
                                                ulysses_group)
    x_local, verdict = _gather_ulysses(x_local, ulysses_group, dim, "unshard", local_error,
                                       ulysses_settings)

    def odd_zigzag(_rank, shape):
        if layout == "zigzag" and shape[dim] % 2:
            return f"layout 'zigzag' needs an even local length, got {shape[dim]}"
        return ""

    _check_before_gather(x_local, group, world, "unshard", odd_zigzag, local_error, verdict,
                         settings)
    if world == 1:
        return x_local
    order = _inverse_order(layout, world, x_local.shape[dim])
    return _GatherInOrder.apply(x_local, group, rank, world, dim, order)


# ---- packed variable-length sequences -------------------------------------------------------

def _check_cu_seqlens(cu_seqlens: torch.Tensor) -> list:
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 \
            or cu_seqlens.numel() < 2:
        raise ValueError("cu_seqlens must be a 1-D int32 tensor of num_seqs + 1 >= 2 boundaries")
    cu = cu_seqlens.tolist()
    if cu[0] != 0 or any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError(f"cu_seqlens must start at 0 and be non-decreasing, got {cu}")
    return cu


def varlen_positions(cu_seqlens: torch.Tensor, layout: str, rank: int, world: int):
    """This rank's tokens of a packed batch split by ``shard_varlen``.

    Each sequence is padded to a multiple of world (2 * world for zigzag) and split by the layout
    on its own; the packed layout instead splits the whole packed stream into world contiguous
    parts, padded at its end. Returns (positions, source): int64 (tokens_local,) positions in the
    padded packed stream, and the index of each token in the unpadded packed tensor (-1 for a pad
    token).
    """
    _check_layout(layout)
    _check_rank(rank, world)
    cu = _check_cu_seqlens(cu_seqlens)
    if layout == "packed":
        local_len = -(-cu[-1] // world)
        pos = rank * local_len + torch.arange(local_len)
        return pos, torch.where(pos < cu[-1], pos, torch.full_like(pos, -1))
    parts = 2 * world if layout == "zigzag" else world
    pos, src, start = [], [], 0
    for begin, end in zip(cu, cu[1:]):
        length = end - begin
        padded = -(-length // parts) * parts
        offsets = positions(layout, rank, world, padded // world)
        pos.append(start + offsets)
        src.append(torch.where(offsets < length, begin + offsets, torch.full_like(offsets, -1)))
        start += padded
    empty = torch.zeros(0, dtype=torch.int64)
    return torch.cat(pos) if pos else empty, torch.cat(src) if src else empty


def _ring_tokens(cu_seqlens, layout, ring_world):
    """Tokens of one rank's ring shard of a packed batch (shard_varlen over ring_world ranks)."""
    return varlen_positions(cu_seqlens, layout, 0, ring_world)[0].numel()


def shard_varlen(x: torch.Tensor, cu_seqlens: torch.Tensor, *, group=None, layout: str = "contiguous",
                 dim: int = 0, ulysses_group=None) -> torch.Tensor:
    """This rank's part of the packed tensor ``x`` (tokens along ``dim``, cu_seqlens[-1] of them).

    Every sequence is split by the layout on its own (zigzag per sequence balances causal work);
    sequences whose length does not divide are padded with zeros inside the library, so every rank
    gets the same number of tokens. The packed layout splits the packed stream as a whole into
    world equal contiguous parts (zeros at the end): short sequences stay on one rank and the ring
    makes only the steps the sequences crossing ranks need. With a ``ulysses_group`` of U ranks,
    this rank's ring shard is padded at its end to a multiple of U and split contiguously into U
    parts. Differentiable.
    """
    rank, world, u_rank, u_world = _grid(group, ulysses_group, "shard_varlen")
    ring_shard = _padded_source(x, cu_seqlens, layout, rank, world, dim)
    if u_world == 1:
        return ring_shard
    dim = dim % x.dim()
    part = -(-ring_shard.shape[dim] // u_world)
    pad_shape = list(ring_shard.shape)
    pad_shape[dim] = part * u_world - ring_shard.shape[dim]
    ring_shard = torch.cat([ring_shard, ring_shard.new_zeros(pad_shape)], dim=dim)
    return ring_shard.narrow(dim, u_rank * part, part)


def _padded_source(x, cu_seqlens, layout, rank, world, dim):
    """Rank's tokens of x: its part of every padded sequence, zeros for the pads."""
    cu = _check_cu_seqlens(cu_seqlens)
    if x.shape[dim] != cu[-1]:
        raise ValueError(f"shard_varlen: x has {x.shape[dim]} tokens along dim {dim}, cu_seqlens ends at {cu[-1]}")
    _, source = varlen_positions(cu_seqlens, layout, rank, world)
    pad_shape = list(x.shape)
    pad_shape[dim] = 1
    padded = torch.cat([x, x.new_zeros(pad_shape)], dim=dim)  # index x.shape[dim] is the pad
    source = torch.where(source < 0, torch.full_like(source, x.shape[dim]), source)
    return padded.index_select(dim, source.to(x.device))


def _varlen_order(cu_seqlens, layout, world):
    """Index of every real token of the packed batch in the rank-order concatenation of shards."""
    cu = _check_cu_seqlens(cu_seqlens)
    gathered_source = torch.cat([varlen_positions(cu_seqlens, layout, r, world)[1] for r in range(world)])
    order = torch.empty(cu[-1], dtype=torch.int64)
    real = gathered_source >= 0
    order[gathered_source[real]] = torch.arange(gathered_source.numel())[real]
    return order


def _describe_cu_seqlens(cu: list) -> str:
    """cu_seqlens as text short enough for the agreement: the list, or a digest of a long one."""
    text = str(cu)
    if len(text) <= 200:
        return text
    return f"sha256 {hashlib.sha256(text.encode()).hexdigest()[:16]} of {len(cu) - 1} sequences"


def unshard_varlen(x_local: torch.Tensor, cu_seqlens: torch.Tensor, *, group=None,
                   layout: str = "contiguous", dim: int = 0, ulysses_group=None) -> torch.Tensor:
    """The full packed tensor in the original order, pads removed: the inverse of shard_varlen
    (with the same ``ulysses_group``).

    Differentiable; the gradient is the sum over ranks of the gradients of the full tensor.
    Invalid arguments on any rank, or ranks whose layout, dim, cu_seqlens, shard shape or dtype
    differ, raise ValueError on every rank before any data is sent.
    """
    group, rank, world = _group.resolve(group)
    local_error = _x_local_error(x_local, dim)
    try:  # the same on every rank that agrees on cu_seqlens and layout
        cu = _check_cu_seqlens(cu_seqlens)
        expected = varlen_positions(cu_seqlens, layout, 0, world)[1].numel()
        order = _varlen_order(cu_seqlens, layout, world)
    except ValueError as error:
        local_error = local_error or str(error)
    dim = 0 if local_error else dim % x_local.dim()
    settings = "" if local_error else f"layout {layout!r}, dim {dim}, cu_seqlens {_describe_cu_seqlens(cu)}"
    ulysses_settings, settings = _grid_settings(settings, rank, world, ulysses_group)
    if ulysses_group is not None:  # the ring shard, without the pad that made it divide by U
        x_local, verdict = _gather_ulysses(x_local, ulysses_group, dim, "unshard_varlen",
                                           local_error, ulysses_settings)
        if not verdict:
            x_local = x_local.narrow(dim, 0, min(expected, x_local.shape[dim]))
    else:
        verdict = ""

    def wrong_length(_rank, shape):
        if shape[dim] != expected:
            return (f"x_local has {shape[dim]} tokens along dim {dim}, shard_varlen of these "
                    f"cu_seqlens gives {expected}")
        return ""

    _check_before_gather(x_local, group, world, "unshard_varlen", wrong_length, local_error,
                         verdict, settings)
    if world == 1:
        return x_local.index_select(dim, order.to(x_local.device))
    return _GatherInOrder.apply(x_local, group, rank, world, dim, order)
