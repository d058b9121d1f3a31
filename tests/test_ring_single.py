"""ring_attn_func and the ring ops in this process: world size 1, no process group."""
import pytest
import torch

import ring_attention as ra
import ring_cases
from cases import acc_dtype, random_packed, random_qkv, seed_of
from ring_attention.testing import LocalRing
from ring_cases import check_ring


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("heads,heads_kv,scale", [(2, 2, None), (4, 2, 0.7), (3, 1, None)])
def test_gradcheck(heads, heads_kv, scale, causal):
    """Float64 gradcheck of ring_attn_func's out and lse (q, k, v) at world size 1."""
    q, k, v, _ = random_qkv(seed_of("gradcheck", heads, heads_kv), 1, 5, 5, heads, heads_kv, 8,
                            torch.float64)
    inputs = tuple(t.requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(
        lambda q, k, v: ra.ring_attn_func(q, k, v, causal=causal, softmax_scale=scale,
                                          return_lse=True), inputs)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("layout,local_len", [("contiguous", 1), ("contiguous", 37),
                                              ("striped", 7), ("zigzag", 2), ("zigzag", 64)])
def test_matches_reference(layout, local_len, causal, dtype):
    """Without a process group every layout is the identity: plain attention."""
    check_ring(dict(layout=layout, causal=causal, dtype=dtype, local_len=local_len, batch=2,
                    heads=4, heads_kv=2, headdim=32, scale=None, memory="contiguous"))


@pytest.mark.parametrize("memory", ["transposed", "sliced", "headdim_strided"])
def test_non_contiguous_inputs(memory):
    """Strided q, k, v and output gradient give the contiguous (= reference) results."""
    check_ring(dict(layout="contiguous", causal=True, dtype=torch.float64, local_len=13, batch=2,
                    heads=4, heads_kv=1, headdim=16, scale=0.4, memory=memory))


def test_default_softmax_scale_is_inverse_sqrt_headdim():
    q, k, v, _ = random_qkv(3, 1, 9, 9, 2, 1, 64, torch.float64)
    assert torch.equal(ra.ring_attn_func(q, k, v), ra.ring_attn_func(q, k, v, softmax_scale=0.125))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_opcheck_ring_ops(causal, dtype):
    """torch.library.opcheck on ring_fwd and ring_bwd with group_name "" (world size 1)."""
    q, k, v, dout = random_qkv(4, 2, 6, 6, 4, 2, 16, dtype)
    fwd_args = (q, k, v, None, "", causal, 0.3, 3, -1 if causal else 2, "zigzag")
    torch.library.opcheck(ra.ops.ring_fwd.default, fwd_args)
    out, lse, forward_call = ra.ops.ring_fwd(*fwd_args)
    assert lse.dtype == acc_dtype(dtype)
    assert forward_call.tolist() == [0]  # nothing agreed at world size 1
    bwd_args = (dout, q, k, v, out, lse, *fwd_args[3:])
    for kwargs in ({}, {"dlse": torch.randn_like(lse)}, {"forward_call": forward_call}):
        torch.library.opcheck(ra.ops.ring_bwd.default, bwd_args, kwargs)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_opcheck_block_ops(dtype):
    """torch.library.opcheck on block_fwd and block_bwd (mutating their accumulators)."""
    q, k, v, dout = random_qkv(5, 2, 6, 5, 4, 2, 16, dtype)
    acc = acc_dtype(dtype)
    q_pos, k_pos = torch.arange(6, dtype=torch.int32) + 2, torch.arange(5, dtype=torch.int32)
    out = torch.zeros(q.shape, dtype=acc)
    lse = torch.full((2, 4, 6), float("-inf"), dtype=acc)
    fwd_args = (q, k, v, q_pos, k_pos, None, out, lse, True, -1, -1, 0.3)
    torch.library.opcheck(ra.ops.block_fwd.default, fwd_args)
    ra.ops.block_fwd(*fwd_args)
    delta = (dout.to(acc) * out).sum(-1).transpose(1, 2).contiguous()
    grads = [torch.zeros(t.shape, dtype=acc) for t in (q, k, v)]
    torch.library.opcheck(ra.ops.block_bwd.default,
                          (dout, q, k, v, q_pos, k_pos, None, lse, delta, *grads, True, -1, -1, 0.3))


@pytest.mark.parametrize("kind", sorted(ring_cases.INVALID_INPUTS))
def test_invalid_input_raises_value_error(kind):
    """Local validation without a process group: ValueError naming the problem."""
    message = ring_cases.check_rejected(kind, bad_ranks=(0,))
    assert message.startswith("ring_attn_func: ")
    assert ring_cases.INVALID_INPUTS[kind][1] in message


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_huge_softmax_scale_is_exact_or_rejected(dtype):
    """A softmax_scale just below float32's largest value / log2(e) with small q and k (moderate
    logits) matches the reference, through the ring too; at the limit and beyond, inputs that
    accumulate in float32 raise ValueError instead of returning NaN, and float64 inputs take the
    same scale."""
    q, k, v, _ = random_qkv(seed_of("huge scale"), 1, 8, 8, 2, 1, 4, torch.float64)
    q, k = q * 1e-19, k * 1e-19  # logits ~ scale * 1e-38: of order one
    limit = torch.finfo(torch.float32).max / 1.4426950408889634
    tolerance = {torch.float32: 1e-6, torch.bfloat16: 2e-2, torch.float16: 4e-3}[dtype]
    scale = 0.999 * limit
    if dtype == torch.float16:  # 1e-19 underflows float16: q = k = 0, every key weighs the same
        q, k = torch.zeros_like(q), torch.zeros_like(k)
    want, want_lse = ra.attention_reference(q.to(dtype), k.to(dtype), v.to(dtype),
                                            softmax_scale=scale)
    ring = LocalRing(2)
    for outs in ([ra.ring_attn_func(q.to(dtype), k.to(dtype), v.to(dtype), softmax_scale=scale)],
                 ring.ring_attn_func(*(ring.shard(t.to(dtype)) for t in (q, k, v)),
                                     softmax_scale=scale)):
        out = torch.cat(outs, dim=1)
        assert torch.isfinite(out).all()
        assert (out.double() - want).abs().max() < tolerance
    for bad in (limit, 3e38, -1e39, 1e300):
        with pytest.raises(ValueError, match="is too large for torch"):
            ra.ring_attn_func(q.to(dtype), k.to(dtype), v.to(dtype), softmax_scale=bad)
    out = ra.ring_attn_func(q, k, v, softmax_scale=3e38)  # float64 accumulates in float64
    assert (out - ra.attention_reference(q, k, v, softmax_scale=3e38)[0]).abs().max() < 1e-12


@pytest.mark.parametrize("window_size", [5, ("a", "b"), (1.5, 0), (1, 2, 3), None],
                         ids=["int", "strings", "float", "triple", "none"])
def test_malformed_window_size_is_named_as_given(window_size):
    """A window_size that is not a pair of ints is reported with the value the caller passed
    (not the window the wrapper turns it into), here and through LocalRing."""
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="window_size must be a pair of ints") as info:
        ra.ring_attn_func(q, q, q, window_size=window_size)
    assert str(info.value).endswith(f"got {window_size!r}")
    ring = LocalRing(2)
    with pytest.raises(ValueError, match="window_size must be a pair of ints") as info:
        ring.ring_attn_func([q, q], [q, q], [q, q], window_size=window_size)
    assert f"got {window_size!r}" in str(info.value)


