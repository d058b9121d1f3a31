"""Fitting the ecosystem: Hugging Face transformers, torch.compile, DeviceMesh, activation
checkpointing; each on real gloo ranks (rank functions in integration_cases.py)."""
import pytest

import integration_cases as cases
from dist_pool import RankPool


@pytest.mark.parametrize("world", [2, 4])
def test_transformers_llama_matches_single_process(rank_pool, world):
    results = rank_pool(world).run(cases.model_matches_single_process, "llama", "zigzag", 8 * world,
                                   timeout=180)
    assert len(set(loss for loss, _ in results)) == 1  # every rank saw the same summed loss


@pytest.mark.parametrize("family", ["mistral", "qwen3", "gemma3", "exaone4", "gpt_oss"])
@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("world", [2, 4])
def test_transformers_sliding_window_matches_single_process(rank_pool, world, layout, family):
    """Sliding-window layers (every layer, or mixed with full layers by layer_types) equal the
    eager model; with contiguous shards of 8 tokens a window-5 layer needs one hop only."""
    results = rank_pool(world).run(cases.model_matches_single_process, family, layout, 8 * world,
                                   timeout=180)
    assert len(set(loss for loss, _ in results)) == 1
    if family == "mistral" and layout == "contiguous":
        assert {steps for _, steps in results} == {2}


@pytest.mark.parametrize("family,layout,world", [("llama", "zigzag", 2), ("llama", "contiguous", 3),
                                                 ("mistral", "zigzag", 4), ("qwen3", "striped", 2),
                                                 ("mistral", "packed", 3), ("gpt_oss", "zigzag", 3)])
def test_transformers_packed_documents_match_each_alone(rank_pool, family, layout, world):
    """Packed rows (position_ids restarting at 0): documents of lengths 1 to 23, one longer than
    a rank's share, never see each other."""
    losses = rank_pool(world).run(cases.packed_matches_documents, family, layout, (7, 1, 23, 2, 9),
                                  timeout=180)
    assert len(set(losses)) == 1


@pytest.mark.parametrize("grid", [False, True], ids=["ring", "ulysses"])
def test_transformers_packed_disagreement_raises_everywhere(rank_pool, grid):
    messages = rank_pool(4 if grid else 3).run(cases.packed_disagreement_raises, grid)
    assert len(set(messages)) == 1  # the same message on every rank


def test_transformers_sharding_record_goes_with_its_group():
    """The case replaces the default group (destroying every group the ranks made), so it has
    ranks of its own rather than the shared pool's, whose later cases keep their groups."""
    pool = RankPool(2)
    try:
        names = pool.run(cases.sharding_goes_with_its_group)
    finally:
        pool.close(kill=True)
    assert all(old == new for old, new in names)  # the new default group took the old name


# Uses the ring cannot compute, with a part of the message every rank raises.
UNSUPPORTED_USES = {
    "padding": "pads some tokens",  # an attention_mask with padding
    "padding on one rank": "pads some tokens",  # the other ranks pass no attention_mask
    "chunked": "chunked attention",  # Llama 4 chunks shorter than the sequence
    "softcap": "soft-capping",  # Gemma 2
    "register layout": "register() was given layout 'contiguous'",  # shard_inputs in zigzag
    "unshard layout": "unshard_outputs",  # shard_inputs in zigzag
    "flash-attention documents": "cu_seq_lens_q= is packed documents",
    "stale documents": "position_ids that call returned",  # a plain forward after a packed batch
    "stale documents, compiled": "position_ids that call returned",  # other position_ids
    "whole sequence": "position_ids count 0, 1, ...",  # every rank feeds the unsharded rows
    "no position_ids": "position_ids count 0, 1, ...",  # shards without their global positions
    "output_attentions": "output_attentions=True",  # the ring computes no attention weights
    "dropout": "attention dropout",  # training with attention_dropout > 0
    "kv cache": "queries and keys differ in length",  # a decoding step after a prefill
}


@pytest.mark.parametrize("case", list(UNSUPPORTED_USES))
def test_transformers_unsupported_use_raises_everywhere(rank_pool, case):
    messages = rank_pool(2).run(cases.unsupported_use_raises, case, timeout=120)
    assert len(set(messages)) == 1 and UNSUPPORTED_USES[case] in messages[0], messages


