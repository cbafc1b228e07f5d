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
# # 08 · Serving a mixture: experts per batch, expert caches, offloading, sparse upcycling
#
# **Difficulty** ★★★☆ · **Time** about 75 minutes · **Points** 12 (10 autograded, 2 written)
#
# Notebooks 01 to 07 trained mixtures. This one runs them, and asks the three questions
# people who deploy mixtures of experts ask first:
#
# 1. **Why does a batch of 64 tokens touch nearly every expert?** A top-2 model of 8 experts
#    computes with a quarter of its expert weights per token, but a batch of tokens reads
#    almost all of them, so decoding is limited by memory traffic, not arithmetic.
# 2. **How does Mixtral run on a 16 GB GPU?** Its weights do not fit. Eliseev & Mazur 2023
#    (*Fast Inference of Mixture-of-Experts Language Models with Offloading*, arXiv
#    2312.17238) keep the experts in CPU memory and an **LRU cache** of recently used experts
#    on the GPU, and guess the next layer's experts ahead of time. You will write the cache,
#    compare it with the best any cache could do (Belady's offline optimum) and with a
#    static cache, on the routing of a model you train here, and price the misses.
# 3. **Can I turn my dense checkpoint into a mixture?** Komatsuzaki et al. 2022 (*Sparse
#    Upcycling*, arXiv 2212.05055) copy a trained dense feed-forward network into every
#    expert and train on. You will build the upcycled layer so that it starts exactly where
#    the dense model stopped, and run the experiment.
#
# **You will implement**
#
# | exercise | what | points |
# |---|---|---|
# | `experts_touched` | the distinct experts one batch reads | 1 |
# | `expected_experts_touched` | the same under uniform random routing, `E (1 - (1 - K/E)^B)` | 1 |
# | `lru_cache_hits` | the hits of an LRU expert cache over a routing trace | 2 |
# | `optimal_cache_hits` | the hits of Belady's offline optimum on the same trace | 2 |
# | `offload_time_per_token` | the seconds per token spent copying missed experts | 1 |
# | `upcycle` | a mixture of copies of a dense FFN that starts equal to it | 3 |
# | written | decoding cost, caching and upcycling, from your numbers | 2 |
#
# **Shapes.** `T` tokens, `D` model width, `H` expert hidden width, `E` experts, `K`
# experts per token, `B` tokens in a batch, `N` decode steps of a trace, `L` MoE layers.
# A batch's routing is `(T, K)`; a routing trace of one layer is `(N, K)`: at decode step
# `n`, the `K` experts the token chose, best first.
#
# Run each check cell after your answer: it prints one line when you are right and tells
# you what is probably wrong when you are not.

# %%
import copy
import time

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import nn

from moe_course.data import DOMAINS, CharCorpus
from moe_course.grading import check
from moe_course.layers import MoEFeedForward, TopKMoE
from moe_course.losses import moe_lm_loss
from moe_course.serving import (
    MIXTRAL_8X7B,
    PCIE4_X16_BYTES_PER_S,
    next_layer_guess,
    prefetch_recall,
    routing_trace,
    static_cache_hits,
)
from moe_course.train import fast_mode, train
from moe_course.transformer import CharLM, LMConfig, count_parameters, dense_ffn
from moe_course.widgets import CacheExplorer

torch.manual_seed(0)
QUICK = fast_mode()  # True while a grader runs the notebook: training stops after a few steps

# %% [markdown]
# ## 1 · A model to serve
#
# The model is notebook 05's character-level `CharLM` (two blocks, `D = 48`, experts of
# hidden width `H = 96`, top-2 routing, the Switch loss), with two changes: **8 experts**
# per layer instead of 4, Mixtral's `E` and `K`, so that caches of 1 to 8 experts have
# something to choose from; and the feed-forward blocks are `moe_course.layers.TopKMoE`,
# the course's fast top-k layer (notebook 07), which computes exactly what your
# `MoEFeedForward` computes, a few times faster. It trains here in about ten seconds (a
# few steps only when a grader runs the notebook: the numbers then mean little).

# %%
corpus = CharCorpus(n_chars=20_000, seed=0)
V = corpus.tokenizer.vocab_size
D_MODEL, D_HIDDEN, N_EXPERTS, K, SEQ, BATCH, LR = 48, 96, 8, 2, 32, 16, 1e-2
config = LMConfig(vocab_size=V, seq_len=SEQ, d_model=D_MODEL, n_heads=4, n_layers=2)


def batch_for(step):
    return corpus.get_batch("train", BATCH, SEQ, seed=step)


def lm_loss(model, batch):
    out = model(batch.x)
    losses = [(o.aux_loss, o.z_loss) for o in out.moe_outputs]
    return moe_lm_loss(out.logits, batch.y, losses, aux_weight=0.01, z_weight=0.001)


