"""Building models from recipes and loading checkpoints."""
from __future__ import annotations

from pathlib import Path

import torch

from unetlm.model.build import build_model
from unetlm.splitters.entropy_models import use_entropy_models
from unetlm.train.trained_models import TrainedModels
from unetlm.train.weights import load_trained

__all__ = ["build_model", "load_checkpoint"]


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu"):
    """(model in eval mode, recipe) from a run directory (its sharded checkpoint), an exported
    directory (``unetlm export``) or a single ``.pt`` file of plain data; nothing in the files is
    run as code (see :mod:`unetlm.train.weights`)."""
    return load_trained(path, map_location)


use_entropy_models(TrainedModels())  # entropy splitters built through this API load checkpoints
