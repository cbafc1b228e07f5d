"""The fast layers against their loop oracles, the published invariants and the slow layer.

`TopKMoE` and `ExpertChoiceMoE` run their experts from stacked weights with vectorised
dispatch; `loop_forward` computes the same layer one expert at a time with
`routing.sparse_moe` / `expert_choice.expert_choice_moe` on the same parameters. Values and
gradients (input, router, experts) must agree for both expert kinds, every dispatch layout,
with and without capacity, for k in {1, 2, E}, including experts that receive no token.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from moe_course.capacity import apply_capacity, expert_capacity
from moe_course.expert_choice import ExpertChoice
from moe_course.experts import (
    EXPERT_KINDS,
    Expert,
    ExpertBank,
    ExpertKind,
    Param,
    SwiGLUExpert,
    grouped_linear,
    linear_map,
)
from moe_course.fused import KERNELS
from moe_course.gating import top_k_gating
from moe_course.layers import (
    DenseFFN,
    ExpertChoiceMoE,
    MoEFeedForward,
    MoEOutput,
    TokenChoice,
    TopKMoE,
    combine,
    group_by_expert,
)
from moe_course.losses import router_z_loss, switch_aux_loss

D, H, E = 16, 32, 4  # multiples of 4: float32 runs take torch's grouped_mm path on CPU


def _run(fn, layer, x, seed=0, **kwargs):
    """Output of `fn(x)` and the gradients of a seeded loss on all its outputs."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    out = fn(x, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(out.y.shape, generator=gen, dtype=out.y.dtype)
    loss = (out.y * g).sum() + 0.3 * out.aux_loss + 0.1 * out.z_loss
    loss.backward()
    grads = {"x": x.grad}
    grads.update({name: p.grad if p.grad is not None else torch.zeros_like(p)
                  for name, p in layer.named_parameters()})
    return out, grads


def _assert_same(fast, slow, dtype):
    (a, ga), (b, gb) = fast, slow
    tol = {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5,
                                                                         "atol": 1e-5}
    assert_close(a.y, b.y, **tol)
    assert_close(a.aux_loss, b.aux_loss, **tol)
    assert_close(a.z_loss, b.z_loss, **tol)
    assert_close(a.logits, b.logits, **tol)
    assert_close(a.expert_load, b.expert_load)
    for field_a, field_b in zip(a.routing, b.routing, strict=True):
        assert_close(field_a, field_b, **tol)
    assert ga.keys() == gb.keys()
    for name in ga:
        assert_close(ga[name], gb[name], **tol, msg=f"gradient of {name} differs")


def _starve_last_expert(layer):
    """Make the last expert lose every top-k race (k < E) on inputs with positive entries."""
    with torch.no_grad():
        layer.gate.weight.abs_()
        layer.gate.weight[-1] = -1.0  # logit -sum(x): always the smallest


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("dispatch", ["blocked", "grouped", "padded"])
@pytest.mark.parametrize("capacity_factor", [None, 0.5, 1.25])
@pytest.mark.parametrize("k", [1, 2, E])
@pytest.mark.parametrize("expert", ["gelu", "swiglu"])
def test_top_k_equals_loop_oracle(expert, k, capacity_factor, dispatch, dtype):
    torch.manual_seed(k + 10 * (capacity_factor or 0))
    layer = TopKMoE(D, H, E, k, capacity_factor, expert, dispatch=dispatch).to(dtype)
    x = torch.randn(3, 7, D, dtype=dtype)
    fast = _run(layer, layer, x)
    slow = _run(layer.loop_forward, layer, x)
    _assert_same(fast, slow, dtype)
    assert fast[0].y.shape == x.shape


