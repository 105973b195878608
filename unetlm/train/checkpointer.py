"""The checkpointer of a training run: what its checkpoint holds, writing it, resuming from it.

Usage, every rank alike (all methods but :meth:`saved` are collective)::

    ckpt = Checkpointer(run_dir, world, async_save=False)
    saved = ckpt.saved()            # train record of the existing checkpoint, or None
    ...                             # build, parallelize the model, make optimizer and scheduler
    ckpt.track(model, optimizer, scheduler, recipe, tokenizer, batch_size)
    step = ckpt.load() if saved else 0
    ckpt.save(step)                 # every checkpoint_every steps, at the end, on Ctrl-C
    ckpt.close()                    # waits for a background save

The format (sharded, atomic, resharded on load, read without running code) is
:mod:`unetlm.train.checkpoint`'s.
"""
from __future__ import annotations

import json
from pathlib import Path

from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from unetlm.train import checkpoint as fmt
from unetlm.train.distributed import World, barrier


class Checkpointer:
    def __init__(self, run_dir: str | Path, world: World, async_save: bool = False) -> None:
        self.run_dir = Path(run_dir)
        self.world = world
        self.async_save = async_save
        self._pending = None  # (future, step) of a background save not yet committed
        self._group = None
        self._tracked: tuple | None = None

    @property
    def path(self) -> Path:
        return self.run_dir / fmt.CHECKPOINT

    def saved(self) -> dict | None:
        """The train record (step, recipe, tokenizer, ...) of the run's checkpoint; None if there is none."""
        directory = fmt.find_checkpoint(self.run_dir)
        return None if directory is None else fmt.read_train_state(directory)

    def track(self, model: nn.Module, optimizer, scheduler, recipe, tokenizer, batch_size: int) -> None:
        """What :meth:`save` writes and :meth:`load` restores (``tokenizer``: a trained one, or None;
        ``batch_size``: the global batch in sequences, which a resume must keep)."""
        self._tracked = (model, optimizer, scheduler, recipe, tokenizer, batch_size)

    def _state(self, train: str) -> dict:
        model, optimizer = self._tracked[:2]
        return {
            "model": get_model_state_dict(model),
            "optimizer": get_optimizer_state_dict(model, optimizer),
            "train": train,
        }

    def save(self, step: int) -> None:
        """Write the tracked state at ``step``: each rank its shards, atomically; in the background
        with ``async_save`` (committed when done, at the latest by the next save or :meth:`close`)."""
        self.wait()
        model, optimizer, scheduler, recipe, tokenizer, batch_size = self._tracked
        train = {
            "step": step,
            "scheduler": scheduler.state_dict(),
            "rng": fmt.rng_state(),
            "recipe": recipe.to_dict(),
            "tokenizer": None if tokenizer is None else tokenizer.to_json(),
            "world_size": self.world.size,
            "batch_size": batch_size,
        }
        directory = fmt.begin_write(self.run_dir, self.world.main)
        barrier(self.world)
        state = self._state(json.dumps(train))
        future = fmt.write_shards(state, directory, self.world.distributed, self._async_group())
        if future is None:
            self._commit()
        else:
            self._pending = future

    def _async_group(self):
        if not self.async_save:
            return None
        if not self.world.distributed:
            return True
        if self._group is None:  # background collectives must not share the training group
            import torch.distributed as dist

            self._group = dist.new_group(backend="gloo")
        return self._group

    def _commit(self) -> None:
        if self.world.main:
            fmt.commit(self.run_dir)
        barrier(self.world)

    def wait(self) -> None:
        """Finish and commit a background save."""
        if self._pending is not None:
            future, self._pending = self._pending, None
            result = getattr(future, "upload_completion", future)
            result.result()
            self._commit()

    def load(self) -> int:
        """Restore the tracked model, optimizer, scheduler and generators; returns the step to continue
        from. Shards are read straight into this run's layout, whatever world size wrote them."""
        model, optimizer, scheduler = self._tracked[:3]
        directory = fmt.find_checkpoint(self.run_dir)
        if directory is None:
            raise fmt.CheckpointError(f"no checkpoint in {self.run_dir}")
        state = self._state("")
        fmt.read_into(state, directory, self.world.distributed)
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, optimizer, state["optimizer"])
        train = json.loads(state["train"])
        scheduler.load_state_dict(train["scheduler"])
        fmt.set_rng_state(train["rng"])
        return int(train["step"])

    def close(self) -> None:
        self.wait()
        if self._group is not None:
            import torch.distributed as dist

            dist.destroy_process_group(self._group)
            self._group = None

