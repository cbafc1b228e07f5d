"""The code of the solution notebooks, cell by cell, for tests that run answers as a learner.

`namespace(assignment, answers)` builds what a learner's notebook holds when the checks run:
the notebook's first code cell (its imports) and every graded answer cell in order, with
`answers` (grade_id -> source) replacing some of them. No other cell runs (they train and
plot); the answer cells of this course need only the imports and the earlier answers.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jupytext
import nbformat

from moe_course.grading import EXERCISES

ROOT = Path(__file__).resolve().parent.parent
SOLUTIONS = ROOT / "solutions"


def twin(assignment: str) -> Path:
    """The jupytext twin `solutions/<assignment>/<name>.py` of an assignment."""
    found = sorted((SOLUTIONS / assignment).glob("*.py"))
    if len(found) != 1:
        raise FileNotFoundError(f"expected one jupytext twin in solutions/{assignment}: {found}")
    return found[0]


def notebook(assignment: str) -> nbformat.NotebookNode:
    """The solution notebook of `assignment`, read from its jupytext twin."""
    return jupytext.read(twin(assignment))


def grade_id(cell: nbformat.NotebookNode) -> str | None:
    return cell.get("metadata", {}).get("nbgrader", {}).get("grade_id")


def answer_cells(assignment: str) -> dict[str, str]:
    """grade_id -> source of every autograded answer cell (solution and not graded)."""
    out = {}
    for cell in notebook(assignment).cells:
        meta = cell.get("metadata", {}).get("nbgrader", {})
        if cell.cell_type == "code" and meta.get("solution") and not meta.get("grade"):
            out[meta["grade_id"]] = cell.source
    return out


def runnable(source: str) -> str:
    """Cell source as plain Python: a `%%writefile` cell's body, other magics dropped."""
    lines = source.splitlines()
    if lines and lines[0].startswith("%%writefile"):
        lines = lines[1:]
    return "\n".join(line for line in lines if not re.match(r"\s*[%!]", line))


def namespace(assignment: str, answers: dict[str, str] | None = None) -> dict[str, Any]:
    """The imports cell plus every answer cell (some replaced by `answers`), executed."""
    answers = answers or {}
    nb = notebook(assignment)
    code = [c for c in nb.cells if c.cell_type == "code"]
    ns: dict[str, Any] = {"__name__": f"solution_{assignment}"}
    exec(compile(runnable(code[0].source), f"<{assignment} imports>", "exec"), ns)
    for gid, source in answer_cells(assignment).items():
        source = answers.get(gid, source)
        code = compile(runnable(source), f"<{assignment} {gid}>", "exec")
        if source.startswith("%%writefile"):  # a module file: the notebook imports its symbol
            module: dict[str, Any] = {"__name__": gid}
            exec(code, module)
            symbol = EXERCISES[gid].symbol
            if symbol in module:
                ns[symbol] = module[symbol]
        else:
            exec(code, ns)
    return ns
