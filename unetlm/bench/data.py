"""``unetlm bench data``: prepare throughput, loader bytes/s and the training process's peak memory.

A corpus of ``corpus_bytes`` document bytes is written to disk as jsonl (CPython's help topics,
repeated; real text with real boundaries), prepared for the recipe with each ``workers`` count
(bytes/s: document bytes over wall time), then a fresh process (so its peak resident set is the
training's own) opens the prepared data, times :meth:`TrainingData.train_batch` (``loader_bytes_per_s``:
non-PAD target bytes per second, one process, no loader workers; ``data_peak_rss_bytes``: the
peak so far) and trains ``steps`` steps on it (``peak_rss_bytes``: the whole process's peak).
"""
from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LOADER_STEPS = 50


def write_corpus(path: Path, n_bytes: int) -> int:
    """Write jsonl documents until they hold ``n_bytes`` bytes of text; returns the bytes written."""
    from unetlm.data.sources import pydocs_documents

    docs = [d for d in pydocs_documents() if d]
    lines = [(json.dumps({"text": d.decode("utf-8")}) + "\n").encode("utf-8") for d in docs]
    total = 0
    with open(path, "wb") as f:
        while total < n_bytes:
            for doc, line in zip(docs, lines):
                f.write(line)
                total += len(doc)
                if total >= n_bytes:
                    break
    return total


def probe(recipe_file: str, data_dir: str, steps: int) -> dict:
    """Run in a fresh process: loader bytes/s over the prepared data, a short training run, peak RSS."""
    import torch

    from unetlm.api import build_model
    from unetlm.core.tokens import PAD
    from unetlm.data.corpora import open_corpora, open_training_data
    from unetlm.recipe import load_recipe
    from unetlm.train.loop import train

    recipe = load_recipe(recipe_file, [f"data.prepared='{data_dir}'", f"training.steps={steps}"])
    model = build_model(recipe)
    started = time.perf_counter()
    corpora = open_corpora(recipe, progress=False)
    spec = recipe.training
    batch = spec.batch_size if isinstance(spec.batch_size, int) else 8
    data = open_training_data(corpora, recipe.data.valid_fraction, recipe.model.seq_len, model.lengths,
                              len(model.splitters), batch, spec.seed)
    index_s = time.perf_counter() - started
    started, read = time.perf_counter(), 0
    for step in range(LOADER_STEPS):
        read += int((data.train_batch(step).targets != PAD).sum())
    loader = read / (time.perf_counter() - started)
    data_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # before any training
    del data, corpora, model
    with tempfile.TemporaryDirectory() as run:
        torch.manual_seed(0)
        result = train(recipe, Path(run) / "run", progress=False, sample=False)
    return {
        "index_s": index_s,
        "loader_bytes_per_s": loader,
        "train_bytes_per_s": result.get("bytes_per_s"),
        "data_peak_rss_bytes": data_rss,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def bench_data(
    recipe_path: str | Path,
    corpus_bytes: int,
    json_out: str | Path,
    workers: tuple[int, ...] = (1, 2),
    steps: int = 5,
    work_dir: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> dict:
    """The benchmark's record (also written to ``json_out``); corpus and prepared copies live in
    ``work_dir`` (default: a temporary directory, removed afterwards)."""
    from unetlm.data.prepared import prepare
    from unetlm.recipe import dump_recipe, load_recipe

    root = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="unetlm-bench-data-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        corpus = root / "corpus.jsonl"
        written = write_corpus(corpus, corpus_bytes)
        source = ["data.source=jsonl", f"data.paths=['{corpus}']", "data.max_bytes=0"]
        recipe = load_recipe(recipe_path, [*overrides, *source])
        recipe_file = root / "recipe.toml"
        recipe_file.write_text(dump_recipe(recipe), encoding="utf-8")
        record: dict = {"recipe": str(recipe_path), "corpus_bytes": written, "workers": list(workers),
                        "prepare_bytes_per_s": [], "prepare_s": []}
        for n in workers:
            out = root / f"prepared-{n}"
            shutil.rmtree(out, ignore_errors=True)
            started = time.perf_counter()
            prepare(recipe, out, workers=n, progress=False)
            seconds = time.perf_counter() - started
            record["prepare_s"].append(seconds)
            record["prepare_bytes_per_s"].append(written / seconds)
            print(f"prepare, {n} worker(s): {written / seconds / 1e6:.2f} MB/s", flush=True)
        if len(workers) > 1:
            record["prepare_speedup"] = record["prepare_bytes_per_s"][-1] / record["prepare_bytes_per_s"][0]
        command = [sys.executable, "-m", "unetlm.bench.data", str(recipe_file), str(root / f"prepared-{workers[0]}"),
                   str(steps)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"the training probe failed:\n{done.stderr[-3000:]}")
        record |= json.loads(done.stdout.strip().splitlines()[-1])
        record["steps"] = steps
        Path(json_out).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        return record
    finally:
        if not work_dir:
            shutil.rmtree(root, ignore_errors=True)


def format_record(r: dict) -> str:
    speeds = ", ".join(f"{w} worker(s) {b / 1e6:.2f} MB/s" for w, b in zip(r["workers"], r["prepare_bytes_per_s"]))
    return (
        f"{r['recipe']}: corpus {r['corpus_bytes'] / 1e6:,.0f} MB; prepare {speeds}"
        + (f" (speedup {r['prepare_speedup']:.2f}x)" if "prepare_speedup" in r else "")
        + f"; row index {r['index_s']:.1f} s; loader {r['loader_bytes_per_s'] / 1e6:.2f} MB/s; "
        f"training {r['train_bytes_per_s']:,.0f} bytes/s; training process peak RSS {r['peak_rss_bytes'] / 1e9:.2f} GB "
        f"({r['data_peak_rss_bytes'] / 1e9:.2f} GB after opening the data and reading {LOADER_STEPS} batches)"
    )


if __name__ == "__main__":  # the training probe's fresh process: RECIPE_FILE DATA_DIR STEPS
    print(json.dumps(probe(sys.argv[1], sys.argv[2], int(sys.argv[3]))))
