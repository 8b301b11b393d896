"""The package's one direction of flow, checked on the source: plan -> quantize -> checkpoint -> vLLM method ->
server. Every import (module level or inside a function) goes to the same stage or one it is allowed to use,
and no modules import each other in a cycle. docs/architecture.md explains the stages."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

LIBRARY = ("config", "quant", "checkpoint", "calibration", "planning", "layers", "report", "cli", "plugin")
# stage -> the stages it may import (besides itself). `layers` (the vLLM method) never needs the planner.
ALLOWED = {
    "config": set(),
    "quant": {"config"},
    "checkpoint": {"config", "quant"},
    "calibration": {"config", "quant", "checkpoint"},
    "planning": {"config", "quant", "checkpoint", "calibration"},
    "layers": {"config", "quant", "checkpoint"},
    "report": {"config", "quant", "checkpoint", "calibration", "planning", "layers"},
    "cli": set(LIBRARY) - {"cli"},
    "plugin": {"layers"},
    "server": set(LIBRARY) - {"cli"},  # the app uses the library; `moemix serve` is an entry point, not an import
}


def _modules() -> dict[str, Path]:
    files = [*(REPO / "vllm_moemix").rglob("*.py"), *(REPO / "server").rglob("*.py")]
    out = {}
    for path in files:
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _stage(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] == "server":
        return "server"
    return parts[1] if len(parts) > 1 and parts[1] in LIBRARY else None


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules `path` imports anywhere in its body, resolved to the most specific known module."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(p, modules) - {m} for m, p in modules.items()}


def test_every_import_goes_down_or_sideways_within_a_stage():
    wrong = []
    for module, deps in _graph().items():
        stage = _stage(module)
        for dep in deps:
            target = _stage(dep)
            if stage and target and target != stage and target not in ALLOWED[stage]:
                wrong.append(f"{module} ({stage}) imports {dep} ({target})")
    assert not wrong, "upward imports:\n" + "\n".join(sorted(wrong))


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph.get(module, ())):
            if state.get(dep) == 1:
                cycles.append(" -> ".join(path[path.index(dep) :] + [dep]) if dep in path else f"{module} -> {dep}")
            elif dep not in state:
                visit(dep, path + [dep])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checker_sees_the_stages():
    """Guards the two tests above against passing vacuously (a renamed folder would leave them nothing)."""
    graph = _graph()
    stages = {_stage(m) for m in graph}
    assert set(ALLOWED) <= stages, f"stages without modules: {set(ALLOWED) - stages}"
    assert "vllm_moemix.config.spec" in graph["vllm_moemix.layers.moe"]
    assert "vllm_moemix.layers.introspect" in graph["server.engine"]
