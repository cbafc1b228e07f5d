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
# # 07 · Modern mixtures: shared experts, loss-free balancing, Soft MoE, grouped dispatch
#
# **Difficulty** ★★★☆ · **Time** about 75 minutes · **Points** 10 (all autograded)
#
# Notebooks 02 to 05 built the recipe of GShard, Switch Transformer and Mixtral: a top-k
# router, an auxiliary loss to keep the experts busy, a capacity to bound each expert's
# buffer, and a loop over experts to run them. The models that came after kept the idea and
# changed each of these parts. This notebook takes four of the changes, one section each:
#
# 1. **Shared and fine-grained experts** (DeepSeekMoE, Dai et al. 2024, arXiv 2401.06066):
#    many small routed experts instead of a few large ones, plus a few *shared* experts that
#    every token uses.
# 2. **Balancing without an auxiliary loss** (DeepSeek-V3, arXiv 2412.19437): a bias per
#    expert, nudged after every step, decides who is chosen; no loss term fights the task.
# 3. **Soft MoE** (Puigcerver et al. 2023, arXiv 2308.00951): no discrete routing at all;
#    each expert processes a few *slots*, soft averages of all the tokens.
# 4. **Grouped, dropless dispatch** (MegaBlocks, Gale et al. 2022, arXiv 2211.15841): sort
#    the assignments by expert once and run each expert on one contiguous block of rows.
#
# The notebook ends with a benchmark: the loop dispatch of notebook 02 against the grouped
# one and against a dense layer doing the same arithmetic.
#
# **You will implement**
#
# | exercise | what | points |
# |---|---|---|
# | `shared_expert_moe` | shared experts on every token plus top-k routed experts | 2 |
# | `biased_top_k` | DeepSeek-V3's routing: the biased scores choose, the unbiased ones weight | 2 |
# | `aux_free_bias_update` | one step of DeepSeek-V3's bias update | 1 |
# | `soft_moe` | Soft MoE: dispatch tokens into slots, run experts, combine slots into tokens | 3 |
# | `sort_by_expert` | the stable permutation that groups assignments by expert, and the counts | 2 |
#
# **Shapes.** `T` tokens (rows), `D` model width, `H` expert hidden width, `E` experts, `K`
# experts per token, `C` slots per expert (Soft MoE's slots play the role of the capacity).
# Inputs are `(T, D)`, router logits `(T, E)`, routing decisions `(T, K)`.
#
# Run each check cell after your answer: it prints one line when you are right and tells
# you what is probably wrong when you are not.

# %%
import math
import time

import matplotlib.pyplot as plt
import torch

from moe_course import Expert, sparse_moe, top_k_gating  # notebook 02's exercises, reused here
from moe_course.grading import check
from moe_course.layers import DenseFFN, TopKMoE
from moe_course.experiments import LM_BALANCING, band, train_lm_balancing
from moe_course.train import fast_mode

torch.manual_seed(0)
QUICK = fast_mode()  # True while a grader runs the notebook: the simulations and timings shrink

# %% [markdown]
# ## 1 · Shared and fine-grained experts (DeepSeekMoE)
#
# Dai et al. start from two observations about a top-2 mixture of, say, 16 experts.
# First, each expert is large and sees a wide mix of tokens, so it has to learn many
# unrelated things at once. Second, some knowledge (common words, syntax) is needed by
# almost every token, so several experts end up learning the same thing.
#
# **Fine-grained segmentation** (their Sec. 3.1) splits each expert into `m` smaller ones of
# hidden width `H / m` and routes each token to `m K` of them. Parameters and FLOPs stay
# the same, but the number of ways a token can combine experts explodes: with 16 experts
# and `K = 2` there are $\binom{16}{2} = 120$ combinations; with `m = 4` there are
# $\binom{64}{8} = 4{,}426{,}165{,}368$. Each small expert can be narrower in what it knows.
#
# **Shared expert isolation** (Sec. 3.2) sets a few experts apart that *every* token uses,
# with weight 1 and no router, so that the common knowledge lives there once and the routed
# experts are free to specialise. With shared experts $f^{s}_1, \dots, f^{s}_{S}$ and routed
# experts $f_1, \dots, f_E$ the layer computes (their eq. 9-11, without the residual $u_t$
# that the transformer block adds around every layer):
#
# $$s_{t} = \operatorname{softmax}(x_t W_g) \in \mathbb{R}^E, \qquad
# g_{t,e} = \begin{cases} s_{t,e} & \text{if } s_{t,e} \text{ is among the } K \text{ largest of } s_t,\\ 0 & \text{otherwise,}\end{cases}$$
#
# $$y_t = \sum_{i=1}^{S} f^{s}_i(x_t) + \sum_{e=1}^{E} g_{t,e}\, f_e(x_t).$$
#
# Note one difference from notebook 02: the gates are the softmax over **all** routed
# experts, kept at the top `K` and **not** renormalised, so they sum to less than 1. Your
# `top_k_gating` renormalises; DeepSeekMoE does not (DeepSeek-V3, below, renormalises again).
#
# **Exercise 1 (2 points).** Write `shared_expert_moe(x, shared_experts, routed_experts,
# w_gate, k)`: `x` is `(T, D)`, `shared_experts` a list of `S` expert modules (possibly
# empty), `routed_experts` a list of `E`, `w_gate` the `(D, E)` router of the routed
# experts. Return the tuple `(y, weights, indices)`: `y` is `(T, D)`, `weights` and
# `indices` the `(T, K)` gates $g$ and expert ids of each token's top `k`, best first. Run
# each shared expert once on all of `x`, and each routed expert only on its own rows, as in
# notebook 02.
#
# <details><summary>Hint 1: the idea</summary>
#
# Two parts added together. The routed part is notebook 02's sparse mixture with one
# difference in the gates: DeepSeekMoE takes the softmax over *all* routed experts and
# keeps the `k` largest probabilities as they are, without renormalising them (eq. 10-11).
# The shared part runs each shared expert once on all of `x` and adds its output with
# weight 1 (there may be none). Build `y` out of place.
# </details>
#
# <details><summary>Hint 2: the shape of the code</summary>
#
# ```python
# scores = torch.softmax(..., dim=-1)          # (T, E) over the routed experts
# weights, indices = torch.topk(scores, ...)   # (T, K), best first, not renormalised
# y = ...                                      # the routed part (sparse_moe is fine to use)
# for expert in shared_experts:
#     y = ...                                  # y + this expert on every token
# ```
# </details>

