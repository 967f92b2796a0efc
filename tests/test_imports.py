"""The house rules of the import graph, read from the source with `ast` (nothing is imported to check them):

- floors: `gpt2` imports nothing of ours, `data_pipelines` only `gpt2`, `train` both, `launch` any of them;
- no import circles between our modules (imports inside functions count);
- no module takes another's `_private` names: not `from x import _y`, not `x._y` on a module `x` of ours, not
  `obj._y` / `getattr(obj, "_y")` on any object but `self` / `cls` / a class of the same module (a shared helper is
  public, on the lower floor).

The checker itself is tested on a small tree that breaks every rule, so the checks can fail.
"""

from __future__ import annotations

import ast
import importlib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLOORS = ("gpt2", "data_pipelines", "train", "launch")  # lowest first: a module imports its own floor or lower ones


@dataclass
class Module:
    name: str  # dotted, a package by its own name ("train.callbacks")
    path: Path
    tree: ast.Module
    imports: dict[str, int] = field(default_factory=dict)  # our module -> first line importing it
    private: list[str] = field(default_factory=list)  # "line N: what"


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def scan(root: Path, floors: tuple[str, ...] = FLOORS) -> dict[str, Module]:
    """Every module of the `floors` packages under `root`, with the modules of ours each imports and its private
    reach-ins."""
    mods: dict[str, Module] = {}
    for top in floors:
        for f in sorted((root / top).rglob("*.py")):
            parts = f.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            mods[name] = Module(name, f, ast.parse(f.read_text(), str(f)))
    for mod in mods.values():
        _resolve(mod, mods, floors)
    return mods


def _resolve(mod: Module, mods: dict[str, Module], floors: tuple[str, ...]) -> None:
    package = mod.name if mod.path.name == "__init__.py" else mod.name.rpartition(".")[0]
    ours = {}  # local name -> our module it is bound to (import x.y as z; from x import y)
    external = set()  # local names bound to modules that are not ours (torch, np, ...)

    def ours_target(dotted: str) -> str | None:
        while dotted and dotted not in mods:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    def add(target: str, line: int) -> None:
        if target != mod.name:
            mod.imports.setdefault(target, line)

    for node in ast.walk(mod.tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] not in floors:
                    external.add((a.asname or a.name).split(".")[0])
                    continue
                target = ours_target(a.name)
                add(target, node.lineno)
                ours[a.asname or a.name.split(".")[0]] = target if a.asname else a.name.split(".")[0]
                if any(_is_private(p) for p in a.name.split(".")):
                    mod.private.append(f"line {node.lineno}: import {a.name}")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] not in floors:
                external.update(a.asname or a.name for a in node.names)
                continue
            if any(_is_private(p) for p in source.split(".")):
                mod.private.append(f"line {node.lineno}: from {source} import ...")
            for a in node.names:
                submodule = f"{source}.{a.name}"
                target = submodule if submodule in mods else ours_target(source)
                add(target, node.lineno)
                if submodule in mods:
                    ours[a.asname or a.name] = submodule
                if _is_private(a.name):
                    mod.private.append(f"line {node.lineno}: from {source} import {a.name}")
    own_classes = {n.name for n in ast.walk(mod.tree) if isinstance(n, ast.ClassDef)}  # `Cls._x` in Cls's module
    for node in ast.walk(mod.tree):
        if isinstance(node, ast.Attribute) and _is_private(node.attr):
            owner = node.value
            root = owner
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(owner, ast.Name) and owner.id in ("self", "cls", *own_classes):
                continue
            if isinstance(owner, ast.Call) and isinstance(owner.func, ast.Name) and owner.func.id == "super":
                continue
            if isinstance(root, ast.Name) and root.id in external and root.id not in ours:
                continue  # a library's private API (e.g. torch._foreach_norm): not another module of ours
            what = f"{ours[owner.id]}.{node.attr}" if isinstance(owner, ast.Name) and owner.id in ours else (
                f"{ast.unparse(owner)}.{node.attr}")
            mod.private.append(f"line {node.lineno}: {what}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in (
                "getattr", "hasattr", "setattr", "delattr") and len(node.args) >= 2:
            owner, attr = node.args[0], node.args[1]
            if (isinstance(attr, ast.Constant) and isinstance(attr.value, str) and _is_private(attr.value)
                    and not (isinstance(owner, ast.Name) and owner.id in ("self", "cls"))):
                mod.private.append(f"line {node.lineno}: {node.func.id}({ast.unparse(owner)}, {attr.value!r})")


