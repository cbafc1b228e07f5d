"""Mixture-of-experts layers built from the pure functions of this package.

`MoEFeedForward` is the readable layer of notebook 05: a router `gate`, a `ModuleList` of
`Expert`s, and the functions of `gating`, `capacity`, `expert_choice`, `routing` and
`losses` composed in the order the papers describe. Every layer here returns an
`MoEOutput` named tuple so that training loops, plots and widgets read the same fields.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import routers
from .capacity import Assignments, expert_capacity, group_by_expert
from .expert_choice import (
    ExpertChoice,
    expert_choice_capacity,
    expert_choice_moe,
    expert_choice_routing,
)
from .experts import Expert, ExpertBank, expert_kind
from .fused import KERNELS, top_k_moe
from .gating import noisy_logits, top_k_gating
from .losses import router_z_loss, switch_aux_loss, switch_loss_from_counts
from .routers import Routing, TokenChoice, top_k_router
from .routing import ExpertFn, sparse_moe
from .validation import float_tensor, index_tensor, positive_float, positive_int

__all__ = ["AUTO_GROUPED_MACS", "DISPATCHES", "Assignments", "DenseFFN", "ExpertChoiceMoE",
           "MoEFeedForward", "MoEOutput", "Routing", "TokenChoice", "TopKMoE",
           "group_by_expert", "moe_from_routing", "token_rows"]


class MoEOutput(NamedTuple):
    """What every MoE layer of the course returns."""

    y: Tensor  # same shape as the input, (B, S, D) or (T, D)
    aux_loss: Tensor  # scalar switch load-balancing loss (0 for expert choice)
    z_loss: Tensor  # scalar router z-loss
    logits: Tensor  # (T, E) router logits
    routing: Routing  # TokenChoice (T, K) fields or ExpertChoice (E, C) fields
    expert_load: Tensor  # (E,) float, assignments each expert processed in this call


def moe_from_routing(x: Tensor, flat: Tensor, experts: Sequence[ExpertFn], logits: Tensor,
                     routing: Routing) -> MoEOutput:
    """The mixture on given routing decisions, one expert at a time: the reference that
    `MoEFeedForward` and the loop oracles of the fast layers share.

    Token choice (`TokenChoice`, `(T, K)`): `sparse_moe` (Shazeer et al. eq. 1) and the
    Switch loss (arXiv 2101.03961 eq. 4); a dropped assignment has weight 0, so it adds
    exactly 0. Expert choice (`ExpertChoice`, `(E, C)`): `expert_choice_moe` (Zhou et al.
    eq. 2-3) and no aux loss, balance being built in. Both: the z-loss (arXiv 2202.08906
    eq. 5). `x` is the layer's input, `flat` its `(T, D)` rows.
    """
    e = logits.shape[1]
    if isinstance(routing, ExpertChoice):
        y = expert_choice_moe(flat, experts, routing.gates, routing.token_idx)  # (T, D)
        aux_loss = logits.new_zeros(())
        load = torch.full((e,), routing.token_idx.shape[1], device=x.device)  # (E,) C each
    else:
        y = sparse_moe(flat, experts, routing.weights, routing.indices)  # (T, D)
        aux_loss = switch_aux_loss(torch.softmax(logits, dim=-1), routing.indices)
        load = torch.bincount(routing.indices[routing.keep], minlength=e)  # (E,)
    return MoEOutput(y.reshape(x.shape), aux_loss, router_z_loss(logits), logits, routing,
                     load.to(x.dtype))


def token_rows(x: object, d_model: int) -> Tensor:
    """Check a layer input `x`, `(B, S, D)` or `(T, D)`, and flatten it to `(T, D)` rows.

    >>> token_rows(torch.zeros(2, 3, 4), d_model=4).shape
    torch.Size([6, 4])
    """
    t = float_tensor("x", x, shape_hint="(B, S, D) or (T, D)")
    if t.dim() not in (2, 3) or t.shape[-1] != d_model:
        raise ValueError(f"x must be (B, S, D) or (T, D) with D = {d_model}; got shape "
                         f"{tuple(t.shape)}")
    return t.reshape(-1, d_model)  # (T, D)


def _token_input(x: object, d_model: int, dtype: torch.dtype) -> Tensor:
    """`token_rows`, plus at least one token and the layer's dtype (the fast layers)."""
    t = token_rows(x, d_model)  # (T, D)
    if t.numel() == 0:
        raise ValueError(f"x must hold at least one token; got shape {tuple(x.shape)}")
    if t.dtype != dtype:
        raise ValueError(f"x must have the layer's dtype {dtype}; got {t.dtype}")
    return t


