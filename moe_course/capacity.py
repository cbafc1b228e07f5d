"""Expert capacity and token dropping (GShard, arXiv 2006.16668; Switch, arXiv 2101.03961).

Accelerators want fixed shapes, so each expert gets a buffer of `C` slots:
`C = ceil(k * T * capacity_factor / E)` (Switch Transformer eq. 3 with top-k assignments).
Assignments are placed by priority: every token's first choice before any token's second
choice, in token order within a rank (GShard Algorithm 1, "group-level top-2 gating").
Assignments past the buffer are dropped: their weight becomes 0 and the token rides the
residual connection instead.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .validation import float_tensor, index_tensor, positive_float, positive_int, same_shape


def _exact(value: float) -> Fraction:
    # The decimal the user wrote: 1.1 means 11/10, not 1.100000000000000088..., so that
    # ceil(10 * 1.1) is 11 and not 12.
    return Fraction(str(value)) if isinstance(value, float) else Fraction(value)


def expert_capacity(n_tokens: int, n_experts: int, capacity_factor: float, k: int = 1) -> int:
    """Slots per expert, `min(T, ceil(k * T * capacity_factor / E))` (Switch eq. 3).

    >>> expert_capacity(n_tokens=8, n_experts=4, capacity_factor=1.25)
    3
    >>> expert_capacity(8, 4, 1.0, k=2)
    4
    >>> expert_capacity(8, 4, 0.0)
    Traceback (most recent call last):
    ...
    ValueError: capacity_factor must be a finite number > 0; got 0.0
    """
    t = positive_int("n_tokens", n_tokens)
    e = positive_int("n_experts", n_experts)
    k = positive_int("k", k, maximum=e)
    cf = positive_float("capacity_factor", capacity_factor)
    return min(t, math.ceil(k * t * _exact(cf) / e))


def capacity_positions(indices: Tensor, n_experts: int) -> Tensor:
    """Each assignment's slot in its expert's buffer, `(T, K)`, by GShard priority.

    All first choices are placed first, in token order, then all second choices, and so on,
    so a token's first choice is never dropped to make room for another token's second.

    >>> capacity_positions(torch.tensor([[0, 1], [0, 2], [1, 0]]), n_experts=3)
    tensor([[0, 1],
            [1, 0],
            [0, 2]])
    """
    e = positive_int("n_experts", n_experts)
    index_tensor("indices", indices, ndim=2, shape_hint="(T, K)", upper=e)
    t, k = indices.shape
    by_rank = indices.long().t().reshape(-1)  # (K*T,) choice-major: all first choices first
    one_hot = F.one_hot(by_rank, e)  # (K*T, E)
    position = (one_hot.cumsum(0) - 1).gather(1, by_rank[:, None]).squeeze(1)  # (K*T,)
    return position.reshape(k, t).t()  # (T, K)


class Capacity(NamedTuple):
    """Output of `apply_capacity`."""

    weights: Tensor  # (T, K) gate weights, 0 where dropped, not renormalised
    keep: Tensor  # (T, K) bool, False where the expert's buffer was full


def apply_capacity(weights: Tensor, indices: Tensor, capacity: int) -> Capacity:
    """Drop assignments whose slot is `>= capacity`; kept weights are left as they were.

    A token whose every assignment is dropped gets MoE output 0 and passes through the
    residual connection unchanged (Switch Transformer Sec. 2.2, Fig. 3).

    >>> w = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.9, 0.1]])
    >>> i = torch.tensor([[0, 1], [0, 1], [0, 1]])
    >>> apply_capacity(w, i, capacity=2)
    Capacity(weights=tensor([[0.6000, 0.4000],
            [0.7000, 0.3000],
            [0.0000, 0.0000]]), keep=tensor([[ True,  True],
            [ True,  True],
            [False, False]]))
    """
    float_tensor("weights", weights, ndim=2, shape_hint="(T, K)")
    index_tensor("indices", indices, ndim=2, shape_hint="(T, K)")
    same_shape("weights", weights, "indices", indices)
    capacity = positive_int("capacity", capacity, minimum=0)
    n_experts = int(indices.max()) + 1 if indices.numel() else 1
    keep = capacity_positions(indices, n_experts) < capacity  # (T, K)
    return Capacity(torch.where(keep, weights, torch.zeros_like(weights)), keep)


class Assignments(NamedTuple):
    """The `T*K` token-to-expert assignments sorted by expert, GShard priority within one.

    The `(T, K)` fields are in token order; `order` is the expert-major layout of the kept
    assignments. Built by `group_by_expert`.
    """

    positions: Tensor  # (T, K) slot of each assignment in its expert's buffer
    keep: Tensor  # (T, K) bool, positions < capacity
    counts: Tensor  # (E,) kept assignments per expert
    routed: Tensor  # (E,) all assignments per expert, before capacity (Switch f_e)
    order: Tensor  # (M,) token-major ids t*K + j of the kept assignments, grouped by expert
    tokens: Tensor  # (M,) the token of each of them, order // K


def group_by_expert(indices: Tensor, n_experts: int, capacity: int | None = None) -> Assignments:
    """Sort the assignments `indices` `(T, K)` by expert with one stable sort.

    Within an expert the order is GShard's priority (arXiv 2006.16668, Algorithm 1): every
    first choice in token order, then every second choice, ...; so `positions` equals
    `capacity_positions(indices, E)` and, with a `capacity`, `keep` is `positions < C`
    exactly as in `apply_capacity` (tests/test_capacity.py holds them equal). The fast
    layers of `moe_course.layers` and `moe_course.fused` dispatch with it. `order` lists
    the kept assignments as token-major flat ids `t*K + j`, expert by expert, `counts[e]`
    of them for expert `e`.

    >>> a = group_by_expert(torch.tensor([[0, 1], [0, 2], [1, 0]]), n_experts=3, capacity=2)
    >>> a.positions
    tensor([[0, 1],
            [1, 0],
            [0, 2]])
    >>> a.order, a.counts
    (tensor([0, 2, 4, 1, 3]), tensor([2, 2, 1]))
    """
    e = positive_int("n_experts", n_experts)
    index_tensor("indices", indices, ndim=2, shape_hint="(T, K)", upper=e)
    if capacity is not None:
        capacity = positive_int("capacity", capacity, minimum=0)
    t, k = indices.shape
    n = t * k
    by_rank = indices.long().t().reshape(-1)  # (K*T,) choice-major: all first choices first
    expert_sorted, order = by_rank.sort(stable=True)  # (K*T,), (K*T,) choice-major ids
    routed = torch.bincount(by_rank, minlength=e)  # (E,)
    starts = routed.cumsum(0) - routed  # (E,) first sorted row of each expert
    pos_sorted = torch.arange(n, device=indices.device) - starts[expert_sorted]  # (K*T,)
    positions = torch.empty_like(pos_sorted).index_copy_(0, order, pos_sorted)  # (K*T,)
    positions = positions.reshape(k, t).t()  # (T, K)
    tokens = order % t  # (K*T,) choice-major id j*T + t -> its token t
    token_major = (tokens * k).add_(order // t)  # (K*T,) -> token-major id t*K + j
    if capacity is None or capacity >= n:
        return Assignments(positions, torch.ones_like(positions, dtype=torch.bool), routed,
                           routed, token_major, tokens)
    kept = pos_sorted < capacity  # (K*T,)
    counts = routed.clamp(max=capacity)  # (E,)
    return Assignments(positions, positions < capacity, counts, routed, token_major[kept],
                       tokens[kept])
