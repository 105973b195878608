"""The corpora a training run reads: prepared directories, or its sources prepared into a cache.

``data.prepared`` names directories written by ``unetlm prepare`` (a mixture when several, each
with its weight). Without it, the recipe's sources are prepared once into
``$UNETLM_CACHE/prepared/KEY`` (default ``~/.cache/unetlm``), ``KEY`` = :func:`cache_key` of the
sources, splitters (options and code) and tokenizer, and reused by later runs; with ``progress``
a line says which directory is read and whether it was reused or prepared now. Either way a rank
holds the document index and the rows in RAM, never the corpus. A corpus's rows are cached beside its data as
``rows/{key}-T{tokens}-L{seq_len}-M{max_lens}-V{valid_fraction}-{train,valid}.npz``.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from unetlm.core.locks import FileLock, LocksUnsupported
from unetlm.core.tokens import BYTES
from unetlm.data.errors import PreparedDataError
from unetlm.data.prepared import PreparedCorpus, cache_key, prepare
from unetlm.data.rows import Rows
from unetlm.data.sources import require_source
from unetlm.data.windows import Source, TrainingData, source_rows
from unetlm.recipe import Recipe


def cache_root() -> Path:
    return Path(os.environ.get("UNETLM_CACHE") or Path.home() / ".cache" / "unetlm")


def prepare_cached(recipe: Recipe, progress: bool = True) -> Path:
    """The cache directory of ``recipe``'s sources, prepared now unless an earlier run did. Behind
    a file lock beside it: of processes that start at once, one prepares, the others wait for it.
    With ``progress`` a line says whether the directory is reused or prepared now."""
    out = cache_root() / "prepared" / cache_key(recipe)
    say = print if progress else lambda _line: None
    if _complete(out, recipe):
        return _reused(out, say)
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = cache_lock(out)
    try:
        lock.acquire(wait=True)
    except LocksUnsupported:  # e.g. a Lustre mount without flock: prepare unguarded
        pass
    try:
        if _complete(out, recipe):  # another process prepared it while this one waited
            return _reused(out, say)
        say(f"prepared data: preparing {out} (new: no earlier run prepared these sources, splitters and tokenizer)")
        try:
            return prepare(recipe, out, progress=progress)
        except PreparedDataError:
            PreparedCorpus.open(out, recipe)  # complete but without text: training says how much it needs
            return out
    finally:
        lock.release()


def cache_lock(out: Path) -> FileLock:
    """The lock beside cached preparation ``out``, held while it is prepared (or removed)."""
    return FileLock(out.parent / f"{out.name}.lock")


def _complete(out: Path, recipe: Recipe) -> bool:
    try:
        PreparedCorpus.open(out, recipe)
        return True
    except PreparedDataError:  # absent or unfinished: prepare (it skips finished units)
        return False


def _reused(out: Path, say: Callable[[str], None]) -> Path:
    say(f"prepared data: reusing {out} (prepared earlier from the same sources, splitters and tokenizer)")
    _touch(out)
    return out


def _touch(path: Path) -> None:
    """Record that a cached preparation was used now (``unetlm cache list`` shows it)."""
    try:
        path.touch()
    except OSError:
        pass  # a read-only cache: the time is simply not recorded


def ready_data(recipe: Recipe, progress: bool = True) -> None:
    """Make the recipe's data ready before a run's processes form a group: its sources prepared into
    the cache (or found there), or its ``data.prepared`` directories named; with ``progress`` one line
    says which."""
    parts = recipe.data.prepared_dirs
    if parts:
        if progress:
            print(f"prepared data: reading {', '.join(part.path for part in parts)} (data.prepared)")
        return
    require_source(recipe.data)
    prepare_cached(recipe, progress)


def open_corpora(
    recipe: Recipe, on_main: Callable[[Callable[[], str]], str] = lambda make: make(), progress: bool = True
) -> list[tuple[PreparedCorpus, float]]:
    """(corpus, weight) of each prepared directory the recipe trains on; ``on_main(make)`` runs
    ``make`` on one process and gives every process its result (the cache is prepared once)."""
    parts = recipe.data.prepared_dirs
    if not parts:
        path = on_main(lambda: str(prepare_cached(recipe, progress)))
        return [(PreparedCorpus.open(path, recipe), 1.0)]
    return [(PreparedCorpus.open(part.path, recipe), part.weight) for part in parts]


def tokenizer_text(tokenizer) -> str:
    """What identifies a tokenizer: "bytes", or a trained tokenizer's JSON."""
    return "bytes" if tokenizer is BYTES else tokenizer.to_json()


def shared_tokenizer(corpora: Sequence[tuple[PreparedCorpus, float]]):
    """The tokenizer every corpus was prepared with (a mixture must share one)."""
    first = corpora[0][0]
    for corpus, _ in corpora[1:]:
        if tokenizer_text(corpus.tokenizer) != tokenizer_text(first.tokenizer):
            raise PreparedDataError(
                f"{corpus.path} was prepared with another tokenizer than {first.path}; a mixture needs one "
                f"tokenizer: copy {first.path}/tokenizer.json into an empty directory and prepare there"
            )
    return first.tokenizer


def cached_source(corpus, valid_fraction: float, limits: Sequence[int], seq_len: int, weight: float) -> Source:
    """:func:`source_rows`, its rows cached in the corpus's directory when it has a writable one."""
    folder = getattr(corpus, "path", None)
    if folder is None:
        return source_rows(corpus, valid_fraction, limits, seq_len, weight)
    # the preparation's key and stream length tell a re-prepared directory's rows from old ones
    lengths = "-".join(map(str, limits)) or "none"
    name = f"{corpus.preparation['key']}-T{corpus.num_tokens}-L{seq_len}-M{lengths}-V{valid_fraction!r}"
    files = [Path(folder) / "rows" / f"{name}-{split}.npz" for split in ("train", "valid")]
    if all(f.is_file() for f in files):
        try:
            return Source(corpus, Rows.load(files[0]), Rows.load(files[1]), weight)
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache file: cut them again
    source = source_rows(corpus, valid_fraction, limits, seq_len, weight)
    try:
        files[0].parent.mkdir(exist_ok=True)
        for file, rows in zip(files, (source.train, source.valid)):
            tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
            with open(tmp, "wb") as f:
                rows.save(f)
            os.replace(tmp, file)
    except OSError:
        pass  # a read-only directory: the rows are simply not cached
    return source


def open_training_data(
    corpora: Sequence[tuple[object, float]], valid_fraction: float, seq_len: int, lengths: Sequence[int],
    n_splitters: int, batch_size: int, seed: int,
) -> TrainingData:
    """Batches of ``corpora`` for a model whose first ``n_splitters`` coarse stages are fed by
    byte-level splitters, with per-stage ``lengths`` (``lengths[0]`` = seq_len): those stages
    are cut into rows that never overflow them."""
    limits = [int(n) for n in lengths[1 : 1 + n_splitters]]
    return TrainingData.build(corpora, limits, seq_len, batch_size, valid_fraction, seed, rows_of=cached_source)


__all__ = ["cache_root", "open_corpora", "open_training_data", "prepare_cached", "ready_data", "shared_tokenizer",
           "tokenizer_text"]
