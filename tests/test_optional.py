"""Optional exercises are optional: a skipped challenge (its answer left as the stub) does
not stop Run All; its check cell and the demo cells that need it say "skipped"; and it
still scores 0 under both graders."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import torch
from nbclient import NotebookClient
from test_grader import (
    jupyter_env,
    nbgrader_course,
    nbgrader_scores,
    read_grades,
    run_grade,
    submission,
    write_submission,
)

from moe_course.grading import EXERCISES, CheckFailure, check, implemented

ASSIGNMENT = "03_load_balancing"
SKIPPED = "skipped: load_loss not implemented"


def stub(clean_logits, noisy_logits, noise_std, k, w_load=0.01):
    # YOUR CODE HERE
    raise NotImplementedError()


def test_only_the_challenge_is_optional() -> None:
    assert [g for g, ex in EXERCISES.items() if ex.optional] == ["ex03_load_loss"]


def test_a_skipped_challenge_prints_skipped_and_goes_on(capsys) -> None:
    check("ex03_load_loss", stub)
    out, err = capsys.readouterr()
    assert out.startswith(SKIPPED) and "0 of 2 points" in out and err == ""


def test_its_hidden_check_still_fails() -> None:
    with pytest.raises(CheckFailure, match="not implemented yet"):
        check("ex03_load_loss", stub, hidden=True)


def test_a_wrong_answer_to_the_challenge_is_not_skipped() -> None:
    def half_done(clean_logits, noisy_logits, noise_std, k, w_load=0.01):
        return w_load * clean_logits.sum() * 0

    with pytest.raises(CheckFailure, match="load_loss"):
        check("ex03_load_loss", half_done)


def test_a_required_exercise_left_as_the_stub_still_fails() -> None:
    def cv_squared(v):
        raise NotImplementedError()

    with pytest.raises(CheckFailure, match="not implemented yet"):
        check("ex03_cv_squared", cv_squared)


def test_implemented_tells_the_stub_apart() -> None:
    args = (torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), 1)
    assert not implemented(stub, *args)
    assert implemented(lambda *a: torch.zeros(()), *args)
    with pytest.raises(ZeroDivisionError):  # a broken answer shows its error
        implemented(lambda *a: 1 / 0, *args)


def _outputs(nb: nbformat.NotebookNode) -> list[tuple[str, str]]:
    """(grade_id or first source line, text of the stream outputs) of each code cell."""
    out = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        gid = cell.metadata.get("nbgrader", {}).get("grade_id", cell.source.split("\n")[0])
        text = "".join(o.get("text", "") for o in cell.get("outputs", [])
                       if o.get("output_type") == "stream")
        out.append((gid, text))
    return out


@pytest.mark.slow
def test_run_all_with_only_the_challenge_skipped_completes_and_scores_0(tmp_path: Path) -> None:
    """The release notebook, every answer filled from the solution but load_loss: Run All
    runs every cell without an error (the check cell and the demo say "skipped"); the
    pytest grader and nbgrader give load_loss 0 and every other exercise its points."""
    solved = {ex.grade_id for ex in EXERCISES.values()
              if ex.assignment == ASSIGNMENT and ex.grade_id != "ex03_load_loss"}
    nb = submission(ASSIGNMENT, solved)
    run = nbformat.from_dict(nb)
    env = jupyter_env(tmp_path / "run-env")
    env["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    # The experiments at their grading size (a few steps): which cells run, skip or fail
    # does not depend on the number of steps, and the full size runs in test_notebooks.py.
    env["MOE_COURSE_GRADING"] = "1"
    work = tmp_path / "run"
    work.mkdir()
    client = NotebookClient(run, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(work)}})
    client.km_kwargs = {"env": env}  # a private Jupyter configuration for the kernel
    client.execute()  # raises CellExecutionError at the first cell with an error
    printed = dict(_outputs(run))
    assert printed["ex03_load_loss_tests"].startswith(SKIPPED)
    demos = [text for gid, text in _outputs(run) if text.startswith(SKIPPED)]
    assert len(demos) == 2, demos  # the check cell and the demo cell

    # The pytest grader: 0 for load_loss, full points for the rest.
    path = write_submission(tmp_path / "submitted", "skipper", ASSIGNMENT, nb)
    status, _, log = run_grade([path.parent.parent.parent], tmp_path / "grades")
    assert status == 0, log
    grades = read_grades(tmp_path / "grades")
    for gid in solved | {"ex03_load_loss"}:
        score, top = grades[("skipper", ASSIGNMENT, gid)]
        assert score == (0.0 if gid == "ex03_load_loss" else top), (gid, score, top)

    # nbgrader: autograde restores the hidden block, which fails the stub: 0 points.
    root, nb_env = nbgrader_course(tmp_path, [ASSIGNMENT])
    write_submission(root / "submitted", "skipper", ASSIGNMENT, nb)
    for cmd in (["db", "student", "add", "skipper"], ["autograde", ASSIGNMENT, "--force"]):
        done = subprocess.run([sys.executable, "-m", "nbgrader", *cmd], cwd=root, env=nb_env,
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    scores = nbgrader_scores(root, ASSIGNMENT, "skipper")
    assert scores is not None
    for gid in solved | {"ex03_load_loss"}:
        expected = 0.0 if gid == "ex03_load_loss" else float(EXERCISES[gid].points)
        assert scores[gid] == expected, (gid, scores)
