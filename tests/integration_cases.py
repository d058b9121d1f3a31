"""Rank functions for tests/test_integrations.py (run by a RankPool, see dist_pool.py)."""
import itertools

import torch
import torch.distributed as dist
import torch.nn.functional as F

import ring_attention as ra
from cases import assert_close, random_qkv, reference, seed_of, sequence_visible
from ring_cases import rank_and_world

FP32_TOL = dict(rtol=1e-4, atol=1e-5)


TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512)


def tiny_model(family, seed, chunk=4):
    """A small random float32 causal LM of a transformers family built from a config. Windowed
    families: "mistral" (every layer sliding, window 5), "qwen3" and "gemma3" (layer_types mixing
    sliding layers, window 3 or 6, with full ones), "exaone4" (a sliding layer, window 3, and a
    full one whose module keeps the config's window), "gpt_oss" (attention sinks, a sliding layer,
    window 8, and a full one). Families whose attention the ring does not compute: "llama4" (a
    chunked layer, chunks of 4 tokens unless ``chunk``), "gemma2" (logit soft-capping)."""
    import transformers as tf
    if family == "llama":
        model_class, config = tf.LlamaForCausalLM, tf.LlamaConfig(**TINY)
    elif family == "mistral":
        model_class, config = tf.MistralForCausalLM, tf.MistralConfig(**TINY, sliding_window=5)
    elif family == "qwen3":
        model_class, config = tf.Qwen3ForCausalLM, tf.Qwen3Config(
            **{**TINY, "num_hidden_layers": 3}, use_sliding_window=True, sliding_window=3,
            max_window_layers=0, layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    elif family == "gemma3":
        model_class, config = tf.Gemma3ForCausalLM, tf.Gemma3TextConfig(
            **{**TINY, "num_hidden_layers": 3}, sliding_window=6, query_pre_attn_scalar=16,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"])
    elif family == "exaone4":
        model_class, config = tf.Exaone4ForCausalLM, tf.Exaone4Config(
            **TINY, sliding_window=3, layer_types=["sliding_attention", "full_attention"])
    elif family == "llama4":
        model_class, config = tf.Llama4ForCausalLM, tf.Llama4TextConfig(
            **TINY, intermediate_size_mlp=128, attention_chunk_size=chunk, num_local_experts=2,
            no_rope_layers=[1, 0], layer_types=["chunked_attention", "full_attention"])
    elif family == "gemma2":
        model_class, config = tf.Gemma2ForCausalLM, tf.Gemma2Config(
            **TINY, sliding_window=8, query_pre_attn_scalar=16, attn_logit_softcapping=1.0)
    elif family == "gpt_oss":
        model_class, config = tf.GptOssForCausalLM, tf.GptOssConfig(
            **TINY, sliding_window=8, num_local_experts=2, num_experts_per_tok=1,
            layer_types=["sliding_attention", "full_attention"])
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    return model_class(config).float()


def _model_pair(family, implementation):
    """The same random model twice: eager attention, and ``implementation``."""
    reference_model = tiny_model(family, 0)
    reference_model.config._attn_implementation = "eager"
    ring_model = tiny_model(family, 0)
    ring_model.config._attn_implementation = implementation
    return reference_model, ring_model


def _assert_grads_summed_over_ranks(ring_model, reference_model):
    for (name, p), p_ref in zip(ring_model.named_parameters(), reference_model.parameters()):
        grad = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        dist.all_reduce(grad)
        torch.testing.assert_close(grad, p_ref.grad, rtol=1e-3, atol=1e-5, msg=lambda m: f"{name}: {m}")


def model_matches_single_process(family, layout, seqlen, ulysses=1, kv_exchange="ring",
                                 compiled=False):
    """A tiny model of ``family`` with attn_implementation="ring_attention" on sharded inputs
    against the same model with eager attention on the whole sequence in this process: unsharded
    logits, summed loss, summed gradients. ulysses > 1: over a ulysses x (world / ulysses) grid
    (ring_cases.grid_groups). compiled: the ring model through torch.compile, whose graphs break
    around the integration's checks. Returns the summed loss and the ring steps of a no-grad
    forward's last layer."""
    from ring_attention.integrations import transformers as ra_hf
    from ring_cases import grid_groups
    rank, world = rank_and_world()
    group, ulysses_group = grid_groups(ulysses, world // ulysses) if ulysses > 1 else (None, None)
    grid = dict(group=group, layout=layout, ulysses_group=ulysses_group)
    ra_hf.register(kv_exchange=kv_exchange, **grid)
    reference_model, ring_model = _model_pair(family, ra_hf.ATTN_IMPLEMENTATION)

    g = torch.Generator().manual_seed(seed_of(family, world, layout))
    input_ids = torch.randint(0, 128, (2, seqlen), generator=g)
    logits_ref = reference_model(input_ids=input_ids, use_cache=False).logits
    loss_ref = F.cross_entropy(logits_ref[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten(), reduction="sum")
    loss_ref.backward()

    ids, pos, labels = ra_hf.shard_inputs(input_ids, labels=input_ids, **grid)
    if compiled:
        torch._dynamo.reset()
    forward = torch.compile(ring_model, backend="aot_eager") if compiled else ring_model
    logits = forward(input_ids=ids, position_ids=pos, use_cache=False).logits
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum", ignore_index=-100)
    loss.backward()

    full = ra_hf.unshard_outputs(logits.detach(), **grid)  # unpacked rows: unshard
    torch.testing.assert_close(full, logits_ref.detach(), **FP32_TOL)
    total = loss.detach().clone()
    dist.all_reduce(total)
    torch.testing.assert_close(total, loss_ref.detach(), rtol=1e-5, atol=1e-4)
    _assert_grads_summed_over_ranks(ring_model, reference_model)
    with torch.no_grad():
        ring_model(input_ids=ids, position_ids=pos, use_cache=False)
    return total.item(), ra.last_ring_stats()["steps"]


def model_loss_from_shard_inputs(layout):
    """A batch of 2 rows through shard_inputs, the model given its labels as labels and
    shift_labels as transformers' own loss takes them: the loss summed over the ranks is the full
    sequence's. Returns that loss."""
    from ring_attention.integrations import transformers as ra_hf
    ra_hf.register(layout=layout)
    reference_model, ring_model = _model_pair("llama", ra_hf.ATTN_IMPLEMENTATION)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    expected = reference_model(input_ids=ids, labels=ids, use_cache=False).loss
    input_ids, position_ids, labels = ra_hf.shard_inputs(ids, labels=ids, layout=layout)
    assert all(t.is_contiguous() for t in (input_ids, position_ids, labels))
    loss = ring_model(input_ids=input_ids, position_ids=position_ids, labels=labels,
                      shift_labels=labels, num_items_in_batch=torch.tensor(2 * 11),
                      use_cache=False).loss
    total = loss.detach().clone()
    dist.all_reduce(total)
    torch.testing.assert_close(total, expected.detach(), rtol=1e-5, atol=1e-5)
    return total.item()


def sdpa_context_matches_reference(layout):
    """F.scaled_dot_product_attention inside integrations.sdpa.context_parallel on this rank's
    shard of (batch, heads, seq, dim) tensors (GQA, a scale, causal and not), gathered, against
    the float64 reference of the whole sequence: out and the gradients of q, k, v. Called as
    imported by name before the context, through the module, and under non-reentrant activation
    checkpointing (recomputed in the backward, inside the context)."""
    from torch.nn.functional import scaled_dot_product_attention  # imported by name too
    from torch.utils.checkpoint import checkpoint
    from ring_attention.integrations.sdpa import context_parallel
    rank, world = rank_and_world()
    seqlen = 6 * world
    calls = {
        "by name": scaled_dot_product_attention,
        "module": lambda *a, **kw: F.scaled_dot_product_attention(*a, **kw),
        "checkpointed": lambda *a, **kw: checkpoint(
            lambda *t: F.scaled_dot_product_attention(*t, **kw), *a, use_reentrant=False),
    }
    for (how, attend), causal in itertools.product(calls.items(), (True, False)):
        q, k, v, dout = random_qkv(seed_of("sdpa context", world, layout, causal), 2, seqlen,
                                   seqlen, 4, 2, 16, torch.float64)
        expected = reference(q, k, v, dout, sequence_visible(seqlen, causal), 0.3)
        local = [ra.shard(t.transpose(1, 2), layout=layout, dim=2) for t in (q, k, v, dout)]
        leaves = [t.requires_grad_() for t in local[:3]]
        with context_parallel(layout=layout):
            out = attend(*leaves, is_causal=causal, scale=0.3, enable_gqa=True)
            grads = torch.autograd.grad(out, leaves, local[3])
        for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads),
                                   (expected[0], *expected[2:])):
            full = ra.unshard(got.detach(), layout=layout, dim=2).transpose(1, 2)
            assert_close(full, want, f"rank {rank} {name} {how} causal={causal}")
    assert F.scaled_dot_product_attention is scaled_dot_product_attention  # restored
    return True


# An SDPA call that context_parallel cannot compute, made by rank 1 only: its change of
# (q, k, v, keywords), and what the error every rank raises says.
SDPA_UNSUPPORTED = {
    "attn_mask": (lambda q, k, v, kw: (q, k, v, {**kw, "attn_mask": torch.ones(8, 8, dtype=torch.bool)}),
                  "an attn_mask of scaled_dot_product_attention is not supported"),
    "dropout": (lambda q, k, v, kw: (q, k, v, {**kw, "dropout_p": 0.1}),
                "dropout_p of scaled_dot_product_attention must be 0 under context_parallel, got 0.1"),
    "lengths": (lambda q, k, v, kw: (q[:, :, :4], k, v, kw), "of different lengths"),
    "gqa": (lambda q, k, v, kw: (q, k, v, {**kw, "enable_gqa": False}), "pass enable_gqa=True"),
    "3d": (lambda q, k, v, kw: (q[0], k[0], v[0], kw), "takes 4-D (batch, heads, seqlen, headdim)"),
    "value_headdim": (lambda q, k, v, kw: (q, k, v[..., :8], kw),
                      "a value head dimension of its own is not supported"),
}


def sdpa_context_rejects(kind):
    """Rank 1 makes the SDPA call of `kind` inside context_parallel while the others make a valid
    one: every rank raises the same ValueError, and a valid call works afterwards."""
    from ring_attention.integrations.sdpa import context_parallel
    rank, _ = rank_and_world()
    q, k, v, _ = random_qkv(seed_of("sdpa rejects", rank), 1, 8, 8, 4, 2, 16, torch.float32)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    kw = dict(is_causal=True, enable_gqa=True)
    change, _ = SDPA_UNSUPPORTED[kind]
    with context_parallel(layout="contiguous"):
        bad = change(q, k, v, kw) if rank == 1 else (q, k, v, kw)
        try:
            F.scaled_dot_product_attention(*bad[:3], **bad[3])
        except ValueError as error:
            message = str(error)
        else:
            raise AssertionError(f"{kind}: no ValueError")
        F.scaled_dot_product_attention(q, k, v, **kw)
    return message


def packed_matches_documents(family, layout, lengths, ulysses=1, kv_exchange="ring"):
    """One packed row of documents (position_ids restarting at 0) through shard_inputs, the ring
    model and unshard_outputs against every document run alone through the eager model: logits
    at every real token, the summed loss over ranks and the parameter gradients. ulysses > 1:
    over a ulysses x (world / ulysses) grid (ring_cases.grid_groups)."""
    from ring_attention.integrations import transformers as ra_hf
    from ring_cases import grid_groups
    rank, world = rank_and_world()
    group, ulysses_group = grid_groups(ulysses, world // ulysses) if ulysses > 1 else (None, None)
    grid = dict(group=group, layout=layout, ulysses_group=ulysses_group)
    ra_hf.register(kv_exchange=kv_exchange, **grid)
    reference_model, ring_model = _model_pair(family, ra_hf.ATTN_IMPLEMENTATION)

    g = torch.Generator().manual_seed(seed_of("packed", family, world, layout, lengths))
    docs = [torch.randint(0, 128, (1, n), generator=g) for n in lengths]
    logits_ref, loss_ref = [], 0.0
    for doc in docs:
        logits_doc = reference_model(input_ids=doc, use_cache=False).logits
        loss_ref = loss_ref + F.cross_entropy(logits_doc[0, :-1], doc[0, 1:], reduction="sum")
        logits_ref.append(logits_doc.detach())
    loss_ref.backward()

    input_ids = torch.cat(docs, dim=1)
    position_ids = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    ids, pos, labels = ra_hf.shard_inputs(input_ids, position_ids, input_ids, **grid)
    logits = ring_model(input_ids=ids, position_ids=pos, use_cache=False).logits
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum", ignore_index=-100)
    loss.backward()

    full = ra_hf.unshard_outputs(logits.detach(), position_ids, **grid)
    torch.testing.assert_close(full, torch.cat(logits_ref, dim=1), **FP32_TOL)
    total = loss.detach().clone()
    dist.all_reduce(total)
    torch.testing.assert_close(total, loss_ref.detach(), rtol=1e-5, atol=1e-4)
    _assert_grads_summed_over_ranks(ring_model, reference_model)
    return total.item()


def packed_disagreement_raises(grid=False):
    """Ranks whose packed rows differ, and packed rows of batch 2, raise ValueError on every rank;
    the group stays usable. grid: over a 2 x 2 grid whose ring groups agree but whose
    ulysses_groups do not."""
    from ring_attention.integrations import transformers as ra_hf
    from ring_cases import grid_groups
    rank, world = rank_and_world()
    groups = dict(zip(("group", "ulysses_group"), grid_groups(2, 2))) if grid else {}
    input_ids = torch.zeros(1, 12, dtype=torch.int64)
    split = 4 + (rank % 2 if grid else rank)  # a different first document on other ranks
    position_ids = torch.cat([torch.arange(split), torch.arange(12 - split)]).unsqueeze(0)
    errors = []
    try:
        ra_hf.shard_inputs(input_ids, position_ids, **groups)
    except ValueError as e:
        errors.append(str(e))
    try:
        ra_hf.shard_inputs(input_ids.expand(2, 12), position_ids.expand(2, 12), **groups)
    except ValueError as e:
        errors.append(str(e))
    assert len(errors) == 2 and "disagree" in errors[0] and "batch 1" in errors[1], errors
    if grid:  # the ring groups agree: their ulysses_groups' verdicts tell
        assert "(its ulysses_group disagrees)" in errors[0], errors[0]
        ids, _, _ = ra_hf.shard_inputs(torch.zeros(1, 16, dtype=torch.int64), **groups)
        assert ids.shape == (1, 4)
    ones = torch.ones(1)
    dist.all_reduce(ones)
    assert ones.item() == world
    return errors[0]


def unsupported_use_raises(case):
    """A use of the transformers integration that the ring cannot compute (see
    test_integrations.UNSUPPORTED_USES) raises ValueError on every rank instead of a wrong answer;
    the group stays usable. Returns the message."""
    from ring_attention.integrations import transformers as ra_hf
    rank, world = rank_and_world()
    ra_hf.register(layout="contiguous" if case == "register layout" else "zigzag")
    family = {"chunked": "llama4", "softcap": "gemma2"}.get(case, "llama")
    model = tiny_model(family, 0)
    model.config._attn_implementation = ra_hf.ATTN_IMPLEMENTATION
    input_ids = torch.randint(0, 128, (1, 8 * world), generator=torch.Generator().manual_seed(0))
    packed = torch.cat([torch.arange(4 * world), torch.arange(4 * world)]).unsqueeze(0)
    stale = case.startswith("stale documents")
    ids, pos, _ = ra_hf.shard_inputs(input_ids, packed if stale else None)
    inputs = dict(input_ids=ids, position_ids=pos, use_cache=False)
    if case == "padding":  # padding in rank 0's shard only
        inputs["attention_mask"] = torch.ones_like(ids).index_fill_(1, torch.tensor([0]), int(rank > 0))
    if case == "padding on one rank" and rank == 0:  # the other ranks pass no attention_mask
        inputs["attention_mask"] = torch.ones_like(ids).index_fill_(1, torch.tensor([0]), 0)
    if case == "flash-attention documents":  # as DataCollatorWithFlattening(return_flash_attn_kwargs=True)
        inputs["cu_seq_lens_q"] = inputs["cu_seq_lens_k"] = torch.tensor([0, 3, ids.shape[1]], dtype=torch.int32)
    if case in ("stale documents", "no position_ids"):
        del inputs["position_ids"]
    if case == "stale documents, compiled":  # checked at every call, not once when traced
        torch._dynamo.reset()
        model = torch.compile(model, backend="aot_eager")
        model(**inputs)
        inputs["position_ids"] = pos.clone()
    if case == "whole sequence":
        inputs.update(input_ids=input_ids, position_ids=torch.arange(8 * world).unsqueeze(0))
    if case == "output_attentions":
        inputs["output_attentions"] = True
    if case == "dropout":
        model.train()
        for layer in model.model.layers:
            layer.self_attn.attention_dropout = 0.1
    if case == "kv cache":
        cache = model(input_ids=ids, position_ids=pos, use_cache=True).past_key_values
        inputs.update(input_ids=ids[:, :1], position_ids=pos[:, :1] + 8 * world, past_key_values=cache,
                      use_cache=True)
    try:
        if case == "unshard layout":
            ra_hf.unshard_outputs(ids, layout="striped")
        else:
            model(**inputs)
    except ValueError as e:
        message = str(e)
    else:
        raise AssertionError(f"{case}: no ValueError")
    finally:
        ra_hf.clear_inputs()
    ones = torch.ones(1)
    dist.all_reduce(ones)
    assert ones.item() == world
    return message


def masks_checked_in_different_orders_raise():
    """A model's mask functions run in the order of a set of layer types, which differs between
    processes: rank 0 checks a chunked mask the ring rejects, then a causal one, rank 1 the other
    way round. Both ranks raise the same ValueError at their first check; the group stays usable.
    Returns the message."""
    from transformers.masking_utils import (AttentionMaskInterface, and_masks, causal_mask_function,
                                            chunked_overlay)
    from ring_attention.integrations import transformers as ra_hf
    rank, world = rank_and_world()
    ra_hf.register()
    mask_interface = AttentionMaskInterface._global_mapping[ra_hf.ATTN_IMPLEMENTATION]
    chunked = and_masks(chunked_overlay(4, None), causal_mask_function)
    masks = [chunked, causal_mask_function] if rank == 0 else [causal_mask_function, chunked]
    try:
        mask_interface(batch_size=1, q_length=8, kv_length=8, mask_function=masks[0])
    except ValueError as e:
        message = str(e)
    else:
        raise AssertionError("no ValueError")
    ones = torch.ones(1)
    dist.all_reduce(ones)
    assert ones.item() == world
    return message


def supported_uses_match_eager():
    """What the integration accepts besides plain rows equals the eager model: an attention_mask
    without padding, chunked attention whose chunk covers the sequence, (seq,) position_ids, and a
    plain forward after clear_inputs forgot a packed batch's documents."""
    from ring_attention.integrations import transformers as ra_hf
    rank, world = rank_and_world()
    ra_hf.register()
    input_ids = torch.randint(0, 128, (1, 8 * world), generator=torch.Generator().manual_seed(1))
    expected = {}
    for family, chunk in (("llama4", 8 * world), ("llama", 4)):  # ring_model ends as the Llama
        reference_model = tiny_model(family, 0, chunk)
        ring_model = tiny_model(family, 0, chunk)
        ring_model.config._attn_implementation = ra_hf.ATTN_IMPLEMENTATION
        expected[family] = reference_model(input_ids=input_ids, use_cache=False).logits.detach()
        ids, pos, _ = ra_hf.shard_inputs(input_ids)
        logits = ring_model(input_ids=ids, position_ids=pos, attention_mask=torch.ones_like(ids),
                            use_cache=False).logits.detach()
        torch.testing.assert_close(ra_hf.unshard_outputs(logits), expected[family], **FP32_TOL)

    packed = torch.cat([torch.arange(3 * world), torch.arange(5 * world)])
    results = []
    for position_ids in (packed, packed.unsqueeze(0)):
        ids, pos, labels = ra_hf.shard_inputs(input_ids, position_ids, input_ids)
        logits = ring_model(input_ids=ids, position_ids=pos, use_cache=False).logits.detach()
        results.append([ids, pos, labels, ra_hf.unshard_outputs(logits, position_ids)])
    for one_dim, two_dim in zip(*results):
        assert torch.equal(one_dim, two_dim)

    ra_hf.clear_inputs()
    zigzag = dict(layout="zigzag", dim=1)
    logits = ring_model(input_ids=ra.shard(input_ids, **zigzag), use_cache=False,
                        position_ids=ra.shard(torch.arange(8 * world).unsqueeze(0), **zigzag)).logits
    torch.testing.assert_close(ra.unshard(logits.detach(), **zigzag), expected["llama"], **FP32_TOL)
    return True


class _AttentionBlock(torch.nn.Module):
    """A projection, ring attention (its output gated by its lse, so that both are
    differentiated) and an output projection: what a compiled model contains."""

    def __init__(self, layout, varlen, kv_exchange="ring", group=None, ulysses_group=None):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(16, 16, dtype=torch.float64)
        self.layout, self.varlen, self.kv_exchange = layout, varlen, kv_exchange
        self.group, self.ulysses_group = group, ulysses_group

    def forward(self, q, k, v, cu_seqlens=None):
        kw = dict(causal=True, layout=self.layout, kv_exchange=self.kv_exchange, group=self.group,
                  ulysses_group=self.ulysses_group, return_lse=True)
        if self.varlen:
            out, lse = ra.ring_attn_varlen_func(self.proj(q), k, v, cu_seqlens, **kw)
        else:
            out, lse = ra.ring_attn_func(self.proj(q), k, v, window_size=(9, 0), **kw)
        return self.proj(out * lse.transpose(-1, -2).unsqueeze(-1).tanh()).tanh()


def compiled_matches_eager(layout, varlen, kv_exchange="ring", ulysses=1, heads=4, heads_kv=2):
    """torch.compile(fullgraph=True) of a module calling the ring equals eager, forward and backward.
    ulysses > 1: over a ulysses x (world / ulysses) grid (ring_cases.grid_groups), each rank's
    chunk of heads / U query heads (K/V heads repeated to U inside the op where fewer)."""
    from ring_cases import grid_groups
    rank, world = rank_and_world()
    torch._dynamo.reset()
    group, ulysses_group = grid_groups(ulysses, world // ulysses) if ulysses > 1 else (None, None)
    grid = dict(group=group, layout=layout, ulysses_group=ulysses_group)
    module = _AttentionBlock(layout, varlen, kv_exchange, group, ulysses_group)
    if varlen:
        cu = torch.tensor([0, 5, 6, 19], dtype=torch.int32)
        g = torch.Generator().manual_seed(1)
        full = [torch.randn(19, heads if i == 0 else heads_kv, 16, generator=g, dtype=torch.float64)
                for i in range(3)]
        inputs = [ra.shard_varlen(t, cu, **grid) for t in full] + [cu]
    else:
        q, k, v, _ = random_qkv(seed_of("compile", layout), 2, 8 * world, 8 * world, heads,
                                heads_kv, 16, torch.float64)
        inputs = [ra.shard(t, **grid).contiguous() for t in (q, k, v)]
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


def checkpointed_matches_plain(ulysses=1):
    """Activation checkpointing (non-reentrant, reentrant, and selective keeping the ring's
    output) recomputes the ring in backward where it does not keep it: same outputs and
    gradients. ulysses > 1: over a ulysses x (world / ulysses) grid (ring_cases.grid_groups),
    whose backward reads its saved tensors once, as checkpointing allows."""
    from functools import partial
    from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts
    from ring_cases import grid_groups
    rank, world = rank_and_world()
    group, ulysses_group = grid_groups(ulysses, world // ulysses) if ulysses > 1 else (None, None)
    grid = dict(group=group, layout="striped", ulysses_group=ulysses_group)
    q, k, v, dout = random_qkv(seed_of("ckpt", world), 1, 6 * world, 6 * world, 4, 1, 16, torch.float64)
    local = [ra.shard(t, **grid).contiguous() for t in (q, k, v, dout)]

    def block(q, k, v):
        return ra.ring_attn_func(q, k, v, causal=True, **grid).sin()

    def save_attention(ctx, op, *args, **kwargs):  # selective checkpointing keeps the ring's output
        attention = op in (torch.ops.ring_attention.ring_fwd.default,
                           torch.ops.ring_attention.ulysses_fwd.default)
        return CheckpointPolicy.MUST_SAVE if attention else CheckpointPolicy.PREFER_RECOMPUTE

    results = []
    for kind in ("plain", "non-reentrant", "reentrant", "selective"):
        leaves = [t.clone().requires_grad_() for t in local[:3]]
        options = dict(use_reentrant=kind == "reentrant")
        if kind == "selective":
            options["context_fn"] = partial(create_selective_checkpoint_contexts, save_attention)
        out = block(*leaves) if kind == "plain" else checkpoint(block, *leaves, **options)
        out.backward(local[3])
        results.append([out.detach()] + [t.grad for t in leaves])
    for checkpointed in results[1:]:
        for plain, ckpt in zip(results[0], checkpointed):
            assert torch.equal(plain, ckpt)
    return True


class _FusedQKVBlock(torch.nn.Module):
    """A residual causal attention layer whose q, k and v are views of one fused projection (as
    models produce them): ring attention over ``group`` in the zigzag layout, or SDPA on the whole
    sequence when ``group`` is None."""

    def __init__(self, group=None, dim=32, heads=4):
        super().__init__()
        torch.manual_seed(0)
        self.qkv = torch.nn.Linear(dim, 3 * dim, dtype=torch.float64)
        self.out = torch.nn.Linear(dim, dim, dtype=torch.float64)
        self.group, self.heads = group, heads

    def forward(self, x):
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).view(batch, tokens, 3, self.heads, dim // self.heads).unbind(2)
        if self.group is None:
            out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)),
                                                 is_causal=True).transpose(1, 2)
        else:
            out = ra.ring_attn_func(q, k, v, causal=True, layout="zigzag", group=self.group)
        return x + self.out(out.reshape(batch, tokens, dim)).tanh()


def mesh_data_parallel_matches_single_process(wrapper):
    """FSDP2 (fully_shard; wrapper "fsdp") or DDP ("ddp") over the dp dimension of a 2 x 2
    DeviceMesh and the ring over its cp dimension: the gradients, summed over cp, equal those of
    the model on every replica's whole sequence, averaged over dp."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "cp"))
    batches = torch.randn(2, 2, 16, 32, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    reference_model = torch.nn.Sequential(_FusedQKVBlock(), _FusedQKVBlock())
    for batch in batches:
        reference_model(batch).pow(2).sum().div(len(batches)).backward()
    model = torch.nn.Sequential(_FusedQKVBlock(mesh["cp"]), _FusedQKVBlock(mesh["cp"]))
    if wrapper == "fsdp":
        for layer in model:
            fully_shard(layer, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
    else:
        model = DistributedDataParallel(model, process_group=mesh["dp"].get_group())
    x = ra.shard(batches[mesh["dp"].get_local_rank()], group=mesh["cp"], layout="zigzag")
    model(x).pow(2).sum().backward()
    for (name, p), p_ref in zip(model.named_parameters(), reference_model.parameters()):
        local = p.grad.to_local() if wrapper == "fsdp" else p.grad
        dist.all_reduce(local, group=mesh["cp"].get_group())
        grad = p.grad.full_tensor() if wrapper == "fsdp" else p.grad
        torch.testing.assert_close(grad, p_ref.grad, msg=lambda m: f"{name}: {m}")
    return True


def sharding_goes_with_its_group():
    """What shard_inputs records belongs to its group: after destroy_process_group and a new
    default group, which takes the old one's name, unshard_outputs in another layout is a plain
    unshard, and the records of destroyed groups are dropped. Returns the default group's name
    before and after."""
    from ring_attention.integrations import transformers as ra_hf
    rank, world = rank_and_world()
    input_ids = torch.arange(8 * world).unsqueeze(0)
    for _ in range(3):
        group = dist.new_group(list(range(world)))
        ra_hf.shard_inputs(input_ids, group=group)
        dist.destroy_process_group(group)
        del group
    ra_hf.shard_inputs(input_ids, layout="zigzag")
    old_name = dist.group.WORLD.group_name
    store = dist.distributed_c10d._get_default_store()
    dist.destroy_process_group()
    dist.init_process_group("gloo", store=dist.PrefixStore("sharding", store), rank=rank,
                            world_size=world)
    local = ra.shard(input_ids, layout="contiguous", dim=1)
    assert torch.equal(ra_hf.unshard_outputs(local, layout="contiguous"), input_ids)
    ra_hf.shard_inputs(input_ids, layout="contiguous")
    assert len(ra_hf._shardings) == 1, ra_hf._shardings
    return old_name, dist.group.WORLD.group_name


def _peer_local(x, layout, rank, world, dim=1):
    """This rank's part of x as ring-flash-attention's tests split it (written apart from
    ring_attention.shard, to check that the layouts agree token for token)."""
    if layout == "contiguous":
        return x.chunk(world, dim=dim)[rank]
    if layout == "zigzag":
        chunks = x.chunk(2 * world, dim=dim)
        return torch.cat([chunks[rank], chunks[2 * world - 1 - rank]], dim=dim)
    strided = torch.stack(x.split(world, dim=dim), dim=dim).transpose(dim, dim + 1)
    return strided.select(dim, rank)


def _peer_local_varlen(x, cu, layout, rank, world, dim=0):
    """This rank's part of packed x (sequences at cu, global): each sequence split alone."""
    return torch.cat([_peer_local(x.narrow(dim, a, b - a), layout, rank, world, dim)
                      for a, b in zip(cu, cu[1:])], dim=dim)


def _window_visible(seqlen, left, right):
    pos = torch.arange(seqlen)
    offset = pos.view(1, -1) - pos.view(-1, 1)  # key - query
    return ((offset >= -left) | (left < 0)) & ((offset <= right) | (right < 0))


RFA_FAMILIES = {"ring": "contiguous", "zigzag_ring": "zigzag", "stripe": "striped"}


def _rfa_case(name, packing, causal, heads_kv, local_len, window, varlen_seqs, seed):
    """One ring-flash-attention function (name, packing "", "kv" or "qkv") against float64
    attention of the whole sequence: out, lse and every input's gradient on this rank."""
    from ring_attention.integrations import ring_flash_attn as rfa
    from ring_attention.reference import attention_reference
    rank, world = rank_and_world()
    layout = RFA_FAMILIES[name]
    heads, headdim = 4, 8
    g = torch.Generator().manual_seed(seed)
    if varlen_seqs:
        cu_global = [0]
        for n in varlen_seqs:
            cu_global.append(cu_global[-1] + n * world)
        total, batch = cu_global[-1], 1
    else:
        total, batch = local_len * world, 2
    full = [torch.randn(batch, total, h, headdim, generator=g, dtype=torch.float64)
            for h in (heads, heads_kv, heads_kv, heads)]
    q, k, v, dout = (t.requires_grad_(i < 3) for i, t in enumerate(full))
    if varlen_seqs:
        seg = torch.repeat_interleave(torch.arange(len(varlen_seqs)),
                                      torch.tensor(varlen_seqs) * world)
        mask = seg.view(-1, 1) == seg.view(1, -1)
        pos = torch.cat([torch.arange(n * world) for n in varlen_seqs])
        mask &= ((pos.view(1, -1) - pos.view(-1, 1)) >= -window[0]) | (window[0] < 0)
        mask &= ((pos.view(1, -1) - pos.view(-1, 1)) <= window[1]) | (window[1] < 0)
    else:
        mask = _window_visible(total, *window)
    ref_out, ref_lse = attention_reference(q, k, v, causal=causal, mask=mask)
    ref_out.backward(dout)

    if varlen_seqs:
        local = lambda t, dim=1: _peer_local_varlen(t[0], cu_global, layout, rank, world, dim - 1)
        cu_local = torch.tensor(cu_global, dtype=torch.int32) // world
        extra = (cu_local, max(varlen_seqs))
        fn_name = f"{name}_flash_attn_varlen"
    else:
        local = lambda t, dim=1: _peer_local(t, layout, rank, world, dim)
        extra = ()
        fn_name = f"{name}_flash_attn"
    fn = getattr(rfa, f"{fn_name}_{packing}packed_func" if packing else f"{fn_name}_func")
    kw = dict(causal=causal, window_size=window, return_attn_probs=True)
    ql, kl, vl = (local(t.detach()) for t in (q, k, v))
    if packing == "qkv":
        inputs = [torch.stack([ql, kl, vl], dim=-3).requires_grad_()]
    elif packing == "kv":
        inputs = [ql.requires_grad_(), torch.stack([kl, vl], dim=-3).requires_grad_()]
    else:
        inputs = [t.requires_grad_() for t in (ql, kl, vl)]
    out, lse, probs = fn(*inputs, *extra, **kw)
    out.backward(local(dout))
    assert probs is None
    with torch.no_grad():  # return_attn_probs=False (the default): out alone
        assert torch.equal(fn(*inputs, *extra, causal=causal, window_size=window), out)
    torch.testing.assert_close(out, local(ref_out.detach()))
    lse_local = local(ref_lse.detach().unsqueeze(-1), dim=2).squeeze(-1)
    torch.testing.assert_close(lse, lse_local)
    expected = [local(t.grad) for t in (q, k, v)]
    if packing == "qkv":
        expected = [torch.stack(expected, dim=-3)]
    elif packing == "kv":
        expected = [expected[0], torch.stack(expected[1:], dim=-3)]
    for got, want in zip(inputs, expected):
        torch.testing.assert_close(got.grad, want)
    return fn.__name__


# (family, packing, causal, heads_kv, local_len, window, varlen local lengths): GQA where the
# packing allows it; odd local lengths where ring-flash-attention allows them (ring, stripe).
RFA_CASES = [
    ("ring", "", True, 2, 5, (-1, -1), ()), ("ring", "kv", False, 1, 5, (-1, -1), ()),
    ("ring", "qkv", True, 4, 3, (-1, -1), ()), ("ring", "", True, 2, 6, (3, 0), ()),
    ("zigzag_ring", "", True, 2, 6, (-1, -1), ()), ("zigzag_ring", "kv", True, 2, 4, (-1, -1), ()),
    ("zigzag_ring", "qkv", False, 4, 6, (-1, -1), ()), ("zigzag_ring", "", True, 1, 6, (5, 0), ()),
    ("stripe", "", True, 2, 5, (-1, -1), ()), ("stripe", "kv", True, 1, 4, (-1, -1), ()),
    ("stripe", "qkv", True, 4, 3, (-1, -1), ()),
    ("ring", "", True, 2, 0, (-1, -1), (3, 1, 4)), ("ring", "kv", False, 2, 0, (-1, -1), (2, 5)),
    ("ring", "qkv", True, 4, 0, (2, 0), (4, 3)),
    ("zigzag_ring", "", True, 2, 0, (-1, -1), (2, 6, 4)),
    ("zigzag_ring", "kv", False, 1, 0, (-1, -1), (4, 2)),
    ("zigzag_ring", "qkv", True, 4, 0, (-1, -1), (6, 2)),
]


def ring_flash_attn_shims_match_reference():
    """Every case of RFA_CASES; returns the functions run."""
    return [_rfa_case(*case, seed=seed_of("rfa", i)) for i, case in enumerate(RFA_CASES)]


def ring_flash_attn_shims_raise_everywhere():
    """What the ring cannot honour raises ValueError on every rank (also when only rank 0 asks
    for it); the group stays usable. Returns the messages."""
    from ring_attention.integrations import ring_flash_attn as rfa
    rank, world = rank_and_world()
    q = torch.randn(1, 4, 2, 8, dtype=torch.float64)
    cu_odd = torch.tensor([0, 3, 4], dtype=torch.int32)
    calls = {
        "dropout": lambda: rfa.ring_flash_attn_func(q, q, q, 0.1),
        "dropout on rank 0": lambda: rfa.zigzag_ring_flash_attn_func(
            q, q, q, dropout_p=0.1 if rank == 0 else 0.0, causal=True),
        "alibi": lambda: rfa.stripe_flash_attn_func(q, q, q, alibi_slopes=torch.ones(2)),
        "kv packing": lambda: rfa.ring_flash_attn_kvpacked_func(q, q),
        "zigzag odd": lambda: rfa.zigzag_ring_flash_attn_varlen_func(q[0], q[0], q[0], cu_odd, 3),
    }
    expected = {"dropout": "dropout_p must be 0", "dropout on rank 0": "dropout_p must be 0",
                "alibi": "alibi_slopes is not supported", "kv packing": "kv must hold its 2",
                "zigzag odd": "local length even"}
    messages = {}
    for case, call in calls.items():
        try:
            call()
        except ValueError as e:
            messages[case] = str(e)
        assert expected[case] in messages.get(case, ""), (case, messages.get(case))
    ones = torch.ones(1)
    if world > 1:
        dist.all_reduce(ones)
    assert ones.item() == world
    return messages
