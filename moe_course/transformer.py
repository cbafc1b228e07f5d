"""A tiny decoder-only character model whose feed-forward blocks can be mixtures of experts.

nanoGPT-simple (Radford et al. 2019's GPT-2 layout: pre-norm blocks, learned positions, tied
embeddings) with one change: the block's feed-forward network is built by a factory, so
the same model runs with a dense FFN (`dense_ffn`) or with an `MoEFeedForward` in place of
it, as in the Switch Transformer (Fedus et al. 2021, arXiv 2101.03961, Fig. 2) and GShard
(arXiv 2006.16668). Blocks keep each MoE layer's output (anything with a `.y` field, such
as `MoEOutput`) so that the model returns them for the auxiliary losses and the routing
plots of notebook 05.

Shapes: `B` batch, `S` sequence length, `D` model width, `V` vocabulary size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import CharTokenizer
from .experts import Expert
from .validation import float_tensor, index_tensor, positive_int


@dataclass(frozen=True)
class LMConfig:
    """Sizes of a `CharLM`.

    >>> LMConfig(vocab_size=52, seq_len=64)
    LMConfig(vocab_size=52, seq_len=64, d_model=64, n_heads=4, n_layers=2, dropout=0.0)
    """

    vocab_size: int  # V, number of distinct characters (CharTokenizer.vocab_size)
    seq_len: int  # longest context the model reads (size of the position table)
    d_model: int = 64  # D, width of the residual stream
    n_heads: int = 4  # attention heads per block; must divide d_model
    n_layers: int = 2  # number of transformer blocks
    dropout: float = 0.0  # dropout on embeddings, attention and residual branches

    def __post_init__(self) -> None:
        positive_int("vocab_size", self.vocab_size)
        positive_int("seq_len", self.seq_len)
        positive_int("d_model", self.d_model)
        positive_int("n_heads", self.n_heads)
        positive_int("n_layers", self.n_layers)
        if self.d_model % self.n_heads:
            raise ValueError(f"n_heads must divide d_model; got d_model = {self.d_model}, "
                             f"n_heads = {self.n_heads}")
        _dropout(self.dropout)


def _dropout(p: object) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
        raise ValueError(f"dropout must be a number with 0 <= dropout < 1; got {p!r}")
    return float(p)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position `s` sees only positions `<= s`.

    >>> attn = CausalSelfAttention(d_model=8, n_heads=2)
    >>> attn(torch.zeros(3, 5, 8)).shape
    torch.Size([3, 5, 8])
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        positive_int("d_model", d_model)
        positive_int("n_heads", n_heads)
        if d_model % n_heads:
            raise ValueError(f"n_heads must divide d_model; got d_model = {d_model}, "
                             f"n_heads = {n_heads}")
        self.n_heads = n_heads
        self.dropout = _dropout(dropout)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        float_tensor("x", x, ndim=3, shape_hint="(B, S, D)")
        b, s, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)  # (B, S, D) each
        q, k, v = (t.view(b, s, self.n_heads, d // self.n_heads).transpose(1, 2)
                   for t in (q, k, v))  # (B, heads, S, D / heads) each
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        y = y.transpose(1, 2).reshape(b, s, d)  # (B, S, D)
        return self.resid_drop(self.proj(y))


class BlockOutput(NamedTuple):
    """A block's residual stream and its feed-forward's MoE output, if it has one."""

    x: Tensor  # (B, S, D)
    moe: Any  # the ffn's output object (e.g. MoEOutput) when it has `.y`, else None


class Block(nn.Module):
    """Pre-norm transformer block: `x + attn(ln(x))`, then `x + ffn(ln(x))`.

    `ffn` maps `(B, S, D)` to a tensor `(B, S, D)` or to an object whose `.y` is that
    tensor (an `MoEOutput`); the object is returned as `BlockOutput.moe`.

    >>> block = Block(8, 2, dense_ffn(8, 16))
    >>> out = block(torch.zeros(2, 3, 8))
    >>> out.x.shape, out.moe is None
    (torch.Size([2, 3, 8]), True)
    """

    def __init__(self, d_model: int, n_heads: int, ffn: nn.Module, dropout: float = 0.0) -> None:
        super().__init__()
        if not isinstance(ffn, nn.Module):
            raise ValueError(f"ffn must be an nn.Module mapping (B, S, D) to (B, S, D); got "
                             f"{type(ffn).__name__}")
        self.ln_1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads, dropout)
        self.ln_2 = nn.LayerNorm(d_model)
        self.ffn = ffn
        self.ffn_drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> BlockOutput:
        x = x + self.attn(self.ln_1(x))
        out = self.ffn(self.ln_2(x))
        moe = out if hasattr(out, "y") else None
        y = out.y if moe is not None else out
        if not isinstance(y, Tensor) or y.shape != x.shape:
            got = f"shape {tuple(y.shape)}" if isinstance(y, Tensor) else type(y).__name__
            raise ValueError(f"ffn must return a tensor (or an object with .y) of shape "
                             f"{tuple(x.shape)}; got {got}")
        return BlockOutput(x + self.ffn_drop(y), moe)


class LMOutput(NamedTuple):
    """What `CharLM` returns."""

    logits: Tensor  # (B, S, V) next-character scores
    moe_outputs: list  # one ffn output (e.g. MoEOutput) per MoE block, first block first


def dense_ffn(d_model: int, d_hidden: int) -> nn.Module:
    """The dense feed-forward block: one `Expert(d_model, d_hidden)` (GELU MLP).

    It is the very module an MoE layer holds `E` of, so a dense model with `d_hidden = k * H`
    has the same active parameters per token as a top-`k` MoE with experts of width `H`
    (up to biases and the router).

    >>> dense_ffn(8, 32)(torch.zeros(2, 8)).shape
    torch.Size([2, 8])
    """
    return Expert(d_model, d_hidden)


class CharLM(nn.Module):
    """A decoder-only character model; block `i`'s feed-forward is `ffn_factory(i)`.

    `forward(idx)` takes `(B, S)` int64 token ids with `S <= config.seq_len` and returns
    `LMOutput(logits (B, S, V), moe_outputs)`. The output projection is tied to the token
    embedding (Press and Wolf 2017).

    >>> cfg = LMConfig(vocab_size=10, seq_len=8, d_model=16, n_heads=2, n_layers=2)
    >>> from moe_course.layers import MoEFeedForward
    >>> model = CharLM(cfg, lambda i: MoEFeedForward(16, 32, n_experts=4, k=2))
    >>> out = model(torch.zeros(3, 8, dtype=torch.long))
    >>> out.logits.shape, len(out.moe_outputs)
    (torch.Size([3, 8, 10]), 2)
    """

    def __init__(self, config: LMConfig, ffn_factory: Callable[[int], nn.Module]) -> None:
        super().__init__()
        if not isinstance(config, LMConfig):
            raise ValueError(f"config must be an LMConfig; got {type(config).__name__}")
        if not callable(ffn_factory):
            raise ValueError(f"ffn_factory must be a callable layer_index -> nn.Module; got "
                             f"{type(ffn_factory).__name__}")
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.seq_len, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            Block(config.d_model, config.n_heads, ffn_factory(i), config.dropout)
            for i in range(config.n_layers))
        self.ln_f = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        nn.init.normal_(self.tok_emb.weight, std=0.02)
        nn.init.normal_(self.pos_emb.weight, std=0.02)
        self.head.weight = self.tok_emb.weight  # weight tying

    def forward(self, idx: Tensor) -> LMOutput:
        cfg = self.config
        index_tensor("idx", idx, ndim=2, shape_hint="(B, S)", upper=cfg.vocab_size)
        s = idx.shape[1]
        if not 1 <= s <= cfg.seq_len:
            raise ValueError(f"idx must be (B, S) with 1 <= S <= seq_len = {cfg.seq_len}; got "
                             f"shape {tuple(idx.shape)}")
        pos = torch.arange(s, device=idx.device)  # (S,)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))  # (B, S, D)
        moe_outputs = []
        for block in self.blocks:
            x, moe = block(x)
            if moe is not None:
                moe_outputs.append(moe)
        return LMOutput(self.head(self.ln_f(x)), moe_outputs)  # (B, S, V)


def generate(model: CharLM, tokenizer: CharTokenizer, prompt: str, n_chars: int,
             temperature: float = 1.0, seed: int = 0) -> str:
    """Sample `n_chars` characters after `prompt`; return prompt plus continuation.

    Each step feeds the last `seq_len` characters, divides the final logits by
    `temperature` and samples from the softmax with a `torch.Generator` seeded by `seed`
    (`temperature = 0` takes the argmax). Runs in eval mode without gradients and puts the
    model back in the mode it was in.

    >>> from moe_course.data import CharTokenizer
    >>> tok = CharTokenizer("ab")
    >>> model = CharLM(LMConfig(tok.vocab_size, seq_len=4, d_model=8, n_heads=2),
    ...                lambda i: dense_ffn(8, 16))
    >>> text = generate(model, tok, "ab", n_chars=6, seed=0)
    >>> len(text), text == generate(model, tok, "ab", n_chars=6, seed=0)
    (8, True)
    """
    if not isinstance(model, CharLM):
        raise ValueError(f"model must be a CharLM; got {type(model).__name__}")
    if not isinstance(tokenizer, CharTokenizer):
        raise ValueError(f"tokenizer must be a CharTokenizer; got {type(tokenizer).__name__}")
    if not isinstance(prompt, str) or not prompt:
        raise ValueError(f"prompt must be a non-empty str; got {prompt!r}")
    positive_int("n_chars", n_chars, minimum=0)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not 0 <= temperature < float("inf"):
        raise ValueError(f"temperature must be a finite number >= 0; got {temperature!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0; got {seed!r}")
    ids = tokenizer.encode(prompt)  # (n,)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} characters but the model only "
                         f"{model.config.vocab_size}")
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for _ in range(n_chars):
                context = ids[-model.config.seq_len:][None].to(device)  # (1, S)
                logits = model(context).logits[0, -1].float().cpu()  # (V,)
                if temperature == 0:
                    nxt = logits.argmax()[None]  # (1,)
                else:
                    probs = torch.softmax(logits / temperature, dim=-1)  # (V,)
                    nxt = torch.multinomial(probs, 1, generator=g)  # (1,)
                ids = torch.cat([ids, nxt])  # (n + 1,)
    finally:
        model.train(was_training)
    return tokenizer.decode(ids)


class ParamCount(NamedTuple):
    """Parameters stored and parameters used per token."""

    total: int  # every parameter of the model (tied weights counted once)
    active: int  # parameters one token passes through: router + k experts per MoE layer


def count_parameters(model: nn.Module) -> ParamCount:
    """Total and active parameters of a model with top-k MoE layers.

    A submodule with an `experts` sequence of `E` equal-sized modules and an int `k` (such
    as `MoEFeedForward`) is a top-k layer: a token uses its router and `k` experts, so
    `E - k` experts' parameters are inactive (Switch Transformer, arXiv 2101.03961, Sec. 2;
    Mixtral, arXiv 2401.04088, Sec. 2: 13B active of 47B). For expert-choice layers `k` is
    the average number of experts per token. Shared experts outside `experts` are active.

    >>> from moe_course.layers import MoEFeedForward
    >>> layer = MoEFeedForward(d_model=4, d_hidden=8, n_experts=4, k=1)
    >>> count_parameters(layer)  # router 16, each expert 4*8+8 + 8*4+4 = 76
    ParamCount(total=320, active=92)
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module; got {type(model).__name__}")
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for module in model.modules():
        experts, k = getattr(module, "experts", None), getattr(module, "k", None)
        if not isinstance(experts, nn.ModuleList) or isinstance(k, bool) \
                or not isinstance(k, int):
            continue
        sizes = [sum(p.numel() for p in e.parameters()) for e in experts]
        if len(set(sizes)) != 1:
            raise ValueError(f"count_parameters needs experts of equal size; got {sizes}")
        inactive += max(len(sizes) - k, 0) * sizes[0]
    return ParamCount(total, total - inactive)
