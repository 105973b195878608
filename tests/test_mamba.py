"""The Mamba-2 mixer: chunked scan vs. recurrence, state handoff, cached step, document
resets, causality, mamba_ssm layout, the kernel glue, compile, FLOPs, recipes, and a short run."""
from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from unetlm.api import build_model
from unetlm.mixers.mamba import MambaBlock, MambaConfig, causal_conv, segment_ids, ssd_scan
from unetlm.core.layout import PAD_DOC, StageInfo, byte_stage
from unetlm.model.summary import summarize
from unetlm.core.tokens import BOS, encode
from unetlm.recipe import load_recipe
from unetlm.recipe.errors import RecipeError

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
SMALL = {"d_state": 8, "headdim": 8, "chunk_size": 4}


def make_block(dim=16, dtype=torch.float64, seed=0, **options) -> MambaBlock:
    torch.manual_seed(seed)
    block = MambaBlock(MambaConfig(**{**SMALL, **options}), dim).to(dtype)
    with torch.no_grad():  # non-trivial norms and skip so that every parameter matters
        for p in block.parameters():
            if p.dim() == 1 and p is not block.mixer.A_log and p is not block.mixer.dt_bias:
                p.add_(0.3 * torch.randn_like(p))
    return block


def info_for(doc: torch.Tensor) -> StageInfo:
    return byte_stage(doc, doc != PAD_DOC)


def naive_scan(x, dt, A, B, C, seg, initial):
    """h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T (h restarts where seg changes), y_t = C_t . h_t."""
    b, L, h, p = x.shape
    rep = h // B.shape[2]
    Bh, Ch = B.repeat_interleave(rep, 2), C.repeat_interleave(rep, 2)
    state = initial.clone()
    ys = []
    for t in range(L):
        if t > 0:
            state = state * (seg[:, t] == seg[:, t - 1]).to(state.dtype)[:, None, None, None]
        decay = torch.exp(dt[:, t] * A)[..., None, None]
        state = state * decay + (dt[:, t, :, None] * x[:, t])[..., None] * Bh[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", state, Ch[:, t]))
    return torch.stack(ys, 1), state


def random_scan_inputs(b, L, h, p, g, n, seed, n_docs=3):
    gen = torch.Generator().manual_seed(seed)
    f64 = dict(dtype=torch.float64, generator=gen)
    x = torch.randn(b, L, h, p, **f64)
    dt = F.softplus(torch.randn(b, L, h, **f64) - 1)
    A = -torch.rand(h, **f64) * 3 - 0.1
    B = torch.randn(b, L, g, n, **f64)
    C = torch.randn(b, L, g, n, **f64)
    doc = torch.randint(0, n_docs, (b, L), generator=gen).sort(dim=1).values
    initial = torch.randn(b, h, p, n, **f64)
    return x, dt, A, B, C, segment_ids(doc), initial


@settings(max_examples=12, deadline=None)
@given(
    L=st.integers(1, 19),
    chunk=st.integers(1, 8),
    groups=st.sampled_from([1, 2]),
    seed=st.integers(0, 1000),
)
def test_chunked_scan_equals_sequential_recurrence(L, chunk, groups, seed):
    x, dt, A, B, C, seg, initial = random_scan_inputs(2, L, 4, 3, groups, 5, seed)
    y, final = ssd_scan(x, dt, A, B, C, seg, chunk, initial)
    y_ref, final_ref = naive_scan(x, dt, A, B, C, seg, initial)
    assert y.shape == (2, L, 4, 3) and y.dtype == torch.float64
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final, final_ref, rtol=1e-10, atol=1e-10)


def test_scan_accumulates_in_float32_for_low_precision_inputs():
    x, dt, A, B, C, seg, initial = random_scan_inputs(1, 10, 2, 3, 1, 4, seed=1)
    y, final = ssd_scan(x.bfloat16(), dt.bfloat16(), A.float(), B.bfloat16(), C.bfloat16(), seg, 4)
    assert y.dtype == torch.float32 and final.dtype == torch.float32


