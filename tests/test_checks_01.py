"""The teaching checks of notebook 01 (experts and gating) must be able to fail, and fail
helpfully.

For every exercise: a correct implementation written differently from the reference passes
the visible and hidden checks silently; each planted mistake fails with its own message;
wrong return types fail with a message, not a crash. The checks every exercise shares
(inputs deterministic and tie-free, outputs across the process boundary, stubs, calling the
reference) run over all notebooks in tests/test_checks_common.py, from this module's
`CORRECT`, `ALIASES`, `order_margins`, and the tables `MISTAKES` (planted mistakes and the
words their message must hold) and `WRONG_RETURNS`.
"""

from __future__ import annotations

from typing import Any

import probe_data
import pytest
import torch
import torch.nn.functional as F
from probe_data import LoopExpert, fails
from torch import nn

import moe_course
from moe_course.experts import Expert as _AliasExpert
from moe_course.gating import softmax_gate as _alias_softmax_gate
from moe_course.grading import EXERCISES
from moe_course.routing import dense_moe as _alias_dense_moe

GRADED = sorted(g for g, ex in EXERCISES.items() if g.startswith("ex01_") and ex.kind != "written")


# ========================================================================================
# Correct implementations, each written differently from the reference.


def softmax_gate(x, w_gate):  # max-subtracted exp instead of torch.softmax
    z = x @ w_gate
    z = z - z.max(dim=-1, keepdim=True).values
    e = z.exp()
    return e / e.sum(dim=-1, keepdim=True)


def dense_moe(x, experts, w_gate):  # a loop over experts instead of a stacked einsum
    gates = softmax_gate(x, w_gate)
    y = torch.zeros_like(x)
    for e, expert in enumerate(experts):
        y = y + gates[:, e : e + 1] * expert(x)
    return y, gates


def dense_moe_with_reference_gate(x, experts, w_gate):  # another exercise's reference: fine
    gates = moe_course.softmax_gate(x, w_gate)
    return sum(gates[:, e : e + 1] * ex(x) for e, ex in enumerate(experts)), gates


CORRECT: dict[str, list[Any]] = {
    "ex01_expert": [LoopExpert],
    "ex01_softmax_gate": [softmax_gate],
    "ex01_dense_moe": [dense_moe, dense_moe_with_reference_gate],
}


def test_every_graded_exercise_has_a_correct_implementation():
    assert sorted(CORRECT) == GRADED


@pytest.mark.parametrize("grade_id", GRADED)
def test_correct_implementation_passes_silently(grade_id, capsys):
    probe_data.passes_silently(grade_id, CORRECT[grade_id], capsys)


# ========================================================================================
# Planted mistakes, each with the distinctive part of its message.


class ReluExpert(LoopExpert):
    def forward(self, x):
        return self.w_out(F.relu(self.w_in(x)))


class TanhGeluExpert(LoopExpert):
    def forward(self, x):
        return self.w_out(F.gelu(self.w_in(x), approximate="tanh"))


class NoBiasExpert(nn.Module):
    def __init__(self, d_model, d_hidden):
        super().__init__()
        self.w_in = nn.Linear(d_model, d_hidden, bias=False)
        self.w_out = nn.Linear(d_hidden, d_model)

    def forward(self, x):
        return self.w_out(F.gelu(self.w_in(x)))


class RenamedExpert(nn.Module):
    def __init__(self, d_model, d_hidden):
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_model)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class TransposedExpert(nn.Module):
    def __init__(self, d_model, d_hidden):
        super().__init__()
        self.w_in = nn.Linear(d_hidden, d_model)
        self.w_out = nn.Linear(d_model, d_hidden)

    def forward(self, x):
        return x


class PlainExpert:  # not an nn.Module
    def __init__(self, d_model, d_hidden):
        self.w_in = nn.Linear(d_model, d_hidden)


MISTAKES: list[tuple[str, Any, str]] = [
    ("ex01_expert", ReluExpert, "ReLU"),
    ("ex01_expert", TanhGeluExpert, "tanh approximation of GELU"),
    ("ex01_expert", NoBiasExpert, "must have a bias"),
    ("ex01_expert", RenamedExpert, "has no attribute 'w_in'"),
    ("ex01_expert", TransposedExpert, "stores (out, in)"),
    ("ex01_expert", PlainExpert, "nn.Module subclass"),
    ("ex01_expert", LoopExpert(2, 3), "not an instance"),
    ("ex01_softmax_gate", lambda x, w: torch.softmax(x @ w, dim=0), "not over the tokens"),
    ("ex01_softmax_gate", lambda x, w: x @ w, "raw logits"),
    ("ex01_softmax_gate", lambda x, w: (x @ w).exp() / (x @ w).exp().sum(-1, keepdim=True),
     "NaN or inf"),
    ("ex01_dense_moe", lambda x, ex, w: (sum(e(x) for e in ex), softmax_gate(x, w)),
     "not weighted by their gates"),
    ("ex01_dense_moe", lambda x, ex, w: dense_moe(x, ex, w)[0], "forget to return the gates"),
    ("ex01_dense_moe", lambda x, ex, w: dense_moe(x, ex, w)[::-1], "you returned (gates, y)"),
    ("ex01_dense_moe", lambda x, ex, w: (sum(e(x) for e in ex) / len(ex), softmax_gate(x, w)),
     "plain average"),
    ("ex01_dense_moe", lambda x, ex, w: (dense_moe(x, ex, w)[0], torch.softmax(x @ w, 0)),
     "not over the tokens"),
]


def test_every_exercise_has_planted_mistakes():
    assert {g for g, _, _ in MISTAKES} == set(GRADED)


def test_the_issue_mistakes_are_distinct_messages():
    # One message per mistake named in the issue; none of them is the generic fallback.
    for grade_id, impl, _ in MISTAKES:
        message = fails(grade_id, impl)
        assert " is wrong: " not in message, (grade_id, message)


# ========================================================================================
# Wrong return types and shapes are explained; the reference may not be called.

WRONG_RETURNS: list[tuple[str, Any, str]] = [
    ("ex01_softmax_gate", lambda x, w: (x @ w).t(), "shape (6, 5)"),
    ("ex01_softmax_gate", lambda x, w: None, "you returned None"),
    ("ex01_dense_moe", lambda x, ex, w: (x, w), "shape (6, 3)"),
]


ALIASES = {  # the reference of each exercise, captured at import
    "ex01_expert": _AliasExpert,
    "ex01_softmax_gate": _alias_softmax_gate,
    "ex01_dense_moe": _alias_dense_moe,
}


# ========================================================================================
# Inputs: the decisions each probe's answer depends on are far from ties.

def order_margins(grade_id: str, inputs: dict) -> list[float]:
    """The gaps every order-dependent decision of the probe rests on: none in notebook 01
    (no exercise of it sorts or picks)."""
    return []
