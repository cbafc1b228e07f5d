"""`moe-course similarity`: answers that look copied, for the instructor to review.

    moe-course similarity PATH... --out DIR [--threshold 0.8] [--min-tokens 40]
    moe-course grade PATH... --out DIR --similarity      (the same report, beside grades.csv)

For every autograded exercise, the answer cells of all submissions (found as `moe-course
grade` finds them) are compared two by two, and each with the source of the exercise's
reference in `moe_course`. The report lists

- pairs of students whose answers are near-identical once names, comments, docstrings and
  layout are normalised away, and
- answers that match the reference package's source,

in `DIR/similarity.csv`, `DIR/similarity.json` and `DIR/similarity.md`. It never changes
a score: it is evidence to read, not a verdict. Pasting the reference's source is
plagiarism, not a grader bypass: the grader's tripwire catches only *running* the
reference's own code (`guard.reference_guard`).

Method: MOSS's, winnowing (Schleimer, Wilkerson and Aiken, "Winnowing: local algorithms for
document fingerprinting", SIGMOD 2003, doi:10.1145/872757.872770). An answer's Python tokens
(`tokenize`) are normalised: comments, blank lines and indentation dropped, every string
(docstrings included) becomes `S`, every name the learner chose (variables, arguments,
functions, classes) becomes `V`; keywords, operators, numbers, builtins and attribute names
(`.softmax`, `.topk`: the API used) stay. Each run of `K` tokens is hashed, and in every
window of `WINDOW` consecutive hashes the smallest is kept: any
shared run of at least `K + WINDOW - 1` tokens shares a fingerprint. Fingerprints of the
released answer cell (the stub every learner starts from) are left out. Two answers are
flagged when each contains at least `threshold` of the other's fingerprints, and the
reference when at least `threshold` of the answer's fingerprints are the reference's.
Answers with fewer than `min_tokens` normalised tokens are not compared: independent short
answers to a small exercise converge to the same few lines.

Why not `copydetect` (PyPI, which implements winnowing for teaching): it fingerprints
character k-grams of whole files and renames every name, attribute names included, so it
cannot keep the API a learner chose; it would also add a dependency (with matplotlib,
jinja2 and tqdm) to the grader for about a hundred lines of code.
"""

from __future__ import annotations

import argparse
import builtins
import csv
import hashlib
import inspect
import io
import json
import keyword
import sys
import tokenize
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..registry import EXERCISES, Exercise

K = 7  # tokens per k-gram
WINDOW = 4  # hashes per winnowing window: shared runs of K + WINDOW - 1 = 10 tokens are seen
THRESHOLD = 0.8  # least share of fingerprints in common to flag a pair
MIN_TOKENS = 40  # shortest answer compared, in normalised tokens
STUB = "# YOUR CODE HERE\nraise NotImplementedError()"  # nbgrader's cleared solution
_BUILTINS = frozenset(dir(builtins))
_SKIP = frozenset({tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT,
                   tokenize.DEDENT, tokenize.ENCODING, tokenize.ENDMARKER})


def normalise(source: str) -> list[str]:
    """The tokens of `source` that survive renaming, commenting and reformatting.

    >>> normalise("def f(x):  # doubles\\n    '''Doc.'''\\n    return torch.mul(x, 2)")
    ['def', 'V', '(', 'V', ')', ':', 'S', 'return', 'V', '.', 'mul', '(', 'V', ',', '2', ')']
    >>> normalise("def g(y):  # renamed\\n    return torch.mul(y, 2)") == normalise(
    ...     "def f(x):\\n    return torch.mul(x,\\n                     2)")
    True
    """
    out: list[str] = []
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    except (tokenize.TokenError, IndentationError, SyntaxError):
        tokens = []  # not Python (or cut short): compared by what tokenized before
    previous = ""
    for tok in tokens:
        if tok.type in _SKIP or tok.type == tokenize.ERRORTOKEN and not tok.string.strip():
            continue
        text = tok.string
        if tok.type == tokenize.STRING or tok.type == getattr(tokenize, "FSTRING_START", -1):
            text = "S"
        elif tok.type == tokenize.NAME and not keyword.iskeyword(text) and previous != "." \
                and text not in _BUILTINS:
            text = "V"
        out.append(text)
        previous = tok.string
    return out


