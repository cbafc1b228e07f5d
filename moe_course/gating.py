"""Gating: turning router logits `(T, E)` into weights over experts.

- `softmax_gate`: the dense gate of the original mixture of experts (Jacobs et al. 1991),
  `G(x) = softmax(x W_g)`, eq. 2 of Shazeer et al. 2017 (arXiv 1701.06538) before any
  sparsity.
- `top_k_gating`: Shazeer et al.'s `softmax(KeepTopK(H(x), k))` (eq. 3 and 5), returned as the
  `K` kept weights and their expert indices rather than as a mostly-zero `(T, E)` matrix.
- `noisy_logits`: the noisy router logits `H(x)` of Shazeer et al. eq. 4.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .validation import float_tensor, positive_int, routable_logits, same_dtype, same_shape


class TopK(NamedTuple):
    """The result of top-k gating; both fields `(T, K)`, best expert first."""

    weights: Tensor  # (T, K) float, each row sums to 1
    indices: Tensor  # (T, K) int64 expert ids, descending by logit


def _router_weights(x: Tensor, w_gate: Tensor, name: str = "w_gate") -> None:
    float_tensor("x", x, ndim=2, shape_hint="(T, D)")
    float_tensor(name, w_gate, ndim=2, shape_hint="(D, E)")
    if w_gate.shape[0] != x.shape[1]:
        raise ValueError(f"{name} must be (D, E) with D = x.shape[1] = {x.shape[1]}; got shape "
                         f"{tuple(w_gate.shape)}")
    same_dtype("x", x, name, w_gate)


def softmax_gate(x: Tensor, w_gate: Tensor) -> Tensor:
    """Dense gate `softmax(x @ w_gate)` over experts: `(T, D), (D, E) -> (T, E)`.

    Every row is a probability distribution over the `E` experts.

    >>> g = softmax_gate(torch.ones(2, 3), torch.zeros(3, 4))
    >>> g
    tensor([[0.2500, 0.2500, 0.2500, 0.2500],
            [0.2500, 0.2500, 0.2500, 0.2500]])
    """
    _router_weights(x, w_gate)
    return torch.softmax(x @ w_gate, dim=-1)  # (T, E)


def top_k_gating(logits: Tensor, k: int) -> TopK:
    """Keep the `k` largest logits per token and softmax over them (Shazeer et al. eq. 3, 5).

    Returns `(weights, indices)`, both `(T, K)`, in descending order of logit. The softmax
    over the kept logits equals the full softmax renormalised over the kept experts, because
    the normaliser `sum_j exp(l_j)` cancels.

    NaN and `+inf` logits are refused with a ValueError (their softmax is NaN); `-inf` masks
    an expert off for that token, and a row needs at least one finite logit. `k` may be any
    integer scalar (`2`, `np.int64(2)`, `torch.tensor(2)`).

    >>> w, i = top_k_gating(torch.tensor([[1.0, 3.0, 2.0, 0.0]]), k=2)
    >>> i
    tensor([[1, 2]])
    >>> w
    tensor([[0.7311, 0.2689]])
    """
    float_tensor("logits", logits, ndim=2, shape_hint="(T, E)")
    k = positive_int("k", k, maximum=logits.shape[1])
    routable_logits("logits", logits)
    top_logits, indices = logits.topk(k, dim=-1, sorted=True)  # (T, K), (T, K)
    weights = torch.softmax(top_logits, dim=-1)  # (T, K): softmax(KeepTopK(H, k)), eq. 3
    return TopK(weights, indices)


def noisy_logits(x: Tensor, w_gate: Tensor, w_noise: Tensor,
                 noise: Tensor | None = None) -> Tensor:
    """Shazeer et al. eq. 4: `H(x) = x W_g + noise * softplus(x W_noise)`, `(T, E)`.

    `noise` is a `(T, E)` standard-normal sample drawn by the caller (so the function stays
    pure and reproducible); `None` means evaluation, where the clean logits are returned.

    >>> x, wg, wn = torch.ones(1, 2), torch.zeros(2, 3), torch.zeros(2, 3)
    >>> noisy_logits(x, wg, wn)
    tensor([[0., 0., 0.]])
    >>> noisy_logits(x, wg, wn, noise=torch.ones(1, 3))  # softplus(0) = log 2
    tensor([[0.6931, 0.6931, 0.6931]])
    """
    _router_weights(x, w_gate)
    _router_weights(x, w_noise, name="w_noise")
    same_shape("w_gate", w_gate, "w_noise", w_noise)
    clean = x @ w_gate  # (T, E)
    if noise is None:
        return clean
    float_tensor("noise", noise, ndim=2, shape_hint="(T, E)")
    same_shape("noise", noise, "x @ w_gate", clean)
    if noise.dtype != clean.dtype:
        raise ValueError(f"noise must have the dtype of x @ w_gate, {clean.dtype}; got "
                         f"{noise.dtype}")
    return clean + noise * F.softplus(x @ w_noise)  # (T, E), eq. 4
