"""Expert parallelism: experts spread over processes, tokens exchanged by all-to-all.

A model with more experts than one device can hold places them on `W` ranks (GShard,
Lepikhin et al. 2020, arXiv 2006.16668, Sec. 2; Switch Transformer, Fedus et al. 2021,
arXiv 2101.03961, Sec. 5 and Fig. 9). Here rank `r` owns the contiguous block of
`E / W` experts `r * E/W ... (r + 1) * E/W - 1`, and every rank holds its own tokens and a
replica of the router. One layer then runs in six steps:

1. route: top-k over the replicated router's logits (`moe_course.top_k_gating`);
2. count: how many of this rank's `T * K` assignments go to each expert, hence to each
   rank (`send_counts`), and exchange those counts so every rank knows what it receives;
3. dispatch: order the rows by destination rank (`permute_for_all_to_all`) and send them
   with one `all_to_all_single` whose split sizes are the counts (dropless, MegaBlocks-style,
   Gale et al. 2022, arXiv 2211.15841, rather than GShard's fixed-capacity buffers);
4. compute: run each local expert once on the rows it received from all ranks;
5. combine: send the outputs back with the mirror-image all-to-all;
6. restore the original order and mix with the gate weights (Shazeer et al. 2017,
   arXiv 1701.06538, eq. 1): the result equals `moe_course.sparse_moe` on one process.

Gradients flow through both exchanges (`all_to_all_rows`, equivalent to
`torch.distributed._functional_collectives.all_to_all_single_autograd`): the backward of an
all-to-all is the all-to-all with the split sizes swapped. Expert weights get their whole
gradient on their owning rank; the router is replicated, so its gradient is summed over ranks
(an all-reduce, as data parallelism does for every replicated weight).

What changes on GPUs: nothing in this module. `launch` uses the gloo backend on CPU
processes; on GPUs each process calls `torch.cuda.set_device(rank)`, the process group uses
the NCCL backend (`init_process_group("nccl")`), and tensors and the layer live on that
device. The split sizes are moved to the host (`.tolist()`), one synchronisation per layer
that real systems hide by overlapping it with other work. Across nodes the same code runs
under `torchrun --nnodes N`, which sets `MASTER_ADDR`/`MASTER_PORT`, `RANK` and `WORLD_SIZE`;
the all-to-all then crosses the network, which is much slower than the links inside a node,
so systems keep expert-parallel groups inside a node where they can, limit how many nodes a
token may be sent to (DeepSeek-V3, arXiv 2412.19437, Sec. 2.1.2 and 3.2.2), and overlap
communication with computation. `communication_volume` counts the rows and bytes each rank
pair exchanges.

Worker functions run by `launch` must live in an importable module (a `.py` file): the
worker processes import the function by name and cannot see functions defined in a
notebook cell or in `__main__`. `moe_course.parallel_workers` holds the course's workers.
"""

from __future__ import annotations

import copy
import datetime
import multiprocessing.connection
import os
import shutil
import socket
import tempfile
import time
import traceback
from collections.abc import Sequence
from typing import Any, Callable, NamedTuple

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn

from .capacity import capacity_positions, expert_capacity
from .experts import Expert
from .gating import top_k_gating
from .layers import MoEFeedForward, MoEOutput, TokenChoice, token_rows
from .losses import router_z_loss, switch_aux_loss
from .validation import experts_list, float_tensor, index_tensor, positive_float, positive_int

ExpertFn = Callable[[Tensor], Tensor]


# --------------------------------------------------------------------------------------
# Placement and the pure bookkeeping of the exchange
# --------------------------------------------------------------------------------------

