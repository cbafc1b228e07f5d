"""Auxiliary losses that keep a learned router healthy.

- `cv_squared`, `importance_loss`, `load_loss`: Shazeer et al. 2017 (arXiv 1701.06538),
  Sec. 4 and Appendix A: penalise the squared coefficient of variation of per-expert
  importance (sum of gates) and of a smooth estimate of per-expert load.
- `switch_aux_loss`: Fedus et al. 2021 (arXiv 2101.03961) eq. 4-6, `E * sum_e f_e P_e`.
- `router_z_loss`: Zoph et al. 2022, ST-MoE (arXiv 2202.08906) eq. 5.
- `moe_lm_loss`: a language model's cross-entropy plus both, summed over MoE layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .validation import float_tensor, index_tensor, positive_int, same_shape

EPS = 1e-10


def cv_squared(v: Tensor) -> Tensor:
    """Squared coefficient of variation, population variance over `mean**2 + 1e-10`.

    0 for a single element (there is nothing to vary). Scale-invariant, so it measures
    imbalance and not magnitude (Shazeer et al. Sec. 4).

    >>> cv_squared(torch.tensor([1.0, 1.0, 1.0]))
    tensor(0.)
    >>> cv_squared(torch.tensor([2.0, 0.0]))
    tensor(1.)
    """
    float_tensor("v", v, ndim=1, shape_hint="(E,)")
    if v.numel() == 0:
        raise ValueError("v must have at least one element (E,); got shape (0,)")
    if v.numel() == 1:
        return v.new_zeros(())
    return v.var(correction=0) / (v.mean() ** 2 + EPS)


def importance_loss(gates: Tensor, w_importance: float = 0.01) -> Tensor:
    """`w_importance * cv_squared(gates.sum(0))` (Shazeer et al. eq. 6-7).

    `gates` is the `(T, E)` gate matrix with zeros off the top-k; `Importance(X)` is its
    column sum, the total gate weight each expert received in the batch.

    >>> importance_loss(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), w_importance=1.0)
    tensor(1.)
    """
    float_tensor("gates", gates, ndim=2, shape_hint="(T, E)")
    return w_importance * cv_squared(gates.sum(0))  # eq. 6-7


def _kth_excluding(noisy: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """For every expert i, the k-th largest noisy logit among the others, both cases.

    If i is among the top k, excluding it makes the (k+1)-th largest overall the k-th;
    otherwise the k-th largest overall. With k = E there is no (k+1)-th: -inf.
    """
    top = noisy.topk(min(k + 1, noisy.shape[1]), dim=-1).values  # (T, k+1) or (T, E)
    kth = top[:, k - 1 : k]  # (T, 1)
    if k < noisy.shape[1]:
        next_ = top[:, k : k + 1]  # (T, 1)
    else:
        next_ = torch.full_like(kth, float("-inf"))
    return kth, next_


def load_loss(clean_logits: Tensor, noisy_logits: Tensor, noise_std: Tensor, k: int,
              w_load: float = 0.01) -> Tensor:
    """Shazeer et al.'s smooth load loss (Appendix A, eq. 8-11).

    `P(x, i) = Phi((clean_i - kth_excluding(noisy, k, i)) / noise_std_i)` is the probability
    that expert `i` would still be in the top k if only its own noise were re-drawn;
    `Load(X) = sum_x P(x, .)` is differentiable, and the loss is
    `w_load * cv_squared(Load(X))`. `noise_std` is `softplus(x @ w_noise)`, `(T, E)`.

    >>> c = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    >>> load_loss(c, c, torch.ones(2, 2), k=1, w_load=1.0)
    tensor(0.)
    """
    float_tensor("clean_logits", clean_logits, ndim=2, shape_hint="(T, E)")
    float_tensor("noisy_logits", noisy_logits, ndim=2, shape_hint="(T, E)")
    float_tensor("noise_std", noise_std, ndim=2, shape_hint="(T, E)")
    same_shape("clean_logits", clean_logits, "noisy_logits", noisy_logits)
    same_shape("clean_logits", clean_logits, "noise_std", noise_std)
    k = positive_int("k", k, maximum=clean_logits.shape[1])
    kth, next_ = _kth_excluding(noisy_logits, k)  # (T, 1), (T, 1)
    in_top_k = noisy_logits > next_  # (T, E): i beats the (k+1)-th, so it is in the top k
    threshold = torch.where(in_top_k, next_, kth)  # (T, E) kth_excluding(H(x), k, i), eq. 9
    # With k = E there is no k-th other logit: P = 1. Keep -inf out of the division, whose
    # gradient would be 0 * inf = NaN for noise_std.
    finite = torch.isfinite(threshold)  # (T, E)
    safe = torch.where(finite, threshold, clean_logits.detach())  # (T, E)
    normal = torch.distributions.Normal(0.0, 1.0)
    cdf = normal.cdf((clean_logits - safe) / noise_std)  # (T, E) P(x, i), eq. 9
    prob = torch.where(finite, cdf, torch.ones_like(cdf))  # (T, E)
    return w_load * cv_squared(prob.sum(0))  # eq. 10-11


def switch_aux_loss(router_probs: Tensor, indices: Tensor) -> Tensor:
    """Switch Transformer load-balancing loss `E * sum_e f_e * P_e` (Fedus et al. eq. 4-6).

    `f_e` is the share of the `T*K` assignments sent to expert `e` (not differentiable),
    `P_e` the mean router probability of `e` (differentiable). It is 1 for a uniform router
    and `E` when one expert takes everything. Hugging Face's Mixtral multiplies `f` by `K`
    (it divides counts by `T` rather than `T*K`), which makes the uniform value `K`.

    >>> probs = torch.full((4, 2), 0.5)
    >>> switch_aux_loss(probs, torch.tensor([[0], [1], [0], [1]]))
    tensor(1.)
    """
    float_tensor("router_probs", router_probs, ndim=2, shape_hint="(T, E)")
    t, e = router_probs.shape
    index_tensor("indices", indices, ndim=2, shape_hint="(T, K)", upper=e)
    if indices.shape[0] != t:
        raise ValueError(f"indices must be (T, K) with T = router_probs.shape[0] = {t}; got "
                         f"shape {tuple(indices.shape)}")
    if indices.numel() == 0:
        raise ValueError(f"indices must hold at least one assignment, (T, K) with T, K >= 1; "
                         f"got shape {tuple(indices.shape)}")
    counts = torch.bincount(indices.reshape(-1).long(), minlength=e)  # (E,)
    return switch_loss_from_counts(router_probs, counts, indices.numel()).loss


class SwitchLoss(NamedTuple):
    """Output of `switch_loss_from_counts`."""

    loss: Tensor  # () E * sum_e f_e * P_e, Switch eq. 4
    f: Tensor  # (E,) share of the assignments routed to each expert, eq. 5 (no gradient)


def switch_loss_from_counts(router_probs: Tensor, counts: Tensor,
                            n_assignments: int) -> SwitchLoss:
    """The Switch loss from per-expert assignment counts `(E,)`: eq. 4-6 in three lines.

    The core of `switch_aux_loss`, shared with the fast layers (`moe_course.fused`, which
    keeps `f` for its hand-written backward, and `TopKMoE`'s padded layout), which count
    the assignments while sorting them. Inputs are assumed checked by the caller.

    >>> switch_loss_from_counts(torch.full((4, 2), 0.5), torch.tensor([3, 1]), 4).loss
    tensor(1.)
    """
    f = counts.to(router_probs.dtype) / n_assignments  # (E,) eq. 5, share of T*K
    p = router_probs.mean(0)  # (E,) eq. 6
    return SwitchLoss(router_probs.shape[1] * torch.dot(f, p), f)  # eq. 4 with alpha = 1


def router_z_loss(logits: Tensor) -> Tensor:
    """ST-MoE router z-loss, `mean_t logsumexp(logits_t)**2` (Zoph et al. eq. 5).

    Penalises large router logits, which keeps the softmax out of its saturated, roundoff-
    prone regime without changing which expert wins.

    >>> router_z_loss(torch.zeros(3, 4)) == torch.log(torch.tensor(4.0)) ** 2
    tensor(True)
    """
    float_tensor("logits", logits, ndim=2, shape_hint="(T, E)")
    return torch.logsumexp(logits, dim=-1).pow(2).mean()


class LayerLosses(NamedTuple):
    """One MoE layer's losses, as `moe_lm_loss` receives them (`for a, z in aux_losses`)."""

    aux_loss: Tensor  # scalar load-balancing loss of the layer
    z_loss: Tensor  # scalar router z-loss of the layer


def _aux_and_z(item: Any, i: int) -> tuple[Tensor, Tensor]:
    if hasattr(item, "aux_loss") and hasattr(item, "z_loss"):
        return item.aux_loss, item.z_loss
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return item[0], item[1]
    raise ValueError(f"aux_losses[{i}] must be a layer output with aux_loss and z_loss "
                     f"attributes or an (aux_loss, z_loss) pair; got {type(item).__name__}")


def moe_lm_loss(logits: Tensor, targets: Tensor, aux_losses: Sequence[Any],
                aux_weight: float = 0.01, z_weight: float = 0.001) -> Tensor:
    """`cross_entropy + aux_weight * sum(aux) + z_weight * sum(z)` over the MoE layers.

    `logits` is `(B, S, V)` (or `(T, V)`), `targets` the matching integer ids. `aux_losses`
    has one entry per MoE layer: the layer's output (anything with `aux_loss` and `z_loss`
    attributes, e.g. `MoEOutput`) or an `(aux_loss, z_loss)` pair. Switch Transformer uses
    `aux_weight = 0.01` (Sec. 2.2), ST-MoE `z_weight = 0.001` (Sec. 3.1).

    >>> logits = torch.zeros(1, 2, 4)
    >>> targets = torch.tensor([[0, 3]])
    >>> moe_lm_loss(logits, targets, [(torch.tensor(1.0), torch.tensor(2.0))])
    tensor(1.3983)
    """
    float_tensor("logits", logits, shape_hint="(B, S, V)")
    index_tensor("targets", targets, shape_hint="(B, S)", upper=logits.shape[-1])
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"targets must have shape logits.shape[:-1] = "
                         f"{tuple(logits.shape[:-1])}; got {tuple(targets.shape)}")
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1).long())
    pairs = [_aux_and_z(item, i) for i, item in enumerate(aux_losses)]
    aux = sum((a for a, _ in pairs), logits.new_zeros(()))
    z = sum((z for _, z in pairs), logits.new_zeros(()))
    return ce + aux_weight * aux + z_weight * z
