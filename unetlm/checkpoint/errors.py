"""What goes wrong reading a checkpoint, as the command line's one-line errors (exit status 2:
the file given is the bad input)."""
from __future__ import annotations

from unetlm.core.errors import UsageError


class CheckpointError(UsageError):
    """A checkpoint is missing, incomplete or damaged; the message names the file and why."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint holds something other than plain data, which unpickling could run as code;
    never a reason to fall back to an older checkpoint."""
