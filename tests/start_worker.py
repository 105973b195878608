"""Run by tests/test_distributed.py, as one process or under torchrun: the start of training.

``python start_worker.py OUT TINY.toml [BIG.toml]``: every rank sets up a run of BIG (built on the
meta device, sharded, materialised) and records its peak resident memory, then sets up TINY and
runs one step's forward and backward passes on :func:`padded_batch` (its rows unevenly padded,
this rank's block of them), as FSDP2 and, on several processes, as HSDP. Rank 0 writes
OUT/start-N.pt (N processes): per layout the initial full weights, the full gradients and the
step's loss of TINY, and every rank's peak memory after BIG's setup.
"""
from __future__ import annotations

import resource
import sys
from pathlib import Path

import attrs
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from unetlm.core.process import end_process
from unetlm.core.tokens import PAD
from unetlm.data.packing import Batch
from unetlm.recipe import load_recipe
from unetlm.train import distributed
from unetlm.train.loop import Trainer, forward_backward

VALID = (12, 30, 64, 64, 50, 64, 7, 64)  # non-PAD positions of each row of the global batch


def padded_batch(model, rows: int, seq_len: int) -> Batch:
    """``rows`` rows of text, row i padded after ``VALID[i]`` positions (tokens and targets PAD)."""
    text = b"The byte model reads words, pools them into coarser stages and returns. " * 20
    flat = torch.tensor(list(text[: rows * seq_len + 1]), dtype=torch.long)
    tokens, targets = flat[:-1].view(rows, seq_len).clone(), flat[1:].view(rows, seq_len).clone()
    for i in range(rows):
        tokens[i, VALID[i]:] = PAD
        targets[i, VALID[i] - 1:] = PAD
    doc = torch.zeros_like(tokens)
    return Batch(tokens, doc, model.split(tokens, doc), targets)


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def start(trainer: Trainer) -> tuple[dict, dict]:
    """(initial full weights, full gradients of one step on this rank's rows of the padded batch)."""
    world, model, run = trainer.world, trainer.model, trainer.resolved
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = {k: v.clone() for k, v in get_model_state_dict(model, options=options).items()}
    batch = padded_batch(model, run.budget.batch_size, run.recipe.model.seq_len)
    rows = run.budget.batch_size // world.size
    mine = Batch(*(t[world.rank * rows:(world.rank + 1) * rows] for t in (batch.tokens, batch.doc)),
                 [m[world.rank * rows:(world.rank + 1) * rows] for m in batch.masks],
                 batch.targets[world.rank * rows:(world.rank + 1) * rows])
    output = forward_backward(model, mine, run.split.micro_batch, run.dtype, trainer.logger.lengths,
                              run.parallelism, world)
    grads = {name: full(p.grad).clone() for name, p in model.named_parameters() if p.grad is not None}
    return weights, grads, distributed.sum_over_ranks(output.loss, world)


def main(out: Path, tiny: Path, big: Path | None = None) -> None:
    world = distributed.init_world("cpu")
    try:
        peak = None
        if big is not None:
            trainer = Trainer.setup(load_recipe(big), out / f"big-{world.size}", world, False, False, False)
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # bytes (Linux reports KiB)
            trainer.close()
            del trainer
        results = {}
        recipe = load_recipe(tiny)
        layouts = {"fsdp": recipe}
        if world.distributed:  # and as HSDP: 2 replicas of 1 shard
            layouts["hsdp"] = attrs.evolve(recipe, training=attrs.evolve(recipe.training, shard_size=1))
        for name, layout in layouts.items():
            trainer = Trainer.setup(layout, out / f"tiny-{name}-{world.size}", world, False, False, False)
            results[name] = dict(zip(("weights", "grads", "loss"), start(trainer)))
            trainer.close()
        peaks = [peak] * world.size
        if world.distributed:
            dist.all_gather_object(peaks, peak)
        if world.main:
            torch.save(results | {"peak_rss": peaks}, out / f"start-{world.size}.pt")
    finally:
        distributed.close_world(world)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]) if len(sys.argv) > 3 else None)
    end_process(0)
