"""Notebooks 03 and 05: `cv_squared`, `importance_loss`, `load_loss`, `switch_aux_loss`,
`router_z_loss`, `moe_lm_loss`.

Each loss is recomputed from plain Python (statistics, math.erf, explicit counting, list
sorting), then checked against its published special values.
"""

from __future__ import annotations

import math
import statistics
from typing import NamedTuple

import numpy as np
import pytest
import torch

from moe_course import (
    cv_squared,
    importance_loss,
    load_loss,
    moe_lm_loss,
    router_z_loss,
    switch_aux_loss,
    top_k_gating,
)

SEEDS = [0, 1, 2, 3]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed), dtype=torch.float64)


# ---------------------------------------------------------------------------- oracles


def cv_squared_oracle(values: list[float]) -> float:
    if len(values) == 1:
        return 0.0
    return statistics.pvariance(values) / (statistics.fmean(values) ** 2 + 1e-10)


def load_oracle(clean: torch.Tensor, noisy: torch.Tensor, std: torch.Tensor, k: int,
                w: float) -> float:
    t_count, e_count = clean.shape
    load = [0.0] * e_count
    for t in range(t_count):
        for i in range(e_count):
            others = [noisy[t, j].item() for j in range(e_count) if j != i]  # column i removed
            others.sort(reverse=True)
            kth = others[k - 1] if k - 1 < len(others) else -math.inf
            z = (clean[t, i].item() - kth) / std[t, i].item()
            load[i] += 0.5 * (1 + math.erf(z / math.sqrt(2)))  # Phi(z)
    return w * cv_squared_oracle(load)


def switch_oracle(probs: torch.Tensor, indices: torch.Tensor) -> float:
    t_count, e_count = probs.shape
    counts = [0] * e_count
    for row in indices.tolist():
        for e in row:
            counts[e] += 1
    total = sum(counts)
    return e_count * sum(counts[e] / total * sum(probs[t, e].item() for t in range(t_count))
                         / t_count for e in range(e_count))


# --------------------------------------------------------------------------- cv_squared


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n", [2, 3, 8])
def test_cv_squared_matches_statistics_and_numpy(seed: int, n: int) -> None:
    v = torch.rand(n, generator=gen(seed), dtype=torch.float64) * 5
    got = cv_squared(v)
    assert got.shape == ()
    assert float(got) == pytest.approx(cv_squared_oracle(v.tolist()), rel=1e-12)
    arr = v.numpy()
    assert float(got) == pytest.approx(arr.var() / (arr.mean() ** 2 + 1e-10), rel=1e-12)


def test_cv_squared_of_one_element_is_zero() -> None:
    assert float(cv_squared(torch.tensor([3.0]))) == 0.0


def test_cv_squared_is_scale_invariant_and_zero_when_balanced() -> None:
    v = torch.tensor([1.0, 2.0, 5.0], dtype=torch.float64)
    torch.testing.assert_close(cv_squared(7 * v), cv_squared(v))
    assert float(cv_squared(torch.full((4,), 2.5))) == 0.0


def test_cv_squared_uses_the_population_variance() -> None:
    # [2, 0]: population variance 1, mean 1; the sample variance would give 2.
    assert float(cv_squared(torch.tensor([2.0, 0.0]))) == pytest.approx(1.0)


# ---------------------------------------------------------------------- importance_loss


@pytest.mark.parametrize("seed", SEEDS)
def test_importance_loss_matches_column_sums(seed: int) -> None:
    logits = randn(seed, 9, 5)
    weights, indices = top_k_gating(logits, 2)
    gates = torch.zeros_like(logits).scatter(1, indices, weights)  # (T, E), zeros off top-k
    importance = [sum(row[e] for row in gates.tolist()) for e in range(5)]
    expected = cv_squared_oracle(importance)
    assert float(importance_loss(gates)) == pytest.approx(0.01 * expected, rel=1e-10)
    assert float(importance_loss(gates, 0.3)) == pytest.approx(0.3 * expected, rel=1e-10)
    assert float(importance_loss(gates, w_importance=1.0)) == pytest.approx(expected, rel=1e-10)


def test_importance_loss_gradient_reaches_the_gates() -> None:
    gates = torch.rand(6, 4, generator=gen(0), dtype=torch.float64).requires_grad_()
    importance_loss(gates).backward()
    assert gates.grad is not None and gates.grad.abs().sum() > 0


