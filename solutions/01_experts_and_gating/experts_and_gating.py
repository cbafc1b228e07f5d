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
# # 01 · Experts and gating: the dense mixture
#
# **Difficulty** ★☆☆☆ · **Time** about 45 minutes · **Points** 6 (5 autograded, 1 written)
#
# A *mixture of experts* answers a question every large network faces: should one set of
# weights handle every input, or should different inputs be handled by different
# specialists? The idea is older than deep learning. Jacobs, Jordan, Nowlan and Hinton
# (1991, *Adaptive Mixtures of Local Experts*) trained several small networks, the
# **experts**, together with a **gating network** that looks at the input and decides how
# much to trust each expert. The output is the gate-weighted sum of the experts' outputs:
#
# $$y(x) = \sum_{e=1}^{E} g_e(x)\, f_e(x), \qquad g(x) = \operatorname{softmax}(x W_g).$$
#
# Because the gate is a softmax, the weights are positive and sum to one; because
# everything is differentiable, the experts and the gate learn together by gradient
# descent. Whichever expert is best on an input gets more of the gradient for it, so the
# experts *specialise*, and the gate learns to send each region of the input space to its
# specialist.
#
# Thirty years later this is the layer inside Switch Transformer, Mixtral and DeepSeek-V3,
# with one change that the rest of the course is about: in those models only a few experts
# run per token (Shazeer et al. 2017, arXiv 1701.06538). In this notebook you build the
# original, **dense** version, in which every expert runs on every input, and see both why
# it works and why it does not scale.
#
# **You will implement**
#
# | exercise | what | points |
# |---|---|---|
# | `Expert` | one expert: a two-layer feed-forward network with a GELU | 2 |
# | `softmax_gate` | the gating network's weights over experts | 1 |
# | `dense_moe` | the mixture: every expert, weighted by the gate | 2 |
# | written | what a dense mixture costs, and why that motivates sparsity | 1 |
#
# **Shapes.** The course writes `T` for tokens (rows), `D` for the model width, `H` for an
# expert's hidden width and `E` for the number of experts. Inputs are `(T, D)`, router
# logits `(T, E)`.
#
# Run each check cell after your answer: it prints one line when you are right and tells
# you what is probably wrong when you are not.

# %%
import time

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import nn

from moe_course.data import ownership, region_grid, regions_task
from moe_course.grading import check
from moe_course.train import train

_ = torch.manual_seed(0)  # seed everything below (the returned generator is not needed)

# %% [markdown]
# ## 1 · An expert
#
# An expert is an ordinary feed-forward network, the same block that sits after attention
# in every transformer layer:
#
# $$f(x) = W_{\text{out}}\, \operatorname{GELU}(W_{\text{in}} x + b_{\text{in}}) + b_{\text{out}},
# \qquad (\dots, D) \to (\dots, H) \to (\dots, D).$$
#
# GELU is $x\,\Phi(x)$ with $\Phi$ the standard normal CDF (Hendrycks and Gimpel 2016). Use
# the *exact* form, `F.gelu(h)` or `nn.GELU()`; the `tanh` approximation is a different
# function, and so is ReLU.
#
# **Exercise 1 (2 points).** Write `Expert(d_model, d_hidden)`, an `nn.Module` with two
# attributes, `w_in = nn.Linear(d_model, d_hidden)` and `w_out = nn.Linear(d_hidden,
# d_model)`, whose `forward` maps `(..., D)` to `(..., D)`. The attribute names matter: the
# check copies known weights into them.
#
# <details><summary>Hint 1: the idea</summary>
#
# An expert is a two-layer perceptron applied to each token on its own: `w_in` lifts a
# token from `D` to `H` numbers, the GELU bends them, `w_out` brings them back to `D`.
# `nn.Linear` acts on the last dimension whatever the leading ones are, so a `(T, D)` batch
# and a `(B, S, D)` batch need no reshaping. Watch out for two things: call
# `super().__init__()` before assigning any layer (otherwise `nn.Module` cannot register
# it), and use the exact GELU, `F.gelu`'s default, not `approximate="tanh"`.
# </details>
#
# <details><summary>Hint 2: the shape of the code</summary>
#
# ```python
# def __init__(self, d_model, d_hidden):
#     super().__init__()
#     self.w_in = ...    # nn.Linear(?, ?): D -> H
#     self.w_out = ...   # H -> D
#
# def forward(self, x):  # (..., D)
#     h = ...            # (..., H), after the GELU
#     return ...         # (..., D)
# ```
# </details>

