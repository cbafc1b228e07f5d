"""What may cross the grader's process boundary: plain data, compared exactly; and the
generic assertions every exercise's probes and checks must satisfy.

Shared by the check tests of every notebook (tests/test_checks_NN.py) and by the checks
they all share (tests/test_checks_common.py).
"""

from __future__ import annotations

import io
import math
from typing import Any

import pytest
import torch
from torch import nn

from moe_course.grading import EXERCISES, CheckFailure, check, judge_probe, run_probe

SQRT2 = math.sqrt(2.0)


def fails(grade_id: str, obj: Any, hidden: bool | None = None) -> str:
    """Run the visible (and hidden) checks; return the first failure's message."""
    for h in ((False, True) if hidden is None else (hidden,)):
        try:
            check(grade_id, obj, hidden=h)
        except CheckFailure as failure:
            return failure.message
    raise AssertionError(f"{grade_id}: {obj!r} passed every check")


class LoopExpert(nn.Module):
    """A correct `Expert` of notebook 01 (erf written out instead of F.gelu), also the expert
    of the learner-style layers of notebook 05's check tests."""

    def __init__(self, d_model: int, d_hidden: int) -> None:
        super().__init__()
        self.w_in = nn.Linear(d_model, d_hidden)
        self.w_out = nn.Linear(d_hidden, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.w_in(x)
        return self.w_out(0.5 * h * (1.0 + torch.erf(h / SQRT2)))


def equal(a: Any, b: Any) -> bool:
    """Exact equality of nested tensors (same dtype), dicts, lists, tuples and scalars."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(
            equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(equal, a, b))
    return a == b


def plain(value: Any) -> bool:
    """Only plain tensors (no subclasses), str-keyed dicts, lists, tuples and scalars."""
    if isinstance(value, torch.Tensor):
        return type(value) is torch.Tensor
    if isinstance(value, dict):
        return all(isinstance(k, str) and plain(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


def round_trip(outputs: Any) -> Any:
    """`outputs` through `torch.save` / `torch.load(weights_only=True)`: the grader's boundary."""
    buffer = io.BytesIO()
    torch.save(outputs, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def inputs_twice(probe: Any) -> tuple[Any, Any]:
    """A probe's inputs built twice: they must be equal and plain."""
    first, second = probe.inputs(), probe.inputs()
    assert equal(first, second)
    assert plain(first)
    return first, second


def judged_after_round_trip(exercise: Any, probe: Any, impl: Any, first: Any,
                            second: Any) -> None:
    """A correct `impl` run on `first` gives plain outputs that survive the round trip
    unchanged and pass the judge on the fresh copy `second` of the inputs."""
    outputs = run_probe(exercise, probe, impl, first)
    assert plain(outputs)
    loaded = round_trip(outputs)
    assert equal(loaded, outputs)
    judge_probe(exercise, probe, second, loaded)


def passes_silently(grade_id: str, impls: list[Any], capture: Any) -> None:
    """Each of `impls` passes the visible and the hidden check of `grade_id`, printing one
    line each and nothing on stderr (`capture`: pytest's capsys or capfd)."""
    symbol = EXERCISES[grade_id].symbol
    for impl in impls:
        check(grade_id, impl)
        check(grade_id, impl, hidden=True)
        out, err = capture.readouterr()
        assert err == ""
        lines = out.splitlines()
        assert len(lines) == 2 and all(line.startswith(f"✓ {symbol}: ") for line in lines), out
        assert "hidden" in lines[1] and "passed" in lines[0]


def truncated(value: Any) -> Any:
    """`value` with every list emptied (dicts kept): outputs with their records cut off."""
    if isinstance(value, dict):
        return {k: truncated(v) for k, v in value.items()}
    if isinstance(value, list):
        return []
    return value


def judge_refuses_missing_or_truncated(exercise: Any, probe: Any, impl: Any) -> None:
    """The judge fails empty outputs, and the correct `impl`'s outputs with lists cut off."""
    inputs = probe.inputs()
    with pytest.raises(CheckFailure):
        judge_probe(exercise, probe, inputs, {})
    outputs = run_probe(exercise, probe, impl, inputs)
    cut = truncated(outputs)
    if not equal(cut, outputs):  # some list was non-empty: a shorter one must not pass
        with pytest.raises(CheckFailure):
            judge_probe(exercise, probe, inputs, cut)