@pytest.mark.parametrize("dispatch", ["blocked", "grouped", "padded", "auto"])
@pytest.mark.parametrize("expert", ["gelu", "swiglu"])
@pytest.mark.parametrize("k", [1, 2])
def test_top_k_with_an_expert_that_gets_no_token(expert, k, dispatch):
    torch.manual_seed(1)
    layer = TopKMoE(D, H, E, k, expert=expert, dispatch=dispatch).double()
    _starve_last_expert(layer)
    x = torch.rand(20, D, dtype=torch.float64) + 0.1
    fast = _run(layer, layer, x)
    slow = _run(layer.loop_forward, layer, x)
    assert fast[0].expert_load[-1] == 0 and fast[0].expert_load.sum() == 20 * k
    _assert_same(fast, slow, torch.float64)
    for name, grad in fast[1].items():
        if name.startswith("experts."):
            assert torch.equal(grad[-1], torch.zeros_like(grad[-1])), name  # untouched expert


@pytest.mark.parametrize("expert", ["gelu", "swiglu"])
@pytest.mark.parametrize("capacity_factor", [2.0, 0.5])
def test_expert_choice_equals_loop_oracle(expert, capacity_factor):
    torch.manual_seed(2)
    layer = ExpertChoiceMoE(D, H, E, capacity_factor, expert).double()
    x = torch.randn(2, 9, D, dtype=torch.float64)
    _assert_same(_run(layer, layer, x), _run(layer.loop_forward, layer, x), torch.float64)


def test_expert_choice_every_expert_takes_exactly_capacity_tokens():
    torch.manual_seed(3)
    layer = ExpertChoiceMoE(D, H, n_experts=5, capacity_factor=1.5)
    out = layer(torch.randn(23, D))
    c = 7  # ceil(23 * 1.5 / 5)
    assert isinstance(out.routing, ExpertChoice)
    assert out.routing.token_idx.shape == (5, c) and out.routing.gates.shape == (5, c)
    assert out.expert_load.tolist() == [float(c)] * 5
    for row in out.routing.token_idx:
        assert row.unique().numel() == c  # C distinct tokens per expert
    assert float(out.aux_loss) == 0.0
    assert_close(out.z_loss, router_z_loss(out.logits))


@pytest.mark.parametrize("dispatch", ["blocked", "grouped", "padded"])
@pytest.mark.parametrize("k", [1, 2, E])
def test_no_expert_exceeds_capacity(k, dispatch):
    torch.manual_seed(4)
    layer = TopKMoE(D, H, E, k, capacity_factor=0.5, dispatch=dispatch)
    with torch.no_grad():
        layer.gate.weight[0] += 3.0  # crowd one expert so that capacity binds
    x = torch.rand(30, D) + 0.1
    out = layer(x)
    capacity = expert_capacity(30, E, 0.5, k)
    assert int(out.expert_load.max()) <= capacity
    assert bool((~out.routing.keep).any())  # something was dropped
    kept = out.routing.indices[out.routing.keep]
    assert_close(out.expert_load, torch.bincount(kept, minlength=E).float())
    weights, keep = apply_capacity(*top_k_gating(out.logits, k), capacity)
    assert torch.equal(keep, out.routing.keep)
    assert torch.equal(weights, out.routing.weights)


@pytest.mark.parametrize("dispatch", ["blocked", "grouped", "padded"])
@pytest.mark.parametrize("expert", ["gelu", "swiglu"])
def test_dropped_assignments_contribute_exactly_zero(expert, dispatch):
    torch.manual_seed(5)
    layer = TopKMoE(D, H, E, k=1, capacity_factor=0.25, expert=expert, dispatch=dispatch)
    with torch.no_grad():
        layer.gate.weight.zero_()
        layer.gate.weight[0] = 1.0  # every token's only choice is expert 0
    x = (torch.rand(16, D) + 0.1).requires_grad_()
    out = layer(x)
    capacity = expert_capacity(16, E, 0.25, 1)  # 1
    assert out.routing.keep[:, 0].tolist() == [True] * capacity + [False] * (16 - capacity)
    dropped = ~out.routing.keep[:, 0]
    assert torch.equal(out.y[dropped], torch.zeros_like(out.y[dropped]))  # exactly 0
    out.y.sum().backward()
    assert torch.equal(x.grad[dropped], torch.zeros_like(x.grad[dropped]))
    assert bool(out.y[~dropped].abs().sum() > 0)


