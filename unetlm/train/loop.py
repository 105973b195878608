"""The training loop, from one CPU process to many GPUs under torchrun, in three parts.

``Trainer.setup``: the model from the recipe, the data (:func:`unetlm.data.corpora.open_training_data`:
planned rows that no stage overflows, a global batch per step as a pure function of (seed, step),
split into equal row blocks per rank), the
micro-batch and activation checkpointing (:func:`unetlm.train.plan.plan_run`), parallelism applied from outside the model
(:mod:`unetlm.train.parallelize`), optimizer and schedule, and the checkpointer
(:mod:`unetlm.train.checkpointer`), which resumes the run. ``Trainer.step``: one optimizer step.
``Trainer.log``: the measurements since the last record (:mod:`unetlm.train.runlog`), evaluation
when due. ``Trainer.run``: the steps, with checkpoints and stops agreed by every rank at each step
boundary (:mod:`unetlm.train.preemption`).
"""
from __future__ import annotations

import time
from pathlib import Path

import attrs
import torch

from unetlm.checkpoint.trained import load_trained
from unetlm.model.build import build_model
from unetlm.core.tokens import PAD
from unetlm.data.loader import step_batches
from unetlm.data.boundaries import with_auto_lengths
from unetlm.data.corpora import open_corpora, open_training_data, prepare_cached, shared_tokenizer, tokenizer_text
from unetlm.data.sources import require_source
from unetlm.data.windows import TrainingData
from unetlm.model.generate import generate
from unetlm.model.summary import summarize
from unetlm.recipe import Recipe, dump_recipe
from unetlm.recipe.schema import TrainingSpec, check_device
from unetlm.train import parallel
from unetlm.train.checkpointer import Checkpointer
from unetlm.train.errors import TrainingError
from unetlm.train.guard import FiniteGuard
from unetlm.train.metrics import bits_per_byte
from unetlm.train.optim import make_optimizer, make_scheduler
from unetlm.train.parallel import World, from_rank0
from unetlm.train.parallelize import ParallelPlan, parallelize, plan_parallelism, set_gradient_sync
from unetlm.train.plan import plan_run
from unetlm.train.preemption import CheckpointSchedule, StopSignals
from unetlm.train.repeats import repeat_note
from unetlm.train.runlock import lock_run
from unetlm.train.runlog import RunLogger
from unetlm.train.scaling import Budget, resolve_budget


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


def autocast_dtype(spec: TrainingSpec, device: torch.device) -> torch.dtype | None:
    """bfloat16 autocast where asked, or ("auto") on CUDA devices that support it; None: float32."""
    if spec.dtype == "bfloat16":
        return torch.bfloat16
    if spec.dtype == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def use_compile(spec: TrainingSpec, device: torch.device) -> bool:
    return device.type == "cuda" if spec.compile == "auto" else spec.compile


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

    loss: torch.Tensor  # mean cross-entropy per target token (detached, on the device)
    nats_bytes: torch.Tensor  # (2,) float64 on the device: summed nats and target bytes
    truncated: list[torch.Tensor]  # per transition: boundaries dropped by max_len
    aux_loss: torch.Tensor | None  # learned splitters' ratio losses, mean over micro-batches
    bytes_per_chunk: list[torch.Tensor]  # per learned splitter, mean over micro-batches
    grad_norm: torch.Tensor | None = None  # set by the optimizer step (before clipping)


