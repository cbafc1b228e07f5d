"""The public contract of notebooks 01-05: names, signatures, and purity.

CURRICULUM.md fixes every exercise's name and signature, because the notebook checks, the
nbgrader tests and the pytest grader all call them. These tests hold `moe_course` to it.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import pytest
import torch
from torch import nn

import moe_course
from moe_course import (
    Expert,
    MoEFeedForward,
    apply_capacity,
    capacity_positions,
    cv_squared,
    dense_moe,
    expert_choice_moe,
    expert_choice_routing,
    experts_per_token,
    importance_loss,
    load_loss,
    moe_lm_loss,
    noisy_logits,
    router_z_loss,
    softmax_gate,
    sparse_moe,
    switch_aux_loss,
    top_k_gating,
)

EMPTY = inspect.Parameter.empty

# name -> [(parameter, default)] as CURRICULUM.md writes it; EMPTY means no default.
CURRICULUM: dict[str, list[tuple[str, Any]]] = {
    "Expert": [("d_model", EMPTY), ("d_hidden", EMPTY)],
    "softmax_gate": [("x", EMPTY), ("w_gate", EMPTY)],
    "dense_moe": [("x", EMPTY), ("experts", EMPTY), ("w_gate", EMPTY)],
    "top_k_gating": [("logits", EMPTY), ("k", EMPTY)],
    "noisy_logits": [("x", EMPTY), ("w_gate", EMPTY), ("w_noise", EMPTY), ("noise", None)],
    "sparse_moe": [("x", EMPTY), ("experts", EMPTY), ("weights", EMPTY), ("indices", EMPTY)],
    "moe_flops": [("n_tokens", EMPTY), ("d_model", EMPTY), ("d_hidden", EMPTY),
                  ("n_experts", EMPTY), ("k", EMPTY)],
    "cv_squared": [("v", EMPTY)],
    "importance_loss": [("gates", EMPTY), ("w_importance", 0.01)],
    "load_loss": [("clean_logits", EMPTY), ("noisy_logits", EMPTY), ("noise_std", EMPTY),
                  ("k", EMPTY), ("w_load", 0.01)],
    "switch_aux_loss": [("router_probs", EMPTY), ("indices", EMPTY)],
    "router_z_loss": [("logits", EMPTY)],
    "expert_capacity": [("n_tokens", EMPTY), ("n_experts", EMPTY), ("capacity_factor", EMPTY),
                        ("k", 1)],
    "capacity_positions": [("indices", EMPTY), ("n_experts", EMPTY)],
    "apply_capacity": [("weights", EMPTY), ("indices", EMPTY), ("capacity", EMPTY)],
    "expert_choice_capacity": [("n_tokens", EMPTY), ("n_experts", EMPTY),
                               ("capacity_factor", EMPTY)],
    "expert_choice_routing": [("logits", EMPTY), ("capacity", EMPTY)],
    "expert_choice_moe": [("x", EMPTY), ("experts", EMPTY), ("gates", EMPTY),
                          ("token_idx", EMPTY)],
    "experts_per_token": [("token_idx", EMPTY), ("n_tokens", EMPTY)],
    "MoEFeedForward": [("d_model", EMPTY), ("d_hidden", EMPTY), ("n_experts", EMPTY),
                       ("k", 2), ("router", "top_k"), ("capacity_factor", None)],
    "moe_lm_loss": [("logits", EMPTY), ("targets", EMPTY), ("aux_losses", EMPTY),
                    ("aux_weight", 0.01), ("z_weight", 0.001)],
    "experts_touched": [("indices", EMPTY), ("n_experts", EMPTY)],
    "expected_experts_touched": [("batch", EMPTY), ("n_experts", EMPTY), ("k", EMPTY)],
    "lru_cache_hits": [("trace", EMPTY), ("capacity", EMPTY)],
    "optimal_cache_hits": [("trace", EMPTY), ("capacity", EMPTY)],
    "offload_time_per_token": [("misses", EMPTY), ("expert_bytes", EMPTY),
                               ("bandwidth", EMPTY)],
}


@pytest.mark.parametrize("name", sorted(CURRICULUM))
def test_exercise_name_is_exported(name: str) -> None:
    assert name in moe_course.__all__, f"{name} missing from moe_course.__all__"
    assert callable(getattr(moe_course, name))


def test_all_lists_only_real_names_once() -> None:
    assert len(moe_course.__all__) == len(set(moe_course.__all__))
    for name in moe_course.__all__:
        assert hasattr(moe_course, name), f"__all__ names {name}, which does not exist"


@pytest.mark.parametrize("name", sorted(CURRICULUM))
def test_signature_matches_curriculum(name: str) -> None:
    params = list(inspect.signature(getattr(moe_course, name)).parameters.values())
    got = [(p.name, p.default) for p in params]
    assert got == CURRICULUM[name]
    for p in params:
        assert p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD, f"{p.name} is {p.kind}"


def test_upcycle_takes_the_curriculum_arguments_then_keyword_only_options() -> None:
    params = list(inspect.signature(moe_course.upcycle).parameters.values())
    assert [(p.name, p.default) for p in params[:3]] == [
        ("dense_ffn", EMPTY), ("n_experts", EMPTY), ("k", EMPTY)]
    assert all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params[:3])
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is not EMPTY
               for p in params[3:])


def test_modules_are_nn_modules() -> None:
    assert issubclass(Expert, nn.Module) and issubclass(MoEFeedForward, nn.Module)


# --------------------------------------------------------------------- no mutation


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=_seeded(seed))


def _experts(n: int = 4, d: int = 3) -> list[nn.Module]:
    torch.manual_seed(0)
    return [Expert(d, 5) for _ in range(n)]


def _cases() -> list[tuple[str, Callable[..., Any], tuple[Any, ...]]]:
    t, d, e = 6, 3, 4
    x, w_gate, w_noise = _randn(0, t, d), _randn(1, d, e), _randn(2, d, e)
    logits = _randn(3, t, e)
    weights, indices = top_k_gating(logits.clone(), 2)
    gates, token_idx = expert_choice_routing(logits.clone(), 3)
    std = torch.nn.functional.softplus(_randn(4, t, e))
    experts = _experts(e, d)
    lm_logits, targets = _randn(5, 2, 3, 7), torch.randint(0, 7, (2, 3), generator=_seeded(5))
    return [
        ("softmax_gate", softmax_gate, (x, w_gate)),
        ("dense_moe", dense_moe, (x, experts, w_gate)),
        ("top_k_gating", top_k_gating, (logits, 2)),
        ("noisy_logits", noisy_logits, (x, w_gate, w_noise, _randn(6, t, e))),
        ("sparse_moe", sparse_moe, (x, experts, weights, indices)),
        ("cv_squared", cv_squared, (_randn(7, e).abs(),)),
        ("importance_loss", importance_loss, (torch.softmax(logits, -1),)),
        ("load_loss", load_loss, (logits, logits + std * _randn(8, t, e), std, 2)),
        ("switch_aux_loss", switch_aux_loss, (torch.softmax(logits, -1), indices)),
        ("router_z_loss", router_z_loss, (logits,)),
        ("capacity_positions", capacity_positions, (indices, e)),
        ("apply_capacity", apply_capacity, (weights, indices, 2)),
        ("expert_choice_routing", expert_choice_routing, (logits, 3)),
        ("expert_choice_moe", expert_choice_moe, (x, experts, gates, token_idx)),
        ("experts_per_token", experts_per_token, (token_idx, t)),
        ("moe_lm_loss", moe_lm_loss, (lm_logits, targets, [(_randn(9, 1)[0], _randn(10, 1)[0])])),
        ("Expert.forward", experts[0], (x,)),
        ("MoEFeedForward top_k", MoEFeedForward(d, 5, e, k=2, capacity_factor=1.0),
         (_randn(11, 2, 3, d),)),
        ("MoEFeedForward expert_choice", MoEFeedForward(d, 5, e, router="expert_choice"),
         (_randn(12, 2, 3, d),)),
    ]


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in _tensors(item)]
    return []


CASES = _cases()


@pytest.mark.parametrize("fn,args", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_no_function_mutates_its_arguments(fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    inputs = _tensors(args)
    assert inputs
    before = [t.clone() for t in inputs]
    versions = [t._version for t in inputs]
    modules = [m for m in (fn, *args, *[a for a in args if isinstance(a, list)])
               if isinstance(m, nn.Module)]
    params = [p.detach().clone() for m in modules for p in m.parameters()]
    with torch.no_grad():
        fn(*args)
    for t, old, version in zip(inputs, before, versions, strict=True):
        assert torch.equal(t, old), "an argument's values changed"
        assert t._version == version, "an argument was written in place"
    after = [p for m in modules for p in m.parameters()]
    assert all(torch.equal(p, q) for p, q in zip(after, params, strict=True)), "weights changed"


# ------------------------------------------------------------ index and float dtypes


def _index_cases() -> list[tuple[str, Callable[[torch.Tensor], Any], torch.Tensor]]:
    x, logits = _randn(20, 6, 3), _randn(21, 6, 4)
    weights, indices = top_k_gating(logits, 2)
    gates, token_idx = expert_choice_routing(logits, 3)
    experts = _experts(4, 3)
    lm_logits = _randn(22, 2, 3, 7)
    targets = torch.randint(0, 7, (2, 3), generator=_seeded(22))
    return [
        ("sparse_moe", lambda i: sparse_moe(x, experts, weights, i), indices),
        ("capacity_positions", lambda i: capacity_positions(i, 4), indices),
        ("apply_capacity", lambda i: apply_capacity(weights, i, 2), indices),
        ("switch_aux_loss", lambda i: switch_aux_loss(torch.softmax(logits, -1), i), indices),
        ("expert_choice_moe", lambda i: expert_choice_moe(x, experts, gates, i), token_idx),
        ("experts_per_token", lambda i: experts_per_token(i, 6), token_idx),
        ("moe_lm_loss", lambda i: moe_lm_loss(lm_logits, i, []), targets),
    ]


INDEX_CASES = _index_cases()


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32])
@pytest.mark.parametrize("fn,index", [c[1:] for c in INDEX_CASES], ids=[c[0] for c in INDEX_CASES])
def test_every_integer_index_dtype_gives_the_int64_answer(fn: Callable[[torch.Tensor], Any],
                                                          index: torch.Tensor,
                                                          dtype: torch.dtype) -> None:
    # A uint8 tensor used as an index would be read as a boolean mask; one_hot and
    # cross_entropy refuse int32. The validators accept every integer dtype, so must these.
    with torch.no_grad():
        expected, got = fn(index), fn(index.to(dtype))
    for e, g in zip(_tensors(expected), _tensors(got), strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


def test_sparse_moe_accepts_float64_weights_for_float32_tokens() -> None:
    x, logits = _randn(30, 6, 3), _randn(31, 6, 4)
    weights, indices = top_k_gating(logits, 2)
    experts = _experts(4, 3)
    with torch.no_grad():
        y = sparse_moe(x, experts, weights.double(), indices)
        expected = sparse_moe(x, experts, weights, indices)
    assert y.dtype == x.dtype
    torch.testing.assert_close(y, expected)
