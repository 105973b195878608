"""Where documents come from, read as streams. Every source yields raw bytes: invalid UTF-8 is data, not an error.

Sources (``data.source``): ``pydocs`` (CPython's help topics), ``files`` (each file one document),
``jsonl`` (one JSON object per line, document in ``text_field``), ``parquet`` (a column, read
with pyarrow) and ``hf`` (a Hugging Face dataset, streamed). pyarrow and datasets are optional
and imported only when their source is chosen. ``max_bytes`` stops reading once that many
document bytes were read (the document that crosses the limit is kept whole).

Pieces: a source is read as ``(data, end)`` pairs, ``data`` at most :data:`READ_BYTES` bytes of one
document and ``end`` True on its last piece (an empty document is ``(b"", True)``), so nothing
holds a whole document: a file is read in blocks, a jsonl line's text is decoded as the line is
parsed (:mod:`unetlm.data.jsonl`), a parquet or hf value is cut as it comes (those libraries hand
over whole values). ``files`` and ``jsonl`` paths ending in ``.gz`` or ``.xz`` (standard library)
or ``.zst`` (the ``zstandard`` package) are decompressed as they are read.

A file that cannot be read, corrupt compressed data (named with the compressed offset), or a file
whose size or modification time changes while it is read is a :class:`SourceError`.
"""
from __future__ import annotations

import glob
import gzip
import lzma
import os
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from unetlm.data.errors import SourceError
from unetlm.data.jsonl import BadLines, as_bytes, jsonl_pieces, line_numbers
from unetlm.recipe.errors import RecipeError
from unetlm.recipe.schema import DataSpec

READ_BYTES = 1 << 18  # bytes of a document per piece (larger pieces cost more in page faults than they save)
FRAME_INPUT = 256  # compressed bytes per xz/zstd step: 4 bytes of zstd expand to at most a 128 KiB block
COMPRESSION = {".gz": "gzip", ".xz": "xz", ".zst": "zstd"}

Piece = tuple[bytes, bool]


def compression(path: str | Path) -> str | None:
    """``gzip``, ``xz``, ``zstd`` (by the file's suffix) or None for a plain file."""
    return COMPRESSION.get(Path(path).suffix.lower())


def _zstd():
    try:
        import zstandard
    except ImportError:
        raise ImportError("reading .zst files needs the zstandard package: pip install 'unetlm[zstd]'") from None
    return zstandard


class _Frames:
    """Decompresses concatenated frames (xz streams, zstd frames), :data:`FRAME_INPUT` compressed bytes
    a step, so what one step adds is bounded by the format's largest expansion, not by the document.
    A file that ends inside a frame, or data after a frame that does not start another, is an error:
    the library readers stop silently at both (``LZMAFile`` at a damaged later stream, zstandard's
    readers at a cut frame)."""

    def __init__(self, raw, new_frame: Callable[[], object], padding: bytes = b"") -> None:
        self.raw, self.new_frame, self.padding = raw, new_frame, padding
        self.frame, self.out, self.start = None, bytearray(), 0

    def read(self, n: int) -> bytes:
        while len(self.out) - self.start < n:
            data = self.raw.read(FRAME_INPUT)
            if not data:
                if self.frame is not None and not self.frame.eof:
                    raise EOFError("compressed file ended inside a frame")
                break
            while data:
                if self.frame is None or self.frame.eof:
                    data = data.lstrip(self.padding) if self.padding else data  # xz stream padding
                    if not data:
                        break
                    self.frame = self.new_frame()
                self.out += self.frame.decompress(data)
                data = self.frame.unused_data if self.frame.eof else b""
        out = bytes(self.out[self.start : self.start + n])
        self.start += len(out)
        if self.start > len(self.out) // 2:  # drop what was read in one move, not at every read
            del self.out[: self.start]
            self.start = 0
        return out


def _frames(kind: str, raw) -> _Frames:
    if kind == "xz":
        return _Frames(raw, lzma.LZMADecompressor, padding=b"\0")
    zstd = _zstd()
    return _Frames(raw, lambda: zstd.ZstdDecompressor().decompressobj())


def _corrupt_errors() -> tuple[type, ...]:
    errors: tuple[type, ...] = (OSError, EOFError, zlib.error, lzma.LZMAError)
    try:
        import zstandard
    except ImportError:
        return errors
    return (*errors, zstandard.ZstdError)


