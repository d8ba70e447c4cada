"""The library's layers: each subpackage imports only from the layers below it, pure modules
import no I/O or torch, and private modules stay inside their subpackage."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PIPELINE = Path(__file__).resolve().parents[1] / "pipeline"
# Lowest first: a layer may import from its own and from earlier ones.
LAYERS = [
    {"errors", "geometry", "resample", "config"},
    {"io"},
    {"preprocess"},
    {"models"},
    {"runtime"},
    {"output"},
    {"objects"},
    {"engine"},
    {"synthetic", "training"},
    {"api", "cli", "__main__", "__init__"},
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}
PURE = {"geometry", "resample"}
PURE_IMPORTS = {"__future__", "math", "dataclasses", "typing", "itertools", "functools",
                "collections", "numpy"}  # fmt: skip


def modules() -> dict[str, Path]:
    return {
        ".".join(p.relative_to(PIPELINE.parent).with_suffix("").parts): p
        for p in PIPELINE.rglob("*.py")
    }


def imports(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


def layer(module: str) -> str:
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


@pytest.mark.parametrize("module", sorted(modules()))
def test_imports_point_down_the_layers(module):
    own = layer(module)
    assert own in RANK, f"{module}: a subpackage the layers do not know"
    known = modules()
    for target in imports(known[module]):
        if not target.startswith("pipeline.") or target not in known:
            continue  # third-party, or a name imported from a module (checked as the module)
        other = layer(target)
        assert RANK[other] <= RANK[own], f"{module} imports {target} from a higher layer"
        private = [p for p in target.split(".")[2:] if p.startswith("_")]
        if private and other != own:
            raise AssertionError(f"{module} imports the private {target} of another layer")


@pytest.mark.parametrize("name", sorted(PURE))
def test_pure_modules_import_no_io_or_torch(name):
    for target in imports(PIPELINE / f"{name}.py"):
        top = target.split(".")[0]
        assert top in PURE_IMPORTS or target.startswith("pipeline.errors"), (name, target)


def test_the_library_never_imports_prefect():
    for module, path in modules().items():
        assert not any(t.split(".")[0] == "prefect" for t in imports(path)), module
