"""Blockwise sliding-window attention equals full attention under the full mask."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from unetlm.mixers.attention import allowed_keys, banded_attention, build_banded_mask, build_mask, is_banded
from unetlm.core.layout import byte_stage


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
