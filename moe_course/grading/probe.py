"""Probes: one teaching check, split in two across the grader's trust boundary.

A `Probe` has three parts:

- `inputs()` builds seeded, deterministic, tie-free inputs (tensors and plain data only);
- `run(learner_obj, inputs)` calls the learner's object on them and returns only tensors,
  lists, tuples and dicts of them, ints, floats, strings, bools and `None`, which survive
  `torch.save` and `torch.load(weights_only=True)`; it may run in an untrusted process;
- `judge(inputs, outputs)` runs in the trusted process: it validates type and shape first,
  computes the expected value with the reference, compares, and raises `CheckFailure`
  naming the likely mistake.

This module also holds the helpers that the probes of every notebook share: `capture`
(learner return value -> plain data), `call` (clone the arguments, call, report in-place
mutation) and the judging helpers `expect_tensor`, `expect_items`, `expect_close`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

Inputs = dict[str, Any]
Outputs = dict[str, Any]

RTOL = 1e-4  # relative tolerance of every float comparison (float32, any summation order)
ATOL = 1e-5  # absolute tolerance of every float comparison


class CheckFailure(AssertionError):
    """A check that failed, carrying a message for the learner.

    In Jupyter the message is shown without a traceback (IPython's `_render_traceback_`
    hook); the cell still ends in an error, so nbgrader scores the tests cell 0.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message

    def _render_traceback_(self) -> list[str]:
        first, *rest = self.message.splitlines() or [""]
        return [f"\x1b[0;31mCheckFailure\x1b[0m: {first}", *rest]


class NotImplementedYet(CheckFailure):
    """A check that failed because the learner's answer is still the stub (it raised
    NotImplementedError); `check` skips an optional exercise in this state."""


@dataclass(frozen=True)
class Probe:
    """One check of one exercise; see the module docstring for the contract."""

    name: str  # short, unique within its exercise, shown in failure messages
    inputs: Callable[[], Inputs]  # seeded, deterministic, tie-free inputs (plain data)
    run: Callable[[Any, Inputs], Outputs]  # calls the learner's object; may be untrusted
    judge: Callable[[Inputs, Outputs], None]  # trusted: raises CheckFailure on a mistake
    # The rules of the exercise's text this probe exercises ("softmax over the k kept
    # logits", "ValueError unless 1 <= k <= E", ...). Every rule a hidden probe tests is
    # also tested by a visible one (tests/test_check_rules.py), so a learner who sees every
    # visible check pass loses hidden points only by fitting the visible inputs.
    rules: tuple[str, ...] = ()


# ----------------------------------------------------------------------------------------
# Untrusted side: turning whatever the learner returned into plain data.

_MAX_ITEMS = 64  # longest sequence captured item by item
_MAX_DEPTH = 4  # deepest nesting captured


def _type_name(value: object) -> str:
    kind = type(value)
    module = getattr(kind, "__module__", "")
    name = getattr(kind, "__qualname__", kind.__name__)
    return name if module in ("builtins", "", None) else f"{module}.{name}"


def _short_repr(value: object, limit: int = 60) -> str:
    try:
        text = repr(value)
    except Exception:  # a learner object whose repr raises
        text = "<unprintable>"
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def capture(value: object, depth: int = 0) -> Any:
    """Convert a learner's return value into data that `torch.load(weights_only=True)` reads.

    Tensors become plain detached CPU tensors (subclasses stripped); Python and NumPy
    scalars become `int`, `float`, `bool`; tuples and lists (named tuples too) become
    `{"kind": "sequence", "type": ..., "fields": [...], "items": [...]}`; anything else
    becomes `{"kind": "object", "type": ..., "repr": ...}`, which every judge rejects with a
    message saying what it expected.

    >>> capture((torch.tensor([1.0]), 2))["items"]
    [tensor([1.]), 2]
    >>> capture({"a": 1})["kind"]
    'object'
    """
    if isinstance(value, Tensor):
        plain = value.detach().as_subclass(Tensor)
        return plain.cpu().clone()
    if value is None or isinstance(value, (bool, str)):
        return value if not isinstance(value, str) else value[:200]
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, (tuple, list)) and depth < _MAX_DEPTH and len(value) <= _MAX_ITEMS:
        fields = list(getattr(value, "_fields", ()))
        return {"kind": "sequence", "type": _type_name(value),
                "fields": [str(f) for f in fields],
                "items": [capture(item, depth + 1) for item in value]}
    return {"kind": "object", "type": _type_name(value), "repr": _short_repr(value)}