# %% nbgrader={"grade": false, "grade_id": "ex07_shared_expert_moe", "locked": false, "schema_version": 3, "solution": true}
def shared_expert_moe(x, shared_experts, routed_experts, w_gate, k):
    """(T, D), S shared and E routed experts, (D, E), k -> (y (T, D), weights, indices (T, K))."""
    ### BEGIN SOLUTION
    scores = torch.softmax(x @ w_gate, dim=-1)  # (T, E) eq. 11
    weights, indices = torch.topk(scores, k, dim=-1)  # (T, K), (T, K) eq. 10, not renormalised
    y = sparse_moe(x, routed_experts, weights, indices)  # (T, D) routed part of eq. 9
    for expert in shared_experts:
        y = y + expert(x)  # (T, D) shared part of eq. 9: every token, weight 1
    return y, weights, indices
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ex07_shared_expert_moe_tests", "locked": true, "points": 2, "schema_version": 3, "solution": false}
check("ex07_shared_expert_moe", shared_expert_moe)
### BEGIN HIDDEN TESTS
check("ex07_shared_expert_moe", shared_expert_moe, hidden=True)
### END HIDDEN TESTS

# %% [markdown]
# **Same budget, finer experts.** Below, one shared expert and a fine-grained routed layer
# of 16 experts of width `H / 4`, top-8 (`m = 4` against a baseline of 4 experts, top-2),
# on twelve tokens. The figure shows, on the left, how many expert combinations a token can
# choose from as the granularity `m` grows at fixed cost; on the right, who computes what:
# the shared expert (row `s`) sees every token with weight 1, each routed expert only the
# tokens whose top 8 include it.

# %%
torch.manual_seed(1)
T_s, D_s, H_s, m = 12, 16, 64, 4
shared_s = [Expert(D_s, H_s)]
routed_s = [Expert(D_s, H_s // m) for _ in range(4 * m)]  # 16 experts of width H / 4
w_gate_s = torch.randn(D_s, 4 * m) / D_s**0.5  # (D, E)
x_s = torch.randn(T_s, D_s)  # (T, D)
with torch.no_grad():
    y_s, w_s, i_s = shared_expert_moe(x_s, shared_s, routed_s, w_gate_s, k=2 * m)
print("token 0: routed experts", i_s[0].tolist())
print("         gates         ", w_s[0].numpy().round(3), f"sum {w_s[0].sum():.3f} (< 1)")
active = sum(p.numel() for p in shared_s[0].parameters()) + 2 * m * sum(
    p.numel() for p in routed_s[0].parameters())
print(f"parameters active per token: {active} (shared + {2 * m} routed of width {H_s // m})")

granularity = [1, 2, 4, 8, 16]
combinations = [math.comb(16 * g, 2 * g) for g in granularity]  # N = 16 experts, K = 2
gates_s = torch.zeros(T_s, 4 * m).scatter(1, i_s, w_s)  # (T, E), zeros off the top-k
fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), gridspec_kw={"width_ratios": [1, 1.6]})
axes[0].semilogy(granularity, combinations, "o-")
for g, c in zip(granularity, combinations):
    if g <= 4:
        axes[0].annotate(f"{c:,}", (g, c), textcoords="offset points", xytext=(5, -10),
                         fontsize=8)
axes[0].set(xlabel="granularity m (16m experts, top-2m)", ylabel="expert combinations",
            title="same FLOPs, many more combinations", xticks=granularity)
table = torch.cat([torch.ones(T_s, 1), gates_s], dim=1)  # (T, 1 + E): the shared column first
image = axes[1].imshow(table.T, cmap="Blues", vmin=0, vmax=1, aspect="auto")
axes[1].set_yticks(range(1 + 4 * m), ["s"] + [str(e) for e in range(4 * m)], fontsize=7)
axes[1].axhline(0.5, color="tab:red", lw=1)
axes[1].set(xlabel="token", ylabel="expert (s = shared)",
            title="shared expert: every token; routed: top-8 of 16")
