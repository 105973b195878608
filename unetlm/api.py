"""Building models from recipes and loading checkpoints."""
from __future__ import annotations

from pathlib import Path

import torch

from unetlm.checkpoint.trained import load_trained
from unetlm.model.build import build_model

__all__ = ["build_model", "load_checkpoint"]


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", verify: bool = False):
    """(model in eval mode, recipe) from a run directory (its newest valid checkpoint), a checkpoint
    folder, an exported directory (``unetlm export``) or a single ``.pt`` file of plain data;
    nothing in the files is run as code (see :mod:`unetlm.checkpoint.trained`). ``verify``: check
    every file's sha256 against its manifest first."""
    return load_trained(path, map_location, verify)
