"""The teaching checks of notebook 07 (modern mixtures) must be able to fail, and fail
helpfully.

Correct implementations written differently from the reference pass the visible and hidden
checks silently; each planted mistake fails with its own message (never the generic
fallback); wrong return types fail with a message. The checks every exercise shares (inputs
deterministic, plain and tie-free, outputs across the process boundary, stubs, calling the
reference) run in tests/test_checks_common.py from this module's `CORRECT`, `ALIASES`,
`order_margins`, and the tables `MISTAKES` (planted mistakes and the words their message
must hold) and `WRONG_RETURNS`.
"""

from __future__ import annotations

from typing import Any

import probe_data
import pytest
import torch
import torch.nn.functional as F
from probe_data import fails

import moe_course
from moe_course.grading import EXERCISES, CheckFailure, check
from moe_course.grading.inputs import MARGIN
from moe_course.modern import aux_free_bias_update as _alias_bias_update
from moe_course.modern import biased_top_k as _alias_biased
from moe_course.modern import shared_expert_moe as _alias_shared
from moe_course.modern import soft_moe as _alias_soft
from moe_course.modern import sort_by_expert as _alias_sort

GRADED = sorted(gid for gid, ex in EXERCISES.items()
                if ex.assignment == "07_modern_moe" and ex.kind != "written")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ========================================================================================
# Correct implementations, each written differently from the reference.


def shared_masks(x, shared_experts, routed_experts, w_gate, k):  # masks, no sparse_moe
    probs = torch.exp(x @ w_gate - torch.logsumexp(x @ w_gate, dim=-1, keepdim=True))
    order = torch.argsort(probs, dim=-1, descending=True)[:, :k]
    weights = probs.gather(1, order)
    y = torch.zeros_like(x)
    if len(shared_experts):
        y = y + torch.stack([f(x) for f in shared_experts]).sum(0)
    for e, expert in enumerate(routed_experts):
        hit = order == e
        rows = hit.any(-1).nonzero().flatten()
        if rows.numel():
            y = y.index_add(0, rows, (weights * hit)[rows].sum(-1, keepdim=True)
                            * expert(x[rows]))
    return y, weights, order


def shared_with_other_references(x, shared_experts, routed_experts, w_gate, k):
    probs = moe_course.softmax_gate(x, w_gate)  # notebook 01's reference: fine to use
    weights, indices = probs.topk(k, dim=-1)
    y = moe_course.sparse_moe(x, routed_experts, weights, indices)  # notebook 02's: fine
    for f in shared_experts:
        y = y + f(x)
    return (y, weights, indices)


def biased_sort(scores, bias, k):  # argsort and a mask-free gather
    order = torch.argsort(scores + bias, dim=-1, descending=True)[:, :k]
    chosen = torch.gather(scores, 1, order)
    return chosen / chosen.sum(-1, keepdim=True), order


def biased_loop(scores, bias, k):  # one token at a time, plain Python choice
    weights, indices = [], []
    for row in scores:
        best = sorted(range(row.shape[0]), key=lambda e: -float(row[e] + bias[e]))[:k]
        chosen = row[best]
        weights.append(chosen / chosen.sum())
        indices.append(torch.tensor(best))
    return torch.stack(weights), torch.stack(indices)


def biased_masked(scores, bias, k):  # a (T, E) mask, then normalise the masked scores
    idx = (scores + bias.detach()).topk(k, dim=-1).indices
    mask = torch.zeros_like(scores).scatter(1, idx, 1.0)
    gates = scores * mask
    gates = gates / gates.sum(-1, keepdim=True)
    return gates.gather(1, idx), idx


def bias_loop(bias, expert_counts, gamma):
    mean = float(expert_counts.double().mean())
    steps = [gamma if float(c) < mean else -gamma if float(c) > mean else 0.0
             for c in expert_counts]
    return bias + torch.tensor(steps, dtype=bias.dtype)


def bias_where(bias, expert_counts, gamma):
    c = expert_counts.double()
    up = (c < c.mean()).to(bias.dtype)
    down = (c > c.mean()).to(bias.dtype)
    return bias + gamma * (up - down)


