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
# # 05 · A mixture-of-experts transformer
#
# **Difficulty** ★★★☆ · **Time** about 75 minutes · **Points** 6 (4 autograded, 2 written)
#
# Notebooks 01 to 04 built the parts of a mixture-of-experts layer one function at a time:
# experts and a gate, top-k routing and sparse dispatch, load-balancing losses and
# capacity, expert-choice routing. This notebook assembles them into the layer that large
# language models actually use, and trains a small one.
#
# The recipe is the Switch Transformer's (Fedus et al. 2021, arXiv 2101.03961, Fig. 2) and
# GShard's (Lepikhin et al. 2020, arXiv 2006.16668): take a transformer and replace the
# feed-forward network of its blocks by a mixture of experts. Attention, layer norms,
# residual connections and embeddings stay as they were. Mixtral (Jiang et al. 2024, arXiv
# 2401.04088) does exactly this in every one of its 32 blocks, with 8 experts and top-2
# routing, so that each token uses 13B of its 47B parameters. The model then holds many
# more parameters than it spends on any one token: it has a *total* and an *active*
# parameter count, and a fair comparison is against a dense model with the same *active*
# parameters, which costs the same compute per token.
#
# **You will implement**
#
# | exercise | what | points |
# |---|---|---|
# | `MoEFeedForward` | the MoE feed-forward layer, with a top-k or an expert-choice router | 3 |
# | `moe_lm_loss` | the language-model loss plus the routers' auxiliary and z losses | 1 |
# | written | MoE against dense at equal active parameters; routing by domain | 2 |
#
# Then you train a tiny character-level MoE language model on a corpus of four kinds of
# text (arithmetic, English-like sentences, Python-like code and DNA), compare it with its
# dense twin, measure whether its experts specialise by domain, watch the expert load with
# and without the balancing loss, and sample text from it.
#
# **Shapes.** `B` batch, `S` sequence length, `D` model width, `H` expert hidden width, `E`
# experts, `K` experts per token, `C` capacity, `V` vocabulary. The layer receives
# `(B, S, D)` and routes its `T = B S` tokens as rows of a `(T, D)` matrix; router logits
# are `(T, E)`.
#
# Run each check cell after your answer: it prints one line when you are right and tells
# you what is probably wrong when you are not.

# %%
import math
import time
from typing import NamedTuple

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_course import (  # notebooks 01-04's exercises (reference versions) and named tuples
    Expert,
    MoEOutput,
    TokenChoice,
    apply_capacity,
    expert_capacity,
    expert_choice_capacity,
    expert_choice_moe,
    expert_choice_routing,
    router_z_loss,
    sparse_moe,
    switch_aux_loss,
    top_k_gating,
)
from moe_course.data import DOMAINS, CharCorpus
from moe_course.grading import check
from moe_course.train import fast_mode, train
from moe_course.transformer import Block, CharLM, LMConfig, count_parameters, dense_ffn, generate
from moe_course.widgets import LoadTimeline, TokenRoutingView

torch.manual_seed(0)
QUICK = fast_mode()  # True while a grader runs the notebook: training stops after a few steps

# %% [markdown]
# ## 1 · Where the experts go
#
# `moe_course.transformer` provides the scaffolding of a small GPT-2-style decoder (Radford
# et al. 2019): token and position embeddings, a stack of **pre-norm** blocks and a tied
# output layer. A block updates the residual stream `x` `(B, S, D)` twice,
#
# $$x \leftarrow x + \operatorname{Attn}(\operatorname{LN}_1(x)), \qquad
# x \leftarrow x + \operatorname{FFN}(\operatorname{LN}_2(x)),$$
#
# and its feed-forward network is whatever module you hand it: `Block(d_model, n_heads,
# ffn)`. Attention mixes information *between* positions; the feed-forward network then
# processes every position on its own, with the same weights. That second property is what
# makes the FFN the natural place for experts: since positions do not interact there, the
# `B S` positions can be flattened into `T` independent rows and each row sent to its own
# experts. The FFN is also where most of a block's parameters live, as the cell below
# shows for the dense block (an `Expert` of hidden width `4D`, notebook 01's module).

# %%
D_DEMO = 48
dense_block = Block(d_model=D_DEMO, n_heads=4, ffn=dense_ffn(D_DEMO, 4 * D_DEMO))
print(dense_block)
out = dense_block(torch.randn(2, 16, D_DEMO))  # (B, S, D)
n_attn = sum(p.numel() for p in dense_block.attn.parameters())
n_ffn = sum(p.numel() for p in dense_block.ffn.parameters())
print(f"output {tuple(out.x.shape)}; attention {n_attn:,} parameters, "
      f"feed-forward {n_ffn:,} ({n_ffn / (n_attn + n_ffn):.0%} of the two)")

