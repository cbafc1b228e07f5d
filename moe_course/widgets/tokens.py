"""`TokenRoutingView` (notebook 05): text with each character coloured by the expert it
went to, per layer.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import Tensor

from ..validation import positive_int
from .base import DPI, _error_html, _interactive, _StaticDisplay

# --------------------------------------------------------------------------------------
# TokenRoutingView


def expert_colors(n_experts: int) -> list[str]:
    """One distinct hex colour per expert (tab10, tab20, then evenly spaced hues).

    >>> expert_colors(2)
    ['#1f77b4', '#ff7f0e']
    """
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    e = positive_int("n_experts", n_experts)
    if e <= 10:
        return [to_hex(colormaps["tab10"](i)) for i in range(e)]
    if e <= 20:
        return [to_hex(colormaps["tab20"](i)) for i in range(e)]
    return [to_hex(colormaps["hsv"](i / e)) for i in range(e)]


def _text_color(hex_color: str) -> str:
    r, g, b = (int(hex_color[i: i + 2], 16) for i in (1, 3, 5))
    return "#000" if 0.299 * r + 0.587 * g + 0.114 * b > 140 else "#fff"


DROPPED_COLOR = "#d0d0d0"  # tokens no expert processed (id -1)
STATIC_CHARS = 240  # characters drawn in the static PNG
STATIC_WIDTH = 60  # characters per line in the static PNG


class TokenRoutingView(_StaticDisplay):
    """Text with each character coloured by the expert it was routed to, per layer.

    `text` has `S` characters; `expert_ids` gives each character's expert per layer: `(S,)`
    for one layer, `(L, S)`, or `(L, S, K)` (the first choice, `[..., 0]`, is shown), or a
    list of `L` such tensors; `-1` marks a token no expert processed (dropped). Hover a
    character for its layer and expert. The widget has a layer dropdown (plus "all layers");
    `html(layer)` returns the HTML, `controls["layer"]` picks the layer.

    >>> v = TokenRoutingView("ab", torch.tensor([[0, 1]]), n_experts=2, interactive=False)
    >>> v.error is None, "expert 1" in v.html(0)
    (True, True)
    """

    def __init__(self, text: str, expert_ids: Any, n_experts: int,
                 layer_names: Sequence[str] | None = None, interactive: bool | None = None,
                 ) -> None:
        self.controls: dict[str, Any] = {}
        self.text = str(text)
        self.ids = torch.zeros(0, len(self.text), dtype=torch.long)
        self.layer_names: list[str] = []
        self.n_experts = n_experts
        try:
            self.colors = expert_colors(n_experts)
            self.ids = self._expert_ids(expert_ids)  # (L, S)
            n_layers = self.ids.shape[0]
            names = [f"layer {i}" for i in range(n_layers)] if layer_names is None else [
                str(s) for s in layer_names]
            if len(names) != n_layers:
                raise ValueError(f"layer_names must name the {n_layers} layers; got "
                                 f"{len(names)} names")
            self.layer_names = names
        except ValueError as err:
            self.error = str(err)
        self._fig = Figure(figsize=(8.0, 1.0), dpi=DPI)
        if _interactive(interactive):
            self._build_widget()

    @classmethod
    def from_routing(cls, text: str, routings: Sequence[Any], n_experts: int,
                     layer_names: Sequence[str] | None = None,
                     interactive: bool | None = None) -> TokenRoutingView:
        """Build the view from each layer's routing decisions over the `S` characters.

        `routings` has one entry per layer: an `MoEOutput` (its `.routing` is used), a
        `TokenChoice` (each token's first choice; -1 where it was dropped) or an
        `ExpertChoice` (the expert that gave the token its largest gate; -1 if none chose it).

        >>> from moe_course import TokenChoice
        >>> tc = TokenChoice(torch.ones(3, 1), torch.tensor([[1], [0], [1]]),
        ...                  torch.tensor([[True], [True], [False]]))
        >>> TokenRoutingView.from_routing("abc", [tc], 2, interactive=False).ids
        tensor([[ 1,  0, -1]])
        """
        ids = []
        for routing in routings:
            routing = getattr(routing, "routing", routing)
            if hasattr(routing, "token_idx"):  # ExpertChoice (E, C)
                e, c = routing.token_idx.shape
                if routing.token_idx.numel() and int(routing.token_idx.max()) >= len(text):
                    raise ValueError(f"an ExpertChoice picked token {int(routing.token_idx.max())}"
                                     f" but text has only S = {len(text)} characters")
                gates = torch.full((len(text), e), -1.0).index_put(
                    (routing.token_idx, torch.arange(e)[:, None].expand(e, c)),
                    routing.gates.detach().float())  # (T, E), -1 where not chosen
                best = gates.argmax(1)  # (T,)
                ids.append(torch.where(gates.max(1).values >= 0, best, -1))
            elif hasattr(routing, "indices"):  # TokenChoice (T, K)
                first = routing.indices[:, 0]  # (T,)
                keep = getattr(routing, "keep", None)
                ids.append(first if keep is None else torch.where(keep[:, 0], first, -1))
            else:
                raise ValueError("routings must hold MoEOutput, TokenChoice or ExpertChoice "
                                 f"entries; got {type(routing).__name__}")
        return cls(text, ids, n_experts, layer_names=layer_names, interactive=interactive)

    def _expert_ids(self, expert_ids: Any) -> Tensor:
        if isinstance(expert_ids, (list, tuple)) and expert_ids and all(
                isinstance(i, Tensor) for i in expert_ids):
            ids = torch.stack([torch.as_tensor(i) for i in expert_ids])
        else:
            try:
                ids = torch.as_tensor(expert_ids)
            except (TypeError, ValueError, RuntimeError) as err:
                raise ValueError(f"expert_ids must be an integer tensor (L, S); {err}") from None
        if ids.is_floating_point() or ids.dtype == torch.bool:
            raise ValueError(f"expert_ids must be integers; got {ids.dtype}")
        if ids.dim() == 1:
            ids = ids[None]  # (1, S)
        if ids.dim() == 3:
            ids = ids[..., 0]  # (L, S): first choice
        s = len(self.text)
        if ids.dim() != 2 or ids.shape[1] != s:
            raise ValueError(f"expert_ids must be (S,), (L, S) or (L, S, K) with S = "
                             f"len(text) = {s}; got shape {tuple(ids.shape)}")
        if ids.numel() and (int(ids.min()) < -1 or int(ids.max()) >= self.n_experts):
            raise ValueError(f"expert_ids must lie in [0, {self.n_experts}) (or -1 for "
                             f"dropped); got values from {int(ids.min())} to {int(ids.max())}")
        return ids.long()

    def _color(self, e: int) -> str:
        return DROPPED_COLOR if e < 0 else self.colors[e]

    def html(self, layer: int | None = None) -> str:
        """The coloured text of one layer (or of all layers when `layer` is None), as HTML."""
        if self.error is not None:
            return _error_html(self.error)
        layers = range(self.ids.shape[0]) if layer is None else [layer]
        blocks = [self._legend()]
        for li in layers:
            spans = []
            for ch, e in zip(self.text, self.ids[li].tolist(), strict=True):
                shown = {"\n": "&#8629;<br>", " ": "&nbsp;", "\t": "&rarr;"}.get(
                    ch, html.escape(ch))
                bg = self._color(e)
                who = "dropped" if e < 0 else f"expert {e}"
                spans.append(f'<span title="{html.escape(self.layer_names[li])}: {who}" '
                             f'style="background:{bg};color:{_text_color(bg)}">{shown}</span>')
            blocks.append(f"<div style='margin:4px 0'><b>{html.escape(self.layer_names[li])}"
                          f"</b><div style='font-family:monospace;line-height:1.6;"
                          f"word-break:break-all'>{''.join(spans)}</div></div>")
        return "<div>" + "".join(blocks) + "</div>"

    def _legend(self) -> str:
        items = "".join(
            f"<span style='background:{c};color:{_text_color(c)};padding:0 4px;margin-right:3px;"
            f"font-family:monospace'>{i}</span>" for i, c in enumerate(self.colors))
        return f"<div style='margin-bottom:4px'>experts: {items}</div>"

    def _repr_html_(self) -> str:
        return self.html()

    def show_static(self) -> None:
        """Display the static HTML (works without a widget frontend)."""
        from IPython.display import HTML, display

        display(HTML(self.html()))

    def _draw(self, fig: Figure) -> Figure:
        """Characters as coloured cells, `STATIC_WIDTH` per line, one block per layer."""
        fig.clear()
        text = self.text[:STATIC_CHARS]
        n_lines = max(1, math.ceil(len(text) / STATIC_WIDTH))
        n_layers = self.ids.shape[0]
        rows = 1.5 + n_layers * (n_lines + 1.5)
        fig.set_size_inches(8.0, 0.2 + 0.2 * rows)
        ax = fig.add_axes((0.01, 0.01, 0.98, 0.98))
        ax.set_xlim(0, STATIC_WIDTH)
        ax.set_ylim(rows, 0)
        ax.axis("off")
        ax.text(0, 0.75, "experts", fontsize=8, va="center")
        for e, color in enumerate(self.colors):  # the legend
            x = 6 + 2.5 * e
            ax.add_patch(_rect(x, 0.25, color, width=2.0))
            ax.text(x + 1.0, 0.75, str(e), fontsize=7, ha="center", va="center",
                    color=_text_color(color))
        for li in range(n_layers):
            top = 1.5 + li * (n_lines + 1.5)
            ax.text(0, top + 0.75, self.layer_names[li], fontsize=8, weight="bold", va="center")
            for pos, (ch, e) in enumerate(zip(text, self.ids[li].tolist(), strict=False)):
                x, y = pos % STATIC_WIDTH, top + 1.5 + pos // STATIC_WIDTH
                bg = self._color(e)
                ax.add_patch(_rect(x, y - 0.5, bg))
                shown = {"\n": "\u21b5", " ": "", "\t": "\u2192"}.get(ch, ch)
                if shown:
                    ax.text(x + 0.5, y, shown, fontsize=7, family="monospace", ha="center",
                            va="center", color=_text_color(bg))
        if len(self.text) > STATIC_CHARS:
            ax.set_title(f"first {STATIC_CHARS} of {len(self.text)} characters", fontsize=8)
        return fig

    def _build_widget(self) -> None:
        import ipywidgets as w

        options = [("all layers", -1)] + [(n, i) for i, n in enumerate(self.layer_names)]
        self.controls["layer"] = w.Dropdown(options=options, value=-1, description="layer")
        self.view = w.HTML(self.html())
        self.widget = w.VBox([self.controls["layer"], self.view])
        self.controls["layer"].observe(self._on_change, names="value")

    def _on_change(self, change: dict) -> None:
        layer = change["new"]
        self.view.value = self.html(None if layer < 0 else layer)


def _rect(x: float, y: float, color: str, width: float = 1.0) -> Any:
    from matplotlib.patches import Rectangle

    return Rectangle((x, y), width, 1.0, facecolor=color, edgecolor="none")
