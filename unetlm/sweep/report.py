"""``unetlm sweep report SWEEP_DIR``: the runs scored alike, compared, fitted, drawn.

Writes ``results.json`` (everything), ``results.md`` (the tables below and the figures) and the
figures of :mod:`unetlm.sweep.figures`:

- every finished run: parameters, FLOPs, held-out bits per byte with its 95% interval, the leak
  checks, tasks; runs not finished are listed with their state (a failed run is not hidden);
- differences between runs that differ in one axis only (same budget, same seed), on the same
  held-out blocks, with a paired bootstrap interval: is it significant?
- with ``seeds`` > 1, each configuration's spread over seeds;
- with several budgets, a power law per configuration and the budgets where two cross.
"""
from __future__ import annotations

import itertools
import json
import statistics
from pathlib import Path

from unetlm.core.errors import RunError
from unetlm.eval.bootstrap import paired_bootstrap_ci
from unetlm.eval.cute import TASKS
from unetlm.sweep.directory import SweepDir
from unetlm.sweep.expand import BUDGET, RECIPE, SEED, sci
from unetlm.sweep.fits import crossover, fit_power_law
from unetlm.sweep.score import HeldOut, score_run
from unetlm.sweep.status import sweep_status

# SpaceByte (Slagle, 2024), Table 1: PG-19 bits per byte at 1e19 training FLOPs.
PUBLISHED = {
    "subword transformer": 0.989,
    "SpaceByte": 1.009,
    "MegaByte": 1.083,
    "window-attention transformer": 1.089,
    "byte transformer": 1.138,
}
COUNTERPARTS = {"bpe": "subword transformer", "spacebyte": "SpaceByte", "megabyte": "MegaByte",
                "window": "window-attention transformer", "au1": "byte transformer"}


def published_ordering(rows: list[dict]) -> dict:
    """Our order of the runs with a published counterpart, against the published order."""
    ours = sorted((r for r in rows if r.get("published")), key=lambda r: r["bpb"])
    theirs = sorted((r for r in ours), key=lambda r: PUBLISHED[r["published"]])
    flipped = []
    for i, a in enumerate(theirs):
        for b in theirs[i + 1 :]:
            if a["bpb"] > b["bpb"]:  # published: a better than b; here: worse
                overlap = a["ci"][0] <= b["ci"][1]
                flipped.append({"better_published": a["name"], "better_here": b["name"], "cis_overlap": overlap})
    return {"ours": [r["name"] for r in ours], "published": [r["name"] for r in theirs], "flipped": flipped,
            "holds": not flipped and len(ours) > 1,
            "published_bpb": {r["published"]: PUBLISHED[r["published"]] for r in ours}}


def paired_differences(rows: list[dict], seed: int = 0) -> list[dict]:
    """A - B bits per byte with a paired 95% interval, for every two runs that differ in one axis
    (the recipe or one grid axis) at the same budget and seed."""
    pairs = []
    for a, b in itertools.combinations(rows, 2):
        la, lb = a["labels"], b["labels"]
        differing = [k for k in dict.fromkeys([*la, *lb]) if la.get(k) != lb.get(k)]
        if len(differing) != 1 or differing[0] in (BUDGET, SEED):
            continue
        diff, low, high = paired_bootstrap_ci(a["block_bits"], a["block_bytes"], b["block_bits"], b["block_bytes"],
                                              seed=seed)
        verdict = "not significant" if low <= 0 <= high else (f"{a['name']} better" if high < 0 else f"{b['name']} better")
        pairs.append({"axis": differing[0], "a": a["name"], "b": b["name"], "difference": diff, "ci": [low, high],
                      "verdict": verdict})
    return pairs


def seed_spread(rows: list[dict]) -> list[dict]:
    """Per configuration and budget with several seeds: mean, standard deviation, range of bits per byte."""
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        groups.setdefault((r["config"], r["budget"]), []).append(r["bpb"])
    return [{"config": c, "budget": b, "seeds": len(v), "mean": statistics.fmean(v), "sd": statistics.stdev(v),
             "min": min(v), "max": max(v)} for (c, b), v in groups.items() if len(v) > 1]


def scaling(rows: list[dict]) -> tuple[list, list]:
    """A power law per configuration swept over budgets, and every two laws' crossover."""
    by_config: dict[str, list[dict]] = {}
    for r in rows:
        if r["budget"] is not None:
            by_config.setdefault(r["config"], []).append(r)
    fits = [f for c, rs in by_config.items() if (f := fit_power_law(c, [r["flops"] for r in rs], [r["bpb"] for r in rs]))]
    return fits, [crossover(a, b) for a, b in itertools.combinations(fits, 2)]


