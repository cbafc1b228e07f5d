"""Programmatic tests of `moe_course.widgets`: move the controls, check the data against oracles.

The oracles are written out here (loops, `torch.topk`, `math`), not taken from the
reference package, so that a widget that arranges the reference wrongly fails.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction
from types import SimpleNamespace

import ipywidgets
import pytest
import torch
from IPython.core.formatters import DisplayFormatter

from moe_course import widgets
from moe_course.widgets import ERROR_COLOR, LoadTimeline, RoutingExplorer, TokenRoutingView, explore

WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _interactive_env(monkeypatch):
    """Tests run as a learner would, not under grading, unless they set the variables."""
    monkeypatch.delenv("NBGRADER_EXECUTION", raising=False)
    monkeypatch.delenv("MOE_COURSE_GRADING", raising=False)


# ---------------------------------------------------------------- oracles


def capacity_oracle(t: int, e: int, cf: float, k: int = 1) -> int:
    return min(t, math.ceil(k * t * Fraction(str(cf)) / e))


def gshard_drops(indices: torch.Tensor, n_experts: int, capacity: int) -> torch.Tensor:
    """Brute force: first choices of all tokens in order, then second choices, ..."""
    t, k = indices.shape
    used = [0] * n_experts
    dropped = torch.zeros(t, n_experts, dtype=torch.bool)
    for j in range(k):
        for row in range(t):
            e = int(indices[row, j])
            if used[e] < capacity:
                used[e] += 1
            else:
                dropped[row, e] = True
    return dropped


def cv2_oracle(v: torch.Tensor) -> float:
    values = [float(x) for x in v]
    mean = sum(values) / len(values)
    var = sum((x - mean) ** 2 for x in values) / len(values)
    return var / (mean**2 + 1e-10)


def z_loss_oracle(logits: torch.Tensor) -> float:
    rows = [math.log(sum(math.exp(float(x)) for x in row)) ** 2 for row in logits]
    return sum(rows) / len(rows)


def switch_oracle(logits: torch.Tensor, indices: torch.Tensor) -> float:
    t, e = logits.shape
    probs = torch.softmax(logits.double(), dim=-1)
    f = [sum(int(i == ex) for i in indices.reshape(-1).tolist()) / indices.numel()
         for ex in range(e)]
    p = [float(probs[:, ex].mean()) for ex in range(e)]
    return e * sum(fe * pe for fe, pe in zip(f, p, strict=True))


def load_bar_heights(fig) -> list[float]:
    """Heights of the blue (processed) bars of the load panel."""
    ax = fig.axes[1]
    return [float(p.get_height()) for p in ax.patches if p.get_facecolor()[2] > 0.6]


# ---------------------------------------------------------------- RoutingExplorer


def test_capacity_slider_drops_what_the_gshard_oracle_drops():
    ex = RoutingExplorer("top_k_capacity", n_tokens=40, n_experts=6, k=2, seed=3)
    assert ex.widget is not None and ex.error is None
    seen_drops, seen_images = set(), set()
    for cf in (0.5, 1.0, 1.5, 3.0):
        ex.controls["capacity_factor"].value = cf
        s = ex.state
        t, e, k = 40, 6, 2
        cap = capacity_oracle(t, e, cf, k)
        assert s.capacity == cap
        indices = torch.topk(s.logits, k, dim=-1).indices  # (T, K)
        expected = gshard_drops(indices, e, cap)
        assert torch.equal(s.dropped, expected)
        assert s.n_dropped == int(expected.sum())
        assert float(s.load.sum()) == t * k - int(expected.sum())  # loads sum to T*K - drops
        assert float(s.load.max()) <= cap
        assert s.drop_rate == pytest.approx(int(expected.sum()) / (t * k))
        assert s.load_cv2 == pytest.approx(cv2_oracle(s.load), rel=1e-5)
        assert s.switch_loss == pytest.approx(switch_oracle(s.logits, indices), rel=1e-5)
        assert s.z_loss == pytest.approx(z_loss_oracle(s.logits), rel=1e-5)
        # the figure shows this state: processed bars = load, dashed line = capacity
        fig = ex.figure()
        assert load_bar_heights(fig) == s.load.tolist()
        assert ex._plot.cap_line.get_ydata()[0] == cap
        assert f"C={cap}" in ex._plot.title.get_text()
        assert f"dropped: {s.n_dropped} " in ex.numbers.value
        seen_drops.add(s.n_dropped)
        seen_images.add(bytes(ex.image.value))
    assert len(seen_drops) > 2  # the slider changed the outcome
    assert len(seen_images) == 4  # and the picture, every time


def test_explore_matches_reference_arrangement_for_top_k_and_gates():
    s = explore("top_k", n_tokens=12, n_experts=5, k=3, seed=1)
    top = torch.topk(s.logits, 3, dim=-1)
    expected_gates = torch.zeros(12, 5)
    for row in range(12):
        w = torch.softmax(top.values[row], dim=-1)
        for j in range(3):
            expected_gates[row, top.indices[row, j]] = w[j]
    torch.testing.assert_close(s.gates, expected_gates)
    assert s.capacity is None and s.n_dropped == 0
    assert s.experts_per_token.tolist() == [3] * 12
    assert float(s.load.sum()) == 36


def test_expert_choice_loads_all_equal_capacity():
    ex = RoutingExplorer("expert_choice", n_tokens=30, n_experts=4, seed=2)
    for cf in (0.5, 1.0, 2.0):
        ex.controls["capacity_factor"].value = cf
        s = ex.state
        cap = min(30, math.ceil(30 * Fraction(str(cf)) / 4))
        assert s.capacity == cap
        assert s.load.tolist() == [float(cap)] * 4
        probs = torch.softmax(s.logits, dim=-1)  # (T, E)
        for e in range(4):  # each expert took its top-C tokens by softmax score
            chosen = set(torch.argsort(probs[:, e], descending=True)[:cap].tolist())
            assert set(s.assigned[:, e].nonzero().flatten().tolist()) == chosen
        assert int(s.experts_per_token.sum()) == 4 * cap
        unchosen = int((s.assigned.sum(1) == 0).sum())
        assert s.n_dropped == unchosen and s.drop_rate == pytest.approx(unchosen / 30)
        assert math.isnan(s.switch_loss)
        assert load_bar_heights(ex.figure()) == [float(cap)] * 4


def test_switch_dense_and_noisy_routers():
    switch = explore("switch", n_tokens=16, n_experts=4, k=3, capacity_factor=1.0)
    assert switch.assigned.sum(1).tolist() == [1] * 16  # top-1 whatever k says
    assert switch.capacity == 4
    dense = explore("dense", n_tokens=16, n_experts=4)
    torch.testing.assert_close(dense.gates, torch.softmax(dense.logits, dim=-1))
    assert dense.switch_loss == pytest.approx(1.0)  # f is uniform when every expert is used
    clean = explore("noisy_top_k", noise_scale=0.0, seed=5)
    plain = explore("top_k", seed=5)
    torch.testing.assert_close(clean.logits, plain.logits)
    noisy = explore("noisy_top_k", noise_scale=1.0, seed=5)
    assert not torch.allclose(noisy.logits, plain.logits)
    torch.testing.assert_close(noisy.logits, explore("noisy_top_k", noise_scale=1.0,
                                                     seed=5).logits)  # seeded
    hot = explore("top_k", temperature=0.5, seed=5)
    torch.testing.assert_close(hot.logits, 2 * plain.logits)


def test_given_logits_are_used_and_fix_the_sizes():
    logits = torch.tensor([[3.0, 0.0, 1.0], [0.0, 2.0, 1.0], [1.0, 0.0, 4.0], [5.0, 0.0, 0.0]])
    ex = RoutingExplorer("top_k_capacity", logits=logits, k=1, capacity_factor=1.0)
    assert ex.controls["n_tokens"].disabled and ex.controls["n_experts"].value == 3
    s = ex.state
    assert s.capacity == 2  # ceil(4 / 3)
    assert s.assigned.nonzero().tolist() == [[0, 0], [1, 1], [2, 2], [3, 0]]
    assert s.dropped.nonzero().tolist() == []
    ex.controls["capacity_factor"].value = 0.5  # C = 1: token 3's first choice overflows
    assert ex.state.dropped.nonzero().tolist() == [[3, 0]]


def test_learner_routing_fn_is_used():
    calls = []

    def everyone_to_expert_zero(logits, k):
        calls.append((tuple(logits.shape), k))
        t = logits.shape[0]
        return torch.ones(t, 1), torch.zeros(t, 1, dtype=torch.long)

    ex = RoutingExplorer("switch", n_tokens=20, n_experts=5, capacity_factor=1.0,
                         routing_fn=everyone_to_expert_zero)
    assert calls[-1] == ((20, 5), 1)
    s = ex.state
    assert s.capacity == 4
    assert s.load.tolist() == [4.0, 0.0, 0.0, 0.0, 0.0]
    assert s.dropped[:, 0].nonzero().flatten().tolist() == list(range(4, 20))
    ex.controls["capacity_factor"].value = 2.0
    assert calls[-1] == ((20, 5), 1) and ex.state.load.tolist() == [8.0, 0.0, 0.0, 0.0, 0.0]

    def reversed_experts(logits, capacity):  # expert choice: token order reversed
        e = logits.shape[1]
        idx = torch.arange(capacity - 1, -1, -1).repeat(e, 1)
        return torch.full((e, capacity), 0.5), idx

    s = explore("expert_choice", n_tokens=10, n_experts=2, capacity_factor=0.6,
                routing_fn=reversed_experts)
    assert s.assigned.nonzero().tolist() == [[0, 0], [0, 1], [1, 0], [1, 1], [2, 0], [2, 1]]


@pytest.mark.parametrize("bad, words", [
    (lambda logits, k: torch.zeros(3), "pair"),
    (lambda logits, k: (torch.ones(logits.shape[0], k + 1),
                        torch.zeros(logits.shape[0], k + 1, dtype=torch.long)), "shape"),
    (lambda logits, k: (torch.ones(logits.shape[0], k), torch.ones(logits.shape[0], k)),
     "integers"),
    (lambda logits, k: (torch.ones(logits.shape[0], k),
                        torch.full((logits.shape[0], k), 99)), "[0, 8)"),
    (lambda logits, k: (torch.ones(logits.shape[0], k),
                        torch.zeros(logits.shape[0], k, dtype=torch.long)), "repeat"),
    (lambda logits, k: (torch.full((logits.shape[0], k), float("nan")),
                        torch.topk(logits, k).indices), "NaN"),
    (lambda logits, k: 1 / 0, "raised ZeroDivisionError"),
])
def test_bad_routing_fn_shows_a_message_not_a_traceback(bad, words):
    ex = RoutingExplorer("top_k", k=2, routing_fn=bad)
    assert ex.error is not None and words in ex.error, ex.error
    assert "routing_fn" in ex.error
    assert ERROR_COLOR in ex.message.value and words in ex.message.value.replace("&#x27;", "'")
    assert bytes(ex.image.value).startswith(PNG_MAGIC)  # the message as a picture, too
    assert ex._plot.message.get_visible() and not ex._plot.axes[0].get_visible()
    ex.routing_fn = None  # fixed: the next change shows the routing again
    ex.controls["seed"].value = 1
    assert ex.error is None and ex.message.value == "" and ex.state is not None


def test_nan_logits_and_k_above_e_show_messages():
    logits = torch.randn(6, 4)
    logits[2, 1] = float("nan")
    ex = RoutingExplorer("top_k", logits=logits, k=2)
    assert "NaN" in ex.error and "token 2, expert 1" in ex.error
    assert ERROR_COLOR in ex.message.value
    with pytest.raises(ValueError, match=r"between 1 and E = 4.*got k = 6"):
        explore("top_k", n_experts=4, k=6)  # the slider cannot get there: its max is E
    with pytest.raises(ValueError, match="router must be one of"):
        explore("top_2")


def test_k_slider_max_follows_e():
    ex = RoutingExplorer("top_k", n_experts=4, k=3)
    k = ex.controls["k"]
    assert (k.min, k.max, k.value, ex.error) == (1, 4, 3, None)
    k.value = 6  # clipped to E
    assert k.value == 4 and ex.error is None and ex.params["k"] == 4
    ex.controls["n_experts"].value = 8
    assert k.max == 8
    k.value = 6
    assert ex.error is None and ex.state.assigned.sum(1).tolist() == [6] * 32
    ex.controls["n_experts"].value = 3  # a smaller E pulls k down with it
    assert (k.max, k.value, ex.params["k"], ex.error) == (3, 3, 3, None)
    assert ex.state.assigned.sum(1).tolist() == [3] * 32
    fixed = RoutingExplorer("top_k", logits=torch.randn(5, 6), k=2)
    assert fixed.controls["k"].max == 6  # E of the given logits


def test_widget_display_carries_a_static_png_fallback():
    ex = RoutingExplorer(n_tokens=8, n_experts=4)
    data, _ = DisplayFormatter().format(ex)
    assert WIDGET_MIME in data
    assert data["image/png"] == bytes(ex.image.value)  # the same picture, not a second render


@pytest.mark.parametrize("variable", ["NBGRADER_EXECUTION", "MOE_COURSE_GRADING"])
def test_grading_mode_renders_static_only(monkeypatch, variable):
    monkeypatch.setenv(variable, "autograde")

    def no_widgets(*args, **kwargs):
        raise AssertionError("an ipywidget was built under grading")

    monkeypatch.setattr(ipywidgets.Widget, "__init__", no_widgets)
    history = SimpleNamespace(load=torch.full((4, 1, 2), 0.5), loss=torch.ones(4))
    for obj in (RoutingExplorer(), LoadTimeline(history),
                TokenRoutingView("ab", torch.tensor([0, 1]), n_experts=2)):
        assert obj.widget is None and obj.controls == {}
        data, _ = DisplayFormatter().format(obj)
        assert WIDGET_MIME not in data
        if isinstance(obj, TokenRoutingView):
            assert "expert 1" in data["text/html"]
        else:
            assert data["image/png"].startswith(PNG_MAGIC)


# ---------------------------------------------------------------- LoadTimeline


def make_history(steps: int, layers: int, experts: int, seed: int, sharp: float):
    """A stand-in for moe_course.train's History: .load (steps, L, E) fractions, .loss."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(steps, layers, experts, generator=g) * sharp
    return SimpleNamespace(load=torch.softmax(scores, dim=-1),
                           loss=torch.linspace(3.0, 1.0, steps))


