"""Regex boundaries, and the word presets ``word``, ``word2``, ``word4`` and ``lingua-word``,
``lingua-word2``, ``lingua-word4``.

Presets ``lingua-wordN`` follow the splitting of lingua's AU-Net, which the AU-Net recipes use
(Unicode character classes; words grouped within runs of single-spaced words; see
:mod:`unetlm.splitters.lingua_words`).

Presets ``word``, ``word2``, ``word4``: bytes fall into classes (whitespace, newline, ASCII
digit, ASCII punctuation, other = letters and every non-ASCII byte). A *word* boundary is the
first whitespace byte after a non-whitespace byte; a *forced* boundary is every newline, the
first byte of each punctuation run and the first byte of each group of 1-3 digits. Preset
``wordN`` keeps every N-th word boundary counted since the last kept or forced one, and every
forced one. Each decision reads only bytes at or before it, so the presets are exactly stable
(``a  \\nb`` promotes nothing), and word4 is nested in word2, which is nested in word (the
``lingua-wordN`` presets likewise).

Patterns: a boundary at byte t when the pattern matches a span of ``data`` that *ends* at t
(the regex engine is given the bytes up to t only, at most ``window`` of them: lookbehinds,
``^`` and ``\\b`` see no further back), so any pattern is stable by construction. ``every = n``
keeps every n-th such boundary. ``every`` and ``window`` belong to patterns: given with a
preset they are a recipe error (the presets group words themselves: ``word2``, ``word4``).

Incremental states (:meth:`RegexSplitter.start`): a preset keeps the previous class and a few
counters (O(1) per byte; ``lingua-wordN`` also the bytes of an unfinished UTF-8 character); a
pattern keeps at most 2 * ``window`` recent bytes and runs one end-anchored search over the
last ``window`` of them (O(window) per byte, never the history).
"""
from __future__ import annotations

from typing import Literal

import attrs
import numpy as np
import regex

from unetlm.recipe.errors import RecipeError
from unetlm.recipe.validators import positive
from unetlm.splitters.base import Splitter
from unetlm.splitters.lingua_words import LinguaWordState, lingua_boundaries

PRESET_GROUP = {"word": 1, "word2": 2, "word4": 4}
LINGUA_PRESET_GROUP = {"lingua-word": 1, "lingua-word2": 2, "lingua-word4": 4}

OTHER, SPACE, NEWLINE, DIGIT, PUNCT = 0, 1, 2, 3, 4
_CLASS = np.zeros(256, dtype=np.int8)
for _b in b" \t\r\x0b\x0c":
    _CLASS[_b] = SPACE
_CLASS[ord("\n")] = NEWLINE
for _b in b"0123456789":
    _CLASS[_b] = DIGIT
for _b in b"!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~":
    _CLASS[_b] = PUNCT
_CLASS_OF = _CLASS.tolist()


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


PATTERN_EVERY, PATTERN_WINDOW = 1, 64  # a pattern's defaults for ``every`` and ``window``


@attrs.define
class RegexConfig:
    preset: Literal["word", "word2", "word4", "lingua-word", "lingua-word2", "lingua-word4"] | None = None
    pattern: str | None = None
    every: int | None = attrs.field(default=None, validator=positive)  # pattern only (default 1)
    window: int | None = attrs.field(default=None, validator=positive)  # pattern only (default 64)

    def __attrs_post_init__(self) -> None:
        if (self.preset is None) == (self.pattern is None):
            presets = ", ".join([*PRESET_GROUP, *LINGUA_PRESET_GROUP])
            raise RecipeError(f"exactly one of 'preset' ({presets}) or 'pattern' must be given")
        if self.pattern is not None:
            try:
                regex.compile(self.pattern.encode("utf-8"))
            except regex.error as exc:
                raise RecipeError(f"pattern = {self.pattern!r} is not a valid regex: {exc}") from None

    def check(self, path: str) -> None:
        """A preset fixes its own grouping and reads one byte of history: ``every`` and ``window``
        belong to patterns, and a preset given them would silently ignore them."""
        for key in ("every", "window"):
            value = getattr(self, key)
            if self.preset is not None and value is not None:
                family = "lingua-word" if self.preset in LINGUA_PRESET_GROUP else "word"
                hint = f" (every 2nd or 4th word: preset '{family}2' or '{family}4')" if key == "every" else ""
                raise RecipeError(
                    f"{path}.{key} = {value!r} is invalid: {key} applies to 'pattern' only, not to "
                    f"preset {self.preset!r}{hint}"
                )

    @property
    def pattern_every(self) -> int:
        return PATTERN_EVERY if self.every is None else self.every

    @property
    def pattern_window(self) -> int:
        return PATTERN_WINDOW if self.window is None else self.window


