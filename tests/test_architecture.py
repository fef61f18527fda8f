"""The code's shape, as tests: layers, forbidden imports, no cycles, no private imports, declared kinds.

The rules are import-linter contracts in pyproject.toml (`[tool.importlinter]`), checked
with imports inside functions counted; the rest import-linter cannot say is checked here
on the AST. Each rule is also shown to fail on a deliberately broken copy of the tree, so
none of these tests can pass by checking nothing.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("evit", "flows")
LINT = Path(sys.executable).with_name("lint-imports")

ALLOWED_DUCK_TYPING = {
    ("evit/nn/common.py", "rel_bias"): "init walks a module tree of torch's and timm's modules too (timm's idiom)",
    ("evit/nn/common.py", "zero_init_last"): "same walk: the blocks that zero their last BN gamma say so",
    ("evit/formats/pte.py", "__name__"): "torch op targets: OpOverloads have a name, plain callables may not",
    ("evit/train/losses.py", "num_classes"): "a teacher is any timm model; a missing head width is reported",
    ("evit/cli.py", "signal"): "Prefect's TerminationSignal (a third-party exception) carries the signal number",
    ("flows/pipeline.py", "signal"): "the same Prefect exception, in the flow",
}
"""`hasattr(x, "a")` / `getattr(x, "a", None)` uses with a reason: reading an optional attribute of
third-party objects. Telling evit's own kinds apart this way is not allowed: a declared method
or flag says it (e.g. `Device.converts_files`, `evit.config.devices.KINDS`)."""


def _modules(root: Path) -> Iterator[tuple[str, Path]]:
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            rel = path.relative_to(root).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            yield ".".join(parts), path


def _absolute(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def private_imports(root: Path) -> list[str]:
    """`from other.module import _name` and `other_module._name` across evit/ and flows/ (any depth)."""
    names = {m for m, _ in _modules(root)}
    found = []
    for module, path in _modules(root):
        tree = ast.parse(path.read_text(), str(path))
        aliases: dict[str, str] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                source = _absolute(module, node, path.name == "__init__.py")
                if source.split(".")[0] not in PACKAGES:
                    continue
                for a in node.names:
                    target = f"{source}.{a.name}"
                    if target in names:
                        aliases[a.asname or a.name] = target
                    elif a.name.startswith("_") and not a.name.startswith("__") and source != module:
                        found.append(f"{path.relative_to(root)}:{node.lineno}: imports {source}.{a.name}")
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] in PACKAGES and a.asname:
                        aliases[a.asname] = a.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")
                    and aliases[node.value.id] != module):
                found.append(f"{path.relative_to(root)}:{node.lineno}: uses {aliases[node.value.id]}.{node.attr}")
    return found


def duck_typing(root: Path) -> list[str]:
    """`hasattr(x, "a")` and `getattr(x, "a", None)` calls not in ALLOWED_DUCK_TYPING."""
    found = []
    for _, path in _modules(root):
        rel = path.relative_to(root).as_posix()
        for node in ast.walk(ast.parse(path.read_text(), rel)):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and len(node.args) >= 2
                    and isinstance(node.args[1], ast.Constant)):
                continue
            probe = node.func.id == "hasattr" or (
                node.func.id == "getattr" and len(node.args) == 3 and isinstance(node.args[2], ast.Constant)
                and node.args[2].value is None)
            if probe and (rel, node.args[1].value) not in ALLOWED_DUCK_TYPING:
                found.append(f"{rel}:{node.lineno}: {node.func.id}(..., {node.args[1].value!r}"
                             f"{', None' if node.func.id == 'getattr' else ''})")
    return found


def import_cycles(root: Path) -> list[list[str]]:
    """Strongly connected components (size > 1) of the module import graph (imports in functions included)."""
    import grimp

    graph = grimp.build_graph(*PACKAGES, cache_dir=None)
    edges = {m: {t for t in graph.find_modules_directly_imported_by(m) if t.split(".")[0] in PACKAGES}
             for m in graph.modules if m.split(".")[0] in PACKAGES}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
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
                cycles.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return cycles


def lint(root: Path) -> subprocess.CompletedProcess[str]:
    """import-linter with the repository's contracts, on the tree at `root`."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(LINT), "--config", str(REPO / "pyproject.toml"), "--no-cache", "--no-logo"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)


