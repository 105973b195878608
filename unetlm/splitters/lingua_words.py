"""lingua's AU-Net word rule (``apps/aunet/data/regex_cutting.py``, strategies ``wordN``), causal.

Characters (UTF-8) fall into letters (``\\p{L}``), numbers (``\\p{N}``), spaces (``\\s``
but not \\r, \\n), newlines (\\r, \\n) and others (punctuation, symbols, marks); a decision
sits on the last byte of its character. With ``group`` g (1: words, 2: pairs, 4: chunks of
four words) a boundary is:

- the whitespace character that ends the g-th, 2g-th, ... word of a run, where a word is a
  stretch of non-whitespace characters followed by one whitespace character, and a run restarts
  after two whitespace characters in a row (punctuation and numbers belong to words; forced
  boundaries do not restart the count);
- the first character of each group of up to three numbers, and of up to three others,
  counted from the start of their stretch;
- a newline right after a letter or a number, or first in the document: the start of a
  whitespace run that holds a newline (lingua's ``\\s*[\\r\\n]``). Newlines right after an
  other character are part of that character's match, and later newlines of a run part of
  the run's, so neither is marked.

lingua also marks a whitespace run that starts with a space and reaches a newline later, at
that first space: that decision reads ahead, so this rule leaves it out. Smallest case: in
" " the space is no boundary; in " \\n" lingua makes it one. Elsewhere the two agree exactly
(on valid UTF-8).

Bytes of an incomplete UTF-8 character decide nothing; once a sequence proves invalid, each of
its bytes counts as one letter (as Python's decoder splits it, ``surrogateescape``).
"""
from __future__ import annotations

import codecs
import functools

import numpy as np
import regex

LETTER, NUMBER, OTHER, SPACE, NEWLINE = range(5)  # SPACE and above are whitespace
START = -1  # the class before a document's first character

_LETTER, _NUMBER, _WHITE = regex.compile(r"\p{L}"), regex.compile(r"\p{N}"), regex.compile(r"\s")


@functools.lru_cache(maxsize=4096)
def char_class(code: int) -> int:
    """The class of one code point (an escaped invalid byte, U+DC80..U+DCFF, is a letter)."""
    char = chr(code)
    if char in "\r\n":
        return NEWLINE
    if 0xDC80 <= code <= 0xDCFF or _LETTER.match(char):
        return LETTER
    if _WHITE.match(char):
        return SPACE
    return NUMBER if _NUMBER.match(char) else OTHER


_ASCII = np.array([char_class(b) for b in range(128)], dtype=np.int8)
_ASCII_CLASS = _ASCII.tolist()


def every_third(positions: np.ndarray, carried: int = 0) -> np.ndarray:
    """(the 1st, 4th, 7th, ... of each run of consecutive integers in sorted ``positions``, the index
    of the last one within its run; -1 if none); a run that starts at 0 continues one with
    ``carried`` members before it."""
    order = np.arange(len(positions))
    starts = np.concatenate([[True], positions[1:] != positions[:-1] + 1]) if len(positions) else order > 0
    run_start = np.maximum.accumulate(np.where(starts, order, 0))
    index = order - run_start
    if carried and len(positions) and positions[0] == 0:
        index[run_start == 0] += carried
    return positions[index % 3 == 0], (int(index[-1]) if len(index) else -1)


def lingua_boundaries(data: bytes, group: int) -> np.ndarray:
    """Bool array of len(data): the rule above with ``group`` words per kept word boundary."""
    return LinguaScan(group).feed(data, np.ones(len(data), dtype=bool))


