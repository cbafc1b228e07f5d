"""Notebook 08's reference: experts touched, expert caches, offloading cost, traces, upcycling.

Oracles are brute force: every routing of a small batch enumerated, every eviction choice of
a small cache searched; invariants are the textbook ones (LRU is a stack algorithm, Belady's
optimum bounds every policy, a cache that holds every expert misses only once per expert).
"""

from __future__ import annotations

import copy
import functools
import itertools
import math

import pytest
import torch
from torch import nn

from moe_course import serving as sv
from moe_course.experts import Expert
from moe_course.layers import MoEFeedForward, TopKMoE
from moe_course.transformer import CharLM, LMConfig


def random_trace(seed: int, n: int, k: int, e: int, skew: float = 1.0) -> torch.Tensor:
    """An `(n, k)` trace of distinct experts per row, drawn with a skewed popularity."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.arange(1, e + 1, dtype=torch.float64) ** -skew
    rows = [torch.multinomial(weights, k, replacement=False, generator=g) for _ in range(n)]
    return torch.stack(rows)


# ---------------------------------------------------------------------------------------------
# Experts touched


def test_experts_touched_counts_distinct_experts():
    indices = torch.tensor([[0, 3], [3, 1], [0, 1], [7, 3]])
    assert sv.experts_touched(indices, 8) == 4
    assert sv.experts_touched(indices[:1], 8) == 2
    assert isinstance(sv.experts_touched(indices, 8), int)


@pytest.mark.parametrize(("batch", "e", "k"), [(1, 4, 2), (2, 4, 1), (3, 4, 2), (3, 5, 3),
                                               (4, 3, 3), (0, 6, 2)])
def test_expected_experts_touched_matches_exhaustive_enumeration(batch, e, k):
    subsets = list(itertools.combinations(range(e), k))  # each token's equally likely choices
    total = 0
    for routing in itertools.product(subsets, repeat=batch):
        total += len(set().union(*map(set, routing))) if batch else 0
    exact = total / len(subsets) ** batch
    assert sv.expected_experts_touched(batch, e, k) == pytest.approx(exact, rel=1e-12)


def test_expected_experts_touched_limits():
    assert sv.expected_experts_touched(1, 8, 2) == pytest.approx(2.0)
    assert sv.expected_experts_touched(10_000, 8, 2) == pytest.approx(8.0)
    values = [sv.expected_experts_touched(b, 64, 4) for b in range(0, 300, 7)]
    assert values == sorted(values)


# ---------------------------------------------------------------------------------------------
# Caches: oracles


def lru_oracle(trace: torch.Tensor, capacity: int) -> int:
    """LRU with explicit last-use timestamps."""
    last: dict[int, int] = {}  # cached expert -> time of its last use
    hits = 0
    for time, expert in enumerate(trace.reshape(-1).tolist()):
        if expert in last:
            hits += 1
        elif capacity and len(last) == capacity:
            del last[min(last, key=last.__getitem__)]
        if capacity:
            last[expert] = time
    return hits


def best_hits_brute_force(trace: torch.Tensor, capacity: int) -> int:
    """The most hits any policy with `capacity` slots (and a staging buffer) can score:
    after each access keep any subset of (cache + the requested expert) of size <= C."""
    accesses = tuple(trace.reshape(-1).tolist())

    @functools.cache
    def best(pos: int, cache: frozenset) -> int:
        if pos == len(accesses):
            return 0
        expert = accesses[pos]
        hit = int(expert in cache)
        pool = sorted(cache | {expert})
        options = [frozenset(s) for r in range(min(capacity, len(pool)) + 1)
                   for s in itertools.combinations(pool, r)]
        return hit + max(best(pos + 1, option) for option in options)

    return best(0, frozenset())


def static_oracle(trace: torch.Tensor, capacity: int) -> int:
    counts = torch.bincount(trace.reshape(-1))
    top = sorted(counts.tolist(), reverse=True)[:capacity]
    return sum(max(c - 1, 0) for c in top)


TRACES = [random_trace(s, n, k, e, skew) for s, (n, k, e, skew) in enumerate(
    [(12, 1, 4, 1.0), (8, 2, 5, 0.5), (10, 2, 6, 1.5), (6, 3, 6, 0.0), (9, 1, 3, 2.0)])]


@pytest.mark.parametrize("trace", TRACES)
def test_lru_matches_the_timestamp_oracle(trace):
    for capacity in range(0, 7):
        assert sv.lru_cache_hits(trace, capacity) == lru_oracle(trace, capacity)


@pytest.mark.parametrize("trace", TRACES)
def test_belady_matches_the_exhaustive_search(trace):
    for capacity in range(0, 4):
        assert sv.optimal_cache_hits(trace, capacity) == best_hits_brute_force(trace, capacity)


@pytest.mark.parametrize("trace", TRACES)
def test_static_matches_its_formula(trace):
    for capacity in range(0, 7):
        assert sv.static_cache_hits(trace, capacity) == static_oracle(trace, capacity)


def test_static_cache_with_calibration_counts_breaks_ties_by_id():
    trace = torch.tensor([[2], [2], [1], [1], [0]])
    counts = torch.tensor([5, 5, 0])  # keeps experts 0 and 1 (ties to the lower id)
    assert sv.static_cache_hits(trace, 1, counts) == 0  # expert 0: a single use
    assert sv.static_cache_hits(trace, 2, counts) == 1  # expert 1: second use hits


# ---------------------------------------------------------------------------------------------
# Caches: invariants on larger traces


INVARIANT_TRACES = [random_trace(100 + s, 300, k, e, skew) for s, (k, e, skew) in enumerate(
    [(1, 8, 1.0), (2, 8, 1.2), (2, 16, 0.8), (4, 32, 1.0), (3, 6, 0.0)])]


@pytest.mark.parametrize("trace", INVARIANT_TRACES)
def test_cache_invariants(trace):
    accesses, distinct = trace.numel(), len(set(trace.reshape(-1).tolist()))
    lru = [sv.lru_cache_hits(trace, c) for c in range(distinct + 2)]
    assert lru == sorted(lru)  # LRU is a stack algorithm: more slots never hurt
    for c in range(distinct + 2):
        best = sv.optimal_cache_hits(trace, c)
        assert best >= lru[c]
        assert best >= sv.static_cache_hits(trace, c)
        if c >= distinct:  # only the compulsory misses remain
            for hits in (lru[c], best, sv.static_cache_hits(trace, c)):
                assert hits == accesses - distinct
    assert lru[0] == 0 and sv.optimal_cache_hits(trace, 0) == 0


@pytest.mark.parametrize("trace", INVARIANT_TRACES[:3])
def test_hit_masks_have_the_trace_shape_and_sum_to_the_hits(trace):
    for name, policy in sv.CACHE_POLICIES.items():
        mask = policy(trace, 3)
        assert mask.shape == trace.shape and mask.dtype == torch.bool, name
    assert int(sv.lru_hit_mask(trace, 3).sum()) == sv.lru_cache_hits(trace, 3)
    curve = sv.hit_rate_curve(trace, "LRU", [0, 1, 2, 3])
    assert curve.tolist() == pytest.approx([sv.lru_cache_hits(trace, c) / trace.numel()
                                            for c in range(4)])


def test_belady_can_refuse_to_cache_and_beats_classic_belady():
    # Capacity 1: A B A. Caching B would cost the hit on A; the optimum serves B uncached.
    trace = torch.tensor([[0], [1], [0]])
    assert sv.optimal_cache_hits(trace, 1) == 1
    assert sv.lru_cache_hits(trace, 1) == 0


# ---------------------------------------------------------------------------------------------
# Offloading


def test_offload_time_for_mixtral_over_pcie():
    m = sv.MIXTRAL_8X7B
    assert m.expert_params == 176_160_768
    # 8 experts x 32 layers: 45.1B of the 47B parameters the paper reports are experts
    assert 44e9 < m.expert_params * m.n_experts * m.n_layers < m.total_params
    bytes_fp16 = 2 * m.expert_params
    every_expert_missed = sv.offload_time_per_token(m.k * m.n_layers, bytes_fp16,
                                                    sv.PCIE4_X16_BYTES_PER_S)
    assert every_expert_missed == pytest.approx(64 * 352_321_536 / 32e9)
    assert sv.offload_time_per_token(0, bytes_fp16, 1e9) == 0.0


# ---------------------------------------------------------------------------------------------
# Traces of a model


def tiny_lm(seed: int = 0, n_layers: int = 2) -> CharLM:
    torch.manual_seed(seed)
    cfg = LMConfig(vocab_size=7, seq_len=5, d_model=8, n_heads=2, n_layers=n_layers)
    return CharLM(cfg, lambda i: MoEFeedForward(8, 16, n_experts=4, k=2))


def test_routing_trace_equals_the_model_routing_window_by_window():
    model = tiny_lm()
    ids = torch.tensor([1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4, 5])  # windows of 5, 5 and 2
    trace = sv.routing_trace(model, ids)
    assert model.training  # mode restored
    assert trace.shape == (2, 12, 2) and trace.dtype == torch.int64
    model.eval()
    with torch.no_grad():
        for start in (0, 5, 10):
            window = ids[start : start + 5]
            outs = model(window[None]).moe_outputs
            for layer in range(2):
                assert torch.equal(trace[layer, start : start + len(window)],
                                   outs[layer].routing.indices)


def test_routing_trace_of_the_fast_layer_equals_that_of_moe_feed_forward():
    model = tiny_lm()
    fast = copy.deepcopy(model)
    for block in fast.blocks:
        block.ffn = TopKMoE.from_moe_feed_forward(block.ffn)
    ids = torch.tensor([1, 2, 3, 4, 5, 6, 0, 1])
    assert torch.equal(sv.routing_trace(fast, ids), sv.routing_trace(model, ids))
    assert torch.equal(sv.next_layer_guess(fast, ids), sv.next_layer_guess(model, ids))


def test_next_layer_guess_uses_the_next_router_on_the_same_residual():
    model = tiny_lm()
    ids = torch.tensor([1, 2, 3, 4, 5, 6])
    guess = sv.next_layer_guess(model, ids)
    assert guess.shape == (1, 6, 2)
    recall = sv.prefetch_recall(guess, sv.routing_trace(model, ids)[1:])
    assert 0.0 <= recall <= 1.0
    assert sv.prefetch_recall(torch.tensor([[0, 1]]), torch.tensor([[1, 0]])) == 1.0


# ---------------------------------------------------------------------------------------------
# Upcycling


@pytest.mark.parametrize(("e", "k"), [(4, 2), (8, 2), (3, 3), (5, 1)])
def test_upcycled_layer_equals_the_dense_layer_at_step_zero(e, k):
    torch.manual_seed(0)
    dense = Expert(6, 12)
    before = copy.deepcopy(dense.state_dict())
    moe = sv.upcycle(dense, e, k)
    assert isinstance(moe, MoEFeedForward) and moe.n_experts == e and moe.k == k
    x = torch.randn(3, 7, 6)
    torch.testing.assert_close(moe(x).y, dense(x), rtol=1e-5, atol=1e-6)
    for name, value in dense.state_dict().items():
        assert torch.equal(value, before[name])  # the dense layer is untouched
    pointers = [{p.data_ptr() for p in ex.parameters()} for ex in moe.experts]
    pointers.append({p.data_ptr() for p in dense.parameters()})
    for a, b in itertools.combinations(pointers, 2):
        assert not a & b  # independent storage
    for expert in moe.experts:
        for name, value in expert.state_dict().items():
            assert torch.equal(value, before[name])


def test_upcycled_experts_diverge_in_training_and_the_router_learns():
    torch.manual_seed(1)
    moe = sv.upcycle(Expert(6, 12), 4, 2)
    opt = torch.optim.SGD(moe.parameters(), lr=0.1)
    x, target = torch.randn(64, 6), torch.randn(64, 6)
    gate0 = moe.gate.weight.detach().clone()
    for _ in range(3):
        loss = ((moe(x).y - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    w = [ex.w_in.weight.detach() for ex in moe.experts]
    assert not torch.equal(w[0], w[1])
    assert not torch.equal(moe.gate.weight.detach(), gate0)


def test_upcycle_is_deterministic_and_routes_without_ties():
    dense = Expert(6, 12)
    a, b = sv.upcycle(dense, 8, 2), sv.upcycle(dense, 8, 2)
    assert torch.equal(a.gate.weight, b.gate.weight)
    logits = a.gate(torch.randn(100, 6, generator=torch.Generator().manual_seed(0))).detach()
    top = logits.sort(dim=-1, descending=True).values[:, :3]
    assert float(top.diff(dim=-1).abs().min()) > 0


# ---------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(("call", "match"), [
    (lambda: sv.experts_touched(torch.tensor([[0, 9]]), 8), "indices"),
    (lambda: sv.experts_touched(torch.tensor([0.0, 1.0]), 8), "indices must be an integer"),
    (lambda: sv.experts_touched(torch.tensor([[0]]), 0), "n_experts"),
    (lambda: sv.expected_experts_touched(-1, 8, 2), "batch"),
    (lambda: sv.expected_experts_touched(4, 8, 9), "k"),
    (lambda: sv.expected_experts_touched(4.0, 8, 2), "batch"),
    (lambda: sv.lru_cache_hits(torch.tensor([0, 1]), 2), r"trace .*\(N, K\)"),
    (lambda: sv.lru_cache_hits(torch.tensor([[0, -1]]), 2), "trace"),
    (lambda: sv.optimal_cache_hits(torch.tensor([[0, 1]]), -1), "capacity"),
    (lambda: sv.static_cache_hits(torch.tensor([[0, 3]]), 1, torch.ones(2)), "counts"),
    (lambda: sv.offload_time_per_token(2, 1e6, 0), "bandwidth"),
    (lambda: sv.offload_time_per_token(-1, 1e6, 1e9), "misses"),
    (lambda: sv.offload_time_per_token(1, math.inf, 1e9), "expert_bytes"),
    (lambda: sv.hit_rate_curve(torch.tensor([[0]]), "FIFO", [1]), "policy"),
    (lambda: sv.upcycle(Expert(4, 8), 4, 5), "k"),
    (lambda: sv.routing_trace(nn.Linear(2, 2), torch.tensor([0])), "CharLM"),
    (lambda: sv.routing_trace(CharLM(LMConfig(5, 4, 8, 2), lambda i: MoEFeedForward(
        8, 16, 4, router="expert_choice")), torch.tensor([0])), "top-k MoE"),
    (lambda: sv.routing_trace(tiny_lm(), torch.tensor([[0, 1]])), "ids"),
    (lambda: sv.routing_trace(tiny_lm(), torch.tensor([9])), "ids"),
    (lambda: sv.prefetch_recall(torch.tensor([[0]]), torch.tensor([[0], [1]])), "agree"),
])
def test_bad_input_raises_a_clear_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_upcycle_refuses_a_non_ffn():
    with pytest.raises(TypeError, match="dense_ffn must be a dense feed-forward"):
        sv.upcycle(nn.Linear(4, 4), 4, 2)
