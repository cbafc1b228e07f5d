"""Running a submission's code in a separate, limited process: the grader's trusted side.

`run_sandboxed(cells, exercises, limits, inputs)` executes a notebook's code cells in order in
a fresh worker process and, at each exercise's tests cell, has the worker call the learner's
object on the probe inputs that this (trusted) process made (`plan`). It returns what came
back, as plain data, for `judge_probe` to judge here. The worker is forked from a `Zygote`,
a clean process that imported torch once, or else spawned as ``python -m
moe_course.grading.sandbox_worker``. The learner's process:

- starts in its own session with a minimal environment and its own temporary working
  folder (also its HOME and TMPDIR), and sets its own limits before any learner code runs:
  address space (`Limits.memory_mb`), file size (`Limits.file_mb`), CPU time, open files,
  core dumps, processes (for a non-root user);
- walls itself in where the kernel allows (see `sandbox_worker`): Landlock, seccomp, an
  audit hook;
- gets `Limits.timeout` seconds of wall time per cell and per exercise's checks. When a step
  overruns, it is sent SIGINT (ending the cell with KeyboardInterrupt, as Jupyter's
  interrupt does); if it is still running a few seconds later, its whole process group is
  killed, and then anything it left behind. A step that hangs or kills the process
  (`os._exit`, a crash, the memory limit) is blamed, and a fresh sandbox reruns the notebook
  without it, at most `Limits.attempts` times in all;
- reports through a pipe as length-prefixed frames. Each frame must be a `torch.save` zip
  archive of stored (uncompressed) entries, at most `Limits.result_mb` in all, carrying this
  run's random nonce; it is read with `torch.load(weights_only=True)`, which builds tensors
  and plain containers and never calls arbitrary code. Anything else ends the run as a
  protocol violation blamed on the step in progress.

Nothing the process says is believed: it reports outputs, and the grader judges them.
"""

from __future__ import annotations

import atexit
import ctypes
import hmac
import io
import json
import os
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..validation import positive_float, positive_int
from .registry import Exercise
from .sandbox_worker import FRAME_HEADER

WORKER = "moe_course.grading.sandbox_worker"
GRACE_S = 5.0  # seconds a step has to stop after SIGINT before its process group is killed
STARTUP_S = 60.0  # seconds the worker may take to import torch and report ready
LOG_BYTES = 4096  # how much of the worker's log a failure report quotes


@dataclass(frozen=True)
class Limits:
    """What one sandboxed run of a submission may use."""

    timeout: float = 60.0  # wall seconds for one cell, and for one exercise's checks
    memory_mb: int = 3072  # address space of the learner's process (RLIMIT_AS), MiB
    file_mb: int = 64  # largest file it may write, its log included (RLIMIT_FSIZE), MiB
    attempts: int = 3  # fresh sandboxes per submission, each skipping what ended the last
    result_mb: int = 64  # most result data read back from one sandbox, MiB

    def __post_init__(self) -> None:
        positive_float("timeout", self.timeout)
        for name in ("memory_mb", "file_mb", "attempts", "result_mb"):
            positive_int(name, getattr(self, name))


@dataclass(frozen=True)
class Cell:
    """One code cell of a submitted notebook."""

    index: int  # position in the notebook's list of cells (markdown cells counted)
    source: str  # the code as submitted
    grade_id: str | None = None  # nbgrader grade_id, when the cell has one
    tests: bool = False  # an nbgrader tests cell (graded, not an answer): never executed


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
                steps.append({"kind": "probe", "grade_id": exercise.grade_id})
        elif not cell.tests:
            steps.append({"kind": "cell", "index": cell.index, "source": cell.source,
                          "grade_id": cell.grade_id})
    steps += [{"kind": "probe", "grade_id": ex.grade_id} for ex in by_tests.values()
              if ex.grade_id not in probed]
    while steps and steps[-1]["kind"] == "cell":
        steps.pop()
    return steps


