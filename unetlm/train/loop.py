"""The training loop, from one CPU process to many GPUs under torchrun, in three parts.

``Trainer.setup``: resolve, then build. The run is resolved first (:func:`unetlm.train.resolve.resolve_run`:
budget, batch split, plan, dtypes, parallelism), then built from that alone: the data
(:func:`unetlm.data.corpora.open_training_data`: rows cut so that no stage overflows, a global batch
per step as a pure function of (seed, step), split into equal row blocks per rank), the model on the
meta device, parallelism applied from outside it (:mod:`unetlm.train.parallelize`), each rank's
shards materialised and initialised (:mod:`unetlm.train.materialize`), optimizer and schedule, and
the checkpointer (:mod:`unetlm.train.checkpointer`), which resumes the run. ``Trainer.step``: one
optimizer step. ``Trainer.log``: measurements reduced over ranks, evaluation when due, records written.
"""
from __future__ import annotations

import time
from pathlib import Path

import attrs
import torch

from unetlm.model.build import build_model
from unetlm.core.tokens import PAD
from unetlm.data.loader import step_batches
from unetlm.data.boundaries import with_auto_lengths
from unetlm.data.corpora import open_corpora, open_training_data, shared_tokenizer, tokenizer_text
from unetlm.data.windows import TrainingData
from unetlm.model.generate import generate
from unetlm.recipe import Recipe, dump_recipe
from unetlm.train import distributed
from unetlm.splitters.entropy_models import installed_entropy_models, use_entropy_models
from unetlm.train.checkpointer import Checkpointer
from unetlm.train.errors import TrainingError
from unetlm.train.materialize import materialize
from unetlm.train.metrics import MetricsWriter, bits_per_byte, open_tensorboard
from unetlm.train.optim import make_optimizer, make_scheduler
from unetlm.train.distributed import World, from_rank0
from unetlm.train.parallelize import Parallelism, parallelize, set_last_micro_batch
from unetlm.train.progress import Progress
from unetlm.train.resolve import ResolvedRun, background_checkpoints, resolve_run
from unetlm.train.scaling import Budget
from unetlm.train.trained_models import TrainedModels
from unetlm.train.weights import load_trained


def recipe_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(old) | set(new))
    out = []
    for key in keys:
        path = f"{prefix}.{key}" if prefix else key
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += recipe_differences(a, b, path)
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            for i, (x, y) in enumerate(zip(a, b)):
                out += recipe_differences(x, y, f"{path}[{i}]") if isinstance(x, dict) else (
                    [f"{path}[{i}]: {x!r} -> {y!r}"] if x != y else []
                )
        elif a != b:
            out.append(f"{path}: {a!r} -> {b!r}")
    return out


