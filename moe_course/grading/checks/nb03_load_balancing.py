"""Probes for notebook 03, load balancing and capacity: `cv_squared`, `importance_loss`,
`load_loss` (Shazeer et al. 2017, arXiv 1701.06538, Sec. 4, App. A), `switch_aux_loss`
(Fedus et al. 2021, arXiv 2101.03961, eq. 4-6), `router_z_loss` (Zoph et al. 2022, arXiv
2202.08906, eq. 5), `expert_capacity`, `capacity_positions`, `apply_capacity` (GShard,
arXiv 2006.16668)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ... import capacity as ref_capacity
from ... import losses as ref_losses
from ..inputs import draw_choice, draw_int, gen, logits, min_gap, tie_free
from ..probe import (
    CheckFailure,
    Inputs,
    Outputs,
    Probe,
    call,
    capture,
    describe,
    expect_close,
    expect_items,
    expect_number,
    expect_tensor,
    no_mutation,
)
from .common import positions_token_order

SCALAR = ()  # the shape of a 0-dim tensor


def _cv(v: Tensor, correction: int = 0) -> Tensor:
    if v.numel() == 1:
        return v.new_zeros(())
    return v.var(correction=correction) / (v.mean() ** 2 + 1e-10)


def _cv_variants(v: Tensor, scale: float, what: str) -> list[tuple[Tensor, str]]:
    mean = v.mean()
    return [
        (scale * _cv(v, correction=1),
         f"{what} uses the sample (unbiased, n-1) variance: use the population variance, "
         "v.var(correction=0) (torch.var divides by n-1 by default)"),
        (scale * v.std(correction=0) / (mean + 1e-10),
         f"{what} uses the standard deviation over the mean (the coefficient of variation): "
         "square it, variance / mean**2"),
        (scale * v.std(correction=1) / (mean + 1e-10),
         f"{what} uses the sample standard deviation over the mean: use the population "
         "variance over mean**2"),
        (scale * v.var(correction=0) / (mean + 1e-10),
         f"{what} divides the variance by the mean: divide by mean**2 (+ 1e-10)"),
        (scale * v.var(correction=0), f"{what} is the variance alone: divide it by "
                                      "mean**2 + 1e-10 so it measures imbalance, not scale"),
    ]


def _scalar(value: Any, what: str) -> Tensor:
    return expect_tensor(value, what, SCALAR)


# ----------------------------------------------------------------------------------------
# cv_squared


def _cv_run(fn: Any, inputs: Inputs) -> Outputs:
    results, mutated = [], []
    for v in inputs["vectors"]:
        out = call(fn, [("v", v)])
        results.append(out["result"])
        mutated += out["mutated"]
    leaf = inputs["vectors"][0].clone().requires_grad_(True)
    try:
        grad: Any = torch.autograd.grad(fn(leaf), leaf)[0]
        grad = capture(grad)
    except Exception as exc:  # not differentiable: reported by the judge
        grad = f"{type(exc).__name__}: {str(exc)[:120]}"
    return {"results": results, "mutated": mutated, "grad": grad}


def _cv_judge(inputs: Inputs, outputs: Outputs) -> None:
    no_mutation(outputs, "cv_squared")
    for v, got in zip(inputs["vectors"], outputs["results"], strict=True):
        shown = ", ".join(f"{x:.3g}" for x in v.tolist())
        what = f"cv_squared([{shown}])" if v.numel() <= 6 else "cv_squared(v)"
        value = _scalar(got, what)
        expected = ref_losses.cv_squared(v)
        if not torch.isfinite(value):
            if v.numel() == 1:
                raise CheckFailure(f"{what} gave {value.item()}: a single element must give 0. "
                                   "(the n-1 sample variance of one value is NaN; use the "
                                   "population variance and return 0 for one element)")
            if float(v.abs().max()) == 0:
                raise CheckFailure(f"{what} gave {value.item()} for an all-zero vector: add "
                                   "1e-10 to the denominator, mean**2 + 1e-10")
        expect_close(value, expected, what, variants=_cv_variants(v, 1.0, f"your {what}"))
    grad = outputs["grad"]
    if not isinstance(grad, Tensor):
        raise CheckFailure(f"cv_squared is not differentiable ({grad}): keep it in torch "
                           "operations (no .item(), float() or numpy) so it can be a loss")
    leaf = inputs["vectors"][0].clone().requires_grad_(True)
    ref_losses.cv_squared(leaf).backward()
    expect_close(grad, leaf.grad, "the gradient of your cv_squared")


def _cv_inputs(seed: int) -> Inputs:
    g = gen(seed)
    return {"vectors": [torch.rand(6, generator=g) * 2 + 0.1, torch.rand(3, generator=g) + 0.5]}


def _cv_edge_inputs(seed: int) -> Inputs:
    g = gen(seed)
    return {"vectors": [torch.rand(5, generator=g) * 3, torch.full((4,), 0.7),
                        torch.tensor([2.5]), torch.zeros(3)]}


# ----------------------------------------------------------------------------------------
# importance_loss


def _top_k_gates(g: torch.Generator, t: int, e: int, k: int) -> Tensor:
    scores = logits(g, t, e)
    top, idx = scores.topk(k, dim=-1)  # (T, K), (T, K)
    return torch.zeros(t, e).scatter(1, idx, torch.softmax(top, dim=-1))  # (T, E)


def _importance_inputs(seed: int, t: int, e: int, k: int) -> Inputs:
    return {"gates": _top_k_gates(gen(seed), t, e, k), "w": 0.5}


def _importance_run(fn: Any, inputs: Inputs) -> Outputs:
    default = call(fn, [("gates", inputs["gates"])])
    weighted = call(fn, [("gates", inputs["gates"])], {"w_importance": inputs["w"]})
    return {"default": default["result"], "weighted": weighted["result"],
            "mutated": default["mutated"] + weighted["mutated"]}


def _importance_judge(inputs: Inputs, outputs: Outputs) -> None:
    no_mutation(outputs, "importance_loss")
    gates, w = inputs["gates"], inputs["w"]
    importance = gates.sum(0)  # (E,)
    cv = _cv(importance)
    for key, weight, how in (("default", 0.01, "importance_loss(gates)"),
                             ("weighted", w, f"importance_loss(gates, w_importance={w})")):
        value = _scalar(outputs[key], f"{how}'s result")
        other = w if key == "default" else 0.01
        expect_close(value, weight * cv, how, atol=1e-8, variants=[
            (cv, f"{how} is cv_squared(importance) without the weight: multiply by "
                 "w_importance (default 0.01)"),
            (other * cv, f"{how} used w_importance={other}: use the w_importance argument, "
                         "default 0.01"),
            (weight * _cv(gates.sum(1)), f"{how} summed the gates over experts (dim=1): "
                                         "importance is per expert, gates.sum(0)"),
            *_cv_variants(importance, weight, how),
        ])


# ----------------------------------------------------------------------------------------
# load_loss


def _kth(values: Tensor, k: int) -> Tensor:
    return values.topk(k, dim=-1).values[:, k - 1 : k]  # (T, 1)


def _load_prob(clean: Tensor, noisy: Tensor, std: Tensor, k: int, mode: str = "ok",
               cdf: Any = None) -> Tensor:
    """P(x, i) with a planted mistake `mode`; `ok` is Shazeer's eq. 9."""
    cdf = cdf or torch.distributions.Normal(0.0, 1.0).cdf
    e = noisy.shape[1]
    kth = _kth(noisy, k)  # (T, 1)
    after = _kth(noisy, k + 1) if k < e else torch.full_like(kth, float("-inf"))  # (T, 1)
    in_top = noisy > after  # (T, E)
    threshold = torch.where(in_top, after, kth)  # (T, E)
    if mode == "including":
        threshold = kth.expand_as(noisy)
    elif mode == "next":
        threshold = after.expand_as(noisy)
    elif mode == "clean_threshold":
        ckth = _kth(clean, k)
        cafter = _kth(clean, k + 1) if k < e else torch.full_like(ckth, float("-inf"))
        threshold = torch.where(clean > cafter, cafter, ckth)
    numerator = (noisy if mode == "noisy" else clean) - threshold
    scale = torch.ones_like(std) if mode == "unscaled" else std
    return cdf(numerator / scale)  # (T, E)


