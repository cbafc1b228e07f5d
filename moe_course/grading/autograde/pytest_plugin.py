"""pytest plugin of the course's grader: each autograded exercise of a submission is a test.

    pytest -p moe_course.grading.autograde.pytest_plugin --noconftest --submission alice.ipynb \\
           [--submission submitted/] [--grades-out DIR] [--grader-timeout S] \\
           [--grader-memory MB] [--grader-...: every field of `Limits`] \\
           [--require-isolation] [--grader-secret-file FILE] [-n 4 --dist loadscope]

For every submission (see `grade.find_submissions`) the plugin collects one item per
autograded exercise, with node id `<student>/<assignment>::<grade_id>`. The first item of a
submission to run executes the notebook in a sandbox (`sandbox.run_sandboxed`: a separate,
limited, walled-in process); every item then judges its exercise's probes here, in the
trusted process, with `judge_probe` against the reference. An item passes when all its
visible and hidden checks pass, and then earns the exercise's points (nbgrader's rule for
a tests cell). Under pytest-xdist, `--dist loadscope` keeps a submission's items (its scope
is `<student>/<assignment>`) on one worker, so each notebook runs once.

Results travel in each report's `user_properties` (plain JSON), so the controller sees
them from any worker; with `--grades-out DIR` it writes the gradebook there at the end
(`grade.write_gradebook`). Submissions are read at collection time, before any learner code
runs, and the plugin collects nothing from the file system: no conftest, test module or
configuration next to a submission is ever imported. Pass `--noconftest` anyway when running
pytest by hand in a folder you do not trust (`moe-course grade` does).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from ..probe import CheckFailure
from ..registry import Exercise
from ..runner import judge_probe
from ..secret import course_secret, hidden_inputs, read_secret_file
from .grade import (
    NotebookError,
    Submission,
    discover,
    printable,
    read_cells,
    write_gradebook,
)
from .limits import Limits, add_options, from_options
from .sandbox import SandboxRun, isolation, run_sandboxed

PROPERTY = "moe_course_grade"  # user_properties key of an item's result (a JSON string)
_EXERCISE_KEYS = ("exercise", "symbol", "score", "max_score", "status", "checks", "worker")

_INPUTS: dict[tuple[str, str], Any] = {}  # probe inputs, made once per process
_SECRET: list[bytes | None] = [None]  # the course secret of this run (this process only)


def use_secret(secret: bytes | None) -> None:
    """Derive hidden probes' inputs from `secret` from now on (None: the package's seeds)."""
    if secret != _SECRET[0]:
        _SECRET[0] = secret
        _INPUTS.clear()


def probe_inputs(exercise: Exercise, probe: Any) -> Any:
    """The inputs of `probe`, computed once per process (seeded and deterministic); a hidden
    probe's derive from the course secret when the run has one (`secret.hidden_inputs`)."""
    key = (exercise.grade_id, probe.name)
    if key not in _INPUTS:
        hidden = any(p is probe for p in exercise.hidden)
        _INPUTS[key] = (hidden_inputs(exercise.grade_id, probe, _SECRET[0]) if hidden
                        else probe.inputs())
    return _INPUTS[key]


def _copy(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_copy(v) for v in value)
    return value


def plain(value: Any, depth: int = 0) -> Any:
    """Outputs as the judges expect them: dense CPU tensors and plain containers only.

    A tensor that is sparse, quantized, on the meta device or otherwise unusual becomes a
    description, which every judge refuses with a message.

    >>> plain({"result": torch.ones(2).to_sparse()})["result"]["kind"]
    'object'
    """
    if isinstance(value, Tensor):
        if (type(value) is not Tensor or value.layout != torch.strided or value.is_quantized
                or value.device.type != "cpu"):
            return {"kind": "object", "type": f"torch.Tensor ({value.layout}, "
                                             f"{value.device.type})", "repr": "tensor"}
        return value.detach().contiguous().clone()
    if depth > 8:
        return {"kind": "object", "type": "nesting", "repr": "too deeply nested"}
    if isinstance(value, dict):
        return {k: plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v, depth + 1) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return {"kind": "object", "type": type(value).__name__, "repr": "?"}


def _prefixed(exercise: Exercise, name: str, message: str) -> str:
    head = f"{exercise.symbol}, check '{name}': "
    return message if message.startswith(head) else head + message


