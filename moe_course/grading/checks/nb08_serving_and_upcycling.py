"""Probes for notebook 08, serving a mixture: `experts_touched`, `expected_experts_touched`,
`lru_cache_hits` and `optimal_cache_hits` (expert caches, Eliseev & Mazur, arXiv 2312.17238),
`offload_time_per_token` and `upcycle` (Sparse Upcycling, Komatsuzaki et al., arXiv
2212.05055).

The cache probes judge a learner's hit counts at several capacities at once against the
reference policy and against policies with one planted mistake each (simulated here), so
that a wrong count names the mistake that produces exactly that column of numbers.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ...experts import Expert
from ...layers import MoEFeedForward
from ...serving import next_uses
from ..inputs import draw_choice, draw_int, gen
from ..probe import (
    CheckFailure,
    Inputs,
    Outputs,
    Probe,
    call,
    capture,
    close,
    describe,
    expect_tensor,
    no_mutation,
)

# ----------------------------------------------------------------------------------------
# Numbers returned by the learner: Python numbers, or 0-dim tensors of the right kind.


def _as_int(value: object, what: str) -> int:
    if isinstance(value, Tensor) and value.dim() == 0 and not value.is_floating_point() \
            and value.dtype != torch.bool:
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        extra = ""
        if isinstance(value, float) and float(value).is_integer():
            extra = " (a count is an int: int(...) it)"
        elif isinstance(value, Tensor):
            extra = " (a count is one integer: return int(...) of it)"
        raise CheckFailure(f"{what} must be an int; you returned {describe(value)}{extra}")
    return value


def _as_float(value: object, what: str) -> float:
    if isinstance(value, Tensor) and value.dim() == 0 and value.dtype != torch.bool:
        return float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CheckFailure(f"{what} must be a number (a float); you returned {describe(value)}")
    return float(value)


# The errors a learner's arithmetic or bookkeeping raises on an edge case (batch = 0, k = E,
# capacity = 0): recorded per case, so that the judge can name the case instead of the run
# failing as a whole. A stub's NotImplementedError and the reference's tripwire still end
# the run.
_CASE_ERRORS = (LookupError, ValueError, ArithmeticError)


def _raised(exc: Exception) -> dict[str, str]:
    text = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
    return {"kind": "raised", "error": f"{type(exc).__name__}{': ' + text if text else ''}"}


def _raised_error(value: object) -> str | None:
    """The error a case raised (recorded by `_raised`), or None for a returned value."""
    if isinstance(value, dict) and value.get("kind") == "raised":
        return str(value.get("error", "an error"))
    return None


def _first_match(value: float, variants: list[tuple[float, str]]) -> str | None:
    for wrong, message in variants:
        if close(value, wrong):
            return message
    return None


# ----------------------------------------------------------------------------------------
# experts_touched


def _touched_inputs(cases: list[tuple[list[list[int]], int]]) -> Inputs:
    return {"cases": [{"indices": torch.tensor(rows), "n_experts": e} for rows, e in cases]}


def _touched_run(fn: Any, inputs: Inputs) -> Outputs:
    results, mutated = [], []
    for case in inputs["cases"]:
        out = call(fn, [("indices", case["indices"]), ("n_experts", case["n_experts"])])
        results.append(out["result"])
        mutated += [m for m in out["mutated"] if m not in mutated]
    return {"results": results, "mutated": mutated}


def _touched_judge(inputs: Inputs, outputs: Outputs) -> None:
    no_mutation(outputs, "experts_touched")
    results = outputs["results"]
    if len(results) != len(inputs["cases"]):
        raise CheckFailure("could not run experts_touched on every batch of the check")
    for case, got in zip(inputs["cases"], results, strict=True):
        indices, e = case["indices"], case["n_experts"]
        what = f"experts_touched(indices of shape {tuple(indices.shape)}, n_experts={e})"
        value = _as_int(got, what)
        distinct = len(set(indices.reshape(-1).tolist()))
        if value == distinct:
            continue
        message = _first_match(value, [
            (indices.numel(), "you counted every assignment, duplicates included: an expert "
                              "that several tokens chose is read from memory once, count "
                              "the distinct experts (torch.unique, or a set)"),
            (e - distinct, "you counted the experts nobody chose: count the ones that appear "
                           "in indices"),
            (len(set(indices[:, 0].tolist())), "you counted only each token's first choice "
                                                "indices[:, 0]: all K choices read an expert"),
            (e, "you returned n_experts: count only the experts that appear in indices"),
            (indices.shape[0], "you returned the number of tokens: count the distinct experts"),
        ])
        raise CheckFailure(f"{what} returned {value}, expected {distinct}"
                           + (f": {message}" if message else
                              " distinct experts (each chosen expert counted once)"))


# ----------------------------------------------------------------------------------------
# expected_experts_touched


def _expected_touched(b: int, e: int, k: int) -> float:
    return e * (1.0 - (1.0 - k / e) ** b)


def _expected_run(fn: Any, inputs: Inputs) -> Outputs:
    results: list[Any] = []
    for case in inputs["cases"]:
        try:
            results.append(capture(fn(*case)))
        except _CASE_ERRORS as exc:
            results.append(_raised(exc))
    return {"results": results}


def _expected_judge(inputs: Inputs, outputs: Outputs) -> None:
    results = outputs["results"]
    if len(results) != len(inputs["cases"]):
        raise CheckFailure("could not run expected_experts_touched on every case of the check")
    for (b, e, k), got in zip(inputs["cases"], results, strict=True):
        what = f"expected_experts_touched(batch={b}, n_experts={e}, k={k})"
        expected = _expected_touched(b, e, k)
        error = _raised_error(got)
        if error is not None:
            edge = ""
            if k == e:
                edge = (": k = E is allowed (1 <= k <= n_experts): every token takes every "
                        f"expert and all E = {e} are touched; (1 - k/E) ** B is then 0 (a "
                        "logarithm of it fails)")
            elif b == 0:
                edge = (": batch = 0 is allowed (batch >= 0): no token touches any expert, "
                        "(1 - k/E) ** 0 = 1, and the answer is 0.0")
            raise CheckFailure(f"{what} raised {error}{edge}")
        value = _as_float(got, what)
        if close(value, expected, rtol=1e-6, atol=1e-9):
            continue
        message = _first_match(value, [
            *([(float(k), "a batch of no tokens touches no expert: (1 - k/E) ** 0 = 1, so the "
                          "answer is 0.0. Did you start from the first token's k experts? The "
                          "closed form E * (1 - (1 - k/E) ** B) holds for B = 0 too")]
              if b == 0 else []),
            (e * (1.0 - (k / e) ** b), "you swapped k/E and 1 - k/E: one token *misses* a "
                                       "given expert with probability 1 - k/E, so all B tokens "
                                       "miss it with probability (1 - k/E) ** B, and E * (1 - "
                                       "(1 - k/E) ** B) experts are touched"),
            (e * (1.0 - k / e) ** b, "you returned the expected number of experts nobody "
                                     "touches, E * (1 - k/E) ** B: subtract it from E"),
            (1.0 - (1.0 - k / e) ** b, "you returned the probability that one expert is "
                                       "touched: multiply by E (linearity of expectation)"),
            (e * (1.0 - (1.0 - 1.0 / e) ** (b * k)),
             "you drew the B*K choices independently, with replacement: a token's K experts "
             "are distinct, so it misses a given expert with probability 1 - k/E"),
            (float(min(b * k, e)), "you assumed no two tokens share an expert (min(B*K, E)): "
                                   "tokens overlap; use E * (1 - (1 - k/E) ** B)"),
            (float(b * k), "B*K counts every assignment: tokens share experts, so fewer "
                           "distinct ones are touched, E * (1 - (1 - k/E) ** B)"),
            (e * (1.0 - (1.0 - k // e) ** b), "k // E is integer division (0 for k < E): "
                                              "use k / E"),
        ])
        raise CheckFailure(f"{what} returned {value:.6g}, expected {expected:.6g}"
                           + (f": {message}" if message else " = E * (1 - (1 - k/E) ** B)"))


# ----------------------------------------------------------------------------------------
# Expert caches: the reference policies and the planted mistakes, simulated.

Policy = Callable[[list[int], int], int]


def _misses_of(policy: Policy) -> Policy:
    return lambda accesses, c: len(accesses) - policy(accesses, c)


def _recency_cache(evict_newest: bool = False, refresh_on_hit: bool = True) -> Policy:
    """LRU (default), FIFO (`refresh_on_hit=False`), MRU (`evict_newest=True`)."""

    def hits(accesses: list[int], c: int) -> int:
        cache: OrderedDict[int, None] = OrderedDict()
        n = 0
        for expert in accesses:
            if expert in cache:
                n += 1
                if refresh_on_hit:
                    cache.move_to_end(expert)
                continue
            if c == 0:
                continue
            if len(cache) == c:
                cache.popitem(last=evict_newest)
            cache[expert] = None
        return n

    return hits


def _no_eviction(accesses: list[int], c: int) -> int:
    cache: set[int] = set()
    n = 0
    for expert in accesses:
        if expert in cache:
            n += 1
        elif len(cache) < c:
            cache.add(expert)
    return n


def _lfu(accesses: list[int], c: int) -> int:
    cache: set[int] = set()
    uses: dict[int, int] = {}
    n = 0
    for expert in accesses:
        uses[expert] = uses.get(expert, 0) + 1
        if expert in cache:
            n += 1
            continue
        if c == 0:
            continue
        if len(cache) == c:
            cache.remove(min(cache, key=lambda e: (uses[e], e)))
        cache.add(expert)
    return n


def _key(score: str, cache: dict[int, float], remaining: dict[int, int], e: int,
         new: int) -> tuple[float, bool, int]:
    """Eviction key of a cached expert `e` (largest goes): see `_future_cache`."""
    if score == "next":
        value = cache[e]
    elif score == "soonest":
        value = -cache[e]
    else:
        value = float(-remaining[e])
    return (value, e == new, e)


def _future_cache(score: str, bypass: bool) -> Policy:
    """Offline policies: evict the cached expert with the largest `score` key.

    `score="next"`: furthest next use (Belady); `"soonest"`: the nearest next use (the
    wrong way round); `"fewest"`: fewest future uses. `bypass`: the requested expert is a
    candidate for eviction too (the optimum); otherwise it is always cached (classic MIN).
    """

    def hits(accesses: list[int], c: int) -> int:
        nxt = next_uses(accesses)
        remaining: dict[int, int] = {}
        for expert in accesses:
            remaining[expert] = remaining.get(expert, 0) + 1
        cache: dict[int, float] = {}
        n = 0
        for pos, expert in enumerate(accesses):
            remaining[expert] -= 1
            if expert in cache:
                n += 1
            if c == 0:
                continue
            cache[expert] = nxt[pos]
            if len(cache) <= c:
                continue
            pool = list(cache) if bypass else [e for e in cache if e != expert]
            del cache[max(pool, key=lambda e, new=expert: _key(score, cache, remaining, e, new))]
        return n

    return hits


_LRU = _recency_cache()
_FIFO = _recency_cache(refresh_on_hit=False)
_MRU = _recency_cache(evict_newest=True)
_BELADY = _future_cache("next", bypass=True)
_CLASSIC_MIN = _future_cache("next", bypass=False)

_LRU_MISTAKES: list[tuple[Policy, str]] = [
    (_FIFO, "your cache refreshes an expert's recency only when it is loaded (a miss), not "
            "when it is used again (a hit): that is FIFO. In LRU every use, hit or miss, makes "
            "the expert the most recently used (OrderedDict.move_to_end on a hit)"),
    (_MRU, "your cache evicts the *most* recently used expert: LRU evicts the least recently "
           "used one"),
    (_misses_of(_LRU), "you returned the misses: return the hits (accesses - misses)"),
    (_no_eviction, "your cache never evicts: once full it keeps its first experts forever. "
                   "On a miss with a full cache, evict the least recently used expert and "
                   "cache the new one"),
    (_lfu, "your cache evicts the least *frequently* used expert (LFU): LRU evicts the one "
           "whose last use is oldest"),
    (_BELADY, "your counts are Belady's optimum (you looked into the future): LRU decides from "
              "the past only"),
    (lambda a, c: _LRU(a, c + 1), "your cache holds one expert more than capacity"),
    (lambda a, c: _LRU(a, max(c - 1, 0)), "your cache holds one expert fewer than capacity"),
    (lambda a, c: _LRU(a, max(c, 1)), "at capacity 0 your cache still keeps the expert just "
                                      "used: a cache with no slots caches nothing, every "
                                      "access misses (0 hits)"),
]

_BELADY_MISTAKES: list[tuple[Policy, str]] = [
    (_LRU, "you evicted by past use (least recently used): that is LRU. Belady's optimum "
           "looks at the future: evict the expert whose next use is furthest away"),
    (_FIFO, "you evicted by past use (the oldest loaded expert): Belady's optimum looks at "
            "the future, evicting the expert whose next use is furthest away"),
    (_CLASSIC_MIN, "you always cache the requested expert, but the optimum keeps, of the "
                   "cached experts *and* the one just used, the `capacity` needed soonest: "
                   "when the requested expert's next use is the furthest, serve it from the "
                   "staging buffer and evict nothing"),
    (_future_cache("soonest", bypass=True), "you evicted the expert needed *soonest*: evict "
                                            "the one whose next use is furthest in the future"),
    (_future_cache("fewest", bypass=True), "you evicted the expert with the fewest future uses: "
                                           "Belady evicts the one whose *next* use is furthest "
                                           "away, however often it is used later"),
    (_misses_of(_BELADY), "you returned the misses: return the hits (accesses - misses)"),
    (lambda a, c: _BELADY(a, c + 1), "your cache holds one expert more than capacity"),
    (lambda a, c: _BELADY(a, max(c, 1)), "at capacity 0 your cache still keeps the expert just "
                                         "used (the staging buffer is not a slot): with no "
                                         "slots every access misses (0 hits)"),
]


def _trace_inputs(seed: int, n: int, k: int, e: int, capacities: list[int],
                  stay: float = 0.6) -> Inputs:
    """A routing trace with locality: each token keeps an expert of the previous token with
    probability `stay`, otherwise draws from a skewed popularity; rows hold distinct experts."""
    g = gen(seed)
    popularity = torch.arange(1, e + 1, dtype=torch.float64) ** -0.8
    popularity = popularity[torch.randperm(e, generator=g)]
    rows: list[list[int]] = []
    for _ in range(n):
        row: list[int] = []
        prev = rows[-1] if rows else []
        for j in range(k):
            if prev and float(torch.rand((), generator=g)) < stay and prev[j] not in row:
                row.append(prev[j])
                continue
            weights = popularity.clone()
            weights[row] = 0.0
            row.append(int(torch.multinomial(weights, 1, generator=g)))
        rows.append(row)
    return {"trace": torch.tensor(rows), "capacities": capacities}


def _cache_run(fn: Any, inputs: Inputs) -> Outputs:
    results, mutated = [], []
    for c in inputs["capacities"]:
        try:
            out = call(fn, [("trace", inputs["trace"]), ("capacity", c)])
        except _CASE_ERRORS as exc:
            results.append(_raised(exc))
            continue
        results.append(out["result"])
        mutated += [m for m in out["mutated"] if m not in mutated]
    return {"results": results, "mutated": mutated}


def _cache_judge(symbol: str, truth: Policy, mistakes: list[tuple[Policy, str]],
                 rule: str) -> Callable[[Inputs, Outputs], None]:
    def judge(inputs: Inputs, outputs: Outputs) -> None:
        no_mutation(outputs, symbol)
        trace, capacities = inputs["trace"], inputs["capacities"]
        results = outputs["results"]
        if len(results) != len(capacities):
            raise CheckFailure(f"could not run {symbol} at every capacity of the check")
        shape = tuple(trace.shape)
        errors = [_raised_error(r) for r in results]
        for error, c in zip(errors, capacities, strict=True):
            if error is None:
                continue
            only_at_zero = c == 0 and all(e is None for e, cap in zip(errors, capacities,
                                                                      strict=True) if cap)
            raise CheckFailure(
                f"{symbol}(trace of shape {shape}, capacity={c}) raised {error}"
                + (": capacity 0 is allowed, a cache with no slots: nothing is ever cached "
                   "or evicted, every access misses, 0 hits (cache an expert only when "
                   "capacity > 0)" if only_at_zero else ""))
        got = [_as_int(r, f"{symbol}(trace of shape {shape}, capacity={c})")
               for r, c in zip(results, capacities, strict=True)]
        accesses = [int(v) for v in trace.reshape(-1).tolist()]
        expected = [truth(accesses, c) for c in capacities]
        if got == expected:
            return
        table = ", ".join(f"{c}: {g}" for c, g in zip(capacities, got, strict=True))
        for policy, message in mistakes:
            if got == [policy(accesses, c) for c in capacities]:
                raise CheckFailure(f"{message} (your hits by capacity on a trace of {shape[0]} "
                                   f"tokens x {shape[1]} experts: {table})")
        c, g, x = next((c, g, x) for c, g, x in zip(capacities, got, expected, strict=True)
                       if g != x)
        raise CheckFailure(f"{symbol}(trace of shape {shape}, capacity={c}) returned {g}, "
                           f"expected {x} ({rule}; serve the accesses in row order, token by "
                           "token, each token's experts best first; the cache starts empty)")

    return judge


_LRU_RULE = ("a hit when the expert is cached; every use makes it the most recently used; on "
             "a miss, cache it, evicting the least recently used when full")
_BELADY_RULE = ("after each access keep, of the cached experts and the one just used, the "
                "`capacity` whose next use comes soonest")


# ----------------------------------------------------------------------------------------
# offload_time_per_token


def _offload_run(fn: Any, inputs: Inputs) -> Outputs:
    return {"results": [capture(fn(*case)) for case in inputs["cases"]]}


def _offload_judge(inputs: Inputs, outputs: Outputs) -> None:
    results = outputs["results"]
    if len(results) != len(inputs["cases"]):
        raise CheckFailure("could not run offload_time_per_token on every case of the check")
    for (m, size, bw), got in zip(inputs["cases"], results, strict=True):
        what = f"offload_time_per_token(misses={m}, expert_bytes={size:g}, bandwidth={bw:g})"
        value = _as_float(got, what)
        expected = m * size / bw
        if close(value, expected, rtol=1e-6, atol=1e-12):
            continue
        message = _first_match(value, [
            (expected * 8, "you multiplied by 8 (bits): expert_bytes and bandwidth are both in "
                           "bytes, so seconds = misses * expert_bytes / bandwidth"),
            (expected / 8, "you divided by 8: expert_bytes and bandwidth are both in bytes"),
            (expected * 1e3, "you returned milliseconds: return seconds"),
            (expected / 1e9, "you converted to GB on one side only: bytes / (bytes per second) "
                             "is already seconds"),
            (size / bw, "you left out misses: every missed expert is one copy of expert_bytes"),
            *([(math.floor(m) * size / bw, f"you rounded misses down to a whole number: "
                                            f"misses may be an average per token (here {m:g}), "
                                            "use it as it is"),
               (math.ceil(m) * size / bw, f"you rounded misses up to a whole number: misses "
                                           f"may be an average per token (here {m:g}), use it "
                                           "as it is")]
              if not float(m).is_integer() else []),
            (bw / (m * size) if m * size else math.inf, "you divided the wrong way: time = "
                                                        "bytes / bandwidth"),
            (m * bw / size, "you divided the wrong way: time = misses * expert_bytes / "
                            "bandwidth"),
        ])
        raise CheckFailure(f"{what} returned {value:.6g}, expected {expected:.6g} seconds"
                           + (f": {message}" if message else
                              " = misses * expert_bytes / bandwidth"))


# ----------------------------------------------------------------------------------------
# upcycle


def _upcycle_inputs(seed: int, d: int, h: int, e: int, k: int, shape: tuple[int, ...]) -> Inputs:
    g = gen(seed)
    return {"w_in": torch.randn(h, d, generator=g) / d**0.5, "b_in": torch.randn(h, generator=g),
            "w_out": torch.randn(d, h, generator=g) / h**0.5,
            "b_out": torch.randn(d, generator=g), "x": torch.randn(*shape, d, generator=g),
            "n_experts": e, "k": k}


def _dense(inputs: Inputs) -> Expert:
    d, h = inputs["w_in"].shape[1], inputs["w_in"].shape[0]
    dense = Expert(d, h)
    with torch.no_grad():
        dense.w_in.weight.copy_(inputs["w_in"])
        dense.w_in.bias.copy_(inputs["b_in"])
        dense.w_out.weight.copy_(inputs["w_out"])
        dense.w_out.bias.copy_(inputs["b_out"])
    return dense


_DENSE_NAMES = ("w_in.weight", "w_in.bias", "w_out.weight", "w_out.bias")


def _storages(module: nn.Module) -> set[int]:
    return {p.untyped_storage().data_ptr() for p in module.parameters()}


def _upcycle_run(fn: Any, inputs: Inputs) -> Outputs:
    dense = _dense(inputs)
    moe = fn(dense, inputs["n_experts"], inputs["k"])
    dense_after = [dense.state_dict()[n].detach().clone() for n in _DENSE_NAMES]
    out: Outputs = {"dense_after": dense_after, "is_moe": isinstance(moe, MoEFeedForward),
                    "returned": capture(moe) if not isinstance(moe, nn.Module) else
                    {"kind": "object", "type": type(moe).__name__, "repr": ""}}
    if not out["is_moe"]:
        return out
    experts = list(moe.experts)
    out["n_experts"] = capture(getattr(moe, "n_experts", None))
    out["k"] = capture(getattr(moe, "k", None))
    out["router"] = capture(getattr(moe, "router", None))
    out["capacity_factor"] = capture(getattr(moe, "capacity_factor", None))
    out["n_modules"] = len(experts)
    out["distinct_objects"] = len({id(ex) for ex in experts})
    dense_storage = _storages(dense)
    storages = [_storages(ex) for ex in experts]
    out["shares_with_dense"] = any(s & dense_storage for s in storages)
    out["shared_between_experts"] = any(storages[i] & storages[j] for i in range(len(storages))
                                        for j in range(i + 1, len(storages)))
    params = []
    for ex in experts:
        state = ex.state_dict()
        params.append([capture(state.get(n)) for n in _DENSE_NAMES])
    out["expert_params"] = params
    out["trainable"] = all(p.requires_grad for p in moe.parameters())
    with torch.no_grad():
        result = moe(inputs["x"].clone())
    out["y"] = capture(getattr(result, "y", result))
    return out


def _upcycle_judge(inputs: Inputs, outputs: Outputs) -> None:
    e, k = inputs["n_experts"], inputs["k"]
    originals = [inputs["w_in"], inputs["b_in"], inputs["w_out"], inputs["b_out"]]
    after = outputs["dense_after"]
    if len(after) != 4 or not all(close(a, o, rtol=0, atol=0) for a, o in zip(after, originals,
                                                                              strict=True)):
        raise CheckFailure("your upcycle changed dense_ffn's parameters: copy them, leave the "
                           "dense layer as it was")
    if not outputs["is_moe"]:
        raise CheckFailure(f"upcycle must return a moe_course.layers.MoEFeedForward; you "
                           f"returned {describe(outputs['returned'])}")
    for name, want in (("n_experts", e), ("k", k)):
        if outputs[name] != want:
            raise CheckFailure(f"your MoEFeedForward has {name} = {outputs[name]!r}; "
                               f"upcycle(dense_ffn, n_experts={e}, k={k}) must build one with "
                               f"{name} = {want}")
    if outputs["n_modules"] != e:
        raise CheckFailure(f"your MoEFeedForward holds {outputs['n_modules']} experts; it must "
                           f"hold n_experts = {e} copies of the dense FFN")
    if outputs["distinct_objects"] < e:
        raise CheckFailure(f"your experts are {outputs['distinct_objects']} module object(s) "
                           f"shared {e} times (a list like [ffn] * E): training would update "
                           "them all at once and they could never specialise. Make each expert "
                           "an independent copy, copy.deepcopy(dense_ffn) once per expert")
    if outputs["shares_with_dense"]:
        raise CheckFailure("your experts share parameter storage with dense_ffn (the module "
                           "itself, copy.copy, or the same tensors): training the mixture would "
                           "change the dense model. Deep-copy it (copy.deepcopy), once per "
                           "expert")
    if outputs["shared_between_experts"]:
        raise CheckFailure("two of your experts share parameter storage: each expert needs its "
                           "own copy of the dense weights (copy.deepcopy once per expert)")
    if outputs["router"] == "expert_choice":
        raise CheckFailure("your MoEFeedForward routes with router='expert_choice': with "
                           "expert choice a token can get no expert, or several whose weights "
                           "do not sum to 1, so step 0 is not the dense layer. Use the top-k "
                           "router, whose renormalised weights sum to 1")
    if outputs["router"] != "top_k":
        raise CheckFailure(f"your MoEFeedForward routes with router={outputs['router']!r}: "
                           "upcycle builds a top-k layer (router='top_k', the default), whose "
                           "renormalised top-k weights sum to 1 so that step 0 is exactly the "
                           "dense layer")
    if outputs["capacity_factor"] is not None:
        raise CheckFailure(f"your MoEFeedForward has capacity_factor="
                           f"{outputs['capacity_factor']!r}: a capacity drops overflowing "
                           "tokens (their output 0), so step 0 is not the dense layer. Leave "
                           "capacity_factor=None")
    for j, params in enumerate(outputs["expert_params"]):
        for name, got, want in zip(_DENSE_NAMES, params, originals, strict=True):
            if not isinstance(got, Tensor) or got.shape != want.shape:
                raise CheckFailure(f"expert {j} has no {name} of shape {tuple(want.shape)}: "
                                   "each expert must be a copy of the dense FFN (an Expert "
                                   "with the same w_in and w_out)")
            if close(got, want):
                continue
            for factor, why in ((1 / k, "1/k"), (1 / e, "1/E")):
                if close(got, want * factor):
                    raise CheckFailure(f"you scaled expert {j}'s {name} by {why}: the "
                                       "renormalised top-k weights already sum to 1, so exact "
                                       "copies give the dense output")
            raise CheckFailure(f"expert {j}'s {name} is not the dense FFN's (freshly "
                               "initialised, or perturbed?): every expert starts as an exact "
                               "copy of dense_ffn, so that step 0 computes the dense layer")
    if not outputs["trainable"]:
        raise CheckFailure("some parameters of your upcycled layer do not require gradients: "
                           "the experts and the router must all train")
    x = inputs["x"]
    expected = _dense(inputs)(x).detach()
    y = expect_tensor(outputs["y"], "your upcycled layer's output .y", tuple(expected.shape),
                      hint=" (the input's shape)")
    if not close(y, expected):
        raise CheckFailure("your upcycled layer's output at step 0 differs from the dense "
                           "layer's: with exact copies as experts and top-k weights that sum to "
                           "1, y = sum_j w_j ffn(x) = ffn(x)")


# ----------------------------------------------------------------------------------------
# Drawn cases of the hidden probes whose other inputs are written out: drawn from `seed`,
# which the course secret salts in hidden checks (`moe_course.grading.secret`), so that no
# answer can carry a table of the hidden results.


def _touched_cases(seed: int) -> list[tuple[list[list[int]], int]]:
    """Two batches: T tokens choosing k distinct experts of E each."""
    g, cases = gen(seed), []
    for _ in range(2):
        e = draw_int(g, 2, 16)
        k = draw_int(g, 1, min(e, 4))
        rows = [torch.randperm(e, generator=g)[:k].tolist() for _ in range(draw_int(g, 1, 10))]
        cases.append((rows, e))
    return cases


def _expected_cases(seed: int) -> list[list[int]]:
    """Two (batch, n_experts, k) cases."""
    g, cases = gen(seed), []
    for _ in range(2):
        e = draw_int(g, 1, 128)
        cases.append([draw_int(g, 0, 200), e, draw_int(g, 1, min(e, 8))])
    return cases


def _offload_cases(seed: int) -> list[list[float]]:
    """Two (misses, expert_bytes, bandwidth) cases: sizes in MiB, links of 1-64 GB/s."""
    g = gen(seed)
    return [[draw_int(g, 0, 64), float(draw_int(g, 1, 512) << 20),
             draw_choice(g, (1e9, 4e9, 16e9, 32e9, 64e9))] for _ in range(2)]


# Rules the exercises state, each tested by a visible probe (and most again by a hidden one).
TOUCHED = "the number of distinct experts in indices, an int"
NO_MUTATION = "never changes an argument in place"
EXPECTED = "E * (1 - (1 - k/E) ** B) as a float"
NO_BATCH = "batch = 0 is allowed: no expert touched"
ALL_EXPERTS = "k = E is allowed: all E experts touched"
LRU = "LRU hits: every use refreshes recency, a miss evicts the least recently used; an int"
ZERO_CAPACITY = "capacity 0 is allowed: nothing cached, 0 hits"
BELADY = "Belady hits: keep, of the cached and the one just used, those needed soonest; an int"
OFFLOAD = "seconds = misses * expert_bytes / bandwidth, a float"
FRACTIONAL = "misses may be an average per token, not a whole number"
UPCYCLED = "a trainable MoEFeedForward with n_experts experts, top-k routing, no capacity limit"
COPIES = "experts are independent copies of dense_ffn, no storage shared"
STEP0 = "its output .y equals dense_ffn(x) at step 0"
DENSE_UNCHANGED = "dense_ffn is left unchanged"

_TOUCHED_VISIBLE = [([[0, 3], [0, 1], [0, 1], [6, 3], [1, 0]], 12),
                    ([[2], [2], [5], [2]], 6)]
_TOUCHED_HIDDEN = [([[4, 1, 7]], 8),
                   ([[0, 1], [2, 3], [0, 2], [1, 3], [3, 0], [2, 1]], 4),
                   ([[5, 9], [9, 5], [5, 9], [11, 2], [9, 2], [5, 2], [0, 9]], 12)]
_LRU_JUDGE = _cache_judge("lru_cache_hits", _LRU, _LRU_MISTAKES, _LRU_RULE)
_BELADY_JUDGE = _cache_judge("optimal_cache_hits", _BELADY, _BELADY_MISTAKES, _BELADY_RULE)
_UPCYCLE_RULES = (UPCYCLED, COPIES, STEP0, DENSE_UNCHANGED)

VISIBLE_EXPERTS_TOUCHED = (
    Probe("two batches, 5 tokens top-2 of 12 and 4 tokens top-1 of 6",
          lambda: _touched_inputs(_TOUCHED_VISIBLE), _touched_run, _touched_judge,
          rules=(TOUCHED, NO_MUTATION)),
)
HIDDEN_EXPERTS_TOUCHED = (
    Probe("one token; every expert touched; many repeats",
          lambda: _touched_inputs(_TOUCHED_HIDDEN + _touched_cases(804)), _touched_run,
          _touched_judge, rules=(TOUCHED, NO_MUTATION)),
)
VISIBLE_EXPECTED_EXPERTS_TOUCHED = (
    Probe("B = 6, 1, 20", lambda: {"cases": [[6, 16, 2], [1, 16, 4], [20, 64, 2]]},
          _expected_run, _expected_judge, rules=(EXPECTED,)),
    Probe("B = 0, and k = E", lambda: {"cases": [[0, 16, 4], [7, 5, 5], [2, 3, 3]]},
          _expected_run, _expected_judge, rules=(EXPECTED, NO_BATCH, ALL_EXPERTS)),
)
HIDDEN_EXPECTED_EXPERTS_TOUCHED = (
    Probe("B = 0, k = E, a large batch, top-1",
          lambda: {"cases": [[0, 8, 2], [5, 6, 6], [100, 128, 8], [3, 10, 1],
                             *_expected_cases(805)]},
          _expected_run, _expected_judge, rules=(EXPECTED, NO_BATCH, ALL_EXPERTS)),
)


def _cache_probes(seed: int, judge: Callable, rule: str) -> tuple[tuple[Probe, ...], ...]:
    """The visible and hidden probes of one cache policy (LRU, or Belady's optimum): traces
    of the same shapes and capacities for both, drawn from seeds `seed` to `seed + 2`."""
    visible = (
        Probe("40 tokens, top-2 of 6, capacities 0-4",
              lambda: _trace_inputs(seed, 40, 2, 6, [0, 1, 2, 3, 4]), _cache_run, judge,
              rules=(rule, ZERO_CAPACITY, NO_MUTATION)),
    )
    hidden = (
        Probe("60 tokens, top-1 of 5, capacities 0-5",
              lambda: _trace_inputs(seed + 1, 60, 1, 5, [0, 1, 2, 3, 5]), _cache_run, judge,
              rules=(rule, ZERO_CAPACITY, NO_MUTATION)),
        Probe("50 tokens, top-3 of 10, capacities 2-10",
              lambda: _trace_inputs(seed + 2, 50, 3, 10, [2, 4, 5, 7, 10]), _cache_run, judge,
              rules=(rule, NO_MUTATION)),
    )
    return visible, hidden


VISIBLE_LRU_CACHE_HITS, HIDDEN_LRU_CACHE_HITS = _cache_probes(801, _LRU_JUDGE, LRU)
VISIBLE_OPTIMAL_CACHE_HITS, HIDDEN_OPTIMAL_CACHE_HITS = _cache_probes(811, _BELADY_JUDGE, BELADY)

VISIBLE_OFFLOAD_TIME_PER_TOKEN = (
    Probe("Mixtral-sized experts over PCIe, and a fractional miss count",
          lambda: {"cases": [[64, 352321536.0, 32e9], [3.5, 1.2e8, 25e9]]}, _offload_run,
          _offload_judge, rules=(OFFLOAD, FRACTIONAL)),
)
HIDDEN_OFFLOAD_TIME_PER_TOKEN = (
    Probe("no misses, a slow link, an integer size",
          lambda: {"cases": [[0, 5e8, 32e9], [12, 66060288.0, 4e9], [7, 1000, 250],
                             *_offload_cases(825)]},
          _offload_run, _offload_judge, rules=(OFFLOAD,)),
)
VISIBLE_UPCYCLE = (
    Probe("D=6, H=12 into 4 experts, top-2, input (5, D)",
          lambda: _upcycle_inputs(821, 6, 12, 4, 2, (5,)), _upcycle_run, _upcycle_judge,
          rules=_UPCYCLE_RULES),
)
HIDDEN_UPCYCLE = (
    Probe("D=8, H=16 into 8 experts, top-2, input (2, 7, D)",
          lambda: _upcycle_inputs(822, 8, 16, 8, 2, (2, 7)), _upcycle_run, _upcycle_judge,
          rules=_UPCYCLE_RULES),
    Probe("D=5, H=10 into 3 experts, top-3, input (9, D)",
          lambda: _upcycle_inputs(823, 5, 10, 3, 3, (9,)), _upcycle_run, _upcycle_judge,
          rules=_UPCYCLE_RULES),
)
