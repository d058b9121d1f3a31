"""Serving with a KV cache spread over the ranks: a ring prefill, then token-by-token decoding.

    torchrun --nproc-per-node 8 examples/serve_decode.py --prompt 131072 --new-tokens 32

Every rank draws the same q, k, v for the prompt and the new tokens (a fixed seed; a model would
project them from its hidden states). The prefill runs causal ring attention over zigzag shards of
the prompt, and each rank keeps its shard's K/V as its part of the cache, with their global
positions. Each decoding step gives every rank the new token's q, k, v: one rank (in turn) appends
k, v to its cache, and decode_attn_func attends the token to the whole cache spread over the ranks.
Rank 0 reports the time per token and, with --check (on by default up to 16K tokens), compares the
prefill's and every step's output with torch's scaled_dot_product_attention over the whole
sequence, computed in float32 from the same bf16 inputs. One process per GPU over NCCL; without
GPUs the same script runs on the CPU over gloo.
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
    p.add_argument("--prompt", type=int, default=8192, help="prompt tokens (divisible by 2 x ranks)")
    p.add_argument("--new-tokens", type=int, default=16, help="tokens decoded one at a time")
    add_attention_args(p)
    args = p.parse_args()
    total = args.prompt + args.new_tokens
    check = total <= 16384 if args.check is None else args.check

    device = init_ranks()
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.prompt % (2 * world) or args.heads % args.kv_heads or args.new_tokens < 1:
        p.error(f"--prompt ({args.prompt}) must divide by 2 x ranks ({2 * world}), --heads "
                f"({args.heads}) by --kv-heads ({args.kv_heads}), and --new-tokens must be >= 1")

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, total, h, args.headdim, generator=gen).to(device, torch.bfloat16)
               for h in (args.heads, args.kv_heads, args.kv_heads))
    prompt = slice(0, args.prompt)
    with torch.inference_mode():
        q_local, k_cache, v_cache = (ra.shard(t[:, prompt], layout="zigzag").contiguous()
                                     for t in (q, k, v))
        prefill = ra.ring_attn_func(q_local, k_cache, v_cache, causal=True, layout="zigzag")
        cache_positions = ra.positions("zigzag", rank, world, k_cache.shape[1]).to(device)

        steps, times = [], []
        for t in range(args.prompt, total):
            if rank == t % world:  # this rank keeps the new token's K/V
                k_cache = torch.cat([k_cache, k[:, t:t + 1]], dim=1)
                v_cache = torch.cat([v_cache, v[:, t:t + 1]], dim=1)
                cache_positions = torch.cat([cache_positions, torch.tensor([t], device=device)])
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = ra.decode_attn_func(q[:, t:t + 1], k_cache, v_cache,
                                      q_positions=torch.tensor([t], device=device),
                                      k_positions=cache_positions, causal=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            steps.append(out)
        prefill_full = ra.unshard(prefill, layout="zigzag") if check else None
    median_ms = 1e3 * sorted(times)[len(times) // 2]
    print(f"rank {rank}/{world} on {device}: prompt {args.prompt} tokens, {args.new_tokens} decoded, "
          f"{median_ms:.2f} ms per token (median)", flush=True)

    if check and rank == 0:
        want = F.scaled_dot_product_attention(*(t.float().transpose(1, 2) for t in (q, k, v)),
                                              is_causal=True, enable_gqa=True).transpose(1, 2)
        got = torch.cat([prefill_full, *steps], dim=1)
        for name, part in (("prefill", prompt), ("decoded", slice(args.prompt, total))):
            check_close(name, got[:, part], want[:, part])
        print("check against SDPA: ok", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
