"""Resolve, then build: every decision of a training run, made before anything is built.

:func:`resolve_run` turns a recipe (its ``max_len = "auto"`` already sized from the data), the
world and its devices into one frozen :class:`ResolvedRun`: the budget (``batch_size`` and ``lr``
"auto"), how the global batch splits over processes and micro-batches, the plan (micro-batch,
activation checkpointing and sharding layout, :mod:`unetlm.train.plan`), the autocast and reduction
dtypes, compile, background checkpoints. It builds no weights (the model it measures lives on the
meta device or in fake tensors) and changes no state. ``Trainer.setup`` builds from the result
and reads settings nowhere else; ``unetlm plan`` resolves a run for a cluster it is not on.
"""
from __future__ import annotations

import attrs
import torch
import torch.distributed

from unetlm.model.build import build_model
from unetlm.model.summary import stage_mask_bytes, summarize
from unetlm.recipe import Recipe
from unetlm.recipe.schema import TrainingSpec, check_device
from unetlm.train.activations import MeasurementError, measure_activations
from unetlm.train.hardware import Hardware, hardware_for
from unetlm.train.distributed import World
from unetlm.train.parallelize import Parallelism, dtype_name
from unetlm.train.plan import ExtraBuffer, Plan, choose_plan, describe, shard_sizes, unit_sizes
from unetlm.train.scaling import BatchSplit, Budget, check_resumed_batch, resolve_budget, split_batch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def autocast_dtype(spec: TrainingSpec, device: torch.device, bf16_supported: bool | None = None) -> torch.dtype | None:
    """bfloat16 autocast where asked, or ("auto") on CUDA devices that support it (``bf16_supported``;
    None: ask the device); None: float32."""
    if spec.dtype == "bfloat16":
        return torch.bfloat16
    if spec.dtype == "auto" and device.type == "cuda":
        return torch.bfloat16 if (torch.cuda.is_bf16_supported() if bf16_supported is None else bf16_supported) else None
    return None


def use_compile(spec: TrainingSpec, device: torch.device) -> bool:
    return device.type == "cuda" if spec.compile == "auto" else spec.compile


def background_checkpoints(spec: TrainingSpec, device: torch.device) -> bool:
    """Whether checkpoints are written in the background (``async_checkpoint``; "auto": on CUDA)."""
    return device.type == "cuda" if spec.async_checkpoint == "auto" else spec.async_checkpoint


@attrs.frozen
class ResolvedRun:
    """One training run with every choice made, for ``processes`` processes on ``device``s."""

    given: Recipe  # as written, max_len sized: what recipe.toml and the checkpoint record, what a resume compares
    recipe: Recipe  # the same with every training "auto" decided: what the run reads
    processes: int
    device: torch.device
    params: int
    budget: Budget
    split: BatchSplit
    dtype: torch.dtype | None  # autocast; None: float32
    parallelism: Parallelism
    plan: Plan | None  # None: not planned (fixed values on CPUs) or not measurable (see notes)
    notes: tuple[str, ...] = ()

    @property
    def training(self) -> TrainingSpec:
        return self.recipe.training

    def describe(self) -> str:
        """The run in a few lines: the plan when there is one, then what runs and the budget."""
        name = self.recipe.name or "recipe"
        lines = [f"note: {n}" for n in self.notes]
        if self.plan is not None:
            lines.append(describe(self.plan, name))
        lines.append(
            f"{name}: {self.params:,} parameters, {self.budget.flops_per_byte / 1e6:.2f} MFLOPs/byte (training), "
            f"{self.processes} x {self.device}, {'bfloat16 autocast' if self.dtype else 'float32'}, "
            f"{self.parallelism.describe()}"
        )
        lines.append(self.budget.describe())
        return "\n".join(lines)


def mask_buffers(meta_model) -> tuple[ExtraBuffer, ...]:
    """The stages' attention block masks (one per stage), built once per micro-batch and kept until the backward."""
    per_row = sum(stage_mask_bytes(meta_model, rows=1))
    return (ExtraBuffer("attention block masks", per_row=per_row),) if per_row else ()


