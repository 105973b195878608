"""The training loop, from one CPU process to many GPUs under torchrun.

Model: built from the recipe (unetlm.api). Parallelism: unetlm.train.parallel (FSDP2, full
state dicts). Data: unetlm.data (a global batch per step, a pure function of (seed, step),
split into equal row blocks per rank). This module only wires them and runs the steps.
"""
from __future__ import annotations

import time
from pathlib import Path

import attrs
import torch

from unetlm.api import build_model, model_from_state
from unetlm.data.loader import step_batches
from unetlm.data.boundaries import with_auto_lengths
from unetlm.data.corpora import open_corpora, open_training_data, shared_tokenizer, tokenizer_text
from unetlm.model.generate import generate
from unetlm.model.stack import Stack
from unetlm.model.summary import summarize
from unetlm.core.tokens import PAD
from unetlm.recipe import Recipe, dump_recipe, recipe_from_dict
from unetlm.recipe.schema import TrainingSpec
from unetlm.train import parallel
from unetlm.train.errors import TrainingError
from unetlm.train.checkpoint import CHECKPOINT, load_state, rng_state, save_atomic, set_rng_state
from unetlm.train.metrics import MetricsWriter, bits_per_byte, open_tensorboard
from unetlm.train.optim import make_optimizer, make_scheduler
from unetlm.train.parallel import World, from_rank0
from unetlm.train.progress import Progress
from unetlm.train.scaling import resolve_budget


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


def compile_model(model: torch.nn.Module, world: World) -> None:
    """Static shapes. One process: the whole forward is one graph; under FSDP2 each block is compiled."""
    if world.distributed:
        for stack in model.modules():
            if isinstance(stack, Stack):
                for block in stack.blocks:
                    block.compile(dynamic=False)
    else:
        model.compile(dynamic=False)


def set_activation_checkpointing(model: torch.nn.Module, on: bool) -> None:
    for module in model.modules():
        if isinstance(module, Stack):
            module.checkpointing = on


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


def forward_backward(model, batch, micro_rows: int, dtype, lengths: torch.Tensor, world: World) -> StepOutput:
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
        parallel.set_gradient_sync(model, i == len(parts) - 1, world)
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
def evaluate(model, batches, device, world: World | None = None, dtype: torch.dtype | None = None) -> float:
    """Validation loss in nats per target byte (a token's loss spread over its bytes), over all ranks' rows."""
    model.eval()
    lengths = torch.as_tensor(model.tokenizer.lengths, device=device)
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for batch in batches:
        batch = batch.to(device)
        total += loss_per_byte(forward_loss(model, batch, dtype).loss, batch, lengths)
    model.train()
    if world is not None:
        total = parallel.sum_over_ranks(total, world)
    return float(total[0] / total[1].clamp(min=1))


def check_resume(ckpt_path: Path, recipe: Recipe, resume: bool, force: bool) -> dict | None:
    if not resume:
        if ckpt_path.exists():
            raise TrainingError(f"{ckpt_path} exists; pass --resume to continue it or choose another --out")
        return None
    if not ckpt_path.exists():
        raise TrainingError(f"--resume: no checkpoint at {ckpt_path}")
    state = load_state(ckpt_path)
    diffs = [d for d in recipe_differences(state["recipe"], recipe.to_dict()) if not d.startswith("training.steps")]
    if diffs and not force:
        raise TrainingError(
            "the recipe differs from the checkpoint's; pass --force to resume anyway:\n  " + "\n  ".join(diffs)
        )
    return state


def train(
    recipe: Recipe,
    out_dir: str | Path,
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
    sample: bool = True,
) -> dict:
    """Train ``recipe`` into ``out_dir`` (checkpoint.pt, metrics.jsonl, recipe.toml); returns final metrics.

    Run as one process, or under ``torchrun`` (every rank calls this; rank 0 writes).
    """
    spec = recipe.training
    world = parallel.init_world(spec.device)
    try:
        return _train(recipe, Path(out_dir), world, resume, force, progress, sample)
    finally:
        parallel.close_world(world)


