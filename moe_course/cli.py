"""The `moe-course` command: open the course, release it, test it.

    moe-course lab              open the student notebooks in JupyterLab
    moe-course release [--check]  regenerate notebooks/ from solutions/ (or verify it)
    moe-course test [PYTEST ARGS]  the whole test suite (lint, doctests, notebooks, browser)
    moe-course grade PATH... --out DIR  grade submissions with the pytest grader (--help)
    moe-course similarity PATH... --out DIR  report near-identical answers (--help)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from .release import course_root, release, release_differences

CHROMIUM = "/usr/bin/chromium"


# JupyterLab settings the course overrides, in its own settings folder (never the learner's
# global configuration): no "get notified about Jupyter news?" prompt and no update check,
# which would both reach for the network, on a course meant to run offline.
LAB_OVERRIDES = {
    "@jupyterlab/apputils-extension:notification": {"fetchNews": "false",
                                                    "checkForUpdates": False},
}


def lab_settings_dir() -> Path:
    """The course's own JupyterLab application settings folder, written afresh.

    It starts as a copy of the environment's default one (`<app dir>/settings`, where a
    distribution may keep its `page_config.json` or `overrides.json`), with the course's
    `LAB_OVERRIDES` merged into `overrides.json`. `moe-course lab` points JupyterLab at it
    with `--LabApp.app_settings_dir`, so the learner's own settings stay as they are.
    """
    from jupyterlab.commands import get_app_dir

    target = course_root() / ".jupyter" / "lab-settings"
    if target.exists():
        shutil.rmtree(target)
    default = Path(get_app_dir()) / "settings"
    if default.is_dir():
        shutil.copytree(default, target)
    target.mkdir(parents=True, exist_ok=True)
    path = target / "overrides.json"
    overrides = json.loads(path.read_text()) if path.is_file() else {}
    for plugin, values in LAB_OVERRIDES.items():
        overrides.setdefault(plugin, {}).update(values)
    path.write_text(json.dumps(overrides, indent=2) + "\n")
    return target


def _lab(args: argparse.Namespace) -> int:
    root = course_root()
    cmd = [sys.executable, "-m", "jupyterlab", str(root / args.folder),
           f"--LabApp.app_settings_dir={lab_settings_dir()}"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")  # Jupyter refuses root without it (containers, CI)
    return subprocess.call(cmd + args.extra)


def _release(args: argparse.Namespace) -> int:
    if args.check:
        diffs = release_differences()
        for line in diffs:
            print(line)
        print("notebooks/ is up to date" if not diffs else
              f"{len(diffs)} difference(s): run `moe-course release`")
        return 1 if diffs else 0
    for path in release():
        print(path.relative_to(course_root()))
    return 0


def _ensure_chromium() -> None:
    """The browser tests drive Debian's Chromium; install it with apt when we can."""
    if os.path.exists(CHROMIUM):
        return
    apt = shutil.which("apt-get")
    if apt and hasattr(os, "geteuid") and os.geteuid() == 0:
        print("Chromium is missing: installing it with apt-get (for the browser tests)")
        subprocess.run([apt, "update", "-qq"], check=False)
        subprocess.run([apt, "install", "-y", "-qq", "chromium"], check=True)
    else:
        print(f"warning: {CHROMIUM} is missing and cannot be installed automatically; the "
              "browser tests will fail until you run `sudo apt-get install -y chromium`",
              file=sys.stderr)


def _ensure_npm() -> None:
    """tests/test_jupyterhub.py installs configurable-http-proxy with npm: get node and npm."""
    if shutil.which("npm"):
        return
    apt = shutil.which("apt-get")
    if apt and hasattr(os, "geteuid") and os.geteuid() == 0:
        print("npm is missing: installing nodejs and npm with apt-get (for the JupyterHub test)")
        subprocess.run([apt, "update", "-qq"], check=False)
        subprocess.run([apt, "install", "-y", "-qq", "nodejs", "npm"], check=True)
    else:
        print("warning: npm is missing; tests/test_jupyterhub.py will be skipped until you "
              "run `sudo apt-get install -y nodejs npm`", file=sys.stderr)


def _test(args: argparse.Namespace) -> int:
    _ensure_chromium()
    _ensure_npm()
    root = course_root()
    extra = list(args.pytest_args)
    if not any(a == "-n" or a.startswith(("-n", "--numprocesses")) for a in extra):
        extra = ["-n", "auto", *extra]  # one worker per core
    return subprocess.call([sys.executable, "-m", "pytest", *extra], cwd=root)


def _grade(argv: list[str]) -> int:
    from .grading.autograde.grade import main as grade_main

    return grade_main(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["grade"]:  # it parses its own options, --help included
        return _grade(argv[1:])
    if argv[:1] == ["similarity"]:  # so does this one
        from .grading.autograde.similarity import main as similarity_main

        return similarity_main(argv[1:])
    parser = argparse.ArgumentParser(prog="moe-course", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    lab = sub.add_parser("lab", help="open the course in JupyterLab")
    lab.add_argument("--folder", default="notebooks", help="notebooks (default) or solutions")
    lab.set_defaults(func=_lab)
    rel = sub.add_parser("release", help="regenerate notebooks/ from solutions/ with nbgrader")
    rel.add_argument("--check", action="store_true",
                     help="only verify that notebooks/ equals a fresh release")
    rel.set_defaults(func=_release)
    test = sub.add_parser("test", help="run the whole test suite")
    test.add_argument("pytest_args", nargs=argparse.REMAINDER, help="passed on to pytest")
    test.set_defaults(func=_test)
    sub.add_parser("grade", help="grade submitted notebooks with the pytest grader")
    sub.add_parser("similarity", help="report near-identical answers, for the instructor")
    args, unknown = parser.parse_known_args(argv)
    if args.command == "lab":
        args.extra = unknown  # everything else goes to jupyter lab (--port, --no-browser, ...)
    elif unknown and args.command != "test":
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    elif unknown:
        args.pytest_args = [*unknown, *args.pytest_args]
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
