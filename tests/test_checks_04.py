"""The teaching checks of notebook 04 (expert choice) must be able to fail, and fail
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

import math
from typing import Any

import probe_data
import pytest
import torch
import torch.nn.functional as F
from probe_data import fails

from moe_course.expert_choice import expert_choice_capacity as _alias_ec_capacity
from moe_course.expert_choice import expert_choice_moe as _alias_ec_moe
from moe_course.expert_choice import expert_choice_routing as _alias_ec_routing
from moe_course.expert_choice import experts_per_token as _alias_per_token
from moe_course.grading import EXERCISES
from moe_course.grading.inputs import min_gap

GRADED = sorted(g for g, ex in EXERCISES.items() if g.startswith("ex04_") and ex.kind != "written")


# ========================================================================================
# Correct implementations, each written differently from the reference.


def expert_choice_capacity(n_tokens, n_experts, capacity_factor):
    return min(n_tokens, math.ceil(n_tokens * capacity_factor / n_experts))


def expert_choice_routing(logits, capacity):  # argsort per expert
    scores = torch.softmax(logits, dim=-1)
    token_idx = torch.stack([torch.argsort(scores[:, e], descending=True)[:capacity]
                             for e in range(scores.shape[1])])
    return scores.t().gather(1, token_idx), token_idx


def expert_choice_moe(x, experts, gates, token_idx):  # one-hot combine matrices
    t = x.shape[0]
    y = torch.zeros_like(x)
    for e, expert in enumerate(experts):
        out = expert(x[token_idx[e]]) * gates[e, :, None]
        y = y + F.one_hot(token_idx[e], t).to(x.dtype).t() @ out
    return y


def experts_per_token(token_idx, n_tokens):
    return torch.stack([(token_idx == tok).sum() for tok in range(n_tokens)])


CORRECT: dict[str, list[Any]] = {
    "ex04_expert_choice_capacity": [expert_choice_capacity],
    "ex04_expert_choice_routing": [expert_choice_routing],
    "ex04_expert_choice_moe": [expert_choice_moe],
    "ex04_experts_per_token": [experts_per_token],
}


def test_every_graded_exercise_has_a_correct_implementation():
    assert sorted(CORRECT) == GRADED


@pytest.mark.parametrize("grade_id", GRADED)
def test_correct_implementation_passes_silently(grade_id, capsys):
    probe_data.passes_silently(grade_id, CORRECT[grade_id], capsys)


# ========================================================================================
# Planted mistakes, each with the distinctive part of its message.


def _ec_token_softmax(logits, capacity):
    return torch.softmax(logits, dim=0).t().topk(capacity, dim=-1)


def _ec_ascending(logits, capacity):
    g, i = expert_choice_routing(logits, capacity)
    return g.flip(-1), i.flip(-1)


def _ec_tokens_pick(logits, capacity):
    return torch.softmax(logits, dim=-1).topk(capacity, dim=-1)


def _ec_raw_gates(logits, capacity):
    _, i = expert_choice_routing(logits, capacity)
    return logits.t().gather(1, i), i


def _ec_moe_unweighted(x, experts, gates, token_idx):
    return expert_choice_moe(x, experts, torch.ones_like(gates), token_idx)


def _ec_moe_overwrite(x, experts, gates, token_idx):
    y = torch.zeros_like(x)
    for e, expert in enumerate(experts):
        y = y.index_copy(0, token_idx[e], gates[e, :, None] * expert(x[token_idx[e]]))
    return y


def _ec_moe_per_token(x, experts, gates, token_idx):
    y = torch.zeros_like(x)
    for e, expert in enumerate(experts):
        for c in range(token_idx.shape[1]):
            t = int(token_idx[e, c])
            y[t] = y[t] + gates[e, c] * expert(x[t : t + 1])[0]
    return y


def _ec_moe_all_tokens(x, experts, gates, token_idx):
    y = torch.zeros_like(x)
    for e, expert in enumerate(experts):
        out = expert(x)
        y = y.index_add(0, token_idx[e], gates[e, :, None] * out[token_idx[e]])
    return y


MISTAKES: list[tuple[str, Any, str]] = [
    ("ex04_expert_choice_capacity", lambda t, e, cf: min(t, math.floor(t * cf / e)),
     "rounded down"),
    ("ex04_expert_choice_capacity", lambda t, e, cf: math.ceil(t * cf / e),
     "can't pick more tokens"),
    ("ex04_expert_choice_routing", _ec_token_softmax, "softmax over tokens (dim=0)"),
    ("ex04_expert_choice_routing", _ec_ascending, "ascending order"),
    ("ex04_expert_choice_routing", _ec_tokens_pick, "each *expert* picks C tokens"),
    ("ex04_expert_choice_routing", _ec_raw_gates, "raw logits"),
    ("ex04_expert_choice_moe", _ec_moe_unweighted, "not weighted by their gates"),
    ("ex04_expert_choice_moe", _ec_moe_overwrite, "don't overwrite"),
    ("ex04_expert_choice_moe", _ec_moe_per_token, "(one call per token?)"),
    ("ex04_expert_choice_moe", _ec_moe_all_tokens, "dense mixture"),
    ("ex04_experts_per_token", lambda ti, n: torch.bincount(ti.reshape(-1)), "minlength"),
    ("ex04_experts_per_token", lambda ti, n: experts_per_token(ti, n) > 0, "booleans"),
    ("ex04_experts_per_token", lambda ti, n: experts_per_token(ti, n).float(), "integer"),
    ("ex04_experts_per_token", lambda ti, n: torch.full((ti.shape[0],), ti.shape[1]),
     "counts per expert?"),
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
    ("ex04_expert_choice_capacity", lambda t, e, cf: [t], "must be an int"),
    ("ex04_expert_choice_routing", lambda lg, c: (lg, lg), "shape (4, 3)"),
    ("ex04_expert_choice_moe", lambda x, ex, g, i: {"y": x}, "a dict"),
    ("ex04_experts_per_token", lambda ti, n: ti, "shape (8,)"),
]


ALIASES = {  # the reference of each exercise, captured at import
    "ex04_expert_choice_capacity": _alias_ec_capacity,
    "ex04_expert_choice_routing": _alias_ec_routing,
    "ex04_expert_choice_moe": _alias_ec_moe,
    "ex04_experts_per_token": _alias_per_token,
}


# ========================================================================================
# Inputs: the decisions each probe's answer depends on are far from ties.

def order_margins(grade_id: str, inputs: dict) -> list[float]:
    """The gaps every order-dependent decision of the probe rests on (independent oracle)."""
    if "logits" in inputs:  # each expert's top-C tokens by softmax score
        return [min_gap(torch.softmax(inputs["logits"], dim=-1), dim=0)]
    return []


def test_order_dependent_probes_are_covered_by_the_tie_check():
    covered = {gid for gid in GRADED for probe in EXERCISES[gid].visible + EXERCISES[gid].hidden
               if order_margins(gid, probe.inputs())}
    assert {"ex04_expert_choice_routing", "ex04_expert_choice_moe",
            "ex04_experts_per_token"} <= covered
