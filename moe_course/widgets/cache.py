"""`CacheExplorer` (notebook 08): an expert cache replayed over a model's routing trace.

Pick a cache size, a policy (LRU, a static most-used cache, Belady's optimum) and a layer;
see the hit rate, the hits and misses of every access along the decode trace, and the hit
rate against cache size for the three policies with the current choice marked. All cache
arithmetic is `moe_course.serving`'s (`CACHE_POLICIES`, `hit_rate_curve`), never a copy of
the learner's.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from torch import Tensor

from ..serving import CACHE_POLICIES, hit_rate_curve
from .base import DPI, _interactive, _message_figure, _PngDisplay

MAX_TIMELINE_TOKENS = 256  # the timeline shows the first accesses of the trace, at most these
_HIT_MISS = ListedColormap(["#d62728", "#2ca02c"])  # miss red, hit green


class CacheState(NamedTuple):
    """What `CacheExplorer` shows for its current controls."""

    layer: int  # MoE layer whose trace is replayed
    capacity: int  # experts the cache holds
    policy: str  # a key of moe_course.serving.CACHE_POLICIES
    hits: Tensor  # (N, K) bool, which accesses hit
    hit_rate: float  # hits / accesses


def _trace_tensor(trace: object) -> Tensor:
    if not isinstance(trace, Tensor) or trace.is_floating_point() or trace.is_complex() \
            or trace.dtype == torch.bool:
        raise ValueError(f"trace must be an integer tensor (L, N, K) or (N, K) of expert ids, "
                         f"as moe_course.serving.routing_trace returns; got "
                         f"{type(trace).__name__}"
                         + (f" of dtype {trace.dtype}" if isinstance(trace, Tensor) else ""))
    if trace.dim() == 2:
        trace = trace[None]  # (1, N, K): one layer
    if trace.dim() != 3 or trace.shape[1] == 0 or trace.shape[2] == 0:
        raise ValueError(f"trace must be (L, N, K) or (N, K) with N, K >= 1; got shape "
                         f"{tuple(trace.shape)}")
    if int(trace.min()) < 0:
        raise ValueError(f"trace holds expert ids >= 0; got {int(trace.min())}")
    return trace.long()


class CacheExplorer(_PngDisplay):
    """An expert cache replayed over a routing trace, with capacity, policy and layer controls.

    `trace` is `(L, N, K)` (or `(N, K)` for one layer), `routing_trace`'s output;
    `n_experts` defaults to the largest id plus one. `controls["capacity"]`,
    `controls["policy"]` and `controls["layer"]` move the view; `state` is a `CacheState`.

    >>> trace = torch.tensor([[[0, 1], [0, 2], [2, 0]]])
    >>> CacheExplorer(trace, capacity=2, interactive=False).state.hit_rate
    0.5
    """

    def __init__(self, trace: Tensor, n_experts: int | None = None, capacity: int = 2,
                 policy: str = "LRU", layer: int = 0, interactive: bool | None = None) -> None:
        self.controls: dict[str, Any] = {}
        self.state: CacheState | None = None
        self._curves: dict[tuple[int, str], Tensor] = {}
        self._artists: dict[str, Any] = {}
        self._drawn_layer: int | None = None
        try:
            self.trace = _trace_tensor(trace)
            seen = int(self.trace.max()) + 1
            self.n_experts = seen if n_experts is None else int(n_experts)
            if isinstance(n_experts, bool) or self.n_experts < seen:
                raise ValueError(f"n_experts must be an int >= {seen} (the trace uses expert "
                                 f"{seen - 1}); got {n_experts!r}")
            self.layer, self.capacity, self.policy = int(layer), int(capacity), policy
            self._compute()
        except ValueError as err:
            self.trace, self.n_experts = torch.zeros(1, 1, 1, dtype=torch.long), 1
            self.layer, self.capacity, self.policy = 0, 0, "LRU"
            self.error = str(err)
        self._fig = Figure(figsize=(10.5, 4.6), dpi=DPI)
        if _interactive(interactive):
            self._build_widget()

    @property
    def n_layers(self) -> int:
        return int(self.trace.shape[0])

    def _compute(self) -> None:
        if self.policy not in CACHE_POLICIES:
            raise ValueError(f"policy must be one of {list(CACHE_POLICIES)}; got {self.policy!r}")
        if not 0 <= self.layer < self.n_layers:
            raise ValueError(f"layer must lie in [0, {self.n_layers}); got {self.layer}")
        if not 0 <= self.capacity <= self.n_experts:
            raise ValueError(f"capacity must lie in [0, {self.n_experts}]; got {self.capacity}")
        trace = self.trace[self.layer]  # (N, K)
        hits = CACHE_POLICIES[self.policy](trace, self.capacity)  # (N, K)
        self.state = CacheState(self.layer, self.capacity, self.policy, hits,
                                float(hits.float().mean()))
        self._png_cache = None

    def curve(self, layer: int, policy: str) -> Tensor:
        """Hit rate of `policy` on `layer` at capacities `0..E`, `(E + 1,)`, cached."""
        key = (layer, policy)
        if key not in self._curves:
            self._curves[key] = hit_rate_curve(self.trace[layer], policy,
                                               list(range(self.n_experts + 1)))
        return self._curves[key]

    def _draw(self, fig: Figure) -> Figure:
        """Full redraw when the layer changed; otherwise update the hits, titles and marker."""
        state = self.state
        assert state is not None
        if self._drawn_layer != state.layer or not self._artists:
            self._draw_layer(fig)
        art = self._artists
        trace = self.trace[state.layer]  # (N, K)
        shown = min(trace.shape[0], MAX_TIMELINE_TOKENS)
        art["hits"].set_data(state.hits[:shown].t().float().numpy())
        art["hits_ax"].set_title(
            f"{state.policy}, cache of {state.capacity} of {self.n_experts}: hit (green) or "
            f"miss (red); hit rate {state.hit_rate:.1%} over {trace.numel()} accesses",
            fontsize=9)
        art["marker"].set_data([state.capacity], [state.hit_rate])
        for name, line in art["curves"].items():
            line.set_linewidth(2.4 if name == state.policy else 1.0)
        return fig

    def _draw_layer(self, fig: Figure) -> None:
        state = self.state
        assert state is not None
        fig.clear()
        gs = fig.add_gridspec(2, 2, width_ratios=[2.2, 1.0], height_ratios=[1.0, 1.0],
                              left=0.07, right=0.98, bottom=0.11, top=0.9, hspace=0.6,
                              wspace=0.25)
        trace = self.trace[state.layer]  # (N, K)
        shown = min(trace.shape[0], MAX_TIMELINE_TOKENS)
        ax_e = fig.add_subplot(gs[0, 0])
        ax_e.imshow(trace[:shown].t().numpy(), aspect="auto", cmap="tab10", vmin=0, vmax=9,
                    interpolation="nearest")
        ax_e.set_title(f"layer {state.layer}: expert of each access (first {shown} tokens, "
                       "choices top to bottom)", fontsize=9)
        ax_e.set_yticks(range(trace.shape[1]))
        ax_h = fig.add_subplot(gs[1, 0])
        hits = ax_h.imshow(state.hits[:shown].t().float().numpy(), aspect="auto",
                           cmap=_HIT_MISS, vmin=0, vmax=1, interpolation="nearest")
        ax_h.set_xlabel("token (decode step)", fontsize=8)
        ax_h.set_yticks(range(trace.shape[1]))
        ax_c = fig.add_subplot(gs[:, 1])
        sizes = list(range(self.n_experts + 1))
        curves = {}
        for name in CACHE_POLICIES:
            (curves[name],) = ax_c.plot(sizes, self.curve(state.layer, name).numpy(), "o-",
                                        ms=3, lw=1.0, label=name)
        (marker,) = ax_c.plot([state.capacity], [state.hit_rate], "o", ms=10, mfc="none",
                              color="black")
        ax_c.set(xlabel="cache size (experts)", ylabel="hit rate", ylim=(0, 1.02),
                 title="hit rate against cache size")
        ax_c.title.set_fontsize(9)
        ax_c.legend(fontsize=7, loc="lower right")
        for ax in (ax_e, ax_h, ax_c):
            ax.tick_params(labelsize=7)
        self._artists = {"hits": hits, "hits_ax": ax_h, "marker": marker, "curves": curves}
        self._drawn_layer = state.layer

    def figure(self) -> Figure:
        """The static figure of the current controls."""
        if self.error is not None:
            self._artists = {}
            return _message_figure(self._fig, self.error)
        return self._draw(self._fig)

    def _build_widget(self) -> None:
        import ipywidgets as w

        self.controls["capacity"] = w.IntSlider(value=self.capacity, min=0, max=self.n_experts,
                                                description="cache size",
                                                continuous_update=False)
        self.controls["policy"] = w.Dropdown(options=list(CACHE_POLICIES), value=self.policy,
                                             description="policy")
        self.controls["layer"] = w.Dropdown(options=list(range(self.n_layers)),
                                            value=min(self.layer, self.n_layers - 1),
                                            description="layer")
        self._mount()

    def _on_change(self, change: dict) -> None:
        if self.error is not None and self.state is None:
            return
        self.capacity = self.controls["capacity"].value
        self.policy = self.controls["policy"].value
        self.layer = self.controls["layer"].value
        self._redraw()
