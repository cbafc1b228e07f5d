"""Hidden inputs derived from a course secret (`moe_course.grading.secret`).

- The same secret gives the same inputs; another secret other inputs, for every exercise;
  no secret gives the package's defaults.
- Any secret gives tie-free inputs: every correct implementation of `test_checks*.py`
  (references rewritten and alternatives that break ties differently) passes the hidden
  checks under many secrets.
- A lookup-table attack (the reference's outputs on the default hidden inputs, computed in a
  plain cell and returned from a table) scores full without a secret and 0 with one, in the
  in-kernel check, in the pytest grader and under nbgrader autograde (slow), and the two
  graders give the same points for the same secret.
"""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import torch
from test_checks_common import NOTEBOOKS

from moe_course.grading import EXERCISES, check
from moe_course.grading.autograde.grade import secret_source
from moe_course.grading.autograde.pytest_plugin import probe_inputs, use_secret
from moe_course.grading.secret import ENV, ENV_FILE, hidden_inputs, probe_salt, read_secret_file

ROOT = Path(__file__).resolve().parent.parent
CORRECT = {gid: impls for module in NOTEBOOKS.values() for gid, impls in module.CORRECT.items()}
GRADED = [gid for gid, ex in EXERCISES.items() if ex.kind != "written"]


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