def test_scan_gradients_equal_the_recurrence():
    """The scan recomputes its intermediates in backward: gradients still equal autograd
    through the sequential recurrence."""
    inputs = random_scan_inputs(2, 11, 4, 3, 2, 5, seed=3)
    ours = [t.clone().requires_grad_(t.is_floating_point()) for t in inputs]
    ref = [t.clone().requires_grad_(t.is_floating_point()) for t in inputs]
    x, dt, A, B, C, seg, initial = ours
    y, final = ssd_scan(x, dt, A, B, C, seg, 4, initial)
    weights = torch.randn_like(y), torch.randn_like(final)
    ((y * weights[0]).sum() + (final * weights[1]).sum()).backward()
    x, dt, A, B, C, seg, initial = ref
    y_ref, final_ref = naive_scan(x, dt, A, B, C, seg, initial)
    ((y_ref * weights[0]).sum() + (final_ref * weights[1]).sum()).backward()
    for got, want in zip(ours, ref):
        if want.grad is not None:
            torch.testing.assert_close(got.grad, want.grad, rtol=1e-9, atol=1e-9)


def saved_for_backward(block: MambaBlock, length: int, chunk: int) -> tuple[int, int]:
    """(bytes, largest element count) of the tensors one forward keeps for backward, counted
    once per storage, parameters excluded."""
    block.mixer.config.chunk_size = chunk
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}
    seen: set[int] = set()
    total = largest = 0

    def pack(t):
        nonlocal total, largest
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen | params:
            seen.add(storage.data_ptr())
            total, largest = total + storage.nbytes(), max(largest, t.numel())
        return t

    x = torch.randn(1, length, block.dim, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x, info_for(torch.zeros(1, length, dtype=torch.long)), {})
    return total, largest


def test_saved_memory_is_linear_in_length_with_no_chunk_factor():
    block = make_block(dtype=torch.float32, headdim=4, d_state=8)
    heads, L, q = block.mixer.heads, 64, 32
    short, _ = saved_for_backward(block, L, q)
    long, largest = saved_for_backward(block, 2 * L, q)
    small_chunks, _ = saved_for_backward(block, 2 * L, 4)
    assert long / short == pytest.approx(2.0, rel=0.02)
    assert small_chunks == pytest.approx(long, rel=0.01)  # the chunk size does not matter
    assert largest < heads * 2 * L * q  # no (b, h, c, q, q) block is kept


def test_conv_output_keeps_the_input_dtype_under_autocast():
    u = torch.randn(2, 7, 6).bfloat16()
    weight, bias = torch.randn(6, 1, 3), torch.randn(6)
    seg = torch.zeros(2, 7, dtype=torch.long)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, state = causal_conv(u, weight, bias, seg, torch.zeros(2, 6, 3))
    assert out.dtype == torch.bfloat16
    ref, _ = causal_conv(u.float(), weight, bias, seg, torch.zeros(2, 6, 3))
    torch.testing.assert_close(out.float(), ref, rtol=0.03, atol=0.03)


def test_scan_ignores_autocast():
    x, dt, A, B, C, seg, initial = (t.float() for t in random_scan_inputs(1, 10, 2, 3, 1, 4, seed=2))
    ref, ref_final = ssd_scan(x, dt, A, B, C, seg.long(), 4, initial)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, final = ssd_scan(x, dt, A, B, C, seg.long(), 4, initial)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    torch.testing.assert_close(final, ref_final, rtol=0, atol=0)


def test_segment_ids_restart_where_the_document_changes():
    doc = torch.tensor([[3, 3, 4, 4, 4, 7, PAD_DOC, PAD_DOC]])
    assert segment_ids(doc).tolist() == [[0, 0, 1, 1, 1, 2, 3, 3]]