def _noise_router(d_model: int, n_experts: int) -> nn.Linear:
    """W_noise of Shazeer et al. eq. 4, zero-initialised: noise scale softplus(0) at start."""
    w_noise = nn.Linear(d_model, n_experts, bias=False)
    nn.init.zeros_(w_noise.weight)
    return w_noise


class MoEFeedForward(nn.Module):
    """A transformer feed-forward block replaced by a mixture of `Expert`s.

    `router` names a row of `routers.ROUTERS`, the course's one router table:
    `router="top_k"`: each token picks its `k` best experts (Shazeer et al. 2017, arXiv
    1701.06538), optionally limited to `expert_capacity(T, E, capacity_factor, k)` slots per
    expert with GShard priority (arXiv 2006.16668), trained with the Switch loss (arXiv
    2101.03961 eq. 4) and the z-loss (arXiv 2202.08906 eq. 5).
    `router="expert_choice"`: each expert picks `expert_choice_capacity(T, E, c)` tokens
    (Zhou et al. 2022, arXiv 2202.09368); `c` defaults to `k`, so that on average a token
    gets `k` experts, the same compute as top-k. Its aux loss is 0: balance is built in.
    The other rows (`"switch"`, `"dense"`, `"noisy_top_k"`, ...) work the same way; a
    noisy one adds Shazeer et al.'s `w_noise` (eq. 4, zero-initialised), used in training.

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
        row = routers.router_row(router)
        if capacity_factor is not None:
            positive_float("capacity_factor", capacity_factor)
        self.router = router
        self.capacity_factor = capacity_factor
        self.gate = nn.Linear(d_model, n_experts, bias=False)  # W_g
        self.experts = nn.ModuleList(Expert(d_model, d_hidden) for _ in range(n_experts))
        self.w_noise = _noise_router(d_model, n_experts) if row.noisy else None

    def forward(self, x: Tensor) -> MoEOutput:
        flat = token_rows(x, self.gate.in_features)  # (T, D)
        logits = self.gate(flat)  # (T, E)
        if self.w_noise is not None and self.training:
            noise = torch.randn_like(logits)  # (T, E)
            logits = noisy_logits(flat, self.gate.weight.t(), self.w_noise.weight.t(), noise)
        routing = routers.router_row(self.router)(logits, self.k, self.capacity_factor).routing
        return moe_from_routing(x, flat, self.experts, logits, routing)


# ---------------------------------------------------------------------------------------------
# Fast layers: experts' weights stacked in an `ExpertBank`, dispatch vectorised.
# ---------------------------------------------------------------------------------------------

DISPATCHES = ("auto", "blocked", "grouped", "padded")
# "auto" takes the grouped layout when an expert's mean matmul, (T*K/E)*D*H multiply-adds,
# is at most this: there the fixed cost of a dozen ops per expert outweighs the cache the
# blocked layout saves. Above it the blocked layout wins. Both measured in
# benchmarks/bench_layers.py (see benchmarks/README.md).
AUTO_GROUPED_MACS = 2**21


class _Combine(torch.autograd.Function):
    """`y[t] = sum over rows r with row_token[r] == t of row_weight[r] * rows[r]`, `(T, D)`.

    Forward: one weighted copy and one `index_add_`. Backward: one gather of the output
    gradient, reused for both the rows' gradient and the weights' (a row-wise dot product),
    instead of the three passes over `(R, D)` and the zero-filled buffers that autograd
    builds for `index_add(0, row_token, rows * row_weight[:, None])`.
    """

    @staticmethod
    def forward(ctx, rows: Tensor, row_token: Tensor, row_weight: Tensor, n_tokens: int) -> Tensor:
        weighted = rows * row_weight[:, None]  # (R, D)
        y = rows.new_zeros(n_tokens, rows.shape[1]).index_add_(0, row_token, weighted)  # (T, D)
        ctx.save_for_backward(rows, row_token, row_weight)
        return y

    @staticmethod
    def backward(ctx, grad_y: Tensor):  # type: ignore[override]
        rows, row_token, row_weight = ctx.saved_tensors
        grad_rows = grad_y.index_select(0, row_token)  # (R, D) dL/dy of each row's token
        grad_weight = None
        if ctx.needs_input_grad[2]:
            grad_weight = torch.bmm(grad_rows[:, None], rows[:, :, None]).reshape(-1)  # (R,)
        return grad_rows.mul_(row_weight[:, None]), None, grad_weight, None


def combine(rows: Tensor, row_token: Tensor, row_weight: Tensor, n_tokens: int) -> Tensor:
    """Weighted scatter-add of expert outputs back to their tokens (Shazeer et al. eq. 1).

    `rows` `(R, D)` are expert outputs, `row_token` `(R,)` the token each row belongs to and
    `row_weight` `(R,)` its gate weight (0 for padding and dropped assignments, which then
    add exactly 0); returns `y` `(T, D)`.

    >>> rows = torch.tensor([[1.0], [2.0], [4.0]])
    >>> combine(rows, torch.tensor([1, 0, 1]), torch.tensor([0.5, 1.0, 0.25]), n_tokens=3)
    tensor([[2.0000],
            [1.5000],
            [0.0000]])
    """
    float_tensor("rows", rows, ndim=2, shape_hint="(R, D)")
    float_tensor("row_weight", row_weight, ndim=1, shape_hint="(R,)")
    n = positive_int("n_tokens", n_tokens)
    index_tensor("row_token", row_token, ndim=1, shape_hint="(R,)", upper=n)
    if not rows.shape[0] == row_token.shape[0] == row_weight.shape[0]:
        raise ValueError(f"rows, row_token and row_weight must have the same length R; got "
                         f"{rows.shape[0]}, {row_token.shape[0]} and {row_weight.shape[0]}")
    return _Combine.apply(rows, row_token.long(), row_weight, n)


def _noise_sample(noise: Tensor | None, flat: Tensor, n_experts: int, noisy: bool,
                  active: bool, training: bool) -> Tensor | None:
    """The `(T, E)` standard-normal noise of eq. 4 when `active` (drawn if not given)."""
    if not active:
        if noise is not None:
            raise ValueError("noise is only used by a noisy layer in training mode; got a "
                             f"noise tensor for a layer with noisy={noisy}, training={training}")
        return None
    if noise is None:
        return torch.randn(flat.shape[0], n_experts, dtype=flat.dtype,
                           device=flat.device)  # (T, E)
    float_tensor("noise", noise, ndim=2, shape_hint="(T, E)")
    if noise.shape != (flat.shape[0], n_experts):
        raise ValueError(f"noise must be (T, E) = {(flat.shape[0], n_experts)}; got "
                         f"shape {tuple(noise.shape)}")
    if noise.dtype != flat.dtype:
        raise ValueError(f"noise must have the layer's dtype {flat.dtype}; got {noise.dtype}")
    return noise


def _experts_of(layer: object, router: str) -> ExpertBank:
    """Copies of the experts of `layer`, which must be an `MoEFeedForward` with `router`."""
    if not isinstance(layer, MoEFeedForward) or layer.router != router:
        got = getattr(layer, "router", None)
        raise ValueError(f"layer must be an MoEFeedForward with router={router!r}; got "
                         f"{type(layer).__name__} with router={got!r}")
    return ExpertBank.from_modules(list(layer.experts))


def _with_weights(layer: nn.Module, gate: nn.Linear, experts: nn.Module) -> nn.Module:
    """`layer` in `gate`'s dtype with a copy of `gate`'s weight and `experts` (copies)."""
    layer = layer.to(gate.weight.dtype)
    layer.experts = experts
    with torch.no_grad():
        layer.gate.weight.copy_(gate.weight)
    return layer


class TopKMoE(nn.Module):
    """Top-k token-choice mixture of experts with stacked expert weights, dispatch vectorised.

    Computes exactly what `MoEFeedForward(router="top_k")` computes (Shazeer et al. 2017,
    arXiv 1701.06538, eq. 1, 3-5; capacity and GShard priority, arXiv 2006.16668; Switch
    loss, arXiv 2101.03961 eq. 4-6; z-loss, arXiv 2202.08906 eq. 5), but without a Python
    loop over tokens and with one sort instead of one mask per expert:

    1. router logits `x @ W_g` (plus Shazeer's eq. 4 noise when `noisy` and training);
    2. the rest runs as one autograd node with a hand-written backward, `fused.top_k_moe`:
       top-k softmax gates, one stable sort of the `T*K` assignments by expert (GShard
       priority within an expert, so capacity drops exactly what `apply_capacity` drops),
       the experts on their rows, the weighted scatter-add back to the tokens (eq. 1) and
       the Switch and z losses. `dispatch` picks how the experts run:
       `"blocked"`: expert by expert, gather - matmuls - activation - scatter on one
       expert's rows at a time, which stay in cache (ScatterMoE, arXiv 2403.08245);
       `"grouped"`: each step on all sorted rows at once, the matmuls as one grouped matmul
       (MegaBlocks, arXiv 2211.15841), fewer, larger ops;
       `"padded"`: GShard's `(E, C, D)` buffer (`C` = the busiest expert's load) through the
       `ExpertBank` as batched matmuls, composed from the course's functions and
       differentiated by autograd (arXiv 2006.16668);
       `"auto"` (the default): grouped when an expert's mean matmul is small
       (`(T*K/E)*D*H <= AUTO_GROUPED_MACS`), blocked otherwise, the faster of the two in
       `benchmarks/bench_layers.py` on each side.

    `expert="gelu"` uses `Expert`s (biases, exact GELU), `expert="swiglu"` Mixtral's
    `SwiGLUExpert`s. `loop_forward` is the plain loop-over-experts oracle on the same weights
    (`routing.sparse_moe`); `from_moe_feed_forward` copies an `MoEFeedForward`.

    >>> layer = TopKMoE(d_model=8, d_hidden=16, n_experts=4, k=2)
    >>> out = layer(torch.randn(2, 5, 8))
    >>> out.y.shape, out.routing.indices.shape, float(out.expert_load.sum())
    (torch.Size([2, 5, 8]), torch.Size([10, 2]), 20.0)
    >>> x = torch.randn(2, 5, 8)
    >>> torch.allclose(layer(x).y, layer.loop_forward(x).y, atol=1e-6)
    True
    """

    def __init__(self, d_model: int, d_hidden: int, n_experts: int, k: int = 2,
                 capacity_factor: float | None = None, expert: str = "gelu",
                 noisy: bool = False, dispatch: str = "auto") -> None:
        super().__init__()
        self.d_model = positive_int("d_model", d_model)
        positive_int("d_hidden", d_hidden)
        self.n_experts = positive_int("n_experts", n_experts)
        self.k = positive_int("k", k, maximum=n_experts)
        if capacity_factor is not None:
            positive_float("capacity_factor", capacity_factor)
        if not isinstance(noisy, bool):
            raise ValueError(f"noisy must be a bool; got {type(noisy).__name__} {noisy!r}")
        if dispatch not in DISPATCHES:
            raise ValueError(f"dispatch must be one of {DISPATCHES}; got {dispatch!r}")
        self.capacity_factor = capacity_factor
        self.dispatch = dispatch
        self.noisy = noisy
        self.gate = nn.Linear(d_model, n_experts, bias=False)  # W_g
        self.w_noise = _noise_router(d_model, n_experts) if noisy else None
        self.experts = ExpertBank(d_model, d_hidden, n_experts, expert)

    def _noise(self, flat: Tensor, noise: Tensor | None) -> Tensor | None:
        """The `(T, E)` noise of eq. 4 (drawn if not given) in noisy training, else None."""
        return _noise_sample(noise, flat, self.n_experts, self.noisy,
                             self.w_noise is not None and self.training, self.training)

    def _logits(self, flat: Tensor, noise: Tensor | None) -> Tensor:
        """Router logits by the course's functions (the loop oracle and the padded layout)."""
        noise = self._noise(flat, noise)
        if noise is None:
            return self.gate(flat)  # (T, E)
        return noisy_logits(flat, self.gate.weight.t(), self.w_noise.weight.t(), noise)

    def _noise_term(self, flat: Tensor, noise: Tensor | None) -> Tensor | None:
        """`noise * softplus(x @ W_noise)` of eq. 4 (noisy training), else None."""
        noise = self._noise(flat, noise)
        return None if noise is None else noise * F.softplus(self.w_noise(flat))  # (T, E)

    def _capacity(self, n_tokens: int) -> int | None:
        if self.capacity_factor is None:
            return None
        return expert_capacity(n_tokens, self.n_experts, self.capacity_factor, self.k)

    def forward(self, x: Tensor, noise: Tensor | None = None) -> MoEOutput:
        """`x` `(B, S, D)` or `(T, D)`; `noise` `(T, E)` standard normal (noisy training only)."""
        flat = _token_input(x, self.d_model, self.gate.weight.dtype)  # (T, D)
        dispatch = self.dispatch
        if self.experts.kind not in KERNELS:  # no hand-written kernels: autograd's layout
            dispatch = "padded"
        elif dispatch == "auto":
            rows = flat.shape[0] * self.k / self.n_experts  # mean rows per expert
            small = rows * self.d_model * self.experts.d_hidden <= AUTO_GROUPED_MACS
            dispatch = "grouped" if small else "blocked"
        if dispatch == "padded":
            return self._padded_forward(x, flat, self._logits(flat, noise))
        out = top_k_moe(flat, self.gate.weight, self.k, self._capacity(flat.shape[0]),
                        self.experts.kind, self.experts.params(),
                        blocked=dispatch == "blocked", extra=self._noise_term(flat, noise))
        return MoEOutput(out.y.reshape(x.shape), out.aux_loss, out.z_loss, out.logits,
                         TokenChoice(out.weights, out.indices, out.keep), out.counts)

    def _padded_forward(self, x: Tensor, flat: Tensor, logits: Tensor) -> MoEOutput:
        """GShard's layout, composed from the course's functions (autograd does the rest)."""
        t, e, k = flat.shape[0], self.n_experts, self.k
        weights, indices = top_k_gating(logits, k)  # (T, K), (T, K)
        capacity = self._capacity(t)
        plan = group_by_expert(indices, e, capacity)
        if capacity is not None:
            weights = torch.where(plan.keep, weights, torch.zeros_like(weights))  # (T, K)
        buffer = int(plan.counts.max())  # C: the busiest expert's kept load
        token = plan.tokens  # (M,) token of each kept assignment, grouped by expert
        weight = weights.reshape(-1)[plan.order]  # (M,) its gate weight
        slot = (indices * buffer + plan.positions).reshape(-1)[plan.order]  # (M,) e*C + pos
        row_token = token.new_zeros(e * buffer).index_copy_(0, slot, token)  # (E*C,)
        row_weight = weight.new_zeros(e * buffer).index_copy(0, slot, weight)  # (E*C,)
        xs = flat.index_select(0, row_token).reshape(e, buffer, -1)  # (E, C, D)
        rows = self.experts(xs).reshape(e * buffer, -1)  # (E*C, D)
        # Dropped assignments have no row, empty padded slots weight exactly 0: both add 0.
        y = _Combine.apply(rows, row_token, row_weight, t)  # (T, D)
        probs = torch.softmax(logits, dim=-1)  # (T, E)
        aux_loss = switch_loss_from_counts(probs, plan.routed, t * k).loss  # Switch eq. 4-6
        routing = TokenChoice(weights, indices, plan.keep)
        return MoEOutput(y.reshape(x.shape), aux_loss, router_z_loss(logits), logits, routing,
                         plan.counts.to(x.dtype))

    def loop_forward(self, x: Tensor, noise: Tensor | None = None) -> MoEOutput:
        """The oracle: the same layer computed as `MoEFeedForward` does, one expert at a time
        (`top_k_router` and `moe_from_routing` over `self.experts.expert_fns()`, functions
        sharing this layer's parameters, so gradients compare)."""
        flat = _token_input(x, self.d_model, self.gate.weight.dtype)  # (T, D)
        logits = self._logits(flat, noise)  # (T, E)
        routing = top_k_router(logits, self.k, self.capacity_factor).routing
        return moe_from_routing(x, flat, self.experts.expert_fns(), logits, routing)

    @classmethod
    def from_moe_feed_forward(cls, layer: MoEFeedForward, dispatch: str = "auto") -> TopKMoE:
        """A `TopKMoE` with copies of a top-k `MoEFeedForward`'s weights (GELU experts).

        >>> slow = MoEFeedForward(d_model=8, d_hidden=16, n_experts=4, k=2)
        >>> fast = TopKMoE.from_moe_feed_forward(slow)
        >>> x = torch.randn(10, 8)
        >>> torch.allclose(fast(x).y, slow(x).y, atol=1e-6)
        True
        """
        bank = _experts_of(layer, "top_k")
        fast = cls(bank.d_model, bank.d_hidden, layer.n_experts, layer.k, layer.capacity_factor,
                   "gelu", dispatch=dispatch)
        return _with_weights(fast, layer.gate, bank)

    def to_moe_feed_forward(self) -> MoEFeedForward:
        """An `MoEFeedForward` with copies of this layer's weights (GELU, not noisy)."""
        if self.experts.kind != "gelu" or self.noisy:
            raise ValueError("only a TopKMoE with expert='gelu' and noisy=False has an "
                             f"MoEFeedForward twin; got expert={self.experts.kind!r}, "
                             f"noisy={self.noisy}")
        slow = MoEFeedForward(self.d_model, self.experts.d_hidden, self.n_experts, self.k,
                              "top_k", self.capacity_factor)
        return _with_weights(slow, self.gate, self.experts.to_modules())