def _clone_arg(value: object) -> object:
    if isinstance(value, Tensor):
        return value.clone()
    if isinstance(value, list):
        return [_clone_arg(v) for v in value]
    return value


def call(fn: Callable[..., Any], args: Sequence[tuple[str, Any]],
         kwargs: dict[str, Any] | None = None) -> Outputs:
    """Call `fn(*args, **kwargs)` on clones and report what it returned and what it mutated.

    `args` are `(name, value)` pairs passed positionally, so a learner's parameter names do
    not matter for them; `kwargs` are passed by name. Returns `{"result": capture(...),
    "mutated": [names of tensor arguments changed in place]}`.
    """
    kwargs = kwargs or {}
    originals = {**dict(args), **kwargs}
    pos = [_clone_arg(v) for _, v in args]
    kw = {k: _clone_arg(v) for k, v in kwargs.items()}
    result = fn(*pos, **kw)
    passed = {**{name: v for (name, _), v in zip(args, pos, strict=True)}, **kw}
    mutated = [name for name, value in passed.items()
               if isinstance(value, Tensor) and isinstance(originals[name], Tensor)
               and not _same(value, originals[name])]
    return {"result": capture(result), "mutated": mutated}


def _same(a: Tensor, b: Tensor) -> bool:
    a = a.detach().as_subclass(Tensor)
    return a.shape == b.shape and a.dtype == b.dtype and bool(
        torch.equal(a, b) or (a.is_floating_point() and torch.isnan(a).any()
                              and torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))))


# ----------------------------------------------------------------------------------------
# Trusted side: validating and comparing captured outputs.


def describe(value: object) -> str:
    """A learner-facing description of a captured value ("a float32 tensor of shape (2, 3)")."""
    if isinstance(value, Tensor):
        dtype = str(value.dtype).replace("torch.", "")
        return f"a tensor of shape {tuple(value.shape)} and dtype {dtype}"
    if isinstance(value, dict) and value.get("kind") == "sequence":
        items = value.get("items", [])
        plural = "item" if len(items) == 1 else "items"
        return f"a {value.get('type', 'sequence')} of {len(items)} {plural}"
    if isinstance(value, dict) and value.get("kind") == "object":
        return f"a {value.get('type', 'object')} ({value.get('repr', '')})"
    if value is None:
        return "None"
    return f"a Python {type(value).__name__} ({_short_repr(value)})"


def no_mutation(outputs: Outputs, symbol: str) -> None:
    """Fail when the learner's function changed one of its tensor arguments in place."""
    mutated = outputs.get("mutated") or []
    if mutated:
        names = ", ".join(str(m) for m in mutated)
        raise CheckFailure(f"your {symbol} changed its argument {names} in place; build new "
                           "tensors instead (never mutate an argument: in-place ops like "
                           "`+=`, `/=` or `x[...] = ` on an input break autograd for callers)")


_KINDS = {
    "float": (lambda t: t.is_floating_point(), "a floating-point"),
    "int": (lambda t: not t.is_floating_point() and not t.is_complex()
            and t.dtype != torch.bool, "an integer (int64)"),
    "bool": (lambda t: t.dtype == torch.bool, "a boolean"),
}


