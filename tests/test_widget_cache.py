"""Programmatic tests of `CacheExplorer` (notebook 08): move the controls, check the hits
against oracles written out here (an LRU by timestamps, Belady by exhaustive search), the
static fallback under grading, and bad input as a message."""

from __future__ import annotations

import functools
import itertools

import ipywidgets
import pytest
import torch
from IPython.core.formatters import DisplayFormatter

from moe_course.widgets import ERROR_COLOR, CacheExplorer

WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _interactive_env(monkeypatch):
    monkeypatch.delenv("NBGRADER_EXECUTION", raising=False)
    monkeypatch.delenv("MOE_COURSE_GRADING", raising=False)


def lru_hits_oracle(trace: torch.Tensor, capacity: int) -> list[bool]:
    last: dict[int, int] = {}
    hits = []
    for time, expert in enumerate(trace.reshape(-1).tolist()):
        hits.append(expert in last)
        if expert not in last and capacity and len(last) == capacity:
            del last[min(last, key=last.__getitem__)]
        if capacity:
            last[expert] = time
    return hits


def best_hits_oracle(trace: torch.Tensor, capacity: int) -> int:
    accesses = tuple(trace.reshape(-1).tolist())

    @functools.cache
    def best(pos: int, cache: frozenset) -> int:
        if pos == len(accesses):
            return 0
        pool = sorted(cache | {accesses[pos]})
        keep = [frozenset(s) for r in range(min(capacity, len(pool)) + 1)
                for s in itertools.combinations(pool, r)]
        return int(accesses[pos] in cache) + max(best(pos + 1, s) for s in keep)

    return best(0, frozenset())


def make_trace(seed: int, layers: int = 2, n: int = 14, k: int = 2, e: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    weights = torch.arange(1, e + 1, dtype=torch.float64) ** -1.0
    return torch.stack([torch.stack([torch.multinomial(weights, k, generator=g)
                                     for _ in range(n)]) for _ in range(layers)])  # (L, N, K)


def test_controls_replay_the_trace_and_match_the_oracles():
    trace = make_trace(0)
    ex = CacheExplorer(trace, n_experts=5, capacity=1)
    assert ex.error is None and ex.widget is not None
    before = bytes(ex.image.value)
    ex.controls["capacity"].value = 3
    assert bytes(ex.image.value) != before
    for layer in (0, 1):
        ex.controls["layer"].value = layer
        for capacity in (0, 2, 3):
            ex.controls["capacity"].value = capacity
            ex.controls["policy"].value = "LRU"
            s = ex.state
            assert (s.layer, s.capacity, s.policy) == (layer, capacity, "LRU")
            assert s.hits.reshape(-1).tolist() == lru_hits_oracle(trace[layer], capacity)
            assert s.hit_rate == pytest.approx(sum(s.hits.reshape(-1).tolist()) / 28)
            ex.controls["policy"].value = "Belady (optimal)"
            assert int(ex.state.hits.sum()) == best_hits_oracle(trace[layer], capacity)
            fig = ex.figure()
            assert f"layer {layer}" in fig.axes[0].get_title()
            assert f"hit rate {ex.state.hit_rate:.1%}" in fig.axes[1].get_title()
    curve = ex.curve(1, "LRU")
    assert curve.tolist() == pytest.approx([sum(lru_hits_oracle(trace[1], c)) / 28
                                            for c in range(6)])
    assert curve.tolist() == sorted(curve.tolist())  # LRU: more slots never hurt


def test_one_layer_trace_and_default_experts():
    ex = CacheExplorer(torch.tensor([[0, 1], [0, 2], [2, 0]]), capacity=2, interactive=False)
    assert ex.n_layers == 1 and ex.n_experts == 3 and ex.state.hit_rate == 0.5
    assert ex._repr_png_().startswith(PNG_MAGIC)


def test_widget_display_carries_a_static_png_fallback():
    ex = CacheExplorer(make_trace(1))
    data, _ = DisplayFormatter().format(ex)
    assert WIDGET_MIME in data and data["image/png"] == bytes(ex.image.value)


@pytest.mark.parametrize("variable", ["NBGRADER_EXECUTION", "MOE_COURSE_GRADING"])
def test_grading_mode_renders_static_only(monkeypatch, variable):
    monkeypatch.setenv(variable, "autograde")

    def no_widgets(*args, **kwargs):
        raise AssertionError("an ipywidget was built under grading")

    monkeypatch.setattr(ipywidgets.Widget, "__init__", no_widgets)
    ex = CacheExplorer(make_trace(2))
    assert ex.widget is None and ex.controls == {}
    data, _ = DisplayFormatter().format(ex)
    assert WIDGET_MIME not in data and data["image/png"].startswith(PNG_MAGIC)


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"trace": torch.rand(2, 3)}, "integer tensor"),
    ({"trace": torch.zeros(2, 3, 4, 5, dtype=torch.long)}, "(L, N, K) or (N, K)"),
    ({"trace": torch.tensor([[0, -1]])}, ">= 0"),
    ({"trace": torch.tensor([[0, 4]]), "n_experts": 3}, "n_experts must be an int >= 5"),
    ({"trace": torch.tensor([[0, 1]]), "policy": "FIFO"}, "policy must be one of"),
    ({"trace": torch.tensor([[0, 1]]), "layer": 2}, "layer must lie in [0, 1)"),
    ({"trace": torch.tensor([[0, 1]]), "capacity": 7}, "capacity must lie in [0, 2]"),
])
def test_bad_input_shows_a_message(kwargs, words):
    ex = CacheExplorer(**kwargs)
    assert words in ex.error
    assert ERROR_COLOR in ex.message.value
    assert bytes(ex.image.value).startswith(PNG_MAGIC)
    ex.controls["capacity"].value = 1  # moving the controls of a broken explorer stays calm
