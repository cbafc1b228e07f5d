"""Functions that `moe_course.parallel.launch` runs inside its spawned worker processes.

A spawned process imports the function it runs by name, so workers live here, in a module,
never in a notebook cell. Each takes `(rank, world_size, *args)` and returns tensors and
plain data. `make_case` builds the same layer, tokens and loss target on every rank and in
the parent process from one seed, which is how the expert-parallel layer is compared with
the single-process `MoEFeedForward` it was sharded from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from .layers import MoEFeedForward
from .parallel import ExpertParallelMoE, expert_parallel_forward

BIAS = 50.0  # router logit offset that makes an expert never (or always) chosen


@dataclass(frozen=True)
class EPCase:
    """One comparison of the expert-parallel layer with the single-process one."""

    seed: int  # seeds the layer, the tokens and the loss target
    n_tokens: int  # T over all ranks; rank r gets the r-th piece of tensor_split(x, W)
    d_model: int = 6  # D
    d_hidden: int = 12  # H
    n_experts: int = 8  # E, a multiple of every world size used
    k: int = 2  # K experts per token
    dead_experts: tuple[int, ...] = ()  # experts the router never picks: empty splits
    favourite: int | None = None  # expert every token ranks first: all-to-one traffic


class CaseData(NamedTuple):
    """What `make_case` builds; identical in every process for the same `EPCase`."""

    layer: MoEFeedForward  # the single-process layer (top-k, dropless)
    x: Tensor  # (T, D) all ranks' tokens
    target: Tensor  # (T, D) the loss is sum(y * target)


def make_case(case: EPCase) -> CaseData:
    """Build the layer, tokens and target of `case` from its seed.

    Dead and favourite experts are made through a constant input feature `x[:, 0] = 1`
    acting as a router bias: its router weight is set to `-BIAS` for dead experts and
    `+BIAS` for the favourite.

    >>> data = make_case(EPCase(seed=0, n_tokens=5, dead_experts=(0, 1)))
    >>> data.x.shape, bool((data.layer.gate(data.x).topk(2).indices >= 2).all())
    (torch.Size([5, 6]), True)
    """
    gen = torch.Generator().manual_seed(case.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(case.seed)
        layer = MoEFeedForward(case.d_model, case.d_hidden, case.n_experts, k=case.k)
    x = torch.randn(case.n_tokens, case.d_model, generator=gen)  # (T, D)
    target = torch.randn(case.n_tokens, case.d_model, generator=gen)  # (T, D)
    if case.dead_experts or case.favourite is not None:
        x = torch.cat([torch.ones(case.n_tokens, 1), x[:, 1:]], dim=1)  # (T, D)
        with torch.no_grad():
            bias = torch.zeros(case.n_experts)  # (E,)
            bias[list(case.dead_experts)] = -BIAS
            if case.favourite is not None:
                bias[case.favourite] = BIAS
            layer.gate.weight[:, 0] = bias
    return CaseData(layer, x, target)


def shard(t: Tensor, rank: int, world_size: int) -> Tensor:
    """Rank `rank`'s rows of `t`: the `rank`-th piece of `torch.tensor_split(t, W)`."""
    return torch.tensor_split(t, world_size)[rank]


def expert_parallel_worker(rank: int, world_size: int, cases: list[EPCase]) -> list[dict]:
    """Run `ExpertParallelMoE` (and `expert_parallel_forward`) on this rank's shard of each
    case, backpropagate `sum(y * target)`, and return outputs and gradients.

    Each result holds `y` and `y_fn` `(T_r, D)` (the layer and the pure function),
    `x_grad` `(T_r, D)`, `gate_grad` `(E, D)` (this rank's part; the full gradient is the
    sum over ranks), and `expert_grads`, keyed by the single-process layer's parameter names
    (`experts.{e}.w_in.weight`, ...) for the experts this rank owns.
    """
    results = []
    for case in cases:
        data = make_case(case)
        layer = ExpertParallelMoE.from_layer(data.layer)
        x = shard(data.x, rank, world_size).clone().requires_grad_(True)  # (T_r, D)
        out = layer(x)
        (out.y * shard(data.target, rank, world_size)).sum().backward()
        with torch.no_grad():
            y_fn = expert_parallel_forward(x, layer.gate.weight.t(), layer.experts, case.k)
        expert_grads = {}
        for e, expert in zip(layer.expert_ids, layer.experts, strict=True):
            for name, p in expert.named_parameters():
                grad = p.grad if p.grad is not None else torch.zeros_like(p)
                expert_grads[f"experts.{e}.{name}"] = grad
        results.append({"y": out.y, "y_fn": y_fn, "x_grad": x.grad,
                        "gate_grad": layer.gate.weight.grad, "expert_grads": expert_grads})
    return results


def raise_on_rank(rank: int, world_size: int, bad_rank: int) -> int:
    """Rank `bad_rank` raises a `ValueError` while the others wait at a barrier for it:
    shows how `launch` reports a failing worker and stops the ones left waiting."""
    if rank == bad_rank:
        raise ValueError(f"rank {rank} was told to fail")
    dist.barrier()
    return rank


def skip_collective(rank: int, world_size: int, absent_rank: int) -> int:
    """Every rank but `absent_rank` calls `all_reduce` while `absent_rank` waits for a
    message nobody sends: the classic deadlock of mismatched collectives, which only
    `launch`'s timeout ends."""
    value = torch.tensor([rank])
    if rank == absent_rank:
        dist.recv(value, src=(rank + 1) % world_size)
    else:
        dist.all_reduce(value)
    return int(value)