# %% [markdown]
# ## 2 · The MoE feed-forward layer
#
# An MoE feed-forward layer is a router `W_g` `(D, E)` and `E` experts. For each of the `T`
# rows it computes router logits, decides which experts process which rows, runs the
# experts sparsely and mixes their outputs back; on the side it computes the router
# losses that keep training healthy. You have written every step already:
#
# 1. **flatten** `x` `(B, S, D)` to `(T, D)` and compute the router logits `(T, E)` with
#    `self.gate`;
# 2. **z-loss**: `router_z_loss(logits)`, the mean of $\operatorname{logsumexp}^2$ (ST-MoE,
#    Zoph et al. 2022, arXiv 2202.08906, eq. 5), for both routers;
# 3. **route and dispatch**, by `router`:
#    - `"top_k"` (token choice, notebooks 02 and 03): `top_k_gating(logits, k)`; if
#      `capacity_factor` is not `None`, limit every expert to `expert_capacity(T, E,
#      capacity_factor, k)` slots with `apply_capacity` (dropped assignments get weight 0;
#      with `None` nothing is dropped); then `sparse_moe`. The auxiliary loss is the Switch
#      loss `switch_aux_loss(softmax(logits), indices)` over all `T K` routing decisions,
#      before capacity (Fedus et al. eq. 4);
#    - `"expert_choice"` (notebook 04, Zhou et al. 2022, arXiv 2202.09368): every expert
#      takes `C = expert_choice_capacity(T, E, capacity_factor)` tokens with
#      `expert_choice_routing`, then `expert_choice_moe`. When `capacity_factor` is `None`
#      it defaults to `k`, so that a token gets `k` experts on average, the compute of
#      top-`k`. The auxiliary loss is a zero tensor: expert choice is balanced by
#      construction;
# 4. **reshape** the output back to `x`'s shape.
#
# **Exercise 1 (3 points).** Write `MoEFeedForward(d_model, d_hidden, n_experts, k=2,
# router="top_k", capacity_factor=None)`, an `nn.Module`. The contract the check relies on:
#
# - attributes `gate = nn.Linear(d_model, n_experts, bias=False)` (the router) and
#   `experts`, an `nn.ModuleList` of `n_experts` experts `Expert(d_model, d_hidden)` (your
#   notebook 01 module, here `moe_course.Expert`), each with `w_in` and `w_out`; the check
#   copies known weights into them, so the names matter. Keep `k` as `self.k`
#   (`count_parameters` below reads it), and raise a `ValueError` for a `router` other than
#   `"top_k"` or `"expert_choice"`;
# - call the experts as modules, `self.experts[e](rows)`, once each on the rows routed to
#   them (`sparse_moe` and `expert_choice_moe` do): the check watches what every expert
#   computes;
# - `forward(x)` takes `(B, S, D)` and returns a named tuple with at least `y` `(B, S, D)`,
#   `aux_loss` (a scalar tensor, the Switch loss; 0 for expert choice) and `z_loss` (a
#   scalar tensor). Return the course's `MoEOutput(y, aux_loss, z_loss, logits, routing,
#   expert_load)`: the rest of this notebook reads `logits`, the `routing` decisions
#   (`TokenChoice(weights, indices, keep)`, all `(T, K)`, for top-k; the `ExpertChoice`
#   that `expert_choice_routing` returns for expert choice) and `expert_load`, an `(E,)`
#   float tensor counting the assignments each expert processed in this call.
#
# Use the functions of notebooks 01 to 04, imported above from `moe_course` (or your own
# versions); `moe_course.MoEFeedForward` itself is the answer, and a solution that calls
# it gets no points.
#
# <details><summary>Hint 1: the idea</summary>
#
# `forward` is the functions of notebooks 01 to 04 in a row. Flatten `(B, S, D)` to
# `(T, D)` tokens; the router logits are `self.gate(flat)`; the z-loss comes from them in
# both branches. **Top-k**: `top_k_gating`, then (only when `capacity_factor` is given)
# `expert_capacity` with `k` and `apply_capacity`, then `sparse_moe`; the Switch loss takes
# the softmax over *all* experts and every chosen index, before capacity. **Expert
# choice**: the capacity has no `k` in it, `expert_choice_capacity(T, E, factor)` with
# `factor = capacity_factor` if given, else `float(k)`; then `expert_choice_routing` and
# `expert_choice_moe`; the aux loss is a zero scalar (`logits.new_zeros(())`). Reshape `y`
# back to `(B, S, D)`. In `__init__`, check `router` first.
# </details>
#
# <details><summary>Hint 2: the shape of the code</summary>
#
# ```python
# flat = x.reshape(-1, x.shape[-1])                       # (T, D)
# logits = ...                                            # (T, E)
# if self.router == "top_k":
#     weights, indices = top_k_gating(logits, self.k)     # (T, K), (T, K)
#     keep = torch.ones_like(indices, dtype=torch.bool)   # (T, K)
#     if self.capacity_factor is not None:
#         ...                                             # capacity, then apply_capacity
#     y = ...                                             # sparse_moe on the kept weights
# else:
#     ...                                                 # expert-choice branch
# ```
# For the load, count the kept assignments: `torch.bincount(indices[keep],
# minlength=n_experts).float()`.
# </details>

# %% nbgrader={"grade": false, "grade_id": "ex05_moe_feed_forward", "locked": false, "schema_version": 3, "solution": true}
class MoEFeedForward(nn.Module):
    """A feed-forward block replaced by a mixture of E experts: (B, S, D) -> MoEOutput."""

    def __init__(self, d_model, d_hidden, n_experts, k=2, router="top_k", capacity_factor=None):
        super().__init__()
        ### BEGIN SOLUTION
        if router not in ("top_k", "expert_choice"):
            raise ValueError(f"router must be 'top_k' or 'expert_choice'; got {router!r}")
        self.k = k
        self.router = router
        self.capacity_factor = capacity_factor
        self.gate = nn.Linear(d_model, n_experts, bias=False)  # W_g, (D, E)
        self.experts = nn.ModuleList(Expert(d_model, d_hidden) for _ in range(n_experts))
        ### END SOLUTION

    def forward(self, x):
        ### BEGIN SOLUTION
        flat = x.reshape(-1, x.shape[-1])  # (T, D)
        logits = self.gate(flat)  # (T, E)
        n_tokens, n_experts = logits.shape
        z_loss = router_z_loss(logits)  # ST-MoE eq. 5
        if self.router == "top_k":
            weights, indices = top_k_gating(logits, self.k)  # (T, K), (T, K)
            keep = torch.ones_like(indices, dtype=torch.bool)  # (T, K)
            if self.capacity_factor is not None:
                capacity = expert_capacity(n_tokens, n_experts, self.capacity_factor, self.k)
                weights, keep = apply_capacity(weights, indices, capacity)  # (T, K), (T, K)
            y = sparse_moe(flat, self.experts, weights, indices)  # (T, D)
            aux_loss = switch_aux_loss(torch.softmax(logits, dim=-1), indices)  # Switch eq. 4
            routing = TokenChoice(weights, indices, keep)
            load = torch.bincount(indices[keep], minlength=n_experts).float()  # (E,)
        else:
            factor = self.capacity_factor if self.capacity_factor is not None else float(self.k)
            capacity = expert_choice_capacity(n_tokens, n_experts, factor)
            routing = expert_choice_routing(logits, capacity)  # (E, C), (E, C)
            y = expert_choice_moe(flat, self.experts, routing.gates, routing.token_idx)  # (T, D)
            aux_loss = logits.new_zeros(())  # balanced by construction
            load = torch.full((n_experts,), float(capacity))  # (E,)
        return MoEOutput(y.reshape(x.shape), aux_loss, z_loss, logits, routing, load)
        ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ex05_moe_feed_forward_tests", "locked": true, "points": 3, "schema_version": 3, "solution": false}