def judge_exercise(exercise: Exercise, run: SandboxRun | None, problem: str | None
                   ) -> dict[str, Any]:
    """Judge one exercise from a sandbox run (trusted side); a JSON-ready result.

    `problem` is why the notebook could not be run at all (it then scores 0). The score is
    the exercise's points when every visible and hidden check passes, else 0.
    """
    checks = []
    for hidden, probes in ((False, exercise.visible), (True, exercise.hidden)):
        for probe in probes:
            message = problem
            if message is None and run is not None:
                outcome = run.probes.get(exercise.grade_id, {}).get(probe.name)
                if outcome is None:
                    message = "not run"
                elif outcome.error is not None:
                    message = outcome.error
                else:
                    try:
                        judge_probe(exercise, probe, _copy(probe_inputs(exercise, probe)),
                                    plain(outcome.outputs))
                    except CheckFailure as failure:
                        message = failure.message
                    except Exception as exc:  # a judge meeting outputs it did not foresee
                        message = f"your results could not be judged ({type(exc).__name__})"
            checks.append({"name": probe.name, "hidden": hidden, "passed": message is None,
                           "message": None if message is None else
                           _prefixed(exercise, probe.name, message)})
    failed = run is not None and run.failure is not None
    passed = not failed and bool(checks) and all(c["passed"] for c in checks)
    return {"exercise": exercise.grade_id, "symbol": exercise.symbol,
            "score": float(exercise.points) if passed else 0.0,
            "max_score": float(exercise.points),
            "status": "not graded" if failed else "passed" if passed else "failed",
            "checks": checks}


class ExerciseFailed(Exception):
    """An exercise that earned 0 points; its message lists the failed checks."""


