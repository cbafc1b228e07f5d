"""The teaching checks of notebook 06 (expert parallelism) must be able to fail, and fail
helpfully.

Correct implementations written differently from the reference pass the visible and hidden
checks silently; each planted mistake fails with its own message; calling the reference
(directly, wrapped, swallowing the tripwire, or through the helper that does the whole
exchange) fails with "implement it yourself"; stubs, crashes and deadlocks among the ranks
fail with a message, never a hang. The layer's checks run 2 and 4 ranks as threads of this
process (torch's threaded process group), so these tests start no process. The checks every
exercise shares (inputs, outputs across the process boundary, stubs, calling the reference)
run in tests/test_checks_common.py from this module's `CORRECT`, `ALIASES`, `order_margins`,
and the tables `MISTAKES` (planted mistakes and the words their message must hold) and
`WRONG_RETURNS`; the layer's own variants of them stay here.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import probe_data
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from probe_data import fails

from moe_course import top_k_gating
from moe_course.grading import EXERCISES, CheckFailure, check, judge_probe, run_probe
from moe_course.grading.checks import nb06_expert_parallelism as ep
from moe_course.parallel import (
    ExpertParallelMoE,
    all_to_all_rows,
    expert_parallel_sparse_moe,
    permute_for_all_to_all,
    send_counts,
)
from moe_course.parallel import expert_parallel_forward as _alias_forward

GRADED = ["ex06_send_counts", "ex06_permute_for_all_to_all", "ex06_expert_parallel_forward"]
LAYER = "ex06_expert_parallel_forward"


# ========================================================================================
# send_counts


def counts_one_hot(indices, n_experts, world_size):  # one-hot sums instead of bincount
    if n_experts % world_size != 0:
        raise ValueError(f"n_experts ({n_experts}) must be a multiple of world_size")
    owner = torch.div(indices, n_experts // world_size, rounding_mode="floor")
    return F.one_hot(owner.reshape(-1).long(), world_size).sum(0)


def counts_compare(indices, n_experts, world_size):  # broadcast comparison with every rank
    if n_experts % world_size:
        raise ValueError(f"world_size {world_size} does not divide n_experts {n_experts}")
    per_rank = n_experts // world_size
    ranks = torch.arange(world_size)
    return ((indices[..., None] // per_rank) == ranks).sum(dim=(0, 1))


def counts_tokens(indices, n_experts, world_size):
    owner = indices // (n_experts // world_size)
    return (owner[:, :, None] == torch.arange(world_size)).any(1).sum(0)


def counts_round_robin(indices, n_experts, world_size):
    return torch.bincount((indices % world_size).reshape(-1), minlength=world_size)


def counts_divide_by_w(indices, n_experts, world_size):
    return torch.bincount((indices // world_size).reshape(-1), minlength=world_size)


def counts_first_choice(indices, n_experts, world_size):
    return torch.bincount(indices[:, 0] // (n_experts // world_size), minlength=world_size)


def counts_per_expert(indices, n_experts, world_size):
    return torch.bincount(indices.reshape(-1), minlength=n_experts)


def counts_float(indices, n_experts, world_size):
    return counts_one_hot(indices, n_experts, world_size).float()


# ========================================================================================
# permute_for_all_to_all


def permute_keys(indices, n_experts, world_size):  # one unique key per assignment, a scatter
    flat = indices.reshape(-1)
    n = flat.numel()
    order = torch.argsort(flat * n + torch.arange(n))
    inverse = torch.zeros_like(order).scatter(0, order, torch.arange(n))
    return order, inverse, counts_compare(indices, n_experts, world_size)


def permute_reversed_ties(indices, n_experts, world_size):  # ties in reverse: also valid
    flat = indices.reshape(-1)
    n = flat.numel()
    order = torch.argsort(flat * n + (n - 1 - torch.arange(n)))
    return [order, torch.argsort(order), counts_one_hot(indices, n_experts, world_size)]


def permute_swapped(indices, n_experts, world_size):
    order, inverse, counts = permute_keys(indices, n_experts, world_size)
    return inverse, order, counts


def permute_column_major(indices, n_experts, world_size):
    order = torch.argsort(indices.t().reshape(-1), stable=True)
    return order, torch.argsort(order), counts_one_hot(indices, n_experts, world_size)


def permute_descending(indices, n_experts, world_size):
    order = torch.argsort(indices.reshape(-1), stable=True, descending=True)
    return order, torch.argsort(order), counts_one_hot(indices, n_experts, world_size)


def permute_by_rank_only(indices, n_experts, world_size):
    # sort by destination rank, but within a rank by expert *descending*: not grouped right
    flat = indices.reshape(-1)
    per_rank = n_experts // world_size
    key = (flat // per_rank) * n_experts + (per_rank - 1 - flat % per_rank)
    order = torch.argsort(key, stable=True)
    return order, torch.argsort(order), counts_one_hot(indices, n_experts, world_size)


def permute_inverse_is_order(indices, n_experts, world_size):
    order, _, counts = permute_keys(indices, n_experts, world_size)
    return order, order.clone(), counts


def permute_per_token(indices, n_experts, world_size):
    order = torch.argsort(indices[:, 0], stable=True)
    return order, torch.argsort(order), counts_one_hot(indices, n_experts, world_size)


def permute_counts_per_expert(indices, n_experts, world_size):
    order, inverse, _ = permute_keys(indices, n_experts, world_size)
    return order, inverse, torch.bincount(indices.reshape(-1), minlength=n_experts)


def permute_not_a_permutation(indices, n_experts, world_size):
    order, inverse, counts = permute_keys(indices, n_experts, world_size)
    return torch.zeros_like(order), inverse, counts


# ========================================================================================
# expert_parallel_forward: a correct version written differently (loops over sources and
# experts, index_add to combine), and the reference-like version with planted mistakes.


def _world(group=None):
    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _send(rows, output_split_sizes, input_split_sizes, group=None):
    if not dist.is_initialized():
        return rows
    return all_to_all_rows(rows, output_split_sizes, input_split_sizes, group)


def layer_loops(x, w_gate, local_experts, k, group=None):
    rank, w = _world(group)
    n_local = len(local_experts)
    e = n_local * w
    weights, indices = top_k_gating(x @ w_gate, k)
    flat = indices.reshape(-1)
    order = torch.argsort(flat, stable=True)
    per_expert = torch.stack([(flat == i).sum() for i in range(e)])
    counts_in = per_expert.reshape(w, n_local)
    if dist.is_initialized():  # the counts need no gradient: a plain collective will do
        received_counts = torch.empty_like(counts_in)
        dist.all_to_all_single(received_counts, counts_in, group=group)
    else:
        received_counts = counts_in
    send_split = counts_in.sum(1).tolist()
    recv_split = received_counts.sum(1).tolist()
    rows = _send(x[order // k], recv_split, send_split, group)
    # Which local expert each received row is for, source by source.
    starts = torch.cumsum(received_counts.reshape(-1), 0) - received_counts.reshape(-1)
    out = rows * 0.0
    for j, expert in enumerate(local_experts):
        where = torch.cat([torch.arange(int(starts[s * n_local + j]),
                                        int(starts[s * n_local + j])
                                        + int(received_counts[s, j])) for s in range(w)])
        out = out.index_add(0, where, expert(rows[where]))
    back = _send(out, send_split, recv_split, group)
    y = torch.zeros_like(x)
    token = order // k
    slot = order % k
    return y.index_add(0, token, weights[token, slot, None] * back)


def _layer(x, w_gate, local_experts, k, group=None, mistake=""):
    rank, w = _world(group)
    if mistake == "no_group":
        w = dist.get_world_size(group)
    n_local = len(local_experts)
    e = n_local * w
    t, d = x.shape
    weights, indices = top_k_gating(x @ w_gate, k)
    if mistake == "detached":
        weights = weights.detach()
    if mistake == "unweighted":
        weights = torch.ones_like(weights)
    plan = permute_for_all_to_all(indices, e, w)
    per_expert = torch.bincount(indices.reshape(-1), minlength=e)
    ones = [1] * w
    recv_counts = _send(per_expert.reshape(w, n_local), ones, ones, group)
    send_split, recv_split = plan.counts.tolist(), recv_counts.sum(1).tolist()
    if mistake == "no_count_exchange":
        recv_split = send_split
    if mistake == "plain_collective" and dist.is_initialized():
        rows = x.new_empty(sum(recv_split), d)
        dist.all_to_all_single(rows, x[plan.order // k], recv_split, send_split, group=group)
    else:
        rows = _send(x[plan.order // k], recv_split, send_split, group)
    local_id = torch.arange(n_local).repeat(w).repeat_interleave(recv_counts.reshape(-1))
    by_expert = torch.argsort(local_id, stable=True)
    if mistake == "no_regroup":
        by_expert = torch.arange(len(local_id))
    pieces = torch.split(rows[by_expert], recv_counts.sum(0).tolist())
    if mistake == "skip_idle":
        outs = [ex(p) for ex, p in zip(local_experts, pieces, strict=True) if len(p)]
        out = torch.cat(outs) if outs else rows.new_zeros(0, d)
    else:
        out = torch.cat([ex(p) for ex, p in zip(local_experts, pieces, strict=True)])
    out = torch.empty_like(out).index_copy(0, by_expert, out)
    if mistake == "plain_collective" and dist.is_initialized():
        back = out.new_empty(t * k, d)
        dist.all_to_all_single(back, out, send_split, recv_split, group=group)
    else:
        back = _send(out, send_split, recv_split, group)
    restore = {"no_inverse": slice(None), "order_twice": plan.order}.get(mistake, plan.inverse)
    per_assignment = back[restore].reshape(t, k, d)
    return (weights[..., None] * per_assignment).sum(1)


def layer_local_only(x, w_gate, local_experts, k, group=None):  # never exchanges anything
    rank, w = _world(group)
    n_local = len(local_experts)
    weights, indices = top_k_gating(x @ w_gate, k)
    y = torch.zeros_like(x)
    for j, expert in enumerate(local_experts):
        token, slot = torch.nonzero(indices == rank * n_local + j, as_tuple=True)
        if len(token):
            y = y.index_add(0, token, weights[token, slot, None] * expert(x[token]))
    return y


def layer_no_inverse(x, w_gate, local_experts, k, group=None):
    return _layer(x, w_gate, local_experts, k, group, mistake="no_inverse")


def layer_order_twice(x, w_gate, local_experts, k, group=None):
    return _layer(x, w_gate, local_experts, k, group, mistake="order_twice")


def layer_unweighted(x, w_gate, local_experts, k, group=None):
    return _layer(x, w_gate, local_experts, k, group, mistake="unweighted")


def layer_plain_collective(x, w_gate, local_experts, k, group=None):
    return _layer(x, w_gate, local_experts, k, group, mistake="plain_collective")


def layer_no_regroup(x, w_gate, local_experts, k, group=None):
    return _layer(x, w_gate, local_experts, k, group, mistake="no_regroup")


def layer_no_count_exchange(x, w_gate, local_experts, k, group=None):
    return _layer(x, w_gate, local_experts, k, group, mistake="no_count_exchange")


def layer_no_group(x, w_gate, local_experts, k, group=None):
    return _layer(x, w_gate, local_experts, k, group, mistake="no_group")


def layer_detached(x, w_gate, local_experts, k, group=None):
    return _layer(x, w_gate, local_experts, k, group, mistake="detached")


def layer_skip_idle(x, w_gate, local_experts, k, group=None):
    return _layer(x, w_gate, local_experts, k, group, mistake="skip_idle")


DAWDLE = threading.Event()  # set after the test: the straggling rank then goes on


def layer_rank_0_dawdles(x, w_gate, local_experts, k, group=None):  # the others wait for it
    if dist.is_initialized() and dist.get_rank(group) == 0:
        DAWDLE.wait(30)
    return layer_loops(x, w_gate, local_experts, k, group)


def layer_rank_0_leaves(x, w_gate, local_experts, k, group=None):  # skips every collective
    if dist.is_initialized() and dist.get_rank(group) == 0:
        return x * 0
    return layer_loops(x, w_gate, local_experts, k, group)


def layer_stub_on_ranks(x, w_gate, local_experts, k, group=None):  # works on one rank only
    if dist.is_initialized():
        raise NotImplementedError("the exchange")
    return layer_loops(x, w_gate, local_experts, k, group)


def layer_noisy(x, w_gate, local_experts, k, group=None):  # prints on every rank
    import sys
    import warnings

    print("rank debugging to stdout")
    print("rank debugging to stderr", file=sys.stderr)
    warnings.warn("a learner's warning", UserWarning, stacklevel=1)
    return layer_loops(x, w_gate, local_experts, k, group)


# Calling the reference, in every disguise.

def cheat_wrapper(x, w_gate, local_experts, k, group=None):
    return _alias_forward(x, w_gate, local_experts, k, group)


def cheat_sneaky(x, w_gate, local_experts, k, group=None):  # swallows the tripwire
    try:
        return _alias_forward(x, w_gate, local_experts, k, group)
    except Exception:
        return layer_loops(x, w_gate, local_experts, k, group)


def cheat_sparse(x, w_gate, local_experts, k, group=None):  # the helper doing the exchange
    weights, indices = top_k_gating(x @ w_gate, k)
    return expert_parallel_sparse_moe(x, local_experts, weights, indices, group)


def cheat_sneaky_sparse(x, w_gate, local_experts, k, group=None):
    try:
        return cheat_sparse(x, w_gate, local_experts, k, group)
    except Exception:
        return layer_loops(x, w_gate, local_experts, k, group)


def cheat_layer(x, w_gate, local_experts, k, group=None):  # the nn.Module wrapper
    rank, w = _world(group)
    layer = ExpertParallelMoE(x.shape[1], 4, len(local_experts) * w, k=k, group=group)
    with torch.no_grad():
        layer.gate.weight.copy_(w_gate.t())
    layer.experts = torch.nn.ModuleList(local_experts)
    return layer(x).y


CORRECT: dict[str, list[Any]] = {
    "ex06_send_counts": [counts_one_hot, counts_compare],
    "ex06_permute_for_all_to_all": [permute_keys, permute_reversed_ties],
    LAYER: [layer_loops],
}

MISTAKES: list[tuple[str, Any, str]] = [
    ("ex06_send_counts", counts_tokens, "you counted tokens, not assignments"),
    ("ex06_send_counts", counts_round_robin, "rank e % W (round robin)"),
    ("ex06_send_counts", counts_divide_by_w, "you placed expert e on rank e // W"),
    ("ex06_send_counts", counts_first_choice, "only each token's first choice"),
    ("ex06_send_counts", counts_per_expert, "one per expert: return one count per destination"),
    ("ex06_send_counts", counts_float, "must be an integer (int64) tensor"),
    ("ex06_permute_for_all_to_all", permute_swapped, "you swapped order and inverse"),
    ("ex06_permute_for_all_to_all", permute_column_major, "column by column"),
    ("ex06_permute_for_all_to_all", permute_descending, "descending order: sort ascending"),
    ("ex06_permute_for_all_to_all", permute_by_rank_only,
     "grouped by destination rank but not by expert"),
    ("ex06_permute_for_all_to_all", permute_inverse_is_order, "your inverse is the order itself"),
    ("ex06_permute_for_all_to_all", permute_per_token, "one entry per token"),
    ("ex06_permute_for_all_to_all", permute_counts_per_expert, "your counts have one entry per "
                                                                "expert"),
    ("ex06_permute_for_all_to_all", permute_not_a_permutation, "not a permutation"),
    (LAYER, layer_local_only, "only the experts that live on each token's own rank"),
    (LAYER, layer_no_inverse, "in the order they were sent"),
    (LAYER, layer_order_twice, "with order (rows[order])"),
    (LAYER, layer_unweighted, "not weighted by their gates"),
    (LAYER, layer_plain_collective, "gradients do not flow back through the exchange"),
    (LAYER, layer_no_regroup, "group them by local expert before calling the experts"),
    (LAYER, layer_no_count_exchange, "exchange the counts first"),
    (LAYER, layer_no_group, "with no process group (one process, world size 1)"),
    (LAYER, layer_detached, "the router w_gate gets no gradient"),
]


@pytest.fixture(autouse=True)
def _short_timeout(monkeypatch):
    # A hanging planted mistake must not hold the suite long.
    monkeypatch.setattr(ep, "RANK_TIMEOUT", 3.0)


def test_every_exercise_has_correct_implementations_and_mistakes():
    assert sorted(CORRECT) == sorted(GRADED)
    assert {g for g, _, _ in MISTAKES} == set(GRADED)
    assert sorted(g for g, ex in EXERCISES.items() if g.startswith("ex06_")) == sorted(GRADED)


@pytest.mark.parametrize("grade_id", GRADED[:2])
def test_correct_implementation_passes_silently(grade_id, capfd):
    probe_data.passes_silently(grade_id, CORRECT[grade_id], capfd)


def test_correct_layer_passes_silently_on_every_world_size(capsys):
    start = time.monotonic()
    check(LAYER, layer_loops)
    check(LAYER, layer_loops, hidden=True)
    assert time.monotonic() - start < 10  # threads, not processes: well under a second here
    out, err = capsys.readouterr()
    assert err == ""
    assert out == ("✓ expert_parallel_forward: 3 checks passed\n"
                   "✓ expert_parallel_forward: 3 hidden checks passed\n")


def test_learner_stderr_and_warnings_on_the_ranks_are_silenced(capfd):
    check(LAYER, layer_noisy)
    out, err = capfd.readouterr()
    assert err == ""
    assert out.count("rank debugging to stdout") == 5  # one process, then two ranks twice
    assert out.endswith("✓ expert_parallel_forward: 3 checks passed\n")


def test_a_function_from_a_notebook_cell_passes():
    def from_a_cell(x, w_gate, local_experts, k, group=None):
        return layer_loops(x, w_gate, local_experts, k, group)

    from_a_cell.__module__, from_a_cell.__qualname__ = "__main__", "from_a_cell"
    check(LAYER, from_a_cell)
    check(LAYER, from_a_cell, hidden=True)


def test_a_rank_that_skips_its_idle_experts_is_told_why_at_once():
    # A visible check already has a rank that receives no rows (rule NO_ROWS), so the
    # learner sees this mistake before grading; the hidden checks catch it too.
    start = time.monotonic()
    message = fails(LAYER, layer_skip_idle, hidden=False)
    assert time.monotonic() - start < 2.5  # recognised, not timed out
    assert "check '2 ranks, 1 token: rank 1 holds no tokens and receives no rows'" in message
    assert ("on 2 ranks, rank(s) 0 waited in a collective that rank(s) 1 never called"
            in message), message
    assert "must still run its experts (on 0 rows)" in message
    message = fails(LAYER, layer_skip_idle, hidden=True)
    # Rank 3 receives no rows, skips its experts, and so skips the backward exchanges.
    assert "check '4 ranks, uneven shards, rank 3 receives no rows'" in message
    assert ("on 4 ranks, rank(s) 0, 1, 2 waited in a collective that rank(s) 3 never called"
            in message), message
    assert "must still run its experts (on 0 rows)" in message


def test_a_rank_that_leaves_early_is_named():
    message = fails(LAYER, layer_rank_0_leaves, hidden=False)
    assert "rank(s) 1 waited in a collective that rank(s) 0 never called" in message, message


def test_a_hang_ends_with_the_timeout_and_an_explanation():
    start = time.monotonic()
    message = fails(LAYER, layer_rank_0_dawdles, hidden=False)
    assert time.monotonic() - start < 8
    assert "on 2 ranks your expert_parallel_forward did not finish within 3 s" in message
    assert "every rank must call the same collectives in the same order" in message
    check(LAYER, layer_loops)  # the threaded group is uninstalled: the next check works
    DAWDLE.set()  # the straggler of the stopped run wakes up and calls collectives ...
    time.sleep(0.2)
    check(LAYER, layer_loops, hidden=True)  # ... which never reach the runs after it


# ========================================================================================
# Calling the reference earns nothing; stubs, crashes and unimportable functions.


@pytest.mark.parametrize("cheat", [_alias_forward, cheat_wrapper, cheat_sneaky, cheat_sparse,
                                   cheat_sneaky_sparse, cheat_layer],
                         ids=lambda f: f.__name__)
def test_calling_the_reference_layer_earns_nothing_on_any_rank(cheat):
    assert EXERCISES[LAYER].reference is _alias_forward
    for hidden in (False, True):  # hidden: only multi-rank probes
        with pytest.raises(CheckFailure, match="implement it yourself"):
            check(LAYER, cheat, hidden=hidden)


def test_reference_layer_works_again_after_a_tripped_check():
    with pytest.raises(CheckFailure, match="implement it yourself"):
        check(LAYER, cheat_sparse, hidden=False)
    x, w_gate = torch.randn(5, 4), torch.randn(4, 2)
    experts = [torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)]
    assert _alias_forward(x, w_gate, experts, 1).shape == (5, 4)


def test_a_stub_on_the_ranks_is_not_implemented_either():
    assert "is not implemented yet" in fails(LAYER, layer_stub_on_ranks, hidden=True)


WRONG_RETURNS: list[tuple[str, Any, str]] = [
    ("ex06_send_counts", lambda i, e, w: int(i.numel()), "you returned a Python int"),
    ("ex06_send_counts", lambda i, e, w: torch.zeros(w + 1, dtype=torch.long), "shape (5,)"),
    ("ex06_permute_for_all_to_all", lambda i, e, w: torch.argsort(i.reshape(-1)),
     "must return a tuple (order, inverse, counts)"),
    ("ex06_permute_for_all_to_all", lambda i, e, w: (i, i, i), "shape (6, 2)"),
    (LAYER, lambda x, wg, ex, k, group=None: (x, wg), "you returned a tuple"),
    (LAYER, lambda x, wg, ex, k, group=None: x[:, :2], "shape (7, 2)"),
]


def test_a_crash_in_one_process_is_reported_in_one_line():
    def broken(x, w_gate, local_experts, k, group=None):
        return x @ w_gate @ w_gate

    message = fails(LAYER, broken, hidden=False)
    assert "your expert_parallel_forward raised RuntimeError: " in message
    assert "\n" not in message


# ========================================================================================
# Inputs: what tests/test_checks_common.py needs to check them; the layer's own probes.

ALIASES = {"ex06_send_counts": send_counts, "ex06_permute_for_all_to_all": permute_for_all_to_all,
           LAYER: _alias_forward}  # the references, captured at import


def order_margins(grade_id: str, inputs: dict) -> list[float]:
    """The gaps every order-dependent decision of the probe rests on (independent oracle):
    the layer's top-k, on the unsplit batch."""
    return [min_gap_of(inputs)] if grade_id == LAYER else []