class ExpertChoiceMoE(nn.Module):
    """Expert-choice mixture (Zhou et al. 2022, arXiv 2202.09368) with stacked expert weights.

    Each expert takes its `C = expert_choice_capacity(T, E, capacity_factor)` best tokens
    (`expert_choice_routing`), so the dispatched buffer is exactly `(E, C, D)`: one gather,
    two batched matmuls in the `ExpertBank`, one `combine` (Zhou et al. eq. 2-3).
    Balanced by construction: `aux_loss` is 0 and every expert's load is `C`. Not causal:
    whether a token is chosen depends on every other token in the batch.
    `loop_forward` is the oracle built on `expert_choice.expert_choice_moe`.

    >>> layer = ExpertChoiceMoE(d_model=8, d_hidden=16, n_experts=4, capacity_factor=2.0)
    >>> out = layer(torch.randn(10, 8))
    >>> out.routing.token_idx.shape, out.expert_load.tolist()
    (torch.Size([4, 5]), [5.0, 5.0, 5.0, 5.0])
    """

    def __init__(self, d_model: int, d_hidden: int, n_experts: int,
                 capacity_factor: float = 2.0, expert: str = "gelu") -> None:
        super().__init__()
        self.d_model = positive_int("d_model", d_model)
        positive_int("d_hidden", d_hidden)
        self.n_experts = positive_int("n_experts", n_experts)
        self.capacity_factor = positive_float("capacity_factor", capacity_factor)
        self.gate = nn.Linear(d_model, n_experts, bias=False)  # W_g
        self.experts = ExpertBank(d_model, d_hidden, n_experts, expert)

    def _route(self, x: Tensor) -> tuple[Tensor, Tensor, ExpertChoice]:
        flat = _token_input(x, self.d_model, self.gate.weight.dtype)  # (T, D)
        logits = self.gate(flat)  # (T, E)
        capacity = expert_choice_capacity(flat.shape[0], self.n_experts, self.capacity_factor)
        return flat, logits, expert_choice_routing(logits, capacity)  # (E, C) each

    def _output(self, x: Tensor, y: Tensor, logits: Tensor, routing: ExpertChoice) -> MoEOutput:
        load = torch.full((self.n_experts,), routing.token_idx.shape[1], dtype=x.dtype,
                          device=x.device)  # (E,)
        return MoEOutput(y.reshape(x.shape), logits.new_zeros(()), router_z_loss(logits),
                         logits, routing, load)

    def forward(self, x: Tensor) -> MoEOutput:
        """`x` `(B, S, D)` or `(T, D)`."""
        flat, logits, routing = self._route(x)
        e, c = routing.token_idx.shape
        token = routing.token_idx.reshape(-1)  # (E*C,)
        xs = flat.index_select(0, token).reshape(e, c, -1)  # (E, C, D) X_in = P X, eq. 2
        rows = self.experts(xs).reshape(e * c, -1)  # (E*C, D)
        y = _Combine.apply(rows, token, routing.gates.reshape(-1), flat.shape[0])  # (T, D) eq. 3
        return self._output(x, y, logits, routing)

    def loop_forward(self, x: Tensor) -> MoEOutput:
        """The oracle: `expert_choice_moe` over `self.experts.expert_fns()`, expert by expert."""
        flat, logits, routing = self._route(x)
        return moe_from_routing(x, flat, self.experts.expert_fns(), logits, routing)

    @classmethod
    def from_moe_feed_forward(cls, layer: MoEFeedForward) -> ExpertChoiceMoE:
        """An `ExpertChoiceMoE` with copies of an expert-choice `MoEFeedForward`'s weights."""
        bank = _experts_of(layer, "expert_choice")
        factor = layer.capacity_factor if layer.capacity_factor is not None else float(layer.k)
        return _with_weights(cls(bank.d_model, bank.d_hidden, layer.n_experts, factor, "gelu"),
                             layer.gate, bank)


class DenseFFN(nn.Module):
    """One feed-forward network of the given expert kind, `(..., D) -> (..., D)`.

    With `d_hidden = K * H` it has the active FLOPs of a top-k mixture of `E` experts of
    width `H` (`moe_flops` without the router): the practical lower bound on a mixture's
    time, used by `benchmarks/bench_layers.py`.

    >>> DenseFFN(d_model=8, d_hidden=32, expert="swiglu")(torch.randn(2, 5, 8)).shape
    torch.Size([2, 5, 8])
    """

    def __init__(self, d_model: int, d_hidden: int, expert: str = "gelu") -> None:
        super().__init__()
        module = expert_kind(expert).module
        self.d_model = positive_int("d_model", d_model)
        self.ffn = module(d_model, d_hidden)

    def forward(self, x: Tensor) -> Tensor:
        float_tensor("x", x, shape_hint="(..., D)")
        if x.dim() == 0 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must be (..., D) with D = {self.d_model}; got shape "
                             f"{tuple(x.shape)}")
        return self.ffn(x)
