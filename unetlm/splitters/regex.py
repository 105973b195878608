"""Regex boundaries, and the AU-Net presets ``word``, ``word2``, ``word4``.

Presets: bytes fall into classes (whitespace, newline, ASCII digit, ASCII punctuation, other =
letters and every non-ASCII byte). A *word* boundary is the first whitespace byte after a
non-whitespace byte; a *forced* boundary is every newline, the first byte of each punctuation
run and the first byte of each group of 1-3 digits. Preset ``wordN`` keeps every N-th word
boundary counted since the last kept or forced one, and every forced one. Each decision reads
only bytes at or before it, so the presets are exactly stable (``a  \\nb`` promotes nothing),
and word4 is nested in word2, which is nested in word.

Patterns: a boundary at byte t when the pattern matches a span of ``data`` that *ends* at t
(the regex engine is given the bytes up to t only, at most ``window`` of them), so any pattern
is stable by construction. ``every = n`` keeps every n-th such boundary.
"""
from __future__ import annotations

from typing import Literal

import attrs
import numpy as np
import regex

from unetlm.recipe.errors import RecipeError
from unetlm.recipe.structure import positive
from unetlm.splitters.base import Splitter

PRESET_GROUP = {"word": 1, "word2": 2, "word4": 4}

OTHER, SPACE, NEWLINE, DIGIT, PUNCT = 0, 1, 2, 3, 4
_CLASS = np.zeros(256, dtype=np.int8)
for _b in b" \t\r\x0b\x0c":
    _CLASS[_b] = SPACE
_CLASS[ord("\n")] = NEWLINE
for _b in b"0123456789":
    _CLASS[_b] = DIGIT
for _b in b"!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~":
    _CLASS[_b] = PUNCT


def word_events(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(word, forced) boolean arrays for the presets; both causal."""
    cls = _CLASS[np.frombuffer(data, dtype=np.uint8)]
    prev = np.concatenate([[NEWLINE], cls[:-1]]) if len(cls) else cls
    word = (cls == SPACE) & (prev != SPACE) & (prev != NEWLINE)
    forced = (cls == NEWLINE) | ((cls == PUNCT) & (prev != PUNCT))
    is_digit = cls == DIGIT
    if is_digit.any():
        run_start = is_digit & (prev != DIGIT)
        idx = np.arange(len(cls))
        start_idx = np.maximum.accumulate(np.where(run_start, idx, 0))
        forced |= is_digit & ((idx - start_idx) % 3 == 0)
    return word, forced


def keep_every(word: np.ndarray, forced: np.ndarray, group: int) -> np.ndarray:
    """Keep every ``group``-th word event since the last kept or forced one, and every forced one."""
    if group == 1:
        return word | forced
    out = forced.copy()
    count = 0
    for t in np.flatnonzero(word | forced):
        if forced[t]:
            count = 0
            continue
        count += 1
        if count == group:
            out[t] = True
            count = 0
    return out


@attrs.define
class RegexConfig:
    preset: Literal["word", "word2", "word4"] | None = None
    pattern: str | None = None
    every: int = attrs.field(default=1, validator=positive)
    window: int = attrs.field(default=64, validator=positive)

    def __attrs_post_init__(self) -> None:
        if (self.preset is None) == (self.pattern is None):
            raise RecipeError("exactly one of 'preset' (word, word2, word4) or 'pattern' must be given")
        if self.pattern is not None:
            try:
                regex.compile(self.pattern.encode("utf-8"))
            except regex.error as exc:
                raise RecipeError(f"pattern = {self.pattern!r} is not a valid regex: {exc}") from None


class RegexSplitter(Splitter):
    Config = RegexConfig
    examples = [
        {"preset": "word"},
        {"preset": "word2"},
        {"preset": "word4"},
        {"pattern": r"[.!?]\s", "every": 1},
        {"pattern": r"\S(?=\s)|\s", "every": 2},
    ]

    def __init__(self, config: RegexConfig) -> None:
        super().__init__(config)
        if config.pattern is not None:
            self._compiled = regex.compile(b"(?:" + config.pattern.encode("utf-8") + rb")\Z")

    def boundaries(self, data: bytes, parent: np.ndarray) -> np.ndarray:
        if self.config.preset is not None:
            word, forced = word_events(data)
            return keep_every(word, forced, PRESET_GROUP[self.config.preset]) & parent
        search, window = self._compiled.search, self.config.window
        hits = np.fromiter(
            (search(data, max(0, t + 1 - window), t + 1) is not None for t in range(len(data))),
            dtype=bool,
            count=len(data),
        )
        hits &= parent
        if self.config.every == 1:
            return hits
        return keep_every(hits, np.zeros_like(hits), self.config.every)
