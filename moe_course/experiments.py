"""Seeded, few-second experiments that the notebooks run to show their lessons in numbers.

Each runner trains a small model from a seed and returns plain numbers, so a notebook can
run it over three seeds and show a band (`band`) rather than one lucky run:

- `clusters_task` and `train_balancing`: a noisy top-k layer (Shazeer et al. 2017, arXiv
  1701.06538, eq. 3-5) trained on a task of more clusters than a collapsed router can
  serve, with no balancing loss, the importance loss, importance plus load (their
  Appendix A, Table 6) or the Switch loss (Fedus et al. 2021, arXiv 2101.03961, eq. 4-6),
  optionally under a capacity limit; it reports CV(importance), CV(load), max/mean load,
  the dropped share and the validation loss;
- `BiasedTopKMoE` and `train_lm_balancing`: a character LM whose MoE layers route with
  sigmoid affinities and DeepSeek-V3's biased top-k (arXiv 2412.19437, eq. 13-16), trained
  with an auxiliary loss, with the auxiliary-loss-free bias update, or with neither.

The learner's own functions (losses, `biased_top_k`, `aux_free_bias_update`) are passed in,
so the notebooks train what the learner wrote; the defaults are the package's references.
Under grading (`train.fast_mode()`) every runner trains `train.FAST_STEPS` steps at most.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import losses as _losses
from .capacity import apply_capacity, expert_capacity
from .data import CharCorpus
from .experts import Expert
from .gating import noisy_logits as _noisy_logits
from .layers import MoEOutput, TokenChoice
from .modern import aux_free_bias_update as _bias_update
from .modern import biased_top_k as _biased_top_k
from .routing import sparse_moe
from .train import FAST_STEPS, History, fast_mode, train
from .transformer import CharLM, LMConfig
from .validation import positive_int


class Band(NamedTuple):
    """One measurement over several seeds: mean, smallest and largest value."""

    mean: float  # mean over the seeds
    low: float  # smallest value
    high: float  # largest value
    values: tuple[float, ...]  # one value per seed, in seed order

    def __str__(self) -> str:
        return f"{self.mean:.3g} [{self.low:.3g}, {self.high:.3g}]"

    def overlaps(self, other: Band) -> bool:
        """True when the two ranges share a point: the seeds do not separate them."""
        return self.low <= other.high and other.low <= self.high


def band(values: Sequence[float]) -> Band:
    """The `Band` of one measurement over seeds.

    >>> b = band([0.2, 0.1, 0.3])
    >>> round(b.mean, 6), b.low, b.high, str(b)
    (0.2, 0.1, 0.3, '0.2 [0.1, 0.3]')
    >>> band([1.0]).overlaps(band([0.5, 2.0]))
    True
    """
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise ValueError(f"values must be a non-empty sequence of numbers; got {values!r:.80}")
    floats = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
            raise ValueError(f"values must be numbers (not NaN); got {v!r} in {values!r:.80}")
        floats.append(float(v))
    return Band(sum(floats) / len(floats), min(floats), max(floats), tuple(floats))


def over_seeds(run: Callable[[int], Mapping[str, float]],
               seeds: Sequence[int] = (0, 1, 2)) -> dict[str, Band]:
    """Call `run(seed)` for each seed; each returns `{name: number}`; band each name.

    >>> over_seeds(lambda s: {"x": float(s), "y": 2.0 * s}, seeds=(1, 2))["y"]
    Band(mean=3.0, low=2.0, high=4.0, values=(2.0, 4.0))
    """
    if not callable(run):
        raise ValueError(f"run must be a callable run(seed) -> {{name: number}}; got "
                         f"{type(run).__name__}")
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Sequence) or not seeds:
        raise ValueError(f"seeds must be a non-empty sequence of ints; got {seeds!r:.80}")
    results = [dict(run(seed)) for seed in seeds]
    names = list(results[0])
    for seed, r in zip(seeds, results, strict=True):
        if list(r) != names:
            raise ValueError(f"run(seed) must return the same names for every seed; seed "
                             f"{seed} gave {sorted(r)}, seed {seeds[0]} gave {sorted(names)}")
    return {name: band([r[name] for r in results]) for name in names}


def steps_for(steps: int) -> int:
    """`steps`, or `FAST_STEPS` when grading: the training length a runner really uses."""
    steps = positive_int("steps", steps)
    return min(steps, FAST_STEPS) if fast_mode() else steps


# ----------------------------------------------------------------------------------------
# Notebook 03: collapse that hurts, and Shazeer's Table 6 in miniature


class ClustersData(NamedTuple):
    """Points around `G` cluster centres, each cluster with its own linear target."""

    x: Tensor  # (N, D) inputs
    y: Tensor  # (N, 1) targets, y = x @ a_g for the point's cluster g
    cluster: Tensor  # (N,) int64 cluster of each point


def clusters_task(n_samples: int, n_clusters: int = 8, d_model: int = 8, seed: int = 0,
                  task_seed: int = 1234, offset: float = 10.0) -> ClustersData:
    """`n_samples` points around `n_clusters` well-separated centres in `R^d_model`.

    Cluster `g` has its own random linear target `y = x @ a_g`: one small expert fits one
    cluster well, but not many at once, so a router that sends most clusters to a few experts
    costs quality. `task_seed` fixes the centres and targets (the task), `seed` the sample.

    >>> d = clusters_task(5, n_clusters=3, d_model=4)
    >>> d.x.shape, d.y.shape, d.cluster.shape
    (torch.Size([5, 4]), torch.Size([5, 1]), torch.Size([5]))
    """
    n_samples = positive_int("n_samples", n_samples)
    n_clusters = positive_int("n_clusters", n_clusters)
    d_model = positive_int("d_model", d_model)
    for name, value in (("seed", seed), ("task_seed", task_seed)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0; got {value!r}")
    task = torch.Generator().manual_seed(task_seed)
    # a large offset shared by every centre, as hidden states share a large mean direction:
    # whatever raises one expert's logit along it raises it for every token (rich get richer)
    common = offset * torch.ones(d_model) / math.sqrt(d_model)  # (D,)
    centres = common + 2.0 * torch.randn(n_clusters, d_model, generator=task)  # (G, D)
    targets = torch.randn(n_clusters, d_model, generator=task)  # (G, D) a_g
    g = torch.Generator().manual_seed(seed)
    cluster = torch.randint(0, n_clusters, (n_samples,), generator=g)  # (N,)
    x = centres[cluster] + torch.randn(n_samples, d_model, generator=g)  # (N, D)
    y = (x * targets[cluster]).sum(-1, keepdim=True) / math.sqrt(d_model)  # (N, 1)
    return ClustersData(x, y, cluster)


class NoisyTopKRegressor(nn.Module):
    """A noisy top-k layer (Shazeer et al. eq. 3-5) of small experts and a linear readout.

    The router weights start at zero (their Appendix A: "no signal and some noise"), so the
    first choices are made by the noise alone. With `capacity_factor` set, an expert takes at
    most `expert_capacity(T, E, factor, k)` assignments per batch and the rest are dropped
    (their output is 0), as in Switch and GShard.
    """

    def __init__(self, d_model: int, d_hidden: int, n_experts: int, k: int = 2,
                 capacity_factor: float | None = None) -> None:
        super().__init__()
        self.k = positive_int("k", k, maximum=n_experts)
        self.capacity_factor = capacity_factor
        e, d, h = n_experts, d_model, d_hidden
        self.w_in = nn.Parameter(torch.empty(e, d, h).uniform_(-1, 1) / math.sqrt(d))  # (E, D, H)
        self.b_in = nn.Parameter(torch.zeros(e, h))  # (E, H)
        self.w_out = nn.Parameter(torch.empty(e, h, d).uniform_(-1, 1) / math.sqrt(h))  # (E, H, D)
        self.w_gate = nn.Parameter(torch.zeros(d_model, n_experts))  # (D, E)
        self.w_noise = nn.Parameter(torch.zeros(d_model, n_experts))  # (D, E)
        self.readout = nn.Linear(d_model, 1)


class BalancingRun(NamedTuple):
    """What `train_balancing` measured on the validation set after training."""

    val_loss: float  # mean squared error of the readout, dropped assignments contributing 0
    cv_importance: float  # CV of Importance = gate weight per expert (Shazeer eq. 6), std/mean
    cv_load: float  # CV of the number of assignments per expert (before capacity)
    max_over_mean: float  # busiest expert's assignments over the mean
    dropped: float  # share of the T*K assignments dropped at capacity factor `eval_capacity`
    val_loss_capped: float  # validation loss with that capacity (dropped assignments give 0)
    load: Tensor  # (E,) share of the assignments per expert, summing to 1
    loss_curve: Tensor  # (steps,) training loss (task part only)


BALANCING = ("none", "importance", "importance + load", "switch")
"""The balancing variants `train_balancing` knows, as in Shazeer's Table 6 plus Switch."""


