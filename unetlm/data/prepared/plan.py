"""Which input each shard reads: a deterministic cut of the recipe's sources into shards.

The plan depends on the sources only (paths, sizes, ``shard_bytes``), never on how many jobs
or workers prepare them, so ``--shard I/N`` jobs agree on it without talking to each other.
Shards are, in stream order: ``files``: runs of whole files of about ``shard_bytes``;
``jsonl``: byte ranges of a file, each holding the lines that *start* in it; ``parquet``:
runs of row groups; ``pydocs``: one shard. ``hf`` streams have no plan: rows are cut into
shards of :data:`HF_ROWS` while streaming (see :func:`hf_shards`).
"""
from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import attrs

from unetlm.data.sources import (
    expand_paths, hf_documents, jsonl_document, open_parquet, parquet_rows, pydocs_documents,
)
from unetlm.recipe.errors import RecipeError
from unetlm.recipe.schema import DataSpec

HF_ROWS = 4096  # rows of a streamed dataset per shard


@attrs.define
class ShardInput:
    """One shard's input. ``start``/``stop``: a byte range (jsonl) or row groups (parquet)."""

    kind: str
    paths: list[str]
    start: int = 0
    stop: int = 0
    size: int = 0  # input bytes, for progress

    def describe(self) -> dict:
        return attrs.asdict(self)


@attrs.define
class BadLines:
    """Lines that were skipped (``--skip-bad``): their count and the first one's place."""

    count: int = 0
    first: str = ""


def source_identity(spec: DataSpec) -> dict:
    """What identifies the documents of ``spec``: the source, its options and each file's size and mtime."""
    out: dict = {"source": spec.source, "max_bytes": spec.max_bytes}
    if spec.source in ("jsonl", "parquet", "hf"):
        out["text_field"] = spec.text_field
    if spec.source in ("files", "jsonl", "parquet"):
        out["files"] = [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in expand_paths(spec.paths)]
    elif spec.source == "pydocs":
        out["python"] = sys.version
    else:
        out |= {"dataset": spec.dataset, "subset": spec.subset, "split": spec.split}
    return out


def plan_shards(spec: DataSpec, shard_bytes: int) -> list[ShardInput] | None:
    """The shards of ``spec`` in stream order (None for a streamed ``hf`` source)."""
    if spec.source == "pydocs":
        return [ShardInput("pydocs", [], size=sum(len(d) for d in pydocs_documents()))]
    if spec.source == "hf":
        return None
    paths = expand_paths(spec.paths)
    if spec.source == "files":
        return _group_files(paths, shard_bytes)
    if spec.source == "jsonl":
        out = []
        for path in paths:
            size = path.stat().st_size
            starts = range(0, max(size, 1), shard_bytes)
            out += [ShardInput("jsonl", [str(path)], a, min(a + shard_bytes, size), min(shard_bytes, size - a))
                    for a in starts]
        return out
    out = []
    for path in paths:
        meta = open_parquet(path, spec.text_field).metadata
        sizes = [meta.row_group(g).total_byte_size for g in range(meta.num_row_groups)]
        for a, b in _runs(sizes, shard_bytes):
            out.append(ShardInput("parquet", [str(path)], a, b, sum(sizes[a:b])))
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


def _group_files(paths: list[Path], shard_bytes: int) -> list[ShardInput]:
    sizes = [p.stat().st_size for p in paths]
    runs = _runs(sizes, shard_bytes)
    return [ShardInput("files", [str(p) for p in paths[a:b]], size=sum(sizes[a:b])) for a, b in runs]


def shard_documents(shard: ShardInput, spec: DataSpec, skip_bad: bool, bad: BadLines) -> Iterator[bytes]:
    """The documents of one planned shard, in stream order."""
    if shard.kind == "pydocs":
        return pydocs_documents()
    if shard.kind == "files":
        return (Path(p).read_bytes() for p in shard.paths)
    if shard.kind == "jsonl":
        return _jsonl_range(Path(shard.paths[0]), shard.start, shard.stop, spec.text_field, skip_bad, bad)
    table = open_parquet(Path(shard.paths[0]), spec.text_field)
    return parquet_rows(table, spec.text_field, shard.paths[0], list(range(shard.start, shard.stop)))


def _jsonl_range(path: Path, start: int, stop: int, field: str, skip_bad: bool, bad: BadLines) -> Iterator[bytes]:
    """Documents of the lines of ``path`` that start at a byte offset in [start, stop)."""
    with path.open("rb") as f:
        pos = start
        if start > 0:
            f.seek(start - 1)
            if f.read(1) != b"\n":  # the line under ``start`` began in the previous shard
                pos += len(f.readline())
        while pos < stop:
            line = f.readline()
            if not line:
                break
            if line.strip():
                try:
                    data = jsonl_document(line, field, "@")  # messages start with the place: filled in below
                except RecipeError as exc:
                    message = f"{path}:{_line_number(path, pos)}{str(exc)[1:]}"
                    if not skip_bad:
                        raise RecipeError(f"{message} (pass --skip-bad to skip such lines)") from None
                    bad.count += 1
                    bad.first = bad.first or message
                else:
                    yield data
            pos += len(line)


def _line_number(path: Path, offset: int) -> int:
    """1-based number of the line that starts at byte ``offset``."""
    count = 0
    with path.open("rb") as f:
        while offset > 0:
            chunk = f.read(min(offset, 1 << 20))
            if not chunk:
                break
            count += chunk.count(b"\n")
            offset -= len(chunk)
    return count + 1


def hf_shards(spec: DataSpec) -> Iterator[list[bytes]]:
    """A streamed dataset's rows in shards of :data:`HF_ROWS`, up to the document that crosses
    ``max_bytes`` (so every job that streams it sees the same shards)."""
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
