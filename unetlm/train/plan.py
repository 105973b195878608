"""Memory and throughput planner: what one GPU holds, and what a step costs, before weights exist.

Activations are measured on fake tensors (:mod:`unetlm.train.activations`), devices described by
:mod:`unetlm.train.hardware`.

Per GPU, with FSDP2 over ``gpus`` processes and AdamW: fp32 parameters, gradients and two
moments sharded ``1/gpus``; the bf16 all-gather buffers and unsharded fp32 gradients of the FSDP2
units that training wraps (:meth:`Plan.buffers`); activations of one micro-batch. Without FSDP (one process) the
autocast copies of the weights saved for backward count instead of the buffers.
"""
from __future__ import annotations

import attrs
import torch

from unetlm.train.activations import ActivationProfile, MeasurementError, measure_activations
from unetlm.train.hardware import GIB, USABLE_FRACTION, Hardware, hardware_for

KERNEL_EFFICIENCY = 0.5  # achieved fraction of the bf16 peak in the estimate of the compute time


class PlanError(ValueError):
    """The configuration cannot fit; the message holds the numbers and what to change."""


@attrs.frozen
class UnitSize:
    """One FSDP2 unit as the planner sees it: its name ("" is the root), the parameters it owns, and
    whether its gathered parameters are freed after the forward."""

    name: str
    params: int
    resharded: bool


@attrs.frozen
class ParameterLayout:
    """Parameter counts of the model's FSDP2 units (those :func:`~unetlm.train.parallelize.shard_units`
    wraps), the root last."""

    units: tuple[UnitSize, ...]

    @property
    def total(self) -> int:
        return sum(u.params for u in self.units)

    @property
    def held(self) -> int:
        """Parameters gathered from the forward until their backward (units not resharded)."""
        return sum(u.params for u in self.units if not u.resharded)

    @property
    def in_flight(self) -> int:
        """Parameters of the two largest resharded units: one computing, the next prefetched."""
        return sum(sorted((u.params for u in self.units if u.resharded), reverse=True)[:2])

    @property
    def reducing(self) -> int:
        """Unsharded gradients at once with a reduce-scatter per backward: the root's (reduced
        last) and the largest other unit's."""
        *others, root = self.units
        return root.params + max((u.params for u in others), default=0)


def parameter_layout(model) -> ParameterLayout:
    """The FSDP2 units of ``model`` (any device, meta included) as training shards them."""
    from unetlm.train.parallelize import shard_units, unit_parameters

    units = shard_units(model)
    return ParameterLayout(
        tuple(UnitSize(u.name, n, u.reshard_after_forward) for u, n in zip(units, unit_parameters(units)))
    )


