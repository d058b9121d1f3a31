"""A few optimizer steps of a tiny random Llama with context parallelism, on CPU.

    torchrun --nproc-per-node 2 examples/train_llama_cp.py

Every rank holds the same model and a zigzag shard of each sequence; attention runs over the whole
sequence through the ring; gradients are summed over the context-parallel ranks.
"""
import argparse

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from ring_attention.integrations import transformers as ra_hf


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    args = p.parse_args()

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    ra_hf.register(layout="zigzag")
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    torch.manual_seed(0)  # the same initial model on every rank
    model = LlamaForCausalLM(config)
    model.config._attn_implementation = ra_hf.ATTN_IMPLEMENTATION
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

    data = torch.Generator().manual_seed(1)  # the same batches on every rank
    for step in range(args.steps):
        input_ids = torch.randint(0, config.vocab_size, (args.batch, args.seqlen), generator=data)
        ids, pos, labels = ra_hf.shard_inputs(input_ids, labels=input_ids)
        logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        tokens = args.batch * (args.seqlen - 1)
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum") / tokens
        optimizer.zero_grad()
        loss.backward()
        for param in model.parameters():  # the full-sequence gradient is the sum over ranks
            dist.all_reduce(param.grad)
        optimizer.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        if rank == 0:
            print(f"step {step}: loss {total.item():.4f} ({world} context-parallel ranks, "
                  f"{args.seqlen} tokens, {ids.shape[1]} per rank)", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
