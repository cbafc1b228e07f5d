"""`moe-course grade`: grade a class's notebooks with the pytest grader, write the gradebook.

    moe-course grade PATH... --out DIR [--jobs N] [--timeout S] [--memory MB]
                     [--assignment NAME] [--shard K/N | --shard auto [--shard-count N]]
                     [--secret-file FILE] [--similarity]
    moe-course grade --merge DIR... --out DIR

PATH is a submission notebook, a folder of them, or nbgrader's `submitted/` tree
(`submitted/<student>/<assignment>/<notebook>.ipynb`: student and assignment come from the
path; elsewhere the student is the notebook's file name and the assignment is read from its
cells' grade_ids). The grading itself is a pytest run of
`moe_course.grading.autograde.pytest_plugin` (one test item per autograded exercise of each
submission, in parallel over `--jobs` pytest-xdist workers); this module finds the
submissions, starts that run, and writes:

- `DIR/grades.csv`: exactly `student,assignment,exercise,score,max_score`, one row per
  autograded exercise of each submission (also when it crashed or is missing; `exercise` is
  the answer cell's grade_id). Written answers are graded by hand, so they are not rows here;
  `grades.json` lists them under `manual` with their points;
- `DIR/grades.json`: the same scores with every check's message, the cell errors, the
  sandbox attempts and seconds, and `complete` (every submission graded);
- `DIR/feedback/<student>/<assignment>.md`: per-learner feedback with the visible checks'
  messages and only pass or fail for the hidden ones.

Every file is written once, at the end, after every sandbox is gone, and atomically. The exit
status is 0 when every submission was graded, whatever the scores.

Hidden checks run on inputs derived from the course secret (`moe_course.grading.secret`):
`--secret-file FILE`, else `$MOE_COURSE_SECRET`, else the file named by
`$MOE_COURSE_SECRET_FILE`, else `./.moe_course_secret` (in the course directory, where
nbgrader's config finds it too). Only this process reads it; learner code never gets it. The
same secret gives nbgrader autograde the same inputs, hence the same points. Without one,
the package's default inputs are used, which a learner can compute: the run says so.
`--similarity` also writes the similarity report (`autograde.similarity`) to `--out`.

A class too big for one machine is sharded: run `--shard 1/4` ... `--shard 4/4` (each takes
every 4th submission in sorted order) on four machines, then `--merge` their output folders.
`--shard auto` reads K and N from the batch system: a Kubernetes Indexed Job
(`JOB_COMPLETION_INDEX`, with N from `--shard-count` or `MOE_COURSE_SHARD_COUNT`) or a Slurm
job array (`SLURM_ARRAY_TASK_ID`, `SLURM_ARRAY_TASK_COUNT`, `SLURM_ARRAY_TASK_MIN`); see
docs/examples/grade-indexed-job.yaml and docs/examples/grade.sbatch.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import importlib.util
import io
import json
import os
import re
import sys
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..registry import EXERCISES, Exercise, exercises_for
from ..secret import ENV, ENV_FILE, FILE_NAME, read_secret_file
from .limits import Limits, add_options, from_options, to_options
from .sandbox import Cell

CSV_COLUMNS = ("student", "assignment", "exercise", "score", "max_score")
NOTEBOOK_LIMIT = Limits().notebook_mb << 20  # largest notebook file read, by default (bytes)
ASSIGNMENTS = frozenset(ex.assignment for ex in EXERCISES.values())


class NotebookError(ValueError):
    """A submitted notebook that cannot be read as a notebook."""


@dataclass(frozen=True)
class Submission:
    """One learner's notebook for one assignment."""

    student: str  # from submitted/<student>/<assignment>/, else the notebook's file name
    assignment: str  # from the folder name, else from the notebook's grade_ids
    path: Path  # the notebook file

    @property
    def key(self) -> str:
        """`student/assignment`, unique within a grading run."""
        return f"{self.student}/{self.assignment}"

    @property
    def exercises(self) -> list[Exercise]:
        return exercises_for(self.assignment)


