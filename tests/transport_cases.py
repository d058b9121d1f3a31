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
    """with_transport of the ring; `value` a list: this rank's entry of it."""
    if isinstance(value, list):
        value = value[rank_and_world()[0]]
    return with_transport(value, ring_outputs)


def transport_check_ring(value):
    return with_transport(value, check_ring, SMALL_CASE)


def group_still_usable():
    """A collective after the rejected calls: the group was not left mid-exchange."""
    t = torch.ones(1)
    torch.distributed.all_reduce(t)
    return float(t)


class BatchRecordingBackend(torch._C._distributed_c10d.Backend):
    """A CPU backend that coalesces point-to-point messages into batches, as NCCL does (which runs
    unbatched ones between two ranks in order on one stream, tags ignored). Messages travel over
    gloo; `posts` records each send and receive as (kind, peer, batch), batch the number of the
    coalesced batch it was posted in (None: unbatched)."""

    def __init__(self, store, rank, size, timeout):
        super().__init__(rank, size)
        self._gloo = torch.distributed.ProcessGroupGloo(
            torch.distributed.PrefixStore("gloo", store), rank, size, timeout)
        self._batch = None  # the open batch's works
        self._batches = 0
        self.posts = []

    @property
    def supports_coalescing(self):
        return True

    def getBackendName(self):
        return "batch_recording"

    def start_coalescing(self):
        assert self._batch is None, "batches do not nest"
        self._batch = []
        self._batches += 1

    def end_coalescing(self):
        works, self._batch = self._batch, None
        return _AllWorks(works)

    def _post(self, kind, peer, work):
        self.posts.append((kind, peer, None if self._batch is None else self._batches))
        if self._batch is not None:
            self._batch.append(work)
        return work

    def send(self, tensors, dst, tag):
        return self._post("send", dst, self._gloo.send(tensors, dst, tag))

    def recv(self, tensors, src, tag):
        return self._post("recv", src, self._gloo.recv(tensors, src, tag))

    def allgather(self, outputs, inputs, opts):
        return self._gloo.allgather(outputs, inputs, opts)

    def allreduce(self, tensors, opts):
        return self._gloo.allreduce(tensors, opts)


class _AllWorks(torch._C._distributed_c10d.Work):
    """A batch's work: done when each of its works is."""

    def __init__(self, works):
        super().__init__()
        self._works = works

    def wait(self, timeout=None):
        return all(w.wait() if timeout is None else w.wait(timeout) for w in self._works)


def batched_ring_posts():
    """SMALL_CASE's ring (forward and backward) over a group whose backend coalesces, and over the
    default gloo group: (whether both gave the same bits, every send and receive as
    (kind, peer, batch))."""
    import torch.distributed as dist
    if "batch_recording" not in dist.Backend.backend_list:
        dist.Backend.register_backend("batch_recording", BatchRecordingBackend, devices=["cpu"])
    group = dist.new_group(backend="batch_recording")
    try:
        rank, world = rank_and_world()
        seqlen = 8 * world
        q, k, v, dout = random_qkv(4321, 1, seqlen, seqlen, 4, 2, 16, torch.float32)
        local = [ra.shard(t) for t in (q, k, v, dout)]
        results = []
        for g in (group, None):
            inputs = [t.clone().requires_grad_() for t in local[:3]]
            out = ra.ring_attn_func(*inputs, causal=False, group=g)
            results.append([out.detach(), *torch.autograd.grad(out, inputs, local[3])])
        same = all(torch.equal(a, b) for a, b in zip(*results))
        return same, list(group._get_backend(torch.device("cpu")).posts)
    finally:
        dist.destroy_process_group(group)
