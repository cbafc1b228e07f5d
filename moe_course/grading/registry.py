"""The exercise registry: one entry per exercise of CURRICULUM.md, notebooks 01-08.

Each entry is the single source of truth for an exercise: the answer cell's `grade_id`
(its tests cell is `grade_id + "_tests"`), the assignment, the learner's symbol, the points,
the reference implementation in `moe_course`, and the visible and hidden probes. Written
answers are graded by hand: they are here with their points and no probes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .. import (
    capacity,
    expert_choice,
    experts,
    gating,
    layers,
    losses,
    modern,
    parallel,
    routing,
    serving,
)
from .checks import nb01_experts_and_gating as eg
from .checks import nb02_top_k_routing as tk
from .checks import nb03_load_balancing as lb
from .checks import nb04_expert_choice as ec
from .checks import nb05_moe_transformer as mt
from .checks import nb06_expert_parallelism as ep
from .checks import nb07_modern_moe as mm
from .checks import nb08_serving_and_upcycling as su
from .probe import Probe

KINDS = ("function", "class", "written")


@dataclass(frozen=True)
class Exercise:
    """One graded cell of a course notebook."""

    grade_id: str  # nbgrader id of the answer cell, e.g. "ex02_top_k_gating"
    assignment: str  # nbgrader assignment (notebook folder), e.g. "02_top_k_routing"
    symbol: str | None  # the name the learner defines; None for a written answer
    points: int  # points of the tests cell (or of the written answer)
    reference: Any  # the moe_course function or class; None for a written answer
    visible: tuple[Probe, ...] = ()  # probes the notebook's tests cell runs
    hidden: tuple[Probe, ...] = ()  # probes of the tests cell's hidden block
    kind: str = "function"  # "function", "class" or "written"
    # A challenge the notebook lets a learner skip: while its answer is still the stub
    # (raises NotImplementedError) the visible check prints "skipped" instead of failing,
    # so Run All goes on; the hidden check and both graders still give it 0 points.
    optional: bool = False
    helpers: tuple[Any, ...] = ()  # reference helpers that do the exercise's whole work

    @property
    def references(self) -> tuple[Any, ...]:
        """What trips while this exercise is checked: its reference and helpers that are
        the answer (never shared utilities such as argument validation)."""
        return (self.reference, *self.helpers) if self.reference is not None else ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}; got {self.kind!r}")
        names = [p.name for p in self.visible + self.hidden]
        if len(set(names)) != len(names):
            raise ValueError(f"{self.grade_id}: probe names must be unique; got {names}")

    @property
    def tests_id(self) -> str:
        """The `grade_id` of the locked tests cell that carries the points."""
        return f"{self.grade_id}_tests"

    def probe(self, name: str) -> Probe:
        """The visible or hidden probe called `name` (how a grader finds it again)."""
        for probe in self.visible + self.hidden:
            if probe.name == name:
                return probe
        raise KeyError(f"{self.grade_id} has no probe {name!r}")


def _written(grade_id: str, assignment: str, points: int) -> Exercise:
    return Exercise(grade_id, assignment, None, points, None, kind="written")


_NB01, _NB02, _NB03 = "01_experts_and_gating", "02_top_k_routing", "03_load_balancing"
_NB04, _NB05, _NB06 = "04_expert_choice", "05_moe_transformer", "06_expert_parallelism"
_NB07, _NB08 = "07_modern_moe", "08_serving_and_upcycling"

_ALL = (
    Exercise("ex01_expert", _NB01, "Expert", 2, experts.Expert,
             eg.VISIBLE_EXPERT, eg.HIDDEN_EXPERT, kind="class"),
    Exercise("ex01_softmax_gate", _NB01, "softmax_gate", 1, gating.softmax_gate,
             eg.VISIBLE_SOFTMAX_GATE, eg.HIDDEN_SOFTMAX_GATE),
    Exercise("ex01_dense_moe", _NB01, "dense_moe", 2, routing.dense_moe,
             eg.VISIBLE_DENSE_MOE, eg.HIDDEN_DENSE_MOE),
    _written("ex01_written", _NB01, 1),
    Exercise("ex02_top_k_gating", _NB02, "top_k_gating", 2, gating.top_k_gating,
             tk.VISIBLE_TOP_K_GATING, tk.HIDDEN_TOP_K_GATING),
    Exercise("ex02_noisy_logits", _NB02, "noisy_logits", 2, gating.noisy_logits,
             tk.VISIBLE_NOISY_LOGITS, tk.HIDDEN_NOISY_LOGITS),
    Exercise("ex02_sparse_moe", _NB02, "sparse_moe", 3, routing.sparse_moe,
             tk.VISIBLE_SPARSE_MOE, tk.HIDDEN_SPARSE_MOE),
    Exercise("ex02_moe_flops", _NB02, "moe_flops", 1, routing.moe_flops,
             tk.VISIBLE_MOE_FLOPS, tk.HIDDEN_MOE_FLOPS),
    _written("ex02_written", _NB02, 1),
    Exercise("ex03_cv_squared", _NB03, "cv_squared", 1, losses.cv_squared,
             lb.VISIBLE_CV_SQUARED, lb.HIDDEN_CV_SQUARED),
    Exercise("ex03_importance_loss", _NB03, "importance_loss", 1, losses.importance_loss,
             lb.VISIBLE_IMPORTANCE_LOSS, lb.HIDDEN_IMPORTANCE_LOSS),
    Exercise("ex03_load_loss", _NB03, "load_loss", 2, losses.load_loss,
             lb.VISIBLE_LOAD_LOSS, lb.HIDDEN_LOAD_LOSS, optional=True,
             helpers=(losses._kth_excluding,)),
    Exercise("ex03_switch_aux_loss", _NB03, "switch_aux_loss", 2, losses.switch_aux_loss,
             lb.VISIBLE_SWITCH_AUX_LOSS, lb.HIDDEN_SWITCH_AUX_LOSS,
             helpers=(losses.switch_loss_from_counts,)),
    Exercise("ex03_router_z_loss", _NB03, "router_z_loss", 1, losses.router_z_loss,
             lb.VISIBLE_ROUTER_Z_LOSS, lb.HIDDEN_ROUTER_Z_LOSS),
    Exercise("ex03_expert_capacity", _NB03, "expert_capacity", 1, capacity.expert_capacity,
             lb.VISIBLE_EXPERT_CAPACITY, lb.HIDDEN_EXPERT_CAPACITY),
    Exercise("ex03_capacity_positions", _NB03, "capacity_positions", 2,
             capacity.capacity_positions, lb.VISIBLE_CAPACITY_POSITIONS,
             lb.HIDDEN_CAPACITY_POSITIONS),
    Exercise("ex03_apply_capacity", _NB03, "apply_capacity", 2, capacity.apply_capacity,
             lb.VISIBLE_APPLY_CAPACITY, lb.HIDDEN_APPLY_CAPACITY),
    Exercise("ex04_expert_choice_capacity", _NB04, "expert_choice_capacity", 1,
             expert_choice.expert_choice_capacity, ec.VISIBLE_EC_CAPACITY,
             ec.HIDDEN_EC_CAPACITY),
    Exercise("ex04_expert_choice_routing", _NB04, "expert_choice_routing", 2,
             expert_choice.expert_choice_routing, ec.VISIBLE_EC_ROUTING, ec.HIDDEN_EC_ROUTING),
    Exercise("ex04_expert_choice_moe", _NB04, "expert_choice_moe", 3,
             expert_choice.expert_choice_moe, ec.VISIBLE_EC_MOE, ec.HIDDEN_EC_MOE),
    Exercise("ex04_experts_per_token", _NB04, "experts_per_token", 1,
             expert_choice.experts_per_token, ec.VISIBLE_EXPERTS_PER_TOKEN,
             ec.HIDDEN_EXPERTS_PER_TOKEN),
    _written("ex04_written", _NB04, 2),
    Exercise("ex05_moe_feed_forward", _NB05, "MoEFeedForward", 3, layers.MoEFeedForward,
             mt.VISIBLE_MOE_FEED_FORWARD, mt.HIDDEN_MOE_FEED_FORWARD, kind="class",
             helpers=(layers.moe_from_routing,)),
    Exercise("ex05_moe_lm_loss", _NB05, "moe_lm_loss", 1, losses.moe_lm_loss,
             mt.VISIBLE_MOE_LM_LOSS, mt.HIDDEN_MOE_LM_LOSS),
    _written("ex05_written", _NB05, 2),
    Exercise("ex06_send_counts", _NB06, "send_counts", 2, parallel.send_counts,
             ep.VISIBLE_SEND_COUNTS, ep.HIDDEN_SEND_COUNTS),
    Exercise("ex06_permute_for_all_to_all", _NB06, "permute_for_all_to_all", 2,
             parallel.permute_for_all_to_all, ep.VISIBLE_PERMUTE, ep.HIDDEN_PERMUTE),
    Exercise("ex06_expert_parallel_forward", _NB06, "expert_parallel_forward", 3,
             parallel.expert_parallel_forward, ep.VISIBLE_EXPERT_PARALLEL,
             ep.HIDDEN_EXPERT_PARALLEL, helpers=(parallel.expert_parallel_sparse_moe,)),
    Exercise("ex07_shared_expert_moe", _NB07, "shared_expert_moe", 2, modern.shared_expert_moe,
             mm.VISIBLE_SHARED_EXPERT_MOE, mm.HIDDEN_SHARED_EXPERT_MOE),
    Exercise("ex07_biased_top_k", _NB07, "biased_top_k", 2, modern.biased_top_k,
             mm.VISIBLE_BIASED_TOP_K, mm.HIDDEN_BIASED_TOP_K),
    Exercise("ex07_aux_free_bias_update", _NB07, "aux_free_bias_update", 1,
             modern.aux_free_bias_update, mm.VISIBLE_AUX_FREE_BIAS_UPDATE,
             mm.HIDDEN_AUX_FREE_BIAS_UPDATE),
    Exercise("ex07_soft_moe", _NB07, "soft_moe", 3, modern.soft_moe,
             mm.VISIBLE_SOFT_MOE, mm.HIDDEN_SOFT_MOE),
    Exercise("ex07_sort_by_expert", _NB07, "sort_by_expert", 2, modern.sort_by_expert,
             mm.VISIBLE_SORT_BY_EXPERT, mm.HIDDEN_SORT_BY_EXPERT),
    Exercise("ex08_experts_touched", _NB08, "experts_touched", 1, serving.experts_touched,
             su.VISIBLE_EXPERTS_TOUCHED, su.HIDDEN_EXPERTS_TOUCHED),
    Exercise("ex08_expected_experts_touched", _NB08, "expected_experts_touched", 1,
             serving.expected_experts_touched, su.VISIBLE_EXPECTED_EXPERTS_TOUCHED,
             su.HIDDEN_EXPECTED_EXPERTS_TOUCHED),
    Exercise("ex08_lru_cache_hits", _NB08, "lru_cache_hits", 2, serving.lru_cache_hits,
             su.VISIBLE_LRU_CACHE_HITS, su.HIDDEN_LRU_CACHE_HITS),
    Exercise("ex08_optimal_cache_hits", _NB08, "optimal_cache_hits", 2,
             serving.optimal_cache_hits, su.VISIBLE_OPTIMAL_CACHE_HITS,
             su.HIDDEN_OPTIMAL_CACHE_HITS),
    Exercise("ex08_offload_time_per_token", _NB08, "offload_time_per_token", 1,
             serving.offload_time_per_token, su.VISIBLE_OFFLOAD_TIME_PER_TOKEN,
             su.HIDDEN_OFFLOAD_TIME_PER_TOKEN),
    Exercise("ex08_upcycle", _NB08, "upcycle", 3, serving.upcycle,
             su.VISIBLE_UPCYCLE, su.HIDDEN_UPCYCLE),
    _written("ex08_written", _NB08, 2),
)

EXERCISES: dict[str, Exercise] = {ex.grade_id: ex for ex in _ALL}


def exercises_for(assignment: str) -> list[Exercise]:
    """The exercises of one assignment, in notebook order (written answers included).

    >>> [ex.grade_id for ex in exercises_for("01_experts_and_gating")]
    ['ex01_expert', 'ex01_softmax_gate', 'ex01_dense_moe', 'ex01_written']
    """
    found = [ex for ex in _ALL if ex.assignment == assignment]
    if not found:
        known = sorted({ex.assignment for ex in _ALL})
        raise ValueError(f"no assignment {assignment!r}; known: {', '.join(known)}")
    return found