check("ex05_moe_feed_forward", MoEFeedForward)
### BEGIN HIDDEN TESTS
check("ex05_moe_feed_forward", MoEFeedForward, hidden=True)
### END HIDDEN TESTS

# %% [markdown]
# **Your layer in a block, with both routers.** Swap the dense FFN above for your layer:
# `Block` accepts any module, and when the module returns something with a `.y` (your
# `MoEOutput`) it adds `y` to the residual stream and hands the whole output back as
# `BlockOutput.moe`, so the routing and the losses stay in reach. Both routers get the same
# weights and the same 64 tokens. Top-2 gives every token exactly two experts, and the
# experts whatever load the router's preferences produce; expert choice gives every expert
# exactly `C = ceil(64 * 2 / 4) = 32` tokens, and the tokens whatever number of experts
# happened to pick them, zero included.

# %%
torch.manual_seed(0)
E_DEMO, K_DEMO = 4, 2
x_demo = torch.randn(4, 16, D_DEMO)  # (B, S, D): T = 64 tokens
blocks = {}
for router in ("top_k", "expert_choice"):
    torch.manual_seed(1)  # the same weights for both routers
    blocks[router] = Block(D_DEMO, 4, MoEFeedForward(D_DEMO, 2 * D_DEMO, E_DEMO, k=K_DEMO,
                                                     router=router))
names = {"top_k": "top-2 token choice", "expert_choice": "expert choice, c = 2"}
outputs = {}
with torch.no_grad():
    for router, block in blocks.items():
        outputs[router] = block(x_demo)
        moe = outputs[router].moe
        print(f"{names[router]:21s} x {tuple(outputs[router].x.shape)}, aux_loss "
              f"{float(moe.aux_loss):.3f}, z_loss {float(moe.z_loss):.3f}, "
              f"expert load {moe.expert_load.tolist()}")
n_tokens_demo = x_demo.shape[0] * x_demo.shape[1]
per_token = {
    "top_k": outputs["top_k"].moe.routing.keep.sum(-1),  # (T,)
    "expert_choice": torch.bincount(outputs["expert_choice"].moe.routing.token_idx.flatten(),
                                    minlength=n_tokens_demo),  # (T,)
}
fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
width = 0.4
for j, router in enumerate(blocks):
    offset = (j - 0.5) * width
    load = outputs[router].moe.expert_load
    axes[0].bar(torch.arange(E_DEMO) + offset, load, width=width, label=names[router])
    counts = torch.bincount(per_token[router], minlength=E_DEMO + 1)  # (E + 1,)
    axes[1].bar(torch.arange(E_DEMO + 1) + offset, counts, width=width, label=names[router])
axes[0].axhline(n_tokens_demo * K_DEMO / E_DEMO, color="gray", ls=":", lw=1.2)
axes[0].set(xlabel="expert", ylabel="tokens processed", xticks=range(E_DEMO),
            title="load per expert (dotted: T K / E)")
axes[1].set(xlabel="experts per token", ylabel="tokens", xticks=range(E_DEMO + 1),
            title="experts each token received")
for ax in axes:
    ax.legend(fontsize=8)
plt.tight_layout()
plt.show()
print("parameters of one layer:", count_parameters(blocks["top_k"].ffn))

# %% [markdown]
# The training below uses the top-k router. Notebook 04 showed why expert choice does not
# fit a decoder that predicts the next character: an expert's choice among the `T` tokens
# of a batch depends on all of them, later positions included, so a position's output can
# change when a *future* character changes.

# %% [markdown]
# ## 3 · The training loss
#
# A language model minimises the cross-entropy (CE) of the next character. An MoE language
# model adds, for every MoE layer `l`, its auxiliary load-balancing loss and its router
# z-loss, each with a small weight:
#
# $$\mathcal L = \underbrace{\frac{1}{BS}\sum_{b,s} -\log p(y_{b,s} \mid x_{b, \le s})}_{\text{CE}}
# \;+\; \alpha \sum_{l} \mathcal L^{(l)}_{\text{aux}} \;+\; \beta \sum_{l} \mathcal L^{(l)}_{z}.$$
#
# The Switch Transformer uses $\alpha = 0.01$ (Fedus et al. Sec. 2.2), ST-MoE $\beta =
# 0.001$ (Zoph et al. Sec. 3.3, eq. 6). The losses are *summed* over layers: each layer's router
# must be balanced on its own, and a model with more layers gets more of them.
#
# **Exercise 2 (1 point).** Write `moe_lm_loss(logits, targets, aux_losses,
# aux_weight=0.01, z_weight=0.001)`. `logits` is `(B, S, V)`, `targets` `(B, S)` integer
# ids; the cross-entropy is the mean over all `B S` positions. `aux_losses` is a list with
# one entry per MoE layer (empty for a dense model); each entry has the attributes
# `.aux_loss` and `.z_loss`, scalar tensors, and is also a pair, so `for aux, z in
# aux_losses` works too. The cell below defines `LayerLosses`, the named tuple the training
# code passes, and `layer_losses`, which makes the list from a model's MoE outputs. Return
# a scalar tensor.
#
# <details><summary>Hint 1: the idea</summary>
#
# The language-model loss is the cross-entropy averaged over all `B * S` positions. To
# it add `aux_weight` times the *sum* over layers of the auxiliary losses and `z_weight`
# times the sum of the z-losses. A dense model has no MoE layer: the list is empty, and the
# loss is the cross-entropy alone.
# </details>
#
# <details><summary>Hint 2: the shape of the code</summary>
#
# ```python
# ce = F.cross_entropy(logits.reshape(-1, ...), targets.reshape(-1))   # (N, V) and (N,)
# aux = sum(layer.aux_loss for layer in aux_losses)                    # 0 for no layers
# ```
# (`torch.stack` of an empty list fails; the built-in `sum` of one gives 0.)
# </details>

