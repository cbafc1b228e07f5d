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
# # 03 · Load balancing and capacity
#
# **Difficulty** ★★★☆ · **Time** about 75 minutes · **Points** 12 (all autograded; one
# challenge exercise)
#
# Notebook 02 made the mixture sparse: each token runs only its top `K` experts. That
# created a feedback loop. The router sends a token to the experts it currently rates
# highest; those experts are trained on the token and get better at it; so the router rates
# them higher still. Shazeer et al. (2017, arXiv 1701.06538, Sec. 4) saw exactly this: the
# gating network "tends to converge to a state where it always produces large weights for
# the same few experts", an imbalance that is "self-reinforcing, as the favored experts are
# trained more rapidly". The other experts get no tokens, hence no gradient, and stay
# useless: parameters paid for and never used. This is **expert collapse**, and section 9
# of this notebook makes it happen.
#
# There are two kinds of cure, and large mixtures use both:
#
# - **soft constraints**, auxiliary losses added to the task loss that are smallest when
#   the experts are used equally: Shazeer's importance and load losses (Sec. 4, App. A)
#   and the simpler Switch Transformer loss (Fedus et al. 2021, arXiv 2101.03961, eq. 4-6),
#   plus the router z-loss of ST-MoE (Zoph et al. 2022, arXiv 2202.08906, eq. 5), which
#   keeps the router's logits small so that training stays numerically stable;
# - **hard constraints**: every expert gets a buffer of `C` slots per batch, its
#   *capacity*, and tokens that do not fit are *dropped*: they skip the experts and ride
#   the residual connection (GShard, Lepikhin et al. 2020, arXiv 2006.16668; Switch).
#
# **You will implement**
#
# | exercise | what | points |
# |---|---|---|
# | `cv_squared` | the squared coefficient of variation, the imbalance measure | 1 |
# | `importance_loss` | Shazeer's importance loss: balance the gate mass per expert | 1 |
# | `load_loss` (challenge) | Shazeer's smooth load loss: balance the token count per expert | 2 |
# | `switch_aux_loss` | the Switch Transformer load-balancing loss | 2 |
# | `router_z_loss` | the ST-MoE router z-loss | 1 |
# | `expert_capacity` | how many slots each expert gets | 1 |
# | `capacity_positions` | which slot each assignment takes (GShard priority) | 2 |
# | `apply_capacity` | drop the assignments that do not fit | 2 |
#
# **Shapes.** `T` tokens (rows), `D` model width, `H` expert hidden width, `E` experts, `K`
# experts per token, `C` capacity (slots per expert). Router logits and probabilities are
# `(T, E)`; a routing decision is a pair of `(T, K)` tensors, `weights` and `indices`.
#
# Run each check cell after your answer: it prints one line when you are right and tells
# you what is probably wrong when you are not.

# %%
import copy
import math
from typing import NamedTuple

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import nn

from moe_course import Expert, sparse_moe  # notebooks 01 and 02, used in the models below
from moe_course.data import region_grid, regions_task
from moe_course.grading import check, implemented
from moe_course.train import train
from moe_course.widgets import LoadTimeline, RoutingExplorer

torch.manual_seed(0)
torch.set_num_threads(1)  # the layers here are tiny: one thread is faster than several

# %% [markdown]
# ## 1 · Measuring imbalance: the squared coefficient of variation
#
# Before balancing anything we need one number that says how unequal a vector of
# per-expert amounts is. Shazeer et al. use the **coefficient of variation**, the standard
# deviation over the mean, squared:
#
# $$\operatorname{CV}(v)^2 = \frac{\operatorname{Var}(v)}{\bar v^{\,2} + \epsilon},
# \qquad \bar v = \frac1n \sum_{i=1}^{n} v_i,
# \quad \operatorname{Var}(v) = \frac1n \sum_{i=1}^{n} (v_i - \bar v)^2,
# \quad \epsilon = 10^{-10}.$$
#
# Dividing by the squared mean makes it *scale-invariant*: it measures how unequal the
# experts are, not how many tokens there were. It is 0 when every expert gets the same, and
# for `E` experts it reaches its largest value, $E - 1$, when one expert gets everything.
# The variance is the *population* variance (divide by $n$), so a single expert gives 0
# rather than the $0/0$ of the sample variance; $\epsilon$ keeps an all-zero vector at 0.
#
# **Exercise 1 (1 point).** Write `cv_squared(v)` for a 1-d tensor `v`, returning a
# 0-dimensional tensor. Keep it in torch operations: it will be part of a loss, so it must
# be differentiable.
#
# <details><summary>Hint 1: the idea</summary>
#
# The *population* variance divides by $n$; `torch.var` divides by $n - 1$ by default
# (pass `correction=0`, or take the mean of the squared deviations yourself). Divide by the
# squared mean plus $10^{-10}$. The two edge cases then need no special code: one element
# has variance exactly 0, and the $\epsilon$ turns an all-zero vector's $0/0$ into 0. Keep
# everything in torch, and return a 0-dimensional tensor, not a Python number: it will be
# part of a loss.
# </details>
#
# <details><summary>Hint 2: the shape of the code</summary>
#
# ```python
# mean = v.mean()
# variance = ...                    # mean of (v - mean) ** 2, divide by n
# cv2 = variance / (mean**2 + ...)
# ```
# </details>

# %% nbgrader={"grade": false, "grade_id": "ex03_cv_squared", "locked": false, "schema_version": 3, "solution": true}
def cv_squared(v):
    """Squared coefficient of variation of a 1-d tensor: Var(v) / (mean(v)**2 + 1e-10)."""
    ### BEGIN SOLUTION
    mean = v.mean()
    variance = ((v - mean) ** 2).mean()  # population variance: divide by n
    return variance / (mean**2 + 1e-10)
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ex03_cv_squared_tests", "locked": true, "points": 1, "schema_version": 3, "solution": false}
check("ex03_cv_squared", cv_squared)
### BEGIN HIDDEN TESTS
check("ex03_cv_squared", cv_squared, hidden=True)
### END HIDDEN TESTS

# %% [markdown]
# Four experts: equal loads score 0, one expert taking everything scores $E - 1 = 3$, and
# multiplying all loads by 100 changes nothing. The figure slides the load of `E` experts
# from balanced ($s = 0$) to collapsed ($s = 1$): $v = (1 - s)\,\tfrac1E + s\,\delta_0$
# gives $\operatorname{CV}^2 = s^2 (E - 1)$, gentle near balance and steep near collapse.

# %%
for v in ([1.0, 1.0, 1.0, 1.0], [4.0, 0.0, 0.0, 0.0], [3.0, 1.0, 0.0, 0.0],
          [300.0, 100.0, 0.0, 0.0], [5.0]):
    print(f"cv_squared({v}) = {float(cv_squared(torch.tensor(v))):.4f}")

shares = torch.linspace(0, 1, 41)
fig, ax = plt.subplots(figsize=(6, 3.2))
for n_experts in (4, 8, 16):
    one_hot = F.one_hot(torch.tensor(0), n_experts).float()  # (E,)
    curve = [float(cv_squared((1 - s) / n_experts + s * one_hot)) for s in shares]
    ax.plot(shares, curve, label=f"E = {n_experts} (max E - 1 = {n_experts - 1})")
ax.set(xlabel="s: share of the load moved onto expert 0", ylabel="CV$^2$ of the load",
       title="From balanced to collapsed")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# ## 2 · The importance loss
#
# Shazeer et al. (Sec. 4, eq. 6-7) define the **importance** of an expert in a batch as the
# total gate weight it received,
#
# $$\operatorname{Importance}(X)_e = \sum_{x \in X} G(x)_e,
# \qquad L_{\text{importance}}(X) = w_{\text{importance}} \cdot \operatorname{CV}\big(\operatorname{Importance}(X)\big)^2,$$
#
# where $G(x)$ is the sparse gate, zero off each token's top-k. The loss is differentiable
# in the gates, so its gradient pushes weight away from over-used experts towards idle
# ones. The weight $w_{\text{importance}}$ is a hyperparameter; we default to 0.01, the
# scale of the other balancing losses in this notebook.
#
# **Exercise 2 (1 point).** Write `importance_loss(gates, w_importance=0.01)`, where
# `gates` is the `(T, E)` gate matrix with zeros off the top-k. Use your `cv_squared`.
#
# <details><summary>Hint 1: the idea</summary>
#
# An expert's importance is the total gate weight it got over the batch: a sum over the
# tokens, one number per expert, shape `(E,)`. Summing over `dim=1` instead would give each
# token's total gate, which is always 1. Then weight its squared coefficient of variation
# by `w_importance` (use the argument; its default is 0.01).
# </details>
#
# <details><summary>Hint 2: the shape of the code</summary>
#
# ```python
# importance = gates.sum(dim=...)   # (E,)
# loss = ...                        # w_importance times your cv_squared
# ```
# </details>

