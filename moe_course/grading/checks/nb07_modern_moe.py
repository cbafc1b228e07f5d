"""Probes for notebook 07, modern mixtures: `shared_expert_moe` (DeepSeekMoE, arXiv
2401.06066, eq. 9-11), `biased_top_k` (DeepSeek-V3, arXiv 2412.19437, eq. 13-16),
`aux_free_bias_update` (DeepSeek-V3, Sec. 2.1.2),
`soft_moe` (Puigcerver et al., arXiv 2308.00951, eq. 1-2) and `sort_by_expert` (MegaBlocks,
arXiv 2211.15841)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..inputs import gen, logits, min_gap, tie_free
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
    expect_tensor,
    matching_variant,
    no_mutation,
)
from ..recording import expert_inputs, expert_outputs, judge_expert_calls, probe_experts
from .common import UNWEIGHTED

# ----------------------------------------------------------------------------------------
# shared_expert_moe


def _shared_part(inputs: Inputs) -> Inputs:
    """The shared experts' weights under the key names `probe_experts` reads."""
    return {"expert_a": inputs["shared_a"], "expert_b": inputs["shared_b"],
            "expert_c": inputs["shared_c"]}


def _shared_inputs(seed: int, t: int, d: int, n_shared: int, n_routed: int, k: int,
                   idle: tuple[int, ...] = ()) -> Inputs:
    def make(g: torch.Generator) -> Inputs:
        x = torch.randn(t, d, generator=g)
        x[:, 0] = 1.0  # a constant feature, so w_gate[0] acts as a per-expert offset
        w_gate = torch.randn(d, n_routed, generator=g)
        w_gate[0, list(idle)] = -30.0  # experts nobody is routed to
        shared = expert_inputs(g, n_shared, d)
        return {"x": x, "w_gate": w_gate, "k": k, **expert_inputs(g, n_routed, d),
                "shared_a": shared["expert_a"], "shared_b": shared["expert_b"],
                "shared_c": shared["expert_c"]}

    def gaps(i: Inputs) -> list[float]:
        probs = torch.softmax(i["x"] @ i["w_gate"], dim=-1)  # (T, E)
        top = probs.topk(min(k + 1, n_routed), dim=-1).values  # (T, K+1), idle ones excluded
        return [float(top.diff(dim=-1).abs().min()) if top.shape[1] > 1 else 1.0]

    return tie_free(make, gaps, seed)


def _shared_run(module_list: bool) -> Any:
    def run(fn: Any, inputs: Inputs) -> Outputs:
        shared = probe_experts(_shared_part(inputs), module_list=module_list)
        routed = probe_experts(inputs, module_list=module_list)
        out = call(fn, [("x", inputs["x"]), ("shared_experts", shared),
                        ("routed_experts", routed), ("w_gate", inputs["w_gate"]),
                        ("k", inputs["k"])])
        return {**out, "calls": [expert.record for expert in routed],
                "shared_calls": [expert.record for expert in shared]}

    return run


def _judge_shared_calls(records: list[Any], x: Tensor, n_shared: int) -> None:
    if not isinstance(records, (list, tuple)) or len(records) != n_shared:
        raise CheckFailure("could not read which rows the shared experts of shared_expert_moe "
                           "were called on")
    for s, store in enumerate(records):
        count = int(store.get("count", 0)) if isinstance(store, dict) else 0
        if count == 0:
            raise CheckFailure(f"shared expert {s} was never called: shared experts run on "
                               "every token, y = sum_i shared_experts[i](x) + the routed part")
        if count > 1:
            raise CheckFailure(f"shared expert {s} was called {count} times: call each shared "
                               "expert once, on all of x")
        seen = store.get("inputs", [])
        value = seen[0] if seen else None
        if not (isinstance(value, Tensor) and close(value, x)):
            got = describe(value) if value is not None else "nothing readable"
            raise CheckFailure(f"shared expert {s} was called on {got}, not on x (T, D): a "
                               "shared expert is not routed, it sees every token, unweighted")


