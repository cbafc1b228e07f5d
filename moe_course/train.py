"""A compact training loop that records the loss and every MoE layer's expert load.

`train(model, loss_fn, batch_fn, steps)` runs `steps` optimizer steps of
`loss_fn(model, batch_fn(step))` and returns a `History`: the loss at every step and the
fraction of routed assignments each expert of each MoE layer received, `(steps, L, E)`,
which is what the load-balancing plots and widgets of notebooks 03 to 05 draw (Switch
Transformer, Fedus et al. 2021, arXiv 2101.03961, Sec. 2.2 and Fig. 6 plot the same
quantity).

Expert load is found in two ways, so both the `nn.Module` layers of the course and a
learner's plain functions fit:

1. forward hooks on every submodule: any output with an `expert_load` attribute (an
   `MoEOutput` from `moe_course.layers`, or a learner's named tuple with that field) is
   one MoE layer, in call order;
2. `loss_fn` may return a `StepResult` (or a dict with key `"loss"`) whose `expert_load`
   `(E,)` or `(L, E)` gives the load directly, e.g. `gates.sum(0)` of a dense mixture. This
   one wins over the hooks when given.

Under grading (`fast_mode()`), `train` runs at most `FAST_STEPS` steps without a progress
bar, so an autograded notebook never trains for long.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .validation import positive_float, positive_int

GRADING_ENV_VARS = ("NBGRADER_EXECUTION", "MOE_COURSE_GRADING")
"""Environment variables that switch on `fast_mode` (nbgrader sets the first)."""

FAST_STEPS = 5
"""The most steps `train` runs under `fast_mode()`."""

OPTIMIZERS = ("adamw", "adam", "sgd")


def fast_mode() -> bool:
    """True while grading: `NBGRADER_EXECUTION` or `MOE_COURSE_GRADING` is set and non-empty.

    Training loops, benchmarks and widgets shorten themselves when this is true.

    >>> import os
    >>> fast_mode() == any(os.environ.get(v) for v in GRADING_ENV_VARS)
    True
    """
    return any(os.environ.get(name) for name in GRADING_ENV_VARS)


class StepResult(NamedTuple):
    """What a `loss_fn` may return instead of a bare scalar loss."""

    loss: Tensor  # scalar, the value that is minimised
    aux_loss: Tensor | None = None  # scalar auxiliary loss, recorded (already in `loss`)
    expert_load: Tensor | None = None  # (E,) or (L, E) assignments (or gate mass) per expert


@dataclass(frozen=True)
class History:
    """What `train` records; every tensor is on the CPU and detached.

    `load[t, l, e]` is the fraction of layer `l`'s assignments that expert `e` got at step
    `t`; each `load[t, l]` sums to 1. `L = 0` (shape `(steps, 0, 0)`) when no MoE layer
    reported a load.

    >>> h = History(loss=torch.tensor([2.0, 1.0]),
    ...             load=torch.tensor([[[0.5, 0.5]], [[0.8, 0.2]]]),
    ...             aux_loss=torch.zeros(2))
    >>> h.steps, h.n_layers, h.n_experts
    (2, 1, 2)
    >>> h.max_min_ratio()
    tensor([4.])
    """

    loss: Tensor  # (steps,) float32 training loss at each step
    load: Tensor  # (steps, L, E) float32 fraction of assignments per expert and layer
    aux_loss: Tensor  # (steps,) float32 auxiliary loss reported at each step (0 if none)
    eval_steps: list[int] = field(default_factory=list)  # steps completed at each evaluation
    eval_loss: list[float] = field(default_factory=list)  # eval_fn's value at those steps

    @property
    def steps(self) -> int:
        """Number of steps recorded."""
        return int(self.loss.shape[0])

    @property
    def n_layers(self) -> int:
        """`L`, the number of MoE layers whose load was recorded."""
        return int(self.load.shape[1])

    @property
    def n_experts(self) -> int:
        """`E`, experts per MoE layer."""
        return int(self.load.shape[2])

    def final_load(self, last: int = 1) -> Tensor:
        """Mean load fraction over the `last` steps: `(L, E)`, each row summing to 1."""
        positive_int("last", last, maximum=max(self.steps, 1))
        if self.steps == 0:
            raise ValueError("History is empty: no step was recorded")
        return self.load[-last:].mean(0)  # (L, E)

    def max_min_ratio(self, last: int = 1) -> Tensor:
        """Load imbalance per layer: busiest over idlest expert's share, `(L,)`.

        1 for a perfectly balanced layer, `inf` when some expert got nothing.
        """
        load = self.final_load(last)  # (L, E)
        return load.max(-1).values / load.min(-1).values  # (L,)


def train(model: nn.Module, loss_fn: Callable[[nn.Module, Any], Any],
          batch_fn: Callable[[int], Any], steps: int, lr: float = 3e-3,
          optimizer: str | torch.optim.Optimizer = "adamw", weight_decay: float = 0.0,
          grad_clip: float | None = None, seed: int = 0,
          eval_fn: Callable[[nn.Module], Any] | None = None, eval_every: int = 100,
          progress: bool = True, desc: str | None = None) -> History:
    """Train `model` in place for `steps` steps and record loss and expert load.

    Step `t` (from 0) computes `loss_fn(model, batch_fn(t))`, which returns a scalar tensor
    or a `StepResult` / dict with `loss` and optional `aux_loss` and `expert_load`, then
    takes one step of `optimizer` ("adamw", "adam", "sgd" with learning rate `lr`, or an
    optimizer you built). The global random state is seeded with `seed` for the run
    (dropout, noisy routers) and restored afterwards, so the same arguments give the same
    `History`. `eval_fn(model)`, if given, runs under `torch.no_grad()` in eval mode after
    every `eval_every` steps and after the last one. The model is left in the mode it came
    in.

    Under `fast_mode()` at most `FAST_STEPS` steps run and the progress bar is off.

    >>> model = nn.Linear(1, 1)
    >>> x = torch.linspace(-1, 1, 16)[:, None]
    >>> hist = train(model, lambda m, b: ((m(b) - 3 * b) ** 2).mean(), lambda t: x,
    ...              steps=5, lr=0.1, progress=False)
    >>> hist.loss.shape, hist.load.shape, bool(hist.loss[-1] < hist.loss[0])
    (torch.Size([5]), torch.Size([5, 0, 0]), True)
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module; got {type(model).__name__}")
    if not callable(loss_fn) or not callable(batch_fn):
        raise ValueError("loss_fn(model, batch) and batch_fn(step) must be callables; got "
                         f"{type(loss_fn).__name__} and {type(batch_fn).__name__}")
    if eval_fn is not None and not callable(eval_fn):
        raise ValueError(f"eval_fn must be a callable eval_fn(model) or None; got "
                         f"{type(eval_fn).__name__}")
    positive_int("steps", steps)
    positive_int("eval_every", eval_every)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0; got {seed!r}")
    if grad_clip is not None:
        positive_float("grad_clip", grad_clip)
    opt = _optimizer(model, optimizer, lr, weight_decay)
    fast = fast_mode()
    n_steps = min(steps, FAST_STEPS) if fast else steps

    captured: list[Any] = []
    recording = [False]

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
        if recording[0] and getattr(output, "expert_load", None) is not None:
            captured.append(output)

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    losses, aux_losses, loads = [], [], []
    eval_steps: list[int] = []
    eval_losses: list[float] = []
    was_training = model.training
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model.train()
            bar = tqdm(total=n_steps, desc=desc, disable=fast or not progress, leave=True)
            for step in range(n_steps):
                captured.clear()
                recording[0] = True
                result = loss_fn(model, batch_fn(step))
                recording[0] = False
                loss, aux, load = _unpack(result, captured, step)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if grad_clip is not None:
                    nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
                opt.step()
                losses.append(float(loss.detach()))
                aux_losses.append(aux)
                loads.append(load)
                if eval_fn is not None and ((step + 1) % eval_every == 0 or step + 1 == n_steps):
                    eval_steps.append(step + 1)
                    eval_losses.append(_evaluate(model, eval_fn))
                bar.update(1)
                if step % 10 == 0 or step + 1 == n_steps:
                    bar.set_postfix(loss=f"{losses[-1]:.4f}")
            bar.close()
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return History(torch.tensor(losses, dtype=torch.float32), _stack_loads(loads),
                   torch.tensor(aux_losses, dtype=torch.float32), eval_steps, eval_losses)