def expect_tensor(value: object, what: str, shape: tuple[int, ...], kind: str = "float",
                  hint: str = "") -> Tensor:
    """Require a tensor of `kind` ("float", "int", "bool") and exact `shape`; return it."""
    ok, label = _KINDS[kind]
    shape_text = str(tuple(shape)) if shape else "() (a 0-dim scalar tensor)"
    wanted = f"{what} must be {label} tensor of shape {shape_text}{hint}"
    if not isinstance(value, Tensor):
        extra = ""
        if isinstance(value, (int, float)) and not shape:
            extra = " (return a tensor, not a Python number, so that gradients can flow)"
        raise CheckFailure(f"{wanted}; you returned {describe(value)}{extra}")
    if not ok(value):
        raise CheckFailure(f"{wanted}; yours has dtype {str(value.dtype).replace('torch.', '')}")
    if tuple(value.shape) != tuple(shape):
        raise CheckFailure(f"{wanted}; yours has shape {tuple(value.shape)}")
    return value


def expect_items(value: object, symbol: str, names: Sequence[str]) -> list[Any]:
    """Require a tuple/list (named tuple) of `len(names)` items; return the items."""
    wanted = f"{symbol} must return a tuple ({', '.join(names)})"
    if not (isinstance(value, dict) and value.get("kind") == "sequence"):
        raise CheckFailure(f"{wanted}; you returned {describe(value)}")
    items = value.get("items", [])
    if len(items) != len(names):
        raise CheckFailure(f"{wanted}; yours has {len(items)} items")
    return list(items)


def expect_number(value: object, what: str, integer: bool = False) -> float:
    """Require a Python/NumPy number (an int when `integer`); 0-dim tensors are refused."""
    kind = "an int" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CheckFailure(f"{what} must be {kind}; you returned {describe(value)}")
    if integer and not isinstance(value, int):
        raise CheckFailure(f"{what} must be an int; you returned {describe(value)} (use "
                           "math.ceil / integer arithmetic, not a float result)")
    return value


def close(actual: Any, expected: Any, rtol: float = RTOL, atol: float = ATOL) -> bool:
    """Whether two tensors (or numbers) agree, with torch.testing.assert_close-like tolerance."""
    if isinstance(expected, Tensor):
        if not isinstance(actual, Tensor) or actual.shape != expected.shape:
            return False
        if not expected.is_floating_point():  # exact (2.5 must not pass for 2)
            return bool(torch.equal(actual.to(torch.float64), expected.to(torch.float64)))
        a = actual.to(torch.float64)
        e = expected.to(torch.float64)
        return bool(torch.isclose(a, e, rtol=rtol, atol=atol, equal_nan=True).all())
    if isinstance(expected, bool) or isinstance(actual, bool):
        return actual is expected
    if isinstance(expected, (int, float)) and isinstance(actual, (int, float)):
        if math.isnan(expected) or math.isnan(actual):
            return math.isnan(expected) and math.isnan(actual)
        return abs(actual - expected) <= atol + rtol * abs(expected)
    return False


Variant = tuple[Any, str]  # (value a planted mistake would produce, message naming it)


def expect_close(actual: Tensor, expected: Tensor, what: str,
                 variants: Sequence[Variant] = (), rtol: float = RTOL,
                 atol: float = ATOL, otherwise: str = "") -> None:
    """Compare `actual` with `expected`; on a mismatch, name the planted mistake it matches.

    `variants` are `(value, message)` pairs computed with the reference under a known
    mistake; the first one `actual` matches gives the message. Otherwise the message
    describes the difference (`difference`: shape, dtype, NaN, transposed, sign, scale,
    offset, permuted columns or rows, which rows and columns differ), after `otherwise`
    when given.
    """
    if close(actual, expected, rtol, atol):
        return
    message = matching_variant(actual, variants, rtol, atol)
    if message is not None:
        raise CheckFailure(message)
    described = difference(actual, expected, rtol, atol)
    if described.startswith(("NaN where", "inf where")):  # a mistake of its own kind
        raise CheckFailure(f"{what} contains NaN or inf: {described}")
    if otherwise:
        raise CheckFailure(f"{otherwise} ({described})")
    raise CheckFailure(f"{what} is wrong: {described}")