def _shared_judge(inputs: Inputs, outputs: Outputs) -> None:
    no_mutation(outputs, "shared_expert_moe")
    x, w_gate, k = inputs["x"], inputs["w_gate"], inputs["k"]
    (t, d), e = x.shape, w_gate.shape[1]
    result = outputs["result"]
    y, weights, indices = expect_items(result, "shared_expert_moe", ("y", "weights", "indices"))
    y = expect_tensor(y, "shared_expert_moe's y", (t, d), hint=" (T, D)")
    weights = expect_tensor(weights, "shared_expert_moe's weights", (t, k), hint=" (T, K)")
    indices = expect_tensor(indices, "shared_expert_moe's indices", (t, k), kind="int",
                            hint=" (T, K), the chosen routed experts")
    lg = x @ w_gate  # (T, E)
    probs = torch.softmax(lg, dim=-1)  # (T, E) eq. 11
    top, idx = probs.topk(k, dim=-1)  # (T, K) eq. 10
    expect_close(indices, idx, "your indices", variants=[
        (idx.flip(-1), "your indices are in ascending order: list each token's experts best "
                       "first (torch.topk's default order)"),
        (idx.sort(dim=-1).values, "your indices are the right experts sorted by expert id: "
                                  "keep them best first"),
    ])
    renormalised = top / top.sum(-1, keepdim=True)  # (T, K)
    expect_close(weights, top, "your weights", variants=[
        (renormalised, "your weights sum to 1 per token: DeepSeekMoE keeps the softmax over "
                       "all routed experts, g = s at the top-k (eq. 10), without renormalising "
                       "(this is not notebook 02's top_k_gating)"),
        (lg.gather(1, idx), "your weights are raw logits: take s = softmax(x @ w_gate) over "
                            "the routed experts first"),
        (torch.softmax(lg, dim=0).gather(1, idx), "your softmax runs over tokens (dim=0): take "
                                                  "it over the routed experts (dim=-1)"),
    ])
    routed_outs = expert_outputs(inputs, x)  # (E, T, D)
    shared_outs = expert_outputs(_shared_part(inputs), x)  # (S, T, D)
    picked = routed_outs[idx, torch.arange(t)[:, None]]  # (T, K, D)

    def mix(w: Tensor) -> Tensor:
        return (w[..., None] * picked).sum(1)  # (T, D)

    shared_sum = shared_outs.sum(0) if shared_outs.shape[0] else x.new_zeros(t, d)  # (T, D)
    expected = shared_sum + mix(top)
    variants = [
        (mix(top), "your y leaves out the shared experts: add every shared expert's output, "
                   "weight 1, for every token (y = sum_i shared_i(x) + sum_e g_e routed_e(x))"),
        (shared_sum + mix(renormalised), "your y uses renormalised weights: weight the routed "
                                         "experts by s itself, the softmax over all routed "
                                         "experts (eq. 10)"),
        (shared_sum + mix(torch.ones_like(top)), "your routed " + UNWEIGHTED),
        (shared_sum + top[:, :1] * picked[:, 0], "your y uses only each token's best routed "
                                                 "expert: sum over all k choices"),
        (shared_sum + torch.einsum("te,etd->td", probs, routed_outs),
         "your y mixes every routed expert (dense): only the top-k count, g = 0 elsewhere"),
    ]
    if shared_outs.shape[0] > 1:
        variants.append((shared_outs.mean(0) + mix(top),
                         "you averaged the shared experts: add each one with weight 1"))
    routed = [[tok for tok in range(t) for j in range(k) if int(idx[tok, j]) == ex]
              for ex in range(e)]
    try:
        _judge_shared_calls(outputs["shared_calls"], x, shared_outs.shape[0])
        judge_expert_calls(outputs["calls"], x, routed, symbol="shared_expert_moe")
    except CheckFailure as failure:
        raise CheckFailure(matching_variant(y, variants) or failure.message) from None
    expect_close(y, expected, "your shared_expert_moe output", variants=variants)


# ----------------------------------------------------------------------------------------
# biased_top_k


def _biased_inputs(seed: int, t: int, e: int, k: int, bias_scale: float) -> Inputs:
    """Sigmoid affinities and a bias large enough to change some tokens' choices."""

    def make(g: torch.Generator) -> Inputs:
        scores = torch.sigmoid(logits(g, t, e))  # (T, E) eq. 15
        bias = bias_scale * torch.randn(e, generator=g)  # (E,)
        return {"scores": scores, "bias": bias, "k": k,
                "cotangent": torch.randn(t, k, generator=g)}

    def gaps(i: Inputs) -> list[float]:
        s, b = i["scores"], i["bias"]
        out = [min_gap(s + b, dim=-1), min_gap(s, dim=-1)]
        if i["k"] < e:  # the bias must change at least one token's set of experts
            biased = (s + b).topk(i["k"], dim=-1).indices.sort(-1).values
            plain = s.topk(i["k"], dim=-1).indices.sort(-1).values
            out.append(1.0 if bool((biased != plain).any()) else 0.0)
        return out

    return tie_free(make, gaps, seed)


def _biased_run(fn: Any, inputs: Inputs) -> Outputs:
    return call(fn, [("scores", inputs["scores"]), ("bias", inputs["bias"]),
                     ("k", inputs["k"])])


def _biased_expected(scores: Tensor, bias: Tensor, k: int) -> tuple[Tensor, Tensor]:
    indices = (scores + bias).topk(k, dim=-1).indices  # (T, K) eq. 16
    chosen = scores.gather(1, indices)  # (T, K) unbiased s_{i,t}
    return chosen / chosen.sum(-1, keepdim=True), indices  # eq. 13