@attrs.frozen
class Plan:
    """What one device holds and does per optimizer step; bytes unless said otherwise."""

    hardware: Hardware
    params: ParameterLayout
    activations: ActivationProfile
    global_batch: int
    seq_len: int
    flops_per_sequence: float  # training FLOPs (forward + backward) of one sequence
    checkpointing: bool
    micro_batch: int
    accumulation: int

    @property
    def parameters(self) -> int:
        return 4 * self.params.total // self.hardware.gpus

    @property
    def gradients(self) -> int:
        return 4 * self.params.total // self.hardware.gpus

    @property
    def optimizer(self) -> int:
        return 8 * self.params.total // self.hardware.gpus

    @property
    def buffers(self) -> int:
        """FSDP2's gathered bf16 parameters and unsharded fp32 gradients; one process: the autocast weight copies.

        Gathered: the units not resharded after the forward, plus the two largest resharded units.
        Gradients: with one micro-batch, the root's and the largest other unit's before their
        reduce-scatter; with several, every unit's, accumulated unsharded until the last
        micro-batch's backward reduces them (``set_gradient_sync``).
        """
        if self.hardware.gpus == 1:
            return self.activations.fixed_checkpointed if self.checkpointing else self.activations.fixed
        p = self.params
        gradients = p.total if self.accumulation > 1 else p.reducing
        return 2 * (p.held + p.in_flight) + 4 * gradients

    @property
    def static(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.buffers

    @property
    def activation_bytes(self) -> int:
        return self.micro_batch * self.activations.per_row(self.checkpointing)

    @property
    def total(self) -> int:
        return self.static + self.activation_bytes

    @property
    def communication(self) -> int:
        """Bytes per step per GPU: bf16 all-gathers in every micro-batch's forward and backward (once
        per micro-batch for units not resharded after the forward), one fp32 reduce-scatter of the
        gradients."""
        n = self.hardware.gpus
        if n == 1:
            return 0
        p = self.params
        gathered = 2 * p.total - p.held
        return int((n - 1) / n * (2 * gathered * self.accumulation + 4 * p.total))

    @property
    def compute_flops(self) -> float:
        """FLOPs one GPU runs per step, the recomputed forward of checkpointing included."""
        rows = self.micro_batch * self.accumulation
        return rows * self.flops_per_sequence * (4 / 3 if self.checkpointing else 1.0)

    @property
    def step_time(self) -> float | None:
        """Seconds: compute at ``KERNEL_EFFICIENCY`` of the peak, overlapped with communication."""
        if self.hardware.peak_flops is None:
            return None
        compute = self.compute_flops / (self.hardware.peak_flops * KERNEL_EFFICIENCY)
        return max(compute, self.communication / self.hardware.bandwidth)

    @property
    def mfu(self) -> float | None:
        """Model FLOPs (recomputation not counted) over the peak, at the estimated step time."""
        time = self.step_time
        if time is None:
            return None
        model_flops = self.micro_batch * self.accumulation * self.flops_per_sequence
        return model_flops / (time * self.hardware.peak_flops)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def choose_plan(
    hardware: Hardware,
    params: ParameterLayout,
    activations: ActivationProfile,
    global_batch: int,
    seq_len: int,
    flops_per_sequence: float,
    micro_batch: int | str = "auto",
    checkpointing: bool | str = "auto",
) -> Plan:
    """The plan ``train`` runs: checkpointing off unless not even one sequence fits without it ("auto"),
    then the largest micro-batch dividing the process's rows that fits ("auto"); PlanError if none does."""
    from unetlm.train.scaling import split_batch

    local = split_batch(global_batch, hardware.gpus).local_rows
    options = [False, True] if checkpointing == "auto" else [bool(checkpointing)]
    sizes = divisors(local) if micro_batch == "auto" else [micro_batch or local]
    for ckpt in options:
        for micro in sorted(sizes, reverse=True):
            plan = Plan(
                hardware, params, activations, global_batch, seq_len, flops_per_sequence, ckpt, micro, local // micro
            )
            if plan.total <= hardware.usable:
                return plan
    fixes = [f"training.activation_checkpointing = {v}" for v in ("true",) if checkpointing is False]
    fixes += ['training.micro_batch_size = "auto"'] if micro_batch != "auto" else []
    raise PlanError(
        refusal(hardware, params, activations, global_batch, seq_len, flops_per_sequence, min(sizes), fixes)
    )


def refusal(hardware, params, activations, global_batch, seq_len, flops, micro, fixes: list[str]) -> str:
    """Why nothing fits, in numbers, and what would: more GPUs (the fewest that fit one sequence per
    forward with checkpointing), the ``fixes`` of settings, a smaller model."""
    worst = Plan(hardware, params, activations, global_batch, seq_len, flops, True, micro, 1)
    lines = [
        f"{global_batch // hardware.gpus} sequences per GPU ({global_batch} over {hardware.gpus}) do not fit in "
        f"{gib(hardware.usable)} GiB usable of {gib(hardware.memory)} GiB: parameters {gib(worst.parameters)} + "
        f"gradients {gib(worst.gradients)} + optimizer {gib(worst.optimizer)} + buffers {gib(worst.buffers)} "
        f"= {gib(worst.static)} GiB before activations; {micro} sequence(s) per forward save "
        f"{gib(micro * activations.per_row(False))} GiB without checkpointing, "
        f"{gib(micro * activations.per_row(True))} GiB with it",
    ]
    needed = next(
        (n for n in (2**k for k in range(16)) if n >= hardware.gpus and global_batch % n == 0
         and Plan(attrs.evolve(hardware, gpus=n), params, activations, global_batch, seq_len, flops, True, 1,
                  global_batch // n).total <= hardware.usable),
        None,
    )
    more = [f"at least {needed} GPUs"] if needed is not None and needed > hardware.gpus else []
    fixes = more + fixes + ["a shorter model.seq_len or a smaller model"]
    return "; ".join(lines) + ". Change: " + ", or ".join(fixes) + "."


def gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def plan_recipe(recipe, hardware: Hardware) -> Plan:
    """The plan of ``recipe`` on ``hardware``, from a meta-device model (no weights are built);
    "auto" batch and lr resolve from the compute budget as training does."""
    from unetlm.model.build import build_model
    from unetlm.model.summary import summarize
    from unetlm.train.scaling import resolve_budget

    spec = recipe.training
    with torch.device("meta"):
        model = build_model(recipe)
    summary = summarize(model)
    seq_len = recipe.model.seq_len
    bytes_per_token = summary.bytes_per_token
    if bytes_per_token is None:  # a tokenized model before its tokenizer is trained
        if spec.batch_size == "auto":
            raise PlanError(
                "a tokenized model's auto batch needs its bytes per token, known once the tokenizer is "
                "trained; set training.batch_size to plan it"
            )
        bytes_per_token = 1.0  # the plan counts FLOPs per token; the fixed batch needs no bytes
    flops_per_byte = summary.train_flops_per_token / bytes_per_token
    budget = resolve_budget(spec.batch_size, spec.lr, spec.steps, seq_len, flops_per_byte, bytes_per_token)
    return plan_model(recipe, model, budget, hardware, autocast=spec.dtype != "float32")


def plan_model(recipe, meta_model, budget, hardware: Hardware, autocast: bool) -> Plan:
    """The plan of ``recipe`` (its ``meta_model``, any device) for the resolved ``budget``, its
    activations measured under bfloat16 autocast or in float32, plus the stages' block masks."""
    from unetlm.model.summary import mask_bytes
    from unetlm.train.scaling import split_batch

    spec, seq_len = recipe.training, recipe.model.seq_len
    split_batch(budget.batch_size, hardware.gpus)  # before the measurement: a batch that cannot split
    activations = measure_activations(recipe.model, autocast)
    masks = mask_bytes(meta_model, rows=1)  # built once per stage and batch, kept until the backward
    activations = attrs.evolve(activations, per_sequence=activations.per_sequence + masks,
                               per_sequence_checkpointed=activations.per_sequence_checkpointed + masks)
    return choose_plan(
        hardware, parameter_layout(meta_model), activations, budget.batch_size, seq_len,
        budget.flops_per_byte * seq_len * budget.bytes_per_token, spec.micro_batch_size, spec.activation_checkpointing,
    )


def describe(plan: Plan, name: str = "recipe") -> str:
    """The plan as the lines ``unetlm plan`` and ``train`` print."""
    hw, a = plan.hardware, plan.activations
    fsdp = f"FSDP2 over {hw.gpus}" if hw.gpus > 1 else "one process"
    lines = [
        f"{name} on {hw.gpus} x {gib(hw.memory)} GiB {hw.name} ({fsdp}); {plan.params.total:,} parameters",
        f"global batch {plan.global_batch} x {plan.seq_len} = {plan.global_batch // hw.gpus} sequences per "
        f"{hw.name}: micro-batch {plan.micro_batch} x {plan.accumulation} accumulated, activation checkpointing "
        f"{'on' if plan.checkpointing else 'off'}",
        "per-device memory (GiB):",
        f"  parameters (fp32, sharded)        {gib(plan.parameters):>9}",
        f"  gradients (fp32, sharded)         {gib(plan.gradients):>9}",
        f"  optimizer state (AdamW, sharded)  {gib(plan.optimizer):>9}",
        f"  {'FSDP2 buffers' if hw.gpus > 1 else 'batch-independent saved':<32}  {gib(plan.buffers):>9}",
        f"  activations per sequence          {gib(a.per_row(False)):>9} without checkpointing, "
        f"{gib(a.per_row(True))} with",
        f"  activations of the micro-batch    {gib(plan.activation_bytes):>9}",
        f"  total                             {gib(plan.total):>9} of {gib(hw.usable)} usable "
        f"({USABLE_FRACTION:.0%} of {gib(hw.memory)})",
    ]
    if hw.gpus > 1:
        lines.append(
            f"communication per step: {plan.communication / 1e9:.2f} GB per {hw.name} (bf16 all-gather of the "
            f"parameters per micro-batch forward and backward, the root's and head's once; fp32 reduce-scatter "
            f"of the gradients)"
        )
    if plan.step_time is not None:
        lines.append(
            f"estimated step: {plan.step_time:.2f} s, MFU {plan.mfu:.1%} (compute at {KERNEL_EFFICIENCY:.0%} of "
            f"{hw.peak_flops / 1e12:.0f} TFLOP/s, communication at {hw.bandwidth / 1e9:.0f} GB/s overlapped)"
        )
    return "\n".join(lines)


def plan_training(recipe, budget, device: torch.device, processes: int, stored_batch: int | None = None):
    """(training spec with micro_batch_size and activation_checkpointing resolved, plan or None).

    Checks the global batch against the process count and a resumed run's stored batch; plans
    (and refuses what cannot fit) on CUDA always, on CPUs only where a value is "auto" (against
    the host memory available to each local process)."""
    from unetlm.train.scaling import check_resumed_batch, split_batch

    spec = recipe.training
    check_resumed_batch(stored_batch, budget.batch_size)
    fixed_micro = 0 if spec.micro_batch_size == "auto" else spec.micro_batch_size
    split_batch(budget.batch_size, processes, fixed_micro)
    auto = "auto" in (spec.micro_batch_size, spec.activation_checkpointing)
    if not auto and device.type != "cuda":
        return spec, None
    from unetlm.model.build import build_model

    with torch.device("meta"):
        model = build_model(recipe)
    try:
        from unetlm.train.loop import autocast_dtype  # the dtype training will run in

        autocast = autocast_dtype(spec, device) is not None
        plan = plan_model(recipe, model, budget, hardware_for(device, processes), autocast)
    except MeasurementError as exc:
        if auto:
            raise
        print(f"note: no memory plan: {exc}", flush=True)
        return spec, None
    return attrs.evolve(spec, micro_batch_size=plan.micro_batch, activation_checkpointing=plan.checkpointing), plan


def plan_run(recipe, budget, world, state: dict | None, show: bool = True):
    """``train``'s call: the training spec to run with (``plan_training``) for this ``world`` and resumed
    ``state``; the chosen plan printed on the main process; TrainingError for what cannot run."""
    from unetlm.train.errors import TrainingError

    stored = (state or {}).get("batch_size")
    try:
        spec, plan = plan_training(recipe, budget, world.device, world.size, stored)
    except ValueError as exc:
        raise TrainingError(str(exc)) from None
    if plan is not None and show and world.main:
        print(describe(plan, recipe.name or "recipe"), flush=True)
    return spec
