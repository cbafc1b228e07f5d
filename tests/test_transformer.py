"""Tests for moe_course.transformer: attention against a hand-written oracle, causality with
dense and MoE feed-forwards, shapes, generation, parameter counts and bad input."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from moe_course.data import CharTokenizer
from moe_course.experts import Expert
from moe_course.layers import MoEFeedForward, MoEOutput
from moe_course.transformer import (
    Block,
    BlockOutput,
    CausalSelfAttention,
    CharLM,
    LMConfig,
    LMOutput,
    ParamCount,
    count_parameters,
    dense_ffn,
    generate,
)

CFG = LMConfig(vocab_size=11, seq_len=12, d_model=16, n_heads=4, n_layers=2)


def _dense_model(seed: int = 0, cfg: LMConfig = CFG) -> CharLM:
    torch.manual_seed(seed)
    return CharLM(cfg, lambda i: dense_ffn(cfg.d_model, 4 * cfg.d_model)).eval()


def _moe_model(seed: int = 0, router: str = "top_k") -> CharLM:
    torch.manual_seed(seed)
    return CharLM(CFG, lambda i: MoEFeedForward(16, 32, n_experts=4, k=2, router=router)).eval()


def _tokens(b: int, s: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, CFG.vocab_size, (b, s), generator=torch.Generator().manual_seed(seed))


def test_attention_matches_masked_softmax_oracle() -> None:
    torch.manual_seed(0)
    attn = CausalSelfAttention(d_model=8, n_heads=2).eval()
    x = torch.randn(3, 5, 8)
    b, s, d, h = 3, 5, 8, 2
    q, k, v = attn.qkv(x).split(d, dim=-1)
    q, k, v = (t.reshape(b, s, h, d // h).transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(d // h)  # (B, heads, S, S)
    future = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)
    weights = scores.masked_fill(future, float("-inf")).softmax(-1)
    expected = attn.proj((weights @ v).transpose(1, 2).reshape(b, s, d))
    torch.testing.assert_close(attn(x), expected)


@pytest.mark.parametrize("make", [_dense_model, _moe_model], ids=["dense", "moe_top_k"])
def test_changing_a_later_token_leaves_earlier_logits_unchanged(make) -> None:
    model = make()
    idx = _tokens(2, CFG.seq_len)
    changed = idx.clone()
    j = 7
    changed[:, j] = (changed[:, j] + 1) % CFG.vocab_size
    with torch.no_grad():
        a, b = model(idx).logits, model(changed).logits
    torch.testing.assert_close(a[:, :j], b[:, :j], rtol=0, atol=1e-6)
    assert (a[:, j:] - b[:, j:]).abs().amax() > 1e-3  # later positions do see the change


def test_expert_choice_model_is_not_causal() -> None:
    # Expert choice picks tokens by comparing them with each other, future ones included
    # (Zhou et al. 2022, arXiv 2202.09368): the same probe must detect the leak.
    model = _moe_model(router="expert_choice")
    idx = _tokens(2, CFG.seq_len, seed=1)
    leaks = 0
    for j in range(1, CFG.seq_len):
        changed = idx.clone()
        changed[:, j] = (changed[:, j] + 3) % CFG.vocab_size
        with torch.no_grad():
            a, b = model(idx).logits, model(changed).logits
        leaks += int((a[:, :j] - b[:, :j]).abs().amax() > 1e-6)
    assert leaks > 0


def test_shapes_and_moe_outputs() -> None:
    idx = _tokens(3, 9)
    out = _moe_model()(idx)
    assert isinstance(out, LMOutput)
    assert out.logits.shape == (3, 9, CFG.vocab_size)
    assert len(out.moe_outputs) == CFG.n_layers
    for moe in out.moe_outputs:
        assert isinstance(moe, MoEOutput) and moe.y.shape == (3, 9, CFG.d_model)
        assert moe.routing.indices.shape == (27, 2)
    dense = _dense_model()(idx)
    assert dense.logits.shape == (3, 9, CFG.vocab_size) and dense.moe_outputs == []
    torch.manual_seed(0)
    cfg = LMConfig(vocab_size=11, seq_len=12, d_model=16, n_heads=4, n_layers=3)
    mixed = CharLM(cfg, lambda i: MoEFeedForward(16, 32, 4, k=1) if i % 2 else dense_ffn(16, 32))
    assert len(mixed(idx).moe_outputs) == 1


def test_block_keeps_moe_output_and_adds_residual() -> None:
    torch.manual_seed(0)
    moe = MoEFeedForward(8, 16, n_experts=4, k=2)
    block = Block(8, 2, moe).eval()
    x = torch.randn(2, 3, 8)
    out = block(x)
    assert isinstance(out, BlockOutput) and isinstance(out.moe, MoEOutput)
    h = x + block.attn(block.ln_1(x))
    torch.testing.assert_close(out.x, h + moe(block.ln_2(h)).y)


def test_weights_are_tied_and_logits_use_them() -> None:
    model = _dense_model()
    assert model.head.weight is model.tok_emb.weight
    params = {id(p) for p in model.parameters()}
    assert len(params) == len(list(model.parameters()))


def test_generate_is_deterministic_by_seed() -> None:
    tok = CharTokenizer("abcdefghijk")
    model = _dense_model()
    model.train()
    a = generate(model, tok, "abc", n_chars=30, temperature=1.0, seed=5)
    b = generate(model, tok, "abc", n_chars=30, temperature=1.0, seed=5)
    c = generate(model, tok, "abc", n_chars=30, temperature=1.0, seed=6)
    assert a == b and a != c
    assert len(a) == 33 and a.startswith("abc") and set(a) <= set(tok.chars)
    assert model.training  # mode restored


def test_generate_greedy_matches_argmax_loop() -> None:
    tok = CharTokenizer("abcdefghijk")
    model = _dense_model(seed=3)
    ids = tok.encode("habc")
    with torch.no_grad():
        for _ in range(20):  # longer than seq_len: the context window slides
            logits = model(ids[-CFG.seq_len:][None]).logits[0, -1]
            ids = torch.cat([ids, logits.argmax()[None]])
    assert generate(model, tok, "habc", n_chars=20, temperature=0, seed=0) == tok.decode(ids)


def test_count_parameters_total_and_active() -> None:
    d, h, e, k = 16, 32, 4, 2
    model = _moe_model()
    total = sum(p.numel() for p in model.parameters())
    expert = d * h + h + h * d + d
    counts = count_parameters(model)
    assert counts == ParamCount(total, total - CFG.n_layers * (e - k) * expert)
    dense = CharLM(CFG, lambda i: dense_ffn(d, k * h))
    # Equal active compute: the MoE's k experts equal one dense FFN of width k * H, except
    # for the router (D * E) and the k - 1 extra output biases (D each) per layer.
    dense_counts = count_parameters(dense)
    assert dense_counts.total == dense_counts.active
    assert counts.active - dense_counts.active == CFG.n_layers * (d * e + (k - 1) * d)
    layer = MoEFeedForward(d, h, e, k=1)
    assert count_parameters(layer) == ParamCount(d * e + e * expert, d * e + expert)
    assert isinstance(dense_ffn(d, h), Expert)


def test_config_bad_input() -> None:
    with pytest.raises(ValueError, match="n_heads must divide d_model"):
        LMConfig(vocab_size=5, seq_len=8, d_model=10, n_heads=4)
    with pytest.raises(ValueError, match="dropout"):
        LMConfig(vocab_size=5, seq_len=8, dropout=1.0)
    with pytest.raises(ValueError, match="vocab_size"):
        LMConfig(vocab_size=0, seq_len=8)
    with pytest.raises(AttributeError):
        CFG.d_model = 3  # type: ignore[misc]  # frozen


def test_model_bad_input() -> None:
    model = _dense_model()
    with pytest.raises(ValueError, match=r"S <= seq_len = 12"):
        model(_tokens(1, 13))
    with pytest.raises(ValueError, match="idx values"):
        model(torch.full((1, 4), CFG.vocab_size))
    with pytest.raises(ValueError, match="integer"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="2 dimensions"):
        model(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="config"):
        CharLM({"vocab_size": 3}, dense_ffn)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ffn must return"):
        Block(8, 2, nn.Linear(8, 4))(torch.zeros(1, 2, 8))
    with pytest.raises(ValueError, match="ffn must be an nn.Module"):
        Block(8, 2, lambda x: x)  # type: ignore[arg-type]


def test_generate_bad_input() -> None:
    tok = CharTokenizer("abcdefghijk")
    model = _dense_model()
    with pytest.raises(ValueError, match="prompt"):
        generate(model, tok, "", n_chars=3)
    with pytest.raises(ValueError, match="vocabulary"):
        generate(model, tok, "xyz", n_chars=3)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, tok, "abc", n_chars=3, temperature=-1.0)
    with pytest.raises(ValueError, match="n_chars"):
        generate(model, tok, "abc", n_chars=-1)
    with pytest.raises(ValueError, match="model only"):
        generate(model, CharTokenizer("abcdefghijklmnop"), "abc", n_chars=1)
