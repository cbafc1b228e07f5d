"""Probes for notebook 01, experts and gating: `Expert`, `softmax_gate`, `dense_moe`."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..inputs import gen
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
    expect_tensor,
    no_mutation,
)
from ..recording import expert_inputs, expert_outputs, probe_experts
from .common import UNWEIGHTED, construct, expert_weights, load_expert, reference_expert

# ----------------------------------------------------------------------------------------
# Expert


def _expert_inputs(seed: int, d: int, h: int, shape: tuple[int, ...]) -> Inputs:
    g = gen(seed)
    weights = expert_weights(g, d, h)
    return {**weights, "x": torch.randn(*shape, d, generator=g) * 1.5}


def _expert_run(cls: Any, inputs: Inputs) -> Outputs:
    d, h = inputs["d_model"], inputs["d_hidden"]
    module = construct(cls, "Expert", d, h)
    load_expert(module, inputs, None, "your Expert")
    n_params = sum(p.numel() for p in module.parameters())
    y = module(inputs["x"].clone())
    return {"result": capture(y), "n_params": int(n_params)}


def _expert_judge(inputs: Inputs, outputs: Outputs) -> None:
    d, h = inputs["d_model"], inputs["d_hidden"]
    x = inputs["x"]
    expected_params = 2 * d * h + h + d
    if outputs["n_params"] != expected_params:
        raise CheckFailure(
            f"your Expert({d}, {h}) registers {outputs['n_params']} parameters, expected "
            f"{expected_params} (w_in and w_out with biases): assign the layers as attributes "
            "(self.w_in = nn.Linear(...)) after super().__init__(), and add no others")
    y = expect_tensor(outputs["result"], f"Expert's output for x of shape {tuple(x.shape)}",
                      tuple(x.shape))
    w1, b1, w2, b2 = (inputs[k] for k in ("w_in_weight", "w_in_bias", "w_out_weight",
                                          "w_out_bias"))
    pre = x @ w1.T + b1

    def out(act: Tensor) -> Tensor:
        return act @ w2.T + b2

    expected = reference_expert(inputs)(x).detach()
    expect_close(y, expected, "your Expert's output", variants=[
        (out(F.relu(pre)), "your Expert matches a ReLU between w_in and w_out: use the exact "
                           "GELU, F.gelu(h) (nn.GELU())"),
        (out(F.gelu(pre, approximate="tanh")),
         "your Expert matches the tanh approximation of GELU: use the exact (erf) GELU, "
         "F.gelu(h) with the default approximate='none'"),
        (out(F.silu(pre)), "your Expert matches SiLU (swish): use the exact GELU, F.gelu(h)"),
        (out(pre), "your Expert has no activation: w_out(w_in(x)) is one linear map; put "
                   "the exact GELU between them"),
        (out(F.gelu(pre)) - b2, "your Expert's output lacks w_out's bias"),
    ])


# ----------------------------------------------------------------------------------------
# softmax_gate


def _gate_inputs(seed: int, t: int, d: int, e: int, scale: float = 1.0) -> Inputs:
    g = gen(seed)
    return {"x": torch.randn(t, d, generator=g) * scale,
            "w_gate": torch.randn(d, e, generator=g)}


def _gate_run(fn: Any, inputs: Inputs) -> Outputs:
    return call(fn, [("x", inputs["x"]), ("w_gate", inputs["w_gate"])])


def gate_variants(x: Tensor, w_gate: Tensor, what: str) -> list[tuple[Tensor, str]]:
    """Planted mistakes of a softmax gate, `(value, message)` pairs."""
    logits = x @ w_gate
    return [
        (torch.softmax(logits, dim=0),
         f"{what}: each column sums to 1 instead of each row; take the softmax over the "
         "experts (dim=-1), not over the tokens (dim=0)"),
        (logits, f"{what} equals the raw logits x @ w_gate: apply the softmax over experts"),
        (torch.sigmoid(logits), f"{what} is a sigmoid of the logits: use a softmax over the "
                                "experts so each row sums to 1"),
        (torch.log_softmax(logits, dim=-1), f"{what} is the log-softmax: use torch.softmax"),
    ]


def _gate_judge(inputs: Inputs, outputs: Outputs) -> None:
    no_mutation(outputs, "softmax_gate")
    x, w = inputs["x"], inputs["w_gate"]
    t, e = x.shape[0], w.shape[1]
    gates = expect_tensor(outputs["result"], "softmax_gate's output", (t, e),
                          hint=" (T, E)")
    expect_close(gates, torch.softmax(x @ w, dim=-1), "your gates",
                 variants=gate_variants(x, w, "your gates"))


# ----------------------------------------------------------------------------------------
# dense_moe


def _dense_inputs(seed: int, t: int, d: int, e: int) -> Inputs:
    g = gen(seed)
    return {"x": torch.randn(t, d, generator=g), "w_gate": torch.randn(d, e, generator=g) * 1.5,
            **expert_inputs(g, e, d)}


def _dense_run(module_list: bool) -> Any:
    def run(fn: Any, inputs: Inputs) -> Outputs:
        experts = probe_experts(inputs, module_list=module_list)
        return call(fn, [("x", inputs["x"]), ("experts", experts), ("w_gate", inputs["w_gate"])])

    return run


def _dense_judge(inputs: Inputs, outputs: Outputs) -> None:
    no_mutation(outputs, "dense_moe")
    x, w = inputs["x"], inputs["w_gate"]
    (t, d), e = x.shape, w.shape[1]
    result = outputs["result"]
    if isinstance(result, Tensor):
        raise CheckFailure(f"dense_moe must return a tuple (y, gates); you returned only "
                           f"{describe(result)}: did you forget to return the gates?")
    y, gates = expect_items(result, "dense_moe", ("y", "gates"))
    if (isinstance(y, Tensor) and isinstance(gates, Tensor) and tuple(y.shape) == (t, e)
            and tuple(gates.shape) == (t, d) and d != e):
        raise CheckFailure("dense_moe must return (y, gates) in that order; you returned "
                           "(gates, y)")
    y = expect_tensor(y, "dense_moe's y", (t, d), hint=" (T, D)")
    gates = expect_tensor(gates, "dense_moe's gates", (t, e), hint=" (T, E)")
    expected_gates = torch.softmax(x @ w, dim=-1)  # (T, E)
    expect_close(gates, expected_gates, "your gates",
                 variants=gate_variants(x, w, "your gates"))
    outs = expert_outputs(inputs, x)  # (E, T, D)
    expected = torch.einsum("te,etd->td", expected_gates, outs)  # (T, D)
    best = expected_gates.argmax(-1)  # (T,)
    expect_close(y, expected, "your y", variants=[
        (outs.sum(0), UNWEIGHTED),
        (outs.mean(0), "your y is the plain average of the experts: weight each expert's "
                       "output by its gate, y = sum_e gates[:, e] * experts[e](x)"),
        (outs[best, torch.arange(t)],
         "your y uses only each token's best expert: a dense mixture sums every expert, "
         "weighted by its gate"),
        (torch.einsum("te,etd->td", torch.softmax(x @ w, dim=0), outs),
         "your y is weighted by a softmax over tokens (dim=0): take it over experts (dim=-1)"),
    ])


# Rules the exercises state, each tested by a visible probe and again by a hidden one.
EXACT_GELU = "w_out(GELU(w_in(x))) with the exact GELU"
ATTRIBUTES = "attributes w_in, w_out: nn.Linear with biases, nothing else"
ANY_BATCH = "(..., D) -> (..., D): any leading dimensions"
GATE_SOFTMAX = "softmax over the experts (dim=-1)"
LARGE_LOGITS = "finite for large logits"
NO_MUTATION = "never changes an argument in place"
MIXTURE = "y = sum_e gates[:, e] * experts[e](x), returns (y, gates)"
LIST_OR_MODULE_LIST = "experts may be a list or an nn.ModuleList"

VISIBLE_EXPERT = (
    Probe("Expert(6, 10) on (5, 6) tokens", lambda: _expert_inputs(101, 6, 10, (5,)),
          _expert_run, _expert_judge, rules=(EXACT_GELU, ATTRIBUTES)),
    Probe("Expert(5, 8) on a (3, 2, 5) batch", lambda: _expert_inputs(103, 5, 8, (3, 2)),
          _expert_run, _expert_judge, rules=(EXACT_GELU, ATTRIBUTES, ANY_BATCH)),
)
HIDDEN_EXPERT = (
    Probe("Expert(4, 7) on a (2, 3, 4) batch", lambda: _expert_inputs(102, 4, 7, (2, 3)),
          _expert_run, _expert_judge, rules=(EXACT_GELU, ATTRIBUTES, ANY_BATCH)),
)
VISIBLE_SOFTMAX_GATE = (
    Probe("6 tokens, 5 experts", lambda: _gate_inputs(111, 6, 4, 5), _gate_run, _gate_judge,
          rules=(GATE_SOFTMAX, NO_MUTATION)),
    Probe("large logits, 4 tokens", lambda: _gate_inputs(114, 4, 5, 4, scale=60.0),
          _gate_run, _gate_judge, rules=(GATE_SOFTMAX, LARGE_LOGITS)),
)
HIDDEN_SOFTMAX_GATE = (
    Probe("3 tokens, 4 experts", lambda: _gate_inputs(112, 3, 7, 4), _gate_run, _gate_judge,
          rules=(GATE_SOFTMAX, NO_MUTATION)),
    Probe("large logits, 5 tokens, 3 experts", lambda: _gate_inputs(113, 5, 4, 3, scale=60.0),
          _gate_run, _gate_judge, rules=(GATE_SOFTMAX, LARGE_LOGITS)),
)
VISIBLE_DENSE_MOE = (
    Probe("6 tokens, 3 experts (a list)", lambda: _dense_inputs(121, 6, 4, 3),
          _dense_run(module_list=False), _dense_judge, rules=(MIXTURE, NO_MUTATION)),
    Probe("4 tokens, 5 experts (an nn.ModuleList)", lambda: _dense_inputs(123, 4, 3, 5),
          _dense_run(module_list=True), _dense_judge,
          rules=(MIXTURE, LIST_OR_MODULE_LIST)),
)
HIDDEN_DENSE_MOE = (
    Probe("5 tokens, 4 experts (an nn.ModuleList)", lambda: _dense_inputs(122, 5, 3, 4),
          _dense_run(module_list=True), _dense_judge,
          rules=(MIXTURE, LIST_OR_MODULE_LIST, NO_MUTATION)),
)
