"""Argument checks shared by the reference functions.

Every public function of `moe_course` validates its inputs up front and raises a
`ValueError` that names the argument, what it got and what it expected, so that a learner
who passes `(D, T)` instead of `(T, D)` reads one clear sentence instead of a stack trace
from deep inside torch.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor


def _describe(t: object) -> str:
    if isinstance(t, Tensor):
        return f"a {t.dtype} tensor of shape {tuple(t.shape)}"
    return f"{type(t).__name__} {t!r}"


def float_tensor(name: str, t: object, ndim: int | None = None, shape_hint: str = "") -> Tensor:
    """Require a floating-point tensor, optionally of rank `ndim`.

    >>> float_tensor("x", torch.zeros(2, 3), ndim=2, shape_hint="(T, D)").shape
    torch.Size([2, 3])
    >>> float_tensor("x", torch.zeros(2, 3, dtype=torch.long), ndim=2, shape_hint="(T, D)")
    Traceback (most recent call last):
    ...
    ValueError: x must be a floating-point tensor (T, D); got a torch.int64 tensor of shape (2, 3)
    """
    hint = f" {shape_hint}" if shape_hint else ""
    if not isinstance(t, Tensor) or not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor{hint}; got {_describe(t)}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions{hint}; got {_describe(t)}")
    return t


def index_tensor(name: str, t: object, ndim: int | None = None, shape_hint: str = "",
                 upper: int | None = None, values: bool = True) -> Tensor:
    """Require an integer tensor of rank `ndim` whose values lie in `[0, upper)`
    (`values=False`: only its dtype and rank are checked)."""
    hint = f" {shape_hint}" if shape_hint else ""
    if (not isinstance(t, Tensor) or t.is_floating_point() or t.is_complex()
            or t.dtype == torch.bool):
        raise ValueError(f"{name} must be an integer tensor{hint}; got {_describe(t)}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions{hint}; got {_describe(t)}")
    if not values:
        return t
    if t.numel() and (int(t.min()) < 0 or (upper is not None and int(t.max()) >= upper)):
        bound = f"[0, {upper})" if upper is not None else ">= 0"
        raise ValueError(f"{name} values must lie in {bound}; got values from {int(t.min())} "
                         f"to {int(t.max())}")
    return t


def _integer(value: object) -> int | None:
    """`value` as an int if it is an integer scalar (Python, numpy, or a one-element integer
    tensor), else None; bools of every kind are not integers here."""
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.is_floating_point() or value.is_complex() \
                or value.dtype == torch.bool:
            return None
        return int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        return None  # numpy's bool_ is not Integral; numpy's integers are
    return int(value)


def integer(name: str, value: object) -> int:
    """Require an integer scalar of any sign (see `positive_int`); return it as an int.

    >>> integer("ignore_index", -100)
    -100
    """
    number = _integer(value)
    if number is None:
        raise ValueError(f"{name} must be an int; got {_describe(value)}")
    return number


def positive_int(name: str, value: object, minimum: int = 1, maximum: int | None = None) -> int:
    """Require an integer in `[minimum, maximum]`; return it as a Python int.

    Python ints, numpy integer scalars (`np.int64(2)`) and one-element integer tensors
    (`torch.tensor(2)`) are integers; bools, floats (even `2.0`) and anything else are not.

    >>> positive_int("k", 3, maximum=4)
    3
    >>> positive_int("k", torch.tensor(2), maximum=4)
    2
    >>> positive_int("k", 5, maximum=4)
    Traceback (most recent call last):
    ...
    ValueError: k must be an integer with 1 <= k <= 4; got 5
    >>> positive_int("k", True)
    Traceback (most recent call last):
    ...
    ValueError: k must be an int; got bool True
    """
    number = _integer(value)
    if number is None:
        raise ValueError(f"{name} must be an int; got {_describe(value)}")
    if number < minimum or (maximum is not None and number > maximum):
        upper = f" <= {maximum}" if maximum is not None else ""
        raise ValueError(f"{name} must be an integer with {minimum} <= {name}{upper}; "
                         f"got {number}")
    return number


def positive_float(name: str, value: object) -> float:
    """Require a finite real number > 0 (a capacity factor, a noise scale); return a float.

    numpy scalars and one-element real tensors count; bools do not.

    >>> positive_float("capacity_factor", torch.tensor(1.25))
    1.25
    """
    number: object = value
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_complex() \
            and value.dtype != torch.bool:
        number = value.item()
    if isinstance(number, bool) or not isinstance(number, numbers.Real):  # numpy's bool_ isn't
        raise ValueError(f"{name} must be a number > 0; got {_describe(value)}")
    number = float(number)
    if not number > 0 or number != number or number == float("inf"):
        raise ValueError(f"{name} must be a finite number > 0; got {number}")
    return number


def same_shape(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    """Require two tensors of identical shape."""
    if a.shape != b.shape:
        raise ValueError(f"{name_a} and {name_b} must have the same shape; got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")


def experts_list(name: str, experts: object, allow_empty: bool = False) -> int:
    """Require a sequence of callables (a list or `nn.ModuleList`), non-empty unless
    `allow_empty`; return its length."""
    what = "expert modules, possibly empty" if allow_empty else "E expert modules"
    try:
        n = len(experts)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"{name} must be a sequence (list or nn.ModuleList) of {what}; got "
                         f"{_describe(experts)}") from None
    callables = all(callable(e) for e in experts)  # type: ignore[union-attr]
    if allow_empty and not callables:
        raise ValueError(f"{name} must hold callable experts; got "
                         f"{[type(e).__name__ for e in experts]}")  # type: ignore[union-attr]
    if not allow_empty and (n == 0 or not callables):
        raise ValueError(f"{name} must be a non-empty sequence of callable experts; got {n} "
                         "items")
    return n


def same_dtype(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    """Require two tensors of the same dtype (torch's matmul would say only "mat1 and mat2").

    >>> same_dtype("x", torch.zeros(2, dtype=torch.float64), "w_gate", torch.zeros(2))
    ... # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: x must have the dtype of w_gate, torch.float32; got torch.float64 (convert ...)
    """
    if a.dtype != b.dtype:
        raise ValueError(f"{name_a} must have the dtype of {name_b}, {b.dtype}; got {a.dtype} "
                         "(convert one with .to(...))")


def nonempty(name: str, t: Tensor, what: str = "token", shape_hint: str = "") -> None:
    """Require at least one row (a mean over no tokens would be NaN).

    >>> nonempty("logits", torch.zeros(0, 4), shape_hint="(T, E)")
    Traceback (most recent call last):
    ...
    ValueError: logits must hold at least one token (T, E) with T >= 1; got shape (0, 4)
    """
    if t.numel() == 0:
        hint = f" {shape_hint} with {shape_hint[1]} >= 1" if shape_hint else ""
        raise ValueError(f"{name} must hold at least one {what}{hint}; got shape "
                         f"{tuple(t.shape)}")


def routable_logits(name: str, logits: Tensor, row_summary: Tensor | None = None) -> None:
    """Require router logits `(T, E)` whose rows a softmax can turn into weights.

    The rule: NaN and `+inf` are refused; `-inf` is allowed (an expert masked off for that
    token) as long as the row keeps one finite logit. Otherwise the softmax would give NaN
    weights silently. `row_summary` is a `(T,)` reduction of the rows that is non-finite
    exactly when a row breaks the rule (the row max, or the logsumexp a caller already
    computed); one check per call.

    >>> routable_logits("logits", torch.tensor([[0.0, float("-inf")]]))
    >>> routable_logits("logits", torch.tensor([[0.0, float("nan")]]))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: logits must be finite (or -inf, ...); got row 0 = [0.0, nan]
    """
    if logits.numel() == 0:
        return
    summary = logits.amax(dim=-1) if row_summary is None else row_summary  # (T,)
    if bool(torch.isfinite(summary).all()):
        return
    rows = (~torch.isfinite(summary)).nonzero()
    t = int(rows[0, 0])
    shown = [round(v, 4) for v in logits[t].detach().float().tolist()[:8]]
    more = ", ..." if logits.shape[-1] > 8 else ""
    raise ValueError(f"{name} must be finite (or -inf, masked, with a finite one left in the "
                     f"row); got row {t} = {str(shown)[:-1]}{more}]")


def layer_input(name: str, x: object, d_model: int, dtype: torch.dtype,
                shape_hint: str = "(..., D)") -> Tensor:
    """Require a module's input: floating point, last dimension `d_model`, the module's dtype.

    >>> layer_input("x", torch.zeros(2, 5), d_model=3, dtype=torch.float32)
    Traceback (most recent call last):
    ...
    ValueError: x must be (..., D) with D = d_model = 3; got a torch.float32 tensor of shape (2, 5)
    """
    t = float_tensor(name, x, shape_hint=shape_hint)
    if t.dim() == 0 or t.shape[-1] != d_model:
        raise ValueError(f"{name} must be {shape_hint} with D = d_model = {d_model}; got "
                         f"{_describe(t)}")
    if t.dtype != dtype:
        raise ValueError(f"{name} must have the module's dtype {dtype} (its weights'); got "
                         f"{t.dtype} (convert the input or the module with .to(...))")
    return t
