"""Notebook 07: `shared_expert_moe`, `biased_top_k`, `aux_free_bias_update`, `soft_moe`,
`sort_by_expert`.

Each is compared with a per-token (or per-slot, per-assignment) Python loop written from the
paper's equations, checked against published invariants (dispatch columns and combine rows
sum to 1, Soft MoE is permutation-equivariant and not causal, the bias update balances a
skewed router without any loss, the sort is stable and its counts sum to `T*K`), watched
with recording experts, and fed bad input.
"""

from __future__ import annotations

import math

import expert_data
import pytest
import torch
from expert_data import Recorder, randn

from moe_course import (
    aux_free_bias_update,
    dense_moe,
    shared_expert_moe,
    soft_moe,
    sort_by_expert,
    sparse_moe,
)
from moe_course.modern import ExpertOrder, SharedMoEOutput, SoftMoEOutput, biased_top_k

SEEDS = [0, 1, 2]
T, D, H = 9, 4, 6


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_experts(seed: int, n: int):
    return expert_data.make_experts(seed, n, D, H)


# ========================================================================================
# shared_expert_moe


def shared_loop(x, shared, routed, w_gate, k):
    """DeepSeekMoE eq. 9-11 token by token: softmax, sort, keep k, no renormalisation."""
    y = torch.zeros_like(x)
    for t in range(x.shape[0]):
        logits = [float(v) for v in x[t] @ w_gate]
        z = sum(math.exp(v) for v in logits)
        probs = [math.exp(v) / z for v in logits]
        best = sorted(range(len(routed)), key=lambda e: -probs[e])[:k]
        row = sum(f(x[t : t + 1])[0] for f in shared) if shared else torch.zeros_like(x[t])
        for e in best:
            row = row + probs[e] * routed[e](x[t : t + 1])[0]
        y[t] = row
    return y


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n_shared,n_routed,k", [(1, 6, 2), (2, 8, 3), (0, 5, 1)])
def test_shared_expert_moe_matches_token_loop(seed, n_shared, n_routed, k):
    x = randn(seed, T, D)
    w_gate = randn(seed + 10, D, n_routed)
    shared = list(make_experts(seed + 20, n_shared)) if n_shared else []
    routed = make_experts(seed + 30, n_routed)
    with torch.no_grad():
        out = shared_expert_moe(x, shared, routed, w_gate, k)
        expected = shared_loop(x, shared, routed, w_gate, k)
    assert isinstance(out, SharedMoEOutput)
    torch.testing.assert_close(out.y, expected)
    probs = torch.softmax(x @ w_gate, dim=-1)
    torch.testing.assert_close(out.weights, probs.gather(1, out.indices))
    assert bool((out.weights[:, :-1] >= out.weights[:, 1:]).all())  # best first
    if k < n_routed:  # not renormalised: the kept share of the softmax is below 1
        assert bool((out.weights.sum(-1) < 1).all())


def test_shared_expert_moe_with_k_equal_e_is_dense_plus_shared():
    x, w_gate = randn(3, T, D), randn(4, D, 5)
    shared, routed = make_experts(5, 2), make_experts(6, 5)
    with torch.no_grad():
        out = shared_expert_moe(x, shared, routed, w_gate, k=5)
        dense = dense_moe(x, routed, w_gate).y + shared[0](x) + shared[1](x)
    torch.testing.assert_close(out.y, dense)
    torch.testing.assert_close(out.weights.sum(-1), torch.ones(T, dtype=torch.float64))


def test_shared_experts_run_on_every_token_and_routed_ones_sparsely():
    x = randn(7, 3, D)  # 3 tokens, top-2 of 8: at least 2 routed experts stay idle
    w_gate = randn(8, D, 8)
    shared = [Recorder(0.5), Recorder(1.5)]
    routed = [Recorder(1.0 + 0.1 * e) for e in range(8)]
    out = shared_expert_moe(x, shared, routed, w_gate, k=2)
    for s in shared:
        assert len(s.calls) == 1 and torch.equal(s.calls[0], x)
    assert sum(not r.calls for r in routed) >= 2
    for e, r in enumerate(routed):
        tokens = sorted(int(t) for t in torch.nonzero((out.indices == e).any(-1)).flatten())
        if not tokens:
            assert r.calls == []
            continue
        assert len(r.calls) == 1
        assert sorted(int(torch.nonzero((x == row).all(-1)).item())
                      for row in r.calls[0]) == tokens


