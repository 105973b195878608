"""Which input each unit reads: a deterministic cut of the recipe's sources into units of input.

A unit is what one worker reads in stream order, whole documents only, and writes as one or more
shards (a document longer than a shard spans several). The cut depends on the sources only
(paths, sizes, ``shard_bytes``), never on how many jobs or workers prepare them, so ``--shard I/N``
jobs agree on it without talking to each other, and a document is always read, split and
tokenized from its start by one worker, whatever the jobs: the stream is that of one run.
Units are, in stream order: ``files``: runs of whole files of about ``shard_bytes`` (a larger
file is a unit of its own, or closes a run); ``jsonl``: byte ranges of a file, each holding the
lines that *start* in it (a compressed file, which cannot be entered in the middle: one unit);
``parquet``: runs of row groups; ``pydocs``: one unit. ``hf`` streams have no cut: rows are
grouped into units of :data:`HF_ROWS` while streaming (see :func:`hf_units`).
"""
from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import attrs

from unetlm.data.jsonl import BadLines
from unetlm.data.sources import (
    compression, expand_paths, file_pieces, hf_documents, jsonl_file_pieces, open_parquet, parquet_rows,
    pydocs_documents, whole_pieces,
)
from unetlm.recipe.schema import DataSpec

HF_ROWS = 4096  # rows of a streamed dataset per unit


@attrs.define
class Unit:
    """One unit's input. ``start``/``stop``: a byte range (jsonl) or row groups (parquet);
    ``stats``: (size, mtime_ns) of each path when the units were cut."""

    kind: str
    paths: list[str]
    start: int = 0
    stop: int = 0
    size: int = 0  # input bytes (of the files as they lie on disk), for progress
    stats: list[list[int]] = attrs.field(factory=list)

    def describe(self) -> dict:
        return attrs.asdict(self)


def _stat(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def source_identity(spec: DataSpec) -> dict:
    """What identifies the documents of ``spec``: the source, its options and each file's size and mtime."""
    out: dict = {"source": spec.source, "max_bytes": spec.max_bytes}
    if spec.source in ("jsonl", "parquet", "hf"):
        out["text_field"] = spec.text_field
    if spec.source in ("files", "jsonl", "parquet"):
        out["files"] = [[str(p.resolve()), *_stat(p)] for p in expand_paths(spec.paths)]
    elif spec.source == "pydocs":
        out["python"] = sys.version
    else:
        out |= {"dataset": spec.dataset, "subset": spec.subset, "split": spec.split}
    return out


def assign_units(spec: DataSpec, shard_bytes: int) -> list[Unit] | None:
    """The units of ``spec`` in stream order (None for a streamed ``hf`` source)."""
    if spec.source == "pydocs":
        return [Unit("pydocs", [], size=sum(len(d) for d in pydocs_documents()))]
    if spec.source == "hf":
        return None
    paths = expand_paths(spec.paths)
    if spec.source == "files":
        stats = [_stat(p) for p in paths]
        return [Unit("files", [str(p) for p in paths[a:b]], size=sum(s[0] for s in stats[a:b]), stats=stats[a:b])
                for a, b in _runs([s[0] for s in stats], shard_bytes)]
    if spec.source == "jsonl":
        out = []
        for path in paths:
            stat = _stat(path)
            size = stat[0]
            if compression(path):  # a compressed stream is read from its start: one unit
                out.append(Unit("jsonl", [str(path)], 0, size, size, [stat]))
                continue
            out += [Unit("jsonl", [str(path)], a, min(a + shard_bytes, size), min(shard_bytes, size - a), [stat])
                    for a in range(0, max(size, 1), shard_bytes)]
        return out
    out = []
    for path in paths:
        meta = open_parquet(path, spec.text_field).metadata
        sizes = [meta.row_group(g).total_byte_size for g in range(meta.num_row_groups)]
        for a, b in _runs(sizes, shard_bytes):
            out.append(Unit("parquet", [str(path)], a, b, sum(sizes[a:b]), [_stat(path)]))
    return out


def _runs(sizes: list[int], target: int) -> list[tuple[int, int]]:
    """Consecutive [a, b) index runs, each closed once it holds ``target`` or more."""
    runs, a, total = [], 0, 0
    for i, size in enumerate(sizes):
        total += size
        if total >= target:
            runs.append((a, i + 1))
            a, total = i + 1, 0
    if a < len(sizes) or not runs:
        runs.append((a, len(sizes)))
    return runs


def _counted(pieces, on_input: Callable[[int], None] | None):
    """``pieces`` reporting their bytes as input read (sources not read from files)."""
    for data, end in pieces:
        if on_input is not None:
            on_input(len(data))
        yield data, end


def unit_pieces(unit: Unit, spec: DataSpec, skip_bad: bool, bad: BadLines,
                on_input: Callable[[int], None] | None = None) -> Iterator[tuple[bytes, bool]]:
    """The document pieces of one unit, in stream order; ``on_input(n)``: ``n`` more input bytes read."""
    if unit.kind == "pydocs":
        return _counted(whole_pieces(pydocs_documents()), on_input)
    if unit.kind == "files":
        return (p for path, stat in zip(unit.paths, unit.stats) for p in file_pieces(path, tuple(stat), on_input))
    if unit.kind == "jsonl":
        stop = None if compression(unit.paths[0]) else unit.stop  # a compressed file's unit is all of it
        return jsonl_file_pieces(unit.paths[0], spec.text_field, unit.start, stop, tuple(unit.stats[0]), skip_bad,
                                 bad, on_input)
    table = open_parquet(Path(unit.paths[0]), spec.text_field)
    rows = parquet_rows(table, spec.text_field, unit.paths[0], list(range(unit.start, unit.stop)))
    return _counted(whole_pieces(rows), on_input)


def hf_units(spec: DataSpec) -> Iterator[list[bytes]]:
    """A streamed dataset's rows in units of :data:`HF_ROWS`, up to the document that crosses
    ``max_bytes`` (so every job that streams it sees the same units)."""
    rows, total = [], 0
    for data in hf_documents(spec):
        rows.append(data)
        total += len(data)
        if spec.max_bytes and total >= spec.max_bytes:
            break
        if len(rows) == HF_ROWS:
            yield rows
            rows = []
    if rows:
        yield rows