@pytest.mark.parametrize("split", [1, 2, 5, 7, 9])
@pytest.mark.parametrize("d_conv", [2, 4])
def test_state_handoff_equals_one_long_forward(split, d_conv):
    block = make_block(d_conv=d_conv)
    L = 14
    x = torch.randn(2, L, 16, dtype=torch.float64)
    doc = torch.zeros(2, L, dtype=torch.long)
    doc[1, 11:] = 1  # a new document inside the second part of row 1
    full, full_state = block.forward_with_state(x, info_for(doc))
    first, state = block.forward_with_state(x[:, :split], info_for(doc[:, :split]))
    second, state = block.forward_with_state(x[:, split:], info_for(doc[:, split:]), state)
    torch.testing.assert_close(torch.cat([first, second], 1), full, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state.ssm, full_state.ssm, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state.conv, full_state.conv, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("options", [{}, {"ngroups": 2, "mlp_ratio": 2.0, "d_conv": 3}])
def test_cached_step_equals_full_forward_at_every_position(options):
    block = make_block(**options)
    L = 11
    x = torch.randn(3, L, 16, dtype=torch.float64)
    full = block(x, info_for(torch.zeros(3, L, dtype=torch.long)), {})
    state = block.init_state(3, L, x.device, x.dtype)
    for t in range(L):
        y, state = block.step(x[:, t], state, {})
        torch.testing.assert_close(y, full[:, t], rtol=1e-10, atol=1e-10)


def test_prefill_state_continues_with_steps():
    block = make_block()
    L, prefix = 10, 6
    x = torch.randn(2, L, 16, dtype=torch.float64)
    doc = torch.zeros(2, L, dtype=torch.long)
    full = block(x, info_for(doc), {})
    _, state = block.forward_with_state(x[:, :prefix], info_for(doc[:, :prefix]))
    for t in range(prefix, L):
        y, state = block.step(x[:, t], state, {})
        torch.testing.assert_close(y, full[:, t], rtol=1e-10, atol=1e-10)


def test_prefill_ending_in_a_new_document_forgets_the_old_one():
    """The returned state carries only the last document: stepping on equals a fresh start there."""
    block = make_block()
    x = torch.randn(1, 12, 16, dtype=torch.float64)
    doc = torch.tensor([[0] * 9 + [1] * 3])
    _, state = block.forward_with_state(x[:, :10], info_for(doc[:, :10]))
    y, _ = block.step(x[:, 10], state, {})
    fresh = block(x[:, 9:11], info_for(torch.zeros(1, 2, dtype=torch.long)), {})
    torch.testing.assert_close(y, fresh[:, 1], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("start", [1, 3, 4, 6])
def test_a_document_does_not_see_the_previous_one(start):
    block = make_block()
    L = 12
    x = torch.randn(2, L, 16, dtype=torch.float64)
    doc = torch.zeros(2, L, dtype=torch.long)
    doc[:, start:] = 1
    y = block(x, info_for(doc), {})
    x2 = x.clone()
    x2[:, :start] += torch.randn(2, start, 16, dtype=torch.float64)
    y2 = block(x2, info_for(doc), {})
    torch.testing.assert_close(y2[:, start:], y[:, start:], rtol=0, atol=1e-12)
    assert not torch.allclose(y2[:, :start], y[:, :start])  # the perturbation is real
    # and without the document change the later positions do see it
    y3 = block(x2, info_for(torch.zeros(2, L, dtype=torch.long)), {})
    y4 = block(x, info_for(torch.zeros(2, L, dtype=torch.long)), {})
    assert not torch.allclose(y3[:, start:], y4[:, start:])


@pytest.mark.parametrize("t", [0, 3, 4, 8])
def test_causal_perturbing_the_future_leaves_the_past(t):
    block = make_block(mlp_ratio=2.0)
    L = 10
    x = torch.randn(2, L, 16, dtype=torch.float64)
    doc = torch.zeros(2, L, dtype=torch.long)
    y = block(x, info_for(doc), {})
    x2 = x.clone()
    x2[:, t + 1:] = torch.randn_like(x2[:, t + 1:])
    y2 = block(x2, info_for(doc), {})
    torch.testing.assert_close(y2[:, : t + 1], y[:, : t + 1], rtol=0, atol=0)
    assert not torch.allclose(y2[:, t + 1:], y[:, t + 1:])


def test_padding_after_the_real_positions_changes_nothing():
    block = make_block()
    x = torch.randn(1, 7, 16, dtype=torch.float64)
    real = block(x, info_for(torch.zeros(1, 7, dtype=torch.long)), {})
    padded = torch.cat([x, torch.randn(1, 5, 16, dtype=torch.float64)], 1)
    doc = torch.tensor([[0] * 7 + [PAD_DOC] * 5])
    out = block(padded, info_for(doc), {})
    torch.testing.assert_close(out[:, :7], real, rtol=0, atol=1e-12)  # other chunk count: rounding only
    assert not torch.allclose(out[:, 7:], block(padded, info_for(torch.zeros(1, 12, dtype=torch.long)), {})[:, 7:])


def test_parameter_names_and_shapes_follow_mamba_ssm():
    dim, cfg = 32, MambaConfig(d_state=16, d_conv=4, expand=2, headdim=8, ngroups=2)
    d_inner, heads, conv_dim = 64, 8, 64 + 2 * 2 * 16
    got = {name: tuple(p.shape) for name, p in MambaBlock(cfg, dim).named_parameters()}
    assert got == {
        "norm.weight": (dim,),
        "mixer.in_proj.weight": (2 * d_inner + 2 * 2 * 16 + heads, dim),  # z, x, B, C, dt
        "mixer.conv1d.weight": (conv_dim, 1, 4),
        "mixer.conv1d.bias": (conv_dim,),
        "mixer.dt_bias": (heads,),
        "mixer.A_log": (heads,),
        "mixer.D": (heads,),
        "mixer.norm.weight": (d_inner,),
        "mixer.out_proj.weight": (dim, d_inner),
    }
    with_mlp = {n for n, _ in MambaBlock(MambaConfig(mlp_ratio=4.0, headdim=8), dim).named_parameters()}
    assert {"norm2.weight", "mlp.fc1.weight", "mlp.fc2.weight"} <= with_mlp


def test_initialisation_follows_mamba_ssm():
    cfg = MambaConfig(headdim=4, dt_min=0.01, dt_max=0.05)
    m = MambaBlock(cfg, 64).mixer
    dt = F.softplus(m.dt_bias)
    assert dt.min() >= 0.01 - 1e-6 and dt.max() <= 0.05 + 1e-6
    A = torch.exp(m.A_log)
    assert A.min() >= 1 and A.max() <= 16
    assert torch.all(m.D == 1)


def test_in_proj_output_order_is_z_x_B_C_dt():
    """Zeroing the dt rows of in_proj (last rows) must equal dt = softplus(dt_bias) everywhere."""
    block = make_block()
    m = block.mixer
    dt_rows = slice(m.in_proj.weight.shape[0] - m.heads, None)
    with torch.no_grad():
        m.in_proj.weight[dt_rows] = 0
    x = torch.randn(1, 6, 16, dtype=torch.float64)
    doc = torch.zeros(1, 6, dtype=torch.long)
    y = block(x, info_for(doc), {})
    with torch.no_grad():
        m.dt_bias.add_(1.0)  # now dt depends on dt_bias only: output must change
    assert not torch.allclose(block(x, info_for(doc), {}), y)
    z_rows = slice(0, m.d_inner)
    with torch.no_grad():
        m.in_proj.weight[z_rows] = 0  # z = 0 -> silu(0) = 0 -> the mixer output is zero
    torch.testing.assert_close(block(x, info_for(doc), {}), x)


@pytest.mark.parametrize(
    "options,error",
    [({"headdim": 5}, "headdim"), ({"ngroups": 3}, "ngroups"), ({"dt_min": 0.5, "dt_max": 0.1}, "dt_min")],
)
def test_shape_checks_name_the_option(options, error):
    with pytest.raises(RecipeError, match=error):
        MambaConfig(**{**SMALL, **options}).check_shapes("model.stages[0].mixer", dim=16, fine_dim=16)


@pytest.mark.parametrize("options", [{}, {"ngroups": 2, "mlp_ratio": 3.0}, {"chunk_size": 5, "d_conv": 3}])
@pytest.mark.parametrize("length", [8, 13])
def test_forward_flops_count_every_matmul(options, length):
    """The documented formula equals the matmul FLOPs torch executes, plus the conv taps."""
    block = make_block(dim=32, dtype=torch.float32, **options)
    x = torch.randn(1, length, 32)
    with FlopCounterMode(display=False) as counter:
        block(x, info_for(torch.zeros(1, length, dtype=torch.long)), {})
    conv = 2.0 * length * block.mixer.conv_dim * block.config.d_conv
    assert block.forward_flops(length) == pytest.approx(counter.get_total_flops() + conv, rel=1e-9)


def test_bfloat16_forward_tracks_float32():
    block = make_block(dtype=torch.float32)
    x = torch.randn(2, 9, 16)
    info = info_for(torch.zeros(2, 9, dtype=torch.long))
    ref = block(x, info, {})
    out = block.to(torch.bfloat16)(x.bfloat16(), info, {})
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)


def fake_mamba_ssm(monkeypatch, calls: list):
    """A stand-in for mamba_ssm's mamba_chunk_scan_combined with its documented semantics
    (softplus(dt + dt_bias), D skip, seq_idx resets, initial/final states)."""

    def mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None,
                                  initial_states=None, seq_idx=None, dt_softplus=False,
                                  return_final_states=False, **unused):
        calls.append({"chunk_size": chunk_size, "seq_idx_dtype": seq_idx.dtype, "z": z})
        assert A.dtype == torch.float32 or A.dtype == torch.float64
        dt = dt + dt_bias
        dt = F.softplus(dt) if dt_softplus else dt
        y, final = naive_scan(x, dt, A, B, C, seq_idx.long(), initial_states.to(x.dtype))
        y = y + x * D[:, None]
        return (y, final) if return_final_states else y

    leaf = types.ModuleType("mamba_ssm.ops.triton.ssd_combined")
    leaf.mamba_chunk_scan_combined = mamba_chunk_scan_combined
    names = ["mamba_ssm", "mamba_ssm.ops", "mamba_ssm.ops.triton", "mamba_ssm.ops.triton.ssd_combined"]
    for name in names[:-1]:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, names[-1], leaf)


