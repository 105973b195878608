"""Building models from recipes and loading checkpoints."""
from __future__ import annotations

from pathlib import Path

import torch

from unetlm.model.build import build_model

__all__ = ["build_model", "load_checkpoint", "checkpoint_files"]


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu"):
    """(model in eval mode, recipe) from a run directory (its sharded checkpoint), an exported
    directory (``unetlm export``) or a single ``.pt`` file of plain data; nothing in the files is
    run as code (see :mod:`unetlm.train.weights`)."""
    from unetlm.train.weights import load_trained

    return load_trained(path, map_location)


def checkpoint_files(path: str | Path) -> list[Path]:
    """The files the trained model at ``path`` (any form :func:`load_checkpoint` reads) is read from."""
    from unetlm.train.weights import weight_files

    return weight_files(path)