def _load_inputs(seed: int, t: int, e: int, k: int) -> Inputs:
    def make(g: torch.Generator) -> Inputs:
        clean = logits(g, t, e)
        std = F.softplus(torch.randn(t, e, generator=g)) + 0.1
        noisy = clean + torch.randn(t, e, generator=g) * std
        return {"clean_logits": clean, "noisy_logits": noisy, "noise_std": std, "k": k,
                "w": 1.0}

    return tie_free(make, lambda i: [min_gap(i["noisy_logits"], dim=-1)], seed)


def _load_run(fn: Any, inputs: Inputs) -> Outputs:
    args = [(n, inputs[n]) for n in ("clean_logits", "noisy_logits", "noise_std", "k")]
    default = call(fn, args)
    weighted = call(fn, args, {"w_load": inputs["w"]})
    if inputs["k"] == inputs["clean_logits"].shape[1]:  # P = 1: no gradient to check
        return {"default": default["result"], "weighted": weighted["result"], "grads": None,
                "mutated": default["mutated"] + weighted["mutated"]}
    clean = inputs["clean_logits"].clone().requires_grad_(True)
    std = inputs["noise_std"].clone().requires_grad_(True)
    try:
        loss = fn(clean, inputs["noisy_logits"].clone(), std, inputs["k"], w_load=inputs["w"])
        grads: Any = [capture(g) if g is not None else "no gradient"
                      for g in torch.autograd.grad(loss, (clean, std), allow_unused=True)]
    except Exception as exc:  # not differentiable: reported by the judge (when k < E)
        grads = f"{type(exc).__name__}: {str(exc)[:120]}"
    return {"default": default["result"], "weighted": weighted["result"], "grads": grads,
            "mutated": default["mutated"] + weighted["mutated"]}


