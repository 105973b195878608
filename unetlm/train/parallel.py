"""Process layout and data parallelism: torchrun environment, FSDP2 sharding, full state dicts.

One process (no torchrun) is world size 1 and touches no process group. Under torchrun the
backend is NCCL with CUDA and gloo otherwise; every mixer block is its own FSDP2 unit and the
root holds the rest. Checkpoints hold full (unsharded) state dicts gathered to rank 0 on the
CPU, so a checkpoint written by any number of processes loads in any other.
"""
from __future__ import annotations

import os

import attrs
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from unetlm.model.stack import Stack


@attrs.frozen
class World:
    rank: int
    size: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def init_world(device_name: str) -> World:
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK and start the process group if there are several."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    return World(rank, size, local_rank, device)


def close_world(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def from_rank0(make, world: World):
    """``make()`` run on rank 0 only, its (picklable) result given to every rank."""
    if not world.distributed:
        return make()
    box = [make() if world.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard_model(model: nn.Module, world: World) -> nn.Module:
    """FSDP2: one unit per mixer block, then the root (embedding, poolers, upsamplers, head)."""
    if not world.distributed:
        return model
    from torch.distributed.fsdp import fully_shard

    for stack in model.modules():
        if isinstance(stack, Stack):
            for block in stack.blocks:
                fully_shard(block)
    fully_shard(model)
    return model


def set_gradient_sync(model: nn.Module, sync: bool, world: World) -> None:
    """Under FSDP2, whether the next backward reduces gradients across ranks (off for all but the
    last micro-batch of a step); one process: nothing to do."""
    if world.distributed:
        model.set_requires_gradient_sync(sync)


def mean_over_ranks(value: torch.Tensor, world: World) -> torch.Tensor:
    if world.distributed:
        value = value.detach().clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= world.size
    return value


def sum_over_ranks(value: torch.Tensor, world: World) -> torch.Tensor:
    if world.distributed:
        value = value.detach().clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def local_tensor(value: torch.Tensor) -> torch.Tensor:
    """A DTensor (e.g. the gradient norm of sharded parameters) as a plain tensor."""
    full = getattr(value, "full_tensor", None)
    return full() if full is not None else value


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(model, optimizer) full state dicts keyed by parameter name, on the CPU; complete on rank 0.

    Collective under FSDP: every rank must call it.
    """
    return get_model_state_dict(model, options=_FULL), get_optimizer_state_dict(model, optimizer, options=_FULL)


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a full, name-keyed optimizer state (as written by :func:`full_state`) into a sharded optimizer."""
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