# %%
class LayerLosses(NamedTuple):
    """One MoE layer's two router losses, as moe_lm_loss receives them."""

    aux_loss: Tensor  # scalar load-balancing (Switch) loss of the layer
    z_loss: Tensor  # scalar router z-loss of the layer


def layer_losses(moe_outputs):
    """[LayerLosses] from a model's MoE outputs (CharLM's `moe_outputs`), first layer first."""
    return [LayerLosses(o.aux_loss, o.z_loss) for o in moe_outputs]


# %% nbgrader={"grade": false, "grade_id": "ex05_moe_lm_loss", "locked": false, "schema_version": 3, "solution": true}
def moe_lm_loss(logits, targets, aux_losses, aux_weight=0.01, z_weight=0.001):
    """Cross-entropy of (B, S, V) logits against (B, S) targets plus the weighted router losses."""
    ### BEGIN SOLUTION
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))  # mean
    aux = sum(layer.aux_loss for layer in aux_losses)  # summed over layers
    z = sum(layer.z_loss for layer in aux_losses)
    return ce + aux_weight * aux + z_weight * z
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ex05_moe_lm_loss_tests", "locked": true, "points": 1, "schema_version": 3, "solution": false}
check("ex05_moe_lm_loss", moe_lm_loss)
### BEGIN HIDDEN TESTS
check("ex05_moe_lm_loss", moe_lm_loss, hidden=True)
### END HIDDEN TESTS

# %% [markdown]
# **By hand.** All-zero logits over `V = 10` characters predict every character with
# probability 1/10, a cross-entropy of $\ln 10 \approx 2.303$ whatever the targets. Two
# layers with aux losses 1.0 and 1.2 and z-losses 4.0 and 6.0 add $0.01 \cdot 2.2 + 0.001
# \cdot 10 = 0.032$.

# %%
zero_logits = torch.zeros(2, 3, 10)  # (B, S, V)
some_targets = torch.tensor([[1, 2, 3], [4, 5, 6]])  # (B, S)
two_layers = [LayerLosses(torch.tensor(1.0), torch.tensor(4.0)),
              LayerLosses(torch.tensor(1.2), torch.tensor(6.0))]
print(f"ln 10 = {math.log(10):.4f}")
print(f"dense (no MoE layer):   {float(moe_lm_loss(zero_logits, some_targets, [])):.4f}")
print(f"two MoE layers:         {float(moe_lm_loss(zero_logits, some_targets, two_layers)):.4f}")

# %% [markdown]
# ## 4 · A corpus of four domains
#
# `moe_course.data.CharCorpus` generates (never downloads) 20,000 characters of each of four
# kinds of text and splits each into training and validation parts. A batch row always
# comes from one domain, so we know the domain of every character we feed the model, and
# can later ask whether the router noticed. The domains share some characters and not
# others: DNA is four capital letters, arithmetic is digits and `+-*=;`, the sentences and
# the code share the lower-case letters.

# %%
corpus = CharCorpus(n_chars=20_000, seed=0)
tokenizer = corpus.tokenizer
print(corpus)
for name in DOMAINS:
    window = corpus.get_batch("train", 1, 48, seed=1, domains=name).x[0]  # (S,)
    print(f"{name:>10}: {tokenizer.decode(window)!r}")
chars = {name: set(text) for name, text in corpus.texts.items()}
for name in DOMAINS:
    others = set().union(*(chars[o] for o in DOMAINS if o != name))
    only = "".join(sorted(chars[name] - others))
    print(f"{name:>10}: {len(chars[name]):2d} characters, {len(chars[name] - others):2d} used "
          f"by no other domain: {only!r}")

# %% [markdown]
# ## 5 · Two models with the same active parameters
#
# Both models are `CharLM`s with the same embeddings, attention and sizes (`D = 48`, two
# blocks, four heads, a context of 32 characters); only the feed-forward networks differ:
#
# - the **MoE model**: in each block, your `MoEFeedForward` with `E = 4` experts, top-2
#   routing, no capacity limit;
# - the **dense model**: in each block, one expert of twice the hidden width.
#
# The experts are **SwiGLU** experts, `w2(silu(w1 x) * w3 x)` (Shazeer 2020, arXiv
# 2002.05202), the feed-forward network of Mixtral (`moe_course.SwiGLUExpert`, its eq. 1)
# and of DeepSeek's models, rather than notebook 01's GELU `Expert`. A SwiGLU expert has
# three matrices instead of two, so, as is usual, its hidden width is two thirds of the
# GELU one: `H = 64` instead of 96, which keeps the parameters per expert about equal.
# Your layer calls its experts as modules, so the cell below builds your `MoEFeedForward`
# and swaps its `experts` list for SwiGLU ones; `EXPERT = "gelu"` gives notebook 01's
# experts (`H = 96`) everywhere instead, for comparison.
#
# A token passes through two experts of width `H` in the MoE model and one of width `2H`
# in the dense one: the same multiply-adds, up to the tiny router. `count_parameters`
# reports both counts: *total* is everything the model stores, *active* what one token
# uses (the router and `k` of the `E` experts of each MoE layer).

# %%
from moe_course import SwiGLUExpert  # noqa: E402  Mixtral's expert (arXiv 2401.04088, eq. 1)

EXPERT = "swiglu"  # the experts' kind: "swiglu" (Mixtral, DeepSeek) or "gelu" (notebook 01)
HIDDEN = {"swiglu": 64, "gelu": 96}  # expert hidden width H: about equal parameters
V = tokenizer.vocab_size
D_MODEL, N_EXPERTS, K, N_LAYERS = 48, 4, 2, 2
D_HIDDEN = HIDDEN[EXPERT]
SEQ, BATCH, LR = 32, 16, 1e-2
config = LMConfig(vocab_size=V, seq_len=SEQ, d_model=D_MODEL, n_heads=4, n_layers=N_LAYERS)


