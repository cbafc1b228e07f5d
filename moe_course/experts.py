"""Experts: the feed-forward networks a mixture chooses between.

An expert maps `(..., D) -> (..., D)` through a hidden width `H`. Two kinds appear in the
literature and in this course:

- `Expert`: the transformer FFN of Vaswani et al. with an exact GELU, the expert of
  Shazeer et al. 2017 (arXiv 1701.06538, Sec. 2.1, there with ReLU), GShard and Switch.
- `SwiGLUExpert`: the gated FFN of Mixtral (Jiang et al. 2024, arXiv 2401.04088, Sec. 2.1)
  and DeepSeekMoE, `w2(silu(w1 x) * w3 x)` without biases.
- `ExpertBank`: `E` experts of either kind with stacked weights, run all at once on a padded
  `(E, C, D)` buffer or on rows grouped by expert (`grouped_linear`), the fast path of
  `moe_course.layers`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .validation import experts_list, float_tensor, positive_int


class Expert(nn.Module):
    """`w_out(gelu(w_in(x)))` with the exact (erf) GELU; `(..., D) -> (..., D)`.

    >>> import torch
    >>> e = Expert(4, 8)
    >>> e(torch.zeros(3, 4)).shape
    torch.Size([3, 4])
    """

    def __init__(self, d_model: int, d_hidden: int) -> None:
        super().__init__()
        positive_int("d_model", d_model)
        positive_int("d_hidden", d_hidden)
        self.w_in = nn.Linear(d_model, d_hidden)
        self.w_out = nn.Linear(d_hidden, d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.w_out(F.gelu(self.w_in(x)))  # exact GELU, approximate="none"


class SwiGLUExpert(nn.Module):
    """Mixtral's expert, `w2(silu(w1 x) * w3 x)` without biases (arXiv 2401.04088, eq. 1).

    The attribute names follow Mixtral's reference code so weights can be copied across.

    >>> import torch
    >>> SwiGLUExpert(4, 8)(torch.zeros(3, 4)).shape
    torch.Size([3, 4])
    """

    def __init__(self, d_model: int, d_hidden: int) -> None:
        super().__init__()
        positive_int("d_model", d_model)
        positive_int("d_hidden", d_hidden)
        self.w1 = nn.Linear(d_model, d_hidden, bias=False)
        self.w3 = nn.Linear(d_model, d_hidden, bias=False)
        self.w2 = nn.Linear(d_hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


# torch's grouped matmul (`torch.nn.functional.grouped_mm`, earlier `torch._grouped_mm`): on
# CPU one C++ loop of `mm` over the groups, which saves the Python loop's per-call overhead.
_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


class _Groups:
    """Matmuls of rows sorted by expert, `counts[e]` rows for expert `e`.

    torch's grouped matmul (`torch.nn.functional.grouped_mm`: one C++ loop of `mm` on CPU)
    where it applies (fp32/bf16/fp16 on CPU, rows a multiple of 16 bytes), else a Python
    loop of `mm` over contiguous slices; `addmm` per expert when there is a bias (it fuses
    the bias, measured faster than a grouped matmul and an add).
    """

    def __init__(self, counts: list[int], ref: Tensor, count_tensor: Tensor | None = None
                 ) -> None:
        self.counts, self.ref = counts, ref
        self.n_groups = len(counts)
        self.starts = [0] * len(counts)
        for e in range(1, len(counts)):
            self.starts[e] = self.starts[e - 1] + counts[e - 1]
        self.offs = None
        if (_GROUPED_MM is not None and ref.device.type == "cpu"
                and ref.dtype in (torch.float32, torch.bfloat16, torch.float16)):
            if count_tensor is None:
                count_tensor = torch.tensor(counts, device=ref.device)
            self.offs = count_tensor.cumsum(0, dtype=torch.int32)  # (E,) group ends

    def _grouped(self, *widths: int) -> bool:
        return self.offs is not None and all(
            (w * self.ref.element_size()) % 16 == 0 for w in widths)

    def _slices(self):
        for e, (n, s) in enumerate(zip(self.counts, self.starts, strict=True)):
            if n:
                yield e, slice(s, s + n)

    def mm(self, a: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
        """`a_e @ w[e] (+ b[e])` for every group: `(M, I), (E, I, O) -> (M, O)`."""
        if b is None and self._grouped(a.shape[1], w.shape[2]):
            return _GROUPED_MM(a, w, offs=self.offs)
        out = a.new_empty(a.shape[0], w.shape[2])
        for e, rows in self._slices():
            if b is None:
                torch.mm(a[rows], w[e], out=out[rows])
            else:
                torch.addmm(b[e], a[rows], w[e], out=out[rows])
        return out

    def mm_t(self, g: Tensor, w: Tensor, add: Tensor | None = None) -> Tensor:
        """`g_e @ w[e].T` for every group, `(M, O), (E, I, O) -> (M, I)`, plus `add`."""
        if self._grouped(w.shape[1], w.shape[2]):
            out = _GROUPED_MM(g, w.transpose(1, 2), offs=self.offs)
            return out if add is None else out.add_(add)
        out = g.new_empty(g.shape[0], w.shape[1]) if add is None else add
        for e, rows in self._slices():  # beta=1 accumulates into `add` inside the matmul
            torch.addmm(out[rows], g[rows], w[e].t(), beta=0 if add is None else 1,
                        out=out[rows])
        return out

    def wgrad(self, a: Tensor, g: Tensor, i: int = 0) -> Tensor:
        """`a_e.T @ g_e` for every group, `(M, I), (M, O) -> (E, I, O)`, 0 for empty ones.

        `i`, the parameter's place in its kind's row, is unused here (a one-expert block of
        `fused` writes into the `i`-th gradient with it)."""
        if self._grouped(a.shape[1], g.shape[1]):
            return _GROUPED_MM(a.t(), g, offs=self.offs)
        out = a.new_zeros(self.n_groups, a.shape[1], g.shape[1])
        for e, rows in self._slices():
            torch.mm(a[rows].t(), g[rows], out=out[e])
        return out

    def bgrad(self, g: Tensor, i: int = 0) -> Tensor:
        """Column sums of every group: `(M, O) -> (E, O)`, 0 for empty groups (`i`: unused)."""
        if self._grouped(4, g.shape[1]):  # ones (4, M) @ g per group: four copies of the sums
            ones = g.new_ones(g.shape[0], 4)
            return _GROUPED_MM(ones.t(), g, offs=self.offs)[:, 0]
        out = g.new_zeros(self.n_groups, g.shape[1])
        for e, rows in self._slices():
            torch.sum(g[rows], dim=0, out=out[e])
        return out


class _GroupedLinear(torch.autograd.Function):
    """`out[rows of e] = a[rows of e] @ w[e] (+ b[e])` for rows sorted by expert.

    Forward and backward are `_Groups`' grouped matmuls: one node for autograd instead of
    `4 E`, and no full-size zero gradient built per slice.
    """

    @staticmethod
    def forward(ctx, a: Tensor, w: Tensor, b: Tensor | None, counts: list[int]) -> Tensor:
        ctx.groups = _Groups(counts, a)
        ctx.save_for_backward(a, w)
        ctx.has_bias = b is not None
        return ctx.groups.mm(a, w, b)  # (N, H)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        a, w = ctx.saved_tensors
        grad = grad.contiguous()
        groups: _Groups = ctx.groups
        grad_a = groups.mm_t(grad, w) if ctx.needs_input_grad[0] else None  # (N, D)
        grad_w = groups.wgrad(a, grad) if ctx.needs_input_grad[1] else None  # (E, D, H)
        grad_b = groups.bgrad(grad) if ctx.has_bias else None  # (E, H)
        return grad_a, grad_w, grad_b, None


def grouped_linear(a: Tensor, w: Tensor, b: Tensor | None, counts: list[int]) -> Tensor:
    """Per-expert linear maps on rows grouped by expert: `(N, D), (E, D, H) -> (N, H)`.

    The first `counts[0]` rows of `a` go through `w[0]` (plus `b[0]`), the next `counts[1]`
    through `w[1]`, and so on: the grouped matmul of MegaBlocks (Gale et al. 2022, arXiv
    2211.15841), done as one BLAS call per expert on contiguous slices.

    >>> a = torch.ones(3, 2)
    >>> w = torch.stack([torch.eye(2), 2 * torch.eye(2)])  # (E, D, H) = (2, 2, 2)
    >>> grouped_linear(a, w, None, [1, 2])
    tensor([[1., 1.],
            [2., 2.],
            [2., 2.]])
    """
    float_tensor("a", a, ndim=2, shape_hint="(N, D)")
    float_tensor("w", w, ndim=3, shape_hint="(E, D, H)")
    if w.shape[1] != a.shape[1]:
        raise ValueError(f"w must be (E, D, H) with D = a.shape[1] = {a.shape[1]}; got shape "
                         f"{tuple(w.shape)}")
    if b is not None:
        float_tensor("b", b, ndim=2, shape_hint="(E, H)")
        if b.shape != (w.shape[0], w.shape[2]):
            raise ValueError(f"b must be (E, H) = {(w.shape[0], w.shape[2])}; got shape "
                             f"{tuple(b.shape)}")
    counts = [int(c) for c in counts]
    if len(counts) != w.shape[0] or any(c < 0 for c in counts) or sum(counts) != a.shape[0]:
        raise ValueError(f"counts must be E = {w.shape[0]} non-negative row counts summing to "
                         f"a.shape[0] = {a.shape[0]}; got {counts}")
    return _GroupedLinear.apply(a, w, b, counts)


# ---------------------------------------------------------------------------------------------
# Expert kinds: one row each, read by `ExpertBank`, `DenseFFN` and the fused path.
# ---------------------------------------------------------------------------------------------

Linear = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]  # (rows, weight, bias) -> rows


def linear_map(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """One expert's linear map, input-major: `x @ w (+ b)`, `(..., I), (I, O) -> (..., O)`."""
    return x @ w if b is None else x @ w + b


