"""How a process that torchrun started reports an error and ends (no torch needed to ask)."""
from __future__ import annotations

import logging
import os
import signal
import sys
import time
from typing import NoReturn

REPORT_GRACE_S = 5.0  # how long a rank other than 0 leaves rank 0 to report an error they share


def several_processes() -> bool:
    """Whether this process is one of several started by torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def report_error(line: str) -> None:
    """Write ``line`` to stderr once per job, not once per rank, and never lose it.

    Under torchrun every rank meets the same bad input, and torchrun ends the others (SIGTERM) as soon as
    one fails, so a rank that reported after another had failed would never be heard. Rank 0 writes at
    once; another rank first waits :data:`REPORT_GRACE_S`, ended silently by torchrun when rank 0 failed
    too, and otherwise writes the error as its own, naming its rank."""
    rank = int(os.environ.get("RANK", "0"))
    if several_processes() and rank:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        time.sleep(REPORT_GRACE_S)
        line = f"{line} (rank {rank})"
    print(line, file=sys.stderr, flush=True)


def end_process(status: int) -> NoReturn:
    """End a torchrun worker with ``status``, output flushed, skipping interpreter finalisation.

    A gloo group outlives ``destroy_process_group`` while FSDP2's device meshes hold it, and its worker
    threads release the Python tensors of the last collectives under the GIL; one still waiting when
    finalisation starts aborts the process (SIGABRT), and the exit status (75: resume me) is lost."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(status)