def run_sandboxed(cells: Sequence[Cell], exercises: Sequence[Exercise], limits: Limits,
                  inputs: Callable[[Exercise, Any], dict[str, Any]]) -> SandboxRun:
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
    start = time.monotonic()
    last_reason = ""
    for _ in range(limits.attempts):
        order = [k for k, s in enumerate(steps) if k not in skip and not (
            s["kind"] == "probe" and _complete(result, by_id[s["grade_id"]]))]
        if not any(steps[k]["kind"] == "probe" for k in order):
            break
        job_inputs = {f"{steps[k]['grade_id']}::{p.name}": inputs(by_id[steps[k]["grade_id"]], p)
                      for k in order if steps[k]["kind"] == "probe"
                      for p in _probes(by_id[steps[k]["grade_id"]])}
        attempt = _Attempt(steps, order, job_inputs, by_id, limits)
        attempt.run()
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
        skip.add(k)
        if steps[k]["kind"] == "cell":
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


def _package_parent() -> str:
    return str(Path(__file__).resolve().parent.parent.parent)


def sandbox_env(folder: str) -> dict[str, str]:
    """The whole environment of a learner's process: nothing of the grader's is passed on."""
    return {"PATH": os.environ.get("PATH", os.defpath), "HOME": folder, "TMPDIR": folder,
            "MPLCONFIGDIR": os.path.join(folder, ".matplotlib"), "MPLBACKEND": "Agg",
            "PYTHONPATH": _package_parent(), "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "MOE_COURSE_GRADING": "1", "NBGRADER_EXECUTION": "autograde",
            "TQDM_DISABLE": "1", "LANG": "C.UTF-8"}


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


# ----------------------------------------------------------------------------------------
# Starting workers: forked from a zygote that imported torch once, or spawned afresh.


_HELPERS: set[int] = set()  # zygotes: children of ours that a sweep must spare


class _ZygoteUnavailable(Exception):
    """The zygote could not start, or the kernel cannot wall its children in."""


class Zygote:
    """A clean process (no learner code ever runs in it) that has imported torch, matplotlib
    and the grader, and forks a worker per job: each sandbox starts in milliseconds instead
    of re-importing torch. Only used where Landlock keeps the forked workers from reaching
    back into it (otherwise workers are spawned afresh)."""

    _current: Zygote | None = None
    _broken = False

    def __init__(self) -> None:
        self.owner = os.getpid()
        self.folder = tempfile.mkdtemp(prefix="moe-zygote-")
        self.exits: dict[int, int] = {}
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with open(os.path.join(self.folder, "log"), "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-s", "-B", "-m", WORKER, "--zygote", str(child.fileno())],
                pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                cwd=self.folder, env=sandbox_env(self.folder), start_new_session=True)
        child.close()
        _HELPERS.add(self.proc.pid)
        self.sock = parent
        ready = self._receive("ready", STARTUP_S)
        if ready is None or int(ready) < 1:
            self.close()
            raise _ZygoteUnavailable(f"zygote: {ready!r}")
        atexit.register(self.close)

    @classmethod
    def get(cls) -> Zygote | None:
        """This process's zygote, started on first use; None where it cannot be used."""
        current = cls._current
        if current is not None and current.owner == os.getpid() and current.proc.poll() is None:
            return current
        if cls._broken or not hasattr(socket, "send_fds"):
            return None
        try:
            cls._current = cls()
        except (_ZygoteUnavailable, OSError):
            cls._broken = True
            return None
        return cls._current

    def _receive(self, kind: str, timeout: float) -> str | None:
        """The next `kind` message's argument (exit messages are recorded on the way)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                return None
            data = self.sock.recv(256)
            if not data:
                return None
            head, _, rest = data.decode().partition(" ")
            if head == "exit":
                pid, code = rest.split()
                self.exits[int(pid)] = int(code)
            elif head == kind:
                return rest

    def spawn(self, fds: Sequence[int], folder: str, env: dict[str, str]) -> int:
        request = json.dumps({"folder": folder, "env": env}).encode()
        socket.send_fds(self.sock, [request], list(fds))
        pid = self._receive("pid", 30.0)
        if pid is None:
            raise OSError("the zygote did not fork a worker")
        return int(pid)

    def exit_code(self, pid: int, timeout: float = 0.0) -> int | None:
        """`pid`'s exit code once the zygote reaped it; wait up to `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while pid not in self.exits:
            left = deadline - time.monotonic()
            if not select.select([self.sock], [], [], max(0.0, left))[0]:
                return None
            data = self.sock.recv(256)
            if not data:
                return -signal.SIGKILL  # the zygote is gone, and its children with it
            head, _, rest = data.decode().partition(" ")
            if head == "exit":
                child, code = rest.split()
                self.exits[int(child)] = int(code)
        return self.exits.pop(pid)

    def close(self) -> None:
        self.sock.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        shutil.rmtree(self.folder, ignore_errors=True)
        if Zygote._current is self:
            Zygote._current = None


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