torch.manual_seed(0)
model = CharLM(config, lambda i: TopKMoE(D_MODEL, D_HIDDEN, N_EXPERTS, k=K))
start = time.perf_counter()
history = train(model, lm_loss, batch_for, steps=100, lr=LR, seed=0, desc="MoE, 8 experts")
print(f"{history.steps} steps in {time.perf_counter() - start:.1f} s, training loss "
      f"{history.loss[:5].mean():.2f} -> {history.loss[-10:].mean():.2f}; "
      f"{count_parameters(model).total:,} parameters")

# %% [markdown]
# ## 2 · How many experts does a batch touch?
#
# In decoding, a batch holds one new token from each of `B` sequences. Each token chooses
# `K` experts; the layer must read the weights of every expert that *some* token chose,
# once for the whole batch. The number that matters for memory traffic is therefore the
# number of **distinct** experts in the batch's `(T, K)` routing.
#
# **Exercise 1 (1 point).** Write `experts_touched(indices, n_experts)`: `indices` is the
# `(T, K)` integer tensor of chosen experts, `n_experts` is `E`. Return, as a Python `int`,
# how many distinct experts appear in `indices`.
#
# <details><summary>Hint 1: the idea</summary>
#
# An expert that several tokens chose is read from memory once for the whole batch, so
# count each expert once however many tokens chose it, looking at all `K` columns of
# `indices`, not only the first choices. Experts that nobody chose do not count.
# </details>
#
# <details><summary>Hint 2: the shape of the code</summary>
#
# `torch.unique(indices)` holds each chosen expert once (or build a Python `set` from
# `indices.flatten().tolist()`); its length is the answer. Return a Python `int`, not a
# tensor.
# </details>

# %% nbgrader={"grade": false, "grade_id": "ex08_experts_touched", "locked": false, "schema_version": 3, "solution": true}
def experts_touched(indices, n_experts):
    """(T, K) chosen experts, E -> the number of distinct experts, an int."""
    ### BEGIN SOLUTION
    return int(torch.unique(indices).numel())
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ex08_experts_touched_tests", "locked": true, "points": 1, "schema_version": 3, "solution": false}
check("ex08_experts_touched", experts_touched)
### BEGIN HIDDEN TESTS
check("ex08_experts_touched", experts_touched, hidden=True)
### END HIDDEN TESTS

# %% [markdown]
# **If routing were uniform.** Suppose each token picks `K` distinct experts of `E`
# uniformly at random, independently of the other tokens. A given expert is among one
# token's picks with probability `K / E`, so it escapes one token with probability
# `1 - K/E` and all `B` tokens with probability `(1 - K/E)^B`. By linearity of expectation
# over the `E` experts,
#
# $$\mathbb{E}[\text{experts touched}] = E\left(1 - \left(1 - \frac{K}{E}\right)^{B}\right).$$
#
# For `E = 8, K = 2` that is 2 experts for one token, 5.5 for four, 7.2 for eight and 7.99
# for 32: from `B = 8` on, nearly every expert is read.
#
# **Exercise 2 (1 point).** Write `expected_experts_touched(batch, n_experts, k)` returning
# this expectation as a float (`batch >= 0`, `1 <= k <= n_experts`).
#
# <details><summary>Hint 1: the idea</summary>
#
# Linearity of expectation: the expected number of experts touched is the sum, over the
# `E` experts, of the probability that each one is touched. One token misses a given
# expert with probability 1 - K/E, and the `B` tokens choose independently, so all of them
# miss it with that probability to the power `B`. The formula holds at the edges too: a
# batch of no tokens touches nothing, and with `K = E` every expert is touched.
# </details>
#
# <details><summary>Hint 2: the shape of the code</summary>
#
# ```python
# miss_all = ...   # the probability that one expert escapes all `batch` tokens (use **)
# return ...       # n_experts times the probability that it does not escape, a float
# ```
# </details>

# %% nbgrader={"grade": false, "grade_id": "ex08_expected_experts_touched", "locked": false, "schema_version": 3, "solution": true}
def expected_experts_touched(batch, n_experts, k):
    """B, E, K -> E * (1 - (1 - K/E) ** B), the expected distinct experts of a batch."""
    ### BEGIN SOLUTION
    miss_all = (1.0 - k / n_experts) ** batch  # one expert escapes all B tokens
    return n_experts * (1.0 - miss_all)
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ex08_expected_experts_touched_tests", "locked": true, "points": 1, "schema_version": 3, "solution": false}
check("ex08_expected_experts_touched", expected_experts_touched)
### BEGIN HIDDEN TESTS
check("ex08_expected_experts_touched", expected_experts_touched, hidden=True)
### END HIDDEN TESTS

# %% [markdown]
# **Measured on the trained model.** `moe_course.serving.routing_trace(model, ids)` runs the
# model over a text and returns the `(L, N, K)` routing of every token: per layer, per
# token in text order, its experts. Our text is 384 characters of each of the four domains
# of the validation split, one after the other. A decode batch of `B` tokens is modelled as
# `B` tokens drawn at random positions of that text (different sequences being decoded
# side by side); the curve is the mean over 100 such batches, beside the formula.

