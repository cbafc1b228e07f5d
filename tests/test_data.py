"""Tests for moe_course.data: the regions task and the multi-domain character corpus."""

from __future__ import annotations

import itertools
import math
import re
import string

import pytest
import torch

from moe_course.data import (
    DOMAINS,
    REGION_FUNCTIONS,
    REGION_MARGIN,
    REGION_NAMES,
    Batch,
    CharCorpus,
    CharTokenizer,
    Ownership,
    make_corpus,
    ownership,
    region_grid,
    region_of,
    region_target,
    regions_task,
)

# ----------------------------------------------------------------------------- regions


def _region_loop(x0: float, x1: float) -> int:
    """Oracle: the quadrant from the angle, counter-clockwise from the positive x0 axis."""
    angle = math.atan2(x1, x0) % (2 * math.pi)
    return min(int(angle // (math.pi / 2)), 3)


def test_region_of_matches_angle_oracle() -> None:
    x = regions_task(500, seed=3).x
    expected = [_region_loop(a, b) for a, b in x.tolist()]
    assert region_of(x).tolist() == expected


def test_region_target_matches_per_point_functions() -> None:
    x = regions_task(200, seed=4).x
    got = region_target(x)
    assert got.shape == (200, 1)
    for (a, b), value in zip(x.tolist(), got[:, 0].tolist(), strict=True):
        f = REGION_FUNCTIONS[_region_loop(a, b)]
        assert value == pytest.approx(float(f(torch.tensor(a), torch.tensor(b))), abs=1e-6)


def test_regions_task_deterministic_and_seed_dependent() -> None:
    a, b, c = regions_task(300, seed=7), regions_task(300, seed=7), regions_task(300, seed=8)
    for name in ("x", "y", "region"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert not torch.equal(a.x, c.x)
    assert not torch.equal(a.y, c.y)


def test_regions_task_does_not_touch_global_rng() -> None:
    state = torch.get_rng_state()
    regions_task(50, seed=1)
    assert torch.equal(state, torch.get_rng_state())


def test_regions_task_statistics() -> None:
    data = regions_task(20_000, seed=0, noise=0.1)
    assert data.x.dtype == torch.float32 and data.region.dtype == torch.int64
    assert data.x.abs().max() <= 1 and data.x.abs().min() >= REGION_MARGIN
    counts = torch.bincount(data.region, minlength=4)
    assert ((counts - 5000).abs() < 300).all(), counts
    residual = data.y - region_target(data.x)
    assert float(residual.std()) == pytest.approx(0.1, rel=0.05)
    assert float(residual.mean()) == pytest.approx(0.0, abs=0.005)
    noiseless = regions_task(100, seed=0, noise=0.0, margin=0.0)
    assert torch.equal(noiseless.y, region_target(noiseless.x))


def test_regions_have_different_functions() -> None:
    # On a shared set of points, the four region functions differ from each other by a lot.
    x = region_grid(41).x
    values = torch.stack([f(x[:, 0], x[:, 1]) for f in REGION_FUNCTIONS])  # (4, N)
    assert len(REGION_NAMES) == len(REGION_FUNCTIONS) == 4
    for i, j in itertools.combinations(range(4), 2):
        assert float((values[i] - values[j]).pow(2).mean()) > 0.2, (i, j)


def test_region_grid_layout() -> None:
    n = 5
    grid = region_grid(n)
    line = torch.linspace(-1, 1, n)
    image_x0 = grid.x[:, 0].reshape(n, n)
    image_x1 = grid.x[:, 1].reshape(n, n)
    assert torch.equal(image_x0, line.expand(n, n))  # columns vary x0
    assert torch.equal(image_x1, line[:, None].expand(n, n))  # rows vary x1
    assert torch.equal(grid.region, region_of(grid.x))
    assert torch.equal(grid.y, region_target(grid.x))


def test_ownership_oracle() -> None:
    g = torch.Generator().manual_seed(0)
    region = torch.randint(0, 4, (300,), generator=g)
    perm = (2, 0, 3, 1)
    expert = torch.tensor(perm)[region]
    assert ownership(region, expert) == Ownership(1.0, perm)
    # Corrupt 30 labels: the best matching is still perm, purity counts the survivors.
    noisy = expert.clone()
    noisy[:30] = (noisy[:30] + 1) % 4
    got = ownership(region, noisy)
    assert got.owner == perm and got.purity == pytest.approx(270 / 300)
    # Brute force over all matchings on random labels, with more experts than regions.
    rand = torch.randint(0, 6, (300,), generator=g)
    pairs = list(zip(region.tolist(), rand.tolist(), strict=True))
    best = max(sum(p[r] == e for r, e in pairs) for p in itertools.permutations(range(6), 4))
    assert ownership(region, rand, n_experts=6).purity == pytest.approx(best / 300)


@pytest.mark.parametrize("kwargs, match", [
    ({"n_samples": 0}, "n_samples"),
    ({"n_samples": 10, "seed": -1}, "seed"),
    ({"n_samples": 10, "noise": -0.1}, "noise"),
    ({"n_samples": 10, "margin": 1.0}, "margin"),
])
def test_regions_task_bad_input(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        regions_task(**kwargs)


def test_region_helpers_bad_input() -> None:
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        region_of(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="n"):
        region_grid(1)
    with pytest.raises(ValueError, match="one shape"):
        ownership(torch.zeros(3, dtype=torch.long), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="n_experts"):
        ownership(torch.tensor([0, 3]), torch.tensor([0, 1]), n_experts=2)


# ----------------------------------------------------------------------------- corpus

ARITHMETIC_CHARS = set(string.digits + "+-*=;")
WORD_CHARS = set(string.ascii_lowercase + " .")
DNA_CHARS = set("ACGT")


@pytest.fixture(scope="module")
def corpus() -> CharCorpus:
    return CharCorpus(n_chars=6000, seed=0)


def test_make_corpus_deterministic_and_seed_dependent() -> None:
    a, b, c = make_corpus(3000, seed=1), make_corpus(3000, seed=1), make_corpus(3000, seed=2)
    assert tuple(a) == DOMAINS and len(DOMAINS) >= 4
    for name in DOMAINS:
        assert a[name].encode() == b[name].encode()
        assert a[name] != c[name]
        assert len(a[name]) == 3000


def test_domains_have_distinct_character_sets() -> None:
    texts = make_corpus(5000, seed=0)
    chars = {name: set(text) for name, text in texts.items()}
    assert chars["arithmetic"] <= ARITHMETIC_CHARS
    assert chars["words"] <= WORD_CHARS
    assert chars["dna"] == DNA_CHARS
    assert {"(", ")", ":", "\n"} <= chars["code"]
    for name in DOMAINS:  # every domain has a character no other domain uses
        others = set().union(*(chars[o] for o in DOMAINS if o != name))
        assert chars[name] - others, name


def test_arithmetic_records_are_correct() -> None:
    text = make_corpus(4000, seed=5)["arithmetic"]
    records = text.split(";")[:-1]  # the last one may be cut
    assert len(records) > 100
    for record in records:
        m = re.fullmatch(r"(\d+)([+*-])(\d+)=(-?\d+)", record)
        assert m, record
        a, op, b, value = int(m[1]), m[2], int(m[3]), int(m[4])
        assert value == {"+": a + b, "-": a - b, "*": a * b}[op], record


def test_code_domain_is_valid_python() -> None:
    text = make_corpus(4000, seed=3)["code"]
    last = max(m.start() for m in re.finditer(r"\n(?=[a-z])", text))
    compile(text[: last + 1], "<corpus>", "exec")  # a SyntaxError fails the test


def test_words_and_dna_structure() -> None:
    texts = make_corpus(4000, seed=0)
    sentences = texts["words"].split(". ")[:-1]
    assert all(3 <= len(s.split()) <= 12 for s in sentences)
    assert texts["dna"].startswith("ATG")


def test_tokenizer_round_trip_and_vocabulary(corpus: CharCorpus) -> None:
    tok = corpus.tokenizer
    all_chars = set("".join(corpus.texts.values()))
    assert tok.chars == tuple(sorted(all_chars)) and tok.vocab_size == len(all_chars)
    for text in corpus.texts.values():
        ids = tok.encode(text)
        assert ids.dtype == torch.int64 and ids.shape == (len(text),)
        assert tok.decode(ids) == text
        assert tok.decode(ids.tolist()) == text
    assert CharTokenizer(["ab", "ca"]).chars == ("a", "b", "c")


def test_tokenizer_bad_input(corpus: CharCorpus) -> None:
    tok = corpus.tokenizer
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.encode("hello Z!")
    with pytest.raises(ValueError, match="ids"):
        tok.decode([0, tok.vocab_size])
    with pytest.raises(ValueError, match="ids"):
        tok.decode(torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="at least one character"):
        CharTokenizer("")


def test_get_batch_shapes_targets_and_domain_labels(corpus: CharCorpus) -> None:
    batch = corpus.get_batch("train", batch_size=10, seq_len=24, seed=3)
    assert isinstance(batch, Batch)
    for t in batch:
        assert t.shape == (10, 24) and t.dtype == torch.int64
    assert torch.equal(batch.x[:, 1:], batch.y[:, :-1])
    assert batch.domain[:, 0].tolist() == [i % len(DOMAINS) for i in range(10)]
    assert (batch.domain == batch.domain[:, :1]).all()
    tok = corpus.tokenizer
    for row in range(10):
        name = DOMAINS[int(batch.domain[row, 0])]
        window = tok.decode(batch.x[row]) + tok.decode(batch.y[row, -1:])
        assert window in tok.decode(corpus.tokens("train", name)), (name, window)


def test_get_batch_val_split_and_domains(corpus: CharCorpus) -> None:
    tok = corpus.tokenizer
    batch = corpus.get_batch("val", batch_size=6, seq_len=20, seed=0, domains="dna")
    assert (batch.domain == DOMAINS.index("dna")).all()
    val = tok.decode(corpus.tokens("val", "dna"))
    assert len(val) == 600 and corpus.texts["dna"].endswith(val)
    for row in batch.x:
        assert tok.decode(row) in val
    two = corpus.get_batch("train", 4, 8, seed=0, domains=("words", "code"))
    assert two.domain[:, 0].tolist() == [1, 2, 1, 2]


def test_get_batch_seeding(corpus: CharCorpus) -> None:
    a = corpus.get_batch("train", 8, 16, seed=11)
    b = corpus.get_batch("train", 8, 16, seed=11)
    c = corpus.get_batch("train", 8, 16, seed=12)
    assert torch.equal(a.x, b.x) and not torch.equal(a.x, c.x)
    g = torch.Generator().manual_seed(11)
    first, second = corpus.get_batch("train", 8, 16, g), corpus.get_batch("train", 8, 16, g)
    assert torch.equal(first.x, a.x) and not torch.equal(second.x, a.x)


@pytest.mark.parametrize("args, kwargs, match", [
    (("test", 4, 8), {}, "split"),
    (("train", 0, 8), {}, "batch_size"),
    (("train", 4, 0), {}, "seq_len"),
    (("val", 4, 600), {}, "seq_len must be at most 599"),
    (("train", 4, 8), {"domains": ("poetry",)}, "domains"),
    (("train", 4, 8), {"domains": ()}, "domains"),
    (("train", 4, 8), {"seed": -3}, "seed"),
])
def test_get_batch_bad_input(corpus: CharCorpus, args: tuple, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        corpus.get_batch(*args, **kwargs)


def test_corpus_bad_input() -> None:
    with pytest.raises(ValueError, match="val_fraction"):
        CharCorpus(n_chars=100, val_fraction=1.0)
    with pytest.raises(ValueError, match="n_chars"):
        make_corpus(0)
    with pytest.raises(ValueError, match="seed"):
        make_corpus(10, seed=1.5)  # type: ignore[arg-type]
