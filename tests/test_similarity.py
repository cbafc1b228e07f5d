"""The similarity report (`moe-course similarity`, `moe-course grade --similarity`).

- A copy of an answer with every name renamed, comments added and the layout changed is
  flagged as a pair, for every exercise whose answer is long enough to compare.
- Independent honest answers are not: the solution notebook's answers against the
  alternative implementations of `test_checks*.py`.
- An answer pasted from the reference package is flagged as matching the reference.
- The report is written as CSV, JSON and markdown; the scores are not touched.
"""

from __future__ import annotations

import builtins
import csv
import inspect
import io
import json
import keyword
import textwrap
import tokenize
from pathlib import Path

import nbformat
import pytest
from test_checks_common import NOTEBOOKS
from test_grader import solution_sources, submission

from moe_course.grading import EXERCISES
from moe_course.grading.autograde.similarity import (
    MIN_TOKENS,
    Answer,
    compare,
    fingerprints,
    main,
    normalise,
)

CORRECT = {gid: impls for module in NOTEBOOKS.values() for gid, impls in module.CORRECT.items()}
ASSIGNMENTS = sorted({ex.assignment for ex in EXERCISES.values()})
SOLUTIONS = {gid: src for a in ASSIGNMENTS for gid, src in solution_sources(a).items()
             if gid in EXERCISES and EXERCISES[gid].kind != "written"}
MODULES = {"torch", "nn", "F", "math", "dist", "np"}


def disguise(source: str) -> str:
    """`source` with every name the author chose renamed, comments added, layout changed."""
    names: dict[str, str] = {}
    out, previous = [], ""
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        text = tok.string
        if tok.type == tokenize.COMMENT:
            continue
        if (tok.type == tokenize.NAME and not keyword.iskeyword(text) and previous != "."
                and text not in MODULES and text not in dir(builtins)):
            text = names.setdefault(text, f"my_{len(names)}")
        if tok.type == tokenize.NEWLINE:
            text = "  # my own work\n"
        out.append((tok.type, text))
        previous = tok.string
    return "# written by me\n" + tokenize.untokenize(out)


def _long(grade_id: str) -> bool:
    return len(normalise(SOLUTIONS[grade_id])) >= MIN_TOKENS


def test_a_disguised_copy_is_normalised_back() -> None:
    for grade_id, source in SOLUTIONS.items():
        copy = disguise(source)
        if not source.startswith("%"):  # a cell magic (%%writefile) is not Python
            compile(copy, grade_id, "exec")  # still Python
        assert copy != source
        assert fingerprints(normalise(copy)) == fingerprints(normalise(source)), grade_id


def test_renamed_and_commented_copies_are_flagged_and_honest_answers_are_not() -> None:
    answers = []
    for grade_id, source in SOLUTIONS.items():
        answers += [Answer("alice", "", grade_id, source),
                    Answer("bob", "", grade_id, disguise(source))]
        alternatives = {textwrap.dedent(inspect.getsource(impl))  # some are listed twice
                        for impl in CORRECT.get(grade_id, [])}
        for i, source_ in enumerate(sorted(alternatives)):
            answers.append(Answer(f"carol{i}", "", grade_id, source_))
    rows = compare(answers)
    pairs = {(r["exercise"], r["student_a"], r["student_b"]) for r in rows if r["kind"] == "pair"}
    long_enough = [gid for gid in SOLUTIONS if _long(gid)]
    assert len(long_enough) >= 20, long_enough
    assert pairs == {(gid, "alice", "bob") for gid in long_enough}, pairs
    # the instructor's solutions are their own work too: none is flagged as the reference
    assert [r for r in rows if r["kind"] == "reference"] == []


def test_an_answer_pasted_from_the_reference_is_flagged() -> None:
    grade_id = "ex02_sparse_moe"
    pasted = inspect.getsource(EXERCISES[grade_id].reference)
    rows = compare([Answer("dave", "", grade_id, disguise(pasted)),
                    Answer("alice", "", grade_id, SOLUTIONS[grade_id])])
    assert [(r["kind"], r["student_a"]) for r in rows] == [("reference", "dave")]


def _write(root: Path, student: str, assignment: str, edits: dict[str, str]) -> None:
    folder = root / student / assignment
    folder.mkdir(parents=True)
    nbformat.write(submission(assignment, edits=edits), folder / f"{assignment}.ipynb")


def test_the_command_writes_the_report(tmp_path: Path) -> None:
    assignment = "02_top_k_routing"
    sources = solution_sources(assignment)
    graded = [gid for gid in sources if gid in EXERCISES and EXERCISES[gid].kind != "written"]
    _write(tmp_path / "submitted", "alice", assignment, {})
    _write(tmp_path / "submitted", "bob", assignment,
           {gid: disguise(sources[gid]) for gid in graded})
    _write(tmp_path / "submitted", "carol", assignment, {
        gid: textwrap.dedent(inspect.getsource(CORRECT[gid][0])) for gid in graded})
    assert main([str(tmp_path / "submitted"), "--out", str(tmp_path / "out")]) == 0
    with open(tmp_path / "out" / "similarity.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    flagged = {(r["exercise"], r["student_a"], r["student_b"]) for r in rows}
    assert flagged == {(gid, "alice", "bob") for gid in graded if _long(gid)}, flagged
    report = json.loads((tmp_path / "out" / "similarity.json").read_text())
    assert report["answers_compared"] == 3 * len(graded)
    assert "alice | bob" in (tmp_path / "out" / "similarity.md").read_text()


def test_bad_options_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main([str(tmp_path), "--out", str(tmp_path / "o"), "--threshold", "1.5"]) == 2
    assert "--threshold must be in (0, 1]" in capsys.readouterr().err