# %% nbgrader={"grade": false, "grade_id": "ex03_importance_loss", "locked": false, "schema_version": 3, "solution": true}
def importance_loss(gates, w_importance=0.01):
    """(T, E) gates, zeros off the top-k -> w_importance * cv_squared(gates.sum(0))."""
    ### BEGIN SOLUTION
    importance = gates.sum(dim=0)  # (E,) total gate weight per expert, eq. 6
    return w_importance * cv_squared(importance)  # eq. 7
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ex03_importance_loss_tests", "locked": true, "points": 1, "schema_version": 3, "solution": false}
check("ex03_importance_loss", importance_loss)
### BEGIN HIDDEN TESTS
check("ex03_importance_loss", importance_loss, hidden=True)
### END HIDDEN TESTS

# %% [markdown]
# Importance is not the whole story, and Shazeer et al. say so: "one expert may receive a
# few examples with large weights, and another may receive many examples with small
# weights". In the example below four tokens each pick two of three experts. Every expert
# has the same importance, $4/3$, so the importance loss is 0, yet expert 0 runs on all four
# tokens and the others on two each. On a real machine the *count* is what costs memory and
# time. Counts are not differentiable, which is why the next exercise exists.

# %%
gates_example = torch.tensor([[1 / 3, 2 / 3, 0.0],
                              [1 / 3, 2 / 3, 0.0],
                              [1 / 3, 0.0, 2 / 3],
                              [1 / 3, 0.0, 2 / 3]])  # (T, E), two experts per token
counts = (gates_example > 0).sum(0).float()  # (E,) tokens per expert
print("importance per expert      ", gates_example.sum(0).numpy().round(3))
print("importance loss (w = 1)    ", round(float(importance_loss(gates_example, 1.0)), 4))
print("tokens per expert (load)   ", counts.numpy())
print("cv_squared of the load     ", round(float(cv_squared(counts)), 4))

# %% [markdown]
# ## 3 · The load loss (challenge)
#
# > **Challenge exercise.** This one is harder than the rest, and nothing later in the
# > notebook depends on it: if you get stuck, skip it and come back at the end. While
# > `load_loss` is still the stub, its check cell and the demo after it print "skipped"
# > and Run All goes on (the exercise then scores 0 of its 2 points).
#
# Shazeer et al. (App. A) balance the *number* of tokens per expert with a smooth estimate
# of it. Their router is noisy (notebook 02, eq. 4):
# $H(x)_i = (x W_g)_i + \varepsilon_i \cdot \sigma_i(x)$ with
# $\sigma_i(x) = \operatorname{softplus}((x W_{\text{noise}})_i)$ and
# $\varepsilon_i \sim \mathcal N(0, 1)$, and the top `k` entries of $H(x)$ win. Freeze every
# other expert's noisy logit and ask: if only expert $i$'s noise were drawn again, how
# likely is $i$ to land in the top `k`? It must beat the `k`-th largest of the *other*
# noisy logits, $\operatorname{kth\_excluding}(H(x), k, i)$, so (eq. 8-9)
#
# $$P(x, i) = \Pr\big((x W_g)_i + \varepsilon\, \sigma_i(x) > \operatorname{kth\_excluding}(H(x), k, i)\big)
# = \Phi\!\left(\frac{(x W_g)_i - \operatorname{kth\_excluding}(H(x), k, i)}{\sigma_i(x)}\right),$$
#
# with $\Phi$ the standard normal CDF. Summing over the batch gives a differentiable
# estimate of each expert's load, penalised like importance (eq. 10-11):
#
# $$\operatorname{Load}(X)_i = \sum_{x \in X} P(x, i),
# \qquad L_{\text{load}}(X) = w_{\text{load}} \cdot \operatorname{CV}\big(\operatorname{Load}(X)\big)^2.$$
#
# What is $\operatorname{kth\_excluding}(H(x), k, i)$? If expert $i$ is itself among the
# top `k` of $H(x)$, removing it promotes the next one: the threshold is the $(k+1)$-th
# largest entry of $H(x)$. If it is not, removing it changes nothing at the top: the
# threshold is the `k`-th largest.
#
# **Exercise 3 (2 points, challenge).** Write `load_loss(clean_logits, noisy_logits,
# noise_std, k, w_load=0.01)`. All three tensors are `(T, E)`: $x W_g$, $H(x)$ and
# $\sigma(x)$. Return $w_{\text{load}} \cdot \operatorname{CV}(\operatorname{Load})^2$,
# differentiable in `clean_logits` and `noise_std`.
#
# <details><summary>Hint 1: the idea</summary>
#
# For each token and expert you need the threshold $\operatorname{kth\_excluding}$: the
# `(k+1)`-th largest noisy logit if the expert is itself in the top `k`, the `k`-th largest
# otherwise. The numerator uses the *clean* logit of expert $i$ (the noise is what is being
# averaged over), the threshold the *noisy* ones; divide by `noise_std` and apply the
# standard normal CDF $\Phi(z) = \tfrac12(1 + \operatorname{erf}(z / \sqrt 2))$. Watch out for
# `k = E`: every expert is always chosen, there is no `(k+1)`-th logit, and $P = 1$. Keep
# it differentiable in `clean_logits` and `noise_std`.
# </details>
#
# <details><summary>Hint 2: the shape of the code</summary>
#
# ```python
# if k == n_experts:
#     prob = ...                                      # every expert always chosen
# else:
#     top = noisy_logits.topk(k + 1, dim=-1).values   # (T, k+1), descending
#     kth, after = top[:, k - 1 : k], top[:, k : k + 1]   # (T, 1) columns that broadcast
#     threshold = torch.where(..., after, kth)        # (T, E): is expert i in the top k?
#     prob = ...                                      # Phi((clean - threshold) / noise_std)
# ```
# `torch.distributions.Normal(0.0, 1.0).cdf(z)` is $\Phi$ too.
# </details>

# %% nbgrader={"grade": false, "grade_id": "ex03_load_loss", "locked": false, "schema_version": 3, "solution": true}
def load_loss(clean_logits, noisy_logits, noise_std, k, w_load=0.01):
    """Shazeer et al.'s smooth load loss, w_load * cv_squared(sum_x P(x, i)) (App. A)."""
    ### BEGIN SOLUTION
    n_experts = noisy_logits.shape[-1]
    if k >= n_experts:  # every expert is always in the top k
        prob = torch.ones_like(clean_logits)  # (T, E)
    else:
        top = noisy_logits.topk(k + 1, dim=-1).values  # (T, k+1), descending
        kth, after = top[:, k - 1 : k], top[:, k : k + 1]  # (T, 1) k-th, (T, 1) (k+1)-th
        in_top_k = noisy_logits >= kth  # (T, E)
        threshold = torch.where(in_top_k, after, kth)  # (T, E) kth_excluding(H(x), k, i)
        z = (clean_logits - threshold) / noise_std  # (T, E)
        prob = 0.5 * (1 + torch.erf(z / math.sqrt(2)))  # (T, E) P(x, i) = Phi(z), eq. 9
    return w_load * cv_squared(prob.sum(dim=0))  # eq. 10-11
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ex03_load_loss_tests", "locked": true, "points": 2, "schema_version": 3, "solution": false}
check("ex03_load_loss", load_loss)
### BEGIN HIDDEN TESTS
check("ex03_load_loss", load_loss, hidden=True)
### END HIDDEN TESTS

# %% [markdown]
# Does the smooth estimate follow the real thing? Below, 256 tokens are routed top-1 among
# four experts, and a bias $b$ on expert 0's logit makes the router more and more lopsided.
# For each $b$ we compare your load loss (with $w_{\text{load}} = 1$) with the
# $\operatorname{CV}^2$ of the actual token counts, averaged over noise draws. The two
# rise together, but only the smooth one has a gradient: the count is a step function of
# the logits.

