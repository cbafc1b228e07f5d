"""Adversarial submissions: what each grader makes of notebooks written to break it.

Each case is a submission of notebook 01 built here from the release: the solution in every
answer cell, then one answer cell changed. The pytest grader grades all of them (and three
honest controls) in one `moe-course grade --jobs 2` run, and every case must get its correct
points, the run must end within its limits, the other submissions must be unaffected, and
the output folder must hold exactly the gradebook, well formed, with nothing added. The
same notebooks then go through nbgrader autograde in a temporary course (slow), and the
tests assert what nbgrader actually does, which is what the README's table reports; a test
keeps that table and `CASES` in agreement. Spawned `sleep` processes still alive after a
case are killed by pid before the next one.

nbgrader has no limits of its own, so it runs here with an address-space cap (6 GiB) set
from outside and a 10 s cell timeout; the fork bomb is bounded (200 children that sleep
27 s) so that it cannot take this machine down without a grader to stop it.
"""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_grader import (
    NB01,
    ROOT,
    nbgrader_course,
    nbgrader_scores,
    read_grades,
    run_grade,
    solution_sources,
    submission,
    write_submission,
)

E, S, D = "ex01_expert", "ex01_softmax_gate", "ex01_dense_moe"
TIMEOUT = 10  # seconds per cell and per exercise's checks, for both graders
MEMORY_MB = 1536  # address space of a learner's process under the pytest grader
SLEEPER = "27.1828"  # argument of the `sleep` processes that spawning cases start


@dataclass(frozen=True)
class Case:
    name: str  # the student id of the case's submission
    what: str  # what the submission does, as the README's table says it
    edits: dict[str, str] | None  # answer cell -> source (None: the untouched release)
    ours: tuple[int, int, int]  # points from the pytest grader: Expert, softmax_gate, dense_moe
    nbgrader: tuple[int, int, int] | str  # what nbgrader autograde gave, or what happened
    nbgrader_else: tuple[int, int, int] | None = None  # another outcome seen, load-dependent


SOL = solution_sources(NB01)
WRONG_SOFTMAX = "def softmax_gate(x, w_gate):\n    return torch.softmax(x @ w_gate, dim=0)\n"
WRONG_DENSE = ("def dense_moe(x, experts, w_gate):\n    gates = softmax_gate(x, w_gate)\n"
               "    return torch.zeros_like(x), gates\n")