def test_autocast_computes_in_its_dtype_as_sdpa_does():
    """Under torch.autocast, q, k, v of mixed dtypes (an fp32 rotary q and k, a bf16 v) run in the
    autocast dtype, as F.scaled_dot_product_attention does: the result and the gradients equal
    those of the inputs cast by hand, in the inputs' own dtypes. LocalRing likewise."""
    q, k, v, dout = random_qkv(seed_of("autocast"), 1, 12, 12, 4, 2, 16, torch.float32)
    v = v.bfloat16()
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ra.ring_attn_func(*leaves, causal=True)
        (local_out,) = LocalRing(1).ring_attn_func([leaves[0]], [leaves[1]], [leaves[2]],
                                                   causal=True)
    grads = torch.autograd.grad(out, leaves, dout.bfloat16())
    cast = [t.detach().bfloat16().requires_grad_() for t in (q, k, v)]
    want = ra.ring_attn_func(*cast, causal=True)
    want_grads = torch.autograd.grad(want, cast, dout.bfloat16())
    assert out.dtype == torch.bfloat16 and torch.equal(out, want) and torch.equal(local_out, want)
    for got, expected, leaf in zip(grads, want_grads, leaves):
        assert got.dtype == leaf.dtype and torch.equal(got, expected.to(leaf.dtype))