def min_gap_of(inputs: dict) -> float:
    logits = inputs["x"] @ inputs["w_gate"]
    return float(logits.sort(dim=-1).values.diff(dim=-1).min())


def test_layer_probes_cover_the_splits_they_claim():
    """Uneven shards, a rank with no tokens, a rank that receives nothing, all-to-one."""
    def routed(name: str) -> tuple[dict, torch.Tensor, list[int]]:
        inputs = EXERCISES[LAYER].probe(name).inputs()
        indices = (inputs["x"] @ inputs["w_gate"]).topk(inputs["k"], dim=-1).indices
        w = inputs["world_size"]
        sizes = [len(s) for s in torch.tensor_split(inputs["x"], w)]
        return inputs, indices, sizes

    inputs, indices, sizes = routed("4 ranks, uneven shards, rank 3 receives no rows")
    assert sizes == [3, 3, 2, 2]
    assert send_counts(indices, 8, 4)[3] == 0
    _, _, sizes = routed("4 ranks, rank 3 holds no tokens, top-3")
    assert sizes == [1, 1, 1, 0]
    _, indices, _ = routed("2 ranks, 3 experts each, every token's first choice on rank 1")
    assert bool((indices[:, 0] == 4).all()) and bool((indices[:, 1] < 3).any())
    _, indices, _ = routed("2 ranks, top-2 of 4 experts")
    assert bool((torch.bincount(indices.reshape(-1), minlength=4) > 0).all())


def test_layer_judge_refuses_missing_or_truncated_outputs():
    exercise = EXERCISES[LAYER]
    probe = exercise.visible[0]
    inputs = probe.inputs()
    outputs = run_probe(exercise, probe, layer_loops, inputs)
    judge_probe(exercise, probe, inputs, outputs)
    for broken in ({}, {"ranks": []}, {"ranks": [{**outputs["ranks"][0], "calls": []}]},
                   {"ranks": [{**outputs["ranks"][0], "x_grad": None}]}):
        with pytest.raises(CheckFailure):
            judge_probe(exercise, probe, inputs, broken)
