"""The options table of a component that takes none."""
from __future__ import annotations

import attrs


@attrs.define
class NoOptions:
    """A component without options."""
