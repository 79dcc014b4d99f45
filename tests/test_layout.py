"""The shape of the code: no import cycle, no upward import, thin entry points, short task functions.

The import graph is read from the sources with `ast` (every import statement, also those inside
functions), so a cycle hidden behind a lazy import counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mixrobust"

#: Layers, lowest first: a module may import its own layer and those below, never one above.
LAYERS = (
    ("mixrobust.errors",),
    ("mixrobust.runtime",),
    ("mixrobust.threat", "mixrobust.models", "mixrobust.data", "mixrobust.attacks", "mixrobust.mixing",
     "mixrobust.checkpoint", "mixrobust.training", "mixrobust.certify", "mixrobust.evaluation", "mixrobust.study",
     "mixrobust.zoo"),
    ("mixrobust.pipelines",),
)
TASKS = ("train", "mix", "certify", "report", "study")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(path: Path, known: set[str]) -> set[str]:
    """The mixrobust modules `path` imports (``from a import b`` counts as a.b when that is a module)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module for a in node.names}
    return {m for m in out if m.startswith("mixrobust")}


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(path, set(mods)) for name, path in mods.items()}


def layer(name: str) -> int | None:
    for i, prefixes in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return i
    return None


def test_import_graph_has_no_cycle():
    g = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(g.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt in g and nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for start in sorted(g):
        if start not in state:
            visit(start, [start])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_nothing_imports_upward():
    upward = []
    for name, targets in graph().items():
        here = layer(name)
        assert name == "mixrobust" or here is not None, f"{name} is in no layer of LAYERS"
        upward += [f"{name} -> {t}" for t in targets if here is not None and (layer(t) or 0) > here]
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def test_runtime_and_library_never_import_the_package_facade():
    offenders = [name for name, targets in graph().items() if name != "mixrobust" and "mixrobust" in targets]
    assert not offenders, f"modules importing the top-level package (use the defining module): {offenders}"


def test_entry_points_are_thin():
    for script in ("train.py", "evaluate.py"):
        lines = (ROOT / script).read_text().splitlines()
        assert len(lines) <= 22, f"{script} has {len(lines)} lines"
        tree = ast.parse((ROOT / script).read_text())
        functions = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
        assert [f.name for f in functions] == ["main"]


def test_ci_runs_the_readme_test_command():
    """`.ci/run` runs exactly the README's test command (the README's second set-up command)."""
    readme = (ROOT / "README.md").read_text()
    commands = [line.strip() for line in readme.splitlines() if "python -m pytest" in line and "pip install" in line]
    assert len(commands) == 1, commands
    assert commands[0] in (ROOT / ".ci" / "run").read_text()


def test_task_functions_read_in_one_screen():
    long = []
    for task in TASKS:
        path = PACKAGE / "pipelines" / f"{task}.py"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                size = node.end_lineno - node.lineno + 1
                if size > 60:
                    long.append(f"{task}.{node.name}: {size} lines")
    assert not long, long


def test_alpha_and_sigma_reach_the_model_in_three_hops():
    """conf -> task -> engine -> model: the task passes alpha to the sweep engine, which builds the
    MixedClassifier; sigma goes from the certify task to `smoothed_votes`, which builds the SmoothedClassifier."""
    g = graph()
    assert "mixrobust.evaluation" in g["mixrobust.pipelines.mix"] or any(
        t.startswith("mixrobust.evaluation") for t in g["mixrobust.pipelines.mix"])
    assert not any(t.startswith("mixrobust.mixing.classifier") for t in g["mixrobust.pipelines.mix"])
    assert "mixrobust.mixing" in g["mixrobust.evaluation.sweep"]
    assert "mixrobust.certify.mixture" in g["mixrobust.pipelines.certify"]
    assert "mixrobust.certify.smoothing" in g["mixrobust.certify.mixture"]
    assert not any(t.startswith("mixrobust.pipelines") for t in g["mixrobust.runtime.sharding"])