def matching_variant(actual: Any, variants: Sequence[Variant], rtol: float = RTOL,
                     atol: float = ATOL) -> str | None:
    """The message of the first planted mistake `actual` matches, or None."""
    for value, message in variants:
        if value is not None and close(actual, value, rtol, atol):
            return message
    return None


def _fmt(value: Any) -> str:
    if isinstance(value, Tensor):
        if value.numel() == 1:
            return f"{value.item():.6g}"
        if value.is_floating_point():
            return str([round(v, 4) for v in value.tolist()] if value.dim() == 1
                       and value.numel() <= 12 else value)
        return str(value.tolist() if value.numel() <= 12 else value)
    return repr(value)


def _ids(positions: Sequence[int], limit: int = 8) -> str:
    shown = ", ".join(str(p) for p in positions[:limit])
    return shown + (f", ... ({len(positions)} in all)" if len(positions) > limit else "")


def _matching(actual: Tensor, expected: Tensor, rtol: float, atol: float) -> list[int] | None:
    """For each column of `actual`, the column of `expected` it equals (a permutation), or
    None when some column matches none or two columns match the same one."""
    n = expected.shape[1]
    used: set[int] = set()
    mapping = []
    for j in range(n):
        found = next((i for i in range(n) if i not in used
                      and close(actual[:, j], expected[:, i], rtol, atol)), None)
        if found is None:
            return None
        used.add(found)
        mapping.append(found)
    return mapping


def difference(actual: Any, expected: Any, rtol: float = RTOL, atol: float = ATOL) -> str:
    """Describe how `actual` differs from `expected`, naming the kind of difference.

    Tried in order: a different type, shape (or the transposed shape), dtype; NaN or inf
    where the reference is finite; transposed; the sign flipped; scaled by a constant;
    shifted by a constant; columns (or rows) permuted; otherwise which rows and columns
    differ. The largest difference follows.

    >>> e = torch.tensor([[1.0, 2.0], [3.0, 5.0]])
    >>> difference(-e, e).split(";")[0]
    'the sign is flipped: yours is -1 times the expected values'
    >>> difference(e[:, [1, 0]], e).split(";")[0]
    'columns permuted: your column 0 is expected column 1, 1 is 0'
    """
    if not (isinstance(expected, Tensor) and isinstance(actual, Tensor)):
        return f"expected {_fmt(expected)}, got {_fmt(actual)}"
    e_shape, a_shape = tuple(expected.shape), tuple(actual.shape)
    if a_shape != e_shape:
        kind = f"shape {a_shape}, expected {e_shape}"
        if a_shape == e_shape[::-1] and len(e_shape) == 2:
            kind += (" (transposed: did you swap the two dimensions?)"
                     if close(actual.t(), expected, rtol, atol) else " (the transposed shape)")
        return kind
    if actual.is_floating_point() != expected.is_floating_point():
        want = "a floating-point" if expected.is_floating_point() else "an integer"
        return (f"dtype {str(actual.dtype).replace('torch.', '')}, expected {want} tensor "
                f"({str(expected.dtype).replace('torch.', '')})")
    if expected.dim() == 0:
        return _scalar_difference(actual, expected)
    a, x = actual.to(torch.float64), expected.to(torch.float64)
    detail = _largest(actual, expected)
    bad = ~torch.isfinite(a) & torch.isfinite(x)
    if bool(bad.any()):
        where = [tuple(int(i) for i in idx) for idx in bad.nonzero()]
        what = "NaN" if bool(torch.isnan(a[bad]).any()) else "inf"
        return (f"{what} where the expected values are finite, at {_ids(where, 4)} (look for a "
                "0/0, a log of 0 or an exp that overflows); " + detail)
    if expected.dim() == 2 and e_shape[0] == e_shape[1] and close(a.t(), x, rtol, atol):
        return "transposed: your [i, j] is the expected [j, i]; " + detail
    if expected.is_floating_point() and bool(x.abs().max() > 0):
        if close(-a, x, rtol, atol):
            return "the sign is flipped: yours is -1 times the expected values; " + detail
        c = float((a * x).sum() / (x * x).sum())
        if abs(c - 1) > 1e-3 and close(a, c * x, rtol, atol):
            return f"scaled by a constant: yours is {c:.4g} times the expected values; {detail}"
        d = float((a - x).mean())
        if abs(d) > atol and close(a, x + d, rtol, atol):
            return f"shifted by a constant: yours is the expected values plus {d:.4g}; {detail}"
    if expected.dim() == 2 and e_shape[1] > 1:
        cols = _matching(a, x, rtol, atol)
        if cols is not None:
            moved = ", ".join(f"{j} is {i}" for j, i in enumerate(cols) if i != j)
            pairs = moved.split(", ", 1)
            pairs[0] = pairs[0].replace(" is ", " is expected column ", 1)
            return f"columns permuted: your column {', '.join(pairs)}; {detail}"
        rows = _matching(a.t(), x.t(), rtol, atol) if e_shape[0] > 1 else None
        if rows is not None:
            moved = ", ".join(f"{j} is {i}" for j, i in enumerate(rows) if i != j)
            pairs = moved.split(", ", 1)
            pairs[0] = pairs[0].replace(" is ", " is expected row ", 1)
            return (f"rows permuted (the right rows in another order): your row "
                    f"{', '.join(pairs)}; {detail}")
    return _where(a, x, rtol, atol) + detail