def _load_judge(inputs: Inputs, outputs: Outputs) -> None:
    no_mutation(outputs, "load_loss")
    clean, noisy, std, k, w = (inputs[n] for n in ("clean_logits", "noisy_logits", "noise_std",
                                                   "k", "w"))
    value = _scalar(outputs["weighted"], f"load_loss(..., w_load={w})'s result")

    def loss(mode: str = "ok", cdf: Any = None, correction: int = 0) -> Tensor:
        return w * _cv(_load_prob(clean, noisy, std, k, mode, cdf).sum(0), correction)

    expected = ref_losses.load_loss(clean, noisy, std, k, w_load=w)
    expect_close(value, expected, f"load_loss(..., k={k}, w_load={w})", variants=[
        (loss("including"), "your threshold for expert i is the k-th largest noisy logit "
                            "*including* i: kth_excluding(noisy, k, i) leaves i out, so for an "
                            "expert in the top k it is the (k+1)-th largest"),
        (loss("next"), "your threshold is the (k+1)-th largest noisy logit for every expert: "
                       "that holds only for experts in the top k; for the others it is the "
                       "k-th largest"),
        (loss("clean_threshold"), "your threshold comes from the clean logits: take the k-th "
                                  "largest of the *noisy* logits, excluding i"),
        (loss("noisy"), "your P(x, i) uses the noisy logit of i: use the clean one, "
                        "Phi((clean_i - kth_excluding) / noise_std_i)"),
        (loss("unscaled"), "you did not divide by noise_std before the normal CDF"),
        (loss(cdf=torch.sigmoid), "you used a sigmoid: P(x, i) is the standard normal CDF Phi "
                                  "(torch.distributions.Normal(0, 1).cdf)"),
        (loss(correction=1), "your cv_squared uses the sample (n-1) variance: use the "
                             "population variance"),
    ])
    default = _scalar(outputs["default"], "load_loss(...)'s result with the default w_load")
    expect_close(default, expected * 0.01 / w, "load_loss with the default w_load", atol=1e-9,
                 variants=[(expected / w, "load_loss with the default w_load ignores the "
                                          "weight: multiply by w_load (default 0.01)")])
    if k == clean.shape[1]:
        return  # every expert always chosen: P = 1, a constant with no gradient to check
    grads = outputs["grads"]
    if not isinstance(grads, list) or not all(isinstance(g, Tensor) for g in grads):
        raise CheckFailure(f"your load_loss is not differentiable in clean_logits and noise_std "
                           f"({grads if isinstance(grads, str) else 'no gradient reaches one'}):"
                           " keep P(x, i) a torch expression of them (no .detach(), .item(), "
                           "numpy or torch.no_grad())")
    leaves = [clean.clone().requires_grad_(True), std.clone().requires_grad_(True)]
    ref_losses.load_loss(leaves[0], noisy, leaves[1], k, w_load=w).backward()
    for name, got, leaf in zip(("clean_logits", "noise_std"), grads, leaves, strict=True):
        got = expect_tensor(got, f"the gradient of your load_loss in {name}", tuple(leaf.shape))
        expect_close(got, leaf.grad, f"the gradient of your load_loss in {name}",
                     otherwise=f"your load_loss is right but its gradient in {name} is not: is "
                               "part of P(x, i) computed without autograd?")


# ----------------------------------------------------------------------------------------
# switch_aux_loss


def _switch_inputs(seed: int, t: int, e: int, k: int) -> Inputs:
    def make(g: torch.Generator) -> Inputs:
        scores = logits(g, t, e)
        return {"router_probs": torch.softmax(scores, dim=-1),
                "indices": scores.topk(k, dim=-1).indices, "logits": scores}

    return tie_free(make, lambda i: [min_gap(i["logits"], dim=-1)], seed)


