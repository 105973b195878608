"""jsonl read as a stream: one JSON object per line, its document the string at a field.

A line that ends within :data:`LINE_BYTES` of its start is read whole and parsed by :mod:`json`. A
longer one is parsed as it is read: the fields before the document are skipped, and the
document's string is decoded piece by piece (never cut inside an escape or between the two
escapes of a surrogate pair), so memory does not grow with the line. Both give the bytes of
``json.loads`` of the line decoded with ``surrogateescape``, encoded back the same way: raw
bytes that are not UTF-8 stay as they are, and an escaped lone surrogate ``\\udcXX`` is byte XX.

Errors name the file and line. ``skip_bad`` skips (and counts) a bad line instead; a long line
whose document has started streaming when the error shows cannot be skipped (its text is already
written) and stays an error.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import attrs
import regex

from unetlm.recipe.errors import RecipeError

LINE_BYTES = 1 << 20  # a line shorter than this is parsed whole
# the longest run of a JSON string's content that holds whole escapes only
_STRING_RUN = regex.compile(rb'(?:[^"\\\n]++|\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4}))*+')
_HIGH_SURROGATE_END = regex.compile(rb"\\u[dD][89abAB][0-9a-fA-F]{2}\Z")
_LITERAL = regex.compile(rb"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?|true|false|null")
_SPACE = b" \t\r"


@attrs.define
class BadLines:
    """Lines that were skipped (``--skip-bad``): their count and the first one's place."""

    count: int = 0
    first: str = ""


def as_bytes(value, where: str) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        # surrogateescape gives back the original bytes of a line that was not valid UTF-8
        try:
            return value.encode("utf-8", errors="surrogateescape")
        except UnicodeEncodeError as exc:
            raise RecipeError(f"{where}: the text holds an unpaired surrogate {value[exc.start]!r}, which is "
                              f"neither text nor a byte") from None
    raise RecipeError(f"{where}: expected text or bytes, found {type(value).__name__}")


def jsonl_document(line: bytes, field: str, where: str) -> bytes:
    """The document in one jsonl line (``where``: file:line, for the error)."""
    try:
        row = json.loads(line.decode("utf-8", errors="surrogateescape"))
    except json.JSONDecodeError as exc:
        raise RecipeError(f"{where}: not a JSON object: {exc}") from None
    if not isinstance(row, dict) or field not in row:
        raise RecipeError(f"{where}: no field {field!r} (set data.text_field)")
    return as_bytes(row[field], where)


class _Bad(Exception):
    """A line that is not a JSON object with the field; ``streamed``: its document had started."""

    def __init__(self, message: str, streamed: bool = False) -> None:
        super().__init__(message)
        self.streamed = streamed


