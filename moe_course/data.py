"""Small, generated, deterministic data for the notebooks; nothing is downloaded.

Two tasks, each built from an explicit seed so that every learner sees the same numbers:

- The regions task of notebook 01: a regression on the square `[-1, 1]^2` split into four
  quadrants, each with its own target function (a ripple, a plane, a bowl, a constant). A
  mixture of experts with a linear softmax gate (Jacobs et al. 1991; Shazeer et al. 2017,
  arXiv 1701.06538, eq. 1 and 3) can give each quadrant its own expert: the bias-free gate
  `softmax(x @ w_gate)` splits the plane into sectors around the origin, and quadrants are
  such sectors. Neighbouring functions sit on opposite sides of 0, so the target jumps at
  every border and no small expert can serve two quadrants; a band of half-width `margin`
  along the axes is left empty so that a gate of moderate sharpness separates them.
  Measured: four `Expert(2, 8)` read out by `nn.Linear(2, 1)` (or the first column of
  `y`), a zero-initialised `w_gate`, Adam at lr 1e-2 for the experts and 5e-2 for the gate
  (a soft gate must grow sharp), 600 full-batch steps on 2048 points: the gate's argmax
  matches a one-to-one region-to-expert map for 96% of test points on average over 8
  seeds (100% for seed 0), and the test MSE is 4x lower than one `Expert(2, 8)`'s. With
  one learning rate for all (1e-2) ownership is muddled (66%).
- The multi-domain character corpus of notebook 05: arithmetic, English-like sentences,
  Python-like code and DNA, each with characters the others lack, so a router can (and, in
  the trained model, does) send tokens of different domains to different experts. Every
  batch row comes from one domain, so the per-token domain label is exact.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterable, Sequence
from typing import Callable, NamedTuple, Union

import torch
from torch import Tensor

from .validation import index_tensor, positive_int

# ---------------------------------------------------------------------------------------
# Notebook 01: a regression whose regions need different functions
# ---------------------------------------------------------------------------------------

REGION_NAMES = ("ripple", "plane", "bowl", "constant")
"""Target function of each region; region `r` is the quadrant `r` (counter-clockwise from
`x0 >= 0, x1 >= 0`)."""

REGION_MARGIN = 0.1
"""Half-width of the empty band along both axes in `regions_task` samples."""


class RegionsData(NamedTuple):
    """Inputs, targets and the true region of each point."""

    x: Tensor  # (N, 2) float32 points in [-1, 1]^2
    y: Tensor  # (N, 1) float32 targets
    region: Tensor  # (N,) int64 region id in [0, 4), see REGION_NAMES


def region_of(x: Tensor) -> Tensor:
    """The quadrant of each point, counted counter-clockwise: `(N, 2) -> (N,)` int64.

    Region 0 is `x0 >= 0, x1 >= 0`, 1 is `x0 < 0, x1 >= 0`, 2 is `x0 < 0, x1 < 0` and 3 is
    `x0 >= 0, x1 < 0`.

    >>> region_of(torch.tensor([[0.5, 0.5], [-0.5, 0.5], [-0.5, -0.5], [0.5, -0.5]]))
    tensor([0, 1, 2, 3])
    """
    _points("x", x)
    right, up = x[:, 0] >= 0, x[:, 1] >= 0  # (N,), (N,)
    return torch.where(up, torch.where(right, 0, 1), torch.where(right, 3, 2)).long()


def region_target(x: Tensor) -> Tensor:
    """The noise-free target at each point: `(N, 2) -> (N, 1)`.

    Region 0, ripple: `0.6 + 0.4 sin(2 pi (x0 + x1))`; 1, plane: `-1 + (x0 + x1) / 2`;
    2, bowl: `0.3 + 1.5 ((x0 + 1/2)^2 + (x1 + 1/2)^2)`, lowest at the quadrant's centre;
    3, constant: `-0.8` (`REGION_FUNCTIONS`). Neighbouring regions sit on opposite sides
    of 0 (ripple and bowl above, plane and constant below), so one small expert cannot
    cover two neighbours and the function jumps at every border.

    >>> region_target(torch.tensor([[0.5, -0.5], [-0.5, -0.5]]))
    tensor([[-0.8000],
            [ 0.3000]])
    """
    region = region_of(x)  # (N,)
    x0, x1 = x[:, 0], x[:, 1]
    values = torch.stack([f(x0, x1) for f in REGION_FUNCTIONS], dim=1)  # (N, 4)
    return values.gather(1, region[:, None])  # (N, 1)


def _ripple(x0: Tensor, x1: Tensor) -> Tensor:
    return 0.6 + 0.4 * torch.sin(2 * math.pi * (x0 + x1))


def _plane(x0: Tensor, x1: Tensor) -> Tensor:
    return -1.0 + 0.5 * (x0 + x1)


def _bowl(x0: Tensor, x1: Tensor) -> Tensor:
    return 0.3 + 1.5 * ((x0 + 0.5) ** 2 + (x1 + 0.5) ** 2)


def _constant(x0: Tensor, x1: Tensor) -> Tensor:
    return torch.full_like(x0, -0.8)


REGION_FUNCTIONS: tuple[Callable[[Tensor, Tensor], Tensor], ...] = (
    _ripple, _plane, _bowl, _constant)
"""`f(x0, x1)` of each region, in the order of REGION_NAMES."""


def _points(name: str, x: object) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() != 2 \
            or x.shape[1] != 2:
        got = f"shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a float tensor of points (N, 2); got {got}")


def regions_task(n_samples: int, seed: int = 0, noise: float = 0.05,
                 margin: float = REGION_MARGIN) -> RegionsData:
    """`n_samples` points drawn uniformly from `[-1, 1]^2` minus the band `|x_i| < margin`.

    Targets are `region_target(x)` plus Gaussian noise of standard deviation `noise`. The
    same `seed` gives the same bytes; the draw uses its own `torch.Generator`, never the
    global random state.

    >>> data = regions_task(6, seed=0)
    >>> data.x.shape, data.y.shape, data.region.shape
    (torch.Size([6, 2]), torch.Size([6, 1]), torch.Size([6]))
    >>> bool(data.x.abs().min() >= REGION_MARGIN)
    True
    """
    positive_int("n_samples", n_samples)
    _seed("seed", seed)
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not noise >= 0 \
            or math.isinf(noise):
        raise ValueError(f"noise must be a finite number >= 0; got {noise!r}")
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) \
            or not 0 <= margin < 1:
        raise ValueError(f"margin must be a number with 0 <= margin < 1; got {margin!r}")
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n_samples, 2, generator=g)  # (N, 2) in [0, 1)
    sign = torch.randint(0, 2, (n_samples, 2), generator=g) * 2 - 1  # (N, 2) in {-1, 1}
    x = sign * (margin + (1 - margin) * u)  # (N, 2)
    y = region_target(x) + noise * torch.randn(n_samples, 1, generator=g)  # (N, 1)
    return RegionsData(x, y, region_of(x))


def region_grid(n: int = 101) -> RegionsData:
    """A dense `n x n` grid over `[-1, 1]^2` with noise-free targets, for pictures.

    Rows are ordered so that `values.reshape(n, n)` is an image whose row `i` has
    `x1 = linspace(-1, 1, n)[i]` and column `j` has `x0 = linspace(-1, 1, n)[j]`: draw it
    with `plt.imshow(v.reshape(n, n), origin="lower", extent=(-1, 1, -1, 1))`.

    >>> grid = region_grid(3)
    >>> grid.x.tolist()[:4]
    [[-1.0, -1.0], [0.0, -1.0], [1.0, -1.0], [-1.0, 0.0]]
    >>> grid.region.reshape(3, 3)
    tensor([[2, 3, 3],
            [1, 0, 0],
            [1, 0, 0]])
    """
    positive_int("n", n, minimum=2)
    line = torch.linspace(-1.0, 1.0, n)  # (n,)
    rows, cols = torch.meshgrid(line, line, indexing="ij")  # (n, n), (n, n)
    x = torch.stack([cols.reshape(-1), rows.reshape(-1)], dim=1)  # (n * n, 2)
    return RegionsData(x, region_target(x), region_of(x))


class Ownership(NamedTuple):
    """How well experts line up with regions (see `ownership`)."""

    purity: float  # share of points whose expert is their region's owner
    owner: tuple[int, ...]  # owner[r]: the expert matched to region r


def ownership(region: Tensor, expert: Tensor, n_experts: int | None = None) -> Ownership:
    """Match regions to experts one-to-one so that most points agree; report the agreement.

    `region` and `expert` are `(N,)` integer labels (for a mixture, `expert =
    gates.argmax(-1)`). Every injective map from the `R` regions to the `E` experts is
    tried (at most a few thousand for the sizes of this course); `purity` is the share of
    points with `expert == owner[region]` under the best one, `1.0` for a perfect split and
    about `1 / E` when the gate ignores the regions.

    >>> ownership(torch.tensor([0, 0, 1, 1, 2]), torch.tensor([2, 2, 0, 1, 1]))
    Ownership(purity=0.8, owner=(2, 0, 1))
    """
    index_tensor("region", region, ndim=1, shape_hint="(N,)")
    index_tensor("expert", expert, ndim=1, shape_hint="(N,)")
    if region.shape != expert.shape or region.numel() == 0:
        raise ValueError(f"region and expert must be non-empty (N,) tensors of one shape; got "
                         f"{tuple(region.shape)} and {tuple(expert.shape)}")
    n_regions = int(region.max()) + 1
    if n_experts is None:
        n_experts = max(int(expert.max()) + 1, n_regions)
    positive_int("n_experts", n_experts, minimum=max(n_regions, int(expert.max()) + 1))
    if math.perm(n_experts, n_regions) > 100_000:
        raise ValueError(f"ownership tries every matching; {n_regions} regions and "
                         f"{n_experts} experts are too many (at most 100000 matchings)")
    counts = torch.zeros(n_regions, n_experts, dtype=torch.long)
    counts = counts.index_put((region.long(), expert.long()), torch.ones_like(region.long()),
                              accumulate=True)  # (R, E)
    best, owner = -1, ()
    for perm in itertools.permutations(range(n_experts), n_regions):
        agree = int(counts[torch.arange(n_regions), torch.tensor(perm)].sum())
        if agree > best:
            best, owner = agree, perm
    return Ownership(best / region.numel(), tuple(owner))


# ---------------------------------------------------------------------------------------
# Notebook 05: a multi-domain character corpus
# ---------------------------------------------------------------------------------------

DOMAINS = ("arithmetic", "words", "code", "dna")
"""The corpus domains, in the order of the domain ids in `Batch.domain`."""

_NOUNS = ("cat", "dog", "bird", "fish", "child", "farmer", "river", "tree", "house", "ship",
          "king", "queen", "stone", "garden", "window", "letter")
_ADJECTIVES = ("small", "old", "red", "green", "quiet", "happy", "dark", "bright", "tall",
               "cold")
_VERBS = ("sees", "finds", "likes", "follows", "paints", "carries", "watches", "builds",
          "opens", "hears")
_DETERMINERS = ("the", "a", "one", "every", "my", "her")
_ADVERBS = ("slowly", "today", "again", "at night", "in the rain", "with care")

_VARIABLES = ("x", "y", "n", "total", "count", "value", "step", "size")
_FUNCTIONS = ("scale", "shift", "square", "double", "clip", "area")

_CODONS = ("GCA", "GCT", "GAA", "GAT", "AAA", "AAG", "CTG", "CTT", "TCC", "TCA", "GGC",
           "GGT", "CCA", "CGT", "ACC", "TAC")
_STOPS = ("TAA", "TAG", "TGA")


def _arithmetic(rng: random.Random) -> str:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    op = rng.choice("+-*")
    if op == "*":
        b = rng.randint(0, 9)
    value = a + b if op == "+" else a - b if op == "-" else a * b
    return f"{a}{op}{b}={value};"


def _sentence(rng: random.Random) -> str:
    def phrase() -> str:
        adjective = f"{rng.choice(_ADJECTIVES)} " if rng.random() < 0.5 else ""
        return f"{rng.choice(_DETERMINERS)} {adjective}{rng.choice(_NOUNS)}"

    tail = f" {rng.choice(_ADVERBS)}" if rng.random() < 0.4 else ""
    return f"{phrase()} {rng.choice(_VERBS)} {phrase()}{tail}. "


def _code(rng: random.Random) -> str:
    v, w = rng.sample(_VARIABLES, 2)
    n = rng.randint(1, 9)
    kind = rng.randrange(3)
    if kind == 0:
        op = rng.choice("+-*")
        return f"def {rng.choice(_FUNCTIONS)}({v}):\n    return {v} {op} {n}\n"
    if kind == 1:
        return f"for i in range({n}):\n    {v} = {v} + i * {w}\n"
    cmp = rng.choice(("<", ">", "=="))
    return f"if {v} {cmp} {n}:\n    {w} = {v}\n"


def _gene(rng: random.Random) -> str:
    body = "".join(rng.choice(_CODONS) for _ in range(rng.randint(3, 10)))
    return f"ATG{body}{rng.choice(_STOPS)}"


_GENERATORS: dict[str, Callable[[random.Random], str]] = {
    "arithmetic": _arithmetic, "words": _sentence, "code": _code, "dna": _gene}


def make_corpus(n_chars: int = 20_000, seed: int = 0) -> dict[str, str]:
    """Generate `n_chars` characters of text for each domain of `DOMAINS`.

    Each domain is a stream of records (`12+7=19;`, `the old cat sees a tree. `, a small
    Python function or loop, a gene `ATG...TAA`) drawn from `random.Random(seed * 4 + i)`
    for the `i`-th domain and cut at exactly `n_chars` characters. Same `seed`, same text.

    >>> corpus = make_corpus(n_chars=40, seed=0)
    >>> tuple(corpus) == DOMAINS, {len(t) for t in corpus.values()}
    (True, {40})
    >>> set(corpus["dna"]) <= set("ACGT")
    True
    """
    positive_int("n_chars", n_chars)
    _seed("seed", seed)
    texts = {}
    for i, name in enumerate(DOMAINS):
        rng = random.Random(seed * len(DOMAINS) + i)
        parts: list[str] = []
        length = 0
        while length < n_chars:
            parts.append(_GENERATORS[name](rng))
            length += len(parts[-1])
        texts[name] = "".join(parts)[:n_chars]
    return texts


class CharTokenizer:
    """One token per character; the vocabulary is the sorted set of characters seen.

    >>> tok = CharTokenizer("abca")
    >>> tok.vocab_size, tok.chars
    (3, ('a', 'b', 'c'))
    >>> tok.encode("cab")
    tensor([2, 0, 1])
    >>> tok.decode(tok.encode("cab"))
    'cab'
    """

    def __init__(self, text: str | Iterable[str]) -> None:
        if isinstance(text, str):
            chars = set(text)
        else:
            chars = set()
            for item in text:
                if not isinstance(item, str):
                    raise ValueError(f"text must be a string or strings; got an item "
                                     f"{type(item).__name__} {item!r}")
                chars.update(item)
        if not chars:
            raise ValueError("text must contain at least one character to build a vocabulary")
        self.chars: tuple[str, ...] = tuple(sorted(chars))
        self.vocab_size: int = len(self.chars)
        self._index = {c: i for i, c in enumerate(self.chars)}

    def encode(self, text: str) -> Tensor:
        """`str -> (n,)` int64 token ids; a character outside the vocabulary is a ValueError."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a str; got {type(text).__name__}")
        unknown = sorted(set(text) - self._index.keys())
        if unknown:
            raise ValueError(f"text contains characters outside the vocabulary: {unknown!r}; "
                             f"the vocabulary is {''.join(self.chars)!r}")
        return torch.tensor([self._index[c] for c in text], dtype=torch.long)

    def decode(self, ids: Tensor | Sequence[int]) -> str:
        """`(n,)` token ids (a tensor or a list of ints) -> str."""
        if isinstance(ids, Tensor):
            index_tensor("ids", ids, ndim=1, shape_hint="(n,)", upper=self.vocab_size)
            ids = ids.tolist()
        out = []
        for i in ids:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.vocab_size:
                raise ValueError(f"ids must be ints in [0, {self.vocab_size}); got {i!r}")
            out.append(self.chars[i])
        return "".join(out)

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