def soft_einsum(x, experts, phi, slots_per_expert):  # explicit exp, einsum
    logits = torch.einsum("td,ds->ts", x, phi)
    z = torch.exp(logits - logits.max())
    dispatch = z / z.sum(0, keepdim=True)
    combine = z / z.sum(1, keepdim=True)
    slots = torch.einsum("ts,td->sd", dispatch, x)
    c = slots_per_expert
    outs = torch.cat([ex(slots[e * c : e * c + c]) for e, ex in enumerate(experts)])
    return torch.einsum("ts,sd->td", combine, outs), dispatch, combine


def soft_reshape(x, experts, phi, slots_per_expert):  # (E, C, D) view of the slots
    logits = x @ phi
    dispatch, combine = F.softmax(logits, dim=0), F.softmax(logits, dim=-1)
    slots = (dispatch.T @ x).reshape(len(experts), slots_per_expert, -1)
    outs = torch.stack([ex(s) for ex, s in zip(experts, slots, strict=True)]).flatten(0, 1)
    return [combine @ outs, dispatch, combine]


def sort_loop(indices, n_experts):
    flat = indices.reshape(-1).tolist()
    order = [i for e in range(n_experts) for i, v in enumerate(flat) if v == e]
    return torch.tensor(order), torch.tensor([flat.count(e) for e in range(n_experts)])


def sort_keys(indices, n_experts):  # unique keys: any sort is then stable
    flat = indices.reshape(-1)
    n = flat.numel()
    order = torch.argsort(flat * n + torch.arange(n))
    return order, F.one_hot(flat, n_experts).sum(0)


CORRECT: dict[str, list[Any]] = {
    "ex07_shared_expert_moe": [shared_masks, shared_with_other_references],
    "ex07_biased_top_k": [biased_sort, biased_loop, biased_masked],
    "ex07_aux_free_bias_update": [bias_loop, bias_where],
    "ex07_soft_moe": [soft_einsum, soft_reshape],
    "ex07_sort_by_expert": [sort_loop, sort_keys],
}


def test_every_graded_exercise_has_a_correct_implementation():
    assert GRADED == sorted(CORRECT)
    assert len(GRADED) == 5


@pytest.mark.parametrize("grade_id", sorted(CORRECT))
def test_correct_implementation_passes_silently(grade_id, capsys):
    probe_data.passes_silently(grade_id, CORRECT[grade_id], capsys)


# ========================================================================================
# Planted mistakes.


def _shared_renormalised(x, shared_experts, routed_experts, w_gate, k):
    weights, indices = moe_course.top_k_gating(x @ w_gate, k)  # notebook 02's gate
    y = moe_course.sparse_moe(x, routed_experts, weights, indices)
    return y + sum(f(x) for f in shared_experts), weights, indices


def _shared_missing(x, shared_experts, routed_experts, w_gate, k):
    return shared_with_other_references(x, [], routed_experts, w_gate, k)


def _shared_averaged(x, shared_experts, routed_experts, w_gate, k):
    y, w, i = shared_with_other_references(x, [], routed_experts, w_gate, k)
    if len(shared_experts):
        y = y + torch.stack([f(x) for f in shared_experts]).mean(0)
    return y, w, i


def _shared_dense(x, shared_experts, routed_experts, w_gate, k):
    probs = torch.softmax(x @ w_gate, -1)
    weights, indices = probs.topk(k, -1)
    gates = torch.zeros_like(probs).scatter(1, indices, weights)
    y = sum(gates[:, e : e + 1] * f(x) for e, f in enumerate(routed_experts))
    return y + sum(f(x) for f in shared_experts), weights, indices


def _shared_logit_weights(x, shared_experts, routed_experts, w_gate, k):
    weights, indices = (x @ w_gate).topk(k, -1)
    y = moe_course.sparse_moe(x, routed_experts, weights, indices)
    return y + sum(f(x) for f in shared_experts), weights, indices


def _shared_unweighted(x, shared_experts, routed_experts, w_gate, k):
    _, w, i = shared_with_other_references(x, shared_experts, routed_experts, w_gate, k)
    y = moe_course.sparse_moe(x, routed_experts, torch.ones_like(w), i)
    return y + sum(f(x) for f in shared_experts), w, i