def _optimizer(model: nn.Module, optimizer: str | torch.optim.Optimizer, lr: float,
               weight_decay: float) -> torch.optim.Optimizer:
    if isinstance(optimizer, torch.optim.Optimizer):
        return optimizer
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS} or a torch.optim.Optimizer; "
                         f"got {optimizer!r}")
    positive_float("lr", lr)
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) \
            or not weight_decay >= 0 or math.isinf(weight_decay):
        raise ValueError(f"weight_decay must be a finite number >= 0; got {weight_decay!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters (requires_grad=True) to optimise")
    if optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)


def _unpack(result: Any, captured: list[Any], step: int) -> tuple[Tensor, float, Tensor | None]:
    """Split `loss_fn`'s return into (loss, aux, load (L, E) counts or None)."""
    if isinstance(result, Tensor):
        loss, aux, load = result, None, None
    elif isinstance(result, Mapping):
        if "loss" not in result:
            raise ValueError(f"loss_fn returned a dict without a 'loss' key; keys: "
                             f"{sorted(result)}")
        loss, aux, load = result["loss"], result.get("aux_loss"), result.get("expert_load")
    elif hasattr(result, "loss"):
        loss = result.loss
        aux, load = getattr(result, "aux_loss", None), getattr(result, "expert_load", None)
    else:
        raise ValueError(f"loss_fn must return a scalar tensor, a StepResult or a dict with "
                         f"'loss'; got {type(result).__name__}")
    if not isinstance(loss, Tensor) or loss.numel() != 1 or not loss.is_floating_point():
        got = f"shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(f"loss_fn's loss must be a scalar float tensor; got {got}")
    if not loss.requires_grad:
        raise ValueError("loss_fn's loss does not require grad: it must be computed from the "
                         "model's parameters (not under torch.no_grad, not detached)")
    if not torch.isfinite(loss.detach()):
        raise ValueError(f"the loss became {float(loss.detach())} at step {step}; lower the "
                         "learning rate or check the model for a division by zero or a log of 0")
    if load is None:
        layers = _unique_outputs(captured)
        if layers:
            vectors = [_as_vector(o.expert_load, "expert_load") for o in layers]
            if len({v.numel() for v in vectors}) != 1:
                raise ValueError(f"every MoE layer must have the same number of experts E to "
                                 f"be recorded together; got {[v.numel() for v in vectors]}")
            load = torch.stack(vectors)  # (L, E)
        if aux is None:
            parts = [o.aux_loss for o in layers if getattr(o, "aux_loss", None) is not None]
            aux = sum((p.detach().float().sum() for p in parts), torch.zeros(()))
    else:
        if not isinstance(load, Tensor) or load.dim() not in (1, 2):
            got = f"shape {tuple(load.shape)}" if isinstance(load, Tensor) else type(load)
            raise ValueError(f"loss_fn's expert_load must be an (E,) or (L, E) tensor; got {got}")
        load = load.detach().float().cpu()
        load = load[None] if load.dim() == 1 else load  # (L, E)
    aux_value = 0.0 if aux is None else float(torch.as_tensor(aux).detach().float().sum())
    return loss, aux_value, load


