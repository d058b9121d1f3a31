#!/usr/bin/env python3
"""One launch of each CUDA block kernel for Nsight Compute (scripts/gpu_check.sh stage `ncu`):
bf16, d=128, 8K tokens, batch 2, 16 heads; block_fwd (non-causal, causal), block_bwd (atomic,
deterministic) and, as the yardstick, torch SDPA's flash forward and backward. Each is warmed up
first; only the launches between torch.cuda.profiler.start() and stop() are profiled, so run it as

    ncu --profile-from-start off --section SpeedOfLight ... python3 scripts/ncu_case.py
"""
import sys

import torch
import torch.nn.functional as F

import ring_attention as ra


def main():
    if not torch.cuda.is_available():
        print("ncu_case: no CUDA device")
        return 0
    b, s, h, d, dtype = 2, 8192, 16, 128, torch.bfloat16
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, dout = (torch.randn(b, s, h, d, device="cuda", dtype=dtype, generator=g)
                     for _ in range(4))
    pos = torch.arange(s, device="cuda", dtype=torch.int32)
    out, out_causal = (torch.zeros(b, s, h, d, device="cuda") for _ in range(2))
    lse, lse_causal = (torch.full((b, h, s), float("-inf"), device="cuda") for _ in range(2))
    dq, dk, dv = (torch.zeros(b, s, h, d, device="cuda") for _ in range(3))

    def mask(causal):
        return dict(q_pos=pos, k_pos=pos, q_seg=None, causal=causal, window_left=-1,
                    window_right=-1, softmax_scale=d ** -0.5)

    def fwd(causal):
        o, l = (out_causal, lse_causal) if causal else (out, lse)
        o.zero_()
        l.fill_(float("-inf"))
        ra.ops.block_fwd(q=q, k=k, v=v, out_acc=o, lse=l, **mask(causal))

    def bwd(deterministic):
        ra.ops.block_bwd(dout=dout, q=q, k=k, v=v, lse=lse, delta=delta, dq_acc=dq, dk_acc=dk,
                         dv_acc=dv, deterministic=deterministic, **mask(False))

    fwd(False)
    delta = (dout.float() * out).sum(-1).transpose(1, 2).contiguous()
    leaves = [t.transpose(1, 2).detach().clone().requires_grad_() for t in (q, k, v)]
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            ref = F.scaled_dot_product_attention(*leaves)
            torch.autograd.grad(ref, leaves, dout.transpose(1, 2))

    steps = [("block_fwd", lambda: fwd(False)), ("block_fwd causal", lambda: fwd(True)),
             ("block_bwd", lambda: bwd(False)), ("block_bwd deterministic", lambda: bwd(True)),
             ("sdpa flash fwd+bwd", sdpa)]
    for _, run in steps:  # warm-up: module loading, smem attributes, flash heuristics
        run()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for name, run in steps:
        torch.cuda.nvtx.range_push(name)
        run()
        torch.cuda.nvtx.range_pop()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    print("ncu_case: profiled", ", ".join(name for name, _ in steps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