def test_cuda_backend_passes_mamba_ssm_the_same_problem(monkeypatch):
    calls: list = []
    fake_mamba_ssm(monkeypatch, calls)
    torch_block = make_block(backend="torch")
    kernel_block = make_block(backend="cuda")
    kernel_block.load_state_dict(torch_block.state_dict())
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    doc = torch.tensor([[0] * 9, [0] * 4 + [1] * 5])
    ref, ref_state = torch_block.forward_with_state(x, info_for(doc))
    out, state = kernel_block.forward_with_state(x, info_for(doc))
    assert calls and calls[0]["chunk_size"] == 4 and calls[0]["seq_idx_dtype"] == torch.int32
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state.ssm, ref_state.ssm, rtol=1e-10, atol=1e-10)
    # "auto" on a CPU tensor keeps the PyTorch scan even when mamba_ssm imports
    calls.clear()
    make_block(backend="auto")(x, info_for(doc), {})
    assert calls == []


def test_causal_conv1d_kernel_gets_channel_last_input_and_segment_ids(monkeypatch):
    """With causal_conv1d installed the fresh-state conv runs in its kernel (a stand-in with the
    documented semantics here: seq_idx restarts the conv, no initial state)."""
    calls: list = []
    fake_mamba_ssm(monkeypatch, [])

    def causal_conv1d_fn(x, weight, bias=None, seq_idx=None, activation=None, **unused):
        calls.append({"stride": x.stride(1), "seq_idx": seq_idx.dtype, "weight": tuple(weight.shape)})
        out, _ = causal_conv(x.transpose(1, 2), weight.unsqueeze(1), bias, seq_idx.long(),
                             x.new_zeros(x.shape[0], x.shape[1], weight.shape[-1]))
        return out.transpose(1, 2)

    module = types.ModuleType("causal_conv1d")
    module.causal_conv1d_fn = causal_conv1d_fn
    monkeypatch.setitem(sys.modules, "causal_conv1d", module)
    torch_block = make_block(backend="torch", d_conv=3)
    kernel_block = make_block(backend="cuda", d_conv=3)
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    doc = torch.tensor([[0] * 9, [0] * 4 + [1] * 5])
    ref, ref_state = torch_block.forward_with_state(x, info_for(doc))
    out, state = kernel_block.forward_with_state(x, info_for(doc))
    conv_dim = kernel_block.mixer.conv_dim
    assert calls == [{"stride": 1, "seq_idx": torch.int32, "weight": (conv_dim, 3)}]
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state.conv, ref_state.conv, rtol=0, atol=0)
    calls.clear()
    kernel_block.forward_with_state(x, info_for(doc), state)  # a handed-in state: the PyTorch conv
    assert calls == []