class RegexSplitter(Splitter):
    Config = RegexConfig
    examples = [
        {"preset": "word"},
        {"preset": "word2"},
        {"preset": "word4"},
        {"preset": "lingua-word"},
        {"preset": "lingua-word2"},
        {"preset": "lingua-word4"},
        {"pattern": r"[.!?]\s", "every": 1},
        {"pattern": r"\S(?=\s)|\s", "every": 2},
    ]

    def __init__(self, config: RegexConfig) -> None:
        super().__init__(config)
        if config.pattern is not None:
            self._compiled = regex.compile(b"(?:" + config.pattern.encode("utf-8") + rb")\Z")

    def boundaries(self, data: bytes, parent: np.ndarray) -> np.ndarray:
        if self.config.preset in LINGUA_PRESET_GROUP:
            return lingua_boundaries(data, LINGUA_PRESET_GROUP[self.config.preset]) & parent
        if self.config.preset is not None:
            word, forced = word_events(data)
            return keep_every(word, forced, PRESET_GROUP[self.config.preset]) & parent
        search, window = self._compiled.search, self.config.pattern_window
        hits = np.fromiter(
            (search(data[max(0, t + 1 - window) : t + 1]) is not None for t in range(len(data))),
            dtype=bool,
            count=len(data),
        )
        hits &= parent
        if self.config.pattern_every == 1:
            return hits
        return keep_every(hits, np.zeros_like(hits), self.config.pattern_every)

    def start(self) -> PresetState | LinguaWordState | PatternState:
        if self.config.preset in LINGUA_PRESET_GROUP:
            return LinguaWordState(LINGUA_PRESET_GROUP[self.config.preset])
        if self.config.preset is not None:
            return PresetState(PRESET_GROUP[self.config.preset])
        return PatternState(self._compiled, self.config.pattern_window, self.config.pattern_every)


class PresetState:
    """The preset rules of :func:`word_events` and :func:`keep_every`, one byte at a time."""

    __slots__ = ("group", "prev", "digit_run", "count")

    def __init__(self, group: int) -> None:
        self.group, self.prev, self.digit_run, self.count = group, NEWLINE, 0, 0

    def push(self, byte: int, parent: bool) -> bool:
        cls, prev = _CLASS_OF[byte], self.prev
        self.prev = cls
        self.digit_run = self.digit_run + 1 if (cls == DIGIT and prev == DIGIT) else 0
        if cls == NEWLINE or (cls == PUNCT and prev != PUNCT) or (cls == DIGIT and self.digit_run % 3 == 0):
            self.count = 0
            return parent
        if cls == SPACE and prev != SPACE and prev != NEWLINE:
            self.count += 1
            if self.count == self.group:
                self.count = 0
                return parent
        return False


class PatternState:
    """The last ``window`` bytes (kept in a buffer of at most 2 * window) and a hit counter."""

    __slots__ = ("pattern", "window", "every", "recent", "count")

    def __init__(self, pattern, window: int, every: int) -> None:
        self.pattern, self.window, self.every = pattern, window, every
        self.recent, self.count = bytearray(), 0

    def push(self, byte: int, parent: bool) -> bool:
        recent = self.recent
        recent.append(byte)
        if len(recent) > 2 * self.window:
            del recent[: len(recent) - self.window]
        if not parent or self.pattern.search(bytes(recent[-self.window :])) is None:
            return False
        self.count += 1
        if self.count == self.every:
            self.count = 0
            return True
        return False