def make_expert(d_model, d_hidden, kind=EXPERT):
    return SwiGLUExpert(d_model, d_hidden) if kind == "swiglu" else Expert(d_model, d_hidden)


def moe_layer(d_model=D_MODEL, kind=EXPERT, capacity_factor=None):
    """Your MoEFeedForward, top-K of N_EXPERTS, with experts of the given kind."""
    layer = MoEFeedForward(d_model, HIDDEN[kind], N_EXPERTS, k=K, capacity_factor=capacity_factor)
    layer.experts = nn.ModuleList(make_expert(d_model, HIDDEN[kind], kind)
                                  for _ in range(N_EXPERTS))
    return layer


def make_moe_model(kind=EXPERT):
    torch.manual_seed(0)
    return CharLM(config, lambda i: moe_layer(kind=kind))


def make_dense_model(kind=EXPERT):
    torch.manual_seed(0)
    return CharLM(config, lambda i: make_expert(D_MODEL, K * HIDDEN[kind], kind))


counts = {f"MoE (4 experts, top-2, H = {D_HIDDEN})": count_parameters(make_moe_model()),
          f"dense (hidden 2 x {D_HIDDEN})": count_parameters(make_dense_model())}
for name, c in counts.items():
    print(f"{name:32s} total {c.total:7,d}   active {c.active:7,d}")

