"""The layout's rules, checked on the code: imports go one way without cycles, layer by layer
as docs/architecture.md's layer table says (the test reads the table: the docs and the test
are one list), the serving path never names a stand-in, and only deployments/sources.py reads
a source string."""

import ast
import re
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

PACKAGES = ("serve_app", "deployments")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (REPO_ROOT / package).rglob("*.py"):
            parts = path.relative_to(REPO_ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """Every project module ``path`` imports, at the top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in names if name in MODULES}


GRAPH = {name: _imports(path) for name, path in MODULES.items()}


def test_no_import_cycle():
    color: dict[str, int] = {}
    cycles = []

    def visit(name: str, stack: list[str]) -> None:
        color[name] = 1  # on the stack
        stack.append(name)
        for target in sorted(GRAPH[name]):
            if color.get(target) == 1:
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in color:
                visit(target, stack)
        stack.pop()
        color[name] = 2

    for name in sorted(GRAPH):
        if name not in color:
            visit(name, [])
    assert not cycles, f"import cycles: {cycles}"


def _layer_table() -> list[tuple[str, list[str], set[str]]]:
    """docs/architecture.md's layer table: (layer, where, may import) per row, top down."""
    text = (REPO_ROOT / "docs" / "architecture.md").read_text()
    section = text.split("\n## Layers\n", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) < 3 or cells[0] in ("layer", "---") or not line.startswith("|"):
            continue
        where = re.findall(r"`([^`]+)`", cells[1])
        rows.append((cells[0], where, {name.strip() for name in cells[2].split(",") if name.strip()}))
    return rows


LAYERS = _layer_table()
ALLOWED = {layer: may | {layer} for layer, _, may in LAYERS}


def _layer(name: str) -> str:
    """The table's row whose ``where`` holds the module (the longest match wins:
    ``deployments/runtime/`` over ``deployments/*.py``)."""
    path = MODULES[name].relative_to(REPO_ROOT).as_posix()
    best, length = None, -1
    for layer, where, _ in LAYERS:
        for pattern in where:
            folder = pattern.removesuffix("*.py")
            hit = (path == pattern if pattern.endswith(".py") and "*" not in pattern
                   else path.startswith(folder) and ("*" not in pattern or "/" not in path[len(folder):]))
            if hit and len(folder) > length:
                best, length = layer, len(folder)
    assert best is not None, f"{path} is in no row of docs/architecture.md's layer table"
    return best


def test_the_layer_table_names_real_layers():
    names = [layer for layer, _, _ in LAYERS]
    assert len(names) == len(set(names)) and len(names) >= 10, names
    for layer, where, may in LAYERS:
        assert may <= set(names), f"{layer} may import an unknown layer: {may - set(names)}"
        for pattern in where:
            assert list(REPO_ROOT.glob(pattern)) or (REPO_ROOT / pattern).exists(), pattern
    # One way: a layer imports only layers further down the table.
    for index, (layer, _, may) in enumerate(LAYERS):
        assert may <= set(names[index + 1:]), f"{layer} imports a layer above it"


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_every_module_is_in_one_layer(module):
    _layer(module)


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_go_one_way(module):
    wrong = sorted(t for t in GRAPH[module] if _layer(t) not in ALLOWED[_layer(module)])
    assert not wrong, f"{module} ({_layer(module)}) imports {wrong}"


def test_the_contract_imports_no_torch():
    """The package root of deployments is what the controller and the ingress import: no
    torch, diffusers or transformers at import time (a function may import them)."""
    for name, path in MODULES.items():
        if _layer(name) not in ("contract", "store", "protocol", "config"):
            continue
        tree = ast.parse(path.read_text())
        top = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
        heavy = [alias.name if isinstance(node, ast.Import) else node.module
                 for node in top for alias in node.names]
        heavy = [n for n in heavy if n and n.split(".")[0] in ("torch", "diffusers", "transformers", "peft")]
        assert not heavy, f"{name} imports {heavy} at the top"


# The serving path: every module but the stand-ins themselves, the registry they plug into,
# and the operator tools (tiny-config writes tiny sources on purpose).
SERVING = sorted(name for name in MODULES
                 if _layer(name) not in ("standins", "tools") and name != "deployments.sources")
STAND_IN_NAMES = re.compile(r"standins|SimPipeline|\bload_sim\b|materialize_tiny|\bis_sim\b|is_tiny")


@pytest.mark.parametrize("module", SERVING)
def test_the_serving_path_names_no_stand_in(module):
    # Docstrings and descriptions may say what a source looks like; code may not name one.
    tree = ast.parse(MODULES[module].read_text())
    names = [node.id for node in ast.walk(tree) if isinstance(node, ast.Name)]
    names += [node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)]
    names += [alias.name for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
              for alias in node.names]
    names += [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module]
    assert not [n for n in names if STAND_IN_NAMES.search(n)], module


@pytest.mark.parametrize("module", sorted(MODULES))
def test_only_the_source_type_parses_a_source(module):
    if module == "deployments.sources":
        return
    hits = []
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in (
                "startswith", "removeprefix", "removesuffix", "partition", "split"):
            for arg in node.args:
                texts = arg.elts if isinstance(arg, ast.Tuple) else [arg]
                for text in texts:
                    if isinstance(text, ast.Constant) and str(text.value).startswith(("tiny:", "sim:", "hf:")):
                        hits.append(f"line {node.lineno}: .{node.func.attr}({text.value!r})")
    assert not hits, f"{module} reads a source string by hand: {hits}"


FRONTS = {"serve_app.fronts.openai", "serve_app.fronts.livepeer", "serve_app.fronts.jobs",
          "serve_app.fronts.stability"}
SHARED_BY_FRONTS = {"serve_app.fronts.error_handlers", "serve_app.fronts.shared", "serve_app.fronts.openapi",
                    "serve_app.fronts.gate", "serve_app.fronts.metrics", "serve_app.fronts.wire"}


def test_each_front_stands_alone():
    """A front imports no other front, and what the fronts share imports none of them:
    a new front is one module, included by the ingress."""
    assert FRONTS | SHARED_BY_FRONTS | {"serve_app.fronts.ingress"} <= set(GRAPH)
    for front in FRONTS:
        assert not GRAPH[front] & (FRONTS - {front}), front
    for shared in SHARED_BY_FRONTS:
        assert not GRAPH[shared] & (FRONTS | {"serve_app.fronts.ingress"}), shared


@pytest.mark.parametrize("module", sorted(MODULES))
def test_a_long_module_says_why_it_is_one(module):
    """Small modules by default: one over 400 lines says in its docstring why it stays one."""
    text = MODULES[module].read_text()
    if text.count("\n") <= 400:
        return
    docstring = ast.get_docstring(ast.parse(text)) or ""
    assert "over 400 lines" in docstring, f"{module}: {text.count(chr(10))} lines, no reason given"
