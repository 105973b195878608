"""``unetlm patches CHECKPOINT FILE``: show how a text is cut into patches.

CHECKPOINT is either an entropy model (a one-stage byte LM, read as BLT's entropy patcher
with the given thresholds) or any hierarchical model (its first splitter is shown). The text
is printed with a marker after each patch, followed by the average patch size; for entropy
patching, a table of average patch sizes at other global thresholds helps to pick one.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

import attrs
import numpy as np

from unetlm.splitters.entropy import BLT_THRESHOLD, EntropyConfig, EntropySplitter, entropy_boundaries

SWEEP = (0.5, 1.0, BLT_THRESHOLD, 1.5, 2.0, 2.5, 3.0)


def patch_splitter(checkpoint_path: str | Path, threshold=None, relative_threshold=None, max_patch=None):
    """The splitter whose patches are shown (see the module docstring)."""
    from unetlm.checkpoint.trained import load_trained

    options = {"threshold": threshold, "relative_threshold": relative_threshold, "max_patch": max_patch}
    given = {k: v for k, v in options.items() if v is not None}
    model, recipe = load_trained(checkpoint_path)
    if len(recipe.model.stages) == 1:
        return EntropySplitter(EntropyConfig(checkpoint=str(checkpoint_path), **given))
    splitter = model.splitters[0]
    if isinstance(splitter, EntropySplitter):
        return EntropySplitter(attrs.evolve(splitter.config, **given)) if given else splitter
    if given:
        raise ValueError(
            f"{', '.join(given)} only apply to entropy patching; this model's first splitter is "
            f"{recipe.model.stages[1].splitter.name!r}"
        )
    return splitter


def patch_count(boundaries: np.ndarray) -> int:
    """Patches of a document's bytes: one per boundary, plus the open one after the last boundary."""
    n = len(boundaries)
    return int(boundaries.sum()) + int(n > 0 and not boundaries[-1])


def print_patches(
    checkpoint_path: str | Path,
    file_path: str | Path,
    threshold: float | None = None,
    relative_threshold: float | None = None,
    max_patch: int | None = None,
    max_bytes: int = 4000,
    marker: str = "\u2502",
    out: TextIO | None = None,
) -> dict:
    """Print the patching of the first ``max_bytes`` bytes of ``file_path`` (0: all of them).

    Returns ``{"bytes", "patches", "mean_patch", "boundaries"}``.
    """
    out = out or sys.stdout
    data = Path(file_path).read_bytes()
    if max_bytes:
        data = data[:max_bytes]
    splitter = patch_splitter(checkpoint_path, threshold, relative_threshold, max_patch)
    parent = np.ones(len(data), dtype=bool)
    entropy = splitter.entropies(data) if isinstance(splitter, EntropySplitter) else None
    if entropy is not None:
        cfg = splitter.config
        mask = entropy_boundaries(entropy, parent, cfg.global_threshold(), cfg.relative_threshold, cfg.max_patch)
    else:
        mask = np.asarray(splitter.boundaries(data, parent), dtype=bool)

    ends = np.flatnonzero(mask) + 1
    pieces = np.split(np.frombuffer(data, dtype=np.uint8), ends)
    text = marker.join(p.tobytes().decode("utf-8", errors="backslashreplace") for p in pieces if len(p))
    out.write(text + ("" if text.endswith("\n") else "\n"))
    patches = patch_count(mask)
    mean = len(data) / max(patches, 1)
    out.write(f"\n{len(data)} bytes, {patches} patches, {mean:.2f} bytes per patch on average\n")
    if entropy is not None:
        cfg = splitter.config
        out.write("global threshold (nats) -> bytes per patch:\n")
        for value in sorted({*SWEEP, *([cfg.threshold] if cfg.threshold is not None else [])}):
            sweep = entropy_boundaries(entropy, parent, value, cfg.relative_threshold, cfg.max_patch)
            out.write(f"  {value:7.3f}  {len(data) / max(patch_count(sweep), 1):6.2f}\n")
    return {"bytes": len(data), "patches": patches, "mean_patch": mean, "boundaries": mask}
