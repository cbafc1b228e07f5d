"""Reference use is caught by what runs, not by which object is called.

Every answer cell of `tripwire_cases.CASES` reaches an exercise's reference code some other
way than by name (stored originals, reload, gc, `types.FunctionType`, a copy of the module
file, methods of reference classes, helpers that do the whole work, threads, tampering with
the profiler). Each must fail:

- in-kernel, with `check(...)` as the notebooks and nbgrader's tests cells call it (run in a
  fresh interpreter, since some cases reload modules or leave threads behind);
- in the pytest grader (`moe-course grade`, slow), on submissions of notebooks 01 and 02;
- under nbgrader autograde (slow), on the same submissions.

Other exercises' references and plain cells keep working, and the guard stays silent.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import nbformat
import pytest
import torch
from tripwire_cases import CASES, TAMPERING, by_assignment

from moe_course import experts, gating
from moe_course.grading import EXERCISES, check
from moe_course.grading.guard import (
    ReferenceCalled,
    code_fingerprint,
    reference_codes,
    reference_guard,
)

ROOT = Path(__file__).resolve().parent.parent

IN_KERNEL = """
import contextlib, io, json, sys, warnings
import torch
from torch import nn
import torch.nn.functional as F
from moe_course.grading import check
cases = json.loads(sys.argv[1])
results = {}
for name, grade_id, source in cases:
    ns = {"torch": torch, "nn": nn, "F": F, "__name__": "__main__"}
    with warnings.catch_warnings():  # gc cases touch deprecated attributes of torch
        warnings.simplefilter("ignore")
        exec(compile(source, f"<cell {name}>", "exec"), ns)
    symbol = {"ex01_expert": "Expert"}.get(grade_id, grade_id.split("_", 1)[1])
    outcome = []
    for hidden in (False, True):
        err = io.StringIO()
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
                check(grade_id, ns[symbol], hidden=hidden)
            outcome.append("passed")
        except AssertionError as exc:
            outcome.append(str(exc))
        outcome.append(err.getvalue())
    results[name] = outcome
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def in_kernel(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    cwd = tmp_path_factory.mktemp("in-kernel")  # some cases write files where they run
    done = subprocess.run([sys.executable, "-c", IN_KERNEL, json.dumps(CASES)], cwd=cwd,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_each_bypass_class_has_two_instances() -> None:
    classes = {"stored": 0, "reload": 0, "gc": 0, "FunctionType": 0, "module": 0,
               "Expert": 0, "helper": 0, "profile": 0, "thread": 0}
    for name, _, _ in CASES:
        for key in classes:
            if key in name or (key == "profile" and name in TAMPERING):
                classes[key] += 1
    assert all(n >= 2 for n in classes.values()), classes


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_each_bypass_fails_the_in_kernel_check(in_kernel: dict, name: str) -> None:
    visible, visible_err, hidden, hidden_err = in_kernel[name]
    assert visible_err == hidden_err == "", (visible_err, hidden_err)  # the guard is silent
    for message in (visible, hidden):
        assert message != "passed", name
        if name in TAMPERING:
            assert "tampered with the grader's guard" in message, message
        elif "stored originals" in name:
            assert "_ORIGINALS" in message, message  # there are none to call
        else:
            assert "implement it yourself" in message, message


def test_the_sandbox_worker_keeps_no_originals() -> None:
    from moe_course.grading.autograde import worker

    assert not hasattr(worker, "_ORIGINALS")
    for exercise in EXERCISES.values():  # the references are untouched objects
        if isinstance(exercise.reference, type(gating.softmax_gate)):
            assert exercise.reference.__code__.co_filename.endswith(".py")


def test_other_exercises_and_plain_code_may_use_references() -> None:
    """Only the exercise under check trips: sparse_moe may use Expert and top_k_gating."""
    from test_checks_common import correct

    honest = correct("ex02_sparse_moe")

    def sparse_moe(x, experts_, weights, indices):
        _ = experts.Expert(x.shape[-1], 3)(x)  # another exercise's reference class
        _ = gating.top_k_gating(torch.randn(2, 3), 1)  # another exercise's reference
        return honest(x, experts_, weights, indices)

    check("ex02_sparse_moe", sparse_moe)
    check("ex02_sparse_moe", sparse_moe, hidden=True)
    assert gating.top_k_gating(torch.tensor([[1.0, 2.0]]), 1).indices.item() == 1


def test_a_guard_trips_on_copies_and_is_gone_afterwards() -> None:
    import types

    copy = types.FunctionType(gating.softmax_gate.__code__, gating.softmax_gate.__globals__)
    x, w = torch.randn(3, 4), torch.randn(4, 2)
    with reference_guard(gating.softmax_gate) as state:
        with pytest.raises(ReferenceCalled):
            copy(x, w)
        gating.top_k_gating(x @ w, 1)  # not guarded
    assert state.calls == ["softmax_gate"] and not state.tampering
    assert torch.allclose(copy(x, w), torch.softmax(x @ w, dim=-1))  # no guard: runs
    assert sys.getprofile() is None


def test_fingerprints_ignore_name_file_and_lines_not_code() -> None:
    source = textwrap.dedent("""
        def f(x):
            '''doc'''
            return x * 2
    """)
    a, b = {}, {}
    exec(compile(source, "one.py", "exec"), a)
    exec(compile("\n\n" + source.replace("def f", "def g"), "two.py", "exec"), b)
    assert code_fingerprint(a["f"].__code__) == code_fingerprint(b["g"].__code__)
    c = {}
    exec(compile(source.replace("x", "y"), "one.py", "exec"), c)  # a renamed local
    assert code_fingerprint(a["f"].__code__) != code_fingerprint(c["f"].__code__)
    names = set(reference_codes([EXERCISES["ex05_moe_feed_forward"].reference]).values())
    assert {"MoEFeedForward.__init__", "MoEFeedForward.forward"} <= names


def test_the_reference_runs_in_other_threads_is_recorded() -> None:
    import threading

    results = []
    with reference_guard(gating.softmax_gate) as state:
        thread = threading.Thread(target=lambda: results.append(
            gating.softmax_gate(torch.randn(2, 3), torch.randn(3, 2))))
        thread.start()
        thread.join()
    assert results and state.calls == ["softmax_gate"]


# -- the pytest grader and nbgrader on whole notebooks (slow) ---------------------------------

def _submissions(tmp: Path) -> dict[str, tuple[str, dict[str, str]]]:
    from test_grader import submission

    found = {}
    for assignment, prefix in (("01_experts_and_gating", "ex01"), ("02_top_k_routing", "ex02")):
        for i, pack in enumerate(by_assignment(prefix)):
            student = f"cheat{prefix[2:]}{chr(ord('a') + i)}"
            nb = submission(assignment, edits=pack)
            path = tmp / "submitted" / student / assignment
            path.mkdir(parents=True)
            nbformat.write(nb, path / sorted(
                (ROOT / "notebooks" / assignment).glob("*.ipynb"))[0].name)
            found[student] = (assignment, pack)
    return found


@pytest.mark.slow
def test_each_bypass_scores_zero_in_the_pytest_grader(tmp_path: Path) -> None:
    from test_grader import read_grades, run_grade

    subs = _submissions(tmp_path)
    status, _, log = run_grade([tmp_path / "submitted"], tmp_path / "out")
    assert status == 0, log
    grades = read_grades(tmp_path / "out")
    for student, (assignment, pack) in subs.items():
        for grade_id in pack:
            score, max_score = grades[(student, assignment, grade_id)]
            assert (score, max_score) == (0, EXERCISES[grade_id].points), (student, grade_id)


@pytest.mark.slow
def test_each_bypass_scores_zero_under_nbgrader_autograde(tmp_path: Path) -> None:
    from test_grader import nbgrader_course, nbgrader_scores

    root, env = nbgrader_course(tmp_path, ["01_experts_and_gating", "02_top_k_routing"])
    subs = _submissions(root)
    for assignment in sorted({assignment for assignment, _ in subs.values()}):
        # one nbgrader process per assignment; it autogrades each student in a fresh kernel
        done = subprocess.run([sys.executable, "-m", "nbgrader", "autograde", assignment,
                               "--force"], cwd=root, env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
    for student, (assignment, pack) in subs.items():
        scores = nbgrader_scores(root, assignment, student)
        assert scores is not None, student
        for grade_id in pack:
            assert scores[grade_id] == 0, (student, grade_id, scores)


LOOK_FOR_INPUTS = """
import gc, sys
frames, f = [], sys._getframe()
while f is not None:
    frames.append(f)
    f = f.f_back
held = [name for f in frames for name, v in f.f_locals.items()
        if isinstance(v, dict) and any("::" in str(k) for k in list(v)[:50])]
job = next((f.f_locals["job"] for f in frames if "job" in f.f_locals), {})
keys = [k for o in gc.get_objects() if isinstance(o, dict)
        for k in list(o)[:50] if isinstance(k, str) and k.startswith("ex01_softmax_gate::")]
assert not held and "inputs" not in job and not keys, (held, sorted(job), keys[:3])
"""


def test_the_sandbox_gets_a_probes_inputs_only_when_it_runs() -> None:
    """No probe inputs in the worker before its probes: not in the job, not in any frame,
    not anywhere gc can find them; the probes still run and pass."""
    from test_grader import solution_sources

    from moe_course.grading.autograde.pytest_plugin import probe_inputs
    from moe_course.grading.autograde.sandbox import Cell, Limits, run_sandboxed
    from moe_course.grading.runner import judge_probe

    exercise = EXERCISES["ex01_softmax_gate"]
    cells = [Cell(0, "import torch"), Cell(1, LOOK_FOR_INPUTS),
             Cell(2, solution_sources("01_experts_and_gating")["ex01_softmax_gate"],
                  "ex01_softmax_gate"),
             Cell(3, "", "ex01_softmax_gate_tests", tests=True)]
    run = run_sandboxed(cells, [exercise], Limits(timeout=30), probe_inputs)
    assert run.cell_errors == {}, run.cell_errors
    for probe in exercise.visible + exercise.hidden:
        outcome = run.probes[exercise.grade_id][probe.name]
        assert outcome.error is None, outcome.error
        judge_probe(exercise, probe, probe_inputs(exercise, probe), outcome.outputs)
