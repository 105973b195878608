"""Exclusive advisory file locks (``flock``): the kernel drops a lock when its process dies, so a
killed process never leaves a stale one behind.

``FileLock(path).acquire(wait=False)`` is True when this process now holds the lock, False when
another holds it; :class:`LocksUnsupported` when the filesystem has no ``flock`` (some Lustre and
NFS mounts), which callers report and run without. The lock file stays; its text names the holder.
A forked child (a data loader's worker) closes its copies of the locks at once: a lock belongs to the
open file, so a child still holding it would keep it after its parent died.
"""
from __future__ import annotations

import errno
import fcntl
import os
import socket
from pathlib import Path

_UNSUPPORTED = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}


_HELD: set[FileLock] = set()  # the locks this process holds; FileLock alone adds and removes


def _forget_in_child() -> None:
    for lock in list(_HELD):
        os.close(lock._fd)  # not LOCK_UN: that would unlock the parent's lock too
        lock._fd = None
    _HELD.clear()


os.register_at_fork(after_in_child=_forget_in_child)


class LocksUnsupported(OSError):
    """The filesystem of a lock file does not support ``flock``."""


class FileLock:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, wait: bool = True) -> bool:
        """Take the lock (``wait``: block until it is free); then write the holder's host and pid."""
        if self._fd is not None:
            return True
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return False
        except OSError as exc:
            os.close(fd)
            if exc.errno in _UNSUPPORTED:
                raise LocksUnsupported(exc.errno, f"{self.path}: the filesystem does not support file locks") from None
            raise
        self._fd = fd
        _HELD.add(self)
        os.ftruncate(fd, 0)
        os.write(fd, f"host {socket.gethostname()} pid {os.getpid()}\n".encode())
        return True

    def holder(self) -> str:
        """The text the holder wrote ("host NAME pid N"), or "" when unknown."""
        try:
            return self.path.read_text(encoding="utf-8").strip()
        except OSError:
            return ""

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            _HELD.discard(self)
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> "FileLock":
        self.acquire(wait=True)
        return self

    def __exit__(self, *exc) -> None:
        self.release()
