"""Parallelism applied to a built model from outside it, in one place and one order.

:func:`parallelize` takes a freshly built (unsharded) model and, per mixer block:

1. activation checkpointing: the block is wrapped so that its activations are recomputed in
   the backward pass (``torch.utils.checkpoint``, non-reentrant);
2. compile: the (wrapped) block is compiled on its own, with static shapes, so every stage
   has one graph per block kind and mode (training, evaluation);
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

import attrs
import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from unetlm.model.stack import Stack
from unetlm.train.distributed import World


@attrs.frozen
class Parallelism:
    """How :func:`parallelize` treats a model, as the run's resolution
    (:func:`unetlm.train.resolve.resolve_run`) decided it."""

    checkpointing: bool  # recompute each block in the backward pass
    compile: bool  # torch.compile each block
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
            parts.append("compiled blocks")
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


def compile_blocks(model: nn.Module) -> None:
    """torch.compile each mixer block (after checkpointing, so the recomputation is compiled too)."""
    for stack in mixer_stacks(model):
        for block, mixer in zip(stack.blocks, stack.mixers()):
            mixer.compiled = True  # e.g. attention picks FlexAttention on CUDA only when compiled
            block.compile(dynamic=False)


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
        compile_blocks(model)
    if parallelism.shard:
        shard(model, parallelism, world)
    return model


def set_last_micro_batch(model: nn.Module, last: bool, parallelism: Parallelism) -> None:
    """Before a micro-batch's backward. Each one reduce-scatters its gradients within the shard
    group, where FSDP2 sums them into the sharded gradients; under HSDP the replicas all-reduce only
    in the step's ``last`` micro-batch (their partial sums kept until then). Unsharded: nothing to do."""
    if parallelism.shard and parallelism.replicas > 1:
        model.set_requires_all_reduce(last)
