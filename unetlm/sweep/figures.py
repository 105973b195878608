"""The report's figures (matplotlib, the optional extra ``plot``, imported only here).

- ``bpb-vs-flops.png``: every run's training and validation bits per byte against bytes and
  training FLOPs (``unetlm plot``);
- ``held-out.png``: every run's held-out bits per byte with its 95% interval, best first;
- ``scaling.png`` (several budgets): held-out bits per byte against training FLOPs on log-log
  axes, one colour per configuration, each fitted power law with its 95% band, crossovers inside
  the plotted range as dashed lines;
- ``differences.png`` (when runs differ in one axis): the paired differences with their intervals around 0.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from unetlm.sweep.expand import sci
from unetlm.sweep.fits import PowerLaw
from unetlm.train.plot import plot_runs


def draw_figures(root: Path, results: dict, fits: list[PowerLaw], run_dirs: list[Path], progress: bool) -> dict:
    """Draw the figures into ``root``; their file names by key, or ``{"missing": why}`` without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return {"missing": "matplotlib is not installed (pip install 'unetlm[plot]')"}
    matplotlib.use("Agg")
    if progress:
        print("drawing the figures", flush=True)
    figures = {"held_out": _held_out(root / "held-out.png", results["rows"]).name}
    if fits:
        figures["scaling"] = _scaling(root / "scaling.png", results["rows"], fits, results["crossovers"]).name
    if results["pairs"]:
        figures["differences"] = _differences(root / "differences.png", results["pairs"]).name
    figures["curves"] = plot_runs(run_dirs, root / "bpb-vs-flops.png").name
    return figures


def _held_out(out: Path, rows: list[dict]) -> Path:
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: r["bpb"])
    fig, ax = plt.subplots(figsize=(8, 1.4 + 0.4 * len(rows)))
    y = np.arange(len(rows))[::-1]
    err = np.array([[r["bpb"] - r["ci"][0] for r in rows], [r["ci"][1] - r["bpb"] for r in rows]])
    ax.errorbar([r["bpb"] for r in rows], y, xerr=err, fmt="o", capsize=3, color="tab:blue")
    ax.set_yticks(y, [f"{r['name']}\n{sci(r['flops'])} FLOPs" for r in rows], fontsize="x-small")
    ax.set_xlabel("held-out bits per byte (lower is better)")
    return _finish(fig, ax, out, "held-out bits per byte of each run (95% intervals)")


def _scaling(out: Path, rows: list[dict], fits: list[PowerLaw], crossings: list[dict]) -> Path:
    import matplotlib.pyplot as plt

    configs = list(dict.fromkeys(r["config"] for r in rows))
    colours = {c: plt.get_cmap("tab10")(i % 10) for i, c in enumerate(configs)}
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for config in configs:
        mine = [r for r in rows if r["config"] == config]
        x = np.array([r["flops"] for r in mine])
        y = np.array([r["bpb"] for r in mine])
        err = np.array([[r["bpb"] - r["ci"][0] for r in mine], [r["ci"][1] - r["bpb"] for r in mine]])
        ax.errorbar(x, y, yerr=err, fmt="o", capsize=3, color=colours[config], label=config, markersize=5)
    lows, highs = [r["flops"] for r in rows], [r["flops"] for r in rows]
    for fit in fits:
        grid = np.geomspace(fit.flops_range[0] / 1.5, fit.flops_range[1] * 1.5, 100)
        colour = colours[fit.config]
        label = f"{fit.config}: alpha {fit.alpha:.3f}"
        ax.plot(grid, fit.predict(grid), color=colour, linewidth=1.2, label=label)
        band = fit.band(grid)
        if band is not None:
            ax.fill_between(grid, band[0], band[1], color=colour, alpha=0.15, linewidth=0)
        lows.append(grid[0])
        highs.append(grid[-1])
    for c in crossings:
        if c["flops"] is not None and min(lows) <= c["flops"] <= max(highs):
            ax.axvline(c["flops"], color="grey", linestyle="--", linewidth=1)
            ax.annotate(f"crossover {sci(c['flops'])}", (c["flops"], 1.0), xycoords=("data", "axes fraction"),
                        rotation=90, va="top", ha="right", fontsize="small", color="grey")
    ax.set_xscale("log")
    from matplotlib.ticker import ScalarFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(ScalarFormatter())
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("held-out bits per byte")
    ax.legend(fontsize="small")
    return _finish(fig, ax, out, "held-out bits per byte against training compute (95% intervals)", which="both")


def _differences(out: Path, pairs: list[dict]) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.45 * len(pairs)))
    y = np.arange(len(pairs))[::-1]
    diff = np.array([p["difference"] for p in pairs])
    err = np.array([[p["difference"] - p["ci"][0] for p in pairs], [p["ci"][1] - p["difference"] for p in pairs]])
    colours = ["tab:grey" if p["ci"][0] <= 0 <= p["ci"][1] else "tab:blue" for p in pairs]
    for yi, d, lo, hi, colour in zip(y, diff, err[0], err[1], colours):
        ax.errorbar([d], [yi], xerr=[[lo], [hi]], fmt="o", capsize=3, color=colour)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(y, [f"{p['a']}\n - {p['b']}" for p in pairs], fontsize="x-small")
    ax.set_xlabel("A - B held-out bits per byte (negative: A better); grey: interval contains 0")
    return _finish(fig, ax, out, "paired differences on the same held-out blocks (95% intervals)")


def _finish(fig, ax, out: Path, title: str, which: str | None = None) -> Path:
    """Title and grid (along x, or on both axes' major and minor ticks), then write ``out`` and free the figure."""
    import matplotlib.pyplot as plt

    ax.set_title(title)
    if which:
        ax.grid(True, which=which, alpha=0.3)
    else:
        ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