@pytest.mark.parametrize("dispatch", ["blocked", "grouped", "padded"])
def test_gradients_reach_the_router(dispatch):
    torch.manual_seed(6)
    layer = TopKMoE(D, H, E, k=2, dispatch=dispatch)
    layer(torch.randn(12, D)).y.pow(2).sum().backward()  # the output alone, no aux loss
    grad = layer.gate.weight.grad
    assert grad is not None and bool(torch.isfinite(grad).all()) and float(grad.abs().sum()) > 0


def test_top_k_is_causal_and_expert_choice_is_not():
    torch.manual_seed(7)
    t = 12
    x = torch.randn(t, D, dtype=torch.float64)
    ec = ExpertChoiceMoE(D, H, E, capacity_factor=1.0).double()
    # Later-token perturbations: random replacements, and a loud last token aimed at each
    # expert in turn (it then tops that expert's list and pushes someone out of its top C).
    later = []
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        later.append(torch.randn(D, generator=gen, dtype=torch.float64))
    later += [25.0 * ec.gate.weight[e].detach() for e in range(E)]
    for dispatch in ("blocked", "grouped", "padded"):
        top_k = TopKMoE(D, H, E, k=2, dispatch=dispatch).double()
        base = top_k(x).y
        for last in later:
            perturbed = torch.cat([x[:-1], last[None]])
            assert_close(top_k(perturbed).y[:-1], base[:-1], rtol=0, atol=1e-12)  # never
    base = ec(x).y.detach()
    changes = [float((ec(torch.cat([x[:-1], last[None]])).y[:-1].detach() - base[:-1]).abs().max())
               for last in later]
    assert max(changes) > 1e-3, changes  # an earlier token lost (or won) an expert's slot


def test_auto_dispatch_groups_small_experts_and_blocks_large_ones(monkeypatch):
    import moe_course.layers as layers

    calls = []
    real = layers.top_k_moe

    def spy(*args, blocked, **kwargs):
        calls.append("blocked" if blocked else "grouped")
        return real(*args, blocked=blocked, **kwargs)

    monkeypatch.setattr(layers, "top_k_moe", spy)
    layer = TopKMoE(D, H, E, k=2)  # dispatch="auto"
    x = torch.randn(10, D)
    layer(x)  # 10*2/4 rows * D * H = 2560 multiply-adds per expert: small
    monkeypatch.setattr(layers, "AUTO_GROUPED_MACS", 2559)
    layer(x)
    assert calls == ["grouped", "blocked"]


def test_losses_and_load_match_the_reference_functions():
    torch.manual_seed(8)
    layer = TopKMoE(D, H, E, k=2)
    out = layer(torch.randn(2, 5, D))
    assert isinstance(out, MoEOutput) and isinstance(out.routing, TokenChoice)
    assert out.logits.shape == (10, E)
    assert_close(out.aux_loss, switch_aux_loss(torch.softmax(out.logits, -1),
                                               out.routing.indices))
    assert_close(out.z_loss, router_z_loss(out.logits))
    assert float(out.expert_load.sum()) == 20.0


@pytest.mark.parametrize("noisy", [False, True])
def test_noisy_gating_only_in_training(noisy):
    torch.manual_seed(10)
    layer = TopKMoE(D, H, E, k=2, noisy=noisy).double()
    if noisy:
        with torch.no_grad():
            layer.w_noise.weight.normal_()
    x = torch.randn(9, D, dtype=torch.float64)
    noise = torch.randn(9, E, dtype=torch.float64)
    layer.train()
    if noisy:
        _assert_same(_run(layer, layer, x, noise=noise),
                     _run(layer.loop_forward, layer, x, noise=noise), torch.float64)
        assert not torch.equal(layer(x, noise=noise).logits, layer.gate(x))
        assert layer.w_noise.weight.grad is not None
    layer.eval()
    assert_close(layer(x).logits, layer.gate(x))  # evaluation: clean logits
    with pytest.raises(ValueError, match="noise"):
        layer(x, noise=noise)


