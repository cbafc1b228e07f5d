"""One temporary nbgrader course for the whole test session, autograded once.

Two tests need nbgrader's own grades of the same honest submissions: the nbgrader round trip
(`test_notebooks.py`: every exercise gets exactly its points, feedback, export) and the
pytest grader's parity test (`test_grader.py`: both graders give the same points). Both use
this course, built by the session fixture `autograded_course` in `conftest.py`, so every
submission is executed by nbgrader exactly once.

Students (every assignment of `solutions/`, so a new notebook is covered by itself):

- `correct`: the release notebook with the solution pasted into every answer cell;
- `blank`: the release notebook, untouched (every answer a stub);
- `partly`: partly right and crashing: the first answer right, the second right but its cell
  raises after the definitions, the third raises when called, the rest left as stubs. A
  notebook with fewer than three answers gets its first right but raising after the
  definitions and the rest as stubs, so that it is partly right and crashing too.

Three students cover the four paths (solution, blank release, partly right, crashing); a
fourth would execute every notebook once more for no path that these do not take.

Under pytest-xdist the course is built once per session, not once per worker: both tests
carry `xdist_group("nbgrader_course")` (pyproject's `--dist loadgroup` sends them to one
worker), and the build is also guarded by a file lock in the session's shared temporary
folder, so that any distribution still builds it once.
"""

from __future__ import annotations

import csv
import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import nbformat

from moe_course.grading import EXERCISES, exercises_for
from moe_course.release import assignments

ROOT = Path(__file__).resolve().parent.parent
ASSIGNMENTS = assignments(ROOT)
STUDENTS = ("correct", "blank", "partly")


def notebook_path(folder: str, assignment: str) -> Path:
    (path,) = sorted((ROOT / folder / assignment).glob("*.ipynb"))
    return path


def answer_ids(assignment: str) -> list[str]:
    """The autograded answer cells of `assignment`, in notebook order (written ones are not)."""
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


