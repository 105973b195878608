"""Causality of whole models, for every registered component and every tiny recipe.

Each splitter, pooler, upsampler and mixer example config is put in a tiny float64 2-stage
model (mixers at both stages), also with a coarse stage short enough to truncate; each
``recipes/tiny/*.toml`` is built with rows cut to 64 bytes. Properties:

* changing bytes after position t leaves the logits at positions <= t unchanged (token
  t + 1 is byte t, after the BOS token at index 0); appending bytes likewise;
* d logits[<= t] / d embedding[> t] == 0 (catches leaks too small for a random change);
* in a row of two packed documents, neither document's logits depend on the other's bytes,
  in value and in gradient; in value also when the row gives explicit document ids, with
  and without BOS tokens (rows short enough that no stage truncates).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

from strategies import TINY_RECIPES, case_id, component_cases, component_model, documents, recipe_model
from unetlm.core.tokens import BOS, PAD, encode

KINDS = ("splitter", "pooler", "upsampler", "mixer")
TRUNCATING_MAX_LEN = 6  # the coarse stage keeps only this many boundaries
RECIPE_SEQ_LEN = 64
RECIPE_COST = 3  # a recipe model costs about this many component models per forward


def _cases(truncating: bool = False) -> list:
    params = []
    for kind in KINDS:
        for name, options in component_cases(kind):
            tag = f"{kind}:{case_id(name, options)}"
            params.append(pytest.param(("component", kind, name, options, None), id=tag))
            if truncating:
                params.append(pytest.param(
                    ("component", kind, name, options, TRUNCATING_MAX_LEN), id=f"{tag}:max_len={TRUNCATING_MAX_LEN}"
                ))
    params += [pytest.param(("recipe", path), id=f"recipe:{path.stem}") for path in TINY_RECIPES]
    return params


def _model(case):
    if case[0] == "component":
        _, kind, name, options, max_len = case
        return component_model(kind, name, options, max_len)
    return recipe_model(case[1], seq_len=RECIPE_SEQ_LEN)


def _check(case, examples: int, explicit: tuple[dict, ...] = (), **strategies):
    """Decorate a property with ``given(**strategies)`` and run it, with fewer examples for
    the (costlier) recipe models; ``explicit`` examples always run first."""
    n = examples if case[0] == "component" else max(2, examples // RECIPE_COST)

    def run(prop):
        test = given(**strategies)(prop)
        for values in explicit:
            test = example(**values)(test)
        settings(max_examples=n)(test)()

    return run


def _limit(model, packed: bool = False) -> int:
    """Longest row to test: the sequence length, or for packed rows short enough that no
    stage truncates (a truncated stage legitimately couples the documents)."""
    return min(model.lengths) if packed else model.lengths[0]


def _row(data: bytes, limit: int) -> torch.Tensor:
    return encode(data[: limit - 1])


def _logits(model, rows: list[torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.stack(rows)).logits


def _embedding_grads(model, tokens: torch.Tensor, selections: list[slice]) -> torch.Tensor:
    """Row b of a batch of copies of ``tokens``: the gradient of a random projection of
    ``logits[selections[b]]`` w.r.t. the byte embeddings (B, T, d), in one backward pass."""
    captured = {}

    def hook(_module, _inputs, output):
        captured["x"] = output.detach().requires_grad_(True)
        return captured["x"]

    handle = model.embed.register_forward_hook(hook)
    try:
        logits = model(tokens.expand(len(selections), -1)).logits
    finally:
        handle.remove()
    gen = torch.Generator().manual_seed(1)
    total = sum((logits[b, sel] * torch.randn(logits[b, sel].shape, generator=gen, dtype=logits.dtype)).sum()
                for b, sel in enumerate(selections))
    (grad,) = torch.autograd.grad(total, captured["x"])
    return grad


def _assert_invisible(grad: torch.Tensor, positions: slice, what: str) -> None:
    scale = max(1.0, float(grad.abs().max()))
    leak = grad[positions].abs()
    assert leak.numel() == 0 or float(leak.max()) <= 1e-12 * scale, (
        f"{what}: a gradient of {float(leak.max()):.3g} reaches positions {positions} that it must not see"
    )


# How a row marks its documents: BOS tokens alone (ids from them), BOS tokens with explicit ids,
# explicit ids without BOS (a window cut inside each document). Ids need not be ordered.
PACKINGS = ("bos", "bos+doc", "doc")
FIRST_DOC, SECOND_DOC = 5, 2


def _packed_row(a: bytes, b: bytes, packing: str) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """(tokens, doc ids or None, index of the second document's first token)."""
    bos = packing != "doc"
    first, second = encode(a, bos=bos), encode(b, bos=bos)
    doc = torch.cat([torch.full_like(first, FIRST_DOC), torch.full_like(second, SECOND_DOC)])
    return torch.cat([first, second]), (None if packing == "bos" else doc), len(first)


def _packed_logits(model, pairs: list[tuple[bytes, bytes]], packing: str) -> tuple[torch.Tensor, list[int]]:
    """Logits (len(pairs), T, V) of the packed rows (PAD after the shorter ones), and where each
    row's second document starts."""
    rows = [_packed_row(a, b, packing) for a, b in pairs]
    T = max(len(t) for t, _, _ in rows)
    tokens = torch.stack([F.pad(t, (0, T - len(t)), value=PAD) for t, _, _ in rows])
    doc = None if packing == "bos" else torch.stack([F.pad(d, (0, T - len(d)), value=FIRST_DOC) for _, d, _ in rows])
    with torch.no_grad():
        return model(tokens, doc=doc).logits, [n for _, _, n in rows]


def _crop_pair(model, a: bytes, b: bytes) -> tuple[bytes, bytes]:
    """Crop two documents so that the packed row fits every stage without truncation."""
    room = _limit(model, packed=True) - 2
    a = a[: max(1, room // 2)]
    return a, b[: room - len(a)]


@pytest.mark.parametrize("case", _cases(truncating=True))
def test_changing_later_bytes_keeps_earlier_logits(case):
    model = _model(case)

    @_check(case, 12, data=documents, draw=st.data())
    def prop(data, draw):
        x = _row(data, _limit(model))
        t = draw.draw(st.integers(0, len(x) - 1), label="cut (token index)")
        n_new = len(x) - 1 - t
        tail = draw.draw(st.binary(min_size=n_new, max_size=n_new), label="new bytes after the cut")
        y = x.clone()
        y[t + 1 :] = torch.tensor(list(tail), dtype=torch.long)
        logits = _logits(model, [x, y])
        torch.testing.assert_close(logits[0, : t + 1], logits[1, : t + 1], rtol=0, atol=1e-10)
        if n_new and x[-1] != y[-1]:
            assert not torch.allclose(logits[0, -1], logits[1, -1]), "the model ignores its input"


@pytest.mark.parametrize("case", _cases())
def test_appending_bytes_keeps_earlier_logits(case):
    model = _model(case)

    @_check(case, 5, x=documents, y=documents)
    def prop(x, y):
        short, long = _row(x, _limit(model)), _row(x + y, _limit(model))
        a = _logits(model, [short])[0]
        b = _logits(model, [long])[0, : len(short)]
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("case", _cases())
def test_packed_documents_do_not_see_each_other(case):
    model = _model(case)

    # the second document opens with a word (positions before its first boundary), and the
    # first one shrinks from many bytes to one: the second then starts earlier in the row
    shrink = {"a": b"one two three four five", "b": b"sixty-six", "a2": b"x", "b2": b"seven"}

    @_check(case, 6, explicit=(shrink,), a=documents, b=documents, a2=documents, b2=documents)
    def prop(a, b, a2, b2):
        a, b = _crop_pair(model, a, b)
        a2, b2 = (a2 or b"a")[: max(1, len(a))], b2[: len(b)]
        for packing in PACKINGS if a and b else PACKINGS[:2]:  # "doc" needs two non-empty documents
            logits, (n, n2, _) = _packed_logits(model, [(a, b), (a2, b), (a, b2)], packing)
            assert logits.isfinite().all()
            torch.testing.assert_close(logits[2, :n], logits[0, :n], rtol=0, atol=1e-10,
                                       msg=lambda m: f"{packing}: {m}")
            # when the first document changes, the second may sit at other positions; rotary
            # attention gives the same scores there up to rounding of its float32 tables
            second = logits[0, n : n + len(b) + 1]
            torch.testing.assert_close(logits[1, n2 : n2 + len(second)], second, rtol=1e-5, atol=1e-5,
                                       msg=lambda m: f"{packing}, second document: {m}")


@pytest.mark.parametrize("case", _cases())
def test_no_gradient_from_the_future_or_the_other_document(case):
    model = _model(case)

    @_check(case, 5, a=documents, b=documents, draw=st.data())
    def prop(a, b, draw):
        a, b = _crop_pair(model, a, b + b" end")
        tokens, _, _ = _packed_row(a, b, "bos")
        n, T = len(a) + 1, len(tokens)
        assert tokens[n] == BOS
        cut_a = draw.draw(st.integers(0, n - 1), label="cut in the first document")
        cut_b = draw.draw(st.integers(n, T - 2), label="cut in the second document")
        grad = _embedding_grads(model, tokens, [slice(0, cut_a + 1), slice(n, cut_b + 1)])
        _assert_invisible(grad[0], slice(cut_a + 1, None), f"logits[:{cut_a + 1}] (first document)")
        _assert_invisible(grad[1], slice(0, n), f"logits[{n}:{cut_b + 1}] (second document)")
        _assert_invisible(grad[1], slice(cut_b + 1, None), f"logits[{n}:{cut_b + 1}] (second document)")
        assert float(grad[0, : cut_a + 1].abs().max()) > 0, "the logits do not depend on the embeddings"
        assert float(grad[1, n : cut_b + 1].abs().max()) > 0, "the logits do not depend on the embeddings"
