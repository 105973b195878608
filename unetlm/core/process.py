"""The end of a process that torchrun started (no torch needed to ask)."""
from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn


def several_processes() -> bool:
    """Whether this process is one of several started by torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def end_process(status: int) -> NoReturn:
    """End a torchrun worker with ``status``, output flushed, skipping interpreter finalisation.

    A gloo group outlives ``destroy_process_group`` while FSDP2's device meshes hold it, and its worker
    threads release the Python tensors of the last collectives under the GIL; one still waiting when
    finalisation starts aborts the process (SIGABRT), and the exit status (75: resume me) is lost."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(status)