# %% nbgrader={"grade": false, "grade_id": "ex01_expert", "locked": false, "schema_version": 3, "solution": true}
class Expert(nn.Module):
    """A two-layer feed-forward expert with an exact GELU: (..., D) -> (..., D)."""

    def __init__(self, d_model, d_hidden):
        super().__init__()
        ### BEGIN SOLUTION
        self.w_in = nn.Linear(d_model, d_hidden)
        self.w_out = nn.Linear(d_hidden, d_model)
        ### END SOLUTION

    def forward(self, x):
        ### BEGIN SOLUTION
        return self.w_out(F.gelu(self.w_in(x)))
        ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ex01_expert_tests", "locked": true, "points": 2, "schema_version": 3, "solution": false}
check("ex01_expert", Expert)
### BEGIN HIDDEN TESTS
check("ex01_expert", Expert, hidden=True)
### END HIDDEN TESTS

# %% [markdown]
# An expert with `D = 1` is a function from the line to the line, so we can draw a few.
# Each is a different random bump-and-ramp: on its own, a small expert can only bend a
# little. The mixture's trick is to let each expert bend where it is needed.

# %%
torch.manual_seed(1)
line = torch.linspace(-3, 3, 200)[:, None]  # (T, 1)
fig, ax = plt.subplots(figsize=(6, 3))
with torch.no_grad():
    for i in range(4):
        ax.plot(line, Expert(1, 8)(line), label=f"expert {i}")
ax.set(xlabel="x", ylabel="f(x)", title="Four random experts with D = 1, H = 8")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# ## 2 · The gate
#
# The gating network scores every expert for every token with one linear map, the router
# $W_g$ of shape `(D, E)`, and turns the scores (*logits*) into weights with a softmax over
# the experts:
#
# $$g(x) = \operatorname{softmax}(x W_g), \qquad g_e(x) = \frac{e^{(x W_g)_e}}{\sum_{j} e^{(x W_g)_j}}.$$
#
# Shazeer et al. (2017) write exactly this as their eq. 2: the "softmax gating" they start
# from before making it sparse.
#
# **Exercise 2 (1 point).** Write `softmax_gate(x, w_gate)`: `x` is `(T, D)`, `w_gate` is
# `(D, E)`; return the `(T, E)` gate whose rows sum to 1.
#
# <details><summary>Hint 1: the idea</summary>
#
# The gate scores every expert for every token with one linear map, the router logits
# `x @ w_gate` of shape `(T, E)`, and a softmax turns each token's row of scores into
# weights that are positive and sum to 1. Which axis? Over the experts, the last one: over
# `dim=0` each *expert's* column would sum to 1 instead, a different (and wrong) thing.
# </details>
#
# <details><summary>Hint 2: the shape of the code</summary>
#
# ```python
# logits = ...                            # (T, E), one score per token and expert
# gates = torch.softmax(logits, dim=...)  # each row sums to 1
# ```
# `torch.softmax` subtracts each row's maximum before exponentiating, so large logits do not
# overflow; a hand-written `exp(l) / exp(l).sum()` does.
# </details>

# %% nbgrader={"grade": false, "grade_id": "ex01_softmax_gate", "locked": false, "schema_version": 3, "solution": true}
def softmax_gate(x, w_gate):
    """(T, D), (D, E) -> (T, E): softmax(x @ w_gate) over experts."""
    ### BEGIN SOLUTION
    return torch.softmax(x @ w_gate, dim=-1)
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ex01_softmax_gate_tests", "locked": true, "points": 1, "schema_version": 3, "solution": false}
check("ex01_softmax_gate", softmax_gate)
### BEGIN HIDDEN TESTS
check("ex01_softmax_gate", softmax_gate, hidden=True)
### END HIDDEN TESTS

# %% [markdown]
# A gate over a two-dimensional input splits the plane into soft territories, one per
# expert. Each boundary between two experts is a straight line where their logits tie;
# scaling the router sharpens the boundaries without moving them.

