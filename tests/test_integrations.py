"""Fitting the ecosystem: Hugging Face transformers, torch.compile, DeviceMesh, activation
checkpointing; each on real gloo ranks (rank functions in integration_cases.py)."""
import pytest

import integration_cases as cases


@pytest.mark.parametrize("world", [2, 4])
def test_transformers_llama_matches_single_process(rank_pool, world):
    losses = rank_pool(world).run(cases.llama_matches_single_process, "zigzag", 8 * world, timeout=180)
    assert len(set(losses)) == 1  # every rank saw the same summed loss


def test_transformers_llama_ulysses_allgather(rank_pool):
    """A 2 x 2 grid: Ulysses over heads, the all-gather of K/V over the ring group."""
    losses = rank_pool(4).run(cases.llama_matches_single_process, "zigzag", 32, 2, "allgather",
                              timeout=180)
    assert len(set(losses)) == 1


@pytest.mark.parametrize("layout", ["zigzag", "striped"])
@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_torch_compile_fullgraph_matches_eager(rank_pool, layout, varlen):
    assert all(rank_pool(2).run(cases.compiled_matches_eager, layout, varlen, timeout=300))


@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_torch_compile_fullgraph_allgather(rank_pool, varlen):
    assert all(rank_pool(2).run(cases.compiled_matches_eager, "zigzag", varlen, "allgather",
                                timeout=300))


def test_device_mesh_dp_times_cp(rank_pool):
    assert sorted(rank_pool(4).run(cases.mesh_data_and_context_parallel)) == [0, 0, 1, 1]


def test_activation_checkpointing(rank_pool):
    assert all(rank_pool(3).run(cases.checkpointed_matches_plain))
