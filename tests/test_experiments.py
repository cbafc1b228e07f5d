"""`moe_course.experiments`: the seeded runners behind the notebooks' experiments.

Oracles (a loop for the dense-gather dispatch, the per-cluster linear targets), invariants
(loads sum to 1, capacity 0.5 drops at least half, the bias never gets a gradient and moves
in steps of gamma, same seed same numbers) and bad input.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from moe_course import MoEFeedForward
from moe_course.data import CharCorpus
from moe_course.experiments import (
    BALANCING,
    LM_BALANCING,
    Band,
    BiasedTopKMoE,
    NoisyTopKRegressor,
    _forward,
    band,
    clusters_task,
    over_seeds,
    steps_for,
    train_balancing,
    train_char_lm,
    train_lm_balancing,
)
from moe_course.modern import aux_free_bias_update, biased_top_k
from moe_course.train import FAST_STEPS
from moe_course.transformer import CharLM, LMConfig


@pytest.fixture(scope="module")
def corpus():
    return CharCorpus(n_chars=4000, seed=0)


@pytest.fixture(autouse=True)
def _not_grading(monkeypatch):
    monkeypatch.delenv("NBGRADER_EXECUTION", raising=False)
    monkeypatch.delenv("MOE_COURSE_GRADING", raising=False)


# ----------------------------------------------------------------------------------------
# band, over_seeds, steps_for


def test_band_is_mean_min_max():
    b = band([0.3, 0.1, 0.2])
    assert math.isclose(b.mean, 0.2) and (b.low, b.high) == (0.1, 0.3)
    assert b.values == (0.3, 0.1, 0.2) and str(b) == "0.2 [0.1, 0.3]"
    assert band([2]).overlaps(Band(1.0, 0.5, 2.0, (0.5, 2.0)))
    assert not band([3.0]).overlaps(band([1.0, 2.0]))


@pytest.mark.parametrize("values", [[], "abc", [1.0, float("nan")], [True], None, [1, "x"]])
def test_band_rejects_bad_input(values):
    with pytest.raises(ValueError, match="values must be"):
        band(values)


def test_over_seeds_bands_each_name_in_seed_order():
    out = over_seeds(lambda s: {"a": float(s), "b": 10.0 - s}, seeds=(2, 0, 1))
    assert out["a"].values == (2.0, 0.0, 1.0) and out["b"].low == 8.0


def test_over_seeds_rejects_bad_input():
    with pytest.raises(ValueError, match="same names"):
        over_seeds(lambda s: {"a": 1.0} if s else {"b": 1.0}, seeds=(0, 1))
    with pytest.raises(ValueError, match="callable"):
        over_seeds(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="seeds must be"):
        over_seeds(lambda s: {"a": 1.0}, seeds=())


def test_steps_for_shrinks_under_grading(monkeypatch):
    assert steps_for(200) == 200
    monkeypatch.setenv("MOE_COURSE_GRADING", "1")
    assert steps_for(200) == FAST_STEPS and steps_for(2) == 2
    with pytest.raises(ValueError, match="steps"):
        steps_for(0)


# ----------------------------------------------------------------------------------------
# clusters_task and the noisy top-k regressor


def test_clusters_task_targets_are_linear_per_cluster_and_deterministic():
    d = clusters_task(600, n_clusters=4, d_model=5, seed=3)
    again = clusters_task(600, n_clusters=4, d_model=5, seed=3)
    assert torch.equal(d.x, again.x) and torch.equal(d.y, again.y)
    assert not torch.equal(d.x, clusters_task(600, n_clusters=4, d_model=5, seed=4).x)
    for g in range(4):  # each cluster's targets are an exact linear function of x
        x, y = d.x[d.cluster == g].double(), d.y[d.cluster == g].double()
        coef = torch.linalg.lstsq(x, y).solution
        assert float((x @ coef - y).abs().max()) < 1e-4
    other = clusters_task(600, n_clusters=4, d_model=5, seed=3, task_seed=7)
    assert not torch.equal(d.y, other.y)  # task_seed changes the task


@pytest.mark.parametrize("kwargs,match", [
    ({"n_samples": 0}, "n_samples"), ({"n_samples": 4, "n_clusters": 0}, "n_clusters"),
    ({"n_samples": 4, "seed": -1}, "seed"), ({"n_samples": 4, "task_seed": 1.5}, "task_seed"),
])
def test_clusters_task_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        clusters_task(**kwargs)


def test_dense_gather_dispatch_equals_a_loop_over_experts():
    torch.manual_seed(0)
    model = NoisyTopKRegressor(d_model=4, d_hidden=6, n_experts=5, k=2)
    x = torch.randn(9, 4)
    weights = torch.softmax(torch.randn(9, 2), -1)
    indices = torch.stack([torch.randperm(5)[:2] for _ in range(9)])  # (T, K) distinct
    y = torch.zeros(9, 4)
    for t in range(9):
        for j in range(2):
            e = int(indices[t, j])
            h = torch.nn.functional.gelu(x[t] @ model.w_in[e] + model.b_in[e])
            y[t] += weights[t, j] * (h @ model.w_out[e])
    torch.testing.assert_close(_forward(model, x, weights, indices), model.readout(y))


def test_train_balancing_is_seeded_and_measures_consistently():
    a = train_balancing("importance + load", seed=1, steps=4)
    b = train_balancing("importance + load", seed=1, steps=4)
    assert a.val_loss == b.val_loss and torch.equal(a.load, b.load)
    for name in BALANCING:
        run = train_balancing(name, seed=0, steps=3)
        assert run.loss_curve.shape == (3,)
        torch.testing.assert_close(run.load.sum(), torch.tensor(1.0))
        assert run.max_over_mean >= 1.0 and 0.0 <= run.dropped <= 1.0
        assert run.cv_load >= 0 and run.cv_importance >= 0
    with pytest.raises(ValueError, match="balancing must be one of"):
        train_balancing("load", steps=2)


def test_train_balancing_uses_the_given_losses():
    called = []

    def importance(gates, w):
        called.append(tuple(gates.shape))
        return w * gates.sum(0).var() / gates.sum(0).mean() ** 2

    train_balancing("importance", steps=2, batch_size=16, losses={"importance_loss": importance})
    assert called == [(16, 8), (16, 8)]


@pytest.mark.slow
def test_without_balancing_the_router_collapses_and_quality_suffers():
    none = train_balancing("none", seed=0)
    both = train_balancing("importance + load", seed=0)
    assert none.max_over_mean > 2.5 > 2.0 > both.max_over_mean
    assert none.val_loss > 1.3 * both.val_loss
    assert none.dropped > 2 * both.dropped


# ----------------------------------------------------------------------------------------
# BiasedTopKMoE and the three-way LM


def test_biased_layer_chooses_with_the_bias_and_weights_without_it():
    torch.manual_seed(0)
    layer = BiasedTopKMoE(d_model=6, d_hidden=8, n_experts=5, k=2)
    layer.bias.copy_(torch.tensor([0.5, -0.5, 0.0, 0.2, 0.0]))
    x = torch.randn(2, 7, 6)
    out = layer(x)
    scores = torch.sigmoid(out.logits)
    expected = biased_top_k(scores, layer.bias, 2)
    torch.testing.assert_close(out.routing.weights, expected.weights)
    assert torch.equal(out.routing.indices, expected.indices)
    assert out.y.shape == x.shape and float(out.expert_load.sum()) == 2 * 14
    (out.y.sum() + out.aux_loss).backward()
    assert layer.gate.weight.grad is not None
    assert "bias" not in dict(layer.named_parameters())  # a buffer: no gradient, no optimiser
    layer.update_bias(torch.tensor([9.0, 1.0, 3.0, 3.0, 4.0]), gamma=0.1)
    torch.testing.assert_close(layer.bias, torch.tensor([0.4, -0.4, 0.1, 0.3, 0.0]))  # mean 4


@pytest.mark.parametrize("way", LM_BALANCING)
def test_train_lm_balancing_short_runs(corpus, way):
    run = train_lm_balancing(way, seed=0, steps=3, corpus=corpus, gamma=0.05)
    assert run.history.load.shape == (3, 1, 8) and run.max_over_mean.shape == (3,)
    assert math.isfinite(run.val_loss) and bool((run.max_over_mean >= 1 - 1e-6).all())
    steps_of_gamma = run.biases / 0.05
    torch.testing.assert_close(steps_of_gamma, steps_of_gamma.round())
    if way == "aux-free bias":
        assert bool((run.biases != 0).any())
    else:  # no update: the bias stays 0 and reroutes nothing
        assert bool((run.biases == 0).all()) and run.rerouted == 0.0


def test_train_lm_balancing_calls_the_given_functions(corpus):
    calls = {"select": 0, "update": 0}

    def select(scores, bias, k):
        calls["select"] += 1
        return biased_top_k(scores, bias, k)

    def update(bias, counts, gamma):
        calls["update"] += 1
        return aux_free_bias_update(bias, counts, gamma)

    train_lm_balancing("aux-free bias", steps=2, corpus=corpus, select=select, update=update)
    assert calls["update"] == 2 and calls["select"] >= 3  # two steps and the validation


def test_train_lm_balancing_rejects_bad_input(corpus):
    with pytest.raises(ValueError, match="balancing must be one of"):
        train_lm_balancing("bias", corpus=corpus, steps=1)
    with pytest.raises(ValueError, match="corpus must be"):
        train_lm_balancing("neither", corpus="text", steps=1)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------
# train_char_lm: capacity drops counted


def _small_lm(corpus, factor):
    config = LMConfig(vocab_size=corpus.tokenizer.vocab_size, seq_len=16, d_model=16,
                      n_heads=2, n_layers=1)
    torch.manual_seed(0)
    return CharLM(config, lambda i: MoEFeedForward(16, 16, 4, k=2, capacity_factor=factor))


def test_train_char_lm_counts_what_the_capacity_drops(corpus):
    half = train_char_lm(_small_lm(corpus, 0.5), corpus, steps=3, seq_len=16)
    assert half.dropped >= 0.5 and half.val_dropped >= 0.5  # half the slots of T K
    free = train_char_lm(_small_lm(corpus, None), corpus, steps=3, seq_len=16)
    assert free.dropped == 0.0 and free.val_dropped == 0.0
    again = train_char_lm(_small_lm(corpus, None), corpus, steps=3, seq_len=16)
    assert again.val_loss == free.val_loss and free.history.steps == 3


def test_train_char_lm_rejects_bad_input(corpus):
    with pytest.raises(ValueError, match="model must be"):
        train_char_lm("model", corpus)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="corpus must be"):
        train_char_lm(nn.Linear(2, 2), "text")  # type: ignore[arg-type]
