"""The manifest of a checkpoint or exported directory: what a complete one holds.

``manifest.json``, written last, records each file's size and sha256, the step, the sha256 of
the recipe and the format version. Checking a directory compares sizes always (a cheap ``stat``)
and hashes when asked, or when a size is off (to name every damaged file at once).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from unetlm.checkpoint.errors import CheckpointError

MANIFEST = "manifest.json"
VERSION = 1
_CHUNK = 1 << 22


def file_record(path: Path) -> dict:
    """``{"bytes": size, "sha256": hex}`` of a file."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def recipe_sha256(recipe_dict: dict) -> str:
    return hashlib.sha256(json.dumps(recipe_dict, sort_keys=True).encode()).hexdigest()


def write_manifest(directory: Path, files: dict[str, dict], kind: str, step: int | None, recipe: str) -> None:
    """Write ``directory/manifest.json`` atomically (``files``: name -> :func:`file_record`)."""
    value = {"format": kind, "version": VERSION, "step": step, "recipe_sha256": recipe, "files": files}
    tmp = directory / f".{MANIFEST}.tmp"
    with tmp.open("w", encoding="utf-8") as f:
        json.dump(value, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / MANIFEST)


def read_manifest(directory: Path) -> dict | None:
    """The manifest of ``directory`` (None if it has none); an error if it is not one."""
    path = directory / MANIFEST
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
        files = value["files"]
        ok = isinstance(value.get("version"), int) and all(
            isinstance(r, dict) and isinstance(r.get("bytes"), int) and isinstance(r.get("sha256"), str)
            for r in files.values()
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{path} is damaged: {type(exc).__name__}: {exc}") from None
    if not ok:
        raise CheckpointError(f"{path} is damaged: expected a version and a size and sha256 for every file")
    if value["version"] > VERSION:
        raise CheckpointError(f"{path} has format version {value['version']}; this unetlm reads up to {VERSION}: upgrade it")
    return value


def check_files(directory: Path, manifest: dict, verify: bool) -> None:
    """Every file of ``manifest`` present with its size (and, with ``verify`` or once a size is off,
    its sha256); one error naming each damaged file."""
    problems = []
    for name, want in sorted(manifest["files"].items()):
        path = directory / name
        size = path.stat().st_size if path.is_file() else None
        if size is None:
            problems.append(f"{name} is missing")
        elif size != want["bytes"]:
            problems.append(f"{name} has {size:,} bytes, the manifest says {want['bytes']:,}")
    if verify or problems:
        for name, want in sorted(manifest["files"].items()):
            path = directory / name
            if path.is_file() and path.stat().st_size == want["bytes"] and file_record(path)["sha256"] != want["sha256"]:
                problems.append(f"{name}'s sha256 differs from the manifest's")
    if problems:
        raise CheckpointError(f"{directory} is damaged: {'; '.join(problems)}")
