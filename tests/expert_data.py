"""Seeded float64 tensors and experts, and an expert that records its calls.

Shared by the tests of the mixture functions (tests/test_routing.py, test_modern.py,
test_expert_choice.py).
"""

from __future__ import annotations

import torch
from torch import nn

from moe_course import Expert


def randn(seed: int, *shape: int) -> torch.Tensor:
    """A seeded standard-normal float64 tensor."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


def make_experts(seed: int, n: int, d: int, h: int) -> nn.ModuleList:
    """`n` float64 `Expert(d, h)`s with seeded, distinct weights."""
    experts = nn.ModuleList(Expert(d, h).double() for _ in range(n))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    return experts


class Recorder(nn.Module):
    """A nonlinear expert that records every batch it is called on."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale
        self.calls: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.detach().clone())
        return self.f(x)

    def f(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.scale * x)