# %%
val_ids = torch.cat([corpus.tokens("val", name)[:384] for name in DOMAINS])  # (N,)
trace = routing_trace(model, val_ids)  # (L, N, K)
N_TOKENS = trace.shape[1]
print(f"routing trace: {tuple(trace.shape)} (layers, tokens, experts per token)")
batch_sizes = [1, 2, 4, 8, 16, 32, 64, 128, 256]
draws = 50 if QUICK else 100
g = torch.Generator().manual_seed(0)
measured = torch.zeros(trace.shape[0], len(batch_sizes))  # (L, len(batch_sizes))
for j, b in enumerate(batch_sizes):
    for _ in range(draws):
        positions = torch.randint(0, N_TOKENS, (b,), generator=g)  # (B,)
        for layer in range(trace.shape[0]):
            measured[layer, j] += experts_touched(trace[layer, positions], N_EXPERTS) / draws
uniform = [expected_experts_touched(b, N_EXPERTS, K) for b in batch_sizes]

fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
for layer in range(trace.shape[0]):
    axes[0].plot(batch_sizes, measured[layer], "o-", label=f"trained model, layer {layer}")
axes[0].plot(batch_sizes, uniform, "k--", label="uniform routing, E(1-(1-K/E)^B)")
axes[0].set(xscale="log", xlabel="tokens in the batch B", ylabel="distinct experts read",
            title=f"E = {N_EXPERTS}, K = {K}", ylim=(0, N_EXPERTS + 0.5))
axes[0].set_xticks(batch_sizes, [str(b) for b in batch_sizes])
axes[0].legend(fontsize=8)
per_expert = [b * K / m for b, m in zip(batch_sizes, measured[0].tolist())]
axes[1].plot(batch_sizes, per_expert, "o-", label="trained model, layer 0")
axes[1].plot(batch_sizes, [b * K / u for b, u in zip(batch_sizes, uniform)], "k--",
             label="uniform routing")
axes[1].set(xscale="log", yscale="log", xlabel="tokens in the batch B",
            ylabel="tokens per expert read", title="how much work each weight read buys")
axes[1].set_xticks(batch_sizes, [str(b) for b in batch_sizes])
axes[1].legend(fontsize=8)
plt.tight_layout()
plt.show()
for b, m, u in zip(batch_sizes, measured[0].tolist(), uniform):
    if b in (1, 8, 64):
        print(f"B = {b:3d}: layer 0 reads {m:.2f} experts (uniform {u:.2f}), each used by "
              f"{b * K / m:.1f} tokens on average")

# %% [markdown]
# A dense model reads all its feed-forward weights for every batch too, but then every
# weight it reads works on all `B` tokens. The mixture reads nearly all `E` experts from
# `B = 8` on, and each expert then works on only `B K / E` tokens on average: at `B = 8`,
# two tokens per expert read. Decoding small batches is limited by how fast the weights
# stream from memory, and a mixture stores `E / K` = 4 times the feed-forward weights of a
# dense model of the same compute per token: it reads up to 4 times the bytes for the
# same arithmetic. Only large batches (hundreds of tokens per expert) turn the layer back
# into a compute-bound one; that is why mixtures are served at large batch sizes, and why
# a single user's decoding is the hard case. The trained router is a little less spread
# than uniform routing (it prefers some experts for some domains), so slightly fewer
# experts are read than the formula says, but the shape is the same.

# %% [markdown]
# ## 3 · An expert cache
#
# Now a single sequence is decoded (`B = 1`) on a GPU too small for the model: all experts
# live in CPU memory, and `C` expert slots on the GPU hold copies. At each decode step and
# layer, the token's `K` experts are needed in turn. An expert found in the cache is a
# **hit**; otherwise it is a **miss**: it is copied over the PCIe link into a staging
# buffer, computed, and the cache policy decides whether it stays in a slot, and whom it
# evicts. Eliseev & Mazur keep an **LRU** cache per layer: the expert evicted is
# the one **least recently used**. Their observation is that routing has locality:
# neighbouring tokens often reuse an expert, so the recently used experts are a good guess
# for the next ones.
#
# A trace of one layer is an `(N, K)` integer tensor. The accesses are served in row order:
# token by token, and within a token its experts best first (`trace.flatten()`). The cache
# starts empty.
#
# **Exercise 3 (2 points).** Write `lru_cache_hits(trace, capacity)`: the number of hits
# (an `int`) of an LRU cache of `capacity >= 0` experts over `trace`. On a hit, the expert
# becomes the most recently used. On a miss, cache it (when `capacity > 0`), evicting the
# least recently used expert if the cache is full.
#
# <details><summary>Hint 1: the idea</summary>
#
# Walk the accesses in order, keeping the cached experts ordered from the least to the
# most recently used. A hit counts, and moves the expert to the most recent end: a *hit*
# refreshes the recency too, not only a load. A miss, when there is room for anything at
# all, first evicts the least recently used expert if the cache is full, then adds the new
# one at the most recent end. A cache of capacity 0 never holds anything.
# </details>
#
# <details><summary>Hint 2: the shape of the code</summary>
#
# `collections.OrderedDict` keeps insertion order: `move_to_end(e)` marks `e` as the most
# recently used, `popitem(last=False)` removes the least recently used. A list with
# `remove` and `append` works as well at these sizes.
#
# ```python
# cache = OrderedDict()  # least recently used first
# for expert in trace.flatten().tolist():
#     if expert in cache:
#         ...            # a hit: count it, and make it the most recently used
#     elif capacity > 0:
#         ...            # a miss: evict the least recently used if full, then cache it
# ```
# </details>