def experts_per_rank(n_experts: int, world_size: int) -> int:
    """`E / W`, the size of each rank's contiguous block of experts (equal blocks).

    >>> experts_per_rank(8, 4)
    2
    >>> experts_per_rank(6, 4)
    Traceback (most recent call last):
    ...
    ValueError: n_experts must be a multiple of world_size; got n_experts = 6, world_size = 4
    """
    e = positive_int("n_experts", n_experts)
    w = positive_int("world_size", world_size)
    if e % w:
        raise ValueError("n_experts must be a multiple of world_size; got "
                         f"n_experts = {e}, world_size = {w}")
    return e // w


def local_expert_range(rank: int, n_experts: int, world_size: int) -> range:
    """The global ids of the experts rank `rank` owns: a contiguous block of `E / W`.

    >>> local_expert_range(1, n_experts=8, world_size=4)
    range(2, 4)
    """
    per_rank = experts_per_rank(n_experts, world_size)
    r = positive_int("rank", rank, minimum=0, maximum=world_size - 1)
    return range(r * per_rank, (r + 1) * per_rank)


def _check_indices(indices: Tensor, n_experts: int, world_size: int) -> int:
    per_rank = experts_per_rank(n_experts, world_size)
    index_tensor("indices", indices, ndim=2, shape_hint="(T, K)", upper=n_experts)
    return per_rank


def send_counts(indices: Tensor, n_experts: int, world_size: int) -> Tensor:
    """How many of this rank's `T * K` assignments go to each rank: `(W,)` int64.

    Expert `e` lives on rank `e // (E / W)`, so the counts are the per-expert counts summed
    over each rank's block. They sum to `T * K`; a token routed to two experts of the same
    rank is sent there twice, once per assignment.

    >>> indices = torch.tensor([[0, 3], [1, 0], [3, 2]])  # (T, K) = (3, 2), E = 4
    >>> send_counts(indices, n_experts=4, world_size=2)
    tensor([3, 3])
    >>> send_counts(indices, n_experts=4, world_size=4)
    tensor([2, 1, 1, 2])
    """
    per_rank = _check_indices(indices, n_experts, world_size)
    per_expert = torch.bincount(indices.reshape(-1).long(), minlength=n_experts)  # (E,)
    return per_expert.reshape(world_size, per_rank).sum(1)  # (W,)


class RankPermutation(NamedTuple):
    """Output of `permute_for_all_to_all`; `order` and `inverse` index the `T * K` flattened
    assignments (assignment `a` is token `a // K`, choice `a % K`)."""

    order: Tensor  # (T*K,) int64: send row i carries assignment order[i]
    inverse: Tensor  # (T*K,) int64: assignment a is send row inverse[a]; order[inverse] = arange
    counts: Tensor  # (W,) int64: rows for each destination rank, = send_counts


def permute_for_all_to_all(indices: Tensor, n_experts: int, world_size: int) -> RankPermutation:
    """The order that makes each destination rank's rows contiguous, and its inverse.

    `order` is a stable sort of the flattened assignments by expert id: since experts sit in
    contiguous blocks, rows for rank 0 come first, then rank 1, ...; within a rank they are
    sorted by expert, and within an expert by original position `t * K + j`. Rows for rank
    `r` are `order[sum(counts[:r]) : sum(counts[:r + 1])]`, which is exactly the
    `input_split_sizes = counts` layout `all_to_all_single` expects, and the receiver finds
    each expert's rows in one piece. Gather rows with `x[order // K]`; after the exchange
    back, `rows[inverse]` puts them in the original `(T*K)` order again.

    >>> indices = torch.tensor([[0, 3], [1, 0], [3, 2]])  # E = 4, W = 2
    >>> p = permute_for_all_to_all(indices, n_experts=4, world_size=2)
    >>> p.order  # assignments 0, 3 go to expert 0, then 2 to expert 1 (rank 0); then rank 1
    tensor([0, 3, 2, 5, 1, 4])
    >>> p.counts
    tensor([3, 3])
    >>> p.order[p.inverse]
    tensor([0, 1, 2, 3, 4, 5])
    """
    counts = send_counts(indices, n_experts, world_size)  # (W,)
    flat = indices.reshape(-1).long()  # (T*K,)
    order = torch.argsort(flat, stable=True)  # (T*K,) by expert, then position
    position = torch.arange(order.numel(), device=order.device)  # (T*K,)
    inverse = torch.empty_like(order).scatter(0, order, position)  # (T*K,)
    return RankPermutation(order, inverse, counts)