# %%
def show_load_estimate():
    """Your load_loss against the CV^2 of the actual counts, as one expert is favoured."""
    gen = torch.Generator().manual_seed(3)
    n_tok, n_exp = 256, 4
    base = torch.randn(n_tok, n_exp, generator=gen)  # (T, E)
    std = torch.full((n_tok, n_exp), 0.5)  # (T, E) noise scale
    eps = torch.randn(20, n_tok, n_exp, generator=gen)  # 20 noise draws
    biases = torch.linspace(0, 2.5, 11)
    smooth, hard = [], []
    for b in biases:
        clean = base + b * F.one_hot(torch.tensor(0), n_exp)  # (T, E)
        noisy = clean + eps * std  # (20, T, E)
        draws = [load_loss(clean, n, std, k=1, w_load=1.0) for n in noisy]
        smooth.append(torch.stack(draws).mean())
        top1 = noisy.argmax(-1)  # (20, T)
        hard.append(torch.stack([cv_squared(torch.bincount(t, minlength=n_exp).float())
                                 for t in top1]).mean())

    clean = base.clone().requires_grad_(True)
    load_loss(clean, clean.detach() + eps[0] * std, std, k=1, w_load=1.0).backward()
    print(f"gradient of the load loss w.r.t. the clean logits: norm {clean.grad.norm():.3f}")
    print("tokens per expert at b = 2.5:", torch.bincount(top1[0], minlength=n_exp).tolist())

    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(biases, torch.stack(smooth), "o-", label="your load_loss (smooth, w = 1)")
    ax.plot(biases, torch.stack(hard), "s--", label="CV$^2$ of the actual counts")
    ax.set(xlabel="bias b on expert 0's logit", ylabel="imbalance",
           title="The smooth load estimate tracks the token counts")
    ax.legend(fontsize=8)
    plt.show()


# load_loss is a challenge: while it is still the stub, this demo skips itself.
if implemented(load_loss, torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), 1):
    show_load_estimate()
else:
    print("skipped: load_loss not implemented (the challenge of section 3: come back to it)")

# %% [markdown]
# ## 4 · The Switch Transformer loss
#
# Switch Transformer (Fedus et al. 2021) replaced the two losses above with one simpler
# term. For a batch of `T` tokens and `E` experts (eq. 4-6),
#
# $$L_{\text{aux}} = \alpha \cdot E \sum_{e=1}^{E} f_e\, P_e,
# \qquad f_e = \frac{1}{T} \sum_{x} \mathbb 1\{\operatorname{argmax} p(x) = e\},
# \qquad P_e = \frac{1}{T} \sum_{x} p_e(x),$$
#
# where $p(x) = \operatorname{softmax}$ of the router logits over *all* experts. $f_e$ is the
# share of tokens dispatched to expert $e$, a count and not differentiable; $P_e$ is the
# share of router probability it received, which is. The gradient flows through $P$ only,
# and $\partial L / \partial p_e(x) = \alpha E f_e / T$: the more tokens an expert already
# has, the harder its probability is pushed down. With uniform routing, $f_e = P_e = 1/E$
# and the sum is exactly 1, whatever `E`; if one expert takes every token with
# probability 1, it is `E`. Switch uses $\alpha = 10^{-2}$.
#
# With top-k routing each token makes `K` assignments. We define $f_e$ as the share of all
# `T*K` assignments that went to expert $e$, so $\sum_e f_e = 1$ and the uniform value is
# still 1. (Hugging Face's Mixtral implementation divides the counts by `T` instead, which
# multiplies the loss by `K`; the comparison is below.) We leave $\alpha$ out: the training
# code multiplies by it.
#
# **Exercise 4 (2 points).** Write `switch_aux_loss(router_probs, indices)`: `router_probs`
# is the `(T, E)` softmax over all experts and `indices` the `(T, K)` chosen experts.
# Return $E \sum_e f_e P_e$ as a 0-dimensional tensor, differentiable in `router_probs`.
#
# <details><summary>Hint 1: the idea</summary>
#
# Two vectors of length `E`. $f_e$ counts the assignments that went to expert $e$
# (all `K` choices of every token) and divides by their number, `T*K`: it is not
# differentiable and needs none. $P_e$ is the mean router probability of $e$ over the
# tokens: the gradient flows through it. Multiply, sum over experts, times `E`. A uniform
# router then scores exactly 1.
# </details>
#
# <details><summary>Hint 2: the shape of the code</summary>
#
# ```python
# counts = torch.bincount(indices.flatten(), minlength=...)   # (E,) assignments per expert
# f = counts.to(router_probs.dtype) / ...                     # share of the T*K
# p = ...                                                     # (E,) mean over the tokens
# ```
# </details>

# %% nbgrader={"grade": false, "grade_id": "ex03_switch_aux_loss", "locked": false, "schema_version": 3, "solution": true}
def switch_aux_loss(router_probs, indices):
    """(T, E) probabilities, (T, K) chosen experts -> E * sum_e f_e * P_e (Switch eq. 4-6)."""
    ### BEGIN SOLUTION
    n_experts = router_probs.shape[-1]
    counts = torch.bincount(indices.flatten(), minlength=n_experts)  # (E,) assignments
    f = counts.to(router_probs.dtype) / indices.numel()  # (E,) share of the T*K, eq. 5
    p = router_probs.mean(dim=0)  # (E,) mean router probability, eq. 6
    return n_experts * (f * p).sum()  # eq. 4 without alpha
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ex03_switch_aux_loss_tests", "locked": true, "points": 2, "schema_version": 3, "solution": false}
check("ex03_switch_aux_loss", switch_aux_loss)
### BEGIN HIDDEN TESTS
check("ex03_switch_aux_loss", switch_aux_loss, hidden=True)
### END HIDDEN TESTS

# %% [markdown]
# **Three routers, two conventions.** Below, 512 tokens meet eight experts with three
# routers: *uniform* (all logits equal, ties broken round-robin so that every expert gets
# the same count), *random* (standard normal logits) and *collapsed* (experts 0 and 1 far
# ahead of the rest). Beside your loss is Hugging Face's Mixtral convention,
# `load_balancing_loss_func` in `transformers`, written out here: it averages the one-hot
# assignments over the `T` tokens for each of the `K` choices and sums over both, so its
# $f$ sums to `K`, not 1. It is always exactly `K` times yours: a uniform router scores `K`
# there, and a coefficient tuned in one convention is `K` times too strong or too weak in
# the other.

# %%
def hf_mixtral_aux_loss(router_probs, indices):
    """Hugging Face's Mixtral load_balancing_loss_func for one layer: K times switch_aux_loss."""
    n_experts = router_probs.shape[-1]
    tokens_per_expert = F.one_hot(indices, n_experts).float().mean(dim=0)  # (K, E), sums to K
    return n_experts * (tokens_per_expert * router_probs.mean(dim=0)).sum()


n_tok, n_exp = 512, 8
gen = torch.Generator().manual_seed(4)
routers = {
    "uniform": torch.zeros(n_tok, n_exp),
    "random": torch.randn(n_tok, n_exp, generator=gen),
    "collapsed": torch.randn(n_tok, n_exp, generator=gen) + torch.tensor([10.0, 8.0] + [0.0] * 6),
}
print(f"{'router':>10} | {'K':>2} | {'yours':>7} | {'HF Mixtral':>10} | ratio")
for name, logits in routers.items():
    probs = torch.softmax(logits, dim=-1)  # (T, E)
    for k in (1, 2):
        if name == "uniform":  # all logits tie: give token t experts t, t+1, ... (round robin)
            idx = (torch.arange(n_tok)[:, None] + torch.arange(k)) % n_exp  # (T, K)
        else:
            idx = logits.topk(k, dim=-1).indices  # (T, K)
        ours, hf = switch_aux_loss(probs, idx), hf_mixtral_aux_loss(probs, idx)
        print(f"{name:>10} | {k:>2} | {ours:7.3f} | {hf:10.3f} | {hf / ours:.2f}")

# %% [markdown]
# The gradient is the balancing force. For a skewed router each token's gradient row is
# $E f_e / T$, the same for every token and largest for the busiest expert; descending it
# lowers that expert's probability everywhere. As the skew of a random router grows, the
# loss climbs from about 1 towards its maximum, `E` for top-1 (and `E / K` for top-`K` in
# our convention, where `K` distinct experts share each token).