fig.colorbar(image, ax=axes[1], label="weight")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 2 · Balancing without an auxiliary loss (DeepSeek-V3)
#
# Notebook 03 balanced the experts with an auxiliary loss added to the task loss. Its
# weight is a compromise: too small and the router collapses onto a few experts, too large
# and the balancing gradient drowns out the task's (Wang et al. 2024, *Auxiliary-Loss-Free
# Load Balancing Strategy for Mixture-of-Experts*, arXiv 2408.15664, measure both).
# DeepSeek-V3 (Sec. 2.1.2) balances with no loss at all. Each expert gets a bias $b_e$ that
# is used **only to choose** the experts, never to weight them:
#
# $$s_{t,e} = \sigma(x_t W_g)_e \;\;(\text{eq. 15}), \qquad
# \text{chosen}_t = \operatorname{TopK}_e\big(s_{t,e} + b_e\big) \;\;(\text{eq. 16}), \qquad
# g_{t,e} = \frac{s_{t,e}}{\sum_{e' \in \text{chosen}_t} s_{t,e'}} \;\;(\text{eq. 13}).$$
#
# After each training step, every expert's bias moves by a fixed amount $\gamma$ towards
# balance: down if the expert received more than its share of the assignments, up if fewer:
#
# $$b_e \leftarrow b_e + \gamma \cdot \operatorname{sign}\Big(\bar c - c_e\Big), \qquad
# \bar c = \frac{1}{E}\sum_{e'} c_{e'},$$
#
# with $c_e$ the number of assignments expert $e$ received in the step. No gradient flows
# through $b$; the gates, and so the task's gradient, see only the unbiased scores
# $s_{t,e}$. DeepSeek-V3 used $\gamma = 0.001$ for most of its training.
#
# (Eq. 14 is the same selection without the bias, the rule of DeepSeek-V2 and of notebook
# 02; eq. 16 adds $b_e$ inside the top-k and nowhere else.) Note the two differences from
# your `top_k_gating` of notebook 02: the affinities are sigmoids, each in $(0, 1)$ on its
# own, not a softmax over the experts; and the weights are the chosen affinities divided by
# their sum, not a softmax of anything.
#
# **Exercise 2 (2 points).** Write `biased_top_k(scores, bias, k)`: `scores` is the `(T, E)`
# tensor of non-negative affinities $s$, `bias` the `(E,)` bias $b$, `k` the number of
# experts per token. Return the pair `(weights, indices)`, both `(T, K)`: `indices` the `k`
# experts with the largest $s + b$ for each token, best biased score first; `weights` their
# *unbiased* scores divided by the sum of those `k` unbiased scores (eq. 13), so each row
# sums to 1. The weights must stay differentiable with respect to `scores` (the router
# learns through them) and must not depend on `bias` at all.
#
# <details><summary>Hint 1: the idea</summary>
#
# Which experts, and how much of each, are two separate questions here. Which: the `k`
# largest biased scores $s + b$ of each token, best first (eq. 16). How much: the
# *unbiased* scores $s$ of those same experts, divided by their sum over the `k` chosen
# (eq. 13), not a softmax and not a sum over all `E`. The bias enters the first answer
# only, so the weights carry no gradient to it; keep them torch operations on `scores`.
# </details>
#
# <details><summary>Hint 2: the shape of the code</summary>
#
# ```python
# indices = torch.topk(..., k, dim=-1).indices   # (T, K) chosen by the biased scores
# chosen = ....gather(1, indices)                # (T, K) the unbiased scores of those
# weights = ...                                  # (T, K) divided by their sum over K
# ```
# </details>

# %% nbgrader={"grade": false, "grade_id": "ex07_biased_top_k", "locked": false, "schema_version": 3, "solution": true}
def biased_top_k(scores, bias, k):
    """(T, E) affinities, (E,) bias, k -> (weights (T, K), indices (T, K)), eq. 13 and 16."""
    ### BEGIN SOLUTION
    indices = (scores + bias).topk(k, dim=-1).indices  # (T, K) eq. 16: the bias chooses
    chosen = scores.gather(1, indices)  # (T, K) the unbiased scores s_{t,e}
    weights = chosen / chosen.sum(dim=-1, keepdim=True)  # (T, K) eq. 13: they weight
    return weights, indices
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ex07_biased_top_k_tests", "locked": true, "points": 2, "schema_version": 3, "solution": false}
check("ex07_biased_top_k", biased_top_k)
### BEGIN HIDDEN TESTS
check("ex07_biased_top_k", biased_top_k, hidden=True)
### END HIDDEN TESTS

# %% [markdown]
# On one token: a bias of $-0.5$ on the favourite expert pushes it out of the top 2, but the
# weights of the two chosen experts are still their unbiased scores, normalised.

# %%
scores_one = torch.tensor([[0.90, 0.70, 0.60, 0.20]])  # (T, E) sigmoid affinities
for bias_one in (torch.zeros(4), torch.tensor([-0.5, 0.0, 0.0, 0.0])):
    w_one, i_one = biased_top_k(scores_one, bias_one, k=2)
    print(f"bias {bias_one.tolist()}: experts {i_one.tolist()[0]}, weights "
          f"{w_one.numpy().round(3)[0]} = unbiased scores "
          f"{scores_one[0, i_one[0]].tolist()} / their sum")

# %% [markdown]
# **Exercise 3 (1 point).** Write `aux_free_bias_update(bias, expert_counts, gamma)`:
# `bias` is the `(E,)` float bias, `expert_counts` the `(E,)` number of assignments each
# expert received in the step (integers, or float loads: only their comparison with the
# mean matters), `gamma >= 0` the update speed. Return the new `(E,)` bias,
# `bias + gamma * sign(mean(counts) - counts)`, without modifying `bias` in place. An expert
# exactly at the mean keeps its bias.
#
# <details><summary>Hint 1: the idea</summary>
#
# Compare each expert's count with the mean count. An expert above the mean is
# overloaded: lower its bias by `gamma` so that fewer tokens pick it; one below the mean
# gets `+gamma`; one exactly at the mean keeps its bias. That is `gamma` times the *sign*
# of `mean - count`, not the difference itself. Counts may be integers or float loads, and
# the caller's `bias` must not change.
# </details>
#
# <details><summary>Hint 2: the shape of the code</summary>
#
# ```python
# counts = expert_counts.to(torch.float64)   # .mean() refuses integer tensors
# step = gamma * torch.sign(...)             # +gamma, 0 or -gamma per expert
# ```
# then return a new tensor, the bias plus the step in `bias.dtype` (not `bias += ...`).
# </details>

# %% nbgrader={"grade": false, "grade_id": "ex07_aux_free_bias_update", "locked": false, "schema_version": 3, "solution": true}
def aux_free_bias_update(bias, expert_counts, gamma):
    """(E,), (E,), gamma -> (E,): bias + gamma * sign(mean(counts) - counts), a new tensor."""
    ### BEGIN SOLUTION
    counts = expert_counts.to(torch.float64)  # (E,) integer counts or float loads
    error = counts.mean() - counts  # (E,) > 0 underloaded, < 0 overloaded
    return bias + gamma * torch.sign(error).to(bias.dtype)  # (E,)
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ex07_aux_free_bias_update_tests", "locked": true, "points": 1, "schema_version": 3, "solution": false}
check("ex07_aux_free_bias_update", aux_free_bias_update)
### BEGIN HIDDEN TESTS
check("ex07_aux_free_bias_update", aux_free_bias_update, hidden=True)
### END HIDDEN TESTS

