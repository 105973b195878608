"""``unetlm bench generate``: generation bytes/s and peak memory, cached vs recompute.

For each context length and recipe, one model (randomly initialised, seed 0, or a checkpoint)
reads ``context`` bytes of text, then produces ``repeats`` x ``new_bytes`` more: per byte the
logits, one sampling step and the next byte, in each mode, measured side by side. The text is
CPython's help topics (the tiny recipes' training data), and the byte fed next is the text's
own (teacher forcing), so the deep stages fire as often as on real text even with an untrained
model. ``bytes_per_s`` is the best of the ``repeats`` runs of ``new_bytes`` steps (the machine
may be shared); the cached mode's reading of the context is ``prefill_bytes_per_s``.
``stage_firing_rates``: the fraction of the timed steps on which each stage ran.

A recipe's ``seq_len`` is raised to fit the context and the new bytes when shorter, every
stage's ``max_len`` in proportion. ``match_flops_of`` names a recipe whose training FLOPs per
byte every one-stage recipe is matched to (its depth changed): the AU-Net vs byte-transformer
comparison at equal compute. Each measurement runs in a fresh process (``threads`` torch
threads); ``peak_mem_bytes`` is how far its peak resident set rose above the resident set it
had before generation began (the model loaded; the cached mode's caches and prefill included).
"""
from __future__ import annotations

import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

NEW_BYTES = 64


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _peak_rss_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def bench_text(n: int) -> bytes:
    """``n`` bytes of CPython's help topics, joined into one document."""
    from unetlm.data.sources import pydocs_documents

    out = bytearray()
    for doc in pydocs_documents():
        out += doc + b"\n\n"
        if len(out) >= n:
            break
    while len(out) < n:
        out += out
    return bytes(out[:n])


def scaled_overrides(recipe, seq_len: int) -> list[str]:
    """Overrides giving ``recipe`` at least ``seq_len`` bytes per row, stages scaled alike."""
    old = recipe.model.seq_len
    if seq_len <= old:
        return []
    out = [f"model.seq_len={seq_len}", f"model.stages[0].max_len={seq_len}"]
    for i, stage in enumerate(recipe.model.stages[1:], start=1):
        out.append(f"model.stages[{i}].max_len={min(seq_len, math.ceil(stage.max_len * seq_len / old))}")
    return out


def matched_depth(recipe, target_flops: float) -> int:
    """Layers of one-stage ``recipe`` whose training FLOPs per byte come nearest ``target_flops``."""
    from unetlm.api import build_model
    from unetlm.model.summary import summarize

    def flops(layers: int) -> float:
        spec = recipe.model
        stage = spec.stages[0]
        old, stage.layers = stage.layers, layers
        try:
            return summarize(build_model(spec)).train_flops_per_byte
        finally:
            stage.layers = old

    per_layer = flops(2) - flops(1)
    guess = max(1, round((target_flops - (flops(1) - per_layer)) / per_layer))
    return min((max(1, guess + d) for d in (-1, 0, 1)), key=lambda n: abs(flops(n) - target_flops))


def _load(task: dict):
    from unetlm.api import build_model, load_checkpoint
    from unetlm.recipe import load_recipe

    import torch

    if task["checkpoint"]:
        model, recipe = load_checkpoint(task["checkpoint"])
        return model, recipe
    recipe = load_recipe(task["recipe"], task["overrides"])
    torch.manual_seed(0)
    return build_model(recipe).eval(), recipe


def _measure(task: dict) -> dict:
    """One (recipe, context, mode) measurement; runs in its own process."""
    import torch

    from unetlm.model.cascade import Cascade, stage_counts
    from unetlm.model.generate import sample_next
    from unetlm.model.summary import summarize
    from unetlm.core.tokens import encode

    torch.set_num_threads(task["threads"])
    model, recipe = _load(task)
    context, new, repeats = task["context"], task["new_bytes"], task["repeats"]
    tokens = encode(bench_text(context + new * repeats - 1))  # BOS + context - 1 bytes, then the new ones
    timed = [range(context + r * new, context + (r + 1) * new) for r in range(repeats)]
    generator = torch.Generator().manual_seed(0)
    seq_len = model.spec.seq_len
    record = {
        "recipe": task["name"],
        "mode": task["mode"],
        "context": context,
        "new_bytes": new,
        "repeats": repeats,
        "seq_len": seq_len,
        "layers": [s.layers for s in model.spec.stages],
        "params": sum(p.numel() for p in model.parameters()),
        "train_flops_per_byte": summarize(model).train_flops_per_byte,
        "threads": task["threads"],
    }
    times = []
    with torch.no_grad():
        base = _rss_bytes()
        if task["mode"] == "cached":
            cascade = Cascade(model, 1)
            start = time.perf_counter()
            for t in tokens[:context].tolist():
                logits = cascade.step([t])
            record["prefill_bytes_per_s"] = context / (time.perf_counter() - start)
            ran, steps = cascade.ran.copy(), cascade.row_steps
            for span in timed:
                start = time.perf_counter()
                for t in tokens[span.start : span.stop].tolist():
                    sample_next(logits, 1.0, 0, 1.0, generator)
                    logits = cascade.step([t])
                times.append(time.perf_counter() - start)
            rates = [(a - b) / (cascade.row_steps - steps) for a, b in zip(cascade.ran.tolist(), ran.tolist())]
        else:
            for span in timed:
                start = time.perf_counter()
                for end in span:
                    logits = model(tokens[max(0, end - seq_len) : end][None]).logits[:, -1]
                    sample_next(logits, 1.0, 0, 1.0, generator)
                times.append(time.perf_counter() - start)
            after, before = stage_counts(model, tokens[: timed[-1].stop]), stage_counts(model, tokens[:context])
            rates = [(a - b) / (new * repeats) for a, b in zip(after, before)]
    peak = _peak_rss_bytes()
    record.update(
        bytes_per_s=new / min(times),
        bytes_per_s_each=[new / t for t in times],
        peak_mem_bytes=max(0, peak - base),
        peak_rss_bytes=peak,
        stage_firing_rates=rates,
    )
    return record


