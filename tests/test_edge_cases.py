"""Inputs that break hierarchical byte models, on every tiny recipe (float32, as written):
a batch of one, empty documents, one word without a trailing space, rows much shorter than
the recipe's length, a word longer than any segment, more boundaries than a stage holds,
rows that start mid-document, padding, invalid UTF-8.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from strategies import TINY_RECIPES, load_runnable, recipe_model, recipe_params
from unetlm.core.tokens import BOS, PAD, encode

RECIPES = recipe_params(TINY_RECIPES)


def model_of(path, extra: tuple[str, ...] = ()):
    return recipe_model(path, seq_len=None, std=None, dtype=torch.float32, extra=extra)


def run(model, rows, **kw):
    tokens = rows if isinstance(rows, torch.Tensor) else torch.stack(list(rows))
    if tokens.dim() == 1:
        tokens = tokens.unsqueeze(0)
    with torch.no_grad():
        out = model(tokens, targets=_targets(tokens), **kw)
    assert out.logits.shape == (*tokens.shape, model.spec.vocab_size)
    assert out.logits.isfinite().all(), "non-finite logits"
    assert out.loss.isfinite(), "non-finite loss"
    return out


def _targets(tokens: torch.Tensor) -> torch.Tensor:
    """Next-token targets: the last position predicts the end of its document (BOS), padding nothing."""
    nxt = torch.cat([tokens[:, 1:], torch.full_like(tokens[:, :1], BOS)], dim=1)
    return torch.where(tokens == PAD, PAD, torch.where(nxt == PAD, BOS, nxt))


@pytest.mark.parametrize("path", RECIPES)
def test_batch_of_one(path):
    run(model_of(path), encode(b"hello world"))


@pytest.mark.parametrize("path", RECIPES)
def test_empty_documents(path):
    model = model_of(path)
    run(model, torch.tensor([BOS]))  # a document of nothing but its BOS
    run(model, torch.tensor([BOS, BOS]))
    alone = run(model, encode(b"hi there")).logits[0]
    after_empty = run(model, torch.cat([torch.tensor([BOS]), encode(b"hi there")])).logits[0, 1:]
    torch.testing.assert_close(after_empty, alone, rtol=1e-4, atol=1e-4)  # the empty document is invisible
    run(model, torch.cat([encode(b"hi there"), torch.tensor([BOS])]))  # an empty document at the end


@pytest.mark.parametrize("path", RECIPES)
@pytest.mark.parametrize("text", [b"hello", b"x", b"1234567", "Grüße".encode(), b"\xff\xfe\x80"],
                         ids=["word", "letter", "digits", "utf8", "invalid-utf8"])
def test_one_word_without_a_trailing_space(path, text):
    run(model_of(path), encode(text))


@pytest.mark.parametrize("path", RECIPES)
def test_rows_shorter_than_the_recipe_length(path):
    model = model_of(path)
    seq_len = model.spec.seq_len
    for n in (2, 3, seq_len // 2 + 1):
        run(model, encode((b"The cat sat on the mat. " * 64)[: n - 1]))


@pytest.mark.parametrize("path", RECIPES)
def test_row_of_exactly_the_recipe_length_and_one_more(path):
    model = model_of(path)
    seq_len = model.spec.seq_len
    row = encode((b"one two, three 456.\n" * 100)[: seq_len - 1])
    run(model, row)
    with pytest.raises(ValueError, match="seq_len"):
        model(torch.cat([row, torch.tensor([32])]).unsqueeze(0))


@pytest.mark.parametrize("path", RECIPES)
def test_word_longer_than_any_segment(path):
    run(model_of(path), encode(b"a" * (model_of(path).spec.seq_len - 1)))


@pytest.mark.parametrize("path", RECIPES)
def test_word_of_2000_letters(path):
    model = model_of(path, extra=("model.seq_len=2048", "model.stages[0].max_len=2048"))
    run(model, encode(b"x" * 2000))


def _truncating(path) -> tuple[str, ...]:
    """Overrides giving stage s >= 1 room for only 8 >> (s - 1) positions (at least 1)."""
    n = len(load_runnable(path).model.stages)
    return tuple(f"model.stages[{s}].max_len={max(1, 8 >> (s - 1))}" for s in range(1, n))


def _expected_truncation(model, tokens: torch.Tensor, masks: list[torch.Tensor]) -> list[tuple[int, int]]:
    """(dropped, kept) per byte-level transition, counted directly from the masks."""
    positions = np.flatnonzero(tokens.numpy() != PAD)
    out = []
    for mask, length in zip(masks, model.lengths[1:]):
        candidates = positions[mask.numpy()[positions]]
        out.append((max(0, len(candidates) - length), min(len(candidates), length)))
        positions = candidates[:length]
    return out


@pytest.mark.parametrize("path", RECIPES)
def test_more_boundaries_than_a_stage_holds(path):
    model = model_of(path, extra=_truncating(path))
    tokens = encode(b"Once upon a time, 12345 tiny words sat in rows. " * 6)[: min(300, model.spec.seq_len)]
    masks = model.split(tokens.unsqueeze(0), torch.zeros(1, len(tokens), dtype=torch.long))
    out = run(model, tokens)
    expected = _expected_truncation(model, tokens, [m[0] for m in masks])
    for s, (dropped, kept) in enumerate(expected):
        assert int(out.truncated[s][0]) == dropped, f"transition {s}"
        assert int(out.positions[s][0]) == kept, f"transition {s}"
    if expected:
        assert expected[0][0] > 0, "the first stage was meant to overflow"
    for s in range(len(expected), len(out.truncated)):  # learned splitters
        assert int(out.truncated[s][0]) >= 0 and int(out.positions[s][0]) <= model.lengths[s + 1]


@pytest.mark.parametrize("path", RECIPES)
def test_row_starting_mid_document(path):
    model = model_of(path)
    row = torch.cat([encode(b"middle of a sentence", bos=False), encode(b"Next doc.")])
    run(model, row)
    run(model_of(path, extra=_truncating(path)), row)


@pytest.mark.parametrize("path", RECIPES)
def test_padded_rows_match_unpadded_ones(path):
    model = model_of(path)
    texts = [b"short", b"a somewhat longer row, with 123 digits.", b""]
    longest = max(len(t) for t in texts) + 1
    rows = [torch.cat([encode(t), torch.full((longest - len(t) - 1,), PAD)]) for t in texts]
    batch = run(model, rows).logits
    for b, text in enumerate(texts):
        alone = run(model, encode(text)).logits[0]
        torch.testing.assert_close(batch[b, : len(text) + 1], alone, rtol=1e-5, atol=1e-5)
