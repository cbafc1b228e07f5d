"""Probes for notebook 05, a mixture-of-experts transformer: `MoEFeedForward` and
`moe_lm_loss`.

The `MoEFeedForward` contract the notebook states: `gate = nn.Linear(D, E, bias=False)`,
`experts = nn.ModuleList` of `E` modules with `w_in`, `w_out` (`Expert`s), forward
`(B, S, D)` returning a named tuple with at least `y`, `aux_loss`, `z_loss`. The probe copies
the reference weights into those attributes, hooks the experts to record what each saw,
and compares with `moe_course.MoEFeedForward` holding the same weights.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ... import capacity as ref_capacity
from ... import expert_choice as ref_ec
from ... import layers as ref_layers
from ... import losses as ref_losses
from ...losses import LayerLosses
from ..inputs import gen, min_gap, tie_free
from ..probe import (
    CheckFailure,
    Inputs,
    Outputs,
    Probe,
    call,
    capture,
    describe,
    expect_close,
    expect_tensor,
    no_mutation,
)
from ..recording import judge_expert_calls, record_calls
from .common import (
    UNWEIGHTED,
    construct,
    expert_weights,
    load_expert,
    load_linear,
    positions_token_order,
    reference_expert,
)

FIELDS = ("y", "aux_loss", "z_loss")  # what MoEFeedForward's output must have


# ----------------------------------------------------------------------------------------
# MoEFeedForward


def _layer_inputs(seed: int, router: str, k: int, capacity_factor: float | None,
                  shape: tuple[int, int, int] = (2, 5, 8), d_hidden: int = 12,
                  n_experts: int = 4) -> Inputs:
    b, s, d = shape
    t, e = b * s, n_experts

    def make(g: torch.Generator) -> Inputs:
        return {"router": router, "k": k, "capacity_factor": capacity_factor,
                "n_experts": e, **expert_weights(g, d, d_hidden, e),
                "gate_weight": torch.randn(e, d, generator=g) * 0.7,
                "x": torch.randn(b, s, d, generator=g)}

    def gaps(i: Inputs) -> list[float]:
        lg = i["x"].reshape(t, d) @ i["gate_weight"].T  # (T, E)
        if router == "expert_choice":
            c = ref_ec.expert_choice_capacity(t, e, capacity_factor or float(k))
            picks = ref_ec.expert_choice_routing(lg, c).token_idx
            other = torch.softmax(lg, dim=0).t().topk(c, dim=-1).indices
            differs = c == t or not torch.equal(picks.sort(-1).values, other.sort(-1).values)
            return [min_gap(torch.softmax(lg, -1), dim=0), 1.0 if differs else 0.0]
        out = [min_gap(lg, dim=-1)]
        if capacity_factor is not None:
            idx = lg.topk(k, dim=-1).indices
            c = ref_capacity.expert_capacity(t, e, capacity_factor, k)
            keep = ref_capacity.capacity_positions(idx, e) < c
            token_keep = positions_token_order(idx, e) < c
            partial = bool(((keep.sum(-1) > 0) & (keep.sum(-1) < k)).any()) or k == 1
            out += [1.0 if not keep.all() else 0.0,
                    1.0 if k == 1 or not torch.equal(keep, token_keep) else 0.0,
                    1.0 if partial else 0.0]
        return out

    return tie_free(make, gaps, seed, tries=1000)


def _layer_run(cls: Any, inputs: Inputs) -> Outputs:
    d, h, e = inputs["d_model"], inputs["d_hidden"], inputs["n_experts"]
    if inputs.get("defaults"):  # the signature's defaults: k=2, router="top_k", no capacity
        module = construct(cls, "MoEFeedForward", d, h, e)
    else:
        module = construct(cls, "MoEFeedForward", d, h, e, k=inputs["k"],
                           router=inputs["router"], capacity_factor=inputs["capacity_factor"])
    where = "your MoEFeedForward"
    load_linear(module, "gate", inputs["gate_weight"], None, where,
                f"nn.Linear(d_model={d}, n_experts={e}, bias=False)")
    experts = getattr(module, "experts", None)
    try:
        n = len(experts)  # type: ignore[arg-type]
    except TypeError:
        n = -1
    if n != e:
        raise CheckFailure(f"{where}.experts must be an nn.ModuleList of n_experts = {e} "
                           f"experts; yours is {describe(capture(experts))}")
    for i in range(e):
        load_expert(experts[i], inputs, i, f"{where}.experts[{i}]")
    records, handles = record_calls(list(experts))
    try:
        out = module(inputs["x"].clone())
    finally:
        for handle in handles:
            handle.remove()
    fields = {}
    for name in FIELDS:
        try:
            fields[name] = capture(getattr(out, name))
        except AttributeError:
            continue
    k_attr = getattr(module, "k", None)
    return {"type": describe(capture(out)), "fields": fields, "calls": records,
            "k": k_attr if isinstance(k_attr, int) else describe(capture(k_attr))}


def _router_error_run(cls: Any, inputs: Inputs) -> Outputs:
    """Build (and, if that succeeds, run) the layer with an unknown router name."""
    d, h, e = inputs["d_model"], inputs["d_hidden"], inputs["n_experts"]
    reports = []
    for router in inputs["bad_routers"]:
        try:
            module = construct(cls, "MoEFeedForward", d, h, e, k=1, router=router)
            result = module(inputs["x"].clone())
        except CheckFailure:
            raise
        except Exception as exc:
            reports.append({"raised": type(exc).__name__, "value_error": isinstance(
                exc, ValueError), "message": str(exc)[:200]})
        else:
            reports.append({"raised": None, "value_error": False,
                            "message": describe(capture(result))})
    return {"reports": reports}


def _router_error_judge(inputs: Inputs, outputs: Outputs) -> None:
    for router, report in zip(inputs["bad_routers"], outputs["reports"], strict=True):
        what = f"MoEFeedForward(..., router={router!r})"
        if report["value_error"]:
            continue
        if report["raised"] is None:
            raise CheckFailure(f"{what} built a layer and ran it (it returned "
                               f"{report['message']}) instead of raising ValueError: raise a "
                               "ValueError in __init__ naming the router and the two allowed "
                               "values, \"top_k\" and \"expert_choice\"")
        raise CheckFailure(f"{what} raised {report['raised']} ({report['message'][:80]}); "
                           "raise a ValueError yourself, naming the router and the allowed "
                           "values \"top_k\" and \"expert_choice\"")


def _reference_layer(inputs: Inputs) -> ref_layers.MoEFeedForward:
    layer = ref_layers.MoEFeedForward(inputs["d_model"], inputs["d_hidden"],
                                      inputs["n_experts"], k=inputs["k"],
                                      router=inputs["router"],
                                      capacity_factor=inputs["capacity_factor"])
    with torch.no_grad():
        layer.gate.weight.copy_(inputs["gate_weight"])
    for e in range(inputs["n_experts"]):
        layer.experts[e] = reference_expert(inputs, e)
    return layer


def _layer_judge(inputs: Inputs, outputs: Outputs) -> None:
    x, k, e = inputs["x"], inputs["k"], inputs["n_experts"]
    router, cf = inputs["router"], inputs["capacity_factor"]
    fields = outputs["fields"]
    if outputs.get("k") != k:
        raise CheckFailure(f"your MoEFeedForward(..., k={k}) has self.k = {outputs.get('k')}: "
                           "keep k as the attribute self.k (the notebook's count_parameters "
                           "reads it)" + (" (and k's default is 2)" if inputs.get("defaults")
                                          else ""))
    missing = [name for name in FIELDS if name not in fields]
    if missing:
        raise CheckFailure(
            f"MoEFeedForward's forward must return a named tuple with fields "
            f"{', '.join(FIELDS)} (e.g. moe_course.MoEOutput); it returned {outputs['type']} "
            f"without {', '.join(missing)}")
    y = expect_tensor(fields["y"], "MoEFeedForward's y", tuple(x.shape), hint=" (B, S, D)")
    aux = expect_tensor(fields["aux_loss"], "MoEFeedForward's aux_loss", ())
    z = expect_tensor(fields["z_loss"], "MoEFeedForward's z_loss", ())
    with torch.no_grad():
        ref = _reference_layer(inputs)(x)
        flat = x.reshape(-1, x.shape[-1])  # (T, D)
        t = flat.shape[0]
        outs = torch.stack([reference_expert(inputs, i)(flat) for i in range(e)])  # (E, T, D)
    lg = ref.logits  # (T, E)
    probs = torch.softmax(lg, dim=-1)  # (T, E)

    def mix(weights: Tensor, indices: Tensor) -> Tensor:
        picked = outs[indices, torch.arange(t)[:, None]]  # (T, K, D)
        return (weights[..., None] * picked).sum(1).reshape(x.shape)  # (B, S, D)

    def choose(scores: Tensor, c: int, gate_values: Tensor | None = None) -> Tensor:
        g, idx = scores.t().topk(c, dim=-1)  # (E, C), (E, C)
        g = g if gate_values is None else gate_values.t().gather(1, idx)
        y = flat.new_zeros(flat.shape)
        for i in range(e):
            y = y.index_add(0, idx[i], g[i, :, None] * outs[i, idx[i]])  # (T, D)
        return y.reshape(x.shape)

    if router == "top_k":
        top, idx = lg.topk(k, dim=-1)  # (T, K), (T, K)
        w = torch.softmax(top, dim=-1)  # (T, K)
        keep = torch.ones_like(idx, dtype=torch.bool)
        token_keep = keep
        if cf is not None:
            c = ref_capacity.expert_capacity(t, e, cf, k)
            keep = ref_capacity.capacity_positions(idx, e) < c  # (T, K)
            token_keep = positions_token_order(idx, e) < c  # (T, K)
        kw = w * keep
        renorm = kw / kw.sum(-1, keepdim=True).clamp_min(1e-30)
        variants = [
            (mix(keep.to(w.dtype), idx), UNWEIGHTED),
            (mix(probs.gather(1, idx) * keep, idx),
             "your gate weights match a softmax over all E experts: take the softmax over the "
             "k kept logits (or renormalise)"),
            (mix(kw[:, :1], idx[:, :1]), "your layer uses only each token's first choice: use "
                                         "all k"),
        ]
        if cf is not None:
            variants += [
                (mix(w, idx), "your layer ignores capacity_factor: drop the assignments beyond "
                              "expert_capacity(T, E, capacity_factor, k) slots per expert"),
                (mix(renorm, idx), "you renormalised the kept weights after dropping: leave "
                                   "them as they were"),
                (mix(w * token_keep, idx), "your layer fills expert buffers token by token: "
                                           "fill them by choice rank (capacity_positions)"),
            ]
        expect_close(y, ref.y, "your MoEFeedForward's y", variants=variants)
        counts = F.one_hot(idx, e).sum(dim=(0, 1)).to(probs.dtype)  # (E,)
        kept_counts = F.one_hot(idx[keep], e).sum(0).to(probs.dtype)  # (E,)
        expect_close(aux, ref.aux_loss, "your aux_loss", variants=[
            (ref.aux_loss * k, f"your aux_loss is K = {k} times too large: f_e is the share of "
                               "the T*K assignments (the switch_aux_loss of notebook 03)"),
            (torch.zeros(()), "your aux_loss is 0 for top-k routing: use the switch loss, "
                              "switch_aux_loss(softmax(logits), indices)"),
            (e * (kept_counts / (t * k) * probs.mean(0)).sum(),
             "your aux_loss counts only the kept assignments: f_e counts every routing "
             "decision, before capacity"),
            (e * (counts / (t * k) * (torch.zeros_like(probs).scatter(1, idx, w)).mean(0)).sum(),
             "your aux_loss uses the top-k gate weights for P_e: use the full softmax over all "
             "E experts"),
        ])
        routed = [[tok for tok in range(t) for j in range(k) if int(idx[tok, j]) == i]
                  for i in range(e)]
        kept = [[tok for tok in range(t) for j in range(k)
                 if int(idx[tok, j]) == i and bool(keep[tok, j])] for i in range(e)]
        required, allowed = kept, routed
    else:
        c = ref_ec.expert_choice_capacity(t, e, cf if cf is not None else float(k))
        wrong_c = min(t, ref_capacity.expert_capacity(t, e, cf or float(k), min(k, e)))
        expect_close(y, ref.y, "your MoEFeedForward's y", variants=[
            (choose(probs, c, torch.ones_like(probs)), UNWEIGHTED),
            (choose(torch.softmax(lg, dim=0), c),
             "your experts choose tokens by a softmax over tokens (dim=0): S = softmax over "
             "experts, then each expert takes its top-C tokens of S[:, e]"),
            (choose(probs, wrong_c) if wrong_c != c else None,
             "your expert-choice capacity includes k: use expert_choice_capacity(T, E, "
             "capacity_factor), ceil(T * capacity_factor / E)"),
        ])
        expect_close(aux, torch.zeros(()), "your aux_loss for expert choice", otherwise=(
            "expert choice is balanced by construction: its aux_loss must be 0 (a zero "
            "tensor)"))
        required = [[int(i) for i in row] for row in ref.routing.token_idx]
        allowed = required
    lse = torch.logsumexp(lg, dim=-1)
    expect_close(z, ref.z_loss, "your z_loss", variants=[
        (torch.zeros(()), "your z_loss is 0: compute router_z_loss(logits), the mean over "
                          "tokens of logsumexp(logits)**2"),
        (lse.mean(), "your z_loss is not squared: mean of logsumexp(logits)**2"),
    ])
    judge_expert_calls(outputs["calls"], flat, required, allowed, symbol="MoEFeedForward")


# ----------------------------------------------------------------------------------------
# moe_lm_loss


def _lm_inputs(seed: int, b: int, s: int, v: int, layers: int) -> Inputs:
    g = gen(seed)
    return {"logits": torch.randn(b, s, v, generator=g) * 2,
            "targets": torch.randint(0, v, (b, s), generator=g),
            "aux": [torch.rand((), generator=g) + 1.0 for _ in range(layers)],
            "z": [torch.rand((), generator=g) * 4 + 2.0 for _ in range(layers)],
            "aux_weight": 0.1, "z_weight": 0.05}


def _lm_run(fn: Any, inputs: Inputs) -> Outputs:
    pairs = [LayerLosses(a.clone(), z.clone())
             for a, z in zip(inputs["aux"], inputs["z"], strict=True)]
    args = [("logits", inputs["logits"]), ("targets", inputs["targets"]),
            ("aux_losses", pairs)]
    default = call(fn, args)
    weighted = call(fn, args, {"aux_weight": inputs["aux_weight"],
                               "z_weight": inputs["z_weight"]})
    return {"default": default["result"], "weighted": weighted["result"],
            "mutated": default["mutated"] + weighted["mutated"]}


def _lm_judge(inputs: Inputs, outputs: Outputs) -> None:
    no_mutation(outputs, "moe_lm_loss")
    lg, tg = inputs["logits"], inputs["targets"]
    aux, z = (torch.stack(v) if v else torch.zeros(0) for v in (inputs["aux"], inputs["z"]))
    ce = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), tg.reshape(-1))
    ce_sum = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), tg.reshape(-1), reduction="sum")
    for key, aw, zw, how in (
            ("default", 0.01, 0.001, "moe_lm_loss(logits, targets, aux_losses)"),
            ("weighted", inputs["aux_weight"], inputs["z_weight"],
             f"moe_lm_loss(..., aux_weight={inputs['aux_weight']}, "
             f"z_weight={inputs['z_weight']})")):
        value = expect_tensor(outputs[key], f"{how}'s result", ())
        pairs = [LayerLosses(a, b) for a, b in zip(inputs["aux"], inputs["z"], strict=True)]
        expected = ref_losses.moe_lm_loss(lg, tg, pairs, aux_weight=aw, z_weight=zw)
        variants = [
            (ce, f"{how} is the cross-entropy alone: add aux_weight * (sum of the layers' "
                 "aux_loss) + z_weight * (sum of their z_loss)"),
            (ce + zw * z.sum(), f"{how} leaves out the auxiliary (load-balancing) losses: add "
                                "aux_weight * the sum of the layers' aux_loss"),
            (ce + aw * aux.sum(), f"{how} leaves out the router z losses: add z_weight * the "
                                  "sum of the layers' z_loss"),
            (ce + zw * aux.sum() + aw * z.sum(), f"{how} swaps the weights: aux_weight goes "
                                                 "with aux_loss, z_weight with z_loss"),
            (ce + aw * aux.mean() + zw * z.mean(), f"{how} averages the layers' losses: sum "
                                                   "them over layers"),
            (ce + aux.sum() + z.sum(), f"{how} ignores aux_weight and z_weight"),
            (ce_sum + aw * aux.sum() + zw * z.sum(), f"{how} sums the cross-entropy over "
                                                     "tokens: take the mean"),
        ]
        if key == "weighted":
            variants.append((ce + 0.01 * aux.sum() + 0.001 * z.sum(),
                             f"{how} ignores the aux_weight and z_weight arguments (used the "
                             "defaults 0.01 and 0.001)"))
        expect_close(value, expected, how, variants=variants)


# Rules the exercises state, each tested by a visible probe and again by a hidden one.
TOP_K = "router='top_k': top_k_gating's weights, sparse_moe's mixture, switch aux_loss"
EXPERT_CHOICE = "router='expert_choice': C = expert_choice_capacity(T, E, factor or k)"
CAPACITY_FACTOR = "top_k with capacity_factor: drop beyond expert_capacity (apply_capacity)"
Z = "z_loss: router_z_loss(logits)"
FIELDS_RULE = "forward (B, S, D) returns a named tuple with y, aux_loss, z_loss"
CALLS = "experts called as modules, once each, on their routed rows"
SELF_K = "keeps k as self.k"
DEFAULTS = "defaults k=2, router='top_k', capacity_factor=None"
ROUTER_ERROR = "ValueError for a router other than 'top_k' or 'expert_choice'"
LM = "mean cross-entropy + aux_weight * sum(aux) + z_weight * sum(z), defaults 0.01, 0.001"
DENSE = "an empty aux_losses list (a dense model): the cross-entropy alone"
NO_MUTATION = "never changes an argument in place"
_LAYER = (FIELDS_RULE, CALLS, SELF_K, Z)

VISIBLE_MOE_FEED_FORWARD = (
    Probe("top_k, k=2, no capacity limit", lambda: _layer_inputs(501, "top_k", 2, None),
          _layer_run, _layer_judge, rules=(TOP_K, *_LAYER)),
    Probe("expert_choice, capacity_factor=2.0",
          lambda: _layer_inputs(502, "expert_choice", 2, 2.0), _layer_run, _layer_judge,
          rules=(EXPERT_CHOICE, *_LAYER)),
    Probe("top_k, k=2, capacity_factor=1.25",
          lambda: _layer_inputs(507, "top_k", 2, 1.25, shape=(2, 4, 6), d_hidden=8),
          _layer_run, _layer_judge, rules=(TOP_K, CAPACITY_FACTOR, *_LAYER)),
    Probe("top_k, k=1, 3 experts, capacity_factor=1.0",
          lambda: _layer_inputs(508, "top_k", 1, 1.0, shape=(2, 3, 6), d_hidden=8,
                                n_experts=3), _layer_run, _layer_judge,
          rules=(TOP_K, CAPACITY_FACTOR, *_LAYER)),
    Probe("MoEFeedForward(d_model, d_hidden, n_experts) with the defaults",
          lambda: {**_layer_inputs(509, "top_k", 2, None, shape=(1, 6, 6), d_hidden=8),
                   "defaults": True}, _layer_run, _layer_judge,
          rules=(TOP_K, DEFAULTS, *_LAYER)),
    Probe("router='switch' raises ValueError",
          lambda: {**_layer_inputs(510, "top_k", 1, None, shape=(1, 3, 4), d_hidden=4,
                                   n_experts=2), "bad_routers": ["switch", "topk"]},
          _router_error_run, _router_error_judge, rules=(ROUTER_ERROR,)),
)
HIDDEN_MOE_FEED_FORWARD = (
    Probe("top_k, k=2, capacity_factor=1.0", lambda: _layer_inputs(503, "top_k", 2, 1.0),
          _layer_run, _layer_judge, rules=(TOP_K, CAPACITY_FACTOR, *_LAYER)),
    Probe("top_k, k=1, 5 experts",
          lambda: _layer_inputs(504, "top_k", 1, None, shape=(3, 4, 6), d_hidden=10,
                                n_experts=5), _layer_run, _layer_judge,
          rules=(TOP_K, *_LAYER)),
    Probe("expert_choice, capacity_factor=1.0",
          lambda: _layer_inputs(506, "expert_choice", 1, 1.0), _layer_run, _layer_judge,
          rules=(EXPERT_CHOICE, *_LAYER)),
    Probe("the defaults, 5 experts",
          lambda: {**_layer_inputs(505, "top_k", 2, None, shape=(2, 3, 5), d_hidden=6,
                                   n_experts=5), "defaults": True}, _layer_run, _layer_judge,
          rules=(TOP_K, DEFAULTS, *_LAYER)),
    Probe("router='sparse' raises ValueError",
          lambda: {**_layer_inputs(511, "top_k", 1, None, shape=(1, 2, 4), d_hidden=4,
                                   n_experts=3), "bad_routers": ["sparse", "Top_K"]},
          _router_error_run, _router_error_judge, rules=(ROUTER_ERROR,)),
)
VISIBLE_MOE_LM_LOSS = (
    Probe("3 layers", lambda: _lm_inputs(511, 2, 4, 6, 3), _lm_run, _lm_judge,
          rules=(LM, NO_MUTATION)),
    Probe("a dense model (no MoE layers)", lambda: _lm_inputs(513, 2, 3, 5, 0), _lm_run,
          _lm_judge, rules=(LM, DENSE)),
)
HIDDEN_MOE_LM_LOSS = (
    Probe("1 layer", lambda: _lm_inputs(512, 3, 5, 7, 1), _lm_run, _lm_judge,
          rules=(LM, NO_MUTATION)),
    Probe("no MoE layers", lambda: _lm_inputs(514, 3, 2, 4, 0), _lm_run, _lm_judge,
          rules=(LM, DENSE)),
)
