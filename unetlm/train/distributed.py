"""Process layout: the torchrun environment, the process group, reductions over ranks.

One process (no torchrun) is world size 1 and touches no process group. Under torchrun the
backend is NCCL with CUDA and gloo otherwise. How the model is sharded is
:mod:`unetlm.train.parallelize`'s; checkpoints are :mod:`unetlm.train.checkpointer`'s.
"""
from __future__ import annotations

import os

import attrs
import torch
import torch.distributed as dist


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
