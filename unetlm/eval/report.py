"""Evaluation results as a plain-text table and as JSON; comparisons as markdown."""
from __future__ import annotations

import json
from pathlib import Path

from unetlm.eval.cute import TASKS

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


def comparison_markdown(results: dict) -> str:
    """The results of :func:`unetlm.compare.compare` as a markdown table with the floor, the plot and the ordering."""

    def task_columns(row: dict) -> dict:
        """Choice tasks one column each; the CUTE-style tasks one column, their mean (each is in results.json)."""
        columns = {t: v[0] for t, v in row["tasks"].items() if t not in TASKS}
        cute = [row["tasks"][t][0] for t in TASKS if t in row["tasks"]]
        return columns | ({"CUTE mean": sum(cute) / len(cute)} if cute else {})

    rows = results["rows"]
    columns = {r["name"]: task_columns(r) for r in rows}
    task_names = list(dict.fromkeys(t for c in columns.values() for t in c))
    floor = results["floor"]
    head = ["recipe", "params", "MFLOPs/byte", "steps", "bytes seen", "held-out bits/byte [95% CI]", "check"]
    lines = ["| " + " | ".join(head + task_names) + " |", "|" + "---|" * (len(head) + len(task_names))]
    for r in sorted(rows, key=lambda r: r["bpb"]):
        check = "ok" if r["causal"] and not r["below_floor"] else ", ".join(
            ([] if r["causal"] else ["LEAK: later tokens change earlier logits"])
            + ([f"SUSPECT: below the floor {floor['floor']:.3f}"] if r["below_floor"] else [])
        )
        cells = [r["name"], f"{r['params']:,}", f"{r['flops_per_byte'] / 1e6:.2f}", f"{r['steps']:,}",
                 f"{r['bytes_seen']:,.0f}", f"{r['bpb']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]", check]
        cells += [f"{columns[r['name']][t]:.3f}" if t in columns[r["name"]] else "-" for t in task_names]
        lines.append("| " + " | ".join(cells) + " |")
    s = results["settings"]
    lines += ["", f"Budget {s['flops']:.3g} training FLOPs per recipe; held-out text: {rows[0]['eval_bytes']:,} bytes "
              f"never trained on. Sanity floor: {floor['factor']} x xz's {floor['xz_bits_per_byte']:.3f} bits/byte "
              f"on the held-out text given the training text = {floor['floor']:.3f}."]
    if results.get("plot"):
        lines += ["", f"![validation bits per byte against bytes and FLOPs]({results['plot']})"]
    else:
        lines += ["", "No plot: matplotlib is not installed (pip install 'unetlm[plot]')."]
    order = results["ordering"]
    if len(order["ours"]) > 1:
        known = order["published_bpb"]
        published = " < ".join(f"{n} {known[n]:.3f}" for n in sorted(known, key=known.get))
        by_name = {r["name"]: r for r in rows}
        here = " < ".join(f"{n} ({by_name[n]['published']}) {by_name[n]['bpb']:.3f}" for n in order["ours"])
        lines += ["", f"Published order (SpaceByte, PG-19, 1e19 FLOPs): {published}.", f"Here: {here}."]
        if order["holds"]:
            lines.append("The published ordering holds here.")
        else:
            for f in order["flipped"]:
                lines.append(f"Flipped: {f['better_here']} beats {f['better_published']} here"
                             + (" (their intervals overlap)." if f["cis_overlap"] else "."))
    return "\n".join(lines)