def read_cells(path: Path, limit: int = NOTEBOOK_LIMIT) -> list[Cell]:
    """The code cells of a notebook file, read as plain JSON (outputs are ignored).

    Raises `NotebookError` for a file that is too large, not JSON, or not shaped like a
    notebook, so that the submission scores 0 with that reason instead of stopping the run.
    """
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise NotebookError(f"the notebook could not be read ({exc.strerror})") from None
    if len(data) > limit:
        raise NotebookError(f"the notebook is larger than {limit >> 20} MiB")
    try:
        nb = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise NotebookError(f"the notebook is not valid JSON ({str(exc)[:120]})") from None
    raw = nb.get("cells") if isinstance(nb, dict) else None
    if not isinstance(raw, list):
        raise NotebookError("the notebook has no list of cells")
    cells = []
    for index, cell in enumerate(raw):
        if not isinstance(cell, dict) or cell.get("cell_type") != "code":
            continue
        source = cell.get("source", "")
        if isinstance(source, list) and all(isinstance(s, str) for s in source):
            source = "".join(source)
        if not isinstance(source, str):
            raise NotebookError(f"cell {index} has a source that is not text")
        meta = cell.get("metadata")
        grading = meta.get("nbgrader") if isinstance(meta, dict) else None
        grading = grading if isinstance(grading, dict) else {}
        grade_id = grading.get("grade_id")
        grade_id = grade_id if isinstance(grade_id, str) else None
        tests = bool(grading.get("grade")) and not grading.get("solution")
        answer = EXERCISES.get(grade_id or "")
        tampered = None
        if tests and answer is not None and answer.grade_id == grade_id:
            tampered = (f"the nbgrader metadata of the answer cell {grade_id} was changed to "
                        "grade: true, solution: false (a tests cell, which the grader never "
                        "runs): tampering, so this exercise scores 0; restore the cell from "
                        "the release")
        cells.append(Cell(index=index, source=source, grade_id=grade_id, tests=tests,
                          tampered=tampered))
    return cells


def _assignment_from_cells(path: Path) -> str:
    try:
        cells = read_cells(path)
    except NotebookError as exc:
        raise ValueError(f"cannot tell its assignment: {exc}") from None
    votes = Counter(EXERCISES[c.grade_id].assignment for c in cells
                    if c.grade_id in EXERCISES)
    if not votes:
        raise ValueError("no cell has a grade_id of a known exercise, so its assignment is "
                         "unknown; put it under <student>/<assignment>/ or pass --assignment")
    (best, n), *rest = votes.most_common()
    if rest and rest[0][1] == n:
        raise ValueError(f"its cells belong to several assignments "
                         f"({', '.join(sorted(votes))}); pass --assignment")
    return best


def printable(name: str) -> str:
    """A file name as text: bytes that are not UTF-8 become `\\xNN` escapes.

    >>> printable("caf" + bytes([0xe9]).decode("utf-8", "surrogateescape"))
    'caf\\\\xe9'
    """
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


@dataclass(frozen=True)
class Skipped:
    """A notebook (or folder) that was found but is not graded, and why."""

    path: str  # as text (see `printable`)
    reason: str


def _walk(root: Path, skipped: list[Skipped]) -> list[Path]:
    """The notebooks under `root` (the instructor's path, resolved), never following a
    symlink below it: each one met (to a notebook or a folder, inside the tree or out of
    it) is refused and reported."""
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise ValueError(f"{printable(str(root))}: no such file or folder")
    found = []
    for folder, dirs, files in os.walk(root, onerror=lambda exc: skipped.append(
            Skipped(printable(str(exc.filename)), f"cannot be read ({exc.strerror})"))):
        here = Path(folder)
        for name in sorted(dirs):
            if (here / name).is_symlink():
                skipped.append(Skipped(printable(str(here / name)), "a symlinked folder: "
                                       "refused (never followed out of the tree)"))
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                         and not (here / d).is_symlink())
        for name in sorted(files):
            if not name.endswith(".ipynb"):
                continue
            path = here / name
            if path.is_symlink():
                skipped.append(Skipped(printable(str(path)), "a symlinked notebook: refused "
                                       "(never followed out of the tree)"))
            elif path.is_file():
                found.append(path)
    return found


