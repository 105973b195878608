"""``unetlm compare``: train recipes for one FLOP budget on the same data, then evaluate them alike.

Every recipe gets the same data (``--data``) and trains for as many steps as its static
training FLOPs per step allow within the budget (FLOPs per step = training FLOPs per
position x positions per step, so a tokenized model needs no tokenizer to be planned). Each
run is then scored on the same held-out text (the data's last ``valid_fraction`` of bytes,
never trained on) in bits per byte with a 95% bootstrap interval, and checked twice for
leaks of the future: bits per byte under the sanity floor are flagged, and the trained model
is probed directly (changing later tokens must not change earlier logits).

Layout of ``OUT``: ``runs/NAME/`` one training run per recipe (an unfinished one resumes, a
finished one is not trained again) with its ``compare.json`` (kept until the run changes);
``results.json``, ``results.md`` and ``bpb-vs-flops.png`` for the whole comparison.
"""
from __future__ import annotations

import hashlib
import json
import lzma
import math
from pathlib import Path

import attrs
import torch

from unetlm.api import build_model, load_checkpoint
from unetlm.checkpoint.sharded import read_train_state
from unetlm.checkpoint.store import latest
from unetlm.data.packing import held_out_text, text_prefix, training_text
from unetlm.data.sources import load_documents
from unetlm.eval.bpb import text_bpb
from unetlm.eval.report import comparison_markdown
from unetlm.model.summary import summarize
from unetlm.core.tokens import BOS
from unetlm.recipe import Recipe, load_recipe
from unetlm.recipe.schema import DataSpec
from unetlm.train.errors import TrainingError

# SpaceByte (Slagle, 2024), Table 1: PG-19 bits per byte at 1e19 training FLOPs.
PUBLISHED = {
    "subword transformer": 0.989,
    "SpaceByte": 1.009,
    "MegaByte": 1.083,
    "window-attention transformer": 1.089,
    "byte transformer": 1.138,
}
COUNTERPARTS = {"bpe": "subword transformer", "spacebyte": "SpaceByte", "megabyte": "MegaByte",
                "window": "window-attention transformer", "au1": "byte transformer"}
FLOOR_FACTOR = 0.5  # flag bits/byte below half of xz's conditional rate on the held-out text


@attrs.define
class Entry:
    """One recipe of a comparison, planned for the budget."""

    name: str
    path: str
    recipe: Recipe
    flops_per_step: float

    @property
    def steps(self) -> int:
        return self.recipe.training.steps


def run_name(path: str | Path, taken: set[str]) -> str:
    path = Path(path)
    name = path.stem if path.stem not in taken else f"{path.parent.name}-{path.stem}"
    taken.add(name)
    return name


def plan(paths: list[str], budget: float, data: DataSpec, overrides: list[str] = ()) -> list[Entry]:
    """The recipes with ``data`` and the step count that spends at most ``budget`` FLOPs each."""
    if not budget > 0:
        raise ValueError(f"--flops must be positive (got {budget})")
    entries, taken = [], set()
    for path in paths:
        recipe = attrs.evolve(load_recipe(path, overrides), data=data)
        spec = recipe.training
        if spec.batch_size == "auto":
            raise ValueError(f"{path}: training.batch_size = 'auto' depends on the step count; set a number")
        with torch.device("meta"):
            per_position = summarize(build_model(recipe)).train_flops_per_token
        per_step = per_position * recipe.model.seq_len * spec.batch_size
        steps = int(budget // per_step)
        if steps < 1:
            raise ValueError(f"{path}: one training step costs {per_step:.3g} FLOPs, more than --flops {budget:.3g}")
        training = attrs.evolve(
            spec, steps=steps, eval_every=max(1, steps // 8), checkpoint_every=max(1, steps // 4), sample_bytes=0
        )
        entries.append(Entry(run_name(path, taken), str(path), attrs.evolve(recipe, training=training), per_step))
    return entries


def xz_rate(context: bytes, text: bytes) -> float:
    """Bits per byte xz needs for ``text`` after having read ``context`` (extreme preset 9)."""
    size = lambda data: len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME))  # noqa: E731
    return 8.0 * (size(context + text) - size(context)) / max(len(text), 1)


