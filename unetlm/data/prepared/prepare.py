"""``unetlm prepare``: turn a recipe's sources into shards, across processes and machines.

Job ``I`` of ``N`` (``shard=(I, N)``) prepares the planned shards ``I, I + N, I + 2N, ...``
with ``workers`` processes; a shard that already has its manifest is skipped, so a rerun
finishes what an interrupted run left. Every job writes the same ``plan.json``. BPE recipes:
the tokenizer is ``DATA_DIR/tokenizer.json`` if it exists (put one there to share it),
otherwise it is learned as training learns it (on the training split, or its first
``model.tokenizer.train_bytes`` bytes) — deterministically, so every job learns the same one.
"""
from __future__ import annotations

import concurrent.futures as futures
import multiprocessing
import shutil
import sys
from pathlib import Path

from unetlm.core.tokens import BYTES
from unetlm.data.prepared.format import (
    FORMAT, MANIFEST, PLAN, SHARDS, TOKENIZER, VERSION, PreparationIncomplete, PreparedDataError,
    byte_splitter_components, check_version, digest_of, file_digest, read_json, shard_dir, splitter_identities,
    open_shard, tokenizer_identity, write_json_atomic, write_text_atomic,
)
from unetlm.data.prepared.plan import BadLines, ShardInput, hf_shards, plan_shards, shard_documents, source_identity
from unetlm.data.prepared.write import write_shard

SHARD_BYTES = 32_000_000  # input bytes per planned shard


def cache_key(recipe) -> str:
    """Hash of what decides a preparation: the sources (paths, sizes, mtimes), the byte-level
    splitters, the tokenizer options and the format version. Keys a cache of prepared data."""
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
    """Prepare this job's shards of ``recipe``'s data into ``out``; returns ``out``."""
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
    shards = plan_shards(recipe.data, shard_bytes)
    tokenizer_json = _tokenizer(recipe, out, shards, skip_bad)
    plan = identity | {
        "key": digest_of(identity)[:24],
        "max_bytes": recipe.data.max_bytes,
        "shard_bytes": shard_bytes,
        "num_masks": len(components),
        "splitter_sha256": [digest_of(s) for s in identity["splitters"]],
        "tokenizer_sha256": None if tokenizer_json is None else file_digest(out / TOKENIZER),
        "num_shards": None if shards is None else len(shards),
    }
    _check_plan(out, plan)
    header = {k: plan[k] for k in ("key", "splitters", "splitter_sha256", "tokenizer_sha256")}
    runner = _Runner(out, plan, recipe.data, components, tokenizer_json, header, skip_bad, workers, progress)
    if shards is None:
        plan["num_shards"] = runner.run_streamed(hf_shards(recipe.data), job, jobs)
    else:
        write_json_atomic(out / PLAN, plan)
        runner.run_planned(shards, job, jobs, recipe.data.max_bytes)
    write_json_atomic(out / PLAN, plan)
    if runner.bad.count:
        print(f"skipped {runner.bad.count} bad input lines (the first: {runner.bad.first})")
    _check_not_empty(out)
    return out


def _check_plan(out: Path, plan: dict) -> None:
    path = out / PLAN
    if not path.is_file():
        return
    old = read_json(path, out)
    check_version(old, path, out)
    keep = ("format", "version", "key", "shard_bytes", "tokenizer_sha256")
    if {k: old.get(k) for k in keep} != {k: plan[k] for k in keep}:
        raise PreparedDataError(
            f"{out} holds a preparation of other data, splitters, tokenizer or format version "
            f"(plan.json differs); prepare into an empty --out, or delete {out}"
        )


def _check_not_empty(out: Path) -> None:
    """Once every shard is written (by this job or others), refuse data without any text."""
    from unetlm.data.prepared.read import PreparedCorpus

    try:
        corpus = PreparedCorpus.open(out)
    except PreparationIncomplete:
        return  # other jobs' shards are still missing
    if corpus.num_bytes == corpus.num_documents:
        raise PreparedDataError(
            f"the data sources hold no text ({corpus.num_documents} documents, 0 bytes); nothing to train on"
        )


