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


def test_training_benchmark_times_the_recipe_beside_its_reference(tmp_path):
    """Records of the recipe and of the plain transformer of its byte stage, timed in turn; the
    reference has the byte transformer's parameters and FLOPs per byte, and its loss is a loss."""
    import json

    from unetlm.bench.train import Reference, ReferenceShape, bench_train, format_table

    out = tmp_path / "train.json"
    overrides = ["training.batch_size=2", "model.seq_len=64", "training.threads=1"]
    records = bench_train([ROOT / "recipes/tiny/au1.toml"], out, modes=("eager",), steps=2, warmup=1,
                          overrides=overrides)
    assert json.loads(out.read_text()) == records
    recipe, reference = records
    assert (recipe["model"], reference["model"]) == ("au1", "reference")
    assert recipe["params"] == reference["params"] and len(recipe["step_s"]) == len(reference["step_s"]) == 2
    assert reference["flops_per_byte"] == pytest.approx(recipe["flops_per_byte"])
    assert "reference" in format_table(records) and "x" in format_table(records).splitlines()[1]
    model = build_model(load_recipe(ROOT / "recipes/tiny/au3.toml"))
    shape = ReferenceShape.of(model)
    assert (shape.dim, shape.layers, shape.seq_len) == (64, 4, 512)  # the byte stage: 2 encoder + 2 decoder layers
    tokens = torch.randint(0, 256, (1, 16))
    assert 4.0 < float(Reference(shape)(tokens, tokens)) < 7.0  # about ln(258) at initialisation