def circles(mods: dict[str, Module]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan): each is an import circle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in mods[v].imports:
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
                found.append(sorted(component))

    for v in sorted(mods):
        if v not in index:
            visit(v)
    return found


def floor_breaks(mods: dict[str, Module], floors: tuple[str, ...] = FLOORS) -> list[str]:
    level = {name: i for i, name in enumerate(floors)}
    return [f"{m.name} imports {t} (line {line})" for m in mods.values() for t, line in m.imports.items()
            if level[t.split(".")[0]] > level[m.name.split(".")[0]]]


@pytest.fixture(scope="module")
def repo() -> dict[str, Module]:
    return scan(ROOT)


def test_no_import_circles(repo):
    assert circles(repo) == []


def test_floors_only_import_down(repo):
    assert floor_breaks(repo) == []


def test_no_private_names_taken_from_another_module(repo):
    found = {m.name: m.private for m in repo.values() if m.private}
    assert found == {}


def test_every_class_path_in_conf_imports():
    """conf/ names classes by dotted path (Hydra `_target_`, strategy.wrap_class): each must exist where it says."""
    paths = set()
    for f in (ROOT / "conf").rglob("*.yaml"):
        for line in f.read_text().splitlines():
            key, _, value = line.partition(":")
            value = value.split("#")[0].strip().strip("'\"")
            if key.strip() in ("_target_", "wrap_class") and value.split(".")[0] in FLOORS:
                paths.add(value)
    assert "train.cli.sweep.SweepSummary" in paths  # the sweep callback at least
    for path in sorted(paths):
        module, _, attr = path.rpartition(".")
        assert hasattr(importlib.import_module(module), attr), path


def test_the_checker_finds_each_broken_rule(tmp_path):
    """A small tree with one of each: a circle (through a function-level import), a floor broken, private names
    taken by `from`, by a module attribute and by an object attribute, and the allowed cases next to them (a
    module's own class reading its private class attribute, `self._x`, `super()._x`, a library's `torch._x`)."""
    files = {
        "gpt2/__init__.py": "",
        "gpt2/low.py": "import torch\n\ndef f():\n    from train import job\n    return torch._foreach_norm\n",
        "data_pipelines/__init__.py": "",
        "data_pipelines/dp.py": "_z = 0\n",
        "train/__init__.py": "",
        "train/job.py": "from train.tasks import helper\nfrom train.model import _private\n",
        "train/tasks.py": "def helper():\n    from train import job\n    return job\n",
        "train/model.py": (
            "import data_pipelines.dp as j\n\n_private = 1\n\nclass A:\n    def f(self, other):\n"
            "        super()._x()\n        return self._y, j._z, other._w, getattr(other, '_v'), getattr(self, '_u'), A._t\n"
        ),
        "launch/__init__.py": "",
        "launch/run.py": "from train.job import helper\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    mods = scan(tmp_path)
    assert circles(mods) == [["train.job", "train.tasks"]]  # tasks imports job inside a function: still a circle
    assert floor_breaks(mods) == ["gpt2.low imports train.job (line 4)"]
    assert mods["train.job"].private == ["line 2: from train.model import _private"]
    assert mods["train.model"].private == ["line 8: data_pipelines.dp._z", "line 8: other._w",
                                           "line 8: getattr(other, '_v')"]
    assert mods["gpt2.low"].private == [] and mods["launch.run"].private == []  # torch._x and launch -> train: fine