CASES = [
    Case("correct", "control: the solution", {}, (2, 1, 2), (2, 1, 2)),
    Case("blank", "control: the release, untouched", None, (0, 0, 0), (0, 0, 0)),
    Case("loop_in_function", "an infinite loop inside a function",
         {D: "def dense_moe(x, experts, w_gate):\n    while True:\n        pass\n"},
         (2, 1, 0), (2, 1, 0)),
    Case("swallowed_interrupt", "a top-level loop that swallows KeyboardInterrupt",
         {D: SOL[D] + "\nimport time\nwhile True:\n    try:\n        time.sleep(0.05)\n"
                      "    except BaseException:\n        pass\n"},
         (2, 1, 0), (0, 0, 0)),
    Case("memory_bomb", "a memory bomb (512 MiB more per step, until it fails)",
         {D: "def dense_moe(x, experts, w_gate):\n    hog = []\n    while True:\n"
             "        hog.append(torch.ones(2 ** 27))\n"},
         (2, 1, 0), (2, 1, 0)),
    Case("os_exit_at_import", "`os._exit(0)` at import (in an answer cell)",
         {E: SOL[E] + "\nimport os\nos._exit(0)\n"}, (0, 1, 2), (0, 0, 0)),
    Case("sys_exit_at_import", "`sys.exit()` at import (in an answer cell)",
         {S: SOL[S] + "\nimport sys\nsys.exit('bye')\n"}, (2, 1, 2), (2, 1, 2)),
    Case("exit_in_function", "`os._exit` inside a checked function",
         {D: "import os\n\ndef dense_moe(x, experts, w_gate):\n    os._exit(3)\n"},
         (2, 1, 0), (0, 0, 0)),
    Case("fork_bomb", "a fork bomb (200 forks, each child sleeping 27 s)",
         {E: SOL[E] + "\nimport os\nforked = 0\ntry:\n    for _ in range(200):\n"
                      "        if os.fork() == 0:\n"
                      f"            os.execv('/bin/sleep', ['sleep', '{SLEEPER}'])\n"
                      "        forked += 1\nexcept OSError:\n    pass\n"
                      "print(f'started {forked} processes')\n"},
         (2, 1, 2), (2, 1, 2)),
    Case("spawn_past_audit", "subprocesses after disabling `sys.audit`",
         {E: SOL[E] + "\nimport subprocess, sys\nsys.audit = lambda *args: None\nstarted = 0\n"
                      "try:\n    for _ in range(50):\n"
                      f"        subprocess.Popen(['/bin/sleep', '{SLEEPER}'])\n"
                      "        started += 1\nexcept OSError:\n    pass\n"
                      "print(f'started {started} processes')\n"},
         (2, 1, 2), (2, 1, 2)),
    Case("background_writer", "a background process that writes a file 3 s later",
         {E: SOL[E] + "\nimport subprocess, sys\nsubprocess.Popen([sys.executable, '-c', "
                      "\"import time; time.sleep(3); open('__CANARY__', 'w').write('late')\"],"
                      " start_new_session=True)\n"},
         (2, 1, 2), (2, 1, 2)),
    Case("writes_gradebook", "writing grades.csv, the output folder and another submission",
         {S: SOL[S] + "\nfor target in ['__OUT__/grades.csv', '__OUT__/grades.json', "
                      "'__OUT__/feedback/mallory.md', '__VICTIM__', '__CANARY__']:\n"
                      "    try:\n        with open(target, 'w') as f:\n"
                      "            f.write('mallory,01_experts_and_gating,ex01_expert,999,2\\n')\n"
                      "    except OSError:\n        pass\ntry:\n"
                      "    torch.save(torch.ones(1), '__OUT__/evil.pt')\nexcept Exception:\n"
                      "    pass\n"},
         (2, 1, 2), (2, 1, 2)),
    Case("patches_torch", "monkeypatching `torch.testing.assert_close`, `torch.allclose`, "
                          "`torch.equal`, `torch.isclose` (and a wrong softmax_gate)",
         {S: WRONG_SOFTMAX + "\nimport torch.testing\n"
                             "torch.testing.assert_close = lambda *args, **kwargs: None\n"
                             "torch.allclose = lambda *args, **kwargs: True\n"
                             "torch.equal = lambda *args, **kwargs: True\n"
                             "torch.isclose = lambda a, b, *args, **kwargs: torch.ones("
                             "torch.broadcast_shapes(a.shape, b.shape), dtype=torch.bool)\n"},
         (2, 0, 0), (2, 1, 2)),
    Case("patches_checks", "monkeypatching `moe_course` and the registry's checks (and a "
                           "wrong dense_moe)",
         {D: WRONG_DENSE + "\nimport dataclasses\nimport moe_course.grading as grading\n"
                           "import moe_course.routing\n"
                           "check = lambda *args, **kwargs: print('all checks passed')\n"
                           "grading.check = grading.runner.check = check\n"
                           "grading.probe.close = lambda *args, **kwargs: True\n"
                           "moe_course.routing.dense_moe = dense_moe\n"
                           "grading.EXERCISES['ex01_dense_moe'] = dataclasses.replace("
                           "grading.EXERCISES['ex01_dense_moe'], visible=(), hidden=())\n"},
         (2, 1, 0), (2, 1, 2)),
    Case("lying_objects", "a tensor subclass and an object whose `__eq__` lies",
         {D: "class Liar(torch.Tensor):\n    def __eq__(self, other):\n        return True\n\n"
             "    __hash__ = torch.Tensor.__hash__\n\n\nclass AlwaysEqual:\n"
             "    def __eq__(self, other):\n        return True\n\n\n"
             "def dense_moe(x, experts, w_gate):\n"
             "    return torch.zeros(x.shape).as_subclass(Liar), AlwaysEqual()\n"},
         (2, 1, 0), (2, 1, 0)),
    Case("print_flood", "printing 300 MB",
         {E: SOL[E] + "\nfor _ in range(300):\n    print('x' * 1_000_000)\n"},
         (2, 1, 2), (2, 1, 2), (0, 0, 0)),
    Case("syntax_error", "a syntax error", {E: "class Expert(nn.Module:\n    pass\n"},
         (0, 1, 2), (0, 1, 2)),
    Case("missing_name", "a missing name (dense_moe renamed)",
         {D: SOL[D].replace("def dense_moe(", "def dense_mixture(")}, (2, 1, 0), (2, 1, 0)),
    Case("wrong_signature", "a wrong signature (Expert takes a third argument)",
         {E: SOL[E].replace("def __init__(self, d_model, d_hidden):",
                            "def __init__(self, d_model, d_hidden, dropout):")},
         (0, 1, 2), (0, 1, 2)),
    Case("nan_outputs", "NaN outputs",
         {D: "def dense_moe(x, experts, w_gate):\n    gates = softmax_gate(x, w_gate)\n"
             "    return torch.full_like(x, float('nan')), gates\n"},
         (2, 1, 0), (2, 1, 0)),
    Case("calls_reference", "calling the reference (`moe_course.gating.softmax_gate`)",
         {S: "import moe_course.gating\n\ndef softmax_gate(x, w_gate):\n"
             "    return moe_course.gating.softmax_gate(x, w_gate)\n"},
         (2, 0, 2), (2, 0, 2)),
    Case("copies_reference", "calling a copy of the reference's function object",
         {S: "import types\nimport moe_course.gating\n_ref = moe_course.gating.softmax_gate\n"
             "_copy = types.FunctionType(_ref.__code__, _ref.__globals__, 'softmax_gate')\n\n"
             "def softmax_gate(x, w_gate):\n    return _copy(x, w_gate)\n"},
         (2, 0, 2), (2, 0, 2)),
    Case("victim", "control: the solution, which writes_gradebook tries to overwrite", {},
         (2, 1, 2), (0, 0, 0)),
]
BY_NAME = {case.name: case for case in CASES}


