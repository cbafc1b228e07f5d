"""`RoutingExplorer` (notebooks 02-04) and `explore`, the pure function behind it.

Pick a router and move sliders; see the token-by-expert assignment matrix shaded by gate
weight with dropped assignments crossed out, per-expert load against the capacity line,
the experts-per-token histogram and the numbers (drop rate, load CV squared, Switch
loss, z-loss). All routing math is the reference package's.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from matplotlib.figure import Figure
from torch import Tensor

from ..expert_choice import ExpertChoice, experts_per_token
from ..gating import noisy_logits
from ..losses import cv_squared, router_z_loss, switch_aux_loss
from ..routers import ROUTERS, Select, router_row
from ..validation import float_tensor, positive_float, positive_int
from .base import (
    DPI,
    ERROR_COLOR,
    _describe_error,
    _error_html,
    _interactive,
    _PngDisplay,
    _wrap,
)

# The routers are the rows of `moe_course.routers.ROUTERS` (re-exported here): the
# dropdown, the controls each router enables and the computation all read that table.
MAX_TOKENS = 512  # largest T that `explore` generates a router for
MAX_EXPERTS = 64  # largest E that `explore` generates a router for
D_MODEL = 16  # width of the synthetic tokens behind the generated logits

RoutingFn = Callable[[Tensor, int], Any]


# --------------------------------------------------------------------------------------
# RoutingExplorer: the pure computation


class RoutingState(NamedTuple):
    """Everything `RoutingExplorer` draws, computed by `explore` from the reference functions."""

    router: str  # a key of ROUTERS (moe_course.routers)
    logits: Tensor  # (T, E) router logits after temperature (and noise)
    gates: Tensor  # (T, E) gate weight of every assignment, before capacity; 0 off it
    assigned: Tensor  # (T, E) bool, the token chose the expert (or the expert the token)
    dropped: Tensor  # (T, E) bool, assigned but past the expert's capacity
    load: Tensor  # (E,) float, assignments each expert processes (after drops)
    capacity: int | None  # C slots per expert; None when unlimited
    experts_per_token: Tensor  # (T,) int64, experts that process each token
    drop_rate: float  # dropped / assigned (token choice); share of unchosen tokens (expert choice)
    load_cv2: float  # cv_squared(load), 0 when perfectly balanced
    switch_loss: float  # switch_aux_loss(softmax(logits), indices); nan for expert choice
    z_loss: float  # router_z_loss(logits)
    expert_choice: bool = False  # the experts chose the tokens: no drops, unchosen tokens

    @property
    def n_dropped(self) -> int:
        """Dropped assignments (token choice) or tokens no expert chose (expert choice)."""
        if self.expert_choice:
            return int((self.experts_per_token == 0).sum())
        return int(self.dropped.sum())


def _synthetic_logits(n_tokens: int, n_experts: int, temperature: float, noise_scale: float,
                      noisy: bool, seed: int) -> Tensor:
    """Router logits of a random linear router on random tokens, `(T, E)`.

    Everything is drawn at the largest size and sliced, so raising T adds tokens and keeps
    the earlier ones. The tokens share a mean direction, so some experts are favoured, as
    in a freshly initialised router on real data.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(MAX_TOKENS, D_MODEL, generator=g)  # (T_max, D)
    shared = torch.randn(D_MODEL, generator=g)  # (D,)
    w_gate = torch.randn(D_MODEL, MAX_EXPERTS, generator=g) / math.sqrt(D_MODEL)  # (D, E_max)
    w_noise = torch.randn(D_MODEL, MAX_EXPERTS, generator=g) / math.sqrt(D_MODEL)  # (D, E_max)
    noise = torch.randn(MAX_TOKENS, MAX_EXPERTS, generator=g)  # (T_max, E_max)
    x = x[:n_tokens] + 0.7 * shared  # (T, D)
    w_gate = w_gate[:, :n_experts] / temperature  # (D, E)
    w_noise = w_noise[:, :n_experts]  # (D, E)
    eps = noise_scale * noise[:n_tokens, :n_experts] if noisy else None  # (T, E)
    return noisy_logits(x, w_gate, w_noise, eps)  # (T, E), Shazeer eq. 4


