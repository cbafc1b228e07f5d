"""moe_course: the reference implementation of a hands-on Mixture-of-Experts course.

Shape legend, used in names, docstrings and `# (..)` comments everywhere:

    T  tokens (batch and sequence flattened)     E  experts
    D  model width                               K  experts per token (top-k)
    H  expert hidden width                       C  capacity (slots per expert)
    B  batch                                     S  sequence length

Tokens are rows: `x` is `(T, D)`; router logits are `(T, E)`. "experts" is a sequence
(list or `nn.ModuleList`) of `E` modules mapping `(n, D) -> (n, D)`.

One concept per module, read top-down (CONTRIBUTING.md): `experts`, `gating`, `routing`,
`capacity`, `expert_choice`, `losses`; then `routers` (the router table), `fused` and
`layers`; plus `data`, `train` and `widgets` for the notebooks and `grading` for the
exercises.
"""

from .capacity import Capacity, apply_capacity, capacity_positions, expert_capacity
from .expert_choice import (
    ExpertChoice,
    expert_choice_capacity,
    expert_choice_moe,
    expert_choice_routing,
    experts_per_token,
)
from .experts import Expert, ExpertBank, SwiGLUExpert
from .gating import TopK, noisy_logits, softmax_gate, top_k_gating
from .layers import DenseFFN, ExpertChoiceMoE, MoEFeedForward, MoEOutput, TokenChoice, TopKMoE
from .losses import (
    cv_squared,
    importance_loss,
    load_loss,
    moe_lm_loss,
    router_z_loss,
    switch_aux_loss,
)
from .modern import aux_free_bias_update, shared_expert_moe, soft_moe, sort_by_expert
from .routing import DenseMoE, dense_moe, moe_flops, sparse_moe

__version__ = "0.1.0"

__all__ = [
    "DenseFFN", "ExpertBank", "ExpertChoiceMoE", "TopKMoE",
    "Capacity", "DenseMoE", "Expert", "ExpertChoice", "MoEFeedForward", "MoEOutput",
    "SwiGLUExpert", "TokenChoice", "TopK", "apply_capacity", "capacity_positions",
    "cv_squared", "dense_moe", "expert_capacity", "expert_choice_capacity",
    "expert_choice_moe", "expert_choice_routing", "experts_per_token", "importance_loss",
    "load_loss", "moe_flops", "moe_lm_loss", "noisy_logits", "router_z_loss",
    "softmax_gate", "sparse_moe", "switch_aux_loss", "top_k_gating",
    "aux_free_bias_update", "shared_expert_moe", "soft_moe", "sort_by_expert",
]
