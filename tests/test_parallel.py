"""Expert parallelism (`moe_course.parallel`): the exchange bookkeeping against brute force,
and the layer on 1, 2 and 4 gloo processes against the single-process `MoEFeedForward`,
in values and in gradients."""

from __future__ import annotations

import functools

import pytest
import torch

from moe_course import Expert, MoEFeedForward, sparse_moe, top_k_gating
from moe_course.parallel import (
    ExpertParallelMoE,
    communication_volume,
    expert_parallel_forward,
    expert_parallel_sparse_moe,
    experts_per_rank,
    launch,
    local_expert_range,
    permute_for_all_to_all,
    send_counts,
)
from moe_course.parallel_workers import (
    EPCase,
    expert_parallel_worker,
    make_case,
    raise_on_rank,
    shard,
    skip_collective,
)

SHAPES = [  # (T, K, E, W)
    (1, 1, 1, 1), (7, 2, 8, 2), (13, 3, 8, 4), (20, 2, 6, 3), (5, 4, 4, 4), (0, 2, 4, 2),
]


def _indices(t: int, k: int, e: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(t, e, generator=gen).argsort(dim=1)[:, :k]  # (T, K) distinct per row


# --------------------------------------------------------------------------------------
# Pure bookkeeping against brute force
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("t,k,e,w", SHAPES)
def test_send_counts_matches_a_loop(t, k, e, w):
    indices = _indices(t, k, e, seed=t + 10 * w)
    expected = [0] * w
    for row in indices.tolist():
        for expert in row:
            expected[expert // (e // w)] += 1
    got = send_counts(indices, e, w)
    assert got.dtype == torch.int64 and got.shape == (w,)
    assert got.tolist() == expected
    assert int(got.sum()) == t * k


def test_send_counts_counts_repeated_experts_per_assignment():
    indices = torch.tensor([[3, 3], [0, 1]])  # token 0 routed twice to expert 3 (allowed)
    assert send_counts(indices, 4, 2).tolist() == [2, 2]


@pytest.mark.parametrize("t,k,e,w", SHAPES)
def test_permute_for_all_to_all_against_brute_force(t, k, e, w):
    indices = _indices(t, k, e, seed=100 + t)
    flat = indices.reshape(-1).tolist()
    order, inverse, counts = permute_for_all_to_all(indices, e, w)
    # Stable: by expert (hence by rank, experts sit in contiguous blocks), then position.
    assert order.tolist() == sorted(range(t * k), key=lambda a: (flat[a], a))
    assert sorted(order.tolist()) == list(range(t * k))
    assert torch.equal(order[inverse], torch.arange(t * k))
    assert torch.equal(inverse[order], torch.arange(t * k))
    assert torch.equal(counts, send_counts(indices, e, w))
    owner = indices.reshape(-1)[order] // (e // w)  # (T*K,) destination of each send row
    assert torch.equal(owner, torch.arange(w).repeat_interleave(counts))
    rows = torch.randn(t * k, 3)
    assert torch.equal(rows[order][inverse], rows)


def test_placement_is_contiguous_blocks():
    assert [list(local_expert_range(r, 8, 4)) for r in range(4)] == [[0, 1], [2, 3], [4, 5],
                                                                      [6, 7]]
    assert experts_per_rank(6, 3) == 2


# --------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------

def test_bad_input_raises_value_errors():
    good = torch.tensor([[0, 1], [2, 3]])
    with pytest.raises(ValueError, match="multiple of world_size; got n_experts = 6, world"):
        send_counts(good, 6, 4)
    with pytest.raises(ValueError, match=r"indices values must lie in \[0, 4\)"):
        send_counts(torch.tensor([[0, 4]]), 4, 2)
    with pytest.raises(ValueError, match="indices must have 2 dimensions"):
        permute_for_all_to_all(torch.tensor([0, 1]), 4, 2)
    with pytest.raises(ValueError, match="indices must be an integer tensor"):
        permute_for_all_to_all(good.float(), 4, 2)
    with pytest.raises(ValueError, match="world_size must be an integer with 1 <= world_size"):
        send_counts(good, 4, 0)
    with pytest.raises(ValueError, match="rank must be an integer with 0 <= rank <= 3"):
        local_expert_range(4, 8, 4)
    experts = [Expert(4, 8) for _ in range(3)]
    x = torch.randn(5, 4)
    with pytest.raises(ValueError, match=r"w_gate must be \(D, E\) with D = x.shape\[1\] = 4 "
                                         r"and E = len\(local_experts\) \* world_size = 3 \* 1"):
        expert_parallel_forward(x, torch.randn(4, 5), experts, k=2)
    with pytest.raises(ValueError, match="x must have 2 dimensions"):
        expert_parallel_forward(x[None], torch.randn(4, 3), experts, k=2)
    with pytest.raises(ValueError, match="k must be an integer with 1 <= k <= 3"):
        expert_parallel_forward(x, torch.randn(4, 3), experts, k=4)
    with pytest.raises(ValueError, match=r"weights and indices must both be \(T, K\)"):
        expert_parallel_sparse_moe(x, experts, torch.ones(5, 1), torch.zeros(5, 2).long())
    with pytest.raises(ValueError, match="local_experts must be a non-empty sequence"):
        expert_parallel_forward(x, torch.randn(4, 3), [], k=1)
    with pytest.raises(ValueError, match="capacity_factor must be a finite number > 0; got 0"):
        communication_volume(good, 4, 2, d_model=8, capacity_factor=0.0)
    with pytest.raises(ValueError, match="capacity_factor=None"):
        ExpertParallelMoE.from_layer(MoEFeedForward(4, 8, 4, capacity_factor=1.0))
    with pytest.raises(ValueError, match="router='top_k'"):
        ExpertParallelMoE.from_layer(MoEFeedForward(4, 8, 4, router="expert_choice"))
    with pytest.raises(ValueError, match=r"x must be \(B, S, D\) or \(T, D\) with D = 4"):
        ExpertParallelMoE(4, 8, 4)(torch.randn(3, 5))


def test_launch_refuses_functions_workers_cannot_import():
    with pytest.raises(ValueError, match="lambda or a nested function"):
        launch(lambda rank, world_size: rank, 2)

    def nested(rank, world_size):
        return rank

    with pytest.raises(ValueError, match="lambda or a nested function"):
        launch(nested, 2)
    def from_a_cell(rank, world_size):
        return rank

    from_a_cell.__module__, from_a_cell.__qualname__ = "__main__", "from_a_cell"  # as in Jupyter
    with pytest.raises(ValueError, match="from_a_cell is defined in __main__ .* put it in a "
                                         "module"):
        launch(from_a_cell, 2)
    with pytest.raises(ValueError, match="world_size must be an integer with 1 <= world_size"):
        launch(raise_on_rank, 0, 0)
    with pytest.raises(ValueError, match="timeout must be a finite number > 0"):
        launch(raise_on_rank, 1, 0, timeout=0)


# --------------------------------------------------------------------------------------
# One process, no process group (world size 1)
# --------------------------------------------------------------------------------------

def test_forward_without_process_group_equals_sparse_moe_in_values_and_grads():
    torch.manual_seed(0)
    experts = torch.nn.ModuleList(Expert(6, 12) for _ in range(5))
    x = torch.randn(9, 6, requires_grad=True)
    w_gate = torch.randn(6, 5, requires_grad=True)
    target = torch.randn(9, 6)
    y = expert_parallel_forward(x, w_gate, experts, k=2)
    grads = torch.autograd.grad((y * target).sum(), [x, w_gate, *experts.parameters()])
    y_ref = sparse_moe(x, experts, *top_k_gating(x @ w_gate, 2))
    ref = torch.autograd.grad((y_ref * target).sum(), [x, w_gate, *experts.parameters()])
    torch.testing.assert_close(y, y_ref)
    for got, want in zip(grads, ref, strict=True):
        torch.testing.assert_close(got, want)


def test_layer_without_process_group_equals_moe_feed_forward():
    torch.manual_seed(1)
    dense = MoEFeedForward(6, 12, n_experts=4, k=2)
    layer = ExpertParallelMoE.from_layer(dense)
    assert layer.world_size == 1 and list(layer.expert_ids) == [0, 1, 2, 3]
    x = torch.randn(2, 5, 6)
    got, want = layer(x), dense(x)
    for name in ("y", "aux_loss", "z_loss", "logits", "expert_load"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name))
    got.y.square().sum().backward()
    want.y.square().sum().backward()
    for (name, p), q in zip(layer.named_parameters(), dense.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


# --------------------------------------------------------------------------------------
# Communication volume against brute force
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("t,k,e,w", [(12, 2, 8, 4), (9, 1, 4, 2), (10, 3, 6, 3)])
@pytest.mark.parametrize("capacity_factor", [None, 0.5, 1.0, 2.0])
def test_communication_volume_against_a_loop(t, k, e, w, capacity_factor):
    indices = _indices(t, k, e, seed=7 * t + k)
    got = communication_volume(indices, e, w, d_model=5, capacity_factor=capacity_factor)
    per_rank = e // w
    rows = torch.zeros(w, w, dtype=torch.int64)
    useful = torch.zeros(w, w, dtype=torch.int64)
    for s, tokens in enumerate(torch.tensor_split(torch.arange(t), w)):
        n = len(tokens)
        cap = None if capacity_factor is None else min(n, -(-k * n * capacity_factor // e))
        fill = [0] * e
        for j in range(k):  # GShard priority: all first choices, then all second choices
            for tok in tokens.tolist():
                expert = int(indices[tok, j])
                if cap is None or fill[expert] < cap:
                    useful[s, expert // per_rank] += 1
                fill[expert] += 1
        rows[s] = useful[s] if cap is None else per_rank * int(cap)
    assert torch.equal(got.rows, rows)
    assert torch.equal(got.useful, useful)
    assert torch.equal(got.bytes, rows * 5 * 4)
    assert bool((got.useful <= got.rows).all())


def test_communication_volume_with_ample_capacity_moves_every_assignment():
    indices = _indices(16, 2, 8, seed=3)
    dropless = communication_volume(indices, 8, 4, d_model=4)
    ample = communication_volume(indices, 8, 4, d_model=4, capacity_factor=4.0)  # C = T_s
    assert int(dropless.rows.sum()) == 16 * 2
    assert torch.equal(ample.useful, dropless.rows)
    assert bool((ample.rows >= dropless.rows).all())


# --------------------------------------------------------------------------------------
# Several processes: the expert-parallel layer equals the single-process layer
# --------------------------------------------------------------------------------------

CASES = [
    EPCase(seed=0, n_tokens=24),  # random routing: uneven splits between rank pairs
    EPCase(seed=1, n_tokens=7, k=3),  # ranks hold different numbers of tokens
    EPCase(seed=2, n_tokens=10, dead_experts=(4, 5, 6, 7)),  # upper ranks receive no rows
    EPCase(seed=3, n_tokens=1),  # all but one rank hold no tokens at all
    EPCase(seed=4, n_tokens=9, k=1, favourite=3),  # every row goes to one rank (rank 1 at W=4)
]
WORLD_SIZES = [1, 2, 4]


@functools.lru_cache(maxsize=None)
def _reference(case: EPCase) -> dict:
    """The single-process layer on all tokens, with the same loss."""
    data = make_case(case)
    x = data.x.clone().requires_grad_(True)
    y = data.layer(x).y
    (y * data.target).sum().backward()
    expert_grads = {name: (p.grad if p.grad is not None else torch.zeros_like(p))
                    for name, p in data.layer.named_parameters() if name.startswith("experts.")}
    indices = top_k_gating(data.layer.gate(data.x.detach()), case.k).indices
    return {"y": y.detach(), "x_grad": x.grad,
            "gate_grad": data.layer.gate.weight.grad, "expert_grads": expert_grads,
            "indices": indices}


@pytest.mark.parametrize("w", WORLD_SIZES)
def test_cases_cover_uneven_and_empty_splits(w):
    """The cases do exercise what their comments claim (checked on the reference routing)."""
    received = []
    for case in CASES:
        indices = _reference(case)["indices"]
        sent = torch.stack([send_counts(shard(indices, r, w), case.n_experts, w)
                            for r in range(w)])  # (W, W): rank s -> rank d
        received.append(sent.sum(0))
        assert int(sent.sum()) == case.n_tokens * case.k
    if w > 1:
        assert int(received[2][-1]) == 0  # the last rank receives nothing
        assert [len(shard(torch.arange(7), r, w)) for r in range(w)] != [7 // w] * w
        assert len(shard(torch.arange(1), w - 1, w)) == 0  # a rank with no tokens
        assert int((received[4] > 0).sum()) == 1  # all-to-one


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda w: f"W={w}")
def ep_run(request):
    """One launch per world size runs every case (process start-up dominates)."""
    w = request.param
    return w, launch(expert_parallel_worker, w, CASES, timeout=120)


@pytest.mark.slow
@pytest.mark.parametrize("c", range(len(CASES)))
def test_expert_parallel_values_equal_single_process(ep_run, c):
    w, results = ep_run
    ref = _reference(CASES[c])
    torch.testing.assert_close(torch.cat([r[c]["y"] for r in results]), ref["y"])
    torch.testing.assert_close(torch.cat([r[c]["y_fn"] for r in results]), ref["y"])


@pytest.mark.slow
@pytest.mark.parametrize("c", range(len(CASES)))
def test_expert_parallel_gradients_equal_single_process(ep_run, c):
    w, results = ep_run
    ref = _reference(CASES[c])
    torch.testing.assert_close(torch.cat([r[c]["x_grad"] for r in results]), ref["x_grad"])
    # The router is replicated: its full gradient is the sum over ranks (an all-reduce).
    torch.testing.assert_close(sum(r[c]["gate_grad"] for r in results), ref["gate_grad"])
    gathered = {}
    for rank, r in enumerate(results):
        owned = {int(name.split(".")[1]) for name in r[c]["expert_grads"]}
        assert owned == set(local_expert_range(rank, CASES[c].n_experts, w))
        gathered.update(r[c]["expert_grads"])
    assert gathered.keys() == ref["expert_grads"].keys()
    for name, grad in ref["expert_grads"].items():
        torch.testing.assert_close(gathered[name], grad, msg=name)


# --------------------------------------------------------------------------------------
# The launcher when things go wrong
# --------------------------------------------------------------------------------------

@pytest.mark.slow
def test_launch_reports_a_failing_worker_and_stops_the_others():
    with pytest.raises(RuntimeError) as info:
        launch(raise_on_rank, 2, 1, timeout=60)
    message = str(info.value)
    assert "raise_on_rank failed on 2 processes (rank 1 first" in message
    assert "--- rank 1 raised:" in message
    assert "ValueError: rank 1 was told to fail" in message


@pytest.mark.slow
def test_launch_times_out_when_ranks_deadlock():
    with pytest.raises(TimeoutError, match=r"did not finish within 5 s; ranks still running: "
                                           r"\[0, 1\]"):
        launch(skip_collective, 2, 0, timeout=5)