# %% [markdown]
# **A skewed router, balanced by the bias alone.** A router whose scores favour the first
# experts strongly (a fixed offset per expert, as after an unlucky start) routes a fresh
# batch of 256 tokens to its top 2 of 8 experts at every step. After each step your update
# moves the biases. Nothing is trained: no loss, no gradient, the router's weights never
# change. With $\gamma = 0$ the busiest expert keeps more than three times its share; with
# $\gamma > 0$ the biases climb for the idle experts and fall for the busy ones until every
# expert gets about $1/8$ of the assignments, the faster the larger $\gamma$, and the
# larger $\gamma$ the larger the step-to-step wobble around balance.

# %%
T_b, D_b, E_b, K_b = 256, 8, 8, 2
steps = 60 if QUICK else 200
w_gate_b = torch.randn(D_b, E_b, generator=torch.Generator().manual_seed(0)) * 0.3  # (D, E)
skew = torch.linspace(2.0, -2.0, E_b)  # (E,) experts 0 and 1 strongly favoured
batches = torch.randn(steps, T_b, D_b, generator=torch.Generator().manual_seed(1))  # (steps, T, D)


def simulate(gamma):
    """Route `steps` batches with the bias update; return loads (steps, E) and biases."""
    bias = torch.zeros(E_b)
    loads, biases = [], []
    for x in batches:
        scores = torch.sigmoid(x @ w_gate_b + skew)  # (T, E) eq. 15
        _, indices = biased_top_k(scores, bias, K_b)  # (T, K) eq. 16: the bias chooses
        counts = torch.bincount(indices.reshape(-1), minlength=E_b)  # (E,)
        loads.append(counts / (T_b * K_b))
        biases.append(bias)
        bias = aux_free_bias_update(bias, counts, gamma)
    return torch.stack(loads), torch.stack(biases)  # (steps, E), (steps, E)


runs = {gamma: simulate(gamma) for gamma in (0.0, 0.002, 0.01)}
fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
for gamma, (loads, _) in runs.items():
    axes[0].plot(loads.max(1).values * E_b, label=f"gamma = {gamma:g}")
axes[0].axhline(1.0, color="0.6", ls=":", lw=1)
axes[0].set(xlabel="step", ylabel="busiest expert's load / mean", ylim=(0, None),
            title="max load over mean")
axes[0].legend(fontsize=8)
loads, biases = runs[0.01]
for e in range(E_b):
    axes[1].plot(loads[:, e], lw=1)
    axes[2].plot(biases[:, e], lw=1, label=f"expert {e}")
axes[1].axhline(1 / E_b, color="k", ls=":", lw=1)
axes[1].set(xlabel="step", ylabel="share of assignments", title="per-expert load, gamma = 0.01")
axes[2].set(xlabel="step", ylabel="bias b_e", title="the biases, gamma = 0.01")
axes[2].legend(fontsize=7, ncol=2)
plt.tight_layout()
plt.show()
for gamma, (loads, _) in runs.items():
    late = loads[-20:].mean(0)  # (E,) the last 20 steps together
    print(f"gamma = {gamma:5g}: last 20 steps, loads {late.numpy().round(3)}, "
          f"max / mean {float(late.max() * E_b):.2f}")

# %% [markdown]
# Two things to notice. The router's own preference never changed: the scores still favour
# expert 0, and wherever expert 0 is chosen its weight is as large as before. The bias only
# moves the *borderline* tokens, those whose second and third choices were close, to the
# experts that need work. That is not free: a rerouted token is now processed by an
# expert it scores lower, so the bias does change what the layer computes. What it avoids
# is something else: an auxiliary loss balances by adding its own gradient to the router's,
# which pulls against the task's gradient; the bias has no gradient at all, and the gates
# that multiply the experts' outputs, and so every gradient, come from the unbiased scores.
# DeepSeek-V3 still adds a very small sequence-wise balance loss as a safeguard against
# extreme imbalance within one sequence (its eq. 17-20, weight $10^{-4}$).
#
# **Now with training.** The router above was frozen. Below, a small character model (the
# corpus of notebook 05; one block, `D = 32`, 8 experts of width 32, top-2, routed by your
# `biased_top_k` with sigmoid affinities) is trained for 150 steps three ways, from three
# seeds each, on the same batches:
#
# - **aux loss**: cross-entropy plus $\alpha = 0.01$ times a Switch-form balance loss,
#   $E \sum_e f_e P_e$ on the affinities normalised over the experts (DeepSeek-V3's eq.
#   17-20, taken over the batch instead of each sequence); the bias stays 0;
# - **aux-free bias**: cross-entropy only, and after every step your `aux_free_bias_update`
#   with $\gamma = 0.01$ moves each bias from that step's counts;
# - **neither**: cross-entropy only, bias 0.
#
# `moe_course.experiments.train_lm_balancing` runs one of them; the left panel shows the
# busiest expert's share over the mean share during training (1 is perfect balance; a band
# over the three seeds, smoothed over 10 steps), the right panel the validation loss of each
# run. (While a grader runs this notebook the training stops after a few steps.)

# %%
lm_runs = {way: [train_lm_balancing(way, seed=seed, select=biased_top_k,
                                    update=aux_free_bias_update) for seed in (0, 1, 2)]
           for way in LM_BALANCING}
fig, axes = plt.subplots(1, 2, figsize=(12, 3.6), gridspec_kw={"width_ratios": [1.6, 1]})
for j, (way, runs) in enumerate(lm_runs.items()):
    curves = torch.stack([r.max_over_mean for r in runs])  # (seeds, steps)
    window = min(10, curves.shape[1])
    smooth = torch.nn.functional.avg_pool1d(curves[:, None], window, stride=1)[:, 0]  # (seeds, steps')
    steps_axis = torch.arange(window, curves.shape[1] + 1)
    axes[0].fill_between(steps_axis, smooth.min(0).values, smooth.max(0).values, alpha=0.25,
                         color=f"C{j}")
    axes[0].plot(steps_axis, smooth.mean(0), color=f"C{j}", label=way)
    val = [r.val_loss for r in runs]
    axes[1].plot([j] * len(val), val, "o", color=f"C{j}", alpha=0.6)
    axes[1].plot([j - 0.2, j + 0.2], [sum(val) / len(val)] * 2, color=f"C{j}", lw=2)