def _copy_tree(tmp_path: Path) -> Path:
    for pkg in PACKAGES:
        shutil.copytree(REPO / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def test_the_import_contracts_hold() -> None:
    out = lint(REPO)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 broken" in out.stdout


def test_every_module_of_evit_has_a_layer() -> None:
    """A new top-level module must be placed in the layers (else the contract says nothing about it)."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    layers = next(c for c in config["contracts"] if c["id"] == "layers")["layers"]
    placed = {m.strip() for layer in layers for m in layer.replace(":", "|").split("|")}
    children = {f"evit.{p.stem}" for p in (REPO / "evit").glob("*.py") if p.stem != "__init__"}
    children |= {f"evit.{p.name}" for p in (REPO / "evit").iterdir() if (p / "__init__.py").is_file()}
    assert sorted(children - placed) == []


def test_no_import_cycles() -> None:
    assert import_cycles(REPO) == []


def test_no_module_imports_another_modules_private_names() -> None:
    assert private_imports(REPO) == []


def test_kinds_are_declared_not_guessed() -> None:
    from evit.config import KINDS
    from evit.latency.devices import DEVICE_CLASSES

    assert set(DEVICE_CLASSES) == set(KINDS)
    assert duck_typing(REPO) == []


@pytest.mark.parametrize("where, line, expected", [
    # latency must never import export (a layer above it): an import hidden inside a function counts
    ("evit/latency/lut.py", "def _wrong() -> None:\n    from evit.export import stage  # noqa: F401\n",
     "evit.latency.lut -> evit.export.stage"),
    # siblings on one row never import each other
    ("evit/train/banks.py", "def _wrong() -> None:\n    import evit.latency.lut  # noqa: F401\n",
     "evit.train.banks -> evit.latency.lut"),
    # flows reaches the stages only through evit.stages
    ("flows/report.py", "from evit.search.stage import RESULT_FILE  # noqa: F401\n",
     "flows.report -> evit.search.stage"),
    # no circles: checkpoint <- banks <- samplers, so checkpoint must not import samplers back
    ("evit/train/checkpoint.py", "def _wrong() -> None:\n    import evit.train.samplers  # noqa: F401\n",
     "No cycles are allowed in evit.train"),
    # MLflow only in tracking, the registry and the training logbook
    ("evit/latency/stage.py", "def _wrong() -> None:\n    import mlflow  # noqa: F401\n",
     "evit.latency.stage -> mlflow"),
])
def test_a_wrong_way_import_breaks_the_contracts_and_is_named(tmp_path: Path, where: str, line: str,
                                                                expected: str) -> None:
    root = _copy_tree(tmp_path)
    with open(root / where, "a") as fh:
        fh.write("\n\n" + line)
    out = lint(root)
    assert out.returncode != 0
    assert expected in out.stdout, out.stdout


def test_the_other_rules_fail_on_a_broken_tree(tmp_path: Path) -> None:
    root = _copy_tree(tmp_path)
    with open(root / "evit/baselines/models.py", "a") as fh:
        fh.write("\n\nfrom evit.train.checkpoint import _nothing_public  # noqa: F401,E402\n")
    with open(root / "evit/search/pareto.py", "a") as fh:
        fh.write("\n\ndef _kind(dev: object) -> bool:\n    return hasattr(dev, 'files_made')\n")
    assert [x.split(": ", 1)[1] for x in private_imports(root)] == ["imports evit.train.checkpoint._nothing_public"]
    assert [x.split(": ", 1)[1] for x in duck_typing(root)] == ["hasattr(..., 'files_made')"]