def _check_logits(name: str, logits: Tensor) -> None:
    bad = ~torch.isfinite(logits)
    if bad.any():
        t, e = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name} contain {int(bad.sum())} NaN or infinite values (the first at "
                         f"token {t}, expert {e}); the router needs finite logits")


def _call_routing_fn(routing_fn: RoutingFn, logits: Tensor, arg: int, arg_name: str) -> Any:
    try:
        return routing_fn(logits, arg)
    except Exception as err:  # a learner's function: report, never crash the widget
        raise ValueError(f"your routing_fn(logits, {arg_name}={arg}) raised "
                         f"{type(err).__name__}: {err}") from err


def _pair(out: Any, what: str) -> tuple[Any, Any]:
    if isinstance(out, Tensor) or not isinstance(out, (tuple, list)) or len(out) != 2:
        got = f"a tensor of shape {tuple(out.shape)}" if isinstance(out, Tensor) else (
            f"{type(out).__name__} of length {len(out)}" if isinstance(out, (tuple, list))
            else type(out).__name__)
        raise ValueError(f"routing_fn must return a pair {what}; got {got}")
    return out[0], out[1]


def _check_routing(first: Any, second: Any, shape: tuple[int, int], names: tuple[str, str],
                   upper: int, what: str) -> tuple[Tensor, Tensor]:
    """Validate a routing function's `(weights, indices)`; readable ValueErrors."""
    w_name, i_name = names
    for name, t in ((w_name, first), (i_name, second)):
        if not isinstance(t, Tensor):
            raise ValueError(f"routing_fn's {name} must be a tensor of shape {shape}; got "
                             f"{type(t).__name__}")
        if tuple(t.shape) != shape:
            raise ValueError(f"routing_fn's {name} must have shape {shape} {what}; got "
                             f"{tuple(t.shape)}")
    if not first.is_floating_point():
        raise ValueError(f"routing_fn's {w_name} must be floating point; got {first.dtype}")
    if second.is_floating_point() or second.dtype == torch.bool:
        raise ValueError(f"routing_fn's {i_name} must be integers; got {second.dtype}")
    _check_logits(f"routing_fn's {w_name}", first)
    if second.numel() and (int(second.min()) < 0 or int(second.max()) >= upper):
        raise ValueError(f"routing_fn's {i_name} must lie in [0, {upper}); got values from "
                         f"{int(second.min())} to {int(second.max())}")
    rows = second.sort(dim=1).values  # (rows, cols)
    repeat = (rows[:, 1:] == rows[:, :-1]).any(dim=1).nonzero()
    if len(repeat):
        r = int(repeat[0])
        raise ValueError(f"routing_fn's {i_name} repeat a value in row {r}: "
                         f"{second[r].tolist()}; each row must hold distinct entries")
    return first.detach(), second.detach().long()


def _checked_select(routing_fn: RoutingFn, reference: Select, n_tokens: int,
                    n_experts: int) -> Select:
    """`routing_fn` in place of the router's selection step `reference`, its results
    checked against the shape and field names of the reference's (readable ValueErrors)."""
    arg = list(inspect.signature(reference).parameters)[1]  # "k" or "capacity"

    def select(logits: Tensor, n: int) -> tuple[Tensor, Tensor]:
        ref = reference(logits, n)  # TopK (T, K) or ExpertChoice (E, C)
        names = ref._fields
        shape = tuple(ref[0].shape)
        upper = n_experts if shape[0] == n_tokens else n_tokens  # indices index the other axis
        out = _call_routing_fn(routing_fn, logits, n, arg)
        return _check_routing(*_pair(out, f"({', '.join(names)})"), shape, names, upper,
                              f"like {reference.__name__}'s")

    return select