def _train(recipe: Recipe, out: Path, world: World, resume: bool, force: bool, progress: bool, sample: bool) -> dict:
    recipe = with_auto_lengths(recipe)  # max_len = "auto" sized from the data
    spec = recipe.training
    ckpt_path = out / CHECKPOINT
    state = check_resume(ckpt_path, recipe, resume, force)
    if spec.threads:
        torch.set_num_threads(spec.threads)
    device = world.device
    torch.manual_seed(spec.seed)
    model = build_model(recipe)
    corpora = open_corpora(recipe, lambda make: from_rank0(make, world), progress and world.main)
    if model.tokenizer is None:
        model.tokenizer = run_tokenizer(corpora, state)
    summary = summarize(model)
    seq_len = recipe.model.seq_len
    budget = resolve_budget(
        spec.batch_size, spec.lr, spec.steps, seq_len, summary.train_flops_per_byte, world.size, summary.bytes_per_token
    )
    if budget.batch_size % world.size:
        raise TrainingError(f"training.batch_size = {budget.batch_size} does not split over {world.size} processes")
    local_rows = budget.batch_size // world.size
    if spec.micro_batch_size and local_rows % spec.micro_batch_size:
        raise TrainingError(
            f"training.micro_batch_size = {spec.micro_batch_size} does not divide the {local_rows} sequences "
            f"each of the {world.size} processes takes from training.batch_size = {budget.batch_size}"
        )
    if state is not None:
        model.load_state_dict(state["model"])
    model.to(device)
    set_activation_checkpointing(model, spec.activation_checkpointing)
    parallel.shard_model(model, world)
    optimizer = make_optimizer(model, spec, budget.lr)
    scheduler = make_scheduler(optimizer, spec)
    start_step = 0
    if state is not None:
        parallel.load_optimizer_state(model, optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        start_step = state["data"]["next_step"] if "data" in state else state["step"]
    dtype = autocast_dtype(spec, device)
    compiled = use_compile(spec, device)
    if compiled:
        compile_model(model, world)

    tokenizer = model.tokenizer
    if world.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "recipe.toml").write_text(dump_recipe(recipe), encoding="utf-8")
        if recipe.model.tokenizer is not None:
            (out / "tokenizer.json").write_text(tokenizer.to_json(), encoding="utf-8")
    data = open_training_data(
        corpora, recipe.data.valid_fraction, seq_len, model.lengths, len(model.splitters), budget.batch_size, spec.seed
    )
    valid = data.valid_batches(spec.eval_batches, world.rank, world.size)
    lengths = torch.as_tensor(tokenizer.lengths, device=device)
    flops_per_byte = summary.train_flops_per_byte
    bytes_per_step = budget.batch_size * seq_len * tokenizer.bytes_per_token
    metrics = MetricsWriter(out / "metrics.jsonl") if world.main else None
    board = open_tensorboard(out / "tensorboard") if (spec.tensorboard and world.main) else None
    bar = Progress(spec.steps, start_step, enabled=progress and world.main)
    bar.write(
        f"{recipe.name or 'recipe'}: {summary.params:,} parameters, {flops_per_byte / 1e6:.2f} MFLOPs/byte "
        f"(training), {world.size} x {device}, "
        f"{'bfloat16 autocast' if dtype else 'float32'}{', compiled' if compiled else ''}"
    )
    bar.write(budget.describe())
    bar.write(data.describe())

    def checkpoint(step: int) -> None:
        model_state, optim_state = parallel.full_state(model, optimizer)
        if world.main:
            save_atomic(
                {
                    "model": model_state,
                    "optimizer": optim_state,
                    "scheduler": scheduler.state_dict(),
                    "step": step,
                    "data": {"next_step": step, "seed": spec.seed, "world_size": world.size},
                    "recipe": recipe.to_dict(),
                    "rng": rng_state(),
                }
                | ({"tokenizer": tokenizer.to_json()} if recipe.model.tokenizer is not None else {}),
                ckpt_path,
            )
        parallel.barrier(world)

    model.train()
    step = start_step
    last: dict = {}
    batches = step_batches(data, start_step, spec.steps, world.rank, world.size, recipe.data.workers)
    started = time.perf_counter()
    try:
        while step < spec.steps:
            batch = next(batches).to(device)
            optimizer.zero_grad(set_to_none=True)
            output = forward_backward(model, batch, spec.micro_batch_size, dtype, lengths, world)
            loss = parallel.mean_over_ranks(output.loss, world)
            nats, n_bytes = parallel.sum_over_ranks(output.nats_bytes, world).tolist()
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"loss became {float(loss)} at step {step + 1}; stopping. The last good checkpoint "
                    f"({ckpt_path}) is kept; lower training.lr or training.grad_clip and --resume."
                )
            grad_norm = parallel.local_tensor(
                torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip or float("inf"))
            )
            if not torch.isfinite(grad_norm):
                raise TrainingError(
                    f"gradient norm became {float(grad_norm)} at step {step + 1}; stopping. The last good "
                    f"checkpoint ({ckpt_path}) is kept; lower training.lr and --resume."
                )
            optimizer.step()
            scheduler.step()
            step += 1
            loss_value = loss.item()
            truncated = [int(parallel.sum_over_ranks(t, world)) for t in output.truncated]
            elapsed = time.perf_counter() - started
            last = {
                "step": step,
                "loss": loss_value,
                "bpb": bits_per_byte(nats / max(n_bytes, 1.0)),
                "lr": optimizer.param_groups[0]["lr"] / optimizer.param_groups[0].get("lr_multiplier", 1.0),
                "grad_norm": float(grad_norm),
                "bytes": step * bytes_per_step,
                "flops": step * bytes_per_step * flops_per_byte,
                "bytes_per_s": (step - start_step) * bytes_per_step / max(elapsed, 1e-9),
                "truncated": truncated,
                **data.step_metrics(step - 1),
            }
            if output.aux_loss is not None:  # learned splitters: ratio loss and achieved bytes per chunk
                last["aux_loss"] = float(parallel.mean_over_ranks(output.aux_loss.detach(), world))
                last["bytes_per_chunk"] = [float(parallel.mean_over_ranks(b, world)) for b in output.bytes_per_chunk]
            if step % spec.eval_every == 0 or step == spec.steps:
                val = evaluate(model, valid, device, world, dtype)
                last["val_loss"], last["val_bpb"] = val, bits_per_byte(val)
            if metrics is not None:
                metrics.write(last)
            if board is not None:
                for key in ("loss", "bpb", "lr", "grad_norm", "bytes_per_s", "val_bpb"):
                    if key in last:
                        board.add_scalar(f"train/{key}", last[key], step)
            if any(truncated[: data.transitions]):
                raise TrainingError(
                    f"step {step}: the model dropped boundaries {truncated} (per stage transition) on training "
                    f"rows planned to fit every max_len; the data's boundary masks do not match the model's splitters"
                )
            if any(truncated):  # stages of learned splitters cannot be planned from the data
                bar.write(f"step {step}: truncated boundaries per stage transition: {truncated} (raise max_len)")
            shown = {"loss": loss_value, "bpb": last["bpb"], "bytes/s": f"{last['bytes_per_s']:,.0f}"}
            if "val_bpb" in last:
                shown["val_bpb"] = last["val_bpb"]
            bar.update(step, **shown)
            if step % spec.checkpoint_every == 0 or step == spec.steps:
                checkpoint(step)
    except KeyboardInterrupt:
        bar.close()
        checkpoint(step)
        if world.main:
            print(f"\ninterrupted: saved step {step} to {ckpt_path}; continue with --resume", flush=True)
        return last
    finally:
        bar.close()
        if board is not None:
            board.close()

    if sample and spec.sample_bytes > 0 and world.main:
        last["sample"] = sample_text(recipe, load_state(ckpt_path))
    return last


