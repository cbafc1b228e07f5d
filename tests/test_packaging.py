"""Packaging and setup: one source of dependencies, the README's commands, CI, lint."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import yaml

ROOT = Path(__file__).resolve().parent.parent


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_environment_yml_matches_pyproject() -> None:
    """environment.yml installs exactly the package's and the test extra's requirements."""
    project = _pyproject()["project"]
    wanted = {_name(r): r.replace(" ", "") for r in
              project["dependencies"] + project["optional-dependencies"]["test"]}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert "-e ." in pip_section, "environment.yml must install the course package itself"
    listed = {_name(r): r.replace(" ", "") for r in pip_section if not r.startswith("-e")}
    # torch is pinned to the CPU build in both the README command and environment.yml.
    assert listed.pop("torch") == "torch==2.13.0"
    wanted.pop("torch")
    assert listed == wanted
    python = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python"))
    minimum = project["requires-python"].removeprefix(">=")
    assert tuple(map(int, python.split("=")[1].split("."))) >= tuple(map(int, minimum.split(".")))


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```(?:bash|sh)\n(python3 -m venv .venv[^\n]*)\n```", text)


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one() -> None:
    commands = _readme_commands()
    assert len(commands) == 2, commands
    lab, test = commands
    assert "torch==2.13.0" in lab and "moe-course lab" in lab
    assert "torch==2.13.0" in test and "moe-course test" in test
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test in ci, ".ci/run must call the README's test command verbatim"


def test_nbgrader_config_points_at_solutions_and_notebooks() -> None:
    text = (ROOT / "nbgrader_config.py").read_text()
    assert 'c.CourseDirectory.source_directory = "solutions"' in text
    assert 'c.CourseDirectory.release_directory = "notebooks"' in text
    assert "c.Execute.timeout" in text


def test_console_script_is_declared() -> None:
    assert _pyproject()["project"]["scripts"]["moe-course"] == "moe_course.cli:main"


def test_ruff_lint_is_clean() -> None:
    """The test command lints: ruff, configured in pyproject.toml."""
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_lab_and_test_pass_their_options_on(monkeypatch) -> None:
    """`moe-course lab --port 9999` reaches jupyter lab; `moe-course test -k x` reaches pytest."""
    from moe_course import cli

    calls: list[list[str]] = []
    monkeypatch.setattr(cli.subprocess, "call", lambda cmd, **kw: calls.append(cmd) or 0)
    monkeypatch.setattr(cli, "_ensure_chromium", lambda: None)
    monkeypatch.setattr(cli, "_ensure_npm", lambda: None)
    assert cli.main(["lab", "--no-browser", "--port=9999"]) == 0
    assert calls[-1][-2:] == ["--no-browser", "--port=9999"] or "--port=9999" in calls[-1]
    assert str(ROOT / "notebooks") in calls[-1]
    assert cli.main(["test", "-k", "packaging"]) == 0
    assert calls[-1][-2:] == ["-k", "packaging"] and "-n" in calls[-1]


@pytest.mark.xdist_group("grouping-probe")
def test_xdist_groups_reach_the_scheduler(request: pytest.FixtureRequest) -> None:
    """The suite builds each expensive fixture (the nbgrader courses, the adversarial
    tables) once, on the one worker its `xdist_group` sends all its tests to. pytest-xdist
    tells the scheduler a test's group through a `@group` suffix on its node id; with pytest
    9.2 the suffix is silently lost (pytest-xdist#1386), the groups are spread over every
    worker, and each worker builds every fixture again. pyproject.toml pins pytest below
    9.2 for this; under `--dist loadgroup` this test fails if grouping is lost again."""
    if getattr(request.config.option, "loadgroup", False):  # an xdist worker, loadgroup
        assert request.node.nodeid.endswith("@grouping-probe"), (
            f"{request.node.nodeid!r} lost its xdist group: pytest {pytest.__version__} and "
            "this pytest-xdist do not group tests; see the pin in pyproject.toml")
