"""Blockwise sliding-window attention equals full attention under the full mask; FlexAttention
equals SDPA (eager on the CPU, compiled on CUDA) and is not compiled where it is wrong."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from unetlm.core.layout import PAD_DOC, byte_stage
from unetlm.mixers.attention import (
    AttentionBlock, AttentionConfig, allowed_keys, banded_attention, build_banded_mask, build_mask, is_banded,
)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 12), st.integers(3, 80), st.data())
def test_banded_attention_equals_full_masked_attention(window, length, data):
    doc_starts = data.draw(st.lists(st.integers(1, length - 1), max_size=3))
    pad = data.draw(st.integers(0, length // 2))
    doc = torch.zeros(2, length, dtype=torch.long)
    for start in doc_starts:
        doc[0, start:] += 1
    valid = torch.ones(2, length, dtype=torch.bool)
    valid[1, length - pad :] = False
    info = byte_stage(doc, valid)
    torch.manual_seed(length * 13 + window)
    q, k, v = (torch.randn(2, 3, length, 4, dtype=torch.float64) for _ in range(3))
    pos = torch.arange(length)
    full = allowed_keys(pos[:, None], pos[None, :], info.doc[:, :, None], info.doc[:, None, :], window).unsqueeze(1)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=full)
    got = banded_attention(q, k, v, build_banded_mask(info, window), window)  # any length, banded or not
    assert torch.allclose(got, want, atol=1e-12)
    if is_banded(length, window):
        assert build_mask(info, window, "sdpa").shape == (2, 1, -(-length // window), window, 2 * window)


def test_the_band_is_used_only_when_it_saves_work():
    assert is_banded(512, 64) and is_banded(9, 3)
    assert not is_banded(96, 64) and not is_banded(512, 0) and not is_banded(8, 3)


def flex_and_sdpa_blocks(window: int, dim: int = 32, device: str = "cpu"):
    torch.manual_seed(window)
    sdpa = AttentionBlock(AttentionConfig(head_dim=8, window=window, backend="sdpa"), dim).to(device)
    flex = AttentionBlock(AttentionConfig(head_dim=8, window=window, backend="flex"), dim).to(device)
    flex.load_state_dict(sdpa.state_dict())
    return sdpa, flex


def documents_and_padding(length: int, device: str = "cpu"):
    """Row 0: three documents; row 1: one document, then padding."""
    doc = torch.zeros(2, length, dtype=torch.long, device=device)
    doc[0, length // 3 :] = 1
    doc[0, 2 * length // 3 :] = 2
    valid = torch.ones(2, length, dtype=torch.bool, device=device)
    valid[1, length - length // 4 :] = False
    return byte_stage(doc, valid)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("length,window", [(48, 0), (48, 3), (48, 40), (20, 6)])
def test_eager_flex_attention_equals_sdpa(length, window):
    """Sliding window (banded SDPA or not), document starts, padding, rotary on q and k."""
    sdpa, flex = flex_and_sdpa_blocks(window)
    info = documents_and_padding(length)
    x = torch.randn(2, length, 32)
    with torch.no_grad():  # eager FlexAttention has no backward on the CPU
        memo: dict = {}
        flex.prepare(info, memo)
        got = flex(x, info, memo)
        assert any(key[:2] == ("attention-mask", "flex") for key in memo if isinstance(key, tuple))
        want = sdpa(x, info, {})
    real = info.doc != PAD_DOC
    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)


def test_flex_off_cuda_runs_only_eager_and_without_autograd(monkeypatch):
    _, flex = flex_and_sdpa_blocks(0)
    auto = AttentionBlock(AttentionConfig(head_dim=8), 32)
    cpu = torch.device("cpu")
    with torch.no_grad():
        assert flex._backend(cpu) == "flex" and auto._backend(cpu) == "sdpa"
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        assert flex._backend(cpu) == "sdpa"  # compiled FlexAttention is wrong on the CPU
        monkeypatch.undo()
        flex.compiled = True
        assert flex._backend(cpu) == "sdpa"
        flex.compiled = False
    assert flex._backend(cpu) == "sdpa"  # and has no backward there


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled FlexAttention is checked on CUDA only")
def test_compiled_flex_attention_equals_sdpa_on_cuda():
    sdpa, flex = flex_and_sdpa_blocks(16, dim=64, device="cuda")
    info = documents_and_padding(256, device="cuda")
    x = torch.randn(2, 256, 64, device="cuda")
    got = torch.compile(flex, dynamic=False)(x, info, {})
    want = sdpa(x, info, {})
    real = info.doc != PAD_DOC
    torch.testing.assert_close(got[real], want[real], rtol=2e-3, atol=2e-3)
