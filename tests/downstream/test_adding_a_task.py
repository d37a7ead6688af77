"""docs/ARCHITECTURE.md "Adding a downstream task": its worked example (two-way visual
entailment, ``ve2``) applied block by block to a copy of the checkout touches exactly the files of
the doc's table, and the new protocol then runs end to end (pre-train -> fine-tune -> evaluate)
through the grid's stage runner. A seam that needs one more file, or a block that no longer
applies or runs, fails here."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import ClassVar, get_origin, get_type_hints

import pytest

from devtools.mutations import scratch_copy
from model.downstream.tasks import TASKS, TaskSpec

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "ARCHITECTURE.md"

# One micro stage, as in tests/downstream/test_task_stages.py.
RUN = """
import json, sys, yaml
from pathlib import Path
from typing import ClassVar, get_origin, get_type_hints
from model.cell.stages import run_downstream
from model.config.experiment import load_experiment
from model.config.protocols import load_protocols
from model.engine.train import train
from tests.tiny import tiny_grid_sets

out, cache = Path(sys.argv[1]), sys.argv[2]
data = yaml.safe_load(Path("ablations/protocols.yaml").read_text())
data["protocols"]["snli_ve2"]["task_synthetic"] = {
    "synthetic": {"train": 16, "val": 6, "test": 6}, "eval_batch_size": 8}
micro = Path("ablations/protocols_micro.yaml")
micro.write_text(yaml.safe_dump(data))
cfg = load_experiment(preset="tiny", sets=[*tiny_grid_sets(cache), "train.max_steps=2"])
train(cfg, out / "pre", progress=False)
stages = run_downstream(cfg, out / "run", out / "pre" / "checkpoint.pt", ["snli_ve2"],
                        {"cell": "albef", "seed": 0}, registry=load_protocols(micro),
                        sets=["train.max_steps=3", "train.epochs=1", "train.batch_size=8"])
print("METRICS " + json.dumps(stages["snli_ve2"].metrics))
from model.downstream.tasks import task_spec
from tests.downstream.test_adding_a_task import undeclared
print("UNDECLARED " + json.dumps(undeclared(task_spec("ve2"))))
"""


def _section(text: str) -> str:
    start = text.index("## Adding a downstream task")
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]


def table_files(section: str) -> set[str]:
    """The files of the section's "A new task touches" table."""
    return set(re.findall(r"^\| `([^`]+)` \|", section, flags=re.M))


def example_blocks(section: str) -> list[tuple[str, str, str]]:
    """(file, language, body) of every fenced block introduced by a "`file`:" line."""
    return re.findall(r"^`([^`\s]+)`(?: \([^)]*\))?:\n\n```(\w+)\n(.*?)```", section,
                      flags=re.M | re.S)


def apply_diff(text: str, diff: str, where: str) -> str:
    """Each run of ``-`` lines followed by ``+`` lines replaces one exact occurrence."""
    hunks: list[tuple[list[str], list[str]]] = []
    for line in diff.splitlines():
        sign, body = line[:1], line[1:]
        if sign == "-" and (not hunks or hunks[-1][1]):
            hunks.append(([], []))
        assert sign in "+-" and hunks, f"{where}: not a diff line: {line!r}"
        hunks[-1][0 if sign == "-" else 1].append(body)
    for old, new in hunks:
        before = "\n".join(old) + "\n"
        assert text.count(before) == 1, f"{where}: {before!r} is not in the file exactly once"
        text = text.replace(before, "\n".join(new) + "\n")
    return text


def apply_example(root: Path, blocks: list[tuple[str, str, str]]) -> set[str]:
    """Write the example into ``root``; the files it changed."""
    for file, language, body in blocks:
        path = root / file
        if language == "python":
            assert not path.exists(), f"{file}: the example's new module already exists"
            path.write_text(body)
        elif language == "diff":
            path.write_text(apply_diff(path.read_text(), body, file))
        elif language == "yaml":
            path.write_text(path.read_text() + body)
        else:
            raise AssertionError(f"{file}: unexpected block language {language!r}")
    return {file for file, _, _ in blocks}


def undeclared(spec: TaskSpec) -> list[str]:
    """The class attributes that ``spec``'s bases (TaskSpec, ClassifyTask) declare without a
    value and ``spec`` does not set."""
    return [n for n, kind in get_type_hints(type(spec)).items()
            if get_origin(kind) is ClassVar and not hasattr(spec, n)]


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_registered_task_declares_what_a_spec_needs(name: str) -> None:
    assert not undeclared(TASKS[name])


def test_the_example_touches_exactly_the_tables_files() -> None:
    section = _section(DOC.read_text())
    files = table_files(section)
    assert "model/downstream/tasks/<task>.py" in files and len(files) == 4
    touched = {f.replace("ve2.py", "<task>.py") for f, _, _ in example_blocks(section)}
    assert touched == files
    assert "ve2" not in TASKS  # the example is not part of the project


@pytest.mark.slow
def test_the_example_task_runs_end_to_end(tmp_path: Path, synthetic_cache: Path) -> None:
    root = scratch_copy(tmp_path / "checkout")
    blocks = example_blocks(_section(DOC.read_text()))
    apply_example(root, blocks)
    done = subprocess.run([sys.executable, "-c", RUN, str(tmp_path / "out"),
                           str(synthetic_cache)], cwd=root, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    metrics = json.loads(done.stdout.split("METRICS ", 1)[1].splitlines()[0])
    assert json.loads(done.stdout.split("UNDECLARED ", 1)[1]) == []
    assert set(metrics) == {"val", "test"}
    assert all(0.0 <= v <= 100.0 for v in metrics.values())
    stage = tmp_path / "out" / "run" / "snli_ve2"
    assert (stage / "DONE").is_file()
    result = json.loads((stage / "result.json").read_text())
    assert result["provenance"]["data_kind"] == "synthetic"
    # the stand-in is the example's: two statements per image, labels balanced
    generated = sorted(synthetic_cache.glob("synthetic_ve2_*/ve2_train.json"))
    assert generated, "the example's stand-in was not generated"
    rows = json.loads(generated[-1].read_text())
    assert len(rows) == 2 * 16
    assert sorted({r["label"] for r in rows}) == ["contradiction", "entailment"]