def discover(paths: Iterable[str | Path], assignment: str | None = None
             ) -> tuple[list[Submission], list[Skipped]]:
    """The submissions under `paths`, sorted by student then assignment, and the notebooks
    found but not graded, each with its reason.

    A notebook in a folder named like an assignment (`<student>/<assignment>/x.ipynb`, as in
    nbgrader's `submitted/` tree) is that student's work for that assignment; any other
    notebook is the work of the student named by its file name, for `assignment` or else for
    the assignment its cells' grade_ids belong to. One notebook's problem never stops the
    others: a notebook whose assignment cannot be told, two notebooks for one student and
    assignment, and symlinks are skipped with a reason. Only misuse raises ValueError (an
    unknown `assignment`, a path that does not exist).
    """
    if assignment is not None and assignment not in ASSIGNMENTS:
        raise ValueError(f"unknown assignment {assignment!r}; known: "
                         f"{', '.join(sorted(ASSIGNMENTS))}")
    skipped: list[Skipped] = []
    by_key: dict[str, list[Submission]] = {}
    for given in paths:
        for nb in _walk(Path(given).resolve(), skipped):
            if nb.parent.name in ASSIGNMENTS and nb.parent.parent != nb.parent:
                sub = Submission(printable(nb.parent.parent.name), nb.parent.name, nb)
            else:
                try:
                    sub = Submission(printable(nb.stem), assignment or
                                     _assignment_from_cells(nb), nb)
                except ValueError as exc:
                    skipped.append(Skipped(printable(str(nb)), str(exc)))
                    continue
            if all(other.path != nb for other in by_key.get(sub.key, [])):
                by_key.setdefault(sub.key, []).append(sub)
    found = []
    for key, subs in by_key.items():
        if len(subs) == 1:
            found.append(subs[0])
        else:
            skipped += [Skipped(printable(str(s.path)), f"two notebooks for {key}: "
                                f"{', '.join(printable(str(o.path)) for o in subs)}; "
                                "keep one") for s in subs]
    return sorted(found, key=lambda s: (s.student, s.assignment)), skipped


def find_submissions(paths: Iterable[str | Path], assignment: str | None = None
                     ) -> list[Submission]:
    """The submissions of `discover`, without what it skipped."""
    return discover(paths, assignment)[0]


def shard(submissions: Sequence[Submission], spec: str) -> list[Submission]:
    """Every N-th submission starting at the K-th, for `spec` = "K/N".

    >>> subs = [Submission(s, "01_experts_and_gating", Path(s)) for s in "abcde"]
    >>> [s.student for s in shard(subs, "2/2")]
    ['b', 'd']
    """
    match = re.fullmatch(r"(\d+)/(\d+)", spec)
    if not match or not 1 <= int(match[1]) <= int(match[2]):
        raise ValueError(f"--shard must be K/N with 1 <= K <= N; got {spec!r}")
    k, n = int(match[1]), int(match[2])
    return [s for i, s in enumerate(submissions) if i % n == k - 1]


SHARD_COUNT_ENV = "MOE_COURSE_SHARD_COUNT"


def _env_int(environ: Mapping[str, str], name: str, minimum: int) -> int:
    value = environ.get(name)
    if value is None or not re.fullmatch(r"\d+", value.strip()) or int(value) < minimum:
        raise ValueError(f"--shard auto: {name} must be an integer >= {minimum}; got {value!r}")
    return int(value)