def _shared_ascending(x, shared_experts, routed_experts, w_gate, k):
    y, w, i = shared_with_other_references(x, shared_experts, routed_experts, w_gate, k)
    return y, w.flip(-1), i.flip(-1)


def _shared_per_token(x, shared_experts, routed_experts, w_gate, k):
    y, w, i = shared_with_other_references(x, [], routed_experts, w_gate, k)
    for f in shared_experts:
        y = y + torch.cat([f(x[t : t + 1]) for t in range(x.shape[0])])
    return y, w, i


def _shared_first_only(x, shared_experts, routed_experts, w_gate, k):
    _, w, i = shared_with_other_references(x, shared_experts, routed_experts, w_gate, k)
    y = moe_course.sparse_moe(x, routed_experts, w[:, :1], i[:, :1])
    return y + sum(f(x) for f in shared_experts), w, i


def _shared_mutates(x, shared_experts, routed_experts, w_gate, k):
    w_gate /= 2
    return shared_with_other_references(x, shared_experts, routed_experts, w_gate, k)


def _biased_bias_in_weights(scores, bias, k):
    idx = (scores + bias).topk(k, dim=-1).indices
    chosen = (scores + bias).gather(1, idx)
    return chosen / chosen.sum(-1, keepdim=True), idx


def _biased_no_bias_choice(scores, bias, k):
    idx = scores.topk(k, dim=-1).indices
    chosen = scores.gather(1, idx)
    return chosen / chosen.sum(-1, keepdim=True), idx


def _biased_unnormalised(scores, bias, k):
    idx = (scores + bias).topk(k, dim=-1).indices
    return scores.gather(1, idx), idx


def _biased_softmax(scores, bias, k):
    idx = (scores + bias).topk(k, dim=-1).indices
    return torch.softmax(scores.gather(1, idx), dim=-1), idx


def _biased_over_all(scores, bias, k):
    idx = (scores + bias).topk(k, dim=-1).indices
    return scores.gather(1, idx) / scores.sum(-1, keepdim=True), idx


def _biased_ascending(scores, bias, k):
    w, idx = biased_sort(scores, bias, k)
    return w.flip(-1), idx.flip(-1)


def _biased_by_id(scores, bias, k):
    idx = (scores + bias).topk(k, dim=-1).indices.sort(-1).values
    chosen = scores.gather(1, idx)
    return chosen / chosen.sum(-1, keepdim=True), idx


def _biased_subtracted(scores, bias, k):
    idx = (scores - bias).topk(k, dim=-1).indices
    chosen = scores.gather(1, idx)
    return chosen / chosen.sum(-1, keepdim=True), idx


def _biased_detached(scores, bias, k):
    w, idx = biased_sort(scores, bias, k)
    return w.detach(), idx


def _biased_grad_into_bias(scores, bias, k):  # right values, but the bias is in the graph
    w, idx = biased_sort(scores, bias, k)
    b = bias.gather(0, idx.reshape(-1)).reshape(idx.shape)
    return w + b - b.detach(), idx


def _biased_in_place(scores, bias, k):  # adds the bias into the caller's scores
    biased = scores.add_(bias)
    idx = biased.topk(k, dim=-1).indices
    chosen = (biased - bias).gather(1, idx)
    return chosen / chosen.sum(-1, keepdim=True), idx


def _bias_flipped(bias, expert_counts, gamma):
    c = expert_counts.double()
    return bias - gamma * torch.sign(c.mean() - c).to(bias.dtype)


def _bias_magnitude(bias, expert_counts, gamma):
    c = expert_counts.double()
    return bias + (gamma * (c.mean() - c)).to(bias.dtype)


def _bias_delta(bias, expert_counts, gamma):
    c = expert_counts.double()
    return gamma * torch.sign(c.mean() - c).to(bias.dtype)


def _bias_ties_up(bias, expert_counts, gamma):
    c = expert_counts.double()
    return bias + torch.where(c > c.mean(), -gamma, gamma).to(bias.dtype)


