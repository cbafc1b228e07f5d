"""Mixture-of-experts layers built from the pure functions of this package.

`MoEFeedForward` is the readable layer of notebook 05: a router `gate`, a `ModuleList` of
`Expert`s, and the functions of `gating`, `capacity`, `expert_choice`, `routing` and
`losses` composed in the order the papers describe. Every layer here returns an
`MoEOutput` named tuple so that training loops, plots and widgets read the same fields.
"""

from __future__ import annotations

from typing import NamedTuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .capacity import apply_capacity, expert_capacity
from .expert_choice import ExpertChoice, expert_choice_capacity, expert_choice_moe, expert_choice_routing
from .experts import Expert
from .gating import top_k_gating
from .losses import router_z_loss, switch_aux_loss
from .routing import sparse_moe
from .validation import float_tensor, positive_float, positive_int

ROUTERS = ("top_k", "expert_choice")


class TokenChoice(NamedTuple):
    """Routing decisions of a token-choice (top-k) layer; all `(T, K)`."""

    weights: Tensor  # (T, K) gate weights after capacity, 0 where dropped
    indices: Tensor  # (T, K) chosen experts, best first
    keep: Tensor  # (T, K) bool, False where the expert's buffer overflowed


Routing = Union[TokenChoice, ExpertChoice]


class MoEOutput(NamedTuple):
    """What every MoE layer of the course returns."""

    y: Tensor  # same shape as the input, (B, S, D) or (T, D)
    aux_loss: Tensor  # scalar switch load-balancing loss (0 for expert choice)
    z_loss: Tensor  # scalar router z-loss
    logits: Tensor  # (T, E) router logits
    routing: Routing  # TokenChoice (T, K) fields or ExpertChoice (E, C) fields
    expert_load: Tensor  # (E,) float, assignments each expert processed in this call


class MoEFeedForward(nn.Module):
    """A transformer feed-forward block replaced by a mixture of `Expert`s.

    `router="top_k"`: each token picks its `k` best experts (Shazeer et al. 2017, arXiv
    1701.06538), optionally limited to `expert_capacity(T, E, capacity_factor, k)` slots per
    expert with GShard priority (arXiv 2006.16668), trained with the Switch loss (arXiv
    2101.03961 eq. 4) and the z-loss (arXiv 2202.08906 eq. 5).
    `router="expert_choice"`: each expert picks `expert_choice_capacity(T, E, c)` tokens
    (Zhou et al. 2022, arXiv 2202.09368); `c` defaults to `k`, so that on average a token
    gets `k` experts, the same compute as top-k. Its aux loss is 0: balance is built in.

    >>> layer = MoEFeedForward(d_model=8, d_hidden=16, n_experts=4, k=2)
    >>> out = layer(torch.randn(2, 5, 8))
    >>> out.y.shape, out.routing.indices.shape, float(out.expert_load.sum())
    (torch.Size([2, 5, 8]), torch.Size([10, 2]), 20.0)
    """

    def __init__(self, d_model: int, d_hidden: int, n_experts: int, k: int = 2,
                 router: str = "top_k", capacity_factor: float | None = None) -> None:
        super().__init__()
        positive_int("d_model", d_model)
        positive_int("d_hidden", d_hidden)
        self.n_experts = positive_int("n_experts", n_experts)
        self.k = positive_int("k", k, maximum=n_experts)
        if router not in ROUTERS:
            raise ValueError(f"router must be one of {ROUTERS}; got {router!r}")
        if capacity_factor is not None:
            positive_float("capacity_factor", capacity_factor)
        self.router = router
        self.capacity_factor = capacity_factor
        self.gate = nn.Linear(d_model, n_experts, bias=False)  # W_g
        self.experts = nn.ModuleList(Expert(d_model, d_hidden) for _ in range(n_experts))

    def forward(self, x: Tensor) -> MoEOutput:
        float_tensor("x", x, shape_hint="(B, S, D) or (T, D)")
        d = self.gate.in_features
        if x.shape[-1] != d or x.dim() not in (2, 3):
            raise ValueError(f"x must be (B, S, D) or (T, D) with D = {d}; got shape "
                             f"{tuple(x.shape)}")
        flat = x.reshape(-1, d)  # (T, D)
        n_tokens = flat.shape[0]
        logits = self.gate(flat)  # (T, E)
        z_loss = router_z_loss(logits)
        if self.router == "top_k":
            weights, indices = top_k_gating(logits, self.k)  # (T, K), (T, K)
            keep = torch.ones_like(indices, dtype=torch.bool)  # (T, K)
            if self.capacity_factor is not None:
                capacity = expert_capacity(n_tokens, self.n_experts, self.capacity_factor, self.k)
                weights, keep = apply_capacity(weights, indices, capacity)  # (T, K), (T, K)
            # A dropped assignment has weight 0, so it adds exactly 0 to the output.
            y = sparse_moe(flat, self.experts, weights, indices)  # (T, D)
            aux_loss = switch_aux_loss(torch.softmax(logits, dim=-1), indices)
            routing: Routing = TokenChoice(weights, indices, keep)
            load = F.one_hot(indices[keep], self.n_experts).sum(0)  # (E,)
        else:
            factor = self.capacity_factor if self.capacity_factor is not None else float(self.k)
            capacity = expert_choice_capacity(n_tokens, self.n_experts, factor)
            routing = expert_choice_routing(logits, capacity)  # (E, C) each
            y = expert_choice_moe(flat, self.experts, routing.gates, routing.token_idx)  # (T, D)
            aux_loss = logits.new_zeros(())
            load = torch.full((self.n_experts,), capacity)  # (E,)
        return MoEOutput(y.reshape(x.shape), aux_loss, z_loss, logits, routing,
                         load.to(x.dtype))