class InputFile:
    """A file read as a stream of its content (decompressed by suffix). It must keep the size and
    modification time it has when opened (and ``expect``, those it had when its unit was cut): a change is
    an error naming it. ``on_input(n)`` hears of every ``n`` file bytes consumed (progress)."""

    def __init__(self, path: str | Path, expect: tuple[int, int] | None = None,
                 on_input: Callable[[int], None] | None = None) -> None:
        self.path, self.kind, self.on_input = Path(path), compression(path), on_input
        try:
            self.raw = open(self.path, "rb")
        except OSError as exc:
            raise SourceError(f"cannot read {self.path}: {exc.strerror or exc}") from None
        self.stat = self._stat()
        if expect is not None and tuple(expect) != self.stat:
            self.raw.close()
            raise SourceError(f"{self.path} changed after the data was cut into units ({self._change(tuple(expect))}); "
                              f"prepare again into an empty --out")
        if self.kind is not None and self.stat[0] == 0:
            self.raw.close()
            raise SourceError(f"{self.path}: empty file, not {self.kind} data")
        if self.kind == "gzip":
            self.stream = gzip.GzipFile(fileobj=self.raw, mode="rb")
        elif self.kind is not None:
            self.stream = _frames(self.kind, self.raw)
        else:
            self.stream = self.raw
        self.offset = 0  # content bytes read
        self.consumed = 0  # file bytes reported to on_input

    def _stat(self) -> tuple[int, int]:
        st = os.fstat(self.raw.fileno())
        return st.st_size, st.st_mtime_ns

    def _change(self, before: tuple[int, int]) -> str:
        after = self._stat()
        if after[0] != before[0]:
            return f"{before[0]:,} bytes, now {after[0]:,}"
        return "modified, same size"

    def read(self, n: int | None = None) -> bytes:
        """Up to ``n`` (default :data:`READ_BYTES`) bytes of content; b"" at its end (once the file is
        checked unchanged)."""
        try:
            data = self.stream.read(n or READ_BYTES)
        except _corrupt_errors() as exc:
            where = f"corrupt {self.kind} data near compressed byte {self.raw.tell():,}" if self.kind else \
                f"read failed at byte {self.offset:,}"
            raise SourceError(f"{self.path}: {where} (after {self.offset:,} bytes of content): "
                              f"{getattr(exc, 'strerror', None) or exc}") from None
        self.offset += len(data)
        self._report()
        if not data:
            self.check()
        return data

    def seek(self, offset: int) -> None:
        """Move to content byte ``offset`` (plain files only)."""
        self.raw.seek(offset)
        self.offset = self.consumed = offset

    def _report(self) -> None:
        if self.on_input is not None:
            at = self.raw.tell()
            if at > self.consumed:
                self.on_input(at - self.consumed)
                self.consumed = at

    def check(self) -> None:
        """Refuse a file whose size or modification time changed since it was opened."""
        if self._stat() != self.stat:
            raise SourceError(f"{self.path} changed while it was being prepared ({self._change(self.stat)}); "
                              f"nothing read from it was kept: prepare again once it no longer changes")

    def close(self) -> None:
        self.raw.close()

    def __enter__(self) -> "InputFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def value_pieces(data: bytes) -> Iterator[Piece]:
    """One document held whole (a parquet or hf value) as pieces of :data:`READ_BYTES`."""
    view = memoryview(data)
    for a in range(0, max(len(data), 1), READ_BYTES):
        yield bytes(view[a : a + READ_BYTES]), a + READ_BYTES >= len(data)


def file_pieces(path: str | Path, expect: tuple[int, int] | None = None,
                on_input: Callable[[int], None] | None = None) -> Iterator[Piece]:
    """One file, one document, read in blocks (decompressed by its suffix)."""
    with InputFile(path, expect, on_input) as f:
        data = f.read()
        while True:
            following = f.read()
            yield data, not following
            if not following:
                return
            data = following


def jsonl_file_pieces(path: str | Path, field: str, start: int = 0, stop: int | None = None,
                      expect: tuple[int, int] | None = None, skip_bad: bool = False, bad: BadLines | None = None,
                      on_input: Callable[[int], None] | None = None) -> Iterator[Piece]:
    """The documents of the lines of a jsonl file that start at a byte offset in ``[start, stop)``
    (None: to its end; a compressed file is read from its start)."""

    def where(offset: int) -> str:
        with InputFile(path) as f:
            return f"{path}:{line_numbers(f.read)(offset)}"

    with InputFile(path, expect, on_input) as f:
        if start:
            f.seek(start - 1)  # jsonl_pieces reads the byte before to see whether a line starts there
        yield from jsonl_pieces(f.read, field, where, start, stop, skip_bad, bad, READ_BYTES)
        f.check()


def pydocs_documents() -> Iterator[bytes]:
    """The help topics that ship with CPython (``pydoc_data.topics``), one document each."""
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield topics[key].encode("utf-8")


