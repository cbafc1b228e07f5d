"""What every widget shares: the static PNG/HTML display, grading mode, error messages.

A widget subclasses `_PngDisplay` (or `_StaticDisplay`), draws on one reused matplotlib
`Figure`, and shows that figure alone where no widget frontend runs (nbconvert,
nbgrader feedback, GitHub) or under grading (`fast_mode()`).
"""

from __future__ import annotations

import html
import io
from typing import Any

from matplotlib.figure import Figure

# Under grading (`fast_mode()`: nbgrader or `moe-course grade` runs the notebook) widgets
# build no ipywidgets and run nothing interactive: they show a static figure.
from ..train import fast_mode

DPI = 80  # figure resolution: small PNGs keep a slider change fast
ERROR_COLOR = "#b00020"



def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, pil_kwargs={"compress_level": 1})
    return buf.getvalue()


def _error_html(message: str) -> str:
    return (f'<div style="color:{ERROR_COLOR};font-family:monospace;white-space:pre-wrap">'
            f"&#9888; {html.escape(message)}</div>")


def _message_figure(fig: Figure, message: str) -> Figure:
    fig.clear()
    fig.text(0.02, 0.5, "\n".join(_wrap(message, 110)), color=ERROR_COLOR, fontsize=9,
             va="center", family="monospace")
    return fig


def _wrap(text: str, width: int) -> list[str]:
    lines: list[str] = []
    for line in text.splitlines() or [""]:
        while len(line) > width:
            cut = line.rfind(" ", 0, width)
            cut = cut if cut > 0 else width
            lines.append(line[:cut])
            line = line[cut:].lstrip()
        lines.append(line)
    return lines


def _describe_error(err: BaseException) -> str:
    if isinstance(err, ValueError):
        return str(err)
    return f"{type(err).__name__}: {err}"


class _StaticDisplay:
    """Shared display logic: a widget when interactive, a static PNG otherwise."""

    widget: Any = None  # the ipywidgets box, or None in fast mode
    error: str | None = None  # the message shown for bad input, None when all is well
    _fig: Figure
    _png_cache: bytes | None = None

    def _draw(self, fig: Figure) -> Figure:
        raise NotImplementedError

    def figure(self) -> Figure:
        """The static matplotlib figure of the current state (the same Figure, redrawn)."""
        if self.error is not None:
            return _message_figure(self._fig, self.error)
        return self._draw(self._fig)

    def _render(self) -> bytes:
        self._png_cache = _png(self.figure())
        return self._png_cache

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict | None:
        # IPython adds the other _repr_*_ formats (the static fallback) to this bundle
        if self.widget is None:
            return None
        return self.widget._repr_mimebundle_(include=include, exclude=exclude)


class _PngDisplay(_StaticDisplay):
    """A widget whose static fallback is the PNG of its figure."""

    def show_static(self) -> None:
        """Display the static PNG (works without a widget frontend)."""
        from IPython.display import Image, display

        display(Image(data=self._repr_png_(), format="png"))

    def _repr_png_(self) -> bytes:
        return self._png_cache if self._png_cache is not None else self._render()

    def _mount(self) -> None:
        """The widget: `self.controls` in a row above an error line and the figure, drawn
        now and redrawn by `_on_change` whenever a control changes."""
        import ipywidgets as w

        self.image = w.Image(format="png")
        self.message = w.HTML(_error_html(self.error) if self.error else "")
        self.widget = w.VBox([w.HBox(list(self.controls.values())), self.message, self.image])
        self.image.value = self._render()
        for control in self.controls.values():
            control.observe(self._on_change, names="value")

    def _on_change(self, change: dict) -> None:
        raise NotImplementedError

    def _compute(self) -> None:
        raise NotImplementedError

    def _redraw(self) -> None:
        """Recompute from the controls' values and show the new figure; bad values leave
        the figure as it was and say why in the error line."""
        try:
            self._compute()
        except ValueError as err:
            self.message.value = _error_html(str(err))
            return
        self.message.value = ""
        self.image.value = self._render()


def _interactive(interactive: bool | None) -> bool:
    return (not fast_mode()) if interactive is None else bool(interactive)


