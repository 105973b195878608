"""Sentence boundaries: the next stage gets one position per sentence (and per paragraph).

Events, each decided from the bytes up to it:

- sentence end: the first whitespace byte after a terminator (``. ! ?`` by default) that may be
  followed by closing characters (quotes, brackets): ``He said "Stop!" Then`` ends at the space
  after ``"``;
- paragraph break: the second newline of a whitespace run (a blank line), unless the run began
  with a sentence end.

A whitespace run yields at most one event. The boundary goes to the first parent position at or
after the event (with the word stage as parent that is the event byte itself: whitespace after
a word and every newline are word boundaries). So the result is nested in ``parent``.

One state machine (:class:`SentenceState`) reads the bytes in order: the decision at byte t reads
``data[:t+1]`` and ``parent[:t+1]`` only, so it is stable by construction. The splitter defines
only ``start``; the base class derives ``boundaries`` (the state run over a document) and the
chunked evaluation ``scan`` (the state carried from chunk to chunk) from it, and cached
generation pushes the same state one byte at a time. ``version`` is part of the splitter's
identity, with its options and a digest of this file: a change here makes prepared data stale.
"""
from __future__ import annotations

import attrs

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

    version = 1  # bump it when the rule changes in a way this file does not show

    def __init__(self, config: SentenceConfig) -> None:
        super().__init__(config)
        # (UTF-8 sequence, is_closer) grouped by last byte, so most bytes need no check at all
        self.rules: dict[int, list[tuple[bytes, bool]]] = {}
        for text, is_closer in ((config.terminators, False), (config.closers, True)):
            for char in dict.fromkeys(text):
                seq = char.encode("utf-8")
                self.rules.setdefault(seq[-1], []).append((seq, is_closer))
        self.longest = max(len(seq) for rules in self.rules.values() for seq, _ in rules)

    def start(self) -> SentenceState:
        return SentenceState(self)


class SentenceState:
    """Reads one byte at a time; keeps the last few bytes for multi-byte terminators and closers."""

    __slots__ = ("rules", "paragraphs", "keep", "recent", "ended", "in_run", "fired", "pending", "newlines")

    def __init__(self, splitter: SentenceSplitter) -> None:
        self.rules, self.paragraphs, self.keep = splitter.rules, splitter.config.paragraphs, splitter.longest
        self.recent = bytearray(self.keep)  # the last `keep` bytes (zeros before the text)
        self.ended = [False] * self.keep  # ended[-k]: the text without its last k - 1 bytes ends a sentence
        self.in_run = self.fired = self.pending = False  # in a whitespace run; it had its event; unplaced
        self.newlines = 0  # newlines in the current whitespace run

    def push(self, byte: int, parent: bool) -> bool:
        recent = self.recent
        recent.append(byte)
        del recent[0]
        ended = False
        if byte in WHITESPACE:
            start = not self.in_run
            if start:
                self.in_run, self.fired, self.newlines = True, False, 0
            self.newlines += byte == NEWLINE
            if not self.fired and ((start and self.ended[-1]) or (self.paragraphs and self.newlines >= 2)):
                self.fired = self.pending = True
        else:
            self.in_run = False
            for seq, is_closer in self.rules.get(byte, ()):
                if recent.endswith(seq) and (not is_closer or self.ended[-len(seq)]):
                    ended = True
                    break
        self.ended.append(ended)
        del self.ended[0]
        if self.pending and parent:
            self.pending = False
            return True
        return False