@pytest.mark.parametrize("capacity_factor", [None, 0.75])
def test_moe_feed_forward_equals_top_k_moe_with_copied_weights(capacity_factor):
    torch.manual_seed(11)
    slow = MoEFeedForward(D, H, E, k=2, capacity_factor=capacity_factor).double()
    fast = TopKMoE.from_moe_feed_forward(slow)
    x = torch.randn(2, 8, D, dtype=torch.float64)
    a, b = fast(x), slow(x)
    assert_close(a.y, b.y)
    assert_close(a.aux_loss, b.aux_loss)
    assert torch.equal(a.routing.keep, b.routing.keep)
    back = fast.to_moe_feed_forward()
    assert_close(back(x).y, b.y)
    assert fast.gate.weight.data_ptr() != slow.gate.weight.data_ptr()  # copies


def test_expert_choice_from_moe_feed_forward():
    torch.manual_seed(12)
    slow = MoEFeedForward(D, H, E, k=2, router="expert_choice").double()
    fast = ExpertChoiceMoE.from_moe_feed_forward(slow)
    x = torch.randn(2, 8, D, dtype=torch.float64)
    assert_close(fast(x).y, slow(x).y)
    assert torch.equal(fast(x).routing.token_idx, slow(x).routing.token_idx)


@pytest.mark.parametrize("kind, module", [("gelu", Expert), ("swiglu", SwiGLUExpert)])
def test_expert_bank_round_trip(kind, module):
    torch.manual_seed(13)
    experts = [module(D, H) for _ in range(3)]
    bank = ExpertBank.from_modules(experts)
    assert bank.kind == kind
    x = torch.randn(5, D)
    for e, expert in enumerate(experts):
        assert_close(bank.expert_fn(e)(x), expert(x))
    for a, b in zip(bank.to_modules(), experts, strict=True):
        assert_close(a(x), b(x))
    stacked = bank(x.expand(3, 5, D))  # (E, C, D): every expert on the same rows
    assert_close(stacked, torch.stack([m(x) for m in experts]))


@pytest.mark.parametrize("dtype, width", [(torch.float32, 8), (torch.float32, 6),
                                          (torch.float64, 8)])
def test_grouped_linear_equals_per_expert_matmuls(dtype, width):
    torch.manual_seed(14)
    counts = [3, 0, 5, 2]
    a = torch.randn(10, width, dtype=dtype, requires_grad=True)
    w = torch.randn(4, width, 12, dtype=dtype, requires_grad=True)
    b = torch.randn(4, 12, dtype=dtype, requires_grad=True)
    g = torch.randn(10, 12, dtype=dtype)
    grouped_linear(a, w, b, counts).backward(g)
    fast = [a.grad, w.grad, b.grad]
    a.grad = w.grad = b.grad = None
    parts, start = [], 0
    for e, n in enumerate(counts):
        parts.append(a[start:start + n] @ w[e] + b[e])
        start += n
    torch.cat(parts).backward(g)
    for got, want in zip(fast, [a.grad, w.grad, b.grad], strict=True):
        assert_close(got, want)
    assert torch.equal(fast[1][1], torch.zeros_like(fast[1][1]))  # empty expert


def test_combine_gradients_match_autograd():
    torch.manual_seed(15)
    rows = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.rand(7, dtype=torch.float64, requires_grad=True)
    token = torch.tensor([0, 2, 2, 1, 0, 2, 4])
    assert torch.autograd.gradcheck(lambda r, w: combine(r, token, w, 5), (rows, weight))
    want = torch.zeros(5, 3, dtype=torch.float64).index_add(0, token, rows * weight[:, None])
    assert_close(combine(rows, token, weight, 5), want)


def test_dense_ffn_is_one_expert_of_width_k_times_h():
    torch.manual_seed(16)
    gelu, swiglu = DenseFFN(D, 2 * H, "gelu"), DenseFFN(D, 2 * H, "swiglu")
    assert isinstance(gelu.ffn, Expert) and gelu.ffn.w_in.out_features == 2 * H
    assert isinstance(swiglu.ffn, SwiGLUExpert) and swiglu.ffn.w2.in_features == 2 * H
    x = torch.randn(2, 3, D)
    for dense in (gelu, swiglu):
        assert_close(dense(x), dense.ffn(x))


