"""Evaluation results as a plain-text table and as JSON."""
from __future__ import annotations

import json
from pathlib import Path


_KINDS = (("bpb", "bits/byte", "bits_per_byte", "bytes"), ("choice", "accuracy", "accuracy", "items"),
          ("cute", "exact match", "exact_match", "items"))


def format_table(result: dict) -> str:
    """One line per row: kind, name, sample size, score and its 95% interval."""
    header = ("kind", "name", "n", "score", "95% CI")
    lines = []
    for kind, label, key, size in _KINDS:
        for row in result.get(kind, []):
            low, high = row["ci"]
            lines.append((label, row["name"], f"{row[size]:,}", f"{row[key]:.4f}", f"[{low:.4f}, {high:.4f}]"))
    if not lines:
        return "nothing evaluated (give --bpb, --choice, --cute-words or --cute-text)"
    widths = [max(len(h), *(len(r[i]) for r in lines)) for i, h in enumerate(header)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(header)] + [fmt(r) for r in lines])


def write_json(result: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return path
