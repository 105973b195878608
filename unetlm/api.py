"""Building models from recipes and loading checkpoints."""
from __future__ import annotations

from pathlib import Path

import torch

from unetlm.recipe import Recipe, load_recipe
from unetlm.recipe.schema import ModelSpec


def build_model(recipe: Recipe | ModelSpec | str | Path, overrides: list[str] | tuple[str, ...] = ()):
    """A freshly initialised :class:`~unetlm.model.unet.UNet` from a recipe (object or path)."""
    from unetlm.model.unet import UNet

    if isinstance(recipe, (str, Path)):
        recipe = load_recipe(recipe, overrides)
    spec = recipe.model if isinstance(recipe, Recipe) else recipe
    return UNet(spec)


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
