"""The layer rules of docs/ARCHITECTURE.md, checked on every import of every module (deferred ones too), and no
import cycle. The table in the doc is the data: a rule changes there, in one place.

Each check is also run on a copy of the tree with one forbidden import planted (the defects the rules were written
against), so the test is seen to fail on each."""

from __future__ import annotations

import ast
import fnmatch
import functools
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ARCHITECTURE = REPO / "docs" / "ARCHITECTURE.md"
# where each importable tree lives: relora_dist itself, and the two folders setup.py maps into it
TREES = {"relora_dist": "relora_dist", "relora_dist.kernels": "kernels/fused", "relora_dist.benchmarks": "benchmarks"}
PREFIXES = {"relora_dist.kernels": "kernels/", "relora_dist.benchmarks": "benchmarks/", "relora_dist": ""}


@dataclass
class Layer:
    name: str
    patterns: list[str]
    may: set[str]
    must_not: set[str]


def read_layers(doc: Path = ARCHITECTURE) -> list[Layer]:
    """The rows of the table under '## Layers and what each may import'."""
    text = doc.read_text()
    section = text[text.index("## Layers and what each may import"):]
    section = section[: section.index("\n## ", 4)]
    layers = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or cells[0] in ("layer", "---") or not cells[1].startswith("`"):
            continue
        names = lambda cell: {n.strip() for n in cell.split(",") if n.strip()}  # noqa: E731
        layers.append(Layer(cells[0], re.findall(r"`([^`]+)`", cells[1]), names(cells[2]), names(cells[3])))
    assert layers, f"no layer table found in {doc}"
    return layers


