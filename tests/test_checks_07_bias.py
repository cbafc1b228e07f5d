"""The teaching checks of `ex07_biased_top_k` (DeepSeek-V3 routing, arXiv 2412.19437,
eq. 13-16) must be able to fail, and fail helpfully.

Correct implementations written differently from the reference pass silently; each
typical mistake (the bias in the weights, selection without the bias, no normalisation,
a softmax instead of the division, normalising over all experts, the wrong order, a
gradient into the bias) fails with its own message; calling the reference fails with
"implement it yourself"; inputs are deterministic, plain and tie-free (for the biased
and the unbiased scores), the bias changes some token's choice, outputs survive
`torch.load(weights_only=True)`, and the judge refuses missing or truncated outputs.
"""

from __future__ import annotations

from typing import Any

import probe_data
import pytest
import torch

import moe_course
from moe_course.grading import EXERCISES, CheckFailure, check
from moe_course.grading.inputs import MARGIN
from moe_course.modern import biased_top_k as _alias

GID = "ex07_biased_top_k"
EXERCISE = EXERCISES[GID]
PROBES = EXERCISE.visible + EXERCISE.hidden


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fails(obj: Any, hidden: bool | None = None) -> str:
    for h in ((False, True) if hidden is None else (hidden,)):
        try:
            check(GID, obj, hidden=h)
        except CheckFailure as failure:
            return failure.message
    raise AssertionError(f"{obj!r} passed every check")


# ----------------------------------------------------------------------------------------
# Correct implementations, each written differently from the reference.


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


@pytest.mark.parametrize("impl", [biased_sort, biased_loop, biased_masked])
def test_correct_implementations_pass_silently(impl, capsys):
    probe_data.passes_silently(GID, [impl], capsys)


# ----------------------------------------------------------------------------------------
# Typical mistakes, each with its own message.


def _bias_in_weights(scores, bias, k):
    idx = (scores + bias).topk(k, dim=-1).indices
    chosen = (scores + bias).gather(1, idx)
    return chosen / chosen.sum(-1, keepdim=True), idx


def _no_bias_choice(scores, bias, k):
    idx = scores.topk(k, dim=-1).indices
    chosen = scores.gather(1, idx)
    return chosen / chosen.sum(-1, keepdim=True), idx


def _unnormalised(scores, bias, k):
    idx = (scores + bias).topk(k, dim=-1).indices
    return scores.gather(1, idx), idx


def _softmax(scores, bias, k):
    idx = (scores + bias).topk(k, dim=-1).indices
    return torch.softmax(scores.gather(1, idx), dim=-1), idx


def _over_all(scores, bias, k):
    idx = (scores + bias).topk(k, dim=-1).indices
    return scores.gather(1, idx) / scores.sum(-1, keepdim=True), idx


def _ascending(scores, bias, k):
    w, idx = biased_sort(scores, bias, k)
    return w.flip(-1), idx.flip(-1)


def _by_id(scores, bias, k):
    idx = (scores + bias).topk(k, dim=-1).indices.sort(-1).values
    chosen = scores.gather(1, idx)
    return chosen / chosen.sum(-1, keepdim=True), idx


def _subtracted(scores, bias, k):
    idx = (scores - bias).topk(k, dim=-1).indices
    chosen = scores.gather(1, idx)
    return chosen / chosen.sum(-1, keepdim=True), idx


def _detached(scores, bias, k):
    w, idx = biased_sort(scores, bias, k)
    return w.detach(), idx


def _grad_into_bias(scores, bias, k):  # right values, but the bias is in the graph
    w, idx = biased_sort(scores, bias, k)
    b = bias.gather(0, idx.reshape(-1)).reshape(idx.shape)
    return w + b - b.detach(), idx


def _in_place(scores, bias, k):  # adds the bias into the caller's scores
    biased = scores.add_(bias)
    idx = biased.topk(k, dim=-1).indices
    chosen = (biased - bias).gather(1, idx)
    return chosen / chosen.sum(-1, keepdim=True), idx


