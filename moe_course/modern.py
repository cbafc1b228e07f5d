"""Modern mixtures: shared and fine-grained experts, loss-free balancing, Soft MoE, grouping.

What current MoE models do beyond Switch, as small pure functions:

- `shared_expert_moe`: DeepSeekMoE (Dai et al. 2024, arXiv 2401.06066, Sec. 3, eq. 9-11):
  a few *shared* experts run on every token, plus many fine-grained *routed* experts of
  which each token takes its top `K` by softmax affinity.
- `biased_top_k` and `aux_free_bias_update`: DeepSeek-V3's auxiliary-loss-free balancing
  (arXiv 2412.19437, Sec. 2.1.2, eq. 13-16; Wang et al. 2024, arXiv 2408.15664,
  Algorithm 1): a per-expert bias added to the scores *chooses* the experts, the unbiased
  scores *weight* them, and after each step the bias of an overloaded expert goes down by
  `gamma` and that of an underloaded one up by `gamma`. No loss term, no gradient.
- `soft_moe`: Soft MoE (Puigcerver et al. 2023, arXiv 2308.00951, Sec. 2.1, eq. 1-2):
  every expert processes `C` *slots*, each a softmax-weighted average of all tokens, and
  every token reads back a softmax-weighted average of all slot outputs. Nothing is
  discrete, nothing is dropped; but a slot mixes every token of the sequence, so it does
  not fit causal decoding.
- `sort_by_expert`: the one stable sort that groups the `T*K` assignments by expert, with
  each expert's row count: the layout of grouped, dropless computation (MegaBlocks, Gale
  et al. 2022, arXiv 2211.15841), where each expert runs one matmul on a contiguous block
  of rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from .gating import TopK
from .routing import ExpertFn, sparse_moe
from .validation import experts_list, float_tensor, index_tensor, positive_int


class SharedMoEOutput(NamedTuple):
    """Output of `shared_expert_moe`."""

    y: Tensor  # (T, D) shared experts' outputs plus the gated routed experts' outputs
    weights: Tensor  # (T, K) softmax affinities of the chosen routed experts, not renormalised
    indices: Tensor  # (T, K) chosen routed experts, best first


class SoftMoEOutput(NamedTuple):
    """Output of `soft_moe`; slot `i` belongs to expert `i // C`."""

    y: Tensor  # (T, D) output tokens
    dispatch: Tensor  # (T, E*C) softmax over tokens: each column (slot) sums to 1
    combine: Tensor  # (T, E*C) softmax over slots: each row (token) sums to 1


class ExpertOrder(NamedTuple):
    """Output of `sort_by_expert`."""

    order: Tensor  # (T*K,) flat assignment ids t*K + j, grouped by expert, stable within one
    counts: Tensor  # (E,) int64 assignments per expert, 0 for an expert nobody chose


def shared_expert_moe(x: Tensor, shared_experts: Sequence[ExpertFn],
                      routed_experts: Sequence[ExpertFn], w_gate: Tensor,
                      k: int) -> SharedMoEOutput:
    """DeepSeekMoE: shared experts on every token plus the top-`k` routed experts.

    Dai et al. 2024 (arXiv 2401.06066), Sec. 3.2, eq. 9-11, without the residual `u_t`
    (which the transformer block adds):

        s = softmax(x @ w_gate)                      over the E routed experts  (eq. 11)
        g = s on each token's top-k of s, else 0     not renormalised           (eq. 10)
        y = sum_i shared_i(x) + sum_e g[:, e] * routed_e(x)                     (eq. 9)

    The shared experts hold what every token needs, so the many small routed experts
    (fine-grained segmentation, Sec. 3.1) can specialise. Routed experts run sparsely, each
    once on the rows that chose it (`routing.sparse_moe`). `shared_experts` may be empty.
    `w_gate` is `(D, E)` with `E = len(routed_experts)`.

    >>> shared = [lambda x: 100 * x]
    >>> routed = [lambda x: x, lambda x: -x]
    >>> w_gate = torch.tensor([[1.0, 0.0], [0.0, 0.0]])  # (D, E): expert 0 preferred
    >>> out = shared_expert_moe(torch.ones(1, 2), shared, routed, w_gate, k=1)
    >>> out.y, out.weights, out.indices
    (tensor([[100.7311, 100.7311]]), tensor([[0.7311]]), tensor([[0]]))
    """
    n_routed = experts_list("routed_experts", routed_experts)
    experts_list("shared_experts", shared_experts, allow_empty=True)
    float_tensor("x", x, ndim=2, shape_hint="(T, D)")
    float_tensor("w_gate", w_gate, ndim=2, shape_hint="(D, E)")
    if w_gate.shape != (x.shape[1], n_routed):
        raise ValueError(f"w_gate must be (D, E) = ({x.shape[1]}, {n_routed}) with E = "
                         f"len(routed_experts); got shape {tuple(w_gate.shape)}")
    k = positive_int("k", k, maximum=n_routed)
    scores = torch.softmax(x @ w_gate, dim=-1)  # (T, E) eq. 11
    weights, indices = scores.topk(k, dim=-1)  # (T, K), (T, K) eq. 10, kept as they are
    y = sparse_moe(x, routed_experts, weights, indices)  # (T, D) routed part of eq. 9
    for expert in shared_experts:
        y = y + expert(x)  # (T, D) shared part of eq. 9, every token, weight 1
    return SharedMoEOutput(y, weights, indices)


def biased_top_k(scores: Tensor, bias: Tensor, k: int) -> TopK:
    """DeepSeek-V3 routing: the biased scores choose, the unbiased scores weight.

    arXiv 2412.19437, Sec. 2.1.2: expert `e` is among token `t`'s `k` choices when
    `scores[t, e] + bias[e]` is among its `k` largest (eq. 16); the weights are the
    *unbiased* scores of the chosen experts normalised to sum to 1 (eq. 13). `scores` are
    non-negative affinities `(T, E)`, e.g. `sigmoid(x @ w_gate)` (eq. 15); `bias` is `(E,)`.
    Returns `TopK(weights, indices)`, both `(T, K)`, best biased score first.

    >>> scores = torch.tensor([[0.9, 0.6, 0.3]])
    >>> biased_top_k(scores, torch.zeros(3), k=2)
    TopK(weights=tensor([[0.6000, 0.4000]]), indices=tensor([[0, 1]]))
    >>> biased_top_k(scores, torch.tensor([-1.0, 0.0, 0.0]), k=2)  # expert 0 held back
    TopK(weights=tensor([[0.6667, 0.3333]]), indices=tensor([[1, 2]]))
    """
    float_tensor("scores", scores, ndim=2, shape_hint="(T, E)")
    float_tensor("bias", bias, ndim=1, shape_hint="(E,)")
    if bias.shape[0] != scores.shape[1]:
        raise ValueError(f"bias must be (E,) with E = scores.shape[1] = {scores.shape[1]}; got "
                         f"shape {tuple(bias.shape)}")
    if scores.numel() and bool((scores < 0).any()):
        raise ValueError(f"scores must be non-negative affinities (e.g. sigmoid(x @ w_gate)); "
                         f"got a minimum of {float(scores.min()):.4g}")
    k = positive_int("k", k, maximum=scores.shape[1])
    indices = (scores + bias.detach()).topk(k, dim=-1).indices  # (T, K) eq. 16: bias chooses
    chosen = scores.gather(1, indices)  # (T, K) the unbiased scores s_{i,t}
    total = chosen.sum(dim=-1, keepdim=True)  # (T, 1)
    if bool((total <= 0).any()):
        raise ValueError("every token needs a positive total score over its chosen experts to "
                         "normalise the weights (eq. 13); some token's chosen scores are all 0")
    return TopK(chosen / total, indices)  # (T, K) eq. 13: scores weight


def aux_free_bias_update(bias: Tensor, expert_counts: Tensor, gamma: float) -> Tensor:
    """One step of auxiliary-loss-free balancing: `bias + gamma * sign(mean(counts) - counts)`.

    DeepSeek-V3 (arXiv 2412.19437, Sec. 2.1.2): "at the end of each step, we will decrease
    the bias term by gamma if its corresponding expert is overloaded, and increase it by
    gamma if its corresponding expert is underloaded"; Wang et al. 2024 (arXiv 2408.15664,
    Algorithm 1) write it with the load error `mean(c) - c_i`. An expert exactly at the mean
    keeps its bias. `bias` is `(E,)` float, `expert_counts` `(E,)` assignments per expert in
    the step (ints or floats, non-negative), `gamma >= 0` the update speed (V3: 0.001, then 0).
    Returns a new `(E,)` tensor; the argument is not modified.

    >>> aux_free_bias_update(torch.zeros(4), torch.tensor([6, 2, 4, 4]), gamma=0.5)
    tensor([-0.5000,  0.5000,  0.0000,  0.0000])
    """
    float_tensor("bias", bias, ndim=1, shape_hint="(E,)")
    if (not isinstance(expert_counts, Tensor) or expert_counts.dim() != 1
            or expert_counts.is_complex() or expert_counts.dtype == torch.bool):
        raise ValueError("expert_counts must be a real (E,) tensor of assignments per expert; "
                         f"got {expert_counts!r:.80}")
    if expert_counts.shape != bias.shape:
        raise ValueError(f"expert_counts must be (E,) with E = bias.shape[0] = {bias.shape[0]}; "
                         f"got shape {tuple(expert_counts.shape)}")
    if bias.numel() == 0:
        raise ValueError("bias must hold at least one expert; got shape (0,)")
    counts = expert_counts.detach().to(torch.float64)  # (E,) exact mean for integer counts
    if not bool(torch.isfinite(counts).all()) or bool((counts < 0).any()):
        raise ValueError(f"expert_counts must be finite and non-negative; got {counts.tolist()}")
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not (
            0 <= gamma < float("inf")):
        raise ValueError(f"gamma must be a finite number >= 0 (the bias update speed); got "
                         f"{gamma!r}")
    error = counts.mean() - counts  # (E,) > 0 underloaded, < 0 overloaded
    return bias + gamma * torch.sign(error).to(bias.dtype)  # (E,)


def soft_moe(x: Tensor, experts: Sequence[ExpertFn], phi: Tensor,
             slots_per_expert: int) -> SoftMoEOutput:
    """Soft MoE on one sequence (Puigcerver et al. 2023, arXiv 2308.00951, Sec. 2.1).

    With `logits = x @ phi`, `(T, E*C)`, one column per slot (`C = slots_per_expert`):

        dispatch = softmax(logits) over tokens (dim 0)     each slot sums to 1   (eq. 1)
        slots    = dispatch.T @ x                          (E*C, D)              (eq. 1)
        outs[i]  = experts[i // C](slots[i])               each expert once on its C slots
        combine  = softmax(logits) over slots (dim 1)      each token sums to 1  (eq. 2)
        y        = combine @ outs                          (T, D)                (eq. 2)

    Every slot mixes every token, so token `t`'s output depends on later tokens too: Soft
    MoE suits encoders (the paper's ViTs), not causal decoding (the paper's "Limitations").

    >>> out = soft_moe(torch.eye(2), [lambda s: 2 * s], torch.zeros(2, 1), slots_per_expert=1)
    >>> out.y, out.dispatch.sum(0), out.combine.sum(1)
    (tensor([[1., 1.],
            [1., 1.]]), tensor([1.]), tensor([1., 1.]))
    """
    n_experts = experts_list("experts", experts)
    c = positive_int("slots_per_expert", slots_per_expert)
    float_tensor("x", x, ndim=2, shape_hint="(T, D)")
    float_tensor("phi", phi, ndim=2, shape_hint="(D, E*C)")
    if phi.shape != (x.shape[1], n_experts * c):
        raise ValueError(f"phi must be (D, E*C) = ({x.shape[1]}, {n_experts * c}) with E = "
                         f"{n_experts} experts and C = {c} slots each; got shape "
                         f"{tuple(phi.shape)}")
    if x.shape[0] == 0:
        raise ValueError("x must hold at least one token: each slot is a softmax over tokens; "
                         "got shape (0, D)")
    logits = x @ phi  # (T, E*C)
    dispatch = torch.softmax(logits, dim=0)  # (T, E*C) eq. 1, over tokens
    combine = torch.softmax(logits, dim=1)  # (T, E*C) eq. 2, over slots
    slots = dispatch.t() @ x  # (E*C, D) eq. 1, X~ = D^T X
    outs = torch.cat([expert(slots[e * c : (e + 1) * c])  # (C, D) expert e's slots
                      for e, expert in enumerate(experts)])  # (E*C, D)
    return SoftMoEOutput(combine @ outs, dispatch, combine)  # (T, D) eq. 2, Y = C Y~


def sort_by_expert(indices: Tensor, n_experts: int) -> ExpertOrder:
    """The permutation that groups the `T*K` assignments by expert, and each expert's count.

    Assignment `(t, j)` has flat id `t*K + j` (`indices.reshape(-1)`). `order` lists the flat
    ids sorted by expert with a *stable* sort, so within one expert they stay in token
    order; `counts[e]` is expert `e`'s number of assignments (0 for an idle expert), so
    expert `e`'s rows are `order[offsets[e] : offsets[e] + counts[e]]` with `offsets =
    counts.cumsum(0) - counts`. Gathering `x[order // K]` lays the rows out expert by expert:
    the input of grouped, dropless computation (MegaBlocks, arXiv 2211.15841), one
    matmul per expert on a contiguous block (`experts.grouped_linear`).

    >>> sort_by_expert(torch.tensor([[2, 0], [0, 2], [2, 0]]), n_experts=4)
    ExpertOrder(order=tensor([1, 2, 5, 0, 3, 4]), counts=tensor([3, 0, 3, 0]))
    """
    e = positive_int("n_experts", n_experts)
    index_tensor("indices", indices, ndim=2, shape_hint="(T, K)", upper=e)
    flat = indices.reshape(-1).long()  # (T*K,) token-major: id t*K + j
    order = torch.sort(flat, stable=True).indices  # (T*K,) grouped by expert, stable
    counts = torch.bincount(flat, minlength=e)  # (E,) empty experts counted as 0
    return ExpertOrder(order, counts)