def test_transformers_masks_checked_in_different_orders_raise_everywhere(rank_pool):
    messages = rank_pool(2).run(cases.masks_checked_in_different_orders_raise)
    assert len(set(messages)) == 1 and "rank 0: chunked attention" in messages[0], messages


def test_transformers_supported_uses_match_eager(rank_pool):
    assert all(rank_pool(2).run(cases.supported_uses_match_eager, timeout=120))


def test_transformers_packed_documents_on_a_ulysses_grid(rank_pool):
    """Packed documents on a 2 x 2 grid: Ulysses over heads, the all-gather over the ring group."""
    losses = rank_pool(4).run(cases.packed_matches_documents, "llama", "zigzag", (7, 1, 23, 2, 9), 2,
                              "allgather", timeout=180)
    assert len(set(losses)) == 1


@pytest.mark.parametrize("family", ["llama", "gpt_oss"])
def test_transformers_ulysses_allgather(rank_pool, family):
    """A 2 x 2 grid: Ulysses over heads, the all-gather of K/V over the ring group (GPT-OSS: its
    sinks on every rank's rows after the exchange back)."""
    losses = rank_pool(4).run(cases.model_matches_single_process, family, "zigzag", 32, 2, "allgather",
                              timeout=180)
    assert len(set(losses)) == 1


def test_transformers_llama_compiled(rank_pool):
    """torch.compile of the model: the integration's checks run eagerly between graphs."""
    losses = rank_pool(2).run(cases.model_matches_single_process, "llama", "zigzag", 16, 1, "ring",
                              True, timeout=300)
    assert len(set(loss for loss, _ in losses)) == 1


@pytest.mark.parametrize("layout", ["zigzag", "striped"])
@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_torch_compile_fullgraph_matches_eager(rank_pool, layout, varlen):
    assert all(rank_pool(2).run(cases.compiled_matches_eager, layout, varlen, timeout=300))


@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_torch_compile_fullgraph_allgather(rank_pool, varlen):
    assert all(rank_pool(2).run(cases.compiled_matches_eager, "zigzag", varlen, "allgather",
                                timeout=300))


@pytest.mark.parametrize("ulysses,ring,heads,heads_kv", [(2, 1, 2, 1), (2, 2, 4, 2)],
                         ids=["U2xR1-h2/1", "U2xR2-h4/2"])
@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_torch_compile_fullgraph_ulysses(rank_pool, ulysses, ring, heads, heads_kv, varlen):
    """A ulysses_group traces: its all-to-alls are inside the op (U x R grids on gloo ranks). One
    query head per rank (h = U, K/V repeated to U) and one K/V head per rank (h_kv = U): the
    op's outputs are contiguous, as its fake kernel declares."""
    assert all(rank_pool(ulysses * ring).run(cases.compiled_matches_eager, "zigzag", varlen, "ring",
                                             ulysses, heads, heads_kv, timeout=300))


def test_device_mesh_dp_times_cp(rank_pool):
    assert sorted(rank_pool(4).run(cases.mesh_data_and_context_parallel)) == [0, 0, 1, 1]


@pytest.mark.parametrize("wrapper", ["fsdp", "ddp"])
def test_data_parallel_over_dp_ring_over_cp(rank_pool, wrapper):
    assert all(rank_pool(4).run(cases.mesh_data_parallel_matches_single_process, wrapper,
                                timeout=120))


@pytest.mark.parametrize("world,ulysses", [(3, 1), (4, 2)], ids=["ring", "U2xR2"])
def test_activation_checkpointing(rank_pool, world, ulysses):
    assert all(rank_pool(world).run(cases.checkpointed_matches_plain, ulysses))


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_ring_flash_attn_shims_match_reference(rank_pool, world):
    """ring-flash-attention's functions on its own shard layouts: out, lse and gradients equal
    float64 attention of the whole sequence on every rank."""
    if world == 1:
        names = [cases.ring_flash_attn_shims_match_reference()]
    else:
        names = rank_pool(world).run(cases.ring_flash_attn_shims_match_reference, timeout=180)
    assert all(n == names[0] for n in names) and len(set(names[0])) == 15


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_ring_flash_attn_shims_raise_everywhere(rank_pool, world):
    """dropout, ALiBi, a malformed packing and odd zigzag lengths raise ValueError on every rank,
    also when only rank 0 passes dropout_p."""
    if world == 1:
        messages = [cases.ring_flash_attn_shims_raise_everywhere()]
    else:
        messages = rank_pool(world).run(cases.ring_flash_attn_shims_raise_everywhere)
    assert all(m == messages[0] for m in messages)  # the same message on every rank