# %%
logits = routers["random"] + torch.tensor([1.5, 0.5] + [0.0] * 6)  # (T, E) a mild skew
probs = torch.softmax(logits, dim=-1).requires_grad_(True)  # (T, E)
switch_aux_loss(probs, logits.argmax(-1, keepdim=True)).backward()
print("tokens per expert           ", torch.bincount(logits.argmax(-1), minlength=n_exp).tolist())
print("dL/dp for token 0, times T  ", (probs.grad[0] * n_tok).numpy().round(2))

skews = torch.linspace(0, 8, 17)
fig, ax = plt.subplots(figsize=(6, 3.2))
for k, style in ((1, "o-"), (2, "s-")):
    values = []
    for s in skews:
        lg = routers["random"] + s * F.one_hot(torch.arange(k), n_exp).sum(0)  # (T, E)
        values.append(float(switch_aux_loss(torch.softmax(lg, -1), lg.topk(k, -1).indices)))
    ax.plot(skews, values, style, ms=3, label=f"K = {k}: yours (HF: {k} x this)")
ax.axhline(1, color="gray", ls=":", lw=1)
ax.axhline(n_exp, color="gray", ls="--", lw=1)
ax.set(xlabel="skew s added to the first K experts' logits", ylabel="switch loss",
       title=f"From random to collapsed, E = {n_exp}")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# ## 5 · The router z-loss
#
# Balancing is not the only way a router misbehaves. ST-MoE (Zoph et al. 2022, Sec. 3) found
# that large sparse models were unstable, and traced much of it to the router: its logits
# drift to large magnitudes, and the exponentials in the softmax amplify the rounding
# errors of low-precision arithmetic. Their fix penalises the log-partition function of
# each token's logits (eq. 5), for a batch of `T` tokens:
#
# $$L_z = \frac{1}{T} \sum_{t=1}^{T} \Big(\log \sum_{e=1}^{E} e^{\ell_{t,e}}\Big)^2.$$
#
# The softmax does not change if a constant is added to a row of logits, so this loss
# costs the model nothing in expressiveness: it only pins down the scale, driving each
# row's log-sum-exp towards 0, i.e. the logits towards log-probabilities. ST-MoE weights it
# by $10^{-3}$.
#
# **Exercise 5 (1 point).** Write `router_z_loss(logits)` for `(T, E)` logits, returning a
# 0-dimensional tensor. It must not overflow for logits in the hundreds.
#
# <details><summary>Hint 1: the idea</summary>
#
# Per token, the log of the sum of the exponentiated logits (the log-partition
# function); square it; average over the tokens (eq. 5). The one thing to watch out for is
# overflow: `torch.exp` of a float32 logit above about 89 is `inf`, so
# `torch.log(torch.exp(logits).sum(-1))` breaks for logits in the hundreds. The log-sum-exp
# trick subtracts each row's maximum first, and torch has it built in.
# </details>
#
# <details><summary>Hint 2: the shape of the code</summary>
#
# ```python
# lse = torch.logsumexp(logits, dim=...)   # (T,), never overflows
# ```
# then square per token and take the mean.
# </details>

# %% nbgrader={"grade": false, "grade_id": "ex03_router_z_loss", "locked": false, "schema_version": 3, "solution": true}
def router_z_loss(logits):
    """(T, E) logits -> mean over tokens of logsumexp(logits)**2 (ST-MoE eq. 5)."""
    ### BEGIN SOLUTION
    log_partition = torch.logsumexp(logits, dim=-1)  # (T,)
    return (log_partition**2).mean()
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ex03_router_z_loss_tests", "locked": true, "points": 1, "schema_version": 3, "solution": false}
check("ex03_router_z_loss", router_z_loss)
### BEGIN HIDDEN TESTS
check("ex03_router_z_loss", router_z_loss, hidden=True)
### END HIDDEN TESTS

# %% [markdown]
# Zero logits over four experts score $(\log 4)^2 \approx 1.92$. Adding 10 to every logit
# leaves the softmax exactly as it was but raises the z-loss to about 130.
#
# Why care about the scale, if the softmax ignores it? Because numbers are stored with a
# fixed number of significant bits. `bfloat16`, the format most large models train in, keeps
# 8: the gap between neighbouring representable numbers is $2^{-7}$ near 1 but $2^{-2}$
# near 40. The figure rounds router logits with the same *differences* but a growing
# offset to `bfloat16` and measures how far the softmax moves: the larger the logits, the
# larger the error. That is the roundoff the z-loss keeps away.

# %%
zeros = torch.zeros(1, 4)
print(f"z-loss of zero logits         {float(router_z_loss(zeros)):.3f}")
print(f"z-loss of zero logits + 10    {float(router_z_loss(zeros + 10)):.3f}")
print("same softmax?                ", torch.allclose(torch.softmax(zeros, -1),
                                                      torch.softmax(zeros + 10, -1)))

gen = torch.Generator().manual_seed(5)
spread = torch.randn(1000, 8, generator=gen)  # (T, E) logits with offset 0
offsets = 2.0 ** torch.arange(-2, 9)
errors = []
for c in offsets:
    exact = torch.softmax(spread, dim=-1)  # the softmax ignores c
    rounded = torch.softmax((spread + c).bfloat16().float(), dim=-1)
    errors.append(float((rounded - exact).abs().max()))
fig, ax = plt.subplots(figsize=(6, 3.2))
ax.loglog(offsets, errors, "o-")
ax.set(xlabel="offset c added to every logit", ylabel="max |softmax error|",
       title="Rounding the logits to bfloat16")
plt.show()

# %% [markdown]
# ## 6 · Expert capacity
#
# The losses above ask for balance; capacity enforces it. Accelerators want tensors of fixed
# shape, so each expert gets a buffer of `C` slots per batch (GShard Sec. 2.2; Switch
# eq. 3):
#
# $$C = \min\!\Big(T,\ \Big\lceil \frac{K \cdot T \cdot \text{capacity\_factor}}{E} \Big\rceil\Big).$$
#
# `K*T/E` is each expert's share if the router were perfectly balanced; the capacity factor
# adds slack on top of it (Switch Transformer works well with 1.0 to 1.25). The ceiling
# makes sure `C * E` slots hold all `K * T * factor` assignments, and no expert ever needs
# more than `T` slots, since a token is sent to any one expert at most once.
#
# **Exercise 6 (1 point).** Write `expert_capacity(n_tokens, n_experts, capacity_factor,
# k=1)`, returning a Python `int`. Raise a `ValueError` that says what the factor was and
# what it must be if `capacity_factor <= 0`.
#
# <details><summary>Hint 1: the idea</summary>
#
# Check the factor first and raise a `ValueError` that shows its value if it is not
# `> 0`: a factor of 0 would quietly give every expert 0 slots and drop every token. Then
# each expert's fair share of the `k * T` assignments is `k * T / E`; multiply by the
# factor, round *up*, and cap at `T` (an expert sees a token at most once). Return a Python
# `int`.
# </details>
#
# <details><summary>Hint 2: the shape of the code</summary>
#
# ```python
# if not capacity_factor > 0:
#     raise ValueError(f"capacity_factor must be > 0; got {...}")
# slots = math.ceil(...)    # rounds up and returns an int
# ```
# </details>

# %% nbgrader={"grade": false, "grade_id": "ex03_expert_capacity", "locked": false, "schema_version": 3, "solution": true}
def expert_capacity(n_tokens, n_experts, capacity_factor, k=1):
    """Slots per expert: min(T, ceil(k * T * capacity_factor / E)); ValueError if factor <= 0."""
    ### BEGIN SOLUTION
    if not capacity_factor > 0:
        raise ValueError(f"capacity_factor must be > 0; got {capacity_factor!r}")
    return min(n_tokens, math.ceil(k * n_tokens * capacity_factor / n_experts))
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ex03_expert_capacity_tests", "locked": true, "points": 1, "schema_version": 3, "solution": false}
check("ex03_expert_capacity", expert_capacity)
### BEGIN HIDDEN TESTS
check("ex03_expert_capacity", expert_capacity, hidden=True)
### END HIDDEN TESTS

# %% [markdown]
# A few layer sizes. With `T = 4096` tokens over 64 experts, top-1 and factor 1.0, each
# expert has 64 slots; top-2 doubles that; and a factor of 1.25 buys 25% slack.

# %%
print(f"{'T':>5} {'E':>3} {'K':>2} {'factor':>6} -> C")
for t, e, k, cf in [(8, 4, 1, 1.0), (8, 4, 1, 1.25), (8, 4, 2, 1.0), (4096, 64, 1, 1.0),
                    (4096, 64, 2, 1.0), (4096, 64, 1, 1.25), (10, 2, 1, 4.0)]:
    print(f"{t:>5} {e:>3} {k:>2} {cf:>6} -> {expert_capacity(t, e, cf, k)}")