class _Cursor:
    """The stream's bytes from ``pos`` on, read in blocks as the parser needs them."""

    def __init__(self, read: Callable[[int], bytes], pos: int, block: int) -> None:
        self.read, self.block = read, block
        self.buf, self.i, self.base = bytearray(), 0, pos  # buf[i] is stream byte base + i
        self.eof = False

    @property
    def pos(self) -> int:
        return self.base + self.i

    def more(self) -> bool:
        """Read another block (dropping what was consumed); False at the end of the stream."""
        if self.eof:
            return False
        del self.buf[: self.i]
        self.base, self.i = self.base + self.i, 0
        data = self.read(self.block)
        self.eof = not data
        self.buf += data
        return bool(data)

    def peek(self) -> int | None:
        while self.i >= len(self.buf):
            if not self.more():
                return None
        return self.buf[self.i]

    def line(self, limit: int) -> bytes | None:
        """The next line (newline included) if it ends within ``limit`` bytes or the stream ends
        first; else None, and nothing is consumed."""
        while True:
            end = self.buf.find(b"\n", self.i, self.i + limit)
            if end >= 0:
                line = bytes(self.buf[self.i : end + 1])
                self.i = end + 1
                return line
            if len(self.buf) - self.i >= limit:
                return None
            if not self.more():
                line = bytes(self.buf[self.i :])
                self.i = len(self.buf)
                return line

    def skip_line(self) -> None:
        while True:
            end = self.buf.find(b"\n", self.i)
            if end >= 0:
                self.i = end + 1
                return
            self.i = len(self.buf)
            if not self.more():
                return

    # ---------------------------------------------------------------- a long line, parsed as it is read

    def space(self) -> int | None:
        while (c := self.peek()) is not None and c in _SPACE:
            self.i += 1
        return c

    def expect(self, chars: bytes, what: str) -> int:
        c = self.space()
        if c is None or c not in chars:
            found = "the end of the line" if c in (None, ord("\n")) else repr(chr(c))
            raise _Bad(f"expected {what} at byte {self.pos:,}, found {found}")
        self.i += 1
        return c

    def string(self) -> Iterator[bytes]:
        """The decoded pieces of the JSON string that starts here."""
        self.expect(b'"', "a string")
        while True:
            end = _STRING_RUN.match(self.buf, self.i).end()
            closed = end < len(self.buf) and self.buf[end] == ord('"')
            if not closed and self._ends_with_high_surrogate(end):
                end -= 6  # keep a pair's first escape with its second
            if end > self.i:
                text = bytes(self.buf[self.i : end]).decode("utf-8", errors="surrogateescape")
                try:
                    value = json.loads(f'"{text}"')
                except json.JSONDecodeError as exc:
                    raise _Bad(f"not a JSON object: {exc.msg} in a string near byte {self.pos:,}") from None
                self.i = end
                yield as_bytes(value, f"byte {self.pos:,}")
            if closed:
                self.i += 1
                return
            if len(self.buf) - self.i >= 12 or not self.more():  # no escape is longer than 12 bytes
                raise _Bad(f"not a JSON object: a string is not closed or has a bad escape near byte {self.pos:,}")

    def _ends_with_high_surrogate(self, end: int) -> bool:
        """Whether the run before ``end`` ends with an escape of a pair's first half (its backslash
        not itself escaped)."""
        if not _HIGH_SURROGATE_END.search(self.buf, self.i, end):
            return False
        k = end - 6
        while k > self.i and self.buf[k - 1] == ord("\\"):
            k -= 1
        return (end - 6 - k) % 2 == 0

    def skip_value(self) -> None:
        c = self.space()
        if c == ord('"'):
            for _ in self.string():
                pass
        elif c in (ord("{"), ord("[")):
            self.i += 1
            close = b"}" if c == ord("{") else b"]"
            if self.space() == close[0]:
                self.i += 1
                return
            while True:
                if close == b"}":
                    for _ in self.string():
                        pass
                    self.expect(b":", "':'")
                self.skip_value()
                if self.expect(b"," + close, f"',' or {close.decode()!r}") == close[0]:
                    return
        else:
            while len(self.buf) - self.i < 400 and self.more():  # a number or literal is short
                pass
            match = _LITERAL.match(self.buf, self.i)
            if match is None:
                raise _Bad(f"not a JSON object: no value at byte {self.pos:,}")
            self.i = match.end()

    def document(self, field: str) -> Iterator[bytes]:
        """The pieces of the string at ``field`` of the object on this line; the line is consumed."""
        self.expect(b"{", "'{'")
        found = False
        if self.space() == ord("}"):
            self.i += 1
        else:
            while True:
                key = b"".join(self.string()).decode("utf-8", errors="surrogateescape")
                self.expect(b":", "':'")
                if key != field:
                    self.skip_value()
                elif found:
                    raise _Bad(f"the field {field!r} appears twice", streamed=True)
                else:
                    if self.space() != ord('"'):
                        raise _Bad(f"the field {field!r} is not text")
                    found = True
                    for piece in self.string():
                        yield piece
                if self.expect(b",}", "',' or '}'") == ord("}"):
                    break
        if self.space() not in (None, ord("\n")):
            raise _Bad(f"not a JSON object: text after the object at byte {self.pos:,}", streamed=found)
        if not found:
            raise _Bad(f"no field {field!r} (set data.text_field)")
        self.i += self.peek() is not None  # the newline


def jsonl_pieces(
    read: Callable[[int], bytes],
    field: str,
    where: Callable[[int], str],
    start: int = 0,
    stop: int | None = None,
    skip_bad: bool = False,
    bad: BadLines | None = None,
    block: int = LINE_BYTES,
) -> Iterator[tuple[bytes, bool]]:
    """Document pieces ``(data, end)`` of the lines that start at a stream offset in ``[start, stop)``
    (None: to the end); ``read(n)`` gives the stream's next bytes from ``start - 1`` (from 0 when
    ``start`` is 0), ``where(offset)`` names the line at an offset (file:line) for errors."""
    bad = bad if bad is not None else BadLines()
    cursor = _Cursor(read, max(start - 1, 0), block)
    if start > 0 and cursor.peek() is not None:  # ``read`` starts one byte early: was it a line's end?
        cursor.i += 1
        if cursor.buf[0] != ord("\n"):
            cursor.skip_line()  # the line under ``start`` began before it
    while (stop is None or cursor.pos < stop) and cursor.peek() is not None:
        at = cursor.pos
        line = cursor.line(LINE_BYTES)
        try:
            if line is not None:
                if line.strip():
                    data = jsonl_document(line, field, "@")  # the place is filled in below
                    for a in range(0, max(len(data), 1), block):
                        yield data[a : a + block], a + block >= len(data)
                continue
            streamed = False
            try:
                for piece in cursor.document(field):
                    streamed = True
                    yield piece, False
            except _Bad as exc:
                exc.streamed = exc.streamed or streamed
                raise
            yield b"", True
        except (RecipeError, _Bad) as exc:
            text = str(exc)[1:] if isinstance(exc, RecipeError) else f": {exc}"
            message = f"{where(at)}{text}"
            if getattr(exc, "streamed", False):
                raise RecipeError(f"{message} (the line is longer than {LINE_BYTES:,} bytes and its text was "
                                  f"already read, so it cannot be skipped: fix or remove it)") from None
            if not skip_bad:
                raise RecipeError(f"{message} (pass --skip-bad to skip such lines)") from None
            bad.count += 1
            bad.first = bad.first or message
            if line is None:
                cursor.skip_line()


def line_numbers(read: Callable[[int], bytes], block: int = LINE_BYTES) -> Callable[[int], int]:
    """``number(offset)``: the 1-based number of the line at stream ``offset``, counted by reading
    the stream from its start (``read``: a fresh reader's)."""

    def number(offset: int) -> int:
        count = 0
        while offset > 0:
            data = read(min(offset, block))
            if not data:
                break
            count += data.count(b"\n")
            offset -= len(data)
        return count + 1

    return number
