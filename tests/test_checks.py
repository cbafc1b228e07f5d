"""The teaching checks of `moe_course.grading` must be able to fail, and fail helpfully.

For every exercise of notebooks 01-05: a correct implementation written differently from the
reference passes the visible and hidden checks silently; each planted mistake fails with its
own message; calling the reference (directly, through an alias, wrapped) fails with
"implement it yourself"; a stub and wrong return types fail with a message, not a crash;
inputs are deterministic and tie-free; run outputs survive `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import probe_data
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moe_course
from moe_course.capacity import apply_capacity as _alias_apply_capacity
from moe_course.capacity import capacity_positions as _alias_capacity_positions
from moe_course.capacity import expert_capacity as _alias_expert_capacity
from moe_course.expert_choice import expert_choice_capacity as _alias_ec_capacity
from moe_course.expert_choice import expert_choice_moe as _alias_ec_moe
from moe_course.expert_choice import expert_choice_routing as _alias_ec_routing
from moe_course.expert_choice import experts_per_token as _alias_per_token
from moe_course.experts import Expert as _AliasExpert
from moe_course.gating import noisy_logits as _alias_noisy_logits
from moe_course.gating import softmax_gate as _alias_softmax_gate
from moe_course.gating import top_k_gating as _alias_top_k_gating
from moe_course.grading import EXERCISES, CheckFailure, check, judge_probe, run_probe
from moe_course.grading.inputs import MARGIN, min_gap
from moe_course.layers import MoEFeedForward as _AliasMoEFeedForward
from moe_course.losses import cv_squared as _alias_cv_squared
from moe_course.losses import importance_loss as _alias_importance_loss
from moe_course.losses import load_loss as _alias_load_loss
from moe_course.losses import moe_lm_loss as _alias_moe_lm_loss
from moe_course.losses import router_z_loss as _alias_router_z_loss
from moe_course.losses import switch_aux_loss as _alias_switch_aux_loss
from moe_course.routing import dense_moe as _alias_dense_moe
from moe_course.routing import moe_flops as _alias_moe_flops
from moe_course.routing import sparse_moe as _alias_sparse_moe


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny tensors: one thread is fastest, and immune to a busy machine's thread contention.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


GRADED = sorted(g for g, ex in EXERCISES.items() if ex.kind != "written" and int(g[2:4]) <= 5)
SQRT2 = math.sqrt(2.0)


def fails(grade_id: str, obj: Any, hidden: bool | None = None) -> str:
    """Run the visible (and hidden) checks; return the first failure's message."""
    for h in ((False, True) if hidden is None else (hidden,)):
        try:
            check(grade_id, obj, hidden=h)
        except CheckFailure as failure:
            return failure.message
    raise AssertionError(f"{grade_id}: {obj!r} passed every check")


# ========================================================================================
# Correct implementations, each written differently from the reference.