fig, ax = plt.subplots(figsize=(6, 3))
for j, c in enumerate(counts.values()):
    bars = ax.bar([j - 0.2, j + 0.2], [c.total, c.active], width=0.4,
                  color=["tab:blue", "tab:orange"], label=["total", "active"] if j == 0 else None)
    for bar in bars:
        ax.annotate(f"{int(bar.get_height()):,}", (bar.get_x() + 0.2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)
ax.set(xticks=[0, 1], xticklabels=list(counts), ylabel="parameters",
       title="parameters stored (total) and used per token (active)")
ax.set_ylim(0, 1.15 * max(c.total for c in counts.values()))
ax.legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 6 · Training
#
# Three runs, each from a fixed seed, on the same sequence of batches (16 windows of 32
# characters, four of each domain), with AdamW at learning rate $10^{-2}$ and your
# `moe_lm_loss`:
#
# 1. the MoE model with the Switch loss ($\alpha = 0.01$) and the z-loss ($\beta = 0.001$);
# 2. the same MoE model without the Switch loss ($\alpha = 0$, z-loss kept), for section 8,
#    trained for fewer steps to save time;
# 3. the dense model (no MoE layer, so `moe_lm_loss` is the plain cross-entropy).
#
# `moe_course.train.train` records the training loss, the load of every expert of every
# MoE layer at every step (from the `expert_load` field of your layer's output), and the
# validation loss on a fixed batch of validation text every 20 steps. On a laptop CPU the
# three runs take about half a minute together; when a grader runs this notebook they
# stop after a few steps, and the numbers below mean little.

# %%
STEPS, STEPS_NO_AUX = 100, 50
val_batch = corpus.get_batch("val", 64, SEQ, seed=123)  # 16 windows of each domain


def batch_for(step):
    return corpus.get_batch("train", BATCH, SEQ, seed=step)


def lm_loss(aux_weight):
    def loss_fn(model, batch):
        out = model(batch.x)
        return moe_lm_loss(out.logits, batch.y, layer_losses(out.moe_outputs),
                           aux_weight=aux_weight, z_weight=0.001)
    return loss_fn


def val_loss(model):
    return F.cross_entropy(model(val_batch.x).logits.reshape(-1, V), val_batch.y.reshape(-1))


runs = {"MoE, Switch loss": (make_moe_model, 0.01, STEPS),
        "MoE, no Switch loss": (make_moe_model, 0.0, STEPS_NO_AUX),
        "dense": (make_dense_model, 0.0, STEPS)}
models, histories, ms_per_step = {}, {}, {}
for name, (make, aux_weight, steps) in runs.items():
    models[name] = make()
    start = time.perf_counter()
    histories[name] = train(models[name], lm_loss(aux_weight), batch_for, steps=steps, lr=LR,
                            seed=0, eval_fn=val_loss, eval_every=20, desc=name)
    ms_per_step[name] = 1e3 * (time.perf_counter() - start) / histories[name].steps
model_moe, model_dense = models["MoE, Switch loss"], models["dense"]
for name, hist in histories.items():
    last = min(20, hist.steps)
    print(f"{name:20s} {hist.steps:3d} steps, {ms_per_step[name]:4.0f} ms per step, "
          f"train loss (last {last} steps) {hist.loss[-last:].mean():.3f}, "
          f"validation loss {hist.eval_loss[-1]:.3f}")

# %% [markdown]
# The left panel shows the validation loss (dots) and the training loss averaged over 20
# steps (lines); the right panel the final validation loss of each model beside its total
# and active parameters. Read the printed numbers: they are this run's.

# %%
colours = {"MoE, Switch loss": "tab:blue", "MoE, no Switch loss": "tab:green",
           "dense": "tab:orange"}
fig, axes = plt.subplots(1, 2, figsize=(12, 3.8), gridspec_kw={"width_ratios": [1.5, 1]})
for name, hist in histories.items():
    window = min(20, hist.steps)
    smooth = F.avg_pool1d(hist.loss[None, None], window, stride=1)[0, 0]  # (steps - window + 1,)
    axes[0].plot(torch.arange(window, hist.steps + 1), smooth, color=colours[name], lw=1,
                 alpha=0.6)
    axes[0].plot(hist.eval_steps, hist.eval_loss, "o-", color=colours[name], ms=4,
                 label=f"{name}, validation")
axes[0].set(xlabel="step", ylabel="cross-entropy (nats per character)",
            title="validation (dots) and smoothed training loss (lines)")
axes[0].legend(fontsize=8)
compared = ["MoE, Switch loss", "dense"]
final = [histories[name].eval_loss[-1] for name in compared]
bars = axes[1].bar(range(2), final, color=[colours[n] for n in compared], width=0.5)
for bar, name in zip(bars, compared, strict=True):
    c = count_parameters(models[name])
    axes[1].annotate(f"{bar.get_height():.3f}\ntotal {c.total:,}\nactive {c.active:,}",
                     (bar.get_x() + 0.25, bar.get_height()), ha="center", va="bottom",
                     fontsize=8)
axes[1].set(xticks=range(2), xticklabels=compared, ylabel="final validation loss",
            title=f"after {histories['dense'].steps} steps, same active parameters")
axes[1].set_ylim(0, 1.35 * max(final))
plt.tight_layout()
plt.show()
gap = histories["dense"].eval_loss[-1] - histories["MoE, Switch loss"].eval_loss[-1]
print(f"validation loss, dense minus MoE: {gap:+.3f} nats per character "
      f"({'MoE ahead' if gap > 0 else 'dense ahead'}); the MoE steps took "
      f"{ms_per_step['MoE, Switch loss'] / ms_per_step['dense']:.1f}x the dense ones")

# %% [markdown]
# ## 7 · Do the experts specialise by domain?
#
# Feed each model 16 validation windows of one domain at a time and record, in each MoE
# layer, every character's first-choice expert (`routing.indices[:, 0]`). This gives a
# table per layer: for each domain, the share of its characters whose first choice is
# expert `e`. Two numbers summarise a table:
#
# - the **share on the top expert**: for each domain, the largest entry of its row, from
#   $1/E = 0.25$ (spread evenly) to 1 (one expert takes all of the domain);
# - the **mutual information** between domain and expert, in bits,
#   $I(\text{domain}; \text{expert}) = \sum_{d,e} p(d,e) \log_2 \frac{p(d,e)}{p(d)\,p(e)}$:
#   0 when the expert tells nothing about the domain, at most $\log_2 4 = 2$ bits when
#   four domains go to four different experts.
#
# We measure three models: the MoE model before training (the same initial weights), and
# the two trained MoE models (remember that the one without the Switch loss trained for
# half as many steps).

# %%
def domain_routing(model):
    """(L, domains, E) counts of first-choice experts, per MoE layer and domain."""
    rows = []
    model.eval()
    with torch.no_grad():
        for name in DOMAINS:
            batch = corpus.get_batch("val", 16, SEQ, seed=7, domains=name)
            outs = model(batch.x).moe_outputs
            rows.append(torch.stack([torch.bincount(o.routing.indices[:, 0], minlength=N_EXPERTS)
                                     for o in outs]).float())  # (L, E)
    model.train()
    return torch.stack(rows, dim=1)  # (L, domains, E)


def mutual_information_bits(counts):
    """I(domain; expert) in bits of a (domains, E) table of counts."""
    p = counts / counts.sum()  # (domains, E)
    independent = p.sum(1, keepdim=True) * p.sum(0, keepdim=True)  # (domains, E)
    terms = p * torch.log2(p / independent)  # (domains, E)
    return float(torch.where(p > 0, terms, torch.zeros_like(terms)).sum())


measured = {"before training": make_moe_model(), "MoE, Switch loss": model_moe,
            "MoE, no Switch loss": models["MoE, no Switch loss"]}
tables = {name: domain_routing(model) for name, model in measured.items()}  # (L, domains, E)
specialisation = {}
for name, table in tables.items():
    for layer in range(N_LAYERS):
        share = table[layer] / table[layer].sum(1, keepdim=True)  # (domains, E)
        top = share.max(1)  # (domains,), (domains,)
        bits = mutual_information_bits(table[layer])
        specialisation[name, layer] = (bits, top.values)
        detail = ", ".join(f"{d} {v:.0%} (e{int(e)})"
                           for d, v, e in zip(DOMAINS, top.values, top.indices, strict=True))
        print(f"{name:20s} layer {layer}: I = {bits:.2f} bits; on the top expert: {detail}")

# %% [markdown]
# The same tables as heatmaps: one row of panels per model, one column per layer; each row
# of a panel is a domain, each column an expert, and the colour is the share of the
# domain's characters whose first choice is that expert (rows sum to 1).

# %%
fig, axes = plt.subplots(len(tables), N_LAYERS, figsize=(4.2 * N_LAYERS, 2.4 * len(tables)),
                         squeeze=False)
for row, (name, table) in enumerate(tables.items()):
    for layer in range(N_LAYERS):
        ax = axes[row, layer]
        share = table[layer] / table[layer].sum(1, keepdim=True)  # (domains, E)
        ax.imshow(share, cmap="Blues", vmin=0, vmax=1, aspect="auto")
        for d in range(len(DOMAINS)):
            for e in range(N_EXPERTS):
                ax.text(e, d, f"{share[d, e]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if share[d, e] > 0.6 else "black")
        ax.set(xticks=range(N_EXPERTS), yticks=range(len(DOMAINS)),
               yticklabels=DOMAINS if layer == 0 else [],
               title=f"{name}, layer {layer}: I = {specialisation[name, layer][0]:.2f} bits")
        ax.title.set_fontsize(9)
        if row == len(tables) - 1:
            ax.set_xlabel("first-choice expert")
plt.tight_layout()
plt.show()

# %% [markdown]
# Character by character: one validation window of each domain, coloured by its
# first-choice expert in each layer of the model trained with the Switch loss. (Hover a
# character for its expert; with a widget frontend, pick a layer in the menu.)

# %%
snippets = [corpus.get_batch("val", 1, SEQ, seed=11, domains=name).x for name in DOMAINS]
model_moe.eval()
with torch.no_grad():
    first_choice = torch.cat([torch.stack([o.routing.indices[:, 0]
                                           for o in model_moe(s).moe_outputs])
                              for s in snippets], dim=1)  # (L, 4 S)
model_moe.train()
text = "".join(tokenizer.decode(s[0]) for s in snippets)
TokenRoutingView(text, first_choice, N_EXPERTS)

# %% [markdown]
# ## 8 · Expert load with and without the Switch loss
#
# `train` recorded each expert's share of the routed assignments at every step. Step 0 is
# the freshly initialised router: random weights already prefer some experts, because the
# character embeddings share directions. The Switch loss pushes the shares towards $1/E$;
# without it nothing does, and the router is free to keep or deepen the imbalance. The
# figure shows every expert's share per layer at the first step and averaged over each
# run's last 20 steps; the widget below it replays both runs step by step (it opens on the
# last layer; pick another in its menu).

# %%
hist_aux, hist_free = histories["MoE, Switch loss"], histories["MoE, no Switch loss"]
fig, axes = plt.subplots(1, N_LAYERS, figsize=(5.5 * N_LAYERS, 3.2), sharey=True)
bar_width = 0.27
for layer, ax in enumerate(axes):
    for j, (label, load) in enumerate((
            ("step 0 (initial router)", hist_aux.load[0, layer]),
            ("Switch loss, end", hist_aux.final_load(min(20, hist_aux.steps))[layer]),
            ("no Switch loss, end", hist_free.final_load(min(20, hist_free.steps))[layer]))):
        ax.bar(torch.arange(N_EXPERTS) + (j - 1) * bar_width, load, width=bar_width,
               color=("0.6", "tab:blue", "tab:green")[j], label=label)
    ax.axhline(1 / N_EXPERTS, color="gray", ls=":", lw=1.2)
    ax.set(xlabel="expert", xticks=range(N_EXPERTS),
           title=f"layer {layer}: share of the routed assignments")
axes[0].set_ylabel("load fraction")
axes[0].legend(fontsize=8)
plt.tight_layout()
plt.show()
for name, hist in (("Switch loss", hist_aux), ("no Switch loss", hist_free)):
    last = min(20, hist.steps)
    ratio = hist.max_min_ratio(last)
    print(f"{name:15s} busiest / idlest expert, last {last} steps: "
          + ", ".join(f"layer {i} {float(r):.2f}" for i, r in enumerate(ratio))
          + "   (step 0: " + ", ".join(
              f"{float(hist.load[0, i].max() / hist.load[0, i].min()):.2f}"
              for i in range(hist.n_layers)) + ")")

# %%
LoadTimeline(hist_aux, hist_free, labels=("Switch loss", "no Switch loss"), layer=N_LAYERS - 1)

# %% [markdown]
# ## 9 · Capacity during training: dropped tokens against quality
#
# The models above ran with `capacity_factor=None`: no expert ever refused a token. Real
# systems give each expert a buffer of `C = ceil(K T factor / E)` slots (notebook 03), and
# what overflows is dropped: the token's assignment contributes nothing and the token
# rides the residual connection. Switch Transformer compared factors 1.0, 1.25 and 2.0 at
# scale (Fedus et al. 2021, Table 1: 128 experts, 100k steps on C4): going from 2.0 to 1.0
# cost its top-1 model 0.007 nats of log perplexity (-1.554 to -1.561) and a top-2 MoE
# 0.025 (-1.547 to -1.572), while the smaller buffers made the steps faster.
#
# We train the same kind of model, made smaller so that twelve runs take seconds (one
# block, `D = 32`, 4 SwiGLU experts, top-2, 80 steps), with your `MoEFeedForward` at
# capacity factors 1.0, 1.25, 2.0 and none, from three seeds each, with your `moe_lm_loss`
# and the Switch loss. `moe_course.experiments.train_char_lm` counts the assignments your
# layer's `routing.keep` marks as dropped during training; the validation loss is measured
# with the capacity still in place. Note one thing before reading the results: with
# `E = 4` experts and `K = 2`, a factor of 2.0 gives `C = ceil(2 T 2 / 4) = T` slots, as many
# as an expert can ever be asked for (a token picks distinct experts), so 2.0 can never drop
# anything here and trains exactly like no limit.

# %%
from moe_course.experiments import band, train_char_lm  # noqa: E402

FACTORS = (1.0, 1.25, 2.0, None)
small = LMConfig(vocab_size=V, seq_len=SEQ, d_model=32, n_heads=2, n_layers=1)


def capacity_run(factor, seed):
    torch.manual_seed(seed)
    model = CharLM(small, lambda i: moe_layer(d_model=32, capacity_factor=factor))
    return train_char_lm(model, corpus, steps=80, seed=seed, loss=moe_lm_loss)


sweep = {factor: [capacity_run(factor, seed) for seed in (0, 1, 2)] for factor in FACTORS}
print(f"{'capacity factor':>15s} {'dropped in training':>22s} {'dropped (validation)':>22s} "
      f"{'validation loss':>24s}")
for factor, runs in sweep.items():
    print(f"{str(factor):>15s} {str(band([r.dropped for r in runs])):>22s} "
          f"{str(band([r.val_dropped for r in runs])):>22s} "
          f"{str(band([r.val_loss for r in runs])):>24s}")

fig, ax = plt.subplots(figsize=(6.4, 3.6))
for j, (factor, runs) in enumerate(sweep.items()):
    for seed, r in enumerate(runs):
        hollow = {"markerfacecolor": "none", "ms": 11} if factor == 2.0 else {"ms": 6}
        ax.plot(r.dropped, r.val_loss, "o^s"[seed], color=f"C{j}", **hollow,
                label=f"factor {factor}" if seed == 0 else None)
ax.set(xlabel="share of assignments dropped during training", ylabel="validation loss",
       title="capacity sweep (markers: seeds 0, 1, 2; 2.0 hollow)")
ax.legend(fontsize=8)
plt.tight_layout()
plt.show()
for seed in range(3):
    order = sorted(FACTORS, key=lambda f: sweep[f][seed].val_loss)
    print(f"seed {seed}: factors from best to worst validation loss: {order}")

# %% [markdown]
# What the sweep shows (this run's numbers; the pattern held on each seed):
#
# - **Drops.** With the Switch loss keeping the experts near balance, a factor of 1.0 drops
#   about an eighth of the assignments during training, 1.25 about a twentieth, and 2.0
#   nothing (it cannot drop here, see above), the same as no limit. On the validation batch
#   the drops are smaller, since a trained router is better balanced than the early one.
# - **Quality.** At this size and length, the validation losses of the four factors differ
#   by a few hundredths of a nat, less than the seeds differ from each other, and the seeds
#   disagree on the order (the last three printed lines): dropping an eighth of the
#   assignments costs nothing we can measure here. A dropped assignment is not a lost token:
#   its token still has its other expert and the residual stream. Switch Transformer's
#   cost at scale (a hundredth of a nat or two, quoted above) is below what three
#   80-step runs can resolve; there, the factor is chosen by weighing that cost against the
#   memory and all-to-all traffic of larger buffers (notebook 06).
# - To see drops hurt, lower the factor (0.5 drops at least half of the assignments) or
#   train without the Switch loss (`aux_weight=0.0` in `train_char_lm`), so that the busy
#   experts overflow.

# %% [markdown]
# ## 10 · Sampling
#
# `moe_course.transformer.generate` feeds the model its own output one character at a time
# (sampling at temperature 0.8 from a seeded generator). Each prompt starts a record of
# one domain. A hundred steps of a 100,000-parameter model do not make a writer, but each
# domain's alphabet and shape should be recognisable, more so for the MoE model if it
# reached the lower loss.

# %%
n_chars = 16 if QUICK else 32
for prompt in ("12+", "the ", "def ", "ATG"):
    for name in ("MoE, Switch loss", "dense"):
        sample = generate(models[name], tokenizer, prompt, n_chars=n_chars, temperature=0.8,
                          seed=0)
        print(f"{name:17s} {sample!r}")

# %% [markdown] nbgrader={"grade": false, "grade_id": "ex05_written_prompt", "locked": true, "schema_version": 3, "solution": false}
# **Written answer (2 points).** Using the numbers this notebook printed:
#
# 1. Compare the MoE model with the dense model of equal *active* parameters: their total
#    and active parameter counts, their validation losses, and their cost per training
#    step here. Why can the MoE model reach a different loss at the same compute per token,
#    and why is its step slower on this CPU than the FLOP count suggests?
# 2. Read the routing-by-domain heatmaps and the measured specialisation (mutual
#    information, share on the top expert): which domains have an expert of their own, in
#    which layer, and how does that compare with the model before training? What in the
#    data makes some domains easy to separate and others not?
#
# (Six to ten sentences.)

# %% [markdown] nbgrader={"grade": true, "grade_id": "ex05_written", "locked": false, "points": 2, "schema_version": 3, "solution": true}
# (Numbers from our run; a learner's own printed numbers are what to grade against.)
# **Equal active parameters.** The MoE model stores 97,440 parameters, but a token passes
# through 60,576 of them (embeddings, attention, the router and 2 of the 4 SwiGLU experts
# of each block), against 60,192 for the dense model, which uses all it stores: the same
# multiply-adds per token up to the router. After 100 steps on the same batches the MoE
# model's validation loss was 2.144 nats per character against the dense model's 2.171,
# 0.027 lower. At the same compute per token it holds 1.6 times the parameters, and each
# expert is trained only on the characters routed to it, so experts can specialise
# (digits, DNA) instead of one feed-forward network serving four kinds of text with the
# same weights. The gap is small, though: one short run with one seed is an anecdote, and
# it could shrink or grow with longer training. Its steps were about 2 times slower here
# (2 to 4 times over our runs, with the machine's load): the FLOPs match, but with
# matrices this small a CPU's cost is per operation, and the loop over experts (find each
# expert's rows, gather, run, `index_add`, plus the router and its losses) multiplies the
# number of small operations, forward and backward; grouped kernels and expert
# parallelism are what turn the FLOP count into speed at scale.
#
# **Routing by domain.** Before training, a character's first-choice expert says almost
# nothing about its domain (0.18 and 0.07 bits: nearly everything goes to one expert per
# layer); after training it says 1.27 bits in layer 0 and 1.35 bits in layer 1, of at most
# 2. DNA has an expert of its own in both layers (100% of its characters on expert 1 in
# layer 0, on expert 0 in layer 1), and so does arithmetic in layer 1 (expert 3, 100%;
# in layer 0 only 56% on its top expert). Words and code share experts: in layer 0 both go
# mostly to expert 0 (99% and 62%), and in layer 1 code spreads out (36% on its top
# expert). That follows the alphabets: DNA's four capitals and arithmetic's digits and
# `+-*=;` occur in no other domain, so a linear router on the character representations
# separates them easily, whereas sentences and code share the lower-case letters and the
# space (code's keywords and variable names are English words), so the router splits them
# by character more than by domain. Without the Switch loss the routers stayed lopsided
# (busiest over idlest expert 4.0 in layer 0 and 15.3 in layer 1, against 1.8 and 1.4
# with it), DNA and arithmetic shared one expert in layer 0, and that layer carried less
# domain information (0.86 bits, after a run half as long): balancing made all four
# experts available, and the domains spread over them.

# %% [markdown]
# ## Summary
#
# - A mixture-of-experts transformer is an ordinary transformer whose feed-forward blocks
#   are MoE layers (Switch Transformer, GShard, Mixtral). The feed-forward network treats
#   positions independently, so the layer flattens `(B, S, D)` to `T` rows and routes each.
# - `MoEFeedForward` composes the earlier notebooks: router logits, the z-loss, top-k
#   gating with optional capacity and sparse dispatch plus the Switch loss, or expert
#   choice with its built-in balance.
# - The training loss adds each layer's auxiliary and z losses to the cross-entropy with
#   small weights (0.01 and 0.001).
# - At equal *active* parameters, the MoE model stores about 1.6 times the parameters;
#   compare the losses this notebook measured with its cost per step on a CPU, where the
#   per-expert dispatch is overhead that grouped kernels remove (notebook 07).
# - Routing can be measured, not only drawn: the share of a domain on its top expert and
#   the mutual information between domain and expert.
#
# Notebook 06 spreads the experts over several processes, as large models must.
