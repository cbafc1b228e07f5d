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
# # 02 · Top-k routing: the sparsely gated mixture
#
# **Difficulty** ★★☆☆ · **Time** about 60 minutes · **Points** 9 (8 autograded, 1 written)
#
# Notebook 01 ended with a bill: a dense mixture of `E` experts runs every expert on every
# token, so its compute grows `E`-fold with its parameters. Yet once trained, most of a
# token's gate weight sits on one or two experts, and the others are multiplied by weights
# near zero. Shazeer et al. (2017, *Outrageously Large Neural Networks: The Sparsely-Gated
# Mixture-of-Experts Layer*, arXiv 1701.06538) drew the obvious conclusion: keep only the
# `K` largest gates per token, set the rest to exactly zero, and never compute an expert
# whose gate is zero. The mixture is the same sum as before (their eq. 1),
#
# $$y = \sum_{e=1}^{E} G(x)_e\, f_e(x),$$
#
# but now `G(x)` has only `K` non-zero entries, so only `K` experts run. Parameters grow
# with `E`; compute per token grows with `K`. This one change is what lets GShard
# (Lepikhin et al. 2020, arXiv 2006.16668), Switch Transformer (Fedus et al. 2021, arXiv
# 2101.03961) and Mixtral (Jiang et al. 2024, arXiv 2401.04088) hold far more parameters
# than they spend on any one token.
#
# **You will implement**
#
# | exercise | what | points |
# |---|---|---|
# | `top_k_gating` | keep each token's `k` largest logits and softmax over them | 2 |
# | `noisy_logits` | Shazeer's noisy router logits (eq. 4), noise off at evaluation | 2 |
# | `sparse_moe` | run each expert only on the tokens routed to it, and mix | 3 |
# | `moe_flops` | the cost model: router plus the `K` experts each token uses | 1 |
# | written | what gradient the router gets with `k = 1` | 1 |
#
# **Shapes.** `T` tokens (rows), `D` model width, `H` expert hidden width, `E` experts, `K`
# experts per token. Inputs are `(T, D)`, router logits `(T, E)`, and the routing decision
# is a pair of `(T, K)` tensors: which experts, and with what weight.
#
# Run each check cell after your answer: it prints one line when you are right and tells
# you what is probably wrong when you are not.

# %%
import time

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import nn

from moe_course import Expert, dense_moe  # notebook 01's exercises, used here for comparisons
from moe_course.grading import check
from moe_course.train import fast_mode
from moe_course.widgets import RoutingExplorer

torch.manual_seed(0)
QUICK = fast_mode()  # True while a grader runs the notebook: the timing cells shrink

# %% [markdown]
# ## 1 · Top-k gating
#
# Shazeer et al. build the sparse gate in two steps. First keep each token's `k` largest
# router logits and set the others to $-\infty$ (their eq. 5),
#
# $$\operatorname{KeepTopK}(v, k)_i = \begin{cases} v_i & \text{if } v_i \text{ is among the } k \text{ largest entries of } v,\\ -\infty & \text{otherwise,}\end{cases}$$
#
# then take the softmax (eq. 3): $G(x) = \operatorname{softmax}(\operatorname{KeepTopK}(H(x), k))$.
# Since $e^{-\infty} = 0$, the dropped experts get weight exactly zero and the kept ones share
# the whole unit of weight. Storing a `(T, E)` matrix that is mostly zeros would waste the
# sparsity, so we return only the kept part: for each token the `k` expert ids, best first,
# and their `k` weights.
#
# There is a second way to read the same numbers. Write $p = \operatorname{softmax}(v)$ for
# the full, dense gate over all `E` experts, and $S$ for the set of the `k` kept experts.
# Then for $i \in S$
#
# $$\frac{e^{v_i}}{\sum_{j \in S} e^{v_j}}
# = \frac{e^{v_i} / \sum_{j=1}^{E} e^{v_j}}{\sum_{j \in S} e^{v_j} / \sum_{j=1}^{E} e^{v_j}}
# = \frac{p_i}{\sum_{j \in S} p_j}:$$
#
# the softmax over the top-k logits *is* the full softmax renormalised over the kept
# experts, because the full normaliser cancels. (Switch Transformer, in contrast, does not
# renormalise: it weights its one expert by $p_i < 1$. Section 5 shows why that matters.)
#
# **Exercise 1 (2 points).** Write `top_k_gating(logits, k)`: `logits` is `(T, E)`; return
# the pair `(weights, indices)`, both `(T, K)`, where `indices[t]` holds the ids of token
# `t`'s `k` largest logits in *descending* order and `weights[t]` the softmax over those `k`
# logits, in the same order. Raise a `ValueError` that says what `k` was and what it must
# be unless `1 <= k <= E`.
#
# <details><summary>Hint 1: the idea</summary>
#
# Three steps. First check `k` and raise a `ValueError` naming `k` and `E` unless
# `1 <= k <= E`: `torch.topk` raises its own `RuntimeError` for `k > E`, and it accepts
# `k = 0` happily, returning empty tensors. Then keep each row's `k` largest logits with
# their expert ids, best first. Last, a softmax over those `k` logits only: it equals the
# full softmax renormalised over the kept experts, and it must stay a torch operation so
# the router gets a gradient.
# </details>
#
# <details><summary>Hint 2: the shape of the code</summary>
#
# ```python
# n_experts = logits.shape[-1]
# if not 1 <= k <= ...:
#     raise ValueError(f"k must satisfy 1 <= k <= E = {...}; got k = {k}")
# top_logits, indices = torch.topk(...)   # (T, K), (T, K), sorted descending by default
# weights = ...                           # softmax over the K kept logits, same order
# ```
# </details>

