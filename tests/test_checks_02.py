"""The teaching checks of notebook 02 (top-k routing) must be able to fail, and fail
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
from probe_data import fails

from moe_course.gating import noisy_logits as _alias_noisy_logits
from moe_course.gating import top_k_gating as _alias_top_k_gating
from moe_course.grading import EXERCISES, CheckFailure, judge_probe, run_probe
from moe_course.grading.inputs import min_gap
from moe_course.routing import moe_flops as _alias_moe_flops
from moe_course.routing import sparse_moe as _alias_sparse_moe

GRADED = sorted(g for g, ex in EXERCISES.items() if g.startswith("ex02_") and ex.kind != "written")


# ========================================================================================
# Correct implementations, each written differently from the reference.


def top_k_gating(logits, k):  # argsort + renormalised full softmax
    if not 1 <= k <= logits.shape[1]:
        raise ValueError(f"k must satisfy 1 <= k <= E; got {k}")
    order = torch.argsort(logits, dim=-1, descending=True)[:, :k]
    probs = torch.softmax(logits, dim=-1).gather(1, order)
    return probs / probs.sum(dim=-1, keepdim=True), order


def noisy_logits(x, w_gate, w_noise, noise=None):  # einsum and log1p(exp)
    clean = torch.einsum("td,de->te", x, w_gate)
    if noise is None:
        return clean
    return clean + noise * torch.log1p(torch.exp(x @ w_noise))


def sparse_moe(x, experts, weights, indices):  # sort assignments by expert, then split
    t, k = indices.shape
    flat = indices.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=len(experts)).tolist()
    y = torch.zeros_like(x)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        sel = order[start : start + n]
        start += n
        tokens = sel // k
        out = experts[e](x[tokens]) * weights.reshape(-1)[sel, None]
        y = y.index_add(0, tokens, out)
    return y


def moe_flops(n_tokens, d_model, d_hidden, n_experts, k):
    return 2 * n_tokens * n_experts * d_model + 4 * k * n_tokens * d_model * d_hidden


CORRECT: dict[str, list[Any]] = {
    "ex02_top_k_gating": [top_k_gating],
    "ex02_noisy_logits": [noisy_logits],
    "ex02_sparse_moe": [sparse_moe],
    "ex02_moe_flops": [moe_flops],
}


def test_every_graded_exercise_has_a_correct_implementation():
    assert sorted(CORRECT) == GRADED


@pytest.mark.parametrize("grade_id", GRADED)
def test_correct_implementation_passes_silently(grade_id, capsys):
    probe_data.passes_silently(grade_id, CORRECT[grade_id], capsys)


# ========================================================================================
# Planted mistakes, each with the distinctive part of its message.


def _topk_full_softmax(logits, k):
    idx = logits.topk(k, dim=-1).indices
    return torch.softmax(logits, dim=-1).gather(1, idx), idx


def _topk_ascending(logits, k):
    w, i = top_k_gating(logits, k)
    return w.flip(-1), i.flip(-1)


def _topk_unchecked(logits, k):
    top, idx = logits.topk(k, dim=-1)
    return torch.softmax(top, dim=-1), idx


def _topk_smallest(logits, k):
    if not 1 <= k <= logits.shape[1]:
        raise ValueError("k")
    top, idx = logits.topk(k, dim=-1, largest=False)
    return torch.softmax(top, dim=-1), idx


def _topk_detached(logits, k):
    w, i = top_k_gating(logits, k)
    return w.detach(), i


def _topk_float_indices(logits, k):
    w, i = top_k_gating(logits, k)
    return w, i.float()


def _topk_raw(logits, k):
    if not 1 <= k <= logits.shape[1]:
        raise ValueError("k")
    return logits.topk(k, dim=-1)


def _noisy_exp(x, w_gate, w_noise, noise=None):
    return x @ w_gate if noise is None else x @ w_gate + noise * torch.exp(x @ w_noise)


def _noisy_always(x, w_gate, w_noise, noise=None):
    if noise is None:
        noise = torch.randn(x.shape[0], w_gate.shape[1])
    return x @ w_gate + noise * F.softplus(x @ w_noise)


def _noisy_own_sample(x, w_gate, w_noise, noise=None):
    if noise is None:
        return x @ w_gate
    return x @ w_gate + torch.randn_like(noise) * F.softplus(x @ w_noise)


def _noisy_no_softplus(x, w_gate, w_noise, noise=None):
    return x @ w_gate if noise is None else x @ w_gate + noise * (x @ w_noise)


def _sparse_dense(x, experts, weights, indices):
    y = torch.zeros_like(x)
    for e, expert in enumerate(experts):
        out = expert(x)
        y = y + (weights * (indices == e)).sum(-1, keepdim=True) * out
    return y


def _sparse_per_token(x, experts, weights, indices):
    rows = []
    for t in range(x.shape[0]):
        rows.append(sum(weights[t, j] * experts[int(indices[t, j])](x[t : t + 1])[0]
                        for j in range(indices.shape[1])))
    return torch.stack(rows)


def _sparse_per_slot(x, experts, weights, indices):
    y = torch.zeros_like(x)
    for e, expert in enumerate(experts):
        for j in range(indices.shape[1]):
            tok = torch.nonzero(indices[:, j] == e).squeeze(1)
            if len(tok):
                y = y.index_add(0, tok, weights[tok, j, None] * expert(x[tok]))
    return y


def _sparse_idle_called(x, experts, weights, indices):
    y = torch.zeros_like(x)
    for e, expert in enumerate(experts):
        tok, slot = torch.nonzero(indices == e, as_tuple=True)
        out = expert(x[tok])
        y = y.index_add(0, tok, weights[tok, slot, None] * out)
    return y


def _sparse_unweighted(x, experts, weights, indices):
    return sparse_moe(x, experts, torch.ones_like(weights), indices)


def _sparse_weighted_input(x, experts, weights, indices):
    y = torch.zeros_like(x)
    for e, expert in enumerate(experts):
        tok, slot = torch.nonzero(indices == e, as_tuple=True)
        if len(tok):
            y = y.index_add(0, tok, expert(weights[tok, slot, None] * x[tok]))
    return y


def _sparse_first_choice(x, experts, weights, indices):
    return sparse_moe(x, experts, weights[:, :1], indices[:, :1])


MISTAKES: list[tuple[str, Any, str]] = [
    ("ex02_top_k_gating", _topk_full_softmax, "softmax over all E experts"),
    ("ex02_top_k_gating", _topk_ascending, "ascending order"),
    ("ex02_top_k_gating", _topk_unchecked, "instead of raising ValueError"),
    ("ex02_top_k_gating", _topk_smallest, "*smallest*"),
    ("ex02_top_k_gating", _topk_detached, "not differentiable"),
    ("ex02_top_k_gating", _topk_float_indices, "integer (int64) tensor"),
    ("ex02_top_k_gating", _topk_raw, "raw top-k logits"),
    ("ex02_noisy_logits", _noisy_exp, "exp(x @ w_noise): use softplus"),
    ("ex02_noisy_logits", _noisy_always, "add no noise when noise is None"),
    ("ex02_noisy_logits", _noisy_own_sample, "different results on identical inputs"),
    ("ex02_noisy_logits", _noisy_no_softplus, "wrap it in softplus"),
    ("ex02_sparse_moe", _sparse_dense, "which are not routed to it"),
    ("ex02_sparse_moe", _sparse_per_token, "(one call per token?)"),
    ("ex02_sparse_moe", _sparse_per_slot, "call each expert once"),
    ("ex02_sparse_moe", _sparse_idle_called, "has no tokens routed to it"),
    ("ex02_sparse_moe", _sparse_unweighted, "not weighted by their gates"),
    ("ex02_sparse_moe", _sparse_weighted_input, "not rows of x"),
    ("ex02_sparse_moe", _sparse_first_choice, "first choice"),
    ("ex02_moe_flops", lambda t, d, h, e, k: t * d * e + 2 * t * k * d * h,
     "multiply-add as 1 FLOP"),
    ("ex02_moe_flops", lambda t, d, h, e, k: 4 * t * k * d * h, "left out the router"),
    ("ex02_moe_flops", lambda t, d, h, e, k: 2 * t * d * e + 4 * t * e * d * h,
     "all E experts"),
    ("ex02_moe_flops", lambda t, d, h, e, k: float(moe_flops(t, d, h, e, k)), "must be an int"),
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
    ("ex02_top_k_gating", lambda lg, k: torch.softmax(lg, -1), "must return a tuple"),
    ("ex02_top_k_gating", lambda lg, k: (torch.softmax(lg, -1), lg.argsort(-1)), "shape (6, 2)"),
    ("ex02_top_k_gating", lambda lg, k: (lg.numpy(), lg.numpy()), "numpy.ndarray"),
    ("ex02_noisy_logits", lambda x, wg, wn, noise=None: (x @ wg)[0], "shape (5, 3)"),
    ("ex02_sparse_moe", lambda x, ex, w, i: x[:, :2], "shape (7, 4)"),
    ("ex02_moe_flops", lambda *a: torch.tensor(moe_flops(*a)), "must be an int"),
]


def test_a_crash_is_reported_in_one_line():
    def broken(logits, k):
        return logits.topk(k, dim=2)

    message = fails("ex02_top_k_gating", broken, hidden=False)
    assert "your top_k_gating raised IndexError: " in message
    assert "\n" not in message


def test_a_mistakes_message_is_the_same_after_the_round_trip():
    exercise = EXERCISES["ex02_sparse_moe"]
    probe = exercise.visible[0]
    inputs = probe.inputs()
    outputs = run_probe(exercise, probe, _sparse_per_token, inputs)
    loaded = probe_data.round_trip(outputs)
    with pytest.raises(CheckFailure, match=r"one call per token\?"):
        judge_probe(exercise, probe, inputs, loaded)


ALIASES = {  # the reference of each exercise, captured at import
    "ex02_top_k_gating": _alias_top_k_gating,
    "ex02_noisy_logits": _alias_noisy_logits,
    "ex02_sparse_moe": _alias_sparse_moe,
    "ex02_moe_flops": _alias_moe_flops,
}


# ========================================================================================
# Inputs: the decisions each probe's answer depends on are far from ties.

def order_margins(grade_id: str, inputs: dict) -> list[float]:
    """The gaps every order-dependent decision of the probe rests on (independent oracle)."""
    if "logits" in inputs:  # top-k: the k-th and (k+1)-th logits of every token
        return [min_gap(inputs["logits"], dim=-1)]
    return []


def test_order_dependent_probes_are_covered_by_the_tie_check():
    covered = {gid for gid in GRADED for probe in EXERCISES[gid].visible + EXERCISES[gid].hidden
               if order_margins(gid, probe.inputs())}
    assert {"ex02_top_k_gating"} <= covered
