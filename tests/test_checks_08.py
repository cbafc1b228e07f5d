"""The teaching checks of notebook 08 (serving and upcycling) must be able to fail, and fail
helpfully.

Correct implementations written differently from the reference pass the visible and hidden
checks silently; each planted mistake fails with its own message (never the generic
fallback), already in the visible check; wrong return types fail with a message. The checks
every exercise shares (inputs deterministic, plain and tie-free, outputs across the process
boundary, stubs, calling the reference) run in tests/test_checks_common.py from this
module's `CORRECT`, `ALIASES`, `order_margins`, and the tables `MISTAKES` (planted mistakes
and the words their message must hold) and `WRONG_RETURNS`.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import probe_data
import pytest
import torch
from probe_data import fails
from torch import nn

from moe_course import serving
from moe_course.experts import Expert
from moe_course.grading import EXERCISES, check
from moe_course.grading.checks import nb08_serving_and_upcycling as su
from moe_course.layers import MoEFeedForward
from moe_course.serving import expected_experts_touched as _alias_expected
from moe_course.serving import experts_touched as _alias_touched
from moe_course.serving import lru_cache_hits as _alias_lru
from moe_course.serving import offload_time_per_token as _alias_offload
from moe_course.serving import optimal_cache_hits as _alias_optimal
from moe_course.serving import upcycle as _alias_upcycle

GRADED = sorted(gid for gid, ex in EXERCISES.items()
                if ex.assignment == "08_serving_and_upcycling" and ex.kind != "written")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ========================================================================================
# Correct implementations, each written differently from the reference.


def touched_set(indices, n_experts):
    return len(set(indices.reshape(-1).tolist()))


def touched_bincount(indices, n_experts):  # a 0-dim integer tensor is accepted
    return (torch.bincount(indices.flatten(), minlength=n_experts) > 0).sum()


def expected_product(batch, n_experts, k):
    return n_experts - n_experts * math.prod([1 - k / n_experts] * batch)


def expected_tensor(batch, n_experts, k):
    e = torch.tensor(float(n_experts), dtype=torch.float64)
    return e * (1 - torch.pow(1 - k / e, batch))


def lru_list(trace, capacity):  # a plain list, most recent last
    cache, hits = [], 0
    for row in trace.tolist():
        for expert in row:
            if expert in cache:
                hits += 1
                cache.remove(expert)
            elif capacity and len(cache) == capacity:
                cache.pop(0)
            if capacity:
                cache.append(expert)
    return hits


def lru_clock(trace, capacity):  # timestamps
    last, hits = {}, 0
    for t, expert in enumerate(trace.flatten().tolist()):
        if expert in last:
            hits += 1
        elif capacity and len(last) >= capacity:
            last.pop(min(last, key=last.get))
        if capacity:
            last[expert] = t
    return hits


def belady_scan(trace, capacity):  # rescans the future at each miss, classic formulation
    accesses = trace.flatten().tolist()
    cache, hits = set(), 0

    def next_use(expert, pos):
        for later in range(pos + 1, len(accesses)):
            if accesses[later] == expert:
                return later
        return math.inf

    for pos, expert in enumerate(accesses):
        if expert in cache:
            hits += 1
            continue
        if capacity == 0:
            continue
        if len(cache) < capacity:
            cache.add(expert)
            continue
        furthest = max(cache, key=lambda e: next_use(e, pos))
        if next_use(expert, pos) < next_use(furthest, pos):  # else: do not cache it
            cache.remove(furthest)
            cache.add(expert)
    return hits


def belady_keep_soonest(trace, capacity):  # "keep the C needed soonest" formulation
    accesses = trace.flatten().tolist()
    nxt = {}
    following = [math.inf] * len(accesses)
    for pos in range(len(accesses) - 1, -1, -1):
        following[pos] = nxt.get(accesses[pos], math.inf)
        nxt[accesses[pos]] = pos
    cache, hits = {}, 0
    for pos, expert in enumerate(accesses):
        hits += expert in cache
        cache[expert] = following[pos]
        cache = dict(sorted(cache.items(), key=lambda kv: kv[1])[:capacity])
    return hits


def offload_plain(misses, expert_bytes, bandwidth):
    return (misses * expert_bytes) / bandwidth


def offload_gb(misses, expert_bytes, bandwidth):  # in GB on both sides
    return misses * (expert_bytes / 1e9) / (bandwidth / 1e9)


def upcycle_load_state(dense_ffn, n_experts, k):  # the layer's own experts, weights loaded
    d, h = dense_ffn.w_in.in_features, dense_ffn.w_in.out_features
    moe = MoEFeedForward(d, h, n_experts, k=k)
    for expert in moe.experts:
        expert.load_state_dict(dense_ffn.state_dict())
    nn.init.zeros_(moe.gate.weight)  # ties everywhere: still exactly the dense layer
    return moe


def upcycle_deepcopy(dense_ffn, n_experts, k):
    moe = MoEFeedForward(dense_ffn.w_in.in_features, dense_ffn.w_in.out_features, n_experts, k)
    moe.experts = nn.ModuleList([copy.deepcopy(dense_ffn) for _ in range(n_experts)])
    return moe


CORRECT: dict[str, list[Any]] = {
    "ex08_experts_touched": [touched_set, touched_bincount],
    "ex08_expected_experts_touched": [expected_product, expected_tensor],
    "ex08_lru_cache_hits": [lru_list, lru_clock],
    "ex08_optimal_cache_hits": [belady_scan, belady_keep_soonest],
    "ex08_offload_time_per_token": [offload_plain, offload_gb],
    "ex08_upcycle": [upcycle_load_state, upcycle_deepcopy],
}


def test_every_graded_exercise_has_a_correct_implementation():
    assert GRADED == sorted(CORRECT)
    assert len(GRADED) == 6
    assert EXERCISES["ex08_written"].kind == "written"


@pytest.mark.parametrize("grade_id", sorted(CORRECT))
def test_correct_implementation_passes_silently(grade_id, capsys):
    probe_data.passes_silently(grade_id, CORRECT[grade_id], capsys)


def test_the_check_simulations_agree_with_the_reference_policies():
    for seed in range(5):
        inputs = su._trace_inputs(900 + seed, 40, 2, 7, [0, 1, 2, 3, 5, 7])
        trace = inputs["trace"]
        accesses = trace.reshape(-1).tolist()
        for c in inputs["capacities"]:
            assert su._LRU(accesses, c) == serving.lru_cache_hits(trace, c)
            assert su._BELADY(accesses, c) == serving.optimal_cache_hits(trace, c)


# ========================================================================================
# Planted mistakes.


def _touched_duplicates(indices, n_experts):
    return indices.numel()


def _touched_first(indices, n_experts):
    return len(set(indices[:, 0].tolist()))


def _touched_idle(indices, n_experts):
    return n_experts - len(set(indices.flatten().tolist()))


def _touched_unique_tensor(indices, n_experts):
    return torch.unique(indices)


def _expected_swapped(batch, n_experts, k):
    return n_experts * (1 - (k / n_experts) ** batch)


def _expected_untouched(batch, n_experts, k):
    return n_experts * (1 - k / n_experts) ** batch


def _expected_fraction(batch, n_experts, k):
    return 1 - (1 - k / n_experts) ** batch


def _expected_replacement(batch, n_experts, k):
    return n_experts * (1 - (1 - 1 / n_experts) ** (batch * k))


def _expected_no_overlap(batch, n_experts, k):
    return float(min(batch * k, n_experts))


def _expected_floor(batch, n_experts, k):
    return n_experts * (1 - (1 - k // n_experts) ** batch)


def _expected_from_first_token(batch, n_experts, k):  # k for the first token, then the rest
    touched = float(k)
    for _ in range(batch - 1):
        touched += (n_experts - touched) * k / n_experts
    return touched


def _expected_refuses_k_equals_e(batch, n_experts, k):
    if not 1 <= k < n_experts:
        raise ValueError(f"k must be in [1, n_experts), got {k}")
    return n_experts * (1 - (1 - k / n_experts) ** batch)


def _expected_by_logarithm(batch, n_experts, k):
    return n_experts * (1 - math.exp(batch * math.log(1 - k / n_experts)))


def _lru_pops_an_empty_cache(trace, capacity):  # no capacity > 0 test: fails at capacity 0
    cache, hits = [], 0
    for expert in trace.flatten().tolist():
        if expert in cache:
            hits += 1
            cache.remove(expert)
        elif len(cache) == capacity:
            cache.pop(0)
        cache.append(expert)
    return hits


def _lru_keeps_one_at_zero(trace, capacity):
    return lru_list(trace, max(capacity, 1))


def _belady_keeps_one_at_zero(trace, capacity):
    return belady_scan(trace, max(capacity, 1))


def _lru_refresh_on_miss_only(trace, capacity):  # FIFO
    cache, hits = [], 0
    for expert in trace.flatten().tolist():
        if expert in cache:
            hits += 1
            continue
        if capacity and len(cache) == capacity:
            cache.pop(0)
        if capacity:
            cache.append(expert)
    return hits


def _lru_evicts_newest(trace, capacity):
    cache, hits = [], 0
    for expert in trace.flatten().tolist():
        if expert in cache:
            hits += 1
            cache.remove(expert)
            cache.append(expert)
            continue
        if capacity and len(cache) == capacity:
            cache.pop()
        if capacity:
            cache.append(expert)
    return hits


def _lru_misses(trace, capacity):
    return trace.numel() - lru_list(trace, capacity)


def _lru_never_evicts(trace, capacity):
    cache, hits = set(), 0
    for expert in trace.flatten().tolist():
        if expert in cache:
            hits += 1
        elif len(cache) < capacity:
            cache.add(expert)
    return hits


def _lru_off_by_one(trace, capacity):
    return lru_list(trace, capacity + 1)


def _lru_tensor_count(trace, capacity):
    return torch.tensor(float(lru_list(trace, capacity)))


def _belady_by_past_use(trace, capacity):  # evicts the least recently used
    return lru_clock(trace, capacity)


def _belady_always_caches(trace, capacity):
    accesses = trace.flatten().tolist()
    cache, hits = set(), 0

    def next_use(expert, pos):
        return next((p for p in range(pos + 1, len(accesses)) if accesses[p] == expert),
                    math.inf)

    for pos, expert in enumerate(accesses):
        if expert in cache:
            hits += 1
            continue
        if capacity == 0:
            continue
        if len(cache) == capacity:
            cache.remove(max(sorted(cache), key=lambda e: next_use(e, pos)))
        cache.add(expert)
    return hits


def _belady_soonest(trace, capacity):
    accesses = trace.flatten().tolist()

    def next_use(expert, pos):
        return next((p for p in range(pos + 1, len(accesses)) if accesses[p] == expert),
                    math.inf)

    cache, hits = {}, 0
    for pos, expert in enumerate(accesses):
        hits += expert in cache
        if capacity == 0:
            continue
        cache[expert] = next_use(expert, pos)
        if len(cache) > capacity:
            del cache[min(cache, key=lambda e: (cache[e], e != expert, -e))]
    return hits


def _belady_fewest_future_uses(trace, capacity):
    accesses = trace.flatten().tolist()
    cache, hits = set(), 0
    for pos, expert in enumerate(accesses):
        hits += expert in cache
        if capacity == 0:
            continue
        cache.add(expert)
        if len(cache) > capacity:
            future = accesses[pos + 1 :]
            del_key = max(cache, key=lambda e: (-future.count(e), e == expert, e))
            cache.remove(del_key)
    return hits


def _offload_bits(misses, expert_bytes, bandwidth):
    return 8 * misses * expert_bytes / bandwidth


def _offload_ms(misses, expert_bytes, bandwidth):
    return 1e3 * misses * expert_bytes / bandwidth


def _offload_no_misses(misses, expert_bytes, bandwidth):
    return expert_bytes / bandwidth


def _offload_inverted(misses, expert_bytes, bandwidth):
    return misses * bandwidth / expert_bytes


def _offload_whole_misses(misses, expert_bytes, bandwidth):
    return int(misses) * expert_bytes / bandwidth


def _offload_ceil_misses(misses, expert_bytes, bandwidth):
    return math.ceil(misses) * expert_bytes / bandwidth


def _upcycle_shared_object(dense_ffn, n_experts, k):
    moe = upcycle_deepcopy(dense_ffn, n_experts, k)
    one = copy.deepcopy(dense_ffn)
    moe.experts = nn.ModuleList([one] * n_experts)
    return moe


def _upcycle_no_copy(dense_ffn, n_experts, k):
    moe = upcycle_deepcopy(dense_ffn, n_experts, k)
    moe.experts = nn.ModuleList([copy.copy(dense_ffn) for _ in range(n_experts)])
    return moe


def _upcycle_expert_choice(dense_ffn, n_experts, k):
    moe = MoEFeedForward(dense_ffn.w_in.in_features, dense_ffn.w_in.out_features, n_experts,
                         k, router="expert_choice")
    moe.experts = nn.ModuleList([copy.deepcopy(dense_ffn) for _ in range(n_experts)])
    return moe


def _upcycle_switch(dense_ffn, n_experts, k):  # top-1 weighted by its probability
    moe = MoEFeedForward(dense_ffn.w_in.in_features, dense_ffn.w_in.out_features, n_experts,
                         k, router="switch")
    moe.experts = nn.ModuleList([copy.deepcopy(dense_ffn) for _ in range(n_experts)])
    return moe


def _upcycle_capacity(dense_ffn, n_experts, k):
    moe = MoEFeedForward(dense_ffn.w_in.in_features, dense_ffn.w_in.out_features, n_experts,
                         k, capacity_factor=1.0)
    moe.experts = nn.ModuleList([copy.deepcopy(dense_ffn) for _ in range(n_experts)])
    return moe


def _upcycle_fresh(dense_ffn, n_experts, k):
    return MoEFeedForward(dense_ffn.w_in.in_features, dense_ffn.w_in.out_features, n_experts, k)


def _upcycle_scaled(dense_ffn, n_experts, k):
    moe = upcycle_deepcopy(dense_ffn, n_experts, k)
    with torch.no_grad():
        for expert in moe.experts:
            for p in expert.parameters():
                p.mul_(1 / k)
    return moe


def _upcycle_noisy(dense_ffn, n_experts, k):
    moe = upcycle_deepcopy(dense_ffn, n_experts, k)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for expert in moe.experts:
            for p in expert.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=g))
    return moe


def _upcycle_wrong_k(dense_ffn, n_experts, k):
    return upcycle_deepcopy(dense_ffn, n_experts, 1)


def _upcycle_mutates(dense_ffn, n_experts, k):
    with torch.no_grad():
        dense_ffn.w_in.weight.mul_(2)
    return upcycle_deepcopy(dense_ffn, n_experts, k)


def _upcycle_frozen(dense_ffn, n_experts, k):
    moe = upcycle_deepcopy(dense_ffn, n_experts, k)
    moe.gate.weight.requires_grad_(False)
    return moe


def _upcycle_returns_list(dense_ffn, n_experts, k):
    return [copy.deepcopy(dense_ffn) for _ in range(n_experts)]


MISTAKES: list[tuple[str, Any, str]] = [
    ("ex08_experts_touched", _touched_duplicates, "duplicates included"),
    ("ex08_experts_touched", _touched_first, "only each token's first choice"),
    ("ex08_experts_touched", _touched_idle, "the experts nobody chose"),
    ("ex08_experts_touched", _touched_unique_tensor, "must be an int"),
    ("ex08_expected_experts_touched", _expected_swapped, "you swapped k/E and 1 - k/E"),
    ("ex08_expected_experts_touched", _expected_untouched, "experts nobody touches"),
    ("ex08_expected_experts_touched", _expected_fraction, "multiply by E"),
    ("ex08_expected_experts_touched", _expected_replacement, "with replacement"),
    ("ex08_expected_experts_touched", _expected_no_overlap, "no two tokens share"),
    ("ex08_expected_experts_touched", _expected_floor, "integer division"),
    ("ex08_expected_experts_touched", _expected_from_first_token, "touches no expert"),
    ("ex08_expected_experts_touched", _expected_refuses_k_equals_e, "k = E is allowed"),
    ("ex08_expected_experts_touched", _expected_by_logarithm, "a logarithm of it fails"),
    ("ex08_lru_cache_hits", _lru_refresh_on_miss_only, "only when it is loaded (a miss)"),
    ("ex08_lru_cache_hits", _lru_evicts_newest, "evicts the *most* recently used"),
    ("ex08_lru_cache_hits", _lru_misses, "you returned the misses"),
    ("ex08_lru_cache_hits", _lru_never_evicts, "never evicts"),
    ("ex08_lru_cache_hits", _lru_off_by_one, "one expert more than capacity"),
    ("ex08_lru_cache_hits", belady_scan, "Belady's optimum"),
    ("ex08_lru_cache_hits", _lru_tensor_count, "must be an int"),
    ("ex08_lru_cache_hits", _lru_pops_an_empty_cache, "capacity 0 is allowed"),
    ("ex08_lru_cache_hits", _lru_keeps_one_at_zero, "at capacity 0 your cache still keeps"),
    ("ex08_optimal_cache_hits", _belady_keeps_one_at_zero, "the staging buffer is not a slot"),
    ("ex08_optimal_cache_hits", _belady_by_past_use, "you evicted by past use"),
    ("ex08_optimal_cache_hits", _lru_refresh_on_miss_only, "you evicted by past use"),
    ("ex08_optimal_cache_hits", _belady_always_caches, "you always cache the requested"),
    ("ex08_optimal_cache_hits", _belady_soonest, "needed *soonest*"),
    ("ex08_optimal_cache_hits", _belady_fewest_future_uses, "fewest future uses"),
    ("ex08_offload_time_per_token", _offload_bits, "multiplied by 8"),
    ("ex08_offload_time_per_token", _offload_ms, "milliseconds"),
    ("ex08_offload_time_per_token", _offload_no_misses, "you left out misses"),
    ("ex08_offload_time_per_token", _offload_inverted, "divided the wrong way"),
    ("ex08_offload_time_per_token", _offload_whole_misses, "rounded misses down"),
    ("ex08_offload_time_per_token", _offload_ceil_misses, "rounded misses up"),
    ("ex08_upcycle", _upcycle_shared_object, "shared 4 times"),
    ("ex08_upcycle", _upcycle_no_copy, "share parameter storage with dense_ffn"),
    ("ex08_upcycle", _upcycle_expert_choice, "router='expert_choice'"),
    ("ex08_upcycle", _upcycle_switch, "router='switch'"),
    ("ex08_upcycle", _upcycle_capacity, "capacity_factor=1.0"),
    ("ex08_upcycle", _upcycle_fresh, "not the dense FFN's"),
    ("ex08_upcycle", _upcycle_scaled, "scaled expert 0's w_in.weight by 1/k"),
    ("ex08_upcycle", _upcycle_noisy, "perturbed"),
    ("ex08_upcycle", _upcycle_wrong_k, "k = 1"),
    ("ex08_upcycle", _upcycle_mutates, "changed dense_ffn's parameters"),
    ("ex08_upcycle", _upcycle_frozen, "do not require gradients"),
    ("ex08_upcycle", _upcycle_returns_list, "must return a moe_course.layers.MoEFeedForward"),
]


@pytest.mark.parametrize(("grade_id", "impl", "expected"), MISTAKES,
                         ids=[f"{g}-{s[:24]}" for g, _, s in MISTAKES])
def test_the_visible_check_alone_catches_every_planted_mistake(grade_id, impl, expected):
    assert expected in fails(grade_id, impl, hidden=False)


def test_every_exercise_has_planted_mistakes():
    assert {g for g, _, _ in MISTAKES} == set(GRADED)


def test_cache_mistakes_are_distinguishable_on_every_probe():
    """On each cache probe, the planted policies give columns of hits that differ from the
    truth and from each other, so that each message is earned, never shadowed."""
    for grade_id, truth, mistakes in (("ex08_lru_cache_hits", su._LRU, su._LRU_MISTAKES),
                                      ("ex08_optimal_cache_hits", su._BELADY,
                                       su._BELADY_MISTAKES)):
        for probe in EXERCISES[grade_id].visible:
            inputs = probe.inputs()
            accesses = inputs["trace"].reshape(-1).tolist()
            columns = [[policy(accesses, c) for c in inputs["capacities"]]
                       for policy in [truth] + [p for p, _ in mistakes]]
            assert len({tuple(col) for col in columns}) == len(columns), (grade_id, columns)


# ========================================================================================
# Calling the reference: directly, through an alias captured at import, or wrapped.

ALIASES = {"ex08_experts_touched": _alias_touched,
           "ex08_expected_experts_touched": _alias_expected,
           "ex08_lru_cache_hits": _alias_lru, "ex08_optimal_cache_hits": _alias_optimal,
           "ex08_offload_time_per_token": _alias_offload, "ex08_upcycle": _alias_upcycle}


def test_other_serving_helpers_are_fine_to_use():
    def lru_from_mask(trace, capacity):  # the package's mask helper is not the exercise
        return int(serving.lru_hit_mask(trace, capacity).sum())

    check("ex08_lru_cache_hits", lru_from_mask)
    assert serving.upcycle(Expert(4, 8), 2, 1).n_experts == 2  # works again after checks


# ========================================================================================
# Stubs and wrong return types fail with a message, never a crash.


WRONG_RETURNS: list[tuple[str, Any, str]] = [
    ("ex08_experts_touched", lambda i, e: None, "must be an int"),
    ("ex08_experts_touched", lambda i, e: 5.0, "a count is an int"),
    ("ex08_expected_experts_touched", lambda b, e, k: "7.2", "must be a number"),
    ("ex08_lru_cache_hits", lambda t, c: [1, 2], "must be an int"),
    ("ex08_optimal_cache_hits", lambda t, c: None, "must be an int"),
    ("ex08_offload_time_per_token", lambda m, b, w: None, "must be a number"),
    ("ex08_upcycle", lambda d, e, k: None, "you returned None"),
]


def test_mutating_the_trace_is_reported():
    def sorts_in_place(trace, capacity):
        hits = lru_list(trace, capacity)
        trace.copy_(trace.sort(dim=-1).values)
        return hits

    assert "changed its argument trace in place" in fails("ex08_lru_cache_hits", sorts_in_place)


# ========================================================================================
# Inputs: the shared round-trip and tie checks (tests/test_checks_common.py) read this.


def order_margins(grade_id: str, inputs: dict) -> list[float]:
    """No probe of notebook 08 rests on an order between close values: the cache answers are
    integer simulations, and the upcycled layer's step-0 output is the same whichever
    experts the router picks (all are copies, the weights sum to 1)."""
    return []


def test_traces_hold_distinct_experts_per_token_and_locality():
    for gid in ("ex08_lru_cache_hits", "ex08_optimal_cache_hits"):
        for probe in EXERCISES[gid].visible + EXERCISES[gid].hidden:
            trace = probe.inputs()["trace"]
            for row in trace.tolist():
                assert len(set(row)) == len(row)
            rows = trace.tolist()
            repeats = sum(bool(set(a) & set(b)) for a, b in zip(rows[:-1], rows[1:],
                                                                 strict=True))
            assert repeats > trace.shape[0] // 3  # consecutive tokens share experts


def test_upcycle_probe_routes_without_ties_irrelevant_to_the_answer():
    """The step-0 answer does not depend on routing: ties in a zero router still pass."""
    inputs = EXERCISES["ex08_upcycle"].visible[0].inputs()
    x = inputs["x"]
    moe = upcycle_load_state(su._dense(inputs), inputs["n_experts"], inputs["k"])
    torch.testing.assert_close(moe(x).y, su._dense(inputs)(x), rtol=1e-5, atol=1e-6)




def test_an_error_at_every_capacity_is_not_blamed_on_capacity_0():
    def broken(trace, capacity):
        return {}[capacity]  # a KeyError at every capacity

    message = fails("ex08_lru_cache_hits", broken, hidden=False)
    assert "capacity=0) raised KeyError" in message, message
    assert "capacity 0 is allowed" not in message
