"""The pytest grader (`moe-course grade`): its parts, its isolation, and parity with nbgrader.

Fast tests cover the pieces that need no notebook run: where probes go in a notebook,
finding submissions, the gradebook files, merging shards, what a result frame may contain,
the reference tripwires, and the walls of a sandbox process. Tests marked `slow` grade real
notebooks: the plugin used directly with pytest, the fallback without a zygote, and parity
with nbgrader autograde on honest submissions (correct, blank, partly right, crashing).
The helpers at the top are shared with `test_grader_adversarial.py`.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import nbformat
import pytest
import torch

from moe_course.grading import EXERCISES, exercises_for, judge_probe
from moe_course.grading.grade import (
    CSV_COLUMNS,
    NotebookError,
    Submission,
    find_submissions,
    merge,
    read_cells,
    shard,
    write_gradebook,
)
from moe_course.grading.pytest_grader import plain, probe_inputs
from moe_course.grading.sandbox import (
    Cell,
    Limits,
    Zygote,
    _Violation,
    load_frame,
    plan,
    run_sandboxed,
)
from moe_course.release import assignments

ROOT = Path(__file__).resolve().parent.parent
NB01 = "01_experts_and_gating"
GRADED = [a for a in assignments(ROOT) if a in {ex.assignment for ex in EXERCISES.values()}
          and (ROOT / "notebooks" / a).is_dir()]


# -- helpers shared with test_grader_adversarial.py -----------------------------------------

def notebook_path(folder: str, assignment: str) -> Path:
    (path,) = sorted((ROOT / folder / assignment).glob("*.ipynb"))
    return path


def answer_ids(assignment: str) -> list[str]:
    return [ex.grade_id for ex in exercises_for(assignment) if ex.kind != "written"]


def solution_sources(assignment: str) -> dict[str, str]:
    nb = nbformat.read(notebook_path("solutions", assignment), as_version=4)
    return {c.metadata["nbgrader"]["grade_id"]: c.source for c in nb.cells
            if "nbgrader" in c.metadata}


def submission(assignment: str, solved: set[str] | None = None,
               edits: dict[str, str] | None = None) -> nbformat.NotebookNode:
    """The release notebook with the solution in the answer cells `solved` (all by default)
    and then the answer cells in `edits` replaced by the given source."""
    nb = nbformat.read(notebook_path("notebooks", assignment), as_version=4)
    sources = solution_sources(assignment)
    solved = set(sources) if solved is None else solved
    for cell in nb.cells:
        gid = cell.metadata.get("nbgrader", {}).get("grade_id")
        if gid in (edits or {}):
            cell.source = edits[gid]
        elif gid in solved and cell.metadata["nbgrader"].get("solution"):
            cell.source = sources[gid]
    return nb


def write_submission(root: Path, student: str, assignment: str,
                     nb: nbformat.NotebookNode) -> Path:
    """Write `nb` where nbgrader expects it: root/<student>/<assignment>/<name>.ipynb."""
    path = root / student / assignment / notebook_path("notebooks", assignment).name
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


def run_grade(paths: list[Path], out: Path, *options: str) -> tuple[int, float, str]:
    """`moe-course grade PATHS --out OUT OPTIONS` in a fresh process: (status, seconds, log)."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "moe_course.cli", "grade", *map(str, paths),
                           "--out", str(out), *options], cwd=ROOT, capture_output=True,
                          text=True, env=jupyter_env(out.parent / "grade-env"))
    return done.returncode, time.perf_counter() - start, done.stdout + done.stderr


