"""The teaching checks of notebook 05 (MoE transformer) must be able to fail, and fail
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

from typing import Any, NamedTuple

import probe_data
import pytest
import torch
import torch.nn.functional as F
from probe_data import LoopExpert, fails
from torch import nn

import moe_course
from moe_course.grading import EXERCISES
from moe_course.grading.inputs import min_gap
from moe_course.layers import MoEFeedForward as _AliasMoEFeedForward
from moe_course.losses import moe_lm_loss as _alias_moe_lm_loss

GRADED = sorted(g for g, ex in EXERCISES.items() if g.startswith("ex05_") and ex.kind != "written")


# ========================================================================================
# Correct implementations, each written differently from the reference.


class Out(NamedTuple):
    y: torch.Tensor
    aux_loss: torch.Tensor
    z_loss: torch.Tensor


def make_layer(**mistakes: Any) -> type:
    """A MoEFeedForward written differently (kept rows only, masks), with planted mistakes."""

    class Layer(nn.Module):
        def __init__(self, d_model, d_hidden, n_experts, k=2, router="top_k",
                     capacity_factor=None):
            super().__init__()
            if router not in ("top_k", "expert_choice"):
                raise ValueError(f"router must be 'top_k' or 'expert_choice'; got {router!r}")
            self.k, self.router, self.cf, self.n_experts = k, router, capacity_factor, n_experts
            self.gate = nn.Linear(d_model, n_experts, bias=bool(mistakes.get("gate_bias")))
            make = moe_course.Expert if mistakes.get("reference_parts") else LoopExpert
            self.experts = nn.ModuleList(make(d_model, d_hidden) for _ in range(n_experts))

        def forward(self, x):
            flat = x.reshape(-1, x.shape[-1])
            t, e = flat.shape[0], self.n_experts
            logits = self.gate(flat)
            probs = torch.softmax(logits, dim=-1)
            z = torch.logsumexp(logits, dim=-1).pow(2).mean()
            y = torch.zeros_like(flat)
            if self.router == "top_k":
                top, idx = logits.topk(self.k, dim=-1)
                w = probs.gather(1, idx) if mistakes.get("full_softmax") else torch.softmax(
                    top, dim=-1)
                keep = torch.ones_like(idx, dtype=torch.bool)
                if self.cf is not None and not mistakes.get("ignore_capacity"):
                    c = moe_course.expert_capacity(t, e, self.cf, self.k)
                    keep = moe_course.capacity_positions(idx, e) < c
                w = w * keep
                if mistakes.get("unweighted"):
                    w = keep.to(w.dtype)
                if mistakes.get("reference_parts"):  # other exercises' references are fine
                    y = moe_course.sparse_moe(flat, self.experts, w, idx)
                for i, expert in enumerate(self.experts if not mistakes.get("reference_parts")
                                           else []):
                    if mistakes.get("dense"):
                        out = expert(flat)
                        y = y + (w * (idx == i)).sum(-1, keepdim=True) * out
                        continue
                    tok, slot = torch.nonzero((idx == i) & keep, as_tuple=True)
                    if len(tok):
                        y = y.index_add(0, tok, w[tok, slot, None] * expert(flat[tok]))
                aux = moe_course.switch_aux_loss(probs, idx)
                if mistakes.get("aux_times_k"):
                    aux = aux * self.k
            else:
                c = moe_course.expert_choice_capacity(t, e, self.cf or float(self.k))
                scores = torch.softmax(logits, dim=0) if mistakes.get("token_softmax") else probs
                g, token_idx = scores.t().topk(c, dim=-1)
                for i, expert in enumerate(self.experts):
                    y = y.index_add(0, token_idx[i], g[i, :, None] * expert(flat[token_idx[i]]))
                aux = moe_course.switch_aux_loss(probs, probs.argmax(-1, keepdim=True)) if (
                    mistakes.get("ec_aux")) else logits.new_zeros(())
            if mistakes.get("no_aux"):
                aux = logits.new_zeros(())
            if mistakes.get("no_z"):
                z = logits.new_zeros(())
            if mistakes.get("plain_tensor"):
                return y.reshape(x.shape)
            return Out(y.reshape(x.shape), aux, z)

    return Layer


MoEFeedForward = make_layer()


MoEFeedForwardFromParts = make_layer(reference_parts=True)


def moe_lm_loss(logits, targets, aux_losses, aux_weight=0.01, z_weight=0.001):
    logp = torch.log_softmax(logits, dim=-1)
    ce = -logp.gather(-1, targets[..., None]).mean()
    aux = sum(layer.aux_loss for layer in aux_losses)
    z = sum(z for _, z in aux_losses)
    return ce + aux_weight * aux + z_weight * z


CORRECT: dict[str, list[Any]] = {
    "ex05_moe_feed_forward": [MoEFeedForward, MoEFeedForwardFromParts],
    "ex05_moe_lm_loss": [moe_lm_loss],
}


def test_every_graded_exercise_has_a_correct_implementation():
    assert sorted(CORRECT) == GRADED


@pytest.mark.parametrize("grade_id", GRADED)
def test_correct_implementation_passes_silently(grade_id, capsys):
    probe_data.passes_silently(grade_id, CORRECT[grade_id], capsys)


# ========================================================================================
# Planted mistakes, each with the distinctive part of its message.


def _lm_no_aux(logits, targets, aux_losses, aux_weight=0.01, z_weight=0.001):
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    return ce + z_weight * sum(layer.z_loss for layer in aux_losses)


def _lm_no_z(logits, targets, aux_losses, aux_weight=0.01, z_weight=0.001):
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    return ce + aux_weight * sum(a for a, _ in aux_losses)


def _lm_mean_layers(logits, targets, aux_losses, aux_weight=0.01, z_weight=0.001):
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    n = len(aux_losses)
    return (ce + aux_weight * sum(a for a, _ in aux_losses) / n
            + z_weight * sum(z for _, z in aux_losses) / n)


def _lm_ce_only(logits, targets, aux_losses, aux_weight=0.01, z_weight=0.001):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


MISTAKES: list[tuple[str, Any, str]] = [
    ("ex05_moe_feed_forward", make_layer(unweighted=True), "not weighted by their gates"),
    ("ex05_moe_feed_forward", make_layer(full_softmax=True), "softmax over all E experts"),
    ("ex05_moe_feed_forward", make_layer(aux_times_k=True), "K = 2 times too large"),
    ("ex05_moe_feed_forward", make_layer(no_aux=True), "aux_loss is 0 for top-k"),
    ("ex05_moe_feed_forward", make_layer(no_z=True), "z_loss is 0"),
    ("ex05_moe_feed_forward", make_layer(token_softmax=True), "softmax over tokens"),
    ("ex05_moe_feed_forward", make_layer(dense=True), "not routed to it"),
    ("ex05_moe_feed_forward", make_layer(gate_bias=True), "must have no bias"),
    ("ex05_moe_feed_forward", make_layer(plain_tensor=True), "named tuple with fields"),
    ("ex05_moe_feed_forward", make_layer(ec_aux=True), "balanced by construction"),
    ("ex05_moe_feed_forward", make_layer(ignore_capacity=True), "ignores capacity_factor"),
    ("ex05_moe_lm_loss", _lm_no_aux, "leaves out the auxiliary"),
    ("ex05_moe_lm_loss", _lm_no_z, "leaves out the router z losses"),
    ("ex05_moe_lm_loss", _lm_mean_layers, "averages the layers"),
    ("ex05_moe_lm_loss", _lm_ce_only, "cross-entropy alone"),
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
    ("ex05_moe_lm_loss", lambda lg, tg, al, aux_weight=0.01, z_weight=0.001: lg, "shape ()"),
]


def test_layer_missing_its_experts_is_explained():
    class NoExperts(nn.Module):
        def __init__(self, d_model, d_hidden, n_experts, k=2, router="top_k",
                     capacity_factor=None):
            super().__init__()
            self.gate = nn.Linear(d_model, n_experts, bias=False)

    assert "experts must be an nn.ModuleList of n_experts = 4" in fails(
        "ex05_moe_feed_forward", NoExperts, hidden=False)


ALIASES = {  # the reference of each exercise, captured at import
    "ex05_moe_feed_forward": _AliasMoEFeedForward,
    "ex05_moe_lm_loss": _alias_moe_lm_loss,
}


# ========================================================================================
# Inputs: the decisions each probe's answer depends on are far from ties.

def order_margins(grade_id: str, inputs: dict) -> list[float]:
    """The gaps every order-dependent decision of the probe rests on (independent oracle)."""
    if grade_id == "ex05_moe_feed_forward":
        d = inputs["d_model"]
        lg = inputs["x"].reshape(-1, d) @ inputs["gate_weight"].T
        if inputs["router"] == "top_k":
            return [min_gap(lg, dim=-1)]
        return [min_gap(torch.softmax(lg, dim=-1), dim=0)]
    if "logits" in inputs:
        return [min_gap(inputs["logits"], dim=-1)]
    return []


def test_order_dependent_probes_are_covered_by_the_tie_check():
    covered = {gid for gid in GRADED for probe in EXERCISES[gid].visible + EXERCISES[gid].hidden
               if order_margins(gid, probe.inputs())}
    assert {"ex05_moe_feed_forward"} <= covered
