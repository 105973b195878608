"""Building models from recipes and loading checkpoints."""
from __future__ import annotations

from pathlib import Path

import torch

from unetlm.recipe import Recipe, load_recipe, recipe_from_dict
from unetlm.recipe.schema import ModelSpec


def build_model(recipe: Recipe | ModelSpec | str | Path, overrides: list[str] | tuple[str, ...] = ()):
    """A freshly initialised :class:`~unetlm.model.unet.UNet` from a recipe (object or path)."""
    from unetlm.model.unet import UNet

    if isinstance(recipe, (str, Path)):
        recipe = load_recipe(recipe, overrides)
    spec = recipe.model if isinstance(recipe, Recipe) else recipe
    return UNet(spec)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu"):
    """(model, recipe) from a checkpoint file written by ``unetlm train``."""
    state = torch.load(Path(path), map_location=map_location, weights_only=False)
    recipe = recipe_from_dict(state["recipe"])
    model = build_model(recipe)
    model.load_state_dict(state["model"])
    model.eval()
    return model, recipe
