"""Seeded, tie-free inputs for the probes.

A check must not depend on how a learner breaks ties: if two logits in a row were equal,
"the top k" would not be unique and a correct answer could fail. Every generator here takes
an explicit seed and, where order matters, retries deterministically (seed, seed + 1, ...)
until the sorted values it cares about are at least `MARGIN` apart.

Hidden checks' inputs can be salted (`salted`): while a salt is active, `gen(seed)` seeds
its generator with `derived_seed(salt, seed)` instead of `seed`, so every probe's inputs,
and each next candidate that `tie_free` tries, derive from the salt (the course secret, the
exercise and the probe: see `moe_course.grading.secret`). Without a salt, seeds are used as
written: the published defaults.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from .probe import Inputs

MARGIN = 1e-3  # smallest gap between two values whose order a check depends on


_SALT: list[bytes] = []  # the active salt, if any (innermost last)


def derived_seed(salt: bytes, seed: int) -> int:
    """A 63-bit seed derived from `salt` and `seed` (BLAKE2b keyed by the salt).

    >>> derived_seed(b"k", 1) == derived_seed(b"k", 1) != derived_seed(b"k", 2)
    True
    """
    digest = hashlib.blake2b(str(seed).encode(), key=salt[:64], digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


@contextlib.contextmanager
def salted(salt: bytes | None) -> Iterator[None]:
    """While active, `gen(seed)` is seeded from `derived_seed(salt, seed)` (None: no salt)."""
    if salt is None:
        yield
        return
    _SALT.append(salt)
    try:
        yield
    finally:
        _SALT.pop()


def gen(seed: int) -> torch.Generator:
    """A CPU generator seeded with `seed`, or with a seed derived from it under `salted`."""
    return torch.Generator().manual_seed(derived_seed(_SALT[-1], seed) if _SALT else seed)


def min_gap(values: Tensor, dim: int = -1) -> float:
    """Smallest difference between two neighbours after sorting along `dim` (inf if < 2).

    >>> min_gap(torch.tensor([[0.0, 3.0, 1.0]]))
    1.0
    """
    if values.shape[dim] < 2:
        return float("inf")
    ordered = values.sort(dim=dim).values
    return float(ordered.diff(dim=dim).min())


def tie_free(make: Callable[[torch.Generator], Inputs],
             gaps: Callable[[Inputs], Sequence[float]], seed: int,
             margin: float = MARGIN, tries: int = 100) -> Inputs:
    """`make(gen(s))` for the first `s = seed, seed + 1, ...` whose `gaps` all exceed `margin`."""
    for s in range(seed, seed + tries):
        inputs = make(gen(s))
        if min(gaps(inputs)) > margin:
            return inputs
    raise RuntimeError(f"no tie-free inputs found from seed {seed} in {tries} tries")


def draw_int(g: torch.Generator, low: int, high: int) -> int:
    """An integer in `[low, high]`, uniform."""
    return int(torch.randint(low, high + 1, (1,), generator=g))


def draw_choice(g: torch.Generator, options: Sequence[Any]) -> Any:
    """One of `options`, uniform."""
    return options[draw_int(g, 0, len(options) - 1)]


def logits(g: torch.Generator, n_tokens: int, n_experts: int, scale: float = 1.5) -> Tensor:
    """Router logits `(T, E)`, standard normal times `scale`."""
    return torch.randn(n_tokens, n_experts, generator=g) * scale