# %% nbgrader={"grade": false, "grade_id": "ex08_lru_cache_hits", "locked": false, "schema_version": 3, "solution": true}
def lru_cache_hits(trace, capacity):
    """(N, K) expert ids, C -> hits of an LRU cache of C experts (an int)."""
    ### BEGIN SOLUTION
    from collections import OrderedDict

    cache = OrderedDict()  # least recently used first
    hits = 0
    for expert in trace.flatten().tolist():
        if expert in cache:
            hits += 1
            cache.move_to_end(expert)  # a hit makes it the most recently used
        elif capacity > 0:
            if len(cache) == capacity:
                cache.popitem(last=False)  # evict the least recently used
            cache[expert] = None
    return hits
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ex08_lru_cache_hits_tests", "locked": true, "points": 2, "schema_version": 3, "solution": false}
check("ex08_lru_cache_hits", lru_cache_hits)
### BEGIN HIDDEN TESTS
check("ex08_lru_cache_hits", lru_cache_hits, hidden=True)
### END HIDDEN TESTS

# %% [markdown]
# **The best any cache can do.** If the whole trace were known in advance, which expert
# should a full cache give up? Belady's rule (1966, the MIN algorithm of paging): the one
# whose **next use is furthest in the future**; every other choice can only bring a miss
# earlier. With a staging buffer there is one more option: if the expert just loaded is
# itself the one needed furthest in the future, serve it from the buffer and keep the cache
# as it is. Put as one rule: *after each access, keep, of the cached experts and the one
# just used, the `capacity` whose next use comes soonest* (an expert never used again
# counts as infinitely far). No policy with the same number of slots scores more hits on
# the trace, so Belady's count is the ceiling against which LRU is measured. It is offline:
# a real server does not know the future routing.
#
# **Exercise 4 (2 points).** Write `optimal_cache_hits(trace, capacity)`: the hits of this
# optimum over `trace` `(N, K)`, served in the same order, starting empty.
#
# <details><summary>Hint 1: next uses</summary>
#
# Flatten the trace into a list of accesses. One pass from the end gives, for every
# position, the position of the next access to the same expert (`float("inf")` if none):
# remember the last position seen of each expert.
# </details>
#
# <details><summary>Hint 2: the cache</summary>
#
# Keep a dict `expert -> position of its next use`. At each access count a hit if the
# expert is in it, then set its entry to its new next use; if the dict now holds more than
# `capacity` experts, delete the one with the largest next use.
# </details>

# %% nbgrader={"grade": false, "grade_id": "ex08_optimal_cache_hits", "locked": false, "schema_version": 3, "solution": true}
def optimal_cache_hits(trace, capacity):
    """(N, K) expert ids, C -> hits of Belady's offline optimum with C slots (an int)."""
    ### BEGIN SOLUTION
    accesses = trace.flatten().tolist()
    next_use = [float("inf")] * len(accesses)
    last_seen = {}
    for pos in range(len(accesses) - 1, -1, -1):
        next_use[pos] = last_seen.get(accesses[pos], float("inf"))
        last_seen[accesses[pos]] = pos
    cache = {}  # expert -> position of its next use
    hits = 0
    for pos, expert in enumerate(accesses):
        hits += expert in cache
        if capacity == 0:
            continue
        cache[expert] = next_use[pos]  # the one just used is a candidate too
        if len(cache) > capacity:
            del cache[max(cache, key=cache.get)]  # furthest next use goes
    return hits
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ex08_optimal_cache_hits_tests", "locked": true, "points": 2, "schema_version": 3, "solution": false}
check("ex08_optimal_cache_hits", optimal_cache_hits)
### BEGIN HIDDEN TESTS
check("ex08_optimal_cache_hits", optimal_cache_hits, hidden=True)
### END HIDDEN TESTS

# %% [markdown]
# **Hit rate against cache size, on the model's own routing.** The third policy is the
# simplest one: a **static** cache that pins the `C` experts used most often and never
# changes (`moe_course.serving.static_cache_hits`; here it is even told the counts of the
# very trace it serves, an optimistic oracle). Each curve is the hit rate over the
# `N K` accesses of one layer's trace, for cache sizes 0 to `E`.

