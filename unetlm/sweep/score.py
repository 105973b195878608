"""Every finished run scored alike on the same held-out text, with two checks against leaks.

The held-out text is the runs' data's last ``valid_fraction`` of bytes (never trained on), cut to
``eval_bytes``. A run's bits per byte come with a 95% bootstrap interval over blocks of that text
(:func:`unetlm.eval.bpb.block_scores`; its per-block bits are kept for paired differences). The
checks: bits per byte under the sanity floor (half of xz's conditional rate) are flagged, and the
trained model is probed directly (changing later tokens must not change earlier logits). Scores
are cached in ``RUN_DIR/scores.json`` until the settings or the run's checkpoint change.
"""
from __future__ import annotations

import hashlib
import json
import lzma
from pathlib import Path

import torch

from unetlm.checkpoint.trained import load_trained
from unetlm.core.errors import RunError
from unetlm.core.tokens import BOS
from unetlm.data.packing import held_out_text, text_prefix, training_text
from unetlm.data.sources import load_documents
from unetlm.eval.bpb import block_scores
from unetlm.model.summary import summarize
from unetlm.recipe.schema import DataSpec
from unetlm.recipe.structure import structure
from unetlm.sweep.directory import SweepDir
from unetlm.sweep.expand import Run
from unetlm.train.progress import Progress

FLOOR_FACTOR = 0.5  # flag bits/byte below half of xz's conditional rate on the held-out text


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


def data_key(documents: list[bytes]) -> str:
    digest = hashlib.sha256()
    for d in documents:
        digest.update(len(d).to_bytes(8, "little") + d)
    return digest.hexdigest()[:16]


class HeldOut:
    """The held-out documents every run is scored on, and the sanity floor on them."""

    def __init__(self, sweep: SweepDir, progress: bool = True) -> None:
        data = structure(DataSpec, sweep.data, "data")
        if data.prepared_dirs and data.source == "pydocs":
            raise RunError(
                f"data.prepared = {data.prepared!r}: the report scores the held-out part of the data's sources; set "
                f"data.source and data.paths to the text the prepared directories were made from"
            )
        report = sweep.spec.report
        if progress:
            print("reading the data's held-out text", flush=True)
        documents = load_documents(data)
        held = held_out_text(documents, data.valid_fraction)
        self.documents = [d for d in (text_prefix(held, report.eval_bytes) if report.eval_bytes else held) if d]
        if not self.documents:
            raise ValueError(f"data.valid_fraction = {data.valid_fraction}: the data holds no held-out text to score")
        self.floor = self._floor(sweep.root, documents, data.valid_fraction, progress)

    def _floor(self, out: Path, documents: list[bytes], valid_fraction: float, progress: bool) -> dict:
        """``FLOOR_FACTOR`` x xz's rate on the held-out text given the training text (cached in OUT/floor.json)."""
        key = data_key(self.documents) + f"-{FLOOR_FACTOR}"
        path = out / "floor.json"
        if path.is_file():
            saved = json.loads(path.read_text())
            if saved.get("key") == key:
                return saved
        if progress:
            print("measuring the sanity floor (xz on the training text, then the held-out text)", flush=True)
        rate = xz_rate(b"".join(training_text(documents, valid_fraction)), b"".join(self.documents))
        saved = {"key": key, "xz_bits_per_byte": rate, "factor": FLOOR_FACTOR, "floor": FLOOR_FACTOR * rate}
        path.write_text(json.dumps(saved, indent=1) + "\n")
        return saved


def score_run(sweep: SweepDir, run: Run, held: HeldOut, progress: bool = True) -> dict:
    """The run's scores (cached in RUN_DIR/scores.json while the settings and its checkpoint stay)."""
    report = sweep.spec.report
    run_dir = sweep.run_dir(run.name)
    cached = run_dir / "scores.json"
    stamp = json.loads(json.dumps({"report": sweep.spec.to_dict()["report"], "data": sweep.data,
                                   "floor": held.floor["floor"], "step": sweep.saved_step(run.name)}))
    if cached.is_file():
        result = json.loads(cached.read_text())
        if result.get("stamp") == stamp:
            return result
    result = evaluate_run(sweep, run, held, report, progress) | {"stamp": stamp}
    cached.write_text(json.dumps(result) + "\n")
    return result


def evaluate_run(sweep: SweepDir, run: Run, held: HeldOut, report, progress: bool) -> dict:
    from unetlm.eval.choice import evaluate_choice
    from unetlm.eval.cute import TASKS, evaluate_cute, make_items, words_in

    run_dir = sweep.run_dir(run.name)
    model, _ = load_trained(run_dir)
    summary = summarize(model)
    bar = None

    def show(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = Progress(total, enabled=progress, unit="row", desc=f"scoring {run.name}", log_every=max(1, total // 4))
        bar.update(done)

    try:
        scores = block_scores(model, held.documents, report.block_bytes, seed=report.seed, progress=show)
    finally:
        if bar is not None:
            bar.close()
    text = b"".join(held.documents)
    window = [BOS, *model.tokenizer.encode(text[: 4 * model.spec.seq_len]).tolist()][: model.spec.seq_len]
    tasks = {}
    if report.cute_items:
        words = words_in(text.decode("utf-8", errors="replace"))
        items = [it for task in TASKS for it in make_items(task, words, report.cute_items, report.seed)]
        tasks |= {r.name: (r.exact_match, list(r.ci)) for r in evaluate_cute(model, items, seed=report.seed)}
    for path in report.choice:
        r = evaluate_choice(model, path, seed=report.seed)
        tasks[Path(path).stem] = (r.accuracy, list(r.ci))
    last = sweep.metrics(run.name)[-1]
    return {
        "name": run.name,
        "recipe": run.recipe_path,
        "labels": run.labels,
        "config": run.config,
        "seed": run.seed,
        "budget": run.budget,
        "params": summary.params,
        "flops_per_byte": summary.train_flops_per_byte,
        "bytes_per_token": summary.bytes_per_token,
        "steps": run.steps,
        "bytes_seen": last["bytes"],
        "flops": last["flops"],
        "bpb": scores.bits_per_byte,
        "ci": list(scores.ci),
        "eval_bytes": scores.bytes,
        "truncated": scores.truncated,
        "below_floor": scores.bits_per_byte < held.floor["floor"],
        "causal": probe_causality(model, window, len(window) // 2),
        "tasks": tasks,
        "block_bits": scores.bits.tolist(),
        "block_bytes": scores.block_bytes.tolist(),
    }