def _biased_judge(inputs: Inputs, outputs: Outputs) -> None:
    no_mutation(outputs, "biased_top_k")
    scores, bias, k = inputs["scores"], inputs["bias"], inputs["k"]
    t = scores.shape[0]
    weights, indices = expect_items(outputs["result"], "biased_top_k", ("weights", "indices"))
    weights = expect_tensor(weights, "biased_top_k's weights", (t, k), hint=" (T, K)")
    indices = expect_tensor(indices, "biased_top_k's indices", (t, k), kind="int",
                            hint=" (T, K), the chosen experts")
    expected_w, expected_i = _biased_expected(scores, bias, k)
    biased = scores + bias  # (T, E)
    expect_close(indices, expected_i, "your indices", variants=[
        (scores.topk(k, dim=-1).indices,
         "you chose the experts by the unbiased scores: the bias is there to choose, take the "
         "top k of scores + bias (eq. 16)"),
        (expected_i.flip(-1), "your indices are the right experts in ascending order: return "
                              "them best biased score first (torch.topk's order)"),
        (expected_i.sort(dim=-1).values, "your indices are the right experts sorted by expert "
                                         "id: keep them in descending order of scores + bias"),
        (biased.topk(k, dim=-1, largest=False).indices,
         "your indices are the k *smallest* biased scores: take the largest"),
        ((scores - bias).topk(k, dim=-1).indices,
         "you subtracted the bias: the experts chosen are the top k of scores + bias"),
    ])
    chosen = scores.gather(1, expected_i)  # (T, K) unbiased
    chosen_b = biased.gather(1, expected_i)  # (T, K)
    sums = float(weights.sum(-1).mean())
    expect_close(weights, expected_w, "your weights", variants=[
        (chosen_b / chosen_b.sum(-1, keepdim=True),
         "your weights include the bias: the bias only chooses the experts; weight them by "
         "their *unbiased* scores, normalised over the chosen (eq. 13)"),
        (chosen_b, "your weights are the biased scores: use the unbiased scores of the chosen "
                   "experts, divided by their sum (eq. 13)"),
        (chosen, f"your weights sum to {sums:.2f} per token: divide the chosen scores by their "
                 "sum over the k chosen experts, so they sum to 1 (eq. 13)"),
        (chosen / scores.sum(-1, keepdim=True),
         "you normalised over all E experts: divide by the sum over the k *chosen* ones "
         "(eq. 13)"),
        (torch.softmax(chosen, dim=-1),
         "you took a softmax of the chosen scores: DeepSeek-V3 divides the sigmoid affinities "
         "by their sum over the chosen experts (eq. 13), no exponential"),
        (torch.softmax(chosen_b, dim=-1), "your weights are a softmax of the biased scores: "
                                          "divide the unbiased scores by their sum (eq. 13)"),
        (expected_w.flip(-1), "your weights are in the reverse order of your indices: "
                              "weights[t, j] must belong to expert indices[t, j]"),
    ])


def _biased_grad_run(fn: Any, inputs: Inputs) -> Outputs:
    scores = inputs["scores"].clone().requires_grad_(True)
    bias = inputs["bias"].clone().requires_grad_(True)
    result = fn(scores, bias, inputs["k"])
    try:
        loss = (result[0] * inputs["cotangent"]).sum()
        g_scores, g_bias = torch.autograd.grad(loss, (scores, bias), allow_unused=True)
        out: Any = {"scores": capture(g_scores) if g_scores is not None else "none",
                    "bias": capture(g_bias) if g_bias is not None else "none"}
    except Exception as exc:  # not differentiable: reported by the judge
        out = f"{type(exc).__name__}: {str(exc)[:160]}"
    return {"result": capture(result), "grad": out, "mutated": []}


def _biased_grad_judge(inputs: Inputs, outputs: Outputs) -> None:
    _biased_judge(inputs, outputs)
    grad = outputs["grad"]
    if not isinstance(grad, dict) or not isinstance(grad.get("scores"), Tensor):
        raise CheckFailure(f"your weights are not differentiable with respect to the scores "
                           f"({grad if isinstance(grad, str) else 'no gradient'}): the router "
                           "learns through them, so keep them torch operations on scores (no "
                           ".detach(), .item() or torch.no_grad())")
    g_bias = grad.get("bias")
    if isinstance(g_bias, Tensor) and bool(g_bias.abs().max() > 1e-6):
        raise CheckFailure("a gradient reaches the bias through your weights: the bias must "
                           "only choose the experts (no gradient, DeepSeek-V3 Sec. 2.1.2); "
                           "compute the weights from the unbiased scores alone")
    scores = inputs["scores"].clone().requires_grad_(True)
    weights, _ = _biased_expected(scores, inputs["bias"], inputs["k"])
    (weights * inputs["cotangent"]).sum().backward()
    expect_close(grad["scores"], scores.grad,
                 "the gradient of your weights with respect to the scores")


# ----------------------------------------------------------------------------------------
# aux_free_bias_update


def _expected_bias(bias: Tensor, counts: Tensor, gamma: float) -> Tensor:
    c = counts.to(torch.float64)
    return bias + gamma * torch.sign(c.mean() - c).to(bias.dtype)  # (E,)


def _bias_inputs(seed: int, counts: list[float], gamma: float, floats: bool = False) -> Inputs:
    g = gen(seed)
    perm = torch.randperm(len(counts), generator=g)
    values = torch.tensor(counts, dtype=torch.float64)[perm]  # (E,)
    loads = (values / values.sum()).float() if floats else values.long()
    return {"bias": torch.randn(len(counts), generator=g) * 0.1, "counts": loads,
            "gamma": gamma}


def _bias_run(fn: Any, inputs: Inputs) -> Outputs:
    return call(fn, [("bias", inputs["bias"]), ("expert_counts", inputs["counts"]),
                     ("gamma", inputs["gamma"])])


def _bias_variants(bias: Tensor, counts: Tensor, gamma: float) -> list[tuple[Tensor, str]]:
    c = counts.to(torch.float64)
    mean = c.mean()
    step = (gamma * torch.sign(mean - c)).to(bias.dtype)  # (E,)
    over, under = c > mean, c < mean
    g = torch.full_like(bias, gamma)
    return [
        (bias - step, "your sign is flipped: an overloaded expert (count above the mean) must "
                      "get a *lower* bias so that fewer tokens pick it, an underloaded one a "
                      "higher bias; bias + gamma * sign(mean(counts) - counts)"),
        (bias + (gamma * (mean - c)).to(bias.dtype),
         "you added gamma times the load error itself: DeepSeek-V3 moves each bias by a fixed "
         "gamma, bias + gamma * sign(mean(counts) - counts)"),
        (step, "you returned only the change: return the new bias, bias + gamma * sign(...)"),
        (bias + torch.where(over, -g, g), "an expert exactly at the mean load must keep its "
                                          "bias (sign(0) = 0); yours raised it"),
        (bias + torch.where(under, g, -g), "an expert exactly at the mean load must keep its "
                                           "bias (sign(0) = 0); yours lowered it"),
        (bias + gamma, "every bias went up by gamma: compare each count with the *mean* count "
                       "(not the total), sign(mean(counts) - counts)"),
    ]