axes[0].axhline(1.0, color="gray", ls=":", lw=1)
axes[0].set(xlabel="training step", ylabel="busiest expert's share / mean share",
            title="load balance during training (band: 3 seeds)")
axes[0].legend(fontsize=8)
axes[1].set(xticks=range(len(LM_BALANCING)), xticklabels=LM_BALANCING,
            ylabel="validation cross-entropy", title="quality (dots: seeds; bar: mean)")
plt.tight_layout()
plt.show()
print(f"{'':14s} {'max/mean, last 30 steps':>26s} {'validation loss':>24s} "
      f"{'tokens rerouted by the bias':>28s}")
for way, runs in lm_runs.items():
    late = band([float(r.max_over_mean[-30:].mean()) for r in runs])
    val = band([r.val_loss for r in runs])
    rerouted = band([r.rerouted for r in runs])
    print(f"{way:14s} {str(late):>26s} {str(val):>24s} {str(rerouted):>28s}")

# %% [markdown]
# What the runs show (the numbers printed above are this run's; the pattern held on each
# seed):
#
# - **Balance.** Trained on the cross-entropy alone, the router stays lopsided: the busiest
#   expert gets about twice its share to the end. The auxiliary loss at $\alpha = 0.01$
#   pulls that down only part of the way (about 1.7); your bias update, with no loss term
#   at all, brings it lowest (about 1.4) and keeps it there, on every seed.
# - **Quality.** At this size and length the three validation losses are the same within
#   the spread of the seeds (about 2.0 to 2.14 for each): the seeds differ from each other
#   far more than the ways of balancing do. Nothing here shows the bias *improving* the
#   model, nor balance costing it; Wang et al. (arXiv 2408.15664) measure a gain at the
#   scale of billions of tokens, where an auxiliary loss strong enough to balance does
#   hurt.
# - **The bias is not free of effects on the task.** By the end of training it changed
#   the set of experts of a large share of the validation tokens (the last column: about
#   two in five to three in five), so those tokens are processed by experts they score
#   lower. What the bias avoids is the auxiliary loss's gradient, which reaches every
#   router weight and pulls against the task's; the bias has none, and the gates still come
#   from the unbiased scores. DeepSeek-V3 also anneals the speed: $\gamma = 0.001$ for most
#   of training, then 0 (its Sec. 4.2).

# %% [markdown]
# ## 3 · Soft MoE: slots instead of routing
#
# Every router so far makes a discrete choice, and discrete choices cause the trouble of
# notebooks 02 to 04: no gradient through the choice, imbalance, dropped tokens. Puigcerver
# et al. (*From Sparse to Soft Mixtures of Experts*, Sec. 2.1) remove the choice. Each of
# the `E` experts processes `C` **slots**, and a slot is not a token but a weighted average
# of all the tokens. With learned slot parameters $\Phi \in \mathbb{R}^{D \times EC}$ and
# logits $L = X\Phi$ of shape `(T, E*C)`, one column per slot:
#
# $$D_{t,j} = \frac{e^{L_{t,j}}}{\sum_{t'} e^{L_{t',j}}}, \qquad \tilde X = D^\top X
# \qquad \text{(eq. 1: dispatch, a softmax over tokens)},$$
#
# $$\tilde Y_j = f_{\lfloor j / C \rfloor}(\tilde X_j), \qquad
# C_{t,j} = \frac{e^{L_{t,j}}}{\sum_{j'} e^{L_{t,j'}}}, \qquad Y = C \tilde Y
# \qquad \text{(eq. 2: combine, a softmax over slots)}.$$
#
# The same logits are normalised twice: down each column to build the slots, along each row
# to build the outputs. Slot `j` belongs to expert `j // C`: slots `0 .. C-1` to expert 0,
# and so on. Every expert processes exactly `C` slots, so the load is balanced by
# construction and nothing is dropped; everything is differentiable; and the cost is set by
# the number of slots, `E C`, not by `T`. (The paper also L2-normalises `X` and `Φ` with a
# learned scale for large `D`; we leave that out.)
#
# **Exercise 4 (3 points).** Write `soft_moe(x, experts, phi, slots_per_expert)`: `x` is
# `(T, D)`, `experts` a list of `E` modules, `phi` the `(D, E*C)` slot parameters and
# `slots_per_expert` is `C`. Return the tuple `(y, dispatch, combine)`: `y` is `(T, D)`,
# `dispatch` and `combine` the two `(T, E*C)` weight matrices. Call each expert once, on its
# `C` slots together.
#
# <details><summary>Hint 1: the idea</summary>
#
# One logit matrix `x @ phi`, `(T, E*C)`, read two ways. The **dispatch** weights are its
# softmax over the *tokens* (each slot is a weighted average of all tokens, eq. 1); the
# **combine** weights are its softmax over the *slots* (each token's output is a weighted
# average of the slot outputs, eq. 2). Slot `i` belongs to expert `i // C`: expert `e`
# runs once on its `C` slots together. Keep it all in torch so that `phi` gets a
# gradient.
# </details>
#
# <details><summary>Hint 2: the shape of the code</summary>
#
# ```python
# logits = x @ phi                             # (T, E*C)
# dispatch = torch.softmax(logits, dim=...)    # columns sum to 1
# combine = ...                                # rows sum to 1
# slots = ...                                  # (E*C, D) from dispatch and x
# outs = torch.cat([...])                      # expert e on slots[e*C:(e+1)*C], in order
# ```
# </details>