# %%
capacities = list(range(N_EXPERTS + 1))
accesses = trace.shape[1] * trace.shape[2]
rates = {}
for layer in range(trace.shape[0]):
    t = trace[layer]  # (N, K)
    rates[layer] = {
        "LRU (yours)": [lru_cache_hits(t, c) / accesses for c in capacities],
        "static, most used": [static_cache_hits(t, c) / accesses for c in capacities],
        "Belady optimum (yours)": [optimal_cache_hits(t, c) / accesses for c in capacities],
    }
fig, axes = plt.subplots(1, trace.shape[0], figsize=(11, 3.6), sharey=True)
for layer, ax in enumerate(axes):
    for name, values in rates[layer].items():
        ax.plot(capacities, values, "o-", ms=4, label=name)
    ax.set(xlabel="cache size C (experts of 8)", title=f"layer {layer}", ylim=(0, 1.02))
    ax.axvline(K, color="0.7", lw=1, ls=":")
axes[0].set_ylabel("hit rate")
axes[0].legend(fontsize=8)
plt.tight_layout()
plt.show()
for layer in range(trace.shape[0]):
    row = rates[layer]
    for c in (2, 4):
        print(f"layer {layer}, C = {c} of 8: LRU {row['LRU (yours)'][c]:.0%}, static "
              f"{row['static, most used'][c]:.0%}, Belady "
              f"{row['Belady optimum (yours)'][c]:.0%}")

# %% [markdown]
# Three things to read off. First, LRU sits well above the static cache from `C = 2` on:
# consecutive characters of one domain reuse experts, and a static cache cannot follow the
# text from DNA to arithmetic. Second, Belady's curve is the ceiling; the gap between it
# and LRU is what a smarter (predictive) policy could still win. Third, at `C = E` every
# policy misses only the first use of each expert. With `C = 1 < K` the LRU cache evicts
# the token's first expert to load its second, and almost never hits.
#
# **Prefetching.** Eliseev & Mazur also *guess* the next layer's experts: while
# layer `l` computes, they apply layer `l + 1`'s router to layer `l`'s hidden state, and
# start copying the guessed experts early. The guess is good because the residual stream
# changes little from one layer to the next. `moe_course.serving.next_layer_guess` does
# this on our model; the recall below is the fraction of layer 1's actual experts that the
# guess named (picking `K` of `E` at random would name `K / E = 25%`).

# %%
guess = next_layer_guess(model, val_ids)  # (L-1, N, K)
recall = prefetch_recall(guess, trace[1:])
print(f"layer 1's experts guessed from layer 0's hidden state: {recall:.0%} of them "
      f"(random guess: {K / N_EXPERTS:.0%})")

# %% [markdown]
# **Explore.** The widget replays one layer's trace through a cache of the size, policy and
# layer you choose: the top strip is the expert of every access, the bottom one whether it
# hit, and the right panel all three policies' hit rates with your choice circled. (Without
# a widget frontend, or under grading, it shows one static picture.)

# %%
CacheExplorer(trace, n_experts=N_EXPERTS, capacity=4, policy="LRU")

# %% [markdown]
# ## 4 · What a miss costs: offloading Mixtral 8x7B
#
# Mixtral 8x7B (Jiang et al. 2024, arXiv 2401.04088, Table 1) has 32 layers of width
# `D = 4096`, each with 8 SwiGLU experts of hidden width `H = 14336` and top-2 routing:
# 47B parameters in total, 13B active per token (their abstract). One expert holds three
# `D x H` matrices, 176M parameters: 352 MB in 16-bit floats. The 256 experts are 45B of
# the 47B parameters, 90 GB, far more than a 16 GB GPU holds. So the experts wait in CPU
# memory and cross a PCIe 4.0 x16 link, nominally about 32 GB/s in each direction, when
# they are needed.
#
# **Exercise 5 (1 point).** Write `offload_time_per_token(misses, expert_bytes, bandwidth)`:
# `misses` expert copies per token (over all layers, possibly an average), each of
# `expert_bytes` bytes, over a link of `bandwidth` bytes per second. Return the seconds per
# token the copies take, done one after the other and not overlapped with computation.
#
# <details><summary>Hint 1: the idea</summary>
#
# Each miss copies one whole expert over the link, and the copies run one after the
# other, so their bytes add up; a link that moves `bandwidth` bytes every second needs the
# bytes divided by that rate, in seconds. Everything is already in bytes: no factor 8, no
# conversion to GB. `misses` may be an average such as 3.5: use it as it is.
# </details>
#
# <details><summary>Hint 2: the shape of the code</summary>
#
# ```python
# bytes_moved = ...   # per token: all the missed experts together
# return ...          # seconds: bytes over bytes per second
# ```
# </details>

