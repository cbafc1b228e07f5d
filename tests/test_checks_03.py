"""The teaching checks of notebook 03 (load balancing) must be able to fail, and fail
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
from probe_data import SQRT2, fails

from moe_course.capacity import apply_capacity as _alias_apply_capacity
from moe_course.capacity import capacity_positions as _alias_capacity_positions
from moe_course.capacity import expert_capacity as _alias_expert_capacity
from moe_course.grading import EXERCISES
from moe_course.grading.inputs import min_gap
from moe_course.losses import cv_squared as _alias_cv_squared
from moe_course.losses import importance_loss as _alias_importance_loss
from moe_course.losses import load_loss as _alias_load_loss
from moe_course.losses import router_z_loss as _alias_router_z_loss
from moe_course.losses import switch_aux_loss as _alias_switch_aux_loss

GRADED = sorted(g for g, ex in EXERCISES.items() if g.startswith("ex03_") and ex.kind != "written")


# ========================================================================================
# Correct implementations, each written differently from the reference.


def cv_squared(v):  # the variance written out
    n = v.numel()
    if n == 1:
        return v.sum() * 0.0
    mean = v.sum() / n
    return ((v - mean) ** 2).sum() / n / (mean * mean + 1e-10)


def importance_loss(gates, w_importance=0.01):
    importance = torch.stack([gates[:, e].sum() for e in range(gates.shape[1])])
    return cv_squared(importance) * w_importance


def load_loss(clean_logits, noisy_logits, noise_std, k, w_load=0.01):  # loop over experts
    t, e = noisy_logits.shape
    columns = []
    for i in range(e):
        others = torch.cat([noisy_logits[:, :i], noisy_logits[:, i + 1 :]], dim=1)
        if k <= e - 1:
            threshold = others.sort(dim=-1, descending=True).values[:, k - 1]
        else:
            threshold = torch.full((t,), float("-inf"))
        z = (clean_logits[:, i] - threshold) / noise_std[:, i]
        columns.append(0.5 * (1.0 + torch.erf(z / SQRT2)))
    return w_load * cv_squared(torch.stack(columns, dim=1).sum(0))


def switch_aux_loss(router_probs, indices):  # a loop over experts
    t, e = router_probs.shape
    total = indices.numel()
    loss = router_probs.new_zeros(())
    for i in range(e):
        f = (indices == i).sum() / total
        loss = loss + f * router_probs[:, i].mean()
    return e * loss


def router_z_loss(logits):  # logsumexp written out
    m = logits.max(dim=-1, keepdim=True).values
    lse = m.squeeze(-1) + torch.log(torch.exp(logits - m).sum(dim=-1))
    return (lse**2).sum() / logits.shape[0]


def expert_capacity(n_tokens, n_experts, capacity_factor, k=1):  # plain float arithmetic
    if capacity_factor <= 0:
        raise ValueError(f"capacity_factor must be > 0; got {capacity_factor}")
    return min(n_tokens, math.ceil(k * n_tokens * capacity_factor / n_experts))


def capacity_positions(indices, n_experts):  # Python loop by choice rank
    t, k = indices.shape
    counter = [0] * n_experts
    positions = torch.zeros(t, k, dtype=torch.long)
    for j in range(k):
        for tok in range(t):
            e = int(indices[tok, j])
            positions[tok, j] = counter[e]
            counter[e] += 1
    return positions


def apply_capacity(weights, indices, capacity):
    keep = capacity_positions(indices, int(indices.max()) + 1) < capacity
    return weights * keep, keep


CORRECT: dict[str, list[Any]] = {
    "ex03_cv_squared": [cv_squared],
    "ex03_importance_loss": [importance_loss],
    "ex03_load_loss": [load_loss],
    "ex03_switch_aux_loss": [switch_aux_loss],
    "ex03_router_z_loss": [router_z_loss],
    "ex03_expert_capacity": [expert_capacity],
    "ex03_capacity_positions": [capacity_positions],
    "ex03_apply_capacity": [apply_capacity],
}


def test_every_graded_exercise_has_a_correct_implementation():
    assert sorted(CORRECT) == GRADED


@pytest.mark.parametrize("grade_id", GRADED)
def test_correct_implementation_passes_silently(grade_id, capsys):
    probe_data.passes_silently(grade_id, CORRECT[grade_id], capsys)


# ========================================================================================
# Planted mistakes, each with the distinctive part of its message.


def _cv_sample(v):
    return v.var() / (v.mean() ** 2 + 1e-10) if v.numel() > 1 else v.sum() * 0


def _cv_std(v):
    return v.std(correction=0) / (v.mean() + 1e-10) if v.numel() > 1 else v.sum() * 0


def _cv_no_eps(v):
    return v.var(correction=0) / v.mean() ** 2


def _cv_item(v):
    return torch.tensor(float(cv_squared(v)))


def _cv_float(v):
    return float(cv_squared(v))


def _switch_times_k(router_probs, indices):
    return switch_aux_loss(router_probs, indices) * indices.shape[1]


def _switch_hf(router_probs, indices):  # Hugging Face Mixtral: counts / T
    e = router_probs.shape[1]
    f = F.one_hot(indices, e).sum(dim=(0, 1)) / indices.shape[0]
    return e * (f * router_probs.mean(0)).sum()


def _switch_no_e(router_probs, indices):
    return switch_aux_loss(router_probs, indices) / router_probs.shape[1]


def _switch_prob_f(router_probs, indices):
    p = router_probs.mean(0)
    return router_probs.shape[1] * (p * p).sum()


def _switch_detached(router_probs, indices):
    return switch_aux_loss(router_probs.detach(), indices)


def _z_naive(logits):
    return torch.log(torch.exp(logits).sum(-1)).pow(2).mean()


def _positions_token_order(indices, n_experts):
    t, k = indices.shape
    counter = [0] * n_experts
    positions = torch.zeros(t, k, dtype=torch.long)
    for tok in range(t):
        for j in range(k):
            e = int(indices[tok, j])
            positions[tok, j] = counter[e]
            counter[e] += 1
    return positions


def _positions_per_rank(indices, n_experts):
    hot = F.one_hot(indices, n_experts)
    return ((hot.cumsum(0) - 1) * hot).sum(-1)


def _apply_renormalised(weights, indices, capacity):
    w, keep = apply_capacity(weights, indices, capacity)
    return w / w.sum(-1, keepdim=True).clamp_min(1e-9), keep


def _apply_token_order(weights, indices, capacity):
    keep = _positions_token_order(indices, int(indices.max()) + 1) < capacity
    return weights * keep, keep


def _apply_off_by_one(weights, indices, capacity):
    keep = capacity_positions(indices, int(indices.max()) + 1) <= capacity
    return weights * keep, keep


def _apply_in_place(weights, indices, capacity):
    keep = capacity_positions(indices, int(indices.max()) + 1) < capacity
    weights[~keep] = 0.0
    return weights, keep


def _apply_float_keep(weights, indices, capacity):
    w, keep = apply_capacity(weights, indices, capacity)
    return w, keep.float()


def _apply_not_zeroed(weights, indices, capacity):
    _, keep = apply_capacity(weights, indices, capacity)
    return weights.clone(), keep


MISTAKES: list[tuple[str, Any, str]] = [
    ("ex03_cv_squared", _cv_sample, "sample (unbiased, n-1) variance"),
    ("ex03_cv_squared", _cv_std, "standard deviation"),
    ("ex03_cv_squared", _cv_no_eps, "1e-10"),
    ("ex03_cv_squared", _cv_item, "not differentiable"),
    ("ex03_cv_squared", _cv_float, "not a Python number"),
    ("ex03_importance_loss", lambda g, w_importance=0.01: cv_squared(g.sum(0)),
     "without the weight"),
    ("ex03_importance_loss", lambda g, w_importance=0.01: w_importance * cv_squared(g.sum(1)),
     "over experts (dim=1)"),
    ("ex03_importance_loss", lambda g, w_importance=0.01: w_importance * _cv_sample(g.sum(0)),
     "sample (unbiased, n-1) variance"),
    ("ex03_importance_loss", lambda g, w_importance=0.01: 0.01 * cv_squared(g.sum(0)),
     "used w_importance=0.01"),
    ("ex03_load_loss", lambda c, n, s, k, w_load=0.01: w_load * cv_squared(
        (0.5 * (1 + torch.erf((c - n.topk(k, -1).values[:, -1:]) / s / SQRT2))).sum(0)),
     "*including* i"),
    ("ex03_load_loss", lambda c, n, s, k, w_load=0.01: load_loss(c, n, s, k, 1.0),
     "ignores the weight"),
    ("ex03_load_loss", lambda c, n, s, k, w_load=0.01: load_loss(n, n, s, k, w_load),
     "noisy logit of i"),
    ("ex03_switch_aux_loss", _switch_times_k, "K = 2 times too large"),
    ("ex03_switch_aux_loss", _switch_hf, "K = 2 times too large"),
    ("ex03_switch_aux_loss", _switch_no_e, "lacks the factor E"),
    ("ex03_switch_aux_loss", _switch_prob_f, "mean probability"),
    ("ex03_switch_aux_loss", _switch_detached, "not differentiable"),
    ("ex03_router_z_loss", lambda lg: torch.logsumexp(lg, -1).mean(), "not squared"),
    ("ex03_router_z_loss", lambda lg: torch.logsumexp(lg, -1).pow(2).sum(), "sums over tokens"),
    ("ex03_router_z_loss", _z_naive, "exp overflows"),
    ("ex03_expert_capacity", lambda t, e, cf, k=1: min(t, math.floor(k * t * cf / e)),
     "rounded down"),
    ("ex03_expert_capacity", lambda t, e, cf, k=1: math.ceil(k * t * cf / e), "can't exceed"),
    ("ex03_expert_capacity", lambda t, e, cf, k=1: min(t, math.ceil(t * cf / e)), "ignored k"),
    ("ex03_expert_capacity", lambda t, e, cf, k=1: float(expert_capacity(t, e, cf, k)),
     "must be an int"),
    ("ex03_expert_capacity", lambda t, e, cf, k=1: min(t, math.ceil(k * t * cf / e)),
     "instead of raising ValueError"),
    ("ex03_capacity_positions", _positions_token_order, "token by token"),
    ("ex03_capacity_positions", _positions_per_rank, "restart at 0"),
    ("ex03_capacity_positions", lambda i, e: capacity_positions(i, e) + 1, "count from 1"),
    ("ex03_apply_capacity", _apply_renormalised, "renormalised the kept weights"),
    ("ex03_apply_capacity", _apply_token_order, "token by token"),
    ("ex03_apply_capacity", _apply_off_by_one, "keeps slot == capacity"),
    ("ex03_apply_capacity", _apply_in_place, "in place"),
    ("ex03_apply_capacity", _apply_float_keep, "a boolean tensor"),
    ("ex03_apply_capacity", _apply_not_zeroed, "keep their weight"),
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
    ("ex03_cv_squared", lambda v: v, "0-dim scalar tensor"),
    ("ex03_importance_loss", lambda g, w_importance=0.01: g.sum(0), "0-dim scalar tensor"),
    ("ex03_load_loss", lambda c, n, s, k, w_load=0.01: c, "0-dim scalar tensor"),
    ("ex03_switch_aux_loss", lambda p, i: p.mean(0, keepdim=True).sum(-1), "shape (1,)"),
    ("ex03_router_z_loss", lambda lg: "zero", "a Python str"),
    ("ex03_expert_capacity", lambda *a, **k: None, "must be an int"),
    ("ex03_capacity_positions", lambda i, e: i.float(), "integer (int64) tensor"),
    ("ex03_apply_capacity", lambda w, i, c: w, "must return a tuple (weights, keep)"),
]


ALIASES = {  # the reference of each exercise, captured at import
    "ex03_cv_squared": _alias_cv_squared,
    "ex03_importance_loss": _alias_importance_loss,
    "ex03_load_loss": _alias_load_loss,
    "ex03_switch_aux_loss": _alias_switch_aux_loss,
    "ex03_router_z_loss": _alias_router_z_loss,
    "ex03_expert_capacity": _alias_expert_capacity,
    "ex03_capacity_positions": _alias_capacity_positions,
    "ex03_apply_capacity": _alias_apply_capacity,
}


# ========================================================================================
# Inputs: the decisions each probe's answer depends on are far from ties.

def order_margins(grade_id: str, inputs: dict) -> list[float]:
    """The gaps every order-dependent decision of the probe rests on (independent oracle)."""
    if grade_id == "ex03_load_loss":
        return [min_gap(inputs["noisy_logits"], dim=-1)]
    if "logits" in inputs and (grade_id != "ex03_router_z_loss" or "indices" in inputs):
        return [min_gap(inputs["logits"], dim=-1)]
    return []


def test_order_dependent_probes_are_covered_by_the_tie_check():
    covered = {gid for gid in GRADED for probe in EXERCISES[gid].visible + EXERCISES[gid].hidden
               if order_margins(gid, probe.inputs())}
    assert {"ex03_load_loss", "ex03_switch_aux_loss", "ex03_capacity_positions",
            "ex03_apply_capacity"} <= covered
