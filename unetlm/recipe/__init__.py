"""Recipes: attrs schema, strict TOML loading and ``key=value`` overrides."""
from unetlm.recipe.errors import RecipeError
from unetlm.recipe.load import dump_recipe, load_recipe, recipe_from_dict
from unetlm.recipe.schema import Component, DataSpec, ModelSpec, Recipe, StageSpec, TrainingSpec

__all__ = [
    "Component", "DataSpec", "ModelSpec", "Recipe", "RecipeError", "StageSpec", "TrainingSpec",
    "dump_recipe", "load_recipe", "recipe_from_dict",
]
