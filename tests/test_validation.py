"""Bad input: every public function of notebooks 01-05 raises a ValueError whose message
names the argument, says what was expected and what it got.

One table, one row per mistake: `(call, argument, expected, got)`; the message must start
with the argument's name, then contain the expectation, then `got` and the received value.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from moe_course import (
    Expert,
    MoEFeedForward,
    TopKMoE,
    apply_capacity,
    capacity_positions,
    cv_squared,
    dense_moe,
    expert_capacity,
    expert_choice_capacity,
    expert_choice_moe,
    expert_choice_routing,
    experts_per_token,
    importance_loss,
    load_loss,
    moe_flops,
    moe_lm_loss,
    noisy_logits,
    router_z_loss,
    softmax_gate,
    sparse_moe,
    switch_aux_loss,
    top_k_gating,
)
from moe_course.validation import (
    experts_list,
    float_tensor,
    index_tensor,
    positive_float,
    positive_int,
    same_shape,
)

I64 = torch.int64
INF, NAN = float("inf"), float("nan")
Z21 = torch.zeros(2, 1, dtype=I64)  # every token to expert 0


def f(*shape: int) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(0))


def i(*shape: int, high: int = 2) -> torch.Tensor:
    return torch.randint(0, high, shape, generator=torch.Generator().manual_seed(0))


def ident(x: torch.Tensor) -> torch.Tensor:
    return x


TWO = [ident, ident]

# (id, call, argument, expected, got)
BAD: list[tuple[str, Callable[[], Any], str, str, str]] = [
    # ---- 01 experts and gating
    ("Expert d_model 0", lambda: Expert(0, 4), "d_model", "1 <= d_model", "0"),
    ("Expert d_hidden float", lambda: Expert(4, 2.5), "d_hidden", "an int", "float 2.5"),
    ("softmax_gate int x", lambda: softmax_gate(i(3, 2), f(2, 4)), "x",
     "floating-point tensor (T, D)", "torch.int64 tensor of shape (3, 2)"),
    ("softmax_gate 3-D x", lambda: softmax_gate(f(2, 3, 2), f(2, 4)), "x",
     "2 dimensions (T, D)", "shape (2, 3, 2)"),
    ("softmax_gate wrong D", lambda: softmax_gate(f(3, 2), f(5, 4)), "w_gate",
     "(D, E) with D = x.shape[1] = 2", "shape (5, 4)"),
    ("dense_moe no experts", lambda: dense_moe(f(3, 2), [], f(2, 2)), "experts",
     "non-empty sequence", "0 items"),
    ("dense_moe experts not a list", lambda: dense_moe(f(3, 2), Expert(2, 2), f(2, 2)),
     "experts", "sequence (list or nn.ModuleList)", "Expert"),
    ("dense_moe E mismatch", lambda: dense_moe(f(3, 2), TWO, f(2, 3)), "w_gate",
     "E = len(experts) = 2", "shape (2, 3)"),
    # ---- 02 top-k routing
    ("top_k k 0", lambda: top_k_gating(f(3, 4), 0), "k", "1 <= k <= 4", "0"),
    ("top_k k > E", lambda: top_k_gating(f(3, 4), 5), "k", "1 <= k <= 4", "5"),
    ("top_k k float", lambda: top_k_gating(f(3, 4), 2.0), "k", "an int", "float 2.0"),
    ("top_k k bool", lambda: top_k_gating(f(3, 4), True), "k", "an int", "bool True"),
    ("top_k int logits", lambda: top_k_gating(i(3, 4), 1), "logits",
     "floating-point tensor (T, E)", "torch.int64"),
    ("top_k 1-D logits", lambda: top_k_gating(f(4), 1), "logits", "2 dimensions (T, E)",
     "shape (4,)"),
    ("noisy w_noise shape", lambda: noisy_logits(f(3, 2), f(2, 4), f(2, 5)), "w_gate",
     "same shape", "(2, 4) and (2, 5)"),
    ("noisy w_noise wrong D", lambda: noisy_logits(f(3, 2), f(2, 4), f(3, 4)), "w_noise",
     "D = x.shape[1] = 2", "shape (3, 4)"),
    ("noisy noise shape", lambda: noisy_logits(f(3, 2), f(2, 4), f(2, 4), f(2, 4)), "noise",
     "same shape", "(2, 4) and (3, 4)"),
    ("noisy int noise", lambda: noisy_logits(f(3, 2), f(2, 4), f(2, 4), i(3, 4)), "noise",
     "floating-point tensor (T, E)", "torch.int64"),
    ("sparse index >= E", lambda: sparse_moe(f(3, 2), TWO, f(3, 1), i(3, 1, high=3) + 2),
     "indices", "[0, 2)", "to 4"),
    ("sparse negative index", lambda: sparse_moe(f(3, 2), TWO, f(3, 1), i(3, 1) - 1),
     "indices", "[0, 2)", "from -1"),
    ("sparse float indices", lambda: sparse_moe(f(3, 2), TWO, f(3, 1), f(3, 1)), "indices",
     "integer tensor (T, K)", "torch.float32"),
    ("sparse bool indices", lambda: sparse_moe(f(3, 2), TWO, f(3, 1), i(3, 1).bool()),
     "indices", "integer tensor (T, K)", "torch.bool"),
    ("sparse K mismatch", lambda: sparse_moe(f(3, 2), TWO, f(3, 2), i(3, 1)), "weights",
     "same shape", "(3, 2) and (3, 1)"),
    ("sparse T mismatch", lambda: sparse_moe(f(3, 2), TWO, f(4, 1), i(4, 1)), "weights",
     "T = x.shape[0] = 3", "shape (4, 1)"),
    ("sparse int x", lambda: sparse_moe(i(3, 2), TWO, f(3, 1), i(3, 1)), "x",
     "floating-point tensor (T, D)", "torch.int64"),
    ("sparse 1-D weights", lambda: sparse_moe(f(3, 2), TWO, f(3), i(3)), "weights",
     "2 dimensions (T, K)", "shape (3,)"),
    ("flops k > E", lambda: moe_flops(4, 2, 2, 3, 4), "k", "1 <= k <= 3", "4"),
    ("flops no tokens", lambda: moe_flops(0, 2, 2, 3, 1), "n_tokens", "1 <= n_tokens", "0"),
    ("flops float width", lambda: moe_flops(4, 2.0, 2, 3, 1), "d_model", "an int",
     "float 2.0"),
    # ---- 03 load balancing and capacity
    ("capacity factor 0", lambda: expert_capacity(8, 4, 0.0), "capacity_factor", "> 0",
     "0.0"),
    ("capacity factor < 0", lambda: expert_capacity(8, 4, -1.0), "capacity_factor", "> 0",
     "-1.0"),
    ("capacity factor nan", lambda: expert_capacity(8, 4, float("nan")), "capacity_factor",
     "finite number > 0", "nan"),
    ("capacity factor inf", lambda: expert_capacity(8, 4, float("inf")), "capacity_factor",
     "finite number > 0", "inf"),
    ("capacity factor str", lambda: expert_capacity(8, 4, "1.0"), "capacity_factor",
     "number > 0", "str '1.0'"),
    ("capacity k > E", lambda: expert_capacity(8, 4, 1.0, k=5), "k", "1 <= k <= 4", "5"),
    ("capacity no experts", lambda: expert_capacity(8, 0, 1.0), "n_experts",
     "1 <= n_experts", "0"),
    ("positions index >= E", lambda: capacity_positions(i(4, 2, high=3), 2), "indices",
     "[0, 2)", "to 2"),
    ("positions float", lambda: capacity_positions(f(4, 2), 2), "indices",
     "integer tensor (T, K)", "torch.float32"),
    ("positions 1-D", lambda: capacity_positions(i(4), 2), "indices", "2 dimensions (T, K)",
     "shape (4,)"),
    ("positions E 0", lambda: capacity_positions(i(4, 2), 0), "n_experts", "1 <= n_experts",
     "0"),
    ("apply capacity < 0", lambda: apply_capacity(f(4, 2), i(4, 2), -1), "capacity",
     "0 <= capacity", "-1"),
    ("apply capacity float", lambda: apply_capacity(f(4, 2), i(4, 2), 1.5), "capacity",
     "an int", "float 1.5"),
    ("apply int weights", lambda: apply_capacity(i(4, 2), i(4, 2), 1), "weights",
     "floating-point tensor (T, K)", "torch.int64"),
    ("apply shapes", lambda: apply_capacity(f(4, 2), i(4, 1), 1), "weights", "same shape",
     "(4, 2) and (4, 1)"),
    ("apply negative index", lambda: apply_capacity(f(4, 2), i(4, 2) - 1, 1), "indices",
     ">= 0", "from -1"),
    ("cv 2-D", lambda: cv_squared(f(2, 3)), "v", "1 dimensions (E,)", "shape (2, 3)"),
    ("cv empty", lambda: cv_squared(f(0)), "v", "at least one element", "(0,)"),
    ("cv int", lambda: cv_squared(i(3)), "v", "floating-point tensor", "torch.int64"),
    ("importance 1-D", lambda: importance_loss(f(4)), "gates", "2 dimensions (T, E)",
     "shape (4,)"),
    ("load k 0", lambda: load_loss(f(3, 4), f(3, 4), f(3, 4), 0), "k", "1 <= k <= 4", "0"),
    ("load k > E", lambda: load_loss(f(3, 4), f(3, 4), f(3, 4), 5), "k", "1 <= k <= 4", "5"),
    ("load noisy shape", lambda: load_loss(f(3, 4), f(3, 5), f(3, 4), 1), "clean_logits",
     "same shape", "(3, 4) and (3, 5)"),
    ("load std shape", lambda: load_loss(f(3, 4), f(3, 4), f(2, 4), 1), "clean_logits",
     "same shape", "(3, 4) and (2, 4)"),
    ("load int noise_std", lambda: load_loss(f(3, 4), f(3, 4), i(3, 4), 1), "noise_std",
     "floating-point tensor (T, E)", "torch.int64"),
    ("switch index >= E", lambda: switch_aux_loss(f(4, 3), i(4, 1, high=2) + 3), "indices",
     "[0, 3)", "to 4"),
    ("switch T mismatch", lambda: switch_aux_loss(f(4, 3), i(3, 1)), "indices",
     "T = router_probs.shape[0] = 4", "shape (3, 1)"),
    ("switch no assignments", lambda: switch_aux_loss(f(4, 3), i(4, 0)), "indices",
     "at least one assignment", "shape (4, 0)"),
    ("switch 1-D probs", lambda: switch_aux_loss(f(3), i(3, 1)), "router_probs",
     "2 dimensions (T, E)", "shape (3,)"),
    ("z-loss 1-D", lambda: router_z_loss(f(4)), "logits", "2 dimensions (T, E)",
     "shape (4,)"),
    ("z-loss int", lambda: router_z_loss(i(2, 4)), "logits", "floating-point tensor",
     "torch.int64"),
    # ---- 04 expert choice
    ("ec capacity factor 0", lambda: expert_choice_capacity(8, 4, 0), "capacity_factor",
     "> 0", "0"),
    ("ec capacity > T", lambda: expert_choice_routing(f(3, 2), 4), "capacity",
     "1 <= capacity <= 3", "4"),
    ("ec capacity 0", lambda: expert_choice_routing(f(3, 2), 0), "capacity",
     "1 <= capacity <= 3", "0"),
    ("ec int logits", lambda: expert_choice_routing(i(3, 2), 1), "logits",
     "floating-point tensor (T, E)", "torch.int64"),
    ("ec token >= T", lambda: expert_choice_moe(f(3, 2), TWO, f(2, 1), i(2, 1) + 3),
     "token_idx", "[0, 3)", "from 3"),
    ("ec gates vs token_idx", lambda: expert_choice_moe(f(3, 2), TWO, f(2, 2), i(2, 1)),
     "gates", "same shape", "(2, 2) and (2, 1)"),
    ("ec gates rows vs experts", lambda: expert_choice_moe(f(3, 2), TWO, f(3, 1), i(3, 1)),
     "gates", "E = len(experts) = 2", "shape (3, 1)"),
    ("ec float token_idx", lambda: expert_choice_moe(f(3, 2), TWO, f(2, 1), f(2, 1)),
     "token_idx", "integer tensor (E, C)", "torch.float32"),
    ("ept token >= T", lambda: experts_per_token(i(2, 2, high=3) + 2, 3), "token_idx",
     "[0, 3)", "to 4"),
    ("ept no tokens", lambda: experts_per_token(i(2, 2), 0), "n_tokens", "1 <= n_tokens",
     "0"),
    # ---- 05 the language-model loss
    ("lm targets shape", lambda: moe_lm_loss(f(2, 3, 5), i(2, 4), []), "targets",
     "logits.shape[:-1] = (2, 3)", "(2, 4)"),
    ("lm target >= V", lambda: moe_lm_loss(f(2, 3, 5), i(2, 3) + 5, []), "targets",
     "[0, 5)", "to 6"),
    ("lm float targets", lambda: moe_lm_loss(f(2, 3, 5), f(2, 3), []), "targets",
     "integer tensor", "torch.float32"),
    ("lm int logits", lambda: moe_lm_loss(i(2, 3, 5), i(2, 3), []), "logits",
     "floating-point tensor", "torch.int64"),
    ("lm aux item", lambda: moe_lm_loss(f(2, 3, 5), i(2, 3), [0.5]), "aux_losses[0]",
     "aux_loss and z_loss", "float"),
    # ---- issue 19: a newcomer's bad inputs
    ("softmax_gate float64 x", lambda: softmax_gate(f(3, 2).double(), f(2, 4)), "x",
     "dtype of w_gate, torch.float32", "torch.float64"),
    ("noisy float64 w_noise", lambda: noisy_logits(f(3, 2), f(2, 4), f(2, 4).double()), "x",
     "dtype of w_noise, torch.float64", "torch.float32"),
    ("Expert wrong width", lambda: Expert(3, 4)(f(2, 5)), "x", "D = d_model = 3",
     "shape (2, 5)"),
    ("Expert float64 x", lambda: Expert(3, 4)(f(2, 3).double()), "x",
     "module's dtype torch.float32", "torch.float64"),
    ("sparse expert too narrow", lambda: sparse_moe(f(2, 5), [Expert(3, 4)] * 2, f(2, 1), Z21),
     "experts[0]", "(n, D) rows of x, a torch.float32 tensor of shape (2, 5)",
     "ValueError: x must be (..., D) with D = d_model = 3"),
    ("sparse linear too narrow", lambda: sparse_moe(f(2, 5), [torch.nn.Linear(3, 3)] * 2,
                                                    f(2, 1), Z21), "experts[0]",
     "tensor of shape (2, 5)", "RuntimeError: mat1 and mat2 shapes"),
    ("sparse expert output shape", lambda: sparse_moe(f(2, 3), [lambda x: x[:, :2]] * 2,
                                                      f(2, 1), Z21), "experts[0]",
     "(n, D) rows of x, a torch.float32 tensor of shape (2, 3)", "shape (2, 2)"),
    ("ec moe expert too narrow", lambda: expert_choice_moe(f(3, 5), [Expert(3, 4)] * 2,
                                                          f(2, 1), i(2, 1)), "experts[0]",
     "(n, D) rows of x", "shape (1, 5)"),
    ("MoEFF float64 x", lambda: MoEFeedForward(3, 6, 4)(f(2, 3).double()), "x",
     "layer's dtype torch.float32", "torch.float64"),
    ("MoEFF empty batch", lambda: MoEFeedForward(3, 6, 4)(f(0, 3)), "x",
     "at least one token", "shape (0, 3)"),
    ("MoEFF empty 3-D batch", lambda: MoEFeedForward(3, 6, 4)(f(2, 0, 3)), "x",
     "at least one token", "shape (2, 0, 3)"),
    ("TopKMoE empty batch", lambda: TopKMoE(3, 6, 4)(f(0, 3)), "x", "at least one token",
     "shape (0, 3)"),
    ("z-loss no tokens", lambda: router_z_loss(f(0, 4)), "logits",
     "at least one token (T, E) with T >= 1", "shape (0, 4)"),
    ("lm no tokens", lambda: moe_lm_loss(f(0, 5), i(0), []), "targets",
     "at least one target that is not -100", "shape (0,) with none"),
    ("lm every target ignored", lambda: moe_lm_loss(f(2, 3, 5), torch.full((2, 3), -100), []),
     "targets", "at least one target that is not -100", "shape (2, 3) with none"),
    ("lm target -1", lambda: moe_lm_loss(f(2, 3, 5), i(2, 3) - 1, []), "targets",
     "[0, 5) or be -100 (ignored)", "from -1"),
    ("lm 0-D logits", lambda: moe_lm_loss(torch.tensor(1.0), i(), []), "logits",
     "(B, S, V) or (T, V)", "0-dimensional"),
    ("top_k inf logits", lambda: top_k_gating(torch.tensor([[INF, INF, 2.0]]), 2), "logits",
     "must be finite (or -inf", "row 0 = [inf, inf, 2.0]"),
    ("top_k one +inf", lambda: top_k_gating(torch.tensor([[0.0, 1.0], [INF, 2.0]]), 1),
     "logits", "must be finite", "row 1 = [inf, 2.0]"),
    ("top_k nan logits", lambda: top_k_gating(torch.tensor([[0.0, 1.0, NAN]]), 1), "logits",
     "must be finite", "row 0 = [0.0, 1.0, nan]"),
    ("top_k all -inf row", lambda: top_k_gating(torch.tensor([[-INF, -INF]]), 1), "logits",
     "finite one left in the row", "row 0 = [-inf, -inf]"),
    ("ec nan logits", lambda: expert_choice_routing(torch.tensor([[1.0, 0.0], [NAN, 0.0]]), 1),
     "logits", "must be finite", "row 1 = [nan, 0.0]"),
    ("ec inf logits", lambda: expert_choice_routing(torch.tensor([[INF, 0.0], [1.0, 0.0]]), 1),
     "logits", "must be finite", "row 0 = [inf, 0.0]"),
    ("load negative noise_std", lambda: load_loss(f(3, 4), f(3, 4), -f(3, 4) - 0.5, 1),
     "noise_std", "finite and > 0", "e.g. -"),
    ("load zero noise_std", lambda: load_loss(f(3, 4), f(3, 4), torch.zeros(3, 4), 1),
     "noise_std", "finite and > 0", "e.g. 0.0"),
    ("load nan noise_std", lambda: load_loss(f(3, 4), f(3, 4), torch.full((3, 4), NAN), 1),
     "noise_std", "finite and > 0", "e.g. nan"),
    ("load noise_std (1, E)", lambda: load_loss(f(3, 4), f(3, 4), f(1, 4), 1), "clean_logits",
     "same shape", "(3, 4) and (1, 4)"),
    ("load noise_std (E,)", lambda: load_loss(f(3, 4), f(3, 4), f(4), 1), "noise_std",
     "2 dimensions (T, E)", "shape (4,)"),
    ("load noise_std (E, T)", lambda: load_loss(f(3, 4), f(3, 4), f(4, 3), 1), "clean_logits",
     "same shape", "(3, 4) and (4, 3)"),
    ("top_k numpy bool k", lambda: top_k_gating(f(3, 4), np.True_), "k", "an int", "bool"),
    ("top_k torch bool k", lambda: top_k_gating(f(3, 4), torch.tensor(True)), "k", "an int",
     "torch.bool"),
    ("top_k numpy float k", lambda: top_k_gating(f(3, 4), np.float64(2.0)), "k", "an int",
     "float64"),
    ("top_k numpy k > E", lambda: top_k_gating(f(3, 4), np.int64(5)), "k", "1 <= k <= 4",
     "5"),
]


@pytest.mark.parametrize("call,argument,expected,got", [row[1:] for row in BAD],
                         ids=[row[0] for row in BAD])
def test_bad_input_raises_a_value_error_that_explains(call: Callable[[], Any], argument: str,
                                                      expected: str, got: str) -> None:
    pattern = rf"^{re.escape(argument)}(?!\w).*{re.escape(expected)}.*got.*{re.escape(got)}"
    with pytest.raises(ValueError, match=pattern):
        call()


def test_the_table_covers_every_exercise_function() -> None:
    covered = set()
    for _, call, *_ in BAD:
        covered |= set(call.__code__.co_names)
    for name in ("Expert", "softmax_gate", "dense_moe", "top_k_gating", "noisy_logits",
                 "sparse_moe", "moe_flops", "cv_squared", "importance_loss", "load_loss",
                 "switch_aux_loss", "router_z_loss", "expert_capacity", "capacity_positions",
                 "apply_capacity", "expert_choice_capacity", "expert_choice_routing",
                 "expert_choice_moe", "experts_per_token", "moe_lm_loss"):
        assert name in covered, f"no bad-input case for {name}"


# ------------------------------------------------------------- the helpers themselves


def test_float_tensor_returns_its_argument_and_refuses_non_tensors() -> None:
    x = f(2, 3)
    assert float_tensor("x", x, ndim=2) is x
    with pytest.raises(ValueError, match=r"^x must be a floating-point tensor; got list \[1\]"):
        float_tensor("x", [1])
    with pytest.raises(ValueError, match=r"^x must be a floating-point tensor.*complex64"):
        float_tensor("x", torch.zeros(2, dtype=torch.complex64))


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int16, torch.int32, I64])
def test_index_tensor_accepts_every_integer_dtype(dtype: torch.dtype) -> None:
    t = torch.tensor([[0, 1]], dtype=dtype)
    assert index_tensor("indices", t, ndim=2, upper=2) is t


def test_index_tensor_upper_bound_is_exclusive() -> None:
    index_tensor("i", torch.tensor([0, 2]), upper=3)
    with pytest.raises(ValueError, match=r"^i values must lie in \[0, 3\); got values from 0 to 3"):
        index_tensor("i", torch.tensor([0, 3]), upper=3)
    index_tensor("i", torch.zeros(0, dtype=I64), upper=1)  # empty: nothing to check


def test_positive_int_accepts_integer_scalars_and_refuses_the_rest() -> None:
    assert positive_int("n", torch.tensor(3)) == 3
    assert positive_int("n", 0, minimum=0) == 0
    with pytest.raises(ValueError, match=r"^n must be an int; got a torch.float32 tensor"):
        positive_int("n", torch.tensor(3.0))
    with pytest.raises(ValueError, match=r"^n must be an integer with 2 <= n <= 5; got 6"):
        positive_int("n", 6, minimum=2, maximum=5)


def test_positive_float_accepts_ints_and_refuses_bools() -> None:
    assert positive_float("c", 2) == 2.0 and type(positive_float("c", 2)) is float
    with pytest.raises(ValueError, match=r"^c must be a number > 0; got bool True"):
        positive_float("c", True)


def test_same_shape_and_experts_list() -> None:
    same_shape("a", f(2, 3), "b", f(2, 3))
    with pytest.raises(ValueError, match=r"^a and b must have the same shape; got \(2, 3\) "
                                         r"and \(3, 2\)"):
        same_shape("a", f(2, 3), "b", f(3, 2))
    assert experts_list("experts", torch.nn.ModuleList([Expert(2, 2)] * 3)) == 3
    with pytest.raises(ValueError, match=r"^experts must be a non-empty sequence of callable"):
        experts_list("experts", [ident, "not callable"])


# ------------------------------------------------- issue 19: what is accepted, and the rules


@pytest.mark.parametrize("make", [int, np.int64, np.int32, np.uint8, torch.tensor,
                                  lambda v: torch.tensor([v], dtype=torch.int32)],
                         ids=["int", "np.int64", "np.int32", "np.uint8", "torch 0-d",
                              "torch int32 (1,)"])
def test_integer_scalars_of_numpy_and_torch_are_ints(make: Callable[[int], Any]) -> None:
    """Wherever an int is taken, numpy and torch integer scalars give the same result."""
    logits = f(6, 4)
    assert torch.equal(top_k_gating(logits, make(2)).indices, top_k_gating(logits, 2).indices)
    assert expert_capacity(make(8), make(4), 1.25, k=make(2)) == expert_capacity(8, 4, 1.25, 2)
    assert expert_choice_capacity(make(8), make(4), make(2)) == expert_choice_capacity(8, 4, 2)
    assert moe_flops(make(4), make(2), make(3), make(4), make(2)) == moe_flops(4, 2, 3, 4, 2)
    idx = i(6, 2, high=4)
    assert torch.equal(capacity_positions(idx, make(4)), capacity_positions(idx, 4))
    assert torch.equal(apply_capacity(logits[:, :2], idx, make(1)).keep,
                       apply_capacity(logits[:, :2], idx, 1).keep)
    assert torch.equal(experts_per_token(idx, make(6)), experts_per_token(idx, 6))
    assert load_loss(logits, logits, f(6, 4) + 0.1, make(2)).isfinite()
    torch.manual_seed(0)
    assert Expert(make(3), make(5))(f(2, 3)).shape == (2, 3)
    assert MoEFeedForward(make(3), make(5), make(4), k=make(2))(f(2, 3)).y.shape == (2, 3)
    assert TopKMoE(make(3), make(5), make(4), k=make(2))(f(2, 3)).y.shape == (2, 3)


def test_minus_inf_masks_an_expert_and_gets_weight_zero() -> None:
    """The documented rule: -inf is a mask (never picked first, weight 0), not an error."""
    logits = torch.tensor([[-INF, 1.0, 2.0], [0.0, -INF, -INF]])
    weights, indices = top_k_gating(logits, 2)
    assert torch.isfinite(weights).all()
    assert indices[0].tolist() == [2, 1] and indices[1, 0] == 0
    assert weights[1].tolist() == [1.0, 0.0]
    gates, token_idx = expert_choice_routing(logits, 1)
    assert torch.isfinite(gates).all() and token_idx.flatten().tolist() == [1, 0, 0]


@pytest.mark.parametrize("dispatch", ["auto", "blocked", "grouped", "padded", "loop"])
def test_layers_refuse_nan_router_logits_naming_x_and_w_g(dispatch: str) -> None:
    """NaN in x (or in the router's weights) never becomes silent NaN weights."""
    torch.manual_seed(0)
    x = f(4, 3)
    x[2, 1] = NAN
    layer = TopKMoE(3, 6, 4, dispatch="auto" if dispatch == "loop" else dispatch)
    run = layer.loop_forward if dispatch == "loop" else layer
    with pytest.raises(ValueError, match=r"^the router logits x @ W_g must be finite.*got row 2"):
        run(x)
    layer(f(4, 3))  # finite input: no error, the check costs one reduction
    with torch.no_grad():
        layer.gate.weight[1, 0] = INF
    with pytest.raises(ValueError, match=r"^the router logits x @ W_g must be finite"):
        run(f(4, 3))


@pytest.mark.parametrize("router", ["top_k", "expert_choice"])
def test_moe_feed_forward_refuses_nan_router_logits(router: str) -> None:
    x = f(2, 4, 3)
    x[1, 3, 0] = NAN
    with pytest.raises(ValueError, match=r"^the router logits x @ W_g must be finite.*got row 7"):
        MoEFeedForward(3, 6, 4, router=router)(x)


def test_expert_choice_moe_layer_refuses_nan_and_empty_batches() -> None:
    from moe_course import ExpertChoiceMoE

    layer = ExpertChoiceMoE(3, 6, 4)
    x = f(5, 3)
    x[0, 0] = NAN
    with pytest.raises(ValueError, match=r"^the router logits x @ W_g must be finite"):
        layer(x)
    with pytest.raises(ValueError, match=r"^x must hold at least one token"):
        layer(f(0, 3))


def test_moe_lm_loss_ignores_minus_100_exactly_as_cross_entropy() -> None:
    logits, targets = f(2, 5, 7) * 3, i(2, 5, high=7)
    targets[0, 1] = targets[1, 4] = -100
    want = F.cross_entropy(logits.reshape(-1, 7), targets.reshape(-1))  # ignore_index=-100
    kept = targets != -100
    assert torch.allclose(moe_lm_loss(logits, targets, []), want)
    assert torch.allclose(want, F.cross_entropy(logits[kept], targets[kept]))
    logits.requires_grad_(True)
    moe_lm_loss(logits, targets, []).backward()
    assert (logits.grad[0, 1] == 0).all() and (logits.grad[1, 4] == 0).all()


def test_a_tiny_positive_noise_std_gives_a_finite_load_loss() -> None:
    c = f(5, 4)
    assert torch.isfinite(load_loss(c, c + 0.1, torch.full((5, 4), 1e-6), 2))
