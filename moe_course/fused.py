"""The fast path of `TopKMoE`: router, experts, combine and both router losses as one node.

`layers.TopKMoE(dispatch="padded")` composes the course's functions (`top_k_gating`,
`capacity.group_by_expert`, the `ExpertBank`, `combine`, the Switch and z losses), and autograd
differentiates them op by op. Correct, but every op is a node with saved tensors and, in
the backward, passes over memory that a hand-written backward does not need: gradient
buffers filled with zeros, one more add to join SwiGLU's two branches, another to join the
router's share of `dL/dx` to the experts'. On a CPU such passes, not the matmuls, are what
separates a mixture from the dense layer of equal FLOPs (`benchmarks/README.md`).

`top_k_moe` computes the same layer (same routing, same numbers up to float rounding) as
one `torch.autograd.Function` with its backward written out, the way fused MoE kernels do
(MegaBlocks, Gale et al. 2022, arXiv 2211.15841; ScatterMoE, Tan et al. 2024, arXiv
2403.08245): sort the `T*K` assignments by expert once (stable, so GShard's priority and
capacity hold), then run the experts on their rows in one of two layouts:

- blocked: expert by expert, gather its rows, its matmuls, its activation, its weighted
  `index_add_` into `y`, so one expert's rows stay in cache from gather to scatter and no
  buffer larger than one expert's block is allocated;
- grouped: each step on all sorted rows at once (one gather, grouped matmuls, one
  activation, one `index_add_`): fewer, larger operations, better for small experts.

The backward retraces the forward with the derivatives written out:

    y_t = sum_j w_tj o_tj,   o = f_e(x_t)                        (Shazeer et al. eq. 1)
    dL/dw_tj = <dL/dy_t, o_tj>,  dL/do_tj = w_tj dL/dy_t
    w_t = softmax(top-k logits of token t)                         (eq. 3, 5)
    dL/dl_tj = w_tj (dL/dw_tj - sum_i w_ti dL/dw_ti)              (softmax backward)
    aux = E sum_e f_e mean_t p_te,  p = softmax(l)                 (Switch eq. 4-6)
    dL/dl_te += g_aux p_te (c_e - sum_i p_ti c_i),  c_e = E f_e / T
    z = mean_t lse_t^2                                             (ST-MoE eq. 5)
    dL/dl_te += g_z (2 / T) lse_t p_te

The router's matmul is part of the node too, so that its share of `dL/dx` is added inside
one `addmm` instead of by autograd afterwards; the noise of noisy gating, when there is
one, comes in as an additive term that autograd differentiates. Tests compare values and
gradients with the loop oracle `TopKMoE.loop_forward` and run `torch.autograd.gradcheck`
in float64.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .capacity import group_by_expert
from .experts import _Groups
from .gating import top_k_gating
from .losses import switch_loss_from_counts

_GELU_BACKWARD = torch.ops.aten.gelu_backward
_SILU_BACKWARD = torch.ops.aten.silu_backward


class FusedOutput(NamedTuple):
    """What `top_k_moe` returns (the `TopKMoE` fields of `layers.MoEOutput`)."""

    y: Tensor  # (T, D)
    aux_loss: Tensor  # () Switch loss
    z_loss: Tensor  # () router z-loss
    weights: Tensor  # (T, K) gate weights, 0 where capacity dropped the assignment
    logits: Tensor  # (T, E) router logits
    indices: Tensor  # (T, K) chosen experts, best first
    keep: Tensor  # (T, K) bool
    counts: Tensor  # (E,) kept assignments per expert


class _Plan(NamedTuple):
    kept: Tensor  # (E,) kept rows per expert
    counts: list[int]  # the same as a list
    active: list[int]  # the experts with at least one row
    sizes: list[int]  # their row counts
    token: Tensor  # (M,) token of each kept row, rows grouped by expert
    slot: Tensor  # (M,) token-major id t*K + j of each kept row
    keep: Tensor  # (T, K) bool
    routed: Tensor  # (E,) assignments per expert before capacity (Switch f_e * T*K)


def _plan(indices: Tensor, n_experts: int, capacity: int | None) -> _Plan:
    """`group_by_expert` (one stable sort: GShard priority within an expert), as lists too."""
    a = group_by_expert(indices, n_experts, capacity)
    counts = a.counts.tolist()
    active = [e for e, n in enumerate(counts) if n]
    return _Plan(a.counts, counts, active, [counts[e] for e in active],
                 a.tokens, a.order, a.keep, a.routed)


# ---------------------------------------------------------------------------------------------
# Kernels by expert kind: the forward and its hand-written backward, written once for both
# layouts. `ops` is `experts._Groups` (all sorted rows, grouped matmuls) or `_Block` (one
# expert's rows); `wgrad(a, g, i)` and `bgrad(g, i)` produce the gradient of the kind's
# `i`-th parameter.
# ---------------------------------------------------------------------------------------------


class _Block:
    """One expert's rows: plain matmuls, its parameters' gradients written in place."""

    __slots__ = ("grads",)

    def __init__(self, grads: list[Tensor | None] | None = None) -> None:
        self.grads = grads  # this expert's slice of each parameter's gradient

    @staticmethod
    def mm(a: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
        return a @ w if b is None else torch.addmm(b, a, w)  # addmm fuses the bias

    @staticmethod
    def mm_t(g: Tensor, w: Tensor, add: Tensor | None = None) -> Tensor:
        return g @ w.t() if add is None else torch.addmm(add, g, w.t())  # one accumulating mm

    def wgrad(self, a: Tensor, g: Tensor, i: int) -> Tensor:
        return torch.mm(a.t(), g, out=self.grads[i])  # type: ignore[index]

    def bgrad(self, g: Tensor, i: int) -> Tensor:
        return torch.sum(g, dim=0, out=self.grads[i])  # type: ignore[index]


def _gelu_forward(ops, xs: Tensor, w_in: Tensor, b_in: Tensor, w_out: Tensor, b_out: Tensor):
    h = ops.mm(xs, w_in, b_in)  # (M, H)
    a = F.gelu(h)
    return ops.mm(a, w_out, b_out), (h, a)  # (M, D)


def _gelu_backward(ops, go: Tensor, xs: Tensor, saved, params, needs: list[bool],
                   need_x: bool):
    h, a = saved
    w_in, _, w_out, _ = params
    g_w_out = ops.wgrad(a, go, 2) if needs[2] else None
    g_b_out = ops.bgrad(go, 3) if needs[3] else None
    gh = _GELU_BACKWARD(ops.mm_t(go, w_out), h)  # (M, H)
    g_w_in = ops.wgrad(xs, gh, 0) if needs[0] else None
    g_b_in = ops.bgrad(gh, 1) if needs[1] else None
    gxs = ops.mm_t(gh, w_in) if need_x else None
    return gxs, [g_w_in, g_b_in, g_w_out, g_b_out]


def _swiglu_forward(ops, xs: Tensor, w1: Tensor, w3: Tensor, w2: Tensor):
    h1, h3 = ops.mm(xs, w1), ops.mm(xs, w3)  # (M, H)
    s1 = F.silu(h1)
    a = s1 * h3
    return ops.mm(a, w2), (h1, h3, s1, a)  # (M, D)


def _swiglu_backward(ops, go: Tensor, xs: Tensor, saved, params, needs: list[bool],
                     need_x: bool):
    h1, h3, s1, a = saved
    w1, w3, w2 = params
    g_w2 = ops.wgrad(a, go, 2) if needs[2] else None
    ga = ops.mm_t(go, w2)  # (M, H)
    gh3 = ga * s1
    gh1 = _SILU_BACKWARD(ga.mul_(h3), h1)
    g_w1 = ops.wgrad(xs, gh1, 0) if needs[0] else None
    g_w3 = ops.wgrad(xs, gh3, 1) if needs[1] else None
    gxs = ops.mm_t(gh3, w3, add=ops.mm_t(gh1, w1)) if need_x else None  # both branches
    return gxs, [g_w1, g_w3, g_w2]


class Kernels(NamedTuple):
    """The hand-written forward and backward of one expert kind (a key of `EXPERT_KINDS`)."""

    forward: Callable  # forward(ops, xs, *params) -> (out, saved)
    backward: Callable  # backward(ops, go, xs, saved, params, needs, need_x) -> (gxs, grads)


KERNELS: dict[str, Kernels] = {  # a kind without a row here runs TopKMoE's padded layout
    "gelu": Kernels(_gelu_forward, _gelu_backward),
    "swiglu": Kernels(_swiglu_forward, _swiglu_backward),
}


def _blocked_forward(kernels: Kernels, x: Tensor, plan: _Plan, w_rows: Tensor,
                     params: tuple[Tensor, ...]):
    """Expert by expert: gather its rows, run it, add its weighted output into `y`."""
    y = torch.zeros_like(x)  # (T, D)
    saved: list[tuple] = []
    views = [p.unbind(0) for p in params]  # per-expert weights, the views made once
    block = _Block()
    for e, tok, w in zip(plan.active, plan.token.split(plan.sizes),
                         w_rows[:, None].split(plan.sizes), strict=True):
        xe = x.index_select(0, tok)  # (n, D)
        o, inner = kernels.forward(block, xe, *(v[e] for v in views))  # (n, D)
        saved.append((xe, inner, o))
        y.index_add_(0, tok, o * w)  # combine, eq. 1
    return y, saved


def _blocked_backward(kernels: Kernels, grad_y: Tensor, plan: _Plan, w_rows: Tensor, saved,
                      params: tuple[Tensor, ...], needs: list[bool], need_x: bool):
    """The forward's loop in reverse: `dL/dx`, the parameters' gradients and `dL/dw` per row."""
    grad_x = torch.zeros_like(grad_y) if need_x else None
    # Each expert's slice of a parameter gradient is written once (`out=`); only experts
    # that got no rows are zero-filled.
    grad_params = [torch.empty_like(p) if need else None
                   for p, need in zip(params, needs, strict=True)]
    for g in grad_params:
        if g is not None and len(plan.active) < g.shape[0]:
            g[[e for e, n in enumerate(plan.counts) if n == 0]] = 0
    grads = [g.unbind(0) if g is not None else [None] * params[0].shape[0]
             for g in grad_params]
    views = [p.unbind(0) for p in params]
    grad_rows = torch.empty_like(w_rows)  # (M,)
    blocks = zip(plan.active, plan.token.split(plan.sizes), w_rows[:, None].split(plan.sizes),
                 grad_rows.split(plan.sizes), saved, strict=True)
    for e, tok, w, g_rows, (xe, inner, o) in blocks:
        gy = grad_y.index_select(0, tok)  # (n, D) dL/dy of each row's token
        torch.linalg.vecdot(gy, o, dim=1, out=g_rows)  # dL/dw = <dL/dy, o>
        go = gy.mul_(w)  # (n, D) dL/do
        gxe, _ = kernels.backward(_Block([g[e] for g in grads]), go, xe, inner,
                                  [v[e] for v in views], needs, need_x)
        if grad_x is not None:
            grad_x.index_add_(0, tok, gxe)
    return grad_x, grad_params, grad_rows


class _TopKMoE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, w_gate: Tensor, extra: Tensor | None, k: int,
                capacity: int | None, kind: str, blocked: bool,
                *params: Tensor):  # type: ignore[override]
        ctx.set_materialize_grads(False)
        logits = x @ w_gate.t()  # (T, E) router, eq. 3's x W_g
        if extra is not None:
            logits = logits + extra  # eq. 4's noise term
        t, e = logits.shape
        lse = torch.logsumexp(logits, dim=-1)  # (T,)
        gate, indices = top_k_gating(logits, k)  # (T, K), (T, K) eq. 3, before capacity
        plan = _plan(indices, e, capacity)
        w_rows = gate.reshape(-1).index_select(0, plan.slot)  # (M,) weight of each row
        kernels = KERNELS[kind]
        if not blocked:
            xs = x.index_select(0, plan.token)  # (M, D) rows sorted by expert
            groups = _Groups(plan.counts, x, plan.kept)
            o, saved = kernels.forward(groups, xs, *params)  # (M, D)
            y = torch.zeros_like(x).index_add_(0, plan.token, o * w_rows[:, None])  # (T, D)
        else:
            y, saved = _blocked_forward(kernels, x, plan, w_rows, params)
            xs = o = groups = None
        probs = torch.exp(logits - lse[:, None])  # (T, E)
        aux, f = switch_loss_from_counts(probs, plan.routed, t * k)  # Switch eq. 4-6
        z = lse.pow(2).mean()  # ST-MoE eq. 5
        weights = gate * plan.keep  # (T, K) 0 where dropped
        ctx.kernels, ctx.k, ctx.blocked, ctx.plan, ctx.groups = kernels, k, blocked, plan, groups
        ctx.saved, ctx.xs_o = saved, (xs, o)
        ctx.save_for_backward(x, w_gate, lse, probs, gate, indices, w_rows, f, *params)
        counts = plan.kept.to(x.dtype)
        ctx.mark_non_differentiable(indices, plan.keep, counts)
        return y, aux, z, weights, logits, indices, plan.keep, counts

    @staticmethod
    @once_differentiable  # the saved intermediates are not a graph: no double backward
    def backward(ctx, grad_y, grad_aux, grad_z, grad_weights, grad_logits_out,
                 *_):  # type: ignore[override]
        x, w_gate, lse, probs, gate, indices, w_rows, f, *params = ctx.saved_tensors
        xs, o = ctx.xs_o
        plan: _Plan = ctx.plan
        t, e = probs.shape
        need_x, need_w_gate, need_extra = ctx.needs_input_grad[:3]
        needs = list(ctx.needs_input_grad[7:])
        grad_x, grad_params = None, [None] * len(params)
        grad_rows = None
        if grad_y is not None and ctx.blocked:
            grad_x, grad_params, grad_rows = _blocked_backward(
                ctx.kernels, grad_y, plan, w_rows, ctx.saved, params, needs, need_x)
        elif grad_y is not None:  # (else y is unused: nothing reaches x or the experts via y)
            gy = grad_y.index_select(0, plan.token)  # (M, D) dL/dy of each row's token
            grad_rows = torch.linalg.vecdot(gy, o, dim=1)  # (M,) dL/dw = <dL/dy, o>
            go = gy.mul_(w_rows[:, None])  # (M, D) dL/do
            gxs, grad_params = ctx.kernels.backward(ctx.groups, go, xs, ctx.saved, params,
                                                    needs, need_x)
            if need_x:
                grad_x = torch.zeros_like(x).index_add_(0, plan.token, gxs)
        grad_w_gate = grad_extra = None
        if need_x or need_w_gate or need_extra:  # the router's gradient, dL/dlogits
            k = ctx.k
            if grad_rows is None:  # (T, K) dL/d(gate weight)
                grad_gate = torch.zeros_like(gate)
            else:  # rows back to token-major slots t*K + j; dropped slots get 0
                grad_gate = grad_rows.new_zeros(t * k).index_copy_(0, plan.slot, grad_rows)
                grad_gate = grad_gate.reshape(t, k)
            if grad_weights is not None:
                grad_gate = grad_gate + grad_weights * plan.keep
            grad_top = gate * (grad_gate - (gate * grad_gate).sum(-1, keepdim=True))
            grad_logits = torch.zeros_like(probs) if grad_logits_out is None else (
                grad_logits_out.clone())
            if grad_aux is not None or grad_z is not None:
                scale = torch.zeros_like(lse)[:, None]  # (T, 1)
                c = torch.zeros_like(f)
                if grad_aux is not None:
                    c = f * (grad_aux * e / t)  # (E,) dL/dp_te of the Switch loss
                    scale = scale - (probs @ c)[:, None]
                if grad_z is not None:
                    scale = scale + (2 / t) * grad_z * lse[:, None]
                grad_logits.add_(probs * (c + scale))
            grad_logits.scatter_add_(1, indices, grad_top)
            if need_w_gate:
                grad_w_gate = grad_logits.t() @ x  # (E, D)
            if need_extra:
                grad_extra = grad_logits
            if need_x:  # the router's share of dL/dx, accumulated inside the matmul
                grad_x = (grad_logits @ w_gate if grad_x is None
                          else grad_x.addmm_(grad_logits, w_gate))
        return (grad_x, grad_w_gate, grad_extra, None, None, None, None, *grad_params)


def top_k_moe(x: Tensor, w_gate: Tensor, k: int, capacity: int | None, kind: str,
              params: tuple[Tensor, ...], blocked: bool = True,
              extra: Tensor | None = None) -> FusedOutput:
    """Top-k mixture of experts on tokens `x` `(T, D)` routed by `x @ w_gate.T (+ extra)`.

    `w_gate` `(E, D)` is the router's weight (`nn.Linear.weight`), `extra` `(T, E)` an
    optional term added to the logits (the noise of Shazeer et al. eq. 4). `kind` is
    `"gelu"` with `params = (w_in, b_in, w_out, b_out)` or `"swiglu"` with
    `params = (w1, w3, w2)`, stacked as in `ExpertBank`; `capacity` is the per-expert
    buffer (`None`: dropless); `blocked` runs the experts one at a time (else grouped).
    Inputs are assumed checked by the caller (`TopKMoE.forward`).
    """
    return FusedOutput(*_TopKMoE.apply(x, w_gate, extra, k, capacity, kind, blocked, *params))
