"""Teaching checks for the course's exercises, and the registry that lists them.

In a notebook::

    from moe_course.grading import check
    check("ex02_top_k_gating", top_k_gating)               # visible checks
    check("ex02_top_k_gating", top_k_gating, hidden=True)  # hidden checks (nbgrader)

A passing check prints one line; a failing one raises `CheckFailure` (an `AssertionError`)
whose message names the likely mistake, shown in Jupyter without a traceback.

For graders: `EXERCISES[grade_id]` is an `Exercise` with `visible` and `hidden` tuples of
`Probe`s; `probe.inputs()`, `run_probe(...)` (may run in the learner's process) and
`judge_probe(...)` (trusted) split a check across a process boundary; only tensors and
plain data cross it.
"""

from ..losses import LayerLosses
from .guard import ReferenceCalled, quiet, reference_guard
from .probe import CheckFailure, Probe, capture
from .registry import EXERCISES, Exercise, exercises_for
from .runner import check, implemented, judge_probe, run_probe

__all__ = [
    "EXERCISES", "CheckFailure", "Exercise", "LayerLosses", "Probe", "ReferenceCalled",
    "capture", "check", "exercises_for", "implemented", "judge_probe", "quiet",
    "reference_guard", "run_probe",
]