def _tokenizer(recipe, out: Path, shards: list[ShardInput] | None, skip_bad: bool) -> str | None:
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
    documents = _all_documents(recipe.data, shards, skip_bad)
    sample = tokenizer_training_text(documents, recipe.data.valid_fraction, spec.train_bytes)
    text = BpeTokenizer.train(sample, spec.vocab_size).to_json()
    write_text_atomic(path, text)
    return text


def _all_documents(spec, shards, skip_bad: bool):
    """Every document of the stream in order, up to the one crossing ``max_bytes``."""
    if shards is None:
        for rows in hf_shards(spec):
            yield from rows
        return
    documents = (d for shard in shards for d in shard_documents(shard, spec, skip_bad, BadLines()))
    yield from _until(documents, spec.max_bytes) if spec.max_bytes else documents


# ----------------------------------------------------------------------------- running shards


def _make_tokenizer(tokenizer_json):
    if tokenizer_json is None:
        return BYTES
    from unetlm.data.bpe import BpeTokenizer

    return BpeTokenizer.from_json(tokenizer_json)


_WORKER: dict = {}


def _init_worker(out, spec, components, tokenizer_json, header, skip_bad) -> None:
    _WORKER.update(
        out=out, spec=spec, splitters=[c.build_class()(c.config) for c in components],
        tokenizer=_make_tokenizer(tokenizer_json), header=header, skip_bad=skip_bad,
    )


def _run_shard(index: int, shard: ShardInput | None, rows: list[bytes] | None, budget: int | None,
               on_bytes=None) -> tuple[dict, BadLines]:
    """Write shard ``index`` from its planned input (or the streamed ``rows``). ``budget``: the
    document bytes the stream still needs; the shard ends after the document that reaches it
    (the reader cuts there too, so the stream is the same whether or not it was known)."""
    w = _WORKER
    bad = BadLines()
    documents = rows if shard is None else shard_documents(shard, w["spec"], w["skip_bad"], bad)
    if budget is not None:
        documents = _until(documents, budget)
    source = {"rows": len(rows)} if shard is None else shard.describe()
    header = w["header"] | {"input": source}
    details = lambda: {"bad_lines": bad.count}  # noqa: E731 (known once the documents are read)
    manifest = write_shard(w["out"], index, documents, w["splitters"], w["tokenizer"], header, details, on_bytes)
    return manifest, bad


def _until(documents, budget: int):
    """``documents`` up to and including the one that brings their bytes to ``budget``."""
    total = 0
    for data in documents:
        yield data
        total += len(data)
        if total >= budget:
            return


