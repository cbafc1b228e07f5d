"""Notebooks 01-02: `Expert`, `softmax_gate`, `top_k_gating`, `noisy_logits`.

Each function is compared with an independent loop implementation on seeded, tie-free
inputs, then checked against the invariants the papers state.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from moe_course import Expert, noisy_logits, softmax_gate, top_k_gating

SEEDS = [0, 1, 2, 3]


def randn(seed: int, *shape: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def assert_tie_free(logits: torch.Tensor) -> None:
    for row in logits.tolist():
        assert len(set(row)) == len(row), "test input has tied logits"


# ---------------------------------------------------------------------------- oracles


def softmax_rows(rows: list[list[float]]) -> list[list[float]]:
    out = []
    for row in rows:
        m = max(row)
        ex = [math.exp(v - m) for v in row]
        out.append([v / sum(ex) for v in ex])
    return out


def matmul(a: list[list[float]], b: list[list[float]]) -> list[list[float]]:
    return [[sum(a[i][d] * b[d][j] for d in range(len(b))) for j in range(len(b[0]))]
            for i in range(len(a))]


def top_k_oracle(logits: torch.Tensor, k: int) -> tuple[list[list[float]], list[list[int]]]:
    """Sort each row's (value, expert) pairs in Python; softmax over the first k."""
    weights, indices = [], []
    for row in logits.tolist():
        ranked = sorted(range(len(row)), key=lambda e, row=row: row[e], reverse=True)[:k]
        kept = [row[e] for e in ranked]
        weights.append(softmax_rows([kept])[0])
        indices.append(ranked)
    return weights, indices


# ------------------------------------------------------------------------------ Expert


def test_expert_has_named_linear_layers() -> None:
    e = Expert(5, 7)
    assert isinstance(e.w_in, nn.Linear) and isinstance(e.w_out, nn.Linear)
    assert (e.w_in.in_features, e.w_in.out_features) == (5, 7)
    assert (e.w_out.in_features, e.w_out.out_features) == (7, 5)
    assert e.w_in.bias is not None and e.w_out.bias is not None


@pytest.mark.parametrize("seed", SEEDS)
def test_expert_is_linear_exact_gelu_linear(seed: int) -> None:
    torch.manual_seed(seed)
    e = Expert(4, 9).double()
    x = 3 * randn(seed, 6, 4)  # large inputs, where exact and tanh GELU differ visibly
    expected = e.w_out(nn.GELU()(e.w_in(x)))
    tanh_gelu = e.w_out(nn.GELU(approximate="tanh")(e.w_in(x)))
    torch.testing.assert_close(e(x), expected, rtol=0, atol=1e-12)
    assert not torch.allclose(e(x), tanh_gelu, rtol=0, atol=1e-6), "uses the tanh GELU"
    relu = e.w_out(torch.relu(e.w_in(x)))
    assert not torch.allclose(e(x), relu, rtol=0, atol=1e-6), "uses ReLU"


def test_expert_maps_any_leading_shape() -> None:
    e = Expert(4, 8)
    x = randn(0, 2, 3, 4, dtype=torch.float32)
    y = e(x)
    assert y.shape == (2, 3, 4)
    torch.testing.assert_close(y.reshape(6, 4), e(x.reshape(6, 4)))


# ------------------------------------------------------------------------ softmax_gate


@pytest.mark.parametrize("seed", SEEDS)
def test_softmax_gate_matches_loop(seed: int) -> None:
    x, w = randn(seed, 5, 3), randn(seed + 100, 3, 4)
    expected = softmax_rows(matmul(x.tolist(), w.tolist()))
    got = softmax_gate(x, w)
    assert got.shape == (5, 4)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(got.sum(-1), torch.ones(5, dtype=torch.float64))