# %%
torch.manual_seed(2)
n = 120
grid = region_grid(n).x  # (n * n, 2) points on [-1, 1]^2
w_demo = torch.randn(2, 4)  # (D, E)
fig, axes = plt.subplots(1, 2, figsize=(8, 3.8), layout="constrained")  # room for suptitle
for ax, scale in zip(axes, (1.0, 8.0)):
    gates = softmax_gate(grid, scale * w_demo)  # (T, E)
    # colour: the winning expert; brightness: how confident the gate is (1/E to 1)
    rgb = plt.cm.tab10(gates.argmax(-1).numpy())[:, :3]  # (T, 3)
    confidence = ((gates.max(-1).values - 0.25) / 0.75).numpy()[:, None]  # (T, 1)
    image = 1 - confidence * (1 - rgb)  # fade towards white where the gate is unsure
    ax.imshow(image.reshape(n, n, 3), origin="lower", extent=(-1, 1, -1, 1))
    ax.set(title=f"router scale {scale:g}", xlabel="$x_0$", ylabel="$x_1$")
fig.suptitle("winning expert per point, faded where the gate is unsure")
plt.show()
print("gate of the point (-1, -1):", softmax_gate(grid[:1], w_demo))

# %% [markdown]
# ## 3 · The dense mixture
#
# Now combine them. Every expert computes every token, and the gate mixes the results:
#
# $$y_t = \sum_{e=1}^{E} g_{t,e}\, f_e(x_t).$$
#
# This is eq. 1 of Shazeer et al. (2017) with the dense gate.
#
# **Exercise 3 (2 points).** Write `dense_moe(x, experts, w_gate)` returning the pair
# `(y, gates)`: `y` is `(T, D)`, `gates` the `(T, E)` gate from your `softmax_gate`.
# `experts` is a list (or `nn.ModuleList`) of `E` modules mapping `(n, D)` to `(n, D)`.
#
# <details><summary>Hint 1: the idea</summary>
#
# Three steps, one line each: the `(T, E)` gates from your `softmax_gate`; every expert's
# output on every token; then, for each token, the gate-weighted sum of the `E` outputs,
# $y_t = \sum_e g_{t,e} \, E_e(x_t)$. Return the gates too. `experts` may be a list or an
# `nn.ModuleList`: iterate over it, both work the same way.
# </details>
#
# <details><summary>Hint 2: the shape of the code</summary>
#
# ```python
# gates = ...                                # (T, E)
# outs = torch.stack([...], dim=1)           # (T, E, D): expert e's output in slice e
# y = (gates[:, :, None] * outs).sum(...)    # (T, D): weight, then sum over E
# ```
# `torch.einsum("te,ted->td", gates, outs)` does the last line in one call; a Python loop
# that accumulates `gates[:, e:e+1] * expert(x)` is just as right.
# </details>

# %% nbgrader={"grade": false, "grade_id": "ex01_dense_moe", "locked": false, "schema_version": 3, "solution": true}
def dense_moe(x, experts, w_gate):
    """Every expert on every token, mixed by the softmax gate; returns (y (T, D), gates (T, E))."""
    ### BEGIN SOLUTION
    gates = softmax_gate(x, w_gate)  # (T, E)
    outs = torch.stack([expert(x) for expert in experts], dim=1)  # (T, E, D)
    y = torch.einsum("te,ted->td", gates, outs)  # (T, D)
    return y, gates
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ex01_dense_moe_tests", "locked": true, "points": 2, "schema_version": 3, "solution": false}
check("ex01_dense_moe", dense_moe)
### BEGIN HIDDEN TESTS
check("ex01_dense_moe", dense_moe, hidden=True)
### END HIDDEN TESTS

# %% [markdown]
# A tiny example you can check by hand: two "experts" that return `x` and `-x`, and a router
# of zeros, give each expert weight one half, so the mixture cancels to zero. Tilt the
# router and the first expert wins.

# %%
toy_experts = [lambda v: v, lambda v: -v]
x_toy = torch.tensor([[1.0, 2.0]])
for w in (torch.zeros(2, 2), torch.tensor([[1.0, -1.0], [0.0, 0.0]])):
    y_toy, g_toy = dense_moe(x_toy, toy_experts, w)
    print(f"gates {g_toy.numpy().round(3)} -> y {y_toy.numpy().round(3)}")

