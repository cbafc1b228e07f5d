"""The router table: every row runs in the layer and the explorer, and a new router is one
pure function plus one row (the how-to of CONTRIBUTING.md, followed here with a hash router).
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from moe_course import MoEFeedForward, TokenChoice, top_k_gating
from moe_course.expert_choice import ExpertChoice
from moe_course.routers import ROUTERS, Router, RouterOutput, router_row, top_k_router
from moe_course.widgets import RoutingExplorer, explore

D, H, E = 6, 12, 4


# The CONTRIBUTING.md how-to, step 1: a pure function returning a RouterOutput.
def hash_router(logits, k, capacity_factor=None, select=None):
    """Hash layers (Roller et al. 2021, arXiv 2106.04426): token t goes to expert t mod E
    with weight 1, whatever the logits."""
    t, e = logits.shape
    indices = (torch.arange(t) % e)[:, None]  # (T, 1)
    weights = torch.ones(t, 1, dtype=logits.dtype)  # (T, 1)
    return RouterOutput(TokenChoice(weights, indices, torch.ones_like(indices, dtype=torch.bool)),
                        None)


# Step 2: one row in the table (here for the test's duration only).
HASH = Router("hash (Roller 2021)", hash_router, select=None, uses_k=False,
              uses_capacity=False, noisy=False)


@pytest.fixture
def with_hash(monkeypatch):
    monkeypatch.setitem(ROUTERS, "hash", HASH)


def test_a_router_added_to_the_table_runs_in_the_layer(with_hash):
    torch.manual_seed(0)
    layer = MoEFeedForward(D, H, E, k=2, router="hash")
    x = torch.randn(2, 5, D)
    out = layer(x)
    flat = x.reshape(-1, D)
    want = torch.stack([layer.experts[t % E](flat[t]) for t in range(10)])  # (T, D)
    assert_close(out.y, want.reshape(x.shape))
    assert out.routing.indices.flatten().tolist() == [t % E for t in range(10)]
    assert out.expert_load.tolist() == [3.0, 3.0, 2.0, 2.0]
    out.y.sum().backward()  # the gate gets no gradient through a hash, the experts do
    assert layer.experts[0].w_in.weight.grad is not None


def test_a_router_added_to_the_table_shows_in_the_explorer(with_hash):
    s = explore("hash", n_tokens=8, n_experts=4)
    assert s.assigned.nonzero().tolist() == [[t, t % 4] for t in range(8)]
    assert s.load.tolist() == [2.0, 2.0, 2.0, 2.0] and s.capacity is None
    ex = RoutingExplorer("hash", n_tokens=8, n_experts=4)
    assert ("hash (Roller 2021)", "hash") in ex.controls["router"].options
    assert ex.state.router == "hash" and ex.error is None
    c = ex.controls
    assert c["k"].disabled and c["capacity_factor"].disabled and c["noise_scale"].disabled
    c["router"].value = "top_k_capacity"  # enabling follows the chosen row
    assert not c["k"].disabled and not c["capacity_factor"].disabled
    c["router"].value = "hash"
    assert c["k"].disabled and ex.state.router == "hash"
    with pytest.raises(ValueError, match="no selection step"):
        explore("hash", routing_fn=top_k_gating)


def test_an_unknown_router_is_refused_by_both_naming_the_table():
    with pytest.raises(ValueError, match="router must be one of .*'expert_choice'"):
        MoEFeedForward(D, H, E, router="hash")
    with pytest.raises(ValueError, match="router must be one of"):
        explore("hash")
    with pytest.raises(ValueError, match="got 3"):
        router_row(3)


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_every_row_runs_in_the_layer_and_the_explorer(name):
    torch.manual_seed(1)
    layer = MoEFeedForward(D, H, E, k=2, router=name, capacity_factor=1.5)
    out = layer(torch.randn(3, 4, D))
    assert out.y.shape == (3, 4, D) and torch.isfinite(out.y).all()
    kind = ExpertChoice if name == "expert_choice" else TokenChoice
    assert isinstance(out.routing, kind)
    s = explore(name, n_tokens=12, n_experts=E, k=2, capacity_factor=1.0)
    assert s.expert_choice == (kind is ExpertChoice)
    assert int(s.load.sum()) + (0 if s.expert_choice else s.n_dropped) == int(s.assigned.sum())


def test_rows_compute_what_their_names_say():
    torch.manual_seed(2)
    logits = torch.randn(9, E)
    switch = ROUTERS["switch"](logits, 3, 1.0).routing  # k is the row's, not the caller's
    top1 = top_k_router(logits, 1, 1.0).routing
    assert all(torch.equal(a, b) for a, b in zip(switch, top1, strict=True))
    dense = ROUTERS["dense"](logits, 1).routing
    assert dense.indices.shape == (9, E)
    assert_close(torch.zeros(9, E).scatter(1, dense.indices, dense.weights),
                 torch.softmax(logits, -1))
    ec = ROUTERS["expert_choice"](logits, 2)  # c defaults to k
    assert ec.capacity == 5 and ec.routing.token_idx.shape == (E, 5)  # ceil(9 * 2 / 4)


def test_the_layer_with_switch_equals_top_1_and_noise_only_in_training():
    torch.manual_seed(3)
    top1 = MoEFeedForward(D, H, E, k=1, router="top_k", capacity_factor=1.0)
    switch = MoEFeedForward(D, H, E, k=3, router="switch", capacity_factor=1.0)
    switch.load_state_dict(top1.state_dict())
    x = torch.randn(10, D)
    assert_close(switch(x).y, top1(x).y)
    noisy = MoEFeedForward(D, H, E, k=2, router="noisy_top_k")
    assert noisy.w_noise is not None and not noisy.w_noise.weight.any()
    plain = MoEFeedForward(D, H, E, k=2)
    plain.load_state_dict(noisy.state_dict(), strict=False)
    noisy.eval()
    assert_close(noisy(x).y, plain(x).y)  # evaluation: the clean logits
    noisy.train()
    assert not torch.equal(noisy(x).logits, plain(x).logits)  # training: eq. 4's noise
