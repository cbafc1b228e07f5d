"""Throughput of the pytest grader against nbgrader autograde, on the same submissions.

    python benchmarks/bench_grading.py [--n 40] [--jobs 2] [--assignment 02_top_k_routing]

Builds a temporary nbgrader course from `solutions/`, generates the assignment, and writes
`--n` submissions into `submitted/` (a quarter each: the solution, the untouched release, the
first answer filled in, and the solution with one answer cell raising at top level). Then it
times, one after the other on the same machine and files,

- `nbgrader autograde <assignment>` (serial: one kernel per notebook), and
- `moe-course grade submitted/ --jobs N` (N sandboxes at a time),

checks that both give every exercise the same points, and prints both times and their ratio.
Notebook 02 is the default; when `solutions/` has no 02 yet it falls back to 01 and says so.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
KINDS = ("solution", "blank", "partly", "crashing")


def _env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    for key in ("JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR", "IPYTHONDIR",
                "MPLCONFIGDIR"):
        env[key] = str(tmp / "jupyter" / key.lower())
        Path(env[key]).mkdir(parents=True, exist_ok=True)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.pop("NBGRADER_EXECUTION", None)
    return env


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return seconds


def _answers(nb: nbformat.NotebookNode) -> list[str]:
    return [c.metadata["nbgrader"]["grade_id"] for c in nb.cells if c.cell_type == "code"
            and c.metadata.get("nbgrader", {}).get("solution")]


def submission(kind: str, release: nbformat.NotebookNode, source: nbformat.NotebookNode
               ) -> nbformat.NotebookNode:
    """A submission of one of `KINDS`, built from the release and the source notebook."""
    solution = {c.metadata["nbgrader"]["grade_id"]: c.source for c in source.cells
                if "nbgrader" in c.metadata}
    answers = _answers(source)
    nb = nbformat.from_dict(release)
    filled = {"solution": set(answers), "blank": set(), "partly": set(answers[:1]),
              "crashing": set(answers)}[kind]
    for cell in nb.cells:
        gid = cell.metadata.get("nbgrader", {}).get("grade_id")
        if gid in filled:
            cell.source = solution[gid]
        if kind == "crashing" and gid == answers[-1]:
            cell.source += "\nraise RuntimeError('a bug at the end of the answer cell')"
    return nb


def build_course(tmp: Path, assignment: str, n: int) -> tuple[Path, dict[str, str]]:
    """A temporary nbgrader course with `n` submissions of `assignment`."""
    course = tmp / "course"
    (course / "source").mkdir(parents=True)
    shutil.copytree(ROOT / "solutions" / assignment, course / "source" / assignment,
                    ignore=shutil.ignore_patterns("*.py"))
    config = (ROOT / "nbgrader_config.py").read_text()
    (course / "nbgrader_config.py").write_text(
        config.replace('"solutions"', '"source"').replace('"notebooks"', '"release"'))
    env = _env(tmp)
    _run([sys.executable, "-m", "nbgrader", "generate_assignment", assignment, "--force"],
         course, env)
    (source_path,) = sorted((course / "source" / assignment).glob("*.ipynb"))
    source = nbformat.read(source_path, as_version=4)
    release = nbformat.read(course / "release" / assignment / source_path.name, as_version=4)
    for i in range(n):
        folder = course / "submitted" / f"s{i:03d}" / assignment
        folder.mkdir(parents=True)
        nbformat.write(submission(KINDS[i % len(KINDS)], release, source),
                       folder / source_path.name)
    return course, env


def nbgrader_points(course: Path, assignment: str) -> dict[tuple[str, str], float]:
    from nbgrader.api import Gradebook

    points = {}
    with Gradebook(f"sqlite:///{course / 'gradebook.db'}") as gb:
        for sub in gb.assignment_submissions(assignment):
            for nb in sub.notebooks:
                for grade in nb.grades:
                    if grade.cell.name.endswith("_tests"):
                        points[(sub.student.id, grade.cell.name[:-len("_tests")])] = grade.score
    return points


def grader_points(out: Path) -> dict[tuple[str, str], float]:
    with open(out / "grades.csv") as f:
        return {(r["student"], r["exercise"]): float(r["score"]) for r in csv.DictReader(f)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=40, help="submissions (default 40)")
    parser.add_argument("--jobs", type=int, default=2, help="moe-course grade --jobs")
    parser.add_argument("--assignment", default="02_top_k_routing")
    args = parser.parse_args(argv)
    assignment = args.assignment
    if not (ROOT / "solutions" / assignment).is_dir():
        print(f"solutions/{assignment} does not exist yet: falling back to "
              "01_experts_and_gating")
        assignment = "01_experts_and_gating"
    with tempfile.TemporaryDirectory(prefix="bench-grading-") as name:
        tmp = Path(name)
        course, env = build_course(tmp, assignment, args.n)
        print(f"{args.n} submissions of {assignment} ({', '.join(KINDS)}, in turn); "
              f"{os.cpu_count()} CPUs")
        nbgrader_s = _run([sys.executable, "-m", "nbgrader", "autograde", assignment,
                           "--force"], course, env)
        print(f"nbgrader autograde:            {nbgrader_s:7.1f} s "
              f"({nbgrader_s / args.n:.2f} s per submission)")
        out = tmp / "grades"
        grader_s = _run([sys.executable, "-m", "moe_course.cli", "grade",
                         str(course / "submitted"), "--out", str(out), "--jobs",
                         str(args.jobs)], ROOT, env)
        print(f"moe-course grade --jobs {args.jobs}:     {grader_s:7.1f} s "
              f"({grader_s / args.n:.2f} s per submission)")
        print(f"ratio nbgrader / moe-course grade: {nbgrader_s / grader_s:.2f}x")
        theirs, ours = nbgrader_points(course, assignment), grader_points(out)
        differ = {k: (theirs.get(k), ours.get(k)) for k in set(theirs) | set(ours)
                  if theirs.get(k) != ours.get(k)}
        print("same points per exercise as nbgrader" if not differ else
              f"points differ from nbgrader: {sorted(differ.items())[:10]}")
        return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