def _cv(v: Tensor) -> float:
    return float(v.std(correction=0) / v.mean().clamp_min(1e-12))


def _route(model: NoisyTopKRegressor, x: Tensor, noise: Tensor | None,
           noisy_fn: Callable[..., Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    clean = x @ model.w_gate  # (T, E)
    logits = noisy_fn(x, model.w_gate, model.w_noise, noise)  # (T, E) eq. 4
    top, indices = logits.topk(model.k, dim=-1)  # (T, K), (T, K)
    weights = torch.softmax(top, dim=-1)  # (T, K) eq. 3
    keep = torch.ones_like(indices, dtype=torch.bool)  # (T, K)
    if model.capacity_factor is not None:
        capacity = expert_capacity(x.shape[0], model.w_gate.shape[1], model.capacity_factor,
                                   model.k)
        weights, keep = apply_capacity(weights, indices, capacity)  # (T, K), (T, K)
    return clean, logits, weights, indices, keep


def _forward(model: NoisyTopKRegressor, x: Tensor, weights: Tensor, indices: Tensor) -> Tensor:
    # Every expert on every row, then keep each row's chosen ones: the same output as a
    # sparse dispatch (unchosen experts get weight 0), and faster for experts this small.
    h = F.gelu(torch.einsum("td,edh->teh", x, model.w_in) + model.b_in)  # (T, E, H)
    outs = torch.einsum("teh,ehd->ted", h, model.w_out)  # (T, E, D)
    chosen = outs.gather(1, indices[:, :, None].expand(-1, -1, x.shape[1]))  # (T, K, D)
    return model.readout((weights[:, :, None] * chosen).sum(1))  # (T, 1)


def train_balancing(balancing: str, seed: int = 0, steps: int = 200, n_experts: int = 8,
                    k: int = 2, d_hidden: int = 8, capacity_factor: float | None = None,
                    n_clusters: int = 8, batch_size: int = 128, lr: float = 1e-2,
                    w_importance: float = 0.1, w_load: float = 0.1, alpha: float = 0.1,
                    losses: Mapping[str, Callable[..., Tensor]] | None = None,
                    noisy_logits: Callable[..., Tensor] | None = None,
                    eval_capacity: float = 1.0) -> BalancingRun:
    """Train a `NoisyTopKRegressor` on `clusters_task` with one balancing variant.

    `balancing` is one of `BALANCING`: "none"; "importance" (`w_importance *
    CV(Importance)^2`, Shazeer eq. 6-7); "importance + load" (plus `w_load * CV(Load)^2`,
    their smooth load estimator, eq. 8-11); "switch" (`alpha * E sum_e f_e P_e`, Fedus et
    al. eq. 4, on the softmax of the noisy logits). `losses` may supply the learner's
    `importance_loss`, `load_loss` and `switch_aux_loss` under those names, `noisy_logits`
    the learner's eq. 4. Everything is seeded by `seed`: the model, the batches, the noise.
    Metrics are measured on a fixed validation sample of 2048 points without noise, once
    without a capacity and once with capacity factor `eval_capacity`, which shows what the
    routing would drop (and cost) on hardware with fixed expert buffers.
    """
    if balancing not in BALANCING:
        raise ValueError(f"balancing must be one of {BALANCING}; got {balancing!r}")
    fns = {"importance_loss": _losses.importance_loss, "load_loss": _losses.load_loss,
           "switch_aux_loss": _losses.switch_aux_loss, **dict(losses or {})}
    noisy_fn = noisy_logits or _noisy_logits
    n_steps = steps_for(steps)
    val = clusters_task(2048, n_clusters=n_clusters, seed=10_000)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = NoisyTopKRegressor(val.x.shape[1], d_hidden, n_experts, k, capacity_factor)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        curve = []
        for step in range(n_steps):
            batch = clusters_task(batch_size, n_clusters=n_clusters, seed=seed * 100_003 + step)
            noise = torch.randn(batch_size, n_experts)  # (T, E)
            clean, logits, weights, indices, keep = _route(model, batch.x, noise, noisy_fn)
            task = F.mse_loss(_forward(model, batch.x, weights, indices), batch.y)
            loss = task
            if balancing in ("importance", "importance + load"):
                gates = torch.zeros_like(logits).scatter(1, indices, weights)  # (T, E)
                loss = loss + fns["importance_loss"](gates, w_importance)
            if balancing == "importance + load":
                std = F.softplus(batch.x @ model.w_noise)  # (T, E)
                loss = loss + fns["load_loss"](clean, logits, std, k, w_load)
            if balancing == "switch":
                loss = loss + alpha * fns["switch_aux_loss"](torch.softmax(logits, -1), indices)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            curve.append(float(task.detach()))
        with torch.no_grad():
            _, logits, weights, indices, keep = _route(model, val.x, None, noisy_fn)
            val_loss = float(F.mse_loss(_forward(model, val.x, weights, indices), val.y))
            gates = torch.zeros_like(logits).scatter(1, indices, weights)  # (T, E)
            counts = torch.bincount(indices.reshape(-1), minlength=n_experts).float()  # (E,)
            capacity = expert_capacity(val.x.shape[0], n_experts, eval_capacity, k)
            capped, keep = apply_capacity(weights, indices, capacity)  # (T, K), (T, K)
            val_capped = float(F.mse_loss(_forward(model, val.x, capped, indices), val.y))
    return BalancingRun(val_loss, _cv(gates.sum(0)), _cv(counts),
                        float(counts.max() / counts.mean()), float(1 - keep.float().mean()),
                        val_capped, counts / counts.sum(), torch.tensor(curve))


# ----------------------------------------------------------------------------------------
# Notebook 07: a character LM balanced by an auxiliary loss, by the bias, or not at all


class BiasedTopKMoE(nn.Module):
    """An MoE feed-forward layer routed as in DeepSeek-V3 (arXiv 2412.19437, eq. 13-16).

    Affinities `s = sigmoid(x @ W_g)` (eq. 15); the experts are the top `k` of `s + bias`
    (eq. 16), weighted by their *unbiased* `s` normalised over the chosen (eq. 13). `bias` is
    a buffer, never a parameter: no gradient reaches it; `update_bias` moves it. `select`
    is the selection function `select(scores, bias, k) -> (weights, indices)`, by default
    `moe_course.modern.biased_top_k`. The layer returns `layers.MoEOutput`, whose
    `aux_loss` is the Switch-form balance loss on the affinities normalised over all
    experts (`E sum_e f_e P_e`, DeepSeek-V3 eq. 17-20 taken over the batch instead of
    each sequence) and whose `expert_load` counts each expert's assignments.
    """

    def __init__(self, d_model: int, d_hidden: int, n_experts: int, k: int = 2,
                 select: Callable[..., Any] | None = None) -> None:
        super().__init__()
        self.k = positive_int("k", k, maximum=positive_int("n_experts", n_experts))
        self.gate = nn.Linear(d_model, n_experts, bias=False)  # W_g, (D, E)
        self.experts = nn.ModuleList(Expert(d_model, d_hidden) for _ in range(n_experts))
        self.register_buffer("bias", torch.zeros(n_experts))  # (E,) b_e, chooses only
        self.select = select if select is not None else _biased_top_k

    def forward(self, x: Tensor) -> MoEOutput:
        flat = x.reshape(-1, x.shape[-1])  # (T, D)
        logits = self.gate(flat)  # (T, E)
        scores = torch.sigmoid(logits)  # (T, E) eq. 15
        weights, indices = self.select(scores, self.bias, self.k)  # (T, K), (T, K) eq. 13, 16
        y = sparse_moe(flat, self.experts, weights, indices)  # (T, D)
        n_experts = scores.shape[1]
        probs = scores / scores.sum(-1, keepdim=True)  # (T, E) s' of eq. 19
        aux = _losses.switch_aux_loss(probs, indices)  # E sum f P, eq. 17-20 over the batch
        load = torch.bincount(indices.reshape(-1), minlength=n_experts).float()  # (E,)
        keep = torch.ones_like(indices, dtype=torch.bool)  # (T, K) nothing dropped
        return MoEOutput(y.reshape(x.shape), aux, _losses.router_z_loss(logits), logits,
                         TokenChoice(weights, indices, keep), load)

    def update_bias(self, counts: Tensor, gamma: float,
                    update: Callable[..., Tensor] | None = None) -> None:
        """`bias <- update(bias, counts, gamma)` (default `modern.aux_free_bias_update`)."""
        new = (update or _bias_update)(self.bias.clone(), counts, gamma)
        self.bias.copy_(torch.as_tensor(new, dtype=self.bias.dtype).detach())


LM_BALANCING = ("aux loss", "aux-free bias", "neither")
"""The ways `train_lm_balancing` balances the experts of its character LM."""


class LMBalancingRun(NamedTuple):
    """What `train_lm_balancing` measured."""

    history: History  # the training loss and each layer's load at every step
    val_loss: float  # cross-entropy on a fixed validation batch after training
    max_over_mean: Tensor  # (steps,) busiest expert's share over the mean share, mean of layers
    rerouted: float  # share of validation tokens whose top-k set the bias changed (0 w/o bias)
    biases: Tensor  # (L, E) final biases


def train_lm_balancing(balancing: str, seed: int = 0, steps: int = 150,
                       corpus: CharCorpus | None = None, n_experts: int = 8, k: int = 2,
                       d_model: int = 32, d_hidden: int = 32, n_layers: int = 1,
                       seq_len: int = 32, batch_size: int = 16, lr: float = 1e-2,
                       alpha: float = 0.01, gamma: float = 0.01,
                       select: Callable[..., Any] | None = None,
                       update: Callable[..., Tensor] | None = None) -> LMBalancingRun:
    """Train a small `CharLM` of `BiasedTopKMoE` layers with one way of balancing.

    `balancing` is one of `LM_BALANCING`: "aux loss" adds `alpha` times each layer's
    balance loss to the cross-entropy; "aux-free bias" adds nothing and after every step
    moves each layer's bias with `update(bias, counts, gamma)` (DeepSeek-V3 Sec. 2.1.2);
    "neither" trains on the cross-entropy alone. `select` and `update` may be the learner's
    `biased_top_k` and `aux_free_bias_update`. Seeded by `seed`; the batches are the same
    for every variant and seed, and the validation batch is fixed.
    """
    if balancing not in LM_BALANCING:
        raise ValueError(f"balancing must be one of {LM_BALANCING}; got {balancing!r}")
    corpus = corpus if corpus is not None else CharCorpus(n_chars=20_000, seed=0)
    if not isinstance(corpus, CharCorpus):
        raise ValueError(f"corpus must be a moe_course.data.CharCorpus; got "
                         f"{type(corpus).__name__}")
    vocab = corpus.tokenizer.vocab_size
    config = LMConfig(vocab_size=vocab, seq_len=seq_len, d_model=d_model, n_heads=2,
                      n_layers=n_layers)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CharLM(config, lambda i: BiasedTopKMoE(d_model, d_hidden, n_experts, k, select))
    layers = [m for m in model.modules() if isinstance(m, BiasedTopKMoE)]
    val = corpus.get_batch("val", 64, seq_len, seed=123)

    def loss_fn(model: nn.Module, batch: Any) -> Tensor:
        out = model(batch.x)
        loss = F.cross_entropy(out.logits.reshape(-1, vocab), batch.y.reshape(-1))
        if balancing == "aux loss":
            loss = loss + alpha * sum(o.aux_loss for o in out.moe_outputs)
        if balancing == "aux-free bias":  # the end-of-step update, from this step's counts
            with torch.no_grad():
                for layer, o in zip(layers, out.moe_outputs, strict=True):
                    layer.update_bias(o.expert_load, gamma, update)
        return loss

    history = train(model, loss_fn, lambda step: corpus.get_batch("train", batch_size, seq_len,
                                                                  seed=step),
                    steps=steps, lr=lr, seed=seed, progress=False)
    model.eval()
    with torch.no_grad():
        out = model(val.x)
        val_loss = float(F.cross_entropy(out.logits.reshape(-1, vocab), val.y.reshape(-1)))
        rerouted = []
        for o in out.moe_outputs:
            plain = torch.sigmoid(o.logits).topk(k, dim=-1).indices.sort(-1).values  # (T, K)
            chosen = o.routing.indices.sort(-1).values  # (T, K)
            rerouted.append(float((plain != chosen).any(-1).float().mean()))
    share = history.load  # (steps, L, E)
    max_over_mean = (share.max(-1).values * share.shape[-1]).mean(-1)  # (steps,)
    return LMBalancingRun(history, val_loss, max_over_mean, sum(rerouted) / len(rerouted),
                          torch.stack([layer.bias.clone() for layer in layers]))


# ----------------------------------------------------------------------------------------
# Notebook 05: capacity during language-model training


class LMRun(NamedTuple):
    """What `train_char_lm` measured."""

    history: History  # training loss and each MoE layer's load at every step
    val_loss: float  # cross-entropy on a fixed validation batch, the model as trained
    dropped: float  # share of routed assignments dropped by the capacity during training
    val_dropped: float  # the same share on the validation batch


def _dropped(moe_outputs: Sequence[Any]) -> tuple[int, int]:
    kept = total = 0
    for o in moe_outputs:
        keep = getattr(getattr(o, "routing", None), "keep", None)
        if isinstance(keep, Tensor):
            kept += int(keep.sum())
            total += keep.numel()
    return total - kept, total


def train_char_lm(model: nn.Module, corpus: CharCorpus, steps: int = 80, seed: int = 0,
                  loss: Callable[..., Tensor] | None = None, aux_weight: float = 0.01,
                  z_weight: float = 0.001, batch_size: int = 16, seq_len: int = 32,
                  lr: float = 1e-2) -> LMRun:
    """Train a `CharLM` (made by the caller) on `corpus` and count what its capacity drops.

    `loss(logits, targets, moe_outputs, aux_weight, z_weight)` is the training loss, by
    default `losses.moe_lm_loss` (pass the learner's); each MoE output is read for
    `aux_loss`, `z_loss` and, for the drop count, `routing.keep` (`(T, K)` bool, as in
    `layers.TokenChoice`). Batch `t` is `corpus.get_batch("train", batch_size, seq_len,
    seed=t)`, the same for every model; the validation batch is fixed (64 windows).
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module (a CharLM); got {type(model).__name__}")
    if not isinstance(corpus, CharCorpus):
        raise ValueError(f"corpus must be a moe_course.data.CharCorpus; got "
                         f"{type(corpus).__name__}")
    loss = loss if loss is not None else _losses.moe_lm_loss
    counts = [0, 0]  # dropped, routed during training

    def loss_fn(model: nn.Module, batch: Any) -> Tensor:
        out = model(batch.x)
        dropped, total = _dropped(out.moe_outputs)
        counts[0] += dropped
        counts[1] += total
        return loss(out.logits, batch.y, out.moe_outputs, aux_weight, z_weight)

    history = train(model, loss_fn, lambda step: corpus.get_batch("train", batch_size, seq_len,
                                                                  seed=step),
                    steps=steps, lr=lr, seed=seed, progress=False)
    val = corpus.get_batch("val", 64, seq_len, seed=123)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(val.x)
        val_loss = float(F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]),
                                         val.y.reshape(-1)))
        val_dropped, val_total = _dropped(out.moe_outputs)
    model.train(was_training)
    return LMRun(history, val_loss, counts[0] / max(counts[1], 1),
                 val_dropped / max(val_total, 1))
