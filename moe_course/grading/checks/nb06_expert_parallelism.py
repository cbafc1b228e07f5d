"""Probes for notebook 06, expert parallelism: `send_counts`, `permute_for_all_to_all`,
`expert_parallel_forward` (GShard, Lepikhin et al. 2020, arXiv 2006.16668, Sec. 2-3;
Switch Transformer, Fedus et al. 2021, arXiv 2101.03961, Sec. 5).

The layer's probes run the learner's function for real on `torch.distributed`: once with no
process group (world size 1), and on 2 and 4 ranks that are threads of the checking process,
joined by torch's in-process "threaded" process group (the one torch's own distributed tests
use). Each rank gets its shard of the tokens and its block of experts, runs forward and
backward, and reports its output, its gradients and the rows each of its experts was called
on, as tensors and plain data; the judge compares them with the single-process layer. No
process is started and no port opened, so the probes also run where the grader's sandbox
forbids both, and in well under a second. The notebook itself runs the layer on real gloo
processes with `moe_course.parallel.launch`.

While the ranks run, `expert_parallel_sparse_moe` (which does the whole exchange) trips like
the exercise's reference, `expert_parallel_forward`, does: calling either earns nothing.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ... import parallel
from ..guard import ReferenceCalled, reference_guard
from ..inputs import gen, min_gap, tie_free
from ..probe import (
    CheckFailure,
    Inputs,
    Outputs,
    Probe,
    call,
    capture,
    describe,
    expect_close,
    expect_items,
    expect_tensor,
    matching_variant,
    no_mutation,
)
from ..recording import expert_inputs, judge_expert_calls, new_record
from .common import UNWEIGHTED

RANK_TIMEOUT = 10.0  # seconds a multi-rank probe may take (a correct one: well under 1)
_RUNS = itertools.count(1_000_000)  # numbers multi-rank runs: each names its own group

# ----------------------------------------------------------------------------------------
# Shared inputs: routings whose placement mistakes give different answers


def _owner(indices: Tensor, n_experts: int, world_size: int) -> Tensor:
    """Rank of each assignment's expert: contiguous blocks of E / W experts."""
    return indices // (n_experts // world_size)  # (T, K)


def _routing_inputs(seed: int, t: int, k: int, e: int, w: int,
                    dead: tuple[int, ...] = ()) -> Inputs:
    """`indices` (T, K) with distinct experts per row; `dead` experts are never chosen."""
    g = gen(seed)
    scores = torch.rand(t, e, generator=g)  # (T, E)
    scores[:, list(dead)] = -1.0
    indices = scores.argsort(dim=1, descending=True)[:, :k]  # (T, K)
    return {"indices": indices, "n_experts": e, "world_size": w}


def _routing_run(fn: Any, inputs: Inputs) -> Outputs:
    return call(fn, [("indices", inputs["indices"]), ("n_experts", inputs["n_experts"]),
                     ("world_size", inputs["world_size"])])


def _call_text(symbol: str, inputs: Inputs) -> str:
    t, k = inputs["indices"].shape
    return (f"{symbol}(indices of shape ({t}, {k}), n_experts={inputs['n_experts']}, "
            f"world_size={inputs['world_size']})")


# ----------------------------------------------------------------------------------------
# send_counts


def _counts(ranks: Tensor, w: int) -> Tensor | None:
    """Counts per rank of a flat tensor of rank ids; None if some id is not a rank."""
    flat = ranks.reshape(-1)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= w):
        return None
    return torch.bincount(flat, minlength=w)  # (W,)