# %% nbgrader={"grade": false, "grade_id": "ex08_offload_time_per_token", "locked": false, "schema_version": 3, "solution": true}
def offload_time_per_token(misses, expert_bytes, bandwidth):
    """misses per token, bytes per expert, bytes per second -> seconds per token."""
    ### BEGIN SOLUTION
    return misses * expert_bytes / bandwidth
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ex08_offload_time_per_token_tests", "locked": true, "points": 1, "schema_version": 3, "solution": false}
check("ex08_offload_time_per_token", offload_time_per_token)
### BEGIN HIDDEN TESTS
check("ex08_offload_time_per_token", offload_time_per_token, hidden=True)
### END HIDDEN TESTS

# %% [markdown]
# **The worked example.** Per token, Mixtral needs `K L = 64` experts. Without a cache
# every one is a miss; with a cache of hit rate `h`, `64 (1 - h)` are. The cell prices both
# in 16-bit weights and with the experts quantised to 3 bits per parameter (Eliseev & Mazur
# quantise the experts to a few bits, so that each copy moves fewer bytes *and* more
# experts fit in the cache), taking the hit rates of your LRU cache at half the experts
# cached (`C = 4` of 8) on our model's trace as a stand-in for a real one.

# %%
m = MIXTRAL_8X7B
expert_fp16 = 2 * m.expert_params  # bytes: 16-bit weights
expert_3bit = m.expert_params * 3 / 8  # bytes: 3 bits per weight
per_token = m.k * m.n_layers  # expert uses per token
hit = sum(rates[layer]["LRU (yours)"][4] for layer in rates) / len(rates)
print(f"one expert: {m.expert_params / 1e6:.0f}M parameters, {expert_fp16 / 1e6:.0f} MB in "
      f"fp16, {expert_3bit / 1e6:.0f} MB at 3 bits; all {m.n_experts * m.n_layers} experts: "
      f"{m.n_experts * m.n_layers * m.expert_params / 1e9:.1f}B parameters of "
      f"{m.total_params / 1e9:.0f}B")
for label, size in (("fp16 ", expert_fp16), ("3-bit", expert_3bit)):
    none = offload_time_per_token(per_token, size, PCIE4_X16_BYTES_PER_S)
    cached = offload_time_per_token(per_token * (1 - hit), size, PCIE4_X16_BYTES_PER_S)
    print(f"{label}: no cache {none:.2f} s/token ({1 / none:.1f} tokens/s); LRU with hit rate "
          f"{hit:.0%}: {cached:.2f} s/token ({1 / cached:.1f} tokens/s)")
gpu_free = 12e9  # bytes of a 16 GB GPU left after the non-expert weights and activations
print(f"experts that fit in 12 GB: {gpu_free / expert_fp16:.0f} in fp16 "
      f"({gpu_free / expert_fp16 / m.n_layers:.1f} per layer), {gpu_free / expert_3bit:.0f} "
      f"at 3 bits ({gpu_free / expert_3bit / m.n_layers:.1f} per layer)")

# %% [markdown]
# Without a cache, fp16 Mixtral spends 0.7 s per token on the link alone, over a second
# per token in practice; the GPU's arithmetic for 13B active parameters takes a few tens
# of milliseconds. Everything is in the bytes moved, so three levers matter, and they
# multiply: **hits** (a cache, which needs room: in fp16 barely one expert per layer fits),
# **fewer bytes per miss** (quantisation: at 3 bits five times as many experts fit, which
# also raises the hit rate), and **overlap** (prefetching the guessed experts while the
# previous layer computes hides part of the copy time). With all three, Eliseev & Mazur run
# Mixtral 8x7B interactively on consumer GPUs and free-tier cloud notebooks.