def _hash(gram: Sequence[str]) -> int:
    return int.from_bytes(hashlib.blake2b("\0".join(gram).encode(), digest_size=8).digest(),
                          "big")


def fingerprints(tokens: Sequence[str], k: int = K, window: int = WINDOW) -> set[int]:
    """Winnowed fingerprints of `tokens`: the minimum hash of every window of `window`
    consecutive k-gram hashes.

    >>> a = fingerprints("a b c d e f g h i j k l".split(), k=3, window=2)
    >>> a == fingerprints("a b c d e f g h i j k l".split(), k=3, window=2) and len(a) > 0
    True
    """
    hashes = [_hash(tokens[i:i + k]) for i in range(len(tokens) - k + 1)]
    if not hashes:
        return set()
    if len(hashes) < window:
        return {min(hashes)}
    return {min(hashes[i:i + window]) for i in range(len(hashes) - window + 1)}


@dataclass
class Answer:
    """One learner's answer cell for one exercise, fingerprinted."""

    student: str
    assignment: str
    grade_id: str
    source: str
    tokens: int = 0  # normalised tokens
    prints: set[int] = field(default_factory=set)  # fingerprints, the stub's left out


def _reference_source(exercise: Exercise) -> str:
    parts = []
    for obj in exercise.references:
        try:
            parts.append(inspect.getsource(obj))
        except (OSError, TypeError):
            continue
    return "\n\n".join(parts)


def _share(a: set[int], b: set[int]) -> float:
    return len(a & b) / len(a) if a else 0.0


def compare(answers: Sequence[Answer], threshold: float = THRESHOLD,
            min_tokens: int = MIN_TOKENS, stubs: dict[str, set[int]] | None = None
            ) -> list[dict[str, Any]]:
    """Rows of the report: near-identical pairs, and answers matching the reference."""
    stubs = stubs or {}
    by_exercise: dict[str, list[Answer]] = {}
    for answer in answers:
        tokens = normalise(answer.source)
        answer.tokens = len(tokens)
        answer.prints = fingerprints(tokens) - stubs.get(answer.grade_id, set())
        if answer.tokens >= min_tokens and answer.prints:
            by_exercise.setdefault(answer.grade_id, []).append(answer)
    rows: list[dict[str, Any]] = []
    for grade_id, group in sorted(by_exercise.items()):
        exercise = EXERCISES[grade_id]
        reference = fingerprints(normalise(_reference_source(exercise)))
        for a in group:
            share = _share(a.prints, reference)
            if share >= threshold:
                rows.append({"exercise": grade_id, "kind": "reference",
                             "student_a": a.student, "student_b": "(moe_course reference)",
                             "share_a": round(share, 3),
                             "share_b": round(_share(reference, a.prints), 3),
                             "tokens_a": a.tokens, "tokens_b": None})
        for i, a in enumerate(group):
            for b in group[i + 1:]:
                ab, ba = _share(a.prints, b.prints), _share(b.prints, a.prints)
                if min(ab, ba) >= threshold:
                    rows.append({"exercise": grade_id, "kind": "pair", "student_a": a.student,
                                 "student_b": b.student, "share_a": round(ab, 3),
                                 "share_b": round(ba, 3), "tokens_a": a.tokens,
                                 "tokens_b": b.tokens})
    return rows


COLUMNS = ("exercise", "kind", "student_a", "student_b", "share_a", "share_b", "tokens_a",
           "tokens_b")