def _notebook(case: Case, out: Path, victim: Path, canary: Path):
    if case.edits is None:
        return submission(NB01, solved=set())
    fill = {"__OUT__": str(out), "__VICTIM__": str(victim), "__CANARY__": str(canary)}
    edits = {}
    for gid, source in case.edits.items():
        for key, value in fill.items():
            source = source.replace(key, value)
        edits[gid] = source
    return submission(NB01, edits=edits)


def _build(root: Path, out: Path, canaries: Path) -> dict[str, Path]:
    """Write every case's submission under root/<case>/01_.../; return their paths."""
    victim = root / "victim" / NB01 / "experts_and_gating.ipynb"
    return {case.name: write_submission(root, case.name, NB01, _notebook(
        case, out, victim, canaries / f"{case.name}.txt")) for case in CASES}


def _sleepers() -> list[int]:
    """Pids of the `sleep 27.1828` processes that the spawning cases try to start."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if cmdline[:2] == [b"sleep", SLEEPER.encode()] or cmdline[1:3] == [
                    b"sleep", SLEEPER.encode()]:
                found.append(int(entry))
    return found


def _kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# -- the pytest grader ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def graded(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One `moe-course grade --jobs 2` run over every case."""
    tmp = tmp_path_factory.mktemp("adversarial")
    out, canaries = tmp / "grades", tmp / "canaries"
    canaries.mkdir()
    paths = _build(tmp / "submitted", out, canaries)
    victim_bytes = paths["victim"].read_bytes()
    status, seconds, log = run_grade([tmp / "submitted"], out, "--jobs", "2", "--timeout",
                                     str(TIMEOUT), "--memory", str(MEMORY_MB))
    time.sleep(4)  # anything left behind would write now (the background writer waits 3 s)
    return {"status": status, "seconds": seconds, "log": log, "out": out,
            "canaries": canaries, "victim": paths["victim"], "victim_bytes": victim_bytes,
            "sleepers": _sleepers(), "report": json.loads((out / "grades.json").read_text())}