# ------------------------------------------------------------------------ top_k_gating


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("k", [1, 2, 3, 6])
def test_top_k_gating_matches_sorted_lists(seed: int, k: int) -> None:
    logits = randn(seed, 7, 6)
    assert_tie_free(logits)
    weights, indices = top_k_gating(logits, k)
    exp_w, exp_i = top_k_oracle(logits, k)
    assert weights.shape == indices.shape == (7, k)
    assert indices.dtype == torch.int64
    assert indices.tolist() == exp_i
    torch.testing.assert_close(weights, torch.tensor(exp_w, dtype=torch.float64))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("k", [1, 2, 4, 5])
def test_top_k_weights_invariants(seed: int, k: int) -> None:
    logits = randn(seed, 9, 5, dtype=torch.float32)
    out = top_k_gating(logits, k)
    # Named tuple with the documented fields.
    assert out.weights is out[0] and out.indices is out[1]
    torch.testing.assert_close(out.weights.sum(-1), torch.ones(9))
    assert (out.weights[:, 1:] <= out.weights[:, :-1]).all(), "weights not descending"
    chosen = logits.gather(1, out.indices)
    assert (chosen[:, 1:] < chosen[:, :-1]).all(), "indices not in descending logit order"
    # The softmax over the k logits equals the full softmax renormalised over the k experts.
    full = torch.softmax(logits, -1).gather(1, out.indices)
    torch.testing.assert_close(out.weights, full / full.sum(-1, keepdim=True))


@pytest.mark.parametrize("seed", SEEDS)
def test_top_k_with_all_experts_is_the_dense_softmax(seed: int) -> None:
    logits = randn(seed, 6, 4)
    weights, indices = top_k_gating(logits, 4)
    dense = torch.zeros_like(logits).scatter(1, indices, weights)
    torch.testing.assert_close(dense, torch.softmax(logits, -1))


def test_top_k_weights_carry_gradient_to_the_kept_logits() -> None:
    logits = randn(0, 5, 6).requires_grad_()
    weights, indices = top_k_gating(logits, 2)
    (weights[:, 0] * torch.arange(1.0, 6.0, dtype=torch.float64)).sum().backward()
    grad = logits.grad
    assert grad is not None
    kept = torch.zeros_like(grad, dtype=torch.bool).scatter(1, indices, True)
    assert (grad[~kept] == 0).all(), "gradient leaked to logits outside the top k"
    assert (grad[kept].abs() > 0).all(), "the kept logits got no gradient"


# ------------------------------------------------------------------------ noisy_logits


@pytest.mark.parametrize("seed", SEEDS)
def test_noisy_logits_matches_loop(seed: int) -> None:
    x, wg, wn = randn(seed, 4, 3), randn(seed + 10, 3, 5), randn(seed + 20, 3, 5)
    noise = randn(seed + 30, 4, 5)
    clean = matmul(x.tolist(), wg.tolist())
    raw = matmul(x.tolist(), wn.tolist())
    expected = [[clean[t][e] + noise[t, e].item() * math.log1p(math.exp(raw[t][e]))
                 for e in range(5)] for t in range(4)]
    got = noisy_logits(x, wg, wn, noise)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize("seed", SEEDS)
def test_noisy_logits_without_noise_are_the_clean_logits(seed: int) -> None:
    x, wg, wn = randn(seed, 4, 3), randn(seed + 10, 3, 5), randn(seed + 20, 3, 5)
    clean = torch.tensor(matmul(x.tolist(), wg.tolist()), dtype=torch.float64)
    torch.testing.assert_close(noisy_logits(x, wg, wn), clean)
    torch.testing.assert_close(noisy_logits(x, wg, wn, noise=None), clean)
    torch.testing.assert_close(noisy_logits(x, wg, wn, torch.zeros(4, 5, dtype=torch.float64)),
                               clean)


def test_noisy_logits_gradient_reaches_both_router_matrices() -> None:
    x = randn(0, 4, 3)
    wg, wn = randn(1, 3, 5).requires_grad_(), randn(2, 3, 5).requires_grad_()
    noisy_logits(x, wg, wn, randn(3, 4, 5)).pow(2).sum().backward()
    assert wg.grad is not None and wg.grad.abs().sum() > 0
    assert wn.grad is not None and wn.grad.abs().sum() > 0