def _bias_judge(inputs: Inputs, outputs: Outputs) -> None:
    no_mutation(outputs, "aux_free_bias_update")
    bias, counts, gamma = inputs["bias"], inputs["counts"], inputs["gamma"]
    got = expect_tensor(outputs["result"], "aux_free_bias_update's output", tuple(bias.shape),
                        hint=" (E,), the new bias")
    expect_close(got, _expected_bias(bias, counts, gamma), "your new bias",
                 variants=_bias_variants(bias, counts, gamma))


_TRAJ_T, _TRAJ_E, _TRAJ_K, _TRAJ_STEPS = 48, 6, 2, 25


def _route(scores: Tensor, bias: Tensor) -> Tensor:
    """Counts per expert of top-k on the biased scores (DeepSeek-V3 eq. 16), `(E,)`."""
    idx = (scores + bias).topk(_TRAJ_K, dim=-1).indices  # (T, K)
    return torch.bincount(idx.reshape(-1), minlength=scores.shape[1])  # (E,)


def _trajectory_inputs(seed: int, gamma: float, steps: int = _TRAJ_STEPS) -> Inputs:
    # Scores on a grid of step gamma plus a distinct offset per expert, so that with biases
    # that are multiples of gamma no two biased scores ever tie (gaps >= gamma / (E + 1)).
    offset = (torch.arange(_TRAJ_E) + 0.5) * (gamma / (_TRAJ_E + 1))  # (E,)
    skew = torch.tensor([6, 4, 2, 0, 0, 0])[:_TRAJ_E]  # (E,) the first experts favoured

    def make(g: torch.Generator) -> Inputs:
        grid = torch.randint(0, 10, (steps, _TRAJ_T, _TRAJ_E), generator=g) + skew
        return {"scores": gamma * grid + offset, "gamma": gamma}  # (steps, T, E)

    def gaps(i: Inputs) -> list[float]:
        bias, out = torch.zeros(_TRAJ_E), []
        for scores in i["scores"]:
            top = (scores + bias).topk(_TRAJ_K + 1, dim=-1).values  # (T, K+1)
            out.append(float(top.diff(dim=-1).abs().min()))  # the k-th vs the (k+1)-th
            bias = _expected_bias(bias, _route(scores, bias), i["gamma"])
        return out

    return tie_free(make, gaps, seed)


def _trajectory_run(fn: Any, inputs: Inputs) -> Outputs:
    bias = torch.zeros(_TRAJ_E)
    biases, mutated = [], []
    for scores in inputs["scores"]:
        counts = _route(scores, bias)
        out = call(fn, [("bias", bias), ("expert_counts", counts), ("gamma", inputs["gamma"])])
        mutated += out["mutated"]
        biases.append(out["result"])
        if not (isinstance(out["result"], Tensor) and out["result"].shape == bias.shape
                and out["result"].is_floating_point()):
            break
        bias = out["result"].float()
    return {"biases": biases, "mutated": mutated}


def _trajectory_judge(inputs: Inputs, outputs: Outputs) -> None:
    no_mutation(outputs, "aux_free_bias_update")
    scores, gamma = inputs["scores"], inputs["gamma"]
    bias = torch.zeros(_TRAJ_E)
    for step, got in enumerate(outputs["biases"]):
        counts = _route(scores[step], bias)
        got = expect_tensor(got, f"aux_free_bias_update's output at step {step}", (_TRAJ_E,),
                            hint=" (E,)")
        new = _expected_bias(bias, counts, gamma)
        try:
            expect_close(got, new, "your new bias", variants=_bias_variants(bias, counts, gamma))
        except CheckFailure as failure:
            raise CheckFailure(f"your bias after step {step} (routing a skewed router, counts "
                               f"{counts.tolist()}): {failure.message}") from None
        bias = new
    if len(outputs["biases"]) != len(scores):
        raise CheckFailure(f"could not run {len(scores)} routing steps with your bias update")


# ----------------------------------------------------------------------------------------
# soft_moe


def _soft_inputs(seed: int, t: int, d: int, e: int, c: int) -> Inputs:
    g = gen(seed)
    return {"x": torch.randn(t, d, generator=g), "phi": torch.randn(d, e * c, generator=g),
            "slots_per_expert": c, "cotangent": torch.randn(t, d, generator=g),
            **expert_inputs(g, e, d)}


def _soft_args(inputs: Inputs, experts: Any, phi: Tensor | None = None) -> list[tuple[str, Any]]:
    return [("x", inputs["x"]), ("experts", experts),
            ("phi", inputs["phi"] if phi is None else phi),
            ("slots_per_expert", inputs["slots_per_expert"])]


def _soft_run(module_list: bool) -> Any:
    def run(fn: Any, inputs: Inputs) -> Outputs:
        experts = probe_experts(inputs, module_list=module_list)
        out = call(fn, _soft_args(inputs, experts))
        return {**out, "calls": [expert.record for expert in experts]}

    return run


