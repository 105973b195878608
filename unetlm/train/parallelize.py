"""Parallelism applied to a built model from outside it, in one place and one order.

:func:`parallelize` takes a freshly built (unsharded) model and:

1. activation checkpointing: each mixer block is wrapped so that its activations are recomputed
   in the backward pass (``torch.utils.checkpoint``, non-reentrant);
2. compile (:func:`compile_regions`), with static shapes: in one process the whole forward
   (embedding, every stage and transition, head and loss); under FSDP2, whose hooks would break
   that graph at every unit, region by region: every block, every stage transition (link and
   pool; upsample and skip), the embedding and the head with the loss where they are no unit.
   Each region has room for a graph per mode (training, evaluation) and batch shape; needing
   more is an error, never a silent fall back to eager;
3. FSDP2 (several processes): ``fully_shard`` per block, then the hash-embedding tables, the
   byte embedding and the head as units of their own, then the root (poolers, upsamplers,
   norms). With bfloat16 training the units gather bfloat16 parameters; gradients are reduced
   in ``training.reduce_dtype`` (``MixedPrecisionPolicy``). A shard size below the world size
   gives HSDP over a 2-D mesh: parameters sharded within groups of ``shard_size`` ranks (a node)
   and replicated across groups.

Training builds the model on the meta device, parallelizes it, then materialises each rank's
shards (:mod:`unetlm.train.materialize`).

The model code knows none of this: :class:`~unetlm.model.stack.Stack` builds what its blocks
share before calling them, so a wrapped, compiled or sharded block behaves like the plain one.
"""
from __future__ import annotations

import functools

import attrs
import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from unetlm.core.errors import RunError
from unetlm.model.stack import Stack
from unetlm.train.distributed import World