def read_grades(out: Path) -> dict[tuple[str, str, str], tuple[float, float]]:
    """grades.csv as {(student, assignment, exercise): (score, max_score)}, checking its form."""
    with open(out / "grades.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert tuple(rows[0]) == CSV_COLUMNS, rows[0]
    grades = {}
    for row in rows[1:]:
        assert len(row) == len(CSV_COLUMNS), row
        key = (row[0], row[1], row[2])
        assert key not in grades, f"duplicate row {row}"
        grades[key] = (float(row[3]), float(row[4]))
    return grades


def jupyter_env(tmp: Path) -> dict[str, str]:
    """A private Jupyter/IPython/matplotlib configuration, and this venv's scripts on PATH."""
    env = dict(os.environ)
    for key in ("JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR", "IPYTHONDIR",
                "MPLCONFIGDIR"):
        env[key] = str(tmp / key.lower())
        Path(env[key]).mkdir(parents=True, exist_ok=True)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["MPLBACKEND"] = "Agg"
    env.pop("NBGRADER_EXECUTION", None)
    env.pop("MOE_COURSE_GRADING", None)
    return env


def nbgrader_course(tmp: Path, names: list[str], timeout: int = 300) -> tuple[Path, dict]:
    """A temporary nbgrader course with `names` generated; (root, environment)."""
    root = tmp / "course"
    (root / "source").mkdir(parents=True)
    for name in names:
        shutil.copytree(ROOT / "solutions" / name, root / "source" / name,
                        ignore=shutil.ignore_patterns("*.py"))
    config = (ROOT / "nbgrader_config.py").read_text()
    config = config.replace('"solutions"', '"source"').replace('"notebooks"', '"release"')
    config = config.replace("c.Execute.timeout = 300", f"c.Execute.timeout = {timeout}")
    (root / "nbgrader_config.py").write_text(config)
    env = jupyter_env(tmp / "jupyter")
    for name in names:
        done = subprocess.run([sys.executable, "-m", "nbgrader", "generate_assignment", name,
                               "--force"], cwd=root, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    return root, env


def nbgrader_scores(root: Path, assignment: str, student: str) -> dict[str, float] | None:
    """nbgrader's points per exercise of one autograded submission (None: not autograded)."""
    from nbgrader.api import Gradebook, MissingEntry

    notebook = notebook_path("notebooks", assignment).stem
    with Gradebook(f"sqlite:///{root / 'gradebook.db'}") as gb:
        try:
            gb.find_submission_notebook(notebook, assignment, student)
        except MissingEntry:
            return None
        return {gid: gb.find_grade(f"{gid}_tests", notebook, assignment, student).score
                for gid in answer_ids(assignment)}


# -- where probes run -----------------------------------------------------------------------

def test_probes_run_where_their_tests_cell_stands() -> None:
    """Tests cells are replaced by their exercise's probes (once), other graded cells are not
    run, missing tests cells are probed at the end, and trailing cells are dropped."""
    cells = [Cell(0, "import torch"), Cell(2, "class Expert: ...", "ex01_expert"),
             Cell(3, "check(...)", "ex01_dense_moe_tests", tests=True),
             Cell(4, "check(...)", "ex01_dense_moe_tests", tests=True),
             Cell(5, "check('other')", "not_an_exercise_tests", tests=True),
             Cell(6, "x = 1"), Cell(7, "train()")]
    steps = plan(cells, exercises_for(NB01))
    assert [(s["kind"], s.get("index", s.get("grade_id"))) for s in steps] == [
        ("cell", 0), ("cell", 2), ("probe", "ex01_dense_moe"), ("cell", 6), ("cell", 7),
        ("probe", "ex01_expert"), ("probe", "ex01_softmax_gate")]


# -- finding submissions --------------------------------------------------------------------

def _tiny_notebook(path: Path, grade_ids: list[str]) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("pass", metadata={"nbgrader": {
        "grade": False, "solution": True, "grade_id": gid, "locked": False,
        "schema_version": 3}}) for gid in grade_ids]
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


def test_submissions_are_found_in_nbgrader_trees_and_loose_folders(tmp_path: Path) -> None:
    tree = tmp_path / "submitted"
    _tiny_notebook(tree / "ann" / NB01 / "experts_and_gating.ipynb", [])
    _tiny_notebook(tree / "ann" / NB01 / ".ipynb_checkpoints" / "x.ipynb", [])
    _tiny_notebook(tree / "ben" / "02_top_k_routing" / "top_k_routing.ipynb", [])
    loose = _tiny_notebook(tmp_path / "loose" / "cleo.ipynb", ["ex01_softmax_gate"])
    found = find_submissions([tree, loose])
    assert [(s.student, s.assignment) for s in found] == [
        ("ann", NB01), ("ben", "02_top_k_routing"), ("cleo", NB01)]
    assert found[2].path == loose.resolve()
    assert [s.student for s in find_submissions([tree / "ann" / NB01])] == ["ann"]


def test_ambiguous_or_duplicate_submissions_are_refused(tmp_path: Path) -> None:
    unknown = _tiny_notebook(tmp_path / "a" / "dan.ipynb", ["nothing_known"])
    with pytest.raises(ValueError, match="assignment is unknown"):
        find_submissions([unknown])
    assert find_submissions([unknown], assignment=NB01)[0].assignment == NB01
    mixed = _tiny_notebook(tmp_path / "b" / "eve.ipynb", ["ex01_expert", "ex02_moe_flops"])
    with pytest.raises(ValueError, match="several assignments"):
        find_submissions([mixed])
    _tiny_notebook(tmp_path / "c" / "x" / NB01 / "one.ipynb", [])
    _tiny_notebook(tmp_path / "c" / "x" / NB01 / "two.ipynb", [])
    with pytest.raises(ValueError, match="same student and assignment"):
        find_submissions([tmp_path / "c"])
    with pytest.raises(ValueError, match="unknown assignment"):
        find_submissions([unknown], assignment="99_nothing")


def test_unreadable_notebooks_are_refused_with_a_reason(tmp_path: Path) -> None:
    bad = tmp_path / "bad.ipynb"
    for content, reason in [(b"{not json", "not valid JSON"), (b'{"cells": 3}', "no list"),
                            (b'{"cells": [{"cell_type": "code", "source": 7}]}', "not text")]:
        bad.write_bytes(content)
        with pytest.raises(NotebookError, match=reason):
            read_cells(bad)


# -- result frames --------------------------------------------------------------------------

class _Boom:
    """Unpickling this would create a file: weights-only loading must never do it."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _frame(obj: object, compress: bool = False) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    if not compress:
        return buffer.getvalue()
    out = io.BytesIO()
    with zipfile.ZipFile(buffer) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    return out.getvalue()


def test_frames_are_plain_data_with_the_nonce_or_refused(tmp_path: Path) -> None:
    ok = {"nonce": "n1", "type": "probe", "outputs": {"result": torch.ones(2), "k": [1, "a"]}}
    assert torch.equal(load_frame(_frame(ok), "n1")["outputs"]["result"], torch.ones(2))
    target = tmp_path / "pwned"
    refused = [_frame({"nonce": "n1", "x": _Boom(str(target))}),  # arbitrary object
               _frame(ok, compress=True),  # a compressed archive (decompression bomb)
               _frame({**ok, "nonce": "n2"}),  # another run's nonce
               _frame([ok]),  # not a message
               b"PK\x03\x04 not really a zip"]
    for data in refused:
        with pytest.raises(_Violation):
            load_frame(data, "n1")
    assert not target.exists()


def test_outputs_are_dense_cpu_tensors_and_plain_containers() -> None:
    sub = torch.ones(3).as_subclass(type("Sub", (torch.Tensor,), {}))
    out = plain({"a": (torch.arange(6).reshape(2, 3).T, None), "b": sub,
                 "c": torch.ones(2).to_sparse(), "d": object()})
    assert out["a"][0].is_contiguous() and out["a"][0].tolist() == [[0, 3], [1, 4], [2, 5]]
    assert out["a"][1] is None
    assert out["b"]["kind"] == out["c"]["kind"] == out["d"]["kind"] == "object"


# -- gradebook ------------------------------------------------------------------------------

def _result(student: str, score: float, hidden_message: str = "secret hidden inputs") -> dict:
    return {"student": student, "assignment": NB01, "cell_errors": [], "manual": [
        {"exercise": "ex01_written", "max_score": 1.0}], "exercises": [
        {"exercise": "ex01_expert", "symbol": "Expert", "score": score, "max_score": 2.0,
         "status": "passed" if score else "failed", "checks": [
             {"name": "visible one", "hidden": False, "passed": bool(score),
              "message": None if score else "Expert, check 'visible one': use GELU"},
             {"name": "hidden one", "hidden": True, "passed": bool(score),
              "message": None if score else hidden_message}]}]}


def test_gradebook_files_hold_the_scores_and_no_hidden_checks(tmp_path: Path) -> None:
    assert write_gradebook(tmp_path, [_result("zoe", 0.0), _result("al,\"x\"", 2.0)])
    assert read_grades(tmp_path) == {("al,\"x\"", NB01, "ex01_expert"): (2.0, 2.0),
                                     ("zoe", NB01, "ex01_expert"): (0.0, 2.0)}
    report = json.loads((tmp_path / "grades.json").read_text())
    assert report["complete"] and [s["student"] for s in report["submissions"]] == [
        "al,\"x\"", "zoe"]
    page = (tmp_path / "feedback" / "zoe" / f"{NB01}.md").read_text()
    assert "use GELU" in page and "hidden check 1: failed" in page
    assert "secret" not in page and "hidden one" not in page
    assert "graded by hand" in page
    assert sorted(p.name for p in tmp_path.iterdir()) == ["feedback", "grades.csv",
                                                          "grades.json"]


def test_shards_merge_into_one_gradebook(tmp_path: Path) -> None:
    subs = [Submission(s, NB01, Path(s)) for s in "abcdefg"]
    parts = [shard(subs, f"{k}/3") for k in (1, 2, 3)]
    assert sorted(s.student for part in parts for s in part) == list("abcdefg")
    with pytest.raises(ValueError, match="K/N"):
        shard(subs, "4/3")
    for k, part in enumerate(parts):
        write_gradebook(tmp_path / f"shard{k}", [_result(s.student, 2.0) for s in part])
    assert merge([tmp_path / f"shard{k}" for k in range(3)], tmp_path / "all")
    assert {k[0] for k in read_grades(tmp_path / "all")} == set("abcdefg")
    with pytest.raises(ValueError, match="two shards"):
        merge([tmp_path / "shard0", tmp_path / "shard0"], tmp_path / "again")


def test_grade_command_refuses_misuse(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    status, _, log = run_grade([empty], tmp_path / "out")
    assert status == 2 and "no submissions" in log
    status, _, log = run_grade([empty / "missing.ipynb"], tmp_path / "out")
    assert status == 2 and "no such file" in log


# -- tripwires and walls --------------------------------------------------------------------

TRIPWIRE_SCRIPT = """
import types, torch
import moe_course.gating as gating
from moe_course import experts
from moe_course.grading import EXERCISES
from moe_course.grading.guard import ReferenceCalled, reference_guard
x, w_gate = torch.randn(3, 4), torch.randn(4, 2)
expected = torch.softmax(x @ w_gate, dim=-1)
alias = gating.softmax_gate
copy = types.FunctionType(gating.softmax_gate.__code__, gating.softmax_gate.__globals__)
forward = experts.Expert.forward
results = [torch.allclose(copy(x, w_gate), expected), torch.allclose(alias(x, w_gate), expected)]
for probing, fn in [("ex01_softmax_gate", copy), ("ex01_dense_moe", copy),
                    ("ex01_expert", lambda *_: forward(experts.Expert(4, 5), x))]:
    with reference_guard(*EXERCISES[probing].references):
        try:
            fn(x, w_gate)
            results.append("ran")
        except ReferenceCalled:
            results.append("tripped")
results.append(torch.allclose(copy(x, w_gate), expected))
print(results)
"""


def test_references_trip_only_while_their_own_exercise_is_checked() -> None:
    """While an exercise is checked, its reference's code trips however it is reached (an
    alias, a copy of the function object, a method of the class); other exercises and plain
    cells can still use it, before and after."""
    done = subprocess.run([sys.executable, "-c", TRIPWIRE_SCRIPT], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[True, True, 'tripped', 'ran', 'tripped', True]"


WALLED = [
    "import os\ntry:\n    os.fork()\nexcept OSError as e:\n    raise SystemExit(repr(e))",
    "import subprocess\nsubprocess.run(['true'])",
    "import sys, subprocess\nsys.audit = lambda *a: None  # the audit hook cannot see this\n"
    "subprocess.run(['true'])",
    "open(OUTSIDE, 'w').write('x')",
    "torch.save(torch.ones(1), OUTSIDE)  # C++ file writer: no audit event",
    "import os\nos.kill(os.getppid(), 0)",
    "import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)",
]


def test_a_sandbox_walls_in_processes_files_signals_and_sockets(tmp_path: Path) -> None:
    """Each walled cell fails inside the sandbox and the exercise is still graded. Landlock
    and seccomp must be there: without them this kernel gives weaker isolation."""
    outside = tmp_path / "outside.txt"
    sources = solution_sources(NB01)
    cells = [Cell(0, f"import torch\nfrom torch import nn\nimport torch.nn.functional as F\n"
                     f"OUTSIDE = {str(outside)!r}"),
             *[Cell(1 + i, src) for i, src in enumerate(WALLED)],
             Cell(19, "open('inside.txt', 'w').write('fine')\nopen('/dev/null', 'w').write('x')"),
             Cell(20, sources["ex01_softmax_gate"], "ex01_softmax_gate"),
             Cell(21, "", "ex01_softmax_gate_tests", tests=True)]
    exercise = EXERCISES["ex01_softmax_gate"]
    run = run_sandboxed(cells, [exercise], Limits(timeout=30), probe_inputs)
    assert run.walls.get("landlock", 0) >= 1 and run.walls.get("seccomp"), run.walls
    assert sorted(run.cell_errors) == list(range(1, 1 + len(WALLED))), run.cell_errors
    assert all("Permission" in e or "Operation not permitted" in e or "denied" in e
               for e in run.cell_errors.values()), run.cell_errors
    assert not outside.exists()
    for probe in exercise.visible + exercise.hidden:
        outcome = run.probes[exercise.grade_id][probe.name]
        assert outcome.error is None, outcome.error
        judge_probe(exercise, probe, probe_inputs(exercise, probe), plain(outcome.outputs))


# -- whole notebooks (slow) -----------------------------------------------------------------

@pytest.mark.slow
def test_the_plugin_runs_under_plain_pytest(tmp_path: Path) -> None:
    """`pytest -p moe_course.grading.pytest_grader --submission ...`: one item per exercise,
    named student/assignment::grade_id, failing with the check's message."""
    folder = tmp_path / "class"
    folder.mkdir()
    nbformat.write(submission(NB01), folder / "ada.ipynb")
    nbformat.write(submission(NB01, solved={"ex01_expert"}), folder / "bo.ipynb")
    (folder / "conftest.py").write_text("raise SystemExit('a conftest next to a submission')")
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "moe_course.grading.pytest_grader",
         "-c", str(tmp_path / "pytest.ini"), "-p", "no:cacheprovider", "-rA",
         "--submission", str(folder), "--grades-out", str(tmp_path / "out")],
        cwd=tmp_path, capture_output=True, text=True, env=jupyter_env(tmp_path / "env"))
    log = done.stdout + done.stderr
    assert done.returncode == 1, log
    for gid in answer_ids(NB01):
        assert f"PASSED ada/{NB01}::{gid}" in log
    assert f"PASSED bo/{NB01}::ex01_expert" in log
    assert f"FAILED bo/{NB01}::ex01_softmax_gate" in log
    assert "your softmax_gate is not implemented yet" in log
    grades = read_grades(tmp_path / "out")
    assert grades[("bo", NB01, "ex01_expert")] == (2.0, 2.0)
    assert grades[("bo", NB01, "ex01_dense_moe")] == (0.0, 2.0)