# %% [markdown]
# ## 4 · Training a mixture: who owns which region?
#
# `moe_course.data.regions_task` draws points from the square $[-1, 1]^2$. The square is cut
# into four regions, and each region has its own target function, so no single small network
# fits them all well, while four specialists plus a gate can. We run your `dense_moe` over
# four of your `Expert`s (`D = 2`, `H = 8`) on the raw input and read out one number.
# The training loop is `moe_course.train.train`, the same loop later notebooks use.

# %%
data = regions_task(2048, seed=0)
print({name: tuple(t.shape) for name, t in data._asdict().items()})


class DenseMixture(nn.Module):
    """Your dense_moe over E of your Experts on the raw 2-d input, then one number out."""

    def __init__(self, d_model=2, d_hidden=8, n_experts=4, d_out=1):
        super().__init__()
        self.experts = nn.ModuleList(Expert(d_model, d_hidden) for _ in range(n_experts))
        self.w_gate = nn.Parameter(torch.zeros(d_model, n_experts))  # (D, E): uniform start
        self.readout = nn.Linear(d_model, d_out)

    def forward(self, x):
        mixed, gates = dense_moe(x, self.experts, self.w_gate)  # (T, D), (T, E)
        return self.readout(mixed), gates


def mse(model, batch):
    x, y = batch
    return F.mse_loss(model(x)[0], y)


def optimizer_for(model):
    """Adam, with the gate learning 5x faster than the experts (see the note below)."""
    gate = [model.w_gate]
    rest = [p for name, p in model.named_parameters() if name != "w_gate"]
    return torch.optim.Adam([{"params": rest, "lr": 1e-2}, {"params": gate, "lr": 5e-2}])


torch.manual_seed(0)
mixture = DenseMixture()
single = DenseMixture(n_experts=1)  # one expert of the same width: the baseline
batch = (data.x, data.y)
history = train(mixture, mse, lambda step: batch, steps=600, optimizer=optimizer_for(mixture))
baseline = train(single, mse, lambda step: batch, steps=600, optimizer=optimizer_for(single))
print(f"final MSE: mixture of 4 experts {history.loss[-1]:.4f}, "
      f"one expert {baseline.loss[-1]:.4f}")

# %% [markdown]
# A note on the optimiser: the gate gets a learning rate five times the experts'. Early in
# training every expert is mediocre everywhere, and a slow gate lets them all drift towards
# the same average function before any of them owns a region; a faster gate commits to a
# split while the experts are still different, and then each expert only sees gradient from
# its own region. (Try one learning rate for everything: the split gets much blurrier.)
# This tension, the router learning from experts that learn from the router, runs through
# the whole course.

# %% [markdown]
# The first two panels show the four true regions and the target; the third shows, for
# every point of the square, the expert with the largest gate after training, coloured like
# the region it serves best (`moe_course.data.ownership` finds the best one-to-one matching
# of experts to regions). If the experts specialised, the first and third maps agree.

# %%
n = 120
grid = region_grid(n)  # noise-free targets on an n x n grid
with torch.no_grad():
    grid_pred, grid_gates = mixture(grid.x)  # (n * n, 1), (n * n, E)
    _, data_gates = mixture(data.x)  # (T, E)
match = ownership(data.region, data_gates.argmax(-1), n_experts=4)
extent = dict(origin="lower", extent=(-1, 1, -1, 1))
fig, axes = plt.subplots(1, 4, figsize=(15, 3.4))
axes[0].imshow(grid.region.reshape(n, n), cmap="tab10", vmin=0, vmax=9, **extent)
axes[0].set(title="true regions")
axes[1].imshow(grid.y.reshape(n, n), cmap="viridis", **extent)
axes[1].set(title="target function")
# colour each expert like the region it owns, so agreement shows as matching colours
colour_of_expert = torch.tensor([match.owner.index(e) if e in match.owner else 9
                                 for e in range(4)])
axes[2].imshow(colour_of_expert[grid_gates.argmax(-1)].reshape(n, n), cmap="tab10",
               vmin=0, vmax=9, **extent)