def probe_causality(model, tokens: list[int], at: int) -> bool:
    """True if logits before position ``at`` stay put when every token from ``at`` on changes."""
    x = torch.tensor([tokens])
    y = x.clone()
    y[0, at:] = (x[0, at:] + 1) % 256  # other bytes (and byte ids of a tokenized model)
    with torch.no_grad():
        a, b = model(x).logits[0, :at], model(y).logits[0, :at]
    return bool(torch.allclose(a, b, atol=1e-4, rtol=1e-4))


def saved_step(run_dir: Path) -> int | None:
    """The step of the run's newest valid checkpoint; None if it has none."""
    found = latest(run_dir, read_train_state)
    return None if found is None else found[1]["step"]


def finished(run_dir: Path, steps: int) -> bool:
    return (saved_step(run_dir) or 0) >= steps


def evaluate_run(entry: Entry, run_dir: Path, held: list[bytes], floor: float, cute_items: int,
                 choice_files: list[str], seed: int) -> dict:
    from unetlm.eval.choice import evaluate_choice
    from unetlm.eval.cute import TASKS, evaluate_cute, make_items, words_in
    from unetlm.train.plot import run_curves

    model, _ = load_checkpoint(run_dir)
    summary = summarize(model)
    row = text_bpb(model, "held-out", held, seed=seed)
    window = [BOS, *model.tokenizer.encode(b"".join(held)[: 4 * model.spec.seq_len]).tolist()][: model.spec.seq_len]
    last = run_curves(run_dir)[-1]
    tasks = {}
    if cute_items:
        words = words_in(b"".join(held).decode("utf-8", errors="replace"))
        items = [it for task in TASKS for it in make_items(task, words, cute_items, seed)]
        tasks |= {r.name: (r.exact_match, list(r.ci)) for r in evaluate_cute(model, items, seed=seed)}
    for path in choice_files:
        r = evaluate_choice(model, path, seed=seed)
        tasks[Path(path).stem] = (r.accuracy, list(r.ci))
    return {
        "name": entry.name,
        "recipe": entry.path,
        "params": summary.params,
        "flops_per_byte": summary.train_flops_per_byte,
        "bytes_per_token": summary.bytes_per_token,
        "steps": entry.steps,
        "bytes_seen": last["bytes"],
        "flops": last["flops"],
        "bpb": row.bits_per_byte,
        "ci": list(row.ci),
        "eval_bytes": row.bytes,
        "truncated": row.truncated,
        "below_floor": row.bits_per_byte < floor,
        "causal": probe_causality(model, window, len(window) // 2),
        "tasks": tasks,
        "published": COUNTERPARTS.get(entry.name),
    }


def data_key(documents: list[bytes]) -> str:
    digest = hashlib.sha256()
    for d in documents:
        digest.update(len(d).to_bytes(8, "little") + d)
    return digest.hexdigest()[:16]


def sanity_floor(out: Path, documents: list[bytes], held: list[bytes], valid_fraction: float) -> dict:
    """``FLOOR_FACTOR`` x xz's rate on the held-out text given the training text (cached in OUT/floor.json)."""
    key = data_key(held) + f"-{FLOOR_FACTOR}"
    path = out / "floor.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            return saved
    rate = xz_rate(b"".join(training_text(documents, valid_fraction)), b"".join(held))
    saved = {"key": key, "xz_bits_per_byte": rate, "factor": FLOOR_FACTOR, "floor": FLOOR_FACTOR * rate}
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(saved, indent=1) + "\n")
    return saved