# ---------------------------------------------------------------------------- load_loss


def load_inputs(seed: int, t: int = 8, e: int = 5):
    clean = randn(seed, t, e)
    std = torch.nn.functional.softplus(randn(seed + 1, t, e)) + 0.1
    noisy = clean + randn(seed + 2, t, e) * std
    for row in noisy.tolist():
        assert len(set(row)) == len(row), "test input has tied noisy logits"
    return clean, noisy, std


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_load_loss_matches_removing_column_i(seed: int, k: int) -> None:
    clean, noisy, std = load_inputs(seed)
    got = load_loss(clean, noisy, std, k, w_load=1.0)
    assert got.shape == ()
    assert float(got) == pytest.approx(load_oracle(clean, noisy, std, k, 1.0), rel=1e-9,
                                       abs=1e-15)


def test_load_loss_default_weight_and_scaling() -> None:
    clean, noisy, std = load_inputs(5)
    unit = float(load_loss(clean, noisy, std, 2, w_load=1.0))
    assert unit > 0
    assert float(load_loss(clean, noisy, std, 2)) == pytest.approx(0.01 * unit)
    assert float(load_loss(clean, noisy, std, 2, 0.5)) == pytest.approx(0.5 * unit)


@pytest.mark.parametrize("seed", SEEDS[:2])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_load_loss_gradient_reaches_clean_logits_and_noise_std(seed: int, k: int) -> None:
    clean, noisy, std = load_inputs(seed, t=4, e=4)
    clean.requires_grad_()
    std.requires_grad_()

    def f(c, s):
        return load_loss(c, noisy, s, k, w_load=1.0)

    assert torch.autograd.gradcheck(f, (clean, std))
    f(clean, std).backward()
    assert clean.grad is not None and clean.grad.abs().sum() > 0
    assert std.grad is not None and std.grad.abs().sum() > 0


def test_load_loss_with_all_experts_chosen_is_zero_with_finite_gradients() -> None:
    clean, noisy, std = load_inputs(3, t=5, e=3)
    clean.requires_grad_()
    std.requires_grad_()
    loss = load_loss(clean, noisy, std, k=3)
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert clean.grad is not None and torch.isfinite(clean.grad).all()
    assert std.grad is not None and torch.isfinite(std.grad).all()


