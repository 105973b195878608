"""A freshly initialised model from a recipe."""
from __future__ import annotations

from pathlib import Path

from unetlm.recipe import Recipe, RecipeError, load_recipe
from unetlm.recipe.schema import ModelSpec


def build_model(recipe: Recipe | ModelSpec | str | Path, overrides: list[str] | tuple[str, ...] = ()):
    """A freshly initialised :class:`~unetlm.model.unet.UNet` from a recipe (object or path)."""
    from unetlm.model.unet import UNet

    if isinstance(recipe, (str, Path)):
        recipe = load_recipe(recipe, overrides)
    spec = recipe.model if isinstance(recipe, Recipe) else recipe
    if spec.auto_lengths:
        i = spec.auto_lengths[0]
        raise RecipeError(
            f"model.stages[{i}].max_len = 'auto' is sized from data: `unetlm train` does it when it starts, "
            f"`unetlm show RECIPE --data FILE` prints the value; give a number to build the model without data"
        )
    return UNet(spec)
