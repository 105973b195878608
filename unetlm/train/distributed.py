"""Process layout: the torchrun environment, the process group, reductions over ranks.

One process (no torchrun) is world size 1 and touches no process group. Under torchrun the
backend is NCCL with CUDA and gloo otherwise, and a second, gloo group (``World.control``)
carries the host-side agreements of the loop (stop, save) without waiting for the device. How
the model is sharded is :mod:`unetlm.train.parallelize`'s; checkpoints are
:mod:`unetlm.train.checkpointer`'s.
"""
from __future__ import annotations

import os
from datetime import timedelta

import attrs
import torch
import torch.distributed as dist

from unetlm.core.errors import UsageError

# launchers that start several processes, by the variable holding their count: without torchrun's
# RANK / WORLD_SIZE each process would be an independent one-process run
PROCESS_COUNTS = {
    "SLURM_STEP_NUM_TASKS": "srun",
    "OMPI_COMM_WORLD_SIZE": "mpirun (Open MPI)",
    "PMI_SIZE": "an MPI launcher",
}


@attrs.frozen
class World:
    rank: int
    size: int
    local_rank: int
    device: torch.device
    control: object = None  # the gloo group of host-side agreements (None: the default group, or one process)

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


def launch_rank() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's variables, before any process group exists;
    a launch of several processes without them is refused (they would be independent runs)."""
    if "WORLD_SIZE" not in os.environ:
        for variable, launcher in PROCESS_COUNTS.items():
            count = os.environ.get(variable, "1")
            if count.isdigit() and int(count) > 1:
                raise UsageError(
                    f"{launcher} started {count} processes ({variable}={count}) without torchrun's RANK and "
                    f"WORLD_SIZE: they would be {count} independent runs on one --out; start one torchrun per node "
                    f"(scripts/slurm/train.sbatch) or a single process"
                )
        return 0, 1, 0
    return int(os.environ.get("RANK", "0")), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0"))


def init_world(device_name: str, timeout_minutes: float = 30.0) -> World:
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK and start the process group if there are
    several; a collective that waits longer than ``timeout_minutes`` fails the run."""
    rank, size, local_rank = launch_rank()
    device = pick_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    control = None
    if size > 1:
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=timeout_minutes),
                                    device_id=device if device.type == "cuda" else None)
        if dist.get_backend() != "gloo":
            control = dist.new_group(backend="gloo", timeout=timedelta(minutes=timeout_minutes))
    return World(rank, size, local_rank, device, control)


def close_world(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def max_over_ranks(values: list[float], world: World) -> list[float]:
    """Each value's maximum over ranks, agreed on the host (CPU tensors over ``world.control``):
    no wait for the device's queued work."""
    if not world.distributed:
        return list(values)
    flags = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=world.control)
    return flags.tolist()


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
