"""`moe-course grade --shard auto`: the shipped Indexed Job and sbatch examples, run locally.

Two submissions of notebook 01 (one solved, one with a wrong `softmax_gate`) in an nbgrader
`submitted/` tree. The command of docs/examples/grade-indexed-job.yaml runs once per index
with JOB_COMPLETION_INDEX set, as Kubernetes would; docs/examples/grade.sbatch runs once per
array task with Slurm's variables set (an array starting at 1). Each set of shards is merged
with `--merge` and must equal a one-process run: grades.csv and every feedback page.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from nbgrader_course import graded_only
from test_grader import jupyter_env, read_grades, run_grade, submission, write_submission

from moe_course.grading.autograde.grade import resolve_shard

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "docs" / "examples"
ASSIGNMENT = "01_experts_and_gating"
WRONG = ('def softmax_gate(x, w_gate):\n'
         '    return torch.softmax(x @ w_gate, dim=0)\n')


def test_shard_auto_reads_the_batch_system_or_says_what_is_missing() -> None:
    assert resolve_shard("2/5") == "2/5"
    assert resolve_shard("auto", 3, {"JOB_COMPLETION_INDEX": "2"}) == "3/3"
    assert resolve_shard("auto", None, {"JOB_COMPLETION_INDEX": "0",
                                        "MOE_COURSE_SHARD_COUNT": "2"}) == "1/2"
    slurm = {"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_MIN": "0",
             "SLURM_ARRAY_TASK_COUNT": "4"}
    assert resolve_shard("auto", None, slurm) == "1/4"
    assert resolve_shard("auto", None, {**slurm, "SLURM_ARRAY_TASK_ID": "3"}) == "4/4"
    stepped = {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "1",
               "SLURM_ARRAY_TASK_STEP": "3", "SLURM_ARRAY_TASK_COUNT": "3"}
    assert resolve_shard("auto", None, stepped) == "3/3"
    bad = [
        ({}, None, "neither JOB_COMPLETION_INDEX"),
        ({"JOB_COMPLETION_INDEX": "0"}, None, "--shard-count N or MOE_COURSE_SHARD_COUNT"),
        ({"JOB_COMPLETION_INDEX": "4"}, 4, "JOB_COMPLETION_INDEX=4 needs a shard count"),
        ({"JOB_COMPLETION_INDEX": "x"}, 4, "JOB_COMPLETION_INDEX must be an integer"),
        ({**slurm, "SLURM_ARRAY_TASK_COUNT": "0"}, None, "SLURM_ARRAY_TASK_COUNT must be"),
        ({**slurm, "SLURM_ARRAY_TASK_ID": "4"}, None, "not one of the 4 tasks"),
        (slurm, 4, "--shard-count is for Kubernetes"),
    ]
    for environ, count, message in bad:
        with pytest.raises(ValueError, match=message.replace("(", r"\(")):
            resolve_shard("auto", count, environ)
    with pytest.raises(ValueError, match="--shard-count goes with --shard auto"):
        resolve_shard("1/2", 2, {})


def _example_command(name: str) -> str:
    if name == "yaml":
        job = yaml.safe_load((EXAMPLES / "grade-indexed-job.yaml").read_text())
        spec = job["spec"]
        container = spec["template"]["spec"]["containers"][0]
        count = {e["name"]: e["value"] for e in container["env"]}["MOE_COURSE_SHARD_COUNT"]
        assert spec["completionMode"] == "Indexed" and int(count) == spec["completions"]
        (command,) = container["args"]
        assert "--shard auto" in command
        return command
    script = (EXAMPLES / "grade.sbatch").read_text()
    assert "#SBATCH --array=" in script and "--shard auto" in script
    return script


@pytest.mark.slow
def test_shard_auto_examples_merge_into_the_one_process_gradebook(tmp_path: Path) -> None:
    submitted = tmp_path / "submitted"
    # the answer and tests cells only (`graded_only`): sharding does not depend on the demos
    write_submission(submitted, "alice", ASSIGNMENT, graded_only(submission(ASSIGNMENT)))
    write_submission(submitted, "bob", ASSIGNMENT, graded_only(
        submission(ASSIGNMENT, edits={"ex01_softmax_gate": WRONG})))
    code, _, log = run_grade([submitted], tmp_path / "one")
    assert code == 0, log

    env = jupyter_env(tmp_path / "env")
    env["OMP_NUM_THREADS"] = "1"
    bin_dir = str(Path(sys.executable).parent)
    assert os.path.exists(os.path.join(bin_dir, "moe-course")), "moe-course is not installed"
    # the Indexed Job's container command, with its volumes mapped to local folders; N = 2
    command = (_example_command("yaml").replace("/course/submitted", str(submitted))
               .replace("/grades", str(tmp_path / "k8s")))
    k8s = [subprocess.Popen(["sh", "-c", command], cwd=tmp_path, env={
        **env, "JOB_COMPLETION_INDEX": str(i), "MOE_COURSE_SHARD_COUNT": "2"},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    # the sbatch script, as array tasks 1 and 2 of --array=1-2
    _example_command("sbatch")
    slurm = [subprocess.Popen(
        ["bash", str(EXAMPLES / "grade.sbatch"), str(submitted), str(tmp_path / "slurm")],
        cwd=tmp_path, env={**env, "SLURM_ARRAY_TASK_ID": str(i), "SLURM_ARRAY_TASK_MIN": "1",
                           "SLURM_ARRAY_TASK_MAX": "2", "SLURM_ARRAY_TASK_COUNT": "2",
                           "SLURM_CPUS_PER_TASK": "1"},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in (1, 2)]
    for proc in k8s + slurm:
        out, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, out
        assert "graded 1 submissions" in out, out  # each shard took one of the two

    one = read_grades(tmp_path / "one")
    assert one[("alice", ASSIGNMENT, "ex01_softmax_gate")] == (1.0, 1.0)
    assert one[("bob", ASSIGNMENT, "ex01_softmax_gate")] == (0.0, 1.0)
    for system in ("k8s", "slurm"):
        shards = sorted((tmp_path / system).glob("shard-*"))
        assert [p.name for p in shards] == ["shard-1", "shard-2"]
        merged = tmp_path / f"{system}-all"
        done = subprocess.run([sys.executable, "-m", "moe_course.cli", "grade", "--merge",
                               *map(str, shards), "--out", str(merged)],
                              capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        assert read_grades(merged) == one
        pages = sorted(p.relative_to(merged) for p in (merged / "feedback").rglob("*.md"))
        assert pages == sorted(p.relative_to(tmp_path / "one")
                               for p in (tmp_path / "one" / "feedback").rglob("*.md"))
        for page in pages:
            assert (merged / page).read_text() == (tmp_path / "one" / page).read_text()
