"""Notebook 03: `expert_capacity`, `capacity_positions`, `apply_capacity`.

Slots are checked against an explicit double loop (choice rank outer, token inner), the
capacity formula against exact decimal arithmetic, and dropping against GShard's priority
rule and its effect on `sparse_moe`.
"""

from __future__ import annotations

import math
from decimal import Decimal

import pytest
import torch

from moe_course import apply_capacity, capacity_positions, expert_capacity, sparse_moe
from moe_course.capacity import group_by_expert

SEEDS = [0, 1, 2, 3]


def routing(seed: int, t: int, k: int, e: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k-like routing: `k` distinct experts per token, descending positive weights."""
    g = torch.Generator().manual_seed(seed)
    indices = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])  # (T, K)
    weights = torch.rand(t, k, generator=g).sort(-1, descending=True).values + 0.05  # (T, K)
    return weights, indices


# ---------------------------------------------------------------------------- oracles


def capacity_oracle(t: int, e: int, factor: float, k: int = 1) -> int:
    # Decimal(str(...)) is the number as written: 1.1 is 11/10 exactly.
    exact = Decimal(k) * Decimal(t) * Decimal(str(factor)) / Decimal(e)
    return min(t, int(exact.to_integral_value(rounding="ROUND_CEILING")))


def positions_oracle(indices: torch.Tensor, n_experts: int) -> list[list[int]]:
    t, k = indices.shape
    filled = [0] * n_experts
    pos = [[-1] * k for _ in range(t)]
    for j in range(k):  # every first choice before any second choice ...
        for tok in range(t):  # ... and within a rank, in token order
            e = int(indices[tok, j])
            pos[tok][j] = filled[e]
            filled[e] += 1
    return pos


# ---------------------------------------------------------------------- expert_capacity


@pytest.mark.parametrize("t,e,factor,k,expected", [
    (10, 1, 1.1, 1, 10),  # 11 slots, capped at the 10 tokens
    (100, 10, 1.1, 1, 11),  # exactly 11, not 12 from 1.1's binary expansion
    (8, 4, 1.25, 1, 3),  # 2.5 rounds up
    (8, 4, 1.0, 2, 4),
    (12, 4, 1.0, 1, 3),  # exact: no rounding up
    (10, 3, 1.0, 1, 4),
    (3, 10, 0.1, 1, 1),  # 0.03 rounds up to one slot
    (4, 1, 2.0, 1, 4),  # capped at T
    (6, 4, 2.0, 4, 6),  # capped at T with k = E
])
def test_expert_capacity_examples(t: int, e: int, factor: float, k: int, expected: int) -> None:
    assert capacity_oracle(t, e, factor, k) == expected  # the oracle agrees with the hand value
    got = expert_capacity(t, e, factor, k)
    assert type(got) is int
    assert got == expected


@pytest.mark.parametrize("t,e,factor,expected", [(100, 10, 1.1, 11), (100, 2, 1.1, 55),
                                                  (50, 10, 2.2, 11), (180, 4, 2.2, 99)])
def test_expert_capacity_rounds_the_written_decimal(t: int, e: int, factor: float,
                                                     expected: int) -> None:
    assert math.ceil(t * factor / e) == expected + 1  # the float trap the function must avoid
    assert expert_capacity(t, e, factor) == expected


@pytest.mark.parametrize("factor", [0.3, 0.5, 1.0, 1.1, 1.25, 1.5, 2.0, 3.7])
def test_expert_capacity_matches_exact_arithmetic_on_a_grid(factor: float) -> None:
    for t in (1, 7, 16, 100):
        for e in (1, 2, 3, 8):
            for k in range(1, e + 1):
                assert expert_capacity(t, e, factor, k) == capacity_oracle(t, e, factor, k)


def test_expert_capacity_default_k_is_one() -> None:
    assert expert_capacity(16, 4, 1.0) == expert_capacity(16, 4, 1.0, 1) == 4


# ------------------------------------------------------------------- capacity_positions


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("t,k,e", [(9, 1, 3), (12, 2, 4), (10, 3, 5), (5, 4, 4)])
def test_capacity_positions_matches_double_loop(seed: int, t: int, k: int, e: int) -> None:
    _, indices = routing(seed, t, k, e)
    got = capacity_positions(indices, e)
    assert got.shape == (t, k)
    assert got.tolist() == positions_oracle(indices, e)


@pytest.mark.parametrize("seed", SEEDS)
def test_capacity_positions_with_repeated_experts(seed: int) -> None:
    indices = torch.randint(0, 3, (8, 3), generator=torch.Generator().manual_seed(seed))
    assert capacity_positions(indices, 3).tolist() == positions_oracle(indices, 3)


@pytest.mark.parametrize("seed", SEEDS)
def test_capacity_positions_number_each_experts_slots_0_to_n(seed: int) -> None:
    _, indices = routing(seed, 11, 2, 4)
    pos = capacity_positions(indices, 4)
    for e in range(4):
        slots = sorted(pos[indices == e].tolist())
        assert slots == list(range(len(slots)))


# ----------------------------------------------------------------------- apply_capacity


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("capacity", [0, 1, 2, 4, 30])
def test_apply_capacity_matches_oracle(seed: int, capacity: int) -> None:
    weights, indices = routing(seed, 12, 2, 4)
    out = apply_capacity(weights, indices, capacity)
    assert out.weights is out[0] and out.keep is out[1]
    pos = positions_oracle(indices, 4)
    keep = [[p < capacity for p in row] for row in pos]
    assert out.keep.dtype == torch.bool
    assert out.keep.tolist() == keep
    expected = [[w if kept else 0.0 for w, kept in zip(wr, kr, strict=True)]
                for wr, kr in zip(weights.tolist(), keep, strict=True)]
    assert out.weights.tolist() == expected


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("capacity", [1, 2, 3, 5])
def test_no_expert_exceeds_its_capacity(seed: int, capacity: int) -> None:
    weights, indices = routing(seed, 16, 2, 4)
    keep = apply_capacity(weights, indices, capacity).keep
    for e in range(4):
        routed = int((indices == e).sum())
        assert int((keep & (indices == e)).sum()) == min(capacity, routed)


@pytest.mark.parametrize("seed", SEEDS)
def test_kept_weights_are_not_renormalised(seed: int) -> None:
    weights, indices = routing(seed, 16, 2, 4)
    weights = weights / weights.sum(-1, keepdim=True)
    out = apply_capacity(weights, indices, 3)
    assert torch.equal(out.weights[out.keep], weights[out.keep])
    assert (out.weights[~out.keep] == 0).all()
    partly = out.keep.any(-1) & ~out.keep.all(-1)
    assert partly.any(), "test input should drop some second choices only"
    assert (out.weights[partly].sum(-1) < 1).all()


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("capacity", [1, 2, 3])
def test_gshard_priority(seed: int, capacity: int) -> None:
    """A kept assignment implies every higher-priority assignment to its expert is kept."""
    weights, indices = routing(seed, 12, 3, 4)
    keep = apply_capacity(weights, indices, capacity).keep
    t, k = indices.shape
    for t1 in range(t):
        for j1 in range(k):
            for t2 in range(t):
                for j2 in range(k):
                    earlier = (j1, t1) < (j2, t2)
                    if earlier and indices[t1, j1] == indices[t2, j2] and keep[t2, j2]:
                        assert keep[t1, j1], (f"token {t1}'s choice {j1} dropped while token "
                                              f"{t2}'s choice {j2} kept in the same expert")


def test_a_first_choice_beats_an_earlier_tokens_second_choice() -> None:
    indices = torch.tensor([[1, 0], [0, 1]])  # token 0's second choice and token 1's first
    out = apply_capacity(torch.tensor([[0.7, 0.3], [0.6, 0.4]]), indices, capacity=1)
    assert out.keep.tolist() == [[True, False], [True, False]]


# ------------------------------------------------------------- dropping and sparse_moe


def test_dropped_assignments_add_exactly_zero_to_sparse_moe() -> None:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(6, 3, generator=g, dtype=torch.float64)
    experts = [lambda v, s=s: torch.sin(s * v) + s for s in (1.0, 2.0, 3.0)]
    indices = torch.tensor([[0, 1], [0, 2], [0, 1], [0, 1], [2, 0], [1, 0]])
    weights = torch.rand(6, 2, generator=g, dtype=torch.float64) + 0.1
    out = apply_capacity(weights, indices, capacity=2)
    y = sparse_moe(x, experts, out.weights, indices)
    for t in range(6):
        expected = torch.zeros(3, dtype=torch.float64)
        for j in range(2):
            if out.keep[t, j]:
                expected = expected + weights[t, j] * experts[int(indices[t, j])](x[t])
        torch.testing.assert_close(y[t], expected)
    # Token 3 overflowed both experts (slot 3 of expert 0, slot 2 of expert 1): output 0.
    assert not out.keep[3].any()
    assert torch.equal(y[3], torch.zeros(3, dtype=torch.float64))


def test_gradient_flows_only_through_kept_weights() -> None:
    weights, indices = routing(1, 10, 2, 3)
    weights = weights.double().requires_grad_()
    out = apply_capacity(weights, indices, 3)
    (out.weights * torch.arange(1.0, 21.0, dtype=torch.float64).reshape(10, 2)).sum().backward()
    assert weights.grad is not None
    assert (weights.grad[out.keep] != 0).all()
    assert (weights.grad[~out.keep] == 0).all()


@pytest.mark.parametrize(("t", "k", "e", "capacity"), [
    (40, 3, 5, 6), (40, 3, 5, None), (1, 1, 1, 0), (7, 2, 9, 1), (64, 4, 4, 64), (33, 2, 3, 11)])
def test_group_by_expert_equals_capacity_positions_and_apply_capacity(t, k, e, capacity):
    """The fast layers' one-sort grouping (capacity.group_by_expert) against the readable
    reference functions it must equal."""
    gen = torch.Generator().manual_seed(9 + t + k + e)
    indices = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)])  # (T, K)
    plan = group_by_expert(indices, e, capacity=capacity)
    assert torch.equal(plan.positions, capacity_positions(indices, e))
    weights = torch.rand(t, k, generator=gen)
    if capacity is not None:
        assert torch.equal(plan.keep, apply_capacity(weights, indices, capacity).keep)
    else:
        assert bool(plan.keep.all())
    assert torch.equal(plan.routed, torch.bincount(indices.reshape(-1), minlength=e))
    expert_of = indices.reshape(-1)[plan.order]  # (M,)
    assert bool((expert_of[1:] >= expert_of[:-1]).all())  # grouped by expert
    assert torch.equal(plan.counts, torch.bincount(expert_of, minlength=e))
    assert torch.equal(plan.tokens, plan.order // k)
    assert sorted(plan.order.tolist()) == plan.keep.reshape(-1).nonzero().flatten().tolist()
    slot = plan.positions.reshape(-1)[plan.order]  # (M,) each expert's rows in slot order
    for ex in range(e):
        assert slot[expert_of == ex].tolist() == list(range(int(plan.counts[ex])))
