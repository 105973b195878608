"""Test setup: reproducible hypothesis profiles, one torch thread, an importable ``strategies``.

Profiles: ``ci`` (the default: derandomized, no deadline, no example database, so every run
draws the same examples) and ``dev`` (random draws, more examples); choose one with the
environment variable ``HYPOTHESIS_PROFILE``. ``UNETLM_TEST_THREADS`` sets torch's threads.
``UNETLM_CACHE`` (prepared data of plain sources) points to a fresh temporary directory.
"""
from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, settings

sys.path.insert(0, str(Path(__file__).resolve().parent))

# training prepares plain sources into a cache: the tests' cache lives and dies with the session
os.environ["UNETLM_CACHE"] = tempfile.mkdtemp(prefix="unetlm-test-cache-")
atexit.register(shutil.rmtree, os.environ["UNETLM_CACHE"], ignore_errors=True)

# Tiny models gain nothing from intra-op threads, and on a busy machine spinning threads slow
# every small matmul down many times over.
torch.set_num_threads(int(os.environ.get("UNETLM_TEST_THREADS", "1")))

_SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.differing_executors]
settings.register_profile(
    "ci", max_examples=30, deadline=None, derandomize=True, database=None,
    suppress_health_check=_SLOW_OK, print_blob=True,
)
settings.register_profile("dev", max_examples=100, deadline=None, suppress_health_check=_SLOW_OK)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

def _register_docs_plugin() -> None:
    """The splitter, pooler and upsampler of docs/plugins.md join the registry-wide tests (tests/docs_plugin.py)."""
    import importlib

    from unetlm.plugins import register_plugin

    register_plugin(importlib.import_module("docs_plugin"), "plugin docs-example")


_register_docs_plugin()
