"""``unetlm plot``: training loss and validation bits/byte of runs against bytes and FLOPs (one PNG).

Reads each run's metrics.jsonl; when a resumed run logged a step twice, the later record wins.
matplotlib is imported only here.
"""
from __future__ import annotations

from pathlib import Path

from unetlm.train.metrics import bits_per_byte, read_metrics


def run_curves(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (is {run_dir} a run directory?)")
    by_step = {r["step"]: r for r in read_metrics(path) if "step" in r}
    return [by_step[s] for s in sorted(by_step)]


def plot_runs(run_dirs: list[str | Path], out: str | Path) -> Path:
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'unetlm[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharey="row")
    for run in run_dirs:
        records = run_curves(run)
        label = Path(run).resolve().name
        valid = [r for r in records if "val_bpb" in r]
        for col, x in enumerate(("bytes", "flops")):
            line, = axes[0, col].plot([r[x] for r in records], [r.get("bpb", bits_per_byte(r["loss"])) for r in records],
                                      label=label, linewidth=1)
            axes[1, col].plot([r[x] for r in valid], [r["val_bpb"] for r in valid], marker="o", markersize=3,
                              label=label, color=line.get_color())
    for row, name in enumerate(("training bits/byte", "validation bits/byte")):
        for col, x in enumerate(("bytes trained", "training FLOPs")):
            ax = axes[row, col]
            ax.set_xlabel(x)
            ax.set_xscale("log")
            ax.grid(True, which="both", alpha=0.3)
            if col == 0:
                ax.set_ylabel(name)
    axes[0, 0].legend(fontsize="small")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