def expand_paths(patterns: list[str]) -> list[Path]:
    """Paths and globs (``**`` recurses), each pattern's matches sorted; a pattern matching nothing is an error."""
    out = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True)) or ([pattern] if Path(pattern).is_file() else [])
        matches = [m for m in matches if Path(m).is_file()]
        if not matches:
            raise RecipeError(f"data.paths: {pattern!r} matches no file")
        out.extend(Path(m) for m in matches)
    return out


def open_parquet(path: Path, field: str):
    """A ``pyarrow.parquet.ParquetFile`` that has the column ``field``."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise RecipeError("data.source = 'parquet' needs pyarrow: pip install pyarrow") from None
    table = pq.ParquetFile(path)
    if field not in table.schema_arrow.names:
        raise RecipeError(f"{path}: no column {field!r} (columns: {', '.join(table.schema_arrow.names)})")
    return table


PARQUET_ROWS = 256  # rows converted to Python values at a time


def parquet_rows(table, field: str, where: str, row_groups: list[int] | None = None) -> Iterator[bytes]:
    """The non-null values of column ``field`` (of the given row groups; None: all), as bytes."""
    for batch in table.iter_batches(batch_size=PARQUET_ROWS, columns=[field], row_groups=row_groups):
        for value in batch.column(0).to_pylist():
            if value is not None:
                yield as_bytes(value, where)


def hf_documents(spec: DataSpec) -> Iterator[bytes]:
    """Rows of a Hugging Face dataset, streamed (nothing is downloaded beyond what is read)."""
    try:
        import datasets
    except ImportError:
        raise RecipeError("data.source = 'hf' needs the datasets package: pip install datasets") from None
    stream = datasets.load_dataset(spec.dataset, spec.subset or None, split=spec.split, streaming=True)
    for row in stream:
        yield as_bytes(row[spec.text_field], f"{spec.dataset}[{spec.text_field}]")


def require_source(spec: DataSpec) -> None:
    """Refuse ``data.source = "none"`` (a recipe that names no corpus), saying how to prepare one."""
    if spec.source == "none":
        raise RecipeError(
            "data.source = 'none': the recipe names no corpus; prepare one, e.g. unetlm prepare RECIPE --set "
            "data.source=jsonl --set 'data.paths=[\"DOCS/*.jsonl\"]' --out DATA_DIR, then train with "
            "--set data.prepared=DATA_DIR"
        )


def whole_pieces(documents: Iterable[bytes]) -> Iterator[Piece]:
    """Documents held whole, as pieces."""
    for data in documents:
        yield from value_pieces(data)


def iter_pieces(spec: DataSpec) -> Iterator[Piece]:
    """Every document of ``spec`` as pieces, in source order (``max_bytes`` not applied)."""
    require_source(spec)
    if spec.source == "pydocs":
        return whole_pieces(pydocs_documents())
    if spec.source == "files":
        return (p for path in expand_paths(spec.paths) for p in file_pieces(path))
    if spec.source == "jsonl":
        return (p for path in expand_paths(spec.paths) for p in jsonl_file_pieces(path, spec.text_field))
    if spec.source == "parquet":
        return (p for path in expand_paths(spec.paths)
                for p in whole_pieces(parquet_rows(open_parquet(path, spec.text_field), spec.text_field, str(path))))
    return whole_pieces(hf_documents(spec))


def until(pieces: Iterable[Piece], budget: int) -> Iterator[Piece]:
    """``pieces`` up to the end of the document whose bytes bring their total to ``budget`` (0: all)."""
    total = 0
    for data, end in pieces:
        yield data, end
        total += len(data)
        if budget and end and total >= budget:
            return


def head(pieces: Iterable[Piece], limit: int) -> Iterator[Piece]:
    """``pieces`` up to ``limit`` stream bytes (a document's BOS counts one), the document there cut short."""
    total, starts = 0, True
    for data, end in pieces:
        total += starts  # the document's BOS
        data = data[: max(0, limit - total)]
        total += len(data)
        if total >= limit:
            yield data, True
            return
        yield data, end
        starts = end


def documents(pieces: Iterable[Piece]) -> Iterator[bytes]:
    """The documents of ``pieces``, each joined whole."""
    parts: list[bytes] = []
    for data, end in pieces:
        parts.append(data)
        if end:
            yield b"".join(parts)
            parts = []


def iter_documents(spec: DataSpec) -> Iterator[bytes]:
    """The documents of ``spec``, each whole, in source order, up to ``max_bytes`` (0: all)."""
    return documents(until(iter_pieces(spec), spec.max_bytes))


def load_documents(spec: DataSpec) -> list[bytes]:
    """:func:`iter_documents` as a list (small data only: every document is held whole)."""
    return list(iter_documents(spec))


__all__ = ["READ_BYTES", "InputFile", "SourceError", "documents", "expand_paths", "head", "iter_documents",
           "iter_pieces", "load_documents", "until"]
