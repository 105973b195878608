"""``unetlm compare``: train recipes for one FLOP budget on the same data, then evaluate them alike.

A comparison is a sweep on this machine (:mod:`unetlm.sweep`): the recipes at one budget, their
data replaced by ``--data``, run one after the other by the local executor and scored by the
sweep's report. ``OUT`` is a sweep directory: ``runs/NAME/`` one training run per recipe (an
unfinished one resumes, a finished one is not trained again; its scores are cached in
``scores.json``), ``results.json``, ``results.md`` and the figures for the whole comparison.
"""
from __future__ import annotations

import math
from pathlib import Path

from unetlm.recipe.schema import DataSpec
from unetlm.sweep.launch import launch, plan_sweep
from unetlm.sweep.report import report
from unetlm.sweep.spec import ReportSpec, SweepSpec


def comparison(paths: list[str], budget: float, data: DataSpec = DataSpec(), overrides: list[str] = (),
               eval_bytes: int = 200_000, cute_items: int = 0, choice_files: list[str] = (), seed: int = 0) -> SweepSpec:
    """The sweep a comparison is: every recipe once at ``budget`` on ``data``."""
    return SweepSpec(recipes=[str(p) for p in paths], name="compare", set=list(overrides), budgets=[budget], data=data,
                     report=ReportSpec(eval_bytes=eval_bytes, cute_items=cute_items, choice=list(choice_files), seed=seed))


def compare(
    paths: list[str],
    budget: float,
    out: str | Path,
    data: DataSpec = DataSpec(),
    overrides: list[str] = (),
    eval_bytes: int = 200_000,
    cute_items: int = 0,
    choice_files: list[str] = (),
    progress: bool = True,
    seed: int = 0,
) -> dict:
    """Train (or resume, or skip) and evaluate every recipe; writes and returns the report's results
    (a run that failed is listed under ``unscored``; SweepInterrupted on Ctrl-C)."""
    if not budget > 0:
        raise ValueError(f"--flops must be positive (got {budget})")
    spec = comparison(paths, budget, data, overrides, eval_bytes, cute_items, choice_files, seed)
    launch(plan_sweep(spec, out, "compare"), "local", parallel=1, progress=progress)
    return report(out, progress)


def parse_flops(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"--flops {text!r}: expected a positive number such as 2e12")
    return value


def data_spec(sources: list[str], max_bytes: int, valid_fraction: float) -> DataSpec:
    """``pydocs`` or file paths/globs (each file one document)."""
    if not sources or sources == ["pydocs"]:
        return DataSpec(source="pydocs", max_bytes=max_bytes, valid_fraction=valid_fraction)
    if "pydocs" in sources:
        raise ValueError("--data pydocs cannot be mixed with files")
    return DataSpec(source="files", paths=list(sources), max_bytes=max_bytes, valid_fraction=valid_fraction)


__all__ = ["comparison", "compare", "data_spec", "parse_flops"]