def resolve_shard(spec: str, count: int | None = None,
                  environ: Mapping[str, str] | None = None) -> str:
    """The "K/N" of `--shard spec`: as given, or, for "auto", from the batch system.

    A Kubernetes Indexed Job sets JOB_COMPLETION_INDEX (0 .. N-1); N comes from `count`
    (`--shard-count`) or MOE_COURSE_SHARD_COUNT. A Slurm array sets SLURM_ARRAY_TASK_ID,
    SLURM_ARRAY_TASK_COUNT and SLURM_ARRAY_TASK_MIN (an array may start at any index, and
    SLURM_ARRAY_TASK_STEP may be above 1).

    >>> resolve_shard("auto", 4, {"JOB_COMPLETION_INDEX": "0"})
    '1/4'
    >>> resolve_shard("auto", environ={"SLURM_ARRAY_TASK_ID": "12", "SLURM_ARRAY_TASK_MIN": "10",
    ...                                "SLURM_ARRAY_TASK_COUNT": "3"})
    '3/3'
    >>> resolve_shard("auto", environ={})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: --shard auto: neither JOB_COMPLETION_INDEX ... nor SLURM_ARRAY_TASK_ID ...
    """
    if spec != "auto":
        if count is not None:
            raise ValueError(f"--shard-count goes with --shard auto; got --shard {spec!r}")
        return spec
    env = os.environ if environ is None else environ
    if "JOB_COMPLETION_INDEX" in env:
        index = _env_int(env, "JOB_COMPLETION_INDEX", 0)
        if count is None:
            if SHARD_COUNT_ENV not in env:
                raise ValueError("--shard auto in a Kubernetes Indexed Job needs the number of "
                                 f"shards: --shard-count N or {SHARD_COUNT_ENV} (the Job's "
                                 "spec.completions)")
            count = _env_int(env, SHARD_COUNT_ENV, 1)
        if count < 1 or index >= count:
            raise ValueError(f"--shard auto: JOB_COMPLETION_INDEX={index} needs a shard count "
                             f"above it; got {count}")
        return f"{index + 1}/{count}"
    if "SLURM_ARRAY_TASK_ID" in env:
        if count is not None:
            raise ValueError("--shard-count is for Kubernetes; a Slurm array says its size in "
                             "SLURM_ARRAY_TASK_COUNT")
        task = _env_int(env, "SLURM_ARRAY_TASK_ID", 0)
        total = _env_int(env, "SLURM_ARRAY_TASK_COUNT", 1)
        low = _env_int(env, "SLURM_ARRAY_TASK_MIN", 0) if "SLURM_ARRAY_TASK_MIN" in env else 0
        step = _env_int(env, "SLURM_ARRAY_TASK_STEP", 1) if "SLURM_ARRAY_TASK_STEP" in env else 1
        if task < low or (task - low) % step or (task - low) // step >= total:
            raise ValueError(f"--shard auto: SLURM_ARRAY_TASK_ID={task} is not one of the "
                             f"{total} tasks {low}, {low + step}, ... of this array; submit it "
                             "as --array=MIN-MAX[:STEP]")
        return f"{(task - low) // step + 1}/{total}"
    raise ValueError("--shard auto: neither JOB_COMPLETION_INDEX (a Kubernetes Indexed Job) nor "
                     "SLURM_ARRAY_TASK_ID (a Slurm job array) is set; give --shard K/N instead")


# ----------------------------------------------------------------------------------------
# The gradebook: grades.csv, grades.json and feedback, from the per-exercise results.


def safe_name(name: str) -> str:
    """A file name for `name`: itself when it is plain (letters, digits, `_.@+-`, no leading
    dot), else a cleaned form with a digest of the original, so that two names never share
    a file (`a b` and `a_b`).

    >>> safe_name("a_b"), safe_name("a b"), safe_name("a?b") != safe_name("a b")
    ('a_b', 'a_b~c8687a08', True)
    """
    clean = re.sub(r"[^\w.@+-]", "_", name, flags=re.ASCII).lstrip(".")
    if clean == name and clean:
        return clean
    digest = hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    return f"{clean[:80] or '_'}~{digest}"


