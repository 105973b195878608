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

Chunks (:meth:`RegexSplitter.scan`): a preset carries the previous byte's class, the length of
the digit run it is in and the word count since the last kept or forced boundary (``lingua-wordN``
also the bytes of a character the chunk cut, see :class:`~unetlm.splitters.lingua_words.LinguaScan`); a pattern
carries its last ``window - 1`` bytes and the hit count for ``every``. The scan reads only the
resolved options (preset group, pattern, window, every), so any preset expressed through them is
evaluated in chunks as it is whole.

Incremental states (:meth:`RegexSplitter.start`): a preset keeps the previous class and a few
counters (O(1) per byte; ``lingua-wordN`` also the bytes of an unfinished UTF-8 character); a
pattern keeps at most 2 * ``window`` recent bytes and runs one end-anchored search over the last
``window`` of them (O(window) per byte, never the history).
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal

import attrs
import numpy as np
import regex

from unetlm.recipe.errors import RecipeError
from unetlm.recipe.validators import positive
from unetlm.splitters import lingua_words
from unetlm.splitters.base import Splitter, source_digest
from unetlm.splitters.lingua_words import LinguaScan, LinguaWordState

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
    word, forced, _, _ = events_after(data, NEWLINE, 0)
    return word, forced


def events_after(data: bytes, prev: int, digits: int) -> tuple[np.ndarray, np.ndarray, int, int]:
    """:func:`word_events` of bytes that follow a byte of class ``prev`` which ends a run of
    ``digits`` digits (0: not a digit); also the class and digit run after ``data``."""
    cls = _CLASS[np.frombuffer(data, dtype=np.uint8)]
    if not len(cls):
        return np.zeros(0, dtype=bool), np.zeros(0, dtype=bool), prev, digits
    before = np.empty_like(cls)
    before[0], before[1:] = prev, cls[:-1]
    word = (cls == SPACE) & (before != SPACE) & (before != NEWLINE)
    forced = (cls == NEWLINE) | ((cls == PUNCT) & (before != PUNCT))
    at = np.flatnonzero(cls == DIGIT)  # digits are few: their runs are walked on their positions alone
    run_start = -digits  # where the digit run that ``data`` may continue began
    if len(at):
        starts = np.maximum.accumulate(np.where(before[at] != DIGIT, at, -digits))
        forced[at[(at - starts) % 3 == 0]] = True
        run_start = int(starts[-1])
    ends_in_digits = len(at) and at[-1] == len(cls) - 1
    return word, forced, int(cls[-1]), (len(cls) - run_start if ends_in_digits else 0)


def keep_every(word: np.ndarray, forced: np.ndarray, group: int, count: int = 0) -> tuple[np.ndarray, int]:
    """Keep every ``group``-th word event since the last kept or forced one, and every forced one;
    ``count``: word events since then before ``word``. Returns the marks and the count after them."""
    if group == 1:
        return word | forced, 0
    events = word & ~forced
    rank = np.cumsum(events)
    last = np.maximum.accumulate(np.where(forced, np.arange(len(word)), -1))
    rank = rank - np.where(last >= 0, rank[np.maximum(last, 0)], -count)  # events since the last forced one
    out = forced | (events & (rank % group == 0))
    return out, (int(rank[-1]) % group if len(rank) else count)


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

    @classmethod
    def source_digest(cls) -> str:
        """This module's source and that of the lingua rule it hands the ``lingua-wordN`` presets to."""
        lingua = hashlib.sha256(Path(lingua_words.__file__).read_bytes()).hexdigest()
        return hashlib.sha256(f"{source_digest(cls)}:{lingua}".encode()).hexdigest()

    def scan(self) -> PresetScan | LinguaScan | PatternScan:
        if self.config.preset in LINGUA_PRESET_GROUP:
            return LinguaScan(LINGUA_PRESET_GROUP[self.config.preset])
        if self.config.preset is not None:
            return PresetScan(PRESET_GROUP[self.config.preset])
        return PatternScan(self._compiled, self.config.pattern_window, self.config.pattern_every)

    def start(self) -> PresetState | LinguaWordState | PatternState:
        if self.config.preset in LINGUA_PRESET_GROUP:
            return LinguaWordState(LINGUA_PRESET_GROUP[self.config.preset])
        if self.config.preset is not None:
            return PresetState(PRESET_GROUP[self.config.preset])
        return PatternState(self._compiled, self.config.pattern_window, self.config.pattern_every)


class PresetScan:
    """The preset rules over chunks: the class and digit run of the last byte, and the word count."""

    def __init__(self, group: int) -> None:
        self.group, self.prev, self.digits, self.count = group, NEWLINE, 0, 0

    def feed(self, data: bytes, parent: np.ndarray) -> np.ndarray:
        word, forced, self.prev, self.digits = events_after(data, self.prev, self.digits)
        out, self.count = keep_every(word, forced, self.group, self.count)
        return out & np.asarray(parent, dtype=bool)


class PatternScan:
    """End-anchored searches over the last ``window`` bytes of each position (the ``window - 1``
    bytes before a chunk are kept), and the count of kept hits for ``every``."""

    def __init__(self, pattern, window: int, every: int) -> None:
        self.pattern, self.window, self.every = pattern, window, every
        self.tail, self.count = b"", 0

    def feed(self, data: bytes, parent: np.ndarray) -> np.ndarray:
        text, seen, window, search = self.tail + bytes(data), len(self.tail), self.window, self.pattern.search
        hits = np.fromiter(
            (search(text[max(0, t + 1 - window) : t + 1]) is not None for t in range(seen, len(text))),
            dtype=bool,
            count=len(data),
        )
        hits &= np.asarray(parent, dtype=bool)
        self.tail = text[max(0, len(text) - window + 1) :] if window > 1 else b""
        out, self.count = keep_every(hits, np.zeros_like(hits), self.every, self.count)
        return out


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
