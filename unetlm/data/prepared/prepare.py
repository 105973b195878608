"""``unetlm prepare``: turn a recipe's sources into shards, across processes and machines.

Job ``I`` of ``N`` (``shard=(I, N)``) prepares the units of input ``I, I + N, I + 2N, ...``
(:mod:`unetlm.data.prepared.assignment`) with ``workers`` processes, each unit as one or more shards;
a unit whose last shard has its manifest is skipped, and one left unfinished is written again
from its start, so a rerun finishes what an interrupted run left. Every job writes the same
``preparation.json``. Progress (input bytes/s and the time left) counts the bytes every worker has
read. BPE recipes: the tokenizer is ``DATA_DIR/tokenizer.json`` if it exists (put one there to
share it), otherwise it is learned as training learns it (on the training split, or its first
``model.tokenizer.train_bytes`` bytes) — deterministically, so every job learns the same one.
"""
from __future__ import annotations

import concurrent.futures as futures
import math
import multiprocessing
import shutil
import sys
from pathlib import Path

from unetlm.core.tokens import BYTES
from unetlm.data.jsonl import BadLines
from unetlm.data.prepared.format import (
    FORMAT, MANIFEST, PREPARATION, SHARDS, TOKENIZER, VERSION, PreparationIncomplete, PreparedDataError,
    byte_splitter_components, check_version, digest_of, file_digest, read_json, shard_dir, splitter_identities,
    open_shard, tokenizer_identity, unit_shards, write_json_atomic, write_text_atomic,
)
from unetlm.data.prepared.assignment import Unit, assign_units, hf_units, source_identity, unit_pieces
from unetlm.data.prepared.write import write_unit
from unetlm.data.sources import documents, head, until, whole_pieces

SHARD_BYTES = 32_000_000  # input bytes per unit, stream bytes per shard
POLL_S = 0.5  # how often the progress bar reads the workers' count


def cache_key(recipe) -> str:
    """Hash of what decides a preparation: the sources (paths, sizes, mtimes), the byte-level
    splitters (options and code), the tokenizer options and the format version. Keys a cache of
    prepared data."""
    return digest_of(_identity(recipe))[:24]


def _identity(recipe) -> dict:
    return {
        "format": FORMAT,
        "version": VERSION,
        "sources": source_identity(recipe.data),
        "splitters": splitter_identities(recipe),
        "tokenizer": tokenizer_identity(recipe),
    }


def prepare(
    recipe,
    out: Path,
    *,
    workers: int = 1,
    shard: tuple[int, int] = (0, 1),
    skip_bad: bool = False,
    progress: bool = True,
    shard_bytes: int = SHARD_BYTES,
) -> Path:
    """Prepare this job's units of ``recipe``'s data into ``out``; returns ``out``."""
    job, jobs = shard
    if not 0 <= job < jobs:
        raise ValueError(f"--shard {job}/{jobs}: expected I/N with 0 <= I < N")
    if workers < 1:
        raise ValueError(f"--workers {workers}: expected at least 1")
    if shard_bytes < 1:
        raise ValueError(f"--shard-bytes {shard_bytes}: expected at least 1")
    out = Path(out)
    (out / SHARDS).mkdir(parents=True, exist_ok=True)
    identity = _identity(recipe)
    components = byte_splitter_components(recipe)
    units = assign_units(recipe.data, shard_bytes)
    tokenizer_json = _tokenizer(recipe, out, units, skip_bad)
    preparation = identity | {
        "key": digest_of(identity)[:24],
        "max_bytes": recipe.data.max_bytes,
        "shard_bytes": shard_bytes,
        "num_masks": len(components),
        "splitter_sha256": [digest_of(s) for s in identity["splitters"]],
        "tokenizer_sha256": None if tokenizer_json is None else file_digest(out / TOKENIZER),
        "num_units": None if units is None else len(units),
    }
    _check_preparation(out, preparation)
    header = {k: preparation[k] for k in ("key", "splitters", "splitter_sha256", "tokenizer_sha256")}
    runner = _Runner(out, preparation, recipe.data, components, tokenizer_json, header, skip_bad, workers, progress)
    if units is None:
        preparation["num_units"] = runner.run_streamed(hf_units(recipe.data), job, jobs)
    else:
        write_json_atomic(out / PREPARATION, preparation)
        runner.run_assigned(units, job, jobs, recipe.data.max_bytes)
    write_json_atomic(out / PREPARATION, preparation)
    if runner.bad.count:
        print(f"skipped {runner.bad.count} bad input lines (the first: {runner.bad.first})")
    _check_not_empty(out)
    return out


def _check_preparation(out: Path, preparation: dict) -> None:
    path = out / PREPARATION
    if not path.is_file():
        return
    old = read_json(path, out)
    check_version(old, path, out)
    keep = ("format", "version", "key", "shard_bytes", "tokenizer_sha256")
    if {k: old.get(k) for k in keep} != {k: preparation[k] for k in keep}:
        raise PreparedDataError(
            f"{out} holds a preparation of other data, splitters, tokenizer or format version "
            f"(preparation.json differs); prepare into an empty --out, or delete {out}"
        )


