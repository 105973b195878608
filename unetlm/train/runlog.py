"""A run's records: one per log step, measured over the steps since the previous record, reduced
over ranks once, written by rank 0 to metrics.jsonl, TensorBoard, W&B and the progress display.

Between log steps nothing waits for the device: each step's loss, nats and target bytes,
truncation counts and learned-splitter measures are added up on the device, and the host only
times its own waits. A record (every ``training.log_every`` steps, at evaluations, at every
checkpoint and at the end) costs one all-reduce of those sums (the host sync of the log step)
and one host-side maximum over ranks. Its keys:

- ``loss`` (nats per target token) and ``bpb``: over the interval's steps; ``grad_norm``,
  ``lr``: of the log step; ``bytes``, ``flops``: since the run's start;
- ``step_time_s``: wall time per step over the interval, evaluations and checkpoint saves left
  out; ``bytes_per_s`` (all ranks) and ``bytes_per_s_per_device`` over the same time;
- ``mfu``: the model's training FLOPs per byte times ``bytes_per_s_per_device`` over the
  device's bf16 dense peak (:mod:`unetlm.train.hardware`; absent where the peak is unknown,
  e.g. on CPUs);
- ``data_wait_s``: per step, the time the slowest rank waited for its next batch;
- ``peak_memory_gib``: CUDA only, the largest peak of allocated memory of any rank in the interval;
- ``truncated`` per stage transition (summed), ``aux_loss`` and ``bytes_per_chunk`` (learned
  splitters, averaged), ``epoch`` and ``padding`` (the data's), ``val_loss``/``val_bpb`` when evaluated.
"""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from pathlib import Path

import attrs
import torch

from unetlm.recipe import Recipe
from unetlm.train import distributed
from unetlm.train.hardware import GIB, cuda_hardware
from unetlm.train.metrics import MetricsWriter, bits_per_byte, open_tensorboard, open_wandb, scalars
from unetlm.train.distributed import World
from unetlm.train.progress import Progress
from unetlm.train.scaling import Budget


@attrs.define
class Interval:
    """The steps since the last record: sums on the device, times (seconds) on the host."""

    sums: torch.Tensor | None = None  # float64: loss, nats, target bytes, truncated..., [aux loss, bytes per chunk...]
    steps: int = 0
    data_wait: float = 0.0
    paused: float = 0.0
    started: float = attrs.field(factory=time.perf_counter)