class Batch(NamedTuple):
    """A language-modelling batch: inputs, next-character targets, domain of each token."""

    x: Tensor  # (B, S) int64 token ids
    y: Tensor  # (B, S) int64 targets, x shifted left by one
    domain: Tensor  # (B, S) int64 index into DOMAINS


SPLITS = ("train", "val")

SeedLike = Union[int, torch.Generator]


class CharCorpus:
    """The multi-domain corpus, its tokenizer and its train/val token streams.

    Each domain's text is split in order: the first `1 - val_fraction` for training, the
    rest for validation, so no validation window overlaps a training one.

    >>> corpus = CharCorpus(n_chars=2000, seed=0)
    >>> batch = corpus.get_batch("train", batch_size=8, seq_len=16, seed=0)
    >>> batch.x.shape, batch.y.shape, batch.domain[:, 0].tolist()
    (torch.Size([8, 16]), torch.Size([8, 16]), [0, 1, 2, 3, 0, 1, 2, 3])
    >>> for row in batch.x[:4]:
    ...     print(repr(corpus.tokenizer.decode(row)))
    '17=18;34-42=-8;4'
    'reen river opens'
    'size\\nfor i in ra'
    'GATTAAATGGGCCGTT'
    """

    def __init__(self, n_chars: int = 20_000, seed: int = 0, val_fraction: float = 0.1) -> None:
        if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) \
                or not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be a number with 0 < val_fraction < 1; got "
                             f"{val_fraction!r}")
        self.texts: dict[str, str] = make_corpus(n_chars, seed)
        self.tokenizer = CharTokenizer(self.texts.values())
        self.domains: tuple[str, ...] = DOMAINS
        n_val = max(2, round(n_chars * val_fraction))
        if n_chars - n_val < 2:
            raise ValueError(f"n_chars = {n_chars} leaves no training text with val_fraction "
                             f"= {val_fraction}")
        self._tokens: dict[str, dict[str, Tensor]] = {"train": {}, "val": {}}
        for name, text in self.texts.items():
            ids = self.tokenizer.encode(text)  # (n_chars,)
            self._tokens["train"][name] = ids[: n_chars - n_val]
            self._tokens["val"][name] = ids[n_chars - n_val:]

    def tokens(self, split: str, domain: str) -> Tensor:
        """The `(n,)` int64 token stream of one domain in one split (a copy)."""
        _choice("split", split, SPLITS)
        _choice("domain", domain, DOMAINS)
        return self._tokens[split][domain].clone()

    def get_batch(self, split: str, batch_size: int, seq_len: int, seed: SeedLike = 0,
                  domains: str | Sequence[str] | None = None) -> Batch:
        """`batch_size` windows of `seq_len + 1` characters, each from a single domain.

        Row `b` comes from domain `chosen[b % len(chosen)]`, where `chosen` is `domains`
        (default: all of `DOMAINS`), so every batch is balanced across domains; the start
        of each window is drawn with `seed` (an int, or a `torch.Generator` that is
        advanced). `y` is `x` shifted by one character; `domain[b, s]` is the id in
        `DOMAINS` of the text token `x[b, s]` came from.
        """
        _choice("split", split, SPLITS)
        positive_int("batch_size", batch_size)
        positive_int("seq_len", seq_len)
        chosen = _domain_list(domains)
        g = _generator(seed)
        shortest = min(self._tokens[split][d].numel() for d in chosen)
        if seq_len + 1 > shortest:
            raise ValueError(f"seq_len must be at most {shortest - 1} for the {split!r} split "
                             f"(its shortest domain has {shortest} tokens); got {seq_len}")
        rows = [chosen[b % len(chosen)] for b in range(batch_size)]
        windows, labels = [], []
        for name in rows:
            stream = self._tokens[split][name]
            start = int(torch.randint(0, stream.numel() - seq_len, (1,), generator=g))
            windows.append(stream[start:start + seq_len + 1])  # (S + 1,)
            labels.append(DOMAINS.index(name))
        chunk = torch.stack(windows)  # (B, S + 1)
        domain = torch.tensor(labels, dtype=torch.long)[:, None].expand(-1, seq_len)  # (B, S)
        return Batch(chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous(), domain.contiguous())

    def __repr__(self) -> str:
        n = {k: len(v) for k, v in self.texts.items()}
        return f"CharCorpus(chars={n}, vocab_size={self.tokenizer.vocab_size})"


def _seed(name: str, seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"{name} must be an int >= 0; got {seed!r}")
    return seed


def _generator(seed: object) -> torch.Generator:
    if isinstance(seed, torch.Generator):
        return seed
    return torch.Generator().manual_seed(_seed("seed", seed))


def _choice(name: str, value: object, options: Sequence[str]) -> str:
    if value not in options:
        raise ValueError(f"{name} must be one of {tuple(options)}; got {value!r}")
    return value  # type: ignore[return-value]


def _domain_list(domains: str | Sequence[str] | None) -> tuple[str, ...]:
    if domains is None:
        return DOMAINS
    if isinstance(domains, str):
        domains = (domains,)
    chosen = tuple(domains)
    if not chosen:
        raise ValueError(f"domains must name at least one of {DOMAINS}; got an empty sequence")
    for d in chosen:
        _choice("domains", d, DOMAINS)
    return chosen
