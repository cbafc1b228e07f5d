"""Probes for notebook 02, top-k routing: `top_k_gating`, `noisy_logits`, `sparse_moe`,
`moe_flops` (Shazeer et al. 2017, arXiv 1701.06538, eq. 1, 3-5)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..inputs import draw_int, gen, logits, min_gap, tie_free
from ..probe import (
    CheckFailure,
    Inputs,
    Outputs,
    Probe,
    call,
    capture,
    close,
    describe,
    expect_close,
    expect_items,
    expect_number,
    expect_tensor,
    matching_variant,
    no_mutation,
)
from ..recording import expert_inputs, expert_outputs, judge_expert_calls, probe_experts
from .common import UNWEIGHTED

# ----------------------------------------------------------------------------------------
# top_k_gating


def _top_k_inputs(seed: int, t: int, e: int, k: int) -> Inputs:
    def make(g: torch.Generator) -> Inputs:
        return {"logits": logits(g, t, e), "k": k,
                "cotangent": torch.randn(t, k, generator=g)}

    return tie_free(make, lambda i: [min_gap(i["logits"], dim=-1)], seed)


def _top_k_run(fn: Any, inputs: Inputs) -> Outputs:
    return call(fn, [("logits", inputs["logits"]), ("k", inputs["k"])])


def _top_k_grad_run(fn: Any, inputs: Inputs) -> Outputs:
    leaf = inputs["logits"].clone().requires_grad_(True)
    result = fn(leaf, inputs["k"])
    try:
        loss = (result[0] * inputs["cotangent"]).sum()
        grad = torch.autograd.grad(loss, leaf, allow_unused=True)[0]
        grad_out: Any = capture(grad) if grad is not None else "no gradient reaches logits"
    except Exception as exc:  # weights not differentiable: reported by the judge
        grad_out = f"{type(exc).__name__}: {str(exc)[:160]}"
    return {"result": capture(result), "grad": grad_out, "mutated": []}


def _judge_top_k_result(inputs: Inputs, outputs: Outputs) -> None:
    no_mutation(outputs, "top_k_gating")
    lg, k = inputs["logits"], inputs["k"]
    t, e = lg.shape
    weights, indices = expect_items(outputs["result"], "top_k_gating", ("weights", "indices"))
    weights = expect_tensor(weights, "top_k_gating's weights", (t, k), hint=" (T, K)")
    indices = expect_tensor(indices, "top_k_gating's indices", (t, k), kind="int",
                            hint=" (T, K), the expert ids")
    top, expected_idx = lg.topk(k, dim=-1)  # (T, K), (T, K), descending
    expect_close(indices, expected_idx, "your indices", variants=[
        (expected_idx.flip(-1), "your indices hold the k largest logits but in ascending "
                                "order: return them in descending order, best expert first "
                                "(torch.topk sorts descending by default)"),
        (lg.topk(k, dim=-1, largest=False).indices,
         "your indices are the k *smallest* logits: take the largest (torch.topk's default)"),
        (lg.topk(k, dim=-1, largest=False).indices.flip(-1),
         "your indices are the k *smallest* logits: take the largest (torch.topk's default)"),
        (expected_idx.sort(dim=-1).values,
         "your indices are the right experts but sorted by expert id: keep them in descending "
         "order of logit, best expert first"),
    ])
    expected = torch.softmax(top, dim=-1)  # (T, K)
    full = torch.softmax(lg, dim=-1).gather(1, expected_idx)  # (T, K)
    sums = float(weights.sum(-1).mean())
    expect_close(weights, expected, "your weights", variants=[
        (full, f"your weights sum to {sums:.2f} per token, they match a softmax over all E "
               "experts: take the softmax over the k kept logits (or renormalise the kept "
               "probabilities to sum to 1)"),
        (top, "your weights are the raw top-k logits: apply a softmax over the k kept logits"),
        (expected.flip(-1), "your weights are in the reverse order of your indices: weights[t, j] "
                            "must belong to expert indices[t, j]"),
        (full.flip(-1), "your weights are in ascending order and match a softmax over all E "
                        "experts: sort descending and softmax over the k kept logits"),
        (torch.full_like(expected, 1.0 / k), "your weights are uniform 1/k: softmax the kept "
                                             "logits"),
    ])


def _top_k_grad_judge(inputs: Inputs, outputs: Outputs) -> None:
    _judge_top_k_result(inputs, outputs)
    grad = outputs["grad"]
    if not isinstance(grad, Tensor):
        raise CheckFailure(f"your weights are not differentiable with respect to the logits "
                           f"({grad}): keep them as torch operations on logits (no .item(), "
                           "numpy, .detach() or torch.no_grad())")
    leaf = inputs["logits"].clone().requires_grad_(True)
    top, _ = leaf.topk(inputs["k"], dim=-1)
    (torch.softmax(top, dim=-1) * inputs["cotangent"]).sum().backward()
    expect_close(grad, leaf.grad, "the gradient of your weights with respect to the logits")


def _k_check_run(fn: Any, inputs: Inputs) -> Outputs:
    reports = []
    for k in inputs["bad_ks"]:
        try:
            result = fn(inputs["logits"].clone(), k)
        except Exception as exc:
            reports.append({"k": k, "raised": type(exc).__name__,
                            "value_error": isinstance(exc, ValueError),
                            "message": str(exc)[:200]})
        else:
            reports.append({"k": k, "raised": None, "value_error": False,
                            "message": describe(capture(result))})
    return {"reports": reports}


def _k_check_judge(inputs: Inputs, outputs: Outputs) -> None:
    e = inputs["logits"].shape[1]
    for k, report in zip(inputs["bad_ks"], outputs["reports"], strict=True):
        if report["value_error"]:
            continue
        if report["raised"] is None:
            raise CheckFailure(f"top_k_gating(logits, k={k}) with E = {e} experts returned "
                               f"{report['message']} instead of raising ValueError: check "
                               "1 <= k <= E first and raise ValueError naming k")
        raise CheckFailure(f"top_k_gating(logits, k={k}) with E = {e} experts raised "
                           f"{report['raised']} ({report['message'][:80]}); raise a ValueError "
                           "yourself, saying k must satisfy 1 <= k <= E")


# ----------------------------------------------------------------------------------------
# noisy_logits


def _noisy_inputs(seed: int, t: int, d: int, e: int) -> Inputs:
    g = gen(seed)
    return {"x": torch.randn(t, d, generator=g), "w_gate": torch.randn(d, e, generator=g),
            "w_noise": torch.randn(d, e, generator=g) * 0.8,
            "noise": torch.randn(t, e, generator=g)}


def _noisy_run(fn: Any, inputs: Inputs) -> Outputs:
    args = [("x", inputs["x"]), ("w_gate", inputs["w_gate"]), ("w_noise", inputs["w_noise"])]
    first = call(fn, args, {"noise": inputs["noise"]})
    second = call(fn, args, {"noise": inputs["noise"]})
    return {"result": first["result"], "again": second["result"],
            "mutated": first["mutated"] + second["mutated"]}


def _noisy_judge(inputs: Inputs, outputs: Outputs) -> None:
    no_mutation(outputs, "noisy_logits")
    x, wg, wn, noise = (inputs[k] for k in ("x", "w_gate", "w_noise", "noise"))
    shape = (x.shape[0], wg.shape[1])
    out = expect_tensor(outputs["result"], "noisy_logits' output", shape, hint=" (T, E)")
    again = outputs["again"]
    if not close(again, out, rtol=0, atol=0):
        raise CheckFailure("your noisy_logits gives different results on identical inputs: use "
                           "the noise sample the caller passes in; do not draw your own")
    clean, raw = x @ wg, x @ wn
    expect_close(out, clean + noise * F.softplus(raw), "your noisy logits", variants=[
        (clean + noise * torch.exp(raw), "your noise scale is exp(x @ w_noise): use "
                                         "softplus(x @ w_noise) (Shazeer eq. 4)"),
        (clean + noise * raw, "your noise is scaled by x @ w_noise directly: wrap it in "
                              "softplus so the scale stays positive (eq. 4)"),
        (clean + noise * F.relu(raw), "your noise scale is relu(x @ w_noise): use softplus"),
        (clean, "your noisy logits ignore the noise: add noise * softplus(x @ w_noise)"),
        (clean + noise + F.softplus(raw), "you added softplus(x @ w_noise) to the noise: "
                                          "multiply, noise * softplus(x @ w_noise)"),
        (clean + noise * F.softplus(x @ wg), "your noise scale uses w_gate: it is "
                                             "softplus(x @ w_noise)"),
    ])


def _clean_run(fn: Any, inputs: Inputs) -> Outputs:
    args = [("x", inputs["x"]), ("w_gate", inputs["w_gate"]), ("w_noise", inputs["w_noise"])]
    explicit = call(fn, args, {"noise": None})
    default = call(fn, args)
    return {"explicit": explicit["result"], "default": default["result"],
            "mutated": explicit["mutated"] + default["mutated"]}


def _clean_judge(inputs: Inputs, outputs: Outputs) -> None:
    no_mutation(outputs, "noisy_logits")
    x, wg, wn = inputs["x"], inputs["w_gate"], inputs["w_noise"]
    clean = x @ wg
    for key, how in (("explicit", "noisy_logits(x, w_gate, w_noise, noise=None)"),
                     ("default", "noisy_logits(x, w_gate, w_noise)")):
        out = expect_tensor(outputs[key], f"{how}'s output", tuple(clean.shape),
                            hint=" (T, E)")
        expect_close(out, clean, f"{how} (evaluation)", variants=[
            (clean + F.softplus(x @ wn), f"{how} added softplus(x @ w_noise): noise=None means "
                                         "evaluation, return the clean logits x @ w_gate"),
        ], otherwise=f"with noise=None (evaluation) {how} must return the clean logits "
                     "x @ w_gate, but yours differ: add no noise when noise is None")


# ----------------------------------------------------------------------------------------
# sparse_moe


def _sparse_inputs(seed: int, t: int, d: int, e: int, k: int, idle: tuple[int, ...]) -> Inputs:
    g = gen(seed)
    scores = logits(g, t, e)
    scores[:, list(idle)] = -1e4  # experts nobody is routed to
    indices = scores.topk(k, dim=-1).indices  # (T, K)
    weights = torch.rand(t, k, generator=g) * 0.8 + 0.2  # (T, K), positive, not normalised
    return {"x": torch.randn(t, d, generator=g), "weights": weights, "indices": indices,
            **expert_inputs(g, e, d)}


def _sparse_run(module_list: bool) -> Any:
    def run(fn: Any, inputs: Inputs) -> Outputs:
        experts = probe_experts(inputs, module_list=module_list)
        out = call(fn, [("x", inputs["x"]), ("experts", experts),
                        ("weights", inputs["weights"]), ("indices", inputs["indices"])])
        return {**out, "calls": [expert.record for expert in experts]}

    return run


def _sparse_judge(inputs: Inputs, outputs: Outputs) -> None:
    no_mutation(outputs, "sparse_moe")
    x, w, idx = inputs["x"], inputs["weights"], inputs["indices"]
    (t, d), e = x.shape, inputs["expert_a"].shape[0]
    y = expect_tensor(outputs["result"], "sparse_moe's output", (t, d), hint=" (T, D)")
    routed = [[tok for tok in range(t) for j in range(idx.shape[1]) if int(idx[tok, j]) == ex]
              for ex in range(e)]
    outs = expert_outputs(inputs, x)  # (E, T, D)
    picked = outs[idx, torch.arange(t)[:, None]]  # (T, K, D)

    def mix(weights: Tensor) -> Tensor:
        return (weights[..., None] * picked).sum(1)  # (T, D)

    variants = [
        (mix(torch.ones_like(w)), UNWEIGHTED),
        (mix(w / w.sum(-1, keepdim=True)), "you renormalised the weights: use them as "
                                           "given, y[t] = sum_j weights[t, j] * ..."),
        (w[:, :1] * picked[:, 0], "your output uses only each token's first choice "
                                  "indices[:, 0]: sum over all k choices"),
        (mix(w.flip(-1)), "your weights are paired with the wrong experts: weights[t, j] "
                          "belongs to expert indices[t, j]"),
    ]
    try:
        judge_expert_calls(outputs["calls"], x, routed, symbol="sparse_moe")
    except CheckFailure as failure:
        # A wrong output that matches a planted mistake explains the calls too.
        raise CheckFailure(matching_variant(y, variants) or failure.message) from None
    expect_close(y, mix(w), "your sparse_moe output", variants=variants)


# ----------------------------------------------------------------------------------------
# moe_flops

_FLOP_ARGS = ("n_tokens", "d_model", "d_hidden", "n_experts", "k")


def _flops_cases(seed: int) -> list[list[int]]:
    """Two more layers drawn from `seed` (from the course secret in hidden checks)."""
    g = gen(seed)
    cases = []
    for _ in range(2):
        e = draw_int(g, 1, 128)
        cases.append([draw_int(g, 1, 8192), 64 * draw_int(g, 1, 16), 64 * draw_int(g, 1, 64), e,
                      draw_int(g, 1, min(e, 8))])
    return cases


def _flops_run(fn: Any, inputs: Inputs) -> Outputs:
    return {"results": [capture(fn(*case)) for case in inputs["cases"]]}


def _flops_judge(inputs: Inputs, outputs: Outputs) -> None:
    results = outputs["results"]
    for case, got in zip(inputs["cases"], results, strict=True):
        t, d, h, e, k = case
        named = zip(_FLOP_ARGS, case, strict=True)
        what = "moe_flops(" + ", ".join(f"{n}={v}" for n, v in named) + ")"
        value = expect_number(got, what, integer=True)
        router, experts = 2 * t * d * e, 2 * t * k * 2 * d * h
        expected = router + experts
        if value == expected:
            continue
        for wrong, message in (
            (expected // 2, "you counted a multiply-add as 1 FLOP: count 2 (one multiply, one "
                            "add)"),
            (experts, "you left out the router, 2*T*D*E"),
            (router + 2 * t * e * 2 * d * h, "you counted all E experts per token: only the "
                                             "K chosen ones run, 2 * T*K * 2*D*H"),
            (router + 2 * t * k * d * h, "each expert is two D x H matmuls (w_in and w_out): "
                                         "2 * T*K * 2*D*H"),
            (router * k + experts, "the router runs once per token, not once per choice: "
                                   "2*T*D*E without K"),
        ):
            if value == wrong:
                raise CheckFailure(f"{what} returned {value}, expected {expected}: {message}")
        raise CheckFailure(f"{what} returned {value}, expected {expected} (router 2*T*D*E = "
                           f"{router} plus experts 2 * T*K * 2*D*H = {experts})")


# Rules the exercises state, each tested by a visible probe and again by a hidden one.
TOP_K_ORDER = "indices: the k largest logits, in descending order"
TOP_K_SOFTMAX = "weights: softmax over the k kept logits, paired with indices"
K_RANGE = "ValueError unless 1 <= k <= E"
K_EQUALS_E = "k = E is allowed"
DIFFERENTIABLE = "differentiable: gradients reach the inputs"
NO_MUTATION = "never changes an argument in place"
EQ4 = "x @ w_gate + noise * softplus(x @ w_noise) (eq. 4), the caller's noise"
NOISE_NONE = "noise=None (the default) gives the clean logits"
SPARSE_MIX = "y[t] = sum_j weights[t, j] * experts[indices[t, j]](x[t]), weights as given"
CALLS = "each expert called at most once, on exactly its rows, never when idle"
LIST_OR_MODULE_LIST = "experts may be a list or an nn.ModuleList"
FLOPS = "router 2*T*D*E plus experts 2 * T*K * 2*D*H, a Python int"
FLOPS_LARGE = "exact for large layers (integer arithmetic)"

VISIBLE_TOP_K_GATING = (
    Probe("k=2 of 5 experts", lambda: _top_k_inputs(201, 6, 5, 2), _top_k_run,
          _judge_top_k_result, rules=(TOP_K_ORDER, TOP_K_SOFTMAX, NO_MUTATION)),
    Probe("k=1 of 4 experts", lambda: _top_k_inputs(202, 5, 4, 1), _top_k_run,
          _judge_top_k_result, rules=(TOP_K_ORDER, TOP_K_SOFTMAX)),
    Probe("k=E=4, gradients", lambda: _top_k_inputs(207, 3, 4, 4), _top_k_grad_run,
          _top_k_grad_judge, rules=(TOP_K_ORDER, TOP_K_SOFTMAX, K_EQUALS_E, DIFFERENTIABLE)),
    Probe("k=0 and k=E+1 raise ValueError",
          lambda: {**_top_k_inputs(203, 3, 4, 2), "bad_ks": [0, 5]}, _k_check_run,
          _k_check_judge, rules=(K_RANGE,)),
)
HIDDEN_TOP_K_GATING = (
    Probe("k=3 of 8 experts, gradients", lambda: _top_k_inputs(204, 9, 8, 3), _top_k_grad_run,
          _top_k_grad_judge, rules=(TOP_K_ORDER, TOP_K_SOFTMAX, DIFFERENTIABLE)),
    Probe("k=E", lambda: _top_k_inputs(205, 4, 3, 3), _top_k_run, _judge_top_k_result,
          rules=(TOP_K_ORDER, TOP_K_SOFTMAX, K_EQUALS_E, NO_MUTATION)),
    Probe("k=-1 and k=9 raise ValueError",
          lambda: {**_top_k_inputs(206, 3, 6, 2), "bad_ks": [-1, 9]}, _k_check_run,
          _k_check_judge, rules=(K_RANGE,)),
)
VISIBLE_NOISY_LOGITS = (
    Probe("with noise", lambda: _noisy_inputs(211, 5, 4, 3), _noisy_run, _noisy_judge,
          rules=(EQ4, NO_MUTATION)),
    Probe("noise=None", lambda: _noisy_inputs(212, 5, 4, 3), _clean_run,
          _clean_judge, rules=(NOISE_NONE,)),
)
HIDDEN_NOISY_LOGITS = (
    Probe("with noise, 7 tokens, 6 experts", lambda: _noisy_inputs(213, 7, 3, 6), _noisy_run,
          _noisy_judge, rules=(EQ4, NO_MUTATION)),
    Probe("noise=None, 4 tokens, 5 experts", lambda: _noisy_inputs(214, 4, 6, 5), _clean_run,
          _clean_judge, rules=(NOISE_NONE,)),
)
VISIBLE_SPARSE_MOE = (
    Probe("7 tokens, top-2 of 4 experts, expert 3 idle (a list)",
          lambda: _sparse_inputs(221, 7, 4, 4, 2, idle=(3,)), _sparse_run(False),
          _sparse_judge, rules=(SPARSE_MIX, CALLS, NO_MUTATION)),
    Probe("5 tokens, top-1 of 3 experts, expert 0 idle (an nn.ModuleList)",
          lambda: _sparse_inputs(224, 5, 3, 3, 1, idle=(0,)), _sparse_run(True),
          _sparse_judge, rules=(SPARSE_MIX, CALLS, LIST_OR_MODULE_LIST)),
)
HIDDEN_SPARSE_MOE = (
    Probe("9 tokens, top-3 of 6 experts, experts 0 and 4 idle (an nn.ModuleList)",
          lambda: _sparse_inputs(222, 9, 3, 6, 3, idle=(0, 4)), _sparse_run(True),
          _sparse_judge, rules=(SPARSE_MIX, CALLS, LIST_OR_MODULE_LIST, NO_MUTATION)),
    Probe("6 tokens, top-1 of 3 experts", lambda: _sparse_inputs(223, 6, 5, 3, 1, idle=()),
          _sparse_run(False), _sparse_judge, rules=(SPARSE_MIX, CALLS)),
)
VISIBLE_MOE_FLOPS = (
    Probe("two layer sizes, a large layer and k=E",
          lambda: {"cases": [[10, 4, 6, 8, 2], [7, 3, 5, 6, 1], [3000, 1000, 3000, 60, 3],
                             [4, 3, 2, 2, 2]]},
          _flops_run, _flops_judge, rules=(FLOPS, FLOPS_LARGE)),
)
HIDDEN_MOE_FLOPS = (
    Probe("a large layer and k=E",
          lambda: {"cases": [[4096, 512, 2048, 64, 2], [3, 5, 2, 3, 3], *_flops_cases(231)]},
          _flops_run, _flops_judge, rules=(FLOPS, FLOPS_LARGE)),
)