def _counts_judge(inputs: Inputs, outputs: Outputs) -> None:
    no_mutation(outputs, "send_counts")
    idx, e, w = inputs["indices"], inputs["n_experts"], inputs["world_size"]
    what = _call_text("send_counts", inputs)
    got = outputs["result"]
    if isinstance(got, Tensor) and tuple(got.shape) == (e,) and e != w:
        raise CheckFailure(f"{what} returned {e} numbers, one per expert: return one count per "
                           f"destination rank, shape (W,) = ({w},), by summing the counts of "
                           f"each rank's block of E / W = {e // w} experts")
    counts = expect_tensor(got, what, (w,), kind="int", hint=" (W,): rows for each rank")
    owner = _owner(idx, e, w)  # (T, K)
    expected = _counts(owner, w)
    tokens = (owner[:, :, None] == torch.arange(w)).any(1).sum(0)  # (W,) tokens, not rows
    expect_close(counts, expected, what, variants=[
        (tokens, "you counted tokens, not assignments: a token routed to two experts on the "
                 "same rank sends that rank two rows (one per assignment), so count every "
                 "entry of indices"),
        (_counts(idx % w, w), f"you placed expert e on rank e % W (round robin): experts sit in "
                              f"contiguous blocks, expert e lives on rank e // (E / W) = "
                              f"e // {e // w}"),
        (_counts(idx // w, w), f"you placed expert e on rank e // W: the blocks hold E / W = "
                               f"{e // w} experts each, so expert e lives on rank e // (E / W)"),
        (_counts(owner[:, :1], w), "you counted only each token's first choice indices[:, 0]: "
                                   "count all k assignments"),
    ], otherwise=f"{what} should be {expected.tolist()}, the number of entries of indices "
                 f"whose expert lives on each rank (expert e on rank e // (E / W))")


def _counts_probe(name: str, seed: int, t: int, k: int, e: int, w: int,
                  dead: tuple[int, ...] = (), rules: tuple[str, ...] = ()) -> Probe:
    return Probe(name, lambda: _routing_inputs(seed, t, k, e, w, dead), _routing_run,
                 _counts_judge, rules=(COUNTS, NO_MUTATION, *rules))


def _divisible_run(fn: Any, inputs: Inputs) -> Outputs:
    reports = []
    for e, w in inputs["bad"]:
        try:
            result = fn(inputs["indices"].clone(), e, w)
        except Exception as exc:
            reports.append({"raised": type(exc).__name__,
                            "value_error": isinstance(exc, ValueError),
                            "message": str(exc)[:200]})
        else:
            reports.append({"raised": None, "value_error": False,
                            "message": describe(capture(result))})
    return {"reports": reports}


def _divisible_judge(inputs: Inputs, outputs: Outputs) -> None:
    t, k = inputs["indices"].shape
    for (e, w), report in zip(inputs["bad"], outputs["reports"], strict=True):
        what = f"send_counts(indices of shape ({t}, {k}), n_experts={e}, world_size={w})"
        if report["value_error"]:
            continue
        if report["raised"] is None:
            raise CheckFailure(f"{what} returned {report['message']} instead of raising "
                               f"ValueError: {e} experts cannot be split into {w} equal "
                               "blocks; check n_experts % world_size == 0 first")
        raise CheckFailure(f"{what} raised {report['raised']} ({report['message'][:80]}); "
                           "raise a ValueError yourself, saying n_experts must be a multiple "
                           "of world_size")


def _divisible_probe(name: str, seed: int, bad: list[tuple[int, int]]) -> Probe:
    def inputs() -> Inputs:
        g = gen(seed)
        return {"indices": torch.randint(0, 4, (5, 2), generator=g), "bad": bad}

    return Probe(name, inputs, _divisible_run, _divisible_judge, rules=(DIVISIBLE,))


# ----------------------------------------------------------------------------------------
# permute_for_all_to_all


def _non_decreasing(values: Tensor) -> bool:
    return bool((values.diff() >= 0).all()) if values.numel() > 1 else True


def _is_permutation(p: Tensor, n: int) -> bool:
    return bool(torch.equal(p.sort().values.to(torch.int64), torch.arange(n)))


def _permute_judge(inputs: Inputs, outputs: Outputs) -> None:
    no_mutation(outputs, "permute_for_all_to_all")
    idx, e, w = inputs["indices"], inputs["n_experts"], inputs["world_size"]
    t, k = idx.shape
    n = t * k
    order, inverse, counts = expect_items(outputs["result"], "permute_for_all_to_all",
                                          ("order", "inverse", "counts"))
    if isinstance(order, Tensor) and tuple(order.shape) == (t,) and t != n:
        raise CheckFailure(f"your order has one entry per token ({t}); it needs one per "
                           f"assignment, T*K = {n}: flatten indices with indices.reshape(-1), "
                           "so that assignment a is token a // K, choice a % K")
    order = expect_tensor(order, "permute_for_all_to_all's order", (n,), kind="int",
                          hint=" (T*K,): send row i carries assignment order[i]")
    inverse = expect_tensor(inverse, "permute_for_all_to_all's inverse", (n,), kind="int",
                            hint=" (T*K,): assignment a is send row inverse[a]")
    flat = idx.reshape(-1)  # (T*K,)
    if not _is_permutation(order, n):
        raise CheckFailure(f"your order is not a permutation of 0 ... T*K - 1 = {n - 1}: every "
                           "assignment must be sent exactly once (repeated or missing values "
                           f"in {describe(order)})")
    order = order.to(torch.int64)
    if not _non_decreasing(flat[order]):
        by_column = idx.t().reshape(-1)  # (K*T,) the column-major numbering
        if _is_permutation(inverse, n) and _non_decreasing(flat[inverse.to(torch.int64)]):
            message = ("you swapped order and inverse: order is the sorting permutation "
                       "(send row i carries assignment order[i], e.g. an argsort), inverse "
                       "its inverse (assignment a is send row inverse[a])")
        elif _non_decreasing(by_column[order]):
            message = ("your order numbers the assignments column by column (choice-major): "
                       "number them row by row, indices.reshape(-1), so that assignment a is "
                       "token a // K, choice a % K")
        elif _non_decreasing(-flat[order]):
            message = ("your order sorts the experts in descending order: sort ascending, so "
                       "that rank 0's rows come first, as all_to_all_single expects")
        elif _non_decreasing(_owner(flat, e, w)[order]):
            message = ("your rows are grouped by destination rank but not by expert within a "
                       "rank: sort by expert id (experts sit in contiguous blocks, so that "
                       "also groups the ranks), so each receiver finds an expert's rows in "
                       "one piece")
        else:
            message = (f"the experts of your send rows, indices.reshape(-1)[order] = "
                       f"{flat[order].tolist()[:16]}, are not sorted: sort the assignments by "
                       "expert id (rank 0's experts first), e.g. with a stable argsort")
        raise CheckFailure(message)
    if not torch.equal(order[inverse.to(torch.int64)], torch.arange(n)):
        if torch.equal(inverse.to(torch.int64), order) and not torch.equal(order[order],
                                                                          torch.arange(n)):
            raise CheckFailure("your inverse is the order itself: the inverse permutation "
                               "satisfies order[inverse] = arange(T*K), i.e. inverse[order[i]] "
                               "= i (scatter arange into the positions order, or argsort the "
                               "order)")
        raise CheckFailure("your inverse does not undo your order: it must satisfy "
                           "order[inverse] = arange(T*K), i.e. inverse[order[i]] = i, so that "
                           "rows[order][inverse] == rows")
    owner = _owner(idx, e, w)  # (T, K)
    expected = _counts(owner, w)
    if isinstance(counts, Tensor) and tuple(counts.shape) == (e,) and e != w:
        raise CheckFailure(f"your counts have one entry per expert ({e}): return the rows for "
                           f"each destination rank, shape (W,) = ({w},), as send_counts does")
    counts = expect_tensor(counts, "permute_for_all_to_all's counts", (w,), kind="int",
                           hint=" (W,): rows for each destination rank, as send_counts")
    expect_close(counts, expected, "your counts", otherwise=f"your counts should be "
                 f"{expected.tolist()}, the rows for each destination rank (= send_counts), "
                 "which are the split sizes of the send buffer")


def _permute_probe(name: str, seed: int, t: int, k: int, e: int, w: int,
                   dead: tuple[int, ...] = (), rules: tuple[str, ...] = ()) -> Probe:
    return Probe(name, lambda: _routing_inputs(seed, t, k, e, w, dead), _routing_run,
                 _permute_judge, rules=(PERMUTE, NO_MUTATION, *rules))


# ----------------------------------------------------------------------------------------
# expert_parallel_forward: inputs, the ranks' side, the judge

BIAS = 12.0  # router logit offset for experts nobody (or everybody) chooses


def _layer_inputs(seed: int, t: int, d: int, e: int, k: int, w: int,
                  dead: tuple[int, ...] = (), favourite: int | None = None) -> Inputs:
    """Tokens, a router (through a constant feature `x[:, 0] = 1` acting as a bias for the
    `dead` and `favourite` experts), probe experts and a cotangent for the backward."""

    def make(g: torch.Generator) -> Inputs:
        x = torch.randn(t, d, generator=g)  # (T, D)
        w_gate = torch.randn(d, e, generator=g) * 0.8  # (D, E)
        if dead or favourite is not None:
            x[:, 0] = 1.0
            w_gate[0] = 0.0
            w_gate[0, list(dead)] = -BIAS
            if favourite is not None:
                w_gate[0, favourite] = BIAS
        return {"x": x, "w_gate": w_gate, "k": k, "world_size": w,
                "cotangent": torch.randn(t, d, generator=g), **expert_inputs(g, e, d)}

    return tie_free(make, lambda i: [min_gap(i["x"] @ i["w_gate"], dim=-1)], seed)


class GradExpert(nn.Module):
    """`tanh(x @ a + b) @ c`, `(n, D) -> (n, D)`, with trainable `a`, `b`, `c`; every call's
    input is recorded in `self.record` (nonlinear, so scaling its input by a gate shows)."""

    def __init__(self, a: Tensor, b: Tensor, c: Tensor) -> None:
        super().__init__()
        self.a = nn.Parameter(a.clone())  # (D, H)
        self.b = nn.Parameter(b.clone())  # (H,)
        self.c = nn.Parameter(c.clone())  # (H, D)
        self.record = new_record()

    def forward(self, x: Tensor) -> Tensor:
        self.record["count"] += 1
        if len(self.record["inputs"]) < 8:
            self.record["inputs"].append(capture(x) if isinstance(x, Tensor)
                                         else f"a {type(x).__name__}")
        return torch.tanh(x @ self.a + self.b) @ self.c


def _on_rank(fn: Any, inputs: Inputs, rank: int, world_size: int,
             agree: Callable[[bool], bool] | None = None) -> Outputs:
    """Run the learner's layer on rank `rank`'s shard, then backward; plain data only.

    `agree(ready)` (several ranks) returns whether every rank has an output to backpropagate,
    so that no rank waits in a backward collective that the others skip."""
    e = inputs["expert_a"].shape[0]
    x0 = torch.tensor_split(inputs["x"], world_size)[rank]  # (T_r, D)
    cot = torch.tensor_split(inputs["cotangent"], world_size)[rank]  # (T_r, D)
    x = x0.clone().requires_grad_(True)
    w_gate = inputs["w_gate"].clone().requires_grad_(True)  # (D, E), replicated
    ids = parallel.local_expert_range(rank, e, world_size)
    experts = nn.ModuleList(GradExpert(inputs["expert_a"][i], inputs["expert_b"][i],
                                       inputs["expert_c"][i]) for i in ids)
    result = fn(x, w_gate, experts, inputs["k"])
    mutated = [name for name, now, was in (("x", x, x0), ("w_gate", w_gate, inputs["w_gate"]))
               if not torch.equal(now.detach(), was)]
    ready = (isinstance(result, Tensor) and result.is_floating_point()
             and tuple(result.shape) == tuple(cot.shape) and result.requires_grad)
    everyone = agree(ready) if agree is not None else ready
    if everyone:
        (result * cot).sum().backward()
    backward = "done" if everyone else ("not this rank" if ready else "no output to backprop")
    return {"result": capture(result), "mutated": mutated, "backward": backward,
            "calls": [expert.record for expert in experts],
            "x_grad": capture(x.grad), "w_gate_grad": capture(w_gate.grad),
            "expert_grads": [[capture(p.grad) for p in (ex.a, ex.b, ex.c)] for ex in experts]}


COLLECTIVES = ("every rank must call the same collectives in the same order, even with 0 rows "
               "to send or receive, in the forward and in the backward: a rank that receives "
               "no rows must still run its experts (on 0 rows) so that its exchanges stay in "
               "the autograd graph")
DEADLOCK = ("on {w} ranks your expert_parallel_forward did not finish within {s:g} s: some rank "
            "waits in a collective that another rank never calls; " + COLLECTIVES)
LEFT = ("on {w} ranks, rank(s) {waiting} waited in a collective that rank(s) {absent} never "
        "called (those had already finished their part); " + COLLECTIVES)
NO_GROUP = ("with no process group (one process, world size 1) your expert_parallel_forward "
            "must run without communicating: use the world() helper, which returns (0, 1) "
            "then, and exchange(), which returns the rows unchanged")


SPLITS = ("the split sizes of an all-to-all must sum to the rows each rank passes, and what "
          "rank s sends rank r must be what r expects from s: exchange the counts first")


def _layer_run_here(fn: Any, inputs: Inputs) -> Outputs:
    """World size 1 in this process, no process group (the notebook's own situation)."""
    if dist.is_available() and dist.is_initialized():
        raise CheckFailure("a process group is initialised in this process: the one-process "
                           "check needs none (call dist.destroy_process_group() first)")
    with reference_guard(parallel.expert_parallel_sparse_moe) as guard:
        try:
            outputs = _on_rank(fn, inputs, 0, 1)
        except (ValueError, RuntimeError) as exc:
            if "process group has not been initialized" in str(exc):
                raise CheckFailure(NO_GROUP) from None
            raise
    if guard.tripped:
        raise ReferenceCalled("moe_course's expert-parallel layer was called")
    return {"ranks": [outputs]}


def _stranded(threaded: Any, phase: list[str]) -> tuple[list[int], list[int]] | None:
    """`(waiting, absent)` when ranks wait in a collective that the absent ranks can no
    longer join: they finished their forward pass ("agree") or everything ("done")."""
    for coll in list(threaded.ProcessLocalGroup._cur_coll_on_pgs.values()):
        joined = [d is not None for d in getattr(coll, "_data", [])]
        if len(joined) != len(phase) or getattr(coll, "_done", True) or not any(joined):
            continue
        absent = [r for r, j in enumerate(joined) if not j]
        if absent and all(phase[r] in ("agree", "done") for r in absent):
            return [r for r, j in enumerate(joined) if j], absent
    return None


def _collective(exc: BaseException) -> str | None:
    """The threaded group's collective class `exc` was raised in, if any."""
    tb = exc.__traceback__
    found = None
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_filename.endswith("multi_threaded_pg.py") and "self" in frame.f_locals:
            found = type(frame.f_locals["self"]).__name__
        tb = tb.tb_next
    return found


def _layer_run_ranks(fn: Any, inputs: Inputs) -> Outputs:
    """World size `W` in this process: `W` threads joined by torch's in-process ("threaded")
    process group, the one torch's own distributed tests use, so each thread is a rank
    whose `torch.distributed` calls (`is_initialized`, `get_rank`, `all_to_all_single`, ...)
    behave as on a real process group. No process is started and no port opened.

    A rank that raises ends the others' waits; ranks stranded in a collective that another
    rank can no longer join are recognised at once; anything else that hangs ends after
    `RANK_TIMEOUT` seconds. Each run's group has a name of its own, so a rank thread left
    behind by an earlier run (stuck in learner code) can never join this run's collectives,
    and once its run is over it no longer wakes anyone."""
    from torch.testing._internal.distributed import multi_threaded_pg as threaded

    if dist.is_available() and dist.is_initialized():
        raise CheckFailure("a process group is initialised in this process: the multi-rank "
                           "check needs none (call dist.destroy_process_group() first)")
    w = inputs["world_size"]
    results: list[Any] = [None] * w
    failures: list[tuple[int, BaseException]] = []  # in the order they happened
    phase = ["start"] * w  # start, forward, agree, backward, done
    ready = [False] * w

    def all_to_backward() -> None:  # runs once, as the last rank arrives, before any leaves:
        phase[:] = ["backward"] * w  # no rank is ever seen waiting for one not yet marked

    barrier = threading.Barrier(w, action=all_to_backward)
    store = dist.HashStore()
    run_id = next(_RUNS)
    over = threading.Event()  # set when this run is over: its stragglers stay quiet

    def rank_main(rank: int) -> None:
        def agree(mine: bool) -> bool:  # outside torch.distributed: no collective to mismatch
            phase[rank], ready[rank] = "agree", mine
            barrier.wait()
            return all(ready)

        try:
            dist.distributed_c10d._world.group_count = run_id  # names the group: this run's
            dist.init_process_group("threaded", rank=rank, world_size=w, store=store)
            phase[rank] = "forward"
            results[rank] = _on_rank(fn, inputs, rank, w, agree)
        except threading.BrokenBarrierError:
            pass  # the check was stopped while this rank waited for the others
        except BaseException as exc:  # noqa: B036 - SystemExit too: another rank failed first
            if not over.is_set():
                failures.append((rank, exc))
                threaded.ProcessLocalGroup.exception_handle(exc)  # wake the ranks that wait
                barrier.abort()
        finally:
            phase[rank] = "done"
            with contextlib.suppress(Exception):
                dist.destroy_process_group()

    torch._C._distributed_c10d._set_thread_isolation_mode(True)
    threaded._install_threaded_pg()
    threads = [threading.Thread(target=rank_main, args=(r,), daemon=True,
                                name=f"moe-check-rank-{r}") for r in range(w)]
    stranded = None
    try:
        with reference_guard(parallel.expert_parallel_sparse_moe) as guard:
            for thread in threads:
                thread.start()
            deadline = time.monotonic() + RANK_TIMEOUT
            while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
                next(t for t in threads if t.is_alive()).join(0.01)
                stranded = None if failures else _stranded(threaded, phase)
                if stranded:
                    break
    finally:
        hung = [r for r, t in enumerate(threads) if t.is_alive()]
        if hung:  # wake every rank waiting in a collective or the barrier, then let them go
            threaded.ProcessLocalGroup.exception_handle(TimeoutError("check stopped"))
            barrier.abort()
            for thread in threads:
                thread.join(1.0)
        over.set()
        threaded._uninstall_threaded_pg()
        threaded.ProcessLocalGroup.reset()
        torch._C._distributed_c10d._set_thread_isolation_mode(False)
    if stranded:
        waiting, absent = (", ".join(map(str, ranks)) for ranks in stranded)
        raise CheckFailure(LEFT.format(w=w, waiting=waiting, absent=absent))
    real = [(r, exc) for r, exc in failures if not isinstance(exc, SystemExit)]
    if guard.tripped or any(isinstance(exc, ReferenceCalled) for _, exc in real):
        raise ReferenceCalled("moe_course's expert-parallel layer was called on a rank")
    if real:
        rank, exc = real[0]
        if isinstance(exc, (NotImplementedError, CheckFailure)):
            raise exc
        text = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        raised = f"{type(exc).__name__}{': ' + text if text else ''}"
        where = _collective(exc)
        if where == "AllToAllBase" or ("split" in text.lower() and "size" in text.lower()):
            raise CheckFailure(f"on {w} ranks an all-to-all of your expert_parallel_forward "
                               f"failed ({raised}): {SPLITS}")
        if where is not None:
            raise CheckFailure(f"on {w} ranks a collective of your expert_parallel_forward "
                               f"failed ({raised}): the ranks called different collectives "
                               f"at the same time; {COLLECTIVES}")
        raise CheckFailure(f"on {w} ranks your expert_parallel_forward raised on rank {rank} "
                           f"{raised}")
    if hung or any(r is None for r in results):
        raise CheckFailure(DEADLOCK.format(w=w, s=RANK_TIMEOUT))
    return {"ranks": results}


def _layer_run(fn: Any, inputs: Inputs) -> Outputs:
    if inputs["world_size"] == 1:
        return _layer_run_here(fn, inputs)
    return _layer_run_ranks(fn, inputs)


class _Reference:
    """The single-process layer on all tokens (autograd), and the planted mistakes."""

    def __init__(self, inputs: Inputs) -> None:
        x = inputs["x"].clone().requires_grad_(True)  # (T, D)
        w_gate = inputs["w_gate"].clone().requires_grad_(True)  # (D, E)
        params = [inputs[n].clone().requires_grad_(True)
                  for n in ("expert_a", "expert_b", "expert_c")]  # (E, D, H), (E, H), (E, H, D)
        k, w = inputs["k"], inputs["world_size"]
        t, d = x.shape
        e = params[0].shape[0]
        top, idx = (x @ w_gate).topk(k, dim=-1)  # (T, K), (T, K)
        weights = torch.softmax(top, dim=-1)  # (T, K)
        hidden = torch.tanh(torch.einsum("td,edh->eth", x, params[0])
                            + params[1][:, None, :])  # (E, T, H)
        outs = torch.einsum("eth,ehd->etd", hidden, params[2])  # (E, T, D)
        picked = outs[idx, torch.arange(t)[:, None]]  # (T, K, D)
        y = (weights[..., None] * picked).sum(1)  # (T, D)
        (y * inputs["cotangent"]).sum().backward()
        self.y = y.detach()
        self.x_grad, self.w_gate_grad = x.grad, w_gate.grad
        self.expert_grads = [[p.grad[i] for p in params] for i in range(e)]
        self.sizes = [len(s) for s in torch.tensor_split(torch.arange(t), w)]  # T_r per rank
        self.routed = [[tok for tok in range(t) for j in range(k) if int(idx[tok, j]) == ex]
                       for ex in range(e)]
        weights, picked = weights.detach(), picked.detach()

        def mix(wts: Tensor, rows: Tensor) -> Tensor:
            return (wts[..., None] * rows).sum(1)  # (T, D)

        token_rank = torch.arange(w).repeat_interleave(torch.tensor(self.sizes))  # (T,)
        same_rank = (_owner(idx, e, w) == token_rank[:, None]).to(weights.dtype)  # (T, K)
        self.variants = self._variants(mix, weights, picked, idx, same_rank, k, d)
        # The gradient of x when the expert outputs are cut off from autograd (only the
        # router path remains): what a non-differentiable exchange gives.
        x2 = inputs["x"].clone().requires_grad_(True)
        top2, _ = (x2 @ inputs["w_gate"]).topk(k, dim=-1)
        cut = (torch.softmax(top2, dim=-1)[..., None] * picked).sum(1)  # (T, D)
        (cut * inputs["cotangent"]).sum().backward()
        self.x_grad_without_exchange = x2.grad

    def _variants(self, mix: Any, weights: Tensor, picked: Tensor, idx: Tensor,
                  same_rank: Tensor, k: int, d: int) -> list[tuple[Tensor, str]]:
        unsorted, restored_with_order = [], []
        start = 0
        for size in self.sizes:
            rows = picked[start:start + size].reshape(size * k, d)  # (T_r*K, D) in token order
            order = torch.argsort(idx[start:start + size].reshape(-1), stable=True)  # (T_r*K,)
            unsorted.append(rows[order].reshape(size, k, d))  # never put back in order
            restored_with_order.append(rows[order][order].reshape(size, k, d))
            start += size
        return [
            (mix(weights * same_rank, picked),
             "your output holds only the experts that live on each token's own rank: send "
             "every row to the rank that owns its expert (all_to_all) and back"),
            (mix(weights, torch.cat(unsorted)),
             "your output rows are in the order they were sent (sorted by expert): put them "
             "back with the inverse permutation, rows[inverse], before mixing"),
            (mix(weights, torch.cat(restored_with_order)),
             "you put the returned rows back with order (rows[order]): undo a permutation "
             "with its inverse, rows[inverse]"),
            (mix(torch.ones_like(weights), picked), UNWEIGHTED),
        ]


def _layer_judge(inputs: Inputs, outputs: Outputs) -> None:
    w = inputs["world_size"]
    ranks = outputs["ranks"]
    if not isinstance(ranks, list) or len(ranks) != w:
        raise CheckFailure(f"could not read the results of all {w} ranks")
    ref = _Reference(inputs)
    x = inputs["x"]
    d = x.shape[1]
    e = inputs["expert_a"].shape[0]
    per_rank = e // w
    ys = []
    for r, out in enumerate(ranks):
        no_mutation(out, "expert_parallel_forward")
        where = " on rank " + str(r) if w > 1 else ""
        ys.append(expect_tensor(out["result"], f"expert_parallel_forward's output{where}",
                                (ref.sizes[r], d), hint=" (T, D): one row per token of the rank"))
    y = torch.cat(ys)  # (T, D) all ranks' rows in rank order
    records = [ranks[ex // per_rank]["calls"][ex % per_rank] for ex in range(e)]
    try:
        _judge_calls(records, x, ref.routed, w)
    except CheckFailure as failure:
        raise CheckFailure(matching_variant(y, ref.variants) or failure.message) from None
    expect_close(y, ref.y, "your output (all ranks' rows together)", variants=ref.variants)
    _judge_grads(ranks, ref, per_rank)


def _judge_calls(records: list[Any], x: Tensor, routed: list[list[int]], w: int) -> None:
    """Each expert runs at most once, on exactly its rows from every rank; 0 rows is fine."""
    kept = []
    for ex, store in enumerate(records):
        inputs = [v for v in store["inputs"]
                  if not (isinstance(v, Tensor) and v.dim() >= 1 and v.shape[0] == 0)]
        empty = len(store["inputs"]) - len(inputs)
        if not routed[ex] and inputs:
            raise CheckFailure(f"expert {ex} has no rows routed to it, but your "
                               "expert_parallel_forward called it on "
                               f"{describe(inputs[0])}: call each local expert on exactly the "
                               "rows it received (0 rows is fine)")
        kept.append({"count": int(store["count"]) - empty, "inputs": inputs})
    try:
        judge_expert_calls(kept, x, routed, symbol="expert_parallel_forward")
    except CheckFailure as failure:
        misgrouped = "not routed to it" in failure.message or "was not given" in failure.message
        if misgrouped and w > 1:
            raise CheckFailure(failure.message + " (rows arrive from each source rank in turn, "
                               "each source's rows sorted by expert: group them by local "
                               "expert before calling the experts)") from None
        raise


NO_EXCHANGE_GRAD = ("your output is right but gradients do not flow back through the exchange "
                    "(dist.all_to_all_single is not differentiable): send rows with exchange() "
                    "(moe_course.parallel.all_to_all_rows), whose backward is the all-to-all "
                    "with the split sizes swapped")


def _judge_grads(ranks: list[Any], ref: _Reference, per_rank: int) -> None:
    for r, out in enumerate(ranks):
        if out["backward"] != "done":
            why = ("its output does not require grad" if out["backward"] == "no output to "
                   "backprop" else "another rank's output did not require grad")
            raise CheckFailure(f"your output is right but could not be backpropagated on rank "
                               f"{r} ({why}): keep every step a torch operation on x, w_gate "
                               "and the experts' outputs (no .detach(), torch.no_grad() or "
                               "numpy)")
    router = [out["w_gate_grad"] for out in ranks]
    if any(not isinstance(g, Tensor) for g in router):
        raise CheckFailure("the router w_gate gets no gradient: compute the weights with "
                           "torch operations on x @ w_gate (top_k_gating), not detached")
    x_grads = []
    for r, out in enumerate(ranks):
        if not isinstance(out["x_grad"], Tensor):
            raise CheckFailure(NO_EXCHANGE_GRAD)
        x_grads.append(expect_tensor(out["x_grad"], f"the gradient of x on rank {r}",
                                     (ref.sizes[r], ref.x_grad.shape[1])))
    x_grad = torch.cat(x_grads)  # (T, D)
    expect_close(x_grad, ref.x_grad, "the gradient of your layer with respect to x", variants=[
        (ref.x_grad_without_exchange, NO_EXCHANGE_GRAD)])
    total = expect_tensor(sum(router), "the router's gradient (summed over ranks)",
                          tuple(ref.w_gate_grad.shape))
    expect_close(total, ref.w_gate_grad, "the gradient of w_gate (summed over ranks)")
    names = ("a", "b", "c")
    for ex, want in enumerate(ref.expert_grads):
        got = ranks[ex // per_rank]["expert_grads"][ex % per_rank]
        for name, g, expected in zip(names, got, want, strict=True):
            if g is None:
                if not bool(expected.abs().max() > 0):
                    continue  # an idle expert: no gradient is the right gradient
                raise CheckFailure(NO_EXCHANGE_GRAD)
            expect_close(expect_tensor(g, f"expert {ex}'s gradient", tuple(expected.shape)),
                         expected, f"the gradient of expert {ex}'s weight {name}")


def _layer_probe(name: str, seed: int, t: int, d: int, e: int, k: int, w: int,
                 dead: tuple[int, ...] = (), favourite: int | None = None,
                 rules: tuple[str, ...] = ()) -> Probe:
    return Probe(name, lambda: _layer_inputs(seed, t, d, e, k, w, dead, favourite),
                 _layer_run, _layer_judge,
                 rules=(LAYER, DIFFERENTIABLE, NO_MUTATION, *rules))


# ----------------------------------------------------------------------------------------
# Rules the exercises state, each tested by a visible probe and again by a hidden one.

COUNTS = "assignments per destination rank, experts in contiguous blocks of E / W"
IDLE_RANK = "a rank that gets nothing counts 0"
NO_TOKENS = "a rank with no tokens (T = 0)"
DIVISIBLE = "ValueError unless n_experts is a multiple of world_size"
NO_MUTATION = "never changes an argument in place"
PERMUTE = "order sorts the assignments by expert, inverse undoes it, counts = send_counts"
LAYER = "output equals the single-process sparse_moe on the same weights"
DIFFERENTIABLE = "gradients flow back through the exchange to x, w_gate and the experts"
NO_ROWS = "a rank that receives no rows still runs its collectives"

# ----------------------------------------------------------------------------------------
# The registry's tuples

VISIBLE_SEND_COUNTS = (
    _counts_probe("9 tokens, top-2 of 8 experts on 4 ranks", 601, 9, 2, 8, 4),
    _counts_probe("7 tokens, top-2 of 4 experts on 2 ranks", 602, 7, 2, 4, 2),
    _counts_probe("rank 2's experts idle (a zero count)", 607, 6, 2, 6, 3, dead=(4, 5),
                  rules=(IDLE_RANK,)),
    _counts_probe("one rank holds all 3 experts", 608, 4, 2, 3, 1),
    _counts_probe("no tokens, 4 experts on 2 ranks", 609, 0, 2, 4, 2, rules=(NO_TOKENS,)),
    _divisible_probe("6 experts on 4 ranks raises ValueError", 616, [(6, 4), (3, 2)]),
)
HIDDEN_SEND_COUNTS = (
    _counts_probe("10 tokens, top-3 of 6 experts on 3 ranks", 603, 10, 3, 6, 3),
    _counts_probe("rank 3's experts idle (a zero count)", 604, 8, 2, 8, 4, dead=(6, 7),
                  rules=(IDLE_RANK,)),
    _counts_probe("one rank holds every expert", 605, 5, 2, 4, 1),
    _counts_probe("a rank with no tokens", 606, 0, 2, 8, 4, rules=(NO_TOKENS,)),
    _divisible_probe("5 experts on 2 ranks raises ValueError", 617, [(5, 2), (8, 3)]),
)
VISIBLE_PERMUTE = (
    _permute_probe("6 tokens, top-2 of 4 experts on 2 ranks", 611, 6, 2, 4, 2),
    _permute_probe("8 tokens, top-3 of 8 experts on 4 ranks, expert 2 idle", 612, 8, 3, 8, 4,
                   dead=(2,)),
    _permute_probe("6 tokens, top-1 of 6 experts on 3 ranks", 618, 6, 1, 6, 3),
    _permute_probe("no tokens, top-1 of 2 experts on 2 ranks", 619, 0, 1, 2, 2, rules=(NO_TOKENS,)),
)
HIDDEN_PERMUTE = (
    _permute_probe("9 tokens, top-2 of 6 experts on 3 ranks, expert 5 idle", 613, 9, 2, 6, 3,
                   dead=(5,)),
    _permute_probe("5 tokens, top-1 of 4 experts on 4 ranks", 614, 5, 1, 4, 4),
    _permute_probe("a rank with no tokens", 615, 0, 2, 4, 2, rules=(NO_TOKENS,)),
)
VISIBLE_EXPERT_PARALLEL = (
    _layer_probe("one process, no process group", 621, 7, 5, 4, 2, 1),
    _layer_probe("2 ranks, top-2 of 4 experts", 622, 9, 5, 4, 2, 2),
    _layer_probe("2 ranks, 1 token: rank 1 holds no tokens and receives no rows", 626,
                 1, 4, 4, 2, 2, dead=(2, 3), rules=(NO_ROWS, NO_TOKENS)),
)
HIDDEN_EXPERT_PARALLEL = (
    _layer_probe("4 ranks, uneven shards, rank 3 receives no rows", 623, 10, 5, 8, 2, 4,
                 dead=(6, 7), rules=(NO_ROWS,)),
    _layer_probe("4 ranks, rank 3 holds no tokens, top-3", 624, 3, 4, 4, 3, 4,
                 rules=(NO_TOKENS,)),
    _layer_probe("2 ranks, 3 experts each, every token's first choice on rank 1", 625, 8,
                 5, 6, 2, 2, favourite=4),
)