def explore(router: str = "top_k", n_tokens: int = 32, n_experts: int = 8, k: int = 2,
            capacity_factor: float = 1.0, noise_scale: float = 1.0, temperature: float = 1.0,
            seed: int = 0, logits: Tensor | None = None,
            routing_fn: RoutingFn | None = None) -> RoutingState:
    """Route `T` tokens to `E` experts with a reference router and measure the result.

    `router` is a key of `ROUTERS` (`moe_course.routers`, the one router table: a row added
    there shows up here), built in: `"dense"` (every expert, top-k with `k = E`), `"top_k"`
    and `"noisy_top_k"` (Shazeer et al. 2017, arXiv 1701.06538, eq. 3-5, no capacity),
    `"top_k_capacity"` (GShard, arXiv 2006.16668: `expert_capacity(T, E, c, k)` slots),
    `"switch"` (Fedus et al., arXiv 2101.03961: top-1 with capacity) or `"expert_choice"`
    (Zhou et al., arXiv 2202.09368: each expert takes `expert_choice_capacity(T, E, c)`
    tokens). `logits` `(T, E)` replaces the synthetic random router (then `n_tokens` and
    `n_experts` are ignored and noise is `noise_scale` times a standard normal); they are
    divided by `temperature` either way. `routing_fn` replaces the router's selection step
    (its row's `select`; capacity and the rest stay the reference's):
    `routing_fn(logits, k) -> (weights, indices)`, both `(T, K)`, for token choice (a
    learner's `top_k_gating`), `routing_fn(logits, C) -> (gates, token_idx)`, both `(E, C)`,
    for expert choice. Raises `ValueError` with a readable message on bad input.

    >>> s = explore("top_k_capacity", n_tokens=8, n_experts=4, k=2, capacity_factor=1.0)
    >>> s.capacity, int(s.assigned.sum()), int(s.load.sum()) + s.n_dropped
    (4, 16, 16)
    >>> explore("expert_choice", n_tokens=8, n_experts=4, capacity_factor=1.0).load
    tensor([2., 2., 2., 2.])
    """
    row = router_row(router)
    temperature = positive_float("temperature", temperature)
    if isinstance(noise_scale, bool) or not isinstance(noise_scale, (int, float)) or not (
            0 <= noise_scale < float("inf")):
        raise ValueError(f"noise_scale must be a finite number >= 0; got {noise_scale!r}")
    seed = positive_int("seed", seed, minimum=0)
    if row.uses_capacity:
        capacity_factor = positive_float("capacity_factor", capacity_factor)
    if routing_fn is not None and not callable(routing_fn):
        raise ValueError(f"routing_fn must be callable; got {type(routing_fn).__name__}")
    if routing_fn is not None and row.select is None:
        raise ValueError(f"router {router!r} has no selection step that a routing_fn could "
                         f"replace; pick one of {[n for n, r in ROUTERS.items() if r.select]}")

    if logits is None:
        t = positive_int("n_tokens", n_tokens, maximum=MAX_TOKENS)
        e = positive_int("n_experts", n_experts, maximum=MAX_EXPERTS)
        logits = _synthetic_logits(t, e, temperature, float(noise_scale), row.noisy,
                                   seed)  # (T, E)
    else:
        float_tensor("logits", logits, ndim=2, shape_hint="(T, E)")
        t, e = logits.shape
        if t == 0 or e == 0:
            raise ValueError(f"logits must be (T, E) with T, E >= 1; got {tuple(logits.shape)}")
        _check_logits("logits", logits)
        logits = logits.detach().float() / temperature  # (T, E)
        if row.noisy:
            g = torch.Generator().manual_seed(seed)
            # Shazeer eq. 4 with a constant noise std: there is no x to compute softplus(x W_n)
            logits = logits + noise_scale * torch.randn(t, e, generator=g)  # (T, E)
    _check_logits("router logits", logits)
    z_loss = float(router_z_loss(logits))  # ST-MoE eq. 5
    probs = torch.softmax(logits, dim=-1)  # (T, E)
    if row.uses_k and (isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= e):
        raise ValueError(f"k must be an integer between 1 and E = {e} (the number of "
                         f"experts); got k = {k!r}")

    chosen: list[tuple[Tensor, Tensor]] = []  # the selection, before capacity drops any
    step = row.select if routing_fn is None else _checked_select(routing_fn, row.select, t, e)

    def select(logits: Tensor, n: int) -> tuple[Tensor, Tensor]:
        chosen.append(step(logits, n))  # type: ignore[misc]
        return chosen[-1]

    routing, capacity = row(logits, k, capacity_factor if row.uses_capacity else None,
                            select if row.select is not None else None)
    if isinstance(routing, ExpertChoice):
        gates_ec, token_idx = routing.gates.detach().float(), routing.token_idx  # (E, C) each
        c = token_idx.shape[1]
        expert_ids = torch.arange(e)[:, None].expand(e, c)  # (E, C)
        gates = torch.zeros(t, e).index_put((token_idx, expert_ids), gates_ec)  # (T, E)
        assigned = torch.zeros(t, e, dtype=torch.bool).index_put(
            (token_idx, expert_ids), torch.tensor(True))  # (T, E)
        dropped = torch.zeros(t, e, dtype=torch.bool)  # (T, E): expert choice never drops
        per_token = experts_per_token(token_idx, t)  # (T,)
        drop_rate = float((per_token == 0).float().mean())
        switch = float("nan")
    else:
        indices, keep = routing.indices, routing.keep  # (T, K), (T, K)
        weights = chosen[-1][0] if chosen else routing.weights  # (T, K) before capacity
        gates = torch.zeros(t, e).scatter(1, indices, weights.detach().float())  # (T, E)
        assigned = torch.zeros(t, e, dtype=torch.bool).scatter(1, indices, True)  # (T, E)
        dropped = torch.zeros(t, e, dtype=torch.bool).scatter(1, indices, ~keep)  # (T, E)
        per_token = keep.sum(1)  # (T,)
        drop_rate = float((~keep).float().mean())
        switch = float(switch_aux_loss(probs, indices))  # Switch eq. 4-6
    load = (assigned & ~dropped).sum(0).float()  # (E,)
    return RoutingState(router, logits, gates, assigned, dropped, load, capacity, per_token,
                        drop_rate, float(cv_squared(load)), switch, z_loss,
                        isinstance(routing, ExpertChoice))


