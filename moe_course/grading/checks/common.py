"""What the check modules of several notebooks share (never another notebook's checks).

The helpers that class exercises share (building the learner's class, copying the
reference weights, given as tensors in the inputs, into its `nn.Linear` attributes), the
message for unweighted expert outputs, and the token-order slot rule that notebooks 03 and
05 both diagnose.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ... import experts as ref_experts
from ..probe import CheckFailure, Inputs, capture, describe

UNWEIGHTED = ("expert outputs are not weighted by their gates: multiply each expert's output "
              "by its gate weight before summing (y = sum_e g_e * E_e(x))")


# ----------------------------------------------------------------------------------------
# Class exercises: construct, then load reference weights.


def construct(cls: Any, symbol: str, *args: Any, **kwargs: Any) -> nn.Module:
    """Instantiate the learner's class; refuse instances and non-modules with a clear message."""
    if not isinstance(cls, type):
        extra = " (you passed an instance: pass the class itself)" if isinstance(
            cls, nn.Module) else ""
        raise CheckFailure(f"{symbol} must be a class, an nn.Module subclass; got "
                           f"{describe(capture(cls))}{extra}")
    module = cls(*args, **kwargs)
    if not isinstance(module, nn.Module):
        raise CheckFailure(f"{symbol} must subclass nn.Module; {symbol}(...) built a "
                           f"{type(module).__name__}")
    return module


def load_linear(owner: nn.Module, attr: str, weight: Tensor, bias: Tensor | None,
                where: str, contract: str) -> None:
    """Copy `weight` (and `bias`) into `owner.<attr>`, an `nn.Linear` by the contract."""
    linear = getattr(owner, attr, None)
    if linear is None:
        raise CheckFailure(f"{where} has no attribute {attr!r}; the contract is "
                           f"{attr} = {contract}")
    w = getattr(linear, "weight", None)
    out_f, in_f = weight.shape
    if not isinstance(w, Tensor) or tuple(w.shape) != tuple(weight.shape):
        got = tuple(w.shape) if isinstance(w, Tensor) else describe(capture(w))
        raise CheckFailure(f"{where}.{attr}.weight must have shape {tuple(weight.shape)} "
                           f"({contract}; nn.Linear({in_f}, {out_f}) stores (out, in)); "
                           f"yours is {got}")
    b = getattr(linear, "bias", None)
    if bias is None and b is not None:
        raise CheckFailure(f"{where}.{attr} must have no bias: {contract}")
    if bias is not None and (not isinstance(b, Tensor) or tuple(b.shape) != tuple(bias.shape)):
        raise CheckFailure(f"{where}.{attr} must have a bias of shape {tuple(bias.shape)} "
                           f"({contract}, nn.Linear's default bias=True); yours is "
                           f"{describe(capture(b))}")
    with torch.no_grad():
        w.copy_(weight)
        if bias is not None:
            b.copy_(bias)


def load_expert(expert: nn.Module, inputs: Inputs, e: int | None, where: str) -> None:
    """Load expert `e`'s weights (or the only expert's when `e` is None) into `expert`."""
    pick = (lambda t: t) if e is None else (lambda t: t[e])
    d, h = inputs["d_model"], inputs["d_hidden"]
    load_linear(expert, "w_in", pick(inputs["w_in_weight"]), pick(inputs["w_in_bias"]), where,
                f"nn.Linear(d_model={d}, d_hidden={h})")
    load_linear(expert, "w_out", pick(inputs["w_out_weight"]), pick(inputs["w_out_bias"]),
                where, f"nn.Linear(d_hidden={h}, d_model={d})")


def expert_weights(g: torch.Generator, d_model: int, d_hidden: int,
                   n_experts: int | None = None) -> Inputs:
    """Seeded `Expert` weights; stacked over a leading `E` axis when `n_experts` is given."""
    lead = () if n_experts is None else (n_experts,)
    return {
        "d_model": d_model, "d_hidden": d_hidden,
        "w_in_weight": torch.randn(*lead, d_hidden, d_model, generator=g) * 0.6,
        "w_in_bias": torch.randn(*lead, d_hidden, generator=g) * 0.3,
        "w_out_weight": torch.randn(*lead, d_model, d_hidden, generator=g) * 0.5,
        "w_out_bias": torch.randn(*lead, d_model, generator=g) * 0.2,
    }


def reference_expert(inputs: Inputs, e: int | None = None) -> ref_experts.Expert:
    """The reference `Expert` holding the inputs' weights (trusted side)."""
    pick = (lambda t: t) if e is None else (lambda t: t[e])
    expert = ref_experts.Expert(inputs["d_model"], inputs["d_hidden"])
    with torch.no_grad():
        expert.w_in.weight.copy_(pick(inputs["w_in_weight"]))
        expert.w_in.bias.copy_(pick(inputs["w_in_bias"]))
        expert.w_out.weight.copy_(pick(inputs["w_out_weight"]))
        expert.w_out.bias.copy_(pick(inputs["w_out_bias"]))
    return expert


def positions_token_order(idx: Tensor, e: int) -> Tensor:
    """Slots in token order (all ranks of a token before the next token): the classic mistake
    against GShard's priority, where all first choices fill before any second choice."""
    t, k = idx.shape
    flat = F.one_hot(idx.reshape(-1), e)  # (T*K, E), token-major
    return ((flat.cumsum(0) - 1) * flat).sum(-1).reshape(t, k)  # (T, K)
