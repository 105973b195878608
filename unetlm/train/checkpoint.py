"""Atomic checkpoints: written to a temporary file, flushed, then renamed into place.

A run killed mid-save leaves the previous complete checkpoint untouched.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

CHECKPOINT = "checkpoint.pt"


def save_atomic(state: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def rng_state() -> dict:
    return {"torch": torch.get_rng_state()}


def load_state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)
