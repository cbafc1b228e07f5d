"""Probes for notebook 04, expert-choice routing (Zhou et al. 2022, arXiv 2202.09368):
`expert_choice_capacity`, `expert_choice_routing`, `expert_choice_moe`, `experts_per_token`."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ... import expert_choice as ref_ec
from ..inputs import draw_choice, draw_int, gen, logits, min_gap, tie_free
from ..probe import (
    CheckFailure,
    Inputs,
    Outputs,
    Probe,
    call,
    capture,
    expect_close,
    expect_items,
    expect_number,
    expect_tensor,
    no_mutation,
)
from ..recording import expert_inputs, expert_outputs, judge_expert_calls, probe_experts
from .common import UNWEIGHTED

# ----------------------------------------------------------------------------------------
# expert_choice_capacity

_EC_CAP_ARGS = ("n_tokens", "n_experts", "capacity_factor")


def _ec_capacity_cases(seed: int) -> list[list[float | int]]:
    """Three more layers drawn from `seed` (from the course secret in hidden checks); factors
    exact in binary, so no case hinges on float rounding."""
    g = gen(seed)
    return [[draw_int(g, 1, 200), draw_int(g, 1, 16),
             draw_choice(g, (0.25, 0.5, 1.0, 1.25, 1.5, 2.0, 4.0))] for _ in range(3)]


def _ec_capacity_run(fn: Any, inputs: Inputs) -> Outputs:
    return {"results": [capture(fn(*case)) for case in inputs["cases"]]}


def _ec_capacity_judge(inputs: Inputs, outputs: Outputs) -> None:
    for case, got in zip(inputs["cases"], outputs["results"], strict=True):
        t, e, cf = case
        what = ("expert_choice_capacity(" + ", ".join(f"{n}={v}" for n, v in
                                                       zip(_EC_CAP_ARGS, case, strict=True)) + ")")
        value = expect_number(got, what, integer=True)
        expected = ref_ec.expert_choice_capacity(t, e, cf)
        raw = t * cf / e
        if value == expected:
            continue
        for wrong, message in (
            (min(t, math.floor(raw)), "you rounded down: round up with math.ceil"),
            (min(t, round(raw)), "you rounded to the nearest integer: round up with math.ceil"),
            (math.ceil(raw), f"an expert can't pick more tokens than there are: "
                             f"min(n_tokens, ...) = {t}"),
        ):
            if value == wrong:
                raise CheckFailure(f"{what} returned {value}, expected {expected}: {message}")
        raise CheckFailure(f"{what} returned {value}, expected {expected} = min(T, "
                           "ceil(T * capacity_factor / E))")


# ----------------------------------------------------------------------------------------
# expert_choice_routing


def _ec_pick(scores: Tensor, capacity: int) -> tuple[Tensor, Tensor]:
    return scores.t().topk(capacity, dim=-1)  # (E, C), (E, C)


def _routing_inputs(seed: int, t: int, e: int, capacity: int) -> Inputs:
    def make(g: torch.Generator) -> Inputs:
        return {"logits": logits(g, t, e), "capacity": capacity}

    def gaps(i: Inputs) -> list[float]:
        lg = i["logits"]
        s = torch.softmax(lg, dim=-1)
        by_tokens = _ec_pick(torch.softmax(lg, dim=0), capacity)[1]
        differs = capacity == t or not torch.equal(by_tokens, _ec_pick(s, capacity)[1])
        return [min_gap(s, dim=0), min_gap(lg, dim=0), min_gap(lg, dim=-1),
                1.0 if differs else 0.0]

    return tie_free(make, gaps, seed, tries=500)


def _routing_run(fn: Any, inputs: Inputs) -> Outputs:
    return call(fn, [("logits", inputs["logits"]), ("capacity", inputs["capacity"])])


def _routing_judge(inputs: Inputs, outputs: Outputs) -> None:
    no_mutation(outputs, "expert_choice_routing")
    lg, c = inputs["logits"], inputs["capacity"]
    t, e = lg.shape
    gates, token_idx = expect_items(outputs["result"], "expert_choice_routing",
                                    ("gates", "token_idx"))
    if isinstance(gates, Tensor) and tuple(gates.shape) in ((t, c), (c, e)) and (e, c) != (
            tuple(gates.shape)):
        raise CheckFailure(f"expert_choice_routing's gates must be (E, C) = {(e, c)}: each "
                           f"*expert* picks C tokens; yours has shape {tuple(gates.shape)} "
                           "(did tokens pick experts, or is it transposed?)")
    gates = expect_tensor(gates, "expert_choice_routing's gates", (e, c), hint=" (E, C)")
    token_idx = expect_tensor(token_idx, "expert_choice_routing's token_idx", (e, c),
                              kind="int", hint=" (E, C), the chosen token ids")
    s = torch.softmax(lg, dim=-1)  # (T, E)
    expected_gates, expected_idx = _ec_pick(s, c)  # (E, C), (E, C)
    by_tokens = torch.softmax(lg, dim=0)  # (T, E)
    token_softmax = ("your experts picked tokens by a softmax over tokens (dim=0): take "
                     "S = softmax(logits) over *experts* (dim=-1), then each expert picks the "
                     "C tokens with the largest S[:, e]")
    expect_close(token_idx, expected_idx, "your token_idx", variants=[
        (expected_idx.flip(-1), "your experts picked the right tokens but in ascending order: "
                                "list each expert's tokens in descending order of S[:, e]"),
        (_ec_pick(by_tokens, c)[1], token_softmax),
        (_ec_pick(-s, c)[1], "your experts picked their C *lowest*-scoring tokens: take the "
                             "largest"),
        (expected_idx.sort(-1).values, "your experts picked the right tokens but sorted by "
                                       "token id: keep descending order of S[:, e]"),
    ])
    expect_close(gates, expected_gates, "your gates", variants=[
        (by_tokens.t().gather(1, expected_idx), token_softmax),
        (lg.t().gather(1, expected_idx), "your gates are raw logits: use S = softmax(logits) "
                                         "over experts"),
        (expected_gates / expected_gates.sum(-1, keepdim=True),
         "you renormalised each expert's C gates: keep the S values themselves"),
        (torch.softmax(lg.t().gather(1, expected_idx), dim=-1),
         "your gates are a softmax over each expert's C chosen logits: use S = softmax(logits) "
         "over experts, the values at the chosen tokens"),
        (expected_gates.flip(-1), "your gates are in reverse order of your token_idx"),
    ])


# ----------------------------------------------------------------------------------------
# expert_choice_moe


def _ec_moe_inputs(seed: int, t: int, d: int, e: int, capacity: int) -> Inputs:
    def make(g: torch.Generator) -> Inputs:
        scores = logits(g, t, e)
        scores = _unchosen_last(scores, capacity) if capacity < t else scores
        gates, token_idx = ref_ec.expert_choice_routing(scores, capacity)
        return {"x": torch.randn(t, d, generator=g), "gates": gates, "token_idx": token_idx,
                "logits": scores, **expert_inputs(g, e, d)}

    def gaps(i: Inputs) -> list[float]:
        counts = torch.bincount(i["token_idx"].reshape(-1), minlength=t)
        return [min_gap(torch.softmax(i["logits"], -1), dim=0),
                1.0 if bool((counts >= 2).any()) else 0.0,
                1.0 if bool((counts == 0).any()) or capacity == t else 0.0]

    return tie_free(make, gaps, seed, tries=500)


def _ec_moe_run(module_list: bool) -> Any:
    def run(fn: Any, inputs: Inputs) -> Outputs:
        experts = probe_experts(inputs, module_list=module_list)
        out = call(fn, [("x", inputs["x"]), ("experts", experts), ("gates", inputs["gates"]),
                        ("token_idx", inputs["token_idx"])])
        return {**out, "calls": [expert.record for expert in experts]}

    return run


def _ec_moe_judge(inputs: Inputs, outputs: Outputs) -> None:
    no_mutation(outputs, "expert_choice_moe")
    x, gates, token_idx = inputs["x"], inputs["gates"], inputs["token_idx"]
    t, d = x.shape
    y = expect_tensor(outputs["result"], "expert_choice_moe's output", (t, d), hint=" (T, D)")
    judge_expert_calls(outputs["calls"], x, [[int(i) for i in row] for row in token_idx],
                       symbol="expert_choice_moe")
    outs = expert_outputs(inputs, x)  # (E, T, D)
    e = outs.shape[0]
    chosen = outs[torch.arange(e)[:, None], token_idx]  # (E, C, D)

    def scatter(g: Tensor, overwrite: bool = False) -> Tensor:
        y = x.new_zeros(t, d)
        for ex in range(e):
            part = g[ex, :, None] * chosen[ex]  # (C, D)
            if overwrite:
                y = y.index_copy(0, token_idx[ex], part)
            else:
                y = y.index_add(0, token_idx[ex], part)
        return y

    expect_close(y, scatter(gates), "your expert_choice_moe output", variants=[
        (scatter(torch.ones_like(gates)), UNWEIGHTED),
        (scatter(gates, overwrite=True), "a token chosen by several experts keeps only the "
                                         "last expert's output in yours: add the contributions "
                                         "(index_add / +=), don't overwrite them"),
        (scatter(gates.flip(-1)), "your gates are paired with the wrong tokens: gates[e, c] "
                                  "belongs to token_idx[e, c]"),
    ])


# ----------------------------------------------------------------------------------------
# experts_per_token


def _unchosen_last(scores: Tensor, capacity: int) -> Tensor:
    """`scores` with the last token's row replaced so that no expert picks it (for any seed,
    not by luck): its softmax over experts becomes `q / sum(q)`, where `q[j]` is the
    `capacity`-th largest softmax value of expert j's column among the other tokens. Below
    every `q[j]` whenever `sum(q) > 1` (checked by the probes' gaps, else the next seed)."""
    q = torch.softmax(scores[:-1], dim=-1).topk(capacity, dim=0).values[-1]  # (E,)
    out = scores.clone()
    out[-1] = torch.log(q / q.sum())
    return out


def _per_token_inputs(seed: int, t: int, e: int, capacity: int) -> Inputs:
    def make(g: torch.Generator) -> Inputs:
        scores = _unchosen_last(logits(g, t, e), capacity)
        return {"token_idx": ref_ec.expert_choice_routing(scores, capacity).token_idx,
                "n_tokens": t, "logits": scores}

    def gaps(i: Inputs) -> list[float]:
        counts = torch.bincount(i["token_idx"].reshape(-1), minlength=t)
        return [min_gap(torch.softmax(i["logits"], -1), dim=0),
                1.0 if bool((counts >= 2).any()) else 0.0,
                1.0 if int(counts[-1]) == 0 else 0.0]  # the last token is chosen by none

    return tie_free(make, gaps, seed, tries=500)


def _per_token_run(fn: Any, inputs: Inputs) -> Outputs:
    return call(fn, [("token_idx", inputs["token_idx"]), ("n_tokens", inputs["n_tokens"])])


def _per_token_judge(inputs: Inputs, outputs: Outputs) -> None:
    no_mutation(outputs, "experts_per_token")
    token_idx, t = inputs["token_idx"], inputs["n_tokens"]
    e = token_idx.shape[0]
    got = outputs["result"]
    if isinstance(got, Tensor) and got.dtype == torch.bool:
        raise CheckFailure("experts_per_token returned booleans, whether each token was chosen: "
                           "return how many experts chose it, an integer count per token")
    if isinstance(got, Tensor) and got.dim() == 1 and got.shape[0] < t:
        hint = (" (counts per expert?)" if got.shape[0] == e else
                " (torch.bincount stops at the largest chosen token: pass minlength=n_tokens)")
        raise CheckFailure(f"experts_per_token must return one count per token, shape ({t},); "
                           f"yours has shape {tuple(got.shape)}{hint}")
    got = expect_tensor(got, "experts_per_token's output", (t,), kind="int",
                        hint=" (T,), one count per token")
    expected = ref_ec.experts_per_token(token_idx, t)
    expect_close(got, expected, "your counts", variants=[
        ((expected > 0).to(torch.int64), "your counts are 0/1, whether each token was chosen: "
                                         "count how many experts chose it"),
    ])


# Rules the exercises state, each tested by a visible probe and again by a hidden one.
EC_CAPACITY = "min(n_tokens, ceil(n_tokens * capacity_factor / n_experts)), an int"
EC_ROUTING = "S = softmax over experts; expert e takes its C largest S[:, e], descending"
ALL_TOKENS = "capacity = T: every expert takes every token"
NO_MUTATION = "never changes an argument in place"
EC_MIX = "y[t] = sum of gates[e, c] * experts[e](x[t]) over the (e, c) choosing t, added"
EC_CALLS = "each expert called once, on its C rows"
LIST_OR_MODULE_LIST = "experts may be a list or an nn.ModuleList"
PER_TOKEN = "(T,) integer counts, 0 for a token nobody chose, n_tokens entries"

VISIBLE_EC_CAPACITY = (
    Probe("five layer sizes",
          lambda: {"cases": [[10, 4, 2.0], [8, 3, 1.0], [6, 2, 3.0], [12, 5, 1.25],
                             [9, 9, 0.5]]},
          _ec_capacity_run, _ec_capacity_judge, rules=(EC_CAPACITY,)),
)
HIDDEN_EC_CAPACITY = (
    Probe("more layer sizes",
          lambda: {"cases": [[16, 8, 1.0], [7, 2, 1.0], [5, 5, 0.5], [20, 3, 10.0],
                             *_ec_capacity_cases(441)]},
          _ec_capacity_run, _ec_capacity_judge, rules=(EC_CAPACITY,)),
)
VISIBLE_EC_ROUTING = (
    Probe("8 tokens, 4 experts, capacity 3", lambda: _routing_inputs(401, 8, 4, 3),
          _routing_run, _routing_judge, rules=(EC_ROUTING, NO_MUTATION)),
    Probe("capacity = all 4 tokens", lambda: _routing_inputs(405, 4, 3, 4), _routing_run,
          _routing_judge, rules=(EC_ROUTING, ALL_TOKENS)),
)
HIDDEN_EC_ROUTING = (
    Probe("10 tokens, 3 experts, capacity 5", lambda: _routing_inputs(402, 10, 3, 5),
          _routing_run, _routing_judge, rules=(EC_ROUTING, NO_MUTATION)),
    Probe("capacity = all 5 tokens", lambda: _routing_inputs(404, 5, 3, 5), _routing_run,
          _routing_judge, rules=(EC_ROUTING, ALL_TOKENS)),
)
VISIBLE_EC_MOE = (
    Probe("8 tokens, 3 experts, capacity 3 (a list)", lambda: _ec_moe_inputs(417, 8, 4, 3, 3),
          _ec_moe_run(False), _ec_moe_judge, rules=(EC_MIX, EC_CALLS, NO_MUTATION)),
    Probe("7 tokens, 3 experts, capacity 3 (an nn.ModuleList)",
          lambda: _ec_moe_inputs(418, 7, 3, 3, 3), _ec_moe_run(True), _ec_moe_judge,
          rules=(EC_MIX, EC_CALLS, LIST_OR_MODULE_LIST)),
)
HIDDEN_EC_MOE = (
    Probe("10 tokens, 4 experts, capacity 4 (an nn.ModuleList)",
          lambda: _ec_moe_inputs(568, 10, 3, 4, 4), _ec_moe_run(True), _ec_moe_judge,
          rules=(EC_MIX, EC_CALLS, LIST_OR_MODULE_LIST, NO_MUTATION)),
)
VISIBLE_EXPERTS_PER_TOKEN = (
    Probe("8 tokens, 4 experts, capacity 3", lambda: _per_token_inputs(610, 8, 4, 3),
          _per_token_run, _per_token_judge, rules=(PER_TOKEN, NO_MUTATION)),
)
HIDDEN_EXPERTS_PER_TOKEN = (
    Probe("12 tokens, 5 experts, capacity 4", lambda: _per_token_inputs(546, 12, 5, 4),
          _per_token_run, _per_token_judge, rules=(PER_TOKEN, NO_MUTATION)),
)
