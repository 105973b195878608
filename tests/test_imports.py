"""Imports run one way: every module's AST (lazy imports inside functions included) is read,
the lower floors never reach the packages built on them, and no two packages import each other."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "unetlm"
# every package (or top-level module) of unetlm, floor by floor from the ground up: a floor
# imports only its own and the floors below it
FLOORS = (
    ("core", "registry", "plugins", "builtins", "recipe", "splitters", "poolers", "upsamplers", "mixers", "data"),
    ("model",),
    ("checkpoint",),  # reads and writes checkpoints: builds models, serves training, evaluation and the API
    ("train", "eval"),
    ("sweep",),  # grids of training runs and their reports
    ("api", "compare", "bench", "cli"),
)
FLOOR = {unit: level for level, units in enumerate(FLOORS) for unit in units}

# (importing module, imported unit): known upward imports being removed, each with its reason
ALLOWED: dict[tuple[str, str], str] = {}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, name: str | None = None) -> set[str]:
    """Every ``unetlm.*`` module the file (module ``name``) imports, at any depth of the AST,
    relative imports resolved."""
    name = name or module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)  # `from unetlm import cli`
    return {m for m in found if m == "unetlm" or m.startswith("unetlm.")}


def unit(module: str) -> str | None:
    """The package (or top-level module) of ``unetlm`` a module belongs to; None for ``unetlm`` itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def real_unit(module: str) -> str | None:
    """Like :func:`unit`, but only for names that exist (``from unetlm.x import Class`` is not a unit)."""
    name = unit(module)
    if name is None:
        return None
    exists = (PACKAGE / name).is_dir() or (PACKAGE / f"{name}.py").exists()
    return name if exists else None


MODULES = {module_name(p): imported_modules(p) for p in sorted(PACKAGE.rglob("*.py"))}


def unit_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, targets in MODULES.items():
        source = unit(module)
        if source is None:  # the package's lazy public API sits on top of everything
            continue
        for target in targets:
            dest = real_unit(target)
            if dest is not None and dest != source and (module, dest) not in ALLOWED:
                graph.setdefault(source, set()).add(dest)
    return graph


def test_the_walker_sees_lazy_and_relative_imports(tmp_path):
    f = tmp_path / "mod.py"
    f.write_text("import os\nfrom unetlm.core import tokens\n\ndef later():\n    from ..model.unet import UNet\n")
    found = imported_modules(f, "unetlm.mixers.mod")
    assert {"unetlm.core", "unetlm.core.tokens", "unetlm.model.unet"} <= found and "os" not in found
    assert unit("unetlm.model.unet") == "model" and real_unit("unetlm.core.tokens") == "core"
    assert real_unit("unetlm.NoSuchThing") is None


def test_every_package_has_a_floor():
    units = {unit(m) for m in MODULES} - {None}
    assert units and units <= set(FLOOR), sorted(units - set(FLOOR))


@pytest.mark.parametrize("floor", sorted(FLOOR))
def test_floors_never_import_the_floors_above(floor):
    offenders = sorted(
        f"{module} imports {target}"
        for module, targets in MODULES.items()
        if unit(module) == floor
        for target in targets
        if FLOOR.get(real_unit(target), -1) > FLOOR[floor] and (module, real_unit(target)) not in ALLOWED
    )
    assert [m for m in MODULES if unit(m) == floor], f"no modules found under unetlm/{floor}"
    assert not offenders, offenders


def test_the_floor_test_catches_an_upward_import(tmp_path):
    """A checkpoint module importing training would be found."""
    f = tmp_path / "mod.py"
    f.write_text("from unetlm.train.loop import train\n")
    targets = imported_modules(f, "unetlm.checkpoint.mod")
    assert any(FLOOR[real_unit(t)] > FLOOR["checkpoint"] for t in targets if real_unit(t))


def test_core_imports_nothing_else_of_unetlm():
    outside = sorted(
        f"{m} imports {t}" for m, ts in MODULES.items() if unit(m) == "core" for t in ts if real_unit(t) not in (None, "core")
    )
    assert not outside, outside


def test_no_import_cycles_between_packages():
    graph = unit_graph()

    def reachable(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    cycles = sorted(f"{a} -> {b} -> ... -> {a}" for a in graph for b in graph[a] if a in reachable(b))
    assert graph and not cycles, cycles


def test_allowed_exceptions_are_still_needed():
    """An entry of ALLOWED whose import is gone must leave the list."""
    for (module, target), reason in ALLOWED.items():
        assert any(real_unit(t) == target for t in MODULES[module]), f"{module} no longer imports {target}: drop it ({reason})"


def test_training_and_evaluation_do_not_import_each_other():
    """What uses both (``unetlm.sweep``, the CLI) sits above them; ``unetlm.compare`` above the sweep."""
    graph = unit_graph()
    assert "eval" not in graph.get("train", ()) and "train" not in graph.get("eval", ())
    assert {"train", "eval"} <= graph["sweep"] and "sweep" in graph["compare"]
    assert "compare" not in graph["sweep"]