# --------------------------------------------------------------------------------------
# The distributed forward
# --------------------------------------------------------------------------------------

def _single_process(group: Any) -> bool:
    """True when there is nothing to exchange: no group given and none initialised."""
    return group is None and not (dist.is_available() and dist.is_initialized())


def _world(group: Any) -> tuple[int, int]:
    """`(rank, world_size)` of `group`; `(0, 1)` without an initialised process group."""
    if _single_process(group):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


class _AllToAll(torch.autograd.Function):
    """`dist.all_to_all_single` on rows, differentiable: the backward of an all-to-all is the
    all-to-all of the gradients with the split sizes swapped. (torch's
    `_functional_collectives.all_to_all_single_autograd` does the same; its first call
    imports hundreds of modules, seconds in every fresh worker process.)"""

    @staticmethod
    def forward(ctx: Any, rows: Tensor, output_split_sizes: list[int],
                input_split_sizes: list[int], group: Any) -> Tensor:
        ctx.splits = (output_split_sizes, input_split_sizes)
        ctx.group = group
        out = rows.new_empty((sum(output_split_sizes), *rows.shape[1:]))  # (N_recv, D)
        dist.all_to_all_single(out, rows.contiguous(), output_split_sizes, input_split_sizes,
                               group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, None, None, None]:
        output_split_sizes, input_split_sizes = ctx.splits
        grad_in = grad_out.new_empty((sum(input_split_sizes), *grad_out.shape[1:]))  # (N, D)
        dist.all_to_all_single(grad_in, grad_out.contiguous(), input_split_sizes,
                               output_split_sizes, group=ctx.group)
        return grad_in, None, None, None


def all_to_all_rows(rows: Tensor, output_split_sizes: list[int], input_split_sizes: list[int],
                    group: Any = None) -> Tensor:
    """Send `rows[sum(input_split_sizes[:r]) : ...]` to rank `r`; receive from each rank `s`
    `output_split_sizes[s]` rows, stacked in rank order. Differentiable.

    The sizes must agree across ranks: what rank `s` sends rank `r` is what `r` expects
    from `s`, which is why the counts are exchanged first. Every rank of `group` must call
    it (forward and, when training, backward), even with zero rows.
    """
    return _AllToAll.apply(rows, list(output_split_sizes), list(input_split_sizes), group)