# %% nbgrader={"grade": false, "grade_id": "ex02_top_k_gating", "locked": false, "schema_version": 3, "solution": true}
def top_k_gating(logits, k):
    """(T, E), k -> (weights (T, K), indices (T, K)): softmax over each row's k largest logits."""
    ### BEGIN SOLUTION
    n_experts = logits.shape[-1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n_experts:
        raise ValueError(f"k must be an integer with 1 <= k <= E = {n_experts} (the number of "
                         f"experts); got k = {k!r}")
    top_logits, indices = torch.topk(logits, k, dim=-1)  # (T, K), (T, K), descending
    weights = torch.softmax(top_logits, dim=-1)  # (T, K): softmax(KeepTopK(H, k)), eq. 3 and 5
    return weights, indices
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ex02_top_k_gating_tests", "locked": true, "points": 2, "schema_version": 3, "solution": false}
check("ex02_top_k_gating", top_k_gating)
### BEGIN HIDDEN TESTS
check("ex02_top_k_gating", top_k_gating, hidden=True)
### END HIDDEN TESTS

# %% [markdown]
# **By hand.** Take one token and four experts whose logits are $\ln 4, \ln 1, \ln 3, \ln 2$,
# so that $e^{v} = (4, 1, 3, 2)$ and the full softmax is $(0.4, 0.1, 0.3, 0.2)$. With
# `k = 2` the kept experts are 0 and 2, and both readings give the weights
# $4/7 \approx 0.571$ and $3/7 \approx 0.429$: the softmax over the two kept logits, or
# $0.4 / 0.7$ and $0.3 / 0.7$, the full softmax renormalised. The cell below does each step
# and then asks your function.

# %%
v = torch.log(torch.tensor([[4.0, 1.0, 3.0, 2.0]]))  # (T, E) = (1, 4)
p = torch.softmax(v, dim=-1)  # (T, E) the dense gate
kept = v.topk(2, dim=-1).indices  # (T, K)
keep_top_k = torch.full_like(v, float("-inf")).scatter(1, kept, v.gather(1, kept))  # eq. 5
renormalised = p.gather(1, kept) / p.gather(1, kept).sum(-1, keepdim=True)  # (T, K)
weights, indices = top_k_gating(v, 2)
print("logits                      ", v.numpy().round(3))
print("exp(logits)                 ", v.exp().numpy().round(3))
print("full softmax p              ", p.numpy().round(3))
print("kept experts                ", kept.numpy())
print("KeepTopK(v, 2)  (eq. 5)     ", keep_top_k.numpy().round(3))
print("softmax(KeepTopK)  (eq. 3)  ", torch.softmax(keep_top_k, -1).numpy().round(3))
print("p renormalised over kept    ", renormalised.numpy().round(3))
print("your top_k_gating           ", weights.numpy().round(3), "experts", indices.numpy())

# %% [markdown]
# The same identity holds for any logits, not only for a tidy example: on a batch of random
# tokens the two readings agree to rounding error. The figure shows the hand example on the
# left (grey: the dense gate; blue: what top-2 keeps), and on the right the sparse gate of a
# dozen random tokens written back into a `(T, E)` matrix: two coloured cells per row, each
# row summing to 1.

# %%
torch.manual_seed(0)
logits_batch = 2 * torch.randn(12, 6)  # (T, E)
w_batch, i_batch = top_k_gating(logits_batch, 2)  # (T, K), (T, K)
p_batch = torch.softmax(logits_batch, dim=-1).gather(1, i_batch)  # (T, K)
gap = (w_batch - p_batch / p_batch.sum(-1, keepdim=True)).abs().max()
print(f"largest |softmax over top-k - renormalised full softmax| on 12 tokens: {gap:.1e}")

gate_matrix = torch.zeros(12, 6).scatter(1, i_batch, w_batch)  # (T, E), zeros off the top-k
fig, axes = plt.subplots(1, 2, figsize=(10, 3.4), gridspec_kw={"width_ratios": [1, 1.3]})
experts_axis = torch.arange(4)
axes[0].bar(experts_axis - 0.2, p[0], width=0.4, color="0.7", label="full softmax p")
axes[0].bar(indices[0] + 0.2, weights[0], width=0.4, color="tab:blue", label="top-2 weights")
for e, w in zip(indices[0].tolist(), weights[0].tolist()):
    axes[0].annotate(f"{w:.3f}", (e + 0.2, w), ha="center", va="bottom", fontsize=8)
axes[0].set(xticks=experts_axis.tolist(), xlabel="expert", ylabel="gate weight",
            title="logits ln(4, 1, 3, 2), k = 2", ylim=(0, 0.7))
axes[0].legend(fontsize=8)
image = axes[1].imshow(gate_matrix, cmap="Blues", vmin=0, vmax=1, aspect="auto")
axes[1].set(xlabel="expert", ylabel="token", title="top-2 gate of 12 random tokens")
fig.colorbar(image, ax=axes[1], label="weight")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 2 · Noisy top-k gating
#
# A top-k router that starts out preferring some experts keeps sending them tokens, they get
# better on those tokens, and the router prefers them even more: the rich get richer.
# Shazeer et al. add tunable Gaussian noise to the logits before the top-k (eq. 4):
#
# $$H(x)_i = (x W_g)_i + \varepsilon_i \cdot \operatorname{softplus}\big((x W_{\text{noise}})_i\big),
# \qquad \varepsilon_i \sim \mathcal N(0, 1).$$
#
# The noise scale $\operatorname{softplus}((x W_{\text{noise}})_i)$ is *learned*, per token
# and per expert, and kept positive by the softplus. Where two experts' clean logits are
# close, noise lets the runner-up win some of the time, so it gets tokens (and gradient)
# too; and, as notebook 03 shows, the noise is what makes their load-balancing loss smooth:
# the probability that an expert lands in the top `k` under the noise is a differentiable
# function of the logits (Shazeer et al. Sec. 4 and Appendix A).
#
# Noise is for training only. At evaluation the same input should give the same output, and
# the router's best guess is the clean logit; the reference implementation
# (tensor2tensor's `noisy_top_k_gating`) adds noise only when training. We make that
# explicit by letting the caller pass the noise: `noise=None` means evaluation.
#
# **Exercise 2 (2 points).** Write `noisy_logits(x, w_gate, w_noise, noise=None)`: `x` is
# `(T, D)`, `w_gate` and `w_noise` are `(D, E)`, `noise` is a `(T, E)` standard-normal sample
# drawn by the caller, or `None`. Return the `(T, E)` logits of eq. 4, or the clean logits
# `x @ w_gate` when `noise` is `None`. Do not draw your own noise: a function that takes
# its randomness as an argument is reproducible and testable.
#
# <details><summary>Hint 1: the idea</summary>
#
# Eq. 4 adds to the clean logits `x @ w_gate` a noise whose *scale* is learned per token
# and expert: the caller's standard-normal sample times `softplus(x @ w_noise)`, which is
# always positive. With `noise=None` (evaluation, and the default) there is no noise at
# all: return the clean logits. Never draw noise yourself; the caller passes it in.
# </details>
#
# <details><summary>Hint 2: the shape of the code</summary>
#
# ```python
# clean = ...                   # (T, E)
# if noise is None:             # `is None`: `not noise` asks a tensor for its truth value
#     return ...
# scale = F.softplus(...)       # (T, E), > 0
# ```
# </details>

# %% nbgrader={"grade": false, "grade_id": "ex02_noisy_logits", "locked": false, "schema_version": 3, "solution": true}
def noisy_logits(x, w_gate, w_noise, noise=None):
    """(T, D), (D, E), (D, E), (T, E) or None -> (T, E): Shazeer eq. 4, clean when noise is None."""
    ### BEGIN SOLUTION
    clean = x @ w_gate  # (T, E)
    if noise is None:
        return clean
    return clean + noise * F.softplus(x @ w_noise)  # (T, E), eq. 4
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ex02_noisy_logits_tests", "locked": true, "points": 2, "schema_version": 3, "solution": false}
check("ex02_noisy_logits", noisy_logits)
### BEGIN HIDDEN TESTS
check("ex02_noisy_logits", noisy_logits, hidden=True)
### END HIDDEN TESTS

# %% [markdown]
# **One token, routed five times.** To read the numbers easily we use a token with a single
# feature equal to 1 (`D = 1`), so `x @ W` is just `W`'s one row: the clean logits are
# `w_gate` and the noise scales are `softplus(w_noise)`. Four experts have clean logits
# `(1.0, 0.6, 0.0, -0.8)`. Without noise the token always goes to experts 0 and 1; with
# noise of scale 1 its second choice, and sometimes its first, changes from draw to draw.
# That is useful in training and unacceptable at evaluation, where a model should answer the
# same question the same way.

# %%
def inverse_softplus(s):
    """The w whose softplus is s (s > 0): log(exp(s) - 1)."""
    return torch.log(torch.expm1(s))


clean_logits = torch.tensor([[1.0, 0.6, 0.0, -0.8]])  # (1, E): w_gate of a D = 1 router
x_one = torch.ones(1, 1)  # (T, D) = (1, 1)
w_noise_one = inverse_softplus(torch.ones(1, 4))  # (D, E): noise scale 1 for every expert
g = torch.Generator().manual_seed(0)
for draw in range(5):
    eps = torch.randn(1, 4, generator=g)  # (T, E)
    h = noisy_logits(x_one, clean_logits, w_noise_one, noise=eps)
    print(f"training draw {draw}: logits {h.numpy().round(2)} -> experts "
          f"{top_k_gating(h, 2)[1].tolist()}")
for run in range(2):
    h = noisy_logits(x_one, clean_logits, w_noise_one)  # noise=None: evaluation
    print(f"evaluation {run}:     logits {h.numpy().round(2)} -> experts "
          f"{top_k_gating(h, 2)[1].tolist()}")

# %% [markdown]
# **Many draws.** Repeat the same token thousands of times and count how often each expert
# is among its top 2. On the left every expert gets the same noise scale $\sigma$: at
# $\sigma = 0$ (evaluation) the choice is fixed, and as $\sigma$ grows the noise swamps the
# logit gaps and the choice drifts towards uniform (each expert chosen half the time), the
# favourites losing what the underdogs gain. On the right the noise is small
# ($\sigma = 0.2$) for experts 0 to 2, and only the weakest expert's learned scale grows:
# expert 3 now wins a place in a growing share of draws, taken almost entirely from the
# runner-up, expert 1, while the favourite keeps its place and expert 2 stays out. Because
# the scale is learned per expert (and per token, through $x W_{\text{noise}}$), the router
# can give exploration to exactly the experts it chooses. The gradient reaches
# $W_{\text{noise}}$ through the weights of the experts that the noise made win.

# %%
n_draws = 1000 if QUICK else 4000
x_many = torch.ones(n_draws, 1)  # (T, D): the same one-feature token, n_draws times
eps_many = torch.randn(n_draws, 4, generator=torch.Generator().manual_seed(1))  # (T, E)


def chosen_share(noise_scale):
    """Share of the draws in which each expert is among the top 2, for (E,) noise scales."""
    w_noise = inverse_softplus(noise_scale)[None, :]  # (D, E)
    h = noisy_logits(x_many, clean_logits, w_noise, noise=eps_many)  # (T, E)
    _, idx = top_k_gating(h, 2)  # (T, K)
    return torch.zeros(4).index_add(0, idx.flatten(), torch.ones(idx.numel())) / n_draws


sigmas = torch.linspace(0.0, 3.0, 21)
shared = torch.stack([chosen_share(torch.full((4,), float(s)).clamp_min(1e-4))
                      for s in sigmas])  # (21, E)
own = torch.stack([chosen_share(torch.tensor([0.2, 0.2, 0.2, float(s)]).clamp_min(1e-4))
                   for s in sigmas])  # (21, E)
fig, axes = plt.subplots(1, 2, figsize=(10, 3.4), sharey=True)
for ax, share, title in ((axes[0], shared, "one noise scale for all experts"),
                         (axes[1], own, "expert 3's own noise scale (others 0.2)")):
    for e in range(4):
        ax.plot(sigmas, share[:, e], label=f"expert {e} (clean logit {clean_logits[0, e]:g})")
    ax.axhline(0.5, color="0.6", ls=":", lw=1)
    ax.set(xlabel="noise scale softplus(x W_noise)", title=title)
axes[0].set_ylabel(f"share of {n_draws} draws in the top 2")
axes[0].legend(fontsize=8)
plt.tight_layout()
plt.show()
print("shares at scale 0 (evaluation):", shared[0].numpy().round(2),
      " at scale 3:", shared[-1].numpy().round(2))

# %% [markdown]
# ## 3 · Sparse dispatch
#
# Now the payoff. With the routing decision `(weights, indices)` in hand, the mixture is
#
# $$y_t = \sum_{j=1}^{K} \text{weights}_{t,j}\; f_{\text{indices}_{t,j}}(x_t),$$
#
# which is eq. 1 with the zero gates left out. The cost saving comes from *how* it is
# computed: turn the routing around and ask, for each expert, which tokens chose it. Gather
# those rows, run the expert once on that small batch, and add its weighted outputs back
# into those tokens' rows. An expert nobody chose is not run at all. The price is what
# Shazeer et al. (Sec. 3.1) call the shrinking batch problem: each expert sees only about
# `T K / E` of the `T` tokens, a small batch that keeps hardware less busy than one big one.
#
# **Exercise 3 (3 points).** Write `sparse_moe(x, experts, weights, indices)`: `x` is
# `(T, D)`, `experts` a list (or `nn.ModuleList`) of `E` modules `(n, D) -> (n, D)`, and
# `weights`, `indices` the `(T, K)` routing, for example from your `top_k_gating`. Return the
# `(T, D)` output `y`. Call each expert **at most once**, on exactly the rows routed to it,
# and not at all when it has none (the check counts the calls and looks at their rows). Use
# the weights as given, without renormalising them: later notebooks pass weights that do
# not sum to 1.
#
# <details><summary>Hint 1: the idea</summary>
#
# Loop over the *experts*, not over the tokens. For expert `e`, find every assignment
# routed to it: the token's row `t` and the position `j` in its top-k list (where
# `indices[t, j] == e`). If there is none, skip the expert. Otherwise run it **once** on
# those rows, scale each output row by its weight `weights[t, j]`, and add it into row `t`
# of the output. A token routed to two experts gets two contributions. Use the weights as
# given: no renormalising.
# </details>
#
# <details><summary>Hint 2: the shape of the code</summary>
#
# ```python
# y = torch.zeros_like(x)                                   # (T, D)
# for e, expert in enumerate(experts):
#     token, slot = torch.nonzero(..., as_tuple=True)       # (n_e,), (n_e,)
#     if ...:
#         continue                                          # nobody chose expert e
#     out = expert(...)                                     # (n_e, D)
#     y = y.index_add(0, token, ...)                        # the weighted rows, back home
# ```
# The out-of-place `index_add` keeps autograd happy and never writes into an argument.
# </details>

# %% nbgrader={"grade": false, "grade_id": "ex02_sparse_moe", "locked": false, "schema_version": 3, "solution": true}
def sparse_moe(x, experts, weights, indices):
    """(T, D), E experts, (T, K), (T, K) -> (T, D): each expert runs once, on its own rows."""
    ### BEGIN SOLUTION
    y = torch.zeros_like(x)  # (T, D)
    for e, expert in enumerate(experts):
        token, slot = torch.nonzero(indices == e, as_tuple=True)  # (n_e,), (n_e,)
        if token.numel() == 0:
            continue  # nobody chose expert e: do not run it
        out = expert(x[token])  # (n_e, D)
        y = y.index_add(0, token, weights[token, slot, None] * out)  # (T, D), eq. 1
    return y
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ex02_sparse_moe_tests", "locked": true, "points": 3, "schema_version": 3, "solution": false}
check("ex02_sparse_moe", sparse_moe)
### BEGIN HIDDEN TESTS
check("ex02_sparse_moe", sparse_moe, hidden=True)
### END HIDDEN TESTS

# %% [markdown]
# **Who computes what.** Twelve tokens, six experts, top-2. We wrap each expert so that it
# records the rows it is called on, and push expert 5's logits far down so that no token
# chooses it. A dense mixture would run all six experts on all twelve tokens (72 rows); the
# sparse one runs `T K = 24` rows, and never calls expert 5.

# %%
class Recorder(nn.Module):
    """Wraps an expert; remembers how many rows each call had."""

    def __init__(self, expert):
        super().__init__()
        self.expert = expert
        self.calls = []

    def forward(self, x):
        self.calls.append(x.shape[0])
        return self.expert(x)


torch.manual_seed(3)
T_demo, D_demo, E_demo, K_demo = 12, 8, 6, 2
x_demo = torch.randn(T_demo, D_demo)  # (T, D)
experts_demo = [Recorder(Expert(D_demo, 16)) for _ in range(E_demo)]
w_gate_demo = torch.randn(D_demo, E_demo)  # (D, E)
logits_demo = (x_demo @ w_gate_demo).index_add(
    1, torch.tensor([5]), torch.full((T_demo, 1), -10.0))  # (T, E): expert 5 pushed down
w_demo, i_demo = top_k_gating(logits_demo, K_demo)  # (T, K), (T, K)
with torch.no_grad():
    y_sparse = sparse_moe(x_demo, experts_demo, w_demo, i_demo)  # (T, D)
calls = [r.calls for r in experts_demo]
print("calls per expert (rows in each call):", calls)
print(f"rows computed: sparse {sum(map(sum, calls))}, dense {T_demo * E_demo}")

gates_demo = torch.zeros(T_demo, E_demo).scatter(1, i_demo, w_demo)  # (T, E)
fig, axes = plt.subplots(1, 2, figsize=(10, 3.2), gridspec_kw={"width_ratios": [1.6, 1]})
image = axes[0].imshow(gates_demo.T, cmap="Blues", vmin=0, vmax=1, aspect="auto")
axes[0].set(xlabel="token", ylabel="expert", title="dispatch: expert e runs on the coloured cells")
fig.colorbar(image, ax=axes[0], label="weight")
rows = [sum(c) for c in calls]
axes[1].bar(range(E_demo), [T_demo] * E_demo, color="0.85", label="dense: every token")
axes[1].bar(range(E_demo), rows, color="tab:blue", label="sparse: routed rows")
axes[1].set(xlabel="expert", ylabel="rows computed", title="work per expert")
axes[1].legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# **Two checks against the dense mixture.** Sparse dispatch changes how the sum is computed,
# not what it is. (1) Write the top-k weights back into a `(T, E)` gate with zeros off the
# top-k and run the dense mixture with that gate: every expert on every token, most of them
# multiplied by 0. The outputs must agree. (2) With `k = E` nothing is dropped, the top-k
# softmax is the full softmax, and sparse dispatch must reproduce notebook 01's `dense_moe`
# (here `moe_course`'s reference version of it).

# %%
with torch.no_grad():
    outs = torch.stack([expert.expert(x_demo) for expert in experts_demo], dim=1)  # (T, E, D)
    y_masked = torch.einsum("te,ted->td", gates_demo, outs)  # (T, D), zeros off the top-k
    w_all, i_all = top_k_gating(x_demo @ w_gate_demo, E_demo)  # (T, E), (T, E): k = E
    y_k_equals_e = sparse_moe(x_demo, experts_demo, w_all, i_all)  # (T, D)
    y_dense = dense_moe(x_demo, [r.expert for r in experts_demo], w_gate_demo).y  # (T, D)
assert torch.allclose(y_sparse, y_masked, atol=1e-6), "sparse_moe differs from the masked mixture"
assert torch.allclose(y_k_equals_e, y_dense, atol=1e-6), "with k = E, sparse_moe differs from dense"
print(f"top-2: max |sparse - dense with zeroed gates| = {(y_sparse - y_masked).abs().max():.1e}")
print(f"k = E: max |sparse - dense_moe|               = {(y_k_equals_e - y_dense).abs().max():.1e}")

# %% [markdown]
# ## 4 · What sparsity buys: FLOPs against `E`
#
# Count the forward cost of a top-k layer on `T` tokens, with a multiply-add counted as 2
# floating-point operations (FLOPs):
#
# - the router, `x @ w_gate`: a `(T, D)` by `(D, E)` product, $2\,T D E$;
# - the experts: each of the $T K$ assignments runs one expert, two matrix products
#   $D \times H$ and $H \times D$, so $2 \cdot T K \cdot 2 D H$.
#
# Biases, the activation and the softmax are a few operations per number and are ignored.
# The dense mixture is the case $K = E$. At fixed `K` the expert term does not depend on `E`
# at all: only the router grows, and it is tiny next to an expert when $E \ll 2 K H$.
#
# **Exercise 4 (1 point).** Write `moe_flops(n_tokens, d_model, d_hidden, n_experts, k)`,
# returning the forward FLOPs above as a Python `int`.
#
# <details><summary>Hint 1: the idea</summary>
#
# A product of a `(m, n)` and an `(n, p)` matrix does `m * n * p` multiply-adds, that is
# `2 * m * n * p` FLOPs. The router is one such product, `(T, D) @ (D, E)`, for every
# token. The experts run only on the `T * K` assignments, each through two products of
# size `D x H` (`w_in` and `w_out`). Biases and activations are left out.
# </details>
#
# <details><summary>Hint 2: the shape of the code</summary>
#
# ```python
# router = 2 * n_tokens * ...          # x @ w_gate, once per token
# experts = 2 * (n_tokens * k) * ...   # two D x H matmuls per assignment
# ```
# Use integer arithmetic only (`*`, never `/`), so that the result stays an exact `int`.
# </details>

# %% nbgrader={"grade": false, "grade_id": "ex02_moe_flops", "locked": false, "schema_version": 3, "solution": true}
def moe_flops(n_tokens, d_model, d_hidden, n_experts, k):
    """Forward FLOPs of a top-k MoE layer: router 2*T*D*E plus experts 2 * T*K * 2*D*H."""
    ### BEGIN SOLUTION
    router = 2 * n_tokens * d_model * n_experts
    experts = 2 * n_tokens * k * 2 * d_model * d_hidden
    return router + experts
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ex02_moe_flops_tests", "locked": true, "points": 1, "schema_version": 3, "solution": false}
check("ex02_moe_flops", moe_flops)
### BEGIN HIDDEN TESTS
check("ex02_moe_flops", moe_flops, hidden=True)
### END HIDDEN TESTS

# %% [markdown]
# Two layer sizes for scale. With 64 experts and `K = 2` a layer holds 64 experts'
# parameters and spends about 2 experts' compute: the dense mixture of the same experts
# would cost 30 times more. A Mixtral-sized layer (8 experts, `K = 2`; with our two-matrix
# experts rather than Mixtral's three-matrix SwiGLU) spends about a quarter of the dense
# cost.

# %%
for name, (t, d, h, e, k) in {"64 experts, top-2": (4096, 512, 2048, 64, 2),
                              "Mixtral-sized, top-2 of 8": (4096, 4096, 14336, 8, 2)}.items():
    sparse, dense = moe_flops(t, d, h, e, k), moe_flops(t, d, h, e, e)
    print(f"{name:26s} sparse {sparse / 1e12:7.2f} TFLOPs, dense {dense / 1e12:7.2f} TFLOPs, "
          f"ratio {dense / sparse:5.1f}")

# %% [markdown]
# **Counted and measured.** The left panel counts FLOPs with your `moe_flops` as `E` grows
# at `K = 2`: the dense line grows in proportion to `E`, the sparse one stays nearly flat.
# The right panel times one forward pass of each on a small layer (your `sparse_moe` after
# your `top_k_gating`, against `dense_moe`), the fastest of a few repeats. On a laptop CPU
# with tiny experts the sparse loop pays a fixed cost per expert (finding its rows, a small
# matrix product, an `index_add`), so at small `E` it can lose; as `E` grows the dense cost
# takes over. Closing that gap at small sizes is what grouped kernels such as MegaBlocks
# (Gale et al. 2022, arXiv 2211.15841) are for; notebook 07 comes back to it.

# %%
T_b, D_b, H_b, K_b = 1024, 64, 256, 2
expert_counts = [2, 8, 32] if QUICK else [2, 4, 8, 16, 32]
repeats = 1 if QUICK else 5
x_b = torch.randn(T_b, D_b)  # (T, D)


def sparse_forward(experts, w_gate):
    return sparse_moe(x_b, experts, *top_k_gating(x_b @ w_gate, K_b))  # (T, D)


def dense_forward(experts, w_gate):
    return dense_moe(x_b, experts, w_gate).y  # (T, D)


def fastest(fn, *args):
    """Smallest wall time in seconds of `repeats` calls of fn(*args), after one warm-up."""
    fn(*args)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return min(times)


measured = {"sparse": [], "dense": []}
threads = torch.get_num_threads()
torch.set_num_threads(1)  # one thread: steadier timings on a busy laptop
try:
    with torch.no_grad():
        for n_experts in expert_counts:
            torch.manual_seed(0)
            experts_b = [Expert(D_b, H_b) for _ in range(n_experts)]
            w_gate_b = torch.randn(D_b, n_experts) / D_b**0.5  # (D, E)
            measured["sparse"].append(fastest(sparse_forward, experts_b, w_gate_b))
            measured["dense"].append(fastest(dense_forward, experts_b, w_gate_b))
finally:
    torch.set_num_threads(threads)
flops = {"sparse": [moe_flops(T_b, D_b, H_b, e, K_b) for e in expert_counts],
         "dense": [moe_flops(T_b, D_b, H_b, e, e) for e in expert_counts]}

fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
for label, color in (("sparse", "tab:blue"), ("dense", "tab:orange")):
    axes[0].plot(expert_counts, [f / 1e9 for f in flops[label]], "o-", color=color,
                 label=f"{label} (K = {K_b})" if label == "sparse" else "dense (K = E)")
    axes[1].plot(expert_counts, [s * 1e3 for s in measured[label]], "o-", color=color,
                 label=label)
axes[0].set(xlabel="experts E", ylabel="GFLOPs (your moe_flops)", ylim=(0, None),
            title=f"counted: T={T_b}, D={D_b}, H={H_b}")
axes[1].set(xlabel="experts E", ylabel="ms per forward", ylim=(0, None),
            title=f"measured, one CPU thread (best of {repeats})")
for ax in axes:
    ax.set_xticks(expert_counts)
    ax.legend(fontsize=8)
plt.tight_layout()
plt.show()
for e, fs, fd, ts, td in zip(expert_counts, flops["sparse"], flops["dense"],
                             measured["sparse"], measured["dense"]):
    print(f"E = {e:2d}: FLOPs dense/sparse {fd / fs:5.1f}, "
          f"time dense/sparse {td / ts:5.1f} ({td * 1e3:6.1f} ms / {ts * 1e3:5.1f} ms)")

# %% [markdown]
# ## 5 · What gradient does the router get?
#
# The top-k selection itself is a step function of the logits: nudging a logit a little
# changes which experts are chosen either not at all or all at once, so it has no useful
# derivative. The router learns only through the *weights* of the chosen experts, which
# multiply their outputs in eq. 1. The cell below measures the gradient that reaches
# `w_gate` from a simple loss on the output of one layer, for three gates: your top-k
# gating with `k = 2` and with `k = 1`, and the Switch Transformer's top-1 gate (Fedus et
# al. 2021, eq. 1-2), which takes the softmax over *all* experts first and weights the
# chosen expert by its full-softmax probability $p_i$, without renormalising.

# %%
torch.manual_seed(4)
x_g = torch.randn(32, 8)  # (T, D)
experts_g = [Expert(8, 16) for _ in range(4)]
target_g = torch.randn(32, 8)  # (T, D)


def switch_top_1(logits):
    """Switch Transformer's gate: softmax over all E experts, then keep the largest p_i."""
    probs = torch.softmax(logits, dim=-1)  # (T, E)
    top = probs.max(dim=-1)  # (T,), (T,)
    return top.values[:, None], top.indices[:, None]  # (T, 1), (T, 1)


for label, gate in (("top-k, k = 2", lambda lg: top_k_gating(lg, 2)),
                    ("top-k, k = 1", lambda lg: top_k_gating(lg, 1)),
                    ("Switch top-1", switch_top_1)):
    w_gate_g = (0.5 * torch.randn(8, 4, generator=torch.Generator().manual_seed(5)))
    w_gate_g.requires_grad_(True)
    weights_g, indices_g = gate(x_g @ w_gate_g)  # (T, K), (T, K)
    loss = F.mse_loss(sparse_moe(x_g, experts_g, weights_g, indices_g), target_g)
    loss.backward()
    print(f"{label:13s} weights of token 0: {weights_g[0].detach().numpy().round(3)}, "
          f"|d loss / d w_gate| = {w_gate_g.grad.norm():.2e}")

# %% [markdown] nbgrader={"grade": false, "grade_id": "ex02_written_prompt", "locked": true, "schema_version": 3, "solution": false}
# **Written answer (1 point).** With `k = 1` and the softmax taken *after* the top-k (as in
# your `top_k_gating`), what gradient does the router `w_gate` get from the task loss, and
# why? Use the measurement above and the formula of the weights. Then say how Switch
# Transformer's top-1 gate avoids the problem, and why Shazeer et al. used `k >= 2`.
# (Four to eight sentences.)

# %% [markdown] nbgrader={"grade": true, "grade_id": "ex02_written", "locked": false, "points": 1, "schema_version": 3, "solution": true}
# None: the router's gradient from the task loss is exactly zero. With `k = 1` the softmax
# is taken over a single logit, so the weight is $e^{v_i} / e^{v_i} = 1$ for every token
# whatever the logits are; its derivative with respect to every logit is 0, and the output
# $y_t = 1 \cdot f_{i}(x_t)$ does not depend on `w_gate` at all. The choice of $i$ (the
# argmax) is piecewise constant, so it contributes no gradient either, and the measurement
# above shows a gradient norm of exactly 0 for `k = 1`. Such a router never learns from the
# task (only an auxiliary loss could move it). With `k >= 2` the weights
# $e^{v_i} / \sum_{j \in S} e^{v_j}$ depend on the *differences* between the kept logits, so
# the loss can shift weight between the chosen experts; this is why Shazeer et al. used
# `k >= 2` (Switch Transformer, Sec. 2.1, recalls their conjecture that `k > 1` was needed
# for non-trivial router gradients). Switch Transformer keeps `k = 1` but takes the softmax
# over all `E` experts *before* the top-1 and multiplies the expert's output by
# $p_i = e^{v_i} / \sum_{j=1}^{E} e^{v_j} < 1$, so
# $\partial p_i / \partial v_j = p_i(\delta_{ij} - p_j) \neq 0$: the loss can raise or lower
# the chosen expert's probability, and through the shared normaliser push down the others.

# %% [markdown]
# ## 6 · Explore (optional, ungraded)
#
# `moe_course.widgets.RoutingExplorer` routes a batch of random tokens with a router you pick
# and draws the token-by-expert assignment, each expert's load and how many experts each
# token got. Here it uses *your* `top_k_gating` on noisy logits. Move the noise scale and
# watch the load spread out; set `k` to 1 and to `E`; switch to the dense router. The
# capacity routers belong to notebook 03. When a grader runs this notebook, the explorer
# shows a still picture instead of sliders.

# %%
RoutingExplorer("noisy_top_k", n_tokens=32, n_experts=8, k=2, noise_scale=1.0,
                routing_fn=top_k_gating)

# %% [markdown]
# ## Summary
#
# - Top-k gating keeps each token's `k` largest router logits and softmaxes over them
#   (Shazeer et al. 2017, eq. 3 and 5); that equals the dense softmax renormalised over the
#   kept experts, because the normaliser cancels.
# - Noisy top-k gating (eq. 4) adds learned, per-expert Gaussian noise to the logits while
#   training, so near-ties are explored and, in notebook 03, load can be balanced smoothly;
#   at evaluation the noise is off and routing is deterministic.
# - Sparse dispatch runs each expert once on only its own rows; it computes the same sum as a
#   dense mixture whose off-top-k gates are zero, and equals the dense mixture when `k = E`.
# - At fixed `K` the FLOPs per token stay flat as `E` grows; only the router grows. On small
#   CPU layers the per-expert dispatch overhead shows, and grouped kernels remove it.
# - With `k = 1` and the softmax after the top-k, the router gets no gradient; Switch
#   weights its single expert by the full-softmax probability instead.
#
# Sparse routers have a new failure mode: nothing stops them from sending most tokens to a
# few experts. Notebook 03 adds load-balancing losses and expert capacity.
