"""Running a submission's code in a separate, limited process: the grader's trusted side.

`run_sandboxed(cells, exercises, limits, inputs)` executes a notebook's code cells in order in
a fresh worker process and, at each exercise's tests cell, has the worker call the learner's
object on the probe inputs that this (trusted) process made (`plan`); each probe's inputs
are sent only when the worker asks for them, as that probe runs under its exercise's guard
(an `INPUTS` frame, answered on the worker's inputs pipe), never in the job. It returns what came
back, as plain data, for `judge_probe` to judge here. The worker is forked from a `Zygote`,
a clean process that imported torch once, or else spawned as ``python -m
moe_course.grading.autograde.worker``. The learner's process:

- starts in its own session with a minimal environment and its own temporary working
  folder (also its HOME and TMPDIR), and sets its own limits before any learner code runs:
  address space (`Limits.memory_mb`), file size (`Limits.file_mb`), CPU time, open files,
  core dumps, threads (`Limits`);
- walls itself in where the kernel allows (`walls`): an own uid, namespaces, Landlock,
  seccomp, an audit hook; `isolation()` says up front which walls a sandbox gets here, and a
  sandbox that reports fewer is not graded;
- gets `Limits.timeout` seconds of wall time per cell and per exercise's checks. When a step
  overruns, it is sent SIGINT (ending the cell with KeyboardInterrupt, as Jupyter's
  interrupt does); if it is still running a few seconds later, its whole process group is
  killed, and then anything it left behind. A step that hangs or kills the process
  (`os._exit`, a crash, the memory limit) is blamed, and a fresh sandbox reruns the notebook
  without it (a learner function it hung in is skipped instead, wherever it is called), at
  most `Limits.attempts` times and `Limits.budget` seconds in all;
- reports through a pipe as length-prefixed frames. Each frame must be a `torch.save` zip
  archive of stored (uncompressed) entries, at most `Limits.result_mb` in all, carrying this
  run's random nonce; it is read with `torch.load(weights_only=True)`, which builds tensors
  and plain containers and never calls arbitrary code. Anything else ends the run as a
  protocol violation blamed on the step in progress.

Nothing the process says is believed: it reports outputs, and the grader judges them.
"""

from __future__ import annotations

import ctypes
import hmac
import io
import itertools
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..registry import Exercise
from . import walls
from .limits import Limits
from .protocol import (
    CELL,
    CELL_STEP,
    DONE,
    END,
    FRAME_HEADER,
    HANG,
    INPUTS,
    PROBE,
    PROBE_STEP,
    READY,
    START,
)
from .zygote import _HELPERS, WORKER, Zygote, sandbox_env


@dataclass(frozen=True)
class Cell:
    """One code cell of a submitted notebook."""

    index: int  # position in the notebook's list of cells (markdown cells counted)
    source: str  # the code as submitted
    grade_id: str | None = None  # nbgrader grade_id, when the cell has one
    tests: bool = False  # an nbgrader tests cell (graded, not an answer): never executed
    tampered: str | None = None  # why its nbgrader metadata is not what the release gave


@dataclass
class ProbeOutcome:
    """What the learner's side reported for one probe."""

    outputs: Any = None  # the probe's outputs as plain data, for judge_probe
    error: str | None = None  # why there is nothing to judge (raised, timed out, crashed)


@dataclass
class SandboxRun:
    """Everything a sandboxed run of one submission reported."""

    probes: dict[str, dict[str, ProbeOutcome]] = field(default_factory=dict)  # id -> name ->
    cell_errors: dict[int, str] = field(default_factory=dict)  # cell index -> what went wrong
    stopped: set[int] = field(default_factory=set)  # cells the grader interrupted or skipped
    attempts: int = 0  # sandbox processes started
    seconds: float = 0.0  # wall time of all of them
    walls: dict[str, Any] = field(default_factory=dict)  # isolation the worker reported
    failure: str | None = None  # the grader itself failed: this submission is not graded


