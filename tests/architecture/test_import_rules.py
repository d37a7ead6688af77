"""The import rules of docs/ARCHITECTURE.md, read from the code's own imports (function-level
imports included): which room may import which, and no import cycles between modules."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ROOMS = ("model", "slurm", "results", "ablations", "benchmarks", "devtools")
# room -> the project rooms it may import (besides itself). The library is the ground floor.
ALLOWED = {
    "model": set(),
    "devtools": {"model", "results"},
    "slurm": {"model"},
    "results": {"model"},
    "ablations": {"model", "slurm", "results"},
    "benchmarks": {"model", "slurm", "results", "ablations"},
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for room in ROOMS for p in (REPO / room).rglob("*.py")}


def _import_statements(path: Path) -> Iterator[tuple[str | None, list[str]]]:
    """(module, names) of every absolute import anywhere in ``path``, function-level ones
    included: ``import a.b`` gives (None, ["a.b"]), ``from a.b import c`` ("a.b", ["c"])."""
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            yield None, [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module, [alias.name for alias in node.names]


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules ``path`` imports anywhere in it (``from a.b import c`` counts ``a.b.c``
    when that is a module, else ``a.b``)."""
    found = set()
    for module, names in _import_statements(path):
        if module is not None:
            names = [f"{module}.{n}" if f"{module}.{n}" in modules else module for n in names]
        found |= {n for n in names if n.split(".")[0] in ROOMS and n in modules}
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) - {name} for name, path in modules.items()}


def test_each_room_imports_only_the_rooms_below_it(graph: dict[str, set[str]]) -> None:
    wrong = sorted(f"{a} -> {b}" for a, deps in graph.items() for b in deps
                   if b.split(".")[0] != a.split(".")[0]
                   and b.split(".")[0] not in ALLOWED[a.split(".")[0]])
    assert not wrong, "imports against docs/ARCHITECTURE.md:\n" + "\n".join(wrong)


def test_no_import_cycles(graph: dict[str, set[str]]) -> None:
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycles.append(" -> ".join([*stack[stack.index(dep):], dep]))
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def _library(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    return {m: deps for m, deps in graph.items()
            if m.split(".")[0] == "model" and not m.startswith("model.cli")}


def test_the_library_does_not_import_the_apps_room(graph: dict[str, set[str]]) -> None:
    wrong = sorted(f"{a} -> {b}" for a, deps in _library(graph).items() for b in deps
                   if b.startswith("model.cli"))
    assert not wrong, "the library imports a command-line program:\n" + "\n".join(wrong)


def test_the_library_parses_no_arguments_and_finds_no_repository_files() -> None:
    """argparse and paths computed from the checkout's layout belong to the apps room
    (model/cli/) and the project rooms; the library is handed its files."""
    offenders = []
    for path in (REPO / "model").rglob("*.py"):
        if "cli" in path.relative_to(REPO / "model").parts:
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) else [])
            if "argparse" in names:
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}: imports argparse")
            if isinstance(node, ast.Attribute) and node.attr == "parents":
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}: Path(...).parents")
    assert not offenders, "\n".join(offenders)


def test_the_method_is_pure_math(graph: dict[str, set[str]]) -> None:
    """model/method/ (Grad-CAM, soft masks) imports nothing of the project outside itself."""
    wrong = sorted(f"{a} -> {b}" for a, deps in graph.items() if a.startswith("model.method")
                   for b in deps if not b.startswith("model.method"))
    assert not wrong, "\n".join(wrong)


def test_the_rules_see_real_imports(graph: dict[str, set[str]]) -> None:
    """Guard against a rule that cannot fail: the graph holds known edges."""
    assert "model.engine.train" in graph["model.cell.pipeline"]
    assert "model.downstream.run" in graph["model.cell.stages"]
    assert "slurm.spec" in graph["ablations.grid"]
    assert "model.evaluation.gallery" in graph["model.cli.gallery"]
    assert "model.method.gradcam" in graph["model.method.softmask"]