def forward_loss(model, batch, dtype: torch.dtype | None):
    with torch.autocast(batch.tokens.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        return model(batch.tokens, batch.doc, batch.masks, batch.targets)


def loss_per_byte(loss: torch.Tensor, batch, lengths: torch.Tensor) -> torch.Tensor:
    """(2,) float64 on the batch's device: (nats, target bytes) of a batch whose mean loss per target
    token is ``loss``; ``lengths`` (vocab,) on the same device holds the bytes each id stands for."""
    n_tokens = (batch.targets != PAD).sum()
    return torch.stack([loss.detach().double() * n_tokens, lengths[batch.targets].sum().double()])


@attrs.define
class StepOutput:
    """What one optimizer step's forward and backward passes measured on this process's rows."""

    loss: torch.Tensor  # this rank's nats over the step's global target count (detached; summed over ranks: the mean)
    nats_bytes: torch.Tensor  # (2,) float64 on the device: summed nats and target bytes
    truncated: list[torch.Tensor]  # per transition: boundaries dropped by max_len
    aux_loss: torch.Tensor | None  # learned splitters' ratio losses, mean over micro-batches
    bytes_per_chunk: list[torch.Tensor]  # per learned splitter, mean over micro-batches
    grad_norm: torch.Tensor | None = None  # set by the optimizer step (before clipping)


def forward_backward(model, batch, micro_rows: int, dtype, lengths: torch.Tensor, parallelism: Parallelism,
                     world: World) -> StepOutput:
    """Forward and backward passes over ``batch`` (this rank's rows) in micro-batches of ``micro_rows``
    rows (0: one pass).

    The objective is the step's mean loss per target token over the global batch: each micro-batch's
    summed token losses over the count of non-PAD targets of all micro-batches of all ranks, times
    the ranks FSDP2 averages gradients over, so the reduced gradient is the single-process gradient of
    the whole global batch however its padding falls. The learned splitters' ratio losses are
    averaged over micro-batches and ranks.
    """
    parts = batch.split(micro_rows)
    device = batch.targets.device
    counts = [(part.targets != PAD).sum() for part in parts]
    total = distributed.sum_over_ranks(torch.stack(counts).sum(), world).clamp(min=1)
    scale = parallelism.world_size / total.double()
    loss = torch.zeros((), dtype=torch.float64, device=device)
    nats_bytes = torch.zeros(2, dtype=torch.float64, device=device)
    truncated, aux, per_chunk = None, [], []
    for i, (part, count) in enumerate(zip(parts, counts)):
        set_last_micro_batch(model, i == len(parts) - 1, parallelism)
        out = forward_loss(model, part, dtype)
        nats = out.loss * count  # the micro-batch's summed token losses
        objective = nats * scale.to(nats.dtype)
        if out.aux_loss is not None:
            objective = objective + out.aux_loss / len(parts)
            aux.append(out.aux_loss.detach())
            per_chunk.append(torch.stack(out.bytes_per_chunk))
        objective.backward()
        loss += nats.detach().double() / total
        nats_bytes += loss_per_byte(out.loss, part, lengths)
        sums = [t.sum() for t in out.truncated]
        truncated = sums if truncated is None else [a + b for a, b in zip(truncated, sums)]
    return StepOutput(
        loss.float(),
        nats_bytes,
        truncated,
        torch.stack(aux).mean() if aux else None,
        list(torch.stack(per_chunk).mean(0)) if per_chunk else [],
    )


@torch.no_grad()
def evaluate(model, batches, device, world: World | None = None, dtype: torch.dtype | None = None,
             micro_rows: int = 0) -> float:
    """Validation loss in nats per target byte (a token's loss spread over its bytes), over all ranks'
    rows; under ``torch.no_grad`` in micro-batches of ``micro_rows`` rows, the shapes training uses
    (so compiled blocks run their evaluation graph, one per block, never a new shape)."""
    model.eval()
    lengths = torch.as_tensor(model.tokenizer.lengths, device=device)
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for batch in batches:
        for part in batch.to(device).split(micro_rows):
            total += loss_per_byte(forward_loss(model, part, dtype).loss, part, lengths)
    model.train()
    if world is not None:
        total = distributed.sum_over_ranks(total, world)
    return float(total[0] / total[1].clamp(min=1))


def check_resume(saved: dict | None, path: Path, recipe: Recipe, resume: bool | str, force: bool) -> dict | None:
    """The saved train record to resume from (None: a fresh run); an error when the request and
    the run directory disagree. ``resume``: True (a checkpoint must exist), False (none may exist)
    or ``"auto"`` (continue if there is one, else start fresh: a command safe to repeat)."""
    if resume == "auto":
        resume = saved is not None
    if not resume:
        if saved is not None:
            raise TrainingError(f"{path} exists; pass --resume to continue it or choose another --out")
        return None
    if saved is None:
        legacy = path.parent / "checkpoint.pt"
        if legacy.is_file():
            raise TrainingError(
                f"--resume: {legacy} is a single-file checkpoint of an older unetlm, which this version does "
                f"not resume from (it resumes from sharded {path}/); start a new run with another --out"
            )
        raise TrainingError(f"--resume: no checkpoint at {path}")
    diffs = [d for d in recipe_differences(saved["recipe"], recipe.to_dict()) if not d.startswith("training.steps")]
    if diffs and not force:
        raise TrainingError(
            "the recipe differs from the checkpoint's; pass --force to resume anyway:\n  " + "\n  ".join(diffs)
        )
    return saved


def train(
    recipe: Recipe,
    out_dir: str | Path,
    resume: bool | str = False,
    force: bool = False,
    progress: bool = True,
    sample: bool = True,
    stop_at: int | None = None,
) -> dict:
    """Train ``recipe`` into ``out_dir`` (checkpoint/, metrics.jsonl, recipe.toml); returns the last
    step's metrics. ``stop_at``: stop (with a checkpoint) after that step; ``--resume`` continues.
    ``resume``: True, False or ``"auto"`` (see :func:`check_resume`).

    Run as one process, or under ``torchrun`` (every rank calls this; rank 0 writes the logs,
    every rank its checkpoint shards).
    """
    if installed_entropy_models() is None:  # entropy splitters read their byte model through training's loader
        use_entropy_models(TrainedModels())
    world = distributed.init_world(recipe.training.device)
    try:
        trainer = Trainer.setup(recipe, Path(out_dir), world, resume, force, progress)
        try:
            last = trainer.run(stop_at)
        finally:
            trainer.close()
        if sample and recipe.training.sample_bytes > 0 and world.main and last.get("step") == recipe.training.steps:
            last["sample"] = sample_text(recipe, Path(out_dir))
        return last
    finally:
        distributed.close_world(world)


@attrs.define
class Trainer:
    """One training run: built by :meth:`setup` from its :class:`ResolvedRun`, advanced by :meth:`step`,
    reported by :meth:`log`. Settings are read from the resolved run only."""

    resolved: ResolvedRun
    out: Path
    world: World
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    data: TrainingData
    valid: list
    checkpointer: Checkpointer
    start_step: int
    logger: "RunLogger"

    @property
    def recipe(self) -> Recipe:
        """The recipe with every training "auto" value decided for this run."""
        return self.resolved.recipe

    @classmethod
    def setup(cls, recipe: Recipe, out: Path, world: World, resume: bool | str, force: bool, progress: bool) -> "Trainer":
        """Resolve the run, then build it: data, the model (meta device, parallelized, each rank's shards
        materialised), optimizer, schedule, checkpointer; resumed from the run directory when asked."""
        recipe = with_auto_lengths(recipe)  # max_len = "auto" sized from the data
        checkpointer = Checkpointer(out, world, async_save=background_checkpoints(recipe.training, world.device))
        saved = check_resume(checkpointer.saved(), checkpointer.path, recipe, resume, force)
        corpora = open_corpora(recipe, lambda make: from_rank0(make, world), progress and world.main)
        tokenizer = run_tokenizer(corpora, saved) if recipe.model.tokenizer is not None else None
        try:
            run = resolve_run(recipe, world, tokenizer, (saved or {}).get("batch_size"))
        except ValueError as exc:
            raise TrainingError(str(exc)) from None
        spec = run.training
        if spec.threads:
            torch.set_num_threads(spec.threads)
        model = build_trained_model(run, tokenizer, world)
        data = open_training_data(
            corpora, run.recipe.data.valid_fraction, run.recipe.model.seq_len, model.lengths, len(model.splitters),
            run.budget.batch_size, spec.seed,
        )
        optimizer = make_optimizer(model, spec, run.budget.lr)
        scheduler = make_scheduler(optimizer, spec)
        checkpointer.track(model, optimizer, scheduler, run.given, tokenizer, run.budget.batch_size)
        start_step = checkpointer.load() if saved is not None else 0
        if world.main:
            write_run_files(out, run.given, tokenizer)
        logger = RunLogger.open(run.recipe, out, world, model.tokenizer, run.budget, run.budget.flops_per_byte,
                                start_step, progress)
        trainer = cls(run, out, world, model, optimizer, scheduler, data,
                      data.valid_batches(spec.eval_batches, world.rank, world.size), checkpointer, start_step, logger)
        logger.write(trainer.describe())
        return trainer

    def describe(self) -> str:
        return f"{self.resolved.describe()}\n{self.data.describe()}"

    def step(self, number: int, batch) -> StepOutput:
        """Optimizer step ``number`` (from 1) on ``batch``, this rank's rows of the step's global batch."""
        run = self.resolved
        self.optimizer.zero_grad(set_to_none=True)
        lengths = self.logger.lengths
        output = forward_backward(self.model, batch, run.split.micro_batch, run.dtype, lengths, run.parallelism,
                                  self.world)
        output.loss = distributed.sum_over_ranks(output.loss, self.world)
        if not torch.isfinite(output.loss):
            raise TrainingError(
                f"loss became {float(output.loss)} at step {number}; stopping. The last good "
                f"checkpoint ({self.checkpointer.path}) is kept; lower training.lr or training.grad_clip and --resume."
            )
        clip = run.training.grad_clip or float("inf")
        output.grad_norm = distributed.local_tensor(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip))
        if not torch.isfinite(output.grad_norm):
            raise TrainingError(
                f"gradient norm became {float(output.grad_norm)} at step {number}; stopping. The last "
                f"good checkpoint ({self.checkpointer.path}) is kept; lower training.lr and --resume."
            )
        self.optimizer.step()
        self.scheduler.step()
        return output

    def log(self, step: int, output: StepOutput) -> dict:
        """Reduce the step's measurements over ranks, evaluate when due; rank 0 writes and shows them."""
        spec = self.recipe.training
        record = self.logger.record(step, output, self.optimizer) | self.data.step_metrics(step - 1)
        if any(record["truncated"][: self.data.transitions]):
            raise TrainingError(
                f"step {step}: the model dropped boundaries {record['truncated']} (per stage transition) on training "
                f"rows cut to fit every max_len; the data's boundary masks do not match the model's splitters"
            )
        if step % spec.eval_every == 0 or step == spec.steps:
            run = self.resolved
            val = evaluate(self.model, self.valid, self.world.device, self.world, run.dtype, run.split.micro_batch)
            record["val_loss"], record["val_bpb"] = val, bits_per_byte(val)
        self.logger.emit(record)
        return record

    def run(self, stop_at: int | None = None) -> dict:
        """Steps from the start step to ``training.steps`` (or ``stop_at``), checkpointing as due and on Ctrl-C."""
        spec = self.recipe.training
        stop = spec.steps if stop_at is None else min(stop_at, spec.steps)
        step, last = self.start_step, {}
        batches = step_batches(self.data, step, stop, self.world.rank, self.world.size, self.recipe.data.workers)
        self.model.train()
        try:
            while step < stop:
                output = self.step(step + 1, next(batches).to(self.world.device))
                step += 1
                last = self.log(step, output)
                if step % spec.checkpoint_every == 0 or step == stop:
                    self.checkpointer.save(step)
        except KeyboardInterrupt:
            self.logger.close()
            self.checkpointer.save(step)
            if self.world.main:
                print(f"\ninterrupted: saved step {step} to {self.checkpointer.path}; continue with --resume", flush=True)
        return last

    def close(self) -> None:
        self.logger.close()
        self.checkpointer.close()