def _uniform_inputs(t: int, e: int) -> Inputs:
    return {"router_probs": torch.full((t, e), 1.0 / e),
            "indices": torch.arange(t)[:, None] % e}


def _switch_run(fn: Any, inputs: Inputs) -> Outputs:
    leaf = inputs["router_probs"].clone().requires_grad_(True)
    result = fn(leaf, inputs["indices"].clone())
    try:
        grad: Any = capture(torch.autograd.grad(result, leaf)[0])
    except Exception as exc:  # reported by the judge
        grad = f"{type(exc).__name__}: {str(exc)[:120]}"
    return {"result": capture(result), "grad": grad}


def _switch_judge(inputs: Inputs, outputs: Outputs) -> None:
    probs, idx = inputs["router_probs"], inputs["indices"]
    (t, e), k = probs.shape, idx.shape[1]
    value = _scalar(outputs["result"], "switch_aux_loss' result")
    counts = F.one_hot(idx, e).sum(dim=(0, 1)).to(probs.dtype)  # (E,)
    p = probs.mean(0)  # (E,)
    expected = ref_losses.switch_aux_loss(probs, idx)
    f = counts / (t * k)
    variants = [
        (expected * k, f"your loss is K = {k} times too large: f_e is the share of all T*K "
                       "assignments (counts / (T*K)); Hugging Face's Mixtral divides by T, "
                       "which makes a uniform router score K instead of 1"),
        (expected / e, "your loss lacks the factor E (or averages over experts instead of "
                       "summing): E * sum_e f_e * P_e, which is 1 for a uniform router"),
        (e * (p * p).sum(), "your f_e is the mean probability: f_e is the share of "
                            "assignments, counted from indices (not differentiable)"),
        (e * (counts * p).sum(), "your f_e is a count: divide the counts by T*K"),
        (e * (F.one_hot(idx[:, 0], e).sum(0) / t * p).sum(),
         "you counted only the first choices indices[:, 0]: count all K choices"),
        (e * (f * probs.sum(0)).sum(), "your P_e is a sum over tokens: take the mean"),
    ]
    expect_close(value, expected, "your switch_aux_loss", variants=variants)
    grad = outputs["grad"]
    if not isinstance(grad, Tensor):
        raise CheckFailure(f"your switch_aux_loss is not differentiable in router_probs "
                           f"({grad}): P_e must stay a torch mean of router_probs")
    expect_close(grad, (e * f / t).expand(t, e), "the gradient of your switch_aux_loss "
                 "with respect to router_probs", variants=[],
                 otherwise="the gradient of your loss with respect to router_probs should be "
                           "E * f_e / T: only P_e is differentiable, f_e is counted")


# ----------------------------------------------------------------------------------------
# router_z_loss


def _z_inputs(seed: int, t: int, e: int, scale: float, offset: float = 0.0) -> Inputs:
    return {"logits": logits(gen(seed), t, e, scale=scale) + offset}


def _z_run(fn: Any, inputs: Inputs) -> Outputs:
    return call(fn, [("logits", inputs["logits"])])


def _z_judge(inputs: Inputs, outputs: Outputs) -> None:
    no_mutation(outputs, "router_z_loss")
    lg = inputs["logits"]
    value = _scalar(outputs["result"], "router_z_loss' result")
    lse = torch.logsumexp(lg, dim=-1)  # (T,)
    if not torch.isfinite(value):
        raise CheckFailure(f"your router_z_loss is {value.item()} for logits up to "
                           f"{float(lg.abs().max()):.0f}: exp overflows; use torch.logsumexp")
    expect_close(value, ref_losses.router_z_loss(lg), "your router_z_loss", variants=[
        (lse.mean(), "your z-loss is not squared: mean over tokens of logsumexp(logits)**2"),
        (lse.pow(2).sum(), "your z-loss sums over tokens: take the mean"),
        (lg.pow(2).mean(), "your z-loss squares the logits: square logsumexp(logits) per token"),
        (lg.pow(2).sum(-1).mean(), "your z-loss squares the logits: square logsumexp(logits) "
                                   "per token"),
        (lg.max(-1).values.pow(2).mean(), "your z-loss uses the max logit: use logsumexp"),
        (lse.mean().pow(2), "your z-loss squares the mean: average the squares, "
                            "mean_t(logsumexp_t**2)"),
    ])


# ----------------------------------------------------------------------------------------
# expert_capacity

