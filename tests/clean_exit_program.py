"""A 2-rank program of many ring calls that ends normally, run by test_clean_exit.py under
torchrun: forward and backward in every layout, an agreement error (ranks disagree), calls after
it, and last a ring step that times out on rank 0 (rank 1 stays away), after which the group is
destroyed and both ranks exit. Every rank must exit with status 0, and no thread of the destroyed
group may still run once the library's exit handlers are done (rank 0's timed-out exchange kept its
gloo connection's thread)."""
import atexit
import os
import time

import torch
import torch.distributed as dist


def check_no_group_threads_at_exit():
    """Exit status 3 where a thread of a gloo group (its connections' loop, its workers) still
    runs. Registered before the library is imported, so it runs after the library's own exit
    handlers (atexit runs them last in, first out)."""
    tasks = "/proc/self/task"
    names = [open(f"{tasks}/{t}/comm").read().strip() for t in os.listdir(tasks)]
    left = [n for n in names if "gloo" in n]
    if left:
        print(f"rank {os.environ['RANK']}: threads of the destroyed group at exit: {left}", flush=True)
        os._exit(3)


atexit.register(check_no_group_threads_at_exit)

import ring_attention as ra  # noqa: E402  (after the check above: its exit handlers run first)


def main():
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    gen = torch.Generator().manual_seed(rank)

    def calls(n):
        for i in range(n):
            layout = ("contiguous", "zigzag", "striped")[i % 3]
            q, k, v = (torch.randn(1, 32, h, 16, generator=gen).requires_grad_() for h in (4, 2, 2))
            ra.ring_attn_func(q, k, v, causal=bool(i % 2), layout=layout).sum().backward()

    calls(12)
    x = torch.randn(1, 8 + 2 * rank, 2, 16)  # ranks disagree on the length
    try:
        ra.ring_attn_func(x, x, x)
        raise AssertionError("ranks that disagree were not rejected")
    except ValueError:
        pass
    calls(6)

    os.environ["RING_ATTN_TIMEOUT"] = "1"
    os.environ["RING_ATTN_CHECK"] = "0"
    if rank == 0:
        try:
            ra.ring_attn_func(*(torch.randn(1, 8, 2, 16) for _ in range(3)))
            raise AssertionError("the absent peer did not time out")
        except RuntimeError as e:
            assert "RING_ATTN_TIMEOUT" in str(e), e
    else:
        time.sleep(2.0)  # past rank 0's deadline, still connected
    dist.destroy_process_group()
    print(f"rank {rank}: done", flush=True)


if __name__ == "__main__":
    main()
