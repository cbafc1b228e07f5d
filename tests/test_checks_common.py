"""What every exercise's checks must do, written once over all notebooks.

Each notebook's check tests (tests/test_checks_NN.py) give five things: `CORRECT`, correct
implementations written differently from the reference; `ALIASES`, each exercise's
reference captured at import; `order_margins(grade_id, inputs)`, the gaps the probe's
order-dependent decisions rest on, by an independent oracle; `MISTAKES`, planted mistakes
with the words their message must hold; `WRONG_RETURNS`, wrong return types and shapes.
From them, for every graded exercise and every probe: inputs are deterministic, plain and
tie-free, a correct run's outputs survive `torch.load(weights_only=True)` and pass the
judge, the judge refuses missing or truncated outputs, a stub fails with "not implemented",
calling the reference (directly, through an alias or the package, wrapped, swallowing the
tripwire) fails with "implement it yourself", each planted mistake fails with its own
message and each wrong return with one saying what was expected. Checks of the check
machinery that no one notebook owns are here too.
"""

from __future__ import annotations

import pathlib
import sys
import warnings
from typing import Any

import probe_data
import pytest
import test_checks_01
import test_checks_02
import test_checks_03
import test_checks_04
import test_checks_05
import test_checks_06
import test_checks_07
import test_checks_08
import torch
from torch import nn

import moe_course
from moe_course.grading import EXERCISES, CheckFailure, check, judge_probe, run_probe
from moe_course.grading.inputs import MARGIN

NOTEBOOKS = {m.GRADED[0][2:4]: m for m in (test_checks_01, test_checks_02, test_checks_03,
                                           test_checks_04, test_checks_05, test_checks_06,
                                           test_checks_07, test_checks_08)}
GRADED = sorted(g for g, ex in EXERCISES.items() if ex.kind != "written")
PROBES = [(gid, probe) for gid in GRADED for probe in EXERCISES[gid].visible
          + EXERCISES[gid].hidden]


def notebook_of(grade_id: str) -> Any:
    """The check-test module of the exercise's notebook."""
    return NOTEBOOKS[grade_id[2:4]]


def correct(grade_id: str) -> Any:
    return notebook_of(grade_id).CORRECT[grade_id][0]


def test_every_graded_exercise_has_its_notebook_module_and_data():
    assert sorted(NOTEBOOKS) == sorted({g[2:4] for g in GRADED})
    for gid in GRADED:
        module = notebook_of(gid)
        assert gid in module.CORRECT and gid in module.ALIASES, gid
        assert module.ALIASES[gid] is EXERCISES[gid].reference, gid
    assert sorted(g for m in NOTEBOOKS.values() for g in m.CORRECT) == GRADED


# ========================================================================================
# Inputs: deterministic, tie-free; outputs: plain data across the process boundary.


@pytest.mark.parametrize(("grade_id", "probe"), PROBES,
                         ids=[f"{g}-{p.name}" for g, p in PROBES])
def test_inputs_are_deterministic_tie_free_plain_and_outputs_round_trip(grade_id, probe):
    exercise = EXERCISES[grade_id]
    first, second = probe_data.inputs_twice(probe)
    for gap in notebook_of(grade_id).order_margins(grade_id, first):
        assert gap > MARGIN
    probe_data.judged_after_round_trip(exercise, probe, correct(grade_id), first, second)


@pytest.mark.parametrize(("grade_id", "probe"), PROBES,
                         ids=[f"{g}-{p.name}" for g, p in PROBES])
def test_judge_refuses_missing_or_truncated_outputs(grade_id, probe):
    probe_data.judge_refuses_missing_or_truncated(EXERCISES[grade_id], probe, correct(grade_id))


# ========================================================================================
# Each notebook's planted mistakes (`MISTAKES`: grade_id, wrong answer, the words its
# message must hold) fail with their own message, never the generic fallback; its wrong
# return types and shapes (`WRONG_RETURNS`) fail the visible check with a message that says
# what was expected. capfd, not capsys: notebook 06's layer runs in worker processes.

MISTAKES = [case for module in NOTEBOOKS.values() for case in module.MISTAKES]
WRONG_RETURNS = [case for module in NOTEBOOKS.values() for case in module.WRONG_RETURNS]


@pytest.mark.parametrize(("grade_id", "impl", "expected"), MISTAKES,
                         ids=[f"{g}-{s[:24]}" for g, _, s in MISTAKES])