_CHILD = (
    "import json, sys; from unetlm.bench.generate import _measure; "
    "print(json.dumps(_measure(json.loads(sys.argv[1]))))"
)


def _run(task: dict) -> dict:
    """:func:`_measure` in a fresh Python process (its own peak resident set)."""
    done = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(task)], capture_output=True, text=True)
    if done.returncode != 0:
        where = f"{task['name']} ({task['mode']}, context {task['context']})"
        raise RuntimeError(f"measuring {where} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _recipe_task(path: str, context: int, new_bytes: int, match_flops_of: str | None) -> dict:
    """Name and overrides of a recipe measured at ``context`` followed by ``new_bytes``."""
    from unetlm.api import build_model
    from unetlm.model.summary import summarize
    from unetlm.recipe import load_recipe

    recipe = load_recipe(path)
    name, overrides = Path(path).stem, scaled_overrides(recipe, context + new_bytes)
    if match_flops_of and len(recipe.model.stages) == 1:
        target = load_recipe(match_flops_of)
        target = load_recipe(match_flops_of, scaled_overrides(target, context + new_bytes))
        layers = matched_depth(load_recipe(path, overrides), summarize(build_model(target.model)).train_flops_per_byte)
        overrides.append(f"model.stages[0].layers={layers}")
        name = f"{name} ({layers} layers, FLOPs of {Path(match_flops_of).stem})"
    return {"recipe": path, "overrides": overrides, "name": name}


def bench_generate(
    recipes: list[str],
    contexts: list[int],
    json_out: str,
    checkpoint: str | None = None,
    new_bytes: int = NEW_BYTES,
    repeats: int = 3,
    threads: int = 1,
    match_flops_of: str | None = None,
    modes: tuple[str, ...] = ("cached", "recompute"),
    progress=print,
) -> list[dict]:
    """Measure every recipe (or the checkpoint) at every context in each mode (``cached``,
    ``recompute``), context by context so that compared records are taken close in time;
    write the records as a JSON list to ``json_out`` and return them."""
    records = []
    for context in contexts:
        if checkpoint:
            if context + new_bytes * repeats > load_checkpoint_seq_len(checkpoint):
                progress(f"skip context {context}: the checkpoint's seq_len is below {context + new_bytes * repeats}")
                continue
            tasks = [{"recipe": None, "overrides": [], "name": Path(checkpoint).resolve().name or "checkpoint"}]
        else:
            tasks = [_recipe_task(path, context, new_bytes * repeats, match_flops_of) for path in recipes]
        for task in tasks:
            for mode in modes:
                record = _run({**task, "checkpoint": checkpoint, "context": context, "new_bytes": new_bytes,
                               "repeats": repeats, "threads": threads, "mode": mode})
                records.append(record)
                rates = [round(r, 3) for r in record["stage_firing_rates"]]
                progress(
                    f"{record['recipe']:<40} {mode:<9} context {context:>5}: {record['bytes_per_s']:9.1f} bytes/s, "
                    f"peak +{record['peak_mem_bytes'] / 2**20:.1f} MiB, stages fire {rates}"
                )
    Path(json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(json_out).write_text(json.dumps(records, indent=1))
    return records


def load_checkpoint_seq_len(checkpoint: str) -> int:
    from unetlm.api import load_checkpoint

    model, _ = load_checkpoint(checkpoint)
    return model.spec.seq_len


def markdown_table(records: list[dict]) -> str:
    """The records as a Markdown table, cached and recompute side by side ("-" where not run)."""
    rows: dict = {}
    for r in records:
        rows.setdefault((r["recipe"], r["context"]), {})[r["mode"]] = r
    lines = [
        "| recipe | context | train MFLOPs/byte | cached bytes/s | recompute bytes/s | speed-up "
        "| cached peak +MiB | recompute peak +MiB | stage firing rates |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for (recipe, context), modes in rows.items():
        c, r = modes.get("cached"), modes.get("recompute")
        any_ = c or r
        speed = f"{c['bytes_per_s'] / r['bytes_per_s']:.0f}x" if c and r else "-"
        lines.append(
            f"| {recipe} | {context} | {any_['train_flops_per_byte'] / 1e6:.2f} | "
            + (f"{c['bytes_per_s']:.0f}" if c else "-") + " | "
            + (f"{r['bytes_per_s']:.1f}" if r else "-") + f" | {speed} | "
            + (f"{c['peak_mem_bytes'] / 2**20:.1f}" if c else "-") + " | "
            + (f"{r['peak_mem_bytes'] / 2**20:.1f}" if r else "-") + " | "
            + ", ".join(f"{x:.3f}" for x in any_["stage_firing_rates"]) + " |"
        )
    return "\n".join(lines)
