"""Hints come in two steps and never hand over the answer.

Every autograded exercise of the solution notebooks has at least two `<details>` hints
above its answer cell: the first gives the idea (what to compute, which equation, what to
watch out for) in words, without a code block; a later one a code-shaped nudge. Then the
code of the hints, run as the answer in every way a learner might paste it (the fenced
blocks together or one by one, each inline snippet as the returned expression), must not
pass the exercise's visible checks.
"""

from __future__ import annotations

import ast
import re
import textwrap

import pytest
import solution_code

from moe_course.grading import EXERCISES, CheckFailure, check

GRADED = [ex for ex in EXERCISES.values() if ex.kind != "written"]
DETAILS = re.compile(r"<details>\s*<summary>(.*?)</summary>(.*?)</details>", re.S)
FENCED = re.compile(r"```(?:python)?\n(.*?)```", re.S)
INLINE = re.compile(r"(?<!`)`([^`]+)`(?!`)")  # may wrap over a line
ALIASES = {"n_tokens": "T", "d_model": "D", "d_hidden": "H", "n_experts": "E", "k": "K"}


def hints(grade_id: str) -> list[tuple[str, str]]:
    """(summary, body) of each `<details>` in the markdown cell nearest above the answer,
    after the previous exercise's cells: an exercise's own hints, never an earlier one's."""
    cells = solution_code.notebook(EXERCISES[grade_id].assignment).cells
    at = next(i for i, c in enumerate(cells) if solution_code.grade_id(c) == grade_id)
    for cell in reversed(cells[:at]):
        if solution_code.grade_id(cell):  # an earlier exercise's answer or tests cell
            break
        if cell.cell_type == "markdown" and "<details>" in cell.source:
            return DETAILS.findall(cell.source)
    return []


@pytest.mark.parametrize("exercise", GRADED, ids=lambda ex: ex.grade_id)
def test_hints_come_in_two_steps(exercise) -> None:
    found = hints(exercise.grade_id)
    assert len(found) >= 2, f"{exercise.grade_id}: {len(found)} hint(s), expected two steps"
    (first, idea), *rest = found
    assert first.strip().startswith("Hint 1"), first
    assert not FENCED.search(idea), f"{exercise.grade_id}: hint 1 (the idea) has a code block"
    assert len(idea.split()) >= 25, f"{exercise.grade_id}: hint 1 is too short to be the idea"
    assert rest[-1][0].strip().startswith(f"Hint {len(found)}"), rest[-1][0]
    assert FENCED.search(rest[-1][1]) or INLINE.search(rest[-1][1]), (
        f"{exercise.grade_id}: the last hint has no code-shaped nudge")


def _regions(source: str) -> list[tuple[int, int, str]]:
    """(start, end, indent) of each `### BEGIN SOLUTION ... ### END SOLUTION` region."""
    lines = source.splitlines()
    out = []
    for i, line in enumerate(lines):
        if line.strip() == "### BEGIN SOLUTION":
            end = next(j for j in range(i, len(lines)) if lines[j].strip() == "### END SOLUTION")
            out.append((i, end, line[: len(line) - len(line.lstrip())]))
    return out


def _returns(fragment: str, solution_body: str) -> list[str]:
    """Return statements to try after a fragment that has none of its own."""
    try:
        tree = ast.parse(fragment)
    except SyntaxError:
        return [""]
    if any(isinstance(n, ast.Return) for n in ast.walk(tree)):
        return [""]
    assigned = {t.id for n in ast.walk(tree) if isinstance(n, (ast.Assign, ast.AugAssign))
                for t in ast.walk(n) if isinstance(t, ast.Name) and isinstance(t.ctx, ast.Store)}
    out = [""]
    last = tree.body[-1] if tree.body else None
    if isinstance(last, ast.Assign) and isinstance(last.targets[0], ast.Name):
        out.append(f"return {last.targets[0].id}")
    if isinstance(last, ast.Expr):
        out.append(f"return {ast.unparse(last.value)}")
    final = [line.strip() for line in solution_body.splitlines()
             if line.strip().startswith("return ")]
    if final:
        needed = {n.id for n in ast.walk(ast.parse(final[-1].split("#")[0]))
                  if isinstance(n, ast.Name)}
        if needed & assigned:
            out.append(final[-1].split("#")[0].strip())
    return out


