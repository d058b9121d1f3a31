"""Causal ring attention across GPUs: one process per GPU, NCCL, bfloat16, zigzag layout.

    torchrun --nproc-per-node 8 examples/ring_attn_gpu.py --seqlen 131072

Every rank draws the same full q, k, v (a fixed seed), keeps its zigzag shard, runs the forward
and backward through the ring, and reports its time. With --check (on by default up to 16K
tokens) rank 0 gathers the output and the gradients and compares them with torch's own
scaled_dot_product_attention of the whole sequence, computed in float32 from the same bf16 inputs.
On a machine without GPUs the same script runs on the CPU over gloo.
"""
import argparse
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import ring_attention as ra
from launch import add_attention_args, check_close, init_ranks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqlen", type=int, default=8192, help="global tokens (divisible by 2 x ranks)")
    add_attention_args(p)
    args = p.parse_args()
    check = args.seqlen <= 16384 if args.check is None else args.check

    device = init_ranks()
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.seqlen % (2 * world) or args.heads % args.kv_heads:  # the same on every rank
        p.error(f"--seqlen ({args.seqlen}) must divide by 2 x ranks ({2 * world}) and --heads "
                f"({args.heads}) by --kv-heads ({args.kv_heads})")

    gen = torch.Generator().manual_seed(0)
    shape = lambda heads: (1, args.seqlen, heads, args.headdim)  # noqa: E731
    q, k, v, dout = (torch.randn(shape(h), generator=gen).to(device, torch.bfloat16)
                     for h in (args.heads, args.kv_heads, args.kv_heads, args.heads))
    q_local, k_local, v_local = (ra.shard(t, layout="zigzag").requires_grad_() for t in (q, k, v))
    dout_local = ra.shard(dout, layout="zigzag")

    def step():
        out = ra.ring_attn_func(q_local, k_local, v_local, causal=True, layout="zigzag")
        out.backward(dout_local)
        return out

    step()  # warm-up: first-call set-up (communicators, position tables)
    for t in (q_local, k_local, v_local):
        t.grad = None
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    print(f"rank {rank}/{world} on {device}: {args.seqlen} tokens, forward + backward "
          f"{1e3 * elapsed:.1f} ms", flush=True)

    if check:
        gathered = [ra.unshard(t, layout="zigzag") for t in
                    (out.detach(), q_local.grad, k_local.grad, v_local.grad)]
        if rank == 0:
            leaves = [t.float().requires_grad_() for t in (q, k, v)]
            want = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in leaves),
                                                  is_causal=True, enable_gqa=True).transpose(1, 2)
            want_grads = torch.autograd.grad(want, leaves, dout.float())
            for name, got, ref in zip(("out", "dq", "dk", "dv"), gathered, (want, *want_grads)):
                check_close(name, got, ref)
            print("check against SDPA: ok", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
