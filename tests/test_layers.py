"""The layer line, read from the imports: dependencies point one way.

    vitrank (façade, CLI) → reports → search → evaluators → spaces → vitrank.workloads
    → vitrank.core → torch / timm

A module may import its own layer and the layers below it, never one above; no layer
imports another layer's private (``_``-prefixed) modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# lowest first; a module belongs to the longest prefix that names it
LAYERS = (
    "vitrank.core",
    "vitrank.workloads",
    "spaces",
    "evaluators",
    "search",
    "reports",
    "vitrank",
)
PACKAGES = ("vitrank", "spaces", "evaluators", "search", "reports")


def _layer(module: str) -> str | None:
    best = None
    for layer in LAYERS:
        if (module == layer or module.startswith(layer + ".")) and (
            best is None or len(layer) > len(best)
        ):
            best = layer
    return best


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every module an import statement names (absolute), with its line."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = _module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            # `from pkg import _private` names a private module too
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return found


def _sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def _is_private_of(module: str, layer: str) -> bool:
    inside = module[len(layer) :].lstrip(".")
    return any(part.startswith("_") and part != "__init__" for part in inside.split("."))


def test_every_source_module_has_a_layer() -> None:
    assert _sources(), "no package sources found"
    for path in _sources():
        assert _layer(_module_name(path)) is not None, path


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down_and_stay_public(path: Path) -> None:
    here = _layer(_module_name(path))
    assert here is not None
    rank = LAYERS.index(here)
    problems = []
    for line, module in _imports(path):
        target = _layer(module)
        if target is None:
            continue  # torch, timm, the standard library, ...
        if LAYERS.index(target) > rank:
            problems.append(f"line {line}: {here} imports {module} from the layer above ({target})")
        elif target != here and _is_private_of(module, target):
            problems.append(f"line {line}: {here} imports {module}, private to {target}")
    assert not problems, "\n".join(problems)


def test_the_core_imports_nothing_of_the_project_above_it() -> None:
    for path in (ROOT / "vitrank" / "core").rglob("*.py"):
        for line, module in _imports(path):
            layer = _layer(module)
            assert layer in (None, "vitrank.core"), f"{path}:{line} imports {module}"
