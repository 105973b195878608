"""The training loop: one process, any device. Data, model and optimizer come from the recipe."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from unetlm.api import build_model
from unetlm.data.packing import ByteData
from unetlm.data.sources import load_documents
from unetlm.model.generate import generate
from unetlm.model.summary import summarize
from unetlm.recipe import Recipe, dump_recipe, recipe_from_dict
from unetlm.train.checkpoint import CHECKPOINT, load_state, rng_state, save_atomic
from unetlm.train.metrics import MetricsWriter, bits_per_byte
from unetlm.train.optim import make_optimizer, make_scheduler
from unetlm.train.progress import Progress


class TrainingError(RuntimeError):
    pass


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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


@torch.no_grad()
def evaluate(model, batches, device) -> float:
    """Mean validation loss in nats per target token."""
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        batch = batch.to(device)
        out = model(batch.tokens, batch.doc, batch.masks, batch.targets)
        n = int((batch.targets != 257).sum())
        total += float(out.loss) * n
        count += n
    model.train()
    return total / max(count, 1)


def train(
    recipe: Recipe,
    out_dir: str | Path,
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
    sample: bool = True,
) -> dict:
    """Train ``recipe`` into ``out_dir`` (checkpoint.pt, metrics.jsonl, recipe.toml); returns final metrics."""
    out = Path(out_dir)
    spec = recipe.training
    ckpt_path = out / CHECKPOINT
    state = None
    if resume:
        if not ckpt_path.exists():
            raise TrainingError(f"--resume: no checkpoint at {ckpt_path}")
        state = load_state(ckpt_path)
        diffs = recipe_differences(state["recipe"], recipe.to_dict())
        diffs = [d for d in diffs if not d.startswith("training.steps")]
        if diffs and not force:
            raise TrainingError(
                "the recipe differs from the checkpoint's; pass --force to resume anyway:\n  " + "\n  ".join(diffs)
            )
    elif ckpt_path.exists():
        raise TrainingError(f"{ckpt_path} exists; pass --resume to continue it or choose another --out")

    if spec.threads:
        torch.set_num_threads(spec.threads)
    torch.manual_seed(spec.seed)
    device = pick_device(spec.device)
    model = build_model(recipe).to(device)
    optimizer = make_optimizer(model, spec)
    scheduler = make_scheduler(optimizer, spec)
    start_step = 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        start_step = state["step"]

    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.toml").write_text(dump_recipe(recipe), encoding="utf-8")
    data = ByteData.build(
        load_documents(recipe.data), model.splitters, recipe.model.seq_len, spec.batch_size,
        recipe.data.valid_fraction, spec.seed,
    )
    valid = data.valid_batches(spec.eval_batches)
    summary = summarize(model)
    flops_per_byte = summary.train_flops_per_byte
    bytes_per_step = spec.batch_size * recipe.model.seq_len
    metrics = MetricsWriter(out / "metrics.jsonl")
    bar = Progress(spec.steps, start_step, enabled=progress)
    bar.write(
        f"{recipe.name or 'recipe'}: {summary.params:,} parameters, {flops_per_byte / 1e6:.2f} MFLOPs/byte "
        f"(training), {len(data.train):,} training bytes, device {device}"
    )

    def checkpoint(step: int) -> None:
        save_atomic(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "step": step,
                "recipe": recipe.to_dict(),
                "rng": rng_state(),
            },
            ckpt_path,
        )

    model.train()
    step = start_step
    last = {}
    started = time.perf_counter()
    try:
        while step < spec.steps:
            batch = data.train_batch(step).to(device)
            output = model(batch.tokens, batch.doc, batch.masks, batch.targets)
            loss = output.loss
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"loss became {float(loss)} at step {step + 1}; stopping. The last good checkpoint "
                    f"({ckpt_path}) is kept; lower training.lr or training.grad_clip and --resume."
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip or float("inf"))
            optimizer.step()
            scheduler.step()
            step += 1
            loss_value = loss.item()
            truncated = [int(t.sum()) for t in output.truncated]
            elapsed = time.perf_counter() - started
            last = {
                "step": step,
                "loss": loss_value,
                "bpb": bits_per_byte(loss_value),
                "lr": optimizer.param_groups[0]["lr"],
                "grad_norm": float(grad_norm),
                "bytes": step * bytes_per_step,
                "flops": step * bytes_per_step * flops_per_byte,
                "bytes_per_s": (step - start_step) * bytes_per_step / max(elapsed, 1e-9),
                "truncated": truncated,
            }
            if step % spec.eval_every == 0 or step == spec.steps:
                val = evaluate(model, valid, device)
                last["val_loss"], last["val_bpb"] = val, bits_per_byte(val)
            metrics.write(last)
            if any(truncated):
                bar.write(f"step {step}: truncated boundaries per stage transition: {truncated} (raise max_len)")
            shown = {"loss": loss_value, "bpb": last["bpb"]}
            if "val_bpb" in last:
                shown["val_bpb"] = last["val_bpb"]
            bar.update(step, **shown)
            if step % spec.checkpoint_every == 0 or step == spec.steps:
                checkpoint(step)
    except KeyboardInterrupt:
        bar.close()
        checkpoint(step)
        print(f"\ninterrupted: saved step {step} to {ckpt_path}; continue with --resume", flush=True)
        return last
    finally:
        bar.close()

    if sample and spec.sample_bytes > 0:
        prompt = spec.sample_prompt.encode("utf-8")
        text = generate(model, prompt, spec.sample_bytes, temperature=0.8, top_k=40, seed=spec.seed)
        last["sample"] = (prompt + text).decode("utf-8", errors="replace")
    return last


def load_run_recipe(run_dir: str | Path) -> Recipe:
    state = load_state(Path(run_dir) / CHECKPOINT)
    return recipe_from_dict(state["recipe"])


__all__ = ["TrainingError", "evaluate", "load_run_recipe", "train"]
