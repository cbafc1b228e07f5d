"""Every rule an exercise states is graded by a visible check, not only by a hidden one.

1. Each probe names the rules it tests (`Probe.rules`); every rule a hidden probe tests has
   a visible probe testing it too, on other inputs.
2. A table of wrong-but-plausible answers, at least one per rule: each is the solution
   notebook's answer with one rule broken, and it must fail a VISIBLE probe that tests that
   rule. A learner who follows the text and sees every visible check pass can then lose
   hidden points only by fitting the visible inputs.
"""

from __future__ import annotations

from typing import NamedTuple

import pytest
import solution_code
import torch

from moe_course.grading import EXERCISES, CheckFailure, judge_probe, run_probe
from moe_course.grading.checks import nb01_experts_and_gating as eg
from moe_course.grading.checks import nb02_top_k_routing as tk
from moe_course.grading.checks import nb03_load_balancing as lb
from moe_course.grading.checks import nb04_expert_choice as ec
from moe_course.grading.checks import nb05_moe_transformer as mt
from moe_course.grading.checks import nb06_expert_parallelism as ep
from moe_course.grading.checks import nb07_modern_moe as mm
from moe_course.grading.checks import nb08_serving_and_upcycling as su

GRADED = [ex for ex in EXERCISES.values() if ex.kind != "written"]


@pytest.mark.parametrize("exercise", GRADED, ids=lambda ex: ex.grade_id)
def test_every_probe_names_its_rules(exercise) -> None:
    for probe in exercise.visible + exercise.hidden:
        assert isinstance(probe.rules, tuple) and probe.rules, (
            f"{exercise.grade_id}: probe {probe.name!r} names no rule (a tuple of strings)"
        )
        assert len(set(probe.rules)) == len(probe.rules), probe.name


@pytest.mark.parametrize("exercise", GRADED, ids=lambda ex: ex.grade_id)
def test_every_hidden_rule_has_a_visible_twin(exercise) -> None:
    visible = {rule for probe in exercise.visible for rule in probe.rules}
    for probe in exercise.hidden:
        missing = set(probe.rules) - visible
        assert not missing, (
            f"{exercise.grade_id}: hidden probe {probe.name!r} tests "
            f"{sorted(missing)}, which no visible probe tests"
        )


@pytest.mark.parametrize("exercise", GRADED, ids=lambda ex: ex.grade_id)
def test_hidden_probes_use_other_inputs(exercise) -> None:
    def key(probe):
        return repr(
            {k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in probe.inputs().items()}
        )

    visible = {key(p) for p in exercise.visible}
    for probe in exercise.hidden:
        assert key(probe) not in visible, (
            f"{exercise.grade_id}: {probe.name!r} repeats a visible probe"
        )


class Wrong(NamedTuple):
    """The solution's answer cell with `edits` (old, new) applied, or `source` instead."""

    grade_id: str
    rule: str
    why: str  # the plausible mistake, for the test id
    edits: tuple[tuple[str, str], ...] = ()
    source: str = ""


def _swap(old: str, new: str) -> tuple[tuple[str, str], ...]:
    return ((old, new),)