MISTAKES = [
    (_bias_in_weights, "your weights include the bias"),
    (_no_bias_choice, "you chose the experts by the unbiased scores"),
    (_unnormalised, "divide the chosen scores by their sum"),
    (_softmax, "you took a softmax of the chosen scores"),
    (_over_all, "you normalised over all E experts"),
    (_ascending, "ascending order"),
    (_by_id, "sorted by expert id"),
    (_subtracted, "you subtracted the bias"),
    (_detached, "not differentiable with respect to the scores"),
    (_grad_into_bias, "a gradient reaches the bias"),
    (_in_place, "in place"),
]


@pytest.mark.parametrize(("impl", "expected"), MISTAKES, ids=[m[1][:30] for m in MISTAKES])
def test_planted_mistake_fails_with_its_message(impl, expected, capsys):
    message = fails(impl)
    assert expected in message, message
    assert message.startswith("biased_top_k, check '")
    assert " is wrong: " not in message  # a named mistake, not the generic fallback
    assert capsys.readouterr().err == ""


def test_the_main_mistakes_are_caught_by_the_visible_check():
    for impl in (_bias_in_weights, _no_bias_choice, _unnormalised, _softmax):
        fails(impl, hidden=False)


@pytest.mark.parametrize(("impl", "expected"), [
    (lambda s, b, k: None, "you returned None"),
    (lambda s, b, k: s, "must return a tuple (weights, indices)"),
    (lambda s, b, k: (s, s), "shape (6, 2)"),
])
def test_wrong_return_type_or_shape_is_explained(impl, expected):
    assert expected in fails(impl, hidden=False)


def test_stub_fails_with_not_implemented():
    def stub(scores, bias, k):
        raise NotImplementedError

    assert "is not implemented yet" in fails(stub, hidden=False)


# ----------------------------------------------------------------------------------------
# Calling the reference earns nothing.


def test_calling_the_reference_earns_nothing():
    assert _alias is EXERCISE.reference

    def wrapper(*args):
        return _alias(*args)

    def sneaky(*args):
        try:
            return _alias(*args)
        except Exception:
            return biased_sort(*args)

    for cheat in (_alias, moe_course.biased_top_k, wrapper, sneaky):
        for hidden in (False, True):
            with pytest.raises(CheckFailure, match="implement it yourself"):
                check(GID, cheat, hidden=hidden)
    # and the reference works again afterwards
    w, i = moe_course.biased_top_k(torch.tensor([[0.9, 0.6, 0.3]]), torch.zeros(3), 2)
    assert i.tolist() == [[0, 1]]


# ----------------------------------------------------------------------------------------
# Inputs and outputs.


@pytest.mark.parametrize("probe", PROBES, ids=[p.name for p in PROBES])
def test_inputs_are_deterministic_tie_free_plain_and_outputs_round_trip(probe):
    first, second = probe_data.inputs_twice(probe)
    scores, bias, k = first["scores"], first["bias"], first["k"]
    for values in (scores + bias, scores):  # both orders a variant depends on
        top = values.sort(dim=-1, descending=True).values
        assert float(top.diff(dim=-1).abs().min()) > MARGIN
    assert bool((scores > 0).all()) and bool((scores < 1).all())  # sigmoid affinities
    if k < scores.shape[1]:  # the bias must matter somewhere, or it could be ignored
        biased = (scores + bias).topk(k, dim=-1).indices.sort(-1).values
        plain = scores.topk(k, dim=-1).indices.sort(-1).values
        assert bool((biased != plain).any())
    probe_data.judged_after_round_trip(EXERCISE, probe, biased_sort, first, second)


@pytest.mark.parametrize("probe", PROBES, ids=[p.name for p in PROBES])
def test_judge_refuses_missing_or_truncated_outputs(probe):
    probe_data.judge_refuses_missing_or_truncated(EXERCISE, probe, biased_sort)


def test_points_and_order_in_the_registry():
    ids = [g for g, ex in EXERCISES.items() if ex.assignment == "07_modern_moe"]
    assert ids.index(GID) == ids.index("ex07_aux_free_bias_update") - 1
    assert EXERCISE.points == 2 and EXERCISES["ex07_aux_free_bias_update"].points == 1