def test_cuda_backend_without_mamba_ssm_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "mamba_ssm", None)  # import fails
    block = make_block(backend="cuda")
    x = torch.randn(1, 4, 16, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="mamba_ssm"):
        block(x, info_for(torch.zeros(1, 4, dtype=torch.long)), {})


@pytest.mark.slow  # Inductor compiles forward and backward: about a minute of CPU
def test_compiled_block_matches_eager_forward_and_backward():
    block = make_block(dtype=torch.float32, mlp_ratio=2.0)
    x = torch.randn(2, 12, 16)
    doc = torch.tensor([[0] * 12, [0] * 5 + [1] * 7])
    info = info_for(doc)
    compiled = torch.compile(block, dynamic=False)
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    eager = block(xe, info, {})
    out = compiled(xc, info, {})
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-5)
    eager.square().sum().backward()
    grads_e = [p.grad.clone() for p in block.parameters()]
    block.zero_grad()
    out.square().sum().backward()
    torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-4, atol=1e-5)
    for p, g in zip(block.parameters(), grads_e):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-5)


RECIPES = ["byte-mamba.toml", "tiny/byte-mamba.toml", "hybrid.toml", "tiny/hybrid.toml"]


@pytest.mark.parametrize("name", RECIPES)
def test_recipes_load_with_mamba_at_the_byte_stage(name):
    recipe = load_recipe(ROOT / "recipes" / name)
    stages = recipe.model.stages
    assert stages[0].mixer.name == "mamba" and recipe.description
    if "hybrid" in name:
        assert len(stages) == 2 and stages[1].mixer.name == "attention"
    else:
        assert len(stages) == 1


