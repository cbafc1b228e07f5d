"""Notebook 04: `expert_choice_capacity`, `expert_choice_routing`, `expert_choice_moe`,
`experts_per_token` (Zhou et al. 2022, arXiv 2202.09368).

Routing is compared with a per-expert sort of Python lists, the mixture with a loop over
every (expert, slot) pair, and the dispatch is watched with recording experts.
"""

from __future__ import annotations

import math
from collections import Counter
from decimal import Decimal

import expert_data
import pytest
import torch

from moe_course import (
    expert_choice_capacity,
    expert_choice_moe,
    expert_choice_routing,
    experts_per_token,
)

SEEDS = [0, 1, 2, 3]
T, D, E = 10, 3, 4


def randn(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


def assert_columns_tie_free(scores: list[list[float]]) -> None:
    for e in range(len(scores[0])):
        column = [row[e] for row in scores]
        assert len(set(column)) == len(column), "test input has tied affinities"


class Recorder(expert_data.Recorder):
    """A recording expert with another nonlinearity than the shared one."""

    def f(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cos(self.scale * x) * self.scale


# ---------------------------------------------------------------------------- oracles


def softmax_rows(logits: torch.Tensor) -> list[list[float]]:
    out = []
    for row in logits.tolist():
        ex = [math.exp(v) for v in row]
        out.append([v / sum(ex) for v in ex])
    return out


def routing_oracle(logits: torch.Tensor, capacity: int):
    scores = softmax_rows(logits)
    assert_columns_tie_free(scores)
    gates, token_idx = [], []
    for e in range(logits.shape[1]):
        ranked = sorted(range(len(scores)), key=lambda t, e=e: scores[t][e], reverse=True)
        token_idx.append(ranked[:capacity])
        gates.append([scores[t][e] for t in ranked[:capacity]])
    return gates, token_idx


def moe_oracle(x, experts, gates, token_idx):
    y = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for e in range(gates.shape[0]):
            for c in range(gates.shape[1]):
                if int(token_idx[e, c]) == t:
                    y[t] = y[t] + gates[e, c] * experts[e](x[t : t + 1])[0]
    return y


def capacity_oracle(t: int, e: int, factor: float) -> int:
    exact = Decimal(t) * Decimal(str(factor)) / Decimal(e)
    return min(t, int(exact.to_integral_value(rounding="ROUND_CEILING")))


# ------------------------------------------------------------------- expert_choice_capacity


@pytest.mark.parametrize("t,e,factor,expected", [
    (10, 4, 2.0, 5), (8, 4, 1.0, 2), (9, 4, 1.0, 3), (100, 10, 1.1, 11), (4, 2, 3.0, 4),
    (5, 8, 0.5, 1),
])
def test_expert_choice_capacity_examples(t: int, e: int, factor: float, expected: int) -> None:
    assert capacity_oracle(t, e, factor) == expected
    got = expert_choice_capacity(t, e, factor)
    assert type(got) is int and got == expected


def test_expert_choice_capacity_matches_exact_arithmetic_on_a_grid() -> None:
    for factor in (0.5, 1.0, 1.1, 1.25, 2.0, 2.2, 4.0):
        for t in (1, 5, 16, 50, 100):
            for e in (1, 3, 4, 10):
                assert expert_choice_capacity(t, e, factor) == capacity_oracle(t, e, factor)


# -------------------------------------------------------------------- expert_choice_routing


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("capacity", [1, 3, 5, T])
def test_expert_choice_routing_matches_per_expert_sort(seed: int, capacity: int) -> None:
    logits = randn(seed, T, E)
    out = expert_choice_routing(logits, capacity)
    assert out.gates is out[0] and out.token_idx is out[1]
    exp_gates, exp_idx = routing_oracle(logits, capacity)
    assert out.gates.shape == out.token_idx.shape == (E, capacity)
    assert out.token_idx.tolist() == exp_idx
    torch.testing.assert_close(out.gates, torch.tensor(exp_gates, dtype=torch.float64))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("capacity", [2, 4])
def test_every_expert_takes_exactly_c_distinct_tokens(seed: int, capacity: int) -> None:
    logits = randn(seed, T, E).float()
    gates, token_idx = expert_choice_routing(logits, capacity)
    for e in range(E):
        assert len(set(token_idx[e].tolist())) == capacity
    assert (gates[:, 1:] <= gates[:, :-1]).all(), "gates not descending per expert"
    # The gates are the token-to-expert affinities S = softmax over experts.
    scores = torch.softmax(logits, -1)
    torch.testing.assert_close(gates, scores.t().gather(1, token_idx))
    counts = experts_per_token(token_idx, T)
    assert int(counts.sum()) == E * capacity


def test_expert_choice_softmax_is_over_experts_not_tokens() -> None:
    # Token 0 has the largest raw logit for expert 0 but shares it with a larger logit for
    # expert 1; token 1 is all-in on expert 0. A softmax over experts prefers token 1.
    logits = torch.tensor([[3.0, 9.0], [2.0, -5.0], [0.0, 0.5]])
    _, token_idx = expert_choice_routing(logits, 1)
    assert token_idx[0].tolist() == [1]


def test_expert_choice_gates_carry_gradient_to_the_router() -> None:
    x = randn(0, T, D)
    w_gate = randn(1, D, E).requires_grad_()
    gates, token_idx = expert_choice_routing(x @ w_gate, 3)
    experts = [Recorder(float(e + 1)) for e in range(E)]
    expert_choice_moe(x, experts, gates, token_idx).pow(2).sum().backward()
    w_ref = w_gate.detach().clone().requires_grad_()
    scores = torch.softmax(x @ w_ref, -1)
    ref_gates = scores.t().gather(1, token_idx)
    moe_oracle(x, experts, ref_gates, token_idx).pow(2).sum().backward()
    assert w_gate.grad is not None and w_gate.grad.abs().sum() > 0
    torch.testing.assert_close(w_gate.grad, w_ref.grad)


# ------------------------------------------------------------------------ expert_choice_moe


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("capacity", [1, 3, 6])
def test_expert_choice_moe_matches_loop(seed: int, capacity: int) -> None:
    x = randn(seed, T, D)
    gates, token_idx = expert_choice_routing(randn(seed + 9, T, E), capacity)
    experts = [Recorder(float(e + 1)) for e in range(E)]
    y = expert_choice_moe(x, experts, gates, token_idx)
    torch.testing.assert_close(y, moe_oracle(x, experts, gates, token_idx))
    unchosen = experts_per_token(token_idx, T) == 0
    assert torch.equal(y[unchosen], torch.zeros_like(y[unchosen]))


@pytest.mark.parametrize("seed", SEEDS)
def test_expert_choice_moe_calls_each_expert_once_on_its_c_rows(seed: int) -> None:
    x = randn(seed, T, D)
    gates, token_idx = expert_choice_routing(randn(seed + 9, T, E), 3)
    experts = [Recorder(float(e + 1)) for e in range(E)]
    expert_choice_moe(x, experts, gates, token_idx)
    for e, expert in enumerate(experts):
        assert len(expert.calls) == 1, f"expert {e} called {len(expert.calls)} times"
        assert torch.equal(expert.calls[0], x[token_idx[e]])


# ------------------------------------------------------------------------ experts_per_token


@pytest.mark.parametrize("seed", SEEDS)
def test_experts_per_token_matches_counter(seed: int) -> None:
    _, token_idx = expert_choice_routing(randn(seed, T, E), 3)
    counter = Counter(token_idx.flatten().tolist())
    got = experts_per_token(token_idx, T)
    assert got.shape == (T,) and not got.is_floating_point()
    assert got.tolist() == [counter[t] for t in range(T)]


def test_experts_per_token_counts_zero_and_several() -> None:
    token_idx = torch.tensor([[4, 1], [4, 0], [4, 1]])
    assert experts_per_token(token_idx, 6).tolist() == [1, 2, 0, 0, 3, 0]
