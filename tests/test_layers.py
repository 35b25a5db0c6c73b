"""The package layers: imports flow one way (utils -> diffusion -> datamodules -> metrics / lightning_modules ->
callbacks -> entry points), without cycles, and diffusion/ loads nothing above it.

The static check reads every `import` / `from` statement with `ast`, at any depth (function-level imports
are where upward reaches and cycles hide), so it holds whichever code path runs.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"utils": 0, "diffusion": 1, "datamodules": 2, "metrics": 3, "lightning_modules": 3, "callbacks": 4,
          "train": 5, "evaluate": 5, "edit": 5}
PACKAGES = ("callbacks", "datamodules", "diffusion", "lightning_modules", "metrics", "utils")
ENTRY_POINTS = ("train", "evaluate", "edit")
ABOVE_DIFFUSION = ("lightning_modules", "callbacks", "metrics", "datamodules", *ENTRY_POINTS)


def project_modules() -> dict[str, Path]:
    """{dotted name: file} of every module of the packages and the entry points."""
    modules = {name: ROOT / f"{name}.py" for name in ENTRY_POINTS}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported_names(path: Path, module: str) -> set[str]:
    """Every dotted name an import statement of the file names (for `from a import b`: a.b and a)."""
    names: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against the importing module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def import_graph() -> dict[str, set[str]]:
    """{module: the project modules it imports} (a name resolves to the longest project module it names)."""
    modules = project_modules()
    graph = {}
    for module, path in modules.items():
        targets = set()
        for name in imported_names(path, module):
            parts = name.split(".")
            for k in range(len(parts), 0, -1):
                candidate = ".".join(parts[:k])
                if candidate in modules:
                    targets.add(candidate)
                    break
        graph[module] = targets - {module}
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module (the import cycles)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def layer(module: str) -> int:
    return LAYERS[module.split(".")[0]]


def test_imports_have_no_cycle_and_never_go_up():
    graph = import_graph()
    assert len(graph) > 50 and "diffusion.attention" in graph["diffusion.editing"]  # the parser sees the code
    cycles = strongly_connected(graph)
    assert not cycles, f"import cycles (strongly connected components): {cycles}"
    upward = sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets if layer(b) > layer(a))
    assert not upward, f"imports of a higher layer: {upward}"


def test_the_cycle_finder_reports_a_loop():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert strongly_connected(graph) == [["a", "b", "c"]]


def test_importing_diffusion_loads_no_higher_layer():
    """Every diffusion/ module imported in a fresh interpreter: nothing of a higher layer gets loaded."""
    names = sorted(m for m in project_modules() if m.split(".")[0] == "diffusion")
    code = (f"import importlib, json, sys\n"
            f"for name in {names!r}:\n"
            f"    importlib.import_module(name)\n"
            f"print(json.dumps(sorted(sys.modules)))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert "diffusion.editing" in loaded
    above = [m for m in loaded if m.split(".")[0] in ABOVE_DIFFUSION]
    assert not above, f"importing diffusion/ loaded higher layers: {above}"
