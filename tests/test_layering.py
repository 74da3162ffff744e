"""Every import points downward: the layers of ``docs/architecture.md``, checked on the source.

Each module of ``workbench`` (and the dashboard) belongs to one layer; a module may import
modules of its own layer or of lower layers, never of a higher one, and the module graph has no
cycle. Imports inside functions count as much as those at the top (hiding an upward import in a
function is the fault this test exists to catch). Two imports by name exist, both plugin points
and both checked here: ``workbench.config.load_backend`` imports ``workbench.backends.<name>``,
and the CLI's ``--plugin`` imports a user's file that registers an algorithm or task.
"""

from __future__ import annotations

import ast
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# lowest first; a module may import its own rank or lower. Same-rank packages are peers.
LAYERS: list[tuple[int, str]] = [
    (0, "workbench.core"),
    (1, "workbench.toy_tasks"),
    (1, "workbench.algorithms"),
    (1, "workbench.results"),
    (2, "workbench.models"),
    (3, "workbench.registry"),
    (4, "workbench.config"),
    (5, "workbench.runtime"),
    (6, "workbench.analysis"),
    (7, "workbench.training"),
    (7, "workbench.backends"),
    (8, "workbench.studies"),
    (9, "workbench.reporting"),
    (10, "workbench.cli"),
    (10, "workbench.__main__"),
    (11, "dashboard"),
]
PEERS_MAY_NOT_MEET = {("workbench.toy_tasks", "workbench.algorithms"), ("workbench.training", "workbench.backends")}
DASHBOARD_MAY_IMPORT = ("workbench.results", "workbench.core.stats")


def layer_of(module: str) -> tuple[int, str]:
    best = None
    for rank, prefix in LAYERS:
        inside = module == prefix or module.startswith(prefix + ".")
        if inside and (best is None or len(prefix) > len(best[1])):
            best = (rank, prefix)
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS and docs/architecture.md")
    return best


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports(path: Path, root: Path) -> list[tuple[str, int]]:
    """``(imported module, line)`` of every workbench/dashboard import in the file, at any depth."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            targets = [target]
            if target in _packages(root):  # ``from pkg import mod`` imports the submodule
                targets += [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in _modules(root)]
                if len(targets) > 1:
                    targets = targets[1:]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        out += [(t, node.lineno) for t in targets if t.split(".")[0] in ("workbench", "dashboard")]
    return out


_CACHE: dict = {}


def _modules(root: Path) -> set[str]:
    key = ("m", root)
    if key not in _CACHE:
        _CACHE[key] = {module_name(p, root) for d in ("workbench", "dashboard") for p in (root / d).rglob("*.py")}
    return _CACHE[key]


def _packages(root: Path) -> set[str]:
    return {module_name(p, root) for d in ("workbench", "dashboard") for p in (root / d).rglob("__init__.py")}


def violations(root: Path) -> list[str]:
    """Upward imports, imports between peers that must not meet, and cycles."""
    _CACHE.clear()
    found, graph = [], {}
    for d in ("workbench", "dashboard"):
        for path in sorted((root / d).rglob("*.py")):
            src = module_name(path, root)
            if src == "workbench":  # the package root holds only __version__
                continue
            (rank, layer) = layer_of(src)
            graph.setdefault(src, set())
            for target, line in imports(path, root):
                if target == "workbench":
                    continue  # ``from workbench import __version__``
                t_rank, t_layer = layer_of(target)
                where = f"{path.relative_to(root)}:{line}: {src} imports {target}"
                if src.startswith("dashboard"):
                    if target.startswith("workbench") and not target.startswith(DASHBOARD_MAY_IMPORT):
                        found.append(f"{where} (the dashboard reads workbench.results and core.stats only)")
                elif t_rank > rank:
                    found.append(f"{where} (layer {t_layer} is above {layer})")
                elif (layer, t_layer) in PEERS_MAY_NOT_MEET or (t_layer, layer) in PEERS_MAY_NOT_MEET:
                    found.append(f"{where} ({layer} and {t_layer} are peers that do not import each other)")
                if target in _modules(root):
                    graph[src].add(target)
    found += [f"import cycle: {' -> '.join(c)}" for c in cycles(graph)]
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp) + [sorted(comp)[0]])

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_tree_imports_only_downward():
    assert violations(ROOT) == []


def test_every_module_has_a_layer():
    for d in ("workbench", "dashboard"):
        for path in (ROOT / d).rglob("*.py"):
            if module_name(path, ROOT) != "workbench":
                layer_of(module_name(path, ROOT))


def _copy(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    for d in ("workbench", "dashboard"):
        shutil.copytree(ROOT / d, root / d, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def test_a_planted_upward_import_fails(tmp_path):
    root = _copy(tmp_path)
    (root / "workbench" / "core" / "planted.py").write_text("def f():\n    from workbench.studies import plan\n")
    found = violations(root)
    assert len(found) == 1 and "workbench/core/planted.py:2" in found[0] and "above" in found[0], found


def test_a_planted_cycle_fails(tmp_path):
    root = _copy(tmp_path)
    (root / "workbench" / "core" / "ping.py").write_text("from . import pong\n")
    (root / "workbench" / "core" / "pong.py").write_text("def f():\n    from .ping import x\n")
    found = violations(root)
    assert found == ["import cycle: workbench.core.ping -> workbench.core.pong -> workbench.core.ping"], found


def test_a_dashboard_import_outside_results_fails(tmp_path):
    root = _copy(tmp_path)
    (root / "dashboard" / "planted.py").write_text("from workbench.training import train\n")
    found = violations(root)
    assert len(found) == 1 and "dashboard reads" in found[0], found


def test_imports_by_name_only_at_the_plugin_points():
    allowed = {("workbench/config.py", "load_backend"), ("workbench/cli.py", "load_plugins")}
    found = set()
    for d in ("workbench", "dashboard"):
        for path in (ROOT / d).rglob("*.py"):
            tree = ast.parse(path.read_text())
            for fn in ast.walk(tree):
                if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                    continue
                for node in ast.walk(fn):
                    if isinstance(node, ast.Call) and "import_module" in ast.unparse(node.func):
                        found.add((str(path.relative_to(ROOT)), fn.name))
                    if isinstance(node, ast.Call) and ast.unparse(node.func) == "__import__":
                        found.add((str(path.relative_to(ROOT)), fn.name))
    assert found == allowed
