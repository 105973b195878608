"""One run per run directory: rank 0 holds ``RUN_DIR/train.lock`` (an ``flock``, dropped by the
kernel when the process dies, so a killed run leaves no stale lock) for the run's life; a second
run started on the same directory is refused, on every one of its ranks, with one line."""
from __future__ import annotations

import sys
from pathlib import Path

import attrs

from unetlm.core.locks import FileLock, LocksUnsupported
from unetlm.train.errors import TrainingError
from unetlm.train.distributed import World, from_rank0

LOCK = "train.lock"


@attrs.define
class RunLock:
    """The lock of a run directory (``lock`` None on other ranks than 0 and where the filesystem
    has no locks); ``created``: the directory did not exist before this run."""

    out: Path
    lock: FileLock | None = None
    created: bool = False

    @property
    def held(self) -> bool:
        return self.lock is not None and self.lock.held

    def release(self) -> None:
        """Unlock; a directory this run created and left empty (a refused start) is removed again."""
        if self.lock is None:
            return
        self.lock.release()
        if self.created and [p.name for p in self.out.iterdir()] == [LOCK]:
            (self.out / LOCK).unlink()
            self.out.rmdir()


def lock_run(out: Path, world: World) -> RunLock:
    """Take ``out``'s lock on rank 0, or raise :class:`TrainingError` on every rank if another run holds it."""
    held = RunLock(out)

    def take() -> str:
        held.created = not out.exists()
        out.mkdir(parents=True, exist_ok=True)
        lock = FileLock(out / LOCK)
        try:
            if not lock.acquire(wait=False):
                return (f"--out {out} is in use by another run ({lock.holder() or 'holding ' + str(lock.path)}); "
                        f"wait for it to end or choose another --out")
        except LocksUnsupported:
            print(f"warning: {out}'s filesystem has no file locks: a second run on it would not be refused",
                  file=sys.stderr, flush=True)
            return ""
        held.lock = lock
        return ""

    error = from_rank0(take, world)
    if error:
        raise TrainingError(error)
    return held
