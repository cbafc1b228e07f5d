"""Argument checks shared by the reference functions.

Every public function of `moe_course` validates its inputs up front and raises a
`ValueError` that names the argument, what it got and what it expected, so that a learner
who passes `(D, T)` instead of `(T, D)` reads one clear sentence instead of a stack trace
from deep inside torch.
"""

from __future__ import annotations

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
                 upper: int | None = None) -> Tensor:
    """Require an integer tensor of rank `ndim` whose values lie in `[0, upper)`."""
    hint = f" {shape_hint}" if shape_hint else ""
    if (not isinstance(t, Tensor) or t.is_floating_point() or t.is_complex()
            or t.dtype == torch.bool):
        raise ValueError(f"{name} must be an integer tensor{hint}; got {_describe(t)}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions{hint}; got {_describe(t)}")
    if t.numel() and (int(t.min()) < 0 or (upper is not None and int(t.max()) >= upper)):
        bound = f"[0, {upper})" if upper is not None else ">= 0"
        raise ValueError(f"{name} values must lie in {bound}; got values from {int(t.min())} "
                         f"to {int(t.max())}")
    return t


def positive_int(name: str, value: object, minimum: int = 1, maximum: int | None = None) -> int:
    """Require an int in `[minimum, maximum]` (bools and floats are refused).

    >>> positive_int("k", 3, maximum=4)
    3
    >>> positive_int("k", 5, maximum=4)
    Traceback (most recent call last):
    ...
    ValueError: k must be an integer with 1 <= k <= 4; got 5
    """
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int; got {_describe(value)}")
    if value < minimum or (maximum is not None and value > maximum):
        upper = f" <= {maximum}" if maximum is not None else ""
        raise ValueError(f"{name} must be an integer with {minimum} <= {name}{upper}; got {value}")
    return value


def positive_float(name: str, value: object) -> float:
    """Require a real number > 0 (a capacity factor, a noise scale)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number > 0; got {_describe(value)}")
    if not value > 0 or value != value or value == float("inf"):
        raise ValueError(f"{name} must be a finite number > 0; got {value}")
    return float(value)


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