def plan(cells: Sequence[Cell], exercises: Sequence[Exercise]) -> list[dict[str, Any]]:
    """The worker's steps: every code cell except tests cells, in order, and each autograded
    exercise's probes where its tests cell stands (at the end when the cell is missing).
    Cells after the last probes cannot change a score, so they are left out (in the course's
    notebooks they hold the training runs and benchmarks).

    >>> from moe_course.grading import exercises_for
    >>> exs = exercises_for("01_experts_and_gating")[1:2]  # softmax_gate only
    >>> cells = [Cell(0, "import torch"), Cell(1, "def f(): pass", "ex01_softmax_gate"),
    ...          Cell(2, "check(...)", "ex01_softmax_gate_tests", tests=True),
    ...          Cell(3, "train(...)")]
    >>> [s.get("index", s.get("grade_id")) for s in plan(cells, exs)]
    [0, 1, 'ex01_softmax_gate']
    """
    by_tests = {ex.tests_id: ex for ex in exercises if ex.kind != "written"}
    steps: list[dict[str, Any]] = []
    probed: set[str] = set()
    for cell in cells:
        exercise = by_tests.get(cell.grade_id or "")
        if exercise is not None:
            if exercise.grade_id not in probed:
                probed.add(exercise.grade_id)
                steps.append({"kind": PROBE_STEP, "grade_id": exercise.grade_id})
        elif not cell.tests:
            steps.append({"kind": CELL_STEP, "index": cell.index, "source": cell.source,
                          "grade_id": cell.grade_id})
    steps += [{"kind": PROBE_STEP, "grade_id": ex.grade_id} for ex in by_tests.values()
              if ex.grade_id not in probed]
    while steps and steps[-1]["kind"] == CELL_STEP:
        steps.pop()
    return steps


def run_sandboxed(cells: Sequence[Cell], exercises: Sequence[Exercise], limits: Limits,
                  inputs: Callable[[Exercise, Any], dict[str, Any]],
                  submission: str | os.PathLike | None = None) -> SandboxRun:
    """Run a submission in sandboxes until every exercise has been probed or blamed.

    `inputs(exercise, probe)` gives the (trusted) inputs of a probe. A step that ends a
    sandbox is blamed and skipped by the next one; after `limits.attempts` sandboxes the
    probes still without a result fail with the reason.
    """
    exercises = [ex for ex in exercises if ex.kind != "written"]
    by_id = {ex.grade_id: ex for ex in exercises}
    steps = plan(cells, exercises)
    result = SandboxRun(probes={ex.grade_id: {} for ex in exercises})
    skip: set[int] = set()
    hanging: set[tuple] = set()  # learner functions that hung: later runs skip their calls
    retried: set[int] = set()  # steps run again after the function they hung in was found
    start = time.monotonic()
    last_reason = ""
    for _ in range(limits.attempts):
        if time.monotonic() - start >= limits.budget:
            last_reason = f"the notebook used up its {limits.budget:g} s time budget"
            break
        order = [k for k, s in enumerate(steps) if k not in skip and not (
            s["kind"] == PROBE_STEP and _complete(result, by_id[s["grade_id"]]))]
        if not any(steps[k]["kind"] == PROBE_STEP for k in order):
            break
        job_inputs = {f"{steps[k]['grade_id']}::{p.name}": inputs(by_id[steps[k]["grade_id"]], p)
                      for k in order if steps[k]["kind"] == PROBE_STEP
                      for p in _probes(by_id[steps[k]["grade_id"]])}
        attempt = _Attempt(steps, order, job_inputs, by_id, limits, _own_folder(submission))
        attempt.hanging = sorted(hanging)
        attempt.until = start + limits.budget
        attempt.run()
        new_hang = bool(attempt.learned - hanging)
        hanging |= attempt.learned
        result.attempts += 1
        result.walls = attempt.walls or result.walls
        for k in attempt.cells_run:  # the latest run of a cell says how it went
            result.cell_errors.pop(steps[k]["index"], None)
        for k, error in attempt.cell_errors.items():
            result.cell_errors[steps[k]["index"]] = error
        result.stopped |= {steps[k]["index"] for k in attempt.stopped}
        for grade_id, outcomes in attempt.probes.items():
            result.probes[grade_id].update(outcomes)
        if attempt.failure is not None:
            result.failure = attempt.failure
            break
        if attempt.culprit is None:
            break
        k, last_reason = attempt.culprit, attempt.reason
        if new_hang and k not in retried:
            # It hung inside a learner function, which the next sandbox skips: run the step
            # again (once), so that what it does besides that call still counts.
            retried.add(k)
            continue
        skip.add(k)
        if steps[k]["kind"] == CELL_STEP:
            result.stopped.add(steps[k]["index"])
            result.cell_errors[steps[k]["index"]] = (f"{last_reason}; the grader ran the rest "
                                                     "of the notebook without this cell")
        else:
            exercise = by_id[steps[k]["grade_id"]]
            for probe in _probes(exercise):
                result.probes[exercise.grade_id].setdefault(
                    probe.name, ProbeOutcome(error=f"your {exercise.symbol} {last_reason}"))
    missing = ("not graded: the grader failed" if result.failure else
               f"not run: the notebook stopped {result.attempts} sandboxes (last: {last_reason})")
    for exercise in exercises:  # attempts used up (or the grader failed)
        for probe in _probes(exercise):
            result.probes[exercise.grade_id].setdefault(probe.name, ProbeOutcome(error=missing))
    result.seconds = time.monotonic() - start
    return result


