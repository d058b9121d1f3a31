"""Rank functions for the transport selection tests (RING_ATTN_TRANSPORT), run by dist_pool ranks
or in-process: every rank returns what it saw, so the tests can check that all ranks agree."""
import os

import torch

import ring_attention as ra
from cases import random_qkv
from ring_cases import SMALL_CASE, check_ring, rank_and_world


def with_transport(value, fn, *args):
    """fn(*args) with RING_ATTN_TRANSPORT=value (None: unset); returns ("ok", result) or
    (exception type name, message)."""
    old = os.environ.get("RING_ATTN_TRANSPORT")
    if value is None:
        os.environ.pop("RING_ATTN_TRANSPORT", None)
    else:
        os.environ["RING_ATTN_TRANSPORT"] = value
    try:
        return ("ok", fn(*args))
    except Exception as e:  # noqa: BLE001 - the test inspects it
        return (type(e).__name__, str(e))
    finally:
        if old is None:
            os.environ.pop("RING_ATTN_TRANSPORT", None)
        else:
            os.environ["RING_ATTN_TRANSPORT"] = old


def ring_outputs(backward=True):
    """This rank's out, lse (and dq, dk, dv) of a small causal ring on CPU tensors."""
    rank, world = rank_and_world()
    seqlen = 8 * world
    q, k, v, dout = random_qkv(1234, 1, seqlen, seqlen, 4, 2, 16, torch.float32)
    local = [ra.shard(t, layout="zigzag") for t in (q, k, v, dout)]
    for t in local[:3]:
        t.requires_grad_()
    out, lse = ra.ring_attn_func(*local[:3], causal=True, layout="zigzag", return_lse=True)
    results = [out.detach(), lse.detach()]
    if backward:
        results += list(torch.autograd.grad(out, local[:3], local[3]))
    return results


def transport_outcome(value):
    return with_transport(value, ring_outputs)


def transport_check_ring(value):
    return with_transport(value, check_ring, SMALL_CASE)


def group_still_usable():
    """A collective after the rejected calls: the group was not left mid-exchange."""
    t = torch.ones(1)
    torch.distributed.all_reduce(t)
    return float(t)