def _status_line(state: RoutingState) -> str:
    t, e = state.gates.shape
    switch = "n/a" if math.isnan(state.switch_loss) else f"{state.switch_loss:.3f}"
    what = "unchosen tokens" if state.expert_choice else "drop rate"
    cap = "none" if state.capacity is None else str(state.capacity)
    return (f"{ROUTERS[state.router].label}   T={t} E={e} C={cap}   {what} "
            f"{100 * state.drop_rate:.1f}%   load CV\u00b2 {state.load_cv2:.3f}   "
            f"switch loss {switch}   z-loss {state.z_loss:.2f}")


class RoutingFigure:
    """The figure of a `RoutingState`: assignment matrix, load bars, experts per token.

    The axes and artists are made once; `draw(state)` moves them to the new data (a fresh
    figure per slider change would spend most of its time making axes and ticks).
    `draw_message(text)` hides the plots and shows the text instead.
    """

    def __init__(self) -> None:
        from matplotlib.ticker import MaxNLocator

        self.fig = fig = Figure(figsize=(10.0, 3.1), dpi=DPI)
        gs = fig.add_gridspec(1, 3, width_ratios=[3.2, 1.4, 1.2], left=0.05, right=0.99,
                              bottom=0.17, top=0.8, wspace=0.28)
        self.axes = ax_m, ax_l, ax_h = [fig.add_subplot(gs[0, i]) for i in range(3)]
        self.im = ax_m.imshow([[0.0]], cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto",
                              interpolation="nearest")
        self.drops = ax_m.scatter([], [], marker="x", color="crimson", linewidths=1.0)
        ax_m.set_ylabel("expert", fontsize=8)
        ax_m.yaxis.set_label_coords(-0.06, 0.5)
        ax_m.set_title("gate weight per token and expert  (x = dropped)", fontsize=9, y=1.01)
        self.cap_line = ax_l.axhline(0, color="crimson", ls="--", lw=1.2)
        self.fair_line = ax_l.axhline(0, color="gray", ls=":", lw=1.2)
        # a line label instead of a legend, which costs as much to draw as a whole panel
        self.cap_text = ax_l.text(1.01, 0, "", color="crimson", fontsize=7, ha="left",
                                  va="center", transform=ax_l.get_yaxis_transform())
        self.load_title = ax_l.set_title("", fontsize=9, y=1.01)
        ax_h.set_title("tokens", fontsize=9, y=1.01)
        self._bars: dict[str, list[Any]] = {"load": [], "drop": [], "hist": []}
        # Fixed title and label positions: automatic ones measure every tick label per draw.
        for ax, xlabel in zip(self.axes, ("token", "expert", "experts per token"), strict=True):
            ax.set_xlabel(xlabel, fontsize=8)
            ax.xaxis.set_label_coords(0.5, -0.13)
            ax.tick_params(labelsize=7)
            ax.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))
            ax.yaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
        self.title = fig.suptitle("", fontsize=9)
        self.message = fig.text(0.02, 0.5, "", color=ERROR_COLOR, fontsize=9, va="center",
                                family="monospace")

    def _set_visible(self, plots: bool) -> None:
        for ax in self.axes:
            ax.set_visible(plots)
        self.title.set_visible(plots)
        self.message.set_visible(not plots)

    def draw_message(self, message: str) -> Figure:
        """Hide the plots and show `message` (bad input) in red."""
        self.message.set_text("\n".join(_wrap(message, 110)))
        self._set_visible(False)
        return self.fig

    def _set_bars(self, name: str, ax: Any, heights: list[float], bottoms: list[float],
                  **style: Any) -> None:
        """Reuse the bars of `name` when their number is unchanged, else make new ones."""
        bars = self._bars[name]
        if len(bars) != len(heights):
            for bar in bars:
                bar.remove()
            bars[:] = ax.bar(range(len(heights)), heights, bottom=bottoms, **style).patches
            return
        for bar, height, bottom in zip(bars, heights, bottoms, strict=True):
            bar.set_height(height)
            bar.set_y(bottom)

    def draw(self, state: RoutingState) -> Figure:
        """Move every artist to `state`'s data and return the figure."""
        self._set_visible(True)
        ax_m, ax_l, ax_h = self.axes
        t, e = state.gates.shape
        self.im.set_data(state.gates.t().numpy())  # (E, T)
        self.im.set_extent((-0.5, t - 0.5, e - 0.5, -0.5))
        ax_m.set_xlim(-0.5, t - 0.5)
        ax_m.set_ylim(e - 0.5, -0.5)
        drop_e, drop_t = state.dropped.t().nonzero(as_tuple=True)  # (E, T) coordinates
        self.drops.set_offsets(torch.stack([drop_t, drop_e], 1).reshape(-1, 2).numpy())
        self.drops.set_sizes([min(30.0, 1500.0 / t)])

        n_drop = state.dropped.sum(0).float()  # (E,)
        self._set_bars("load", ax_l, state.load.tolist(), [0.0] * e, color="steelblue")
        self._set_bars("drop", ax_l, n_drop.tolist(), state.load.tolist(), color="crimson",
                       alpha=0.55)
        balanced = float(state.assigned.sum()) / e
        self.fair_line.set_ydata([balanced, balanced])
        cap = state.capacity
        self.cap_line.set_visible(cap is not None)
        self.cap_text.set_visible(cap is not None)
        if cap is not None:
            self.cap_line.set_ydata([cap, cap])
            self.cap_text.set_position((1.01, cap))
            self.cap_text.set_text(f"C={cap}")
        top = max(float((state.load + n_drop).max()), balanced, cap or 0)
        ax_l.set_xlim(-0.6, e - 0.4)
        ax_l.set_ylim(0, 1.3 * top + 0.5)
        self.load_title.set_text("load per expert" + (" (·· balanced)" if cap is None else
                                                      " (red dropped, ·· balanced)"))

        counts = torch.bincount(state.experts_per_token, minlength=2)  # (max+1,)
        self._set_bars("hist", ax_h, counts.tolist(), [0.0] * len(counts), color="darkseagreen")
        ax_h.set_xlim(-0.6, len(counts) - 0.4)
        ax_h.set_ylim(0, 1.1 * float(counts.max()) + 0.5)
        self.title.set_text(_status_line(state))
        return self.fig