def _bias_ties_down(bias, expert_counts, gamma):
    c = expert_counts.double()
    return bias + torch.where(c < c.mean(), gamma, -gamma).to(bias.dtype)


def _bias_total(bias, expert_counts, gamma):
    c = expert_counts.double()
    return bias + gamma * torch.sign(c.sum() - c).to(bias.dtype)


def _bias_in_place(bias, expert_counts, gamma):
    c = expert_counts.double()
    bias += gamma * torch.sign(c.mean() - c).to(bias.dtype)
    return bias


def _bias_integer(bias, expert_counts, gamma):
    return torch.sign(expert_counts.double().mean() - expert_counts).long()


def _soft_dispatch_over_slots(x, experts, phi, c):
    y, _, combine = soft_reshape(x, experts, phi, c)
    return y, torch.softmax(x @ phi, dim=1), combine


def _soft_combine_over_tokens(x, experts, phi, c):
    y, dispatch, _ = soft_reshape(x, experts, phi, c)
    return y, dispatch, torch.softmax(x @ phi, dim=0)


def _soft_combined_with_dispatch(x, experts, phi, c):
    _, dispatch, combine = soft_reshape(x, experts, phi, c)
    slots = dispatch.T @ x
    outs = torch.cat([ex(slots[e * c : e * c + c]) for e, ex in enumerate(experts)])
    return dispatch @ outs, dispatch, combine


def _soft_swapped(x, experts, phi, c):  # both axes swapped, dispatch reported correctly
    logits = x @ phi
    d, cb = torch.softmax(logits, 0), torch.softmax(logits, 1)
    slots = cb.T @ x
    outs = torch.cat([ex(slots[e * c : e * c + c]) for e, ex in enumerate(experts)])
    return d @ outs, d, cb


def _soft_interleaved(x, experts, phi, c):
    logits = x @ phi
    d, cb = torch.softmax(logits, 0), torch.softmax(logits, 1)
    slots = d.T @ x
    n = len(experts)
    outs = torch.empty_like(slots)
    for e, ex in enumerate(experts):
        outs[e::n] = ex(slots[e::n])
    return cb @ outs, d, cb


def _soft_on_tokens(x, experts, phi, c):
    logits = x @ phi
    d, cb = torch.softmax(logits, 0), torch.softmax(logits, 1)
    outs = torch.cat([d[:, e * c : e * c + c].T @ ex(x) for e, ex in enumerate(experts)])
    return cb @ outs, d, cb