def build_trained_model(run: ResolvedRun, tokenizer, world: World) -> torch.nn.Module:
    """The model of ``run`` for training: built on the meta device, parallelized, then each rank's shards
    materialised on its device and initialised (the same weights on any number of processes)."""
    with torch.device("meta"):
        model = build_model(run.recipe)
    if tokenizer is not None:
        model.tokenizer = tokenizer
    parallelize(model, run.parallelism, world)
    return materialize(model, world.device, run.training.seed)


def write_run_files(out: Path, recipe: Recipe, tokenizer) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.toml").write_text(dump_recipe(recipe), encoding="utf-8")
    if tokenizer is not None:
        (out / "tokenizer.json").write_text(tokenizer.to_json(), encoding="utf-8")


@attrs.define
class RunLogger:
    """Per-step records: reduced over ranks, written (rank 0) to metrics.jsonl, TensorBoard and the bar."""

    world: World
    lengths: torch.Tensor  # (vocab,) bytes per token id, on the device
    bytes_per_step: float
    flops_per_byte: float
    start_step: int
    bar: Progress
    metrics: MetricsWriter | None
    board: object | None
    started: float = attrs.field(factory=time.perf_counter)

    @classmethod
    def open(cls, recipe: Recipe, out: Path, world: World, tokenizer, budget: Budget, flops_per_byte: float,
             start_step: int, progress: bool) -> "RunLogger":
        spec = recipe.training
        return cls(
            world,
            torch.as_tensor(tokenizer.lengths, device=world.device),
            budget.batch_size * recipe.model.seq_len * tokenizer.bytes_per_token,
            flops_per_byte,
            start_step,
            Progress(spec.steps, start_step, enabled=progress and world.main),
            MetricsWriter(out / "metrics.jsonl") if world.main else None,
            open_tensorboard(out / "tensorboard") if (spec.tensorboard and world.main) else None,
        )

    def write(self, text: str) -> None:
        for line in text.splitlines():
            self.bar.write(line)

    def record(self, step: int, output: StepOutput, optimizer) -> dict:
        world = self.world
        nats, n_bytes = distributed.sum_over_ranks(output.nats_bytes, world).tolist()
        elapsed = time.perf_counter() - self.started
        group = optimizer.param_groups[0]
        record = {
            "step": step,
            "loss": output.loss.item(),
            "bpb": bits_per_byte(nats / max(n_bytes, 1.0)),
            "lr": group["lr"] / group.get("lr_multiplier", 1.0),
            "grad_norm": float(output.grad_norm),
            "bytes": step * self.bytes_per_step,
            "flops": step * self.bytes_per_step * self.flops_per_byte,
            "bytes_per_s": (step - self.start_step) * self.bytes_per_step / max(elapsed, 1e-9),
            "truncated": [int(distributed.sum_over_ranks(t, world)) for t in output.truncated],
        }
        if output.aux_loss is not None:  # learned splitters: ratio loss and achieved bytes per chunk
            record["aux_loss"] = float(distributed.mean_over_ranks(output.aux_loss.detach(), world))
            record["bytes_per_chunk"] = [float(distributed.mean_over_ranks(b, world)) for b in output.bytes_per_chunk]
        return record

    def emit(self, record: dict) -> None:
        step = record["step"]
        if self.metrics is not None:
            self.metrics.write(record)
        if self.board is not None:
            for key in ("loss", "bpb", "lr", "grad_norm", "bytes_per_s", "val_bpb"):
                if key in record:
                    self.board.add_scalar(f"train/{key}", record[key], step)
        if any(record["truncated"]):  # stages of learned splitters cannot be sized from the data
            self.bar.write(f"step {step}: truncated boundaries per stage transition: {record['truncated']} (raise max_len)")
        shown = {"loss": record["loss"], "bpb": record["bpb"], "bytes/s": f"{record['bytes_per_s']:,.0f}"}
        if "val_bpb" in record:
            shown["val_bpb"] = record["val_bpb"]
        self.bar.update(step, **shown)

    def close(self) -> None:
        self.bar.close()
        if self.board is not None:
            self.board.close()
            self.board = None


def run_tokenizer(corpora, state: dict | None):
    """The tokenizer the data was prepared with (when resuming, it must be the checkpoint's)."""
    prepared = shared_tokenizer(corpora)
    if state is not None and state.get("tokenizer") is not None and state["tokenizer"] != tokenizer_text(prepared):
        raise TrainingError(
            "the checkpoint's tokenizer differs from the one the data was prepared with; prepare the data with "
            "the run's tokenizer.json in the prepared directory, or train a new run"
        )
    return prepared


def sample_text(recipe: Recipe, run_dir: Path) -> str:
    """A continuation of ``training.sample_prompt`` by an eager, unsharded copy of the trained model."""
    spec = recipe.training
    model, _ = load_trained(run_dir)
    prompt = spec.sample_prompt.encode("utf-8")
    options = dict(temperature=0.8, top_k=40, seed=spec.seed)
    try:
        text = generate(model, [prompt], spec.sample_bytes, **options)[0]
    except NotImplementedError:  # a component without the incremental step API: recompute instead
        text = generate(model, [prompt], spec.sample_bytes, cached=False, **options)[0]
    return (prompt + text).decode("utf-8", errors="replace")


__all__ = ["Trainer", "TrainingError", "evaluate", "train"]