try:
    expert_capacity(8, 4, 0.0)
except ValueError as err:
    print("expert_capacity(8, 4, 0.0) raised ValueError:", err)

# %% [markdown]
# ## 7 · Who gets a slot: GShard priority
#
# When an expert's buffer is full, *which* assignments are dropped? Each assignment takes
# the next free slot of its expert, so the order in which assignments are placed decides.
# Placing token by token (token 0's choices, then token 1's, ...) can drop a late token's
# *first* choice to make room for an early token's *second* choice, its less important
# one. GShard (Lepikhin et al. 2020, Algorithm 1) places by **choice rank**: first
# all tokens' first choices, in token order, then all second choices, and so on. A second
# choice only ever takes a slot that no first choice wanted.
#
# **Exercise 7 (2 points).** Write `capacity_positions(indices, n_experts)`: `indices` is
# `(T, K)`, column `j` the tokens' `(j+1)`-th choices. Return a `(T, K)` integer tensor
# whose entry `[t, j]` is the slot (0, 1, 2, ...) that assignment takes in expert
# `indices[t, j]`'s buffer under GShard priority. Ignore the capacity here; the next
# exercise drops the slots past it.
#
# <details><summary>Hint 1: the idea</summary>
#
# Think of a counter per expert that starts at 0. Visit the assignments in GShard's
# priority order: *all* first choices in token order, then all second choices, and so on.
# Each assignment takes its expert's current counter as its slot, then the counter goes up
# by one. With two nested loops the order of the loops (choice rank outside, tokens inside)
# is the whole point; a loop version is fine to start with.
# </details>
#
# <details><summary>Hint 2: the shape of the code (without a Python loop)</summary>
#
# ```python
# by_rank = indices.t().reshape(-1)          # (K*T,): first choices, then second, ...
# one_hot = F.one_hot(by_rank, n_experts)    # (K*T, E)
# seen = one_hot.cumsum(dim=0)               # per expert, assignments so far (this one too)
# slot = ...                                 # each row's own expert's count, minus 1
# ```
# then reshape the `(K*T,)` slots to `(K, T)` and transpose back to `(T, K)`.
# </details>

# %% nbgrader={"grade": false, "grade_id": "ex03_capacity_positions", "locked": false, "schema_version": 3, "solution": true}
def capacity_positions(indices, n_experts):
    """(T, K) chosen experts -> (T, K) slot of each assignment in its expert's buffer."""
    ### BEGIN SOLUTION
    n_tokens, k = indices.shape
    by_rank = indices.t().reshape(-1).long()  # (K*T,) first choices, then second choices, ...
    one_hot = F.one_hot(by_rank, n_experts)  # (K*T, E)
    slot = (one_hot.cumsum(dim=0) * one_hot).sum(dim=-1) - 1  # (K*T,) earlier same-expert count
    return slot.reshape(k, n_tokens).t()  # (T, K)
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ex03_capacity_positions_tests", "locked": true, "points": 2, "schema_version": 3, "solution": false}
check("ex03_capacity_positions", capacity_positions)
### BEGIN HIDDEN TESTS
check("ex03_capacity_positions", capacity_positions, hidden=True)
### END HIDDEN TESTS

# %% [markdown]
# **A small example.** Three tokens pick two of three experts, and every expert has
# `C = 2` slots. Tokens 0 and 1 both rank expert 0 first and expert 1 second; token 2 ranks
# expert 1 first. Token by token, expert 1's two slots go to the *second* choices of tokens
# 0 and 1, and token 2's first choice finds the buffer full (its second choice too: token
# 2 gets no expert at all). With GShard priority token 2's
# first choice is placed before anyone's second choice and keeps its slot; what is dropped
# instead is token 1's second choice (and token 2's own second choice, expert 0, whose
# slots went to first choices). The figure draws both buffers: each box is one slot,
# labelled `token.rank`; the red column is past the capacity.

# %%
small = torch.tensor([[0, 1], [0, 1], [1, 0]])  # (T, K) = (3, 2)


def token_order_positions(indices, n_experts):
    """Slots filled token by token (not GShard): the order to avoid, for comparison."""
    filled, slots = [0] * n_experts, torch.zeros_like(indices)
    for t in range(indices.shape[0]):
        for j in range(indices.shape[1]):
            e = int(indices[t, j])
            slots[t, j], filled[e] = filled[e], filled[e] + 1
    return slots


gshard = capacity_positions(small, 3)
naive = token_order_positions(small, 3)
print("choices (T, K)     ", small.tolist())
print("GShard slots       ", gshard.tolist(), " kept at C = 2:", (gshard < 2).tolist())
print("token-order slots  ", naive.tolist(), " kept at C = 2:", (naive < 2).tolist())

fig, axes = plt.subplots(1, 2, figsize=(9, 2.6))
for ax, slots, title in ((axes[0], naive, "token by token"), (axes[1], gshard, "GShard priority")):
    ax.axvspan(1.5, 3.5, color="crimson", alpha=0.12)
    for t in range(small.shape[0]):
        for j in range(small.shape[1]):
            e, s = int(small[t, j]), int(slots[t, j])
            ax.add_patch(plt.Rectangle((s - 0.45, e - 0.4), 0.9, 0.8,
                                       color=("tab:blue", "tab:orange")[j], alpha=0.8))
            ax.text(s, e, f"{t}.{j + 1}", ha="center", va="center", color="white", fontsize=10)
    ax.set(xlim=(-0.6, 3.5), ylim=(2.6, -0.6), xticks=range(4), yticks=range(3),
           xlabel="slot (C = 2: slots 2 and up are dropped)", ylabel="expert", title=title)
axes[1].legend(handles=[plt.Rectangle((0, 0), 1, 1, color=c, alpha=0.8)
                        for c in ("tab:blue", "tab:orange")],
               labels=["first choice", "second choice"], fontsize=8, loc="lower right")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 8 · Dropping what does not fit
#
# With the slots known, the capacity limit is one comparison: an assignment is kept if its
# slot is below `C`. A dropped assignment gets weight 0, so it adds exactly nothing to the
# token's output. The kept weights are *not* renormalised: if a token loses its second
# expert, its first expert still contributes with its original weight. A token that loses
# every assignment gets a mixture output of exactly 0, and because the layer sits inside a
# residual connection, $y = x + \operatorname{MoE}(x)$, it passes through unchanged (Switch
# Transformer Sec. 2.2: "the token representation is passed directly to the next layer
# through the residual connection").
#
# **Exercise 8 (2 points).** Write `apply_capacity(weights, indices, capacity)`: `weights`
# and `indices` are `(T, K)` (say, from `top_k_gating`). Return the pair `(weights, keep)`:
# the weights with dropped assignments set to 0, and a `(T, K)` boolean `keep`, False where
# the slot is `>= capacity`. Use your `capacity_positions`; take the number of experts as
# one more than the largest index. Do not modify the input tensors.
#
# <details><summary>Hint 1: the idea</summary>
#
# An assignment is kept when its slot (your `capacity_positions`) is below the capacity.
# A dropped one gets weight 0; the kept weights stay exactly as they were (no
# renormalising: the dropped share rides the residual connection), so a token dropped
# everywhere gets all-zero weights. Build new tensors: never write into the caller's
# `weights`.
# </details>
#
# <details><summary>Hint 2: the shape of the code</summary>
#
# ```python
# n_experts = int(indices.max()) + 1
# keep = ...                                  # (T, K) bool: slot < capacity
# new_weights = torch.where(keep, ..., ...)   # a new tensor; weights[~keep] = 0 would not be
# ```
# </details>

# %% nbgrader={"grade": false, "grade_id": "ex03_apply_capacity", "locked": false, "schema_version": 3, "solution": true}
def apply_capacity(weights, indices, capacity):
    """(T, K) weights and experts -> (weights with dropped assignments zeroed, keep (T, K) bool)."""
    ### BEGIN SOLUTION
    n_experts = int(indices.max()) + 1
    keep = capacity_positions(indices, n_experts) < capacity  # (T, K)
    return torch.where(keep, weights, torch.zeros_like(weights)), keep
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ex03_apply_capacity_tests", "locked": true, "points": 2, "schema_version": 3, "solution": false}
check("ex03_apply_capacity", apply_capacity)
### BEGIN HIDDEN TESTS
check("ex03_apply_capacity", apply_capacity, hidden=True)
### END HIDDEN TESTS