def _soft_grad_run(fn: Any, inputs: Inputs) -> Outputs:
    experts = probe_experts(inputs)
    phi = inputs["phi"].clone().requires_grad_(True)
    result = fn(*[v for _, v in _soft_args(inputs, experts, phi)])
    try:
        y = result[0] if isinstance(result, (tuple, list)) else result
        (y * inputs["cotangent"]).sum().backward()
        grad: Any = capture(phi.grad) if phi.grad is not None else "no gradient reaches phi"
    except Exception as exc:  # not differentiable: reported by the judge
        grad = f"{type(exc).__name__}: {str(exc)[:160]}"
    return {"result": capture(result), "grad": grad, "mutated": []}


def _experts_on(inputs: Inputs, slots: Tensor, c: int, owner: Tensor | None = None) -> Tensor:
    """Expert `owner[i]` (default `i // C`) on slot `i`: `(E*C, D)`."""
    n = slots.shape[0]
    owner = torch.arange(n) // c if owner is None else owner
    every = expert_outputs(inputs, slots)  # (E, E*C, D)
    return every[owner, torch.arange(n)]  # (E*C, D)


def _judge_slot_calls(records: list[Any], slots: Tensor, c: int, x: Tensor,
                      wrong_slots: list[tuple[Tensor, str]]) -> None:
    t = x.shape[0]
    if not isinstance(records, (list, tuple)) or len(records) * c != slots.shape[0]:
        raise CheckFailure("could not read which slots the experts of soft_moe were called on")
    for e, store in enumerate(records):
        count = int(store.get("count", 0)) if isinstance(store, dict) else 0
        mine = slots[e * c : (e + 1) * c]  # (C, D)
        if count == 0:
            raise CheckFailure(f"expert {e} was never called: in Soft MoE every expert runs, on "
                               f"its C = {c} slots, slots[{e * c}:{(e + 1) * c}]")
        if count > 1:
            raise CheckFailure(f"expert {e} was called {count} times: call it once, on its C = "
                               f"{c} slots together, experts[e](slots[e*C:(e+1)*C])")
        seen = store.get("inputs", [])
        value = seen[0] if seen else None
        if not isinstance(value, Tensor):
            raise CheckFailure(f"expert {e} was called on {value}, not on a (C, D) tensor")
        if close(value, mine):
            continue
        if tuple(value.shape) == (t, x.shape[1]) and close(value, x):
            raise CheckFailure(f"expert {e} was called on the tokens x: Soft MoE experts "
                               "process slots, slots = dispatch.T @ x, each a weighted average "
                               "of all tokens")
        for other, message in wrong_slots:
            if close(value, other[e * c : (e + 1) * c]):
                raise CheckFailure(message)
        if any(close(value, slots[j * c : (j + 1) * c]) for j in range(len(records))):
            raise CheckFailure(f"expert {e} was called on another expert's slots: slot i "
                               f"belongs to expert i // C, so expert {e} gets "
                               f"slots[{e * c}:{(e + 1) * c}]")
        raise CheckFailure(f"expert {e} was called on values that are not its slots: expert e "
                           f"gets slots[e*C:(e+1)*C] of slots = dispatch.T @ x, (E*C, D) = "
                           f"({slots.shape[0]}, {x.shape[1]}), dispatch = softmax(x @ phi, "
                           "dim=0)")


def _soft_judge(inputs: Inputs, outputs: Outputs) -> None:
    no_mutation(outputs, "soft_moe")
    x, phi, c = inputs["x"], inputs["phi"], inputs["slots_per_expert"]
    (t, d), n = x.shape, phi.shape[1]
    result = outputs["result"]
    y, dispatch, combine = expect_items(result, "soft_moe", ("y", "dispatch", "combine"))
    for what, value in (("dispatch", dispatch), ("combine", combine)):
        if isinstance(value, Tensor) and tuple(value.shape) == (n, t) and n != t:
            raise CheckFailure(f"soft_moe's {what} must be (T, E*C) = {(t, n)}, one row per "
                               f"token and one column per slot; yours is transposed, "
                               f"{tuple(value.shape)}")
    y = expect_tensor(y, "soft_moe's y", (t, d), hint=" (T, D)")
    dispatch = expect_tensor(dispatch, "soft_moe's dispatch", (t, n), hint=" (T, E*C)")
    combine = expect_tensor(combine, "soft_moe's combine", (t, n), hint=" (T, E*C)")
    lg = x @ phi  # (T, E*C)
    over_tokens, over_slots = torch.softmax(lg, dim=0), torch.softmax(lg, dim=1)  # (T, E*C)
    sums = dispatch.sum(0)
    expect_close(dispatch, over_tokens, "your dispatch weights", variants=[
        (over_slots, f"your dispatch weights are a softmax over slots (dim=1); each column "
                     f"(slot) of yours sums to {float(sums.min()):.2f}..{float(sums.max()):.2f}: "
                     "dispatch is a softmax over *tokens* (dim=0), so each slot is a weighted "
                     "average of the tokens (eq. 1)"),
        (lg, "your dispatch weights are the raw logits x @ phi: take a softmax over tokens "
             "(dim=0)"),
    ])
    expect_close(combine, over_slots, "your combine weights", variants=[
        (over_tokens, "your combine weights are a softmax over tokens (dim=0): combine is a "
                      "softmax over *slots* (dim=1), so each token's output is a weighted "
                      "average of the slot outputs (eq. 2), each row summing to 1"),
        (lg, "your combine weights are the raw logits x @ phi: take a softmax over slots "
             "(dim=1)"),
    ])
    slots = over_tokens.t() @ x  # (E*C, D) eq. 1
    outs = _experts_on(inputs, slots, c)  # (E*C, D)
    e = n // c
    interleaved = _experts_on(inputs, slots, c, owner=torch.arange(n) % e)  # slot i -> i % E
    wrong_slots = [
        (over_slots.t() @ x, "your slots are built with a softmax over slots: the slots are "
                             "dispatch.T @ x with dispatch a softmax over tokens (dim=0)"),
        (lg.t() @ x, "your slots are built from the raw logits: slots = dispatch.T @ x with "
                     "dispatch = softmax(x @ phi, dim=0)"),
        (slots.reshape(c, e, d).transpose(0, 1).reshape(n, d),
         "your experts got interleaved slots (slot i to expert i % E): slot i belongs to "
         "expert i // C, so expert e gets slots[e*C:(e+1)*C]"),
    ]
    expected = over_slots @ outs  # (T, D) eq. 2
    variants = [
        (over_tokens @ outs, "your output is combined with the dispatch weights (softmax over "
                             "tokens): combine with the softmax over slots (dim=1), y = "
                             "combine @ slot_outputs (eq. 2)"),
        (over_tokens @ _experts_on(inputs, over_slots.t() @ x, c),
         "you swapped dispatch and combine: dispatch (building slots) is the softmax over "
         "tokens (dim=0), combine (building outputs) the softmax over slots (dim=1)"),
        (over_slots @ _experts_on(inputs, over_slots.t() @ x, c),
         "your slots are built with a softmax over slots: dispatch is the softmax over tokens "
         "(dim=0)"),
        (over_slots @ interleaved, "your slot i went to expert i % E: slot i belongs to expert "
                                   "i // C, so expert e gets slots[e*C:(e+1)*C]"),
        (outs.sum(0, keepdim=True).expand(t, d), "your output ignores the combine weights: "
                                                 "y = combine @ slot_outputs"),
    ]
    try:
        _judge_slot_calls(outputs["calls"], slots, c, x, wrong_slots)
    except CheckFailure as failure:
        raise CheckFailure(matching_variant(y, variants) or failure.message) from None
    expect_close(y, expected, "your soft_moe output", variants=variants)


