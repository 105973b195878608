"""Sentence boundaries: the next stage gets one position per sentence (and per paragraph).

Events, each decided from the bytes up to it:

- sentence end: the first whitespace byte after a terminator (``. ! ?`` by default) that may be
  followed by closing characters (quotes, brackets): ``He said "Stop!" Then`` ends at the space
  after ``"``;
- paragraph break: the second newline of a whitespace run (a blank line), unless the run began
  with a sentence end.

A whitespace run yields at most one event. The boundary goes to the first parent position at or
after the event (with the word stage as parent that is the event byte itself: whitespace after
a word and every newline are word boundaries). So the result is nested in ``parent``, and the
decision at byte t reads ``data[:t+1]`` and ``parent[:t+1]`` only: stable by construction.
"""
from __future__ import annotations

import attrs
import numpy as np

from unetlm.recipe.errors import RecipeError
from unetlm.splitters.base import Splitter

WHITESPACE = frozenset(b" \t\n\r\x0b\x0c")
NEWLINE = ord("\n")


@attrs.define
class SentenceConfig:
    terminators: str = ".!?"  # characters that end a sentence
    closers: str = "\"')]}\u201d\u2019\u00bb"  # may follow a terminator: " ' ) ] } ” ’ »
    paragraphs: bool = True  # a blank line ends a paragraph, with or without a terminator

    def __attrs_post_init__(self) -> None:
        if not self.terminators:
            raise RecipeError("terminators = '' is invalid: give at least one character that ends a sentence")
        for key in ("terminators", "closers"):
            value = getattr(self, key)
            if any(c.isspace() for c in value):
                raise RecipeError(f"{key} = {value!r} is invalid: whitespace cannot end or close a sentence")


class SentenceSplitter(Splitter):
    Config = SentenceConfig
    examples = [
        {},
        {"paragraphs": False},
        {"terminators": ".", "closers": ""},
        {"terminators": ".!?\u2026", "closers": "\u201d)"},  # multi-byte terminator and closer
    ]

    def __init__(self, config: SentenceConfig) -> None:
        super().__init__(config)
        # (UTF-8 sequence, is_closer) grouped by last byte, so most bytes need no check at all
        self._by_last: dict[int, list[tuple[bytes, bool]]] = {}
        for text, is_closer in ((config.terminators, False), (config.closers, True)):
            for char in dict.fromkeys(text):
                seq = char.encode("utf-8")
                self._by_last.setdefault(seq[-1], []).append((seq, is_closer))

    def boundaries(self, data: bytes, parent: np.ndarray) -> np.ndarray:
        out = np.zeros(len(data), dtype=bool)
        # ended[t]: data[:t] ends with a terminator, possibly followed by closers
        ended = np.zeros(len(data) + 1, dtype=bool)
        in_run = fired = pending = False
        newlines = 0
        for t, byte in enumerate(data):
            if byte in WHITESPACE:
                start = not in_run
                if start:
                    in_run, fired, newlines = True, False, 0
                newlines += byte == NEWLINE
                paragraph = self.config.paragraphs and newlines >= 2
                if not fired and ((start and ended[t]) or paragraph):
                    fired = pending = True
            else:
                in_run = False
                ended[t + 1] = self._ends_sentence(data, t + 1, ended)
            if pending and parent[t]:
                out[t] = True
                pending = False
        return out

    def _ends_sentence(self, data: bytes, end: int, ended: np.ndarray) -> bool:
        for seq, is_closer in self._by_last.get(data[end - 1], ()):
            if data.endswith(seq, 0, end) and (not is_closer or ended[end - len(seq)]):
                return True
        return False
