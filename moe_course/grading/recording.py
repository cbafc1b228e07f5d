"""Experts that remember what they were called on, and the judge of those calls.

Sparse dispatch is the point of a mixture of experts: each expert must run once, on exactly
the rows routed to it, and not at all when it has none (Shazeer et al. 2017, arXiv
1701.06538, Sec. 2). A correct output can hide a dense computation, so the probes of
`sparse_moe`, `expert_choice_moe` and `MoEFeedForward` give the learner experts that record
their inputs (`ProbeExpert`) or hook the learner's own experts (`record_calls`), return the
records as plain tensors, and `judge_expert_calls` compares them with the routing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .probe import CheckFailure, Inputs

MAX_RECORDED = 64  # calls recorded per expert; more are only counted


def _record(store: dict[str, Any], value: object) -> None:
    store["count"] += 1
    if len(store["inputs"]) < MAX_RECORDED:
        if isinstance(value, Tensor):
            store["inputs"].append(value.detach().as_subclass(Tensor).cpu().clone())
        else:
            store["inputs"].append(f"a {type(value).__name__}")


def new_record() -> dict[str, Any]:
    """An empty call record: `{"count": int, "inputs": [tensor or description, ...]}`."""
    return {"count": 0, "inputs": []}


class ProbeExpert(nn.Module):
    """A small fixed nonlinear expert, `tanh(x @ a + b) @ c`, `(n, D) -> (n, D)`.

    Nonlinear on purpose: scaling its input by a gate is not the same as scaling its output.
    Every call is recorded in `self.record`.
    """

    def __init__(self, a: Tensor, b: Tensor, c: Tensor) -> None:
        super().__init__()
        self.register_buffer("a", a.clone())  # (D, H)
        self.register_buffer("b", b.clone())  # (H,)
        self.register_buffer("c", c.clone())  # (H, D)
        self.record = new_record()

    def forward(self, x: Tensor) -> Tensor:
        _record(self.record, x)
        return torch.tanh(x @ self.a + self.b) @ self.c


def expert_inputs(g: torch.Generator, n_experts: int, d_model: int,
                  d_hidden: int = 6) -> Inputs:
    """Seeded weights of `n_experts` `ProbeExpert`s, stacked: a `(E, D, H)`, b `(E, H)`, c."""
    return {
        "expert_a": torch.randn(n_experts, d_model, d_hidden, generator=g) * 0.8,
        "expert_b": torch.randn(n_experts, d_hidden, generator=g) * 0.3,
        "expert_c": torch.randn(n_experts, d_hidden, d_model, generator=g) * 0.8,
    }


def probe_experts(inputs: Inputs, module_list: bool = False) -> list[ProbeExpert] | nn.ModuleList:
    """Build the experts described by `expert_inputs` (a list, or an `nn.ModuleList`)."""
    experts = [ProbeExpert(a, b, c) for a, b, c in
               zip(inputs["expert_a"], inputs["expert_b"], inputs["expert_c"], strict=True)]
    return nn.ModuleList(experts) if module_list else experts


def expert_outputs(inputs: Inputs, x: Tensor) -> Tensor:
    """Every probe expert on every row, `(E, T, D)`: the trusted side's expert outputs."""
    hidden = torch.tanh(torch.einsum("td,edh->eth", x, inputs["expert_a"])
                        + inputs["expert_b"][:, None, :])  # (E, T, H)
    return torch.einsum("eth,ehd->etd", hidden, inputs["expert_c"])  # (E, T, D)


def record_calls(experts: Sequence[nn.Module]) -> tuple[list[dict[str, Any]], list[Any]]:
    """Hook the learner's expert modules; return their records and the hook handles."""
    records = [new_record() for _ in experts]
    handles = []
    for module, store in zip(experts, records, strict=True):
        def hook(_module: nn.Module, args: tuple[Any, ...], store: dict = store) -> None:
            _record(store, args[0] if args else None)

        handles.append(module.register_forward_pre_hook(hook))
    return records, handles