# ---------------------------------------------------------------------- switch_aux_loss


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("k", [1, 2, 3])
def test_switch_aux_loss_matches_explicit_counting(seed: int, k: int) -> None:
    logits = randn(seed, 12, 6)
    probs = torch.softmax(logits, -1)
    _, indices = top_k_gating(logits, k)
    got = switch_aux_loss(probs, indices)
    assert got.shape == ()
    assert float(got) == pytest.approx(switch_oracle(probs, indices), rel=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("e", [2, 4, 8])
def test_switch_aux_loss_is_one_for_a_uniform_router(seed: int, e: int) -> None:
    indices = torch.randint(0, e, (16, 1), generator=gen(seed))
    probs = torch.full((16, e), 1.0 / e, dtype=torch.float64)
    assert float(switch_aux_loss(probs, indices)) == pytest.approx(1.0)


@pytest.mark.parametrize("e", [2, 4, 8])
def test_switch_aux_loss_is_e_for_a_collapsed_router(e: int) -> None:
    probs = torch.zeros(10, e, dtype=torch.float64)
    probs[:, 1] = 1.0
    indices = torch.ones(10, 1, dtype=torch.long)
    assert float(switch_aux_loss(probs, indices)) == pytest.approx(float(e))


def test_switch_aux_loss_divides_counts_by_t_times_k() -> None:
    # Two experts, both chosen by every token: f = (1/2, 1/2), so a uniform router gives 1,
    # not K = 2 as with Hugging Face's f scaled by K.
    probs = torch.full((5, 2), 0.5)
    indices = torch.tensor([[0, 1]] * 5)
    assert float(switch_aux_loss(probs, indices)) == pytest.approx(1.0)


def test_switch_aux_loss_gradient_reaches_probs_only_through_p() -> None:
    logits = randn(2, 8, 4).requires_grad_()
    probs = torch.softmax(logits, -1)
    _, indices = top_k_gating(logits, 1)
    switch_aux_loss(probs, indices).backward()
    counts = torch.bincount(indices.flatten(), minlength=4).double()
    probs_leaf = probs.detach().requires_grad_()
    switch_aux_loss(probs_leaf, indices).backward()
    # d loss / d probs[t, e] = E * f_e / T, the same for every token.
    expected = (4 * counts / indices.numel() / 8).expand(8, 4)
    torch.testing.assert_close(probs_leaf.grad, expected)
    assert logits.grad is not None and logits.grad.abs().sum() > 0


# ------------------------------------------------------------------------ router_z_loss


@pytest.mark.parametrize("seed", SEEDS)
def test_router_z_loss_matches_loop(seed: int) -> None:
    logits = randn(seed, 7, 5) * 3
    expected = statistics.fmean(math.log(sum(math.exp(v) for v in row)) ** 2
                                for row in logits.tolist())
    assert float(router_z_loss(logits)) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("e", [1, 2, 4, 16])
def test_router_z_loss_of_zero_logits_is_log_e_squared(e: int) -> None:
    assert float(router_z_loss(torch.zeros(6, e))) == pytest.approx(math.log(e) ** 2, abs=1e-7)


def test_router_z_loss_is_stable_for_large_logits() -> None:
    logits = torch.tensor([[1000.0, 0.0], [0.0, -1000.0]])
    assert float(router_z_loss(logits)) == pytest.approx((1000.0**2 + math.log(2) ** 2) / 2)


# -------------------------------------------------------------------------- moe_lm_loss


class LayerOut(NamedTuple):
    y: torch.Tensor
    aux_loss: torch.Tensor
    z_loss: torch.Tensor


def cross_entropy_oracle(logits: torch.Tensor, targets: torch.Tensor) -> float:
    flat_logits = logits.reshape(-1, logits.shape[-1]).tolist()
    flat_targets = targets.reshape(-1).tolist()
    losses = [math.log(sum(math.exp(v) for v in row)) - row[t]
              for row, t in zip(flat_logits, flat_targets, strict=True)]
    return statistics.fmean(losses)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("aux_weight,z_weight", [(0.01, 0.001), (0.5, 0.25), (0.0, 0.0)])
def test_moe_lm_loss_matches_oracle(seed: int, aux_weight: float, z_weight: float) -> None:
    logits = randn(seed, 2, 5, 7)
    targets = torch.randint(0, 7, (2, 5), generator=gen(seed))
    aux = torch.rand(3, generator=gen(seed + 1), dtype=torch.float64)
    z = torch.rand(3, generator=gen(seed + 2), dtype=torch.float64)
    layers = [LayerOut(logits, aux[0], z[0]), (aux[1], z[1]), LayerOut(logits, aux[2], z[2])]
    got = moe_lm_loss(logits, targets, layers, aux_weight, z_weight)
    expected = (cross_entropy_oracle(logits, targets) + aux_weight * float(aux.sum())
                + z_weight * float(z.sum()))
    assert float(got) == pytest.approx(expected, rel=1e-12)


def test_moe_lm_loss_defaults_and_flat_logits() -> None:
    logits = randn(4, 6, 5)
    targets = torch.randint(0, 5, (6,), generator=gen(4))
    pair = (torch.tensor(2.0, dtype=torch.float64), torch.tensor(3.0, dtype=torch.float64))
    expected = cross_entropy_oracle(logits, targets) + 0.01 * 2.0 + 0.001 * 3.0
    assert float(moe_lm_loss(logits, targets, [pair])) == pytest.approx(expected, rel=1e-12)
    assert float(moe_lm_loss(logits, targets, [])) == pytest.approx(
        cross_entropy_oracle(logits, targets), rel=1e-12)


def test_moe_lm_loss_gradient_reaches_logits_and_aux_losses() -> None:
    logits = randn(5, 2, 3, 4).requires_grad_()
    aux = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    z = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 4, (2, 3), generator=gen(5))
    moe_lm_loss(logits, targets, [(aux, z)], aux_weight=0.1, z_weight=0.2).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    assert float(aux.grad) == pytest.approx(0.1)
    assert float(z.grad) == pytest.approx(0.2)


def test_numpy_is_only_an_oracle_here() -> None:
    # Guard against an oracle that silently agrees with anything: a clearly unbalanced load
    # must give a large cv^2 by both routes.
    v = [10.0, 0.0, 0.0, 0.0]
    assert cv_squared_oracle(v) == pytest.approx(np.var(v) / np.mean(v) ** 2)
    assert float(cv_squared(torch.tensor(v))) == pytest.approx(3.0)