def run_tokenizer(corpora, state: dict | None):
    """The tokenizer the data was prepared with (when resuming, it must be the checkpoint's)."""
    prepared = shared_tokenizer(corpora)
    if state is not None and "tokenizer" in state and state["tokenizer"] != tokenizer_text(prepared):
        raise TrainingError(
            "the checkpoint's tokenizer differs from the one the data was prepared with; prepare the data with "
            "the run's tokenizer.json in the prepared directory, or train a new run"
        )
    return prepared


def sample_text(recipe: Recipe, state: dict) -> str:
    """A continuation of ``training.sample_prompt`` by an eager, unsharded copy of the trained model."""
    spec = recipe.training
    model = model_from_state(recipe, state)
    prompt = spec.sample_prompt.encode("utf-8")
    options = dict(temperature=0.8, top_k=40, seed=spec.seed)
    try:
        text = generate(model, [prompt], spec.sample_bytes, **options)[0]
    except NotImplementedError:  # a component without the incremental step API: recompute instead
        text = generate(model, [prompt], spec.sample_bytes, cached=False, **options)[0]
    return (prompt + text).decode("utf-8", errors="replace")


def load_run_recipe(run_dir: str | Path) -> Recipe:
    state = load_state(Path(run_dir) / CHECKPOINT)
    return recipe_from_dict(state["recipe"])


__all__ = ["TrainingError", "evaluate", "load_run_recipe", "train"]
