"""The sweep file: recipes, a grid of ``--set`` overrides, compute budgets, seeds, data, resources.

A sweep file is TOML, checked as strictly as a recipe (an unknown key is one line naming it and
the closest key). Paths in it (recipes, data files) are read from the folder the command runs in,
like every other unetlm path. See docs/sweeps.md for every key.
"""
from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import attrs

from unetlm.core.errors import UsageError
from unetlm.recipe.errors import RecipeError
from unetlm.recipe.schema import DataSpec
from unetlm.recipe.structure import structure, unstructure
from unetlm.recipe.validators import non_negative, positive


class SweepError(UsageError):
    """A sweep file or directory is invalid; the message names the key, the value and what is allowed."""


@attrs.define
class Resources:
    """What each run gets; the local executor reads ``gpus`` and ``parallel``, Slurm all of it."""

    gpus: int = attrs.field(default=0, validator=non_negative)  # per node and run (0: CPU); > 1 runs torchrun
    nodes: int = attrs.field(default=1, validator=positive)  # per run (Slurm); torchrun on each
    time_minutes: int = attrs.field(default=24 * 60, validator=positive)  # Slurm time limit of one job
    partition: str = ""
    account: str = ""
    cpus_per_task: int = attrs.field(default=0, validator=non_negative)  # per node (0: the cluster's default)
    sbatch: list[str] = attrs.field(factory=list)  # extra sbatch options, e.g. "--qos=high", "--exclusive"
    setup: list[str] = attrs.field(factory=list)  # shell lines before the job starts, e.g. "source .venv/bin/activate"
    parallel: int = attrs.field(default=1, validator=non_negative)  # runs at once on this machine (0: all)
    array_limit: int = attrs.field(default=0, validator=non_negative)  # Slurm: array tasks at once (0: no limit)
    signal_seconds: int = attrs.field(default=120, validator=positive)  # Slurm: warning before the time limit
    gpu_memory: str = "80GiB"  # per GPU, for the memory plan (--dry-run)
    peak_tflops: float = attrs.field(default=989.0, validator=positive)  # bf16 dense peak per GPU, for the plan

    @property
    def processes(self) -> int:
        """Training processes per run."""
        return max(self.gpus, 1) * self.nodes

    def check(self, path: str) -> None:
        for i, line in enumerate(self.sbatch):
            if not line.startswith("--") or len(line) < 3:
                raise RecipeError(f"{path}.sbatch[{i}] = {line!r} is invalid: expected an sbatch option such as "
                                  f"'--qos=high' or '--exclusive'")


@attrs.define
class ReportSpec:
    """How ``unetlm sweep report`` scores the runs on the held-out text."""

    eval_bytes: int = attrs.field(default=200_000, validator=non_negative)  # held-out bytes scored (0: all)
    cute_items: int = attrs.field(default=0, validator=non_negative)  # CUTE-style items per task (0: none)
    choice: list[str] = attrs.field(factory=list)  # multiple-choice JSONL files
    block_bytes: int = attrs.field(default=512, validator=positive)  # held-out bytes per bootstrap unit
    seed: int = 0  # of the CUTE items and the bootstrap


def _check_axis(values: Any, path: str) -> None:
    if not isinstance(values, list):
        raise RecipeError(f"{path} = {values!r} is invalid: expected a list of values")
    if not values:
        raise RecipeError(f"{path} = [] is invalid: an empty grid axis gives no runs; list at least one value")


@attrs.define
class SweepSpec:
    """A sweep: every recipe x every grid point x every budget x every seed is one run."""

    recipes: list[str]
    name: str = ""
    description: str = ""
    set: list[str] = attrs.field(factory=list)  # --set overrides of every run, before the grid's
    grid: dict[str, Any] = attrs.field(factory=dict)  # key -> values: every combination (product)
    zip: list[dict[str, Any]] = attrs.field(factory=list)  # groups of keys whose values advance together
    budgets: list[float] = attrs.field(factory=list)  # training FLOPs per run ([]: the recipes' steps)
    seeds: int = attrs.field(default=1, validator=positive)  # each run with training.seed + 0 .. seeds - 1
    data: DataSpec | None = None  # the data of every run ([data] of a recipe); None: the recipes' own
    resources: Resources = attrs.field(factory=Resources)
    report: ReportSpec = attrs.field(factory=ReportSpec)

    def check(self, path: str) -> None:
        if not self.recipes:
            raise RecipeError("recipes = [] is invalid: expected at least one recipe file")
        for key, values in self.grid.items():
            _check_axis(values, f"grid.{key!r}")
        for i, group in enumerate(self.zip):
            if not group:
                raise RecipeError(f"zip[{i}] is empty: expected keys with lists of values of one length")
            for key, values in group.items():
                _check_axis(values, f"zip[{i}].{key!r}")
            lengths = {key: len(values) for key, values in group.items()}
            if len(set(lengths.values())) > 1:
                raise RecipeError(f"zip[{i}]: the lists advance together, so they need one length (got {lengths})")
        keys = list(self.grid) + [k for group in self.zip for k in group]
        for key in keys + [s.partition("=")[0].strip() for s in self.set]:
            if key == "data" or key.startswith(("data.", "data[")):
                raise RecipeError(f"{key!r}: the data is the sweep's [data] table, the same for every run "
                                  f"(the report scores every run on the same held-out text)")
        repeated = sorted({k for k in keys if keys.count(k) > 1})
        if repeated:
            raise RecipeError(f"{repeated[0]!r} is listed twice in the grid (grid and zip keys name distinct recipe keys)")
        for i, budget in enumerate(self.budgets):
            if not budget > 0 or budget == float("inf"):
                raise RecipeError(f"budgets[{i}] = {budget!r} is invalid: expected a positive number of FLOPs, e.g. 2e12")
        if len(set(self.budgets)) != len(self.budgets):
            raise RecipeError(f"budgets = {self.budgets} is invalid: a budget is listed twice")

    def to_dict(self) -> dict:
        return unstructure(self)

    def runs_identity(self) -> dict:
        """What decides the runs (not the resources nor the report): two sweeps with the same identity
        make the same run directories."""
        data = self.to_dict()
        return {k: data[k] for k in ("recipes", "set", "grid", "zip", "budgets", "seeds", "data") if k in data}


def sweep_from_dict(data: dict, where: str = "sweep") -> SweepSpec:
    try:
        return structure(SweepSpec, data, "")
    except RecipeError as exc:
        raise SweepError(f"{where}: {exc}") from None


def load_sweep(path: str | Path) -> SweepSpec:
    """Read and check a sweep file; its name defaults to the file's stem."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SweepError(f"sweep file {str(path)!r} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise SweepError(f"{path}: not valid TOML: {exc}") from None
    data.setdefault("name", path.stem)
    return sweep_from_dict(data, str(path))
