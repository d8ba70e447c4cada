"""The library's layers: each subpackage imports only from the layers below it, pure modules
import no I/O or torch, private modules stay inside their subpackage, every public module
declares ``__all__`` and other subpackages import only the names in it."""

from __future__ import annotations

import ast
from importlib import import_module
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
        inside = target.split(".")[1] if top == "pipeline" else None
        assert top in PURE_IMPORTS or inside == "errors" or inside in PURE, (name, target)


def test_the_library_never_imports_prefect():
    for module, path in modules().items():
        assert not any(t.split(".")[0] == "prefect" for t in imports(path)), module


ROOT = PIPELINE.parent
PACKAGES = [PIPELINE, ROOT / "flows"]


def public_modules() -> dict[str, Path]:
    """The library's and the flows' modules whose file names do not start with ``_``."""
    return {
        ".".join(p.relative_to(ROOT).with_suffix("").parts): p
        for package in PACKAGES
        for p in package.rglob("*.py")
        if not p.name.startswith("_")
    }


def dunder_all(path: Path) -> list[str] | None:
    """A module's literal ``__all__`` (``*name`` for a starred part), or None without one."""
    for node in ast.parse(path.read_text()).body:
        targets = node.targets if isinstance(node, ast.Assign) else []
        if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
            names = [e.value for e in node.value.elts if isinstance(e, ast.Constant)]
            return names + [f"*{ast.unparse(e.value)}" for e in node.value.elts
                            if isinstance(e, ast.Starred)]  # fmt: skip
    return None


def module_file(module: str) -> Path | None:
    """The file of an importable module of ours (a package's ``__init__.py``), or None."""
    base = ROOT.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def subpackage(module: str) -> str:
    """``flows`` for the flows layer, else the library layer (see :func:`layer`)."""
    return "flows" if module.split(".")[0] == "flows" else layer(module)


def cross_imports(path: Path, own: str):
    """``(target module, name)`` for each name this file takes from another subpackage's module:
    ``from pipeline.x.y import name`` and ``from pipeline.x import y`` then ``y.name``."""
    tree = ast.parse(path.read_text())
    aliases = {}
    for node in ast.walk(tree):
        if not (isinstance(node, ast.ImportFrom) and node.level == 0 and node.module):
            continue
        if node.module.split(".")[0] not in ("pipeline", "flows"):
            continue
        for a in node.names:
            submodule = f"{node.module}.{a.name}"
            if module_file(submodule) is not None:
                aliases[a.asname or a.name] = submodule
            elif subpackage(node.module) != own:
                yield node.module, a.name
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            target = aliases.get(node.value.id)
            if target is not None and subpackage(target) != own:
                yield target, node.attr


@pytest.mark.parametrize("module", sorted(public_modules()))
def test_public_modules_declare_all(module):
    assert dunder_all(public_modules()[module]) is not None, f"{module} has no __all__"


# A cross-subpackage import of a name outside the target's __all__, allowed here and why.
NOT_IN_ALL: dict[tuple[str, str], str] = {}


@pytest.mark.parametrize("module", sorted(public_modules()))
def test_cross_subpackage_imports_use_only_all(module):
    own = subpackage(module)
    outside = []
    for target, name in cross_imports(public_modules()[module], own):
        exported = dunder_all(module_file(target))
        if exported is None or (target, name) in NOT_IN_ALL:
            continue  # a private module, or an allowed exception (see NOT_IN_ALL)
        if any(e.startswith("*") for e in exported):  # built from a mapping: ask the module
            exported = import_module(target).__all__
        if name not in exported:
            outside.append(f"{name} from {target}")
    assert not outside, f"{module} imports names outside __all__: {', '.join(outside)}"
