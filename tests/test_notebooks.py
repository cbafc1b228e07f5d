"""The notebook pipeline: solutions run and validate, the release is generated from them,
and an nbgrader round trip gives every submission exactly its points.

These tests execute notebooks and run nbgrader, so they are marked `slow` (part of the
suite, never skipped). The nbgrader course is built once per session in a temporary folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import sys
import time
from pathlib import Path

import jupytext
import nbformat
import pytest
from nbclient import NotebookClient

from moe_course.release import _committed, assignments, notebook_files

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


# -- a learner's saved notebook: JupyterLab's checkpoints ---------------------------------------

@pytest.fixture
def saved_checkpoints():
    """What JupyterLab leaves the moment a learner (or an instructor, in solutions/) saves:
    `<folder>/<assignment>/.ipynb_checkpoints/<name>-checkpoint.ipynb`, a copy with outputs.
    Planted in the real tree for the test (git ignores them) and removed afterwards."""
    planted = []
    for folder in ("solutions", "notebooks"):
        source = _notebook(folder, ASSIGNMENTS[0])
        nb = nbformat.read(source, as_version=4)
        code = next(c for c in nb.cells if c.cell_type == "code")
        code.outputs = [nbformat.v4.new_output("stream", name="stdout", text="saved\n")]
        code.execution_count = 1
        name = f"{source.stem}-{os.getpid()}-checkpoint.ipynb"  # one per xdist worker
        path = source.parent / ".ipynb_checkpoints" / name
        with _locked(source.parent):  # another worker may be removing the folder
            path.parent.mkdir(exist_ok=True)
            nbformat.write(nb, path)
        planted.append(path)
    yield planted
    for path in planted:
        with _locked(path.parents[1]):
            path.unlink(missing_ok=True)
            try:
                path.parent.rmdir()  # only if nothing else (another worker's, a learner's) is there
            except OSError:
                pass


@contextlib.contextmanager
def _locked(folder: Path):
    """An exclusive lock on `folder` across processes (the xdist workers that plant and
    remove checkpoints in the same `.ipynb_checkpoints`)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def test_notebook_listings_skip_checkpoints(saved_checkpoints: list[Path], tmp_path: Path) -> None:
    """`notebook_files` (the tests' walk), the release's file list outside git, and
    `moe-course grade`'s search for submissions skip them."""
    from moe_course.grading.autograde.grade import find_submissions

    found = find_submissions([ROOT / "notebooks"])
    assert sorted(s.assignment for s in found) == ASSIGNMENTS, found
    assert not any(".ipynb_checkpoints" in s.path.parts for s in found)
    for path in saved_checkpoints:
        folder = path.parents[2]  # ROOT/solutions, ROOT/notebooks
        assert path.is_file() and path not in notebook_files(folder)
        assert _notebook(folder.name, ASSIGNMENTS[0]) in notebook_files(folder)
    course = tmp_path / "copy"  # not a git checkout: the listing falls back to the folder
    shutil.copytree(ROOT / "notebooks", course / "notebooks")
    listed = _committed(course)
    assert listed and not any(".ipynb_checkpoints" in p.parts for p in listed)
    assert Path(ASSIGNMENTS[0]) / ".ipynb_checkpoints" / saved_checkpoints[1].name not in listed
    assert any(p.name == saved_checkpoints[1].name for p in (course / "notebooks").rglob("*"))


@pytest.mark.parametrize("folder", ["solutions", "notebooks"])
def test_committed_notebooks_have_no_outputs(folder: str, saved_checkpoints: list[Path]
                                             ) -> None:
    """Every notebook of the course is committed without outputs, also when a learner has
    saved one (its checkpoint, with outputs, is not the course's)."""
    paths = notebook_files(ROOT / folder)
    assert paths
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, path


@pytest.mark.parametrize("assignment", ASSIGNMENTS)
def test_solution_runs_top_to_bottom_and_validates(
        assignment: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The source notebook runs without error in a fresh kernel (its time is printed), its
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
    # Printed, not asserted: wall-clock time on a shared machine is no test (the README's
    # notebook table gives the times measured on a quiet one).
    print(f"{assignment}: executed top to bottom in {seconds:.1f} s")
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


def test_release_is_regenerated_from_solutions(saved_checkpoints: list[Path],
                                               capsys: pytest.CaptureFixture) -> None:
    """notebooks/ is byte for byte what `moe-course release` makes of solutions/, and
    `moe-course release --check` says so, also with a learner's saved checkpoint present."""
    from moe_course.cli import main

    assert main(["release", "--check"]) == 0, capsys.readouterr().out
    assert capsys.readouterr().out.strip().splitlines()[-1] == "notebooks/ is up to date"


# -- nbgrader round trip ------------------------------------------------------------------------

def _test_points(assignment: str) -> dict[str, float]:
    """Points of each autograded tests cell, read from the source notebook's nbgrader
    metadata (not from the course's registry, so the two are checked against each other)."""
    nb = nbformat.read(_notebook("solutions", assignment), as_version=4)
    return {c.metadata["nbgrader"]["grade_id"]: float(c.metadata["nbgrader"]["points"])
            for c in nb.cells
            if c.metadata.get("nbgrader", {}).get("grade") and c.cell_type == "code"}


@pytest.mark.xdist_group("nbgrader_course")
def test_nbgrader_round_trip(autograded_course) -> None:
    """The session's nbgrader course (`tests/nbgrader_course.py`: generate, submit, autograde,
    feedback, export): every exercise gets exactly its points (correct: all; blank release:
    0; partly right and crashing: exactly its right part), feedback shows no hidden-test
    source, and the export has the totals."""
    from nbgrader.api import Gradebook
    from nbgrader_course import STUDENTS, expected_points

    course = autograded_course
    print(f"nbgrader course built in {course.seconds:.0f} s")
    totals: dict[tuple[str, str], float] = {}
    with Gradebook(f"sqlite:///{course.root / 'gradebook.db'}") as gb:
        for assignment in ASSIGNMENTS:
            notebook = _notebook("solutions", assignment).stem
            points = _test_points(assignment)
            for student in STUDENTS:
                want = {f"{gid}_tests": pts
                        for gid, pts in expected_points(assignment, student).items()}
                assert set(want) == set(points), (assignment, sorted(want), sorted(points))
                assert all(want[t] in (0.0, points[t]) for t in want), (assignment, want, points)
                got = {t: gb.find_grade(t, notebook, assignment, student).score for t in points}
                assert got == want, (student, assignment, got, want)
                totals[(student, assignment)] = sum(want.values())
            assert sum(expected_points(assignment, "correct").values()) == sum(points.values())
    pages = sorted((course.root / "feedback").rglob("*.html"))
    assert len(pages) == len(STUDENTS) * len(ASSIGNMENTS)
    for page in pages:
        text = page.read_text()
        assert "hidden=True" not in text and "BEGIN HIDDEN TESTS" not in text, page
    got = course.export()
    assert got == totals, json.dumps({str(k): v for k, v in got.items()})
