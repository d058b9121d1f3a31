"""What the torchrun examples share: one process per GPU over NCCL (the CPU over gloo without
GPUs), and the check of a result against PyTorch's own attention."""
import argparse
import os

import torch
import torch.distributed as dist


def add_attention_args(parser: argparse.ArgumentParser) -> None:
    """--heads, --kv-heads, --headdim and --check (on by default up to 16K tokens)."""
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4, help="GQA: K/V heads (divide --heads)")
    parser.add_argument("--headdim", type=int, default=128)
    parser.add_argument("--check", action=argparse.BooleanOptionalAction, default=None,
                        help="compare with SDPA on rank 0 (default: on up to 16K tokens)")


def init_ranks() -> torch.device:
    """Joins the process group torchrun describes: NCCL with this rank's GPU
    (torch.cuda.set_device(LOCAL_RANK)), or gloo on the CPU where there is no GPU. Returns the
    device the rank computes on."""
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
        return torch.device("cuda", local_rank)
    dist.init_process_group("gloo")
    return torch.device("cpu")


def check_close(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    """Prints |got - want| beside a bound of a few bf16 roundings of `want` (computed in float32);
    exits with an error above it."""
    err = (got.float() - want).abs().max().item()
    bound = 0.01 * max(1.0, want.abs().max().item())
    print(f"  {name}: max |ours - sdpa| = {err:.3g} (bound {bound:.3g})", flush=True)
    if not err <= bound:
        raise SystemExit(f"{name} differs from SDPA: {err:.3g} > {bound:.3g}")
