"""attrs validators for recipe fields and component options (``None`` always passes).

Each raises ``ValueError`` saying what is allowed; :func:`unetlm.recipe.structure.structure`
turns it into a :class:`~unetlm.recipe.errors.RecipeError` naming the key and the value.
"""
from __future__ import annotations


def positive(_inst, attribute, value):
    """value > 0."""
    if value is not None and value <= 0:
        raise ValueError(f"expected a positive value for {attribute.name}")


def non_negative(_inst, attribute, value):
    """value >= 0."""
    if value is not None and value < 0:
        raise ValueError(f"expected a value >= 0 for {attribute.name}")


def fraction(_inst, attribute, value):
    """0 <= value <= 1."""
    if value is not None and not 0.0 <= value <= 1.0:
        raise ValueError(f"expected a value between 0 and 1 for {attribute.name}")


def positive_or_auto(_inst, attribute, value):
    """value > 0, or the string "auto"."""
    if value != "auto":
        positive(_inst, attribute, value)


def non_negative_or_auto(_inst, attribute, value):
    """value >= 0, or the string "auto"."""
    if value != "auto":
        non_negative(_inst, attribute, value)