class LoopExpert(nn.Module):  # erf written out instead of F.gelu
    def __init__(self, d_model: int, d_hidden: int) -> None:
        super().__init__()
        self.w_in = nn.Linear(d_model, d_hidden)
        self.w_out = nn.Linear(d_hidden, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.w_in(x)
        return self.w_out(0.5 * h * (1.0 + torch.erf(h / SQRT2)))


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
    "ex01_expert": [LoopExpert],
    "ex01_softmax_gate": [softmax_gate],
    "ex01_dense_moe": [dense_moe, dense_moe_with_reference_gate],
    "ex02_top_k_gating": [top_k_gating],
    "ex02_noisy_logits": [noisy_logits],
    "ex02_sparse_moe": [sparse_moe],
    "ex02_moe_flops": [moe_flops],
    "ex03_cv_squared": [cv_squared],
    "ex03_importance_loss": [importance_loss],
    "ex03_load_loss": [load_loss],
    "ex03_switch_aux_loss": [switch_aux_loss],
    "ex03_router_z_loss": [router_z_loss],
    "ex03_expert_capacity": [expert_capacity],
    "ex03_capacity_positions": [capacity_positions],
    "ex03_apply_capacity": [apply_capacity],
    "ex04_expert_choice_capacity": [expert_choice_capacity],
    "ex04_expert_choice_routing": [expert_choice_routing],
    "ex04_expert_choice_moe": [expert_choice_moe],
    "ex04_experts_per_token": [experts_per_token],
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
    # 01
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
    # 02
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
    # 03
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
    # 04
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
    # 05
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


@pytest.mark.parametrize(("grade_id", "impl", "expected"), MISTAKES,
                         ids=[f"{g}-{s[:24]}" for g, _, s in MISTAKES])
def test_planted_mistake_fails_with_its_message(grade_id, impl, expected, capsys):
    message = fails(grade_id, impl)
    assert expected in message, message
    assert message.startswith(f"{EXERCISES[grade_id].symbol}, check '")
    assert capsys.readouterr().err == ""


def test_every_exercise_has_planted_mistakes():
    assert {g for g, _, _ in MISTAKES} == set(GRADED)


def test_the_issue_mistakes_are_distinct_messages():
    # One message per mistake named in the issue; none of them is the generic fallback.
    for grade_id, impl, _ in MISTAKES:
        message = fails(grade_id, impl)
        assert " is wrong: " not in message, (grade_id, message)


# ========================================================================================
# Calling the reference: directly, through an alias captured at import, or wrapped.

ALIASES = {
    "ex01_expert": _AliasExpert, "ex01_softmax_gate": _alias_softmax_gate,
    "ex01_dense_moe": _alias_dense_moe, "ex02_top_k_gating": _alias_top_k_gating,
    "ex02_noisy_logits": _alias_noisy_logits, "ex02_sparse_moe": _alias_sparse_moe,
    "ex02_moe_flops": _alias_moe_flops, "ex03_cv_squared": _alias_cv_squared,
    "ex03_importance_loss": _alias_importance_loss, "ex03_load_loss": _alias_load_loss,
    "ex03_switch_aux_loss": _alias_switch_aux_loss, "ex03_router_z_loss": _alias_router_z_loss,
    "ex03_expert_capacity": _alias_expert_capacity,
    "ex03_capacity_positions": _alias_capacity_positions,
    "ex03_apply_capacity": _alias_apply_capacity,
    "ex04_expert_choice_capacity": _alias_ec_capacity,
    "ex04_expert_choice_routing": _alias_ec_routing, "ex04_expert_choice_moe": _alias_ec_moe,
    "ex04_experts_per_token": _alias_per_token, "ex05_moe_feed_forward": _AliasMoEFeedForward,
    "ex05_moe_lm_loss": _alias_moe_lm_loss,
}


def _cheats(grade_id: str) -> list[Any]:
    alias = ALIASES[grade_id]
    if isinstance(alias, type):
        class Subclass(alias):
            pass

        class Wrapper(nn.Module):
            def __init__(self, *args, **kwargs):
                super().__init__()
                self.inner = alias(*args, **kwargs)
                self.gate = getattr(self.inner, "gate", None)
                self.experts = getattr(self.inner, "experts", None)
                self.w_in = getattr(self.inner, "w_in", None)
                self.w_out = getattr(self.inner, "w_out", None)

            def forward(self, x):
                return self.inner(x)

        return [alias, Subclass, Wrapper]

    def wrapper(*args, **kwargs):
        return alias(*args, **kwargs)

    def sneaky(*args, **kwargs):  # swallows the tripwire and falls back: still caught
        try:
            return alias(*args, **kwargs)
        except Exception:
            return CORRECT[grade_id][0](*args, **kwargs)

    return [alias, wrapper, sneaky]


@pytest.mark.parametrize("grade_id", GRADED)
def test_calling_the_reference_earns_nothing(grade_id):
    assert ALIASES[grade_id] is EXERCISES[grade_id].reference
    for cheat in _cheats(grade_id):
        for hidden in (False, True):
            with pytest.raises(CheckFailure, match="implement it yourself"):
                check(grade_id, cheat, hidden=hidden)


def test_reference_works_again_after_a_tripped_check():
    with pytest.raises(CheckFailure, match="implement it yourself"):
        check("ex02_top_k_gating", lambda lg, k: _alias_top_k_gating(lg, k))
    weights, indices = moe_course.top_k_gating(torch.tensor([[1.0, 3.0, 2.0]]), 2)
    assert indices.tolist() == [[1, 2]] and weights.sum().item() == pytest.approx(1.0)
    layer = moe_course.MoEFeedForward(4, 8, 2, k=1)
    with pytest.raises(CheckFailure, match="implement it yourself"):
        check("ex05_moe_feed_forward", moe_course.MoEFeedForward)
    assert layer(torch.randn(1, 3, 4)).y.shape == (1, 3, 4)


# ========================================================================================
# Stubs, crashes and wrong return types fail with a message, never a crash.


def _stub(grade_id: str) -> Any:
    if EXERCISES[grade_id].kind == "class":
        class Stub(nn.Module):
            def __init__(self, *args, **kwargs):
                super().__init__()
                raise NotImplementedError("write your Expert here")

        return Stub

    def stub(*args, **kwargs):
        raise NotImplementedError

    return stub


@pytest.mark.parametrize("grade_id", GRADED)
def test_stub_fails_with_not_implemented(grade_id):
    assert "is not implemented yet" in fails(grade_id, _stub(grade_id), hidden=False)


def test_a_crash_is_reported_in_one_line():
    def broken(logits, k):
        return logits.topk(k, dim=2)

    message = fails("ex02_top_k_gating", broken, hidden=False)
    assert "your top_k_gating raised IndexError: " in message
    assert "\n" not in message


WRONG_RETURNS: list[tuple[str, Any, str]] = [
    ("ex01_softmax_gate", lambda x, w: (x @ w).t(), "shape (6, 5)"),
    ("ex01_softmax_gate", lambda x, w: None, "you returned None"),
    ("ex01_dense_moe", lambda x, ex, w: (x, w), "shape (6, 3)"),
    ("ex02_top_k_gating", lambda lg, k: torch.softmax(lg, -1), "must return a tuple"),
    ("ex02_top_k_gating", lambda lg, k: (torch.softmax(lg, -1), lg.argsort(-1)), "shape (6, 2)"),
    ("ex02_top_k_gating", lambda lg, k: (lg.numpy(), lg.numpy()), "numpy.ndarray"),
    ("ex02_noisy_logits", lambda x, wg, wn, noise=None: (x @ wg)[0], "shape (5, 3)"),
    ("ex02_sparse_moe", lambda x, ex, w, i: x[:, :2], "shape (7, 4)"),
    ("ex02_moe_flops", lambda *a: torch.tensor(moe_flops(*a)), "must be an int"),
    ("ex03_cv_squared", lambda v: v, "0-dim scalar tensor"),
    ("ex03_importance_loss", lambda g, w_importance=0.01: g.sum(0), "0-dim scalar tensor"),
    ("ex03_load_loss", lambda c, n, s, k, w_load=0.01: c, "0-dim scalar tensor"),
    ("ex03_switch_aux_loss", lambda p, i: p.mean(0, keepdim=True).sum(-1), "shape (1,)"),
    ("ex03_router_z_loss", lambda lg: "zero", "a Python str"),
    ("ex03_expert_capacity", lambda *a, **k: None, "must be an int"),
    ("ex03_capacity_positions", lambda i, e: i.float(), "integer (int64) tensor"),
    ("ex03_apply_capacity", lambda w, i, c: w, "must return a tuple (weights, keep)"),
    ("ex04_expert_choice_capacity", lambda t, e, cf: [t], "must be an int"),
    ("ex04_expert_choice_routing", lambda lg, c: (lg, lg), "shape (4, 3)"),
    ("ex04_expert_choice_moe", lambda x, ex, g, i: {"y": x}, "a dict"),
    ("ex04_experts_per_token", lambda ti, n: ti, "shape (8,)"),
    ("ex05_moe_lm_loss", lambda lg, tg, al, aux_weight=0.01, z_weight=0.001: lg, "shape ()"),
]


@pytest.mark.parametrize(("grade_id", "impl", "expected"), WRONG_RETURNS,
                         ids=[f"{g}-{s[:20]}" for g, _, s in WRONG_RETURNS])
def test_wrong_return_type_or_shape_is_explained(grade_id, impl, expected):
    message = fails(grade_id, impl, hidden=False)
    assert expected in message, message
    assert "must" in message or "you returned" in message


def test_wrong_kind_of_object_is_explained():
    with pytest.raises(CheckFailure, match="must be a function"):
        check("ex02_top_k_gating", 42)
    with pytest.raises(CheckFailure, match="nn.Module subclass"):
        check("ex05_moe_feed_forward", top_k_gating)
    with pytest.raises(ValueError, match="graded by hand"):
        check("ex01_written", None)
    with pytest.raises(ValueError, match="no exercise 'ex99_nothing'"):
        check("ex99_nothing", top_k_gating)


def test_layer_missing_its_experts_is_explained():
    class NoExperts(nn.Module):
        def __init__(self, d_model, d_hidden, n_experts, k=2, router="top_k",
                     capacity_factor=None):
            super().__init__()
            self.gate = nn.Linear(d_model, n_experts, bias=False)

    assert "experts must be an nn.ModuleList of n_experts = 4" in fails(
        "ex05_moe_feed_forward", NoExperts, hidden=False)


# ========================================================================================
# Inputs: deterministic, tie-free; outputs: plain data across the process boundary.

PROBES = [(gid, probe) for gid in GRADED for probe in EXERCISES[gid].visible
          + EXERCISES[gid].hidden]


_equal, _plain = probe_data.equal, probe_data.plain


def _order_margins(grade_id: str, inputs: dict) -> list[float]:
    """The gaps every order-dependent decision of the probe rests on (independent oracle)."""
    if grade_id == "ex05_moe_feed_forward":
        d = inputs["d_model"]
        lg = inputs["x"].reshape(-1, d) @ inputs["gate_weight"].T
        if inputs["router"] == "top_k":
            return [min_gap(lg, dim=-1)]
        return [min_gap(torch.softmax(lg, dim=-1), dim=0)]
    if grade_id.startswith("ex04_") and "logits" in inputs:
        return [min_gap(torch.softmax(inputs["logits"], dim=-1), dim=0)]
    if grade_id == "ex03_load_loss":
        return [min_gap(inputs["noisy_logits"], dim=-1)]
    if "logits" in inputs and "indices" not in inputs and grade_id != "ex03_router_z_loss":
        return [min_gap(inputs["logits"], dim=-1)]
    if "logits" in inputs and "indices" in inputs:
        return [min_gap(inputs["logits"], dim=-1)]
    return []


@pytest.mark.parametrize(("grade_id", "probe"), PROBES,
                         ids=[f"{g}-{p.name}" for g, p in PROBES])
def test_inputs_are_deterministic_tie_free_plain_and_outputs_round_trip(grade_id, probe):
    exercise = EXERCISES[grade_id]
    first, second = probe_data.inputs_twice(probe)
    for gap in _order_margins(grade_id, first):
        assert gap > MARGIN
    probe_data.judged_after_round_trip(exercise, probe, CORRECT[grade_id][0], first, second)


def test_order_dependent_probes_are_covered_by_the_tie_check():
    covered = {gid for gid, probe in PROBES if _order_margins(gid, probe.inputs())}
    assert {"ex02_top_k_gating", "ex03_load_loss", "ex03_switch_aux_loss",
            "ex03_capacity_positions", "ex03_apply_capacity", "ex04_expert_choice_routing",
            "ex04_expert_choice_moe", "ex04_experts_per_token",
            "ex05_moe_feed_forward"} <= covered


@pytest.mark.parametrize(("grade_id", "probe"), PROBES,
                         ids=[f"{g}-{p.name}" for g, p in PROBES])
def test_judge_refuses_missing_or_truncated_outputs(grade_id, probe):
    probe_data.judge_refuses_missing_or_truncated(EXERCISES[grade_id], probe,
                                                  CORRECT[grade_id][0])


def test_a_mistakes_message_is_the_same_after_the_round_trip():
    exercise = EXERCISES["ex02_sparse_moe"]
    probe = exercise.visible[0]
    inputs = probe.inputs()
    outputs = run_probe(exercise, probe, _sparse_per_token, inputs)
    loaded = probe_data.round_trip(outputs)
    with pytest.raises(CheckFailure, match=r"one call per token\?"):
        judge_probe(exercise, probe, inputs, loaded)


def test_odd_return_values_are_captured_as_plain_data():
    exercise = EXERCISES["ex02_top_k_gating"]
    probe = exercise.visible[0]

    class Liar(torch.Tensor):
        def __eq__(self, other):
            return True

    weird = [lambda lg, k: (lg.numpy(), {"a": 1}), lambda lg, k: (Liar(lg), object()),
             lambda lg, k: [[[[[lg]]]]], lambda lg, k: (float("nan"), 10**30)]
    for fn in weird:
        outputs = run_probe(exercise, probe, fn, probe.inputs())
        assert _plain(outputs)
        loaded = probe_data.round_trip(outputs)
        with pytest.raises(CheckFailure):
            judge_probe(exercise, probe, probe.inputs(), loaded)


def test_probe_names_are_unique_and_found_again():
    for exercise in EXERCISES.values():
        for probe in exercise.visible + exercise.hidden:
            assert exercise.probe(probe.name) is probe


def test_learner_warnings_and_stderr_are_silenced(capsys):
    import sys
    import warnings

    def noisy(logits, k):
        warnings.warn("a learner's warning", UserWarning, stacklevel=1)
        print("debugging to stderr", file=sys.stderr)
        return top_k_gating(logits, k)

    check("ex02_top_k_gating", noisy)
    out, err = capsys.readouterr()
    assert err == "" and out == "✓ top_k_gating: 4 checks passed\n"


def test_learner_rng_use_does_not_leak_into_the_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    check("ex02_noisy_logits", noisy_logits)
    assert torch.equal(torch.rand(3), expected)


def test_failure_renders_short_in_ipython():
    failure = CheckFailure("top_k_gating, check 'k=2': your weights sum to 0.83")
    lines = failure._render_traceback_()
    assert len(lines) == 1 and "your weights sum to 0.83" in lines[0]
    assert isinstance(failure, AssertionError)


@pytest.mark.slow
def test_failure_in_a_real_kernel_is_short_and_an_error(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    from nbclient import NotebookClient

    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("import torch\nfrom moe_course.grading import check"),
        nbformat.v4.new_code_cell(
            "def top_k_gating(logits, k):\n"
            "    if not 1 <= k <= logits.shape[1]:\n"
            "        raise ValueError('k')\n"
            "    top, idx = logits.topk(k, dim=-1)\n"
            "    return torch.softmax(top, dim=-1), idx\n"
            "check('ex02_top_k_gating', top_k_gating)\n"
            "check('ex02_top_k_gating', top_k_gating, hidden=True)"),
        nbformat.v4.new_code_cell(
            "def bad(logits, k):\n"
            "    idx = logits.topk(k, dim=-1).indices\n"
            "    return torch.softmax(logits, -1).gather(1, idx), idx\n"
            "check('ex02_top_k_gating', bad)"),
    ]
    import pathlib

    root = pathlib.Path(moe_course.__file__).resolve().parent.parent
    client = NotebookClient(nb, timeout=120, kernel_name="python3", allow_errors=True,
                            resources={"metadata": {"path": str(root)}})
    client.execute()
    passing, failing = nb.cells[1].outputs, nb.cells[2].outputs
    assert {(o["output_type"], o.get("name")) for o in passing} == {("stream", "stdout")}
    assert "".join(o["text"] for o in passing) == ("✓ top_k_gating: 4 checks passed\n"
                                                   "✓ top_k_gating: 3 hidden checks passed\n")
    assert [o["output_type"] for o in failing] == ["error"]
    error = failing[0]
    assert error["ename"] == "CheckFailure"
    assert "softmax over all E experts" in error["evalue"]
    assert len(error["traceback"]) == 1, error["traceback"]
    assert "softmax over all E experts" in error["traceback"][0]
