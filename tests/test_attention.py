"""Every attention path equals SDPA under the dense mask of the same rule (`allowed_keys`), in value
and gradient; no path builds an L x L mask; each device and backend takes the path meant for it,
and a backend that cannot keep documents apart there is refused before anything runs."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from unetlm.core.layout import PAD_DOC, byte_stage
from unetlm.mixers.attention import AttentionBlock, AttentionConfig, build_shared
from unetlm.mixers.attention_paths import (
    allowed_keys, banded_attention, block_mask_bytes, build_banded_mask, document_attention, document_starts,
    flex_block_mask,
)
from unetlm.recipe import RecipeError

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # CUDA only names a device: nothing runs there


def dense_reference(q, k, v, doc, window: int):
    """SDPA under the dense (B, 1, L, L) mask of `allowed_keys`: the math every path must equal."""
    pos = torch.arange(q.shape[2])
    mask = allowed_keys(pos[:, None], pos[None, :], doc[:, :, None], doc[:, None, :], window)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.unsqueeze(1))


@st.composite
def packed_rows(draw, max_length: int = 80):
    """(info, length): two rows of documents, the second with padding after them."""
    length = draw(st.integers(3, max_length))
    doc = torch.zeros(2, length, dtype=torch.long)
    for row in range(2):
        for start in draw(st.lists(st.integers(1, length - 1), max_size=4)):
            doc[row, start:] += 1
    valid = torch.ones(2, length, dtype=torch.bool)
    valid[1, length - draw(st.integers(0, length - 1)) :] = False
    return byte_stage(doc, valid), length


def assert_equal_with_gradients(path, info, window: int, seed: int) -> None:
    """Equal outputs at real positions, and equal gradients of a loss on them (padding outputs are
    unspecified)."""
    torch.manual_seed(seed)
    L = info.length
    q, k, v = (torch.randn(2, 3, L, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    real = (info.doc != PAD_DOC)[:, None, :, None]
    got = path(q, k, v) * real
    want = dense_reference(q, k, v, info.doc, window) * real
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    grad = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(got, (q, k, v), grad), torch.autograd.grad(want, (q, k, v), grad)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(packed_rows())
def test_document_attention_equals_the_dense_mask(case):
    """Causal attention one document at a time (padding its own), and over whole rows at once
    when every row holds one document; every position, value and gradient."""
    info, length = case
    starts = document_starts(info.doc)
    assert not starts[info.doc == PAD_DOC].any()  # padding joins the last document's run
    assert_equal_with_gradients(lambda q, k, v: document_attention(q, k, v, starts), info, 0, length)
    one = byte_stage(torch.zeros(2, length, dtype=torch.long), torch.ones(2, length, dtype=torch.bool))
    assert not document_starts(one.doc).any()
    whole = document_starts(one.doc)
    assert_equal_with_gradients(lambda q, k, v: document_attention(q, k, v, whole), one, 0, length)


@settings(max_examples=10, deadline=None)
@given(st.integers(2, 200), st.integers(0, 3))
def test_appending_to_the_last_document_changes_no_earlier_output(length, documents):
    """Bit for bit: a row's last document is computed over the same span (to the row's end) whatever
    its length, so a splitter reading a model's outputs stays stable under appending."""
    torch.manual_seed(length)
    L = length + 8
    q, k, v = (torch.randn(1, 2, L, 8) for _ in range(3))
    doc = torch.zeros(1, L, dtype=torch.long)
    for i in range(documents):
        doc[0, (i + 1) * length // (documents + 1) :] += 1
    outputs = []
    for n in (length, length + 1):
        info = byte_stage(doc, torch.arange(L) < n)
        outputs.append(document_attention(q, k, v, document_starts(info.doc))[:, :, :length])
    assert torch.equal(*outputs)


@settings(max_examples=30, deadline=None)
@given(packed_rows(), st.integers(1, 100))
def test_banded_attention_equals_the_dense_mask(case, window):
    """Any window, shorter or longer than the stage (then one block of the whole stage)."""
    info, length = case
    mask = build_banded_mask(info, window)
    block = min(window, length)
    assert mask.shape == (2, 1, -(-length // block), block, 2 * block)
    assert_equal_with_gradients(lambda q, k, v: banded_attention(q, k, v, mask, window), info, window, window)


def block(window: int = 0, backend: str = "auto", dim: int = 32) -> AttentionBlock:
    return AttentionBlock(AttentionConfig(head_dim=8, window=window, backend=backend), dim)


def test_each_device_and_mode_takes_its_path(monkeypatch):
    assert block().path(CPU, 64) == "documents" and block(0, "sdpa").path(CPU, 64) == "documents"
    assert block(16).path(CPU, 64) == "banded" and block(64).path(CPU, 64) == "documents"  # window >= stage
    assert block().path(CUDA, 64) == "flex" and block(16).path(CUDA, 64) == "flex"
    assert block(64, "sdpa").path(CUDA, 64) == "banded"  # no CUDA kernel for documents: the band, one block
    flex = block(0, "flex")
    assert flex.path(CPU, 64) == "documents"  # eager FlexAttention on the CPU has no backward
    with torch.no_grad():
        assert flex.path(CPU, 64) == "flex"
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        assert flex.path(CPU, 64) == "documents"  # never compiled there (no backward on the CPU)


def test_a_path_that_cannot_keep_documents_apart_is_refused():
    with pytest.raises(RecipeError, match=r"m.backend = 'sdpa' is invalid on cuda without a window"):
        AttentionConfig(backend="sdpa").check_device("m", "cuda", training=False)
    with pytest.raises(RecipeError, match=r"m.backend = 'flex' is invalid on cpu: FlexAttention trains on CUDA"):
        AttentionConfig(backend="flex").check_device("m", "cpu", training=True)
    AttentionConfig(backend="sdpa", window=64).check_device("m", "cuda", training=True)
    AttentionConfig(backend="sdpa").check_device("m", "cpu", training=True)


def test_what_a_stage_shares_is_linear_in_its_length():
    """At 8192 positions and 4 rows: document starts (B x L), a band of (B x L x 2W); never L x L."""
    B, L, W = 4, 8192, 64
    doc = torch.zeros(B, L, dtype=torch.long)
    doc[:, 3000:] = 1
    info = byte_stage(doc, torch.ones(B, L, dtype=torch.bool))
    assert build_shared(info, 0, "documents").numel() == B * L
    assert build_shared(info, W, "banded").numel() == B * L * 2 * W
    assert block_mask_bytes(B, L) == 4 * B * 4 * (64 + 64 * 64)  # 128-position blocks


def test_compiled_block_mask_equals_eager():
    """The block mask built by torch.compile(create_block_mask), as every stage call on CUDA
    builds it, equals the eager one (windows, documents, padding)."""
    from torch.nn.attention.flex_attention import create_block_mask

    from unetlm.mixers.attention_paths import compiled

    info = byte_stage(*_documents_and_padding(300))
    with torch._dynamo.config.patch(debug_backend_override=">=0:aot_eager"):  # dynamo and AOT, no C++
        got = flex_block_mask(info, 40, build=compiled(create_block_mask))
    want = flex_block_mask(info, 40, build=create_block_mask)
    tensors = [(a, b) for a, b in zip(got.as_tuple(), want.as_tuple()) if isinstance(a, torch.Tensor)]
    assert len(tensors) >= 4 and all(torch.equal(a, b) for a, b in tensors)


def _documents_and_padding(length: int):
    """Row 0: three documents; row 1: one document, then padding."""
    doc = torch.zeros(2, length, dtype=torch.long)
    doc[0, length // 3 :] = 1
    doc[0, 2 * length // 3 :] = 2
    valid = torch.ones(2, length, dtype=torch.bool)
    valid[1, length - length // 4 :] = False
    return doc, valid


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("length,window", [(48, 0), (48, 3), (48, 40), (20, 6)])
def test_every_block_path_equals_the_dense_mask(length, window):
    """The whole block (rotary q and k, residual, feed-forward) on each path it can take on the CPU
    (FlexAttention eagerly, without autograd) equals the block computed with the dense mask."""
    torch.manual_seed(window)
    reference = block(window, "sdpa")
    info = byte_stage(*_documents_and_padding(length))
    x = torch.randn(2, length, 32)
    want = _dense_block(reference, x, info)
    real = info.doc != PAD_DOC
    paths = (["banded"] if window else []) + ([] if 0 < window < length else ["documents"])
    for path in paths:
        with torch.no_grad():
            got = reference._finish(x, reference._attend(*_qkv(reference, x), build_shared(info, window, path), path))
        torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)
    flex = block(window, "flex")
    flex.load_state_dict(reference.state_dict())
    with torch.no_grad():
        assert flex.path(CPU, length) == "flex"
        got = flex(x, info, {})
    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)


def _qkv(attention: AttentionBlock, x):
    from einops import rearrange

    from unetlm.mixers.attention import apply_rotary, rotary_tables

    q, k, v = rearrange(attention.qkv(attention.attn_norm(x)), "b l (t h d) -> t b h l d", t=3, h=attention.heads)
    cos, sin = rotary_tables(x.shape[1], attention.head_dim, attention.config.rope_base, x.device)
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v


def _dense_block(attention: AttentionBlock, x, info):
    with torch.no_grad():
        q, k, v = _qkv(attention, x)
        return attention._finish(x, dense_reference(q, k, v, info.doc, attention.config.window))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled FlexAttention is checked on CUDA only")
def test_compiled_flex_attention_equals_the_dense_mask_on_cuda():
    torch.manual_seed(0)
    flex = block(16, "flex", dim=64).cuda()
    doc, valid = _documents_and_padding(256)
    info = byte_stage(doc.cuda(), valid.cuda())
    x = torch.randn(2, 256, 64, device="cuda")
    got = torch.compile(flex, dynamic=False)(x, info, {})
    want = _dense_block(flex, x, info)
    real = info.doc != PAD_DOC
    torch.testing.assert_close(got[real], want[real], rtol=2e-3, atol=2e-3)


def test_the_planner_counts_each_stage_block_mask_once():
    """One block mask per stage (its encoder and decoder share it), per row of the micro-batch."""
    from unetlm.model.build import build_model
    from unetlm.model.summary import stage_mask_bytes
    from unetlm.recipe import load_recipe
    from unetlm.train.distributed import World
    from unetlm.train.hardware import Hardware
    from unetlm.train.resolve import resolve_run

    recipe = load_recipe("recipes/tiny/au3.toml")
    with torch.device("meta"):
        model = build_model(recipe)
    want = [block_mask_bytes(1, length) for length in model.lengths]
    assert stage_mask_bytes(model, 1) == want and stage_mask_bytes(model, 3) == [3 * n for n in want]
    plan = resolve_run(recipe, World(0, 1, 0, torch.device("cuda")), hardware=Hardware(1, 80 << 30, None)).plan
    assert [(e.name, e.per_row) for e in plan.extra] == [("attention block masks", sum(want))]
    assert plan.extra_bytes == plan.micro_batch * sum(want) > 0