"""The checkpointer of a training run: what its checkpoints hold, writing them, resuming from one.

Usage, every rank alike (all methods but :meth:`saved` are collective)::

    ckpt = Checkpointer(run_dir, world, async_save=False, verify=False)
    saved = ckpt.saved()            # train record of the newest valid checkpoint, or None
    ...                             # build, parallelize the model, make optimizer and scheduler
    ckpt.track(model, optimizer, scheduler, recipe, tokenizer, batch_size)
    step = ckpt.load() if saved else 0
    ckpt.save(step)                 # every checkpoint_every steps, at the end, on Ctrl-C
    ckpt.close()                    # waits for a background save

A checkpoint holds ``model`` (parameter name -> tensor, DTensor shards under FSDP2),
``optimizer`` (its state keyed by parameter name) and ``train`` (JSON text: ``step``,
``scheduler``, ``rng``, ``recipe``, ``tokenizer``, ``world_size``, ``batch_size``). Where they go,
how they are committed, kept (``training.keep_checkpoints``) and checked is
:mod:`unetlm.checkpoint`'s.
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

from unetlm.checkpoint import store
from unetlm.checkpoint.errors import CheckpointError
from unetlm.checkpoint.manifest import recipe_sha256
from unetlm.checkpoint.sharded import read_into, read_train_state, wait_written, write_shards
from unetlm.train.distributed import World, barrier
from unetlm.train.rng import rng_state, set_rng_state


class Checkpointer:
    def __init__(self, run_dir: str | Path, world: World, async_save: bool = False, verify: bool = False) -> None:
        self.run_dir = Path(run_dir)
        self.world = world
        self.async_save = async_save
        self.verify = verify  # check every file's sha256 before resuming
        self._pending = None  # (future, folder, step) of a background save not yet committed
        self._group = None
        self._tracked: tuple | None = None
        self._latest: Path | None = None  # the checkpoint resumed from, then the newest committed
        self._base = 0  # the step of that checkpoint

    @property
    def path(self) -> Path:
        """The newest checkpoint folder this run read or committed, else where its checkpoints go."""
        return self._latest or self.run_dir / store.CHECKPOINTS

    def _on_skip(self, message: str) -> None:
        if self.world.main:
            store.warn(message)

    def saved(self) -> dict | None:
        """The train record (step, recipe, tokenizer, ...) of the run's newest valid checkpoint
        (damaged ones are skipped with a warning); None if there is none."""
        found = store.latest(self.run_dir, read_train_state, self.verify, self._on_skip)
        if found is None:
            return None
        self._latest, record = found
        return record

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
        """Write the tracked state at ``step``: each rank its shards, committed atomically; in the
        background with ``async_save`` (committed when done, at the latest by the next save or
        :meth:`close`)."""
        self.wait()
        model, optimizer, scheduler, recipe, tokenizer, batch_size = self._tracked
        train = {
            "step": step,
            "scheduler": scheduler.state_dict(),
            "rng": rng_state(),
            "recipe": recipe.to_dict(),
            "tokenizer": None if tokenizer is None else tokenizer.to_json(),
            "world_size": self.world.size,
            "batch_size": batch_size,
        }
        directory = store.begin(self.run_dir, step, self.world.main)
        barrier(self.world)
        state = self._state(json.dumps(train))
        future = write_shards(state, directory, self.world.distributed, step, recipe_sha256(train["recipe"]),
                              self._async_group())
        if future is None:
            self._commit(step)
        else:
            self._pending = (future, directory, step)

    def _async_group(self):
        if not self.async_save:
            return None
        if not self.world.distributed:
            return True
        if self._group is None:  # background collectives must not share the training group
            import torch.distributed as dist

            self._group = dist.new_group(backend="gloo")
        return self._group

    def _commit(self, step: int) -> None:
        if self.world.main:
            store.commit(self.run_dir, step, self._tracked[3].training.keep_checkpoints, self._base)
        barrier(self.world)
        self._latest, self._base = store.step_dir(self.run_dir, step), step

    def wait(self) -> None:
        """Finish and commit a background save."""
        if self._pending is not None:
            (future, directory, step), self._pending = self._pending, None
            wait_written(future, directory)
            self._commit(step)

    def load(self) -> int:
        """Restore the tracked model, optimizer, scheduler and generators from the checkpoint
        :meth:`saved` chose (or, if it fails to read, the next older valid one); returns the step to
        continue from. Shards are read straight into this run's layout, whatever world size wrote them."""
        model, optimizer, scheduler = self._tracked[:3]
        directories = store.candidates(self.run_dir)
        if self._latest not in directories:
            raise CheckpointError(f"no checkpoint in {self.run_dir}")
        state = self._state("")

        def read(directory: Path) -> dict:
            read_into(state, directory, self.world.distributed)
            return json.loads(state["train"])

        older = directories[directories.index(self._latest):]
        self._latest, train = store.first_usable(older, read, self.verify, self._on_skip, checked=(self._latest,))
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, optimizer, state["optimizer"])
        scheduler.load_state_dict(train["scheduler"])
        set_rng_state(train["rng"])
        self._base = int(train["step"])
        return self._base

    def close(self) -> None:
        self.wait()
        if self._group is not None:
            import torch.distributed as dist

            dist.destroy_process_group(self._group)
            self._group = None
