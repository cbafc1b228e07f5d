"""Every limit of a sandboxed run, one field of `Limits` each; the command lines' options are
built from the fields (`add_options`, `from_options`), each field's help text as its help,
as nbgrader builds its options from its settings.

>>> Limits().timeout, Limits(timeout=5).budget
(60.0, 600.0)
>>> option_names()[:3]
['--timeout', '--memory', '--file-mb']
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields
from typing import Any

from ...validation import positive_float, positive_int


def _limit(default: float | int, help: str, option: str, metavar: str) -> Any:
    return field(default=default, metadata={"help": help, "option": option,
                                            "metavar": metavar})


@dataclass(frozen=True)
class Limits:
    """What one sandboxed run of a submission may use."""

    timeout: float = _limit(60.0, "wall seconds for one cell, and for one exercise's checks",
                            "--timeout", "S")
    memory_mb: int = _limit(3072, "address space of the learner's process (RLIMIT_AS), MiB",
                            "--memory", "MB")
    file_mb: int = _limit(64, "largest file the learner's process may write, its log "
                              "included (RLIMIT_FSIZE), MiB", "--file-mb", "MB")
    attempts: int = _limit(5, "fresh sandboxes per submission, each skipping what ended or "
                              "hung the last", "--attempts", "N")
    budget: float = _limit(600.0, "wall seconds for all the sandboxes of one notebook "
                                  "together; what is left unrun then fails with the reason",
                           "--budget", "S")
    result_mb: int = _limit(64, "most result data read back from one sandbox, MiB",
                            "--result-mb", "MB")
    grace: float = _limit(5.0, "seconds a step has to stop after SIGINT before its process "
                               "group is killed", "--grace", "S")
    startup: float = _limit(60.0, "seconds a sandbox may take to import torch and report "
                                  "ready", "--startup", "S")
    open_files: int = _limit(256, "open files of the learner's process (RLIMIT_NOFILE)",
                             "--open-files", "N")
    processes: int = _limit(64, "threads the learner's process may start, beyond those "
                                "its user already runs (RLIMIT_NPROC; not for a root "
                                "grader without own uids)", "--processes", "N")
    notebook_mb: int = _limit(64, "largest notebook file read, MiB (outputs make most of "
                                  "it)", "--notebook-mb", "MB")
    message_chars: int = _limit(1000, "longest message kept from the learner's side (a "
                                      "check's or a cell's error)", "--message-chars", "N")
    log_bytes: int = _limit(4096, "how much of a failed sandbox's log the report quotes",
                            "--log-bytes", "N")

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(f.default, float):
                positive_float(f.name, value)
            else:
                positive_int(f.name, value)

    def to_dict(self) -> dict[str, float | int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def option_names(prefix: str = "") -> list[str]:
    """The options of `add_options`, in field order."""
    return [f"--{prefix}{f.metadata['option'][2:]}" for f in fields(Limits)]


def add_options(add: Any, prefix: str = "") -> None:
    """Add one option per field with `add` (argparse's `add_argument` or pytest's
    `addoption`); `prefix` goes after the dashes (`--grader-timeout`)."""
    for f, name in zip(fields(Limits), option_names(prefix), strict=True):
        kind = float if isinstance(f.default, float) else int
        add(name, type=kind, default=f.default, metavar=f.metadata["metavar"],
            dest=f"{prefix.replace('-', '_')}{f.name}",
            help=f"{f.metadata['help']} (default {f.default:g})")


def from_options(values: argparse.Namespace | Any, prefix: str = "") -> Limits:
    """`Limits` from parsed options (an argparse namespace, or pytest's config with
    `getoption`)."""
    get = values.getoption if hasattr(values, "getoption") else lambda k: getattr(values, k)
    return Limits(**{f.name: get(f"{prefix.replace('-', '_')}{f.name}") for f in fields(Limits)})


def to_options(limits: Limits, prefix: str = "") -> list[str]:
    """The command-line options that give `limits` (for a child pytest run)."""
    out: list[str] = []
    for f, name in zip(fields(Limits), option_names(prefix), strict=True):
        out += [name, repr(getattr(limits, f.name))]
    return out