def _soft_per_slot(x, experts, phi, c):
    logits = x @ phi
    d, cb = torch.softmax(logits, 0), torch.softmax(logits, 1)
    slots = d.T @ x
    outs = torch.cat([experts[j // c](slots[j : j + 1]) for j in range(slots.shape[0])])
    return cb @ outs, d, cb


def _soft_detached(x, experts, phi, c):
    y, d, cb = soft_reshape(x, experts, phi.detach(), c)
    return y, d, cb


def _soft_only_y(x, experts, phi, c):
    return soft_reshape(x, experts, phi, c)[0]


def _soft_transposed(x, experts, phi, c):
    y, d, cb = soft_reshape(x, experts, phi, c)
    return y, d.T, cb


def _sort_unstable(indices, n_experts):  # ties in reverse order
    flat = indices.reshape(-1)
    n = flat.numel()
    order = torch.argsort(flat * n + (n - 1 - torch.arange(n)))
    return order, torch.bincount(flat, minlength=n_experts)


def _sort_no_minlength(indices, n_experts):
    flat = indices.reshape(-1)
    return torch.sort(flat, stable=True).indices, torch.bincount(flat)


def _sort_unique_counts(indices, n_experts):
    flat = indices.reshape(-1)
    return torch.sort(flat, stable=True).indices, torch.unique(flat, return_counts=True)[1]


def _sort_values(indices, n_experts):
    flat = indices.reshape(-1)
    return torch.sort(flat, stable=True).values, torch.bincount(flat, minlength=n_experts)


def _sort_inverse(indices, n_experts):
    order, counts = sort_keys(indices, n_experts)
    return torch.argsort(order), counts


def _sort_tokens(indices, n_experts):
    order, counts = sort_keys(indices, n_experts)
    return order // indices.shape[1], counts


def _sort_choice_major(indices, n_experts):
    flat = indices.t().reshape(-1)
    return torch.sort(flat, stable=True).indices, torch.bincount(flat, minlength=n_experts)


def _sort_descending(indices, n_experts):
    flat = indices.reshape(-1)
    order = torch.sort(flat, stable=True, descending=True).indices
    return order, torch.bincount(flat, minlength=n_experts)


def _sort_first_choices(indices, n_experts):
    order, _ = sort_keys(indices, n_experts)
    return order, torch.bincount(indices[:, 0], minlength=n_experts)


def _sort_float(indices, n_experts):
    order, counts = sort_keys(indices, n_experts)
    return order.float(), counts


MISTAKES: list[tuple[str, Any, str]] = [
    ("ex07_shared_expert_moe", _shared_renormalised, "without renormalising"),
    ("ex07_shared_expert_moe", _shared_missing, "leaves out the shared experts"),
    ("ex07_shared_expert_moe", _shared_averaged, "averaged the shared experts"),
    ("ex07_shared_expert_moe", _shared_dense, "dense mixture"),
    ("ex07_shared_expert_moe", _shared_logit_weights, "raw logits"),
    ("ex07_shared_expert_moe", _shared_unweighted, "not weighted by their gates"),
    ("ex07_shared_expert_moe", _shared_ascending, "ascending order"),
    ("ex07_shared_expert_moe", _shared_per_token, "shared expert 0 was called 8 times"),
    ("ex07_shared_expert_moe", _shared_first_only, "only each token's best routed expert"),
    ("ex07_shared_expert_moe", _shared_mutates, "changed its argument w_gate in place"),
    ("ex07_biased_top_k", _biased_bias_in_weights, "your weights include the bias"),
    ("ex07_biased_top_k", _biased_no_bias_choice, "you chose the experts by the unbiased"),
    ("ex07_biased_top_k", _biased_unnormalised, "divide the chosen scores by their sum"),
    ("ex07_biased_top_k", _biased_softmax, "you took a softmax of the chosen scores"),
    ("ex07_biased_top_k", _biased_over_all, "you normalised over all E experts"),
    ("ex07_biased_top_k", _biased_ascending, "ascending order"),
    ("ex07_biased_top_k", _biased_by_id, "sorted by expert id"),
    ("ex07_biased_top_k", _biased_subtracted, "you subtracted the bias"),
    ("ex07_biased_top_k", _biased_detached, "not differentiable with respect to the scores"),
    ("ex07_biased_top_k", _biased_grad_into_bias, "a gradient reaches the bias"),
    ("ex07_biased_top_k", _biased_in_place, "changed its argument scores in place"),
    ("ex07_aux_free_bias_update", _bias_flipped, "your sign is flipped"),
    ("ex07_aux_free_bias_update", _bias_magnitude, "the load error itself"),
    ("ex07_aux_free_bias_update", _bias_delta, "you returned only the change"),
    ("ex07_aux_free_bias_update", _bias_ties_up, "yours raised it"),
    ("ex07_aux_free_bias_update", _bias_ties_down, "yours lowered it"),
    ("ex07_aux_free_bias_update", _bias_total, "not the total"),
    ("ex07_aux_free_bias_update", _bias_in_place, "changed its argument bias in place"),
    ("ex07_aux_free_bias_update", _bias_integer, "floating-point"),
    ("ex07_soft_moe", _soft_dispatch_over_slots, "dispatch weights are a softmax over slots"),
    ("ex07_soft_moe", _soft_combine_over_tokens, "combine weights are a softmax over tokens"),
    ("ex07_soft_moe", _soft_combined_with_dispatch, "combined with the dispatch weights"),
    ("ex07_soft_moe", _soft_swapped, "you swapped dispatch and combine"),
    ("ex07_soft_moe", _soft_interleaved, "slot i went to expert i % E"),
    ("ex07_soft_moe", _soft_on_tokens, "called on the tokens x"),
    ("ex07_soft_moe", _soft_per_slot, "expert 0 was called 2 times"),
    ("ex07_soft_moe", _soft_detached, "not differentiable with respect to phi"),
    ("ex07_soft_moe", _soft_only_y, "must return a tuple (y, dispatch, combine)"),
    ("ex07_soft_moe", _soft_transposed, "transposed"),
    ("ex07_sort_by_expert", _sort_unstable, "not stably"),
    ("ex07_sort_by_expert", _sort_no_minlength, "minlength=n_experts"),
    ("ex07_sort_by_expert", _sort_unique_counts, "only the experts that were chosen"),
    ("ex07_sort_by_expert", _sort_values, "sorted expert ids, not the permutation"),
    ("ex07_sort_by_expert", _sort_inverse, "inverse permutation"),
    ("ex07_sort_by_expert", _sort_tokens, "holds token ids"),
    ("ex07_sort_by_expert", _sort_choice_major, "choice-major"),
    ("ex07_sort_by_expert", _sort_descending, "from the last expert to the first"),
    ("ex07_sort_by_expert", _sort_first_choices, "only the first choices"),
    ("ex07_sort_by_expert", _sort_float, "floating-point"),
]


def test_every_exercise_has_planted_mistakes():
    assert {g for g, _, _ in MISTAKES} == set(GRADED)


def test_the_stability_mistake_is_caught_by_the_visible_check():
    assert "not stably" in fails("ex07_sort_by_expert", _sort_unstable, hidden=False)


@pytest.mark.parametrize("impl", [_biased_bias_in_weights, _biased_no_bias_choice,
                                  _biased_unnormalised, _biased_softmax, _biased_detached,
                                  _biased_grad_into_bias, _biased_in_place])
def test_the_main_biased_top_k_mistakes_are_caught_by_the_visible_check(impl):
    fails("ex07_biased_top_k", impl, hidden=False)


def test_trajectory_probe_names_the_step():
    def late_bug(bias, expert_counts, gamma):  # right at first, flipped once biases move
        flip = -1.0 if bool((bias != 0).any()) and int(expert_counts.sum()) == 96 else 1.0
        c = expert_counts.double()
        return bias + flip * gamma * torch.sign(c.mean() - c).to(bias.dtype)

    message = fails("ex07_aux_free_bias_update", late_bug)
    assert "your bias after step 1" in message and "sign is flipped" in message


# ========================================================================================
# Calling the reference: directly, through an alias captured at import, or wrapped.

ALIASES = {"ex07_shared_expert_moe": _alias_shared, "ex07_biased_top_k": _alias_biased,
           "ex07_aux_free_bias_update": _alias_bias_update, "ex07_soft_moe": _alias_soft,
           "ex07_sort_by_expert": _alias_sort}


def test_references_work_again_after_a_tripped_check():
    with pytest.raises(CheckFailure, match="implement it yourself"):
        check("ex07_sort_by_expert", lambda i, e: _alias_sort(i, e))
    assert moe_course.sort_by_expert(torch.tensor([[1], [0]]), 2).order.tolist() == [1, 0]
    with pytest.raises(CheckFailure, match="implement it yourself"):
        check("ex07_biased_top_k", lambda s, b, k: _alias_biased(s, b, k))
    _, indices = moe_course.biased_top_k(torch.tensor([[0.9, 0.6, 0.3]]), torch.zeros(3), 2)
    assert indices.tolist() == [[0, 1]]


# ========================================================================================
# Stubs and wrong return types fail with a message, never a crash.


WRONG_RETURNS: list[tuple[str, Any, str]] = [
    ("ex07_shared_expert_moe", lambda x, s, r, w, k: x, "must return a tuple (y, weights"),
    ("ex07_shared_expert_moe", lambda x, s, r, w, k: (x, x, x), "shape (8, 2)"),
    ("ex07_biased_top_k", lambda s, b, k: None, "you returned None"),
    ("ex07_biased_top_k", lambda s, b, k: s, "must return a tuple (weights, indices)"),
    ("ex07_biased_top_k", lambda s, b, k: (s, s), "shape (6, 2)"),
    ("ex07_aux_free_bias_update", lambda b, c, g: None, "you returned None"),
    ("ex07_aux_free_bias_update", lambda b, c, g: b[:3], "shape (6,)"),
    ("ex07_soft_moe", lambda x, ex, p, c: (x, x, x), "shape (8, 4)"),
    ("ex07_sort_by_expert", lambda i, e: i, "must return a tuple (order, counts)"),
    ("ex07_sort_by_expert", lambda i, e: (i, torch.bincount(i.reshape(-1), minlength=e)),
     "shape (16,)"),
]


# ========================================================================================
# Inputs: deterministic, plain, tie-free; outputs: plain data across the process boundary.

def order_margins(grade_id: str, inputs: dict) -> list[float]:
    """Gaps at every top-k boundary the probe's answer depends on (independent oracle)."""
    if grade_id == "ex07_shared_expert_moe":
        probs = torch.softmax(inputs["x"] @ inputs["w_gate"], dim=-1)
        k = inputs["k"]
        top = probs.sort(dim=-1, descending=True).values[:, : k + 1]
        return [float(top.diff(dim=-1).abs().min())] if top.shape[1] > 1 else []
    if grade_id == "ex07_biased_top_k":  # the biased choice, and the unbiased order variants
        return [float(values.sort(dim=-1, descending=True).values.diff(dim=-1).abs().min())
                for values in (inputs["scores"] + inputs["bias"], inputs["scores"])]
    if "scores" in inputs:  # the bias trajectory: replay it with a loop
        bias, gaps = torch.zeros(inputs["scores"].shape[-1]), []
        for scores in inputs["scores"]:
            top = (scores + bias).sort(dim=-1, descending=True).values[:, :3]
            gaps.append(float(top.diff(dim=-1).abs().min()))
            counts = torch.bincount((scores + bias).topk(2, dim=-1).indices.reshape(-1),
                                    minlength=scores.shape[-1])
            bias = bias_loop(bias, counts, inputs["gamma"])
        return gaps
    return []


def test_order_dependent_probes_are_covered_by_the_tie_check():
    covered = {(gid, p.name) for gid in GRADED for p in EXERCISES[gid].visible
               + EXERCISES[gid].hidden if order_margins(gid, p.inputs())}
    assert {gid for gid, _ in covered} == {"ex07_shared_expert_moe", "ex07_biased_top_k",
                                           "ex07_aux_free_bias_update"}


def test_sort_probes_have_ties_and_idle_experts():
    for probe in EXERCISES["ex07_sort_by_expert"].visible + EXERCISES[
            "ex07_sort_by_expert"].hidden:
        inputs = probe.inputs()
        counts = torch.bincount(inputs["indices"].reshape(-1), minlength=inputs["n_experts"])
        assert int(counts.max()) >= 2  # stability is observable
        if inputs["n_experts"] > 1:
            assert int(counts.min()) == 0  # an idle expert must be counted as 0


def test_biased_probes_hold_sigmoid_affinities_and_a_bias_that_matters():
    exercise = EXERCISES["ex07_biased_top_k"]
    for probe in exercise.visible + exercise.hidden:
        inputs = probe.inputs()
        scores, bias, k = inputs["scores"], inputs["bias"], inputs["k"]
        assert bool((scores > 0).all()) and bool((scores < 1).all())  # sigmoid affinities
        assert min(order_margins("ex07_biased_top_k", inputs)) > MARGIN
        if k < scores.shape[1]:  # the bias must matter somewhere, or it could be ignored
            biased = (scores + bias).topk(k, dim=-1).indices.sort(-1).values
            plain = scores.topk(k, dim=-1).indices.sort(-1).values
            assert bool((biased != plain).any())


def test_biased_top_k_points_and_order_in_the_registry():
    ids = [g for g, ex in EXERCISES.items() if ex.assignment == "07_modern_moe"]
    assert ids.index("ex07_biased_top_k") == ids.index("ex07_aux_free_bias_update") - 1
    assert EXERCISES["ex07_biased_top_k"].points == 2
    assert EXERCISES["ex07_aux_free_bias_update"].points == 1