# %% [markdown]
# ## 5 · Sparse upcycling
#
# Komatsuzaki et al. (arXiv 2212.05055) start a mixture from a trained dense
# checkpoint: every MoE layer's experts are **copies of the dense layer's feed-forward
# network**, a new router is added, everything else (attention, embeddings, norms) is
# carried over, and training continues. The mixture does not start from scratch: it starts
# from everything the dense model learned.
#
# How close to the dense model does it start? With top-k routing and **renormalised**
# weights, exactly equal. If every expert computes the same function `f` and the `K`
# weights of a token sum to 1,
#
# $$y = \sum_{j=1}^{K} w_j\, f(x) = f(x) \sum_{j} w_j = f(x),$$
#
# whatever the router says, so the router can be initialised any way at all. The equality
# breaks if the weights do not sum to 1 (no renormalisation, as in Switch's top-1 or
# DeepSeekMoE), if tokens can be dropped (a capacity limit), if a token may get no expert
# or several with unnormalised weights (expert choice), or if the copies are not exact.
#
# The copies must also be **independent**: each expert its own parameters, so that
# training can make them differ. A list like `[ffn] * E`, or `copy.copy(ffn)`, gives `E`
# names for one set of weights: they would receive the sum of all their gradients and stay
# identical forever.
#
# **Exercise 6 (3 points).** Write `upcycle(dense_ffn, n_experts, k)`: `dense_ffn` is a
# dense feed-forward block (an `Expert`, with `w_in = nn.Linear(D, H)` and `w_out`).
# Return a `moe_course.layers.MoEFeedForward` with `n_experts` experts, top-`k` routing and
# no capacity limit, every parameter trainable, whose experts are independent copies of
# `dense_ffn`, so that its output `.y` equals `dense_ffn(x)` at step 0. Leave `dense_ffn`
# unchanged.
#
# <details><summary>Hint 1: the idea</summary>
#
# Build notebook 05's mixture layer with the dense layer's sizes, `n_experts` experts,
# top-`k` routing and no capacity limit; then make every one of its experts an exact and
# independent copy of `dense_ffn`: the same values in parameters of its own, so that
# training can later make the experts differ. Copy the dense weights, never move or change
# them. The router may stay as it is initialised: any weights summing to 1 give `f(x)`.
# </details>
#
# <details><summary>Hint 2: the shape of the code</summary>
#
# ```python
# d_model, d_hidden = ...       # read them from dense_ffn.w_in, an nn.Linear(D, H)
# layer = MoEFeedForward(...)   # n_experts experts, top-k, no capacity limit
# layer.experts = ...           # an nn.ModuleList of n_experts deep copies of dense_ffn
# ```
# `copy.copy(dense_ffn)` or `[dense_ffn] * n_experts` would share one set of weights:
# each expert needs its own (`copy.deepcopy`), or the dense weights loaded into each of
# the layer's own experts with `load_state_dict`.
# </details>

# %% nbgrader={"grade": false, "grade_id": "ex08_upcycle", "locked": false, "schema_version": 3, "solution": true}
def upcycle(dense_ffn, n_experts, k):
    """A dense FFN, E, K -> MoEFeedForward of E independent copies, equal to it at step 0."""
    ### BEGIN SOLUTION
    d_model, d_hidden = dense_ffn.w_in.in_features, dense_ffn.w_in.out_features
    layer = MoEFeedForward(d_model, d_hidden, n_experts, k=k)  # top-k, no capacity
    layer.experts = nn.ModuleList(copy.deepcopy(dense_ffn) for _ in range(n_experts))
    return layer
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ex08_upcycle_tests", "locked": true, "points": 3, "schema_version": 3, "solution": false}
check("ex08_upcycle", upcycle)
### BEGIN HIDDEN TESTS
check("ex08_upcycle", upcycle, hidden=True)
### END HIDDEN TESTS

# %% [markdown]
# **The experiment.** A dense `CharLM` (feed-forward width `H = 96`) trains for 40 steps.
# From that checkpoint, two runs continue for 40 more steps on the same batches:
# (a) the dense model as it is, (b) the same model upcycled, each feed-forward block
# replaced by `upcycle(block.ffn, 4, 2)`, trained with the Switch loss. Both use a fresh
# AdamW optimizer. The validation loss is measured every 10 steps, starting *before* the
# first step, so both curves start from one point. Note what the comparison is: the
# upcycled model has 4 times the feed-forward parameters and, with top-2 routing, does 2
# times the feed-forward arithmetic per token.

# %%
PRE_STEPS, MORE_STEPS = 40, 40
val_batch = corpus.get_batch("val", 64, SEQ, seed=123)


def val_loss(lm):
    logits = lm(val_batch.x).logits
    return F.cross_entropy(logits.reshape(-1, V), val_batch.y.reshape(-1))


torch.manual_seed(0)
dense_model = CharLM(config, lambda i: dense_ffn(D_MODEL, D_HIDDEN))
train(dense_model, lm_loss, batch_for, steps=PRE_STEPS, lr=LR, seed=0, desc="dense, pre")
continued = copy.deepcopy(dense_model)
upcycled = copy.deepcopy(dense_model)
for block in upcycled.blocks:
    block.ffn = upcycle(block.ffn, 4, 2)
with torch.no_grad():
    start_losses = (float(val_loss(continued)), float(val_loss(upcycled)))
print(f"validation loss at the checkpoint: dense {start_losses[0]:.4f}, upcycled "
      f"{start_losses[1]:.4f}")
curves = {}
for name, lm in (("dense, continued", continued), ("upcycled, 4 experts top-2", upcycled)):
    start = time.perf_counter()
    hist = train(lm, lm_loss, lambda step: batch_for(PRE_STEPS + step), steps=MORE_STEPS,
                 lr=LR, seed=1, eval_fn=val_loss, eval_every=10, desc=name)
    curves[name] = ([0] + hist.eval_steps, [start_losses[0]] + hist.eval_loss)
    print(f"{name:26s} {hist.steps} steps in {time.perf_counter() - start:.1f} s, "
          f"validation loss {curves[name][1][-1]:.3f}")

fig, ax = plt.subplots(figsize=(6.5, 3.6))
for name, (steps_done, losses) in curves.items():
    ax.plot([PRE_STEPS + s for s in steps_done], losses, "o-", ms=4, label=name)
