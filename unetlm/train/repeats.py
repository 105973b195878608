"""How often a run reads its training data: a line at the start when it repeats it more than a few
times (the number, and how to prepare more)."""
from __future__ import annotations

from unetlm.data.windows import TrainingData

NOTED_EPOCHS = 4.0  # more passes over the data than this are said at the start


def epochs(data: TrainingData, steps: int) -> float:
    """Passes over the training rows of the corpus a run of ``steps`` steps repeats most (by its mixture weight)."""
    total = sum(s.weight for s in data.sources)
    return max(steps * data.batch_size * s.weight / total / max(len(s.train), 1) for s in data.sources)


def repeat_note(data: TrainingData, steps: int) -> str | None:
    """The line to show when ``steps`` steps read the data more than :data:`NOTED_EPOCHS` times, else None."""
    n = epochs(data, steps)
    if n <= NOTED_EPOCHS:
        return None
    rows = sum(len(s.train) for s in data.sources)
    return (f"note: {steps:,} steps of {data.batch_size} sequences read the {rows:,} training rows {n:,.1f} times "
            f"({n:,.0f} epochs); more data: unetlm prepare RECIPE --set data.source=... --out DATA_DIR, then "
            f"--set data.prepared=DATA_DIR")