def test_input_shapes_bt_and_t_agree():
    torch.manual_seed(17)
    layer = TopKMoE(D, H, E, k=2, expert="swiglu")
    x = torch.randn(2, 6, D)
    assert_close(layer(x).y.reshape(12, D), layer(x.reshape(12, D)).y)


@pytest.mark.parametrize("bad, name", [
    (torch.randn(4, D + 1), "x"),
    (torch.randn(D), "x"),
    (torch.randn(1, 2, 3, D), "x"),
    (torch.zeros(0, D), "x"),
    (torch.randint(0, 3, (4, D)), "x"),
    (torch.randn(4, D, dtype=torch.float64), "x"),
    ([[0.0] * D], "x"),
])
def test_bad_input_raises_value_error(bad, name):
    for layer in (TopKMoE(D, H, E), ExpertChoiceMoE(D, H, E)):
        with pytest.raises(ValueError, match=f"^{name} must"):
            layer(bad)
        with pytest.raises(ValueError, match=f"^{name} must"):
            layer.loop_forward(bad)
    with pytest.raises(ValueError, match="^x must"):
        DenseFFN(D, H)(torch.randn(3, D + 2))


@pytest.mark.parametrize("kwargs, name", [
    ({"k": 0}, "k"), ({"k": E + 1}, "k"), ({"capacity_factor": 0.0}, "capacity_factor"),
    ({"expert": "relu"}, "expert"), ({"dispatch": "fast"}, "dispatch"),
    ({"noisy": "yes"}, "noisy"), ({"n_experts": 0}, "n_experts"), ({"d_model": 2.5}, "d_model"),
])
def test_bad_constructor_arguments_raise_value_error(kwargs, name):
    args = {"d_model": D, "d_hidden": H, "n_experts": E} | kwargs
    with pytest.raises(ValueError, match=f"^{name} must") as info:
        TopKMoE(**args)
    assert "got" in str(info.value)


def test_bad_helper_arguments_raise_value_error():
    with pytest.raises(ValueError, match="^counts must"):
        grouped_linear(torch.randn(5, 4), torch.randn(2, 4, 3), None, [2, 2])
    with pytest.raises(ValueError, match="^layer must"):
        TopKMoE.from_moe_feed_forward(MoEFeedForward(D, H, E, router="expert_choice"))
    with pytest.raises(ValueError, match="^experts must"):
        ExpertBank.from_modules([Expert(D, H), SwiGLUExpert(D, H)])
    with pytest.raises(ValueError, match="^row_token values"):
        combine(torch.randn(3, 2), torch.tensor([0, 1, 5]), torch.rand(3), 4)
    with pytest.raises(ValueError, match="^indices must"):
        group_by_expert(torch.tensor([[0.0]]), 2)


def test_fast_and_loop_agree_under_f_gelu_definition():
    # The bank's GELU expert is `Expert`'s exact (erf) GELU, not the tanh approximation.
    torch.manual_seed(18)
    bank = ExpertBank(D, H, 1)
    x = torch.randn(4, D)
    want = F.gelu(x @ bank.w_in[0] + bank.b_in[0]) @ bank.w_out[0] + bank.b_out[0]
    assert_close(bank.expert_fn(0)(x), want)
    assert_close(bank(x[None])[0], want)


def _fused_inputs(expert, t=9, d=4, h=6, e=5, seed=19):
    gen = torch.Generator().manual_seed(seed)
    bank = ExpertBank(d, h, e, expert).double()
    params = tuple(p.detach().clone().requires_grad_() for p in bank.params())
    x = torch.randn(t, d, dtype=torch.float64, generator=gen).requires_grad_()
    w_gate = (2 * torch.randn(e, d, dtype=torch.float64, generator=gen)).requires_grad_()
    extra = torch.randn(t, e, dtype=torch.float64, generator=gen).requires_grad_()
    return x, w_gate, extra, params


