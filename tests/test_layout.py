"""The package reads top-down: no import runs back up.

Core concepts first (`gating`, `capacity`, `losses`, ...), then the layers built from them,
then the widgets and the checks that use them, then the graders and the command line. Read
from the source with `ast` (every import, also those inside functions), so the test sees
what a reader sees. Inside `grading/` (DESIGN.md, "Grading package layout"): a check module
never imports another notebook's checks; the core (`registry`, `runner`, `guard`, `probe`,
`recording`, `inputs`) imports a check module only in `registry`, and never the autograde
half (`sandbox`, its worker, the pytest plugin, `grade`, or whatever lives in
`grading/autograde/`); the autograde half never imports a check module directly.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

import moe_course

ROOT = pathlib.Path(moe_course.__file__).resolve().parent

# The package in reading order, top-level module or subpackage; each imports only what
# stands above it (a subpackage also from itself: the rules for grading/ are below).
TOP_DOWN = [
    # core concepts, one per module
    "validation", "gating", "routing", "capacity", "expert_choice", "experts", "losses", "data",
    # the layers and models built from them
    "routers", "fused", "layers", "modern", "serving", "parallel", "parallel_workers",
    "parallel_torchrun", "transformer", "train", "experiments",
    # what uses them: the widgets, the checks (and graders), the release and the CLI
    "widgets", "grading", "release", "cli",
]
CHECKS = "grading.checks"
CORE = {"grading", "grading.registry", "grading.runner", "grading.guard", "grading.probe",
        "grading.recording", "grading.inputs", "grading.secret"}
AUTOGRADE_NAMES = {"grade", "pytest_grader", "sandbox", "sandbox_worker"}


def _name(path: pathlib.Path) -> str:
    """`moe_course/grading/registry.py` -> `grading.registry`; the package itself -> ``."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _imports(name: str) -> set[str]:
    """The package's modules that module `name` imports, by their names here."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".") if package else []
            base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
            stem = ".".join(base + ([node.module] if node.module else []))
            targets = ([stem] if node.module else []) + [f"{stem}.{a.name}".strip(".")
                                                         for a in node.names]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("moe_course"):
            stem = node.module.removeprefix("moe_course").strip(".")
            targets = [stem] + [f"{stem}.{a.name}".strip(".") for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name.removeprefix("moe_course").strip(".") for a in node.names
                       if a.name.startswith("moe_course")]
        found.update(t for t in targets if t in MODULES and t != name)
    return found


def _top(name: str) -> str:
    return name.split(".")[0]


def _is_autograde(name: str) -> bool:
    parts = name.split(".")
    return parts[0] == "grading" and len(parts) > 1 and (
        parts[1] == "autograde" or parts[1] in AUTOGRADE_NAMES)


def _is_check(name: str) -> bool:
    return name.startswith(CHECKS + ".")


def test_every_module_has_its_place_in_the_reading_order():
    assert {_top(n) for n in MODULES if n} == set(TOP_DOWN)


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n))
def test_no_import_runs_back_up(name):
    rank = TOP_DOWN.index(_top(name))
    for target in _imports(name):
        there = TOP_DOWN.index(_top(target))
        assert there <= rank, (
            f"{name} imports {target}, which stands below it in the reading order")


def test_the_package_face_imports_no_tool():
    assert not {_top(t) for t in _imports("")} & {"widgets", "grading", "release", "cli"}


def test_a_check_module_never_imports_another_notebooks_checks_or_the_graders():
    checks = [n for n in MODULES if _is_check(n)]
    assert len([n for n in checks if n.rpartition(".")[2].startswith("nb")]) == 8
    for name in checks:
        for target in _imports(name):
            assert not (_is_check(target) and target != f"{CHECKS}.common"), (name, target)
            assert not _is_autograde(target), (name, target)
            assert target != "grading", (name, "imports the grading package's face")


def test_the_grading_core_imports_checks_only_in_the_registry_and_no_grader():
    for name in CORE:
        for target in _imports(name):
            assert not _is_autograde(target), (name, target)
            if _is_check(target) or target == CHECKS:
                assert name == "grading.registry", (name, target)


def test_the_graders_never_import_a_check_module_directly():
    graders = [n for n in MODULES if _is_autograde(n)]
    assert graders  # the rule must have something to hold
    for name in graders:
        assert not {t for t in _imports(name) if _is_check(t) or t == CHECKS}, name


def test_the_import_reader_sees_relative_and_absolute_imports():
    # The reader itself: a known edge of each form, so that the rules above cannot pass
    # by reading nothing.
    assert "routers" in _imports("layers")  # from . import routers
    assert "capacity" in _imports("fused")  # from .capacity import group_by_expert
    assert f"{CHECKS}.nb05_moe_transformer" in _imports("grading.registry")  # from .checks
    assert "experts" in _imports(f"{CHECKS}.common")  # from ... import experts
