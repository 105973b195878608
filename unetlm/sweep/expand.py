"""A sweep expanded into runs: recipes x grid (product of keys, zip groups advancing together) x
budgets x seeds, each run a recipe file plus ``--set`` overrides and a readable, deterministic name.

A budget sets ``training.steps`` to the most steps whose training FLOPs fit in it (FLOPs per step:
training FLOPs per position x ``seq_len`` x ``batch_size``, static, so a tokenized model needs no
tokenizer to be planned), validation 8 times and checkpoints 4 times per run (unless the sweep sets
them). Seed i of a run adds i to its ``training.seed`` (model initialisation and data order).
"""
from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Any

import attrs
import torch

from unetlm.model.build import build_model
from unetlm.model.summary import summarize
from unetlm.recipe import Recipe, load_recipe
from unetlm.recipe.errors import RecipeError
from unetlm.recipe.schema import DataSpec
from unetlm.recipe.structure import unstructure
from unetlm.recipe.load import parse_key_path, parse_value
from unetlm.sweep.spec import SweepError, SweepSpec

BUDGET, SEED, RECIPE = "flops", "seed", "recipe"
_BARE = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
_KEY = re.compile(r"[A-Za-z0-9_\-]+")


def toml_value(value: Any, top: bool = True) -> str:
    """``value`` as the TOML text ``--set key=TEXT`` reads back to it (a plain word stays bare at the top)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        if top and _BARE.fullmatch(value) and parse_value(value) == value:
            return value
        return json.dumps(value)  # JSON's escapes are TOML's
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v, False) for v in value) + "]"
    if isinstance(value, dict):
        items = (f"{k if _KEY.fullmatch(k) else json.dumps(k)} = {toml_value(v, False)}" for k, v in value.items())
        return "{" + ", ".join(items) + "}"
    raise SweepError(f"{value!r}: a sweep value must be a TOML value (number, string, boolean, list or table)")


def value_label(value: Any) -> str:
    """A short, file-name-safe label of a grid value: a table by its ``name`` and other options."""
    if isinstance(value, dict):  # a component by its name
        text = value_label(value["name"]) if "name" in value else ",".join(f"{k}.{value_label(v)}" for k, v in value.items())
    elif isinstance(value, list):
        text = "+".join(value_label(v) for v in value)
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, float):
        text = sci(value) if f"{value:g}" == f"{value:.3g}" else f"{value:g}"
    else:
        text = str(value)
    return re.sub(r"[^A-Za-z0-9._,+\-]", "_", text)


def _key_path(key: str) -> list[str]:
    """The key's segments without a trailing ``name`` (a component is named by its table)."""
    path = [str(p) for p in parse_key_path(key)]
    return path[:-1] if len(path) > 1 and path[-1] == "name" else path


def key_labels(keys: list[str]) -> dict[str, str]:
    """Each key's shortest unique suffix: ``model.stages[1].pooler.name`` -> ``pooler`` (``1.pooler`` if
    ``model.stages[2].pooler`` is a key too)."""
    parts = {key: _key_path(key) for key in keys}
    labels = {}
    for key, path in parts.items():
        for n in range(1, len(path) + 1):
            label = ".".join(path[-n:])
            if not any(".".join(p[-n:]) == label for k, p in parts.items() if k != key):
                break
        labels[key] = label
    return labels


def axis_labels(axes: list[list[str]]) -> list[str]:
    """One label per axis (the keys of a product key or a zip group): the keys' last names
    (``pooler`` for ``stages[1].pooler`` and ``stages[2].pooler`` advancing together), or their
    unique suffixes where two axes would read alike."""
    short = ["+".join(dict.fromkeys(_key_path(k)[-1] for k in keys)) for keys in axes]
    full = key_labels([k for keys in axes for k in keys])
    return [s if short.count(s) == 1 else "+".join(full[k] for k in keys) for s, keys in zip(short, axes)]


def sci(x: float) -> str:
    """Three significant digits, exponents written short: 2.5e11, 8.6e-5, 1000."""
    mantissa, _, exponent = f"{x:.3g}".partition("e")
    return f"{mantissa}e{int(exponent)}" if exponent else mantissa


@attrs.define
class Run:
    """One run of a sweep: ``train RECIPE --set OVERRIDE ...`` into ``runs/NAME``."""

    name: str
    recipe_path: str
    overrides: list[str]
    labels: dict[str, str]  # axis -> value label: recipe, varying grid keys, flops, seed
    steps: int
    seed: int
    flops_per_step: float | None  # None: an "auto" batch without a budget
    budget: float | None

    def recipe(self) -> Recipe:
        """The run's recipe, resolved with its overrides (the recipe file is read again)."""
        return load_recipe(self.recipe_path, self.overrides)

    def to_dict(self) -> dict:
        return attrs.asdict(self)

    @property
    def flops(self) -> float | None:
        return None if self.flops_per_step is None else self.steps * self.flops_per_step

    @property
    def config(self) -> str:
        """The run's name without its budget and seed: what a scaling fit or a seed spread groups by."""
        return "-".join([self.labels[RECIPE]] + [f"{k}={v}" for k, v in self.labels.items() if k not in (RECIPE, BUDGET, SEED)])


def step_flops(recipe: Recipe) -> float | None:
    """Training FLOPs of one optimizer step; None for an "auto" batch (it depends on the step count)."""
    spec = recipe.training
    if spec.batch_size == "auto":
        return None
    with torch.device("meta"):
        per_position = summarize(build_model(recipe)).train_flops_per_token
    return per_position * recipe.model.seq_len * spec.batch_size


def recipe_labels(paths: list[str]) -> list[str]:
    """File stems; a stem two recipes share is prefixed by the folder name."""
    stems = [Path(p).stem for p in paths]
    return [s if stems.count(s) == 1 else f"{Path(p).parent.name}-{s}" for p, s in zip(paths, stems)]