def test_load_timeline_step_and_layer_follow_the_history():
    collapsed, balanced = make_history(30, 2, 6, 0, 3.0), make_history(20, 2, 6, 1, 0.1)
    tl = LoadTimeline(collapsed, balanced, labels=("no balancing", "switch loss"))
    assert tl.error is None and len(tl.figure().axes) == 6  # two runs side by side
    before = bytes(tl.image.value)
    tl.controls["step"].value = 7
    assert bytes(tl.image.value) != before
    for layer in (0, 1):
        tl.controls["layer"].value = layer
        for step in (3, 25):
            tl.controls["step"].value = step
            s = tl.state
            assert (s.step, s.layer) == (step, layer)
            torch.testing.assert_close(s.load[0], collapsed.load[step, layer])
            torch.testing.assert_close(s.load[1], balanced.load[min(step, 19), layer])
            assert s.load_cv2[0] == pytest.approx(cv2_oracle(collapsed.load[step, layer]),
                                                  rel=1e-5)
            assert s.loss == [pytest.approx(float(collapsed.loss[step])),
                              pytest.approx(float(balanced.loss[min(step, 19)]))]
            fig = tl.figure()
            heights = [float(p.get_height()) for p in fig.axes[1].patches]
            assert heights == pytest.approx(collapsed.load[step, layer].tolist())
            assert f"layer {layer}" in fig.axes[0].get_title()
    assert tl.state.load_cv2[0] > 10 * tl.state.load_cv2[1]


