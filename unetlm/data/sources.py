"""Where documents come from. Every source yields raw bytes: invalid UTF-8 is data, not an error.

Sources (``data.source``): ``pydocs`` (CPython's help topics), ``files`` (each file one document),
``jsonl`` (one JSON object per line, document in ``text_field``), ``parquet`` (a column, read
with pyarrow) and ``hf`` (a Hugging Face dataset, streamed). pyarrow and datasets are optional
and imported only when their source is chosen. ``max_bytes`` stops reading once that many
document bytes were read (the document that crosses the limit is kept whole).
"""
from __future__ import annotations

import glob
import json
from collections.abc import Iterator
from pathlib import Path

from unetlm.recipe.errors import RecipeError
from unetlm.recipe.schema import DataSpec


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


def file_documents(patterns: list[str]) -> Iterator[bytes]:
    """Each matching file is one document, read as raw bytes."""
    for path in expand_paths(patterns):
        yield path.read_bytes()


def as_bytes(value, where: str) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        # surrogateescape gives back the original bytes of a line that was not valid UTF-8
        return value.encode("utf-8", errors="surrogateescape")
    raise RecipeError(f"{where}: expected text or bytes, found {type(value).__name__}")


def jsonl_documents(patterns: list[str], field: str) -> Iterator[bytes]:
    """One document per non-empty line: the string at ``field`` of a JSON object."""
    for path in expand_paths(patterns):
        with path.open("rb") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                yield jsonl_document(line, field, f"{path}:{number}")


def jsonl_document(line: bytes, field: str, where: str) -> bytes:
    """The document in one jsonl line (``where``: file:line, for the error)."""
    try:
        row = json.loads(line.decode("utf-8", errors="surrogateescape"))
    except json.JSONDecodeError as exc:
        raise RecipeError(f"{where}: not a JSON object: {exc}") from None
    if not isinstance(row, dict) or field not in row:
        raise RecipeError(f"{where}: no field {field!r} (set data.text_field)")
    return as_bytes(row[field], where)


def parquet_documents(patterns: list[str], field: str) -> Iterator[bytes]:
    """One document per row of the column ``field`` (string or binary)."""
    for path in expand_paths(patterns):
        yield from parquet_rows(open_parquet(path, field), field, str(path))


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


def parquet_rows(table, field: str, where: str, row_groups: list[int] | None = None) -> Iterator[bytes]:
    """The non-null values of column ``field`` (of the given row groups; None: all), as bytes."""
    for batch in table.iter_batches(columns=[field], row_groups=row_groups):
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


def iter_documents(spec: DataSpec) -> Iterator[bytes]:
    require_source(spec)
    if spec.source == "pydocs":
        return pydocs_documents()
    if spec.source == "files":
        return file_documents(spec.paths)
    if spec.source == "jsonl":
        return jsonl_documents(spec.paths, spec.text_field)
    if spec.source == "parquet":
        return parquet_documents(spec.paths, spec.text_field)
    return hf_documents(spec)


def load_documents(spec: DataSpec) -> list[bytes]:
    """The documents of ``spec``, in source order, up to ``max_bytes`` (0: all)."""
    if not spec.max_bytes:
        return list(iter_documents(spec))
    docs, total = [], 0
    for data in iter_documents(spec):
        docs.append(data)
        total += len(data)
        if total >= spec.max_bytes:
            break
    return docs


__all__ = ["expand_paths", "iter_documents", "load_documents"]
