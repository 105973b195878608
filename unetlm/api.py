"""Building models from recipes and loading checkpoints."""
from __future__ import annotations

from pathlib import Path

import torch

from unetlm.recipe import Recipe, RecipeError, load_recipe, recipe_from_dict
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


def model_from_state(recipe: Recipe, state: dict):
    """The trained model of a checkpoint's state (weights, and the tokenizer of a tokenized model), in eval mode."""
    model = build_model(recipe)
    model.load_state_dict(state["model"])
    if "tokenizer" in state:
        from unetlm.data.bpe import BpeTokenizer

        model.tokenizer = BpeTokenizer.from_json(state["tokenizer"])
    model.eval()
    return model


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu"):
    """(model, recipe) from a checkpoint file written by ``unetlm train``."""
    state = torch.load(Path(path), map_location=map_location, weights_only=False)
    recipe = recipe_from_dict(state["recipe"])
    return model_from_state(recipe, state), recipe