class _Runner:
    """Runs shards in this process (``workers`` = 1) or in a pool, with a progress bar."""

    def __init__(self, out, plan, spec, components, tokenizer_json, header, skip_bad, workers, progress) -> None:
        self.out, self.plan, self.spec, self.workers = out, plan, spec, workers
        self.init = (out, spec, components, tokenizer_json, header, skip_bad)
        self.progress = progress
        self.bad = BadLines()
        self.doc_bytes: dict[int, int] = {}  # shard -> document bytes, for the max_bytes cut

    def _pool(self):
        # fork starts workers at once; a model (entropy splitters) and other systems need a fresh process
        entropy = any(c.name == "entropy" for c in self.init[2])
        method = "fork" if sys.platform.startswith("linux") and not entropy else "spawn"
        return futures.ProcessPoolExecutor(
            self.workers, mp_context=multiprocessing.get_context(method), initializer=_init_worker,
            initargs=self.init,
        )

    def _bar(self, total: int | None):
        from tqdm import tqdm

        return tqdm(total=total, unit="B", unit_scale=True, desc="prepare", disable=not self.progress, smoothing=0.1)

    def _done(self, index: int) -> bool:
        """True for a finished, undamaged shard; a damaged one is removed, to be written again."""
        folder = shard_dir(self.out, index)
        try:
            open_shard(folder, self.plan, self.out)
            return True
        except PreparationIncomplete:
            return False
        except PreparedDataError:
            shutil.rmtree(folder, ignore_errors=True)
            return False

    def _clean(self, indices) -> None:
        """Remove temporary folders an interrupted run left for these shards."""
        wanted = {f"{i:05d}" for i in indices}
        for tmp in (self.out / SHARDS).glob(".*.tmp-*"):
            if tmp.name[1:6] in wanted:
                shutil.rmtree(tmp, ignore_errors=True)

    def _record(self, manifest: dict, bad: BadLines) -> None:
        self.doc_bytes[manifest["shard"]] = manifest["num_bytes"] - manifest["num_documents"]
        self.bad.count += bad.count
        self.bad.first = self.bad.first or bad.first

    def _budget(self, index: int, max_bytes: int) -> int | None:
        """Document bytes shard ``index`` may still need before ``max_bytes`` is reached (<= 0: none);
        None when unlimited or when an earlier shard is not finished yet."""
        if not max_bytes:
            return None
        total = 0
        for i in range(index):
            if i not in self.doc_bytes:
                if not self._done(i):
                    return None
                m = read_json(shard_dir(self.out, i) / MANIFEST, self.out)
                self.doc_bytes[i] = m["num_bytes"] - m["num_documents"]
            total += self.doc_bytes[i]
            if total >= max_bytes:
                break
        return max_bytes - total

    def run_planned(self, shards: list[ShardInput], job: int, jobs: int, max_bytes: int) -> None:
        mine = [i for i in range(job, len(shards), jobs)]
        self._clean(mine)
        todo = [i for i in mine if not self._done(i)]

        def tasks():
            for i in todo:
                budget = self._budget(i, max_bytes)  # asked when the shard starts: earlier ones may be done by then
                if budget is not None and budget <= 0:
                    return
                yield i, shards[i], None, budget, shards[i].size

        total = sum(shards[i].size for i in todo)
        self._run(tasks(), min(total, max_bytes) if max_bytes and jobs == 1 else total)

    def run_streamed(self, batches, job: int, jobs: int) -> int:
        """Shards of a streamed source: every job streams it (to agree on the cut) and writes its own."""
        count = [0]

        def tasks():
            for index, rows in enumerate(batches):
                count[0] = index + 1
                size = sum(len(r) for r in rows)
                if index % jobs == job and not self._done(index):
                    self._clean([index])
                    yield index, None, rows, None, size

        self._run(tasks(), self.spec.max_bytes or None)
        return count[0]

    def _run(self, tasks, total: int | None) -> None:
        """Run ``(index, shard, rows, budget, size)`` tasks here or in the pool, ``2 * workers`` in flight."""
        with self._bar(total) as bar:
            if self.workers == 1:
                _init_worker(*self.init)
                for index, shard, rows, budget, size in tasks:
                    shown = [0]  # document bytes shown while the shard is written; its input size once done

                    def on_bytes(n: int) -> None:
                        shown[0] += n
                        bar.update(n)

                    self._record(*_run_shard(index, shard, rows, budget, on_bytes))
                    bar.update(max(0, size - shown[0]))
                return
            with self._pool() as pool:
                pending: dict = {}
                for index, shard, rows, budget, size in tasks:
                    pending[pool.submit(_run_shard, index, shard, rows, budget)] = size
                    while len(pending) >= 2 * self.workers:
                        self._wait(pending, bar)
                while pending:
                    self._wait(pending, bar)

    def _wait(self, pending: dict, bar) -> None:
        done, _ = futures.wait(pending, return_when=futures.FIRST_COMPLETED)
        for future in done:
            bar.update(pending.pop(future))
            self._record(*future.result())