def test_load_timeline_bad_history_shows_a_message():
    tl = LoadTimeline(SimpleNamespace(load=torch.ones(5, 2, 3), loss=torch.ones(4)))
    assert "(steps,) = (5,)" in tl.error
    assert ERROR_COLOR in tl.message.value
    assert bytes(tl.image.value).startswith(PNG_MAGIC)
    tl = LoadTimeline(SimpleNamespace(load=torch.zeros(3, 0, 0), loss=torch.ones(3)))
    assert "recorded no expert load" in tl.error and ERROR_COLOR in tl.message.value
    tl.controls["step"].value = 0  # moving the controls of a broken timeline stays calm
    tl = LoadTimeline(object(), interactive=False)
    assert ".load (steps, L, E)" in tl.error and tl._repr_png_().startswith(PNG_MAGIC)


# ---------------------------------------------------------------- TokenRoutingView


def span_colors(html: str) -> list[str]:
    return re.findall(r'<span title="[^"]*" style="background:(#[0-9a-f]{6})', html)


def test_token_routing_view_colours_each_character_by_its_expert():
    text = "x = 1\nhello"
    ids = torch.tensor([[0, 1, 2, 1, 0, 2, 3, 3, 3, 3, 3],
                        [3, 3, 3, 3, 3, -1, 0, 1, 2, 0, 1]])
    view = TokenRoutingView(text, ids, n_experts=4, layer_names=["block 0", "block 1"])
    colors = widgets.expert_colors(4)
    for layer in (0, 1):
        expected = [widgets.DROPPED_COLOR if e < 0 else colors[e] for e in ids[layer].tolist()]
        assert span_colors(view.html(layer)) == expected
    assert len(set(colors)) == 4
    assert 'title="block 1: dropped"' in view.html(1)
    view.controls["layer"].value = 1
    assert span_colors(view.view.value) == span_colors(view.html(1))
    view.controls["layer"].value = -1
    assert len(span_colors(view.view.value)) == 2 * len(text)
    top2 = torch.stack([ids.clamp(min=0), (ids.clamp(min=0) + 1) % 4], dim=-1)  # (L, S, K)
    first = TokenRoutingView(text, top2, n_experts=4, interactive=False)
    assert span_colors(first.html(0)) == [colors[e] for e in ids[0].tolist()]
    assert first.figure() is first._fig