def test_planted_mistake_fails_with_its_message(grade_id, impl, expected, capfd):
    message = probe_data.fails(grade_id, impl)
    assert expected in message, message
    assert message.startswith(f"{EXERCISES[grade_id].symbol}, check '"), message
    assert " is wrong: " not in message, message  # a named mistake, not the generic fallback
    assert capfd.readouterr().err == ""


@pytest.mark.parametrize(("grade_id", "impl", "expected"), WRONG_RETURNS,
                         ids=[f"{g}-{s[:20]}" for g, _, s in WRONG_RETURNS])
def test_wrong_return_type_or_shape_is_explained(grade_id, impl, expected):
    message = probe_data.fails(grade_id, impl, hidden=False)
    assert expected in message, message
    assert "must" in message or "you returned" in message, message


def test_every_notebook_exports_its_mistakes_and_wrong_returns():
    for number, module in NOTEBOOKS.items():
        graded = {g for g in GRADED if g[2:4] == number}
        assert {g for g, _, _ in module.MISTAKES} == graded, number
        assert {g for g, _, _ in module.WRONG_RETURNS} <= graded, number
        assert module.WRONG_RETURNS, number


def test_probe_names_are_unique_and_found_again():
    for exercise in EXERCISES.values():
        for probe in exercise.visible + exercise.hidden:
            assert exercise.probe(probe.name) is probe


def test_odd_return_values_are_captured_as_plain_data():
    exercise = EXERCISES["ex02_top_k_gating"]
    probe = exercise.visible[0]

    class Liar(torch.Tensor):
        def __eq__(self, other):
            return True

    weird = [lambda lg, k: (lg.numpy(), {"a": 1}), lambda lg, k: (Liar(lg), object()),
             lambda lg, k: [[[[[lg]]]]], lambda lg, k: (float("nan"), 10**30)]
    for fn in weird:
        outputs = run_probe(exercise, probe, fn, probe.inputs())
        assert probe_data.plain(outputs)
        loaded = probe_data.round_trip(outputs)
        with pytest.raises(CheckFailure):
            judge_probe(exercise, probe, probe.inputs(), loaded)


# ========================================================================================
# Calling the reference: directly, through an alias captured at import or the package,
# wrapped, or swallowing the tripwire and falling back.


def _cheats(grade_id: str) -> list[Any]:
    alias = notebook_of(grade_id).ALIASES[grade_id]
    if isinstance(alias, type):
        class Subclass(alias):
            pass

        class Wrapper(nn.Module):
            def __init__(self, *args, **kwargs):
                super().__init__()
                self.inner = alias(*args, **kwargs)
                self.gate = getattr(self.inner, "gate", None)
                self.experts = getattr(self.inner, "experts", None)
                self.w_in = getattr(self.inner, "w_in", None)
                self.w_out = getattr(self.inner, "w_out", None)

            def forward(self, x):
                return self.inner(x)

        return [alias, Subclass, Wrapper]

    def wrapper(*args, **kwargs):
        return alias(*args, **kwargs)

    def sneaky(*args, **kwargs):  # swallows the tripwire and falls back: still caught
        try:
            return alias(*args, **kwargs)
        except Exception:
            return correct(grade_id)(*args, **kwargs)

    exported = getattr(moe_course, EXERCISES[grade_id].symbol, alias)
    return [alias, *([exported] if exported is not alias else []), wrapper, sneaky]


@pytest.mark.parametrize("grade_id", GRADED)
def test_calling_the_reference_earns_nothing(grade_id):
    assert notebook_of(grade_id).ALIASES[grade_id] is EXERCISES[grade_id].reference
    for cheat in _cheats(grade_id):
        for hidden in (False, True):
            with pytest.raises(CheckFailure, match="implement it yourself"):
                check(grade_id, cheat, hidden=hidden)


def test_reference_works_again_after_a_tripped_check():
    with pytest.raises(CheckFailure, match="implement it yourself"):
        check("ex02_top_k_gating", lambda lg, k: moe_course.top_k_gating(lg, k))
    weights, indices = moe_course.top_k_gating(torch.tensor([[1.0, 3.0, 2.0]]), 2)
    assert indices.tolist() == [[1, 2]] and weights.sum().item() == pytest.approx(1.0)
    layer = moe_course.MoEFeedForward(4, 8, 2, k=1)
    with pytest.raises(CheckFailure, match="implement it yourself"):
        check("ex05_moe_feed_forward", moe_course.MoEFeedForward)
    assert layer(torch.randn(1, 3, 4)).y.shape == (1, 3, 4)


