"""Rank functions for tests/test_integrations.py (run by a RankPool, see dist_pool.py)."""
import torch
import torch.distributed as dist
import torch.nn.functional as F

import ring_attention as ra
from cases import assert_close, random_qkv, reference, seed_of, sequence_visible
from ring_cases import rank_and_world

FP32_TOL = dict(rtol=1e-4, atol=1e-5)


def tiny_llama(seed):
    """A 2-layer random Llama (hidden 64, 4 heads, 2 KV heads) in float32, built from a config."""
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).float()


def llama_matches_single_process(layout, seqlen, ulysses=1, kv_exchange="ring"):
    """The tiny Llama with attn_implementation="ring_attention" on sharded inputs against the same
    model on the whole sequence in this process: unsharded logits, summed loss, summed gradients.
    ulysses > 1: over a ulysses x (world / ulysses) grid (ring_cases.grid_groups)."""
    from ring_attention.integrations import transformers as ra_hf
    from ring_cases import grid_groups
    rank, world = rank_and_world()
    group, ulysses_group = grid_groups(ulysses, world // ulysses) if ulysses > 1 else (None, None)
    grid = dict(group=group, layout=layout, ulysses_group=ulysses_group)
    ra_hf.register(kv_exchange=kv_exchange, **grid)
    reference_model = tiny_llama(0)
    reference_model.config._attn_implementation = "eager"
    ring_model = tiny_llama(0)
    ring_model.config._attn_implementation = ra_hf.ATTN_IMPLEMENTATION

    g = torch.Generator().manual_seed(seed_of("llama", world, layout))
    input_ids = torch.randint(0, 128, (2, seqlen), generator=g)
    logits_ref = reference_model(input_ids=input_ids, use_cache=False).logits
    loss_ref = F.cross_entropy(logits_ref[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten(), reduction="sum")
    loss_ref.backward()

    ids, pos, labels = ra_hf.shard_inputs(input_ids, labels=input_ids, **grid)
    logits = ring_model(input_ids=ids, position_ids=pos, use_cache=False).logits
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum", ignore_index=-100)
    loss.backward()

    torch.testing.assert_close(ra.unshard(logits.detach(), **grid), logits_ref.detach(), **FP32_TOL)
    total = loss.detach().clone()
    dist.all_reduce(total)
    torch.testing.assert_close(total, loss_ref.detach(), rtol=1e-5, atol=1e-4)
    for (name, p), p_ref in zip(ring_model.named_parameters(), reference_model.parameters()):
        grad = p.grad.clone()
        dist.all_reduce(grad)
        torch.testing.assert_close(grad, p_ref.grad, rtol=1e-3, atol=1e-5, msg=lambda m: f"{name}: {m}")
    return total.item()


class _AttentionBlock(torch.nn.Module):
    """A projection, ring attention and an output projection: what a compiled model contains."""

    def __init__(self, layout, varlen, kv_exchange="ring"):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(16, 16, dtype=torch.float64)
        self.layout, self.varlen, self.kv_exchange = layout, varlen, kv_exchange

    def forward(self, q, k, v, cu_seqlens=None):
        kw = dict(causal=True, layout=self.layout, kv_exchange=self.kv_exchange)
        if self.varlen:
            out = ra.ring_attn_varlen_func(self.proj(q), k, v, cu_seqlens, **kw)
        else:
            out = ra.ring_attn_func(self.proj(q), k, v, window_size=(9, 0), **kw)
        return self.proj(out).tanh()


def compiled_matches_eager(layout, varlen, kv_exchange="ring"):
    """torch.compile(fullgraph=True) of a module calling the ring equals eager, forward and backward."""
    rank, world = rank_and_world()
    torch._dynamo.reset()
    module = _AttentionBlock(layout, varlen, kv_exchange)
    if varlen:
        cu = torch.tensor([0, 5, 6, 19], dtype=torch.int32)
        g = torch.Generator().manual_seed(1)
        full = [torch.randn(19, 4, 16, generator=g, dtype=torch.float64) for _ in range(3)]
        inputs = [ra.shard_varlen(t, cu, layout=layout) for t in full] + [cu]
    else:
        q, k, v, _ = random_qkv(seed_of("compile", layout), 2, 8 * world, 8 * world, 4, 2, 16, torch.float64)
        inputs = [ra.shard(t, layout=layout).contiguous() for t in (q, k, v)]
    results = []
    for fn in (module, torch.compile(module, fullgraph=True)):
        leaves = [t.clone().requires_grad_() if t.is_floating_point() else t for t in inputs]
        out = fn(*leaves)
        out.sum().backward()
        results.append([out.detach()] + [t.grad for t in leaves if t.is_floating_point()])
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=1e-12, atol=1e-12)
    return True


def mesh_data_and_context_parallel():
    """4 ranks as a 2 x 2 DeviceMesh (dp, cp): each data-parallel replica runs the ring over its cp
    group on its own batch, and must match the float64 reference of that batch."""
    from torch.distributed.device_mesh import init_device_mesh
    rank, world = rank_and_world()
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "cp"))
    dp = mesh["dp"].get_local_rank()
    cp_group = mesh["cp"]
    q, k, v, dout = random_qkv(seed_of("mesh", dp), 1, 12, 12, 4, 2, 16, torch.float64)
    expected = reference(q, k, v, dout, sequence_visible(12, True))
    local = [ra.shard(t, group=cp_group, layout="zigzag").contiguous() for t in (q, k, v, dout)]
    for t in local[:3]:
        t.requires_grad_()
    out, lse = ra.ring_attn_func(*local[:3], causal=True, group=cp_group, layout="zigzag", return_lse=True)
    grads = torch.autograd.grad(out, local[:3], local[3])
    for name, got, want in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads), expected):
        dim = 2 if name == "lse" else 1
        assert_close(got, ra.shard(want, group=cp_group, layout="zigzag", dim=dim), name)
    return dp


def checkpointed_matches_plain():
    """Activation checkpointing recomputes the ring in backward: same outputs and gradients."""
    rank, world = rank_and_world()
    q, k, v, dout = random_qkv(seed_of("ckpt", world), 1, 6 * world, 6 * world, 4, 1, 16, torch.float64)
    local = [ra.shard(t, layout="striped").contiguous() for t in (q, k, v, dout)]

    def block(q, k, v):
        return ra.ring_attn_func(q, k, v, causal=True, layout="striped").sin()

    results = []
    for checkpointed in (False, True):
        leaves = [t.clone().requires_grad_() for t in local[:3]]
        out = (torch.utils.checkpoint.checkpoint(block, *leaves, use_reentrant=False)
               if checkpointed else block(*leaves))
        out.backward(local[3])
        results.append([out.detach()] + [t.grad for t in leaves])
    for plain, ckpt in zip(*results):
        assert torch.equal(plain, ckpt)
    return True