def batched_linear(xs: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """Every expert's linear map on its block of a padded buffer: `(E, C, I) -> (E, C, O)`."""
    return torch.bmm(xs, w) if b is None else torch.baddbmm(b[:, None], xs, w)


def gelu_expert(x: Tensor, w_in: Tensor, b_in: Tensor, w_out: Tensor, b_out: Tensor,
                linear: Linear = linear_map) -> Tensor:
    """`Expert` with its weights input-major: `gelu(x @ w_in + b_in) @ w_out + b_out`.

    `linear` applies one linear map: one expert's (the default), every expert's on a padded
    `(E, C, D)` buffer (`batched_linear`) or on rows grouped by expert (`grouped_linear`).
    """
    return linear(F.gelu(linear(x, w_in, b_in)), w_out, b_out)  # exact GELU


def swiglu_expert(x: Tensor, w1: Tensor, w3: Tensor, w2: Tensor,
                  linear: Linear = linear_map) -> Tensor:
    """`SwiGLUExpert` with its weights input-major: `(silu(x @ w1) * (x @ w3)) @ w2`."""
    return linear(F.silu(linear(x, w1, None)) * linear(x, w3, None), w2, None)  # eq. 1


class Param(NamedTuple):
    """One stacked parameter of an `ExpertBank` and where it lives in the expert's module."""

    name: str  # the bank's attribute, stacked over experts: (E, I, O) or (E, O)
    linear: str  # the module's nn.Linear it copies
    field: str  # "weight" (stored input-major, the transpose of nn.Linear's) or "bias"


@dataclass(frozen=True)
class ExpertKind:
    """An expert kind: its module, its stacked parameters and its function, one row each.

    The first parameter is the weight of the `D -> H` input map (it gives `D` and `H`).
    """

    module: type[nn.Module]  # one expert, built as module(d_model, d_hidden)
    params: tuple[Param, ...]  # the bank's parameters, in the order fused.top_k_moe takes
    fn: Callable[..., Tensor]  # fn(x, *params, linear=...): the expert, written once


EXPERT_KINDS: dict[str, ExpertKind] = {  # expert= of ExpertBank, TopKMoE and DenseFFN
    "gelu": ExpertKind(Expert, (Param("w_in", "w_in", "weight"), Param("b_in", "w_in", "bias"),
                                Param("w_out", "w_out", "weight"),
                                Param("b_out", "w_out", "bias")), gelu_expert),
    "swiglu": ExpertKind(SwiGLUExpert, (Param("w1", "w1", "weight"),
                                        Param("w3", "w3", "weight"),
                                        Param("w2", "w2", "weight")), swiglu_expert),
}


def expert_kind(expert: object) -> ExpertKind:
    """The row of `EXPERT_KINDS` named `expert`; ValueError naming the kinds otherwise."""
    if not isinstance(expert, str) or expert not in EXPERT_KINDS:
        raise ValueError(f"expert must be one of {tuple(EXPERT_KINDS)}; got {expert!r}")
    return EXPERT_KINDS[expert]


def _uniform(shape: tuple[int, ...], fan_in: int) -> nn.Parameter:
    # nn.Linear's default init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), for weights and biases.
    bound = 1.0 / math.sqrt(fan_in)
    return nn.Parameter(torch.empty(shape).uniform_(-bound, bound))


def _tensor_of(module: nn.Module, p: Param) -> Tensor:
    """`p`'s tensor in one expert's module, input-major like the bank's."""
    t = getattr(getattr(module, p.linear), p.field)
    return t.t() if p.field == "weight" else t


class ExpertBank(nn.Module):
    """`E` experts of one kind with their weights stacked along a leading expert axis.

    `expert="gelu"`: `Expert`s, parameters `w_in (E, D, H)`, `b_in (E, H)`, `w_out (E, H, D)`,
    `b_out (E, D)`; expert `e` is `gelu(x @ w_in[e] + b_in[e]) @ w_out[e] + b_out[e]`.
    `expert="swiglu"`: Mixtral's `SwiGLUExpert`s, parameters `w1, w3 (E, D, H)` and
    `w2 (E, H, D)`; expert `e` is `(silu(x @ w1[e]) * (x @ w3[e])) @ w2[e]`.
    Weights are stored input-major (`x @ w`), the transpose of `nn.Linear.weight`. Both
    kinds are rows of `EXPERT_KINDS`, which every method here reads.

    Stacked weights let a layer run all experts at once: `forward` on a padded `(E, C, D)`
    buffer with batched matmuls (GShard's dispatched layout, arXiv 2006.16668), or
    `grouped` on rows sorted by expert (dropless, MegaBlocks-style, arXiv 2211.15841).
    `expert_fns` gives plain per-expert callables on the same parameters, for the loop oracle.

    >>> bank = ExpertBank(d_model=4, d_hidden=8, n_experts=3)
    >>> bank(torch.zeros(3, 5, 4)).shape  # (E, C, D)
    torch.Size([3, 5, 4])
    >>> bank.grouped(torch.zeros(6, 4), [2, 0, 4]).shape  # (N, D)
    torch.Size([6, 4])
    """

    def __init__(self, d_model: int, d_hidden: int, n_experts: int, expert: str = "gelu") -> None:
        super().__init__()
        self.d_model = positive_int("d_model", d_model)
        self.d_hidden = positive_int("d_hidden", d_hidden)
        self.n_experts = positive_int("n_experts", n_experts)
        self.kind = expert
        self.spec = expert_kind(expert)
        with torch.device("meta"):  # shapes only: no memory, no draw from the RNG
            template = self.spec.module(d_model, d_hidden)
        for p in self.spec.params:
            lin = getattr(template, p.linear)
            shape = tuple(_tensor_of(template, p).shape)  # (I, O) or (O,)
            setattr(self, p.name, _uniform((n_experts, *shape), lin.in_features))

    def _check(self, name: str, x: object, ndim: int, hint: str) -> None:
        float_tensor(name, x, ndim=ndim, shape_hint=hint)
        if x.shape[-1] != self.d_model:  # type: ignore[union-attr]
            raise ValueError(f"{name} must be {hint} with D = {self.d_model}; got shape "
                             f"{tuple(x.shape)}")  # type: ignore[union-attr]

    def forward(self, xs: Tensor) -> Tensor:
        """Expert `e` on `xs[e]` for every `e`: `(E, C, D) -> (E, C, D)`, batched matmuls."""
        self._check("xs", xs, 3, "(E, C, D)")
        if xs.shape[0] != self.n_experts:
            raise ValueError(f"xs must be (E, C, D) with E = {self.n_experts}; got shape "
                             f"{tuple(xs.shape)}")
        return self.spec.fn(xs, *self.params(), linear=batched_linear)  # (E, C, D)

    def grouped(self, xs: Tensor, counts: list[int]) -> Tensor:
        """Rows sorted by expert, `counts[e]` of them for expert `e`: `(N, D) -> (N, D)`."""
        self._check("xs", xs, 2, "(N, D)")
        return self.spec.fn(xs, *self.params(),
                            linear=partial(_grouped, counts=counts))  # (N, D)

    def params(self) -> tuple[Tensor, ...]:
        """The stacked parameters in the kind's order: `(w_in, b_in, w_out, b_out)` for
        `"gelu"`, `(w1, w3, w2)` for `"swiglu"` (the order `fused.top_k_moe` takes)."""
        return tuple(getattr(self, p.name) for p in self.spec.params)

    def expert_fn(self, e: int) -> Callable[[Tensor], Tensor]:
        """Expert `e` as a plain function of `(n, D)` rows, sharing this bank's parameters."""
        e = positive_int("e", e, minimum=0, maximum=self.n_experts - 1)
        return self.expert_fns()[e]

    def expert_fns(self) -> list[Callable[[Tensor], Tensor]]:
        """All `E` experts as plain functions, the `experts` argument of `sparse_moe`.

        They read views of the stacked parameters (`unbind`), so gradients reach the bank.
        """
        names = [p.name for p in self.spec.params]
        views = zip(*(t.unbind(0) for t in self.params()), strict=True)
        return [partial(self.spec.fn, **dict(zip(names, v, strict=True))) for v in views]

    def to_modules(self) -> nn.ModuleList:
        """Copies of the experts as `Expert` or `SwiGLUExpert` modules (no shared storage)."""
        modules = nn.ModuleList()
        for e in range(self.n_experts):
            m = self.spec.module(self.d_model, self.d_hidden)
            with torch.no_grad():
                for p, stacked in zip(self.spec.params, self.params(), strict=True):
                    _tensor_of(m, p).copy_(stacked[e])
            modules.append(m.to(self._dtype()))
        return modules

    def _dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @classmethod
    def from_modules(cls, experts: Sequence[nn.Module]) -> ExpertBank:
        """Stack copies of `Expert`s (or of `SwiGLUExpert`s) into a bank.

        >>> experts = [Expert(4, 8) for _ in range(3)]
        >>> bank = ExpertBank.from_modules(experts)
        >>> x = torch.randn(5, 4)
        >>> torch.allclose(bank.expert_fn(1)(x), experts[1](x), atol=1e-6)
        True
        """
        n = experts_list("experts", experts)
        kinds = [name for name, k in EXPERT_KINDS.items()
                 if all(isinstance(m, k.module) for m in experts)]
        if not kinds:
            modules = " or all ".join(k.module.__name__ for k in EXPERT_KINDS.values())
            raise ValueError(f"experts must be all {modules} modules; got "
                             f"{sorted({type(m).__name__ for m in experts})}")
        spec = EXPERT_KINDS[kinds[0]]
        first = getattr(experts[0], spec.params[0].linear)  # the D -> H input map
        bank = cls(first.in_features, first.out_features, n, kinds[0])
        for m in experts:
            inner = getattr(m, spec.params[0].linear)
            if (inner.in_features, inner.out_features) != (bank.d_model, bank.d_hidden):
                raise ValueError(f"experts must all be ({bank.d_model} -> {bank.d_hidden}); got "
                                 f"one ({inner.in_features} -> {inner.out_features})")
        with torch.no_grad():
            for p, stacked in zip(spec.params, bank.params(), strict=True):
                stacked.copy_(torch.stack([_tensor_of(m, p) for m in experts]))
        return bank.to(first.weight.dtype)


def _grouped(x: Tensor, w: Tensor, b: Tensor | None, counts: list[int]) -> Tensor:
    return grouped_linear(x, w, b, counts)  # the `linear` of rows grouped by expert