def test_shared_expert_moe_is_differentiable_and_pure():
    x = randn(9, 5, D).requires_grad_(True)
    w_gate = randn(10, D, 4).requires_grad_(True)
    shared, routed = make_experts(11, 1), make_experts(12, 4)
    x0, w0 = x.detach().clone(), w_gate.detach().clone()
    assert torch.autograd.gradcheck(
        lambda a, w: shared_expert_moe(a, shared, routed, w, 2).y, (x, w_gate))
    assert torch.equal(x.detach(), x0) and torch.equal(w_gate.detach(), w0)


@pytest.mark.parametrize("call,match", [
    (lambda x, s, r, w: shared_expert_moe(x, s, r, w[:, :3], 2), r"w_gate must be \(D, E\)"),
    (lambda x, s, r, w: shared_expert_moe(x, s, r, w, 0), "k must be an integer"),
    (lambda x, s, r, w: shared_expert_moe(x, s, r, w, 5), "k must be an integer"),
    (lambda x, s, r, w: shared_expert_moe(x, s, [], w, 2), "routed_experts must be"),
    (lambda x, s, r, w: shared_expert_moe(x, 3, r, w, 2), "shared_experts must be a sequence"),
    (lambda x, s, r, w: shared_expert_moe(x, [1], r, w, 2), "shared_experts must hold callable"),
    (lambda x, s, r, w: shared_expert_moe(x[0], s, r, w, 2), "x must have 2 dimensions"),
    (lambda x, s, r, w: shared_expert_moe(x.long(), s, r, w, 2), "x must be a floating-point"),
])
def test_shared_expert_moe_rejects_bad_input(call, match):
    x, w = randn(0, T, D), randn(1, D, 4)
    with pytest.raises(ValueError, match=match):
        call(x, list(make_experts(2, 1)), make_experts(3, 4), w)


# ========================================================================================
# biased_top_k


@pytest.mark.parametrize("seed", SEEDS)
def test_biased_top_k_bias_chooses_scores_weight(seed):
    scores = torch.sigmoid(randn(seed, T, 6))
    bias = randn(seed + 1, 6) * 0.3
    weights, indices = biased_top_k(scores, bias, k=3)
    for t in range(T):  # eq. 16 and 13, written out
        biased = [float(scores[t, e] + bias[e]) for e in range(6)]
        best = sorted(range(6), key=lambda e: -biased[e])[:3]
        assert indices[t].tolist() == best
        chosen = [float(scores[t, e]) for e in best]
        torch.testing.assert_close(weights[t], torch.tensor(chosen, dtype=torch.float64)
                                   / sum(chosen))
    plain = biased_top_k(scores, torch.zeros(6, dtype=torch.float64), k=3)
    assert torch.equal(plain.indices, scores.topk(3, dim=-1).indices)


def test_biased_top_k_gradient_reaches_scores_not_bias():
    scores = torch.sigmoid(randn(4, T, 5)).requires_grad_(True)
    bias = (randn(5, 5) * 0.2).requires_grad_(True)
    weights, _ = biased_top_k(scores, bias, k=2)
    (weights * randn(6, T, 2)).sum().backward()
    assert scores.grad is not None and bool(scores.grad.abs().sum() > 0)
    assert bias.grad is None


def test_biased_top_k_invariants():
    scores = torch.sigmoid(randn(7, T, 6))
    bias = randn(8, 6) * 0.3
    before = (scores.clone(), bias.clone())
    weights, indices = biased_top_k(scores, bias, k=3)
    torch.testing.assert_close(weights.sum(-1), torch.ones(T, dtype=scores.dtype))
    assert bool((weights > 0).all())
    assert torch.equal(scores, before[0]) and torch.equal(bias, before[1])  # not mutated
    shifted = biased_top_k(scores, bias + 5.0, k=3)  # only differences of the bias matter
    assert torch.equal(shifted.indices, indices)
    torch.testing.assert_close(shifted.weights, weights)
    sharper = biased_top_k(scores, bias * 100, k=3)  # a huge bias decides alone ...
    assert torch.equal(sharper.indices, (bias * 100).expand(T, -1).topk(3, -1).indices)
    # ... but still never enters the weights
    torch.testing.assert_close(sharper.weights.sum(-1), torch.ones(T, dtype=scores.dtype))


