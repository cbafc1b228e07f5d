"""The router table: every routing algorithm of the course, one pure function and one row.

A router turns the logits `(T, E)` into routing decisions. Two kinds of decisions exist,
as in flaxformer's `Router` subclasses (`RouterIndices` for token choice, `RouterMask` for
expert choice), here as named tuples:

- `TokenChoice` `(T, K)`: each token picks experts (Shazeer et al. 2017, arXiv 1701.06538;
  GShard, arXiv 2006.16668; Switch, arXiv 2101.03961);
- `ExpertChoice` `(E, C)`: each expert picks tokens (Zhou et al. 2022, arXiv 2202.09368).

`ROUTERS` maps a name to a `Router` row. `MoEFeedForward` (`moe_course.layers`) and the
routing explorer (`moe_course.widgets.explorer`) read only this table: they branch on the
kind of decisions a router returns, never on its name. A new router is one function
`fn(logits, k, capacity_factor, select) -> RouterOutput` and one row (CONTRIBUTING.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, Union

import torch
from torch import Tensor

from .capacity import apply_capacity, expert_capacity
from .expert_choice import ExpertChoice, expert_choice_capacity, expert_choice_routing
from .gating import top_k_gating


class TokenChoice(NamedTuple):
    """Routing decisions of a token-choice (top-k) layer; all `(T, K)`."""

    weights: Tensor  # (T, K) gate weights after capacity, 0 where dropped
    indices: Tensor  # (T, K) chosen experts, best first
    keep: Tensor  # (T, K) bool, False where the expert's buffer overflowed


Routing = Union[TokenChoice, ExpertChoice]


class RouterOutput(NamedTuple):
    """What a router function returns."""

    routing: Routing  # TokenChoice (T, K) fields or ExpertChoice (E, C) fields
    capacity: int | None  # C slots per expert; None when unlimited


Select = Callable[[Tensor, int], tuple[Tensor, Tensor]]  # (logits, k or C) -> pair
RouterFn = Callable[[Tensor, int, "float | None", Select], RouterOutput]


@dataclass(frozen=True)
class Router:
    """One row of `ROUTERS`: a routing algorithm and what its consumers need to know."""

    label: str  # shown in the explorer's dropdown
    fn: RouterFn  # fn(logits (T, E), k, capacity_factor or None, select) -> RouterOutput
    select: Select | None  # the selection step fn calls, which a learner's `routing_fn`
    #                        may replace in the explorer (top_k_gating or
    #                        expert_choice_routing); None: nothing to replace
    uses_k: bool  # k sets its experts per token (else it fixes them itself)
    uses_capacity: bool  # the explorer passes it a capacity_factor (layers pass theirs)
    noisy: bool  # routes on noisy logits (Shazeer et al. eq. 4) in training

    def __call__(self, logits: Tensor, k: int, capacity_factor: float | None = None,
                 select: Select | None = None) -> RouterOutput:
        """Route `logits` `(T, E)`; `select` replaces the row's selection step."""
        return self.fn(logits, k, capacity_factor, select or self.select)


def top_k_router(logits: Tensor, k: int, capacity_factor: float | None = None,
                 select: Select = top_k_gating) -> RouterOutput:
    """Each token takes its `k` best experts (Shazeer et al. eq. 3, 5); with a
    `capacity_factor`, `expert_capacity(T, E, c, k)` slots per expert by GShard priority.

    >>> import torch
    >>> out = top_k_router(torch.tensor([[2.0, 1.0], [3.0, 0.0], [1.0, 0.0]]), 1, 1.0)
    >>> out.capacity, out.routing.keep.flatten().tolist()
    (2, [True, True, False])
    """
    weights, indices = select(logits, k)  # (T, K), (T, K)
    keep = torch.ones_like(indices, dtype=torch.bool)  # (T, K)
    capacity = None
    if capacity_factor is not None:
        t, e = logits.shape
        capacity = expert_capacity(t, e, capacity_factor, indices.shape[1])
        # A dropped assignment gets weight 0, so it adds exactly 0 to the output.
        weights, keep = apply_capacity(weights, indices, capacity)  # (T, K), (T, K)
    return RouterOutput(TokenChoice(weights, indices, keep), capacity)


def dense_router(logits: Tensor, k: int, capacity_factor: float | None = None,
                 select: Select = top_k_gating) -> RouterOutput:
    """Every expert on every token, weighted by the softmax: top-k with `k = E`, no limit."""
    return top_k_router(logits, logits.shape[1], None, select)


def switch_router(logits: Tensor, k: int, capacity_factor: float | None = None,
                  select: Select = top_k_gating) -> RouterOutput:
    """Switch Transformer: top-1 (Fedus et al., arXiv 2101.03961, Sec. 2.1), `k` ignored."""
    return top_k_router(logits, 1, capacity_factor, select)


def expert_choice_router(logits: Tensor, k: int, capacity_factor: float | None = None,
                         select: Select = expert_choice_routing) -> RouterOutput:
    """Each expert takes its `expert_choice_capacity(T, E, c)` best tokens (Zhou et al.).

    `c` defaults to `k`, so that on average a token gets `k` experts, the compute of top-k.
    """
    factor = capacity_factor if capacity_factor is not None else float(k)
    capacity = expert_choice_capacity(logits.shape[0], logits.shape[1], factor)
    gates, token_idx = select(logits, capacity)  # (E, C), (E, C)
    return RouterOutput(ExpertChoice(gates, token_idx), capacity)


ROUTERS: dict[str, Router] = {
    "dense": Router("dense softmax (every expert)", dense_router, top_k_gating,
                    uses_k=False, uses_capacity=False, noisy=False),
    "top_k": Router("top-k (Shazeer 2017)", top_k_router, top_k_gating,
                    uses_k=True, uses_capacity=False, noisy=False),
    "noisy_top_k": Router("noisy top-k (Shazeer eq. 4)", top_k_router, top_k_gating,
                          uses_k=True, uses_capacity=False, noisy=True),
    "top_k_capacity": Router("top-k + capacity (GShard)", top_k_router, top_k_gating,
                             uses_k=True, uses_capacity=True, noisy=False),
    "switch": Router("switch top-1 + capacity", switch_router, top_k_gating,
                     uses_k=False, uses_capacity=True, noisy=False),
    "expert_choice": Router("expert choice (Zhou 2022)", expert_choice_router,
                            expert_choice_routing, uses_k=False, uses_capacity=True,
                            noisy=False),
}


def router_row(name: object) -> Router:
    """The row of `ROUTERS` named `name`; ValueError naming the routers otherwise."""
    if not isinstance(name, str) or name not in ROUTERS:
        raise ValueError(f"router must be one of {tuple(ROUTERS)}; got {name!r}")
    return ROUTERS[name]
