"""A plugin written only from docs/plugins.md: its splitter, pooler and upsampler skeletons are
executed as they stand on that page and registered (``docs-every``, ``docs-max``,
``docs-gated``) by :mod:`conftest`, so the registry-wide tests (contracts, chunked evaluation,
causality, cached generation by steps and after a prefill equal to the full forward) hold the
documented step protocol to account. Each skeleton's text is put in :mod:`linecache` under the
name it is compiled with, as an interactive session keeps what it runs, so that the splitter's
identity (a digest of its source) can be computed."""
from __future__ import annotations

import linecache
import re
from pathlib import Path

from unetlm.plugins import hookimpl

DOCS = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"
COMPONENTS = {
    "EverySplitter": ("splitter", "docs-every"),
    "MaxPooler": ("pooler", "docs-max"),
    "GatedUpsampler": ("upsampler", "docs-gated"),
}


def _define() -> None:
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(encoding="utf-8"), flags=re.S)
    for name in COMPONENTS:
        (source,) = [b for b in blocks if f"class {name}(" in b]
        filename = f"{DOCS}:{name}"
        linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
        exec(compile(source, filename, "exec"), globals())


_define()


@hookimpl
def unetlm_register(registry):
    for name, (kind, registered) in COMPONENTS.items():
        registry.add(kind, registered, f"docs_plugin:{name}", f"the {kind} skeleton of docs/plugins.md")