_CAP_ARGS = ("n_tokens", "n_experts", "capacity_factor", "k")


# Capacity factors exact in binary: a drawn case never hinges on float rounding.
_FACTORS = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0)


def _capacity_cases(seed: int) -> list[list[float | int]]:
    """Three more layers drawn from `seed` (from the course secret in hidden checks)."""
    g = gen(seed)
    cases: list[list[float | int]] = []
    for _ in range(3):
        e = draw_int(g, 1, 16)
        cases.append([draw_int(g, 1, 200), e, draw_choice(g, _FACTORS), draw_int(g, 1, e)])
    return cases


def _capacity_run(fn: Any, inputs: Inputs) -> Outputs:
    results = []
    for *args, k in inputs["cases"]:
        results.append(capture(fn(*args) if k is None else fn(*args, k=k)))
    return {"results": results}


def _call_text(name: str, names: tuple[str, ...], case: list[Any]) -> str:
    pairs = zip(names[: len(case)], case, strict=True)
    return f"{name}(" + ", ".join(f"{n}={v}" for n, v in pairs if v is not None) + ")"


def _capacity_judge(inputs: Inputs, outputs: Outputs) -> None:
    for case, got in zip(inputs["cases"], outputs["results"], strict=True):
        t, e, cf, k = case
        k_ = 1 if k is None else k
        what = _call_text("expert_capacity", _CAP_ARGS, case)
        value = expect_number(got, what, integer=True)
        expected = ref_capacity.expert_capacity(t, e, cf, k_)
        raw = k_ * t * cf / e
        if value == expected:
            continue
        for wrong, message in (
            (min(t, math.floor(raw)), "you rounded down: capacity rounds *up*, math.ceil, so "
                                      "that T*k*factor assignments fit in E buffers"),
            (min(t, round(raw)), "you rounded to the nearest integer: round up, math.ceil"),
            (math.ceil(raw), f"capacity can't exceed the number of tokens: min(n_tokens, ...) "
                             f"= {t}"),
            (min(t, math.ceil(t * cf / e)), "you ignored k: each token makes k assignments, "
                                            "ceil(k * T * factor / E)"),
        ):
            if value == wrong:
                raise CheckFailure(f"{what} returned {value}, expected {expected}: {message}")
        raise CheckFailure(f"{what} returned {value}, expected {expected} = min(T, "
                           "ceil(k * T * capacity_factor / E))")


def _capacity_error_run(fn: Any, inputs: Inputs) -> Outputs:
    reports = []
    for case in inputs["bad"]:
        try:
            result = fn(*case)
        except Exception as exc:
            reports.append({"raised": type(exc).__name__,
                            "value_error": isinstance(exc, ValueError),
                            "message": str(exc)[:200]})
        else:
            reports.append({"raised": None, "value_error": False,
                            "message": describe(capture(result))})
    return {"reports": reports}


def _capacity_error_judge(inputs: Inputs, outputs: Outputs) -> None:
    for case, report in zip(inputs["bad"], outputs["reports"], strict=True):
        what = _call_text("expert_capacity", _CAP_ARGS, case)
        if report["value_error"]:
            continue
        if report["raised"] is None:
            raise CheckFailure(f"{what} returned {report['message']} instead of raising "
                               "ValueError: a capacity factor must be > 0")
        raise CheckFailure(f"{what} raised {report['raised']}; raise a ValueError saying the "
                           "capacity factor must be > 0")


# ----------------------------------------------------------------------------------------
# capacity_positions




def _positions_per_rank(idx: Tensor, e: int) -> Tensor:
    hot = F.one_hot(idx, e)  # (T, K, E)
    return ((hot.cumsum(0) - 1) * hot).sum(-1)  # (T, K), counted within each rank


def _positions_inputs(seed: int, t: int, e: int, k: int) -> Inputs:
    def make(g: torch.Generator) -> Inputs:
        scores = logits(g, t, e)
        return {"indices": scores.topk(k, dim=-1).indices, "n_experts": e, "logits": scores}

    def gaps(i: Inputs) -> list[float]:
        idx = i["indices"]
        ok = ref_capacity.capacity_positions(idx, e)
        differs = k == 1 or not torch.equal(ok, positions_token_order(idx, e))
        return [min_gap(i["logits"], dim=-1), 1.0 if differs else 0.0]

    return tie_free(make, gaps, seed)


def _positions_run(fn: Any, inputs: Inputs) -> Outputs:
    return call(fn, [("indices", inputs["indices"]), ("n_experts", inputs["n_experts"])])