@pytest.mark.parametrize("scores,bias,k,match", [
    (-torch.ones(2, 3), torch.zeros(3), 1, "scores must be non-negative"),
    (torch.ones(2, 3), torch.zeros(4), 1, r"bias must be \(E,\)"),
    (torch.ones(2, 3), torch.zeros(3), 4, "k must be an integer"),
    (torch.zeros(2, 3), torch.zeros(3), 2, "positive total score"),
])
def test_biased_top_k_rejects_bad_input(scores, bias, k, match):
    with pytest.raises(ValueError, match=match):
        biased_top_k(scores, bias, k)


# ========================================================================================
# aux_free_bias_update


def bias_loop(bias, counts, gamma):
    mean = sum(float(c) for c in counts) / len(counts)
    out = []
    for b, c in zip(bias.tolist(), counts.tolist(), strict=True):
        step = gamma if c < mean else -gamma if c > mean else 0.0
        out.append(b + step)
    return torch.tensor(out, dtype=bias.dtype)


@pytest.mark.parametrize("seed", SEEDS)
def test_bias_update_matches_loop(seed):
    bias = randn(seed, 8)
    counts = torch.randint(0, 20, (8,), generator=gen(seed))
    counts[3] = 100  # one overloaded expert
    counts[5] = 0  # one idle expert
    new = aux_free_bias_update(bias, counts, gamma=0.01)
    torch.testing.assert_close(new, bias_loop(bias, counts, 0.01))
    assert new[3] < bias[3] and new[5] > bias[5]


def test_bias_update_leaves_balanced_experts_and_gamma_zero_alone():
    bias = torch.tensor([0.1, -0.2, 0.3, 0.0])
    counts = torch.tensor([6, 2, 4, 4])  # mean 4: experts 2 and 3 exactly balanced
    new = aux_free_bias_update(bias, counts, 0.5)
    torch.testing.assert_close(new, torch.tensor([-0.4, 0.3, 0.3, 0.0]))
    assert torch.equal(aux_free_bias_update(bias, counts, 0.0), bias)
    assert torch.equal(aux_free_bias_update(bias, torch.full((4,), 7), 0.5), bias)


def test_bias_update_takes_float_loads_keeps_dtype_and_does_not_mutate():
    bias = torch.zeros(3, dtype=torch.float64)
    loads = torch.tensor([0.5, 0.3, 0.2])  # shares instead of counts: same signs
    before = bias.clone(), loads.clone()
    new = aux_free_bias_update(bias, loads, 0.1)
    assert new.dtype == torch.float64
    torch.testing.assert_close(new, torch.tensor([-0.1, 0.1, 0.1], dtype=torch.float64))
    assert torch.equal(bias, before[0]) and torch.equal(loads, before[1])
    assert new.data_ptr() != bias.data_ptr()


def test_bias_update_balances_a_skewed_router_without_aux_loss():
    """DeepSeek-V3's claim: the bias alone balances load; no loss, no gradient."""
    t, d, e, k, steps = 256, 8, 8, 2, 150
    w_gate = randn(0, d, e).float()
    skew = torch.linspace(2.0, -2.0, e)  # experts 0, 1 strongly favoured
    loads = {}
    for gamma in (0.0, 0.01):
        bias = torch.zeros(e)
        history = []
        for step in range(steps):
            x = torch.randn(t, d, generator=gen(1000 + step))
            scores = torch.sigmoid(x @ w_gate * 0.3 + skew)  # (T, E) eq. 15
            _, indices = biased_top_k(scores, bias, k)
            counts = torch.bincount(indices.reshape(-1), minlength=e)  # (E,)
            history.append(counts)
            bias = aux_free_bias_update(bias, counts, gamma)
        loads[gamma] = torch.stack(history).float()  # (steps, E)
    first = loads[0.01][0]
    assert float(first.max() / first.mean()) > 2.5 and int(first.min()) == 0  # skewed start
    for gamma, bound in ((0.0, (2.5, float("inf"))), (0.01, (0.0, 1.05))):
        late = loads[gamma][-50:].sum(0)  # (E,) the last 50 steps together
        assert bound[0] < float(late.max() / late.mean()) < bound[1], gamma
    assert float(loads[0.01][-50:].sum(0).min() / loads[0.01][-50:].sum(0).mean()) > 0.95


