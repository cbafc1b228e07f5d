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
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import nbformat
import pytest
import torch
from nbgrader_course import (  # noqa: F401 (re-exported to test_grader_adversarial.py)
    ASSIGNMENTS,
    ROOT,
    STUDENTS,
    Course,
    answer_ids,
    expected_points,
    jupyter_env,
    notebook_path,
    solution_sources,
    submission,
)
from nbgrader_course import new_course as nbgrader_course  # noqa: F401

from moe_course.grading import EXERCISES, exercises_for, judge_probe
from moe_course.grading.autograde.grade import (
    CSV_COLUMNS,
    NotebookError,
    Submission,
    discover,
    find_submissions,
    merge,
    read_cells,
    safe_name,
    shard,
    write_gradebook,
)
from moe_course.grading.autograde.limits import Limits
from moe_course.grading.autograde.pytest_plugin import plain, probe_inputs
from moe_course.grading.autograde.sandbox import (
    Cell,
    Zygote,
    _Violation,
    load_frame,
    plan,
    run_sandboxed,
)

NB01 = "01_experts_and_gating"


# -- helpers shared with test_grader_adversarial.py -----------------------------------------

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


def nbgrader_scores(root: Path, assignment: str, student: str) -> dict[str, float] | None:
    """nbgrader's points per exercise of one autograded submission (None: not autograded)."""
    from nbgrader.api import MissingEntry

    try:
        return Course(root, root / "grades.csv", {}, 0.0).scores(assignment, student)
    except MissingEntry:
        return None


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


def test_ambiguous_or_duplicate_submissions_are_skipped_with_a_reason(tmp_path: Path) -> None:
    """One notebook's problem never stops the others: it is skipped, with its reason."""
    unknown = _tiny_notebook(tmp_path / "a" / "dan.ipynb", ["nothing_known"])
    ((_, why),) = [(s.path, s.reason) for s in discover([unknown])[1]]
    assert "assignment is unknown" in why
    assert find_submissions([unknown], assignment=NB01)[0].assignment == NB01
    mixed = _tiny_notebook(tmp_path / "b" / "eve.ipynb", ["ex01_expert", "ex02_moe_flops"])
    assert "several assignments" in discover([mixed])[1][0].reason
    _tiny_notebook(tmp_path / "c" / "x" / NB01 / "one.ipynb", [])
    _tiny_notebook(tmp_path / "c" / "x" / NB01 / "two.ipynb", [])
    _tiny_notebook(tmp_path / "c" / "y" / NB01 / "one.ipynb", [])
    found, skipped = discover([tmp_path / "c"])
    assert [s.student for s in found] == ["y"]
    assert len(skipped) == 2 and all("two notebooks for x/" in s.reason for s in skipped)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "broken.ipynb").write_text("{not json")
    _tiny_notebook(tmp_path / "d" / "fine.ipynb", ["ex01_expert"])
    found, skipped = discover([tmp_path / "d"])
    assert [s.student for s in found] == ["fine"] and "not valid JSON" in skipped[0].reason
    with pytest.raises(ValueError, match="unknown assignment"):
        find_submissions([unknown], assignment="99_nothing")


def test_symlinks_and_odd_names_are_reported_never_followed(tmp_path: Path) -> None:
    """Symlinked notebooks and student folders are refused and listed; a name that is not
    UTF-8 is graded under an escaped name."""
    tree = tmp_path / "submitted"
    outside = _tiny_notebook(tmp_path / "elsewhere" / "x.ipynb", [])
    _tiny_notebook(tree / "ann" / NB01 / "experts_and_gating.ipynb", [])
    (tree / "bob" / NB01).mkdir(parents=True)
    (tree / "bob" / NB01 / "experts_and_gating.ipynb").symlink_to(outside)
    (tree / "cat").symlink_to(tree / "ann")
    odd = os.fsdecode(b"d\xe9d")
    _tiny_notebook(tree / odd / NB01 / "experts_and_gating.ipynb", [])
    found, skipped = discover([tree])
    assert [s.student for s in found] == ["ann", "d\\xe9d"]
    assert sorted(Path(s.path).name for s in skipped) == ["cat", "experts_and_gating.ipynb"]
    assert all("symlink" in s.reason for s in skipped)


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