def test_token_routing_view_bad_input_shows_a_message():
    view = TokenRoutingView("abc", torch.tensor([[0, 1]]), n_experts=2)
    assert "S = len(text) = 3" in view.error
    assert ERROR_COLOR in view.view.value and ERROR_COLOR in view._repr_html_()
    view = TokenRoutingView("ab", torch.tensor([0, 5]), n_experts=2, interactive=False)
    assert "[0, 2)" in view.error


def test_token_routing_view_from_layer_outputs():
    from moe_course import MoEFeedForward

    torch.manual_seed(0)
    text = "abc 123 def"
    x = torch.randn(1, len(text), 8)
    with torch.no_grad():
        top_k = MoEFeedForward(8, 16, n_experts=3, k=2, capacity_factor=0.5)(x)
        expert_choice = MoEFeedForward(8, 16, n_experts=3, k=1, router="expert_choice")(x)
    view = TokenRoutingView.from_routing(text, [top_k, expert_choice], n_experts=3,
                                         layer_names=["top-2", "expert choice"])
    assert view.error is None
    tc = top_k.routing
    for t in range(len(text)):  # token choice: the first choice, or -1 when it was dropped
        expected = int(tc.indices[t, 0]) if bool(tc.keep[t, 0]) else -1
        assert int(view.ids[0, t]) == expected
    assert (view.ids[0] == -1).any()  # capacity 0.5 drops some first choices
    ec = expert_choice.routing
    for t in range(len(text)):  # expert choice: the expert that gave t its largest gate
        best, best_gate = -1, -1.0
        for e in range(3):
            for c in range(ec.token_idx.shape[1]):
                if int(ec.token_idx[e, c]) == t and float(ec.gates[e, c]) > best_gate:
                    best, best_gate = e, float(ec.gates[e, c])
        assert int(view.ids[1, t]) == best
