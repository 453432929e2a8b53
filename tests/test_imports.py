"""Static checks of the source. The modules of `pipeline/` import each other one way: no cycle, counting
imports inside functions too (a cycle hidden in a function body still ties the modules together and
breaks when one is moved). Nothing loads a file with pickle."""

from __future__ import annotations

import ast
from pathlib import Path

PIPELINE = Path(__file__).resolve().parent.parent / "pipeline"


def _runtime_nodes(tree: ast.AST):
    """Every node of `tree` but the bodies of `if TYPE_CHECKING:` (type-only imports never run)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        type_only = isinstance(node, ast.If) and \
            getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING"
        todo.extend(node.orelse if type_only else ast.iter_child_nodes(node))


def pipeline_imports() -> dict[str, set[str]]:
    """module -> the pipeline modules it imports anywhere in its file (type-only imports aside)."""
    modules = {p.stem for p in PIPELINE.glob("*.py")}
    graph = {}
    for m in modules:
        deps = set()
        for node in _runtime_nodes(ast.parse((PIPELINE / f"{m}.py").read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1:  # from .x import y / from . import x
                    deps |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
                elif node.module == "pipeline":
                    deps |= {a.name for a in node.names}
                elif node.module and node.module.startswith("pipeline."):
                    deps.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".")[1] for a in node.names if a.name.startswith("pipeline.")}
        graph[m] = (deps & modules) - {m}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                return path[path.index(d):] + [d]
            if d not in state and (c := visit(d)):
                return c
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_type_only_imports_are_not_edges():
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .config import X\n"
                     "def f():\n    from .zoo import y\n")
    seen = {n.module for n in _runtime_nodes(tree) if isinstance(n, ast.ImportFrom)}
    assert seen == {"typing", "zoo"}


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_pipeline_imports_have_no_cycle():
    graph = pipeline_imports()
    assert {"train", "dag", "report", "evaluate"} <= set(graph) and graph["dag"]  # the walk sees the imports
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def unsafe_loads(source: str) -> list[int]:
    """Lines that can run code from a file: `torch.load` without `weights_only=True`, any `pickle` /
    `dill` / `cloudpickle` load, `numpy.load` with `allow_pickle=True`."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
        if name == "torch.load" and kw.get("weights_only") != "True":
            lines.append(node.lineno)
        elif name.split(".")[0] in ("pickle", "dill", "cloudpickle") and name.split(".")[-1] in ("load", "loads"):
            lines.append(node.lineno)
        elif name in ("np.load", "numpy.load") and kw.get("allow_pickle") == "True":
            lines.append(node.lineno)
    return lines


def test_the_unsafe_load_finder_finds_them():
    assert unsafe_loads("torch.load(p)\ntorch.load(p, weights_only=False)\ntorch.load(p, weights_only=True)\n"
                        "pickle.loads(b)\nnp.load(f, allow_pickle=True)\nnp.load(f)\n") == [1, 2, 4, 5]


def test_nothing_we_ship_unpickles_a_file():
    """Weights are safetensors or `torch.load(..., weights_only=True)`: a run root on a shared bucket must
    not be a way to run code on the trainers (issue 16)."""
    root = PIPELINE.parent
    files = [p for d in ("pipeline", "jobs", "benchmarks", "tests") for p in (root / d).rglob("*.py")]
    assert len(files) > 40
    found = {str(p.relative_to(root)): n for p in files if (n := unsafe_loads(p.read_text()))}
    assert not found, found