def _unique_outputs(captured: list[Any]) -> list[Any]:
    """Drop a layer output seen twice (a wrapper module returning its child's output)."""
    seen, out = set(), []
    for o in captured:
        key = id(o.expert_load)
        if key not in seen:
            seen.add(key)
            out.append(o)
    return out


def _as_vector(load: Any, name: str) -> Tensor:
    if not isinstance(load, Tensor) or load.dim() != 1:
        got = f"shape {tuple(load.shape)}" if isinstance(load, Tensor) else type(load).__name__
        raise ValueError(f"an MoE layer's {name} must be an (E,) tensor; got {got}")
    return load.detach().float().cpu()


def _stack_loads(loads: list[Tensor | None]) -> Tensor:
    """`steps` loads of `(L, E)` counts (or None) -> `(steps, L, E)` fractions."""
    shapes = {None if load is None else tuple(load.shape) for load in loads}
    if shapes == {None}:
        return torch.zeros(len(loads), 0, 0)
    if len(shapes) != 1:
        raise ValueError(f"expert load changed shape between steps: {sorted(map(str, shapes))}; "
                         "every step must report the same (L, E)")
    counts = torch.stack(loads)  # type: ignore[arg-type]  # (steps, L, E)
    if (counts < 0).any():
        raise ValueError("expert load must be non-negative counts or gate mass")
    total = counts.sum(-1, keepdim=True)  # (steps, L, 1)
    return counts / total.clamp_min(torch.finfo(counts.dtype).tiny)  # (steps, L, E)


def _evaluate(model: nn.Module, eval_fn: Callable[[nn.Module], Any]) -> float:
    model.eval()
    try:
        with torch.no_grad():
            value = eval_fn(model)
    finally:
        model.train()
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"eval_fn must return a number or a scalar tensor; got shape "
                             f"{tuple(value.shape)}")
        return float(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise ValueError(f"eval_fn must return a number or a scalar tensor; got "
                     f"{type(value).__name__}")