def report(root: str | Path, progress: bool = True) -> dict:
    """Score every finished run of the sweep in ``root`` (cached), then write the results and figures."""
    from unetlm.sweep.figures import draw_figures

    sweep = SweepDir.open(root)
    statuses = {s.name: s for s in sweep_status(sweep)}
    done = [run for run in sweep.runs if statuses[run.name].state == "done"]
    if not done:
        raise RunError(f"no run of {root} has finished yet; see `unetlm sweep status {root}`")
    held = HeldOut(sweep, progress)
    rows = []
    for i, run in enumerate(done):
        if progress:
            print(f"scoring {run.name} ({i + 1}/{len(done)})", flush=True)
        row = score_run(sweep, run, held, progress)
        only_recipe = set(run.labels) == {RECIPE}
        rows.append(row | {"published": COUNTERPARTS.get(run.labels[RECIPE]) if only_recipe else None})
    fits, crossings = scaling(rows)
    results = {
        "sweep": sweep.spec.name, "settings": {"budgets": sweep.spec.budgets, "seeds": sweep.spec.seeds,
                                               "data": sweep.data, "report": sweep.spec.to_dict()["report"]},
        "floor": held.floor,
        "rows": [{k: v for k, v in r.items() if k not in ("block_bits", "block_bytes", "stamp")} for r in rows],
        "unscored": [{"name": s.name, "state": s.state, "detail": s.detail} for s in statuses.values()
                     if s.state != "done"],
        "pairs": paired_differences(rows, sweep.spec.report.seed),
        "seeds": seed_spread(rows),
        "fits": [f.to_dict() for f in fits],
        "crossovers": [c.to_dict() for c in crossings],
        "ordering": published_ordering(rows),
    }
    results["figures"] = draw_figures(sweep.root, results, fits, [sweep.run_dir(r.name) for r in done], progress)
    (sweep.root / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (sweep.root / "results.md").write_text(results_markdown(results) + "\n")
    return results


def _task_columns(row: dict) -> dict:
    """Choice tasks one column each; the CUTE-style tasks one column, their mean (each is in results.json)."""
    columns = {t: v[0] for t, v in row["tasks"].items() if t not in TASKS}
    cute = [row["tasks"][t][0] for t in TASKS if t in row["tasks"]]
    return columns | ({"CUTE mean": sum(cute) / len(cute)} if cute else {})


def _check(row: dict, floor: dict) -> str:
    if row["causal"] and not row["below_floor"]:
        return "ok"
    return ", ".join(([] if row["causal"] else ["LEAK: later tokens change earlier logits"])
                     + ([f"SUSPECT: below the floor {floor['floor']:.3f}"] if row["below_floor"] else []))


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]


def results_markdown(results: dict) -> str:
    """The results of :func:`report` as markdown: runs, differences, seeds, scaling, figures, orderings."""
    rows, floor = results["rows"], results["floor"]
    columns = {r["name"]: _task_columns(r) for r in rows}
    tasks = list(dict.fromkeys(t for c in columns.values() for t in c))
    head = ["run", "params", "MFLOPs/byte", "steps", "bytes seen", "held-out bits/byte [95% CI]", "check"]
    table = []
    for r in sorted(rows, key=lambda r: (r.get("budget") or 0, r["bpb"])):
        cells = [r["name"], f"{r['params']:,}", f"{r['flops_per_byte'] / 1e6:.2f}", f"{r['steps']:,}",
                 f"{r['bytes_seen']:,.0f}", f"{r['bpb']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]", _check(r, floor)]
        table.append(cells + [f"{columns[r['name']][t]:.3f}" if t in columns[r["name"]] else "-" for t in tasks])
    title = results.get("sweep") or "comparison"
    lines = [f"# {title}", "", *_table(head + tasks, table)]
    settings = results["settings"]
    budgets = settings.get("budgets") or []
    spent = ", ".join(sci(b) for b in budgets) if budgets else "as the recipes' steps set"
    lines += ["", f"Training FLOPs per run: {spent}. Held-out text: {rows[0]['eval_bytes']:,} bytes never trained on; "
              f"intervals resample blocks of {settings.get('report', {}).get('block_bytes', 512)} bytes of it. "
              f"Sanity floor: {floor['factor']} x xz's {floor['xz_bits_per_byte']:.3f} bits/byte on the held-out text "
              f"given the training text = {floor['floor']:.3f}."]
    unscored = results.get("unscored") or []
    if unscored:
        lines += ["", "Not scored (not finished):", ""] + [f"- {u['name']}: {u['state']}, {u['detail']}" for u in unscored]
    lines += _differences(results.get("pairs") or [])
    lines += _seeds(results.get("seeds") or [])
    lines += _scaling(results.get("fits") or [], results.get("crossovers") or [])
    lines += _figures(results.get("figures") or {})
    lines += _ordering(results.get("ordering") or published_ordering(rows), rows)
    return "\n".join(lines)