def _load(path: str, overrides: list[str], what: str) -> Recipe:
    try:
        return load_recipe(path, overrides)
    except RecipeError as exc:
        raise SweepError(f"{what}: {exc}") from None


def _axes(spec: SweepSpec) -> list[list[list[tuple[str, Any]]]]:
    """The grid's axes: one per product key, one per zip group; each a list of points (assignments)."""
    axes = [[[(key, v)] for v in values] for key, values in spec.grid.items()]
    for group in spec.zip:
        n = len(next(iter(group.values())))
        axes.append([[(key, values[i]) for key, values in group.items()] for i in range(n)])
    return axes


def _explicit(overrides: list[str]) -> set[str]:
    return {".".join(str(p) for p in parse_key_path(o.partition("=")[0].strip())) for o in overrides}


def expand(spec: SweepSpec, where: str = "sweep") -> list[Run]:
    """Every run of ``spec``, in file order (recipes, then the grid, budgets, seeds); SweepError for a
    key that is not a recipe key, a budget below one step, or two runs that would share a name."""
    base = ([f"data={toml_value(data_table(spec.data))}"] if spec.data is not None else []) + list(spec.set)
    axes = _axes(spec)
    labels = axis_labels([[key for key, _ in axis[0]] for axis in axes])
    flops_cache: dict[str, float | None] = {}
    runs = []
    for path, recipe_label in zip(spec.recipes, recipe_labels(spec.recipes)):
        _load(path, base, f"{where}: recipe {path} with set {spec.set}")
        for axis in axes:  # each key alone first, so an error names the key that caused it
            for key, value in axis[0]:
                _load(path, base + [f"{key}={toml_value(value)}"], f"{where}: grid key {key!r} (recipe {path})")
        for point in itertools.product(*axes):
            assigned = [a for part in point for a in part]
            named = {RECIPE: recipe_label} | {
                label: "+".join(dict.fromkeys(value_label(v) for _, v in part))
                for label, part, axis in zip(labels, point, axes) if len(axis) > 1
            }
            overrides = base + [f"{key}={toml_value(value)}" for key, value in assigned]
            shown = [*spec.set, *overrides[len(base):]]
            what = f"{where}: recipe {path} with {', '.join(shown) or 'no overrides'}"
            recipe = _load(path, overrides, what)
            key = json.dumps(recipe.to_dict()["model"], sort_keys=True) + str(recipe.training.batch_size)
            per_step = flops_cache[key] if key in flops_cache else flops_cache.setdefault(key, step_flops(recipe))
            for budget in spec.budgets or [None]:
                derived = _budget_overrides(recipe, per_step, budget, _explicit(overrides), what)
                for i in range(spec.seeds):
                    seeded = [f"training.seed={recipe.training.seed + i}"] if spec.seeds > 1 else []
                    final = overrides + derived + seeded
                    run_labels = dict(named)
                    if len(spec.budgets) > 1:
                        run_labels[BUDGET] = sci(budget)
                    if spec.seeds > 1:
                        run_labels[SEED] = str(i)
                    name = "-".join([recipe_label] + [f"{k}={v}" for k, v in run_labels.items() if k != RECIPE])
                    training = _load(path, final, what).training
                    runs.append(Run(name, path, final, run_labels, training.steps, training.seed, per_step, budget))
    if spec.data is None:
        data = {str(_load(r, base, where).data) for r in spec.recipes}
        if len(data) > 1:
            raise SweepError(f"{where}: the recipes read different data; give the sweep a [data] table (the "
                             f"report scores every run on the same held-out text)")
    seen: dict[str, Run] = {}
    for run in runs:
        if run.name in seen:
            other = seen[run.name]
            if (other.recipe_path, other.overrides) == (run.recipe_path, run.overrides):
                what = f"{run.recipe_path} is listed twice"
            else:
                mine, theirs = [o for o in run.overrides if o not in other.overrides], [
                    o for o in other.overrides if o not in run.overrides]
                what = f"{other.recipe_path} {' '.join(theirs)} and {run.recipe_path} {' '.join(mine)}"
            raise SweepError(f"{where}: two runs would share the name {run.name!r} ({what}); give the recipes "
                             f"different file names, or grid values that differ in the short form run names show")
        seen[run.name] = run
    return runs


def data_table(data: DataSpec) -> dict:
    """``data`` as a TOML table without the keys left at their defaults (a short ``--set data=...``)."""
    defaults = unstructure(DataSpec())
    return {k: v for k, v in unstructure(data).items() if defaults.get(k) != v}


def _budget_overrides(recipe: Recipe, per_step: float | None, budget: float | None, explicit: set[str],
                      what: str) -> list[str]:
    """``training.steps`` (and, unless the sweep sets them, eval, checkpoint and sample settings) for ``budget``."""
    if budget is None:
        return []
    if "training.steps" in explicit:
        raise SweepError(f"{what}: training.steps is set by the sweep's budgets; drop it from set and the grid, "
                         f"or drop the budgets")
    if per_step is None:
        raise SweepError(f"{what}: training.batch_size = 'auto' depends on the step count, so a budget cannot "
                         f"set the steps; set a number")
    steps = int(budget // per_step)
    if steps < 1:
        raise SweepError(f"{what}: one training step costs {sci(per_step)} FLOPs, more than the budget {sci(budget)}")
    derived = {"training.steps": steps, "training.eval_every": max(1, steps // 8),
               "training.checkpoint_every": max(1, steps // 4), "training.sample_bytes": 0}
    return [f"{k}={v}" for k, v in derived.items() if k == "training.steps" or k not in explicit]