@pytest.mark.slow
def test_workers_are_spawned_afresh_without_a_zygote(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Zygote, "_current", None)
    monkeypatch.setattr(Zygote, "_broken", True)
    cells = read_cells(notebook_path("solutions", NB01))
    run = run_sandboxed(cells, exercises_for(NB01), Limits(timeout=60), probe_inputs)
    assert Zygote._current is None and run.attempts == 1 and run.failure is None
    for exercise in exercises_for(NB01)[:3]:
        for probe in exercise.visible + exercise.hidden:
            outcome = run.probes[exercise.grade_id][probe.name]
            judge_probe(exercise, probe, probe_inputs(exercise, probe), plain(outcome.outputs))


def _honest(assignment: str) -> dict[str, nbformat.NotebookNode]:
    """Honest submissions: correct, blank, partly right, and crashing (the first answer cell
    raises after its definitions, the second answer raises when called)."""
    ids, sources = answer_ids(assignment), solution_sources(assignment)
    first, second = ids[0], ids[1]
    symbol = EXERCISES[second].symbol
    crash = {first: sources[first] + "\nraise RuntimeError('a typo after the definitions')\n",
             second: (f"class {symbol}:\n    def __init__(self, *args, **kwargs):\n"
                      f"        raise ZeroDivisionError('oops')\n"
                      if EXERCISES[second].kind == "class" else
                      f"def {symbol}(*args, **kwargs):\n    return 1 / 0\n")}
    return {"correct": submission(assignment), "blank": submission(assignment, solved=set()),
            "partly": submission(assignment, solved={first}),
            "crashing": submission(assignment, edits=crash)}