# %% nbgrader={"grade": false, "grade_id": "ex07_soft_moe", "locked": false, "schema_version": 3, "solution": true}
def soft_moe(x, experts, phi, slots_per_expert):
    """(T, D), E experts, (D, E*C), C -> (y (T, D), dispatch (T, E*C), combine (T, E*C))."""
    ### BEGIN SOLUTION
    c = slots_per_expert
    logits = x @ phi  # (T, E*C)
    dispatch = torch.softmax(logits, dim=0)  # (T, E*C) eq. 1, over tokens
    combine = torch.softmax(logits, dim=1)  # (T, E*C) eq. 2, over slots
    slots = dispatch.T @ x  # (E*C, D) eq. 1
    outs = torch.cat([expert(slots[e * c : (e + 1) * c])  # (C, D) expert e's slots
                      for e, expert in enumerate(experts)])  # (E*C, D)
    return combine @ outs, dispatch, combine  # (T, D) eq. 2
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ex07_soft_moe_tests", "locked": true, "points": 3, "schema_version": 3, "solution": false}
check("ex07_soft_moe", soft_moe)
### BEGIN HIDDEN TESTS
check("ex07_soft_moe", soft_moe, hidden=True)
### END HIDDEN TESTS

# %% [markdown]
# **The two softmaxes.** Ten tokens, three experts with two slots each. The left panel is
# the dispatch matrix: every column sums to 1, so each slot is a blend of tokens, usually
# dominated by a few. The right panel is the combine matrix from the same logits: every row
# sums to 1, so each token reads a blend of the six slot outputs. The dashed lines separate
# the experts' slots.

# %%
torch.manual_seed(2)
T_m, D_m, E_m, C_m = 10, 8, 3, 2
experts_m = [Expert(D_m, 16) for _ in range(E_m)]
phi_m = torch.randn(D_m, E_m * C_m)  # (D, E*C)
x_m = torch.randn(T_m, D_m)  # (T, D)
with torch.no_grad():
    y_m, dispatch_m, combine_m = soft_moe(x_m, experts_m, phi_m, C_m)
print("dispatch column sums (one per slot):", dispatch_m.sum(0).numpy().round(3))
print("combine row sums (one per token):   ", combine_m.sum(1).numpy().round(3))

fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
for ax, weights, title in ((axes[0], dispatch_m, "dispatch: softmax over tokens (columns)"),
                           (axes[1], combine_m, "combine: softmax over slots (rows)")):
    image = ax.imshow(weights, cmap="Purples", vmin=0, aspect="auto")
    for boundary in range(1, E_m):
        ax.axvline(boundary * C_m - 0.5, color="k", ls="--", lw=1)
    ax.set(xlabel="slot j (expert j // C)", title=title, xticks=range(E_m * C_m))
    fig.colorbar(image, ax=ax)
axes[0].set_ylabel("token")
plt.tight_layout()
plt.show()

# %% [markdown]
# **Why Soft MoE does not fit causal decoding.** A decoder language model must compute token
# `t`'s output from tokens `0..t` only: that is what lets it train on all positions at once
# and then generate one token at a time. A slot is an average over *all* tokens of the
# sequence, and every token's output reads every slot, so each output depends on every
# input, later ones included. The cell below changes only the **last** token of a sequence
# and measures how much each token's output moves. With top-2 token choice (notebook 02)
# only the changed token moves; with Soft MoE every token does. The paper lists this among
# its limitations: causality must be preserved in training, and masking slots the way
# attention is masked is not straightforward; at generation time, too, every new token
# would change every slot. Notebook 04 found the same leak in expert
# choice routing, for the same reason: a decision made per batch rather than per token.

# %%
torch.manual_seed(3)
x_c = torch.randn(T_m, D_m)  # (T, D)
x_c_later = x_c.clone()
x_c_later[-1] = torch.randn(D_m)  # only the last token differs
w_gate_c = torch.randn(D_m, E_m)  # (D, E) a top-k router over the same experts


def top_k_layer(x):
    return sparse_moe(x, experts_m, *top_k_gating(x @ w_gate_c, 2))  # (T, D)


with torch.no_grad():
    moved_soft = (soft_moe(x_c_later, experts_m, phi_m, C_m)[0]
                  - soft_moe(x_c, experts_m, phi_m, C_m)[0]).norm(dim=-1)  # (T,)
    moved_top_k = (top_k_layer(x_c_later) - top_k_layer(x_c)).norm(dim=-1)  # (T,)
fig, ax = plt.subplots(figsize=(7, 3))
positions = torch.arange(T_m)
ax.bar(positions - 0.2, moved_top_k, width=0.4, label="top-2 token choice")
ax.bar(positions + 0.2, moved_soft, width=0.4, label="Soft MoE")
ax.set(xlabel="token position", ylabel="|change of output|",
       title=f"only token {T_m - 1} was changed", xticks=positions.tolist())
ax.legend(fontsize=8)
plt.tight_layout()
plt.show()
print("tokens 0..8 moved under top-2:   ", bool((moved_top_k[:-1] > 0).any()))
print("tokens 0..8 moved under Soft MoE:", bool((moved_soft[:-1] > 0).all()))

# %% [markdown]
# ## 4 · Sorting by expert: the layout of grouped, dropless computation
#
# Notebook 02's `sparse_moe` finds each expert's rows with `indices == e`: `E` passes over
# all `T K` assignments, and `E` small matrix products launched one by one from Python.
# GShard's padded layout (notebook 03's capacity) runs all experts in one batched product, but
# only by giving every expert the same buffer of `C` rows: it pads the idle experts and drops
# what overflows the busy ones. MegaBlocks (Gale et al. 2022) keeps every assignment
# and wastes nothing: **sort** the `T K` assignments by expert once, so that each expert's
# rows form one contiguous block, and run one matrix product per block (their block-sparse
# kernels on GPUs; a *grouped* matrix multiply in general). Only the block boundaries, the
# per-expert counts, are needed.
#
# Number the assignments row by row: assignment `(t, j)`, token `t`'s `j`-th choice, has
# flat id `t K + j`, the position of `indices[t, j]` in `indices.reshape(-1)`. The sort must
# be **stable**, so that within one expert the rows stay in token order: the result is then
# deterministic, on every machine and for every sort algorithm.
#
# **Exercise 5 (2 points).** Write `sort_by_expert(indices, n_experts)`: `indices` is the
# `(T, K)` integer routing. Return the tuple `(order, counts)`: `order` is the `(T*K,)`
# permutation of flat ids that groups the assignments by expert (expert 0's first, in token
# order, then expert 1's, ...), so that `indices.reshape(-1)[order]` is sorted; `counts` is
# the `(E,)` number of assignments of each expert, `0` for an expert nobody chose.
#
# <details><summary>Hint 1: the idea</summary>
#
# Number the assignments row by row (`indices.reshape(-1)`, id `t*K + j`). Sorting
# those expert ids *stably* groups the assignments by expert and keeps token order within
# an expert; what you return is the permutation (where each sorted entry came from), not
# the sorted values. The counts are one per expert, 0 for an expert nobody chose, the last
# one too.
# </details>
#
# <details><summary>Hint 2: the shape of the code</summary>
#
# ```python
# flat = indices.reshape(-1)                  # (T*K,)
# order = torch.sort(flat, stable=...).indices
# ```
# torch's default sort does not promise stability; `torch.bincount` needs
# `minlength=n_experts` to count the idle experts at the end.
# </details>

