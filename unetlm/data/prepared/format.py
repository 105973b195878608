"""The prepared-data format: names of files, the version, what identifies a preparation.

A prepared directory holds ``preparation.json`` (what was prepared: sources, the units of
input, splitters, tokenizer), ``tokenizer.json`` for BPE recipes, and ``shards/UUUUU-PPPP/`` per shard
(part ``P`` of input unit ``U``) with ``tokens.u8|u16|u32`` (document bytes or token ids, no BOS),
``docs.i64`` ((documents, 2): token and stream-byte offset of each document's BOS in the shard),
``maskK.bits`` (stage K's boundary mask over the shard's tokens, BOS included, ``np.packbits``)
and ``manifest.json`` (sizes, sha256 checksums, counts, whether it is its unit's last part).
docs/data.md describes every field.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from unetlm.data.errors import PreparationIncomplete, PreparedDataError
from unetlm.splitters.base import SplitterIdentityError

FORMAT = "unetlm-prepared"
VERSION = 2
PREPARATION = "preparation.json"
TOKENIZER = "tokenizer.json"
SHARDS = "shards"
MANIFEST = "manifest.json"
DOCS = "docs.i64"


def reprepare_hint(out) -> str:
    return f"re-prepare with: unetlm prepare RECIPE --out {out}"


def stale_hint(out) -> str:
    """How to replace a directory prepared with other splitters or tokenizer."""
    return f"delete {out} and re-prepare with: unetlm prepare RECIPE --out {out}"


def shard_dir(out: Path, unit: int, part: int) -> Path:
    return Path(out) / SHARDS / f"{unit:05d}-{part:04d}"


def unit_shards(out: Path, unit: int) -> list[Path]:
    """The finished shard folders of ``unit`` (whatever their part numbers)."""
    return sorted((Path(out) / SHARDS).glob(f"{unit:05d}-*"))


def token_file(dtype) -> str:
    import numpy as np

    return f"tokens.{ {1: 'u8', 2: 'u16', 4: 'u32'}[np.dtype(dtype).itemsize] }"


def mask_file(stage: int) -> str:
    """File of the boundary mask of model stage ``stage`` (1 = the first coarse stage)."""
    return f"mask{stage}.bits"


def file_digest(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def digest_of(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def byte_splitter_components(recipe) -> list:
    """The recipe's byte-level splitter components, stage 1 on (learned ones decide in the model)."""
    out = []
    for stage in recipe.model.stages[1:]:
        if stage.splitter.build_class().learned:
            break
        out.append(stage.splitter)
    return out


def splitter_identity(component, stage: int) -> dict:
    """What decides the boundaries of stage ``stage``'s splitter: its name, options and code
    (:meth:`~unetlm.splitters.base.Splitter.identity`)."""
    try:
        return {"name": component.name} | component.build_class()(component.config).identity()
    except SplitterIdentityError as exc:
        raise SplitterIdentityError(f"model.stages[{stage}].splitter {component.name!r}: {exc}") from None


def splitter_identities(recipe) -> list[dict]:
    return [splitter_identity(c, s + 1) for s, c in enumerate(byte_splitter_components(recipe))]


def show_splitter(identity: dict | None) -> str:
    """A splitter identity as its recipe table, e.g. {name = 'regex', preset = 'word'}."""
    if identity is None:
        return "(none)"
    return show({"name": identity["name"], **identity["options"]})


def code_change(old: dict, new: dict) -> str | None:
    """What differs between two identities' code, when their options agree (None otherwise)."""
    if {k: old.get(k) for k in ("name", "options")} != {k: new.get(k) for k in ("name", "options")}:
        return None
    a, b = old["code"], new["code"]
    changes = [f"{key} {a.get(key)!r}, now {b.get(key)!r}" for key in ("class", "version") if a.get(key) != b.get(key)]
    if a.get("source_sha256") != b.get("source_sha256"):
        short = lambda d: (d or "none")[:12]  # noqa: E731
        changes.append(f"its source changed (sha256 {short(a.get('source_sha256'))}..., now "
                       f"{short(b.get('source_sha256'))}...)")
    return "; ".join(changes)


def tokenizer_identity(recipe) -> dict | None:
    """None for byte models; for BPE the options that decide the learned merges."""
    spec = recipe.model.tokenizer
    if spec is None:
        return None
    return {"name": spec.name, "vocab_size": spec.vocab_size, "train_bytes": spec.train_bytes,
            "valid_fraction": recipe.data.valid_fraction}


def show(identity) -> str:
    """An identity as a one-line inline table, name first: {name = 'regex', every = 1, preset = 'word', ...}."""
    if identity is None:
        return "(none)"
    if isinstance(identity, dict):
        identity = {k: identity[k] for k in sorted(identity, key=lambda k: (k != "name", k))}
        shown = (f"{k} = {show(v) if isinstance(v, dict) else repr(v)}" for k, v in identity.items())
        return "{" + ", ".join(shown) + "}"
    return repr(identity)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` under a temporary name in the same folder, then rename it to ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, value) -> None:
    write_text_atomic(path, json.dumps(value, indent=1, sort_keys=True))


def read_json(path: Path, out) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as exc:
        raise PreparedDataError(f"{path}: unreadable ({exc}); {reprepare_hint(out)}") from None


def check_version(data: dict, path: Path, out) -> None:
    if data.get("format") != FORMAT:
        raise PreparedDataError(f"{path} is not a unetlm prepared-data file; {reprepare_hint(out)}")
    if data.get("version") != VERSION:
        raise PreparedDataError(
            f"{path} was written in prepared-data format version {data.get('version')!r}; this unetlm reads "
            f"version {VERSION}; {reprepare_hint(out)}"
        )


def open_shard(folder: Path, preparation: dict, out) -> dict:
    """The manifest of a finished shard of ``preparation``, after checking that every file it lists has its
    recorded size. Raises :class:`PreparationIncomplete` when the shard is not written yet."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise PreparationIncomplete(
            f"shard {folder} is missing (no {MANIFEST}): prepare has not finished; rerun the same unetlm "
            f"prepare command (with its --shard I/N) to complete it"
        )
    manifest = read_json(manifest_path, out)
    check_version(manifest, manifest_path, out)
    if manifest.get("key") != preparation["key"]:
        raise PreparedDataError(
            f"{folder} belongs to another preparation than {Path(out) / PREPARATION}; {reprepare_hint(out)}"
        )
    if manifest.get("tokenizer_sha256") != preparation["tokenizer_sha256"]:
        raise PreparedDataError(
            f"{folder} was tokenized with another {TOKENIZER} than {Path(out) / PREPARATION} records; "
            f"{reprepare_hint(out)}"
        )
    rewrite = "rerun the same unetlm prepare command to rewrite that shard"
    for entry in manifest["files"]:
        file = folder / entry["file"]
        if not file.is_file():
            raise PreparedDataError(f"{file} is missing; {rewrite}")
        size = file.stat().st_size
        if size != entry["bytes"]:
            raise PreparedDataError(
                f"{file} is truncated or damaged: {size} bytes, its manifest says {entry['bytes']}; {rewrite}"
            )
    return manifest