def module_files(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for relora_dist and the folders mapped into it."""
    out = {}
    for package, folder in TREES.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = list(path.relative_to(root / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if package == "relora_dist" and parts and parts[0] in ("kernels", "benchmarks"):
                continue
            out[".".join([package, *parts])] = path
    return out


def layer_path(module: str, files: dict[str, Path]) -> str:
    """The path the table names a module by: relative to relora_dist/, with kernels/ and benchmarks/ for the two
    folders setup.py maps into it."""
    path = files[module]
    for package in ("relora_dist.kernels", "relora_dist.benchmarks", "relora_dist"):
        if module == package or module.startswith(package + "."):
            depth = module.count(".") - package.count(".") + (path.name == "__init__.py")  # folders below the tree
            return PREFIXES[package] + "/".join(path.parts[len(path.parts) - depth:] if depth else [path.name])
    raise ValueError(module)


@functools.lru_cache(maxsize=None)
def _raw_imports(text: str, package: str) -> tuple[tuple[str, str | None, int], ...]:
    """(absolute module, imported name or None, line) of every relora_dist import in a source text."""
    found = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names if alias.name.startswith("relora_dist")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("relora_dist"):
                found += [(target, alias.name, node.lineno) for alias in node.names]
    return tuple(found)


def imports_of(module: str, path: Path, files: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported relora_dist module, line) for every import in the file, at any depth. `from pkg import name`
    imports pkg.name when that is a module, else pkg."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    resolved = []
    for target, name, line in _raw_imports(path.read_text(), package):
        if name is not None and f"{target}.{name}" in files:
            target = f"{target}.{name}"
        while target not in files and "." in target:  # an attribute path: its module
            target = target.rpartition(".")[0]
        if target in files and target != module:
            resolved.append((target, line))
    return resolved


def owner(path: str, layers: list[Layer]) -> tuple[Layer, str] | None:
    """The layer a module path falls under (the longest pattern wins; `*` is one folder) and its unit: the folder or
    file the pattern matched (`methods/*/` matches one family's folder, so two families are two units)."""
    matches = []
    for layer in layers:
        for pattern in layer.patterns:
            depth = pattern.count("/")
            unit = "/".join(path.split("/")[:depth]) + "/" if pattern.endswith("/") else path
            # equal numbers of "/" on both sides, so `*` never spans a folder
            folder = pattern.endswith("/") and path.count("/") >= depth
            if (folder or path.count("/") == depth) and fnmatch.fnmatchcase(unit, pattern):
                matches.append((len(pattern), layer, unit))
    return max(matches, key=lambda m: m[0])[1:] if matches else None


def violations(root: Path = REPO, doc: Path = ARCHITECTURE) -> list[str]:
    layers, files = read_layers(doc), module_files(root)
    by_name = {layer.name: layer for layer in layers}
    unknown = {n for layer in layers for n in layer.may | layer.must_not} - set(by_name) - {"every layer", "its siblings"}
    assert not unknown, f"the table names layers it does not define: {unknown}"
    problems = []
    for module, path in files.items():
        here = owner(layer_path(module, files), layers)
        if here is None:
            problems.append(f"{layer_path(module, files)}: in no layer of docs/ARCHITECTURE.md")
            continue
        layer, unit = here
        for target, line in imports_of(module, path, files):
            there = owner(layer_path(target, files), layers)
            if there is None:
                continue  # reported as its own module
            other, other_unit = there
            where = f"{layer_path(module, files)}:{line} imports {target} ({other.name})"
            if other_unit == unit:
                continue
            if other is layer and "its siblings" in layer.must_not:
                problems.append(f"{where}: {layer.name} must not import one another")
            elif other.name in layer.must_not:
                problems.append(f"{where}: {layer.name} must not import {other.name}")
            elif other is not layer and other.name not in layer.may and "every layer" not in layer.may:
                problems.append(f"{where}: {layer.name} may import only {', '.join(sorted(layer.may)) or 'nothing else'}")
    return problems


def cycles(root: Path = REPO) -> list[list[str]]:
    """Every set of modules that import one another in a circle (Tarjan's strongly connected components)."""
    files = module_files(root)
    graph = {m: sorted({t for t, _ in imports_of(m, p, files)}) for m, p in files.items()}
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_every_import_follows_the_layer_table():
    assert violations() == []


def test_no_import_cycle():
    assert cycles() == []


def test_every_module_is_in_the_table():
    files = module_files(REPO)
    assert len(files) > 100
    layers = read_layers()
    assert all(owner(layer_path(m, files), layers) for m in files)


@pytest.fixture
def tree(tmp_path):
    """A copy of the sources the checks read."""
    for folder in (*TREES.values(), "docs"):
        shutil.copytree(REPO / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__", "results", "*.json"))
    return tmp_path


def plant(tree: Path, file: str, line: str, *, deferred: bool = False) -> None:
    path = tree / file
    text = path.read_text()
    if deferred:  # inside a function, where the circle once hid
        path.write_text(text + f"\n\ndef _planted():\n    {line}\n")
    else:
        path.write_text(line + "\n" + text)


# The imports issue #33 found, each planted back into a copy of today's tree.
PLANTED_VIOLATIONS = [
    ("relora_dist/perf/model.py", "from ..train.config import RunConfig", "perf must not import loop"),
    ("relora_dist/methods/switchlora/switching.py", "from ..relora.merge import lora_delta", "method families must not import one another"),
    ("relora_dist/backends/fsdp2.py", "from ..methods.relora import layer", "engines must not import method families"),
    ("relora_dist/train/trainer.py", "from ..methods.galore.method import GaLore", "loop must not import method families"),
    ("relora_dist/data/store.py", "from ..models import llama_config", "data may import only nothing else"),
]


@pytest.mark.parametrize("file,line,message", PLANTED_VIOLATIONS, ids=[v[0].split("/", 1)[1] for v in PLANTED_VIOLATIONS])
def test_a_planted_import_against_the_table_is_found(tree, file, line, message):
    assert violations(tree, tree / "docs" / "ARCHITECTURE.md") == []
    plant(tree, file, line)
    found = violations(tree, tree / "docs" / "ARCHITECTURE.md")
    assert len(found) == 1 and message in found[0], found


def test_a_planted_deferred_circle_is_found(tree):
    """The GaLore optimizer and its flat-partition step once imported each other, one import deferred to hide it."""
    plant(tree, "relora_dist/methods/galore/flat_partition.py", "from .optimizer import ProjectedAdamW", deferred=True)
    found = cycles(tree)
    assert any({"relora_dist.methods.galore.flat_partition", "relora_dist.methods.galore.optimizer"} <= set(c) for c in found), found


def test_a_module_outside_the_table_is_found(tree):
    (tree / "relora_dist" / "switching.py").write_text("import torch\n")
    assert violations(tree, tree / "docs" / "ARCHITECTURE.md") == ["switching.py: in no layer of docs/ARCHITECTURE.md"]
