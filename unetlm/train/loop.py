"""The training loop, from one CPU process to many GPUs under torchrun, in three parts.

``Trainer.setup``: resolve, then build. The run is resolved first (:func:`unetlm.train.resolve.resolve_run`:
budget, batch split, plan, dtypes, parallelism), then built from that alone: the data
(:func:`unetlm.data.corpora.open_training_data`: rows cut so that no stage overflows, a global batch
per step as a pure function of (seed, step), split into equal row blocks per rank), the model on the
meta device, parallelism applied from outside it (:mod:`unetlm.train.parallelize`), each rank's
shards materialised and initialised (:mod:`unetlm.train.materialize`), optimizer and schedule, and
the checkpointer (:mod:`unetlm.train.checkpointer`), which resumes the run. ``Trainer.step``: one
optimizer step. ``Trainer.log``: the measurements since the last record (:mod:`unetlm.train.runlog`),
evaluation when due. ``Trainer.run``: the steps, with checkpoints and stops agreed by every rank at
each step boundary (:mod:`unetlm.train.preemption`).
"""
from __future__ import annotations

import time
from pathlib import Path

import attrs
import torch

from unetlm.checkpoint import store
from unetlm.checkpoint.trained import load_trained
from unetlm.model.build import build_model
from unetlm.core.tokens import PAD
from unetlm.data.loader import step_batches
from unetlm.data.boundaries import with_auto_lengths
from unetlm.data.corpora import open_corpora, open_training_data, ready_data, shared_tokenizer, tokenizer_text
from unetlm.data.windows import TrainingData
from unetlm.model.generate import generate
from unetlm.recipe import Recipe, dump_recipe
from unetlm.train import distributed
from unetlm.train.checkpointer import Checkpointer
from unetlm.train.distributed import World, from_rank0
from unetlm.train.errors import TrainingError
from unetlm.train.guard import FiniteGuard
from unetlm.train.materialize import materialize
from unetlm.train.metrics import bits_per_byte
from unetlm.train.optim import make_optimizer, make_scheduler
from unetlm.train.parallelize import Parallelism, parallelize, set_last_micro_batch
from unetlm.train.preemption import CheckpointSchedule, StopSignals
from unetlm.train.repeats import repeat_note
from unetlm.train.resolve import ResolvedRun, background_checkpoints, resolve_run
from unetlm.train.runlock import lock_run
from unetlm.train.runlog import RunLogger


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
    (so compiled regions run their evaluation graph, never a new shape)."""
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


# what a resumed run may change: its name and description (a copied or renamed recipe file), how it
# runs and reports, not what it computes (new keys are absent from older checkpoints' recipes and
# compare as changed)
RESUMABLE_KEYS = ("name:", "description:") + tuple(f"training.{key}" for key in (
    "steps", "eval_every", "eval_batches", "checkpoint_every", "checkpoint_every_minutes", "async_checkpoint",
    "log_every", "tensorboard", "wandb", "sample_prompt", "sample_bytes", "threads", "compile",
    "micro_batch_size", "activation_checkpointing", "shard_size", "dist_timeout_minutes", "keep_checkpoints",
    "reduce_dtype",
)) + ("data.workers",)
SHOWN_DIFFERENCES = 4


def describe_differences(diffs: list[str], width: int = 60) -> str:
    """``key: old -> new`` items joined on one line: the first few, each cut to ``width`` characters."""
    shown = [d if len(d) <= width else d[: width - 3] + "..." for d in diffs[:SHOWN_DIFFERENCES]]
    more = len(diffs) - len(shown)
    return "; ".join(shown) + (f"; and {more} more" if more else "")


def check_resume(saved: dict | None, out: Path, recipe: Recipe, resume: bool | str, force: bool) -> dict | None:
    """The saved train record to resume from (None: a fresh run); an error when the request and
    the run directory ``out`` disagree. ``resume``: True (a checkpoint must exist), False (none may
    exist) or ``"auto"`` (continue if there is one, else start fresh: a command safe to repeat)."""
    if resume == "auto":
        resume = saved is not None
    if not resume:
        if saved is not None:
            raise TrainingError(f"{out} holds a checkpoint (step {saved.get('step')}) and --resume no was given; "
                                f"continue it (--resume auto) or choose another --out")
        return None
    checkpoints = out / store.CHECKPOINTS
    if saved is None:
        legacy = out / "checkpoint.pt"
        if legacy.is_file():
            raise TrainingError(
                f"--resume: {legacy} is a single-file checkpoint of an older unetlm, which this version does "
                f"not resume from (it resumes from sharded {checkpoints}/); start a new run with another --out"
            )
        raise TrainingError(f"--resume: no checkpoint at {checkpoints}")
    diffs = [d for d in recipe_differences(saved["recipe"], recipe.to_dict()) if not d.startswith(RESUMABLE_KEYS)]
    if diffs and not force:
        raise TrainingError(
            f"{out} holds a checkpoint of another recipe ({describe_differences(diffs)}); train its own "
            f"recipe ({out / 'recipe.toml'}), choose another --out, or pass --force to continue with this one"
        )
    return saved


def train(
    recipe: Recipe,
    out_dir: str | Path,
    resume: bool | str = "auto",
    force: bool = False,
    progress: bool = True,
    sample: bool = True,
    stop_at: int | None = None,
    verify: bool = False,
) -> dict:
    """Train ``recipe`` into ``out_dir`` (checkpoints/, metrics.jsonl, recipe.toml); returns the last
    record, with ``"interrupted"`` (the signal's name) when a signal stopped the run after saving.
    ``stop_at``: stop (with a checkpoint) after that step. ``resume``: ``"auto"`` (continue the
    directory's checkpoint if there is one, else start fresh), True or False (see :func:`check_resume`).
    ``verify``: check the sha256 of every file of the checkpoint resumed from.

    Run as one process, or under ``torchrun`` (every rank calls this; rank 0 writes the logs,
    every rank its checkpoint shards). The data cache is prepared before the process group forms,
    by whichever process takes its file lock first; rank 0 holds the run directory's lock.
    """
    out = Path(out_dir)
    rank, _, _ = distributed.launch_rank()  # several processes without torchrun are refused here
    ready_data(recipe, progress and rank == 0)
    world = distributed.init_world(recipe.training.device, recipe.training.dist_timeout_minutes)
    try:
        with StopSignals() as signals:
            lock = lock_run(out, world)
            try:
                trainer = Trainer.setup(recipe, out, world, resume, force, progress, verify)
                try:
                    last = trainer.run(stop_at, signals)
                finally:
                    trainer.close()
            finally:
                lock.release()
            finished = "loss" in last and last["step"] == recipe.training.steps
            if sample and recipe.training.sample_bytes > 0 and world.main and finished and not signals.received:
                last["sample"] = sample_text(recipe, out)  # complete: a signal meanwhile waits for the sample, then ends nothing
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
    logger: RunLogger
    guard: FiniteGuard = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.guard = FiniteGuard(self.optimizer, self.world.device, self.checkpointer.path)

    @property
    def recipe(self) -> Recipe:
        """The recipe with every training "auto" value decided for this run."""
        return self.resolved.recipe

    @classmethod
    def setup(cls, recipe: Recipe, out: Path, world: World, resume: bool | str, force: bool, progress: bool,
              verify: bool = False) -> "Trainer":
        """Resolve the run, then build it: data, the model (meta device, parallelized, each rank's shards
        materialised), optimizer, schedule, checkpointer; resumed from the run directory when asked
        (``verify``: every file's sha256 checked first)."""
        recipe = with_auto_lengths(recipe)  # max_len = "auto" sized from the data
        checkpointer = Checkpointer(out, world, async_save=background_checkpoints(recipe.training, world.device),
                                    verify=verify)
        saved = check_resume(checkpointer.saved(), out, recipe, resume, force)
        corpora = open_corpora(recipe, lambda make: from_rank0(make, world), progress=False)  # said by ready_data
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
        clip = run.training.grad_clip or float("inf")
        output.grad_norm = distributed.local_tensor(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip))
        self.guard.observe(number, output.loss, output.grad_norm)  # a non-finite step is skipped on the device
        self.optimizer.step()
        self.scheduler.step()
        return output

    def log(self, step: int, output: StepOutput) -> dict:
        """Reduce the measurements since the last record over ranks, evaluate when due; rank 0 writes and shows them."""
        spec = self.recipe.training
        record = self.logger.record(step, output, self.optimizer) | self.data.step_metrics(step - 1)
        self.guard.check()
        if any(record["truncated"][: self.data.transitions]):
            raise TrainingError(
                f"step {step}: the model dropped boundaries {record['truncated']} (per stage transition) on training "
                f"rows cut to fit every max_len; the data's boundary masks do not match the model's splitters"
            )
        if step % spec.eval_every == 0 or step == spec.steps:
            run = self.resolved
            with self.logger.paused():
                val = evaluate(self.model, self.valid, self.world.device, self.world, run.dtype, run.split.micro_batch)
            record["val_loss"], record["val_bpb"] = val, bits_per_byte(val)
        self.logger.emit(record)
        return record

    def save(self, step: int, schedule: CheckpointSchedule) -> None:
        """A checkpoint at ``step``, never of a step after a non-finite one."""
        self.guard.check()
        with self.logger.paused():
            self.checkpointer.save(step)
        schedule.saved(step)

    def run(self, stop_at: int | None = None, signals: StopSignals | None = None) -> dict:
        """Steps from the start step to ``training.steps`` (or ``stop_at``), checkpointing as due
        (:class:`~unetlm.train.preemption.CheckpointSchedule`); a stop signal saves the current step
        and ends the run: the last record then holds ``"interrupted"``, the signal's name."""
        spec = self.recipe.training
        stop = spec.steps if stop_at is None else min(stop_at, spec.steps)
        step, last, output = self.start_step, {"step": self.start_step}, None
        schedule = CheckpointSchedule(spec, self.world, signals or StopSignals(), self.start_step)
        if step < stop:
            note = repeat_note(self.data, spec.steps)
            if note:
                self.logger.warn(note)
        batches = step_batches(self.data, step, stop, self.world.rank, self.world.size, self.recipe.data.workers)
        pinned = self.world.device.type == "cuda"  # copies that do not wait for the device's queued work
        self.model.train()
        self.logger.start()
        while True:
            boundary = schedule.at(step, stop)  # every rank, every step: stop and save agreed
            due = step % spec.log_every == 0 or step % spec.eval_every == 0 or step == stop
            if output is not None and (due or boundary.save):
                last = self.log(step, output)
            if boundary.save:
                self.save(step, schedule)
            if boundary.stop and step < stop:
                return last | {"step": step, "interrupted": boundary.signal}
            if boundary.stop or step >= stop:
                return last
            started = time.perf_counter()
            batch = next(batches)
            self.logger.waited(time.perf_counter() - started)
            output = self.step(step + 1, batch.to(self.world.device, non_blocking=pinned))
            self.logger.accumulate(output)
            step += 1

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