def _rows_of(value: Tensor, x: Tensor) -> list[int] | None:
    """Which rows of `x` the tensor `value` consists of (None if some row is not one)."""
    if value.dim() == 1:
        value = value[None]
    if value.dim() != 2 or value.shape[1] != x.shape[1] or not value.is_floating_point():
        return None
    if value.shape[0] == 0:
        return []
    gap = (value[:, None, :].to(torch.float64) - x[None].to(torch.float64)).abs().amax(-1)
    best = gap.min(dim=1)
    scale = 1e-5 * (1.0 + float(x.abs().max()))
    if bool((best.values > scale).any()):
        return None
    return [int(i) for i in best.indices]


def _fmt_tokens(tokens: Sequence[int]) -> str:
    tokens = sorted(tokens)
    if len(tokens) <= 12:
        return str(tokens)
    return f"{str(tokens[:12])[:-1]}, ...] ({len(tokens)} tokens)"


def judge_expert_calls(records: Sequence[Any], x: Tensor, required: Sequence[Sequence[int]],
                       allowed: Sequence[Sequence[int]] | None = None,
                       symbol: str = "your function") -> None:
    """Each expert `e` must be called at most once, on the rows `required[e]` (a multiset of
    token ids) and possibly some of `allowed[e]` too; never when both are empty."""
    if not isinstance(records, (list, tuple)) or len(records) != len(required):
        raise CheckFailure(f"could not read which rows the experts of {symbol} were called on")
    allowed = allowed if allowed is not None else required
    counts = [int(s.get("count", 0)) if isinstance(s, dict) else 0 for s in records]
    if not any(counts) and any(required):
        raise CheckFailure(f"none of the experts was called by your {symbol}: call each expert "
                           "as a module, experts[e](rows) (calling .forward directly skips "
                           "the module machinery)")
    for e, (store, need, may) in enumerate(zip(records, required, allowed, strict=True)):
        count = int(store.get("count", 0)) if isinstance(store, dict) else 0
        seen = store.get("inputs", []) if isinstance(store, dict) else []
        need, may = sorted(need), sorted(set(may) | set(need))
        if not may and count:
            raise CheckFailure(
                f"expert {e} has no tokens routed to it but your {symbol} called it {count} "
                "time(s); skip an expert with no tokens instead of calling it on an empty "
                "or a full batch")
        if need and count == 0:
            raise CheckFailure(f"expert {e} was never called, but tokens {_fmt_tokens(need)} "
                               f"are routed to it; call experts[{e}] on those rows")
        if count > 1:
            sizes = [int(v.reshape(-1, x.shape[1]).shape[0]) if isinstance(v, Tensor)
                     and v.numel() % x.shape[1] == 0 else "?" for v in seen[:8]]
            per_token = " (one call per token?)" if sizes and all(s == 1 for s in sizes) else ""
            raise CheckFailure(
                f"expert {e} was called {count} times{per_token}, on batches of "
                f"{sizes}{'...' if count > 8 else ''} rows; call each expert once, on all "
                "of its rows together (gather them, e.g. x[token_ids])")
        if count == 0:
            continue
        value = seen[0] if seen else None
        if not isinstance(value, Tensor):
            raise CheckFailure(f"expert {e} was called on {value}, not on a (n, D) tensor of "
                               "rows of x")
        rows = _rows_of(value, x)
        if rows is None:
            raise CheckFailure(
                f"expert {e} was called on {tuple(value.shape)} values that are not rows of x: "
                "pass the expert the rows x[token_ids] unchanged and weight its *outputs* by "
                "the gates (an expert is nonlinear: scaling its input is not the same)")
        extra = sorted(set(rows) - set(may))
        if extra:
            everyone = len(set(rows)) == x.shape[0]
            dense = " (you ran it on every token, which is a dense mixture)" if everyone else ""
            raise CheckFailure(
                f"expert {e} was called on tokens {_fmt_tokens(extra)}, which are not routed "
                f"to it{dense}; run each expert only on its own tokens {_fmt_tokens(need)}")
        missing = sorted(set(need) - set(rows))
        if missing:
            raise CheckFailure(f"expert {e} was not given tokens {_fmt_tokens(missing)}, which "
                               "are routed to it")
        if sorted(rows) != need and set(rows) == set(need) and len(rows) > len(set(rows)):
            raise CheckFailure(f"expert {e} got some of its tokens more than once: tokens "
                               f"{_fmt_tokens(need)} are routed to it, it saw {rows}")
