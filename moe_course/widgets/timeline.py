"""`LoadTimeline` (notebook 03): per-expert load over training steps from
`moe_course.train`'s history, with a step slider; two runs side by side.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from matplotlib.figure import Figure
from torch import Tensor

from ..losses import cv_squared
from .base import DPI, _interactive, _message_figure, _PngDisplay

# --------------------------------------------------------------------------------------
# LoadTimeline


class TimelineState(NamedTuple):
    """What `LoadTimeline` shows at its current step and layer, one entry per history."""

    step: int  # index into each history (clipped to its length)
    layer: int  # MoE layer index
    load: list[Tensor]  # per history, (E,) load fractions at that step and layer
    load_cv2: list[float]  # per history, cv_squared of that load
    loss: list[float]  # per history, the training loss at that step


def _history_arrays(history: Any, name: str) -> tuple[Tensor, Tensor]:
    if not (hasattr(history, "load") and hasattr(history, "loss")):
        raise ValueError(f"{name} must have .load (steps, L, E) and .loss (steps,), as "
                         f"moe_course.train.train returns; got {type(history).__name__}")
    try:
        load, loss = (torch.stack([torch.as_tensor(v) for v in x]).float()
                      if isinstance(x, (list, tuple)) and x and isinstance(x[0], Tensor)
                      else torch.as_tensor(x, dtype=torch.float32)
                      for x in (history.load, history.loss))  # lists of per-step tensors too
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{name}.load and .loss must be numeric arrays: {err}") from None
    if load.dim() == 2:
        load = load[:, None, :]  # (steps, 1, E): one layer
    if load.dim() != 3 or load.shape[0] == 0:
        raise ValueError(f"{name}.load must be (steps, L, E) with steps >= 1; got shape "
                         f"{tuple(load.shape)}")
    if load.shape[1] == 0 or load.shape[2] == 0:
        raise ValueError(f"{name} recorded no expert load (load shape {tuple(load.shape)}): "
                         "did the model have MoE layers that report expert_load?")
    if loss.shape != (load.shape[0],):
        raise ValueError(f"{name}.loss must be (steps,) = ({load.shape[0]},) like "
                         f"{name}.load; got shape {tuple(loss.shape)}")
    return load, loss


class LoadTimeline(_PngDisplay):
    """Per-expert load over training steps, with a step slider; two runs side by side.

    `history.load` is a float tensor `(steps, L, E)` of per-expert load fractions (each row
    sums to 1 for a layer) and `history.loss` `(steps,)`, as `moe_course.train.train` returns;
    `other` is a second history shown beside it (say, trained without the balancing loss).
    `controls["step"]` and `controls["layer"]` move the view; `state` is a `TimelineState`.

    >>> from types import SimpleNamespace
    >>> h = SimpleNamespace(load=torch.full((5, 1, 4), 0.25), loss=torch.ones(5))
    >>> LoadTimeline(h, interactive=False).state.load_cv2
    [0.0]
    """

    def __init__(self, history: Any, other: Any = None,
                 labels: Sequence[str] = ("run 1", "run 2"), step: int | None = None,
                 layer: int = 0, interactive: bool | None = None) -> None:
        self.controls: dict[str, Any] = {}
        self.state: TimelineState | None = None
        self._artists: list[dict[str, Any]] = []
        self._drawn_layer: int | None = None
        try:
            runs = [history] if other is None else [history, other]
            names = ("history", "other")[: len(runs)]
            self.data = [_history_arrays(h, n) for h, n in zip(runs, names, strict=True)]
            if len(labels) < len(runs):
                raise ValueError(f"labels must name each history; got {list(labels)}")
            self.labels = [str(s) for s in labels[: len(runs)]]
            self.n_steps = max(load.shape[0] for load, _ in self.data)
            self.n_layers = min(load.shape[1] for load, _ in self.data)
            self.step = self.n_steps - 1 if step is None else int(step)
            self.layer = int(layer)
            self._compute()
        except ValueError as err:
            self.data, self.n_steps, self.n_layers, self.step, self.layer = [], 1, 1, 0, 0
            self.error = str(err)
        n = max(len(self.data), 1)
        self._fig = Figure(figsize=(4.4 * n, 4.8), dpi=DPI)
        if _interactive(interactive):
            self._build_widget()

    def _compute(self) -> None:
        if not 0 <= self.layer < self.n_layers:
            raise ValueError(f"layer must lie in [0, {self.n_layers}); got {self.layer}")
        self.step = min(max(self.step, 0), self.n_steps - 1)
        loads, cv2, losses = [], [], []
        for load, loss in self.data:
            s = min(self.step, load.shape[0] - 1)
            loads.append(load[s, self.layer])  # (E,)
            cv2.append(float(cv_squared(load[s, self.layer])))
            losses.append(float(loss[s]))
        self.state = TimelineState(self.step, self.layer, loads, cv2, losses)
        self._png_cache = None

    def _draw(self, fig: Figure) -> Figure:
        """Full redraw when the layer changed; otherwise move the step markers only."""
        assert self.state is not None
        if self._drawn_layer != self.layer or not self._artists:
            self._draw_layer(fig)
        for art, load, cv2, loss, (all_load, _) in zip(
                self._artists, self.state.load, self.state.load_cv2, self.state.loss, self.data,
                strict=True):
            s = min(self.step, all_load.shape[0] - 1)
            for bar, height in zip(art["bars"], load.tolist(), strict=True):
                bar.set_height(height)
            art["vline"].set_xdata([s, s])
            art["marker"].set_data([s], [loss])
            art["bar_ax"].set_title(f"step {s}: load CV\u00b2 {cv2:.3f}, loss {loss:.3f}",
                                    fontsize=8, y=1.01)
        return fig

    def _draw_layer(self, fig: Figure) -> None:
        fig.clear()
        self._artists = []
        n = len(self.data)
        gs = fig.add_gridspec(3, n, height_ratios=[1.3, 1.0, 0.8], left=0.08, right=0.98,
                              bottom=0.09, top=0.93, hspace=0.75, wspace=0.22)
        # one colour scale and one y range for both runs, so that they compare at a glance
        top = max(float(load[:, self.layer].max()) for load, _ in self.data)
        lo_loss = min(float(loss.min()) for _, loss in self.data)
        hi_loss = max(float(loss.max()) for _, loss in self.data)
        for col, ((load, loss), label) in enumerate(zip(self.data, self.labels, strict=True)):
            lay = load[:, self.layer]  # (steps, E)
            e = lay.shape[1]
            ax_t = fig.add_subplot(gs[0, col])
            ax_t.imshow(lay.t().numpy(), aspect="auto", cmap="viridis", vmin=0.0,
                        vmax=max(top, 1.0 / e), interpolation="nearest")
            vline = ax_t.axvline(0, color="white", lw=1.2)
            ax_t.set_title(f"{label}: load per expert by step (layer {self.layer})", fontsize=9,
                           y=1.01)
            ax_t.set_ylabel("expert", fontsize=8)
            ax_b = fig.add_subplot(gs[1, col])
            bars = ax_b.bar(range(e), lay[0].numpy(), color="steelblue")
            ax_b.axhline(1.0 / e, color="gray", ls=":", lw=1.2)
            ax_b.text(1.0, 1.0 / e, "balanced 1/E ", color="gray", fontsize=7, ha="right",
                      va="bottom", transform=ax_b.get_yaxis_transform())
            ax_b.set_ylim(0, max(top * 1.1, 1.5 / e))
            ax_b.set_xlabel("expert", fontsize=8)
            ax_l = fig.add_subplot(gs[2, col])
            ax_l.plot(range(len(loss)), loss.numpy(), lw=1.0, color="black")
            (marker,) = ax_l.plot([0], [float(loss[0])], "o", color="crimson", ms=4)
            ax_l.set_ylim(lo_loss - 0.05 * (hi_loss - lo_loss) - 1e-3,
                          hi_loss + 0.05 * (hi_loss - lo_loss) + 1e-3)
            ax_l.set_xlabel("step", fontsize=8)
            ax_l.set_ylabel("training loss", fontsize=8)
            for ax in (ax_t, ax_b, ax_l):
                ax.tick_params(labelsize=7)
            self._artists.append(dict(bars=bars, vline=vline, marker=marker, bar_ax=ax_b))
        self._drawn_layer = self.layer

    def figure(self) -> Figure:
        """The static figure at the current step and layer."""
        if self.error is not None:
            self._artists = []
            return _message_figure(self._fig, self.error)
        return self._draw(self._fig)

    def _build_widget(self) -> None:
        import ipywidgets as w

        self.controls["step"] = w.IntSlider(value=self.step, min=0, max=self.n_steps - 1,
                                            description="step", continuous_update=False,
                                            layout=w.Layout(width="420px"))
        self.controls["layer"] = w.Dropdown(options=list(range(self.n_layers)),
                                            value=min(self.layer, self.n_layers - 1),
                                            description="layer")
        self._mount()

    def _on_change(self, change: dict) -> None:
        if self.error is not None and not self.data:
            return
        self.step = self.controls["step"].value
        self.layer = self.controls["layer"].value
        self._redraw()


