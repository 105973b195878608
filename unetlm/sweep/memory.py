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
    """The planner's per-device memory for ``recipe`` on the sweep's resources (``gpus`` GPUs of
    ``gpu_memory`` per node; with no GPUs, this host's memory shared by the ``parallel`` runs)."""
    import torch

    from unetlm.train.activations import MeasurementError
    from unetlm.train.distributed import World
    from unetlm.train.hardware import Hardware, host_hardware, parse_memory
    from unetlm.train.plan import PlanError
    from unetlm.train.resolve import resolve_run

    if resources.gpus:
        hardware = Hardware(resources.processes, parse_memory(resources.gpu_memory, "resources.gpu_memory"), resources.peak_tflops * 1e12,
                            gpus_per_node=resources.gpus)
    else:
        hardware = attrs.evolve(host_hardware(max(resources.parallel, 1)), gpus=resources.nodes)
    world = World(0, hardware.gpus, 0, torch.device("cuda"))  # planned for those devices, not this machine's
    try:
        plan = resolve_run(recipe, world, hardware=hardware).plan
    except (PlanError, MeasurementError, ValueError) as exc:
        return Memory(0, hardware.usable, str(exc))
    if plan is None:  # the activations could not be measured: nothing to refuse on
        return Memory(0, hardware.usable)
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