# %% [markdown]
# The small example again, with weights: token 1 keeps its first expert at weight 0.6 (not
# renormalised to 1), and token 2 keeps only its first.

# %%
small_weights = torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.8, 0.2]])  # (T, K)
kept_weights, keep = apply_capacity(small_weights, small, capacity=2)
print("weights     ", small_weights.numpy().round(2).tolist())
print("after C = 2 ", kept_weights.numpy().round(2).tolist())
print("keep        ", keep.tolist())

# %% [markdown]
# **How much is dropped?** The drop rate depends on the capacity factor and on how balanced
# the router is. For a perfectly balanced router every expert receives exactly `K*T/E`
# assignments, so nothing is dropped from a factor of 1 on and a share $1 - \text{factor}$
# below it (the dotted line). A random router is nearly balanced and needs a little slack;
# a skewed one, whose busiest expert gets several times its share, still drops tokens at
# a factor of 2. That is the price of imbalance once capacity is fixed: dropped tokens
# or wasted slots, which is why capacity and balancing losses go together.

# %%
n_tok, n_exp = 2048, 8
gen = torch.Generator().manual_seed(6)
skew = torch.tensor([1.6, 1.2, 0.8, 0.4, 0.0, 0.0, 0.0, 0.0])  # (E,) favourite experts
balanced_logits = torch.randn(n_tok, n_exp, generator=gen)  # (T, E)
skewed_logits = torch.randn(n_tok, n_exp, generator=gen) + skew  # (T, E)
factors = torch.arange(0.5, 2.01, 0.125).tolist()


def drop_rate(logits, k, factor):
    """Share of the T*K assignments dropped at this capacity factor, with your functions."""
    weights, indices = torch.softmax(logits, -1).topk(k, dim=-1)  # (T, K), (T, K)
    capacity = expert_capacity(logits.shape[0], logits.shape[1], factor, k)
    return 1.0 - float(apply_capacity(weights, indices, capacity)[1].float().mean())


fig, ax = plt.subplots(figsize=(6.4, 3.4))
ax.plot(factors, [max(0.0, 1 - f) for f in factors], ":", color="gray", label="perfect balance")
for name, lg, color in (("random router", balanced_logits, "tab:blue"),
                        ("skewed router", skewed_logits, "tab:red")):
    for k, style in ((1, "o-"), (2, "s--")):
        rates = [drop_rate(lg, k, f) for f in factors]
        ax.plot(factors, rates, style, color=color, ms=3, label=f"{name}, K = {k}")
        print(f"{name}, K = {k}: drop rate {rates[4]:.1%} at factor 1.0, {rates[-1]:.1%} at 2.0")
ax.set(xlabel="capacity factor", ylabel="share of assignments dropped",
       title=f"T = {n_tok}, E = {n_exp}")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# ## 9 · Expert collapse, and the loss that prevents it
#
# Now the experiment this notebook is about. We build a Switch layer (Fedus et al.
# Sec. 2.1) from your functions: a router, top-1 routing in which the chosen expert's output
# is scaled by its router probability $p_e(x)$ (not renormalised to 1, so that the router
# gets a gradient: the `k = 1` question of notebook 02), an optional capacity limit, and a
# residual connection. It returns its losses and, in `expert_load`, how many tokens each
# expert processed, which `moe_course.train` records at every step.
#
# The task is notebook 01's: points of the square $[-1, 1]^2$ whose four quadrants need four
# different functions, here with `E = 8` experts. Then we train the same model from the
# same initial weights, on the same batches, twice: once on the mean squared error alone,
# once with your Switch loss added with weight $\alpha = 0.2$ (twenty times Switch's
# $10^{-2}$: our task loss is small, and we train for 150 steps rather than tens of
# thousands). The router's weights start with standard deviation 2, so its probabilities
# are confident from the first step. (While a grader runs this notebook, `train` stops
# after a few steps, so the numbers below then mean nothing.)

# %%
class SwitchOutput(NamedTuple):
    """What SwitchMoE returns; moe_course.train records `expert_load` at every step."""

    y: torch.Tensor  # (T, D) x plus the mixture; a dropped token's row is x itself
    aux_loss: torch.Tensor  # scalar, your switch_aux_loss
    z_loss: torch.Tensor  # scalar, your router_z_loss
    logits: torch.Tensor  # (T, E) router logits
    keep: torch.Tensor  # (T, 1) bool, False where the token was dropped
    expert_load: torch.Tensor  # (E,) tokens each expert processed in this call


class SwitchMoE(nn.Module):
    """Switch Transformer's top-1 layer with a residual connection, built from your functions."""

    def __init__(self, d_model, d_hidden, n_experts, router_std=2.0, capacity_factor=None):
        super().__init__()
        self.router = nn.Linear(d_model, n_experts, bias=False)  # W_r
        nn.init.normal_(self.router.weight, std=router_std)
        self.experts = nn.ModuleList(Expert(d_model, d_hidden) for _ in range(n_experts))
        self.capacity_factor = capacity_factor  # None: unlimited slots

    def forward(self, x):
        n_tokens, n_experts = x.shape[0], len(self.experts)
        logits = self.router(x)  # (T, E)
        probs = torch.softmax(logits, dim=-1)  # (T, E)
        gate, indices = probs.max(dim=-1, keepdim=True)  # (T, 1), (T, 1): top-1, Switch eq. 2
        keep = torch.ones_like(indices, dtype=torch.bool)  # (T, 1)
        if self.capacity_factor is not None:
            capacity = expert_capacity(n_tokens, n_experts, self.capacity_factor)
            gate, keep = apply_capacity(gate, indices, capacity)  # (T, 1), (T, 1)
        y = x + sparse_moe(x, self.experts, gate, indices)  # (T, D): a dropped row adds 0
        load = torch.bincount(indices[keep], minlength=n_experts).float()  # (E,)
        return SwitchOutput(y, switch_aux_loss(probs, indices), router_z_loss(logits), logits,
                            keep, load)


class SwitchRegressor(nn.Module):
    """embed (2 -> D) -> SwitchMoE -> read out one number."""

    def __init__(self, n_experts=8, d_model=16, d_hidden=32, **moe_options):
        super().__init__()
        self.embed = nn.Linear(2, d_model)
        self.moe = SwitchMoE(d_model, d_hidden, n_experts, **moe_options)
        self.readout = nn.Linear(d_model, 1)

    def forward(self, x):
        out = self.moe(self.embed(x))
        return self.readout(out.y), out


data = regions_task(2048, seed=0)
test = regions_task(1024, seed=1)
STEPS, BATCH = 150, 256
batches = torch.randint(0, len(data.x), (STEPS, BATCH), generator=torch.Generator().manual_seed(0))


def fit(aux_weight, z_weight=0.0, seed=0, desc=None):
    """Train a fresh SwitchRegressor; return it, its History and each step's mean logsumexp."""
    torch.manual_seed(seed)
    model = SwitchRegressor()
    log_partition = []

    def loss_fn(model, idx):
        prediction, out = model(data.x[idx])
        log_partition.append(float(torch.logsumexp(out.logits.detach(), dim=-1).mean()))
        mse = F.mse_loss(prediction, data.y[idx])
        return mse + aux_weight * out.aux_loss + z_weight * out.z_loss

    history = train(model, loss_fn, lambda step: batches[step], steps=STEPS, lr=3e-2,
                    seed=seed, desc=desc)
    return model, history, torch.tensor(log_partition)


def test_mse(model):
    with torch.no_grad():
        return float(F.mse_loss(model(test.x)[0], test.y))


model_none, hist_none, lse_none = fit(aux_weight=0.0, desc="no balancing loss")
model_switch, hist_switch, lse_switch = fit(aux_weight=0.2, desc="switch loss")
LAST = min(20, hist_none.steps)  # average the final load over the last 20 steps
for name, model, hist in (("no balancing loss", model_none, hist_none),
                          ("switch loss", model_switch, hist_switch)):
    load = hist.final_load(LAST)[0]  # (E,) share of tokens per expert
    print(f"{name:>17}: max/min load ratio {float(hist.max_min_ratio(LAST)[0]):6.2f}   "
          f"idle experts {int((load == 0).sum())}   busiest expert {float(load.max()):.0%}   "
          f"test MSE {test_mse(model):.4f}")