axes[2].set(title="expert with the largest gate")
axes[3].plot(history.loss, label="mixture of 4 experts")
axes[3].plot(baseline.loss, label="one expert")
axes[3].set(xlabel="step", ylabel="MSE", yscale="log", title="training loss")
axes[3].legend()
plt.tight_layout()
plt.show()
print(f"expert owning each region: {match.owner}; "
      f"{match.purity:.0%} of the training points are routed (argmax) to their region's owner")
for region, expert in enumerate(match.owner):
    share = data_gates[data.region == region, expert].mean()
    print(f"  region {region}: mean gate of expert {expert} is {share:.2f}")

# %% [markdown]
# ### A fair comparison: the same parameters, the same FLOPs
#
# The baseline above is one expert of width `H = 8`: a quarter of the mixture's parameters
# and a quarter of its compute. Beating it shows little; a mixture could win by being
# bigger. Two fairer baselines, each one `DenseMixture(n_experts=1)` (so the readout and
# the training are the same):
#
# - **the same parameters**: one expert of width `H = 34`, 177 parameters against the
#   mixture's 179. A dense mixture runs every expert on every point, so this is also (to
#   within the router's 16 FLOPs) the same compute per point: about 270 FLOPs;
# - **the same active FLOPs as a sparse mixture**: if each point ran only the expert with
#   its largest gate (what notebook 02 builds), it would cost one expert of width 8 plus
#   the router, about 80 FLOPs. That is the `H = 8` expert, now compared with the trained
#   mixture *run that way*: each point through its top-1 expert only, with weight 1.
#
# All are trained as above from three seeds (seed 0 of the mixture and of the `H = 8`
# expert are the two models trained above) and scored on 2048 new points (`regions_task`
# with another seed); each entry is the mean with the smallest and largest of the three
# seeds in brackets.

# %%
from moe_course.experiments import over_seeds  # noqa: E402

validation = regions_task(2048, seed=1)  # points the models never trained on
H_SAME_PARAMS = 34


def validation_mse(model, top_1=False):
    """MSE on the validation points; with top_1, each point runs only its top expert."""
    with torch.no_grad():
        prediction, gates = model(validation.x)
        if top_1:
            outs = torch.stack([expert(validation.x) for expert in model.experts], 1)  # (T, E, D)
            best = outs[torch.arange(len(validation.x)), gates.argmax(-1)]  # (T, D)
            prediction = model.readout(best)  # (T, 1)
        return float(F.mse_loss(prediction, validation.y))


contenders = {"mixture, 4 experts of H = 8": {},
              f"one expert, H = {H_SAME_PARAMS} (same parameters)": {
                  "n_experts": 1, "d_hidden": H_SAME_PARAMS},
              "one expert, H = 8 (top-1 FLOPs)": {"n_experts": 1}}


trained_above = {"mixture, 4 experts of H = 8": mixture, "one expert, H = 8 (top-1 FLOPs)": single}


def fair_run(seed):
    scores = {}
    for name, options in contenders.items():
        if seed == 0 and name in trained_above:  # seed 0 of these two: the models above
            model = trained_above[name]
        else:
            torch.manual_seed(seed)
            model = DenseMixture(**options)
            train(model, mse, lambda step: batch, steps=600, optimizer=optimizer_for(model),
                  seed=seed, progress=False)
        scores[name] = validation_mse(model)
        if len(model.experts) > 1:
            scores["the mixture run top-1"] = validation_mse(model, top_1=True)
    return scores


fair = over_seeds(fair_run, seeds=(0, 1, 2))
for name, options in contenders.items():
    n_params = sum(p.numel() for p in DenseMixture(**options).parameters())
    print(f"{name:36s} {n_params:4d} parameters")
for name, b in fair.items():
    seeds = ", ".join(f"{v:.4f}" for v in b.values)
    print(f"{name:36s} validation MSE {b}   (seeds 0, 1, 2: {seeds})")

fig, ax = plt.subplots(figsize=(7, 3.2))
for j, (name, b) in enumerate(fair.items()):
    ax.errorbar(b.mean, j, xerr=[[b.mean - b.low], [b.high - b.mean]], fmt="o", capsize=4)
    ax.plot(b.values, [j] * len(b.values), "k.", ms=4)
ax.set(yticks=range(len(fair)), yticklabels=list(fair), xscale="log", xlabel="validation MSE",
       title="mean and range over 3 seeds (dots: the seeds)")
