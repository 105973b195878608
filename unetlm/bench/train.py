"""``unetlm bench train``: training bytes/s and model FLOP utilisation, eager and compiled.

MFU = (training FLOPs per byte x bytes/s) / matmul peak, the peak measured in the same run on the
same device (square matmuls, best of several trials), in bfloat16 (``mfu``) and float32
(``mfu_fp32``). A step is forward + backward + clipping + AdamW, as in training; the batches are
real packed data from the recipe's source. ``training.threads`` sets the torch threads, as in
training (``--set training.threads=1``). Peak memory: CUDA's max allocated, or on CPU the
process's peak resident set (which only grows, so later records include earlier ones).
"""
from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import attrs
import torch

from unetlm.api import build_model
from unetlm.data.windows import TrainingData
from unetlm.data.sources import load_documents
from unetlm.model.summary import summarize
from unetlm.recipe import load_recipe
from unetlm.train.loop import forward_loss
from unetlm.train.resolve import autocast_dtype
from unetlm.train.optim import make_optimizer
from unetlm.train.distributed import pick_device
from unetlm.train.parallelize import compile_blocks
from unetlm.train.scaling import resolve_budget

BENCH_DATA_BYTES = 400_000


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int | None = None, trials: int = 5) -> float:
    """Best achieved FLOP/s of an n x n matmul (n = 4096 on CUDA, 1024 on CPU)."""
    n = n or (4096 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    reps = 20 if device.type == "cuda" else 3
    torch.mm(a, b)
    best = 0.0
    for _ in range(trials):
        _sync(device)
        start = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b)
        _sync(device)
        best = max(best, 2.0 * n**3 * reps / (time.perf_counter() - start))
    return best


def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def bench_recipe(recipe, mode: str, steps: int, warmup: int, device: torch.device, peaks: dict) -> dict:
    spec = recipe.training
    torch.manual_seed(spec.seed)
    model = build_model(recipe).to(device)
    flops_per_byte = summarize(model).train_flops_per_byte
    budget = resolve_budget(spec.batch_size, spec.lr, spec.steps, recipe.model.seq_len, flops_per_byte)
    docs = load_documents(attrs.evolve(recipe.data, max_bytes=recipe.data.max_bytes or BENCH_DATA_BYTES))
    limits = model.lengths[1 : 1 + len(model.splitters)]
    data = TrainingData.from_documents(
        docs, model.splitters, limits, recipe.model.seq_len, budget.batch_size, 0.1, spec.seed
    )
    optimizer = make_optimizer(model, spec, budget.lr)
    if mode == "compiled":
        compile_blocks(model)
    dtype = autocast_dtype(spec, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    batches = [data.train_batch(s).to(device) for s in range(warmup + steps)]

    def step(batch) -> None:
        loss = forward_loss(model, batch, dtype).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip or float("inf"))
        optimizer.step()

    for batch in batches[:warmup]:
        step(batch)
    _sync(device)
    start = time.perf_counter()
    for batch in batches[warmup:]:
        step(batch)
    _sync(device)
    elapsed = time.perf_counter() - start
    bytes_per_s = steps * budget.batch_size * recipe.model.seq_len / elapsed
    flops_per_s = bytes_per_s * flops_per_byte
    return {
        "recipe": recipe.name,
        "mode": mode,
        "device": str(device),
        "dtype": "bfloat16" if dtype else "float32",
        "params": sum(p.numel() for p in model.parameters()),
        "batch_size": budget.batch_size,
        "seq_len": recipe.model.seq_len,
        "steps": steps,
        "threads": torch.get_num_threads(),
        "bytes_per_s": bytes_per_s,
        "flops_per_byte": flops_per_byte,
        "flops_per_s": flops_per_s,
        "mfu": flops_per_s / peaks["bfloat16"],
        "mfu_fp32": flops_per_s / peaks["float32"],
        "peak_bf16_flops": peaks["bfloat16"],
        "peak_fp32_flops": peaks["float32"],
        "peak_mem_bytes": peak_memory(device),
    }


def bench_train(
    recipes: list[str | Path],
    json_out: str | Path | None = None,
    modes: tuple[str, ...] = ("eager", "compiled"),
    steps: int = 10,
    warmup: int = 2,
    overrides: list[str] | tuple[str, ...] = (),
    device: str = "auto",
) -> list[dict]:
    """One record per (recipe, mode); written as a JSON list to ``json_out`` when given."""
    loaded = [load_recipe(r, overrides) for r in recipes]
    threads = {r.training.threads for r in loaded if r.training.threads}
    if len(threads) > 1:
        raise ValueError(f"the recipes set different training.threads {sorted(threads)}; set one with --set")
    if threads:  # as in training; otherwise torch's default (OMP_NUM_THREADS, else every core)
        torch.set_num_threads(threads.pop())
    dev = pick_device(device)
    peaks = {name: matmul_peak(dev, dt) for name, dt in (("bfloat16", torch.bfloat16), ("float32", torch.float32))}
    records = []
    for recipe in loaded:
        for mode in modes:
            records.append(bench_recipe(recipe, mode, steps, warmup, dev, peaks))
            if json_out is not None:
                Path(json_out).write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
    return records


def format_table(records: list[dict]) -> str:
    lines = [f"{'recipe':<14}{'mode':<10}{'params':>10}{'bytes/s':>12}{'MFLOP/byte':>12}{'GFLOP/s':>10}"
             f"{'MFU bf16':>10}{'MFU fp32':>10}{'peak MiB':>10}"]
    for r in records:
        lines.append(
            f"{r['recipe']:<14}{r['mode']:<10}{r['params']:>10,}{r['bytes_per_s']:>12,.0f}"
            f"{r['flops_per_byte'] / 1e6:>12.2f}{r['flops_per_s'] / 1e9:>10.2f}{r['mfu']:>10.1%}"
            f"{r['mfu_fp32']:>10.1%}{r['peak_mem_bytes'] / 2**20:>10.0f}"
        )
    if records:
        r = records[0]
        lines.append(f"matmul peak on {r['device']}: bf16 {r['peak_bf16_flops'] / 1e9:.1f} GFLOP/s, "
                     f"fp32 {r['peak_fp32_flops'] / 1e9:.1f} GFLOP/s")
    return "\n".join(lines)
