"""Test setup: reproducible hypothesis profiles and an importable ``strategies`` module.

Profiles: ``ci`` (the default: derandomized, no deadline, no example database, so every run
draws the same examples) and ``dev`` (random draws, more examples). Choose one with the
environment variable ``HYPOTHESIS_PROFILE``.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from hypothesis import HealthCheck, settings

sys.path.insert(0, str(Path(__file__).resolve().parent))

_SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.differing_executors]
settings.register_profile(
    "ci", max_examples=30, deadline=None, derandomize=True, database=None,
    suppress_health_check=_SLOW_OK, print_blob=True,
)
settings.register_profile("dev", max_examples=100, deadline=None, suppress_health_check=_SLOW_OK)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
