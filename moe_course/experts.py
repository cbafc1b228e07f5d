"""Experts: the feed-forward networks a mixture chooses between.

An expert maps `(..., D) -> (..., D)` through a hidden width `H`. Two kinds appear in the
literature and in this course:

- `Expert`: the transformer FFN of Vaswani et al. with an exact GELU, the expert of
  Shazeer et al. 2017 (arXiv 1701.06538, Sec. 2.1, there with ReLU), GShard and Switch.
- `SwiGLUExpert`: the gated FFN of Mixtral (Jiang et al. 2024, arXiv 2401.04088, Sec. 2.1)
  and DeepSeekMoE, `w2(silu(w1 x) * w3 x)` without biases.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .validation import positive_int


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