def write_report(rows: Sequence[dict[str, Any]], out: str | Path, compared: int,
                 threshold: float, min_tokens: int) -> None:
    """similarity.csv, similarity.json and similarity.md in `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in rows:
        writer.writerow(["" if row[c] is None else row[c] for c in COLUMNS])
    (out / "similarity.csv").write_text(buffer.getvalue(), encoding="utf-8")
    meta = {"answers_compared": compared, "threshold": threshold, "min_tokens": min_tokens,
            "k": K, "window": WINDOW, "rows": list(rows)}
    (out / "similarity.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    lines = ["# Similar answers (for review; no score was changed)", "",
             f"{compared} answers compared; flagged when both share at least "
             f"{threshold:.0%} of their fingerprints (answers under {min_tokens} tokens "
             "are not compared).", ""]
    if rows:
        lines += ["| exercise | what | student | with | shares |", "|---|---|---|---|---|"]
        lines += [f"| {r['exercise']} | {r['kind']} | {r['student_a']} | {r['student_b']} | "
                  f"{r['share_a']:.0%} / {r['share_b']:.0%} |" for r in rows]
    else:
        lines.append("Nothing flagged.")
    (out / "similarity.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def answers_of(paths: Iterable[str | Path], assignment: str | None = None
               ) -> tuple[list[Answer], list[str]]:
    """The answer cells of every submission under `paths`, and what could not be read."""
    from .grade import NotebookError, discover, read_cells

    answers: list[Answer] = []
    subs, skipped = discover(paths, assignment)
    problems = [f"{item.path}: {item.reason}" for item in skipped]
    for sub in subs:
        try:
            cells = read_cells(sub.path)
        except (NotebookError, OSError) as exc:
            problems.append(f"{sub.key}: {exc}")
            continue
        graded = {ex.grade_id for ex in sub.exercises if ex.kind != "written"}
        for cell in cells:
            if cell.grade_id in graded and not cell.tests and cell.source.strip() != STUB:
                answers.append(Answer(sub.student, sub.assignment, cell.grade_id, cell.source))
    return answers, problems


def stub_prints(root: str | Path | None = None) -> dict[str, set[int]]:
    """Fingerprints of each released answer cell (what every learner starts from), read from
    the release `notebooks/` of the course directory `root` (default: the checkout this
    package is installed from, if it is one); empty when there is none."""
    from .grade import read_cells

    root = Path(root) if root is not None else Path(__file__).resolve().parents[3]
    found: dict[str, set[int]] = {}
    for path in sorted((root / "notebooks").glob("*/*.ipynb")):
        try:
            cells = read_cells(path)
        except ValueError:
            continue
        for cell in cells:
            if cell.grade_id in EXERCISES and not cell.tests:
                found[cell.grade_id] = fingerprints(normalise(cell.source))
    return found


def run(paths: Sequence[str | Path], out: str | Path, threshold: float = THRESHOLD,
        min_tokens: int = MIN_TOKENS, assignment: str | None = None) -> list[dict[str, Any]]:
    """Compare the answers under `paths` and write the report to `out`; its rows."""
    answers, problems = answers_of(paths, assignment)
    rows = compare(answers, threshold, min_tokens, stub_prints())
    write_report(rows, out, len(answers), threshold, min_tokens)
    for problem in problems:
        print(f"similarity: not compared: {problem}", file=sys.stderr)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """`moe-course similarity`: 0 when the report was written, 2 on misuse."""
    parser = argparse.ArgumentParser(prog="moe-course similarity", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", metavar="PATH",
                        help="notebooks, folders of them, or nbgrader's submitted/ folder")
    parser.add_argument("--out", required=True, metavar="DIR", help="where the report goes")
    parser.add_argument("--threshold", type=float, default=THRESHOLD, metavar="F",
                        help=f"least shared share of fingerprints to flag (default "
                             f"{THRESHOLD})")
    parser.add_argument("--min-tokens", type=int, default=MIN_TOKENS, metavar="N",
                        help=f"shortest answer compared, in tokens (default {MIN_TOKENS})")
    parser.add_argument("--assignment", help="the assignment of notebooks whose path does "
                                             "not say it")
    args = parser.parse_args(argv)
    if not 0 < args.threshold <= 1:
        print(f"moe-course similarity: --threshold must be in (0, 1]; got {args.threshold}",
              file=sys.stderr)
        return 2
    try:
        rows = run(args.paths, args.out, args.threshold, args.min_tokens, args.assignment)
    except ValueError as exc:
        print(f"moe-course similarity: {exc}", file=sys.stderr)
        return 2
    print(f"similarity: {len(rows)} flagged; wrote {Path(args.out) / 'similarity.md'}")
    return 0