def _one_line(text: Any, limit: int = 600) -> str:
    text = " ".join(str(text).split())
    text = "".join(ch for ch in text if ch.isprintable())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def feedback_markdown(sub: dict[str, Any]) -> str:
    """A learner's feedback page: visible checks with messages, hidden ones pass/fail only."""
    exercises = sub["exercises"]
    score = sum(e["score"] for e in exercises)
    total = sum(e["max_score"] for e in exercises)
    lines = [f"# {sub['assignment']}: feedback for {sub['student']}", "",
             f"**Autograded score: {score:g} / {total:g}**"]
    manual = sub.get("manual", [])
    if manual:
        points = sum(m["max_score"] for m in manual)
        lines.append(f"Written answers ({points:g} points) are graded by hand and are not "
                     "included here.")
    for e in exercises:
        lines += ["", f"## {e['exercise']} ({e['symbol']}): {e['score']:g} / "
                      f"{e['max_score']:g}"]
        if e["status"] == "not graded":
            lines.append("- not graded: the grader failed on this notebook; your instructor "
                         "has been told")
        hidden_n = 0
        for check in e["checks"]:
            mark = "passed" if check["passed"] else "failed"
            if check["hidden"]:
                hidden_n += 1
                lines.append(f"- hidden check {hidden_n}: {mark}")
            elif check["passed"]:
                lines.append(f"- check \"{_one_line(check['name'], 120)}\": passed")
            else:
                lines.append(f"- check \"{_one_line(check['name'], 120)}\": failed: "
                             f"{_one_line(check['message'] or '')}")
    errors = sub.get("cell_errors", [])
    if errors:
        lines += ["", "## Cells that raised or were stopped"]
        lines += [f"- cell {c['cell']}" + (f" ({c['grade_id']})" if c.get("grade_id") else "")
                  + f": {_one_line(c['error'], 300)}" for c in errors]
    return "\n".join(lines) + "\n"


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def csv_text(submissions: Sequence[dict[str, Any]]) -> str:
    """grades.csv: the header and one row per autograded exercise of each submission."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for sub in submissions:
        for e in sub["exercises"]:
            writer.writerow([sub["student"], sub["assignment"], e["exercise"],
                             f"{e['score']:g}", f"{e['max_score']:g}"])
    return buffer.getvalue()


def write_gradebook(out: Path, submissions: Sequence[dict[str, Any]],
                    errors: Sequence[str] = (), extra: dict[str, Any] | None = None,
                    skipped: Sequence[Skipped | dict[str, str]] = ()) -> bool:
    """Write grades.csv, grades.json and the feedback pages; return whether all was graded.

    A feedback page that cannot be written is listed in grades.json (`errors`), never a
    reason to write no gradebook. When `out` itself refuses grades.csv or grades.json, the
    gradebook goes to a fresh folder beside it (or in the temporary folder), named on stderr
    and in the exception-free return: the class always gets its gradebook.
    """
    out = Path(out)
    submissions = sorted(submissions, key=lambda s: (s["student"], s["assignment"]))
    skipped = [s if isinstance(s, dict) else {"path": s.path, "reason": s.reason}
               for s in skipped]
    errors = list(errors)
    for sub in submissions:
        page = out / "feedback" / safe_name(sub["student"]) / f"{safe_name(sub['assignment'])}.md"
        try:
            _write_atomic(page, feedback_markdown(sub))
        except OSError as exc:
            errors.append(f"feedback for {sub['student']}/{sub['assignment']} not written "
                          f"to {page}: {exc.strerror or exc}")
    complete = not errors and not skipped and all(
        e["status"] != "not graded" for s in submissions for e in s["exercises"])
    report = {"complete": complete, "errors": errors, **(extra or {}), "skipped": skipped,
              "submissions": list(submissions)}
    files = {"grades.json": json.dumps(report, indent=1, sort_keys=True) + "\n",
             "grades.csv": csv_text(submissions)}
    try:
        for name, text in files.items():
            _write_atomic(out / name, text)
    except OSError as exc:
        elsewhere = _fallback_folder(out)
        print(f"moe-course grade: {out} refused the gradebook ({exc.strerror or exc}); "
              f"it is in {elsewhere}", file=sys.stderr)
        report["errors"].append(f"{out} refused the gradebook; written to {elsewhere}")
        report["complete"] = False
        files["grades.json"] = json.dumps(report, indent=1, sort_keys=True) + "\n"
        for name, text in files.items():
            _write_atomic(elsewhere / name, text)
        return False
    return complete


def _fallback_folder(out: Path) -> Path:
    for parent in (out.parent, Path(tempfile.gettempdir())):
        try:
            return Path(tempfile.mkdtemp(prefix=f"{out.name}.gradebook-", dir=parent))
        except OSError:
            continue
    raise OSError(f"no folder accepts the gradebook (tried beside {out} and the temporary "
                  "folder)")


def merge(folders: Sequence[str | Path], out: str | Path) -> bool:
    """Merge the grades.json of several shards into one gradebook in `out`."""
    submissions: dict[str, dict[str, Any]] = {}
    errors: list[str] = []
    skipped: dict[str, dict[str, str]] = {}  # every shard lists them all: once each here
    for folder in folders:
        path = Path(folder) / "grades.json"
        try:
            report = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: not a grader output ({exc})") from None
        errors += [f"{folder}: {e}" for e in report.get("errors", [])]
        skipped.update({s["path"]: s for s in report.get("skipped", [])})
        for sub in report.get("submissions", []):
            key = f"{sub['student']}/{sub['assignment']}"
            if key in submissions:
                raise ValueError(f"{key} was graded in two shards; grade each once")
            submissions[key] = sub
    return write_gradebook(Path(out), list(submissions.values()), errors,
                           skipped=list(skipped.values()))


# ----------------------------------------------------------------------------------------
# The command.


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moe-course grade", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", metavar="PATH",
                        help="notebooks, folders of them, or nbgrader's submitted/ folder "
                             "(with --merge: output folders of shards)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="where grades.csv, grades.json and feedback/ go")
    parser.add_argument("--jobs", "-j", type=int, default=1, metavar="N",
                        help="submissions graded in parallel (pytest-xdist workers)")
    limits = parser.add_argument_group("limits of a sandboxed run")
    add_options(limits.add_argument)
    parser.add_argument("--require-isolation", action="store_true",
                        help="refuse to grade (exit 2) where any wall of the sandbox is down "
                             "on this machine; without it the grader says which are down, "
                             "once, and grades")
    parser.add_argument("--assignment", help="the assignment of notebooks whose path does "
                                             "not say it")
    parser.add_argument("--shard", metavar="K/N", help="grade only every N-th submission, "
                                                       "starting at the K-th; `auto`: K and N "
                                                       "from a Kubernetes Indexed Job or a "
                                                       "Slurm array")
    parser.add_argument("--shard-count", type=int, metavar="N",
                        help=f"with --shard auto in a Kubernetes Indexed Job: the number of "
                             f"shards (default: ${SHARD_COUNT_ENV})")
    parser.add_argument("--secret-file", metavar="FILE",
                        help="the course secret that hidden checks' inputs derive from "
                             "(default: $MOE_COURSE_SECRET, $MOE_COURSE_SECRET_FILE, else "
                             f"./{FILE_NAME} if it exists)")
    parser.add_argument("--similarity", action="store_true",
                        help="also write the similarity report (similarity.md, .csv, .json) "
                             "to --out: near-identical answers, for review; scores unchanged")
    parser.add_argument("--merge", action="store_true",
                        help="merge the output folders PATH... of shards into --out")
    return parser


def pytest_args(paths: Sequence[str | Path], out: str | Path, jobs: int, limits: Limits,
                assignment: str | None, config_dir: str, secret_file: str | None = None
                ) -> list[str]:
    """The pytest command line of a grading run (without the leading `pytest`)."""
    ini = Path(config_dir) / "pytest.ini"
    ini.write_text("[pytest]\n")  # an empty config: no addopts, conftests or paths of others
    args = ["-p", "moe_course.grading.autograde.pytest_plugin", "-c", str(ini),
            "--rootdir", config_dir,
            "--noconftest", "-p", "no:cacheprovider", "-q", "--tb=no", "-rN",
            "--grades-out", str(out), *to_options(limits, "grader-")]
    if assignment:
        args += ["--grader-assignment", assignment]
    if secret_file:
        args += ["--grader-secret-file", secret_file]
    if jobs > 1:
        if os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD"):
            args += ["-p", "xdist.plugin"]  # otherwise it is loaded as installed
        args += ["-n", str(jobs), "--dist", "loadscope"]  # scope: student/assignment
    listed = Path(config_dir) / "submissions.json"  # names that are not UTF-8 survive JSON
    listed.write_text(json.dumps([str(Path(path).resolve()) for path in paths]),
                      encoding="utf-8")
    return args + ["--grader-submissions", str(listed)]


def secret_source(secret_file: str | None) -> tuple[str | None, str]:
    """(file to pass to the plugin or None, what the run uses) for `--secret-file`; raises
    ValueError when the secret named cannot be read or is empty."""
    if secret_file is None and not os.environ.get(ENV, "").strip():
        secret_file = os.environ.get(ENV_FILE, "").strip() or (
            FILE_NAME if Path(FILE_NAME).is_file() else None)
    if secret_file is not None:
        try:
            read_secret_file(secret_file)
        except OSError as exc:
            raise ValueError(f"cannot read the course secret {secret_file!r}: "
                             f"{exc.strerror or exc}") from None
        return str(Path(secret_file).resolve()), f"the course secret in {secret_file}"
    if os.environ.get(ENV, "").strip():
        return None, f"the course secret in ${ENV}"
    return None, (f"no course secret (--secret-file, ${ENV}, ${ENV_FILE} or ./{FILE_NAME}): "
                  "the package's default inputs, which learners can compute in advance")


def main(argv: Sequence[str] | None = None) -> int:
    """Run `moe-course grade`; 0 when every submission was graded, 1 when not, 2 on misuse."""
    args = _parser().parse_args(argv)
    if args.merge:
        try:
            complete = merge(args.paths, args.out)
        except ValueError as exc:
            print(f"moe-course grade --merge: {exc}", file=sys.stderr)
            return 2
        print(f"merged {len(args.paths)} gradebooks into {args.out}")
        return 0 if complete else 1
    try:
        if args.jobs < 1:
            raise ValueError(f"--jobs must be >= 1; got {args.jobs}")
        if args.jobs > 1 and importlib.util.find_spec("xdist") is None:
            raise ValueError("--jobs > 1 needs pytest-xdist: pip install pytest-xdist")
        limits = from_options(args)
        secret_file, secret_said = secret_source(args.secret_file)
        subs, skipped = discover(args.paths, args.assignment)
        if args.shard:
            subs = shard(subs, resolve_shard(args.shard, args.shard_count))
        elif args.shard_count is not None:
            raise ValueError("--shard-count goes with --shard auto")
    except ValueError as exc:
        print(f"moe-course grade: {exc}", file=sys.stderr)
        return 2
    for item in skipped:
        print(f"moe-course grade: skipped {item.path}: {item.reason}", file=sys.stderr)
    if not subs and not skipped:
        print("moe-course grade: no submissions found", file=sys.stderr)
        return 2
    import pytest

    from .sandbox import isolation

    down = isolation().down
    if down:  # said once, up front
        print("moe-course grade: walls down on this machine: " + "; ".join(down),
              file=sys.stderr)
        if args.require_isolation:
            print("moe-course grade: --require-isolation: not grading", file=sys.stderr)
            return 2
    Path(args.out).mkdir(parents=True, exist_ok=True)
    print(f"moe-course grade: hidden checks: {secret_said}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="moe-grade-config-") as config_dir:
        extra = ["--require-isolation"] if args.require_isolation else []
        listed = Path(config_dir) / "skipped.json"
        listed.write_text(json.dumps([{"path": s.path, "reason": s.reason} for s in skipped]),
                          encoding="utf-8")
        extra += ["--grader-skipped", str(listed)]
        if subs:
            code = pytest.main(pytest_args([s.path for s in subs], args.out, min(
                args.jobs, len(subs)), limits, args.assignment, config_dir, secret_file)
                + extra)
        else:  # nothing to grade, but the skipped ones still get their gradebook
            code = 0
            write_gradebook(Path(args.out), [], skipped=skipped)
    try:
        report = json.loads((Path(args.out) / "grades.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        print(f"moe-course grade: pytest ended with status {int(code)} and wrote no "
              "gradebook", file=sys.stderr)
        return 1
    graded = report["submissions"]
    score = sum(e["score"] for s in graded for e in s["exercises"])
    total = sum(e["max_score"] for s in graded for e in s["exercises"])
    print(f"graded {len(graded)} submissions: {score:g} / {total:g} autograded points; "
          f"wrote {Path(args.out) / 'grades.csv'}")
    for error in report.get("errors", []):
        print(f"not graded: {error}", file=sys.stderr)
    if args.similarity:
        from . import similarity

        rows = similarity.run(args.paths, args.out, assignment=args.assignment)
        print(f"similarity: {len(rows)} flagged; wrote {Path(args.out) / 'similarity.md'}")
    return 0 if report["complete"] else 1
