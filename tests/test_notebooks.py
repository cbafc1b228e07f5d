"""The notebook pipeline: solutions run and validate, the release is generated from them,
and an nbgrader round trip gives every submission exactly its points.

These tests execute notebooks and run nbgrader, so they are marked `slow` (part of the
suite, never skipped). The nbgrader course is built once per session in a temporary folder.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jupytext
import nbformat
import pytest
from nbclient import NotebookClient

from moe_course.release import assignments, release_differences

ROOT = Path(__file__).resolve().parent.parent
ASSIGNMENTS = assignments(ROOT)
pytestmark = pytest.mark.slow


def _notebook(folder: str, assignment: str) -> Path:
    (path,) = sorted((ROOT / folder / assignment).glob("*.ipynb"))
    return path


def _jupyter_env(tmp: Path) -> dict[str, str]:
    """A private Jupyter/IPython/matplotlib configuration, and this venv's scripts on PATH."""
    env = dict(os.environ)
    for key, sub in [("JUPYTER_CONFIG_DIR", "config"), ("JUPYTER_DATA_DIR", "data"),
                     ("JUPYTER_RUNTIME_DIR", "runtime"), ("IPYTHONDIR", "ipython"),
                     ("MPLCONFIGDIR", "mpl")]:
        env[key] = str(tmp / "jupyter" / sub)
        (tmp / "jupyter" / sub).mkdir(parents=True, exist_ok=True)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.pop("MPLBACKEND", None)  # the kernel's inline backend, so figures land in outputs
    # One torch thread per kernel: kernels run beside pytest-xdist workers on few cores, and
    # oversubscribed OpenMP threads spin-wait each other into 10-100x slowdowns.
    env["OMP_NUM_THREADS"] = "1"
    env.pop("NBGRADER_EXECUTION", None)
    return env


def _cells(nb: nbformat.NotebookNode) -> list[tuple[str, str, dict]]:
    out = []
    for cell in nb.cells:
        meta = {k: v for k, v in cell.metadata.items()
                if k not in ("jupytext", "lines_to_next_cell")}
        out.append((cell.cell_type, cell.source.strip(), meta))
    return out


# -- source notebooks ------------------------------------------------------------------------

def test_course_has_assignments() -> None:
    assert "01_experts_and_gating" in ASSIGNMENTS


@pytest.mark.parametrize("assignment", ASSIGNMENTS)
def test_jupytext_twin_in_sync(assignment: str) -> None:
    """Each source notebook and its percent-format twin hold the same cells and metadata."""
    ipynb = _notebook("solutions", assignment)
    twin = ipynb.with_suffix(".py")
    assert twin.is_file(), f"{twin} is missing: jupytext --sync {ipynb}"
    assert _cells(jupytext.read(twin)) == _cells(nbformat.read(ipynb, as_version=4)), (
        f"{ipynb.name} and {twin.name} differ: run `jupytext --sync {twin}`")


@pytest.mark.parametrize("folder", ["solutions", "notebooks"])
def test_committed_notebooks_have_no_outputs(folder: str) -> None:
    paths = sorted((ROOT / folder).rglob("*.ipynb"))
    assert paths
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, path


@pytest.mark.parametrize("assignment", ASSIGNMENTS)
def test_solution_runs_top_to_bottom_and_validates(
        assignment: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The source notebook runs without error in a fresh kernel within its time budget, its
    test cells print nothing to stderr, and nbgrader's Validator passes it."""
    from nbgrader.preprocessors import CheckCellMetadata
    from nbgrader.validator import Validator
    from traitlets.config import Config

    env = _jupyter_env(tmp_path)
    for key in ("JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR", "IPYTHONDIR",
                "MPLCONFIGDIR", "PATH", "OMP_NUM_THREADS"):
        monkeypatch.setenv(key, env[key])
    monkeypatch.delenv("NBGRADER_EXECUTION", raising=False)
    monkeypatch.delenv("MPLBACKEND", raising=False)
    source = _notebook("solutions", assignment)
    nb = nbformat.read(source, as_version=4)
    start = time.perf_counter()
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    seconds = time.perf_counter() - start
    print(f"{assignment}: executed top to bottom in {seconds:.1f} s")
    budget = 90 if assignment.startswith("06") else 60
    assert seconds < budget, f"{assignment} took {seconds:.1f} s (budget {budget} s)"
    for cell in nb.cells:
        grade = cell.metadata.get("nbgrader", {})
        if cell.cell_type == "code" and grade.get("grade"):
            bad = [o for o in cell.outputs if o.output_type == "error"
                   or (o.output_type == "stream" and o.name == "stderr")]
            assert not bad, (grade["grade_id"], bad)
    # nbgrader's own validation of the run above (`nbgrader validate` without re-executing:
    # the cell metadata is checked and every graded cell's outputs must show a pass)
    work = tmp_path / source.name
    nbformat.write(nb, work)
    config = Config()
    config.Validator.preprocessors = [CheckCellMetadata]
    result = Validator(config=config).validate(str(work))
    assert result == {}, result


def test_release_is_regenerated_from_solutions() -> None:
    """notebooks/ is byte for byte what `moe-course release` makes of solutions/."""
    assert release_differences(ROOT) == []


# -- nbgrader round trip ------------------------------------------------------------------------

def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout}\n{done.stderr}"
    return done


