"""Guards around a learner's code while a check runs.

- `reference_guard(reference)`: while active, the reference implementation of the exercise
  being checked trips a wire instead of computing. A function's `__code__` is swapped, so
  aliases captured earlier (`from moe_course.gating import top_k_gating as f`) and wrappers
  trip too; a class's `__init__` and `forward` are replaced on the class, so wrapped
  instances and subclasses trip too. Everything is restored in `finally`.
  References of *other* exercises are not guarded: using `moe_course.softmax_gate` inside
  a learner's `dense_moe` is fine.
- `quiet()`: no warnings and nothing on stderr while a check runs (nbgrader scores a tests
  cell that writes to stderr as failed), and the global RNG restored afterwards.
"""

from __future__ import annotations

import contextlib
import io
import types
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch


class ReferenceCalled(Exception):
    """Raised by a tripped reference implementation."""


@dataclass
class GuardState:
    """What happened while a guard was active."""

    calls: list[str] = field(default_factory=list)  # reference entry points that were hit

    @property
    def tripped(self) -> bool:
        return bool(self.calls)


_ACTIVE: list[GuardState] = []  # stack of active guards; the innermost records the calls


def _trip(name: str) -> None:
    if _ACTIVE:
        _ACTIVE[-1].calls.append(name)
    raise ReferenceCalled(f"moe_course's reference {name} was called")


def _function_tripwire(*args: Any, **kwargs: Any) -> Any:
    # Runs with the *reference module's* globals once its code is swapped in, so it may use
    # builtins only: import this module by name to reach `_trip`.
    __import__("moe_course.grading.guard", fromlist=["_trip"])._trip("function")


def _class_tripwire(name: str) -> Any:
    def tripwire(self: Any, *args: Any, **kwargs: Any) -> Any:
        _trip(name)

    return tripwire


@contextlib.contextmanager
def reference_guard(reference: Any) -> Iterator[GuardState]:
    """Make `reference` (a function or an `nn.Module` class) trip while the block runs."""
    state = GuardState()
    _ACTIVE.append(state)
    try:
        if isinstance(reference, types.FunctionType):
            with _swap_code(reference):
                yield state
        elif isinstance(reference, type):
            with _swap_methods(reference):
                yield state
        else:
            yield state
    finally:
        _ACTIVE.remove(state)


@contextlib.contextmanager
def _swap_code(fn: types.FunctionType) -> Iterator[None]:
    saved = (fn.__code__, fn.__defaults__, fn.__kwdefaults__)
    if fn.__code__.co_freevars:
        raise RuntimeError(f"cannot guard {fn.__qualname__}: it is a closure")
    fn.__code__ = _function_tripwire.__code__
    fn.__defaults__ = None
    fn.__kwdefaults__ = None
    try:
        yield
    finally:
        fn.__code__, fn.__defaults__, fn.__kwdefaults__ = saved


@contextlib.contextmanager
def _swap_methods(cls: type) -> Iterator[None]:
    saved = {n: vars(cls)[n] for n in ("__init__", "forward") if n in vars(cls)}
    for n in ("__init__", "forward"):
        setattr(cls, n, _class_tripwire(f"{cls.__name__}.{n}"))
    try:
        yield
    finally:
        for n in ("__init__", "forward"):
            if n in saved:
                setattr(cls, n, saved[n])
            else:
                delattr(cls, n)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence warnings and stderr, and fork the global RNG (seeded 0) for determinism."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")
        stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
        stack.enter_context(torch.random.fork_rng(devices=[]))
        torch.default_generator.manual_seed(0)  # CPU only: no lazy device seeding
        yield