@pytest.mark.parametrize("world,layout", [(2, "zigzag"), (3, "striped"), (4, "contiguous")])
def test_sdpa_context_parallel_matches_reference(rank_pool, world, layout):
    """F.scaled_dot_product_attention inside integrations.sdpa.context_parallel is ring attention
    over the shards, forward and backward."""
    assert all(rank_pool(world).run(cases.sdpa_context_matches_reference, layout))


@pytest.mark.parametrize("kind", sorted(cases.SDPA_UNSUPPORTED))
def test_sdpa_context_parallel_rejects_on_every_rank(rank_pool, kind):
    messages = rank_pool(3).run(cases.sdpa_context_rejects, kind)
    assert len(set(messages)) == 1 and cases.SDPA_UNSUPPORTED[kind][1] in messages[0], messages
    assert "rank 1:" in messages[0] and "rank 0:" not in messages[0], messages[0]


def test_sdpa_context_parallel_options_stay_with_their_thread():
    """Contexts open at once in two threads: each thread's calls take its own context's options,
    and closing one leaves the other's (world size 1: the layout is the visible option, through
    the error an unknown one raises)."""
    import threading
    import torch
    import torch.nn.functional as F
    from ring_attention.integrations.sdpa import context_parallel
    q = torch.randn(1, 2, 4, 8)
    other_open, mine_closed, results = threading.Event(), threading.Event(), {}

    def other():  # opens after this thread's context, calls after it has closed
        with context_parallel(layout="diagonal"):
            other_open.set()
            mine_closed.wait(60)
            try:
                F.scaled_dot_product_attention(q, q, q)
            except ValueError as error:
                results["other"] = str(error)

    with context_parallel(layout="contiguous"):
        thread = threading.Thread(target=other)
        thread.start()
        other_open.wait(60)
        results["mine"] = F.scaled_dot_product_attention(q, q, q, is_causal=True)
    mine_closed.set()
    thread.join(60)
    torch.testing.assert_close(results["mine"], F.scaled_dot_product_attention(q, q, q, is_causal=True))
    assert "unknown layout 'diagonal'" in results.get("other", ""), results


def test_sdpa_context_parallel_compiles_whole():
    """World size 1: a function calling SDPA traces whole (fullgraph) inside the context and
    matches SDPA; outside it SDPA is SDPA again."""
    import torch
    import torch.nn.functional as F
    from ring_attention.integrations.sdpa import context_parallel
    q, k, v = (torch.randn(2, h, 9, 16, generator=torch.Generator().manual_seed(h))
               for h in (4, 2, 2))

    def attend(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    want = attend(q, k, v)
    torch._dynamo.reset()
    with context_parallel(layout="contiguous"):
        got = torch.compile(attend, fullgraph=True, backend="aot_eager")(q, k, v)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(attend(q, k, v), want)  # the mode is gone


@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "striped"])
def test_transformers_model_loss_over_ranks(rank_pool, layout):
    """Rows of a batch of 2 sharded by shard_inputs (contiguous shards are views of the rows
    without the copy) feed transformers' own loss on 2 ranks."""
    losses = rank_pool(2).run(cases.model_loss_from_shard_inputs, layout, timeout=120)
    assert len(set(losses)) == 1


def test_transformers_model_loss_takes_shard_inputs_labels_as_shift_labels():
    """shard_inputs' labels are shifted already; a causal LM given them as shift_labels (which its
    forward hands to every attention layer with its other loss keywords) computes the loss of the
    unshifted labels, as the same model does on the full sequence. World size 1: no group."""
    import torch
    import torch.nn.functional as F
    from ring_attention.integrations import transformers as ra_hf
    ra_hf.register()
    model = cases.tiny_model("llama", 0)
    model.config._attn_implementation = ra_hf.ATTN_IMPLEMENTATION
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    input_ids, position_ids, labels = ra_hf.shard_inputs(ids, labels=ids)
    out = model(input_ids=input_ids, position_ids=position_ids, labels=labels, shift_labels=labels,
                num_items_in_batch=torch.tensor(2 * 11), use_cache=False)
    expected = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    torch.testing.assert_close(out.loss, expected)