def resolve_run(
    recipe: Recipe, world: World, tokenizer=None, stored_batch: int | None = None, hardware: Hardware | None = None
) -> ResolvedRun:
    """``recipe`` resolved for ``world``. ``tokenizer``: a tokenized model's trained tokenizer (its
    bytes per token set the budget); ``stored_batch``: a resumed run's global batch, which must not
    change; ``hardware``: the devices (default: ``world``'s own). Planned on CUDA always, elsewhere
    where a value is "auto". ValueError (PlanError when nothing fits) for what cannot run."""
    spec, seq_len = recipe.training, recipe.model.seq_len
    check_device(recipe.model, world.device.type, training=True)
    hardware = hardware or hardware_for(world.device, world.size)
    with torch.device("meta"):
        model = build_model(recipe)
    if tokenizer is not None:
        model.tokenizer = tokenizer
    summary = summarize(model)
    bytes_per_token = summary.bytes_per_token
    if bytes_per_token is None:  # a tokenized model before its tokenizer is trained (planning only)
        if spec.batch_size == "auto":
            raise ValueError(
                "a tokenized model's auto batch needs its bytes per token, known once the tokenizer is "
                "trained; set training.batch_size to plan it"
            )
        bytes_per_token = 1.0  # the plan counts FLOPs per token; the fixed batch needs no bytes
    flops_per_byte = summary.train_flops_per_token / bytes_per_token
    budget = resolve_budget(spec.batch_size, spec.lr, spec.steps, seq_len, flops_per_byte, bytes_per_token)
    check_resumed_batch(stored_batch, budget.batch_size)
    fixed_micro = 0 if spec.micro_batch_size == "auto" else spec.micro_batch_size
    split_batch(budget.batch_size, world.size, fixed_micro)  # before measuring: a batch that cannot split
    shard_sizes(world.size, spec.shard_size)
    sharded = world.distributed or torch.distributed.is_initialized()  # FSDP2 wherever there is a process group
    dtype = autocast_dtype(spec, world.device, hardware.bf16)
    reduce_dtype = DTYPES[spec.reduce_dtype]
    plan, notes = None, ()
    auto = "auto" in (spec.micro_batch_size, spec.activation_checkpointing, spec.shard_size)
    if auto or world.device.type == "cuda":
        try:
            activations = measure_activations(recipe.model, autocast=dtype is not None)
        except MeasurementError as exc:
            if auto:
                raise
            notes = (f"no memory plan: {exc}",)
        else:
            plan = choose_plan(
                hardware, unit_sizes(model), activations, budget.batch_size, seq_len,
                flops_per_byte * seq_len * bytes_per_token, spec.micro_batch_size, spec.activation_checkpointing,
                spec.shard_size, 2 if dtype is not None and sharded else 4, reduce_dtype.itemsize, mask_buffers(model),
                sharded=sharded,
            )
    if plan is not None:
        micro, checkpointing, shard_size = plan.micro_batch, plan.checkpointing, plan.shard_size
    else:
        micro, checkpointing, shard_size = fixed_micro, bool(spec.activation_checkpointing), spec.shard_size or world.size
    split = split_batch(budget.batch_size, world.size, micro)
    parallelism = Parallelism(
        checkpointing=checkpointing,
        compile=use_compile(spec, world.device),
        shard=sharded,
        world_size=world.size,
        shard_size=shard_size if sharded else 1,
        param_dtype=dtype if sharded else None,
        reduce_dtype=reduce_dtype,
    )
    training = attrs.evolve(
        spec, batch_size=budget.batch_size, lr=budget.lr, micro_batch_size=split.micro_batch,
        activation_checkpointing=checkpointing, compile=parallelism.compile,
        dtype=dtype_name(dtype) if dtype is not None else "float32", shard_size=parallelism.shard_size,
        async_checkpoint=background_checkpoints(spec, world.device), device=str(world.device),
    )
    return ResolvedRun(
        recipe, attrs.evolve(recipe, training=training), world.size, world.device, summary.params, budget, split,
        dtype, parallelism, plan, notes,
    )
