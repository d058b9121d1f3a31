"""How a global sequence maps to ranks, and moving tensors between the two views.

Layouts of S = world * L tokens:
  contiguous: rank r holds [r*L, (r+1)*L)
  zigzag:     2*world chunks; rank r holds chunk r then chunk 2*world-1-r (balanced causal work)
  striped:    rank r holds r, r+world, r+2*world, ...
"""
import torch
import torch.distributed as dist

from . import _group

LAYOUTS = ("contiguous", "zigzag", "striped")


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r} (expected one of {', '.join(LAYOUTS)})")


def positions(layout: str, rank: int, world: int, local_len: int) -> torch.Tensor:
    """Global positions (int64, (local_len,)) of ``rank``'s tokens, in local order."""
    _check_layout(layout)
    i = torch.arange(local_len)
    if layout == "contiguous":
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


def shard(x: torch.Tensor, *, group=None, layout: str = "contiguous", dim: int = 1) -> torch.Tensor:
    """This rank's part of the full tensor ``x`` (same on every rank) along ``dim``.

    (batch, S, ...) -> (batch, S / world, ...) for dim=1. Differentiable (a local gather).
    """
    _check_layout(layout)
    _, rank, world = _group.resolve(group)
    local_len = _local_len(x.shape[dim], world, layout)
    if layout == "contiguous":
        return x.narrow(dim, rank * local_len, local_len)
    return x.index_select(dim, positions(layout, rank, world, local_len).to(x.device))


def _inverse_order(layout: str, world: int, local_len: int) -> torch.Tensor:
    """Index that turns the rank-order concatenation of shards into global order."""
    gathered = torch.cat([positions(layout, r, world, local_len) for r in range(world)])
    inverse = torch.empty_like(gathered)
    inverse[gathered] = torch.arange(gathered.numel())
    return inverse


def _check_same_shape(x: torch.Tensor, group, world: int) -> None:
    desc = torch.tensor([x.dim(), *x.shape, *([-1] * (8 - x.dim()))][:9], dtype=torch.int64)
    gathered = [torch.empty_like(desc) for _ in range(world)]
    dist.all_gather(gathered, desc, group=group)
    shapes = [tuple(g[1:1 + int(g[0])].tolist()) for g in gathered]
    if len(set(shapes)) > 1:
        listing = ", ".join(f"rank {r}: {s}" for r, s in enumerate(shapes))
        raise ValueError(f"unshard: ranks hold shards of different shapes ({listing})")


class _Unshard(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_local, group, rank, world, layout, dim):
        ctx.meta = (group, rank, world, layout, dim, x_local.shape[dim])
        parts = [torch.empty_like(x_local, memory_format=torch.contiguous_format) for _ in range(world)]
        dist.all_gather(parts, x_local.contiguous(), group=group)
        inverse = _inverse_order(layout, world, x_local.shape[dim]).to(x_local.device)
        return torch.cat(parts, dim=dim).index_select(dim, inverse)

    @staticmethod
    def backward(ctx, grad_full):
        # Adjoint of an all-gather: gradients from every rank are summed, then this rank's part.
        group, rank, world, layout, dim, local_len = ctx.meta
        grad_full = grad_full.contiguous()
        dist.all_reduce(grad_full, group=group)
        index = positions(layout, rank, world, local_len).to(grad_full.device)
        return grad_full.index_select(dim, index), None, None, None, None, None


def unshard(x_local: torch.Tensor, *, group=None, layout: str = "contiguous", dim: int = 1) -> torch.Tensor:
    """Gathers every rank's shard and restores global order along ``dim``: the inverse of ``shard``.

    Differentiable; the gradient is the sum over ranks of the gradients of the full tensor.
    """
    _check_layout(layout)
    group, rank, world = _group.resolve(group)
    if world == 1:
        if layout == "zigzag" and x_local.shape[dim] % 2:
            raise ValueError(f"layout 'zigzag' needs an even local length, got {x_local.shape[dim]}")
        return x_local
    _check_same_shape(x_local, group, world)
    if layout == "zigzag" and x_local.shape[dim] % 2:
        raise ValueError(f"layout 'zigzag' needs an even local length, got {x_local.shape[dim]}")
    return _Unshard.apply(x_local, group, rank, world, layout, dim % x_local.dim())