def test_autocast_leaves_float64_inputs_in_float64():
    """Autocast casts no float64 tensor (as for F.scaled_dot_product_attention): float64 inputs
    give the float64 result, to float64 precision."""
    q, k, v, dout = random_qkv(seed_of("autocast-float64"), 1, 9, 9, 4, 2, 16, torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ra.ring_attn_func(q, k, v, causal=True)
        (local_out,) = LocalRing(1).ring_attn_func([q], [k], [v], causal=True)
    want = ra.ring_attn_func(q, k, v, causal=True)
    assert out.dtype == local_out.dtype == torch.float64
    assert torch.equal(out, want) and torch.equal(local_out, want)


@pytest.mark.parametrize("kind", ["ring", "varlen", "checkpointed"])
def test_double_backward_raises(kind):
    """A gradient of ring attention is not differentiable again: RuntimeError, never a zero."""
    assert ring_cases.check_double_backward_raises(kind)


@pytest.mark.parametrize("name,value", [
    ("RING_ATTN_CPU_KERNEL", "avx1024"), ("RING_ATTN_CPU_TILES", "64,64"),
    ("RING_ATTN_CPU_TILES", "64,64,64,64,64x"), ("RING_ATTN_CPU_TILES", "64,0,64,64,64")])
def test_unknown_cpu_kernel_environment_raises(monkeypatch, name, value):
    """A CPU kernel variable with an unknown value: ValueError naming it, from the ring and from
    LocalRing, before any work; the default kernel runs again once it is unset."""
    monkeypatch.setenv(name, value)
    q, k, v, _ = random_qkv(7, 1, 4, 4, 2, 1, 16, torch.float32)
    with pytest.raises(ValueError, match=f"{name} must be .*, got '{value}'"):
        ra.ring_attn_func(q, k, v)
    with pytest.raises(ValueError, match=f"{name} must be"):
        LocalRing(2).ring_attn_func([q, q], [k, k], [v, v])
    monkeypatch.delenv(name)
    assert torch.isfinite(ra.ring_attn_func(q, k, v)).all()


@pytest.mark.parametrize("value", ["soon", "inf", "nan", "-1", "1e400"])
def test_bad_ring_timeout_environment_variable(monkeypatch, value):
    monkeypatch.setenv("RING_ATTN_TIMEOUT", value)
    q, k, v, _ = random_qkv(6, 1, 4, 4, 2, 1, 16, torch.float32)
    with pytest.raises(ValueError, match="RING_ATTN_TIMEOUT must be a number of seconds, finite"):
        ra.ring_attn_func(q, k, v)


def test_meta_inputs_trace_like_sdpa():
    """Meta q, k and v (a model built on the meta device) give meta outputs and gradients of the
    real shapes, as F.scaled_dot_product_attention does, under torch.autocast too."""
    leaves = [torch.empty(2, 7, heads, 16, device="meta", requires_grad=True)
              for heads in (4, 2, 2)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, lse = ra.ring_attn_func(*leaves, causal=True, return_lse=True)
    out.sum().backward()
    assert out.device.type == lse.device.type == "meta"
    assert out.shape == (2, 7, 4, 16) and lse.shape == (2, 4, 7) and lse.dtype == torch.float32
    assert [leaf.grad.shape for leaf in leaves] == [leaf.shape for leaf in leaves]


@pytest.mark.parametrize("meta", ["k", "v", "cu_seqlens"])
def test_meta_tensor_among_cpu_tensors_raises(meta):
    """A meta tensor beside CPU ones selects the ops' meta kernels: ValueError naming it, never an
    uninitialised CPU output."""
    cu, q, k, v, _ = random_packed(seed_of("meta", meta), [3, 5], 4, 2, 16, torch.float32)
    tensors = {"q": q, "k": k, "v": v, "cu_seqlens": cu}
    tensors[meta] = tensors[meta].to("meta")
    with pytest.raises(ValueError, match=f"^ring_attn_varlen_func: .*got {meta} on meta"):
        ra.ring_attn_varlen_func(**tensors)
    if meta != "cu_seqlens":
        dense = {name: t.unsqueeze(0) for name, t in tensors.items() if name != "cu_seqlens"}
        with pytest.raises(ValueError, match=f"^ring_attn_func: .*got {meta} on meta"):
            ra.ring_attn_func(**dense)