class _Attempt:
    """One sandbox process: spawn, follow its frames against deadlines, sweep it away."""

    def __init__(self, steps: list[dict[str, Any]], order: list[int], inputs: dict[str, Any],
                 exercises: dict[str, Exercise], limits: Limits) -> None:
        self.steps, self.order, self.inputs = steps, order, inputs
        self.exercises, self.limits = exercises, limits
        self.nonce = secrets.token_hex(16)
        self.probes: dict[str, dict[str, ProbeOutcome]] = {}
        self.cell_errors: dict[int, str] = {}  # cell step -> its error
        self.cells_run: set[int] = set()  # cell steps that finished, with or without error
        self.stopped: set[int] = set()  # cell steps interrupted for running too long
        self.walls: dict[str, Any] = {}
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
        if step["kind"] != "probe" or key not in self.inputs or key in self.requested:
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
        return {"nonce": self.nonce, "folder": folder, "steps": self.steps,
                "run": self.order,
                "assignment": next(iter(self.exercises.values())).assignment,
                "limits": {"memory_mb": self.limits.memory_mb, "file_mb": self.limits.file_mb,
                           "cpu_s": int(self.limits.timeout * n_steps + STARTUP_S),
                           "nproc": 0 if os.getuid() == 0 else _user_tasks() + 64}}

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
                self.failure += "\n" + f.read(LOG_BYTES).decode("utf-8", "replace")

    def _follow(self, worker: _Worker, read_fd: int) -> None:
        limits = self.limits
        buffer, total = bytearray(), 0
        queue = list(self.order)  # steps still to start
        current: int | None = None  # step started and not yet done
        ready, ended, interrupted, eof = False, False, False, False
        seen: set[str] = set()
        deadline = time.monotonic() + max(STARTUP_S, limits.timeout)
        hard_stop = deadline + limits.timeout * (len(queue) + 1)
        os.set_blocking(read_fd, False)
        os.set_blocking(self.inputs_fd, False)
        try:
            while not ended:
                wait = max(0.0, min(deadline, hard_stop) - time.monotonic())
                waitable = worker.waitable()
                fds = ([] if eof else [read_fd]) + ([waitable] if waitable is not None else [])
                sending = [self.inputs_fd] if self.pending else []
                readable, writable, _ = select.select(fds, sending, [], min(wait, 0.25))
                if writable:
                    self._send_inputs()
                chunk = b""
                if read_fd in readable:
                    try:
                        chunk = os.read(read_fd, 1 << 20)
                        eof = not chunk  # every writer closed the pipe
                    except BlockingIOError:
                        chunk = b""
                    total += len(chunk)
                    if total > limits.result_mb << 20:
                        raise _Violation(f"more than {limits.result_mb} MiB of results")
                    buffer += chunk
                while len(buffer) >= FRAME_HEADER.size and not ended:
                    (size,) = FRAME_HEADER.unpack_from(buffer)
                    if size > limits.result_mb << 20:
                        raise _Violation("a frame larger than the result limit")
                    if len(buffer) < FRAME_HEADER.size + size:
                        break
                    data = bytes(buffer[FRAME_HEADER.size:FRAME_HEADER.size + size])
                    del buffer[:FRAME_HEADER.size + size]
                    message = load_frame(data, self.nonce)
                    kind = message.get("type")
                    if not ready:
                        if kind != "ready":
                            raise _Violation(f"a {kind!r} frame before 'ready'")
                        ready = True
                        self.walls = {k: v for k, v in dict(message.get("walls", {})).items()
                                      if isinstance(v, (bool, int))}
                    elif kind == "start":
                        if current is not None or not queue or message.get("step") != queue[0]:
                            raise _Violation("a step started out of order")
                        current = queue.pop(0)
                        interrupted, seen = False, set()
                    elif kind == "end" and current is None and not queue:
                        ended = True
                    elif current is None or message.get("step") != current:
                        raise _Violation(f"a {kind!r} frame outside its step")
                    elif kind == "inputs":
                        self._ask(current, message)
                    elif self._record(current, kind, message, seen, interrupted):
                        current = None
                    if kind in ("ready", "start") or current is None:
                        deadline = time.monotonic() + limits.timeout
                if ended:
                    break
                if not chunk and (waitable is None or waitable in readable):
                    code = worker.exited()
                    if code is not None:
                        if not ready:
                            self.failure = f"the grader's sandbox did not start (exit {code})"
                        else:
                            self._blame(current, queue, _describe_exit(code))
                        return
                now = time.monotonic()
                if now >= hard_stop:
                    self._blame(current, queue, "ran past the time limit of the whole run")
                    return
                if now >= deadline:
                    if not ready:
                        self.failure = "the grader's sandbox did not start in time"
                        return
                    if current is None or interrupted:
                        self._blame(current, queue, f"ran past the {limits.timeout:g} s time "
                                                    "limit and could not be interrupted")
                        return
                    interrupted = True
                    try:
                        os.kill(worker.pid, signal.SIGINT)
                    except ProcessLookupError:
                        pass
                    deadline = now + min(GRACE_S, limits.timeout)
        except _Violation as violation:
            self._blame(current, queue, f"broke the grader's reporting protocol ({violation})")

    def _record(self, k: int, kind: str, message: dict[str, Any], seen: set[str],
                interrupted: bool) -> bool:
        """Record a frame of step `k`; True when the step is done."""
        step = self.steps[k]
        overrun = f"ran past the {self.limits.timeout:g} s time limit and was interrupted"
        if step["kind"] == "cell":
            if kind != "cell":
                raise _Violation(f"a {kind!r} frame in a cell step")
            self.cells_run.add(k)
            error = message.get("error")
            if interrupted:
                error = overrun
                self.stopped.add(k)
            if error is not None:
                self.cell_errors[k] = str(error)[:500]
            return True
        exercise = self.exercises[step["grade_id"]]
        names = [p.name for p in _probes(exercise)]
        if kind == "done":
            if len(seen) != len(names):
                raise _Violation("a check step done before all its checks")
            tripped = message.get("tripped")
            if tripped is not None:  # the exercise's guard saw it run the reference
                for outcome in self.probes.get(exercise.grade_id, {}).values():
                    outcome.outputs, outcome.error = None, str(tripped)[:1000]
            return True
        name = message.get("probe")
        if kind != "probe" or name not in names or name in seen:
            raise _Violation("an unexpected check")
        seen.add(name)
        error = message.get("error")
        if error is not None and interrupted:
            error = f"your {exercise.symbol} {overrun}"
        self.probes.setdefault(exercise.grade_id, {})[name] = ProbeOutcome(
            outputs=message.get("outputs") if error is None else None,
            error=None if error is None else str(error)[:1000])
        return False

    def _blame(self, current: int | None, queue: list[int], reason: str) -> None:
        """The run ended early: blame the step in progress (or the next one)."""
        culprit = current if current is not None else (queue[0] if queue else None)
        if culprit is None:
            return
        self.culprit, self.reason = culprit, reason