def draw_routing(state: RoutingState) -> Figure:
    """A new static figure of `state` (see `RoutingFigure`).

    >>> state = explore("expert_choice", n_tokens=8, n_experts=4, capacity_factor=1.5)
    >>> [float(p.get_height()) for p in draw_routing(state).axes[1].patches[:4]]  # C each
    [3.0, 3.0, 3.0, 3.0]
    """
    return RoutingFigure().draw(state)


def _numbers_html(state: RoutingState) -> str:
    switch = "n/a" if math.isnan(state.switch_loss) else f"{state.switch_loss:.3f}"
    what = "tokens no expert chose" if state.expert_choice else "dropped"
    cap = "none" if state.capacity is None else state.capacity
    return ("<div style='font-family:monospace'>"
            f"capacity C = {cap} &nbsp;|&nbsp; {what}: {state.n_dropped} "
            f"({100 * state.drop_rate:.1f}%) &nbsp;|&nbsp; load CV&sup2; = {state.load_cv2:.3f}"
            f" &nbsp;|&nbsp; switch loss = {switch} &nbsp;|&nbsp; z-loss = {state.z_loss:.3f}"
            "</div>")


class RoutingExplorer(_PngDisplay):
    """Move sliders and watch tokens reroute, experts overflow and load collapse.

    Arguments are the starting values of `explore`'s (see there). `controls` maps each
    argument name to its ipywidgets control, so code can move them
    (`ex.controls["capacity_factor"].value = 0.5`); `state` is the latest `RoutingState`,
    `error` the message shown when the input is bad (else None). `interactive=False` (and
    grading, see `fast_mode`) builds no widgets: the object displays a static PNG.

    >>> ex = RoutingExplorer("switch", n_tokens=16, n_experts=4, capacity_factor=1.0,
    ...                      interactive=False)
    >>> ex.state.capacity, ex.widget is None, ex._repr_png_()[:4] == b"\\x89PNG"
    (4, True, True)
    """

    def __init__(self, router: str = "top_k_capacity", n_tokens: int = 32, n_experts: int = 8,
                 k: int = 2, capacity_factor: float = 1.0, noise_scale: float = 1.0,
                 temperature: float = 1.0, seed: int = 0, logits: Tensor | None = None,
                 routing_fn: RoutingFn | None = None, interactive: bool | None = None) -> None:
        self.logits = logits
        self.routing_fn = routing_fn
        self.params = dict(router=router, n_tokens=n_tokens, n_experts=n_experts, k=k,
                           capacity_factor=capacity_factor, noise_scale=noise_scale,
                           temperature=temperature, seed=seed)
        if isinstance(logits, Tensor) and logits.dim() == 2:
            self.params.update(n_tokens=logits.shape[0], n_experts=logits.shape[1])
        self.state: RoutingState | None = None
        self.controls: dict[str, Any] = {}
        self._plot = RoutingFigure()
        self._fig = self._plot.fig
        self._compute()
        if _interactive(interactive):
            self._build_widget()

    def figure(self) -> Figure:
        """The figure of the current state (or of the error message), redrawn in place."""
        if self.error is not None:
            return self._plot.draw_message(self.error)
        assert self.state is not None
        return self._plot.draw(self.state)

    def _compute(self) -> None:
        try:
            self.state = explore(**self.params, logits=self.logits, routing_fn=self.routing_fn)
            self.error = None
        except Exception as err:  # shown in the widget, never a traceback
            self.error = _describe_error(err)
        self._png_cache = None

    def _build_widget(self) -> None:
        import ipywidgets as w

        p = self.params
        style = {"description_width": "120px"}
        lay = w.Layout(width="340px")

        def slider(cls: Any, name: str, lo: float, hi: float, step: float, desc: str,
                   tip: str) -> Any:
            if isinstance(p[name], (int, float)) and not isinstance(p[name], bool):
                hi = max(hi, p[name]) if name in ("n_tokens", "n_experts") else hi
                value = min(max(p[name], lo), hi)
            else:
                value = lo
            return cls(value=value, min=lo, max=hi, step=step, description=desc,
                       continuous_update=False, style=style, layout=lay, tooltip=tip)

        c = self.controls
        c["router"] = w.Dropdown(options=[(row.label, key) for key, row in ROUTERS.items()],
                                 value=p["router"] if p["router"] in ROUTERS else "top_k",
                                 description="router", style=style, layout=lay)
        c["n_tokens"] = slider(w.IntSlider, "n_tokens", 2, 128, 1, "tokens T", "tokens")
        c["n_experts"] = slider(w.IntSlider, "n_experts", 2, 16, 1, "experts E", "experts")
        c["k"] = slider(w.IntSlider, "k", 1, 16, 1, "k (top-k)", "experts per token")
        c["capacity_factor"] = slider(w.FloatSlider, "capacity_factor", 0.25, 4.0, 0.25,
                                      "capacity factor", "slots = ceil(k T c / E)")
        c["noise_scale"] = slider(w.FloatSlider, "noise_scale", 0.0, 3.0, 0.1, "noise scale",
                                  "std of the router noise (noisy top-k)")
        c["temperature"] = slider(w.FloatSlider, "temperature", 0.1, 5.0, 0.1, "temperature",
                                  "router logits are divided by it")
        c["seed"] = slider(w.IntSlider, "seed", 0, 99, 1, "seed", "random router and tokens")
        self.image = w.Image(format="png", layout=w.Layout(width="800px"))
        self.numbers = w.HTML()
        self.message = w.HTML()
        self.widget = w.VBox([
            w.HBox([w.VBox([c[n] for n in ("router", "n_tokens", "n_experts", "k")]),
                    w.VBox([c[n] for n in ("capacity_factor", "noise_scale", "temperature",
                                           "seed")])]),
            self.message, self.image, self.numbers])
        self._sync_enabled()
        if self._read_controls():  # a starting value outside a slider's range was clipped
            self._compute()
        self._show()
        for control in c.values():
            control.observe(self._on_change, names="value")

    def _sync_enabled(self) -> None:
        """Grey out the controls the chosen router (or fixed logits) does not use."""
        c, row = self.controls, ROUTERS[self.controls["router"].value]
        c["k"].disabled = not row.uses_k
        c["capacity_factor"].disabled = not row.uses_capacity
        c["noise_scale"].disabled = not row.noisy
        for name in ("n_tokens", "n_experts"):
            c[name].disabled = self.logits is not None

    def _read_controls(self) -> bool:
        """Copy the controls' values into `params`; True if anything changed."""
        values = {name: control.value for name, control in self.controls.items()}
        if isinstance(self.logits, Tensor) and self.logits.dim() == 2:
            values.update(n_tokens=self.logits.shape[0], n_experts=self.logits.shape[1])
        changed = values != self.params
        self.params.update(values)
        return changed

    def _on_change(self, change: dict) -> None:
        self._sync_enabled()
        if self._read_controls():
            self._compute()
            self._show()

    def _show(self) -> None:
        if self.error is not None:
            self.message.value = _error_html(self.error)
            if not self.image.value:  # nothing good to show yet: show the message instead
                self.image.value = self._render()
            return
        self.message.value = ""
        self.image.value = self._render()
        assert self.state is not None
        self.numbers.value = _numbers_html(self.state)