class SubmissionNode(pytest.Collector):
    """One submitted notebook: runs it once in a sandbox, shared by its exercise items."""

    def __init__(self, *, submission: Submission, limits: Limits, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.submission = submission
        self.limits = limits
        self._run: SandboxRun | None = None
        self._problem: str | None = None
        try:
            self._cells = read_cells(submission.path, limits.notebook_mb << 20)
        except NotebookError as exc:
            self._cells, self._problem = [], str(exc)

    def collect(self) -> list[ExerciseItem]:
        return [ExerciseItem.from_parent(self, name=ex.grade_id, exercise=ex)
                for ex in self.submission.exercises if ex.kind != "written"]

    def sandbox_run(self) -> tuple[SandboxRun | None, str | None]:
        if self._run is None and self._problem is None:
            self._run = run_sandboxed(self._cells, self.submission.exercises, self.limits,
                                      probe_inputs, self.submission.path)
        return self._run, self._problem

    def summary(self) -> dict[str, Any]:
        """What grades.json says about the submission besides its exercises."""
        run = self._run
        grade_ids = {c.index: c.grade_id for c in self._cells}
        errors = [] if run is None else [
            {"cell": i, "grade_id": grade_ids.get(i), "error": e, "stopped": i in run.stopped}
            for i, e in sorted(run.cell_errors.items())]
        return {"student": self.submission.student, "assignment": self.submission.assignment,
                "notebook": printable(str(self.submission.path)), "cell_errors": errors,
                "attempts": run.attempts if run else 0,
                "seconds": round(run.seconds, 2) if run else 0.0,
                "isolation": run.walls if run else {},
                "failure": (run.failure if run else None) or None,
                "problem": self._problem}


class ExerciseItem(pytest.Item):
    """One autograded exercise of one submission, carrying its points."""

    def __init__(self, *, exercise: Exercise, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.exercise = exercise
        self.user_properties.append(("max_score", exercise.points))

    def runtest(self) -> None:
        node: SubmissionNode = self.parent  # type: ignore[assignment]
        run, problem = node.sandbox_run()
        tampered = [c.tampered for c in node._cells
                    if c.tampered and c.grade_id == self.exercise.grade_id]
        result = judge_exercise(self.exercise, run, problem or (tampered[0] if tampered
                                                                else None))
        result["worker"] = os.environ.get("PYTEST_XDIST_WORKER", "main")
        self.user_properties.append((PROPERTY, json.dumps({**node.summary(), **result})))
        if result["status"] != "passed":
            failed = [c["message"] for c in result["checks"] if not c["passed"]]
            if run is not None and run.failure:
                failed.insert(0, f"not graded: {run.failure}")
            raise ExerciseFailed("\n".join(failed))

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None
                     ) -> str:
        if isinstance(excinfo.value, ExerciseFailed):
            return f"{self.nodeid}: 0 / {self.exercise.points} points\n{excinfo.value}"
        return str(super().repr_failure(excinfo, style=style))

    def reportinfo(self) -> tuple[Any, int | None, str]:
        return self.path, None, self.nodeid


class GraderSession:
    """Collects the submissions' items and, in the controller, writes the gradebook."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.limits = from_options(config, "grader-")
        self.isolation = isolation()
        if self.isolation.down and config.getoption("require_isolation"):
            raise pytest.UsageError("--require-isolation: walls are down on this machine: "
                                    + "; ".join(self.isolation.down))
        try:
            self.submissions, skipped = discover(_submission_paths(config),
                                                 config.getoption("grader_assignment"))
        except ValueError as exc:
            raise pytest.UsageError(str(exc)) from None
        self.skipped = [{"path": s.path, "reason": s.reason} for s in skipped]
        more = config.getoption("grader_skipped")
        if more:
            with open(more, encoding="utf-8") as f:
                self.skipped += json.load(f)
        self.results: dict[str, dict[str, Any]] = {}

    def _controller_of_workers(self) -> bool:
        return self.config.pluginmanager.has_plugin("dsession")

    @pytest.hookimpl(tryfirst=True)
    def pytest_collection(self, session: pytest.Session) -> bool | None:
        if self._controller_of_workers():
            return None  # xdist's controller collects nothing; its workers do
        items: list[pytest.Item] = []
        for sub in self.submissions:
            node = SubmissionNode.from_parent(session, name=sub.key, nodeid=sub.key,
                                              path=Path(printable(str(sub.path))),
                                              submission=sub,
                                              limits=self.limits)
            items += node.collect()
        session.items = items
        hook = self.config.hook
        hook.pytest_collection_modifyitems(session=session, config=self.config, items=items)
        hook.pytest_collection_finish(session=session)
        session.testscollected = len(items)
        return True

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        for key, value in report.user_properties:
            if key == PROPERTY:
                result = json.loads(value)
                self.results[f"{result['student']}/{result['assignment']}::"
                             f"{result['exercise']}"] = result

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        out = self.config.getoption("grades_out")
        if out is None or hasattr(self.config, "workerinput"):
            return
        graded = []
        for sub in self.submissions:
            exercises, summary = [], None
            for ex in sub.exercises:
                if ex.kind == "written":
                    continue
                found = self.results.get(f"{sub.key}::{ex.grade_id}")
                if found is None:
                    found = {"exercise": ex.grade_id, "symbol": ex.symbol, "score": 0.0,
                             "max_score": float(ex.points), "status": "not graded",
                             "checks": []}
                else:
                    summary = {k: v for k, v in found.items() if k not in _EXERCISE_KEYS}
                exercises.append({k: found[k] for k in _EXERCISE_KEYS if k in found})
            summary = summary or {"student": sub.student, "assignment": sub.assignment,
                                  "notebook": printable(str(sub.path)), "cell_errors": [],
                                  "failure": "not run"}
            graded.append({**summary, "exercises": exercises, "manual": [
                {"exercise": ex.grade_id, "max_score": float(ex.points)}
                for ex in sub.exercises if ex.kind == "written"]})
        write_gradebook(out, graded, extra={"limits": self.limits.to_dict(),
                                            "isolation": self.isolation.walls,
                                            "walls_down": list(self.isolation.down),
                                            "hidden_inputs": "course secret" if _SECRET[0]
                                            else "package defaults"},
                        skipped=self.skipped)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("moe_course", "moe-course grader")
    group.addoption("--submission", action="append", default=[], metavar="PATH",
                    help="a submitted notebook, a folder of them or nbgrader's submitted/ "
                         "tree (repeatable)")
    group.addoption("--grades-out", default=None, metavar="DIR",
                    help="write grades.csv, grades.json and feedback/ there at the end")
    add_options(group.addoption, "grader-")
    group.addoption("--grader-submissions", default=None, metavar="FILE",
                    help="a JSON list of submission paths (like --submission)")
    group.addoption("--grader-skipped", default=None, metavar="FILE",
                    help="a JSON list of notebooks found but not graded ({path, reason}), "
                         "for the gradebook")
    group.addoption("--require-isolation", action="store_true", default=False,
                    help="refuse to grade where any wall of the sandbox is down")
    group.addoption("--grader-assignment", default=None, metavar="NAME",
                    help="the assignment of notebooks whose path does not say it")
    group.addoption("--grader-secret-file", default=None, metavar="FILE",
                    help="the course secret that hidden checks' inputs derive from (default: "
                         "$MOE_COURSE_SECRET or the file named by $MOE_COURSE_SECRET_FILE)")


def _submission_paths(config: pytest.Config) -> list[str]:
    """--submission paths, and those listed in --grader-submissions (a JSON file, which
    carries file names that are not UTF-8: pytest-xdist cannot pass them on its command
    line)."""
    paths = list(config.getoption("submission"))
    listed = config.getoption("grader_submissions")
    if listed:
        with open(listed, encoding="utf-8") as f:
            paths += json.load(f)
    return paths


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("submission") or config.getoption("grader_submissions"):
        path = config.getoption("grader_secret_file")
        try:
            use_secret(read_secret_file(path) if path else course_secret())
        except (OSError, ValueError) as exc:
            raise pytest.UsageError(f"course secret: {exc}") from None
        config.pluginmanager.register(GraderSession(config), "moe_course_grader")