@pytest.mark.slow
@pytest.mark.parametrize("name", [case.name for case in CASES])
def test_each_case_gets_its_correct_points(graded: dict, name: str) -> None:
    grades = read_grades(graded["out"])
    got = tuple(grades[(name, NB01, gid)][0] for gid in (E, S, D))
    assert got == BY_NAME[name].ours, (name, got, _messages(graded, name))


def _messages(graded: dict, name: str) -> dict:
    (sub,) = [s for s in graded["report"]["submissions"] if s["student"] == name]
    return {"cells": sub["cell_errors"], "checks": {e["exercise"]: [
        c["message"] for c in e["checks"] if not c["passed"]] for e in sub["exercises"]}}


@pytest.mark.slow
def test_the_run_ends_within_its_limits_and_says_why(graded: dict) -> None:
    assert graded["status"] == 0, graded["log"][-3000:]
    assert graded["report"]["complete"]
    workers = [{e["worker"] for e in sub["exercises"]} for sub in graded["report"]["submissions"]]
    assert all(len(w) == 1 for w in workers), workers  # each notebook ran on one worker, once
    assert set().union(*workers) == {"gw0", "gw1"}
    assert graded["seconds"] < 180, graded["seconds"]
    why = {name: json.dumps(_messages(graded, name)) for name in BY_NAME}
    assert "time limit" in why["loop_in_function"]
    assert "could not be interrupted" in why["swallowed_interrupt"]
    assert "exit status 0" in why["os_exit_at_import"]
    assert "exit status 3" in why["exit_in_function"]
    assert "memory" in why["memory_bomb"]
    assert why["calls_reference"].count("implement it yourself") == 3  # every softmax check
    assert "implement it yourself" in why["copies_reference"]
    assert "does not define dense_moe" in why["missing_name"]
    assert "SyntaxError" in why["syntax_error"]
    assert "NaN" in why["nan_outputs"]


@pytest.mark.slow
def test_nothing_is_written_outside_the_sandboxes(graded: dict) -> None:
    out = graded["out"]
    assert sorted(p.name for p in out.iterdir()) == ["feedback", "grades.csv", "grades.json"]
    assert sorted(p.name for p in (out / "feedback").iterdir()) == sorted(BY_NAME)
    assert len(read_grades(out)) == 3 * len(CASES)  # and no row for "mallory"
    assert list(graded["canaries"].iterdir()) == []
    assert graded["victim"].read_bytes() == graded["victim_bytes"]
    assert graded["sleepers"] == []


@pytest.mark.slow
def test_feedback_shows_hidden_checks_only_as_passed_or_failed(graded: dict) -> None:
    from moe_course.grading import EXERCISES

    page = (graded["out"] / "feedback" / "blank" / f"{NB01}.md").read_text()
    assert "hidden check 1: failed" in page and "not implemented yet" in page
    for gid in (E, S, D):
        for probe in EXERCISES[gid].hidden:
            assert probe.name not in page


# -- nbgrader autograde on the same notebooks -----------------------------------------------