# %% nbgrader={"grade": false, "grade_id": "ex07_sort_by_expert", "locked": false, "schema_version": 3, "solution": true}
def sort_by_expert(indices, n_experts):
    """(T, K), E -> (order (T*K,) flat ids t*K + j grouped by expert, counts (E,))."""
    ### BEGIN SOLUTION
    flat = indices.reshape(-1)  # (T*K,) id t*K + j
    order = torch.sort(flat, stable=True).indices  # (T*K,) grouped by expert, token order kept
    counts = torch.bincount(flat, minlength=n_experts)  # (E,) 0 for idle experts
    return order, counts
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ex07_sort_by_expert_tests", "locked": true, "points": 2, "schema_version": 3, "solution": false}
check("ex07_sort_by_expert", sort_by_expert)
### BEGIN HIDDEN TESTS
check("ex07_sort_by_expert", sort_by_expert, hidden=True)
### END HIDDEN TESTS

# %% [markdown]
# **By hand.** Five tokens, top-2 of 4 experts, expert 3 idle. `order // K` is the token of
# each sorted row and `order % K` its choice rank; `counts` gives the block boundaries.

# %%
indices_h = torch.tensor([[2, 0], [0, 1], [1, 2], [2, 0], [0, 1]])  # (T, K)
order_h, counts_h = sort_by_expert(indices_h, 4)
print("flat expert ids      ", indices_h.reshape(-1).tolist())
print("order (flat ids)     ", order_h.tolist())
print("experts, sorted      ", indices_h.reshape(-1)[order_h].tolist())
print("token of each row    ", (order_h // 2).tolist())
print("counts               ", counts_h.tolist())

# %% [markdown]
# **Grouped computation from the sort.** Gather the rows once in sorted order, run each
# expert on its contiguous block, weight the outputs and add them back to their tokens with
# one `index_add`: the same output as notebook 02's loop, from one sort and one gather. The
# figure shows a routing of 64 tokens before and after the sort, and the block sizes.

# %%
torch.manual_seed(4)
T_g, D_g, E_g, K_g = 64, 8, 6, 2
x_g = torch.randn(T_g, D_g)  # (T, D)
experts_g = [Expert(D_g, 16) for _ in range(E_g)]
weights_g, indices_g = top_k_gating(x_g @ torch.randn(D_g, E_g), K_g)  # (T, K), (T, K)


def grouped_moe(x, experts, weights, indices):
    """Sparse dispatch from one stable sort: contiguous blocks, one call per expert."""
    order, counts = sort_by_expert(indices, len(experts))  # (T*K,), (E,)
    token = order // indices.shape[1]  # (T*K,) the token of each sorted row
    rows = x[token]  # (T*K, D) grouped by expert
    blocks = rows.split(counts.tolist())  # E contiguous blocks
    outs = torch.cat([expert(block) for expert, block in zip(experts, blocks)
                      if len(block)])  # (T*K, D)
    weighted = weights.reshape(-1)[order, None] * outs  # (T*K, D)
    return torch.zeros_like(x).index_add(0, token, weighted)  # (T, D)


with torch.no_grad():
    gap = (grouped_moe(x_g, experts_g, weights_g, indices_g)
           - sparse_moe(x_g, experts_g, weights_g, indices_g)).abs().max()
print(f"max |grouped - loop| = {gap:.1e}")

order_g, counts_g = sort_by_expert(indices_g, E_g)
flat_g = indices_g.reshape(-1)  # (T*K,)
fig, axes = plt.subplots(1, 2, figsize=(11, 2.8), gridspec_kw={"width_ratios": [3, 1]})
strips = torch.stack([flat_g, flat_g[order_g]])  # (2, T*K)
axes[0].imshow(strips, cmap="tab10", vmin=0, vmax=9, aspect="auto", interpolation="nearest")
axes[0].set_yticks([0, 1], ["token order", "sorted"])
for boundary in counts_g.cumsum(0)[:-1].tolist():
    axes[0].axvline(boundary - 0.5, ymin=0, ymax=0.5, color="k", lw=1)
axes[0].set(xlabel="assignment (row)", title="expert of each assignment (colour)")
axes[1].bar(range(E_g), counts_g, color=[plt.cm.tab10(e) for e in range(E_g)])
axes[1].set(xlabel="expert", ylabel="rows", title="counts = block sizes")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 5 · Benchmark: loop against grouped against dense
#
# `moe_course.layers.TopKMoE` is the course's fast top-k layer. Its experts' weights are
# stacked into one bank, and with `dispatch="grouped"` it does what the previous cell did
# inside: one stable sort of the assignments, one gather, one matrix product per expert on
# its contiguous block (torch's grouped matrix multiply where this torch has one), one
# weighted `index_add` back. `dispatch="blocked"` runs the same steps expert by expert
# instead (gather one expert's rows, its products, its activation, its `index_add`), so
# that one expert's rows stay in the CPU's cache from gather to scatter; its default,
# `"auto"`, takes grouped for small experts and blocked for large ones. Both run the whole
# layer as one autograd node whose backward is written out by hand (`moe_course.fused`).
# `TopKMoE.loop_forward` computes the same layer on the same
# weights with notebook 02's loop over experts. The third contender is a single dense
# feed-forward network of hidden width `K H`: it does the same arithmetic as the experts
# the tokens use (the same *active* FLOPs), in two large matrix products, with no routing
# at all. It is the practical lower bound for the mixture's time.
#
# The cell times one forward pass of each, the fastest of a few interleaved repeats on one
# CPU thread, as the number of experts grows at fixed `K`. Timings on a laptop are noisy
# (anything else running shows up in them), so read the trend, not the third digit.
# (`benchmarks/bench_layers.py` measures forward and backward at larger shapes, with
# more repeats.)

# %%
T_x, D_x, H_x, K_x = (256, 32, 64, 2) if QUICK else (2048, 128, 256, 2)
expert_counts = [4, 16] if QUICK else [4, 8, 16, 32]
repeats = 1 if QUICK else 3
x_x = torch.randn(T_x, D_x)  # (T, D)


def fastest(fns, x):
    """Smallest wall time in seconds of each of `fns` on x: one warm-up, then `repeats`
    rounds that call them in turn, so that a busy moment slows all of them alike."""
    best = {name: float("inf") for name in fns}
    for round_ in range(repeats + 1):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn(x)
            if round_:  # round 0 is the warm-up
                best[name] = min(best[name], time.perf_counter() - start)
    return best


torch.manual_seed(5)
dense_x = DenseFFN(D_x, K_x * H_x)  # the same active FLOPs as K experts of width H
measured = {"loop": [], "grouped": [], "blocked": [], "dense": []}
threads = torch.get_num_threads()
torch.set_num_threads(1)  # one thread: steadier timings on a busy laptop
try:
    with torch.no_grad():
        for n_experts in expert_counts:
            layer = TopKMoE(D_x, H_x, n_experts, k=K_x, dispatch="grouped")
            blocked = TopKMoE(D_x, H_x, n_experts, k=K_x, dispatch="blocked")
            blocked.load_state_dict(layer.state_dict())
            best = fastest({"loop": layer.loop_forward, "grouped": layer, "blocked": blocked,
                            "dense": dense_x}, x_x)
            for name, seconds in best.items():
                measured[name].append(seconds)
finally:
    torch.set_num_threads(threads)

fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
for label, color in (("loop", "tab:orange"), ("grouped", "tab:blue"), ("blocked", "tab:green"),
                     ("dense", "0.4")):
    ms = [s * 1e3 for s in measured[label]]
    name = f"dense, hidden K*H = {K_x * H_x}" if label == "dense" else f"{label} dispatch"
    axes[0].plot(expert_counts, ms, "o-", color=color, label=name)
    ratios = [s / d for s, d in zip(measured[label], measured["dense"])]  # same round
    axes[1].plot(expert_counts, ratios, "o-", color=color, label=name)
axes[0].set(xlabel="experts E", ylabel="ms per forward", ylim=(0, None),
            title=f"T={T_x}, D={D_x}, H={H_x}, K={K_x}, one thread, best of {repeats}")
axes[1].set(xlabel="experts E", ylabel="time / dense time", ylim=(0, None),
            title="relative to the dense bound")
for ax in axes:
    ax.set_xscale("log", base=2)
    ax.set_xticks(expert_counts, [str(e) for e in expert_counts])
    ax.legend(fontsize=8)
plt.tight_layout()
plt.show()
for e, loop, grouped, blocked, dense in zip(expert_counts, *measured.values()):
    print(f"E = {e:2d}: loop {loop * 1e3:6.2f} ms, grouped {grouped * 1e3:6.2f} ms, blocked "
          f"{blocked * 1e3:6.2f} ms, dense {dense * 1e3:5.2f} ms; loop / grouped "
          f"{loop / grouped:4.1f}, grouped / dense {grouped / dense:4.1f}, blocked / dense "
          f"{blocked / dense:4.1f}")

# %% [markdown]
# The dense layer's work does not depend on `E` (its line moves only with the machine's
# load, which moves the others alike: the right panel divides it out). The loop's time
# grows with `E` although the arithmetic does not, because every expert costs a mask over
# all assignments, a gather, a small product launched from Python and an `index_add`. The
# grouped dispatch pays for one sort instead of `E` masks and reads contiguous blocks
# instead of scattered rows, so its per-expert cost is smaller, and the loop falls
# further behind it as experts are added. What is left between it and the dense
# bound is the routing itself (router, top-k, sort, gather, scatter) and the smaller, less
# efficient products of many small experts: the price of holding `E` experts' parameters
# while computing only `K` per token. Blocked against grouped is a trade: blocked keeps
# each expert's rows in cache but issues a dozen small operations per expert, grouped
# issues a few large ones whose operands stream through memory; which wins depends on how
# big one expert's block is. Making that gap small is the work of MegaBlocks' and
# ScatterMoE's kernels, and of `moe_course.fused` with `benchmarks/`.

# %% [markdown]
# ## Summary
#
# - DeepSeekMoE splits experts into many small routed ones (more combinations at the same
#   cost) and adds shared experts that every token uses with weight 1; its gates are the
#   softmax over all routed experts at the top `K`, not renormalised (eq. 9-11).
# - DeepSeek-V3 balances load with a per-expert bias that only chooses experts, nudged by
#   $\gamma\,\operatorname{sign}(\bar c - c_e)$ after each step; the unbiased scores weight
#   them, so no auxiliary loss competes with the task.
# - Soft MoE replaces routing by slots: a softmax over tokens builds each slot, a softmax over
#   slots builds each output. Balanced, dropless and differentiable, but every output depends
#   on every token, so it does not fit causal decoding.
# - Sorting the assignments by expert once, stably, with per-expert counts, gives the
#   contiguous layout of grouped, dropless computation (MegaBlocks); it removes much of the
#   loop's per-expert overhead, and the dense layer of the same active FLOPs is the bound to
#   measure it against.
#
# This is the end of the course. The reference package `moe_course` holds every function you
# wrote, cited and tested; `moe_course.layers` and `benchmarks/` are the place to start if you
# want to make the fast layers faster.