# %% [markdown]
# The numbers above are this run's. Without the loss, several experts end with no tokens at
# all (a max/min ratio of `inf`); with the Switch loss every expert is busy, the busiest
# getting less than twice the share of the idlest. (Over ten seeds we tried, the run
# without the loss always ended with three or four of the eight experts idle; with the
# loss, none did, and the ratio stayed below 1.9.)
#
# The figure shows how it happens: each line is one expert's share of the batch at each
# step, the dotted line the fair share $1/E$. A random linear router on a two-dimensional
# input is lopsided from the start: it cuts the square into convex cells, and most of the
# eight experts win no cell at all, so two to four experts share every token at step 0.
# Without the loss nothing repairs this: an expert that gets no tokens gets no gradient,
# never improves, and so never becomes worth routing to. The run ends with a few experts
# doing nearly all the work and the rest idle. With the Switch loss, the gradient
# $\alpha E f_e / T$ lowers the probability of the crowded experts on every token, until
# the idle ones start winning tokens and learning from them.
#
# Compare the test errors too. This task has four regions, so four experts are enough, and
# the collapsed model fits it at least as well as the balanced one. Collapse costs
# something else: half the layer's parameters do nothing, and once each expert's buffer
# has a fixed size the busiest expert cannot take all its tokens, which section 11
# measures. Section 12 builds a task on which collapse does cost quality.

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.4), sharey=True)
for ax, hist, title in ((axes[0], hist_none, "no balancing loss"),
                        (axes[1], hist_switch, "switch loss, alpha = 0.2")):
    load = hist.load[:, 0, :]  # (steps, E)
    for e in range(load.shape[1]):
        ax.plot(load[:, e], lw=1.2, color=plt.cm.tab10(e), label=f"expert {e}")
    ax.axhline(1 / load.shape[1], color="gray", ls=":", lw=1.2)
    ax.set(xlabel="training step", title=title)
axes[0].set_ylabel("share of the batch's tokens")
axes[1].legend(fontsize=7, ncol=2)
plt.tight_layout()
plt.show()

# %% [markdown]
# The same two runs in the `LoadTimeline` widget: drag the step slider to see the load of
# every expert at that step, and the training loss below. (Without a widget frontend, for
# example in a rendered copy of this notebook, it shows the last step as a picture.)

# %%
LoadTimeline(hist_none, hist_switch, labels=("no balancing loss", "switch loss"))

# %% [markdown]
# ## 10 · The z-loss during training
#
# Your `router_z_loss` is computed in every forward pass but has had weight 0 so far. We
# train a third model with both losses, the z-loss weighted $10^{-3}$ as in ST-MoE, and
# follow the mean log-sum-exp of the router logits, the quantity the z-loss squares.
# Without the z-loss nothing holds it down: in the collapsing run it climbs steadily as the
# router grows ever more certain of its favourites, and with the Switch loss alone it stays
# where the initialisation put it. With the z-loss it is pulled down towards 0: the logits
# approach log-probabilities, small numbers that `bfloat16` rounds finely. The
# last column measures what section 5 warned about, on the trained routers: how far the
# softmax moves when the logits are rounded to `bfloat16`.
#
# On this toy the z-loss also costs some accuracy (compare the test errors): pulling the
# logits down flattens the top-1 probability that scales each expert's output. ST-MoE
# reports that at scale it stabilises training without degrading quality.

# %%
model_z, hist_z, lse_z = fit(aux_weight=0.2, z_weight=1e-3, desc="switch + z-loss")
print(f"switch + z-loss: max/min load ratio {float(hist_z.max_min_ratio(LAST)[0]):.2f}, "
      f"test MSE {test_mse(model_z):.4f}")
for name, model, lse in (("no balancing loss", model_none, lse_none),
                         ("switch loss", model_switch, lse_switch),
                         ("switch + z-loss", model_z, lse_z)):
    with torch.no_grad():
        logits = model.moe(model.embed(test.x)).logits  # (T, E)
    error = (torch.softmax(logits.bfloat16().float(), -1) - torch.softmax(logits, -1)).abs()
    print(f"{name:>17}: mean logsumexp {float(lse[0]):.2f} at step 0 -> {float(lse[-1]):.2f}, "
          f"largest softmax error from bfloat16 logits {float(error.max()):.4f}")

fig, ax = plt.subplots(figsize=(6.4, 3.4))
ax.plot(lse_none, label="no balancing loss")
ax.plot(lse_switch, label="switch loss")
ax.plot(lse_z, label="switch loss + z-loss")
ax.axhline(0, color="gray", lw=0.8)
ax.set(xlabel="training step", ylabel="mean logsumexp of the router logits",
       title="The z-loss pins the logits' scale")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# ## 11 · Capacity in the trained models
#
# Back to capacity, now with the routers we trained. Each routes the 2048 training points
# top-1; we sweep the capacity factor with your functions. The balanced router drops
# little once the factor passes 1; the collapsed one, whose busiest expert wants several
# times its share of slots, drops a large part of the batch even at a factor of 2.

# %%
trained = {"no balancing loss": model_none, "switch loss": model_switch}
with torch.no_grad():
    trained_logits = {name: model.moe(model.embed(data.x)).logits  # (T, E)
                      for name, model in trained.items()}
fig, ax = plt.subplots(figsize=(6.4, 3.4))
ax.plot(factors, [max(0.0, 1 - f) for f in factors], ":", color="gray", label="perfect balance")
for name, logits in trained_logits.items():
    rates = [drop_rate(logits, 1, f) for f in factors]
    ax.plot(factors, rates, "o-", ms=3, label=f"trained, {name}")
    print(f"{name:>17}: drop rate {rates[4]:.1%} at factor 1.0, {rates[6]:.1%} at 1.25, "
          f"{rates[-1]:.1%} at 2.0")
ax.set(xlabel="capacity factor", ylabel="share of tokens dropped",
       title="Top-1 routers trained with and without the switch loss")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# **Dropped tokens ride the residual.** Give copies of both trained layers a capacity factor
# of 1.0 and run them on a grid of points. For every dropped token the layer's output is
# exactly its input, bit for bit: the experts added nothing. The collapsed model loses the
# experts' help on a large part of the square (red in the middle panel), and its error
# grows many times over; the balanced model loses far less.

# %%
grid = region_grid(100)
capped = {name: copy.deepcopy(model) for name, model in trained.items()}
for model in capped.values():
    model.moe.capacity_factor = 1.0
with torch.no_grad():
    h_grid = capped["no balancing loss"].embed(grid.x)  # (T, D) the layer's input
    out_grid = capped["no balancing loss"].moe(h_grid)
dropped = ~out_grid.keep[:, 0]  # (T,)
print(f"collapsed model at capacity factor 1.0: {float(dropped.float().mean()):.1%} of the "
      f"grid dropped; output == input for all of them: "
      f"{torch.equal(out_grid.y[dropped], h_grid[dropped])}")
for name in trained:
    print(f"{name:>17}: test MSE {test_mse(trained[name]):.4f} with unlimited slots, "
          f"{test_mse(capped[name]):.4f} at capacity factor 1.0")

with torch.no_grad():
    route_grid = model_none.moe(model_none.embed(grid.x)).logits.argmax(-1)  # (T,)
    pred_capped = capped["no balancing loss"](grid.x)[0]  # (T, 1)
fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
axes[0].scatter(grid.x[:, 0], grid.x[:, 1], c=route_grid, cmap="tab10", vmin=0, vmax=9, s=3)
axes[0].set(title="collapsed router: expert per point", aspect="equal")
axes[1].scatter(grid.x[:, 0], grid.x[:, 1], c=dropped, cmap="coolwarm", vmin=0, vmax=1, s=3)
axes[1].set(title="dropped at capacity factor 1.0 (red)", aspect="equal")
error_map = (pred_capped - grid.y).abs()[:, 0]  # (T,)
image = axes[2].scatter(grid.x[:, 0], grid.x[:, 1], c=error_map, cmap="magma", s=3)
axes[2].set(title="|error| of the capped model", aspect="equal")
fig.colorbar(image, ax=axes[2])
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 12 · Shazeer's Table 6 in miniature: a task on which collapse costs quality
#
# Shazeer et al. (2017, Appendix A, Table 6) trained the same language model, their MoE-256
# (256 experts, 272.9 million parameters outside the embedding and softmax, their Appendix
# C), for 10 epochs on the One Billion Word benchmark, with different weights for the two
# losses of sections 2 and 3, and reported the test perplexity, the coefficient of
# variation (CV, the standard deviation over the mean, not squared) of Importance and of
# Load, and the busiest expert's load over the mean load. Three of their rows:
#
# | $w_{importance}$ | $w_{load}$ | test perplexity | CV(Importance) | CV(Load) | max/mean load |
# |---|---|---|---|---|---|
# | 0 | 0 | 39.8 | 3.04 | 3.01 | 17.80 |
# | 0.2 | 0 | 35.6 | 0.06 | 0.17 | 1.47 |
# | 0.1 | 0.1 | 35.6 | 0.06 | 0.05 | 1.14 |
#
# Without either loss the load is wildly uneven and the model clearly worse; with either
# one, the quality is about the same, and the load loss is what brings the busiest expert
# down to its share.
#
# Here is the same experiment at a size that trains in a second. The task
# (`moe_course.experiments.clusters_task`) has eight clusters of points in $\mathbb{R}^8$,
# each with its own linear target, so one small expert can serve about one cluster well; all
# cluster centres share a large common offset, as hidden states do, so whatever raises an
# expert's logit for one token raises it for all: the rich-get-richer loop of section 9. The
# layer is Shazeer's: noisy top-2 of 8 experts (eq. 3-5) with both router matrices
# initialised to zero, as their Appendix A does, then a linear readout.
# `moe_course.experiments.train_balancing` trains it for 200 steps with **your**
# `importance_loss`, `load_loss` and `switch_aux_loss` in four ways: no balancing loss;
# importance only ($w_{importance} = 0.1$); importance and load ($0.1$ each); and the
# Switch loss ($\alpha = 0.1$) instead. Three seeds each; every entry below is the mean
# over the seeds with the smallest and largest value in brackets. Load here counts the
# assignments each expert gets (Shazeer's Load(X) is the smooth estimate of that count you
# wrote in section 3). The last two columns evaluate the trained routers with a capacity of
# factor 1.0, as on hardware with fixed expert buffers: the share of assignments dropped,
# and the validation error when dropped assignments contribute nothing.

# %%
from moe_course.experiments import BALANCING, band, train_balancing  # noqa: E402

SEEDS = (0, 1, 2)
your_losses = {"importance_loss": importance_loss, "load_loss": load_loss,
               "switch_aux_loss": switch_aux_loss}
# load_loss is the challenge: while it is still the stub, its row is left out
ways = [name for name in BALANCING if name != "importance + load"
        or implemented(load_loss, torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), 1)]
balancing_runs = {name: [train_balancing(name, seed=seed, losses=your_losses) for seed in SEEDS]
                  for name in ways}
columns = {"val MSE": "val_loss", "CV(importance)": "cv_importance", "CV(load)": "cv_load",
           "max/mean load": "max_over_mean", "dropped at 1.0": "dropped",
           "val MSE at 1.0": "val_loss_capped"}
table6 = {name: {col: band([getattr(r, field) for r in runs]) for col, field in columns.items()}
          for name, runs in balancing_runs.items()}
print(f"{'':18s}" + "".join(f"{col:>22s}" for col in columns))
for name, row in table6.items():
    print(f"{name:18s}" + "".join(f"{str(b):>22s}" for b in row.values()))

fig, axes = plt.subplots(1, 2, figsize=(12, 3.6), gridspec_kw={"width_ratios": [1.3, 1]})
width = 0.2
for j, (name, runs) in enumerate(balancing_runs.items()):
    # each seed's loads sorted from busiest to idlest, then the mean and range over seeds
    loads = torch.stack([r.load.sort(descending=True).values for r in runs])  # (seeds, E)
    xs = torch.arange(loads.shape[1]) + (j - (len(ways) - 1) / 2) * width
    axes[0].bar(xs, loads.mean(0), width=width, label=name,
                yerr=torch.stack([loads.mean(0) - loads.min(0).values,
                                  loads.max(0).values - loads.mean(0)]), capsize=2)
    for k, col in enumerate(("val MSE", "val MSE at 1.0")):
        b = table6[name][col]
        axes[1].errorbar(j + (k - 0.5) * 0.25, b.mean, yerr=[[b.mean - b.low], [b.high - b.mean]],
                         fmt="os"[k], color=f"C{j}", capsize=3,
                         label=("no capacity", "capacity factor 1.0")[k] if j == 0 else None)
axes[0].axhline(1 / 8, color="gray", ls=":", lw=1.2)
axes[0].set(xlabel="experts, busiest first", ylabel="share of assignments",
            title="load per expert (mean and range over 3 seeds)")
axes[0].legend(fontsize=8)
axes[1].set(xticks=range(len(ways)), xticklabels=ways, ylabel="validation MSE",
            title="quality (mean and range over 3 seeds)")
axes[1].tick_params(axis="x", labelsize=8)
axes[1].legend(fontsize=8)
plt.tight_layout()
plt.show()
if len(ways) < len(BALANCING):
    print("(importance + load left out: load_loss is not implemented yet, the challenge of "
          "section 3)")

# %% [markdown]
# The numbers are this run's; the pattern below held on each of the three seeds.
#
# - **Collapse costs quality here.** Without a balancing loss, two to four of the eight
#   experts end up with almost every assignment (max/mean load about 3.5, CV about 1.4 to
#   1.6), and the validation error is the worst of the four on every seed, about 0.65
#   against about 0.35 to 0.40 with any loss. Eight clusters need more than the few experts
#   a collapsed router keeps busy. Under a capacity factor of 1.0 the collapsed router
#   drops more than half of its assignments, and its error grows about fourfold; with
#   importance plus load, or the Switch loss, about a sixth to a fifth is dropped and the
#   error grows far less (importance alone, still lopsided, drops nearly half).
# - **The trend of Table 6.** As in the paper, any loss is much better than none, and
#   adding the load loss to the importance loss is what brings the busiest expert down:
#   importance alone still leaves max/mean near 2.8 here, importance plus load near 1.7
#   (the paper: 1.47 and 1.14). The Switch loss, one term on the counts times the
#   probabilities, balances about as well as importance plus load.
# - **Where the miniature differs.** Our CVs stay far above the paper's 0.06: 200 steps on
#   a toy are not 10 epochs of the One Billion Word benchmark, and CV over 8 experts is
#   noisier than over 256. The three balanced variants give similar quality, as in the
#   paper; importance plus load had the lowest mean error here, but its range is close to
#   the others', and the seeds do not separate importance only from the Switch loss.

# %% [markdown]
# ## 13 · Explore: Switch routing with capacity
#
# `RoutingExplorer` routes tokens with the reference versions of this notebook's functions
# and draws the result: the token-by-expert gate matrix with dropped assignments crossed
# out, each expert's load against its capacity line, and how many experts each token got.
# It starts here with 48 tokens of the *collapsed* router you trained, Switch top-1 at
# capacity factor 1.0. Raise the capacity factor and watch the drops disappear; raise the
# temperature (which divides the logits) and watch the router soften; pick another router
# from the list (top-k with capacity, expert choice) to compare.

# %%
RoutingExplorer("switch", logits=trained_logits["no balancing loss"][:48], capacity_factor=1.0)

# %% [markdown]
# ## Summary
#
# - A learned router is a feedback loop, and without help it collapses onto a few experts
#   (Shazeer et al. 2017, Sec. 4). You saw it happen, and measured it with
#   $\operatorname{CV}^2$ and the max/min load ratio.
# - Soft constraints: the importance loss balances gate mass; the load loss balances a
#   smooth estimate of token counts (Shazeer et al., App. A); the Switch loss
#   $E \sum_e f_e P_e$ does both in one term, is 1 when balanced, and differs from Hugging
#   Face's Mixtral convention by a factor of `K` (Fedus et al. 2021, eq. 4-6).
# - The router z-loss pins the scale of the logits, which the softmax ignores but rounding
#   does not (Zoph et al. 2022, eq. 5).
# - Hard constraints: `C = ceil(K T factor / E)` slots per expert, filled by GShard priority
#   (Lepikhin et al. 2020); what does not fit is dropped and rides the residual connection.
#   Balance decides how much is dropped.
# - Notebook 04 turns routing around: instead of tokens choosing experts, each expert
#   chooses its `C` tokens, so every buffer is exactly full by construction (Zhou et al.
#   2022, *Mixture-of-Experts with Expert Choice Routing*, arXiv 2202.09368).