def _check_not_empty(out: Path) -> None:
    """Once every unit is written (by this job or others), refuse data without any text."""
    from unetlm.data.prepared.read import PreparedCorpus

    try:
        corpus = PreparedCorpus.open(out)
    except PreparationIncomplete:
        return  # other jobs' units are still missing
    if corpus.num_bytes == corpus.num_documents:
        raise PreparedDataError(
            f"the data sources hold no text ({corpus.num_documents} documents, 0 bytes); nothing to train on"
        )


def _tokenizer(recipe, out: Path, units: list[Unit] | None, skip_bad: bool) -> str | None:
    """JSON of the BPE tokenizer (``out/tokenizer.json``, or learned and written there); None for bytes."""
    spec = recipe.model.tokenizer
    if spec is None:
        return None
    from unetlm.data.bpe import BpeTokenizer
    from unetlm.data.packing import tokenizer_training_text

    path = out / TOKENIZER
    if path.is_file():
        text = path.read_text(encoding="utf-8")
        if BpeTokenizer.from_json(text).vocab_size != spec.vocab_size:
            raise PreparedDataError(
                f"{path} has another vocabulary size than model.tokenizer.vocab_size = {spec.vocab_size}; "
                f"remove it or prepare into an empty --out"
            )
        return text
    pieces = until(_all_pieces(recipe.data, units, skip_bad), recipe.data.max_bytes)
    if spec.train_bytes and recipe.data.valid_fraction < 1.0:  # documents past what learning reads are cut
        pieces = head(pieces, math.ceil(spec.train_bytes / (1.0 - recipe.data.valid_fraction)) + 1)
    sample = tokenizer_training_text(documents(pieces), recipe.data.valid_fraction, spec.train_bytes)
    text = BpeTokenizer.train(sample, spec.vocab_size).to_json()
    write_text_atomic(path, text)
    return text


def _all_pieces(spec, units, skip_bad: bool):
    """Every document piece of the stream in order."""
    if units is None:
        return (p for rows in hf_units(spec) for p in whole_pieces(rows))
    return (p for unit in units for p in unit_pieces(unit, spec, skip_bad, BadLines()))


# ----------------------------------------------------------------------------- running units


def _make_tokenizer(tokenizer_json):
    if tokenizer_json is None:
        return BYTES
    from unetlm.data.bpe import BpeTokenizer

    return BpeTokenizer.from_json(tokenizer_json)


_WORKER: dict = {}


def _init_worker(out, spec, components, tokenizer_json, header, skip_bad, shard_bytes, counter) -> None:
    _WORKER.clear()
    _WORKER.update(
        out=out, spec=spec, splitters=[c.build_class()(c.config) for c in components],
        tokenizer=_make_tokenizer(tokenizer_json), header=header, skip_bad=skip_bad, shard_bytes=shard_bytes,
        counter=counter,
    )


def _run_unit(index: int, unit: Unit | None, rows: list[bytes] | None, budget: int | None) -> tuple:
    """Write unit ``index`` from its assigned input (or the streamed ``rows``). ``budget``: the
    document bytes the stream still needs; the unit ends after the document that reaches it (the
    reader cuts there too, so the stream is the same whether or not it was known). Returns the
    manifests, the skipped lines and the input bytes counted."""
    w = _WORKER
    bad = BadLines()
    counted = [0]

    def on_input(n: int) -> None:
        counted[0] += n
        with w["counter"].get_lock():
            w["counter"].value += n
        if "show" in w:  # in the parent process: the bar moves while the unit is written
            w["show"]()

    if unit is None:
        pieces = whole_pieces(rows)
        on_input(sum(len(r) for r in rows))
    else:
        pieces = unit_pieces(unit, w["spec"], w["skip_bad"], bad, on_input)
    if budget is not None:
        pieces = until(pieces, budget)
    source = {"rows": len(rows)} if unit is None else unit.describe()
    header = w["header"] | {"input": source}
    details = lambda: {"bad_lines": bad.count}  # noqa: E731 (known once the pieces are read)
    manifests = write_unit(w["out"], index, pieces, w["splitters"], w["tokenizer"], header, w["shard_bytes"], details)
    return manifests, bad, counted[0]


