"""Where a run keeps its checkpoints, and which one is read.

``RUN_DIR/checkpoints/step-0000100/`` holds the checkpoint of step 100 (a directory of
:mod:`unetlm.checkpoint.sharded`). A save writes ``step-0000100.tmp/`` and commits it by renaming
it into place once its manifest is written; only then are older ones pruned, the newest
``keep`` staying. A kill at any moment leaves every committed checkpoint as it was (a leftover
``.tmp`` or ``.deleting`` folder is ignored, and removed by the next save).

Readers take the newest checkpoint that checks out and falls back past damaged ones, a warning
line each. Runs of the previous layout (``RUN_DIR/checkpoint/``, ``checkpoint.prev/``, no
manifest) are read as the oldest candidates.
"""
from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path
from typing import Callable, TypeVar

from unetlm.checkpoint.errors import CheckpointError, UnsafeCheckpointError
from unetlm.checkpoint.manifest import MANIFEST
from unetlm.checkpoint.sharded import check_directory, is_checkpoint

CHECKPOINTS = "checkpoints"
LEGACY = ("checkpoint", "checkpoint.prev")  # the previous layout, newest first
_STEP = re.compile(r"step-(\d+)")
T = TypeVar("T")


def step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step-{step:07d}"


def committed(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of the run's step folders, oldest first."""
    folder = Path(run_dir) / CHECKPOINTS
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP.fullmatch(p.name))] if folder.is_dir() else []
    return sorted(found)


def candidates(path: str | Path) -> list[Path]:
    """The checkpoints to try for ``path``, newest first: ``path`` itself when it is a checkpoint
    directory, else a run directory's step folders, then its previous-layout ones."""
    path = Path(path)
    if is_checkpoint(path):
        return [path]
    legacy = [path / name for name in LEGACY if is_checkpoint(path / name)]
    return [p for _, p in reversed(committed(path))] + legacy


def warn(message: str) -> None:
    print(f"unetlm: warning: {message}", file=sys.stderr, flush=True)


def first_usable(
    directories: list[Path], use: Callable[[Path], T], verify: bool = False,
    on_skip: Callable[[str], None] = warn, checked: tuple[Path, ...] = (),
) -> tuple[Path, T] | None:
    """``(directory, use(directory))`` for the first of ``directories`` that checks out (files as
    :func:`check_directory` checks them, except for those in ``checked``) and that ``use`` reads;
    a damaged one is skipped with one ``on_skip`` line once an older one works, and when none
    does, the error is the newest's. None if there are no directories. Unsafe files are never skipped."""
    failures: list[CheckpointError] = []
    for directory in directories:
        try:
            if directory not in checked:
                check_directory(directory, verify)
            value = use(directory)
        except UnsafeCheckpointError:
            raise
        except CheckpointError as exc:
            failures.append(exc)
            continue
        for exc in failures:
            on_skip(f"{exc}; falling back to {directory}")
        return directory, value
    if not failures:
        return None
    older = f" (and the {len(failures) - 1} older one(s) as well)" if len(failures) > 1 else ""
    raise CheckpointError(f"{failures[0]}{older}")


def latest(path: str | Path, use: Callable[[Path], T], verify: bool = False,
           on_skip: Callable[[str], None] = warn) -> tuple[Path, T] | None:
    """:func:`first_usable` over the :func:`candidates` of ``path``."""
    return first_usable(candidates(path), use, verify, on_skip)


# --- writing ---------------------------------------------------------------------------------

def begin(run_dir: Path, step: int, main: bool) -> Path:
    """The empty temporary folder of step ``step``'s checkpoint (made by the main rank, which also
    clears what an interrupted save left; the caller then synchronises)."""
    tmp = _temporary(run_dir, step)
    if main:
        folder = tmp.parent
        folder.mkdir(parents=True, exist_ok=True)
        for leftover in folder.iterdir():
            if leftover.suffix in (".tmp", ".deleting"):
                shutil.rmtree(leftover, ignore_errors=True)
        tmp.mkdir()
    return tmp


def _temporary(run_dir: Path, step: int) -> Path:
    final = step_dir(run_dir, step)
    return final.with_name(final.name + ".tmp")


def commit(run_dir: Path, step: int, keep: int, base: int = 0) -> Path:
    """Main rank, once every shard, the index and the manifest are written: the temporary folder
    becomes ``step-N/``. Then the folders of a timeline the run left go (steps after ``base``, the
    step it continued from, other than this one: what it fell back past), and all but the newest
    ``keep``."""
    tmp, final = _temporary(run_dir, step), step_dir(run_dir, step)
    if not (tmp / MANIFEST).is_file():
        raise CheckpointError(f"{tmp} is incomplete (no {MANIFEST}); the previous checkpoints are kept")
    if final.exists():  # a step written again after falling back past a damaged one
        _remove(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    folders = committed(run_dir)
    kept = [p for s, p in folders if s <= base or s == step][-keep:]
    for _, folder in folders:
        if folder not in kept:
            _remove(folder)
    return final


def _remove(folder: Path) -> None:
    """Delete a committed folder so that no half-deleted one is ever taken for a checkpoint."""
    doomed = folder.with_name(folder.name + ".deleting")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(folder, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