@pytest.fixture
def no_secret(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.delenv(ENV_FILE, raising=False)
    return monkeypatch


@pytest.mark.parametrize("grade_id", GRADED)
def test_the_same_secret_gives_the_same_inputs_and_another_other_inputs(grade_id: str) -> None:
    exercise = EXERCISES[grade_id]
    changed = False
    for probe in exercise.hidden:
        one = hidden_inputs(grade_id, probe, b"first secret")
        assert _same(one, hidden_inputs(grade_id, probe, b"first secret"))
        assert _same(hidden_inputs(grade_id, probe, None), probe.inputs())
        changed |= not _same(one, hidden_inputs(grade_id, probe, b"second secret"))
    assert changed, f"{grade_id}: no hidden probe depends on the secret"


def test_salts_separate_exercises_and_probes() -> None:
    assert probe_salt(b"s", "ex02_moe_flops", "a") != probe_salt(b"s", "ex02_moe_flop", "sa")
    assert probe_salt(b"s", "e", "p") != probe_salt(b"t", "e", "p")


SECRETS = [f"secret number {i}".encode() for i in range(12)]


@pytest.mark.parametrize("grade_id", sorted(CORRECT))
def test_any_secret_gives_inputs_every_correct_implementation_passes(
        grade_id: str, no_secret: pytest.MonkeyPatch) -> None:
    """Tie-free for any secret: implementations that break ties differently all pass."""
    for secret in SECRETS:
        no_secret.setenv(ENV, secret.decode())
        for impl in CORRECT[grade_id]:
            with contextlib.redirect_stdout(io.StringIO()):
                check(grade_id, impl, hidden=True)


def test_the_secret_comes_from_the_environment_or_a_file(
        tmp_path: Path, no_secret: pytest.MonkeyPatch) -> None:
    from moe_course.grading.secret import course_secret

    assert course_secret() is None
    path = tmp_path / "s"
    path.write_text("  from a file\n")
    no_secret.setenv(ENV_FILE, str(path))
    assert course_secret() == b"from a file" == read_secret_file(path)
    no_secret.setenv(ENV, "from the environment")
    assert course_secret() == b"from the environment"
    path.write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        read_secret_file(path)


def test_grade_finds_the_secret_file_in_the_course_directory(
        tmp_path: Path, no_secret: pytest.MonkeyPatch) -> None:
    no_secret.chdir(tmp_path)
    assert secret_source(None)[0] is None and "no course secret" in secret_source(None)[1]
    (tmp_path / ".moe_course_secret").write_text("abc\n")
    found, said = secret_source(None)
    assert found == str(tmp_path / ".moe_course_secret") and "course secret" in said
    with pytest.raises(ValueError, match="cannot read"):
        secret_source(str(tmp_path / "missing"))


def test_the_pytest_graders_inputs_follow_its_secret() -> None:
    exercise = EXERCISES["ex02_noisy_logits"]
    probe = exercise.hidden[0]
    try:
        use_secret(b"k")
        assert _same(probe_inputs(exercise, probe), hidden_inputs(exercise.grade_id, probe, b"k"))
        assert _same(probe_inputs(exercise, exercise.visible[0]), exercise.visible[0].inputs())
    finally:
        use_secret(None)
    assert _same(probe_inputs(exercise, probe), probe.inputs())


# -- the lookup-table attack -----------------------------------------------------------------

TABLE_CELLS = {
    "ex02_noisy_logits": """
import torch
import moe_course.gating as _g
from moe_course.grading import EXERCISES as _EX
_table = []
for _p in _EX["ex02_noisy_logits"].visible + _EX["ex02_noisy_logits"].hidden:
    _i = _p.inputs()
    _table.append((_i["x"], _g.noisy_logits(_i["x"], _i["w_gate"], _i["w_noise"], _i["noise"]),
                   _g.noisy_logits(_i["x"], _i["w_gate"], _i["w_noise"])))
def noisy_logits(x, w_gate, w_noise, noise=None):
    for _x, _noisy, _clean in _table:
        if _x.shape == x.shape and torch.equal(_x, x):
            return (_noisy if noise is not None else _clean).clone()
    return x @ w_noise  # anything: the table has no answer
""",
    "ex02_moe_flops": """
import moe_course.routing as _r
from moe_course.grading import EXERCISES as _EX
_flops_table = {}
for _p in _EX["ex02_moe_flops"].visible + _EX["ex02_moe_flops"].hidden:
    for _case in _p.inputs()["cases"]:
        _flops_table[tuple(_case)] = _r.moe_flops(*_case)
def moe_flops(n_tokens, d_model, d_hidden, n_experts, k):
    return _flops_table.get((n_tokens, d_model, d_hidden, n_experts, k), 0)
""",
}

TABLE_SCRIPT = """
import contextlib, io, json, sys
import torch
from moe_course.grading import check
ns = {}
for source in json.loads(sys.argv[1]).values():
    exec(source, ns)
out = {}
for grade_id in ("ex02_noisy_logits", "ex02_moe_flops"):
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            check(grade_id, ns[grade_id.split("_", 1)[1]], hidden=True)
        out[grade_id] = "passed"
    except AssertionError as exc:
        out[grade_id] = str(exc)
print(json.dumps(out))
"""


def _in_kernel(env: dict[str, str]) -> dict[str, str]:
    import json

    done = subprocess.run([sys.executable, "-c", TABLE_SCRIPT, json.dumps(TABLE_CELLS)],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_lookup_table_passes_without_a_secret_and_fails_with_one() -> None:
    import os

    env = {k: v for k, v in os.environ.items() if k not in (ENV, ENV_FILE)}
    assert set(_in_kernel(env).values()) == {"passed"}  # why the secret is needed
    with_secret = _in_kernel({**env, ENV: "the instructor's secret"})
    assert all(message != "passed" for message in with_secret.values()), with_secret


def _table_submission(root: Path, student: str) -> Path:
    from test_grader import submission

    assignment = "02_top_k_routing"
    nb = submission(assignment, edits=TABLE_CELLS)
    folder = root / "submitted" / student / assignment
    folder.mkdir(parents=True)
    name = sorted((ROOT / "notebooks" / assignment).glob("*.ipynb"))[0].name
    nbformat.write(nb, folder / name)
    return folder / name


@pytest.mark.slow
def test_a_lookup_table_scores_zero_with_a_secret_in_both_graders(tmp_path: Path) -> None:
    """Same secret, same points: the pytest grader and nbgrader autograde agree on the table
    attack (0 on both tabled exercises) and on the honest solution (full)."""
    from test_grader import nbgrader_course, nbgrader_scores, read_grades, run_grade, submission

    root, env = nbgrader_course(tmp_path, ["02_top_k_routing"])
    assignment = "02_top_k_routing"
    _table_submission(root, "tabler")
    honest = root / "submitted" / "honest" / assignment
    honest.mkdir(parents=True)
    name = sorted((ROOT / "notebooks" / assignment).glob("*.ipynb"))[0].name
    nbformat.write(submission(assignment), honest / name)

    status, _, log = run_grade([root / "submitted"], tmp_path / "plain")
    assert status == 0 and "no course secret" in log, log
    plain = read_grades(tmp_path / "plain")
    assert all(plain[("tabler", assignment, g)][0] == EXERCISES[g].points for g in TABLE_CELLS)

    secret = root / ".moe_course_secret"
    secret.write_text("a secret only the instructor holds\n")
    status, _, log = run_grade([root / "submitted"], tmp_path / "secret",
                               "--secret-file", str(secret))
    assert status == 0 and "the course secret in" in log, log
    ours = read_grades(tmp_path / "secret")
    for grade_id in TABLE_CELLS:
        assert ours[("tabler", assignment, grade_id)][0] == 0

    # nbgrader finds the secret beside its config; one process autogrades both students
    done = subprocess.run([sys.executable, "-m", "nbgrader", "autograde", assignment,
                           "--force"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    for student in ("tabler", "honest"):
        theirs = nbgrader_scores(root, assignment, student)
        assert theirs is not None
        for grade_id, score in theirs.items():
            assert score == ours[(student, assignment, grade_id)][0], (student, grade_id)