def test_only_the_task_modules_know_which_task_they_are(graph: dict[str, set[str]]) -> None:
    """The stage runner, the fine-tuning loop, the data side and the benchmarks dispatch through
    the task registry: no comparison of a task's name outside model/downstream/tasks/ (and the
    config's own validation of its typed task block)."""
    allowed = {REPO / "model" / "config" / "task.py"}
    offenders = []
    for room in ROOMS:
        for path in (REPO / room).rglob("*.py"):
            if "downstream/tasks" in path.as_posix() or path in allowed:
                continue
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, ast.Compare) and any(
                        isinstance(side, ast.Attribute) and side.attr == "name"
                        and isinstance(side.value, ast.Name) and side.value.id == "task"
                        for side in (node.left, *node.comparators)):
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not offenders, "task.name compared outside the task modules: " + ", ".join(offenders)
    assert "model.downstream.tasks" in graph["model.downstream.run"]


def test_evaluation_is_apart_from_training(graph: dict[str, set[str]]) -> None:
    """model/evaluation/ evaluates checkpoints and models it is handed: it never imports the
    trainer or the training step, and the training loop never imports it (the cell pipeline
    and the stages join the two)."""
    evaluation = {m for m in graph if m.startswith("model.evaluation")}
    assert evaluation, "no model.evaluation modules found"
    for module in evaluation:
        assert not graph[module] & {"model.engine.train", "model.engine.step"}, module
    for module in (m for m in graph if m.startswith("model.engine")):
        assert not any(d.startswith("model.evaluation") for d in graph[module]), module


# tests/<folder>/ -> the code it tests: a test module in a room's folder imports that room
# (``tests.tiny`` counts for the core: its factories build the objective). The other folders
# hold tests across rooms: the import rules themselves, the comparisons with the official ALBEF
# code's recordings, and end-to-end runs (learning, the quick start, hostile input, CUDA).
TEST_ROOMS: dict[str, tuple[str, ...]] = {
    "core": ("model.albef", "model.bert", "model.vit", "model.losses", "model.negatives",
             "model.text_masking", "model.method", "model.momentum", "model.objective",
             "model.build", "tests.tiny"),
    "checkpoints": ("model.checkpoints", "model.pretrained", "model.release"),
    "config": ("model.config",),
    "data": ("model.data",),
    "engine": ("model.engine",),
    "evaluation": ("model.evaluation",),
    "downstream": ("model.downstream",),
    "cli": ("model.cli",),
    "slurm": ("slurm",),
    "ablations": ("ablations",),
    "results": ("results",),
    "benchmarks": ("benchmarks",),
    "devtools": ("devtools",),
    "architecture": (),
    "fidelity": (),
    "integration": (),
}
TESTS = REPO / "tests"


def _imported_names(path: Path) -> set[str]:
    """Every module and ``module.name`` that ``path`` imports."""
    found: set[str] = set()
    for module, names in _import_statements(path):
        found |= set(names) if module is None else {module, *(f"{module}.{n}" for n in names)}
    return found


def test_the_tests_mirror_the_rooms() -> None:
    """Every test module sits in the folder of the room it tests, and imports that room."""
    wrong = []
    for path in sorted(TESTS.rglob("test_*.py")):
        where = path.relative_to(TESTS)
        if len(where.parts) != 2 or where.parts[0] not in TEST_ROOMS:
            wrong.append(f"{where}: not in one of the folders {sorted(TEST_ROOMS)}")
            continue
        prefixes = TEST_ROOMS[where.parts[0]]
        if prefixes and not any(n == p or n.startswith(p + ".")
                                for n in _imported_names(path) for p in prefixes):
            wrong.append(f"{where}: imports nothing of {', '.join(prefixes)}")
    assert not wrong, "\n".join(wrong)
    assert {p.parent.name for p in TESTS.rglob("test_*.py")} == set(TEST_ROOMS), \
        "a folder of TEST_ROOMS holds no tests (remove it from the table)"