def _probes(exercise: Exercise) -> tuple[Any, ...]:
    return exercise.visible + exercise.hidden


def _complete(result: SandboxRun, exercise: Exercise) -> bool:
    return len(result.probes[exercise.grade_id]) == len(_probes(exercise))


class _Violation(Exception):
    """The learner's process broke the reporting protocol."""


def load_frame(data: bytes, nonce: str) -> dict[str, Any]:
    """Read one frame: a stored-only zip (no decompression bombs), loaded weights-only."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise _Violation(f"a frame that is not a torch.save archive ({exc})") from None
    if any(info.compress_type != zipfile.ZIP_STORED for info in infos) or sum(
            info.file_size for info in infos) > len(data):
        raise _Violation("a frame with compressed entries")
    try:
        message = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as exc:
        raise _Violation(f"a frame that weights-only loading refused ({type(exc).__name__})") \
            from None
    if not isinstance(message, dict) or not isinstance(message.get("nonce"), str) or \
            not hmac.compare_digest(message["nonce"], nonce):
        raise _Violation("a frame without this run's nonce")
    return message


def _set_subreaper() -> None:
    """Orphans of the learner's process become our children (Linux), so none escape the sweep."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
        except (OSError, AttributeError):
            pass


def _strays(session: int, parents: set[int]) -> list[int]:
    """Live processes in the learner's session, or orphans handed to one of `parents`."""
    found = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        state, ppid, sid = fields[0], int(fields[1]), int(fields[3])
        pid = int(entry)
        if state != b"Z" and (sid == session or ppid in parents) and pid not in _HELPERS:
            found.append(pid)
    return found