@attrs.frozen
class Parallelism:
    """How :func:`parallelize` treats a model, as the run's resolution
    (:func:`unetlm.train.resolve.resolve_run`) decided it."""

    checkpointing: bool  # recompute each block in the backward pass
    compile: bool  # torch.compile the model (compile_regions)
    shard: bool = False  # FSDP2 units (the run has a process group)
    world_size: int = 1
    shard_size: int = 1  # ranks a parameter is sharded over; fewer than the world size: HSDP
    param_dtype: torch.dtype | None = None  # FSDP2 gathers parameters in this dtype (None: as stored, float32)
    reduce_dtype: torch.dtype = torch.float32  # FSDP2 reduces gradients in this dtype

    @property
    def replicas(self) -> int:
        return self.world_size // self.shard_size if self.shard else 1

    def describe(self) -> str:
        parts = []
        if self.shard:
            parts.append("FSDP2" if self.replicas == 1 else f"HSDP ({self.replicas} replicas x {self.shard_size} shards)")
            if self.param_dtype is not None:
                parts.append(f"{dtype_name(self.param_dtype)} parameters")
            parts.append(f"{dtype_name(self.reduce_dtype)} reduction")
        if self.checkpointing:
            parts.append("activation checkpointing")
        if self.compile:
            parts.append("compiled blocks and transitions" if self.shard else "compiled model")
        return ", ".join(parts) or "eager, unsharded"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def mixer_stacks(model: nn.Module) -> list[Stack]:
    return [m for m in model.modules() if isinstance(m, Stack)]


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Wrap every mixer block so the backward pass recomputes it (parameter names stay as they were)."""
    for stack in mixer_stacks(model):
        for i, block in enumerate(stack.blocks):
            stack.blocks[i] = checkpoint_wrapper(block, preserve_rng_state=False)


# ---- compile regions ----

GRAPHS_PER_REGION = 4  # training and evaluation, each at the micro-batch and at a shorter last one


def compile_regions(model: nn.Module, sharded: bool) -> list[str]:
    """torch.compile ``model`` with static shapes, in one region or (under FSDP2) several, and make
    a call that needs more graphs than a region may hold an error (:func:`limit_graphs`). Returns
    the regions' names. Called after activation checkpointing (the recomputation is compiled too)
    and before FSDP2 (its hooks stay outside every region).

    In one process the whole forward is one region: embedding, every stage and transition, head
    and loss. Under FSDP2 a region may not hold a unit's hooks (dynamo breaks the graph at each),
    so the regions are every mixer block (the blocks of a stage share their graphs), the stage
    transitions ``model.down`` (link and pool) and ``model.up`` (upsample and add the skip),
    ``model.enter`` (embedding) and ``model.finish`` (norm, head and loss); an embedding that is a
    unit of its own is a region as a module (eager when it holds hashed-table units), and a head
    that is one runs eagerly with the loss."""
    if not sharded:
        limit = limit_graphs(GRAPHS_PER_REGION)
        model.forward = _stop_past_the_limit(torch.compile(model.forward, dynamic=False), limit)
        return ["model"]
    units = {id(u.module) for u in shard_units(model)} - {id(model)}

    def holds_unit(module: nn.Module, itself: bool = True) -> bool:
        return any(id(m) in units for m in module.modules() if itself or m is not module)

    modules = [block for stack in mixer_stacks(model) for block in stack.blocks]
    methods = ["down", "up"] if model.poolers else []
    if not holds_unit(model.embed):
        methods.append("enter")
    elif not holds_unit(model.embed, itself=False):
        modules.append(model.embed)
    if not holds_unit(model.head):
        methods.append("finish")
    limit = limit_graphs(GRAPHS_PER_REGION * (len(modules) + len(model.poolers)))
    for module in modules:
        module.compile(dynamic=False)
    for method in methods:
        setattr(model, method, torch.compile(getattr(model, method), dynamic=False))
    model.forward = _stop_past_the_limit(model.forward, limit)
    names = {id(m): name for name, m in model.named_modules()}
    return [names[id(m)] for m in modules] + [f"{method}()" for method in methods]


def _stop_past_the_limit(forward, limit: int):
    """``forward`` reporting a region that needed more than ``limit`` graphs as one RunError."""

    @functools.wraps(forward)
    def run(*args, **kwargs):
        try:
            return forward(*args, **kwargs)
        except torch._dynamo.exc.FailOnRecompileLimitHit as exc:
            raise RunError(
                f"a compiled region needed more graphs than the {limit} it may hold (dynamo's warning above names it and the "
                f"shape or mode that changed); stopping rather than running it eagerly from here on"
            ) from exc

    return run


def limit_graphs(graphs: int) -> int:
    """Let dynamo keep at least ``graphs`` graphs per compiled code (the blocks of every stage share
    their forward; a transition's graphs, one per stage, its method) and fail when a call needs
    more, rather than run that code eagerly from then on. Returns the limit."""
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, graphs)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, graphs)
    config.fail_on_recompile_limit_hit = True
    return config.recompile_limit


def device_mesh(parallelism: Parallelism, world: World):
    """1-D mesh over all ranks, or for HSDP 2-D ("replicate", "shard") with ``shard_size`` ranks per group."""
    if parallelism.replicas == 1:
        return init_device_mesh(world.device.type, (world.size,), mesh_dim_names=("shard",))
    shape = (parallelism.replicas, parallelism.shard_size)
    return init_device_mesh(world.device.type, shape, mesh_dim_names=("replicate", "shard"))


@attrs.frozen
class ShardUnit:
    """One FSDP2 unit: a module ``fully_shard`` wraps, by its name in the model ("" is the root)."""

    name: str
    module: nn.Module
    reshard_after_forward: bool  # False: its gathered parameters stay until its backward


def shard_units(model: nn.Module) -> list[ShardUnit]:
    """The FSDP2 units of ``model`` in the order they are wrapped (inner first, the root last): each
    block; each hash-embedding table; the byte embedding; the head; then the root.

    A head tied to the embedding shares its weight with it, so both stay in the root unit. The
    head (used last in the forward, first in the backward) and the root are not resharded after
    the forward. A unit owns the parameters of its module not owned by a unit listed before it.
    """
    names = {id(m): name for name, m in model.named_modules()}
    modules: list[tuple[nn.Module, bool]] = [(block, True) for stack in mixer_stacks(model) for block in stack.blocks]
    embed = getattr(model, "embed", None)
    if embed is not None:
        modules += [(table, True) for table in embed.hashed]
        if not model.spec.tie_embeddings:
            modules += [(embed, True), (model.head, False)]
    modules.append((model, False))
    return [ShardUnit(names[id(m)], m, reshard) for m, reshard in modules]


def unit_parameters(units: list[ShardUnit]) -> list[int]:
    """Parameters each unit of ``units`` (as :func:`shard_units` lists them) owns and shards."""
    claimed: set[int] = set()
    counts = []
    for unit in units:
        own = [p for p in unit.module.parameters() if id(p) not in claimed]
        claimed.update(id(p) for p in own)
        counts.append(sum(p.numel() for p in own))
    return counts


def shard(model: nn.Module, parallelism: Parallelism, world: World) -> None:
    """``fully_shard`` each of :func:`shard_units`, with the mesh and mixed-precision policy of ``parallelism``."""
    mesh = device_mesh(parallelism, world)
    policy = MixedPrecisionPolicy(param_dtype=parallelism.param_dtype, reduce_dtype=parallelism.reduce_dtype)
    for unit in shard_units(model):
        fully_shard(unit.module, mesh=mesh, mp_policy=policy, reshard_after_forward=unit.reshard_after_forward)


def parallelize(model: nn.Module, parallelism: Parallelism, world: World) -> nn.Module:
    """Apply ``parallelism`` to ``model`` (on the meta device or ``world.device``): checkpointing, compile,
    FSDP2, in that order."""
    if parallelism.checkpointing:
        apply_activation_checkpointing(model)
    if parallelism.compile:
        compile_regions(model, parallelism.shard)
    if parallelism.shard:
        shard(model, parallelism, world)
    return model


def set_last_micro_batch(model: nn.Module, last: bool, parallelism: Parallelism) -> None:
    """Before a micro-batch's backward. Each one reduce-scatters its gradients within the shard
    group, where FSDP2 sums them into the sharded gradients; under HSDP the replicas all-reduce only
    in the step's ``last`` micro-batch (their partial sums kept until then). Unsharded: nothing to do."""
    if parallelism.shard and parallelism.replicas > 1:
        model.set_requires_all_reduce(last)