def graded_only(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """`nb` without its demonstration cells: its first code cell (the imports), then the
    answer and tests cells, in order (markdown stays). For tests of the graders' machinery
    (walls, shards), where the demos (figures, small experiments) would cost every
    submission seconds in every grader and test nothing; the parity and round-trip tests
    grade the whole notebooks."""
    code = [c for c in nb.cells if c.cell_type == "code"]
    nb.cells = [c for c in nb.cells if c.cell_type != "code" or c is code[0]
                or "nbgrader" in c.metadata]
    return nb


def _right(ids: list[str]) -> list[str]:
    """The answers `partly` gets right (see the module's docstring)."""
    return ids[:2] if len(ids) >= 3 else ids[:1]


def honest(assignment: str) -> dict[str, nbformat.NotebookNode]:
    """The three honest submissions of `assignment` (see the module's docstring)."""
    ids, sources = answer_ids(assignment), solution_sources(assignment)
    right = _right(ids)
    raising = right[-1]  # right, but its cell raises after the definitions
    edits = {raising: sources[raising] + "\nraise RuntimeError('a typo after the definitions')\n"}
    if len(ids) >= 3:
        ex = EXERCISES[ids[2]]
        edits[ids[2]] = (f"class {ex.symbol}:\n    def __init__(self, *args, **kwargs):\n"
                         f"        raise ZeroDivisionError('oops')\n" if ex.kind == "class" else
                         f"def {ex.symbol}(*args, **kwargs):\n    return 1 / 0\n")
    return {"correct": submission(assignment),
            "blank": submission(assignment, solved=set()),
            "partly": submission(assignment, solved=set(right), edits=edits)}


def expected_points(assignment: str, student: str) -> dict[str, float]:
    """The points each answer must get: all for `correct`, none for `blank`, and for
    `partly` those of the answers it has right (even the one whose cell then raises)."""
    ids = answer_ids(assignment)
    right = {"correct": set(ids), "blank": set(), "partly": set(_right(ids))}[student]
    return {gid: float(EXERCISES[gid].points) if gid in right else 0.0 for gid in ids}


def jupyter_env(tmp: Path) -> dict[str, str]:
    """A private Jupyter/IPython/matplotlib configuration, and this venv's scripts on PATH."""
    env = dict(os.environ)
    for key in ("JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR", "IPYTHONDIR",
                "MPLCONFIGDIR"):
        env[key] = str(tmp / key.lower())
        Path(env[key]).mkdir(parents=True, exist_ok=True)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    # nbconvert's templates (generate_feedback) lie under the prefix nbconvert was installed
    # in; a venv made with --system-site-packages has them under the base interpreter's.
    shared = [str(Path(p) / "share" / "jupyter") for p in dict.fromkeys(
        [sys.prefix, sys.base_prefix]) if (Path(p) / "share" / "jupyter").is_dir()]
    env["JUPYTER_PATH"] = os.pathsep.join([*shared, *filter(None, [env.get("JUPYTER_PATH")])])
    env["MPLBACKEND"] = "Agg"
    # One torch thread per kernel: kernels run beside pytest-xdist workers on few cores, and
    # oversubscribed OpenMP threads spin-wait each other into 10-100x slowdowns.
    env["OMP_NUM_THREADS"] = "1"
    env.pop("NBGRADER_EXECUTION", None)
    env.pop("MOE_COURSE_GRADING", None)
    return env


def new_course(tmp: Path, names: list[str], timeout: int = 300) -> tuple[Path, dict]:
    """A temporary nbgrader course with `names` generated; (root, environment)."""
    root = tmp / "course"
    (root / "source").mkdir(parents=True)
    for name in names:
        shutil.copytree(ROOT / "solutions" / name, root / "source" / name,
                        ignore=shutil.ignore_patterns("*.py", ".*"))
    config = (ROOT / "nbgrader_config.py").read_text()
    config = config.replace('"solutions"', '"source"').replace('"notebooks"', '"release"')
    config = config.replace("c.Execute.timeout = 300", f"c.Execute.timeout = {timeout}")
    (root / "nbgrader_config.py").write_text(config)
    env = jupyter_env(tmp / "jupyter")
    # one nbgrader process for all (its assignment id may be a glob), not one per assignment
    for name in ["*"] if len(names) > 1 else names:
        nbgrader(root, env, "generate_assignment", name, "--force")
    assert sorted(p.name for p in (root / "release").iterdir()) == sorted(names)
    return root, env


def nbgrader(root: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "nbgrader", *args], cwd=root, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, f"nbgrader {' '.join(args)}\n{done.stdout}\n{done.stderr[-3000:]}"
    return done


@dataclass(frozen=True)
class Course:
    """The autograded course: `root` (source, release, submitted, autograded, feedback,
    gradebook.db), `csv` (`nbgrader export`), `env` to run more nbgrader commands in it."""

    root: Path
    csv: Path
    env: dict
    seconds: float

    def scores(self, assignment: str, student: str) -> dict[str, float]:
        """nbgrader's points per answer of one submission, from the gradebook."""
        from nbgrader.api import Gradebook

        notebook = notebook_path("notebooks", assignment).stem
        with Gradebook(f"sqlite:///{self.root / 'gradebook.db'}") as gb:
            gb.find_submission_notebook(notebook, assignment, student)  # MissingEntry if not
            return {gid: gb.find_grade(f"{gid}_tests", notebook, assignment, student).score
                    for gid in answer_ids(assignment)}

    def export(self) -> dict[tuple[str, str], float]:
        """`nbgrader export`'s raw score per (student, assignment)."""
        with open(self.csv) as f:
            return {(r["student_id"], r["assignment"]): float(r["raw_score"])
                    for r in csv.DictReader(f)}


def build(tmp: Path) -> Course:
    """Generate every assignment, submit the three students, autograde (each submission
    executed once), generate feedback and export."""
    start = time.perf_counter()
    root, env = new_course(tmp, ASSIGNMENTS)
    for assignment in ASSIGNMENTS:
        for student, nb in honest(assignment).items():
            path = root / "submitted" / student / assignment / notebook_path(
                "notebooks", assignment).name
            path.parent.mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, path)
    for student in STUDENTS:
        nbgrader(root, env, "db", "student", "add", student)
    nbgrader(root, env, "autograde", "*", "--force")  # every assignment, one process
    nbgrader(root, env, "generate_feedback", "*", "--force")
    nbgrader(root, env, "export", "--to", str(tmp / "grades.csv"))
    return Course(root, tmp / "grades.csv", env, time.perf_counter() - start)


def shared(base: Path) -> Course:
    """The session's course under `base` (a folder all xdist workers share): built by the
    first caller, under a file lock, and read back from its record by every later one."""
    folder = base / "nbgrader-course"
    folder.mkdir(parents=True, exist_ok=True)
    record = folder / "built.json"
    with open(folder / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second worker waits here for the first
        try:
            if not record.is_file():
                work = folder / "work"
                shutil.rmtree(work, ignore_errors=True)  # a build that failed half-way
                course = build(work)
                record.write_text(json.dumps({"root": str(course.root), "csv": str(course.csv),
                                              "env": course.env, "seconds": course.seconds}))
            data = json.loads(record.read_text())
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return Course(Path(data["root"]), Path(data["csv"]), data["env"], data["seconds"])