def _sweep(session: int, parents: set[int]) -> None:
    """Kill the learner's process group, then anything it left behind."""
    try:
        os.killpg(session, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    deadline = time.monotonic() + 2.0
    ours: set[int] = set()  # orphans handed to this process: reaped here, or they stay zombies
    while time.monotonic() < deadline:
        strays = _strays(session, parents)
        for pid in strays:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        ours |= set(strays) & set(_children())
        if not strays:
            break
        time.sleep(0.02)
    for pid in ours:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass


def _children() -> list[int]:
    try:
        with open(f"/proc/self/task/{os.getpid()}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def _user_tasks() -> int:
    """Processes and threads of this user now (RLIMIT_NPROC counts them all)."""
    uid, count = os.getuid(), 0
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    count += len(os.listdir(f"/proc/{entry}/task"))
            except OSError:
                continue
    return count


def _describe_exit(code: int) -> str:
    if code >= 0:
        return f"ended the grader's process (exit status {code}, e.g. os._exit)"
    name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
    if -code == signal.SIGXCPU:
        return "used up the CPU time limit"
    if -code in (signal.SIGABRT, signal.SIGSEGV, signal.SIGBUS, signal.SIGKILL):
        return (f"crashed the grader's process ({name}; running out of the "
                "memory limit does this)")
    return f"ended the grader's process ({name})"


class _Worker:
    """A started worker: its pid, something to select on, and its exit code once known."""

    def __init__(self, pid: int, proc: subprocess.Popen | None, zygote: Zygote | None) -> None:
        self.pid, self.proc, self.zygote = pid, proc, zygote
        self.code: int | None = None
        self.pidfd = os.pidfd_open(pid) if proc is not None and hasattr(os, "pidfd_open") \
            else None

    @classmethod
    def start(cls, job: int, log: int, result: int, inputs: int, folder: str) -> _Worker:
        env = sandbox_env(folder)
        zygote = Zygote.get()
        if zygote is not None:
            try:
                return cls(zygote.spawn((job, log, result, inputs), folder, env), None, zygote)
            except OSError:
                pass
        proc = subprocess.Popen(
            [sys.executable, "-s", "-B", "-m", WORKER, str(result), str(inputs)], stdin=job,
            stdout=log, stderr=log, pass_fds=(result, inputs), cwd=folder, env=env,
            start_new_session=True)
        return cls(proc.pid, proc, None)

    def waitable(self) -> int | None:
        return self.zygote.sock.fileno() if self.zygote is not None else self.pidfd

    def exited(self, timeout: float = 0.0) -> int | None:
        if self.code is None:
            if self.zygote is not None:
                self.code = self.zygote.exit_code(self.pid, timeout)
            else:
                try:
                    self.code = self.proc.wait(timeout) if timeout else self.proc.poll()
                except subprocess.TimeoutExpired:
                    pass
        return self.code

    def parents(self) -> set[int]:
        """The process that orphans of this worker are handed to (a subreaper)."""
        return {self.zygote.proc.pid if self.zygote is not None else os.getpid()}

    def close(self) -> None:
        if self.pidfd is not None:
            os.close(self.pidfd)


@dataclass(frozen=True)
class Isolation:
    """The walls every sandbox of this process gets, found once by `walls.survey`."""

    walls: dict[str, Any]  # walls.WALLS -> up (bool) or Landlock's ABI (int)
    own_uids: bool  # a root grader hands each sandbox a uid of its own
    down: tuple[str, ...]  # what is missing, in words (empty: every wall is up)


_ISOLATION: dict[int, Isolation] = {}  # pid -> its survey (a fork surveys again)
_SANDBOXES = itertools.count(1)


def isolation() -> Isolation:
    """What walls this machine gives a sandbox (surveyed once per process)."""
    if os.getpid() not in _ISOLATION:
        root = os.geteuid() == 0
        own = root and walls.readable_by_others(walls.python_paths())
        folder = tempfile.mkdtemp(prefix="moe-survey-")
        try:
            ids = walls.sandbox_ids(0) if own else None
            if ids is not None:
                os.chown(folder, *ids)
            found = walls.survey(folder, ids)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        _ISOLATION[os.getpid()] = Isolation(found, own, tuple(walls.down(found, root)))
    return _ISOLATION[os.getpid()]


def _own_folder(path: str | os.PathLike | None) -> str | None:
    """The submission's path when its folder holds no other notebook (then learner code may
    read that folder); None otherwise."""
    if path is None:
        return None
    folder = Path(path).parent
    try:
        others = [p for p in folder.iterdir() if p.suffix == ".ipynb" and p.name != Path(path).name]
    except OSError:
        return None
    return None if others else str(path)


class _Attempt:
    """One sandbox process: spawn, follow its frames against deadlines, sweep it away."""

    def __init__(self, steps: list[dict[str, Any]], order: list[int], inputs: dict[str, Any],
                 exercises: dict[str, Exercise], limits: Limits,
                 submission: str | None = None) -> None:
        self.steps, self.order, self.inputs = steps, order, inputs
        self.exercises, self.limits = exercises, limits
        self.submission = submission
        self.isolation = isolation()
        self.ids = (walls.sandbox_ids(next(_SANDBOXES)) if self.isolation.own_uids else None)
        self.nonce = secrets.token_hex(16)
        self.probes: dict[str, dict[str, ProbeOutcome]] = {}
        self.cell_errors: dict[int, str] = {}  # cell step -> its error
        self.cells_run: set[int] = set()  # cell steps that finished, with or without error
        self.stopped: set[int] = set()  # cell steps interrupted for running too long
        self.walls: dict[str, Any] = {}
        self.hanging: list[tuple] = []  # learner functions known to hang (for the job)
        self.learned: set[tuple] = set()  # functions found hanging in this run
        self.where: dict[int, list] = {}  # step -> where it was when it neared the limit
        self.until = float("inf")  # when the notebook's time budget runs out
        self.culprit: int | None = None  # the step blamed for ending the run early
        self.reason = ""
        self.failure: str | None = None
        self.inputs_fd = -1  # our end of the pipe that carries probe inputs to the worker
        self.pending = bytearray()  # inputs asked for and not yet written
        self.requested: set[str] = set()  # probes whose inputs were sent ("grade_id::name")

    def _send_inputs(self) -> None:
        try:
            del self.pending[:os.write(self.inputs_fd, self.pending)]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:  # the worker is gone; its exit is handled by _follow
            self.pending.clear()

    def _ask(self, k: int, message: dict[str, Any]) -> None:
        """The worker asks for a probe's inputs: only the step's own, each once."""
        step = self.steps[k]
        key = f"{step.get('grade_id')}::{message.get('probe')}"
        if step["kind"] != PROBE_STEP or key not in self.inputs or key in self.requested:
            raise _Violation("inputs asked for out of turn")
        self.requested.add(key)
        buffer = io.BytesIO()
        torch.save(self.inputs[key], buffer)
        self.pending += FRAME_HEADER.pack(len(buffer.getvalue())) + buffer.getvalue()
        self._send_inputs()

    def run(self) -> None:
        _set_subreaper()
        private = tempfile.mkdtemp(prefix="moe-grade-")
        folder = tempfile.mkdtemp(prefix="moe-sandbox-")
        try:
            self._start_and_follow(private, folder)
        finally:
            shutil.rmtree(private, ignore_errors=True)
            shutil.rmtree(folder, ignore_errors=True)

    def _job(self, folder: str) -> dict[str, Any]:
        n_steps = len(self.order) + 1
        ids = self.ids
        if ids is not None:
            os.chown(folder, *ids)  # the sandbox's own uid owns its folder, and only that
        nproc = (self.limits.processes if ids is not None else 0 if os.getuid() == 0
                 else _user_tasks() + self.limits.processes)
        return {"nonce": self.nonce, "folder": folder, "steps": self.steps,
                "run": self.order,
                "assignment": next(iter(self.exercises.values())).assignment,
                "submission": self.submission, "ids": list(ids) if ids else None,
                "hanging": [list(h) for h in self.hanging],
                "limits": {"memory_mb": self.limits.memory_mb, "file_mb": self.limits.file_mb,
                           "cpu_s": int(self.limits.timeout * n_steps + self.limits.startup),
                           "open_files": self.limits.open_files, "nproc": nproc,
                           "timeout": self.limits.timeout}}

    def _start_and_follow(self, private: str, folder: str) -> None:
        job_path, log_path = os.path.join(private, "job.pt"), os.path.join(private, "log")
        torch.save(self._job(folder), job_path)
        read_fd, write_fd = os.pipe()
        inputs_read, self.inputs_fd = os.pipe()  # probe inputs, sent when asked for
        with open(job_path, "rb") as job, open(log_path, "wb") as log:
            try:
                worker = _Worker.start(job.fileno(), log.fileno(), write_fd, inputs_read,
                                       folder)
            finally:
                os.close(write_fd)
                os.close(inputs_read)
        try:
            self._follow(worker, read_fd)
        finally:
            os.close(read_fd)
            os.close(self.inputs_fd)
            _sweep(worker.pid, worker.parents())
            worker.exited(5.0)
            worker.close()
        if self.failure is not None:
            with open(log_path, "rb") as f:
                self.failure += "\n" + f.read(self.limits.log_bytes).decode("utf-8", "replace")

    def _follow(self, worker: _Worker, read_fd: int) -> None:
        """Read the worker's frames until it ends, exits or runs past a deadline; in named
        steps: `_read` a chunk, `_frames` in it, `_on_frame` for each, then `_exited` and
        `_overdue` (which interrupts, or blames the step in progress)."""
        limits = self.limits
        self.buffer, self.total, self.eof = bytearray(), 0, False
        self.queue = list(self.order)  # steps still to start
        self.current: int | None = None  # step started and not yet done
        self.ready = self.ended = self.interrupted = False
        self.seen: set[str] = set()
        self.deadline = time.monotonic() + max(limits.startup, limits.timeout)
        self.hard_stop = min(self.deadline + limits.timeout * (len(self.queue) + 1), self.until)
        os.set_blocking(read_fd, False)
        os.set_blocking(self.inputs_fd, False)
        try:
            while not self.ended:
                chunk, readable, waitable = self._read(worker, read_fd)
                for message in self._frames():
                    self._on_frame(message)
                    if self.failure is not None:
                        return
                if self.ended:
                    break
                if not chunk and (waitable is None or waitable in readable) and \
                        self._exited(worker):
                    return
                if self._overdue(worker):
                    return
        except _Violation as violation:
            self._blame(self.current, self.queue,
                        f"broke the grader's reporting protocol ({violation})")

    def _read(self, worker: _Worker, read_fd: int) -> tuple[bytes, list, int | None]:
        """Wait for data or the worker's exit (until the nearer deadline), sending the
        probe inputs it asked for as the pipe takes them; read a chunk."""
        wait = max(0.0, min(self.deadline, self.hard_stop) - time.monotonic())
        waitable = worker.waitable()
        fds = ([] if self.eof else [read_fd]) + ([waitable] if waitable is not None else [])
        sending = [self.inputs_fd] if self.pending else []
        readable, writable, _ = select.select(fds, sending, [], min(wait, 0.25))
        if writable:
            self._send_inputs()
        chunk = b""
        if read_fd in readable:
            try:
                chunk = os.read(read_fd, 1 << 20)
                self.eof = not chunk  # every writer closed the pipe
            except BlockingIOError:
                chunk = b""
            self.total += len(chunk)
            if self.total > self.limits.result_mb << 20:
                raise _Violation(f"more than {self.limits.result_mb} MiB of results")
            self.buffer += chunk
        return chunk, readable, waitable

    def _frames(self) -> Iterator[dict[str, Any]]:
        """The complete frames in the buffer, loaded weights-only."""
        while len(self.buffer) >= FRAME_HEADER.size and not self.ended:
            (size,) = FRAME_HEADER.unpack_from(self.buffer)
            if size > self.limits.result_mb << 20:
                raise _Violation("a frame larger than the result limit")
            if len(self.buffer) < FRAME_HEADER.size + size:
                return
            data = bytes(self.buffer[FRAME_HEADER.size:FRAME_HEADER.size + size])
            del self.buffer[:FRAME_HEADER.size + size]
            yield load_frame(data, self.nonce)

    def _on_frame(self, message: dict[str, Any]) -> None:
        """One frame, checked against the protocol's order (`autograde.protocol`)."""
        kind = message.get("type")
        if kind == HANG and self.ready:
            if message.get("step") == self.current and isinstance(message.get("where"), list):
                self.where[self.current] = message["where"]
            return
        if not self.ready:
            if kind != READY:
                raise _Violation(f"a {kind!r} frame before 'ready'")
            self.ready = True
            self.walls = {k: v for k, v in dict(message.get("walls", {})).items()
                          if isinstance(v, (bool, int))}
            lost = walls.fewer(self.walls, self.isolation.walls)
            if lost:
                self.failure = ("the sandbox came up with fewer walls than the grader "
                                f"announced ({', '.join(lost)}): not graded")
                return
        elif kind == START:
            if self.current is not None or not self.queue or \
                    message.get("step") != self.queue[0]:
                raise _Violation("a step started out of order")
            self.current = self.queue.pop(0)
            self.interrupted, self.seen = False, set()
        elif kind == END and self.current is None and not self.queue:
            self.ended = True
        elif self.current is None or message.get("step") != self.current:
            raise _Violation(f"a {kind!r} frame outside its step")
        elif kind == INPUTS:
            self._ask(self.current, message)
        elif self._record(self.current, kind, message, self.seen, self.interrupted):
            self.current = None
        if kind in (READY, START) or self.current is None:
            self.deadline = time.monotonic() + self.limits.timeout

    def _exited(self, worker: _Worker) -> bool:
        """Whether the worker has exited (then the step in progress is blamed)."""
        code = worker.exited()
        if code is None:
            return False
        if not self.ready:
            self.failure = f"the grader's sandbox did not start (exit {code})"
        else:
            self._blame(self.current, self.queue, _describe_exit(code))
        return True

    def _overdue(self, worker: _Worker) -> bool:
        """Past a deadline: interrupt the step (SIGINT), or, when it is still running
        after the grace period, blame it; True when this run is over."""
        now, limits = time.monotonic(), self.limits
        if now >= self.hard_stop:
            self._blame(self.current, self.queue, "ran past the time budget of the notebook"
                        if now >= self.until else "ran past the time limit of the whole run")
            return True
        if now < self.deadline:
            return False
        if not self.ready:
            self.failure = "the grader's sandbox did not start in time"
            return True
        if self.current is None or self.interrupted:
            self._blame(self.current, self.queue, f"ran past the {limits.timeout:g} s time "
                                                  "limit and could not be interrupted")
            return True
        self.interrupted = True
        try:
            os.kill(worker.pid, signal.SIGINT)
        except ProcessLookupError:
            pass
        self.deadline = now + min(limits.grace, limits.timeout)
        return False

    def _record(self, k: int, kind: str, message: dict[str, Any], seen: set[str],
                interrupted: bool) -> bool:
        """Record a frame of step `k`; True when the step is done."""
        step = self.steps[k]
        overrun = f"ran past the {self.limits.timeout:g} s time limit and was interrupted"
        if step["kind"] == CELL_STEP:
            if kind != CELL:
                raise _Violation(f"a {kind!r} frame in a cell step")
            self.cells_run.add(k)
            error = message.get("error")
            if interrupted:
                error = overrun
                self.stopped.add(k)
            if error is not None:
                self.cell_errors[k] = str(error)[:self.limits.message_chars]
            return True
        exercise = self.exercises[step["grade_id"]]
        names = [p.name for p in _probes(exercise)]
        if kind == DONE:
            if len(seen) != len(names):
                raise _Violation("a check step done before all its checks")
            tripped = message.get("tripped")
            if tripped is not None:  # the exercise's guard saw it run the reference
                for outcome in self.probes.get(exercise.grade_id, {}).values():
                    outcome.outputs = None
                    outcome.error = str(tripped)[:self.limits.message_chars]
            return True
        name = message.get("probe")
        if kind != PROBE or name not in names or name in seen:
            raise _Violation("an unexpected check")
        seen.add(name)
        error = message.get("error")
        if error is not None and interrupted:
            error = f"your {exercise.symbol} {overrun}"
        self.probes.setdefault(exercise.grade_id, {})[name] = ProbeOutcome(
            outputs=message.get("outputs") if error is None else None,
            error=None if error is None else str(error)[:self.limits.message_chars])
        return False

    def _blame(self, current: int | None, queue: list[int], reason: str) -> None:
        """The run ended early: blame the step in progress (or the next one)."""
        culprit = current if current is not None else (queue[0] if queue else None)
        if culprit is None:
            return
        self.culprit, self.reason = culprit, reason
        functions = [w for w in self.where.get(culprit, []) if isinstance(w, list)
                     and len(w) == 3 and w[1] != "<module>"]
        if functions:  # it hung inside a learner function: later runs skip its calls
            self.learned.add(tuple(functions[-1]))