def _soft_grad_judge(inputs: Inputs, outputs: Outputs) -> None:
    result = outputs["result"]
    y = expect_items(result, "soft_moe", ("y", "dispatch", "combine"))[0] if not isinstance(
        result, Tensor) else result
    y = expect_tensor(y, "soft_moe's y", tuple(inputs["x"].shape), hint=" (T, D)")
    grad = outputs["grad"]
    if not isinstance(grad, Tensor):
        raise CheckFailure(f"your soft_moe's y is not differentiable with respect to phi "
                           f"({grad}): keep it as torch operations (no .detach(), .item(), "
                           "numpy or torch.no_grad())")
    phi = inputs["phi"].clone().requires_grad_(True)
    x, c = inputs["x"], inputs["slots_per_expert"]
    lg = x @ phi  # (T, E*C)
    outs = _experts_on(inputs, torch.softmax(lg, dim=0).t() @ x, c)  # (E*C, D)
    expected = torch.softmax(lg, dim=1) @ outs  # (T, D)
    expect_close(y, expected.detach(), "your soft_moe output")
    (expected * inputs["cotangent"]).sum().backward()
    expect_close(grad, phi.grad, "the gradient of your soft_moe output with respect to phi",
                 otherwise="your soft_moe's output is right but its gradient with respect to "
                           "phi is not: is part of it computed without autograd?")


# ----------------------------------------------------------------------------------------
# sort_by_expert


def _sort_inputs(seed: int, t: int, k: int, e: int, idle: tuple[int, ...]) -> Inputs:
    def make(g: torch.Generator) -> Inputs:
        busy = torch.tensor([ex for ex in range(e) if ex not in idle])
        scores = logits(g, t, len(busy))  # distinct experts per token, like a top-k
        return {"indices": busy[scores.topk(k, dim=-1).indices], "n_experts": e}

    def gaps(i: Inputs) -> list[float]:
        counts = torch.bincount(i["indices"].reshape(-1), minlength=e)
        busy = [int(counts[ex]) for ex in range(e) if ex not in idle]
        return [1.0 if min(busy) >= 2 or k * t < 2 * len(busy) else 0.0]  # ties to keep stable

    return tie_free(make, gaps, seed)


def _sort_run(fn: Any, inputs: Inputs) -> Outputs:
    return call(fn, [("indices", inputs["indices"]), ("n_experts", inputs["n_experts"])])


