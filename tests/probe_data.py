"""What may cross the grader's process boundary: plain data, compared exactly.

Shared by the check tests of every notebook (tests/test_checks*.py).
"""

from __future__ import annotations

from typing import Any

import torch


def equal(a: Any, b: Any) -> bool:
    """Exact equality of nested tensors (same dtype), dicts, lists, tuples and scalars."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(
            equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(equal, a, b))
    return a == b


def plain(value: Any) -> bool:
    """Only plain tensors (no subclasses), str-keyed dicts, lists, tuples and scalars."""
    if isinstance(value, torch.Tensor):
        return type(value) is torch.Tensor
    if isinstance(value, dict):
        return all(isinstance(k, str) and plain(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))