@pytest.mark.parametrize("blocked", [True, False])
@pytest.mark.parametrize("capacity", [None, 2])
@pytest.mark.parametrize("expert", ["gelu", "swiglu"])
def test_fused_backward_passes_gradcheck(expert, capacity, blocked):
    # Every output that carries a gradient (y, both losses, the gate weights, the logits) in
    # one loss, against finite differences, float64; odd widths take the loop-of-mm path.
    from moe_course.fused import top_k_moe

    x, w_gate, extra, params = _fused_inputs(expert)

    def loss(x, w_gate, extra, *params):
        out = top_k_moe(x, w_gate, 2, capacity, expert, params, blocked, extra)
        return (out.y.sin().sum() + 1.7 * out.aux_loss + 0.9 * out.z_loss
                + (out.weights ** 2).sum() + 0.1 * out.logits.cos().sum())

    assert torch.autograd.gradcheck(loss, (x, w_gate, extra, *params))


@pytest.mark.parametrize("pick", ["y", "aux", "z", "weights", "logits"])
@pytest.mark.parametrize("blocked", [True, False])
def test_fused_gradients_of_each_output_alone(blocked, pick):
    # Unused outputs arrive as None in the backward: each output alone must still give the
    # gradients autograd computes for the composed reference functions.
    from moe_course.fused import top_k_moe
    from moe_course.routing import sparse_moe

    scale = torch.arange(2.0, dtype=torch.float64)
    x, w_gate, extra, params = _fused_inputs("gelu", seed=20)
    inputs = (x, w_gate, extra, *params)
    out = top_k_moe(x, w_gate, 2, None, "gelu", params, blocked, extra)
    value = {"y": out.y.sum(), "aux": out.aux_loss, "z": out.z_loss,
             "weights": (out.weights * scale).sum(), "logits": out.logits.pow(2).sum()}
    got = torch.autograd.grad(value[pick], inputs, allow_unused=True)
    logits = x @ w_gate.t() + extra
    weights, indices = top_k_gating(logits, 2)
    fns = [lambda r, i=i: F.gelu(r @ params[0][i] + params[1][i]) @ params[2][i] + params[3][i]
           for i in range(5)]
    ref = {"y": sparse_moe(x, fns, weights, indices).sum(),
           "aux": switch_aux_loss(torch.softmax(logits, -1), indices),
           "z": router_z_loss(logits), "weights": (weights * scale).sum(),
           "logits": logits.pow(2).sum()}
    want = torch.autograd.grad(ref[pick], inputs, allow_unused=True)
    for g, w in zip(got, want, strict=True):
        if w is None:
            assert g is None or float(g.abs().max()) == 0.0
        else:
            assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("blocked", [True, False])
def test_fused_with_frozen_experts_or_constant_input(blocked):
    torch.manual_seed(21)
    layer = TopKMoE(D, H, E, k=2, expert="swiglu",
                    dispatch="blocked" if blocked else "grouped")
    for p in layer.experts.parameters():
        p.requires_grad_(False)
    x = torch.randn(11, D)  # no gradient wanted for x
    layer(x).y.sum().backward()
    assert layer.gate.weight.grad is not None
    assert all(p.grad is None for p in layer.experts.parameters())


@pytest.mark.parametrize("dispatch", ["blocked", "grouped"])
def test_float32_grouped_matmul_path_equals_the_float64_loop(dispatch):
    # D, H multiples of 4: float32 takes torch's grouped_mm; the float64 oracle cannot.
    torch.manual_seed(22)
    layer = TopKMoE(D, H, E, k=2, expert="gelu", dispatch=dispatch)
    x = torch.randn(40, D)
    fast = _run(layer, layer, x)
    slow = _run(layer.loop_forward, layer, x)
    _assert_same(fast, slow, torch.float32)


