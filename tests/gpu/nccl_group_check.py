"""Run by tests/gpu/test_nccl_group.py under torchrun --nproc-per-node 1: the library on a real
NCCL-only process group (init_process_group("nccl")) and on a mixed cpu:gloo,cuda:nccl group.
Exits non-zero (an assertion) on any failure."""
import itertools

import torch
import torch.distributed as dist
import torch.nn.functional as F

import ring_attention as ra
from ring_attention.layouts import _agree_on_shards


def check_group(group, expect_collective_device):
    name = group.group_name
    assert ra.ops.group_collective_device(name, "cpu") == expect_collective_device
    assert ra.ops.group_device_error(name, "cuda:0", True) == ""
    # the library's own small collective (unshard's shape check) on the device the group accepts
    _agree_on_shards(torch.zeros(1, 4, 2, 8, device="cuda"), group, "check")

    gen = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(1, 256, h, 64, generator=gen).to("cuda", torch.bfloat16)
                     for h in (4, 2, 2, 4))
    local = [ra.shard(t, group=group, layout="zigzag").requires_grad_() for t in (q, k, v)]
    out = ra.ring_attn_func(*local, causal=True, layout="zigzag", group=group)
    out.backward(ra.shard(dout, group=group, layout="zigzag"))
    full = ra.unshard(out, group=group, layout="zigzag")
    want = F.scaled_dot_product_attention(*(t.float().transpose(1, 2) for t in (q, k, v)),
                                          is_causal=True, enable_gqa=True).transpose(1, 2)
    assert (full.float() - want).abs().max().item() < 0.02
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in local)

    seqlens = (1, 7, 97, 40)
    cu = torch.tensor([0, *itertools.accumulate(seqlens)], dtype=torch.int32)
    packed = [torch.randn(sum(seqlens), h, 64, generator=gen).to("cuda", torch.bfloat16).requires_grad_()
              for h in (4, 2, 2)]
    shards = [ra.shard_varlen(t, cu, group=group) for t in packed]
    out = ra.ring_attn_varlen_func(*shards, cu, causal=True, group=group)
    full = ra.unshard_varlen(out, cu, group=group)
    full.float().square().sum().backward()
    start = 0
    for n in seqlens:  # each sequence alone
        part = [t.detach()[start:start + n].float().unsqueeze(0).transpose(1, 2) for t in packed]
        ref = F.scaled_dot_product_attention(*part, is_causal=True, enable_gqa=True)
        assert (full[start:start + n].float() - ref.transpose(1, 2)[0]).abs().max().item() < 0.02
        start += n
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in packed)


def main():
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", device_id=torch.device("cuda", 0))
    check_group(dist.group.WORLD, "cuda:0")
    check_group(dist.new_group(backend="cpu:gloo,cuda:nccl"), "cpu")
    dist.destroy_process_group()
    print("nccl group check: ok")


if __name__ == "__main__":
    main()
