# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 06 · Expert parallelism: experts on many processes
#
# **Difficulty** ★★★☆ · **Time** about 75 minutes · **Points** 7 (7 autograded)
#
# Sparse routing lets a model hold far more parameters than it spends on a token, and the
# largest mixtures take that to its end: GShard (Lepikhin et al. 2020, arXiv 2006.16668)
# trained a 600-billion-parameter translation model with 2048 experts per layer, Switch
# Transformer (Fedus et al. 2021, arXiv 2101.03961) a 1.6-trillion-parameter one. No single
# device holds that. Both papers answer the same way: put **different experts on different
# devices**. Every device (a *rank*) keeps its own batch of tokens and a copy of the router,
# but only a block of the experts. A token whose expert lives elsewhere travels to that rank,
# is processed there, and travels back. Since every rank sends some rows to every other rank,
# the exchange is an **all-to-all**, and a layer does two of them: *dispatch* and *combine*
# (GShard Sec. 2-3; Switch Sec. 5 and Fig. 9).
#
# This notebook runs that for real, with the engine real systems use: `torch.distributed`,
# here with the gloo backend on a few CPU processes of your laptop. The same code runs with
# the NCCL backend on GPUs.
#
# **You will implement**
#
# | exercise | what | points |
# |---|---|---|
# | `send_counts` | how many rows this rank sends to each rank | 2 |
# | `permute_for_all_to_all` | the send order that makes each rank's rows contiguous, and its inverse | 2 |
# | `expert_parallel_forward` | the whole layer across processes: route, exchange, compute, exchange back, combine | 3 |
#
# **Shapes.** As before `T` tokens, `D` model width, `E` experts, `K` experts per token; new
# here, `W` is the *world size* (the number of processes, or ranks), so each rank holds
# `E / W` experts and its own `T` tokens. Routing is a pair of `(T, K)` tensors; the `T * K`
# (token, choice) pairs are *assignments*, and each one becomes a row that is sent somewhere.
#
# Run each check cell after your answer: it prints one line when you are right and tells
# you what is probably wrong when you are not.

# %%
import importlib
import time

import matplotlib.pyplot as plt
import torch

from moe_course import sparse_moe, top_k_gating
from moe_course.grading import check
from moe_course.parallel import (
    RankPermutation,
    communication_volume,
    launch,
    local_expert_range,
)
from moe_course.parallel_workers import EPCase, make_case
from moe_course.train import fast_mode

torch.manual_seed(0)
QUICK = fast_mode()  # True while a grader runs the notebook: the multi-process demo is skipped

# %% [markdown]
# ## 1 · Where the experts live, and who sends what
#
# We place experts in **contiguous blocks**: with `E` experts on `W` ranks, rank `r` holds
# experts $r \cdot E/W, \dots, (r+1) \cdot E/W - 1$, so expert `e` lives on
#
# $$\operatorname{rank}(e) = \left\lfloor \frac{e}{E / W} \right\rfloor .$$
#
# Each rank routes its own tokens with its copy of the router, exactly as in notebook 02, and
# then has to send every assignment to the rank that holds its expert. Before any rows move,
# it needs to know how many go where: the number of its assignments whose expert lives on
# rank `r`,
#
# $$c_r = \bigl|\{(t, j) : \operatorname{rank}(\text{indices}_{t,j}) = r\}\bigr| .$$
#
# A token routed to two experts on the same rank is sent there twice, once per assignment
# (each copy goes through a different expert). The counts add up to `T * K`.

# %%
for rank in range(4):
    experts_here = list(local_expert_range(rank, n_experts=8, world_size=4))
    print(f"rank {rank} of 4 holds experts {experts_here}")

# %% [markdown]
# **Exercise 1 (2 points).** Write `send_counts(indices, n_experts, world_size)`: `indices` is
# this rank's `(T, K)` routing (global expert ids in `[0, E)`); return a `(W,)` integer
# tensor whose entry `r` is the number of assignments that go to rank `r`. Raise a
# `ValueError` if `n_experts` is not a multiple of `world_size`.
#
# <details><summary>Hint 1: the idea</summary>
#
# The experts sit on the ranks in contiguous blocks of `E / W`, so expert `e` lives on
# rank `e // (E / W)`. Count every assignment (a token routed to two experts of one rank
# sends that rank two rows), one count per rank, and 0 for a rank that gets nothing. If
# `E` is not a multiple of `W` the blocks cannot be equal: raise a `ValueError`.
# </details>
#
# <details><summary>Hint 2: the shape of the code</summary>
#
# ```python
# if n_experts % world_size:
#     raise ValueError(...)
# owner = indices // ...      # (T, K): the rank of each assignment's expert
# ```
# `torch.bincount(..., minlength=world_size)` on the flattened owners counts, zeros
# included.
# </details>