@pytest.mark.parametrize("name", ["tiny/byte-mamba.toml", "tiny/hybrid.toml"])
def test_tiny_recipe_keeps_documents_apart(name):
    model = build_model(ROOT / "recipes" / name).eval()
    a, b = b"First document, about apples. ", b"Second one; about pears."
    tokens = torch.cat([encode(a), encode(b)]).unsqueeze(0)
    other = torch.cat([encode(b"Another text of equal size!!! "), encode(b)]).unsqueeze(0)
    start = len(a) + 1
    with torch.no_grad():
        la, lb = model(tokens).logits, model(other).logits
    assert tokens[0, start] == BOS
    torch.testing.assert_close(la[:, start:], lb[:, start:], rtol=0, atol=1e-5)
    assert not torch.allclose(la[:, 1:start], lb[:, 1:start])
    assert summarize(model).train_flops_per_byte > 0


@pytest.fixture
def one_thread():
    """Many small kernels: one thread avoids spinning worker threads on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("name", ["tiny/byte-mamba.toml", "tiny/hybrid.toml"])
def test_cached_generation_equals_the_full_forward(name):
    from unetlm.model.cascade import Cascade

    torch.manual_seed(0)
    model = build_model(ROOT / "recipes" / name).double().eval()
    tokens = encode(b"Cached steps, one byte at a time.")
    with torch.no_grad():
        full = model(tokens.unsqueeze(0)).logits[0]
        cascade = Cascade(model, batch=1)
        stepped = torch.stack([cascade.step([int(t)])[0] for t in tokens])
    torch.testing.assert_close(stepped, full, rtol=1e-9, atol=1e-9)


@pytest.mark.skipif(not SHAKESPEARE.exists(), reason=f"{SHAKESPEARE} is not present")
def test_tiny_byte_mamba_loss_falls_in_a_short_run(one_thread):
    torch.manual_seed(0)
    model = build_model(ROOT / "recipes" / "tiny" / "byte-mamba.toml")
    data = SHAKESPEARE.read_bytes()[:200_000]
    stream = encode(data, bos=False)
    gen = torch.Generator().manual_seed(0)
    T, batch = 128, 8
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(30):
        starts = torch.randint(0, len(stream) - T - 1, (batch,), generator=gen)
        rows = torch.stack([stream[s : s + T + 1] for s in starts.tolist()])
        rows[:, 0] = BOS
        loss = model(rows[:, :-1], targets=rows[:, 1:]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.75 * sum(losses[:3]) / 3, losses
