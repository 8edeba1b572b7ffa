"""The layering rules of the package, checked on its source: no import cycles, no caller outside backends/
branching on a backend's name, every backend satisfying the written contract; and the numpy backend safe to use
from two threads at once."""

from __future__ import annotations

import ast
import threading
from pathlib import Path

import pytest

import mlxllama
from mlxllama.backends.contract import Backend

PACKAGE = Path(mlxllama.__file__).parent


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _runtime_nodes(tree: ast.AST):
    """Every node of a module except those under `if TYPE_CHECKING:` (imports for annotations only)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and getattr(child.test, "id", None) == "TYPE_CHECKING":
                stack.extend(child.orelse)
                continue
            stack.append(child)


def _imports() -> dict[str, set[str]]:
    """Every mlxllama module and the mlxllama modules it imports at run time (at any depth in the file)."""
    names = {_module_name(p) for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps: set[str] = set()
        for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                for a in node.names:  # `from pkg import submodule` depends on the submodule, not on pkg's body
                    deps.add(f"{mod}.{a.name}" if f"{mod}.{a.name}" in names else mod)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        graph[name] = {d for d in deps if d in names and d != name}
    return graph


def test_no_import_cycles():
    graph = _imports()
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(d):] + [d]))
            if d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_no_branching_on_backend_names_outside_backends():
    offenders = []
    for path in list(PACKAGE.rglob("*.py")) + list((PACKAGE.parent / "cli").rglob("*.py")):
        if "backends" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Compare):
                names = [n for n in [node.left, *node.comparators]
                         if isinstance(n, ast.Attribute) and n.attr in ("name", "backend")
                         and isinstance(n.value, (ast.Name, ast.Attribute))
                         and (getattr(n.value, "id", None) or getattr(n.value, "attr", None)) in ("ops", "model")]
                if names:
                    offenders.append(f"{path.name}:{node.lineno}")
    assert not offenders, offenders


@pytest.mark.parametrize("backend", ["numpy", pytest.param("mlx", marks=pytest.mark.skipif(
    __import__("importlib").util.find_spec("mlx") is None, reason="mlx not installed"))])
def test_backends_satisfy_the_contract(backend):
    from mlxllama.backends import get_ops

    ops = get_ops(backend)
    assert isinstance(ops, Backend)
    assert isinstance(ops.on_gpu, bool) and isinstance(ops.lazy, bool) and isinstance(ops.keeps_quantized, bool)
    assert isinstance(ops.attends_half, bool)
    assert ops.kv_bytes in (2, 4) and ops.float_bytes in (2, 4)


def test_two_threads_generate_what_each_generates_alone(tiny_hf):
    """Two generations at once on one model (and on two models) give the tokens each gives alone; the BLAS thread
    count is what it was before, afterwards."""
    from mlxllama.backends import numpy_ops

    model, tok = mlxllama.load(str(tiny_hf), backend="numpy")
    other, _ = mlxllama.load(str(tiny_hf), backend="numpy")
    prompts = ["The quick brown", "Memory bandwidth decides"]
    alone = [[r.token for r in mlxllama.stream_generate(model, tok, p, max_tokens=24)] for p in prompts]
    before = numpy_ops._blas.get() if numpy_ops._blas.available else None
    for models in ([model, model], [model, other]):
        got: dict[int, list[int]] = {}
        start = threading.Barrier(2)

        def run(i: int, m) -> None:
            start.wait(timeout=30)
            got[i] = [r.token for r in mlxllama.stream_generate(m, tok, prompts[i], max_tokens=24)]

        threads = [threading.Thread(target=run, args=(i, m)) for i, m in enumerate(models)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert [got.get(0), got.get(1)] == alone
    if before is not None:
        assert numpy_ops._blas.get() == before
