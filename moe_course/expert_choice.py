"""Expert-choice routing (Zhou et al. 2022, arXiv 2202.09368).

Token choice lets each token pick its top-k experts and then fights imbalance with losses
and capacity. Expert choice inverts it: each expert picks its top-`C` tokens, so every
expert processes exactly `C` tokens (perfect balance by construction), while a token may
be picked by several experts or by none. Because an expert's choice compares a token with
every other token in the batch, including later ones, it is not causal.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from .capacity import _exact
from .routing import ExpertFn, run_expert
from .validation import (
    experts_list,
    float_tensor,
    index_tensor,
    positive_float,
    positive_int,
    routable_logits,
    same_shape,
)


def expert_choice_capacity(n_tokens: int, n_experts: int, capacity_factor: float) -> int:
    """Tokens per expert, `min(T, ceil(T * capacity_factor / E))` (Zhou et al. Sec. 3, `k = nc/e`).

    >>> expert_choice_capacity(n_tokens=10, n_experts=4, capacity_factor=2.0)
    5
    """
    t = positive_int("n_tokens", n_tokens)
    e = positive_int("n_experts", n_experts)
    cf = positive_float("capacity_factor", capacity_factor)
    return min(t, math.ceil(t * _exact(cf) / e))


class ExpertChoice(NamedTuple):
    """Output of `expert_choice_routing`; both fields `(E, C)`."""

    gates: Tensor  # (E, C) token-to-expert affinities S[token, e], descending per expert
    token_idx: Tensor  # (E, C) the chosen tokens


def expert_choice_routing(logits: Tensor, capacity: int) -> ExpertChoice:
    """Each expert takes the `C` tokens with the largest `S = softmax(logits)` (Zhou et al. eq. 1).

    The softmax is over experts (each token's row sums to 1), then `TopK(S^T, C)` picks,
    for every expert, its `C` highest-affinity tokens in descending order. NaN and `+inf`
    logits are refused with a ValueError (their softmax is NaN); `-inf` masks an expert off
    for that token, and a row needs at least one finite logit.

    >>> logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    >>> gates, token_idx = expert_choice_routing(logits, capacity=2)
    >>> token_idx
    tensor([[0, 2],
            [1, 2]])
    """
    float_tensor("logits", logits, ndim=2, shape_hint="(T, E)")
    capacity = positive_int("capacity", capacity, maximum=logits.shape[0])
    routable_logits("logits", logits)
    scores = torch.softmax(logits, dim=-1)  # (T, E), S = Softmax(X W_g), eq. 1
    gates, token_idx = scores.t().topk(capacity, dim=-1)  # (E, C), (E, C): G, I = TopK(S^T, k)
    return ExpertChoice(gates, token_idx)


def expert_choice_moe(x: Tensor, experts: Sequence[ExpertFn], gates: Tensor,
                      token_idx: Tensor) -> Tensor:
    """`y[t] = sum over (e, c) with token_idx[e, c] == t of gates[e, c] * experts[e](x[t])`.

    Zhou et al. eq. 2-3: gather `X_in = P X`, run each expert once on its `C` rows, scatter
    back weighted by `G`. Tokens chosen by no expert get 0.

    >>> experts = [lambda x: x, lambda x: 10 * x]
    >>> x = torch.tensor([[1.0], [2.0], [3.0]])
    >>> expert_choice_moe(x, experts, torch.tensor([[0.5], [1.0]]), torch.tensor([[2], [2]]))
    tensor([[ 0.0000],
            [ 0.0000],
            [31.5000]])
    """
    n_experts = experts_list("experts", experts)
    float_tensor("x", x, ndim=2, shape_hint="(T, D)")
    float_tensor("gates", gates, ndim=2, shape_hint="(E, C)")
    index_tensor("token_idx", token_idx, ndim=2, shape_hint="(E, C)", upper=x.shape[0])
    same_shape("gates", gates, "token_idx", token_idx)
    if gates.shape[0] != n_experts:
        raise ValueError(f"gates must be (E, C) with E = len(experts) = {n_experts}; got shape "
                         f"{tuple(gates.shape)}")
    token_idx = token_idx.long()  # a uint8 index would be read as a boolean mask
    y = x.new_zeros(x.shape)  # (T, D)
    for e in range(n_experts):
        out = run_expert(experts, e, x[token_idx[e]])  # (C, D)
        y = y.index_add(0, token_idx[e], (gates[e, :, None] * out).to(y.dtype))  # (T, D)
    return y


def experts_per_token(token_idx: Tensor, n_tokens: int) -> Tensor:
    """How many experts chose each token, `(T,)` int64; some tokens get 0, some several.

    >>> experts_per_token(torch.tensor([[0, 2], [2, 1]]), n_tokens=4)
    tensor([1, 1, 2, 0])
    """
    t = positive_int("n_tokens", n_tokens)
    index_tensor("token_idx", token_idx, ndim=2, shape_hint="(E, C)", upper=t)
    return torch.bincount(token_idx.reshape(-1), minlength=t)  # (T,)
