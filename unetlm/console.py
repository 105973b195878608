"""Terminal output of the command line: generated text printed as it streams."""
from __future__ import annotations

import codecs
import sys
from typing import Callable


class StreamPrinter:
    """An ``on_bytes`` callback that prints continuations to a text stream as bytes arrive.

    Each row has its own incremental UTF-8 decoder (errors="replace"): a character split across
    calls waits until complete, invalid bytes print as U+FFFD, and a stream that cannot encode
    a character gets a replacement, so no byte sequence makes it raise. Row ``live`` is shown
    as it grows; the other rows are printed by :meth:`close`, each after a ``header(index)`` line.
    """

    def __init__(self, stream=None, live: int = 0, header: Callable[[int], str] = lambda i: f"\n--- [{i}]\n") -> None:
        self.stream = sys.stdout if stream is None else stream
        self.live, self.header = live, header
        self.decoders: dict[int, codecs.IncrementalDecoder] = {}
        self.held: dict[int, list[str]] = {}

    def __call__(self, index: int, data: bytes) -> None:
        if index not in self.decoders:
            self.decoders[index] = codecs.getincrementaldecoder("utf-8")(errors="replace")
        text = self.decoders[index].decode(bytes(data))
        if index == self.live:
            self._write(text)
        else:
            self.held.setdefault(index, []).append(text)

    def close(self) -> None:
        """Flush every row's decoder and print the rows that were not shown live."""
        for index in sorted(self.decoders):
            rest = self.decoders[index].decode(b"", final=True)
            if index == self.live:
                self._write(rest)
            else:
                self.held.setdefault(index, []).append(rest)
        for index in sorted(self.held):
            self._write(self.header(index) + "".join(self.held[index]))
        self.decoders.clear()
        self.held.clear()

    def _write(self, text: str) -> None:
        if not text:
            return
        try:
            self.stream.write(text)
        except UnicodeEncodeError:
            encoding = getattr(self.stream, "encoding", None) or "utf-8"
            self.stream.write(text.encode(encoding, "replace").decode(encoding))
        self.stream.flush()