def forward_backward(model, batch, micro_rows: int, dtype, lengths: torch.Tensor, plan: ParallelPlan) -> StepOutput:
    """Forward and backward passes over ``batch`` in micro-batches of ``micro_rows`` rows (0: one pass).

    Each micro-batch's mean token loss is weighted by its share of the batch's targets, so the
    accumulated gradient equals the whole batch's; gradients are reduced across ranks once, after
    the last micro-batch. The learned splitters' ratio losses are averaged over micro-batches.
    """
    parts = batch.split(micro_rows)
    total = (batch.targets != PAD).sum().clamp(min=1)
    loss = torch.zeros((), device=batch.targets.device)
    nats_bytes = torch.zeros(2, dtype=torch.float64, device=batch.targets.device)
    truncated, aux, per_chunk = None, [], []
    for i, part in enumerate(parts):
        set_gradient_sync(model, i == len(parts) - 1, plan)
        out = forward_loss(model, part, dtype)
        weight = (part.targets != PAD).sum() / total
        objective = out.loss * weight
        if out.aux_loss is not None:
            objective = objective + out.aux_loss / len(parts)
            aux.append(out.aux_loss.detach())
            per_chunk.append(torch.stack(out.bytes_per_chunk))
        objective.backward()
        loss = loss + out.loss.detach() * weight
        nats_bytes += loss_per_byte(out.loss, part, lengths)
        sums = [t.sum() for t in out.truncated]
        truncated = sums if truncated is None else [a + b for a, b in zip(truncated, sums)]
    return StepOutput(
        loss,
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
        total = parallel.sum_over_ranks(total, world)
    return float(total[0] / total[1].clamp(min=1))


# what a resumed run may change: how it runs and reports, not what it computes (new keys are
# absent from older checkpoints' recipes and compare as changed)
RESUMABLE_KEYS = tuple(f"training.{key}" for key in (
    "steps", "eval_every", "eval_batches", "checkpoint_every", "checkpoint_every_minutes", "async_checkpoint",
    "log_every", "tensorboard", "wandb", "sample_prompt", "sample_bytes", "threads", "compile",
    "micro_batch_size", "activation_checkpointing", "shard_size", "dist_timeout_minutes", "keep_checkpoints",
)) + ("data.workers",)
SHOWN_DIFFERENCES = 4


def describe_differences(diffs: list[str], width: int = 60) -> str:
    """``key: old -> new`` items joined on one line: the first few, each cut to ``width`` characters."""
    shown = [d if len(d) <= width else d[: width - 3] + "..." for d in diffs[:SHOWN_DIFFERENCES]]
    more = len(diffs) - len(shown)
    return "; ".join(shown) + (f"; and {more} more" if more else "")


def check_resume(saved: dict | None, path: Path, recipe: Recipe, resume: bool | str, force: bool) -> dict | None:
    """The saved train record to resume from (None: a fresh run); an error when the request and
    the run directory disagree. ``resume``: True (a checkpoint must exist), False (none may exist)
    or ``"auto"`` (continue if there is one, else start fresh: a command safe to repeat)."""
    if resume == "auto":
        resume = saved is not None
    if not resume:
        if saved is not None:
            raise TrainingError(f"{path} holds a checkpoint (step {saved.get('step')}) and --resume no was given; "
                                f"continue it (--resume auto) or choose another --out")
        return None
    if saved is None:
        legacy = path.parent / "checkpoint.pt"
        if legacy.is_file():
            raise TrainingError(
                f"--resume: {legacy} is a single-file checkpoint of an older unetlm, which this version does "
                f"not resume from (it resumes from sharded {path}/); start a new run with another --out"
            )
        raise TrainingError(f"--resume: no checkpoint at {path}")
    diffs = [d for d in recipe_differences(saved["recipe"], recipe.to_dict()) if not d.startswith(RESUMABLE_KEYS)]
    if diffs and not force:
        raise TrainingError(
            f"{path.parent} holds a checkpoint of another recipe ({describe_differences(diffs)}); train its own "
            f"recipe ({path.parent / 'recipe.toml'}), choose another --out, or pass --force to continue with this one"
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
    rank, _, _ = parallel.launch_rank()  # several processes without torchrun are refused here
    if not recipe.data.prepared_dirs:
        require_source(recipe.data)
        prepare_cached(recipe, progress and rank == 0)
    world = parallel.init_world(recipe.training.device, recipe.training.dist_timeout_minutes)
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
        if sample and recipe.training.sample_bytes > 0 and world.main and finished:
            last["sample"] = sample_text(recipe, out)
        return last
    finally:
        parallel.close_world(world)


@attrs.define
class Trainer:
    """One training run: built by :meth:`setup`, advanced by :meth:`step`, reported by :meth:`log`."""

    recipe: Recipe
    out: Path
    world: World
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    data: TrainingData
    valid: list
    checkpointer: Checkpointer
    plan: ParallelPlan
    budget: Budget
    dtype: torch.dtype | None
    micro_rows: int
    start_step: int
    logger: RunLogger
    guard: FiniteGuard = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.guard = FiniteGuard(self.optimizer, self.world.device, self.checkpointer.path)

    @classmethod
    def setup(cls, recipe: Recipe, out: Path, world: World, resume: bool | str, force: bool, progress: bool,
              verify: bool = False) -> "Trainer":
        recipe = with_auto_lengths(recipe)  # max_len = "auto" sized from the data
        spec = recipe.training
        background = world.device.type == "cuda" if spec.async_checkpoint == "auto" else spec.async_checkpoint
        checkpointer = Checkpointer(out, world, async_save=background, verify=verify)
        saved = check_resume(checkpointer.saved(), checkpointer.path, recipe, resume, force)
        if spec.threads:
            torch.set_num_threads(spec.threads)
        check_device(recipe.model, world.device.type, training=True)
        torch.manual_seed(spec.seed)
        model = build_model(recipe)
        corpora = open_corpora(recipe, lambda make: from_rank0(make, world), progress and world.main)
        if model.tokenizer is None:
            model.tokenizer = run_tokenizer(corpora, saved)
        summary = summarize(model)
        budget = resolve_budget(
            spec.batch_size, spec.lr, spec.steps, recipe.model.seq_len, summary.train_flops_per_byte,
            summary.bytes_per_token,
        )
        data = open_training_data(
            corpora, recipe.data.valid_fraction, recipe.model.seq_len, model.lengths, len(model.splitters),
            budget.batch_size, spec.seed,
        )
        spec = plan_run(recipe, budget, world, saved, show=progress)  # micro-batch and checkpointing resolved
        dtype = autocast_dtype(spec, world.device)
        plan = plan_parallelism(spec, world, spec.activation_checkpointing, use_compile(spec, world.device), dtype)
        model.to(world.device)
        parallelize(model, plan, world)
        optimizer = make_optimizer(model, spec, budget.lr)
        scheduler = make_scheduler(optimizer, spec)
        tokenizer = model.tokenizer if recipe.model.tokenizer is not None else None
        checkpointer.track(model, optimizer, scheduler, recipe, tokenizer, budget.batch_size)
        start_step = checkpointer.load() if saved is not None else 0
        if world.main:
            write_run_files(out, recipe, tokenizer)
        logger = RunLogger.open(recipe, out, world, model.tokenizer, budget, summary.train_flops_per_byte,
                                start_step, progress)
        trainer = cls(recipe, out, world, model, optimizer, scheduler, data,
                      data.valid_batches(spec.eval_batches, world.rank, world.size), checkpointer, plan, budget, dtype,
                      spec.micro_batch_size, start_step, logger)
        logger.write(trainer.describe(summary))
        return trainer

    def describe(self, summary) -> str:
        return (
            f"{self.recipe.name or 'recipe'}: {summary.params:,} parameters, "
            f"{summary.train_flops_per_byte / 1e6:.2f} MFLOPs/byte (training), {self.world.size} x {self.world.device}, "
            f"{'bfloat16 autocast' if self.dtype else 'float32'}, {self.plan.describe()}\n{self.budget.describe()}\n"
            f"{self.data.describe()}"
        )

    def step(self, number: int, batch) -> StepOutput:
        """Optimizer step ``number`` (from 1) on ``batch``, this rank's rows of the step's global batch."""
        self.optimizer.zero_grad(set_to_none=True)
        lengths = self.logger.lengths
        output = forward_backward(self.model, batch, self.micro_rows, self.dtype, lengths, self.plan)
        output.loss = parallel.mean_over_ranks(output.loss, self.world)
        clip = self.recipe.training.grad_clip or float("inf")
        output.grad_norm = parallel.local_tensor(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip))
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
                f"rows planned to fit every max_len; the data's boundary masks do not match the model's splitters"
            )
        if step % spec.eval_every == 0 or step == spec.steps:
            with self.logger.paused():
                val = evaluate(self.model, self.valid, self.world.device, self.world, self.dtype, self.micro_rows)
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
