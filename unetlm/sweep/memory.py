"""Planned memory of a sweep's runs (``unetlm plan``'s planner), before anything is started.

:func:`planned_memory` is the one call into the planner. A run that does not fit is refused with
the planner's reason.
"""
from __future__ import annotations

import json

import attrs

from unetlm.recipe import Recipe
from unetlm.sweep.spec import Resources


@attrs.frozen
class Memory:
    """Bytes one device holds for a run, of the bytes usable; ``why``: the planner's refusal ("" when it fits)."""

    total: int
    usable: int
    why: str = ""

    @property
    def fits(self) -> bool:
        return not self.why


def planned_memory(recipe: Recipe, resources: Resources) -> Memory:
    """The planner's per-device memory for ``recipe`` on the sweep's resources (a GPU of ``gpu_memory``;
    with no GPUs, this host's memory shared by the ``parallel`` runs)."""
    from unetlm.train.activations import MeasurementError
    from unetlm.train.hardware import Hardware, host_hardware, parse_memory
    from unetlm.train.plan import PlanError, plan_recipe

    if resources.gpus:
        hardware = Hardware(resources.processes, parse_memory(resources.gpu_memory), resources.peak_tflops * 1e12)
    else:
        hardware = attrs.evolve(host_hardware(max(resources.parallel, 1)), gpus=resources.nodes)
    try:
        plan = plan_recipe(recipe, hardware)
    except (PlanError, MeasurementError, ValueError) as exc:
        return Memory(0, hardware.usable, str(exc))
    return Memory(plan.total, hardware.usable)


def plan_key(recipe: Recipe) -> str:
    """What the plan depends on: the model and the training settings but the seed and the schedule's
    bookkeeping (runs differing only in those share a plan)."""
    data = recipe.to_dict()
    training = {k: v for k, v in data["training"].items()
                if k not in ("seed", "eval_every", "checkpoint_every", "sample_bytes", "sample_prompt")}
    if recipe.training.batch_size != "auto" and recipe.training.lr != "auto":
        training.pop("steps")
    return json.dumps({"model": data["model"], "training": training}, sort_keys=True)