def _differences(pairs: list[dict]) -> list[str]:
    if not pairs:
        return []
    rows = [[p["axis"], p["a"], p["b"], f"{p['difference']:+.4f} [{p['ci'][0]:+.4f}, {p['ci'][1]:+.4f}]", p["verdict"]]
            for p in pairs]
    return ["", "## Differences on the same held-out blocks", "",
            "Runs that differ in one axis only; A - B bits per byte with a paired bootstrap 95% interval "
            "(the same blocks of text drawn for both). An interval that excludes 0 is significant for these "
            "weights; the seeds' spread says how much a retrained run would move.", "",
            *_table(["axis", "A", "B", "A - B [95% CI]", "verdict"], rows)]


def _seeds(spread: list[dict]) -> list[str]:
    if not spread:
        return []
    rows = [[s["config"], "-" if s["budget"] is None else sci(s["budget"]), str(s["seeds"]), f"{s['mean']:.4f}",
             f"{s['sd']:.4f}", f"{s['min']:.4f} - {s['max']:.4f}"] for s in spread]
    return ["", "## Spread over seeds", "", "Each configuration trained with other seeds (initialisation and data order).",
            "", *_table(["configuration", "budget", "seeds", "mean bits/byte", "sd", "range"], rows)]


def _scaling(fits: list[dict], crossings: list[dict]) -> list[str]:
    if not fits:
        return []
    rows = [[f["config"], f"{f['a']:.4g}", f"{f['alpha']:.4f}" + (
        f" [{f['alpha_ci'][0]:.4f}, {f['alpha_ci'][1]:.4f}]" if f["alpha_ci"] else " (two points: no interval)"),
        str(f["points"])] for f in fits]
    lines = ["", "## Scaling with compute", "",
             "Held-out bits per byte = a x FLOPs^-alpha, least squares on logarithms; the interval is Student's t "
             "over the scatter around the line.", "", *_table(["configuration", "a", "alpha [95% CI]", "runs"], rows), ""]
    for c in crossings:
        if c["flops"] is None:
            lines.append(f"- {c['first']} and {c['second']}: parallel; {c['better_below']} is better at every budget.")
            continue
        other = c["second"] if c["better_below"] == c["first"] else c["first"]
        ci = ""
        if c["ci"]:
            vague = c["ci"][0] < c["flops"] / 100 or c["ci"][1] > c["flops"] * 100
            ci = f" (95% interval {sci(c['ci'][0])} to {sci(c['ci'][1])}" + (
                ": these runs do not pin it down)" if vague else ")")
        where = "inside" if c["within"] else "outside (an extrapolation of)"
        lines.append(f"- {c['first']} and {c['second']} cross at {sci(c['flops'])} FLOPs{ci}, {where} the budgets "
                     f"swept: {c['better_below']} is better below, {other} above.")
    return lines


CAPTIONS = {
    "held_out": "held-out bits per byte of each run with its 95% interval, best first",
    "scaling": "held-out bits per byte against training FLOPs (log-log), one colour per configuration, with its "
               "fitted power law and 95% band",
    "differences": "paired differences in held-out bits per byte between runs that differ in one axis, 95% intervals",
    "curves": "training and validation bits per byte of every run against bytes and training FLOPs",
}


def _figures(figures: dict) -> list[str]:
    if figures.get("missing"):
        return ["", f"No figures: {figures['missing']}."]
    return [line for key, caption in CAPTIONS.items() if key in figures
            for line in ("", f"![{caption}]({figures[key]})", "", f"*{caption[0].upper() + caption[1:]}.*")]


def _ordering(order: dict, rows: list[dict]) -> list[str]:
    if len(order["ours"]) < 2:
        return []
    known = order["published_bpb"]
    published = " < ".join(f"{n} {known[n]:.3f}" for n in sorted(known, key=known.get))
    by_name = {r["name"]: r for r in rows}
    here = " < ".join(f"{n} ({by_name[n]['published']}) {by_name[n]['bpb']:.3f}" for n in order["ours"])
    lines = ["", f"Published order (SpaceByte, PG-19, 1e19 FLOPs): {published}.", f"Here: {here}."]
    if order["holds"]:
        lines.append("The published ordering holds here.")
    for f in order["flipped"]:
        lines.append(f"Flipped: {f['better_here']} beats {f['better_published']} here"
                     + (" (their intervals overlap)." if f["cis_overlap"] else "."))
    return lines