ax.invert_yaxis()
plt.tight_layout()
plt.show()

# %% [markdown]
# What the numbers say (they are this run's; the conclusions held for all three seeds
# unless noted):
#
# - **Same parameters, same compute:** the dense mixture's validation error (about 0.019)
#   is about half that of one expert of width 34 (about 0.038), and its worst seed beats
#   the wide expert's best. So the first baseline's gap was not only size: on a task whose
#   regions need different functions, four gated specialists fit better than one network
#   of the same size and cost.
# - **Same active FLOPs:** run top-1, each point through one expert of width 8, the
#   trained mixture keeps much of that advantage, with a wide spread over the seeds. Its
#   mean lands near the wide expert's, but here the seeds disagree: it beat the wide
#   expert on two seeds and lost to it on one. Against the `H = 8` expert that costs the
#   same per point it won on every seed, by far on two and narrowly on the third (seed 0,
#   whose `H = 8` expert is the one trained above).
#
# That last row is the promise of sparse mixtures, at a quarter of the compute of the dense
# one. It was trained dense and only evaluated top-1; notebook 02 trains the router to
# choose with `k` experts from the start.

# %% [markdown]
# ## 5 · What the dense mixture costs
#
# Every expert ran on every point. With `E` experts of hidden width `H`, one token costs
# about `E` times the multiply-adds of one expert, plus the router's `D x E`; the
# parameters grow `E`-fold too. The measurement below times a forward and backward pass as
# `E` grows.

# %%
x_cost = torch.randn(1024, 64)
for n_experts in (1, 2, 4, 8, 16):
    torch.manual_seed(0)
    experts = nn.ModuleList(Expert(64, 128) for _ in range(n_experts))
    w = torch.zeros(64, n_experts, requires_grad=True)
    start = time.perf_counter()
    for _ in range(5):
        dense_moe(x_cost, experts, w)[0].sum().backward()
    per_step = (time.perf_counter() - start) / 5
    n_params = sum(p.numel() for p in experts.parameters())
    print(f"E = {n_experts:2d}: {n_params:7,d} expert parameters, {per_step * 1e3:6.1f} ms per step")

# %% [markdown] nbgrader={"grade": false, "grade_id": "ex01_written_prompt", "locked": true, "schema_version": 3, "solution": false}
# **Written answer (1 point).** Compare the cost of a dense mixture of `E` experts with the
# cost of one expert, in compute per token and in parameters, using the measurement above.
# Then explain why this motivates *sparse* mixtures, in which each token runs only `K` of
# the `E` experts. What would a sparse mixture keep of the dense one's benefits, and what
# new problem must it solve? (Four to eight sentences.)

# %% [markdown] nbgrader={"grade": true, "grade_id": "ex01_written", "locked": false, "points": 1, "schema_version": 3, "solution": true}
# A dense mixture runs all `E` experts on every token, so its compute per token is about
# `E` times that of one expert (`E * 2 * 2DH` FLOPs plus the router's `2DE`), and its
# parameters are `E` times as many; the timing above grows roughly linearly in `E`. Capacity
# and cost are tied together: to give the model more parameters we must pay for them on
# every token. Yet after training, most of a token's gate weight sits on one or two experts,
# so most of that compute is multiplied by weights near zero and wasted. A sparse mixture
# keeps only the top `K` gates per token and runs only those experts, so parameters grow
# with `E` while compute per token stays that of `K` experts (Shazeer et al. 2017). The new
# problems are the ones the next notebooks solve: the top-k choice is not differentiable, so
# the router only learns through the kept gates; and nothing stops the router from sending
# most tokens to a few experts, so sparse mixtures need load balancing and capacity limits.

# %% [markdown]
# ## Summary
#
# - An expert is a feed-forward network; a gate is a softmax over router logits; the dense
#   mixture is their weighted sum, trained end to end (Jacobs et al. 1991).
# - Trained on a task whose regions need different functions, the experts specialise and
#   the gate learns which expert owns which region.
# - Dense mixtures pay for every expert on every token. Notebook 02 keeps only the top-k
#   experts per token: Shazeer et al. (2017), *Outrageously Large Neural Networks: The
#   Sparsely-Gated Mixture-of-Experts Layer*, arXiv 1701.06538.
