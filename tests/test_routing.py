"""Notebooks 01-02: `dense_moe`, `sparse_moe`, `moe_flops`.

The mixtures are compared with per-token loops, the dispatch is watched with recording
experts, and the FLOP count with an independent tally of multiply-adds.
"""

from __future__ import annotations

import expert_data
import pytest
import torch
from expert_data import Recorder, randn

from moe_course import dense_moe, moe_flops, sparse_moe, top_k_gating

SEEDS = [0, 1, 2]
T, D, H, E = 7, 4, 6, 5


def make_experts(seed: int, n: int = E):
    return expert_data.make_experts(seed, n, D, H)


def rows_of(batch: torch.Tensor, x: torch.Tensor) -> list[int]:
    """Which rows of `x` (all distinct) make up `batch`, as a sorted list."""
    found = []
    for row in batch:
        match = [t for t in range(x.shape[0]) if torch.equal(x[t], row)]
        assert len(match) == 1
        found.append(match[0])
    return sorted(found)


def random_routing(seed: int, k: int, n_experts: int = E) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k style routing: distinct experts per row, positive weights."""
    g = torch.Generator().manual_seed(seed)
    indices = torch.stack([torch.randperm(n_experts, generator=g)[:k] for _ in range(T)])
    weights = torch.rand(T, k, generator=g, dtype=torch.float64) + 0.1
    return weights, indices


# ---------------------------------------------------------------------------- oracles


def dense_oracle(x, experts, w_gate):
    y = torch.zeros_like(x)
    for t in range(x.shape[0]):
        gates = torch.softmax(x[t] @ w_gate, dim=-1)
        for e, expert in enumerate(experts):
            y[t] += gates[e] * expert(x[t : t + 1])[0]
    return y


def sparse_oracle(x, experts, weights, indices):
    rows = []
    for t in range(x.shape[0]):
        acc = torch.zeros_like(x[t])
        for j in range(indices.shape[1]):
            acc = acc + weights[t, j] * experts[int(indices[t, j])](x[t : t + 1])[0]
        rows.append(acc)
    return torch.stack(rows)


# --------------------------------------------------------------------------- dense_moe


@pytest.mark.parametrize("seed", SEEDS)
def test_dense_moe_matches_per_token_loop(seed: int) -> None:
    x, w_gate, experts = randn(seed, T, D), randn(seed + 50, D, E), make_experts(seed)
    out = dense_moe(x, experts, w_gate)
    assert out.y is out[0] and out.gates is out[1]
    torch.testing.assert_close(out.gates, torch.softmax(x @ w_gate, -1))
    torch.testing.assert_close(out.y, dense_oracle(x, experts, w_gate))


def test_dense_moe_gradient_reaches_the_router_through_the_gates() -> None:
    x, experts = randn(0, T, D), make_experts(0)
    w_gate = randn(1, D, E).requires_grad_()
    dense_moe(x, experts, w_gate).y.pow(2).sum().backward()
    w_ref = w_gate.detach().clone().requires_grad_()
    dense_oracle(x, experts, w_ref).pow(2).sum().backward()
    assert w_gate.grad is not None and w_gate.grad.abs().sum() > 0
    torch.testing.assert_close(w_gate.grad, w_ref.grad)


# -------------------------------------------------------------------------- sparse_moe


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("k", [1, 2, 3])
def test_sparse_moe_matches_per_token_loop(seed: int, k: int) -> None:
    x, experts = randn(seed, T, D), make_experts(seed)
    weights, indices = random_routing(seed, k)
    torch.testing.assert_close(sparse_moe(x, experts, weights, indices),
                               sparse_oracle(x, experts, weights, indices))


def test_sparse_moe_sums_a_repeated_expert() -> None:
    x, experts = randn(3, T, D), make_experts(3)
    g = torch.Generator().manual_seed(3)
    indices = torch.randint(0, 2, (T, 3), generator=g)  # repeats within rows
    weights = torch.rand(T, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(sparse_moe(x, experts, weights, indices),
                               sparse_oracle(x, experts, weights, indices))


@pytest.mark.parametrize("seed", SEEDS)
def test_sparse_moe_with_all_experts_equals_dense_moe(seed: int) -> None:
    x, w_gate, experts = randn(seed, T, D), randn(seed + 50, D, E), make_experts(seed)
    weights, indices = top_k_gating(x @ w_gate, E)
    torch.testing.assert_close(sparse_moe(x, experts, weights, indices),
                               dense_moe(x, experts, w_gate).y)


@pytest.mark.parametrize("seed", SEEDS)
def test_sparse_moe_calls_each_expert_once_on_exactly_its_rows(seed: int) -> None:
    x = randn(seed, T, D)
    n_experts = E + 2  # experts E and E+1 never chosen
    weights, indices = random_routing(seed, 2)
    experts = [Recorder(float(e + 1)) for e in range(n_experts)]
    sparse_moe(x, experts, weights, indices)
    for e, expert in enumerate(experts):
        expected = sorted(t for t in range(T) for j in range(2) if indices[t, j] == e)
        if not expected:
            assert expert.calls == [], f"expert {e} was called with no rows routed to it"
            continue
        assert len(expert.calls) == 1, f"expert {e} called {len(expert.calls)} times"
        assert rows_of(expert.calls[0], x) == expected


def test_sparse_moe_gradient_reaches_the_router_through_top_k_weights() -> None:
    x, experts = randn(4, T, D), make_experts(4)
    w_gate = randn(5, D, E).requires_grad_()
    weights, indices = top_k_gating(x @ w_gate, 2)
    sparse_moe(x, experts, weights, indices).pow(2).sum().backward()
    w_ref = w_gate.detach().clone().requires_grad_()
    ref_w, ref_i = top_k_gating(x @ w_ref, 2)
    sparse_oracle(x, experts, ref_w, ref_i).pow(2).sum().backward()
    assert w_gate.grad is not None and w_gate.grad.abs().sum() > 0
    torch.testing.assert_close(w_gate.grad, w_ref.grad)


def test_sparse_moe_gradient_reaches_the_experts() -> None:
    x, experts = randn(6, T, D), make_experts(6)
    weights, indices = random_routing(6, 1)
    sparse_moe(x, experts, weights, indices).sum().backward()
    used = set(indices.flatten().tolist())
    for e, expert in enumerate(experts):
        grad = expert.w_in.weight.grad
        if e in used:
            assert grad is not None and grad.abs().sum() > 0
        else:
            assert grad is None or (grad == 0).all()


# --------------------------------------------------------------------------- moe_flops


def flops_by_tally(t: int, d: int, h: int, e: int, k: int) -> int:
    """Count multiply-adds one matmul at a time, 2 FLOPs each."""
    macs = 0
    for _ in range(t):
        macs += d * e  # router logits of one token
        for _ in range(k):
            macs += d * h  # w_in of one chosen expert
            macs += h * d  # w_out
    return 2 * macs


@pytest.mark.parametrize("t,d,h,e,k", [(1, 1, 1, 1, 1), (10, 4, 8, 16, 2), (32, 8, 32, 8, 1),
                                       (5, 3, 7, 4, 4), (64, 16, 64, 32, 3)])
def test_moe_flops_matches_a_tally(t: int, d: int, h: int, e: int, k: int) -> None:
    got = moe_flops(t, d, h, e, k)
    assert type(got) is int
    assert got == flops_by_tally(t, d, h, e, k)


def test_moe_flops_expert_term_does_not_grow_with_experts() -> None:
    router = [2 * 8 * 4 * e for e in (4, 8, 64)]
    totals = [moe_flops(8, 4, 16, e, 2) for e in (4, 8, 64)]
    assert len({total - r for total, r in zip(totals, router, strict=True)}) == 1