NO_MUTATION_SOFTMAX_GATE = """
def softmax_gate(x, w_gate):
    x -= x.mean(-1, keepdim=True)  # centre the features first (in place)
    return torch.softmax(x @ w_gate, dim=-1)
"""
OVERFLOWING_SOFTMAX = """
def softmax_gate(x, w_gate):
    e = torch.exp(x @ w_gate)
    return e / e.sum(-1, keepdim=True)
"""
DENSE_LIST_ONLY = """
def dense_moe(x, experts, w_gate):
    if not isinstance(experts, list):
        raise TypeError("experts must be a list")
    gates = softmax_gate(x, w_gate)
    outs = torch.stack([expert(x) for expert in experts], dim=1)
    return torch.einsum("te,ted->td", gates, outs), gates
"""
SPARSE_EVERY_EXPERT = """
def sparse_moe(x, experts, weights, indices):
    y = torch.zeros_like(x)
    for e, expert in enumerate(experts):
        w = (weights * (indices == e)).sum(-1, keepdim=True)  # (T, 1), 0 if not routed
        y = y + w * expert(x)
    return y
"""
SPARSE_LIST_ONLY = """
def sparse_moe(x, experts, weights, indices):
    if type(experts) is not list:
        raise TypeError("experts must be a list of modules")
    y = torch.zeros_like(x)
    for e, expert in enumerate(experts):
        token, slot = torch.nonzero(indices == e, as_tuple=True)
        if token.numel():
            y = y.index_add(0, token, weights[token, slot, None] * expert(x[token]))
    return y
"""
FLOPS_FLOAT = """
def moe_flops(n_tokens, d_model, d_hidden, n_experts, k):
    router = torch.tensor(2.0 * n_tokens * d_model * n_experts)  # float32
    flops = router + 2 * n_tokens * k * 2 * d_model * d_hidden
    return int(flops.float())
"""
CV_SAMPLE_VAR = """
def cv_squared(v):
    return v.var() / (v.mean() ** 2 + 1e-10)
"""
CV_NO_EPS = """
def cv_squared(v):
    if v.numel() == 1:
        return v.new_zeros(())
    return v.var(correction=0) / v.mean() ** 2
"""
CV_SINGLE_FLOAT = """
def cv_squared(v):
    if len(v) == 1:
        return 0.0
    return v.var(correction=0) / (v.mean() ** 2 + 1e-10)
"""
CV_NUMPY = """
def cv_squared(v):
    a = v.detach().numpy()
    return torch.tensor(a.var() / (a.mean() ** 2 + 1e-10))
"""
CV_IN_PLACE = """
def cv_squared(v):
    mean = v.mean()
    v -= mean  # deviations, in place
    return (v ** 2).mean() / (mean ** 2 + 1e-10)
"""
Z_OVERFLOW = """
def router_z_loss(logits):
    return (torch.log(torch.exp(logits).sum(-1)) ** 2).mean()
"""
Z_IN_PLACE = """
def router_z_loss(logits):
    m = logits.max(-1, keepdim=True).values
    logits -= m  # stabilise in place
    return ((torch.log(torch.exp(logits).sum(-1)) + m[:, 0]) ** 2).mean()
"""
POSITIONS_TOKEN_ORDER = """
def capacity_positions(indices, n_experts):
    t, k = indices.shape
    one_hot = F.one_hot(indices.reshape(-1), n_experts)  # token-major
    return ((one_hot.cumsum(0) - 1) * one_hot).sum(-1).reshape(t, k)
"""
POSITIONS_IN_PLACE = """
def capacity_positions(indices, n_experts):
    n_tokens, k = indices.shape
    indices.t_()  # choice-major, in place
    one_hot = F.one_hot(indices.reshape(-1), n_experts)
    slot = (one_hot.cumsum(dim=0) * one_hot).sum(dim=-1) - 1
    return slot.reshape(k, n_tokens).t()
"""
APPLY_IN_PLACE = """
def apply_capacity(weights, indices, capacity):
    keep = capacity_positions(indices, int(indices.max()) + 1) < capacity
    weights[~keep] = 0.0
    return weights, keep
"""
EC_ROUTING_IN_PLACE = """
def expert_choice_routing(logits, capacity):
    logits.sub_(logits.max())  # stabilise in place
    gates, token_idx = torch.softmax(logits, dim=-1).topk(capacity, dim=0)
    return gates.T, token_idx.T
"""
EC_MOE_LIST_ONLY = """
def expert_choice_moe(x, experts, gates, token_idx):
    assert isinstance(experts, list), "experts must be a list"
    y = torch.zeros_like(x)
    for e, expert in enumerate(experts):
        y = y.index_add(0, token_idx[e], gates[e, :, None] * expert(x[token_idx[e]]))
    return y
"""
EC_MOE_OVERWRITE = """
def expert_choice_moe(x, experts, gates, token_idx):
    y = torch.zeros_like(x)
    for e, expert in enumerate(experts):
        y[token_idx[e]] = gates[e, :, None] * expert(x[token_idx[e]])
    return y
"""
EC_MOE_EVERY_TOKEN = """
def expert_choice_moe(x, experts, gates, token_idx):
    y = torch.zeros_like(x)
    for e, expert in enumerate(experts):
        g = torch.zeros(x.shape[0]).index_add(0, token_idx[e], gates[e])
        y = y + g[:, None] * expert(x)
    return y
"""
PER_TOKEN_BINCOUNT = """
def experts_per_token(token_idx, n_tokens):
    return torch.bincount(token_idx.reshape(-1))
"""
PER_TOKEN_IN_PLACE = """
def experts_per_token(token_idx, n_tokens):
    token_idx.copy_(token_idx.sort(-1).values)  # each expert's tokens in order, in place
    return torch.bincount(token_idx.reshape(-1), minlength=n_tokens)
"""
LM_STACK = """
def moe_lm_loss(logits, targets, aux_losses, aux_weight=0.01, z_weight=0.001):
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    aux = torch.stack([layer.aux_loss for layer in aux_losses]).sum()
    z = torch.stack([layer.z_loss for layer in aux_losses]).sum()
    return ce + aux_weight * aux + z_weight * z
"""
LM_IN_PLACE = """
def moe_lm_loss(logits, targets, aux_losses, aux_weight=0.01, z_weight=0.001):
    logits -= logits.max(-1, keepdim=True).values  # stabilise in place
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    return ce + sum(aux_weight * a + z_weight * z for a, z in aux_losses)
"""
COUNTS_NO_MINLENGTH = """
def send_counts(indices, n_experts, world_size):
    if n_experts % world_size:
        raise ValueError("n_experts must be a multiple of world_size")
    return torch.bincount((indices // (n_experts // world_size)).reshape(-1))
"""
COUNTS_NO_CHECK = """
def send_counts(indices, n_experts, world_size):
    owner = indices // (n_experts // world_size)
    return torch.bincount(owner.reshape(-1), minlength=world_size)
"""
COUNTS_EMPTY = """
def send_counts(indices, n_experts, world_size):
    if n_experts % world_size:
        raise ValueError("n_experts must be a multiple of world_size")
    owner = indices // (n_experts // world_size)
    return F.one_hot(owner.reshape(-1), world_size).sum(0) if owner.numel() else None
"""
COUNTS_IN_PLACE = """
def send_counts(indices, n_experts, world_size):
    if n_experts % world_size:
        raise ValueError("n_experts must be a multiple of world_size")
    indices //= n_experts // world_size  # expert ids -> rank ids, in place
    return torch.bincount(indices.reshape(-1), minlength=world_size)
"""
PERMUTE_EMPTY = """
def permute_for_all_to_all(indices, n_experts, world_size):
    flat = indices.reshape(-1)
    if flat.numel() == 0:
        raise ValueError("no tokens to send")
    order = torch.argsort(flat, stable=True)
    return RankPermutation(order, torch.argsort(order), send_counts(indices, n_experts, world_size))
"""
PERMUTE_IN_PLACE = """
def permute_for_all_to_all(indices, n_experts, world_size):
    counts = send_counts(indices, n_experts, world_size)
    flat = indices.view(-1)
    order = torch.argsort(flat, stable=True)
    flat.copy_(flat[order])  # sorted in place
    return RankPermutation(order, torch.argsort(order), counts)
"""
SHARED_LIST_ONLY = """
def shared_expert_moe(x, shared_experts, routed_experts, w_gate, k):
    if not isinstance(routed_experts, list):
        raise TypeError("routed_experts must be a list")
    weights, indices = torch.topk(torch.softmax(x @ w_gate, dim=-1), k, dim=-1)
    y = sparse_moe(x, routed_experts, weights, indices)
    for expert in shared_experts:
        y = y + expert(x)
    return y, weights, indices
"""
SHARED_STACK = """
def shared_expert_moe(x, shared_experts, routed_experts, w_gate, k):
    weights, indices = torch.topk(torch.softmax(x @ w_gate, dim=-1), k, dim=-1)
    shared = torch.stack([expert(x) for expert in shared_experts]).sum(0)
    return shared + sparse_moe(x, routed_experts, weights, indices), weights, indices
"""
BIASED_IN_PLACE = """
def biased_top_k(scores, bias, k):
    scores += bias  # the biased scores, in place
    indices = scores.topk(k, dim=-1).indices
    chosen = (scores - bias).gather(1, indices)
    return chosen / chosen.sum(dim=-1, keepdim=True), indices
"""
BIASED_GRAD_INTO_BIAS = """
def biased_top_k(scores, bias, k):
    biased = scores + bias
    indices = biased.topk(k, dim=-1).indices
    chosen = biased.gather(1, indices) - bias.detach()[indices]  # the unbiased values
    return chosen / chosen.sum(dim=-1, keepdim=True), indices
"""
BIAS_IN_PLACE = """
def aux_free_bias_update(bias, expert_counts, gamma):
    counts = expert_counts.to(torch.float64)
    bias += gamma * torch.sign(counts.mean() - counts).to(bias.dtype)
    return bias
"""
BIAS_INT_ONLY = """
def aux_free_bias_update(bias, expert_counts, gamma):
    mean = expert_counts.sum() // expert_counts.numel()  # integer counts
    return bias + gamma * torch.sign(mean - expert_counts).to(bias.dtype)
"""
SOFT_LIST_ONLY = """
def soft_moe(x, experts, phi, slots_per_expert):
    assert isinstance(experts, list)
    c = slots_per_expert
    logits = x @ phi
    dispatch, combine = torch.softmax(logits, dim=0), torch.softmax(logits, dim=1)
    slots = dispatch.T @ x
    outs = torch.cat([expert(slots[e * c:(e + 1) * c]) for e, expert in enumerate(experts)])
    return combine @ outs, dispatch, combine
"""
SOFT_IN_PLACE = """
def soft_moe(x, experts, phi, slots_per_expert):
    c = slots_per_expert
    x -= x.mean(0)  # centre the tokens, in place
    logits = x @ phi
    dispatch, combine = torch.softmax(logits, dim=0), torch.softmax(logits, dim=1)
    slots = dispatch.T @ x
    outs = torch.cat([expert(slots[e * c:(e + 1) * c]) for e, expert in enumerate(experts)])
    return combine @ outs, dispatch, combine
"""
SORT_NO_MINLENGTH = """
def sort_by_expert(indices, n_experts):
    flat = indices.reshape(-1)
    return torch.sort(flat, stable=True).indices, torch.bincount(flat)
"""
SORT_IN_PLACE = """
def sort_by_expert(indices, n_experts):
    flat = indices.view(-1)
    counts = torch.bincount(flat, minlength=n_experts)
    order = torch.sort(flat, stable=True).indices
    flat.copy_(flat[order])
    return order, counts
"""
TOUCHED_IN_PLACE = """
def experts_touched(indices, n_experts):
    flat = indices.view(-1)
    flat.copy_(flat.sort().values)  # sorted in place
    return int(torch.unique_consecutive(flat).numel())
"""
EXPECTED_FROM_FIRST_TOKEN = """
def expected_experts_touched(batch, n_experts, k):
    touched = float(k)  # the first token's experts, then each further token adds its share
    for _ in range(batch - 1):
        touched += (n_experts - touched) * k / n_experts
    return touched
"""
EXPECTED_K_BELOW_E = """
def expected_experts_touched(batch, n_experts, k):
    if not 1 <= k < n_experts:
        raise ValueError(f"k must be in [1, n_experts), got {k}")
    return n_experts * (1.0 - (1.0 - k / n_experts) ** batch)
"""
LRU_SORTS_TRACE = """
def lru_cache_hits(trace, capacity):
    from collections import OrderedDict

    cache, hits = OrderedDict(), 0
    for expert in trace.flatten().tolist():
        if expert in cache:
            hits += 1
            cache.move_to_end(expert)
        elif capacity > 0:
            if len(cache) == capacity:
                cache.popitem(last=False)
            cache[expert] = None
    trace.copy_(trace.sort(dim=-1).values)  # tidy each row, in place
    return hits
"""
UPCYCLE_NOISY_DENSE = """
def upcycle(dense_ffn, n_experts, k):
    d_model, d_hidden = dense_ffn.w_in.in_features, dense_ffn.w_in.out_features
    layer = MoEFeedForward(d_model, d_hidden, n_experts, k=k)
    with torch.no_grad():  # a little noise to break the symmetry, on the dense layer itself
        dense_ffn.w_in.weight.add_(0.01 * torch.randn_like(dense_ffn.w_in.weight))
    layer.experts = nn.ModuleList(copy.deepcopy(dense_ffn) for _ in range(n_experts))
    return layer
"""

