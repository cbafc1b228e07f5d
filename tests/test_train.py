"""Tests for moe_course.train: the recorded loss and load, seeding, fast mode, bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moe_course.layers import MoEFeedForward, MoEOutput
from moe_course.routing import dense_moe
from moe_course.train import FAST_STEPS, GRADING_ENV_VARS, History, StepResult, fast_mode, train


@pytest.fixture(autouse=True)
def _not_grading(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in GRADING_ENV_VARS:
        monkeypatch.delenv(name, raising=False)


class TwoLayerMoE(nn.Module):
    """Two top-k MoE layers in a row (outputs are read by the forward hooks)."""

    def __init__(self, n_experts: int = 4) -> None:
        super().__init__()
        self.first = MoEFeedForward(6, 8, n_experts=n_experts, k=2)
        self.second = MoEFeedForward(6, 8, n_experts=n_experts, k=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.first(x).y
        return h + self.second(h).y


class Wrapper(nn.Module):
    """Returns its child's MoEOutput unchanged: the load must be counted once."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = MoEFeedForward(6, 8, n_experts=3, k=1)

    def forward(self, x: torch.Tensor) -> MoEOutput:
        return self.inner(x)


def _regression_batches(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    x = torch.randn(32, 6, generator=g)
    return x, x.flip(-1).tanh()


def _mse(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return (model(x) - y).pow(2).mean()


def test_fast_mode_reads_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert fast_mode() is False
    for name in GRADING_ENV_VARS:
        monkeypatch.setenv(name, "1")
        assert fast_mode() is True
        monkeypatch.delenv(name)
    monkeypatch.setenv("NBGRADER_EXECUTION", "")
    assert fast_mode() is False


def test_history_shapes_and_load_matches_layer_outputs() -> None:
    torch.manual_seed(0)
    model = TwoLayerMoE()
    seen: list[torch.Tensor] = []

    def loss_fn(m: nn.Module, batch: tuple) -> torch.Tensor:
        x, y = batch
        out1 = m.first(x)
        h = x + out1.y
        out2 = m.second(h)
        seen.append(torch.stack([out1.expert_load, out2.expert_load]))  # oracle, (L, E)
        return (h + out2.y - y).pow(2).mean()

    hist = train(model, loss_fn, _regression_batches, steps=6, lr=1e-2, progress=False)
    assert isinstance(hist, History)
    assert hist.loss.shape == (6,) and hist.loss.dtype == torch.float32
    assert hist.load.shape == (6, 2, 4) and hist.load.dtype == torch.float32
    assert (hist.steps, hist.n_layers, hist.n_experts) == (6, 2, 4)
    torch.testing.assert_close(hist.load.sum(-1), torch.ones(6, 2))
    expected = torch.stack(seen)  # (steps, L, E) counts
    torch.testing.assert_close(hist.load, expected / expected.sum(-1, keepdim=True))
    # Layer 0 routes 32 tokens to 2 experts, layer 1 to 1: counts 64 and 32 per step.
    assert expected[:, 0].sum(-1).eq(64).all() and expected[:, 1].sum(-1).eq(32).all()
    assert hist.aux_loss.shape == (6,) and (hist.aux_loss > 0).all()


def test_wrapped_layer_is_counted_once() -> None:
    torch.manual_seed(0)
    model = Wrapper()
    hist = train(model, lambda m, b: (m(b[0]).y - b[1]).pow(2).mean(), _regression_batches,
                 steps=3, lr=1e-2, progress=False)
    assert hist.load.shape == (3, 1, 3)


def test_loss_fn_reports_dense_gates() -> None:
    torch.manual_seed(0)
    model = nn.ModuleDict({"experts": nn.ModuleList(nn.Linear(6, 6) for _ in range(3)),
                           "gate": nn.Linear(6, 3, bias=False)})
    gate_sums: list[torch.Tensor] = []

    def loss_fn(m: nn.ModuleDict, batch: tuple) -> StepResult:
        x, y = batch
        out = dense_moe(x, m["experts"], m["gate"].weight.T)
        gate_sums.append(out.gates.detach().sum(0))
        return StepResult((out.y - y).pow(2).mean(), expert_load=out.gates.sum(0))

    hist = train(model, loss_fn, _regression_batches, steps=4, lr=1e-2, progress=False)
    assert hist.load.shape == (4, 1, 3)
    torch.testing.assert_close(hist.load[:, 0], torch.stack(gate_sums) / 32)
    assert torch.equal(hist.aux_loss, torch.zeros(4))


def test_loss_fn_may_return_a_dict() -> None:
    torch.manual_seed(0)
    model = nn.Linear(6, 6)

    def loss_fn(m: nn.Module, batch: tuple) -> dict:
        loss = _mse(m, batch)
        return {"loss": loss, "aux_loss": torch.tensor(0.5),
                "expert_load": torch.tensor([[1.0, 3.0], [2.0, 2.0]])}

    hist = train(model, loss_fn, _regression_batches, steps=2, progress=False)
    torch.testing.assert_close(hist.load[1], torch.tensor([[0.25, 0.75], [0.5, 0.5]]))
    assert hist.aux_loss.tolist() == [0.5, 0.5]


def test_loss_decreases_on_regression() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 6))
    hist = train(model, _mse, _regression_batches, steps=150, lr=1e-2, progress=False)
    assert hist.load.shape == (150, 0, 0)
    assert float(hist.loss[-10:].mean()) < 0.1 * float(hist.loss[:5].mean())