@pytest.fixture(scope="module")
def autograded(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """nbgrader autograde, one student at a time in CASES order, each with a 150 s limit."""
    tmp = tmp_path_factory.mktemp("nbgrader-adversarial")
    root, env = nbgrader_course(tmp, [NB01], timeout=TIMEOUT)
    out, canaries = tmp / "exports", tmp / "canaries"
    out.mkdir()
    canaries.mkdir()
    paths = _build(root / "submitted", out, canaries)
    victim_bytes = paths["victim"].read_bytes()

    def cap() -> None:  # nbgrader sets no limits: this stands in for a container's
        resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))

    outcome: dict[str, tuple | str] = {}
    seconds: dict[str, float] = {}
    sleepers: dict[str, int] = {}  # spawned processes still alive after the case's run
    for case in CASES:
        start = time.perf_counter()
        try:
            subprocess.run([sys.executable, "-m", "nbgrader", "autograde", NB01, "--student",
                            case.name, "--force"], cwd=root, env=env, capture_output=True,
                           timeout=150, preexec_fn=cap, start_new_session=True)
            scores = nbgrader_scores(root, NB01, case.name)
            outcome[case.name] = "not graded" if scores is None else tuple(
                int(scores[gid]) for gid in (E, S, D))
        except subprocess.TimeoutExpired:
            outcome[case.name] = "hang"
            _kill_kernels(root)
        seconds[case.name] = time.perf_counter() - start
        alive = _sleepers()
        sleepers[case.name] = len(alive)
        _kill(alive)
    time.sleep(4)  # the background writer waits 3 s
    started = {}  # what the spawning cases printed in their autograded notebooks
    for name in ("fork_bomb", "spawn_past_audit"):
        graded = root / "autograded" / name / NB01 / paths[name].name
        found = re.search(r"started (\d+) processes", graded.read_text())
        started[name] = int(found[1]) if found else None
    return {"outcome": outcome, "seconds": seconds, "out": out, "canaries": canaries,
            "victim_changed": paths["victim"].read_bytes() != victim_bytes,
            "started": started, "sleepers": {name: n for name, n in sleepers.items() if n}}


def _kill_kernels(root: Path) -> None:
    """Kernels that nbgrader left running for a timed-out autograde of this course."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
                cwd = os.readlink(f"/proc/{entry}/cwd")
            except OSError:
                continue
            if b"ipykernel_launcher" in cmdline and cwd.startswith(str(root)):
                _kill([int(entry)])


@pytest.mark.slow
@pytest.mark.parametrize("name", [case.name for case in CASES])
def test_nbgrader_does_what_the_readme_says(autograded: dict, name: str) -> None:
    case = BY_NAME[name]
    assert autograded["outcome"][name] in (case.nbgrader, case.nbgrader_else), (
        name, autograded["outcome"][name], autograded["seconds"][name])


@pytest.mark.slow
def test_nbgrader_lets_submissions_write_and_spawn(autograded: dict) -> None:
    """What the table's notes say: under nbgrader, files outside the notebook get written,
    another submission is overwritten, every process the spawning cases ask for starts (they
    end with the kernel's process group), and one that starts its own session outlives it."""
    written = sorted(p.name for p in autograded["canaries"].iterdir())
    assert written == ["background_writer.txt", "writes_gradebook.txt"]
    assert sorted(p.name for p in autograded["out"].iterdir()) == ["evil.pt", "grades.csv",
                                                                   "grades.json"]
    assert autograded["victim_changed"]
    assert autograded["started"] == {"fork_bomb": 200, "spawn_past_audit": 50}
    assert autograded["sleepers"] == {}


# -- the README's table ---------------------------------------------------------------------

def _cell(points: tuple | str, otherwise: tuple | None = None) -> str:
    text = " / ".join(map(str, points)) if isinstance(points, tuple) else points
    return text if otherwise is None else f"{text} or {_cell(otherwise)}"


def test_readme_table_matches_the_cases() -> None:
    """Each case is a row `| name | what | pytest grader | nbgrader | ... |` in the README's
    grading section, with the points (Expert / softmax_gate / dense_moe) the tests assert."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Grading with the pytest grader"):]
    rows = {m[1]: [c.strip() for c in m[2].split("|")]
            for m in re.finditer(r"^\| `(\w+)` \|(.*)\|$", section, re.MULTILINE)}
    assert sorted(rows) == sorted(BY_NAME)
    for case in CASES:
        what, ours, theirs = rows[case.name][:3]
        assert (what, ours, theirs) == (case.what, _cell(case.ours),
                                        _cell(case.nbgrader, case.nbgrader_else)), case.name
