"""The benchmark recipes (``recipes/bench/``) stay at the ~10M-parameter size the training-speed
targets are stated for (docs/benchmarks.md)."""
from __future__ import annotations

import pytest
import torch

from strategies import ROOT, recipe_params
from unetlm.api import build_model
from unetlm.model.summary import summarize
from unetlm.recipe import load_recipe

BENCH_RECIPES = sorted((ROOT / "recipes" / "bench").glob("*.toml"))


def test_there_are_bench_recipes():
    assert {p.stem for p in BENCH_RECIPES} >= {"au1-10m", "au2-10m", "au3-10m"}


@pytest.mark.parametrize("path", recipe_params(BENCH_RECIPES))
def test_bench_recipe_has_about_10m_parameters(path):
    recipe = load_recipe(path)
    assert recipe.description
    with torch.device("meta"):
        model = build_model(recipe)
    params = summarize(model).params
    assert 9_000_000 <= params <= 11_000_000, f"{path.name}: {params:,} parameters"
