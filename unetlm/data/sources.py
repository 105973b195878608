"""Where documents come from. Any bytes are accepted: invalid UTF-8 is data, not an error."""
from __future__ import annotations

import glob
from pathlib import Path

from unetlm.recipe.errors import RecipeError
from unetlm.recipe.schema import DataSpec


def pydocs_documents() -> list[bytes]:
    """The help topics that ship with CPython (``pydoc_data.topics``), one document each."""
    from pydoc_data.topics import topics

    return [topics[key].encode("utf-8") for key in sorted(topics)]


def file_documents(patterns: list[str]) -> list[bytes]:
    """Each matching file is one document, read as raw bytes."""
    docs = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True)) or ([pattern] if Path(pattern).is_file() else [])
        if not matches:
            raise RecipeError(f"data.paths: {pattern!r} matches no file")
        docs.extend(Path(m).read_bytes() for m in matches)
    return docs


def load_documents(spec: DataSpec) -> list[bytes]:
    if spec.source == "pydocs":
        return pydocs_documents()
    return file_documents(spec.paths)
