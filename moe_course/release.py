"""The student release: `notebooks/` regenerated from `solutions/` by nbgrader.

nbgrader's own `generate_assignment` strips solutions and hidden tests, locks the test
cells, records checksums and clears outputs. This module only runs it (with a throwaway
gradebook, so releasing never touches an instructor's `gradebook.db`) and then drops the
jupytext pairing metadata, which belongs to the source notebooks and not to learners'
copies. The result is byte-for-byte reproducible; `moe-course release --check` proves that
the committed release is what the sources generate.
"""

from __future__ import annotations

import filecmp
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import nbformat

ASSIGNMENT = re.compile(r"^\d\d_[a-z0-9_]+$")


def course_root() -> Path:
    """The course directory: the folder holding `nbgrader_config.py` (the repository)."""
    here = Path(__file__).resolve().parent.parent
    if not (here / "nbgrader_config.py").is_file():
        raise FileNotFoundError(f"no nbgrader_config.py in {here}: moe_course must be installed "
                                "from a checkout of the course (pip install -e .)")
    return here


def assignments(root: Path) -> list[str]:
    """Assignment ids, the folders of `solutions/` named like `01_experts_and_gating`."""
    return sorted(p.name for p in (root / "solutions").iterdir()
                  if p.is_dir() and ASSIGNMENT.match(p.name))


def notebook_files(folder: Path) -> list[Path]:
    """The notebooks under `folder`, sorted, without those in hidden folders: JupyterLab
    writes `.ipynb_checkpoints/<name>-checkpoint.ipynb` the moment a notebook is saved, and
    such a copy is neither part of the course nor a submission."""
    return sorted(p for p in folder.rglob("*.ipynb") if p.is_file() and not any(
        part.startswith(".") for part in p.relative_to(folder).parts))


def _env(tmp: str) -> dict[str, str]:
    # nbgrader runs `alembic` from PATH: put this interpreter's scripts folder first, and
    # keep a learner's or instructor's own Jupyter configuration out of the release.
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
            "JUPYTER_CONFIG_DIR": tmp}


# Every assignment in one nbgrader process (its converters take a glob for the assignment
# id): one start-up of nbgrader instead of one per assignment, the same files.
ALL = "[0-9][0-9]_*"


def _generate(root: Path, release_dir: Path, names: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for name in [ALL] if len(names) > 1 else names:
            cmd = [sys.executable, "-m", "nbgrader", "generate_assignment", name, "--force",
                   f"--CourseDirectory.root={root}",
                   f"--CourseDirectory.release_directory={release_dir}",
                   f"--CourseDirectory.db_url=sqlite:///{tmp}/gradebook.db",
                   "--log-level=WARN"]
            done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, env=_env(tmp))
            if done.returncode != 0:
                raise RuntimeError(f"nbgrader generate_assignment {name} failed:\n"
                                   f"{done.stdout}{done.stderr}")
    for extra in sorted(p for p in release_dir.iterdir() if p.name not in names):
        shutil.rmtree(extra)  # the glob's folders that are not the assignments asked for
    missing = [name for name in names if not (release_dir / name).is_dir()]
    if missing:
        raise RuntimeError(f"nbgrader generate_assignment made no release of {missing}")
    for path in notebook_files(release_dir):
        nb = nbformat.read(path, as_version=4)
        nb.metadata.pop("jupytext", None)
        nbformat.write(nb, path)


def release(root: Path | None = None, names: list[str] | None = None) -> list[Path]:
    """Regenerate `notebooks/<assignment>/` from `solutions/<assignment>/`; return the files."""
    root = root or course_root()
    names = names or assignments(root)
    target = root / "notebooks"
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "release"
        _generate(root, staged, names)
        for name in names:
            shutil.rmtree(target / name, ignore_errors=True)
            shutil.copytree(staged / name, target / name)
    return sorted(p for name in names for p in (target / name).rglob("*") if p.is_file())


def _committed(root: Path) -> set[Path]:
    """The release files under version control (a learner's run of a notebook in place
    leaves modules and caches beside it, which are not part of the release)."""
    folder = root / "notebooks"
    listed = subprocess.run(["git", "ls-files", "-z", "--", "notebooks"], cwd=root,
                            capture_output=True, text=True)
    if listed.returncode == 0:
        return {Path(p).relative_to("notebooks") for p in listed.stdout.split("\0") if p}
    return {p.relative_to(folder) for p in folder.rglob("*") if p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(folder).parts)}


def release_differences(root: Path | None = None) -> list[str]:
    """Files where the committed `notebooks/` differs from a fresh regeneration."""
    root = root or course_root()
    names = assignments(root)
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "release"
        _generate(root, staged, names)
        fresh = {p.relative_to(staged) for p in staged.rglob("*") if p.is_file()}
        committed = _committed(root)
        diffs = [f"missing from notebooks/: {p}" for p in sorted(fresh - committed)]
        diffs += [f"not generated from solutions/: {p}" for p in sorted(committed - fresh)]
        diffs += [f"differs from a fresh release: {p}" for p in sorted(fresh & committed)
                  if not filecmp.cmp(staged / p, root / "notebooks" / p, shallow=False)]
    return diffs