def test_bad_noise_raises_value_error():
    layer = TopKMoE(D, H, E, k=2, noisy=True)  # training mode
    x = torch.randn(6, D)
    with pytest.raises(ValueError, match=r"^noise must be \(T, E\) = \(6, 4\); got shape"):
        layer(x, noise=torch.randn(5, E))
    with pytest.raises(ValueError, match="^noise must have the layer's dtype torch.float32"):
        layer(x, noise=torch.randn(6, E, dtype=torch.float64))
    with pytest.raises(ValueError, match="^noise must"):
        layer(x, noise=torch.randint(0, 2, (6, E)))
    padded = TopKMoE(D, H, E, k=2, noisy=True, dispatch="padded")
    for bad in (torch.randn(5, E), torch.randn(6, E, dtype=torch.float64)):
        with pytest.raises(ValueError, match="^noise (and x @ w_gate )?must"):
            padded(x, noise=bad)
        with pytest.raises(ValueError, match="^noise (and x @ w_gate )?must"):
            padded.loop_forward(x, noise=bad)


# ---------------------------------------------------------------------------------------------
# An expert kind is one row of EXPERT_KINDS (CONTRIBUTING.md, "Add an expert kind"), followed
# here with a ReLU expert (Shazeer et al. 2017's): the bank, the layer, its oracle and the
# dense FFN take it with no other change; with no fused kernels TopKMoE runs it padded.


class _ReluExpert(torch.nn.Module):
    def __init__(self, d_model: int, d_hidden: int) -> None:
        super().__init__()
        self.w_in = torch.nn.Linear(d_model, d_hidden)
        self.w_out = torch.nn.Linear(d_hidden, d_model)

    def forward(self, x):
        return self.w_out(F.relu(self.w_in(x)))


def _relu_expert(x, w_in, b_in, w_out, b_out, linear=linear_map):
    return linear(F.relu(linear(x, w_in, b_in)), w_out, b_out)


@pytest.fixture
def relu_kind(monkeypatch):
    params = (Param("w_in", "w_in", "weight"), Param("b_in", "w_in", "bias"),
              Param("w_out", "w_out", "weight"), Param("b_out", "w_out", "bias"))
    monkeypatch.setitem(EXPERT_KINDS, "relu", ExpertKind(_ReluExpert, params, _relu_expert))


def test_an_expert_kind_added_to_the_table_runs_everywhere(relu_kind):
    torch.manual_seed(11)
    experts = [_ReluExpert(D, H) for _ in range(E)]
    bank = ExpertBank.from_modules(experts)
    assert bank.kind == "relu" and bank.w_out.shape == (E, H, D) and bank.b_in.shape == (E, H)
    x = torch.randn(6, D)
    for e, expert in enumerate(experts):
        assert_close(bank.expert_fn(e)(x), expert(x))
    for a, b in zip(bank.to_modules(), experts, strict=True):
        assert_close(a(x), b(x))
    xs = torch.randn(E, 3, D)
    assert_close(bank(xs), torch.stack([experts[e](xs[e]) for e in range(E)]))
    assert_close(bank.grouped(x, [2, 0, 3, 1]),
                 torch.cat([experts[0](x[:2]), experts[2](x[2:5]), experts[3](x[5:])]))
    layer = TopKMoE(D, H, E, k=2, capacity_factor=1.0, expert="relu").double()
    assert "relu" not in KERNELS  # no hand-written kernels: the padded, autograd layout
    x = torch.randn(10, D, dtype=torch.float64, requires_grad=True)
    fast, slow = layer(x), layer.loop_forward(x)
    assert_close(fast.y, slow.y)
    (g_fast,) = torch.autograd.grad(fast.y.sum() + fast.aux_loss, x)
    (g_slow,) = torch.autograd.grad(slow.y.sum() + slow.aux_loss, x)
    assert_close(g_fast, g_slow)
    assert DenseFFN(D, H, expert="relu")(torch.randn(2, 3, D)).shape == (2, 3, D)
    with pytest.raises(ValueError, match="expert must be one of .*'relu'"):
        ExpertBank(D, H, E, expert="tanh")