def _positions_judge(inputs: Inputs, outputs: Outputs) -> None:
    no_mutation(outputs, "capacity_positions")
    idx, e = inputs["indices"], inputs["n_experts"]
    got = expect_tensor(outputs["result"], "capacity_positions' output", tuple(idx.shape),
                        kind="int", hint=" (T, K)")
    expected = ref_capacity.capacity_positions(idx, e)
    t, k = idx.shape
    expect_close(got, expected, "your slot positions", variants=[
        (positions_token_order(idx, e),
         "you filled the slots token by token (token 0's choices, then token 1's, ...): fill "
         "by choice rank instead, all first choices in token order, then all second choices "
         "(GShard priority, so no first choice is dropped for someone's second)"),
        (_positions_per_rank(idx, e),
         "your slot numbers restart at 0 for each choice rank: second choices queue *after* "
         "all first choices for the same expert"),
        (expected + 1, "your slots count from 1: the first slot of a buffer is 0"),
        (torch.arange(t * k).reshape(k, t).t(),
         "your positions count assignments over all experts: count separately per expert"),
    ])


# ----------------------------------------------------------------------------------------
# apply_capacity


def _apply_inputs(seed: int, t: int, e: int, k: int, capacity: int) -> Inputs:
    def make(g: torch.Generator) -> Inputs:
        scores = logits(g, t, e, scale=1.0)
        scores[:, 0] += 0.8  # expert 0 is popular: it overflows
        top, idx = scores.topk(k, dim=-1)
        return {"weights": torch.softmax(top, dim=-1), "indices": idx, "capacity": capacity,
                "logits": scores}

    def gaps(i: Inputs) -> list[float]:
        idx, c = i["indices"], i["capacity"]
        keep = ref_capacity.capacity_positions(idx, e) < c
        token_keep = positions_token_order(idx, e) < c
        all_dropped = bool((~keep).all(-1).any())
        return [min_gap(i["logits"], dim=-1), 1.0 if all_dropped else 0.0,
                1.0 if k == 1 or not torch.equal(keep, token_keep) else 0.0,
                1.0 if bool((keep.sum(-1) == 1).any()) or k == 1 else 0.0]

    return tie_free(make, gaps, seed, tries=500)


def _apply_run(fn: Any, inputs: Inputs) -> Outputs:
    return call(fn, [("weights", inputs["weights"]), ("indices", inputs["indices"]),
                     ("capacity", inputs["capacity"])])


def _apply_judge(inputs: Inputs, outputs: Outputs) -> None:
    no_mutation(outputs, "apply_capacity")
    w, idx, c = inputs["weights"], inputs["indices"], inputs["capacity"]
    e = int(idx.max()) + 1
    shape = tuple(w.shape)
    new_w, keep = expect_items(outputs["result"], "apply_capacity", ("weights", "keep"))
    new_w = expect_tensor(new_w, "apply_capacity's weights", shape, hint=" (T, K)")
    keep = expect_tensor(keep, "apply_capacity's keep", shape, kind="bool",
                         hint=" (T, K), True where the assignment fits")
    positions = ref_capacity.capacity_positions(idx, e)
    expected_keep = positions < c
    expect_close(keep, expected_keep, "your keep mask", variants=[
        (positions_token_order(idx, e) < c,
         "your keep mask fills the buffers token by token: fill by choice rank (all first "
         "choices in token order, then second choices), as capacity_positions does"),
        (positions <= c, "your keep mask keeps slot == capacity: slots are 0 .. capacity-1, "
                         "keep where position < capacity"),
        (positions < c - 1, "your keep mask drops slot capacity-1: keep where position < "
                            "capacity"),
    ])
    expected = torch.where(expected_keep, w, torch.zeros_like(w))
    renorm = expected / expected.sum(-1, keepdim=True)
    expect_close(new_w, expected, "your kept weights", variants=[
        (renorm, "you renormalised the kept weights after dropping: leave them as they were "
                 "(the dropped share of the token rides the residual connection)"),
        (renorm.nan_to_num(0.0), "you renormalised the kept weights after dropping: leave "
                                 "them as they were"),
        (w, "your dropped assignments keep their weight: set it to 0 where keep is False"),
    ])


