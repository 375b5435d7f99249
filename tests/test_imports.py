"""Layers: each role imports only what it is, and no modules import each other in a cycle.

Read from the source (every import statement, those inside functions too), so a lazy import
cannot hide an edge."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"ps": ROOT / "ps", "ps.server": ROOT / "server", "ps.worker": ROOT / "worker"}
#: the one core module that runs worker code: a trained model predicting locally
LOCAL_INFERENCE = "ps.trained"


def modules() -> dict[str, Path]:
    found = {}
    for pkg, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([pkg, *parts])
            if name.startswith("ps.v1") or (pkg == "ps" and rel.parts[0] in ("server", "worker")):
                continue
            found[name] = path
    return found


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules ``name`` imports anywhere in its source."""
    out = set()
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        for t in targets:
            while t and t not in known:
                t = t.rsplit(".", 1)[0] if "." in t else ""
            if t and t != name:
                out.add(t)
    return out


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def closure(graph, start: str, stop: frozenset = frozenset()) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        for dep in graph.get(m, ()):
            if dep not in seen:
                seen.add(dep)
                if dep not in stop:
                    todo.append(dep)
    return seen


def test_no_module_imports_itself_through_others(graph):
    cycles = sorted({tuple(sorted((m, d))) for m in graph for d in graph[m] if m in closure(graph, d)
                     and m != "ps" and d != "ps"})
    assert cycles == []


@pytest.mark.parametrize("role,forbidden", [
    ("ps.scheduler.service", ("ps.server", "ps.worker")),
    ("ps.client", ("ps.server", "ps.worker")),
    ("ps.spec", ("ps.server", "ps.worker", "ps.client")),
    ("ps.server.service", ("ps.worker", "ps.scheduler", "ps.client")),
    ("ps.worker.runner", ("ps.server", "ps.scheduler")),
])
def test_each_role_imports_only_what_it_is(graph, role, forbidden):
    reached = closure(graph, role, stop=frozenset({LOCAL_INFERENCE}))
    bad = sorted(m for m in reached if m.startswith(forbidden))
    assert bad == [], f"{role} reaches {bad}"


def test_checking_a_spec_and_talking_to_a_cluster_load_no_server_or_worker_code():
    code = ("import sys, ps.spec, ps.client, ps.scheduler.service; "
            "from ps.spec import JobSpec; JobSpec.from_json(JobSpec().to_json()); "
            "print(sorted(m for m in sys.modules if m.startswith(('ps.server', 'ps.worker'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