# ========================================================================================
# Stubs and the wrong kind of object fail with a message, never a crash.


def _stub(grade_id: str) -> Any:
    if EXERCISES[grade_id].kind == "class":
        class Stub(nn.Module):
            def __init__(self, *args, **kwargs):
                super().__init__()
                raise NotImplementedError("write your Expert here")

        return Stub

    def stub(*args, **kwargs):
        raise NotImplementedError

    return stub


@pytest.mark.parametrize("grade_id", GRADED)
def test_stub_fails_with_not_implemented(grade_id):
    # An optional challenge's visible check skips a stub instead (tests/test_optional.py);
    # its hidden check fails it like any other.
    hidden = EXERCISES[grade_id].optional
    assert "is not implemented yet" in probe_data.fails(grade_id, _stub(grade_id), hidden=hidden)


def test_wrong_kind_of_object_is_explained():
    top_k_gating = test_checks_02.top_k_gating
    with pytest.raises(CheckFailure, match="must be a function"):
        check("ex02_top_k_gating", 42)
    with pytest.raises(CheckFailure, match="nn.Module subclass"):
        check("ex05_moe_feed_forward", top_k_gating)
    with pytest.raises(ValueError, match="graded by hand"):
        check("ex01_written", None)
    with pytest.raises(ValueError, match="no exercise 'ex99_nothing'"):
        check("ex99_nothing", top_k_gating)


# ========================================================================================
# The learner's side effects stay inside the check; a failure reads as one line.


def test_learner_warnings_and_stderr_are_silenced(capsys):
    def noisy(logits, k):
        warnings.warn("a learner's warning", UserWarning, stacklevel=1)
        print("debugging to stderr", file=sys.stderr)
        return test_checks_02.top_k_gating(logits, k)

    check("ex02_top_k_gating", noisy)
    out, err = capsys.readouterr()
    assert err == "" and out == "✓ top_k_gating: 4 checks passed\n"


def test_learner_rng_use_does_not_leak_into_the_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    check("ex02_noisy_logits", test_checks_02.noisy_logits)
    assert torch.equal(torch.rand(3), expected)


def test_failure_renders_short_in_ipython():
    failure = CheckFailure("top_k_gating, check 'k=2': your weights sum to 0.83")
    lines = failure._render_traceback_()
    assert len(lines) == 1 and "your weights sum to 0.83" in lines[0]
    assert isinstance(failure, AssertionError)


@pytest.mark.slow
def test_failure_in_a_real_kernel_is_short_and_an_error(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    from nbclient import NotebookClient

    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("import torch\nfrom moe_course.grading import check"),
        nbformat.v4.new_code_cell(
            "def top_k_gating(logits, k):\n"
            "    if not 1 <= k <= logits.shape[1]:\n"
            "        raise ValueError('k')\n"
            "    top, idx = logits.topk(k, dim=-1)\n"
            "    return torch.softmax(top, dim=-1), idx\n"
            "check('ex02_top_k_gating', top_k_gating)\n"
            "check('ex02_top_k_gating', top_k_gating, hidden=True)"),
        nbformat.v4.new_code_cell(
            "def bad(logits, k):\n"
            "    idx = logits.topk(k, dim=-1).indices\n"
            "    return torch.softmax(logits, -1).gather(1, idx), idx\n"
            "check('ex02_top_k_gating', bad)"),
    ]
    root = pathlib.Path(moe_course.__file__).resolve().parent.parent
    client = NotebookClient(nb, timeout=120, kernel_name="python3", allow_errors=True,
                            resources={"metadata": {"path": str(root)}})
    client.execute()
    passing, failing = nb.cells[1].outputs, nb.cells[2].outputs
    assert {(o["output_type"], o.get("name")) for o in passing} == {("stream", "stdout")}
    assert "".join(o["text"] for o in passing) == ("✓ top_k_gating: 4 checks passed\n"
                                                   "✓ top_k_gating: 3 hidden checks passed\n")
    assert [o["output_type"] for o in failing] == ["error"]
    error = failing[0]
    assert error["ename"] == "CheckFailure"
    assert "softmax over all E experts" in error["evalue"]
    assert len(error["traceback"]) == 1, error["traceback"]
    assert "softmax over all E experts" in error["traceback"][0]
