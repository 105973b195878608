"""Progress display: a tqdm bar on a terminal, plain log lines otherwise (cluster logs)."""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, start: int = 0, enabled: bool = True, log_every: int = 25, unit: str = "step",
                 desc: str | None = None) -> None:
        self.total, self.step, self.log_every, self.unit, self.desc = total, start, log_every, unit, desc
        self.enabled = enabled
        self.start_time = time.perf_counter()
        self.start_step = start
        self.printed = start  # the step of the last plain log line
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit=unit, desc=desc, dynamic_ncols=True)

    def update(self, step: int, **stats: float) -> None:
        self.step = step
        text = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in stats.items()}
        if self.bar is not None:
            self.bar.set_postfix(text, refresh=False)
            self.bar.update(step - self.bar.n)
        elif self.enabled and (step - self.printed >= self.log_every or step == self.total):
            self.printed = step
            elapsed = time.perf_counter() - self.start_time
            rate = (step - self.start_step) / elapsed if elapsed > 0 else 0.0
            eta = (self.total - step) / rate if rate > 0 else float("nan")
            fields = " ".join(f"{k}={v}" for k, v in text.items())
            where = f"{self.desc}: " if self.desc else ""
            print(f"{where}{self.unit} {step}/{self.total} {fields} eta={eta:.0f}s", file=sys.stderr, flush=True)

    def write(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        elif self.enabled:
            print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
