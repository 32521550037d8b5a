"""The layer line, read from the imports: dependencies point one way, and nothing circles.

    vitrank (façade: API, CLI) → vitrank.reports → vitrank.search → vitrank.evaluators
    → vitrank.spaces → vitrank.workloads → vitrank.core → torch / timm

Every top-level folder is one subpackage of the installed namespace `vitrank` (the build
maps `search/` to `vitrank.search`, ...). A module may import its own layer and the layers
below it, never one above; no layer imports another layer's private (``_``-prefixed)
modules; no two modules import each other, directly or around a longer circle, lazy
(function-level) imports included.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
# lowest first; a module belongs to the longest prefix that names it
LAYERS = (
    "vitrank.core",
    "vitrank.workloads",
    "vitrank.spaces",
    "vitrank.evaluators",
    "vitrank.search",
    "vitrank.reports",
    "vitrank",
)


def _package_dirs() -> dict[str, Path]:
    """The build's own map of package names to folders (pyproject.toml)."""
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return {name: ROOT / folder for name, folder in setup["package-dir"].items()}


PACKAGE_DIRS = _package_dirs()
# top-level names the repository's folders would have without the namespace
FOLDER_NAMES = {path.name for path in PACKAGE_DIRS.values()} - {"vitrank"}


def _layer(module: str) -> str | None:
    best = None
    for layer in LAYERS:
        if (module == layer or module.startswith(layer + ".")) and (
            best is None or len(layer) > len(best)
        ):
            best = layer
    return best


def _module_name(path: Path) -> str:
    """The installed name of a source file (``search/_run.py`` -> ``vitrank.search._run``)."""
    owner = max(
        (name for name, folder in PACKAGE_DIRS.items() if path.is_relative_to(folder)),
        key=lambda name: len(PACKAGE_DIRS[name].parts),
    )
    parts = [owner, *path.relative_to(PACKAGE_DIRS[owner]).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources() -> list[Path]:
    return sorted({p for folder in PACKAGE_DIRS.values() for p in folder.rglob("*.py")})


MODULES = {_module_name(p): p for p in _sources()}


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every module an import statement names (absolute), with its line.

    ``from pkg import name`` names ``pkg.name`` when that is a module of the project, and
    ``pkg`` otherwise; function-level imports count like the others.
    """
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
            names = [f"{module}.{alias.name}" for alias in node.names]
            submodules = [name for name in names if name in MODULES]
            found += [(node.lineno, name) for name in submodules]
            if len(submodules) < len(names):
                found.append((node.lineno, module))
    return found


def _is_private_of(module: str, layer: str) -> bool:
    inside = module[len(layer) :].lstrip(".")
    return any(part.startswith("_") and part != "__init__" for part in inside.split("."))


def test_every_source_module_has_a_layer() -> None:
    assert len(MODULES) > 50, "package sources not found"
    for name in MODULES:
        assert _layer(name) is not None, name


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down_and_stay_public(path: Path) -> None:
    here = _layer(_module_name(path))
    assert here is not None
    rank = LAYERS.index(here)
    problems = []
    for line, module in _imports(path):
        if module.split(".")[0] in FOLDER_NAMES:
            problems.append(f"line {line}: imports {module}; installed, it is vitrank.{module}")
            continue
        target = _layer(module)
        if target is None:
            continue  # torch, timm, the standard library, ...
        if LAYERS.index(target) > rank:
            problems.append(f"line {line}: {here} imports {module} from the layer above ({target})")
        elif target != here and _is_private_of(module, target):
            problems.append(f"line {line}: {here} imports {module}, private to {target}")
    assert not problems, "\n".join(problems)


IMPORTERS = {"import_module", "find_spec", "RegistryChoices"}


def _named_modules(path: Path) -> list[tuple[int, str]]:
    """Module names a source passes as strings: to importlib, to the CLI's lazy registry
    choices, or in a lazy ``name -> module`` table."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in IMPORTERS and node.args and isinstance(node.args[0], ast.Constant):
                found.append((node.lineno, str(node.args[0].value)))
        elif isinstance(node, ast.Dict):
            found += [
                (v.lineno, v.value)
                for v in node.values
                if isinstance(v, ast.Constant) and isinstance(v.value, str)
                and (v.value in MODULES or f"vitrank.{v.value}" in MODULES)
            ]  # fmt: skip
    return found


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_modules_named_in_strings_are_installed_names(path: Path) -> None:
    wrong = [
        f"line {line}: {name!r}; installed, it is 'vitrank.{name}'"
        for line, name in _named_modules(path)
        if name.split(".")[0] in FOLDER_NAMES
    ]
    assert not wrong, "\n".join(wrong)


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        for _, module in _imports(path):
            if module in MODULES and module != name:
                graph[name].add(module)
    return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_modules_import_each_other() -> None:
    circles = _circles(_graph())
    assert not circles, "modules that import each other:\n" + "\n".join(
        " <-> ".join(c) for c in circles
    )


def test_the_circle_check_finds_a_circle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _circles(graph) == [["a", "b", "c"]]


def test_the_core_imports_nothing_of_the_project_above_it() -> None:
    for name, path in MODULES.items():
        if _layer(name) != "vitrank.core":
            continue
        for line, module in _imports(path):
            layer = _layer(module)
            assert layer in (None, "vitrank.core"), f"{path}:{line} imports {module}"


def test_the_facade_is_only_the_top() -> None:
    """The façade's folder holds the API and the CLI; every layer below has its own folder."""
    facade = {name for name in MODULES if _layer(name) == "vitrank"}
    assert facade, "no façade modules"
    assert all(MODULES[name].is_relative_to(PACKAGE_DIRS["vitrank"]) for name in facade)
    for layer in LAYERS[:-1]:
        assert not PACKAGE_DIRS[layer].is_relative_to(PACKAGE_DIRS["vitrank"]), layer