class LinguaScan:
    """The rule over a document's chunks: an incremental UTF-8 decoder (a character cut by a chunk's
    end waits for its last byte), the previous class, the number and other runs and the words of the
    current run, carried across chunks."""

    def __init__(self, group: int) -> None:
        self.group = group
        self.decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")
        self.pending = 0  # bytes of an unfinished character fed before
        self.prev, self.numbers, self.others, self.words = START, 0, 0, 0

    def feed(self, data: bytes, parent: np.ndarray) -> np.ndarray:
        data = bytes(data)
        out = np.zeros(len(data), dtype=bool)
        if self.pending == 0 and data.isascii():
            cls, last = _ASCII[np.frombuffer(data, dtype=np.uint8)], np.arange(len(data))
        else:
            cls, last = self._characters(data)
        if len(cls):
            for marked in self._decide(cls):
                marked = last[marked]
                out[marked[marked >= 0]] = True  # a character begun in an earlier chunk ends in this one
        return out & np.asarray(parent, dtype=bool)

    def _characters(self, data: bytes) -> tuple[np.ndarray, np.ndarray]:
        """(class, index in ``data`` of the last byte) of each character this chunk completes."""
        text = self.decoder.decode(data)
        code = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        escaped = (code >= 0xDC80) & (code <= 0xDCFF)
        width = np.where(escaped, 1, 1 + (code >= 0x80) + (code >= 0x800) + (code >= 0x10000))
        cls = _ASCII[np.minimum(code, 127)]
        wide = code >= 128
        distinct, where = np.unique(code[wide], return_inverse=True)
        cls[wide] = np.array([char_class(int(c)) for c in distinct], dtype=np.int8)[where]
        last = np.cumsum(width) - 1 - self.pending
        self.pending = len(self.decoder.getstate()[0])
        return cls, last

    def _decide(self, cls: np.ndarray) -> tuple[np.ndarray, ...]:
        """Indices of the marked characters of ``cls`` (kept word ends, newline openings, numbers,
        others), continuing the carried state, which is then advanced past ``cls``."""
        group = self.group
        prev = np.empty_like(cls)
        prev[0], prev[1:] = self.prev, cls[:-1]
        white = np.flatnonzero(cls >= SPACE)  # whitespace characters: word ends and run breaks
        before = prev[white]
        word_end = (before < SPACE) & (before != START)
        words = np.cumsum(word_end)
        last_break = np.maximum.accumulate(np.where(word_end, -1, np.arange(len(white))))
        in_run = np.where(last_break >= 0, words - words[np.maximum(last_break, 0)], words + self.words)
        kept = white[word_end & (in_run % group == 0)]
        opens = white[(cls[white] == NEWLINE) & (before <= NUMBER)]  # after START, a LETTER or a NUMBER
        numbers, number_run = every_third(np.flatnonzero(cls == NUMBER), self.numbers + 1 if self.prev == NUMBER else 0)
        others, other_run = every_third(np.flatnonzero(cls == OTHER), self.others + 1 if self.prev == OTHER else 0)
        self.prev = int(cls[-1])
        self.numbers = number_run if self.prev == NUMBER else 0
        self.others = other_run if self.prev == OTHER else 0
        self.words = int(in_run[-1]) % group if len(white) else self.words
        return kept, opens, numbers, others


# UTF-8 lead byte -> (continuation bytes, range of the first continuation, the lead's code bits)
_LEADS: dict[int, tuple[int, int, int, int]] = {}
for _b in range(0xC2, 0xE0):
    _LEADS[_b] = (1, 0x80, 0xBF, _b & 0x1F)
for _b in range(0xE0, 0xF0):
    _LEADS[_b] = (2, 0xA0 if _b == 0xE0 else 0x80, 0x9F if _b == 0xED else 0xBF, _b & 0x0F)
for _b in range(0xF0, 0xF5):
    _LEADS[_b] = (3, 0x90 if _b == 0xF0 else 0x80, 0x8F if _b == 0xF4 else 0xBF, _b & 0x07)


class LinguaWordState:
    """:func:`lingua_boundaries` one byte at a time: a UTF-8 decoder (at most 3 pending bytes),
    the previous class and three counters."""

    __slots__ = ("group", "prev", "numbers", "others", "words", "pending", "need", "low", "high", "code")

    def __init__(self, group: int) -> None:
        self.group, self.prev, self.numbers, self.others, self.words = group, START, 0, 0, 0
        self.pending = self.need = self.low = self.high = self.code = 0

    def push(self, byte: int, parent: bool) -> bool:
        if self.need:
            if self.low <= byte <= self.high:
                self.code = (self.code << 6) | (byte & 0x3F)
                self.need, self.pending, self.low, self.high = self.need - 1, self.pending + 1, 0x80, 0xBF
                return not self.need and self.decide(char_class(self.code)) and parent
            for _ in range(self.pending):  # the sequence broke: each of its bytes is a letter
                self.decide(LETTER)
            self.need = self.pending = 0
        if byte < 0x80:
            return self.decide(_ASCII_CLASS[byte]) and parent
        lead = _LEADS.get(byte)
        if lead is None:
            return self.decide(LETTER)  # never a boundary
        self.need, self.low, self.high, self.code = lead
        self.pending = 1
        return False

    def decide(self, cls: int) -> bool:
        """The decision at a character of class ``cls``."""
        prev = self.prev
        self.prev = cls
        self.numbers = self.numbers + 1 if cls == NUMBER and prev == NUMBER else 0
        self.others = self.others + 1 if cls == OTHER and prev == OTHER else 0
        if cls == NUMBER:
            return self.numbers % 3 == 0
        if cls == OTHER:
            return self.others % 3 == 0
        if cls < SPACE:
            return False
        opens = cls == NEWLINE and prev <= NUMBER  # START, LETTER or NUMBER before it
        if prev >= SPACE or prev == START:
            self.words = 0
            return opens
        self.words += 1
        kept = self.words == self.group
        if kept:
            self.words = 0
        return kept or opens