WRONG = [
    # 01 Expert, softmax_gate, dense_moe
    Wrong(
        "ex01_expert",
        eg.EXACT_GELU,
        "tanh GELU",
        _swap("F.gelu(self.w_in(x))", "F.gelu(self.w_in(x), approximate='tanh')"),
    ),
    Wrong(
        "ex01_expert",
        eg.ATTRIBUTES,
        "fc1 and fc2",
        (
            ("self.w_in = nn.Linear", "self.fc1 = nn.Linear"),
            ("self.w_out = nn.Linear", "self.fc2 = nn.Linear"),
            ("self.w_out(F.gelu(self.w_in(x)))", "self.fc2(F.gelu(self.fc1(x)))"),
        ),
    ),
    Wrong(
        "ex01_expert",
        eg.ANY_BATCH,
        "tokens flattened",
        _swap(
            "return self.w_out(F.gelu(self.w_in(x)))",
            "return self.w_out(F.gelu(self.w_in(x.reshape(-1, x.shape[-1]))))",
        ),
    ),
    Wrong("ex01_softmax_gate", eg.GATE_SOFTMAX, "softmax over tokens", _swap("dim=-1", "dim=0")),
    Wrong("ex01_softmax_gate", eg.LARGE_LOGITS, "exp / sum", source=OVERFLOWING_SOFTMAX),
    Wrong(
        "ex01_softmax_gate", eg.NO_MUTATION, "centres x in place", source=NO_MUTATION_SOFTMAX_GATE
    ),
    Wrong(
        "ex01_dense_moe",
        eg.MIXTURE,
        "plain mean",
        _swap('torch.einsum("te,ted->td", gates, outs)', "outs.mean(1)"),
    ),
    Wrong("ex01_dense_moe", eg.LIST_OR_MODULE_LIST, "list only", source=DENSE_LIST_ONLY),
    Wrong(
        "ex01_dense_moe",
        eg.NO_MUTATION,
        "scales x in place",
        _swap(
            "gates = softmax_gate(x, w_gate)  # (T, E)",
            "gates = softmax_gate(x, w_gate)\n    x *= 1.5",
        ),
    ),
    # 02 top_k_gating, noisy_logits, sparse_moe, moe_flops
    Wrong(
        "ex02_top_k_gating",
        tk.TOP_K_ORDER,
        "ascending",
        _swap("return weights, indices", "return weights.flip(-1), indices.flip(-1)"),
    ),
    Wrong(
        "ex02_top_k_gating",
        tk.TOP_K_SOFTMAX,
        "full softmax",
        _swap(
            "torch.softmax(top_logits, dim=-1)", "torch.softmax(logits, dim=-1).gather(1, indices)"
        ),
    ),
    Wrong(
        "ex02_top_k_gating",
        tk.K_RANGE,
        "no check",
        _swap("not 1 <= k <= n_experts", "k > n_experts"),
    ),
    Wrong(
        "ex02_top_k_gating",
        tk.K_EQUALS_E,
        "k < E",
        _swap("1 <= k <= n_experts", "1 <= k < n_experts"),
    ),
    Wrong(
        "ex02_top_k_gating",
        tk.DIFFERENTIABLE,
        "detached",
        _swap("torch.softmax(top_logits, dim=-1)", "torch.softmax(top_logits, dim=-1).detach()"),
    ),
    Wrong(
        "ex02_top_k_gating",
        tk.NO_MUTATION,
        "stabilised in place",
        _swap(
            "top_logits, indices =",
            "logits -= logits.max(-1, keepdim=True).values\n    top_logits, indices =",
        ),
    ),
    Wrong(
        "ex02_noisy_logits",
        tk.EQ4,
        "exp scale",
        _swap("F.softplus(x @ w_noise)", "torch.exp(x @ w_noise)"),
    ),
    Wrong(
        "ex02_noisy_logits",
        tk.NOISE_NONE,
        "draws its own noise",
        _swap("        return clean\n", "        noise = torch.randn_like(clean)\n"),
    ),
    Wrong(
        "ex02_noisy_logits",
        tk.NO_MUTATION,
        "scales noise in place",
        _swap(
            "return clean + noise * F.softplus(x @ w_noise)",
            "noise *= F.softplus(x @ w_noise)\n    return clean + noise",
        ),
    ),
    Wrong(
        "ex02_sparse_moe",
        tk.SPARSE_MIX,
        "renormalised",
        _swap(
            "y = torch.zeros_like(x)  # (T, D)",
            "y = torch.zeros_like(x)\n    weights = weights / weights.sum(-1, keepdim=True)",
        ),
    ),
    Wrong("ex02_sparse_moe", tk.CALLS, "every expert on every token", source=SPARSE_EVERY_EXPERT),
    Wrong("ex02_sparse_moe", tk.LIST_OR_MODULE_LIST, "list only", source=SPARSE_LIST_ONLY),
    Wrong(
        "ex02_sparse_moe",
        tk.NO_MUTATION,
        "accumulates into x",
        _swap("    return y\n", "    x.mul_(1.0).add_(y)\n    return y\n"),
    ),
    Wrong(
        "ex02_moe_flops",
        tk.FLOPS,
        "router per choice",
        _swap(
            "router = 2 * n_tokens * d_model * n_experts",
            "router = 2 * n_tokens * d_model * n_experts * k",
        ),
    ),
    Wrong("ex02_moe_flops", tk.FLOPS_LARGE, "float32 arithmetic", source=FLOPS_FLOAT),
    # 03
    Wrong("ex03_cv_squared", lb.CV, "sample variance", source=CV_SAMPLE_VAR),
    Wrong("ex03_cv_squared", lb.CV_SINGLE, "a Python 0.0 for one element", source=CV_SINGLE_FLOAT),
    Wrong("ex03_cv_squared", lb.CV_ZEROS, "no epsilon", source=CV_NO_EPS),
    Wrong("ex03_cv_squared", lb.DIFFERENTIABLE, "numpy", source=CV_NUMPY),
    Wrong("ex03_cv_squared", lb.NO_MUTATION, "deviations in place", source=CV_IN_PLACE),
    Wrong(
        "ex03_importance_loss",
        lb.IMPORTANCE,
        "sum over experts",
        _swap("gates.sum(dim=0)", "gates.sum(dim=1)"),
    ),
    Wrong(
        "ex03_importance_loss",
        lb.DEFAULT_WEIGHT,
        "weight ignored",
        _swap(
            "return w_importance * cv_squared(importance)", "return 0.01 * cv_squared(importance)"
        ),
    ),
    Wrong(
        "ex03_importance_loss",
        lb.NO_MUTATION,
        "normalised in place",
        _swap(
            "importance = gates.sum(dim=0)",
            "gates /= gates.sum()\n    importance = gates.sum(dim=0)",
        ),
    ),
    Wrong(
        "ex03_load_loss",
        lb.LOAD,
        "threshold including i",
        _swap("threshold = torch.where(in_top_k, after, kth)", "threshold = kth"),
    ),
    Wrong("ex03_load_loss", lb.LOAD_K_E, "no k = E case", _swap("if k >= n_experts:", "if False:")),
    Wrong(
        "ex03_load_loss",
        lb.DEFAULT_WEIGHT,
        "weight ignored",
        _swap("return w_load * cv_squared", "return 0.01 * cv_squared"),
    ),
    Wrong(
        "ex03_load_loss",
        lb.DIFFERENTIABLE,
        "detached CDF",
        _swap(
            "z = (clean_logits - threshold) / noise_std",
            "z = ((clean_logits - threshold) / noise_std).detach()",
        ),
    ),
    Wrong(
        "ex03_load_loss",
        lb.NO_MUTATION,
        "noise_std floored in place",
        _swap(
            "z = (clean_logits - threshold) / noise_std",
            "noise_std.clamp_(min=0.5)\n        z = (clean_logits - threshold) / noise_std",
        ),
    ),
    Wrong(
        "ex03_switch_aux_loss",
        lb.SWITCH,
        "HF's K times",
        _swap("/ indices.numel()", "/ indices.shape[0]"),
    ),
    Wrong(
        "ex03_switch_aux_loss",
        lb.SWITCH_UNIFORM,
        "without the factor E",
        _swap("return n_experts * (f * p).sum()", "return (f * p).sum()"),
    ),
    Wrong(
        "ex03_switch_aux_loss",
        lb.DIFFERENTIABLE,
        "P detached",
        _swap("router_probs.mean(dim=0)", "router_probs.detach().mean(dim=0)"),
    ),
    Wrong(
        "ex03_router_z_loss",
        lb.Z_LOSS,
        "not squared",
        _swap("(log_partition**2).mean()", "log_partition.mean()"),
    ),
    Wrong("ex03_router_z_loss", lb.Z_OVERFLOW, "log(exp(l).sum())", source=Z_OVERFLOW),
    Wrong("ex03_router_z_loss", lb.NO_MUTATION, "stabilised in place", source=Z_IN_PLACE),
    Wrong("ex03_expert_capacity", lb.CAPACITY, "rounds down", _swap("math.ceil", "math.floor")),
    Wrong(
        "ex03_expert_capacity",
        lb.CAPACITY_ERROR,
        "no ValueError",
        _swap("if not capacity_factor > 0:", "if capacity_factor is None:"),
    ),
    Wrong(
        "ex03_capacity_positions", lb.GSHARD_PRIORITY, "token order", source=POSITIONS_TOKEN_ORDER
    ),
    Wrong(
        "ex03_capacity_positions", lb.NO_MUTATION, "transposed in place", source=POSITIONS_IN_PLACE
    ),
    Wrong(
        "ex03_apply_capacity",
        lb.DROP,
        "renormalised",
        _swap(
            "return torch.where(keep, weights, torch.zeros_like(weights)), keep",
            "w = torch.where(keep, weights, torch.zeros_like(weights))\n"
            "    return w / w.sum(-1, keepdim=True).clamp_min(1e-9), keep",
        ),
    ),
    Wrong(
        "ex03_apply_capacity",
        lb.DROPPED_EVERYWHERE,
        "dropped token keeps its best expert",
        _swap(
            "keep = capacity_positions(indices, n_experts) < capacity  # (T, K)",
            "keep = capacity_positions(indices, n_experts) < capacity\n"
            "    keep[:, 0] |= ~keep.any(-1)  # never drop a token entirely",
        ),
    ),
    Wrong("ex03_apply_capacity", lb.NO_MUTATION, "zeroed in place", source=APPLY_IN_PLACE),
    # 04
    Wrong("ex04_expert_choice_capacity", ec.EC_CAPACITY, "round", _swap("math.ceil(", "round(")),
    Wrong(
        "ex04_expert_choice_routing",
        ec.EC_ROUTING,
        "softmax over tokens",
        _swap("torch.softmax(logits, dim=-1)", "torch.softmax(logits, dim=0)"),
    ),
    Wrong(
        "ex04_expert_choice_routing",
        ec.ALL_TOKENS,
        "capacity - 1 when full",
        _swap(
            "scores.topk(capacity, dim=0)", "scores.topk(min(capacity, scores.shape[0] - 1), dim=0)"
        ),
    ),
    Wrong(
        "ex04_expert_choice_routing",
        ec.NO_MUTATION,
        "stabilised in place",
        source=EC_ROUTING_IN_PLACE,
    ),
    Wrong("ex04_expert_choice_moe", ec.EC_MIX, "overwrites", source=EC_MOE_OVERWRITE),
    Wrong("ex04_expert_choice_moe", ec.EC_CALLS, "every token", source=EC_MOE_EVERY_TOKEN),
    Wrong("ex04_expert_choice_moe", ec.LIST_OR_MODULE_LIST, "list only", source=EC_MOE_LIST_ONLY),
    Wrong(
        "ex04_expert_choice_moe",
        ec.NO_MUTATION,
        "gates normalised in place",
        _swap(
            "y = torch.zeros_like(x)  # (T, D): tokens no expert picked stay 0",
            "y = torch.zeros_like(x)\n    gates /= gates.sum()",
        ),
    ),
    Wrong(
        "ex04_experts_per_token",
        ec.PER_TOKEN,
        "bincount without minlength",
        source=PER_TOKEN_BINCOUNT,
    ),
    Wrong("ex04_experts_per_token", ec.NO_MUTATION, "sorted in place", source=PER_TOKEN_IN_PLACE),
    # 05
    Wrong(
        "ex05_moe_feed_forward",
        mt.TOP_K,
        "full-softmax weights",
        _swap(
            "weights, indices = top_k_gating(logits, self.k)  # (T, K), (T, K)",
            "_, indices = top_k_gating(logits, self.k)\n"
            "            weights = torch.softmax(logits, -1).gather(1, indices)",
        ),
    ),
    Wrong(
        "ex05_moe_feed_forward",
        mt.EXPERT_CHOICE,
        "capacity with k",
        _swap(
            "capacity = expert_choice_capacity(n_tokens, n_experts, factor)",
            "capacity = expert_capacity(n_tokens, n_experts, factor, self.k)",
        ),
    ),
    Wrong(
        "ex05_moe_feed_forward",
        mt.CAPACITY_FACTOR,
        "ignores capacity_factor",
        _swap(
            "if self.capacity_factor is not None:\n                capacity",
            "if False:\n                capacity",
        ),
    ),
    Wrong(
        "ex05_moe_feed_forward",
        mt.Z,
        "z-loss 0",
        _swap("z_loss = router_z_loss(logits)", "z_loss = logits.new_zeros(())"),
    ),
    Wrong(
        "ex05_moe_feed_forward",
        mt.FIELDS_RULE,
        "returns y only",
        _swap(
            "return MoEOutput(y.reshape(x.shape), aux_loss, z_loss, logits, routing, load)",
            "return y.reshape(x.shape)",
        ),
    ),
    Wrong(
        "ex05_moe_feed_forward",
        mt.CALLS,
        "dense experts",
        _swap(
            "y = sparse_moe(flat, self.experts, weights, indices)  # (T, D)",
            "dense = torch.zeros_like(logits).scatter(1, indices, weights)\n"
            "            y = sum(dense[:, e, None] * ex(flat)\n"
            "                    for e, ex in enumerate(self.experts))",
        ),
    ),
    Wrong(
        "ex05_moe_feed_forward",
        mt.SELF_K,
        "k as self.top_k",
        (("self.k = k", "self.top_k = k"), ("self.k", "self.top_k")),
    ),
    Wrong(
        "ex05_moe_feed_forward",
        mt.DEFAULTS,
        "k defaults to 1",
        _swap("k=2, router=", "k=1, router="),
    ),
    Wrong(
        "ex05_moe_feed_forward",
        mt.ROUTER_ERROR,
        "anything else is expert choice",
        _swap('if router not in ("top_k", "expert_choice"):', "if router is None:"),
    ),
    Wrong(
        "ex05_moe_lm_loss",
        mt.LM,
        "weights swapped",
        _swap("ce + aux_weight * aux + z_weight * z", "ce + z_weight * aux + aux_weight * z"),
    ),
    Wrong("ex05_moe_lm_loss", mt.DENSE, "torch.stack", source=LM_STACK),
    Wrong("ex05_moe_lm_loss", mt.NO_MUTATION, "stabilised in place", source=LM_IN_PLACE),
    # 06
    Wrong(
        "ex06_send_counts",
        ep.COUNTS,
        "round robin",
        _swap("owner = indices // (n_experts // world_size)", "owner = indices % world_size"),
    ),
    Wrong("ex06_send_counts", ep.IDLE_RANK, "no minlength", source=COUNTS_NO_MINLENGTH),
    Wrong("ex06_send_counts", ep.NO_TOKENS, "None when empty", source=COUNTS_EMPTY),
    Wrong("ex06_send_counts", ep.DIVISIBLE, "no ValueError", source=COUNTS_NO_CHECK),
    Wrong("ex06_send_counts", ep.NO_MUTATION, "ranks in place", source=COUNTS_IN_PLACE),
    Wrong(
        "ex06_permute_for_all_to_all",
        ep.PERMUTE,
        "inverse is order",
        _swap("inverse = torch.argsort(order)", "inverse = order"),
    ),
    Wrong("ex06_permute_for_all_to_all", ep.NO_TOKENS, "refuses no tokens", source=PERMUTE_EMPTY),
    Wrong(
        "ex06_permute_for_all_to_all", ep.NO_MUTATION, "sorted in place", source=PERMUTE_IN_PLACE
    ),
    Wrong(
        "ex06_expert_parallel_forward",
        ep.LAYER,
        "unweighted",
        _swap(
            "return (weights[..., None] * per_assignment).sum(1)", "return per_assignment.sum(1)"
        ),
    ),
    Wrong(
        "ex06_expert_parallel_forward",
        ep.DIFFERENTIABLE,
        "detached rows",
        _swap(
            "received = exchange(x[plan.order // k]",
            "received = exchange(x.detach()[plan.order // k]",
        ),
    ),
    Wrong(
        "ex06_expert_parallel_forward",
        ep.NO_ROWS,
        "skips idle experts",
        _swap(
            "out = torch.cat([expert(rows) for expert, rows in zip(local_experts, pieces)])",
            "out = torch.cat([expert(rows) if len(rows) else rows\n"
            "                     for expert, rows in zip(local_experts, pieces)])\n"
            "    if out.shape[0] == 0:\n        return x.new_zeros(x.shape)",
        ),
    ),
    Wrong(
        "ex06_expert_parallel_forward",
        ep.NO_TOKENS,
        "returns early without tokens",
        _swap(
            "    # 1. route, 2. count\n",
            "    if n_tokens == 0:\n        return x.new_zeros(x.shape)\n",
        ),
    ),
    Wrong(
        "ex06_expert_parallel_forward",
        ep.NO_MUTATION,
        "w_gate scaled in place",
        _swap(
            "    # 1. route, 2. count\n", "    with torch.no_grad():\n        w_gate.mul_(1.0001)\n"
        ),
    ),
    # 07
    Wrong(
        "ex07_shared_expert_moe",
        mm.SHARED,
        "shared experts left out",
        _swap("y = y + expert(x)", "pass"),
    ),
    Wrong(
        "ex07_shared_expert_moe",
        mm.GATES,
        "renormalised",
        _swap(
            "y = sparse_moe(x, routed_experts, weights, indices)",
            "weights = weights / weights.sum(-1, keepdim=True)\n"
            "    y = sparse_moe(x, routed_experts, weights, indices)",
        ),
    ),
    Wrong(
        "ex07_shared_expert_moe",
        mm.CALLS,
        "dense routed experts",
        _swap(
            "y = sparse_moe(x, routed_experts, weights, indices)  # (T, D) routed part of eq. 9",
            "g = torch.zeros_like(scores).scatter(1, indices, weights)\n"
            "    y = sum(g[:, e, None] * ex(x) for e, ex in enumerate(routed_experts))",
        ),
    ),
    Wrong("ex07_shared_expert_moe", mm.NO_SHARED, "stacks the shared experts", source=SHARED_STACK),
    Wrong("ex07_shared_expert_moe", mm.LIST_OR_MODULE_LIST, "list only", source=SHARED_LIST_ONLY),
    Wrong(
        "ex07_shared_expert_moe",
        mm.NO_MUTATION,
        "w_gate scaled in place",
        _swap(
            "scores = torch.softmax(x @ w_gate, dim=-1)",
            "w_gate *= 1.0 / w_gate.abs().max()\n    scores = torch.softmax(x @ w_gate, dim=-1)",
        ),
    ),
    Wrong(
        "ex07_biased_top_k",
        mm.CHOSEN_BY_BIAS,
        "chosen without the bias",
        _swap("indices = (scores + bias).topk(", "indices = scores.topk("),
    ),
    Wrong(
        "ex07_biased_top_k",
        mm.UNBIASED_WEIGHTS,
        "softmax of the chosen",
        _swap(
            "weights = chosen / chosen.sum(dim=-1, keepdim=True)",
            "weights = torch.softmax(chosen, dim=-1)",
        ),
    ),
    Wrong(
        "ex07_biased_top_k",
        mm.UNBIASED_WEIGHTS,
        "weights include the bias",
        _swap("chosen = scores.gather(1, indices)", "chosen = (scores + bias).gather(1, indices)"),
    ),
    Wrong(
        "ex07_biased_top_k",
        mm.BIAS_NO_GRAD,
        "detached weights",
        _swap("return weights, indices", "return weights.detach(), indices"),
    ),
    Wrong("ex07_biased_top_k", mm.BIAS_NO_GRAD, "bias in the graph", source=BIASED_GRAD_INTO_BIAS),
    Wrong("ex07_biased_top_k", mm.NO_MUTATION, "biased in place", source=BIASED_IN_PLACE),
    Wrong(
        "ex07_aux_free_bias_update",
        mm.BIAS,
        "sign flipped",
        _swap("error = counts.mean() - counts", "error = counts - counts.mean()"),
    ),
    Wrong("ex07_aux_free_bias_update", mm.FLOAT_LOADS, "integer mean", source=BIAS_INT_ONLY),
    Wrong("ex07_aux_free_bias_update", mm.NO_MUTATION, "bias +=", source=BIAS_IN_PLACE),
    Wrong(
        "ex07_soft_moe",
        mm.SOFT,
        "dispatch over slots",
        _swap("dispatch = torch.softmax(logits, dim=0)", "dispatch = torch.softmax(logits, dim=1)"),
    ),
    Wrong(
        "ex07_soft_moe",
        mm.SLOTS,
        "interleaved slots",
        _swap("expert(slots[e * c : (e + 1) * c])", "expert(slots[e :: len(experts)])"),
    ),
    Wrong(
        "ex07_soft_moe",
        mm.SOFT_GRAD,
        "detached combine",
        _swap("return combine @ outs,", "return combine.detach() @ outs,"),
    ),
    Wrong("ex07_soft_moe", mm.LIST_OR_MODULE_LIST, "list only", source=SOFT_LIST_ONLY),
    Wrong("ex07_soft_moe", mm.NO_MUTATION, "x changed in place", source=SOFT_IN_PLACE),
    Wrong(
        "ex07_sort_by_expert",
        mm.SORT,
        "descending",
        _swap("torch.sort(flat, stable=True)", "torch.sort(flat, descending=True)"),
    ),
    Wrong("ex07_sort_by_expert", mm.IDLE, "no minlength", source=SORT_NO_MINLENGTH),
    Wrong("ex07_sort_by_expert", mm.NO_MUTATION, "sorted in place", source=SORT_IN_PLACE),
    # 08
    Wrong(
        "ex08_experts_touched",
        su.TOUCHED,
        "every assignment",
        _swap("int(torch.unique(indices).numel())", "int(indices.numel())"),
    ),
    Wrong("ex08_experts_touched", su.NO_MUTATION, "sorted in place", source=TOUCHED_IN_PLACE),
    Wrong(
        "ex08_expected_experts_touched",
        su.EXPECTED,
        "k/E and 1 - k/E swapped",
        _swap("(1.0 - k / n_experts) ** batch", "(k / n_experts) ** batch"),
    ),
    Wrong(
        "ex08_expected_experts_touched",
        su.NO_BATCH,
        "from the first token",
        source=EXPECTED_FROM_FIRST_TOKEN,
    ),
    Wrong("ex08_expected_experts_touched", su.ALL_EXPERTS, "k < E", source=EXPECTED_K_BELOW_E),
    Wrong(
        "ex08_lru_cache_hits",
        su.LRU,
        "FIFO",
        _swap("cache.move_to_end(expert)  # a hit makes it the most recently used", "pass"),
    ),
    Wrong(
        "ex08_lru_cache_hits",
        su.ZERO_CAPACITY,
        "no capacity > 0 test",
        _swap("elif capacity > 0:", "else:"),
    ),
    Wrong("ex08_lru_cache_hits", su.NO_MUTATION, "trace sorted in place", source=LRU_SORTS_TRACE),
    Wrong(
        "ex08_optimal_cache_hits",
        su.BELADY,
        "soonest evicted",
        _swap("del cache[max(cache, key=cache.get)]", "del cache[min(cache, key=cache.get)]"),
    ),
    Wrong(
        "ex08_optimal_cache_hits",
        su.ZERO_CAPACITY,
        "the staging buffer as a slot",
        (
            ("        if capacity == 0:\n            continue\n", ""),
            ("if len(cache) > capacity:", "if len(cache) > max(capacity, 1):"),
        ),
    ),
    Wrong(
        "ex08_optimal_cache_hits",
        su.NO_MUTATION,
        "trace sorted in place",
        _swap(
            "accesses = trace.flatten().tolist()",
            "accesses = trace.flatten().tolist()\n    trace.copy_(trace.sort(dim=-1).values)",
        ),
    ),
    Wrong(
        "ex08_offload_time_per_token",
        su.OFFLOAD,
        "bits",
        _swap("return misses * expert_bytes", "return 8 * misses * expert_bytes"),
    ),
    Wrong(
        "ex08_offload_time_per_token",
        su.FRACTIONAL,
        "whole misses",
        _swap("return misses * expert_bytes", "return int(misses) * expert_bytes"),
    ),
    Wrong(
        "ex08_upcycle",
        su.UPCYCLED,
        "a capacity limit",
        _swap("n_experts, k=k)", "n_experts, k=k, capacity_factor=1.25)"),
    ),
    Wrong(
        "ex08_upcycle",
        su.COPIES,
        "one module E times",
        _swap(
            "nn.ModuleList(copy.deepcopy(dense_ffn) for _ in range(n_experts))",
            "nn.ModuleList([dense_ffn] * n_experts)",
        ),
    ),
    Wrong(
        "ex08_upcycle",
        su.STEP0,
        "fresh experts",
        _swap("layer.experts = nn.ModuleList(", "_unused = nn.ModuleList("),
    ),
    Wrong(
        "ex08_upcycle", su.DENSE_UNCHANGED, "noise on the dense layer", source=UPCYCLE_NOISY_DENSE
    ),
]


