"""Backward functions that refuse double backward loudly."""
import functools

import torch

_DOUBLE_BACKWARD = (b"ring attention: double backward (differentiating a gradient of ring attention, "
                    b"e.g. after torch.autograd.grad(..., create_graph=True)) is not supported")


def once_differentiable(backward):
    """Like torch.autograd.function.once_differentiable, but the node that raises on double
    backward also hangs off the tensors saved by the forward, so differentiating a gradient with
    respect to q, k or v raises RuntimeError instead of finding no path (a zero or None).

    The saved tensors are unpacked once, as activation checkpointing requires, into
    ``ctx.saved`` for ``backward`` to read (instead of ``ctx.saved_tensors``)."""

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        saved = ctx.saved = ctx.saved_tensors
        try:
            with torch.no_grad():
                outputs = backward(ctx, *grads)
        finally:
            ctx.saved = None  # no reference from the node to its own tensors after the backward
        if not torch.is_grad_enabled():
            return outputs
        sources = [t for t in (*grads, *saved)
                   if isinstance(t, torch.Tensor) and t.requires_grad]
        if not sources:
            return outputs
        defined = [o.detach() for o in outputs if o is not None]
        error = torch._C._functions.DelayedError(_DOUBLE_BACKWARD, len(defined) + len(sources))
        wrapped = iter(error(*defined, *sources))
        return tuple(next(wrapped) if o is not None else None for o in outputs)

    return wrapper
