#!/usr/bin/env python3
"""A small case for compute-sanitizer (memcheck, racecheck): the CUDA block kernels on tails,
partial/packed masks, GQA, both dtypes, head dims 64, 128 and 256 (and a padded 40), merged twice,
then the backward, with atomics and deterministic; on a compute capability 9.0 device the same
cases again with RING_ATTN_CUDA_KERNEL=sm90a (the Hopper kernels); then a LocalRing of 2 virtual
ranks, forward and backward. Run with PYTORCH_NO_CUDA_MEMORY_CACHING=1 so that every tensor is its
own allocation and out-of-bounds accesses are caught. Exit status 0 when it ran (the sanitizer
reports errors through its own exit code)."""
import os
import sys

import torch

import ring_attention as ra


def run_block_cases(label, device):
    """The block kernels' forward (two key halves merged) and backward (both modes) on each case."""
    cases = [(torch.bfloat16, 64, 70, 100, 4, 2, "causal"), (torch.float16, 128, 65, 33, 2, 1, "window"),
             (torch.bfloat16, 40, 33, 129, 2, 2, "packed"), (torch.bfloat16, 128, 130, 70, 2, 2, "none"),
             (torch.float16, 256, 97, 130, 2, 1, "causal")]
    for dtype, d, sq, sk, h, hk, kind in cases:
        q, dout = (torch.randn(2, sq, h, d, device=device, dtype=dtype) for _ in range(2))
        k, v = (torch.randn(2, sk, hk, d, device=device, dtype=dtype) for _ in range(2))
        q_pos = torch.arange(sq, device=device, dtype=torch.int32) + (sk - sq)
        k_pos = torch.arange(sk, device=device, dtype=torch.int32)
        q_seg = None
        if kind == "packed":
            q_seg = torch.stack([q_pos // 40 * 40, q_pos // 40 * 40 + 39], dim=1).int().contiguous()
            q_seg[-3:, 0], q_seg[-3:, 1] = 1, 0
        mask = dict(q_pos=q_pos, k_pos=k_pos, q_seg=q_seg, causal=kind != "none",
                    window_left=17 if kind == "window" else -1, window_right=-1, softmax_scale=d ** -0.5)
        out = torch.zeros(2, sq, h, d, device=device)
        lse = torch.full((2, h, sq), float("-inf"), device=device)
        for half in (slice(0, sk // 2), slice(sk // 2, sk)):
            ra.ops.block_fwd(q=q, k=k[:, half].contiguous(), v=v[:, half].contiguous(), out_acc=out,
                             lse=lse, **dict(mask, k_pos=k_pos[half].contiguous()))
        delta = (dout.float() * out).sum(-1).transpose(1, 2).contiguous()
        for deterministic in (False, True):  # atomics; the atomic-free dQ kernel
            dq, dk, dv = (torch.zeros_like(out), torch.zeros(k.shape, device=device),
                          torch.zeros(v.shape, device=device))
            ra.ops.block_bwd(dout=dout, q=q, k=k, v=v, lse=lse, delta=delta, dq_acc=dq, dk_acc=dk,
                             dv_acc=dv, deterministic=deterministic, **mask)
            if device == "cuda":
                torch.cuda.synchronize()
            assert torch.isfinite(out).all() and torch.isfinite(dq).all() and torch.isfinite(dk).all()
        print(f"ok {label} {dtype} d={d} sq={sq} sk={sk} {kind}")


def run_local_ring(device):
    """The ring on one device: LocalRing's side-stream copies between two virtual ranks, both
    passes."""
    from ring_attention.testing import LocalRing
    shard = dict(device=device, dtype=torch.bfloat16, requires_grad=True)
    qs, ks, vs = ([torch.randn(1, 48, 2, 64, **shard) for _ in range(2)] for _ in range(3))
    outs = LocalRing(2, device=device).ring_attn_func(qs, ks, vs, causal=True, layout="zigzag")
    torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    if device == "cuda":
        torch.cuda.synchronize()
    assert all(torch.isfinite(t.grad).all() for t in qs + ks + vs)
    print("ok LocalRing world 2 zigzag fwd+bwd")


def main(argv):
    """`--device cpu` runs the same calls on the CPU kernels (the script's own check)."""
    device = "cpu" if argv[1:] == ["--device", "cpu"] else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device")
        return 0
    torch.manual_seed(0)
    if device == "cpu":
        run_block_cases("cpu", device)
    else:
        chosen = os.environ.get("RING_ATTN_CUDA_KERNEL", "auto")
        kernels = ["sm80"] + (["sm90a"] if torch.cuda.get_device_capability() == (9, 0) else [])
        for kernel in kernels:
            os.environ["RING_ATTN_CUDA_KERNEL"] = kernel  # read at every call
            run_block_cases(kernel, device)
        os.environ["RING_ATTN_CUDA_KERNEL"] = chosen
    run_local_ring(device)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