# %% nbgrader={"grade": false, "grade_id": "ex06_send_counts", "locked": false, "schema_version": 3, "solution": true}
def send_counts(indices, n_experts, world_size):
    """(T, K) expert ids -> (W,) int64: how many of this rank's assignments go to each rank."""
    ### BEGIN SOLUTION
    if n_experts % world_size:
        raise ValueError(f"n_experts must be a multiple of world_size; got n_experts = "
                         f"{n_experts}, world_size = {world_size}")
    owner = indices // (n_experts // world_size)  # (T, K): the rank that holds each expert
    return torch.bincount(owner.reshape(-1), minlength=world_size)  # (W,)
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ex06_send_counts_tests", "locked": true, "points": 2, "schema_version": 3, "solution": false}
check("ex06_send_counts", send_counts)
### BEGIN HIDDEN TESTS
check("ex06_send_counts", send_counts, hidden=True)
### END HIDDEN TESTS

# %% [markdown]
# **By hand.** Three tokens, four experts on two ranks (experts 0, 1 on rank 0; 2, 3 on
# rank 1), top-2. Token 0 goes to experts 0 and 3, one row to each rank; token 1 to experts
# 1 and 0, two rows to rank 0; token 2 to experts 3 and 2, two rows to rank 1. So rank 0
# receives 3 rows and rank 1 receives 3. With four ranks (one expert each) the same routing
# sends `2, 1, 1, 2`.

