"""``unetlm bench data``: prepare throughput and memory, loader bytes/s and the training process's peak memory.

The corpus is CPython's help topics, repeated to ``corpus_bytes`` document bytes (real text with
real boundaries), written in each of the ``layouts``: ``jsonl`` (one line per topic), ``one-file``
(the topics' text as a single file, one document) and ``1mb-files`` (the same bytes cut into
files of 1 MB, one document each). Each layout is prepared for the recipe with each ``workers``
count, each time in a fresh process (bytes/s: document bytes over the wall time of ``prepare``;
``peak_rss_bytes``: the largest peak resident set of that process and its workers). Then a fresh
process opens the first layout's data, times :meth:`TrainingData.train_batch`
(``loader_bytes_per_s``: non-PAD target bytes per second, one process, no loader workers;
``data_peak_rss_bytes``: the peak so far) and trains ``steps`` steps on it (``peak_rss_bytes``:
the whole process's peak).
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
LAYOUTS = ("jsonl", "one-file", "1mb-files")
FILE_BYTES = 1_000_000  # bytes per document of the 1mb-files layout


def _topics() -> list[bytes]:
    from unetlm.data.sources import pydocs_documents

    return [d for d in pydocs_documents() if d]


def write_corpus(root: Path, layout: str, n_bytes: int) -> tuple[list[str], int]:
    """Write ``n_bytes`` document bytes in ``layout`` under ``root``; returns the recipe overrides
    that read them and the document bytes written."""
    docs = _topics()
    if layout == "jsonl":
        path = root / "corpus.jsonl"
        lines = [(json.dumps({"text": d.decode("utf-8")}) + "\n").encode("utf-8") for d in docs]
        total = 0
        with open(path, "wb") as f:
            while total < n_bytes:
                for doc, line in zip(docs, lines):
                    f.write(line)
                    total += len(doc)
                    if total >= n_bytes:
                        break
        return ["data.source=jsonl", f"data.paths=['{path}']"], total
    text = b"\n\n".join(docs)
    folder = root / layout
    folder.mkdir(parents=True, exist_ok=True)
    size = n_bytes if layout == "one-file" else FILE_BYTES
    written = 0
    while written < n_bytes:
        with open(folder / f"{written // size:06d}.txt", "wb") as f:
            end = min(n_bytes, written + size)
            while written < end:
                at = written % len(text)
                piece = text[at : at + end - written]
                f.write(piece)
                written += len(piece)
    return ["data.source=files", f"data.paths=['{folder}/*.txt']"], written


def _peak_rss() -> int:
    """The largest peak resident set of this process and of its finished children, in bytes."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max(own, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) * 1024


def prepare_probe(recipe_file: str, out: str, workers: int) -> dict:
    """Run in a fresh process: prepare, timed; the peak resident set of it and its workers."""
    from unetlm.data.prepared import prepare
    from unetlm.recipe import load_recipe
    recipe = load_recipe(recipe_file)
    started = time.perf_counter()
    prepare(recipe, Path(out), workers=workers, progress=False)
    return {"seconds": time.perf_counter() - started, "peak_rss_bytes": _peak_rss()}


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


def _run_probe(*args: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "unetlm.bench.data", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the benchmark's {args[0]} process failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_data(
    recipe_path: str | Path,
    corpus_bytes: int,
    json_out: str | Path,
    workers: tuple[int, ...] = (1, 2),
    steps: int = 5,
    work_dir: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    layouts: tuple[str, ...] = ("jsonl",),
) -> dict:
    """The benchmark's record (also written to ``json_out``); corpora and prepared copies live in
    ``work_dir`` (default: a temporary directory, removed afterwards; prepared copies other than
    the one trained on are removed as soon as they are measured)."""
    from unetlm.recipe import dump_recipe, load_recipe

    unknown = [name for name in layouts if name not in LAYOUTS]
    if unknown or not layouts:
        raise ValueError(f"--layouts {','.join(layouts)}: expected some of {', '.join(LAYOUTS)}")
    root = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="unetlm-bench-data-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        record: dict = {"recipe": str(recipe_path), "corpus_bytes": corpus_bytes, "workers": list(workers),
                        "layouts": {}}
        trained = None
        for layout in layouts:
            source, written = write_corpus(root, layout, corpus_bytes)
            recipe_file = root / f"recipe-{layout}.toml"
            recipe_file.write_text(dump_recipe(load_recipe(recipe_path, [*overrides, *source, "data.max_bytes=0"])),
                                   encoding="utf-8")
            runs = []
            for n in workers:
                out = root / f"prepared-{layout}-{n}"
                shutil.rmtree(out, ignore_errors=True)
                run = _run_probe("prepare", str(recipe_file), str(out), str(n))
                runs.append({"workers": n, **run, "bytes_per_s": written / run["seconds"]})
                print(f"{layout}: prepare, {n} worker(s): {written / run['seconds'] / 1e6:.2f} MB/s, peak RSS "
                      f"{run['peak_rss_bytes'] / 1e9:.2f} GB", flush=True)
                if trained is None:
                    trained = (recipe_file, out)
                elif not work_dir:
                    shutil.rmtree(out, ignore_errors=True)  # the disk holds one corpus's copies at a time
            record["layouts"][layout] = {"corpus_bytes": written, "prepare": runs}
            if not work_dir and layout != layouts[0]:
                shutil.rmtree(root / layout, ignore_errors=True)
        first = record["layouts"][layouts[0]]["prepare"]
        for entry in record["layouts"].values():
            for run, base in zip(entry["prepare"], first):
                run["bytes_per_s_vs_first_layout"] = run["bytes_per_s"] / base["bytes_per_s"]
            entry["prepare_speedup"] = entry["prepare"][-1]["bytes_per_s"] / entry["prepare"][0]["bytes_per_s"]
        record["train_layout"] = layouts[0]
        record |= _run_probe("train", str(trained[0]), str(trained[1]), str(steps))
        record["steps"] = steps
        Path(json_out).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        return record
    finally:
        if not work_dir:
            shutil.rmtree(root, ignore_errors=True)


def format_record(r: dict) -> str:
    lines = [f"{r['recipe']}: corpus {r['corpus_bytes'] / 1e6:,.0f} MB"]
    for layout, entry in r["layouts"].items():
        speeds = ", ".join(
            f"{run['workers']} worker(s) {run['bytes_per_s'] / 1e6:.2f} MB/s "
            f"({run['bytes_per_s_vs_first_layout']:.2f}x the first layout) peak RSS {run['peak_rss_bytes'] / 1e9:.2f} GB"
            for run in entry["prepare"]
        )
        lines.append(f"  {layout}: prepare {speeds}")
    lines.append(
        f"  trained on {r['train_layout']}: row index {r['index_s']:.1f} s; loader {r['loader_bytes_per_s'] / 1e6:.2f} "
        f"MB/s; training {r['train_bytes_per_s']:,.0f} bytes/s; training process peak RSS "
        f"{r['peak_rss_bytes'] / 1e9:.2f} GB ({r['data_peak_rss_bytes'] / 1e9:.2f} GB after opening the data and "
        f"reading {LOADER_STEPS} batches)"
    )
    return "\n".join(lines)


if __name__ == "__main__":  # the fresh processes: prepare RECIPE_FILE OUT WORKERS | train RECIPE_FILE DATA_DIR STEPS
    kind, *args = sys.argv[1:]
    if kind == "prepare":
        print(json.dumps(prepare_probe(args[0], args[1], int(args[2]))))
    else:
        print(json.dumps(probe(args[0], args[1], int(args[2]))))