@attrs.define
class RunLogger:
    world: World
    lengths: torch.Tensor  # (vocab,) bytes per token id, on the device
    bytes_per_step: float
    flops_per_byte: float
    peak_flops: float | None  # bf16 dense FLOP/s of one device (None: unknown)
    bar: Progress
    metrics: MetricsWriter | None
    board: object | None
    wandb: object | None
    interval: Interval = attrs.field(factory=Interval)

    @classmethod
    def open(cls, recipe: Recipe, out: Path, world: World, tokenizer, budget: Budget, flops_per_byte: float,
             start_step: int, progress: bool) -> "RunLogger":
        """The run's sinks (rank 0); a resumed run's metrics.jsonl loses the records after ``start_step``."""
        spec = recipe.training
        metrics = board = run = None
        dropped = 0
        if world.main:
            metrics = MetricsWriter(out / "metrics.jsonl")
            dropped = metrics.keep_until(start_step)
            if spec.tensorboard:
                board = open_tensorboard(out / "tensorboard", purge_step=start_step + 1 if start_step else None)
            if spec.wandb is not None:
                run = open_wandb(spec.wandb, out, recipe.to_dict())
        peak = cuda_hardware(world.device, world.size).peak_flops if world.device.type == "cuda" else None
        logger = cls(
            world,
            torch.as_tensor(tokenizer.lengths, device=world.device),
            budget.batch_size * recipe.model.seq_len * tokenizer.bytes_per_token,
            flops_per_byte,
            peak,
            Progress(spec.steps, start_step, enabled=progress and world.main),
            metrics,
            board,
            run,
        )
        if dropped:
            logger.warn(f"metrics.jsonl: dropped {dropped} records of steps after step {start_step}, "
                        f"where this run continues from")
        return logger

    def write(self, text: str) -> None:
        for line in text.splitlines():
            self.bar.write(line)

    def warn(self, text: str) -> None:
        """A line rank 0 shows even without progress output."""
        if self.world.main:
            if self.bar.enabled:
                self.bar.write(text)
            else:
                print(text, file=sys.stderr, flush=True)

    def start(self) -> None:
        """Begin the first interval (set-up time is not a step's)."""
        self.interval = Interval()

    def accumulate(self, output) -> None:
        """Add a step's :class:`~unetlm.train.loop.StepOutput` to the interval (device work only)."""
        parts = [output.loss.detach().double().view(1), output.nats_bytes.double()]
        parts += [t.double().view(1) for t in output.truncated]
        if output.aux_loss is not None:
            parts += [output.aux_loss.detach().double().view(1)] + [b.detach().double().view(1)
                                                                    for b in output.bytes_per_chunk]
        values = torch.cat(parts)
        it = self.interval
        it.sums = values if it.sums is None else it.sums + values
        it.steps += 1

    def waited(self, seconds: float) -> None:
        self.interval.data_wait += seconds

    @contextmanager
    def paused(self):
        """Time spent in the block (an evaluation, a checkpoint save) is no step's."""
        if self.world.device.type == "cuda":
            torch.cuda.synchronize(self.world.device)  # the queued steps end inside the interval
        started = time.perf_counter()
        try:
            yield
        finally:
            self.interval.paused += time.perf_counter() - started

    def record(self, step: int, output, optimizer) -> dict:
        """The interval's record, reduced over ranks; the next interval begins."""
        world, it = self.world, self.interval
        sums = distributed.sum_over_ranks(it.sums, world).tolist()  # the log step's host sync
        elapsed = max(time.perf_counter() - it.started - it.paused, 1e-9)
        cuda = world.device.type == "cuda"
        peak = torch.cuda.max_memory_allocated(world.device) / GIB if cuda else 0.0
        wait, peak = distributed.max_over_ranks([it.data_wait, peak], world)
        self.interval = Interval()
        n, ranks = it.steps, world.size
        transitions = len(output.truncated)
        group = optimizer.param_groups[0]
        interval_bytes = n * self.bytes_per_step
        record = {
            "step": step,
            "loss": sums[0] / n,  # each rank's loss is its share of the step's global mean
            "bpb": bits_per_byte(sums[1] / max(sums[2], 1.0)),
            "lr": group["lr"] / group.get("lr_multiplier", 1.0),
            "grad_norm": float(output.grad_norm),
            "bytes": step * self.bytes_per_step,
            "flops": step * self.bytes_per_step * self.flops_per_byte,
            "step_time_s": elapsed / n,
            "bytes_per_s": interval_bytes / elapsed,
            "bytes_per_s_per_device": interval_bytes / elapsed / ranks,
            "data_wait_s": wait / n,
            "truncated": [int(t) for t in sums[3 : 3 + transitions]],
        }
        if self.peak_flops:
            record["mfu"] = record["bytes_per_s_per_device"] * self.flops_per_byte / self.peak_flops
        if cuda:
            record["peak_memory_gib"] = peak
            torch.cuda.reset_peak_memory_stats(world.device)
        if output.aux_loss is not None:  # learned splitters: ratio loss and achieved bytes per chunk
            record["aux_loss"] = sums[3 + transitions] / (ranks * n)
            record["bytes_per_chunk"] = [b / (ranks * n) for b in sums[4 + transitions :]]
        return record

    def emit(self, record: dict) -> None:
        step = record["step"]
        if self.metrics is not None:
            self.metrics.write(record)
        numbers = scalars(record)
        if self.board is not None:
            for key, value in numbers.items():
                self.board.add_scalar(f"train/{key}", value, step)
        if self.wandb is not None:
            self.wandb.log({f"train/{key}": value for key, value in numbers.items()}, step=step)
        if any(record["truncated"]):  # stages of learned splitters cannot be planned from the data
            self.bar.write(f"step {step}: truncated boundaries per stage transition: {record['truncated']} (raise max_len)")
        shown = {"loss": record["loss"], "bpb": record["bpb"], "bytes/s": f"{record['bytes_per_s']:,.0f}"}
        if "mfu" in record:
            shown["mfu"] = f"{record['mfu']:.1%}"
        if "val_bpb" in record:
            shown["val_bpb"] = record["val_bpb"]
        self.bar.update(step, **shown)

    def close(self) -> None:
        self.bar.close()
        if self.board is not None:
            self.board.close()
            self.board = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