def _sort_judge(inputs: Inputs, outputs: Outputs) -> None:
    no_mutation(outputs, "sort_by_expert")
    indices, e = inputs["indices"], inputs["n_experts"]
    t, k = indices.shape
    n = t * k
    order, counts = expect_items(outputs["result"], "sort_by_expert", ("order", "counts"))
    flat = indices.reshape(-1)  # (T*K,) token-major ids t*K + j
    expected_counts = torch.bincount(flat, minlength=e)  # (E,)
    used = expected_counts[expected_counts > 0]
    if isinstance(counts, Tensor) and counts.dim() == 1 and counts.shape[0] != e:
        if counts.shape[0] == used.shape[0] and close(counts, used):
            hint = ("you counted only the experts that were chosen (torch.unique?): return one "
                    "count per expert, 0 for an idle one")
        elif counts.shape[0] < e and close(counts, expected_counts[: counts.shape[0]]):
            hint = ("torch.bincount stops at the largest expert id it sees: pass "
                    "minlength=n_experts")
        else:
            hint = "one count per expert"
        raise CheckFailure(f"sort_by_expert's counts must have shape ({e},), one per expert; "
                           f"yours has shape {tuple(counts.shape)}: {hint}")
    counts = expect_tensor(counts, "sort_by_expert's counts", (e,), kind="int",
                           hint=" (E,), assignments per expert")
    expect_close(counts, expected_counts, "your counts", variants=[
        (torch.bincount(indices[:, 0], minlength=e), "your counts use only the first choices "
                                                     "indices[:, 0]: count all T*K assignments"),
        ((expected_counts > 0).long(), "your counts are 0/1 (whether an expert was chosen): "
                                       "count its assignments"),
    ])
    if isinstance(order, Tensor) and order.dim() == 1 and order.shape[0] == n and (
            order.is_floating_point()):
        raise CheckFailure("sort_by_expert's order must be an integer tensor of assignment ids; "
                           "yours is floating-point")
    order = expect_tensor(order, "sort_by_expert's order", (n,), kind="int",
                          hint=" (T*K,), flat assignment ids t*K + j")
    expected = torch.sort(flat, stable=True).indices  # (T*K,)
    if close(order, expected):
        return
    message = matching_variant(order, [
        (flat.sort().values, "your order holds the sorted expert ids, not the permutation: "
                             "return the indices of the sort (torch.sort(...).indices)"),
        (torch.argsort(expected), "you returned the inverse permutation (where each assignment "
                                  "lands): return order with indices.reshape(-1)[order] grouped "
                                  "by expert, so that x[order // K] lays the rows out"),
        (expected // k, "your order holds token ids: return the flat assignment ids t*K + j "
                        "(the token is order // K)"),
        (torch.sort(indices.t().reshape(-1), stable=True).indices,
         "your ids are choice-major (j*T + t): number the assignments row by row, t*K + j, as "
         "indices.reshape(-1) does"),
        (torch.sort(flat, stable=True, descending=True).indices,
         "your order goes from the last expert to the first: sort ascending by expert id"),
    ])
    if message is not None:
        raise CheckFailure(message)
    ids = sorted(int(i) for i in order)
    if ids != list(range(n)):
        raise CheckFailure(f"sort_by_expert's order must be a permutation of 0..{n - 1} (each "
                           "assignment once); yours repeats or misses some ids")
    grouped = flat[order]  # (T*K,)
    if not bool((grouped.diff() >= 0).all()):
        raise CheckFailure("your order does not group the assignments by expert: "
                           "indices.reshape(-1)[order] must be sorted ascending")
    expect_close(order, expected, "your order", otherwise=(
        "your order groups the assignments by expert but not stably: within one expert keep "
        "them in token order, ascending t*K + j (torch.sort(..., stable=True); torch.sort's "
        "default does not promise it). Grouped kernels and tests rely on a deterministic order"))


# ----------------------------------------------------------------------------------------

# Rules the exercises state, each tested by a visible probe and again by a hidden one.
SHARED = "y = sum of shared experts (once, on all x) + top-k routed experts weighted by s"
GATES = "weights: softmax over all routed experts at the top k, not renormalised, best first"
CALLS = "each routed expert only on its own rows"
NO_SHARED = "shared_experts may be empty"
LIST_OR_MODULE_LIST = "experts may be a list or an nn.ModuleList"
NO_MUTATION = "never changes an argument in place"
BIAS = "bias + gamma * sign(mean(counts) - counts); at the mean the bias stays"
FLOAT_LOADS = "counts may be integers or float loads"
SOFT = "dispatch softmax over tokens, combine softmax over slots, y = combine @ outputs"
SLOTS = "expert e called once on slots[e*C:(e+1)*C]"
SOFT_GRAD = "differentiable: gradients reach phi"
CHOSEN_BY_BIAS = "indices: the k largest scores + bias per token, best biased score first"
UNBIASED_WEIGHTS = "weights: the chosen unbiased scores over their sum, each row summing to 1"
BIAS_NO_GRAD = "weights differentiable in scores, no gradient reaches the bias"
SORT = "order: stable sort of indices.reshape(-1) by expert; counts per expert"
IDLE = "0 for an expert nobody chose, the last one too"