def _answer_ids(nb: nbformat.NotebookNode) -> list[str]:
    return [c.metadata["nbgrader"]["grade_id"] for c in nb.cells
            if c.metadata.get("nbgrader", {}).get("solution") and c.cell_type == "code"]


def _fill(release_nb: Path, source_nb: Path, grade_ids: set[str]) -> nbformat.NotebookNode:
    """The release notebook with the solution pasted into the answer cells `grade_ids`."""
    nb = nbformat.read(release_nb, as_version=4)
    solution = {c.metadata["nbgrader"]["grade_id"]: c.source
                for c in nbformat.read(source_nb, as_version=4).cells
                if "nbgrader" in c.metadata}
    for cell in nb.cells:
        gid = cell.metadata.get("nbgrader", {}).get("grade_id")
        if gid in grade_ids:
            cell.source = solution[gid]
    return nb


def _build_course(tmp: Path) -> dict:
    """A temporary nbgrader course: generate, submit three students, autograde, feedback,
    export. Students: `solution` (the source notebook), `blank` (the release untouched) and
    `partly` (the first answer of each notebook filled in, the rest left as stubs)."""
    root = tmp / "course"
    root.mkdir()
    shutil.copy(ROOT / "nbgrader_config.py", root)
    shutil.copytree(ROOT / "solutions", root / "source", ignore=shutil.ignore_patterns("*.py"))
    (root / "nbgrader_config.py").write_text(
        (root / "nbgrader_config.py").read_text().replace('"solutions"', '"source"')
        .replace('"notebooks"', '"release"'))
    env = _jupyter_env(tmp)
    nbgrader = [sys.executable, "-m", "nbgrader"]
    expected: dict[tuple[str, str, str], float] = {}
    for assignment in ASSIGNMENTS:
        _run(nbgrader + ["generate_assignment", assignment, "--force"], root, env)
        source_nb = _notebook("solutions", assignment)
        release_nb = root / "release" / assignment / source_nb.name
        points = {c.metadata["nbgrader"]["grade_id"]: c.metadata["nbgrader"]["points"]
                  for c in nbformat.read(source_nb, as_version=4).cells
                  if c.metadata.get("nbgrader", {}).get("grade") and c.cell_type == "code"}
        first = _answer_ids(nbformat.read(source_nb, as_version=4))[0]
        students = {
            "solution": nbformat.read(source_nb, as_version=4),
            "blank": nbformat.read(release_nb, as_version=4),
            "partly": _fill(release_nb, source_nb, {first}),
        }
        for student, nb in students.items():
            folder = root / "submitted" / student / assignment
            folder.mkdir(parents=True)
            nbformat.write(nb, folder / source_nb.name)
            for test_id, pts in points.items():
                right = student == "solution" or (student == "partly"
                                                   and test_id == f"{first}_tests")
                expected[(student, assignment, test_id)] = float(pts) if right else 0.0
    for assignment in ASSIGNMENTS:
        _run(nbgrader + ["db", "student", "add", "solution"], root, env)
        _run(nbgrader + ["db", "student", "add", "blank"], root, env)
        _run(nbgrader + ["db", "student", "add", "partly"], root, env)
        _run(nbgrader + ["autograde", assignment, "--force"], root, env)
        _run(nbgrader + ["generate_feedback", assignment, "--force"], root, env)
    _run(nbgrader + ["export", "--to", str(tmp / "grades.csv")], root, env)
    return {"root": root, "expected": expected, "csv": tmp / "grades.csv"}


def _check_each_exercise_gets_exactly_its_points(course: dict) -> None:
    from nbgrader.api import Gradebook

    with Gradebook(f"sqlite:///{course['root'] / 'gradebook.db'}") as gb:
        for (student, assignment, test_id), points in course["expected"].items():
            notebook = _notebook("solutions", assignment).stem
            grade = gb.find_grade(test_id, notebook, assignment, student)
            assert grade.score == points, (student, assignment, test_id, grade.score, points)


def _check_feedback_holds_no_hidden_test_source(course: dict) -> None:
    pages = sorted((course["root"] / "feedback").rglob("*.html"))
    assert len(pages) == 3 * len(ASSIGNMENTS)
    for page in pages:
        text = page.read_text()
        assert "hidden=True" not in text and "BEGIN HIDDEN TESTS" not in text, page


def _check_export_csv_has_expected_totals(course: dict) -> None:
    totals: dict[tuple[str, str], float] = {}
    for (student, assignment, _), points in course["expected"].items():
        totals[(student, assignment)] = totals.get((student, assignment), 0.0) + points
    with open(course["csv"]) as f:
        rows = list(csv.DictReader(f))
    got = {(r["student_id"], r["assignment"]): float(r["raw_score"]) for r in rows}
    assert got == totals, json.dumps({str(k): v for k, v in got.items()})


def test_nbgrader_round_trip(tmp_path: Path) -> None:
    """One temporary course, built once (one test, so pytest-xdist cannot build it twice):
    autograde gives every exercise exactly its points (solution: all; release: 0; partly
    right: exactly its part), feedback shows no hidden-test source, export has the totals."""
    course = _build_course(tmp_path)
    _check_each_exercise_gets_exactly_its_points(course)
    _check_feedback_holds_no_hidden_test_source(course)
    _check_export_csv_has_expected_totals(course)
