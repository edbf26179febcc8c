"""The import contract of DESIGN.md, over ember's import graph (every import statement, those
inside functions included): no cycles, and imports point down the data flow."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "ember"

# package -> the ember packages/modules it may import (besides itself, `errors` and `home`)
MODEL_DEFINITION = {"runtime.config", "runtime.model", "runtime.rope", "runtime.kv_cache", "runtime.threads"}
ALLOWED = {
    "formats": set(),
    "lut_kernels": {"formats"},
    "offload": {"formats"},
    # the model's definition, and above it the session and generation, which run on a device
    "runtime": {"formats", "lut_kernels", "offload", "devices"},
    # a device runs the model's definition; it never imports the session or generation
    "devices": {"formats", "lut_kernels", "offload"} | MODEL_DEFINITION,
    # drafters run models' sessions; generation drives them through a protocol, never importing them
    "speculative": {"formats", "runtime"},
    "api": {"hub", "formats", "runtime", "offload", "lut_kernels", "devices", "speculative"},
    # "ember": the public API; offload: the memory a budget counts, measured as the budget counts it
    "bench": {"ember", "api", "hub", "formats", "runtime", "lut_kernels", "offload"},
    "tui": {"ember", "api", "hub"},  # a client of the public library API
}
BASE = {"errors", "home"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _graph() -> dict[str, set[str]]:
    """ember module -> the ember modules it imports."""
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for t in targets:
                if t in modules and t != name:
                    deps.add(t)
                    break
        graph[name] = deps
    return graph


def _area(module: str) -> str:
    """ember.devices.cpu.step -> devices; ember.api -> api."""
    return module.split(".")[1] if "." in module else module


def _allowed(area: str, target: str) -> bool:
    """Whether a module of `area` may import the ember module `target`."""
    t_area = _area(target)
    named = ".".join(target.split(".")[1:3])  # e.g. runtime.model
    return (t_area in (area, *BASE) and not (area == "devices" and t_area == "runtime")) or (
        t_area in ALLOWED[area] or named in ALLOWED[area]
    )


GRAPH = _graph()


def test_the_graph_was_read():
    assert "ember.devices.cpu" in GRAPH["ember.runtime.session"]
    assert "ember.formats.gguf" in GRAPH["ember.runtime.config"]


def test_no_import_cycles():
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for d in sorted(GRAPH[m]):
            if d.startswith(m + ".") or m == "ember":
                continue  # a package's __init__ importing its own modules
            if state.get(d) == 1:
                cycle = path[path.index(d) :] + [d]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        path.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)


@pytest.mark.parametrize("area", sorted(ALLOWED))
def test_imports_point_down_the_data_flow(area):
    bad = []
    for m, deps in GRAPH.items():
        if m == "ember" or _area(m) != area:
            continue
        for d in deps:
            if not _allowed(area, d):
                bad.append(f"{m} imports {d}")
    assert not bad, "\n".join(sorted(bad))


def test_nothing_below_the_front_ends_imports_them():
    front = {"cli", "tui", "bench"}
    bad = [f"{m} imports {d}" for m, deps in GRAPH.items() for d in deps if _area(d) in front and _area(m) not in front]
    assert not bad, "\n".join(sorted(bad))