def test_gradebook_survives_colliding_names_and_unwritable_feedback(tmp_path: Path) -> None:
    """`a b` and `a_b` get two feedback pages; a page that cannot be written is reported and
    the gradebook is still written; an output folder that refuses even that gets it beside."""
    out = tmp_path / "out"
    (out / "feedback" / safe_name("zed")).mkdir(parents=True)
    (out / "feedback" / safe_name("zed") / f"{NB01}.md").mkdir()  # a folder where a page goes
    assert not write_gradebook(out, [_result("a b", 2.0), _result("a_b", 0.0),
                                     _result("zed", 2.0)])
    pages = {p.parent.name: p.read_text() for p in (out / "feedback").glob("*/*.md")
             if p.is_file()}
    assert "feedback for a b" in pages[safe_name("a b")]
    assert "feedback for a_b" in pages["a_b"]
    report = json.loads((out / "grades.json").read_text())
    assert not report["complete"] and "feedback for zed" in report["errors"][0]
    assert len(read_grades(out)) == 3
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "grades.json").mkdir()  # cannot be replaced by a file
    assert not write_gradebook(locked, [_result("a", 2.0)])
    (elsewhere,) = tmp_path.glob("locked.gradebook-*")
    assert read_grades(elsewhere) == {("a", NB01, "ex01_expert"): (2.0, 2.0)}


def _immutable(path: Path, on: bool) -> None:
    import fcntl
    import struct

    fd = os.open(path, os.O_RDONLY)
    try:
        flags = struct.unpack("l", fcntl.ioctl(fd, 0x80086601, struct.pack("l", 0)))[0]
        flags = flags | 0x10 if on else flags & ~0x10  # FS_IMMUTABLE_FL
        fcntl.ioctl(fd, 0x40086602, struct.pack("l", flags))
    finally:
        os.close(fd)


def test_an_immutable_output_folder_costs_no_gradebook(tmp_path: Path) -> None:
    """The immutable flag (as a learner with root's powers would set it, through ioctl) on
    the feedback folder: each page is reported; on --out itself: the gradebook is written
    beside it. (Setting the flag needs CAP_LINUX_IMMUTABLE: these tests run as root.)"""
    out = tmp_path / "out"
    (out / "feedback").mkdir(parents=True)
    _immutable(out / "feedback", True)
    try:
        assert not write_gradebook(out, [_result("a", 2.0), _result("b", 0.0)])
        report = json.loads((out / "grades.json").read_text())
        assert len(report["errors"]) == 2 and "feedback for a/" in report["errors"][0]
        assert len(read_grades(out)) == 2
        _immutable(out, True)
        assert not write_gradebook(out, [_result("a", 2.0)])
        (elsewhere,) = tmp_path.glob("out.gradebook-*")
        assert "refused the gradebook" in (elsewhere / "grades.json").read_text()
    finally:
        _immutable(out, False)
        _immutable(out / "feedback", False)


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
               or (run.walls["net_namespace"] and "Connection refused" in e)  # alone there
               or (run.walls["own_uid"] and "does not exist" in e)  # cannot even look
               for e in run.cell_errors.values()), run.cell_errors
    assert not outside.exists()
    for probe in exercise.visible + exercise.hidden:
        outcome = run.probes[exercise.grade_id][probe.name]
        assert outcome.error is None, outcome.error
        judge_probe(exercise, probe, probe_inputs(exercise, probe), plain(outcome.outputs))


# -- whole notebooks (slow) -----------------------------------------------------------------

@pytest.mark.slow
def test_the_plugin_runs_under_plain_pytest(tmp_path: Path) -> None:
    """`pytest -p moe_course.grading.autograde.pytest_plugin --submission ...`: one item per
    exercise, named student/assignment::grade_id, failing with the check's message."""
    folder = tmp_path / "class"
    folder.mkdir()
    nbformat.write(submission(NB01), folder / "ada.ipynb")
    nbformat.write(submission(NB01, solved={"ex01_expert"}), folder / "bo.ipynb")
    (folder / "conftest.py").write_text("raise SystemExit('a conftest next to a submission')")
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "moe_course.grading.autograde.pytest_plugin",
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


@pytest.mark.slow
@pytest.mark.xdist_group("nbgrader_course")
def test_honest_submissions_get_the_same_points_as_nbgrader(autograded_course: Course,
                                                             tmp_path: Path) -> None:
    """For every assignment in solutions/, the correct, blank, and partly right and crashing
    submissions (`tests/nbgrader_course.py`) get the same points per exercise from both
    graders: ours grades the session's nbgrader course's `submitted/` tree, which nbgrader
    autograded once."""
    course = autograded_course
    status, seconds, log = run_grade([course.root / "submitted"], tmp_path / "out",
                                     "--jobs", "2")
    assert status == 0, log
    ours = read_grades(tmp_path / "out")
    assert {(s, a) for s, a, _ in ours} == {(s, a) for s in STUDENTS for a in ASSIGNMENTS}
    for assignment in ASSIGNMENTS:
        for student in STUDENTS:
            theirs = course.scores(assignment, student)
            mine = {gid: ours[(student, assignment, gid)][0] for gid in answer_ids(assignment)}
            assert mine == theirs, (assignment, student, mine, theirs)
            assert mine == expected_points(assignment, student), (assignment, student, mine)