def test_train_is_deterministic_and_restores_rng() -> None:
    def run(seed: int) -> History:
        torch.manual_seed(123)  # same initial weights
        model = nn.Sequential(nn.Linear(6, 16), nn.Dropout(0.5), nn.Linear(16, 6))
        return train(model, _mse, _regression_batches, steps=5, seed=seed, progress=False)

    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a.loss, b.loss)
    assert not torch.equal(a.loss, c.loss)  # the seed drives dropout
    model = nn.Linear(2, 2)
    before = torch.get_rng_state()
    train(model, lambda m, b: m(b).pow(2).mean(), lambda t: torch.ones(3, 2), steps=2,
          progress=False)
    assert torch.equal(before, torch.get_rng_state())


def test_fast_mode_caps_steps(monkeypatch: pytest.MonkeyPatch,
                              capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("MOE_COURSE_GRADING", "1")
    calls: list[int] = []

    def batch_fn(step: int) -> tuple:
        calls.append(step)
        return _regression_batches(step)

    hist = train(nn.Linear(6, 6), _mse, batch_fn, steps=1000, progress=True)
    assert hist.steps == FAST_STEPS == 5 and calls == list(range(FAST_STEPS))
    assert capsys.readouterr().err == ""  # no progress bar under grading


def test_progress_bar_when_not_grading(capsys: pytest.CaptureFixture) -> None:
    train(nn.Linear(6, 6), _mse, _regression_batches, steps=3, progress=True, desc="toy")
    assert "toy" in capsys.readouterr().err


def test_eval_fn_schedule_and_mode() -> None:
    model = nn.Sequential(nn.Linear(6, 6), nn.Dropout(0.1))
    modes: list[tuple[bool, bool]] = []

    def eval_fn(m: nn.Module) -> torch.Tensor:
        modes.append((m.training, torch.is_grad_enabled()))
        return _mse(m, _regression_batches(999))

    model.eval()
    hist = train(model, _mse, _regression_batches, steps=7, eval_fn=eval_fn, eval_every=3,
                 progress=False)
    assert hist.eval_steps == [3, 6, 7] and len(hist.eval_loss) == 3
    assert all(mode == (False, False) for mode in modes)
    assert model.training is False  # restored
    with torch.no_grad():
        final = float(_mse(model, _regression_batches(999)))
    assert hist.eval_loss[-1] == pytest.approx(final)


def test_history_helpers() -> None:
    load = torch.tensor([[[0.25, 0.75], [0.5, 0.5]], [[0.75, 0.25], [0.9, 0.1]]])
    hist = History(torch.ones(2), load, torch.zeros(2))
    torch.testing.assert_close(hist.final_load(), load[-1])
    torch.testing.assert_close(hist.final_load(last=2), load.mean(0))
    torch.testing.assert_close(hist.max_min_ratio(), torch.tensor([3.0, 9.0]))
    torch.testing.assert_close(hist.max_min_ratio(last=2), torch.tensor([1.0, 0.7 / 0.3]))
    with pytest.raises(ValueError, match="last"):
        hist.final_load(last=3)


@pytest.mark.parametrize("kwargs, match", [
    ({"steps": 0}, "steps"),
    ({"steps": 2, "lr": 0.0}, "lr"),
    ({"steps": 2, "optimizer": "lamb"}, "optimizer"),
    ({"steps": 2, "eval_every": 0}, "eval_every"),
    ({"steps": 2, "seed": -1}, "seed"),
    ({"steps": 2, "weight_decay": -1.0}, "weight_decay"),
    ({"steps": 2, "grad_clip": 0.0}, "grad_clip"),
])
def test_train_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        train(nn.Linear(6, 6), _mse, _regression_batches, progress=False, **kwargs)


@pytest.mark.parametrize("loss_fn, match", [
    (lambda m, b: m(b[0]) - b[1], "scalar"),
    (lambda m, b: "0.5", "must return"),
    (lambda m, b: {"value": _mse(m, b)}, "'loss'"),
    (lambda m, b: _mse(m, b).detach(), "require grad"),
    (lambda m, b: _mse(m, b) * float("nan"), "became nan at step 0"),
    (lambda m, b: StepResult(_mse(m, b), expert_load=torch.ones(2, 2, 2)), "expert_load"),
])
def test_train_bad_loss_fn(loss_fn, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        train(nn.Linear(6, 6), loss_fn, _regression_batches, steps=2, progress=False)


def test_train_rejects_non_module_and_changing_load_shape() -> None:
    with pytest.raises(ValueError, match="nn.Module"):
        train(lambda x: x, _mse, _regression_batches, steps=1)  # type: ignore[arg-type]

    def loss_fn(m: nn.Module, batch: tuple) -> StepResult:
        step = len(seen)
        seen.append(step)
        return StepResult(_mse(m, batch), expert_load=torch.ones(2 + step))

    seen: list[int] = []
    with pytest.raises(ValueError, match="changed shape"):
        train(nn.Linear(6, 6), loss_fn, _regression_batches, steps=2, progress=False)