def _scalar_difference(actual: Tensor, expected: Tensor) -> str:
    a, x = float(actual), float(expected)
    text = f"expected {x:.6g}, got {a:.6g}"
    if not math.isfinite(a) and math.isfinite(x):
        return (f"{text}: {'NaN' if math.isnan(a) else 'inf'} where the expected value is "
                "finite (look for a 0/0, a log of 0 or an exp that overflows)")
    if math.isfinite(a) and x != 0 and a != 0:
        if math.isclose(a, -x, rel_tol=1e-4):
            return f"{text}: the sign is flipped"
        return f"{text}: {a / x:.4g} times the expected value"
    return text


def _where(a: Tensor, x: Tensor, rtol: float, atol: float) -> str:
    """Which rows (and, for a matrix, columns) differ."""
    wrong = ~torch.isclose(a, x, rtol=rtol, atol=atol, equal_nan=True)
    if a.dim() == 1:
        idx = [int(i) for i in wrong.nonzero().reshape(-1)]
        return f"entries {_ids(idx)} of {a.shape[0]} differ; "
    flat = wrong.reshape(wrong.shape[0], -1)
    rows = [int(i) for i in flat.any(1).nonzero().reshape(-1)]
    text = f"rows {_ids(rows)} of {a.shape[0]} differ" if len(rows) < a.shape[0] else (
        f"every row of {a.shape[0]} differs")
    if a.dim() == 2:
        cols = [int(i) for i in wrong.any(0).nonzero().reshape(-1)]
        text += (f", in columns {_ids(cols)} of {a.shape[1]}" if len(cols) < a.shape[1]
                 else f", in every column of {a.shape[1]}")
    return text + "; "


def _largest(actual: Tensor, expected: Tensor) -> str:
    """Where the largest difference is, with the expected and actual values there."""
    if expected.is_floating_point():
        diff = (actual.to(torch.float64) - expected.to(torch.float64)).abs()
        diff = diff.nan_to_num(float("inf"))
    else:
        diff = (actual.to(torch.int64) != expected.to(torch.int64)).to(torch.int64)
    where = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
    if expected.dim() == 2 and expected.shape[1] <= 8:
        row = where[0]
        return (f"row {row}: expected {_fmt(expected[row])}, got {_fmt(actual[row])} "
                f"(largest difference at index {where})")
    return f"at index {where}: expected {_fmt(expected[where])}, got {_fmt(actual[where])}"
