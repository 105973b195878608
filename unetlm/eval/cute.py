"""Character-manipulation tasks in the spirit of CUTE (Edman et al., 2024), scored by exact match.

Tasks act on the characters of a word (``*_chars``) or the words of a short sentence
(``*_words``): spell, reverse, insert, delete, swap, substitute (spelling only at character
level). Words come from a word list (one per line) or from a text (its ``\\w+`` runs); a
sentence is a run of 3 to 6 consecutive words of the source. Items are drawn deterministically
from ``seed`` and the task name. A prompt holds ``shots`` solved examples of the same task and
the question; the model's greedy continuation up to the closing quote must equal the answer::

    Question: Reverse the letters of "apple".
    Answer: "elppa"

    Question: Reverse the letters of "hello".
    Answer: "
"""
from __future__ import annotations

import re
import zlib
from pathlib import Path
from typing import Callable, Sequence

import attrs
import numpy as np

from unetlm.eval.bootstrap import bootstrap_ci


def reverse(seq: Sequence) -> list:
    return list(seq)[::-1]


def insert_after(seq: Sequence, after, new) -> list:
    """``new`` after every occurrence of ``after``."""
    out = []
    for x in seq:
        out += [x, new] if x == after else [x]
    return out


def delete(seq: Sequence, target) -> list:
    return [x for x in seq if x != target]


def swap(seq: Sequence, a, b) -> list:
    """Every ``a`` becomes ``b`` and every ``b`` becomes ``a``."""
    return [b if x == a else a if x == b else x for x in seq]


def substitute(seq: Sequence, old, new) -> list:
    return [new if x == old else x for x in seq]


@attrs.define(frozen=True)
class Example:
    question: str
    answer: str


@attrs.define(frozen=True)
class CuteItem:
    task: str
    prompt: str
    answer: str


def _join(unit: str, seq: list[str]) -> str:
    return "".join(seq) if unit == "chars" else " ".join(seq)


def _others(rng: np.random.Generator, pool: list[str], seq: list[str]) -> str | None:
    """A random element of ``pool`` that does not occur in ``seq``."""
    candidates = sorted(set(pool) - set(seq))
    return candidates[rng.integers(len(candidates))] if candidates else None


def _once(rng: np.random.Generator, seq: list[str]) -> tuple[str, str] | None:
    """Two distinct elements that each occur exactly once in ``seq``, in order of appearance."""
    single = [x for x in seq if seq.count(x) == 1]
    if len(single) < 2:
        return None
    i, j = sorted(rng.choice(len(single), size=2, replace=False))
    return single[i], single[j]


def _spell(rng, unit, seq, pool):
    return Example(f'Spell out "{_join(unit, seq)}" with a space between letters.', " ".join(seq))


def _reverse(rng, unit, seq, pool):
    what = "the letters of" if unit == "chars" else "the order of the words in"
    return Example(f'Reverse {what} "{_join(unit, seq)}".', _join(unit, reverse(seq)))


def _new_and_present(rng: np.random.Generator, pool: list[str], seq: list[str]) -> tuple[str, str] | None:
    """An element of the pool absent from ``seq``, then an element of ``seq`` (None: the pool has no new one)."""
    new = _others(rng, pool, seq)
    return None if new is None else (new, seq[rng.integers(len(seq))])


def _insert(rng, unit, seq, pool):
    picked = _new_and_present(rng, pool, seq)
    if picked is None:
        return None
    new, after = picked
    question = f'Add "{new}" after every "{after}" in "{_join(unit, seq)}".'
    return Example(question, _join(unit, insert_after(seq, after, new)))


def _delete(rng, unit, seq, pool):
    target = seq[rng.integers(len(seq))]
    if all(x == target for x in seq):
        return None
    return Example(f'Delete every "{target}" from "{_join(unit, seq)}".', _join(unit, delete(seq, target)))


def _swap(rng, unit, seq, pool):
    pair = _once(rng, seq)
    if pair is None:
        return None
    a, b = pair
    return Example(f'Swap "{a}" and "{b}" in "{_join(unit, seq)}".', _join(unit, swap(seq, a, b)))


def _substitute(rng, unit, seq, pool):
    picked = _new_and_present(rng, pool, seq)
    if picked is None:
        return None
    new, old = picked
    question = f'Replace every "{old}" with "{new}" in "{_join(unit, seq)}".'
    return Example(question, _join(unit, substitute(seq, old, new)))