def _kind(snippet: str) -> str:
    """"statement", "call" (an expression that calls something) or "other"."""
    try:
        tree = ast.parse(snippet)
    except SyntaxError:
        return "other"
    if len(tree.body) != 1:
        return "other"
    node = tree.body[0]
    if isinstance(node, (ast.Assign, ast.AugAssign)):
        return "statement"
    if isinstance(node, ast.Expr) and any(isinstance(n, ast.Call) for n in ast.walk(node)):
        return "call"
    return "other"


def candidates(grade_id: str) -> list[tuple[str, str]]:
    """(what, answer cell source) built from the code of the exercise's hints."""
    exercise = EXERCISES[grade_id]
    solution = solution_code.answer_cells(exercise.assignment)[grade_id]
    lines = solution.splitlines()
    start, end, indent = _regions(solution)[-1]  # a class's forward, or the function body
    body = "\n".join(lines[start + 1 : end])
    params = re.search(r"def \w+\((.*?)\)", solution, re.S)
    names = [p.split("=")[0].strip() for p in params.group(1).split(",")] if params else []
    alias = "".join(f"{ALIASES[n]} = {n}\n" for n in names if n in ALIASES)
    texts = [body for _, body in hints(grade_id)]
    blocks = [b for t in texts for b in FENCED.findall(t)]
    fragments = [("the code blocks together", "\n".join(blocks))] if blocks else []
    fragments += [(f"code block {i + 1}", b) for i, b in enumerate(blocks)]
    prose = [FENCED.sub("", t) for t in texts]
    inline = [" ".join(s.split()) for t in prose for s in INLINE.findall(t)]
    fragments += [(f"`{s}`", s) for s in inline]
    # The inline statements pasted one after another, returning one or two of the inline
    # expressions that call something: how a learner assembles a hint given in pieces.
    statements = [s for s in inline if _kind(s) == "statement"]
    calls = [s for s in inline if _kind(s) == "call"]
    joined = "\n".join(statements)
    for i, a in enumerate(calls):
        fragments.append((f"the inline code returning `{a}`", f"{joined}\nreturn {a}"))
        for b in calls[i + 1 :]:
            fragments.append((f"the inline code returning `{a}`, `{b}`",
                              f"{joined}\nreturn {a}, {b}"))
    out = []
    for what, fragment in fragments:
        fragment = textwrap.dedent(fragment)
        if re.search(r"^def (__init__|forward)\b", fragment, re.M):  # methods: the class
            head = re.search(r"^class .*?:\n", solution, re.M).group(0)
            out.append((what, head + textwrap.indent(fragment, "    ")))
            continue
        for ret in _returns(fragment, body):
            code = alias + fragment + ("\n" + ret if ret else "")
            new = lines[: start + 1] + textwrap.indent(code, indent).splitlines() + lines[end:]
            out.append((f"{what} {ret}".strip(), "\n".join(new)))
    return out


def passes(grade_id: str, source: str) -> bool:
    exercise = EXERCISES[grade_id]
    try:
        ns = solution_code.namespace(exercise.assignment, {grade_id: source})
        check(grade_id, ns[exercise.symbol])
    except (CheckFailure, Exception):  # noqa: BLE001 - any failure: the hint is not the answer
        return False
    return True


@pytest.mark.slow
@pytest.mark.parametrize("exercise", GRADED, ids=lambda ex: ex.grade_id)
def test_no_hint_is_the_answer(exercise, capsys) -> None:
    tried = candidates(exercise.grade_id)
    assert tried, f"{exercise.grade_id}: no hint code to try"
    for what, source in tried:
        assert not passes(exercise.grade_id, source), (
            f"{exercise.grade_id}: the hint's {what}, run as the answer, passes the checks")


def test_the_test_catches_a_hint_that_is_the_answer() -> None:
    # The old moe_flops hint handed over the formula: the test must see that.
    grade_id = "ex02_moe_flops"
    solution = solution_code.answer_cells(EXERCISES[grade_id].assignment)[grade_id]
    start, end, indent = _regions(solution)[-1]
    lines = solution.splitlines()
    code = "T, D, H, E, K = n_tokens, d_model, d_hidden, n_experts, k\n"
    code += "return 2 * T * D * E + 2 * T * K * 2 * D * H"
    source = "\n".join(lines[: start + 1] + textwrap.indent(code, indent).splitlines()
                       + lines[end:])
    assert passes(grade_id, source)
