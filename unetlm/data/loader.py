"""Batches in step order, optionally prepared by loader worker processes.

Each batch is a pure function of (seed, step, rank, world), so the loader's whole state is
the next step. With ``workers`` > 0 worker w prepares steps ``start + w, start + w + workers, ...``
and torch's DataLoader hands them out round-robin, i.e. in step order.
"""
from __future__ import annotations

import signal
from collections.abc import Iterator

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from unetlm.data.packing import Batch
from unetlm.data.windows import TrainingData


class StepBatches(IterableDataset):
    def __init__(self, data: TrainingData, start: int, stop: int, rank: int, world: int) -> None:
        self.data, self.start, self.stop, self.rank, self.world = data, start, stop, rank, world

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        first, every = (0, 1) if info is None else (info.id, info.num_workers)
        for step in range(self.start + first, self.stop, every):
            yield self.data.train_batch(step, self.rank, self.world)


def _keep(batch: Batch) -> Batch:
    return batch


def _ignore_stop_signals(_worker: int) -> None:
    """Loader workers outlive SIGTERM, SIGINT and SIGUSR1 (sent to the whole process group by torchrun
    or Slurm): the training process decides when to stop, and it reads no batch after that; the
    workers end with it."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def step_batches(data: TrainingData, start: int, stop: int, rank: int = 0, world: int = 1, workers: int = 0):
    """An iterator over the local batches of steps ``start .. stop - 1``."""
    dataset = StepBatches(data, start, stop, rank, world)
    if workers == 0:
        return iter(dataset)
    loader = DataLoader(dataset, batch_size=None, num_workers=workers, collate_fn=_keep, prefetch_factor=4,
                        worker_init_fn=_ignore_stop_signals)
    return iter(loader)