def _wrong_object(case: Wrong):
    exercise = EXERCISES[case.grade_id]
    answers = solution_code.answer_cells(exercise.assignment)
    source = case.source
    if not source:
        source = answers[case.grade_id]
        for old, new in case.edits:
            assert old in source, f"{case.grade_id}: the solution no longer contains {old!r}"
            source = source.replace(old, new)
    if answers[case.grade_id].startswith("%%writefile") and not source.startswith("%%writefile"):
        source = answers[case.grade_id].split("def expert_parallel_forward")[0] + source
    ns = solution_code.namespace(exercise.assignment, {case.grade_id: source})
    return ns[exercise.symbol]


def _visible_failures(grade_id: str, obj) -> dict[str, str]:
    """probe name -> failure message, for the visible probes `obj` fails."""
    exercise = EXERCISES[grade_id]
    failed = {}
    for probe in exercise.visible:
        inputs = probe.inputs()
        try:
            judge_probe(exercise, probe, inputs, run_probe(exercise, probe, obj, inputs))
        except CheckFailure as failure:
            failed[probe.name] = failure.message
    return failed


@pytest.mark.parametrize("case", WRONG, ids=lambda c: f"{c.grade_id}-{c.why}")
def test_wrong_answer_fails_a_visible_check_of_its_rule(case: Wrong) -> None:
    exercise = EXERCISES[case.grade_id]
    probes = [p.name for p in exercise.visible if case.rule in p.rules]
    assert probes, f"no visible probe of {case.grade_id} tests {case.rule!r}"
    failed = _visible_failures(case.grade_id, _wrong_object(case))
    assert set(failed) & set(probes), (
        f"{case.why}: no visible probe of rule {case.rule!r} failed; failures: {failed}"
    )


def test_every_rule_has_a_wrong_answer() -> None:
    covered = {(c.grade_id, c.rule) for c in WRONG}
    for exercise in GRADED:
        for rule in {r for p in exercise.visible + exercise.hidden for r in p.rules}:
            assert (exercise.grade_id, rule) in covered, f"{exercise.grade_id}: {rule!r}"


def rule_table() -> str:
    """exercise -> rule -> visible / hidden probe names, as the report shows it."""
    lines = []
    for exercise in GRADED:
        rules = dict.fromkeys(r for p in exercise.visible + exercise.hidden for r in p.rules)
        for rule in rules:
            vis = [p.name for p in exercise.visible if rule in p.rules]
            hid = [p.name for p in exercise.hidden if rule in p.rules]
            lines.append(f"{exercise.grade_id} | {rule} | {'; '.join(vis)} | {'; '.join(hid)}")
    return "\n".join(lines)