# %%
indices_demo = torch.tensor([[0, 3], [1, 0], [3, 2]])  # (T, K) = (3, 2), E = 4
print("destination rank of each assignment, W = 2:\n", (indices_demo // 2).numpy())
print("send_counts, W = 2:", send_counts(indices_demo, 4, 2).tolist())
print("send_counts, W = 4:", send_counts(indices_demo, 4, 4).tolist())

# %% [markdown]
# **Who sends what to whom.** Stack every rank's counts and you get a `W x W` matrix: row
# `s` is what rank `s` sends, column `r` what rank `r` receives. Below, four ranks hold 64
# tokens each and eight experts (two per rank); every rank routes its tokens with the same
# router. On the left the router is a fresh random one: every rank sends to every rank, and
# the diagonal (rows that stay on their own rank, a copy rather than a message) is only
# about a quarter of the traffic. Even this router is not even: one rank receives twice as
# many rows as another. On the right the router leans towards expert 5, and rank 2, which
# holds it, receives far more than the others. An all-to-all finishes when its busiest rank
# does, and that rank must also compute all those rows, so an unbalanced router is a
# *systems* problem as much as a modelling one (notebook 03's auxiliary loss and capacity
# factor address both).

# %%
W_demo, E_demo, T_per_rank, D_demo = 4, 8, 64, 16
g = torch.Generator().manual_seed(1)
x_ranks = torch.randn(W_demo, T_per_rank, D_demo, generator=g)  # (W, T, D): each rank's tokens
w_router = torch.randn(D_demo, E_demo, generator=g) / D_demo**0.5  # (D, E), replicated
lean = torch.zeros(E_demo).index_fill(0, torch.tensor([5]), 1.5)  # (E,) a bias towards expert 5

matrices = {}
for label, bias in (("a random router", torch.zeros(E_demo)),
                    ("a router leaning to expert 5", lean)):
    rows = [send_counts(top_k_gating(x_ranks[s] @ w_router + bias, 2).indices, E_demo, W_demo)
            for s in range(W_demo)]
    matrices[label] = torch.stack(rows)  # (W, W): rank s sends rank r

fig, axes = plt.subplots(1, 2, figsize=(10, 4))
for ax, (label, m) in zip(axes, matrices.items()):
    image = ax.imshow(m, cmap="Blues", vmin=0, vmax=int(max(mm.max() for mm in matrices.values())))
    for s in range(W_demo):
        for r in range(W_demo):
            ax.text(r, s, int(m[s, r]), ha="center", va="center",
                    color="white" if m[s, r] > 0.6 * m.max() else "black")
    ax.set(xticks=range(W_demo), yticks=range(W_demo), xlabel="receiving rank r",
           ylabel="sending rank s", title=f"rows sent, {label}")
fig.colorbar(image, ax=axes, label="rows (assignments)")
plt.show()
for label, m in matrices.items():
    print(f"{label}: every row sums to T * K = {T_per_rank * 2}; {int(m.diagonal().sum())} of "
          f"{int(m.sum())} rows stay on their rank; received per rank {m.sum(0).tolist()}")

# %% [markdown]
# ## 2 · The send buffer: one permutation
#
# `torch.distributed.all_to_all_single(output, input, output_split_sizes, input_split_sizes)`
# takes one tensor of rows from each rank and splits it by position: its first
# `input_split_sizes[0]` rows go to rank 0, the next `input_split_sizes[1]` to rank 1, and so
# on; what arrives is stacked in rank order, `output_split_sizes[s]` rows from each rank `s`.
# So before sending, a rank must **reorder its rows so that each destination's rows are
# contiguous**, in rank order, with `input_split_sizes = send_counts(...)`.
#
# Number the assignments row by row, `a = t * K + j` (that is `indices.reshape(-1)`). Sorting
# them by expert id does the job, because experts sit in contiguous blocks: rank 0's experts
# come first, then rank 1's, and within a rank the rows are grouped by expert, so the
# receiver finds each expert's rows in one piece. The sorting permutation `order` says which
# assignment each send row carries: send row `i` is the token `x[order[i] // K]`. After the
# round trip the processed rows come back in the same send order, and the **inverse**
# permutation puts them back: `inverse[a]` is the send row of assignment `a`, so
# `rows[inverse]` is in assignment order again. A permutation and its inverse satisfy
# `order[inverse] = inverse[order] = arange(T * K)`.
#
# **Exercise 2 (2 points).** Write `permute_for_all_to_all(indices, n_experts, world_size)`
# returning the triple `(order, inverse, counts)` (a `RankPermutation`, or a plain tuple):
# `order` and `inverse` are `(T * K,)` integer tensors as above, with the experts
# `indices.reshape(-1)[order]` in ascending order, and `counts` is the `(W,)` output of your
# `send_counts`. Assignments of the same expert may come in any order among themselves (a
# stable sort keeps their original order, which is easiest to read).
#
# <details><summary>Hint 1: the idea</summary>
#
# Number the assignments row by row, `indices.reshape(-1)`, so that assignment `a` is
# token `a // K`, choice `a % K`. Sorting them by expert id also sorts them by destination
# rank (the blocks are contiguous), so a stable sort gives `order`. The inverse permutation
# puts them back: `inverse[order[i]] = i`. The counts are your `send_counts`.
# </details>
#
# <details><summary>Hint 2: the shape of the code</summary>
#
# ```python
# flat = indices.reshape(-1)                   # (T*K,)
# order = torch.argsort(flat, stable=...)      # (T*K,)
# inverse = ...                                # argsort the order, or scatter arange into it
# ```
# </details>

# %% nbgrader={"grade": false, "grade_id": "ex06_permute_for_all_to_all", "locked": false, "schema_version": 3, "solution": true}
def permute_for_all_to_all(indices, n_experts, world_size):
    """(T, K) expert ids -> (order (T*K,), inverse (T*K,), counts (W,)) for all_to_all_single."""
    ### BEGIN SOLUTION
    flat = indices.reshape(-1)  # (T*K,): assignment a = t * K + j
    order = torch.argsort(flat, stable=True)  # (T*K,) by expert, hence by destination rank
    inverse = torch.argsort(order)  # (T*K,): inverse[order[i]] = i
    counts = send_counts(indices, n_experts, world_size)  # (W,) the input split sizes
    return RankPermutation(order, inverse, counts)
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ex06_permute_for_all_to_all_tests", "locked": true, "points": 2, "schema_version": 3, "solution": false}
check("ex06_permute_for_all_to_all", permute_for_all_to_all)
### BEGIN HIDDEN TESTS
check("ex06_permute_for_all_to_all", permute_for_all_to_all, hidden=True)
### END HIDDEN TESTS

# %% [markdown]
# **The same three tokens.** With `W = 2` the send buffer carries assignments
# `0, 3, 2 | 5, 1, 4`: experts 0, 0, 1 for rank 0, then 2, 3, 3 for rank 1. The figure draws
# each assignment (top, in token order) to its send row (bottom), coloured by destination:
# the colours come out contiguous, which is all `all_to_all_single` needs.

# %%
plan = permute_for_all_to_all(indices_demo, 4, 2)
flat_demo = indices_demo.reshape(-1)  # (T*K,)
print("assignments (token, expert):", [(a // 2, int(e)) for a, e in enumerate(flat_demo)])
print("order   =", plan.order.tolist(), "-> experts", flat_demo[plan.order].tolist())
print("inverse =", plan.inverse.tolist(), "  counts =", plan.counts.tolist())
rows_demo = torch.arange(6.0)[:, None] * 10  # (T*K, 1) some rows to shuffle
round_trip = rows_demo[plan.order][plan.inverse]  # send order, then back
print("rows[order][inverse] == rows:", bool(torch.equal(round_trip, rows_demo)))

colors = plt.get_cmap("tab10")
fig, ax = plt.subplots(figsize=(8, 2.6))
for a, e in enumerate(flat_demo.tolist()):
    ax.plot([a, int(plan.inverse[a])], [1, 0], color=colors(e // 2), lw=1.5, alpha=0.6)
    ax.text(a, 1.08, f"t{a // 2}\ne{e}", ha="center", va="bottom", fontsize=9,
            color=colors(e // 2))
for i, a in enumerate(plan.order.tolist()):
    ax.text(i, -0.08, f"e{int(flat_demo[a])}", ha="center", va="top", fontsize=9,
            color=colors(int(flat_demo[a]) // 2))
ax.scatter(range(6), [1] * 6, c=[colors(e // 2) for e in flat_demo.tolist()], s=60, zorder=3)
ax.scatter(range(6), [0] * 6, c=[colors(int(flat_demo[a]) // 2) for a in plan.order.tolist()],
           s=60, zorder=3)
ax.set(xlim=(-0.6, 5.6), ylim=(-0.6, 1.6), yticks=[0, 1],
       yticklabels=["send row i\n(order)", "assignment a\n(token order)"], xticks=range(6))
ax.set_title("blue: rows for rank 0, orange: rows for rank 1; counts = "
             f"{plan.counts.tolist()}", fontsize=10)
for side in ("top", "right"):
    ax.spines[side].set_visible(False)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 3 · The layer across processes
#
# Now the whole layer. Every rank runs the same function on its own tokens, and the ranks
# meet in the collectives:
#
# 1. **route**: `weights, indices = top_k_gating(x @ w_gate, k)` with the replicated router;
# 2. **count**: `permute_for_all_to_all` gives the send order and the split sizes. The
#    receiver must know how many rows it will get from each rank, and in what expert
#    order, before the rows arrive, so the ranks first exchange their **per-expert** counts:
#    rank `s` sends rank `r` the counts of `r`'s `E / W` experts (a tiny all-to-all);
# 3. **dispatch**: `x[order // K]`, sent with the counts as split sizes;
# 4. **compute**: the received rows arrive from rank 0, then rank 1, ..., each source's rows
#    sorted by expert. Group them by local expert, call each local expert **once** on all of
#    its rows, and put the outputs back in arrival order;
# 5. **combine**: send the outputs back with the mirror-image all-to-all (split sizes
#    swapped);
# 6. **restore and mix**: `rows[inverse]` is in assignment order, `(T, K, D)`; weight and
#    sum over `K` (Shazeer et al. 2017, arXiv 1701.06538, eq. 1).
#
# The result on each rank equals, row for row, `sparse_moe(x, all_experts, weights, indices)`
# computed on one process.
#
# **Gradients.** `dist.all_to_all_single` writes into a tensor you pass, outside autograd.
# The backward of an all-to-all is simple, though: the gradients of the rows travel back
# the same way, with the split sizes swapped. `moe_course.parallel.all_to_all_rows` is that
# differentiable exchange; the `exchange` helper below wraps it.
#
# **The rule of collectives.** Every rank must call every collective, in the same order, or
# the others wait forever. That holds in the backward pass too: each exchange in the forward
# has a mirror exchange in the backward, which runs only if the exchange's output was used.
# A rank that receives **no rows** must therefore still call its experts, on 0 rows, so that
# its received rows stay connected to its output.
#
# **How the checks run it.** Besides one plain call (`W = 1`), the checks run your function
# on 2 and 4 ranks that are threads of this kernel, joined by torch's in-process "threaded"
# process group (the one torch's own distributed tests use): every `torch.distributed` call
# behaves as on a real group, no process starts, and a rank left waiting for another is
# reported by number instead of hanging. Section 4 then runs your layer on real processes.
#
# **Worker processes cannot see this notebook.** `launch(fn, world_size, *args)` starts
# `world_size` fresh processes, joins them into a gloo process group, and runs
# `fn(rank, world_size, *args)` in each. Each process imports `fn` *by name*, so `fn` must
# live in a module, a `.py` file, not in a notebook cell. That is why the answer cell below
# starts with `%%writefile ep_layer.py`: running it writes the file (it does not define the
# function here), and the cell after it imports the function from the file. After every
# change, run both cells. The module imports `moe_course`'s `send_counts` and
# `permute_for_all_to_all`, which behave like yours (the workers cannot see yours either).
#
# **Exercise 3 (3 points).** Complete `expert_parallel_forward(x, w_gate, local_experts, k,
# group=None)` in the cell below. `x` is this rank's `(T, D)` tokens (`T` may differ between
# ranks, and may be 0), `w_gate` the `(D, E)` router, the same on every rank,
# `local_experts` this rank's `E / W` experts (global ids `local_expert_range(rank, E, W)`),
# and `group` the process group (`None`: the default one). Return this rank's `(T, D)`
# output. With no process group at all (here in the notebook) it must run on one process,
# `W = 1`: the `world` and `exchange` helpers take care of that.
#
# <details><summary>Hint 1: the idea</summary>
#
# Two exchanges carry rows (the dispatch and, with the split-size lists swapped, the
# combine) and one tiny exchange carries counts before them. The counts exchange tells each
# rank `r`, for every source rank `s` and local expert `j`, how many rows will come:
# `recv_counts[s, j]`. The dispatch sends `plan.counts` rows to each rank and receives
# `recv_counts.sum(1)` from each. The received rows come from rank 0, then rank 1, ...,
# each source's rows sorted by expert: group them by local expert, call each local expert
# once (on 0 rows too, so that every rank takes part in the backward exchanges), put the
# outputs back in arrival order, send them home, then `rows[plan.inverse]` is in assignment
# order `(T, K, D)`: weight and sum over `K`.
# </details>
#
# <details><summary>Hint 2: the shape of the code (steps 2 and 4)</summary>
#
# ```python
# per_expert = torch.bincount(indices.reshape(-1), minlength=n_experts)  # (E,)
# recv_counts = exchange(per_expert.reshape(world_size, n_local), ..., ..., group)  # (W, E/W)
# received = exchange(x[plan.order // k], ..., ..., group)  # which split list is which?
# local_id = ...         # local expert of each received row, in arrival order
# by_expert = torch.argsort(local_id, stable=True)
# pieces = torch.split(received[by_expert], ...)            # one piece per local expert
# ```
# `torch.arange(n_local).repeat(world_size)` lists the `(source, expert)` blocks in arrival
# order; `repeat_interleave` with the counts expands it to one id per row.
# </details>

# %% nbgrader={"grade": false, "grade_id": "ex06_expert_parallel_forward", "locked": false, "schema_version": 3, "solution": true}
# %%writefile ep_layer.py
"""Your expert-parallel layer, in a module so that worker processes can import it."""
import torch
import torch.distributed as dist

from moe_course import top_k_gating
from moe_course.parallel import all_to_all_rows, permute_for_all_to_all, send_counts


def world(group=None):
    """(rank, world_size) of `group`; (0, 1) when no process group is initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def exchange(rows, output_split_sizes, input_split_sizes, group=None):
    """Differentiable all-to-all of rows: the first input_split_sizes[0] rows go to rank 0,
    and so on; returns output_split_sizes[s] rows from each rank s, in rank order. With no
    process group (one process) the rows come back unchanged."""
    if not (dist.is_available() and dist.is_initialized()):
        return rows
    return all_to_all_rows(rows, output_split_sizes, input_split_sizes, group)


def expert_parallel_forward(x, w_gate, local_experts, k, group=None):
    """This rank's (T, D) tokens -> (T, D): a top-k MoE layer whose E = len(local_experts) * W
    experts are spread over the W ranks of `group`, rank r holding experts
    r * E/W ... (r + 1) * E/W - 1. Steps: route, count and exchange counts, dispatch,
    compute each local expert once, combine, restore the order and mix."""
    ### BEGIN SOLUTION
    rank, world_size = world(group)
    n_local = len(local_experts)
    n_experts = n_local * world_size
    n_tokens, d = x.shape

    # 1. route, 2. count
    weights, indices = top_k_gating(x @ w_gate, k)  # (T, K), (T, K)
    plan = permute_for_all_to_all(indices, n_experts, world_size)  # (T*K,), (T*K,), (W,)
    per_expert = torch.bincount(indices.reshape(-1), minlength=n_experts)  # (E,)
    ones = [1] * world_size
    recv_counts = exchange(per_expert.reshape(world_size, n_local), ones, ones, group)  # (W, E/W)
    send_split, recv_split = plan.counts.tolist(), recv_counts.sum(1).tolist()

    # 3. dispatch
    received = exchange(x[plan.order // k], recv_split, send_split, group)  # (N, D)

    # 4. compute: group the received rows by local expert, each expert once (even on 0 rows)
    local_id = torch.arange(n_local).repeat(world_size)  # (W * E/W,)
    local_id = local_id.repeat_interleave(recv_counts.reshape(-1))  # (N,)
    by_expert = torch.argsort(local_id, stable=True)  # (N,)
    pieces = torch.split(received[by_expert], recv_counts.sum(0).tolist())  # E/W x (n_j, D)
    out = torch.cat([expert(rows) for expert, rows in zip(local_experts, pieces)])  # (N, D)
    out = torch.empty_like(out).index_copy(0, by_expert, out)  # (N, D) in arrival order

    # 5. combine, 6. restore and mix (Shazeer et al. eq. 1)
    back = exchange(out, send_split, recv_split, group)  # (T*K, D) in send order
    per_assignment = back[plan.inverse].reshape(n_tokens, k, d)  # (T, K, D)
    return (weights[..., None] * per_assignment).sum(1)  # (T, D)
    ### END SOLUTION

# %%
import ep_layer

importlib.reload(ep_layer)  # pick up the file the cell above just wrote
from ep_layer import expert_parallel_forward

# %% nbgrader={"grade": true, "grade_id": "ex06_expert_parallel_forward_tests", "locked": true, "points": 3, "schema_version": 3, "solution": false}
check("ex06_expert_parallel_forward", expert_parallel_forward)
### BEGIN HIDDEN TESTS
check("ex06_expert_parallel_forward", expert_parallel_forward, hidden=True)
### END HIDDEN TESTS

# %% [markdown]
# **On one process** (no process group, `W = 1`) every expert is local and the exchanges
# return their rows unchanged: your layer must agree with `sparse_moe` after `top_k_gating`.
# The check above has also run it on 2 and 4 simulated ranks.

# %%
torch.manual_seed(2)
case_one = make_case(EPCase(seed=2, n_tokens=12, d_model=8, d_hidden=16, n_experts=4, k=2))
layer_one, x_one = case_one.layer, case_one.x  # a MoEFeedForward and (T, D) tokens
with torch.no_grad():
    y_one = expert_parallel_forward(x_one, layer_one.gate.weight.t(), layer_one.experts, 2)
    y_sparse = sparse_moe(x_one, layer_one.experts, *top_k_gating(layer_one.gate(x_one), 2))
gap_one = (y_one - y_sparse).abs().max()
print(f"one process: max |expert_parallel_forward - sparse_moe| = {gap_one:.1e}")

# %% [markdown]
# ## 4 · A real run on 2 and 4 processes
#
# To run your layer on several processes we need a worker function, and it too must live in
# a module. The worker below builds **the same** `MoEFeedForward` layer, tokens and loss
# target on every rank from one seed (`make_case`), keeps its own shard of the tokens
# (`torch.tensor_split(x, W)[rank]`) and its own block of experts, runs your
# `expert_parallel_forward` forward and backward, and returns its outputs and gradients. It
# also counts the rows each of its experts computed. Back in the notebook we stitch the
# ranks' pieces together and compare with the single-process layer: outputs and input
# gradients concatenate, the router's gradient is the **sum** over ranks (each rank holds a
# replica and sees only its own tokens; data parallelism all-reduces such gradients), and
# each expert's gradient comes, whole, from the rank that owns it.

# %%
# %%writefile ep_demo.py
"""The worker `launch` runs on every rank: your layer on this rank's share of the tokens."""
import torch

from ep_layer import expert_parallel_forward
from moe_course.parallel import local_expert_range
from moe_course.parallel_workers import make_case, shard


def count_rows(store, e):
    """A forward hook adding the rows expert e computes to store[e]."""
    def hook(module, args, out):
        store[e] = store.get(e, 0) + out.shape[0]
    return hook


def run_shard(rank, world_size, case):
    """Forward and backward of this rank's shard of `case`; outputs and gradients."""
    data = make_case(case)  # the same layer, tokens and target on every rank: one seed
    mine = local_expert_range(rank, case.n_experts, world_size)  # this rank's expert ids
    computed = {}
    for e in mine:
        data.layer.experts[e].register_forward_hook(count_rows(computed, e))
    x = shard(data.x, rank, world_size).clone().requires_grad_(True)  # (T_r, D)
    experts = [data.layer.experts[e] for e in mine]
    y = expert_parallel_forward(x, data.layer.gate.weight.t(), experts, case.k)  # (T_r, D)
    (y * shard(data.target, rank, world_size)).sum().backward()
    expert_grads = {f"experts.{e}.{name}": torch.zeros_like(p) if p.grad is None else p.grad
                    for e in mine for name, p in data.layer.experts[e].named_parameters()}
    return {"y": y, "x_grad": x.grad, "gate_grad": data.layer.gate.weight.grad,
            "expert_grads": expert_grads, "rows": [computed.get(e, 0) for e in mine]}

# %%
import ep_demo

importlib.reload(ep_demo)
from ep_demo import run_shard

case = EPCase(seed=0, n_tokens=48, d_model=16, d_hidden=32, n_experts=8, k=2)
data = make_case(case)  # the single-process reference: all tokens, all experts
x_ref = data.x.clone().requires_grad_(True)
y_ref = data.layer(x_ref).y  # (T, D)
(y_ref * data.target).sum().backward()
expert_ref = {name: torch.zeros_like(p) if p.grad is None else p.grad
              for name, p in data.layer.named_parameters() if name.startswith("experts.")}

runs = {}
if QUICK:
    print("Grading run: the 2- and 4-process demo is skipped (the check above already ran your "
          "layer on 2 and 4 ranks).")
else:
    for world_size in (2, 4):
        start = time.perf_counter()
        results = launch(run_shard, world_size, case, timeout=60)
        seconds = time.perf_counter() - start
        runs[world_size] = results
        gathered = {name: g for r in results for name, g in r["expert_grads"].items()}
        diffs = {
            "output": (torch.cat([r["y"] for r in results]) - y_ref).abs().max(),
            "x grad": (torch.cat([r["x_grad"] for r in results]) - x_ref.grad).abs().max(),
            "router grad": (sum(r["gate_grad"] for r in results)
                            - data.layer.gate.weight.grad).abs().max(),
            "expert grads": max((gathered[n] - g).abs().max() for n, g in expert_ref.items()),
        }
        assert gathered.keys() == expert_ref.keys()
        assert all(d < 1e-5 for d in diffs.values()), diffs
        print(f"W = {world_size}: launch took {seconds:.1f} s; max |difference| from one process: "
              + ", ".join(f"{name} {d:.1e}" for name, d in diffs.items()))

# %% [markdown]
# Same numbers, to float rounding, whether the layer runs on one process or is split over
# two or four. The figure shows how the work was split: each rank holds `T / W` tokens and
# sends `T K / W` rows, but computes whatever its experts were sent, which depends on the
# router.

# %%
if runs:
    fig, axes = plt.subplots(1, len(runs), figsize=(10, 3.2), sharey=True)
    for ax, (world_size, results) in zip(axes, runs.items()):
        sent = [r["y"].shape[0] * case.k for r in results]
        computed = [sum(r["rows"]) for r in results]
        ranks = torch.arange(world_size)
        ax.bar(ranks - 0.2, sent, width=0.4, color="0.7", label="rows it sends (T_r K)")
        ax.bar(ranks + 0.2, computed, width=0.4, color="tab:blue", label="rows its experts compute")
        ax.set(xticks=ranks.tolist(), xlabel="rank", title=f"W = {world_size}, "
               f"{case.n_experts // world_size} experts per rank")
    axes[0].set(ylabel="rows", ylim=(0, 1.35 * max(r["y"].shape[0] * case.k for r in runs[2])))
    axes[0].legend(fontsize=8, loc="upper left", ncol=2)
    plt.tight_layout()
    plt.show()

# %% [markdown]
# ## 5 · What the exchange costs
#
# Every MoE layer moves rows twice in the forward pass (dispatch and combine) and twice more
# in the backward, each row `D` numbers. The **dropless** exchange you wrote sends exactly the
# `T K` assignments of a rank, of which those whose expert lives elsewhere cross a link:
# about $(W-1)/W$ of them for a balanced router.
#
# GShard and Switch exchange **fixed-size buffers** instead (GShard Sec. 2.2; Switch
# Sec. 2.2): every rank sends every expert exactly `C = ceil(K T capacity_factor / E)` rows,
# padding when fewer are routed there and dropping the assignments beyond `C` (notebook
# 03's `apply_capacity`). Fixed shapes suit compilers and keep memory predictable (the TPU
# setting of both papers), at a price: the buffer grows linearly with the capacity factor,
# while the rows that carry a kept assignment saturate at the dropless count.
# `communication_volume(indices, E, W, d_model, capacity_factor)` counts both, rank by rank.
#
# Left: rows one rank sends per layer forward (one exchange), against the capacity factor,
# for four ranks with 256 tokens each and a mildly unbalanced router. Right: the dropless
# exchange as the world grows, with 256 tokens per rank and 16 experts: the share of rows
# that leave their rank approaches 1, so the per-rank traffic approaches `T K D` numbers per
# exchange however many ranks share the work, and the total over all links grows with `W`.

# %%
T_rank, K_cost, D_cost, E_cost = 256, 2, 512, 16
g = torch.Generator().manual_seed(3)
skew = torch.linspace(0.0, 1.0, E_cost)  # (E,) a mild preference for the higher experts


def routing(n_tokens):
    """(n_tokens, K) top-k experts of a random router with the mild skew above."""
    logits = torch.randn(n_tokens, E_cost, generator=g) + skew  # (T, E)
    return logits.topk(K_cost, dim=-1).indices  # (T, K)


W_cost = 4
indices_cost = routing(T_rank * W_cost)  # (T, K): all ranks' tokens, rank s holds the s-th piece
factors = [0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0]
sent, useful = [], []
for cf in factors:
    v = communication_volume(indices_cost, E_cost, W_cost, D_cost, capacity_factor=cf)
    sent.append(float(v.rows.sum(1).float().mean()))  # rows one rank sends, padding included
    useful.append(float(v.useful.sum(1).float().mean()))  # of those, rows with an assignment
dropless = communication_volume(indices_cost, E_cost, W_cost, D_cost)

worlds = [1, 2, 4, 8, 16]
off_rank, total_mb = [], []
for w in worlds:
    v = communication_volume(routing(T_rank * w), E_cost, w, D_cost)
    leaving = v.rows.sum() - v.rows.diagonal().sum()  # rows that cross a link
    off_rank.append(float(leaving) / w)
    total_mb.append(float(v.bytes.sum() - v.bytes.diagonal().sum()) / 1e6)

fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
axes[0].plot(factors, sent, "o-", label="fixed capacity: rows sent (with padding)")
axes[0].plot(factors, useful, "s-", label="fixed capacity: rows with a kept assignment")
axes[0].axhline(float(dropless.rows.sum(1).float().mean()), color="tab:green", ls="--",
                label="dropless: rows sent (= T K)")
axes[0].set(xlabel="capacity factor", ylabel="rows one rank sends",
            title=f"W = {W_cost}, {T_rank} tokens per rank, E = {E_cost}, K = {K_cost}")
axes[0].legend(fontsize=8)
axes[1].plot(worlds, off_rank, "o-", label="rows leaving one rank (measured)")
axes[1].plot(worlds, [T_rank * K_cost * (w - 1) / w for w in worlds], "k:",
             label="T K (W - 1) / W")
axes[1].set(xscale="log", xticks=worlds, xticklabels=worlds, xlabel="world size W",
            ylabel="rows per rank per exchange", title="dropless, 256 tokens per rank")
right = axes[1].twinx()
right.plot(worlds, total_mb, "^--", color="tab:red", label="all links, MB (float32)")
right.set_ylabel("MB over all links", color="tab:red")
axes[1].legend(fontsize=8, loc="upper left")
plt.tight_layout()
plt.show()
for cf, s, u in zip(factors, sent, useful):
    if cf in (0.5, 1.0, 2.0):
        print(f"capacity factor {cf}: {s:.0f} rows sent per rank, {u:.0f} carry an assignment, "
              f"{T_rank * K_cost - u:.0f} of {T_rank * K_cost} assignments dropped")
print(f"W = 16: {off_rank[-1]:.0f} of {T_rank * K_cost} rows leave each rank, "
      f"{total_mb[-1]:.1f} MB cross links per exchange (D = {D_cost}, float32)")

# %% [markdown]
# ## 6 · On GPUs and across machines
#
# Nothing in your function is specific to CPUs. On GPUs each process calls
# `torch.cuda.set_device(local_rank)`, joins the group with `init_process_group("nccl")`
# instead of gloo, and keeps its tensors and experts on its GPU; `all_to_all_single` and your
# code are unchanged. Processes are started by `torchrun --nproc-per-node 8 train.py` (one
# per GPU), which sets `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR` and `MASTER_PORT`;
# `launch` is a miniature of that for one machine. Two things do change:
#
# - **Synchronisation.** The split sizes must be on the host (`.tolist()`), so each layer
#   waits for its counts exchange before the rows can move. Real systems hide that wait by
#   overlapping it with other work, or avoid it with fixed capacity buffers, whose sizes are
#   known in advance (the reason GShard and Switch use them on TPUs).
# - **The network.** Inside one machine GPUs talk over NVLink; between machines over
#   InfiniBand, several times slower (DeepSeek-V3, arXiv 2412.19437, Sec. 3.2.2, quotes
#   160 GB/s against 50 GB/s). An all-to-all over many machines runs at the speed of the
#   slowest links and the busiest rank. So systems keep an expert-parallel group inside one
#   machine where they can, combine expert parallelism with data parallelism for everything
#   else (Switch Sec. 5, Fig. 9: the router and attention are replicated, and their
#   gradients are all-reduced, as the router's gradient was summed above), limit how many
#   machines one token may be sent to (DeepSeek-V3's node-limited routing, Sec. 2.1.2: at
#   most 4 in their setup), and overlap the exchanges with computation. Dropless systems such as
#   MegaBlocks (Gale et al. 2022, arXiv 2211.15841) exchange exactly the routed rows, with
#   variable split sizes, as you did here.
#
# ## Summary
#
# - Expert parallelism places blocks of `E / W` experts on `W` ranks; each rank keeps its own
#   tokens and a replica of the router, and the tokens travel to their experts and back with
#   two all-to-all exchanges per layer (GShard, Switch).
# - `send_counts` says how many rows go to each rank; stacked over ranks it is the `W x W`
#   traffic matrix, whose column sums show which rank is the hot spot.
# - A stable sort by expert id lays the rows out as `all_to_all_single` needs them
#   (contiguous per destination, grouped by expert), and its inverse permutation restores
#   the token order afterwards.
# - The layer exchanges per-expert counts first, then rows; the backward of an all-to-all
#   is the all-to-all with split sizes swapped; every rank calls every collective, even
#   with nothing to send. Split over 2 or 4 processes, it equals the single-process layer
#   in outputs and gradients.
# - Dropless exchanges send exactly the routed rows; fixed-capacity buffers grow linearly
#   with the capacity factor and drop overflow. With more ranks, almost every row leaves
#   its rank, and the network becomes the bottleneck.
#
# Notebook 07 looks at the designs that followed: shared experts, bias-based balancing,
# Soft MoE and grouped (dropless) computation.
