"""Multiple-choice tasks from JSONL, scored as in the AU-Net paper.

Each line is ``{"context": str, "choices": [str, ...], "answer": int}``. A choice is appended
to the context as is (put any separating space in the choice or the context), the model reads
``BOS context choice`` and the choice's negative log-likelihood is summed over its bytes. The
prediction is the choice with the lowest NLL per character (Unicode characters of the choice);
ties go to the earlier choice. When ``BOS context choice`` exceeds ``seq_len`` the oldest tokens
are dropped (the window ends at the choice's last byte); a choice longer than ``seq_len`` bytes
is an error.
"""
from __future__ import annotations

import json
from pathlib import Path

import attrs
import numpy as np

from unetlm.eval.bootstrap import bootstrap_ci
from unetlm.eval.score import score_spans, scoring_stream


@attrs.define
class ChoiceItem:
    context: str
    choices: list[str]
    answer: int


@attrs.define
class ChoiceRow:
    name: str
    items: int
    accuracy: float
    ci: tuple[float, float]
    predictions: list[int]

    def to_dict(self) -> dict:
        return attrs.asdict(self, recurse=False) | {"ci": list(self.ci)}


def load_choice_items(path: str | Path) -> list[ChoiceItem]:
    """The items of a JSONL file; a malformed line is a ValueError naming file and line."""
    items = []
    path = Path(path)
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not JSON: {exc}") from None
        ok = (
            isinstance(row, dict)
            and isinstance(row.get("context"), str)
            and isinstance(row.get("choices"), list)
            and len(row["choices"]) >= 2
            and all(isinstance(c, str) and c for c in row["choices"])
            and isinstance(row.get("answer"), int)
            and 0 <= row["answer"] < len(row["choices"])
        )
        if not ok:
            raise ValueError(
                f"{where}: expected {{\"context\": str, \"choices\": [two or more non-empty str], "
                f"\"answer\": index into choices}}"
            )
        items.append(ChoiceItem(row["context"], row["choices"], row["answer"]))
    if not items:
        raise ValueError(f"{path}: no items")
    return items


def continuation_scores(model, pairs: list[tuple[bytes, bytes]], batch_size: int = 8) -> list[tuple[float, bool]]:
    """(summed NLL in nats, greedy) of each continuation given BOS + its context, one window per
    pair; greedy: every token of the continuation is the model's most likely next token.

    Context and continuation are tokenized apart, so a tokenized model scores exactly the
    continuation's tokens."""
    seq_len = model.spec.seq_len
    sizes = [(len(model.tokenizer.encode(c)), len(model.tokenizer.encode(x))) for c, x in pairs]
    spans, offset = [], 0
    for n_context, n_continuation in sizes:
        if not n_continuation or n_continuation > seq_len:
            raise ValueError(f"a continuation must hold 1 to seq_len = {seq_len} tokens (got {n_continuation})")
        n = n_context + n_continuation  # tokens of this document: stream tokens offset + 1 .. offset + n
        spans.append((offset + max(0, n - seq_len), offset + n_context, offset + n))  # input p predicts p + 1
        offset += n + 1
    scores = score_spans(model, scoring_stream(list(pairs), model), spans, batch_size)
    return [
        (float(scores.nll[first:stop].sum()), bool(scores.greedy[first:stop].all())) for _, first, stop in spans
    ]


def continuation_nll(model, pairs: list[tuple[bytes, bytes]], batch_size: int = 8) -> list[float]:
    """Summed NLL in nats of each continuation given BOS + its context (see :func:`continuation_scores`)."""
    return [nll for nll, _ in continuation_scores(model, pairs, batch_size)]


def predict(items: list[ChoiceItem], nll: list[float]) -> list[int]:
    """Index of the lowest NLL per character in each item (``nll`` flattened over items' choices)."""
    out, k = [], 0
    for item in items:
        per_char = [nll[k + j] / len(c) for j, c in enumerate(item.choices)]
        out.append(int(np.argmin(per_char)))
        k += len(item.choices)
    return out


def evaluate_choice(
    model, path: str | Path, batch_size: int = 8, resamples: int = 1000, seed: int = 0
) -> ChoiceRow:
    items = load_choice_items(path)
    pairs = [(it.context.encode("utf-8"), c.encode("utf-8")) for it in items for c in it.choices]
    predictions = predict(items, continuation_nll(model, pairs, batch_size))
    correct = np.array([p == it.answer for p, it in zip(predictions, items)], dtype=np.float64)
    ci = bootstrap_ci(correct, resamples=resamples, seed=seed)
    return ChoiceRow(str(path), len(items), float(correct.mean()), ci, predictions)