@pytest.mark.slow
def test_honest_submissions_get_the_same_points_as_nbgrader(tmp_path: Path) -> None:
    """For every graded assignment in solutions/, correct, blank, partly right and crashing
    submissions get the same points per exercise from both graders."""
    root, env = nbgrader_course(tmp_path, GRADED)
    for assignment in GRADED:
        for student, nb in _honest(assignment).items():
            write_submission(root / "submitted", student, assignment, nb)
    for assignment in GRADED:
        done = subprocess.run([sys.executable, "-m", "nbgrader", "autograde", assignment,
                               "--force"], cwd=root, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
    status, seconds, log = run_grade([root / "submitted"], tmp_path / "out", "--jobs", "2")
    assert status == 0, log
    ours = read_grades(tmp_path / "out")
    for assignment in GRADED:
        points = {ex.grade_id: float(ex.points) for ex in exercises_for(assignment)}
        for student in ("correct", "blank", "partly", "crashing"):
            theirs = nbgrader_scores(root, assignment, student)
            mine = {gid: ours[(student, assignment, gid)][0] for gid in answer_ids(assignment)}
            assert mine == theirs, (assignment, student, mine, theirs)
        assert {gid: ours[("correct", assignment, gid)][0] for gid in answer_ids(assignment)} \
            == {gid: points[gid] for gid in answer_ids(assignment)}
        assert sum(ours[("blank", assignment, gid)][0] for gid in answer_ids(assignment)) == 0
