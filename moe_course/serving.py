"""Serving a mixture: experts touched per batch, expert caches, offloading, sparse upcycling.

Inference-time questions about a trained top-k mixture (notebook 08):

- `experts_touched` / `expected_experts_touched`: how many distinct experts one batch
  reads; under independent uniform top-k routing `E * (1 - (1 - K/E) ** B)`.
- Expert caches over a routing trace `(N, K)` (one layer, N decode steps, the `K` experts
  each token chose), as in Eliseev & Mazur 2023, *Fast Inference of Mixture-of-Experts
  Language Models with Offloading* (arXiv 2312.17238: an LRU cache per layer):
  `lru_cache_hits`, Belady's offline optimum `optimal_cache_hits`, a static
  "keep the most used" cache `static_cache_hits`. The accesses are served one by one in
  row order (token by token, best expert first). Every policy has `capacity` slots that
  persist between accesses, plus one staging buffer that an expert is loaded into on a
  miss; a policy then decides whether the loaded expert stays, and whom it evicts.
  `CACHE_POLICIES` is the table the notebook and `CacheExplorer` read.
- `offload_time_per_token`: the transfer time of the misses over a host-to-device link,
  with Mixtral 8x7B's sizes (Jiang et al. 2024, arXiv 2401.04088, Table 1) in
  `MIXTRAL_8X7B` and nominal PCIe 4.0 x16 bandwidth in `PCIE4_X16_BYTES_PER_S`.
- `routing_trace` collects the `(L, N, K)` trace of a `CharLM` over a text;
  `next_layer_guess` guesses layer `l + 1`'s experts from layer `l`'s hidden state
  (Eliseev & Mazur's speculative expert loading).
- `upcycle` (Komatsuzaki et al. 2022, *Sparse Upcycling*, arXiv 2212.05055): a
  `MoEFeedForward` whose experts are independent copies of a dense FFN. With renormalised
  top-k weights (they sum to 1) and identical experts, the upcycled layer computes exactly
  the dense layer at step 0, whatever the router.

Shapes: `N` decode steps (tokens of the trace), `K` experts per token, `E` experts, `L` MoE
layers, `B` tokens per batch.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .layers import MoEFeedForward, TopKMoE
from .validation import index_tensor, positive_int

PCIE4_X16_BYTES_PER_S = 32e9
"""Nominal PCIe 4.0 x16 bandwidth, one direction: 16 lanes x 16 GT/s x 128/130 ~ 31.5 GB/s."""


class ModelSizes(NamedTuple):
    """The sizes of a top-k mixture transformer that the offloading cost model needs."""

    n_layers: int  # L, transformer blocks, each with one MoE feed-forward layer
    d_model: int  # D, model width
    d_hidden: int  # H, hidden width of one expert
    n_experts: int  # E, experts per layer
    k: int  # K, experts per token
    total_params: float  # every parameter, as the paper reports it
    active_params: float  # parameters one token uses, as the paper reports it

    @property
    def expert_params(self) -> int:
        """Parameters of one SwiGLU expert: three `D x H` matrices, no biases."""
        return 3 * self.d_model * self.d_hidden


MIXTRAL_8X7B = ModelSizes(n_layers=32, d_model=4096, d_hidden=14336, n_experts=8, k=2,
                          total_params=47e9, active_params=13e9)
"""Mixtral 8x7B (Jiang et al. 2024, arXiv 2401.04088): Table 1 gives dim 4096, hidden_dim
14336, 32 layers, 8 experts, top 2; abstract: 47B parameters, 13B active per token."""


# ---------------------------------------------------------------------------------------------
# Experts touched per batch


def experts_touched(indices: Tensor, n_experts: int) -> int:
    """How many distinct experts one batch activates: `|{indices[t, j]}|`.

    `indices` `(T, K)` are the experts each token of the batch chose; every one of them must
    be read from memory once for the batch, however many tokens share it.

    >>> experts_touched(torch.tensor([[0, 3], [3, 1], [0, 1]]), n_experts=8)
    3
    """
    e = positive_int("n_experts", n_experts)
    index_tensor("indices", indices, ndim=2, shape_hint="(T, K)", upper=e)
    return int(torch.bincount(indices.reshape(-1).long(), minlength=e).gt(0).sum())


def expected_experts_touched(batch: int, n_experts: int, k: int) -> float:
    """Expected distinct experts of a batch of `B` tokens, each routed to `K` of `E` experts
    uniformly and independently: `E * (1 - (1 - K/E) ** B)`.

    One token misses a given expert with probability `1 - K/E`; all `B` miss it with
    probability `(1 - K/E) ** B`; linearity of expectation over the `E` experts.

    >>> round(expected_experts_touched(batch=8, n_experts=8, k=2), 3)
    7.199
    >>> expected_experts_touched(batch=0, n_experts=8, k=2)
    0.0
    """
    b = positive_int("batch", batch, minimum=0)
    e = positive_int("n_experts", n_experts)
    kk = positive_int("k", k, maximum=e)
    return e * (1.0 - (1.0 - kk / e) ** b)


# ---------------------------------------------------------------------------------------------
# Expert caches over a routing trace


def _trace(trace: object) -> list[int]:
    """Validate a `(N, K)` trace; return its accesses in serving order (row-major)."""
    index_tensor("trace", trace, ndim=2, shape_hint="(N, K): per decode step, the chosen experts")
    assert isinstance(trace, Tensor)
    return [int(v) for v in trace.reshape(-1).tolist()]


def _capacity(capacity: object) -> int:
    return positive_int("capacity", capacity, minimum=0)


def lru_hit_mask(trace: Tensor, capacity: int) -> Tensor:
    """Which accesses of `trace` `(N, K)` hit an LRU cache of `capacity` experts, `(N, K)` bool.

    On a hit the expert becomes the most recently used; on a miss it is loaded and cached,
    evicting the least recently used expert when the cache is full (Eliseev & Mazur 2023,
    arXiv 2312.17238). The cache starts empty.

    >>> lru_hit_mask(torch.tensor([[0, 1], [0, 2], [2, 0]]), capacity=2).int().tolist()
    [[0, 0], [1, 0], [1, 1]]
    """
    accesses, c = _trace(trace), _capacity(capacity)
    cache: OrderedDict[int, None] = OrderedDict()  # least recently used first
    hits = []
    for expert in accesses:
        if expert in cache:
            cache.move_to_end(expert)  # a hit refreshes the recency too
            hits.append(True)
            continue
        hits.append(False)
        if c == 0:
            continue
        if len(cache) == c:
            cache.popitem(last=False)  # evict the least recently used
        cache[expert] = None
    return torch.tensor(hits, dtype=torch.bool).reshape(trace.shape)


def next_uses(accesses: list[int]) -> list[float]:
    """For each access, the position of the next access to the same expert (inf if none).

    The look-ahead of every offline cache policy (Belady's optimum and the checks' wrong
    variants of it).

    >>> next_uses([3, 1, 3, 2, 1])
    [2, 4, inf, inf, inf]
    """
    nxt: list[float] = [math.inf] * len(accesses)
    seen: dict[int, int] = {}
    for pos in range(len(accesses) - 1, -1, -1):
        nxt[pos] = seen.get(accesses[pos], math.inf)
        seen[accesses[pos]] = pos
    return nxt


def optimal_hit_mask(trace: Tensor, capacity: int) -> Tensor:
    """Hits of Belady's offline optimum on `trace` `(N, K)`, as an `(N, K)` bool mask.

    After each access the cache keeps, of the experts it held plus the one just used, the
    `capacity` whose next use comes soonest: on a miss with a full cache it evicts the
    expert used furthest in the future, and if that is the requested expert itself, it
    serves it from the staging buffer and caches nothing (Belady 1966, "A study of
    replacement algorithms for a virtual-storage computer", MIN). No policy with
    `capacity` slots scores more hits on the same trace; experts never used again tie,
    and which of them goes does not change the count.

    >>> optimal_hit_mask(torch.tensor([[0, 1], [2, 0], [1, 0]]), capacity=2).int().tolist()
    [[0, 0], [0, 1], [1, 1]]
    """
    accesses, c = _trace(trace), _capacity(capacity)
    nxt = next_uses(accesses)
    cache: dict[int, float] = {}  # expert -> position of its next use
    hits = []
    for pos, expert in enumerate(accesses):
        hits.append(expert in cache)
        if c == 0:
            continue
        cache[expert] = nxt[pos]  # cached now, or a candidate for it (the staging buffer)
        if len(cache) > c:
            # Evict the furthest next use; among ties (never used again) the new expert
            # goes first, then the highest id, so that the result is deterministic.
            victim = max(cache, key=lambda e: (cache[e], e == expert, e))
            del cache[victim]
    return torch.tensor(hits, dtype=torch.bool).reshape(trace.shape)


def static_hit_mask(trace: Tensor, capacity: int, counts: Tensor | None = None) -> Tensor:
    """Hits of a static cache on `trace` `(N, K)` that keeps the `capacity` most used experts.

    The kept experts are the `capacity` largest of `counts` `(E,)` (how often each expert
    was used on calibration data; default: on `trace` itself, an optimistic oracle; ties
    go to the lower id). A kept expert is loaded on its first use (a miss) and then stays;
    any other expert is streamed through the staging buffer on every use (always a miss).

    >>> static_hit_mask(torch.tensor([[0, 1], [2, 0], [1, 0]]), capacity=1).int().tolist()
    [[0, 0], [0, 1], [0, 1]]
    """
    accesses, c = _trace(trace), _capacity(capacity)
    if counts is None:
        n = max(accesses, default=-1) + 1
        counts = torch.bincount(trace.reshape(-1).long(), minlength=n)  # (E,)
    elif not isinstance(counts, Tensor) or counts.dim() != 1 or counts.is_complex():
        raise ValueError(f"counts must be a 1-D tensor (E,) of usage counts or None; got "
                         f"{counts!r:.80}")
    elif accesses and max(accesses) >= counts.shape[0]:
        raise ValueError(f"counts must have one entry per expert: trace uses expert "
                         f"{max(accesses)} but counts has shape {tuple(counts.shape)}")
    order = sorted(range(counts.shape[0]), key=lambda e: (-float(counts[e]), e))
    kept = set(order[:c])
    loaded: set[int] = set()
    hits = []
    for expert in accesses:
        hits.append(expert in loaded)
        if expert in kept:
            loaded.add(expert)
    return torch.tensor(hits, dtype=torch.bool).reshape(trace.shape)


def lru_cache_hits(trace: Tensor, capacity: int) -> int:
    """Hits of an LRU expert cache of `capacity` experts over `trace` `(N, K)`.

    >>> lru_cache_hits(torch.tensor([[0, 1], [0, 2], [2, 0]]), capacity=2)
    3
    """
    return int(lru_hit_mask(trace, capacity).sum())


def optimal_cache_hits(trace: Tensor, capacity: int) -> int:
    """Hits of Belady's offline optimum (see `optimal_hit_mask`) over `trace` `(N, K)`.

    >>> optimal_cache_hits(torch.tensor([[0, 1], [2, 0], [1, 0]]), capacity=2)
    3
    """
    return int(optimal_hit_mask(trace, capacity).sum())


def static_cache_hits(trace: Tensor, capacity: int, counts: Tensor | None = None) -> int:
    """Hits of the static most-used cache (see `static_hit_mask`) over `trace` `(N, K)`.

    >>> static_cache_hits(torch.tensor([[0, 1], [2, 0], [1, 0]]), capacity=1)
    2
    """
    return int(static_hit_mask(trace, capacity, counts).sum())


CACHE_POLICIES: dict[str, Callable[[Tensor, int], Tensor]] = {
    "LRU": lru_hit_mask,
    "static (most used)": static_hit_mask,
    "Belady (optimal)": optimal_hit_mask,
}
"""Cache policies by name: each maps `(trace (N, K), capacity)` to the `(N, K)` hit mask."""


def hit_rate_curve(trace: Tensor, policy: str, capacities: list[int]) -> Tensor:
    """Hit rate of `policy` (a key of `CACHE_POLICIES`) at each capacity, `(len(capacities),)`.

    >>> hit_rate_curve(torch.tensor([[0, 1], [0, 1]]), "LRU", [0, 2]).tolist()
    [0.0, 0.5]
    """
    if policy not in CACHE_POLICIES:
        raise ValueError(f"policy must be one of {list(CACHE_POLICIES)}; got {policy!r}")
    n = max(int(trace.numel()) if isinstance(trace, Tensor) else 0, 1)
    return torch.tensor([float(CACHE_POLICIES[policy](trace, c).sum()) / n for c in capacities])


# ---------------------------------------------------------------------------------------------
# Offloading cost


def offload_time_per_token(misses: float, expert_bytes: float, bandwidth: float) -> float:
    """Seconds per token spent copying missed experts to the accelerator:
    `misses * expert_bytes / bandwidth`.

    `misses` is the number of expert loads per token (all layers, possibly an average),
    `expert_bytes` the size of one expert in bytes, `bandwidth` the link's bytes per second.
    The copies are assumed serial and not overlapped with compute (an upper bound that
    prefetching attacks).

    >>> offload_time_per_token(misses=64, expert_bytes=352e6, bandwidth=32e9)
    0.704
    """
    for name, value, minimum in (("misses", misses, 0.0), ("expert_bytes", expert_bytes, 0.0)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not minimum <= value < math.inf:
            raise ValueError(f"{name} must be a finite number >= 0; got {value!r}")
    if isinstance(bandwidth, bool) or not isinstance(bandwidth, (int, float)) \
            or not 0 < bandwidth < math.inf:
        raise ValueError(f"bandwidth must be a finite number > 0 (bytes per second); got "
                         f"{bandwidth!r}")
    return misses * expert_bytes / bandwidth


# ---------------------------------------------------------------------------------------------
# Routing traces of a model


def _moe_layers(model: nn.Module) -> list[nn.Module]:
    """The top-k MoE feed-forward layers of a `CharLM`: `MoEFeedForward(router="top_k")` or
    the fast `TopKMoE`, which computes the same layer (both have `.gate` and `.k`)."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(model, nn.Module) or blocks is None:
        raise ValueError(f"model must be a CharLM (with .blocks); got {type(model).__name__}")
    ffns = [getattr(b, "ffn", None) for b in blocks]
    layers = [f for f in ffns if isinstance(f, TopKMoE)
              or (isinstance(f, MoEFeedForward) and f.router == "top_k")]
    if not layers or len(layers) != sum(isinstance(f, (MoEFeedForward, TopKMoE)) for f in ffns):
        raise ValueError("model must have top-k MoE feed-forward layers (MoEFeedForward with "
                         f"router='top_k', or TopKMoE); got {[type(f).__name__ for f in ffns]}")
    return layers


def _windows(model: nn.Module, ids: object) -> list[Tensor]:
    index_tensor("ids", ids, ndim=1, shape_hint="(N,) token ids",
                 upper=model.config.vocab_size)  # type: ignore[union-attr]
    assert isinstance(ids, Tensor)
    if ids.numel() == 0:
        raise ValueError("ids must hold at least one token; got shape (0,)")
    return list(ids.long().split(model.config.seq_len))  # type: ignore[union-attr]


def routing_trace(model: nn.Module, ids: Tensor) -> Tensor:
    """The routing trace of `model` (a `CharLM` whose feed-forward blocks are top-k
    `MoEFeedForward`s or `TopKMoE`s) over `ids` `(N,)`.

    The text is read in consecutive windows of `seq_len` tokens; token `t` of a window sees
    the window's earlier tokens, as a decoder generating that window would. Returns
    `(L, N, K)` int64: per MoE layer, per token in text order, the experts it chose, best
    first. Runs without gradients in eval mode and restores the model's mode.

    >>> from moe_course.transformer import CharLM, LMConfig
    >>> torch.manual_seed(0) is not None
    True
    >>> lm = CharLM(LMConfig(vocab_size=5, seq_len=4, d_model=8, n_heads=2),
    ...             lambda i: MoEFeedForward(8, 16, n_experts=4, k=2))
    >>> routing_trace(lm, torch.tensor([1, 2, 3, 4, 0, 1])).shape
    torch.Size([2, 6, 2])
    """
    layers = _moe_layers(model)
    windows = _windows(model, ids)
    was_training = model.training
    model.eval()
    traces: list[list[Tensor]] = [[] for _ in layers]
    try:
        with torch.no_grad():
            for window in windows:
                out = model(window[None])  # (1, S)
                for layer, moe in enumerate(out.moe_outputs):
                    traces[layer].append(moe.routing.indices)  # (S, K)
    finally:
        model.train(was_training)
    return torch.stack([torch.cat(t) for t in traces])  # (L, N, K)


def next_layer_guess(model: nn.Module, ids: Tensor) -> Tensor:
    """Guess each MoE layer's experts from the previous block's hidden state, `(L-1, N, K)`.

    Eliseev & Mazur (arXiv 2312.17238) apply layer `l + 1`'s router to the hidden
    state that layer `l` receives, so that the experts of layer `l + 1` can be loaded while
    layer `l` computes. Here: block `l + 1`'s `ln_2` and `gate` on the residual stream that
    enters block `l`'s feed-forward (the input of its `ln_2`), top-`K` of the logits. Compare with
    `routing_trace(model, ids)[1:]`.

    >>> from moe_course.transformer import CharLM, LMConfig
    >>> lm = CharLM(LMConfig(vocab_size=5, seq_len=4, d_model=8, n_heads=2),
    ...             lambda i: MoEFeedForward(8, 16, n_experts=4, k=2))
    >>> next_layer_guess(lm, torch.tensor([1, 2, 3, 4, 0])).shape
    torch.Size([1, 5, 2])
    """
    layers = _moe_layers(model)
    blocks = list(model.blocks)  # type: ignore[union-attr]
    if len(layers) != len(blocks) or len(blocks) < 2:
        raise ValueError("next_layer_guess needs a model whose every block (at least two) has "
                         "a top-k MoE feed-forward layer")
    windows = _windows(model, ids)
    hidden: list[Tensor] = []
    # The residual stream entering block l's feed-forward (the input of its ln_2).
    hooks = [b.ln_2.register_forward_pre_hook(lambda m, inp: hidden.append(inp[0]))
             for b in blocks[:-1]]
    was_training = model.training
    model.eval()
    guesses: list[list[Tensor]] = [[] for _ in blocks[:-1]]
    try:
        with torch.no_grad():
            for window in windows:
                hidden.clear()
                model(window[None])
                for layer, h in enumerate(hidden):  # (1, S, D) residual before block l's FFN
                    nxt = blocks[layer + 1]
                    logits = nxt.ffn.gate(nxt.ln_2(h[0]))  # (S, E) layer l+1's router
                    guesses[layer].append(logits.topk(nxt.ffn.k, dim=-1).indices)  # (S, K)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return torch.stack([torch.cat(g) for g in guesses])  # (L-1, N, K)


def prefetch_recall(guess: Tensor, actual: Tensor) -> float:
    """Fraction of the experts in `actual` `(..., K)` that `guess` `(..., K')` also named.

    >>> prefetch_recall(torch.tensor([[0, 1], [2, 3]]), torch.tensor([[1, 0], [2, 0]]))
    0.75
    """
    index_tensor("guess", guess, shape_hint="(..., K')")
    index_tensor("actual", actual, shape_hint="(..., K)")
    if guess.shape[:-1] != actual.shape[:-1] or actual.numel() == 0:
        raise ValueError(f"guess and actual must agree in every dimension but the last; got "
                         f"{tuple(guess.shape)} and {tuple(actual.shape)}")
    found = (actual[..., :, None] == guess[..., None, :]).any(-1)  # (..., K)
    return float(found.float().mean())


# ---------------------------------------------------------------------------------------------
# Sparse upcycling


def upcycle(dense_ffn: nn.Module, n_experts: int, k: int, *, router_std: float = 0.02,
            seed: int = 0) -> MoEFeedForward:
    """A top-`k` `MoEFeedForward` of `n_experts` independent copies of `dense_ffn`
    (Komatsuzaki et al. 2022, Sparse Upcycling, arXiv 2212.05055).

    `dense_ffn` is the dense feed-forward block (an `Expert`, `(..., D) -> (..., D)`, with
    `w_in = nn.Linear(D, H)`). Each expert is a deep copy: its own parameters, equal to the
    dense ones at step 0, free to diverge in training. The router `W_g` is new, drawn from
    `N(0, router_std^2)` with a generator seeded by `seed` (deterministic, and tie-free with
    probability 1). Because every expert computes the same function and the renormalised
    top-k weights sum to 1, `y = sum_j w_j f(x) = f(x)`: the upcycled layer computes
    exactly the dense layer at step 0, whatever the router says.

    >>> from moe_course.experts import Expert
    >>> dense = Expert(4, 8)
    >>> moe = upcycle(dense, n_experts=4, k=2)
    >>> x = torch.randn(5, 4)
    >>> torch.allclose(moe(x).y, dense(x), atol=1e-6), moe.experts[0] is moe.experts[1]
    (True, False)
    """
    if not isinstance(dense_ffn, nn.Module) or not isinstance(
            getattr(dense_ffn, "w_in", None), nn.Linear):
        raise TypeError(f"dense_ffn must be a dense feed-forward nn.Module with w_in = "
                        f"nn.Linear(D, H) (an Expert); got {type(dense_ffn).__name__}")
    e = positive_int("n_experts", n_experts)
    kk = positive_int("k", k, maximum=e)
    if isinstance(router_std, bool) or not isinstance(router_std, (int, float)) \
            or not 0 <= router_std < math.inf:
        raise ValueError(f"router_std must be a finite number >= 0; got {router_std!r}")
    d_model, d_hidden = dense_ffn.w_in.in_features, dense_ffn.w_in.out_features
    weight = dense_ffn.w_in.weight
    moe = MoEFeedForward(d_model, d_hidden, e, k=kk)
    moe.experts = nn.ModuleList(copy.deepcopy(dense_ffn) for _ in range(e))  # independent
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w_g = torch.randn(e, d_model, generator=g) * router_std  # (E, D)
        moe.gate.weight.copy_(w_g)
    return moe.to(device=weight.device, dtype=weight.dtype)
