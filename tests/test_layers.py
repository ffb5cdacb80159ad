"""The package's layers only point down, and no modules import each other in a circle.

The layer order, written here once (README "Layout" and DEVELOPERS.md describe it). Each top-level part of
`tinyseg` belongs to one layer; a module may import its own layer and the ones below, never one above. Every
import counts, including those inside functions (lazy imports are still dependencies), except the one
deliberate lazy import of the API in `tinyseg/__init__.py` (so that `tinyseg.Predictor` works).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tinyseg"

LAYERS = [
    ["tinyseg", "tinyseg.runtime"],  # atomic writes, checkpoint I/O, devices and ranks, precision, metrics log
    ["tinyseg.config", "tinyseg.config_rules"],
    ["tinyseg.data", "tinyseg.model", "tinyseg.evaluation"],
    ["tinyseg.inference"],  # predict, TTA, and the writers of results (submission, overlays, ONNX)
    ["tinyseg.training"],  # the training job, cross-validation, its report
    ["tinyseg.api", "tinyseg.commands", "tinyseg.cli", "tinyseg.demo", "tinyseg.__main__"],
]
ALLOWED = {("tinyseg", "tinyseg.api")}  # tinyseg.__getattr__: the lazy `from tinyseg import Predictor`


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, known: set[str], name: str = "", top_level_only: bool = False) -> set[str]:
    """The tinyseg modules a file imports, anywhere in it (`from .x import y` counts y when it is a module;
    `from tinyseg import Predictor` counts tinyseg.api, which serves it lazily)."""
    name = name or module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    tree = ast.parse(path.read_text())
    for node in (tree.body if top_level_only else ast.walk(tree)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known
                       else "tinyseg.api" if base == "tinyseg" and alias.name != "__version__" else base
                       for alias in node.names]
        else:
            continue
        found.update(target for target in targets if target in known and target != name)
    return found


def import_graph() -> dict[str, set[str]]:
    files = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {name: imported_modules(path, set(files)) for name, path in files.items()}


def layer_of(module: str) -> int:
    # the root package is its own unit (its __init__ only); every other module belongs to a listed part
    best = max((unit for layer in LAYERS for unit in layer
                if module == unit or (unit != "tinyseg" and module.startswith(unit + "."))), key=len, default=None)
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return next(index for index, layer in enumerate(LAYERS) if best in layer)


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
                  for a, targets in graph.items() for b in targets
                  if layer_of(b) > layer_of(a) and (a, b) not in ALLOWED)


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), each a circle of imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if (node, target) in ALLOWED:
                continue
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_every_module_has_a_layer_and_imports_only_downwards():
    graph = import_graph()
    assert len(graph) > 40 and "tinyseg.training.trainer" in graph
    assert upward_imports(graph) == []


def test_no_modules_import_each_other_in_a_circle():
    assert circles(import_graph()) == []


def test_the_allowed_upward_import_is_lazy_and_no_import_hides_from_the_walk():
    for importer, imported in ALLOWED:
        path = PACKAGE / "__init__.py" if importer == "tinyseg" else None
        assert imported not in imported_modules(path, {imported}, importer, top_level_only=True)
    # imports by name at run time would be invisible to the walk above
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                called = getattr(node.func, "attr", getattr(node.func, "id", ""))
                assert called not in ("import_module", "__import__"), f"{path}:{node.lineno}"


def test_a_new_module_outside_every_listed_part_has_no_layer():
    import pytest

    with pytest.raises(AssertionError, match="in no layer"):
        layer_of("tinyseg.newthing")


def test_the_checks_catch_an_upward_import_and_a_circle():
    # what the package had before this layering: the checkpoint reading data/, cli <-> commands
    graph = {"tinyseg.runtime.checkpoint": {"tinyseg.data.coco"}, "tinyseg.data.coco": set(),
             "tinyseg.cli": {"tinyseg.commands"}, "tinyseg.commands": {"tinyseg.cli", "tinyseg.training.trainer"},
             "tinyseg.training.trainer": set(), "tinyseg": {"tinyseg.api"}, "tinyseg.api": set()}
    assert upward_imports(graph) == ["tinyseg.runtime.checkpoint (layer 0) imports tinyseg.data.coco (layer 2)"]
    assert circles(graph) == [["tinyseg.cli", "tinyseg.commands"]]


def test_imports_inside_functions_count(tmp_path):
    source = tmp_path / "probe.py"
    source.write_text("def late():\n    from ..training import trainer\n")
    known = {"tinyseg.training.trainer", "tinyseg.training", "tinyseg.runtime.probe"}
    assert imported_modules(source, known, "tinyseg.runtime.probe") == {"tinyseg.training.trainer"}
    source.write_text("def late():\n    from tinyseg import train, __version__\n")
    assert imported_modules(source, known | {"tinyseg", "tinyseg.api"}, "tinyseg.runtime.probe") == {"tinyseg", "tinyseg.api"}


def test_no_file_is_over_400_lines():
    """DEVELOPERS.md's rule: a file that long holds two things (trainer.py and data/coco.py had crept past)."""
    root = PACKAGE.parent
    long = [f"{path.relative_to(root)}: {count}" for folder in ("tinyseg", "tests", "benchmarks")
            for path in sorted((root / folder).rglob("*.py")) if (count := len(path.read_text().splitlines())) > 400]
    assert long == []