# Rules the exercises state, each tested by a visible probe and again by a hidden one.
CV = "population variance over mean**2 + 1e-10, a 0-dim tensor"
CV_SINGLE = "0. for a single element"
CV_ZEROS = "0. (not NaN) for an all-zero vector"
DIFFERENTIABLE = "differentiable: a loss"
NO_MUTATION = "never changes an argument in place"
IMPORTANCE = "w * cv_squared(gates.sum(0))"
DEFAULT_WEIGHT = "the weight argument is used, default 0.01"
LOAD = "Phi((clean_i - kth_excluding(noisy, k, i)) / noise_std_i), w * cv_squared(P.sum(0))"
LOAD_K_E = "k = E: every expert always chosen, P = 1"
SWITCH = "E * sum_e f_e * P_e, f_e the share of the T*K assignments"
SWITCH_UNIFORM = "a uniform router scores 1"
Z_LOSS = "mean over tokens of logsumexp(logits)**2"
Z_OVERFLOW = "must not overflow for logits in the hundreds"
CAPACITY = "min(n_tokens, ceil(k * n_tokens * capacity_factor / n_experts)), an int, k=1 default"
CAPACITY_ERROR = "ValueError for a capacity factor <= 0"
GSHARD_PRIORITY = "all first choices fill first in token order, then the second choices"
DROP = "slot >= capacity dropped (weight 0, keep False); kept weights not renormalised"
DROPPED_EVERYWHERE = "a token dropped everywhere gets all-zero weights"