VISIBLE_SHARED_EXPERT_MOE = (
    Probe("8 tokens, 1 shared + top-2 of 6 routed, routed expert 4 idle (lists)",
          lambda: _shared_inputs(701, 8, 4, 1, 6, 2, idle=(4,)), _shared_run(False),
          _shared_judge, rules=(SHARED, GATES, CALLS, NO_MUTATION)),
    Probe("7 tokens, 2 shared + top-3 of 5 routed (nn.ModuleList)",
          lambda: _shared_inputs(704, 7, 4, 2, 5, 3), _shared_run(True), _shared_judge,
          rules=(SHARED, GATES, CALLS, LIST_OR_MODULE_LIST)),
    Probe("no shared experts, top-1 of 3 routed",
          lambda: _shared_inputs(705, 5, 3, 0, 3, 1), _shared_run(False), _shared_judge,
          rules=(SHARED, GATES, CALLS, NO_SHARED)),
)
HIDDEN_SHARED_EXPERT_MOE = (
    Probe("10 tokens, 2 shared + top-3 of 8 routed (nn.ModuleList)",
          lambda: _shared_inputs(702, 10, 5, 2, 8, 3, idle=(0, 6)), _shared_run(True),
          _shared_judge, rules=(SHARED, GATES, CALLS, LIST_OR_MODULE_LIST, NO_MUTATION)),
    Probe("no shared experts, top-1 of 4 routed",
          lambda: _shared_inputs(703, 6, 3, 0, 4, 1), _shared_run(False), _shared_judge,
          rules=(SHARED, GATES, CALLS, NO_SHARED)),
)
VISIBLE_BIASED_TOP_K = (
    Probe("6 tokens, top-2 of 5 experts, a bias that changes some choices",
          lambda: _biased_inputs(741, 6, 5, 2, 0.3), _biased_run, _biased_judge,
          rules=(CHOSEN_BY_BIAS, UNBIASED_WEIGHTS, NO_MUTATION)),
    Probe("gradient reaches the scores, not the bias (5 tokens, top-2 of 4)",
          lambda: _biased_inputs(745, 5, 4, 2, 0.3), _biased_grad_run, _biased_grad_judge,
          rules=(CHOSEN_BY_BIAS, UNBIASED_WEIGHTS, BIAS_NO_GRAD)),
)
HIDDEN_BIASED_TOP_K = (
    Probe("12 tokens, top-3 of 8 experts", lambda: _biased_inputs(742, 12, 8, 3, 0.4),
          _biased_run, _biased_judge, rules=(CHOSEN_BY_BIAS, UNBIASED_WEIGHTS, NO_MUTATION)),
    Probe("top-1 of 4 experts (weights all 1)", lambda: _biased_inputs(743, 7, 4, 1, 0.3),
          _biased_run, _biased_judge, rules=(CHOSEN_BY_BIAS, UNBIASED_WEIGHTS)),
    Probe("gradient reaches the scores, not the bias",
          lambda: _biased_inputs(744, 8, 6, 2, 0.3), _biased_grad_run, _biased_grad_judge,
          rules=(CHOSEN_BY_BIAS, UNBIASED_WEIGHTS, BIAS_NO_GRAD)),
)
VISIBLE_AUX_FREE_BIAS_UPDATE = (
    Probe("6 experts, integer counts, two at the mean",
          lambda: _bias_inputs(711, [12, 3, 7, 7, 0, 13], 0.01), _bias_run, _bias_judge,
          rules=(BIAS, NO_MUTATION)),
    Probe("5 experts, loads as float shares, one at the mean",
          lambda: _bias_inputs(714, [6, 2, 4, 1, 7], 0.02, floats=True), _bias_run,
          _bias_judge, rules=(BIAS, FLOAT_LOADS)),
    Probe("10 steps routing a skewed router",
          lambda: _trajectory_inputs(715, 0.1, steps=10), _trajectory_run, _trajectory_judge,
          rules=(BIAS,)),
)
HIDDEN_AUX_FREE_BIAS_UPDATE = (
    Probe("8 experts, loads as float shares",
          lambda: _bias_inputs(712, [5, 1, 4, 4, 9, 2, 7, 0], 0.05, floats=True), _bias_run,
          _bias_judge, rules=(BIAS, FLOAT_LOADS, NO_MUTATION)),
    Probe(f"{_TRAJ_STEPS} steps routing a skewed router",
          lambda: _trajectory_inputs(713, 0.05), _trajectory_run, _trajectory_judge,
          rules=(BIAS,)),
)
VISIBLE_SOFT_MOE = (
    Probe("8 tokens, 3 experts x 2 slots (a list)", lambda: _soft_inputs(721, 8, 4, 3, 2),
          _soft_run(False), _soft_judge, rules=(SOFT, SLOTS, NO_MUTATION)),
    Probe("6 tokens, 3 experts x 1 slot (an nn.ModuleList)",
          lambda: _soft_inputs(725, 6, 4, 3, 1), _soft_run(True), _soft_judge,
          rules=(SOFT, SLOTS, LIST_OR_MODULE_LIST)),
    Probe("gradient reaches phi (5 tokens)", lambda: _soft_inputs(726, 5, 3, 2, 2), _soft_grad_run,
          _soft_grad_judge, rules=(SOFT, SOFT_GRAD)),
)
HIDDEN_SOFT_MOE = (
    Probe("5 tokens, 2 experts x 3 slots (an nn.ModuleList)",
          lambda: _soft_inputs(722, 5, 3, 2, 3), _soft_run(True), _soft_judge,
          rules=(SOFT, SLOTS, LIST_OR_MODULE_LIST, NO_MUTATION)),
    Probe("7 tokens, 4 experts x 1 slot", lambda: _soft_inputs(723, 7, 5, 4, 1),
          _soft_run(False), _soft_judge, rules=(SOFT, SLOTS)),
    Probe("gradient reaches phi", lambda: _soft_inputs(724, 6, 4, 2, 2), _soft_grad_run,
          _soft_grad_judge, rules=(SOFT, SOFT_GRAD)),
)
VISIBLE_SORT_BY_EXPERT = (
    Probe("8 tokens, top-2 of 5 experts, experts 1 and 4 idle",
          lambda: _sort_inputs(731, 8, 2, 5, idle=(1, 4)), _sort_run, _sort_judge,
          rules=(SORT, IDLE, NO_MUTATION)),
    Probe("4 tokens, one expert", lambda: _sort_inputs(734, 4, 1, 1, idle=()), _sort_run,
          _sort_judge, rules=(SORT,)),
)
HIDDEN_SORT_BY_EXPERT = (
    Probe("30 tokens, top-3 of 7 experts, expert 6 (the last) idle",
          lambda: _sort_inputs(732, 30, 3, 7, idle=(6,)), _sort_run, _sort_judge,
          rules=(SORT, IDLE, NO_MUTATION)),
    Probe("5 tokens, one expert", lambda: _sort_inputs(733, 5, 1, 1, idle=()), _sort_run,
          _sort_judge, rules=(SORT,)),
)