@pytest.mark.parametrize("bias,counts,gamma,match", [
    (torch.zeros(3), torch.ones(4), 0.1, r"expert_counts must be \(E,\)"),
    (torch.zeros(3), torch.ones(3, 1), 0.1, r"expert_counts must be a real \(E,\)"),
    (torch.zeros(3), torch.tensor([1, -1, 2]), 0.1, "non-negative"),
    (torch.zeros(3), torch.tensor([1.0, float("nan"), 2.0]), 0.1, "finite"),
    (torch.zeros(3), torch.ones(3), -0.1, "gamma must be a finite number >= 0"),
    (torch.zeros(3), torch.ones(3), float("inf"), "gamma must be a finite number >= 0"),
    (torch.zeros(3), torch.ones(3), True, "gamma must be"),
    (torch.zeros(3, dtype=torch.long), torch.ones(3), 0.1, "bias must be a floating-point"),
    (torch.zeros(0), torch.zeros(0), 0.1, "at least one expert"),
])
def test_bias_update_rejects_bad_input(bias, counts, gamma, match):
    with pytest.raises(ValueError, match=match):
        aux_free_bias_update(bias, counts, gamma)


# ========================================================================================
# soft_moe


def soft_loop(x, experts, phi, c):
    """Soft MoE eq. 1-2 slot by slot and token by token."""
    t, n_slots = x.shape[0], phi.shape[1]
    logits = x @ phi
    outs = []
    for j in range(n_slots):
        column = [math.exp(float(logits[i, j])) for i in range(t)]
        z = sum(column)
        slot = sum(column[i] / z * x[i] for i in range(t))
        outs.append(experts[j // c](slot[None])[0])
    y = torch.zeros_like(x)
    for i in range(t):
        row = [math.exp(float(logits[i, j])) for j in range(n_slots)]
        z = sum(row)
        y[i] = sum(row[j] / z * outs[j] for j in range(n_slots))
    return y


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n_experts,c", [(3, 2), (4, 1), (1, 3)])
def test_soft_moe_matches_slot_loop(seed, n_experts, c):
    x, phi = randn(seed, T, D), randn(seed + 1, D, n_experts * c)
    experts = make_experts(seed + 2, n_experts)
    with torch.no_grad():
        out = soft_moe(x, experts, phi, c)
        expected = soft_loop(x, experts, phi, c)
    assert isinstance(out, SoftMoEOutput)
    torch.testing.assert_close(out.y, expected)
    ones = torch.ones(n_experts * c, dtype=torch.float64)
    torch.testing.assert_close(out.dispatch.sum(0), ones)  # each slot: weights over tokens
    torch.testing.assert_close(out.combine.sum(1), torch.ones(T, dtype=torch.float64))
    assert bool((out.dispatch > 0).all() and (out.combine > 0).all())


def test_soft_moe_calls_each_expert_once_on_its_slots():
    x, phi = randn(4, T, D), randn(5, D, 6)
    experts = [Recorder(1.0 + e) for e in range(3)]
    out = soft_moe(x, experts, phi, slots_per_expert=2)
    slots = out.dispatch.t() @ x  # (E*C, D)
    for e, r in enumerate(experts):
        assert len(r.calls) == 1
        torch.testing.assert_close(r.calls[0], slots[2 * e : 2 * e + 2])


def test_soft_moe_is_permutation_equivariant_and_not_causal():
    x, phi = randn(6, T, D), randn(7, D, 4)
    experts = make_experts(8, 2)
    with torch.no_grad():
        y = soft_moe(x, experts, phi, 2).y
        perm = torch.randperm(T, generator=gen(0))
        torch.testing.assert_close(soft_moe(x[perm], experts, phi, 2).y, y[perm])
        later = x.clone()
        later[-1] += 1.0  # change only the last token
        moved = (soft_moe(later, experts, phi, 2).y - y).abs().amax(-1)
    assert bool((moved[:-1] > 1e-6).all())  # every earlier token's output moved


def test_soft_moe_one_slot_with_uniform_logits_averages_tokens():
    x = randn(9, T, D)
    experts = make_experts(10, 1)
    with torch.no_grad():
        out = soft_moe(x, experts, torch.zeros(D, 1, dtype=torch.float64), 1)
        expected = experts[0](x.mean(0, keepdim=True)).expand(T, D)
    torch.testing.assert_close(out.y, expected)


def test_soft_moe_is_differentiable_and_pure():
    x = randn(11, 5, D).requires_grad_(True)
    phi = randn(12, D, 4).requires_grad_(True)
    experts = make_experts(13, 2)
    x0 = x.detach().clone()
    assert torch.autograd.gradcheck(lambda a, p: soft_moe(a, experts, p, 2).y, (x, phi))
    assert torch.equal(x.detach(), x0)


@pytest.mark.parametrize("call,match", [
    (lambda x, ex, p: soft_moe(x, ex, p[:, :3], 2), r"phi must be \(D, E\*C\)"),
    (lambda x, ex, p: soft_moe(x, ex, p, 0), "slots_per_expert must be an integer"),
    (lambda x, ex, p: soft_moe(x, ex, p, 2.0), "slots_per_expert must be an int"),
    (lambda x, ex, p: soft_moe(x[:0], ex, p, 2), "at least one token"),
    (lambda x, ex, p: soft_moe(x, [], p, 2), "experts must be a non-empty"),
    (lambda x, ex, p: soft_moe(x.t(), ex, p, 2), r"phi must be \(D, E\*C\)"),
])
def test_soft_moe_rejects_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call(randn(0, T, D), make_experts(1, 2), randn(2, D, 4))


# ========================================================================================
# sort_by_expert


def sort_loop(indices, n_experts):
    flat = indices.reshape(-1).tolist()
    order = [i for e in range(n_experts) for i, v in enumerate(flat) if v == e]
    counts = [sum(1 for v in flat if v == e) for e in range(n_experts)]
    return torch.tensor(order), torch.tensor(counts)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("t,k,e", [(9, 2, 5), (40, 3, 4), (300, 1, 3), (5, 4, 16)])
def test_sort_by_expert_matches_loop_and_is_stable(seed, t, k, e):
    indices = torch.randint(0, e, (t, k), generator=gen(seed))
    before = indices.clone()
    out = sort_by_expert(indices, e)
    assert isinstance(out, ExpertOrder)
    order, counts = sort_loop(indices, e)
    assert torch.equal(out.order, order) and torch.equal(out.counts, counts)
    assert out.order.dtype == torch.int64 and out.counts.dtype == torch.int64
    assert int(out.counts.sum()) == t * k and out.counts.shape == (e,)
    flat = indices.reshape(-1)
    assert bool((flat[out.order].diff() >= 0).all())  # grouped by expert
    assert torch.equal(out.order.sort().values, torch.arange(t * k))  # a permutation
    ends = out.counts.cumsum(0)
    for ex in range(e):  # stable: ids ascend within each expert's block
        block = out.order[int(ends[ex] - out.counts[ex]) : int(ends[ex])]
        assert bool((block.diff() > 0).all())
    assert torch.equal(indices, before)


def test_sort_by_expert_counts_idle_experts_and_takes_int32():
    indices = torch.tensor([[3, 1], [1, 3]], dtype=torch.int32)
    out = sort_by_expert(indices, n_experts=6)
    assert out.order.tolist() == [1, 2, 0, 3]
    assert out.counts.tolist() == [0, 2, 0, 2, 0, 0]
    empty = sort_by_expert(torch.zeros(0, 2, dtype=torch.long), n_experts=3)
    assert empty.order.numel() == 0 and empty.counts.tolist() == [0, 0, 0]


def test_grouped_computation_from_the_sort_equals_sparse_moe():
    x = randn(14, T, D)
    experts = make_experts(15, 5)
    weights = torch.rand(T, 2, generator=gen(16), dtype=torch.float64)
    indices = torch.stack([torch.randperm(5, generator=gen(17 + t))[:2] for t in range(T)])
    order, counts = sort_by_expert(indices, 5)
    rows = x[order // 2]  # (T*K, D) grouped by expert
    outs, start = [], 0
    with torch.no_grad():
        for e, n in enumerate(counts.tolist()):
            outs.append(experts[e](rows[start : start + n]))  # one contiguous block each
            start += n
        out = torch.cat(outs) * weights.reshape(-1)[order, None]
        y = torch.zeros_like(x).index_add(0, order // 2, out)
        torch.testing.assert_close(y, sparse_moe(x, experts, weights, indices))


@pytest.mark.parametrize("indices,n,match", [
    (torch.tensor([[0, 3]]), 3, r"indices values must lie in \[0, 3\)"),
    (torch.tensor([[-1, 0]]), 3, "indices values must lie"),
    (torch.tensor([[0.0, 1.0]]), 3, "indices must be an integer tensor"),
    (torch.tensor([0, 1]), 3, "indices must have 2 dimensions"),
    (torch.tensor([[0, 1]]), 0, "n_experts must be an integer"),
])
def test_sort_by_expert_rejects_bad_input(indices, n, match):
    with pytest.raises(ValueError, match=match):
        sort_by_expert(indices, n)
