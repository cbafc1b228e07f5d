"""Seeded, tie-free inputs for the probes.

A check must not depend on how a learner breaks ties: if two logits in a row were equal,
"the top k" would not be unique and a correct answer could fail. Every generator here takes
an explicit seed and, where order matters, retries deterministically (seed, seed + 1, ...)
until the sorted values it cares about are at least `MARGIN` apart.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .probe import Inputs

MARGIN = 1e-3  # smallest gap between two values whose order a check depends on


def gen(seed: int) -> torch.Generator:
    """A CPU generator seeded with `seed`."""
    return torch.Generator().manual_seed(seed)


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


def logits(g: torch.Generator, n_tokens: int, n_experts: int, scale: float = 1.5) -> Tensor:
    """Router logits `(T, E)`, standard normal times `scale`."""
    return torch.randn(n_tokens, n_experts, generator=g) * scale
