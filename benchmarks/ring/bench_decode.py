"""Decoding against a KV cache spread over the ranks: the time of one decode_attn_func call for one
query token over a cache of C tokens, on CPU ranks over gloo (1 thread per rank), each rank
holding C / world of the cache, with the ranks' agreement (RING_ATTN_CHECK=1, the default) and
without it; beside PyTorch's scaled_dot_product_attention over the whole cache in one process of
1 thread, and decode_attn_func at world size 1.

Every variant is timed side by side (interleaved, a barrier before each call); a call's time is
its slowest rank's. Every rank's output is checked against a float64 reference of the whole
cache.
"""
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from benchmarks import harness as h  # noqa: E402


def _rank(rank, world, cache_lens, heads, heads_kv, headdim, iters, warmup, dtype_name):
    import ring_attention as ra
    from ring_attention.reference import attention_reference
    dtype = getattr(torch, dtype_name)
    results = {}
    for cache in cache_lens:
        gen = torch.Generator().manual_seed(cache)
        q = torch.randn(1, 1, heads, headdim, generator=gen).to(dtype)
        k, v = (torch.randn(1, cache, heads_kv, headdim, generator=gen).to(dtype) for _ in range(2))
        mine = torch.arange(cache).tensor_split(world)[rank]
        k_local, v_local = k[:, mine].contiguous(), v[:, mine].contiguous()
        q_pos = torch.tensor([cache])

        def decode(check):
            def call():
                os.environ["RING_ATTN_CHECK"] = check
                with torch.no_grad():
                    return ra.decode_attn_func(q, k_local, v_local, q_positions=q_pos,
                                               k_positions=mine, causal=True)
            return call

        fns = {"checks on": decode("1"), "checks off": decode("0")}
        if world == 1:
            q_t, k_t, v_t = (t.transpose(1, 2) for t in (q, k, v))

            def sdpa():
                with torch.no_grad():
                    F.scaled_dot_product_attention(q_t, k_t, v_t, enable_gqa=True)
            fns["sdpa"] = sdpa
        times = h.median_times_interleaved(fns, iters, warmup, dist.barrier if world > 1 else None)
        out = decode("1")()
        ref, _ = attention_reference(q.double(), k.double(), v.double(), causal=True,
                                     q_positions=q_pos, k_positions=torch.arange(cache))
        results[cache] = {"times": times, "max_abs_err": (out.double() - ref).abs().max().item()}
    os.environ.pop("RING_ATTN_CHECK")
    return results


def main(argv=None) -> int:
    p = h.parser(__doc__, json_default="bench_out/decode.json", iters=20, warmup=2)
    p.add_argument("--world", type=h.positive_int, default=2, help="ranks holding the cache")
    p.add_argument("--cache-lens", type=h.positive_ints, default=[8192, 32768, 131072],
                   help="comma-separated cache lengths (tokens)")
    p.add_argument("--heads", type=h.positive_int, default=8)
    p.add_argument("--heads-kv", type=h.positive_int, default=2)
    p.add_argument("--headdim", type=h.positive_int, default=128)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    args = p.parse_args(argv)
    if args.heads % args.heads_kv:
        p.error(f"--heads {args.heads} is not a multiple of --heads-kv {args.heads_kv}")
    h.set_fp32_precision(args)
    shape = (args.cache_lens, args.heads, args.heads_kv, args.headdim, args.iters, args.warmup,
             args.dtype)
    single = h.run_ranks(1, _rank, *shape)[0]
    spread = h.run_ranks(args.world, _rank, *shape)
    bound = 1e-4 if args.dtype == "float32" else 2e-2
    err = max(r[c]["max_abs_err"] for r in [single, *spread] for c in args.cache_lens)
    if err > bound:
        raise SystemExit(f"decode output differs from the float64 reference by {err:.2e}")

    rows = []
    for cache in args.cache_lens:
        slowest = {name: max(r[cache]["times"][name] for r in spread) for name in ("checks on", "checks off")}
        one = single[cache]["times"]
        rows.append({
            "cache tokens": cache,
            "SDPA, 1 process ms": f"{one['sdpa'] * 1e3:.2f}",
            "ours, world 1 ms": f"{one['checks on'] * 1e3:.2f}",
            f"ours, world {args.world} ms": f"{slowest['checks on'] * 1e3:.2f}",
            f"world {args.world}, checks off ms": f"{slowest['checks off'] * 1e3:.2f}",
            f"SDPA / world {args.world}": f"{one['sdpa'] / slowest['checks on']:.2f}",
        })
    print(f"\nOne query token against a cache spread over {args.world} gloo ranks, {args.heads} "
          f"heads ({args.heads_kv} K/V), dim {args.headdim}, {args.dtype}, causal, 1 thread per "
          f"rank (slowest rank, median of {args.iters}, interleaved)")
    h.print_table(rows, list(rows[0].keys()))
    print(f"max |err| vs float64 {err:.1e}")
    h.write_json(args.json, {"machine": h.machine(), "args": vars(args), "rows": rows,
                             "max_abs_err": err})
    return 0


if __name__ == "__main__":
    sys.exit(main())
