"""The prepared-data cache (``$UNETLM_CACHE/prepared/KEY``): what it holds, and clearing it.

Training a recipe without ``data.prepared`` prepares its sources into ``KEY`` =
:func:`unetlm.data.prepared.cache_key` (sources, splitters with their code, tokenizer, format)
and reuses it while the key stays the same (the folder's modification time records the last
use); a key that no recipe produces any more is never read again. ``unetlm cache list`` shows
each entry, ``unetlm cache clear`` removes them.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import attrs

from unetlm.core.errors import RunError, UsageError
from unetlm.core.locks import LocksUnsupported
from unetlm.data.corpora import cache_lock, cache_root
from unetlm.data.errors import PreparedDataError
from unetlm.data.prepared.format import PREPARATION, VERSION
from unetlm.data.prepared.read import PreparedCorpus


@attrs.define
class Entry:
    """One cached preparation."""

    key: str
    path: Path
    size: int  # bytes on disk
    used: float  # when it was last prepared or reused (seconds since the epoch)
    state: str  # complete, unfinished, or an older format
    sources: str
    splitters: str


def prepared_root() -> Path:
    return cache_root() / "prepared"


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _describe(preparation: dict) -> tuple[str, str]:
    sources = preparation.get("sources", {})
    files = sources.get("files") or []
    what = sources.get("source", "?")
    if files:
        what += f": {files[0][0]}" + (f" (+{len(files) - 1} more)" if len(files) > 1 else "")
    elif sources.get("dataset"):
        what += f": {sources['dataset']}"
    names = [s.get("name", "?") for s in preparation.get("splitters", [])]
    return what, ", ".join(names) or "(none)"


def entries() -> list[Entry]:
    """Every cached preparation, the most recently used first."""
    root = prepared_root()
    out = []
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        if not path.is_dir():
            continue
        try:
            preparation = json.loads((path / PREPARATION).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            preparation = {}
        sources, splitters = _describe(preparation)
        state = _state(path, preparation)
        out.append(Entry(path.name, path, _size(path), path.stat().st_mtime, state, sources, splitters))
    return sorted(out, key=lambda e: -e.used)


def _state(path: Path, preparation: dict) -> str:
    if preparation and preparation.get("version") != VERSION:
        return f"format {preparation.get('version')} (no longer read)"
    try:
        PreparedCorpus.open(path)
        return "complete"
    except PreparedDataError:
        return "unfinished"


def clear(keys: list[str]) -> list[Entry]:
    """Remove the cached preparations named by ``keys`` (a key or a prefix of one; none: all) and
    return them. A key that names none, or several, is an error."""
    found = entries()
    if keys:
        chosen = []
        for key in keys:
            matches = [e for e in found if e.key.startswith(key)]
            if len(matches) != 1:
                what = "no cached preparation" if not matches else f"{len(matches)} cached preparations"
                raise UsageError(f"{what} in {prepared_root()} match {key!r}; unetlm cache list shows them")
            chosen.append(matches[0])
        found = chosen
    for entry in found:
        lock = cache_lock(entry.path)
        try:
            if not lock.acquire(wait=False):
                raise RunError(f"{entry.path} is being prepared ({lock.holder()}); clear it once that run has started")
        except LocksUnsupported:
            lock = None
        try:
            shutil.rmtree(entry.path)
            if lock is not None:
                lock.path.unlink(missing_ok=True)
        finally:
            if lock is not None:
                lock.release()
    return found


def format_entries(found: list[Entry]) -> str:
    if not found:
        return f"no prepared data in {prepared_root()}"
    rows = [("key", "size", "last used", "state", "splitters", "sources")]
    for e in found:
        rows.append((e.key, f"{e.size / 1e6:,.1f} MB", time.strftime("%Y-%m-%d %H:%M", time.localtime(e.used)),
                     e.state, e.splitters, e.sources))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows]
    total = sum(e.size for e in found)
    return "\n".join([f"{prepared_root()}:", *lines, f"{len(found)} preparations, {total / 1e6:,.1f} MB"])