ax.axvline(PRE_STEPS, color="0.7", ls=":")
ax.set(xlabel="training step (dense before the dotted line)", ylabel="validation loss",
       title="continuing from one dense checkpoint")
ax.legend(fontsize=8)
plt.tight_layout()
plt.show()
gap = curves["dense, continued"][1][-1] - curves["upcycled, 4 experts top-2"][1][-1]
print(f"after {MORE_STEPS} more steps the upcycled model is {abs(gap):.3f} nats per character "
      f"{'below' if gap > 0 else 'above'} the dense one")

# %% [markdown]
# Both curves start from the same loss, as they must: that is the point of upcycling, and
# what your check verified layer by layer. After that, be careful with what a run this
# small can say. In our run the two curves stayed within a few hundredths of a nat of
# each other over 40 steps (the upcycled model ended 0.01 nats ahead), which is within
# the wobble of a single seed: no win either way. Two effects pull in opposite
# directions. The copies start identical, so at first the mixture *is* the dense model
# with a router attached, and the experts need steps to drift apart before the extra
# parameters help (Komatsuzaki et al. see the upcycled models overtake after a modest
# extra budget, at scales of hundreds of millions of parameters and billions of tokens).
# And the router starts knowing nothing, while the Switch loss pushes it towards balance
# from the first step. Claiming that upcycling beats continued dense training would take
# many seeds, longer runs and a comparison at equal compute, not one short run.

# %% [markdown] nbgrader={"grade": false, "grade_id": "ex08_written_prompt", "locked": true, "schema_version": 3, "solution": false}
# **Written answer (2 points).** Using the numbers this notebook printed:
#
# 1. For a decode batch of 8 tokens in our model, how many experts are read and how many
#    tokens does each of them serve? Why does this make a mixture's decoding memory-bound,
#    more so than a dense model with the same compute per token?
# 2. For Mixtral 8x7B on a 16 GB GPU: what dominates the time per token, by how much do
#    caching and quantisation change it, and what does the gap between your LRU and Belady
#    curves say about what prefetching could still gain?
# 3. What does the upcycling experiment show, and what does it not show?
#
# (Six to ten sentences.)

# %% [markdown] nbgrader={"grade": true, "grade_id": "ex08_written", "locked": false, "points": 2, "schema_version": 3, "solution": true}
# (Numbers from our run; a learner's own printed numbers are what to grade against.)
# **Experts per batch.** With 8 tokens, layer 0 read about 7 of the 8 experts (uniform
# routing: 7.2), so each expert read served only about 2.3 tokens. A dense layer of the
# same compute reads a quarter of the weights (its single FFN) and uses every weight on all
# 8 tokens; the mixture reads nearly all `E / K = 4` times as many bytes for the same
# arithmetic, and each byte read buys 4 times less work: decoding waits on memory.
# **Offloading.** Copying is everything: 64 fp16 experts of 352 MB per token take 0.70 s
# over 32 GB/s, against tens of milliseconds of arithmetic. Our LRU hit rate at half the
# experts cached (94%) would cut that to 0.04 s, and 3-bit experts cut the bytes by 5.3
# times more, to about 0.01 s; quantisation is also what makes such a cache possible at
# all: in 12 GB of a 16 GB GPU barely one fp16 expert per layer fits, almost six at 3 bits.
# Belady's curve lies 12 to 17 points above LRU at C = 2 and 1 to 5 at C = 4: what an
# oracle knows about the future and LRU does not; a next-layer guess (ours named 71% of the
# actual experts, against 25% at random) recovers part of it, and overlapping the copies
# with compute hides more.
# **Upcycling.** The upcycled model started exactly at the dense model's loss, and over 40
# steps the two curves stayed within a few hundredths of each other (upcycled 2.35, dense
# 2.36 at the end); one seed of a tiny run does not show that upcycling wins, only that it
# starts where the dense model stopped and trains on without a setback.

# %% [markdown]
# ## Summary
#
# - A batch of `B` tokens reads `E (1 - (1 - K/E)^B)` distinct experts under uniform
#   routing: nearly all of them from `B` about `E / K` on. Decoding a mixture is therefore
#   bound by memory traffic, with each expert read serving few tokens.
# - An expert cache turns routing locality into hits. LRU (Eliseev & Mazur 2023) is simple
#   and beats a static most-used cache on real traces; Belady's offline optimum (evict the
#   expert needed furthest in the future, the just-used one included) bounds every policy.
# - Offloading cost is `misses x bytes / bandwidth`: for Mixtral 8x7B over PCIe 4.0 x16,
#   0.7 s per token without a cache in fp16; caching, quantisation and prefetching
#   multiply together.
# - Sparse upcycling (Komatsuzaki et al. 2022) copies a dense FFN into independent experts;
#   with renormalised top-k weights the mixture equals the dense model at step 0, whatever
#   the router, and continues training from there.