def compare(
    paths: list[str],
    budget: float,
    out: str | Path,
    data: DataSpec = DataSpec(),
    overrides: list[str] = (),
    eval_bytes: int = 200_000,
    cute_items: int = 0,
    choice_files: list[str] = (),
    progress: bool = True,
    seed: int = 0,
) -> dict:
    """Train (or resume, or skip) and evaluate every recipe; writes and returns the results."""
    from unetlm.train.loop import train
    from unetlm.train.plot import plot_runs

    out = Path(out)
    entries = plan(paths, budget, data, overrides)
    documents = load_documents(data)
    held = held_out_text(documents, data.valid_fraction)
    held = [d for d in (text_prefix(held, eval_bytes) if eval_bytes else held) if d]
    floor = sanity_floor(out, documents, held, data.valid_fraction)
    settings = {"flops": budget, "data": attrs.asdict(data), "overrides": list(overrides), "eval_bytes": eval_bytes,
                "cute_items": cute_items, "choice": list(choice_files), "seed": seed}
    rows = []
    for entry in entries:
        run_dir = out / "runs" / entry.name
        if progress:
            print(f"== {entry.name} ({entry.path}): {entry.steps} steps of {entry.flops_per_step:.3g} FLOPs", flush=True)
        if not finished(run_dir, entry.steps):
            train(entry.recipe, run_dir, resume=saved_step(run_dir) is not None, force=True, progress=progress,
                  sample=False)
            if not finished(run_dir, entry.steps):  # Ctrl-C: the run saved its checkpoint and returned
                raise TrainingError(f"{entry.name} was interrupted; run the same command again to continue")
        cached = run_dir / "compare.json"
        stamp = {"settings": settings, "floor": floor["floor"], "step": saved_step(run_dir)}
        result = json.loads(cached.read_text()) if cached.is_file() else None
        if result is None or result.get("stamp") != json.loads(json.dumps(stamp)):
            result = evaluate_run(entry, run_dir, held, floor["floor"], cute_items, list(choice_files), seed)
            result["stamp"] = stamp
            cached.write_text(json.dumps(result, indent=1) + "\n")
        rows.append(result)
    try:
        plot = plot_runs([out / "runs" / e.name for e in entries], out / "bpb-vs-flops.png").name
    except ImportError as exc:  # the comparison stands without its figure
        plot = None
        if progress:
            print(f"no plot: {exc}", flush=True)
    results = {"settings": settings, "floor": floor, "rows": rows, "ordering": published_ordering(rows), "plot": plot}
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.md").write_text(comparison_markdown(results) + "\n")
    return results


def published_ordering(rows: list[dict]) -> dict:
    """Our order of the recipes with a published counterpart, against the published order."""
    ours = sorted((r for r in rows if r["published"]), key=lambda r: r["bpb"])
    theirs = sorted((r for r in ours), key=lambda r: PUBLISHED[r["published"]])
    flipped = []
    for i, a in enumerate(theirs):
        for b in theirs[i + 1 :]:
            if a["bpb"] > b["bpb"]:  # published: a better than b; here: worse
                overlap = a["ci"][0] <= b["ci"][1]
                flipped.append({"better_published": a["name"], "better_here": b["name"], "cis_overlap": overlap})
    return {"ours": [r["name"] for r in ours], "published": [r["name"] for r in theirs], "flipped": flipped,
            "holds": not flipped and len(ours) > 1,
            "published_bpb": {r["published"]: PUBLISHED[r["published"]] for r in ours}}


def parse_flops(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"--flops {text!r}: expected a positive number such as 2e12")
    return value


def data_spec(sources: list[str], max_bytes: int, valid_fraction: float) -> DataSpec:
    """``pydocs`` or file paths/globs (each file one document)."""
    if not sources or sources == ["pydocs"]:
        return DataSpec(source="pydocs", max_bytes=max_bytes, valid_fraction=valid_fraction)
    if "pydocs" in sources:
        raise ValueError("--data pydocs cannot be mixed with files")
    return DataSpec(source="files", paths=list(sources), max_bytes=max_bytes, valid_fraction=valid_fraction)


__all__ = ["compare", "data_spec", "parse_flops", "plan", "PUBLISHED"]