class _Runner:
    """Runs units in this process (``workers`` = 1) or in a pool, with a progress bar."""

    def __init__(self, out, preparation, spec, components, tokenizer_json, header, skip_bad, workers, progress) -> None:
        self.out, self.preparation, self.spec, self.workers, self.progress = out, preparation, spec, workers, progress
        # fork starts workers at once; a splitter that runs a model needs a fresh process
        spawn = any(c.build_class().needs_model for c in components) or not sys.platform.startswith("linux")
        self.context = multiprocessing.get_context("spawn" if spawn else "fork")
        self.counter = self.context.Value("q", 0)  # input bytes read by every worker
        self.init = (out, spec, components, tokenizer_json, header, skip_bad, preparation["shard_bytes"], self.counter)
        self.bad = BadLines()
        self.doc_bytes: dict[int, int] = {}  # unit -> document bytes, for the max_bytes cut
        self.extra = 0  # input bytes of finished units that their workers did not count

    def _bar(self, total: int | None):
        from tqdm import tqdm

        return tqdm(total=total, unit="B", unit_scale=True, desc="prepare", disable=not self.progress, smoothing=0.1)

    def _show(self, bar) -> None:
        bar.update(self.counter.value + self.extra - bar.n)

    def _manifests(self, index: int) -> list[dict] | None:
        """The manifests of a finished unit (its shards up to the last), or None."""
        out = []
        while True:
            try:
                manifest = open_shard(shard_dir(self.out, index, len(out)), self.preparation, self.out)
            except PreparedDataError:  # missing, unfinished or damaged
                return None
            out.append(manifest)
            if manifest.get("last"):
                return out

    def _clean(self, indices) -> None:
        """Remove what an interrupted run left of these units: temporary folders and the shards of
        units without their last one."""
        wanted = {f"{i:05d}" for i in indices}
        for tmp in (self.out / SHARDS).glob(".*.tmp-*"):
            if tmp.name[1:6] in wanted:
                shutil.rmtree(tmp, ignore_errors=True)
        for index in indices:
            if self._manifests(index) is None:
                for folder in unit_shards(self.out, index):
                    shutil.rmtree(folder, ignore_errors=True)

    def _record(self, index: int, manifests: list[dict], bad: BadLines) -> None:
        self.doc_bytes[index] = sum(m["num_bytes"] - m["num_documents"] for m in manifests)
        self.bad.count += bad.count
        self.bad.first = self.bad.first or bad.first

    def _budget(self, index: int, max_bytes: int) -> int | None:
        """Document bytes unit ``index`` may still need before ``max_bytes`` is reached (<= 0: none);
        None when unlimited or when an earlier unit is not finished yet."""
        if not max_bytes:
            return None
        total = 0
        for i in range(index):
            if i not in self.doc_bytes:
                manifests = self._manifests(i)
                if manifests is None:
                    return None
                self.doc_bytes[i] = sum(m["num_bytes"] - m["num_documents"] for m in manifests)
            total += self.doc_bytes[i]
            if total >= max_bytes:
                break
        return max_bytes - total

    def run_assigned(self, units: list[Unit], job: int, jobs: int, max_bytes: int) -> None:
        mine = list(range(job, len(units), jobs))
        self._clean(mine)
        todo = [i for i in mine if self._manifests(i) is None]

        def tasks():
            for i in todo:
                budget = self._budget(i, max_bytes)  # asked when the unit starts: earlier ones may be done by then
                if budget is not None and budget <= 0:
                    return
                yield i, units[i], None, budget, units[i].size if budget is None else 0  # a cut unit is not read whole

        total = sum(units[i].size for i in todo)
        self._run(tasks(), min(total, max_bytes) if max_bytes and jobs == 1 else total)

    def run_streamed(self, batches, job: int, jobs: int) -> int:
        """Units of a streamed source: every job streams it (to agree on the cut) and writes its own."""
        count = [0]

        def tasks():
            for index, rows in enumerate(batches):
                count[0] = index + 1
                size = sum(len(r) for r in rows)
                if index % jobs == job and self._manifests(index) is None:
                    self._clean([index])
                    yield index, None, rows, None, size

        self._run(tasks(), self.spec.max_bytes or None)
        return count[0]

    def _run(self, tasks, total: int | None) -> None:
        """Run ``(index, unit, rows, budget, size)`` tasks here or in the pool, ``2 * workers`` in flight."""
        with self._bar(total) as bar:
            if self.workers == 1:
                _init_worker(*self.init)
                _WORKER["show"] = lambda: self._show(bar)
                try:
                    for index, unit, rows, budget, size in tasks:
                        self._finish(index, size, *_run_unit(index, unit, rows, budget))
                        self._show(bar)
                finally:
                    _WORKER.clear()
                return
            with futures.ProcessPoolExecutor(self.workers, mp_context=self.context, initializer=_init_worker,
                                             initargs=self.init) as pool:
                pending: dict = {}
                for index, unit, rows, budget, size in tasks:
                    pending[pool.submit(_run_unit, index, unit, rows, budget)] = (index, size)
                    while len(pending) >= 2 * self.workers:
                        self._wait(pending, bar)
                while pending:
                    self._wait(pending, bar)

    def _finish(self, index: int, size: int, manifests: list[dict], bad: BadLines, counted: int) -> None:
        self._record(index, manifests, bad)
        self.extra += max(0, size - counted)

    def _wait(self, pending: dict, bar) -> None:
        done, _ = futures.wait(pending, timeout=POLL_S, return_when=futures.FIRST_COMPLETED)
        for future in done:
            self._finish(*pending.pop(future), *future.result())
        self._show(bar)
