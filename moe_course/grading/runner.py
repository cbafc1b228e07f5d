"""Running an exercise's probes: `run_probe` (learner side), `judge_probe` (trusted side) and
`check`, which does both in one process for the notebooks.

The pytest grader calls `probe.inputs()` in its trusted process, `run_probe` in the
learner's process (sending inputs and outputs across with `torch.save` /
`torch.load(weights_only=True)`), and `judge_probe` back in the trusted process.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .guard import ReferenceCalled, quiet, reference_guard
from .probe import CheckFailure, Inputs, NotImplementedYet, Outputs, Probe
from .registry import EXERCISES, Exercise
from .secret import course_secret, hidden_inputs


def _implement_yourself(exercise: Exercise) -> CheckFailure:
    return CheckFailure(
        f"your {exercise.symbol} uses moe_course's own {exercise.symbol}: implement it yourself "
        "(calling the reference of the exercise being graded earns no points; moe_course's "
        "other functions are fine to use)")


def _failure(exercise: Exercise, probe: Probe, message: str) -> CheckFailure:
    return CheckFailure(f"{exercise.symbol}, check '{probe.name}': {message}")


def _is_reference(exercise: Exercise, obj: Any) -> bool:
    ref = exercise.reference
    if obj is ref:
        return True
    if isinstance(ref, type):
        if isinstance(obj, type) and issubclass(obj, ref):
            return True
        if isinstance(obj, ref):
            return True
    return False


def _kind_problem(exercise: Exercise, obj: Any) -> str | None:
    if exercise.kind == "class":
        if isinstance(obj, nn.Module):
            return (f"pass the class {exercise.symbol} itself, not an instance "
                    f"(check('{exercise.grade_id}', {exercise.symbol}))")
        if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
            return f"{exercise.symbol} must be an nn.Module subclass; got {type(obj).__name__}"
    elif not callable(obj):
        return f"{exercise.symbol} must be a function; got {type(obj).__name__} {obj!r:.60}"
    return None


def run_probe(exercise: Exercise, probe: Probe, obj: Any, inputs: Inputs) -> Outputs:
    """Run `probe` on the learner's `obj` (learner side); raise `CheckFailure` if it crashed.

    While it runs, the exercise's own reference trips (so calling it fails with "implement
    it yourself"), warnings and stderr are silenced and the global RNG is forked.
    """
    if _is_reference(exercise, obj):
        raise _failure(exercise, probe, _implement_yourself(exercise).message)
    problem = _kind_problem(exercise, obj)
    if problem:
        raise _failure(exercise, probe, problem)
    with quiet(), reference_guard(*exercise.references) as guard:
        try:
            outputs = probe.run(obj, inputs)
        except CheckFailure as failure:
            error: CheckFailure | None = failure
        except ReferenceCalled:
            error = _implement_yourself(exercise)
        except NotImplementedError as exc:
            error = NotImplementedYet(f"your {exercise.symbol} is not implemented yet (it "
                                      "raised NotImplementedError"
                                      f"{': ' + str(exc)[:80] if str(exc) else ''})")
        except RecursionError:
            error = CheckFailure(f"your {exercise.symbol} raised RecursionError: does it call "
                                 "itself?")
        except Exception as exc:
            text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            error = CheckFailure(f"your {exercise.symbol} raised {type(exc).__name__}"
                                 f"{': ' + text if text else ''}")
        else:
            error = None
    if guard.tampering:
        error = CheckFailure(f"your {exercise.symbol} tampered with the grader's guard while "
                             f"its checks ran: {guard.tampering[0]}")
    elif guard.tripped:
        error = _implement_yourself(exercise)
    if error is not None:
        failure = _failure(exercise, probe, error.message)
        if isinstance(error, NotImplementedYet):
            failure = NotImplementedYet(failure.message)
        raise failure from None
    return outputs


def judge_probe(exercise: Exercise, probe: Probe, inputs: Inputs, outputs: Outputs) -> None:
    """Judge a probe's outputs (trusted side); raise `CheckFailure` naming the mistake."""
    with quiet():
        try:
            probe.judge(inputs, outputs)
        except CheckFailure as failure:
            error = failure.message
        except (KeyError, TypeError, IndexError, AttributeError, ValueError, RuntimeError) as exc:
            error = f"could not read the results of your {exercise.symbol} ({exc!r:.120})"
        else:
            error = None
    if error is not None:
        raise _failure(exercise, probe, error) from None


def check(grade_id: str, obj: Any, *, hidden: bool = False) -> None:
    """Check the learner's `obj` against exercise `grade_id`; print one line on success.

    `hidden=True` runs the hidden checks instead of the visible ones, on inputs derived from
    the course secret when there is one (`secret.course_secret`). On a failure raises
    `CheckFailure` (an `AssertionError`) whose message names the likely mistake; in Jupyter
    it shows without a traceback.
    """
    exercise = EXERCISES.get(grade_id)
    if exercise is None:
        raise ValueError(f"no exercise {grade_id!r}; known: {', '.join(sorted(EXERCISES))}")
    if exercise.kind == "written":
        raise ValueError(f"{grade_id} is a written answer, graded by hand: it has no checks")
    probes = exercise.hidden if hidden else exercise.visible
    secret = course_secret() if hidden else None
    for probe in probes:
        inputs = hidden_inputs(grade_id, probe, secret) if hidden else probe.inputs()
        try:
            outputs = run_probe(exercise, probe, obj, inputs)
        except NotImplementedYet:
            if not exercise.optional or hidden:
                raise
            # A skipped challenge: say so and let Run All go on. The hidden block of the
            # tests cell (nbgrader) and the pytest grader still fail it: 0 points.
            print(f"skipped: {exercise.symbol} not implemented (a challenge exercise, "
                  f"0 of {exercise.points} points until you write it)")
            return
        judge_probe(exercise, probe, inputs, outputs)
    n = len(probes)
    label = ("hidden " if hidden else "") + ("check" if n == 1 else "checks")
    print(f"✓ {exercise.symbol}: {n} {label} passed")


def implemented(fn: Any, *args: Any, **kwargs: Any) -> bool:
    """Whether `fn(*args, **kwargs)` runs past a stub's `raise NotImplementedError`.

    The notebooks guard the demo cells of an optional exercise with it, so that a skipped
    challenge does not stop Run All. Other errors propagate: a broken answer should show.

    >>> def stub(x):
    ...     raise NotImplementedError()
    >>> implemented(stub, 1), implemented(abs, -1)
    (False, True)
    """
    try:
        with quiet():
            fn(*args, **kwargs)
    except NotImplementedError:
        return False
    return True