_MAKERS: dict[str, Callable] = {
    "spell": _spell, "reverse": _reverse, "insert": _insert, "delete": _delete, "swap": _swap,
    "substitute": _substitute,
}
TASKS = [f"{op}_chars" for op in _MAKERS] + [f"{op}_words" for op in _MAKERS if op != "spell"]


def words_from_list(path: str | Path) -> list[str]:
    """One word per line; lines with whitespace inside or a double quote are skipped."""
    lines = (line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines())
    return [w for w in lines if w and not re.search(r'[\s"]', w)]


def words_in(text: str) -> list[str]:
    """The ``\\w+`` runs of a text, in order."""
    return re.findall(r"\w+", text)


def words_from_text(path: str | Path) -> list[str]:
    return words_in(Path(path).read_text(encoding="utf-8"))


def make_example(task: str, rng: np.random.Generator, words: list[str]) -> Example | None:
    """One example of ``task`` drawn from ``words`` (None when the draw does not suit the task)."""
    op, unit = task.rsplit("_", 1)
    if unit == "chars":
        word = words[rng.integers(len(words))]
        if len(word) < 2:
            return None
        pool = sorted({ch for w in words for ch in w})
        return _MAKERS[op](rng, unit, list(word), pool)
    k = int(rng.integers(3, 7))
    if len(words) < k:
        return None
    start = int(rng.integers(len(words) - k + 1))
    return _MAKERS[op](rng, unit, words[start : start + k], words)


def format_prompt(shots: list[Example], question: str) -> str:
    solved = "".join(f'Question: {e.question}\nAnswer: "{e.answer}"\n\n' for e in shots)
    return f'{solved}Question: {question}\nAnswer: "'


def make_items(task: str, words: list[str], count: int, seed: int = 0, shots: int = 3) -> list[CuteItem]:
    """``count`` items of ``task``, each with ``shots`` solved examples; a pure function of its arguments."""
    if task not in TASKS:
        raise ValueError(f"unknown CUTE task {task!r}; tasks: {', '.join(TASKS)}")
    if not words:
        raise ValueError("the CUTE source holds no words")
    rng = np.random.default_rng([seed, zlib.crc32(task.encode())])
    items, tries = [], 0
    while len(items) < count:
        drawn: list[Example] = []
        while len(drawn) < shots + 1:
            tries += 1
            if tries > 100 * (count * (shots + 1) + 10):
                raise ValueError(f"the CUTE source has too few suitable words for task {task!r}")
            example = make_example(task, rng, words)
            if example is not None and all(example.question != d.question for d in drawn):
                drawn.append(example)
        query = drawn[-1]
        items.append(CuteItem(task, format_prompt(drawn[:-1], query.question), query.answer))
    return items


@attrs.define
class CuteRow:
    name: str
    items: int
    exact_match: float
    ci: tuple[float, float]

    def to_dict(self) -> dict:
        return attrs.asdict(self, recurse=False) | {"ci": list(self.ci)}


def greedy_answers(model, items: list[CuteItem], batch_size: int = 8) -> list[bytes]:
    """Greedy continuations of the prompts, each cut at its closing quote (batched, cached if possible)."""
    from unetlm.model.generate import generate

    out = []
    for i in range(0, len(items), batch_size):
        chunk = items[i : i + batch_size]
        prompts = [it.prompt.encode("utf-8") for it in chunk]
        max_bytes = max(len(it.answer.encode("utf-8")) for it in chunk) + 1  # room for the closing quote
        options = dict(temperature=0.0, stop=['"'], seed=0)
        try:
            texts = generate(model, prompts, max_bytes, **options)
        except NotImplementedError:  # a component without the incremental step API
            texts = generate(model, prompts, max_bytes, cached=False, **options)
        out += list(texts)
    return out


def evaluate_cute(
    model, items: list[CuteItem], batch_size: int = 8, resamples: int = 1000, seed: int = 0
) -> list[CuteRow]:
    """Exact-match accuracy per task (in order of first appearance), each with a 95% CI over items."""
    answers = greedy_answers(model, items, batch_size)
    rows = []
    for task in dict.fromkeys(it.task for it in items):
        hits = np.array(
            [a == it.answer.encode("utf-8") for a, it in zip(answers, items) if it.task == task], dtype=np.float64
        )
        rows.append(CuteRow(task, len(hits), float(hits.mean()), bootstrap_ci(hits, resamples=resamples, seed=seed)))
    return rows