def expert_parallel_sparse_moe(x: Tensor, local_experts: Sequence[ExpertFn], weights: Tensor,
                               indices: Tensor, group: Any = None) -> Tensor:
    """`sparse_moe` with the experts spread over the ranks of `group`; `(T, D) -> (T, D)`.

    Call it on every rank of `group` with that rank's tokens `x` (`T` may differ between
    ranks, and may be 0), its routing `weights` and `indices` (`(T, K)`, global expert ids
    in `[0, E)`), and its `local_experts`, the block `local_expert_range(rank, E, W)` of the
    global expert list, so `E = len(local_experts) * W`. Without an initialised process
    group (and `group=None`) it runs on one process with `W = 1` and no communication.

    Steps (module docstring): count, exchange per-expert counts (one small all-to-all), send
    the rows with `all_to_all_single` split by rank, run each local expert once on the rows it
    received from all ranks, send them back, restore order, mix with `weights`. Each local
    expert is called exactly once per call, even on zero rows, so that every rank takes part
    in the backward exchanges; an idle expert gets a zero gradient (not `None`).

    >>> experts = [lambda x: x, lambda x: 10 * x]
    >>> x = torch.tensor([[1.0], [2.0]])
    >>> w, i = torch.tensor([[1.0], [0.5]]), torch.tensor([[1], [0]])
    >>> expert_parallel_sparse_moe(x, experts, w, i)  # one process: same as sparse_moe
    tensor([[10.],
            [ 1.]])
    """
    n_local = experts_list("local_experts", local_experts)
    _, world_size = _world(group)
    n_experts = n_local * world_size
    float_tensor("x", x, ndim=2, shape_hint="(T, D)")
    float_tensor("weights", weights, ndim=2, shape_hint="(T, K)")
    index_tensor("indices", indices, ndim=2, shape_hint="(T, K)", upper=n_experts)
    if weights.shape != indices.shape or weights.shape[0] != x.shape[0]:
        raise ValueError(f"weights and indices must both be (T, K) with T = x.shape[0] = "
                         f"{x.shape[0]}; got {tuple(weights.shape)} and {tuple(indices.shape)}")
    n_tokens, k = indices.shape
    d = x.shape[1]

    # 2. count, per expert so that the receiver can group rows by expert.
    plan = permute_for_all_to_all(indices, n_experts, world_size)  # (T*K,) x2, (W,)
    per_expert = torch.bincount(indices.reshape(-1).long(), minlength=n_experts)  # (E,)
    send_rows = x[plan.order // k]  # (T*K, D) grouped by destination rank, then expert
    local_only = _single_process(group)
    if local_only:
        recv_counts, recv_rows = per_expert, send_rows  # (E,), (T*K, D)
    else:
        # recv_counts[s * E/W + j]: rows rank s sends to my local expert j.
        recv_counts = torch.empty_like(per_expert)  # (W * E/W,)
        dist.all_to_all_single(recv_counts, per_expert, group=group)
        recv_split = recv_counts.reshape(world_size, n_local).sum(1).tolist()  # (W,)
        # 3. dispatch: rows for rank r are plan.counts[r] consecutive rows.
        recv_rows = all_to_all_rows(send_rows, recv_split, plan.counts.tolist(), group)

    # 4. compute: group the received rows by local expert (they arrive by source rank).
    block = recv_counts.reshape(world_size, n_local)  # (W, E/W)
    local_id = torch.arange(n_local, device=recv_counts.device)  # (E/W,)
    local_id = local_id.repeat(world_size).repeat_interleave(recv_counts)  # (N,)
    by_expert = torch.argsort(local_id, stable=True)  # (N,)
    grouped = recv_rows[by_expert]  # (N, D)
    chunks = torch.split(grouped, block.sum(0).tolist())  # E/W pieces of (n_j, D)
    # (n_j, D) each; every local expert runs, even on 0 rows (see the docstring)
    outs = [expert(chunk) for expert, chunk in zip(local_experts, chunks, strict=True)]
    grouped_out = torch.cat(outs)  # (N, D)
    out_rows = torch.empty_like(grouped_out).index_copy(0, by_expert, grouped_out)  # (N, D)

    # 5. combine: the mirror-image exchange.
    if local_only:
        back = out_rows  # (T*K, D)
    else:
        back = all_to_all_rows(out_rows, plan.counts.tolist(), recv_split, group)  # (T*K, D)

    # 6. restore order and mix (Shazeer et al. eq. 1).
    per_assignment = back[plan.inverse].reshape(n_tokens, k, d)  # (T, K, D)
    return (weights.unsqueeze(-1) * per_assignment).sum(1)  # (T, D)


def expert_parallel_forward(x: Tensor, w_gate: Tensor, local_experts: Sequence[ExpertFn], k: int,
                            group: Any = None) -> Tensor:
    """A top-k MoE layer run across the ranks of `group`: `(T, D) -> (T, D)` on each rank.

    Every rank passes its own tokens `x` `(T, D)`, the replicated router `w_gate` `(D, E)`,
    its block of `E / W` experts `local_experts` (`local_expert_range(rank, E, W)`), and `k`;
    `group` is the process group (`None`: the default group, or one process with `W = 1`
    when no process group is initialised). The result on each rank equals, row for row,
    `sparse_moe(x, all_experts, *top_k_gating(x @ w_gate, k))` computed on one process.

    >>> _ = torch.manual_seed(0)
    >>> from moe_course import Expert, sparse_moe, top_k_gating
    >>> experts = [Expert(4, 8) for _ in range(3)]
    >>> x, w_gate = torch.randn(5, 4), torch.randn(4, 3)
    >>> y = expert_parallel_forward(x, w_gate, experts, k=2)  # W = 1: all experts are local
    >>> torch.allclose(y, sparse_moe(x, experts, *top_k_gating(x @ w_gate, 2)), atol=1e-6)
    True
    """
    n_local = experts_list("local_experts", local_experts)
    _, world_size = _world(group)
    float_tensor("x", x, ndim=2, shape_hint="(T, D)")
    float_tensor("w_gate", w_gate, ndim=2, shape_hint="(D, E)")
    if w_gate.shape != (x.shape[1], n_local * world_size):
        raise ValueError(f"w_gate must be (D, E) with D = x.shape[1] = {x.shape[1]} and E = "
                         f"len(local_experts) * world_size = {n_local} * {world_size}; got "
                         f"shape {tuple(w_gate.shape)}")
    weights, indices = top_k_gating(x @ w_gate, k)  # (T, K), (T, K)
    return expert_parallel_sparse_moe(x, local_experts, weights, indices, group)


class ExpertParallelMoE(nn.Module):
    """`MoEFeedForward`'s top-k layer with its experts split over the ranks of `group`.

    Each rank holds a replica of the router `gate` (`nn.Linear(D, E, bias=False)`, as in
    `MoEFeedForward`) and `experts`, its block of `E / W` `Expert`s (global ids
    `self.expert_ids`). Dropless: no capacity, every assignment is computed. The forward
    returns an `MoEOutput` computed on this rank's tokens (losses and `expert_load` too; the
    Switch loss of all ranks' tokens together needs `f` and `P` all-reduced first, since it
    is not the mean of the per-rank losses).

    The router must be identical on every rank: build the layer with
    `ExpertParallelMoE.from_layer(MoEFeedForward(...))` after the same `torch.manual_seed`
    on every rank (the usual way, and the way to compare with the single-process layer), or
    seed identically before the constructor. Its gradient must be summed over ranks
    (`dist.all_reduce`) before an optimiser step, as data parallelism does.

    >>> _ = torch.manual_seed(0)
    >>> dense = MoEFeedForward(d_model=8, d_hidden=16, n_experts=4, k=2)
    >>> layer = ExpertParallelMoE.from_layer(dense)  # no process group: W = 1, all local
    >>> x = torch.randn(2, 5, 8)
    >>> torch.allclose(layer(x).y, dense(x).y, atol=1e-6)
    True
    """

    def __init__(self, d_model: int, d_hidden: int, n_experts: int, k: int = 2,
                 group: Any = None) -> None:
        super().__init__()
        positive_int("d_model", d_model)
        positive_int("d_hidden", d_hidden)
        self.n_experts = positive_int("n_experts", n_experts)
        self.k = positive_int("k", k, maximum=n_experts)
        self.group = group
        self.rank, self.world_size = _world(group)
        self.expert_ids = local_expert_range(self.rank, n_experts, self.world_size)
        self.gate = nn.Linear(d_model, n_experts, bias=False)  # W_g, replicated
        self.experts = nn.ModuleList(Expert(d_model, d_hidden) for _ in self.expert_ids)

    @classmethod
    def from_layer(cls, layer: MoEFeedForward, group: Any = None) -> ExpertParallelMoE:
        """This rank's shard of a single-process `MoEFeedForward`: a copy of its router and
        of the experts in `local_expert_range(rank, E, W)`; `layer` is left untouched."""
        if not isinstance(layer, MoEFeedForward):
            raise ValueError(f"layer must be a MoEFeedForward; got {type(layer).__name__}")
        if layer.router != "top_k" or layer.capacity_factor is not None:
            raise ValueError("ExpertParallelMoE is a dropless top-k layer: layer must have "
                             f"router='top_k' and capacity_factor=None; got router="
                             f"{layer.router!r}, capacity_factor={layer.capacity_factor!r}")
        first = layer.experts[0]
        with torch.random.fork_rng(devices=[]):  # the throw-away init must not move the RNG
            shard = cls(first.w_in.in_features, first.w_in.out_features, layer.n_experts,
                        layer.k, group)
        shard.gate = copy.deepcopy(layer.gate)
        shard.experts = nn.ModuleList(copy.deepcopy(layer.experts[e]) for e in shard.expert_ids)
        return shard

    def forward(self, x: Tensor) -> MoEOutput:
        flat = token_rows(x, self.gate.in_features)  # (T, D)
        logits = self.gate(flat)  # (T, E)
        weights, indices = top_k_gating(logits, self.k)  # (T, K), (T, K)
        y = expert_parallel_sparse_moe(flat, self.experts, weights, indices, self.group)  # (T, D)
        if flat.shape[0]:
            aux_loss = switch_aux_loss(torch.softmax(logits, dim=-1), indices)
            z_loss = router_z_loss(logits)
        else:  # a rank with no tokens contributes nothing
            aux_loss = z_loss = logits.sum() * 0
        load = F.one_hot(indices.reshape(-1), self.n_experts).sum(0)  # (E,)
        routing = TokenChoice(weights, indices, torch.ones_like(indices, dtype=torch.bool))
        return MoEOutput(y.reshape(x.shape), aux_loss, z_loss, logits, routing, load.to(x.dtype))


# --------------------------------------------------------------------------------------
# Communication volume
# --------------------------------------------------------------------------------------

class CommVolume(NamedTuple):
    """Output of `communication_volume`: what the dispatch all-to-all moves, rank to rank.

    Row `s`, column `d` is what rank `s` sends to rank `d`; the diagonal stays on its rank
    (a local copy, no link). The combine exchange sends the transpose back, so a layer's
    forward moves twice this, and its backward the same again.
    """

    rows: Tensor  # (W, W) int64 rows sent, padding included
    useful: Tensor  # (W, W) int64 of those, rows that carry a kept assignment
    bytes: Tensor  # (W, W) int64 rows * d_model * bytes_per_element


def communication_volume(indices: Tensor, n_experts: int, world_size: int, d_model: int,
                         capacity_factor: float | None = None,
                         bytes_per_element: int = 4) -> CommVolume:
    """Rows and bytes each rank sends each rank when the tokens of `indices` are exchanged.

    `indices` `(T, K)` is the routing of all ranks' tokens together; rank `s` holds the
    `s`-th piece of `torch.tensor_split(range(T), W)`. `capacity_factor=None` is the
    dropless exchange of `expert_parallel_sparse_moe`: exactly the assignments are sent.
    A number gives GShard's fixed-shape exchange (arXiv 2006.16668, Sec. 2.2): every rank
    sends each expert a buffer of `C = expert_capacity(T_s, E, capacity_factor, K)` rows
    (computed on the rank's own `T_s` tokens), padded when fewer arrive and dropping
    assignments past `C` (GShard priority, `capacity_positions`), so `rows` grows linearly
    with the factor while `useful` saturates at the dropless count.

    >>> indices = torch.tensor([[0, 1], [0, 2], [3, 0], [1, 0]])  # T = 4, K = 2, E = 4
    >>> communication_volume(indices, n_experts=4, world_size=2, d_model=8).rows
    tensor([[3, 1],
            [3, 1]])
    >>> v = communication_volume(indices, 4, 2, d_model=8, capacity_factor=1.0)  # C = 1
    >>> v.rows  # E/W = 2 buffers of C = 1 row for every rank pair
    tensor([[2, 2],
            [2, 2]])
    >>> v.useful  # rank 0 -> rank 0: one of three dropped; rank 0 -> rank 1: one padding row
    tensor([[2, 1],
            [2, 1]])
    >>> int(v.bytes[0, 1])  # 2 rows of 8 float32 values
    64
    """
    per_rank = _check_indices(indices, n_experts, world_size)
    d = positive_int("d_model", d_model)
    nbytes = positive_int("bytes_per_element", bytes_per_element)
    if capacity_factor is not None:
        positive_float("capacity_factor", capacity_factor)
    k = indices.shape[1]
    rows = torch.zeros(world_size, world_size, dtype=torch.int64)  # (W, W)
    useful = torch.zeros(world_size, world_size, dtype=torch.int64)  # (W, W)
    for s, shard in enumerate(torch.tensor_split(indices.long(), world_size)):  # (T_s, K)
        if capacity_factor is None:
            keep = torch.ones_like(shard, dtype=torch.bool)  # (T_s, K)
        elif shard.shape[0] == 0:
            continue  # no tokens, no buffers
        else:
            capacity = expert_capacity(shard.shape[0], n_experts, capacity_factor, k)
            keep = capacity_positions(shard, n_experts) < capacity  # (T_s, K)
            rows[s] = per_rank * capacity
        useful[s] = send_counts(shard[keep].reshape(-1, 1), n_experts, world_size)  # (W,)
        if capacity_factor is None:
            rows[s] = useful[s]
    return CommVolume(rows, useful, rows * d * nbytes)


# --------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _plain(value: Any) -> Any:
    """Named tuples become dicts so results load with `weights_only=True`."""
    if isinstance(value, tuple) and hasattr(value, "_asdict"):
        return {key: _plain(v) for key, v in value._asdict().items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, dict):
        return {key: _plain(v) for key, v in value.items()}
    if isinstance(value, Tensor):
        return value.detach()
    return value


def _worker(fn: Callable[..., Any], rank: int, world_size: int, port: int, folder: str,
            args: tuple, timeout: float, threads: int) -> None:
    """Entry point of one spawned process: join the group, run `fn`, save its result."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(threads)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout))
        result = fn(rank, world_size, *args)
        partial = os.path.join(folder, f"result_{rank}.pt.partial")
        torch.save(_plain(result), partial)
        os.replace(partial, os.path.join(folder, f"result_{rank}.pt"))
        dist.destroy_process_group()
    except BaseException:  # noqa: B036 - report everything, then exit non-zero
        with open(os.path.join(folder, f"error_{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        os._exit(1)  # skip teardown that could wait on peers that already died


def _context() -> Any:
    """forkserver where the platform has it (Linux, macOS), else spawn (Windows).

    Both start workers that import `fn` by name. The fork server imports torch once and
    forks every worker from that clean process, so a worker starts in a fraction of a second
    instead of importing torch again (seconds each); spawn starts a fresh interpreter.
    """
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "torch.distributed"])
        return ctx
    return mp.get_context("spawn")


def _describe_fn(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def launch(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120.0,
           threads_per_worker: int = 1) -> list[Any]:
    """Run `fn(rank, world_size, *args)` on `world_size` CPU processes joined by gloo.

    Each process is started by `torch.multiprocessing` (forkserver start method where the
    platform has it, else spawn; both import `fn` afresh by name), joins a process
    group (`init_process_group("gloo")` rendezvousing at a free port on 127.0.0.1 through
    `MASTER_ADDR`/`MASTER_PORT`), runs `fn`, and saves its return value. Returns the results
    in rank order. A result may be tensors, numbers, strings, `None`, and lists, tuples and
    dicts of them (named tuples come back as dicts); results are read back with
    `torch.load(weights_only=True)`, never as arbitrary pickles.

    `fn` must be importable: a function defined at the top level of a module (a `.py` file),
    because each spawned process imports it by name; a function from a notebook cell,
    `__main__`, a lambda or a nested function is refused with a `ValueError`. `args` travel
    by pickling. From a script, call `launch` under `if __name__ == "__main__":`, as for
    any spawned process (a notebook needs no guard).

    If a worker raises, the others are terminated and a `RuntimeError` carries every failed
    rank's traceback. If the run takes longer than `timeout` seconds (start-up included; a
    rank that skips a collective the others call waits forever), all workers are terminated
    and a `TimeoutError` is raised. Collectives inside the workers time out after the same
    number of seconds. Each worker uses `threads_per_worker` intra-op threads, so that `W`
    processes do not oversubscribe the CPU cores.
    """
    w = positive_int("world_size", world_size)
    threads = positive_int("threads_per_worker", threads_per_worker)
    timeout = positive_float("timeout", timeout)
    if not callable(fn):
        raise ValueError(f"fn must be a function; got {type(fn).__name__}")
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", "")
    if module in (None, "__main__", "__mp_main__"):
        raise ValueError(f"fn {qualname or repr(fn)} is defined in __main__ (a notebook cell or a "
                         "script), which spawned processes cannot import: put it in a module "
                         "(a .py file next to the notebook), import it from there, and pass "
                         "the imported function")
    if "<lambda>" in qualname or "<locals>" in qualname:
        raise ValueError(f"fn {module}.{qualname} is a lambda or a nested function, which "
                         "spawned processes cannot import: define it at the top level of a "
                         "module (a .py file) and pass the imported function")

    ctx = _context()
    folder = tempfile.mkdtemp(prefix="moe_launch_")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(fn, rank, w, port, folder, args, timeout, threads),
                         daemon=True, name=f"moe-rank-{rank}") for rank in range(w)]
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.start()
        pending = {p.sentinel: p for p in procs}
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                running = sorted(procs.index(p) for p in pending.values())
                raise TimeoutError(
                    f"launch: {_describe_fn(fn)} on {w} processes did not finish within "
                    f"{timeout:g} s; ranks still running: {running}. A rank that skips a "
                    "collective the others call (or calls them in a different order) makes "
                    "them wait forever.")
            for sentinel in multiprocessing.connection.wait(list(pending), timeout=remaining):
                p = pending.pop(sentinel)
                p.join()
                if p.exitcode != 0:
                    time.sleep(0.2)  # let peers failing at the same moment write their report
                    raise RuntimeError(_failure_report(fn, procs, folder, procs.index(p)))
        results = []
        for rank in range(w):
            results.append(torch.load(os.path.join(folder, f"result_{rank}.pt"),
                                      weights_only=True))
        return results
    finally:
        started = [p for p in procs if p.pid is not None]
        for p in started:
            if p.is_alive():
                p.terminate()
        for p in started:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
        shutil.rmtree(folder, ignore_errors=True)


def _failure_report(fn: Callable[..., Any], procs: list, folder: str, first: int) -> str:
    """Every failed rank's traceback, the rank that failed first at the top."""
    lines = [f"launch: {_describe_fn(fn)} failed on {len(procs)} processes (rank {first} "
             "first; the others were then stopped)"]
    for rank in [first] + [r for r in range(len(procs)) if r != first]:
        p = procs[rank]
        path = os.path.join(folder, f"error_{rank}.txt")
        if os.path.exists(path):
            with open(path) as f:
                lines.append(f"--- rank {rank} raised:\n{f.read().rstrip()}")
        elif p.exitcode not in (None, 0):
            lines.append(f"--- rank {rank} exited with code {p.exitcode} without a Python "
                         "traceback (killed, or out of memory?)")
    return "\n".join(lines)


__all__ = [
    "CommVolume", "ExpertParallelMoE", "RankPermutation", "all_to_all_rows",
    "communication_volume",
    "expert_parallel_forward", "expert_parallel_sparse_moe", "experts_per_rank", "launch",
    "local_expert_range", "permute_for_all_to_all", "send_counts",
]
