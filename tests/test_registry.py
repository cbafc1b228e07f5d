"""The exercise registry matches CURRICULUM.md, notebooks 01-08: ids, symbols, points."""

from __future__ import annotations

import dataclasses

import pytest

import moe_course
import moe_course.parallel
from moe_course.grading import EXERCISES, Exercise, Probe, exercises_for

# (grade_id, assignment, symbol, points, kind), in notebook order, copied from CURRICULUM.md
# (ex07_biased_top_k and the 1 point of ex07_aux_free_bias_update: issue 15, README map).
CURRICULUM = [
    ("ex01_expert", "01_experts_and_gating", "Expert", 2, "class"),
    ("ex01_softmax_gate", "01_experts_and_gating", "softmax_gate", 1, "function"),
    ("ex01_dense_moe", "01_experts_and_gating", "dense_moe", 2, "function"),
    ("ex01_written", "01_experts_and_gating", None, 1, "written"),
    ("ex02_top_k_gating", "02_top_k_routing", "top_k_gating", 2, "function"),
    ("ex02_noisy_logits", "02_top_k_routing", "noisy_logits", 2, "function"),
    ("ex02_sparse_moe", "02_top_k_routing", "sparse_moe", 3, "function"),
    ("ex02_moe_flops", "02_top_k_routing", "moe_flops", 1, "function"),
    ("ex02_written", "02_top_k_routing", None, 1, "written"),
    ("ex03_cv_squared", "03_load_balancing", "cv_squared", 1, "function"),
    ("ex03_importance_loss", "03_load_balancing", "importance_loss", 1, "function"),
    ("ex03_load_loss", "03_load_balancing", "load_loss", 2, "function"),
    ("ex03_switch_aux_loss", "03_load_balancing", "switch_aux_loss", 2, "function"),
    ("ex03_router_z_loss", "03_load_balancing", "router_z_loss", 1, "function"),
    ("ex03_expert_capacity", "03_load_balancing", "expert_capacity", 1, "function"),
    ("ex03_capacity_positions", "03_load_balancing", "capacity_positions", 2, "function"),
    ("ex03_apply_capacity", "03_load_balancing", "apply_capacity", 2, "function"),
    ("ex04_expert_choice_capacity", "04_expert_choice", "expert_choice_capacity", 1,
     "function"),
    ("ex04_expert_choice_routing", "04_expert_choice", "expert_choice_routing", 2, "function"),
    ("ex04_expert_choice_moe", "04_expert_choice", "expert_choice_moe", 3, "function"),
    ("ex04_experts_per_token", "04_expert_choice", "experts_per_token", 1, "function"),
    ("ex04_written", "04_expert_choice", None, 2, "written"),
    ("ex05_moe_feed_forward", "05_moe_transformer", "MoEFeedForward", 3, "class"),
    ("ex05_moe_lm_loss", "05_moe_transformer", "moe_lm_loss", 1, "function"),
    ("ex05_written", "05_moe_transformer", None, 2, "written"),
    ("ex06_send_counts", "06_expert_parallelism", "send_counts", 2, "function"),
    ("ex06_permute_for_all_to_all", "06_expert_parallelism", "permute_for_all_to_all", 2,
     "function"),
    ("ex06_expert_parallel_forward", "06_expert_parallelism", "expert_parallel_forward", 3,
     "function"),
    ("ex07_shared_expert_moe", "07_modern_moe", "shared_expert_moe", 2, "function"),
    ("ex07_biased_top_k", "07_modern_moe", "biased_top_k", 2, "function"),
    ("ex07_aux_free_bias_update", "07_modern_moe", "aux_free_bias_update", 1, "function"),
    ("ex07_soft_moe", "07_modern_moe", "soft_moe", 3, "function"),
    ("ex07_sort_by_expert", "07_modern_moe", "sort_by_expert", 2, "function"),
    ("ex08_experts_touched", "08_serving_and_upcycling", "experts_touched", 1, "function"),
    ("ex08_expected_experts_touched", "08_serving_and_upcycling", "expected_experts_touched",
     1, "function"),
    ("ex08_lru_cache_hits", "08_serving_and_upcycling", "lru_cache_hits", 2, "function"),
    ("ex08_optimal_cache_hits", "08_serving_and_upcycling", "optimal_cache_hits", 2,
     "function"),
    ("ex08_offload_time_per_token", "08_serving_and_upcycling", "offload_time_per_token", 1,
     "function"),
    ("ex08_upcycle", "08_serving_and_upcycling", "upcycle", 3, "function"),
    ("ex08_written", "08_serving_and_upcycling", None, 2, "written"),
]
POINTS = {"01_experts_and_gating": 6, "02_top_k_routing": 9, "03_load_balancing": 12,
          "04_expert_choice": 9, "05_moe_transformer": 6, "06_expert_parallelism": 7,
          "07_modern_moe": 10, "08_serving_and_upcycling": 12}
# Where each assignment's references live: the package top level, or its own module.
HOME = {"06_expert_parallelism": moe_course.parallel}


def test_registry_is_the_curriculum_table():
    got = [(ex.grade_id, ex.assignment, ex.symbol, ex.points, ex.kind)
           for ex in EXERCISES.values()]
    assert got == CURRICULUM


@pytest.mark.parametrize("assignment", sorted(POINTS))
def test_exercises_for_lists_an_assignment_in_order(assignment):
    exercises = exercises_for(assignment)
    assert [ex.grade_id for ex in exercises] == [row[0] for row in CURRICULUM
                                                 if row[1] == assignment]
    assert sum(ex.points for ex in exercises) == POINTS[assignment]


def test_unknown_assignment_is_refused():
    with pytest.raises(ValueError, match="no assignment '09_nothing'"):
        exercises_for("09_nothing")


@pytest.mark.parametrize("grade_id", [row[0] for row in CURRICULUM])
def test_entry_is_consistent(grade_id):
    ex = EXERCISES[grade_id]
    assert ex.grade_id.startswith("ex" + ex.assignment[:2] + "_")
    assert ex.tests_id == grade_id + "_tests"
    if ex.kind == "written":
        assert ex.reference is None and ex.visible == () and ex.hidden == ()
        return
    # The reference is moe_course's public object of the learner's name.
    home = HOME.get(ex.assignment, moe_course)
    assert ex.reference is getattr(home, ex.symbol)
    assert ex.symbol in home.__all__
    assert (ex.kind == "class") == isinstance(ex.reference, type)
    assert ex.visible and ex.hidden
    assert all(isinstance(p, Probe) for p in ex.visible + ex.hidden)
    names = [p.name for p in ex.visible + ex.hidden]
    assert len(names) == len(set(names))


def test_exercise_is_frozen_and_validates_its_kind():
    ex = EXERCISES["ex02_top_k_gating"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        ex.points = 5  # type: ignore[misc]
    with pytest.raises(ValueError, match="kind must be one of"):
        Exercise("ex09_x", "09_x", "x", 1, None, kind="essay")
    with pytest.raises(KeyError, match="no probe 'nope'"):
        ex.probe("nope")