VISIBLE_CV_SQUARED = (
    Probe("two vectors", lambda: _cv_inputs(301), _cv_run, _cv_judge,
          rules=(CV, DIFFERENTIABLE, NO_MUTATION)),
    Probe("a single element and an all-zero vector",
          lambda: {"vectors": [torch.rand(4, generator=gen(303)) + 0.2, torch.tensor([0.4]),
                               torch.zeros(5), torch.full((3,), 2.0)]},
          _cv_run, _cv_judge, rules=(CV, CV_SINGLE, CV_ZEROS)),
)
HIDDEN_CV_SQUARED = (
    Probe("constant, single and all-zero vectors", lambda: _cv_edge_inputs(302), _cv_run,
          _cv_judge, rules=(CV, CV_SINGLE, CV_ZEROS, DIFFERENTIABLE, NO_MUTATION)),
)
VISIBLE_IMPORTANCE_LOSS = (
    Probe("8 tokens, top-2 of 4 experts", lambda: _importance_inputs(311, 8, 4, 2),
          _importance_run, _importance_judge, rules=(IMPORTANCE, DEFAULT_WEIGHT, NO_MUTATION)),
    Probe("6 tokens, top-1 of 3 experts", lambda: _importance_inputs(313, 6, 3, 1),
          _importance_run, _importance_judge, rules=(IMPORTANCE, DEFAULT_WEIGHT)),
)
HIDDEN_IMPORTANCE_LOSS = (
    Probe("12 tokens, top-1 of 5 experts", lambda: _importance_inputs(312, 12, 5, 1),
          _importance_run, _importance_judge,
          rules=(IMPORTANCE, DEFAULT_WEIGHT, NO_MUTATION)),
)
VISIBLE_LOAD_LOSS = (
    Probe("8 tokens, 5 experts, k=2", lambda: _load_inputs(321, 8, 5, 2), _load_run,
          _load_judge, rules=(LOAD, DEFAULT_WEIGHT, DIFFERENTIABLE, NO_MUTATION)),
    Probe("7 tokens, 3 experts, k=1", lambda: _load_inputs(324, 7, 3, 1), _load_run,
          _load_judge, rules=(LOAD, DIFFERENTIABLE)),
    Probe("k = E = 4", lambda: _load_inputs(325, 5, 4, 4), _load_run, _load_judge,
          rules=(LOAD_K_E, DEFAULT_WEIGHT)),
)
HIDDEN_LOAD_LOSS = (
    Probe("10 tokens, 4 experts, k=1", lambda: _load_inputs(322, 10, 4, 1), _load_run,
          _load_judge, rules=(LOAD, DEFAULT_WEIGHT, DIFFERENTIABLE, NO_MUTATION)),
    Probe("6 tokens, 6 experts, k=3", lambda: _load_inputs(323, 6, 6, 3), _load_run,
          _load_judge, rules=(LOAD, DEFAULT_WEIGHT, DIFFERENTIABLE)),
    Probe("k = E = 3", lambda: _load_inputs(326, 6, 3, 3), _load_run, _load_judge,
          rules=(LOAD_K_E, DEFAULT_WEIGHT)),
)
VISIBLE_SWITCH_AUX_LOSS = (
    Probe("10 tokens, top-2 of 4 experts", lambda: _switch_inputs(331, 10, 4, 2), _switch_run,
          _switch_judge, rules=(SWITCH, DIFFERENTIABLE)),
    Probe("a uniform router scores 1 (6 tokens, 3 experts)", lambda: _uniform_inputs(6, 3),
          _switch_run, _switch_judge, rules=(SWITCH, SWITCH_UNIFORM)),
)
HIDDEN_SWITCH_AUX_LOSS = (
    Probe("12 tokens, top-1 of 5 experts", lambda: _switch_inputs(332, 12, 5, 1), _switch_run,
          _switch_judge, rules=(SWITCH, DIFFERENTIABLE)),
    Probe("a uniform router scores 1", lambda: _uniform_inputs(8, 4), _switch_run,
          _switch_judge, rules=(SWITCH, SWITCH_UNIFORM)),
)
VISIBLE_ROUTER_Z_LOSS = (
    Probe("6 tokens, 5 experts", lambda: _z_inputs(341, 6, 5, 3.0), _z_run, _z_judge,
          rules=(Z_LOSS, NO_MUTATION)),
    Probe("logits in the hundreds", lambda: _z_inputs(343, 3, 4, 10.0, offset=150.0),
          _z_run, _z_judge, rules=(Z_LOSS, Z_OVERFLOW)),
)
HIDDEN_ROUTER_Z_LOSS = (
    Probe("large logits", lambda: _z_inputs(342, 4, 3, 10.0, offset=100.0), _z_run, _z_judge,
          rules=(Z_LOSS, Z_OVERFLOW, NO_MUTATION)),
)
VISIBLE_EXPERT_CAPACITY = (
    Probe("four layer sizes",
          lambda: {"cases": [[8, 4, 1.25, None], [10, 4, 1.5, 2], [4, 2, 4.0, None],
                             [12, 8, 1.0, None]]},
          _capacity_run, _capacity_judge, rules=(CAPACITY,)),
    Probe("capacity_factor 0 and -0.5 raise ValueError",
          lambda: {"bad": [[6, 3, 0.0], [6, 3, -0.5]]}, _capacity_error_run,
          _capacity_error_judge, rules=(CAPACITY_ERROR,)),
)
HIDDEN_EXPERT_CAPACITY = (
    Probe("more layer sizes",
          lambda: {"cases": [[16, 8, 1.0, 1], [9, 4, 0.5, 2], [3, 1, 2.0, 1],
                             [100, 6, 1.25, 2], *_capacity_cases(351)]},
          _capacity_run, _capacity_judge, rules=(CAPACITY,)),
    Probe("capacity_factor <= 0 raises ValueError",
          lambda: {"bad": [[8, 4, 0.0], [8, 4, -1.0]]}, _capacity_error_run,
          _capacity_error_judge, rules=(CAPACITY_ERROR,)),
)
VISIBLE_CAPACITY_POSITIONS = (
    Probe("8 tokens, top-2 of 3 experts", lambda: _positions_inputs(351, 8, 3, 2),
          _positions_run, _positions_judge, rules=(GSHARD_PRIORITY, NO_MUTATION)),
    Probe("6 tokens, top-1 of 2 experts", lambda: _positions_inputs(354, 6, 2, 1),
          _positions_run, _positions_judge, rules=(GSHARD_PRIORITY,)),
)
HIDDEN_CAPACITY_POSITIONS = (
    Probe("10 tokens, top-3 of 4 experts", lambda: _positions_inputs(352, 10, 4, 3),
          _positions_run, _positions_judge, rules=(GSHARD_PRIORITY, NO_MUTATION)),
    Probe("7 tokens, top-1 of 3 experts", lambda: _positions_inputs(353, 7, 3, 1),
          _positions_run, _positions_judge, rules=(GSHARD_PRIORITY,)),
)
VISIBLE_APPLY_CAPACITY = (
    Probe("8 tokens, top-2 of 3 experts, capacity 3", lambda: _apply_inputs(361, 8, 3, 2, 3),
          _apply_run, _apply_judge, rules=(DROP, DROPPED_EVERYWHERE, NO_MUTATION)),
    Probe("7 tokens, top-1 of 3 experts, capacity 2", lambda: _apply_inputs(365, 7, 3, 1, 2),
          _apply_run, _apply_judge, rules=(DROP, DROPPED_EVERYWHERE)),
)
HIDDEN_APPLY_CAPACITY = (
    Probe("10 tokens, top-3 of 4 experts, capacity 4", lambda: _apply_inputs(364, 10, 4, 3, 4),
          _apply_run, _apply_judge, rules=(DROP, DROPPED_EVERYWHERE, NO_MUTATION)),
    Probe("9 tokens, top-1 of 3 experts, capacity 2", lambda: _apply_inputs(363, 9, 3, 1, 2),
          _apply_run, _apply_judge, rules=(DROP, DROPPED_EVERYWHERE)),
)
