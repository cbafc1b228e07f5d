"""Dispatch and combine: running experts on tokens and mixing their outputs.

- `dense_moe`: every expert on every token, mixed by the softmax gate (Jacobs et al. 1991;
  Shazeer et al. 2017, arXiv 1701.06538, eq. 1 with a dense `G`).
- `sparse_moe`: Shazeer et al. eq. 1 with a sparse `G`: each expert runs once, on exactly
  the rows routed to it, and not at all when none are. This is the readable loop over
  experts that every vectorised dispatch in `moe_course.layers` is tested against.
- `moe_flops`: the cost model that motivates sparsity.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from .gating import softmax_gate
from .validation import experts_list, float_tensor, index_tensor, positive_int, same_shape

ExpertFn = Callable[[Tensor], Tensor]


class DenseMoE(NamedTuple):
    """Output of `dense_moe`."""

    y: Tensor  # (T, D) mixture output
    gates: Tensor  # (T, E) softmax gate


def dense_moe(x: Tensor, experts: Sequence[ExpertFn], w_gate: Tensor) -> DenseMoE:
    """`y = sum_e gates[:, e] * experts[e](x)` with `gates = softmax(x @ w_gate)`.

    Shazeer et al. 2017 eq. 1 with the dense gate of eq. 2 (no KeepTopK); every expert
    computes every token, so the cost grows linearly with `E`.

    >>> experts = [lambda x: x, lambda x: -x]
    >>> y, gates = dense_moe(torch.ones(2, 3), experts, torch.zeros(3, 2))
    >>> y
    tensor([[0., 0., 0.],
            [0., 0., 0.]])
    """
    n_experts = experts_list("experts", experts)
    gates = softmax_gate(x, w_gate)  # (T, E)
    if gates.shape[1] != n_experts:
        raise ValueError(f"w_gate must be (D, E) with E = len(experts) = {n_experts}; got shape "
                         f"{tuple(w_gate.shape)}")
    outs = torch.stack([expert(x) for expert in experts], dim=1)  # (T, E, D)
    y = torch.einsum("te,ted->td", gates, outs)  # (T, D), eq. 1
    return DenseMoE(y, gates)


def sparse_moe(x: Tensor, experts: Sequence[ExpertFn], weights: Tensor,
               indices: Tensor) -> Tensor:
    """`y[t] = sum_j weights[t, j] * experts[indices[t, j]](x[t])` (Shazeer et al. eq. 1).

    Each expert is called at most once, on exactly the rows routed to it (a token routed to
    the same expert twice appears twice in that batch), and skipped when it has none.
    `weights` and `indices` are `(T, K)`, e.g. from `top_k_gating`.

    >>> experts = [lambda x: x, lambda x: 10 * x]
    >>> x = torch.tensor([[1.0], [2.0]])
    >>> sparse_moe(x, experts, torch.tensor([[1.0], [0.5]]), torch.tensor([[1], [0]]))
    tensor([[10.],
            [ 1.]])
    """
    n_experts = experts_list("experts", experts)
    float_tensor("x", x, ndim=2, shape_hint="(T, D)")
    float_tensor("weights", weights, ndim=2, shape_hint="(T, K)")
    index_tensor("indices", indices, ndim=2, shape_hint="(T, K)", upper=n_experts)
    same_shape("weights", weights, "indices", indices)
    if weights.shape[0] != x.shape[0]:
        raise ValueError(f"weights must be (T, K) with T = x.shape[0] = {x.shape[0]}; got shape "
                         f"{tuple(weights.shape)}")
    y = x.new_zeros(x.shape)  # (T, D)
    for e, expert in enumerate(experts):
        token, slot = torch.nonzero(indices == e, as_tuple=True)  # (n_e,), (n_e,)
        if token.numel() == 0:
            continue
        out = expert(x[token])  # (n_e, D)
        y = y.index_add(0, token, (weights[token, slot, None] * out).to(y.dtype))  # (T, D)
    return y


def moe_flops(n_tokens: int, d_model: int, d_hidden: int, n_experts: int, k: int) -> int:
    """Forward FLOPs of a top-k MoE layer: router `2*T*D*E` plus experts `2 * T*K * 2*D*H`.

    A multiply-add counts as 2 FLOPs; each expert is two `D x H` matmuls; biases,
    activations and the softmax are ignored. At fixed `K` the expert term does not grow
    with `E`: parameters grow, compute per token does not (Shazeer et al. 2017, Sec. 1.2).

    >>> moe_flops(n_tokens=10, d_model=4, d_hidden=8, n_experts=16, k=2)
    3840
    """
    t = positive_int("n_tokens", n_tokens)
    d = positive_int("d_model", d_model)
    h = positive_int("d_hidden", d_hidden)
    e = positive_int("n_experts", n_experts)
    k = positive_int("k", k, maximum=e)
    return 2 * t * d * e + 2 * t * k * 2 * d * h
