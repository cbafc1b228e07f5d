"""The zygote: a clean process that imported torch, matplotlib and the grader once, and
forks one worker per sandboxed run, so that a sandbox starts in milliseconds instead of
re-importing torch. Both halves live here: `Zygote` (the grader's side: starts it, asks
for a fork with the job's four file descriptors, learns each worker's exit code) and
`zygote_main` (the zygote's side: serves fork requests on a SOCK_SEQPACKET socket; its
child, `_child`, becomes a worker, `worker.main`). No learner code ever runs in the zygote;
it is used only where Landlock keeps the forked workers from reaching back into it.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import walls
from .limits import Limits
from .protocol import INPUTS_FD, RESULT_FD

WORKER = "moe_course.grading.autograde.worker"  # run with python -m


def _package_parent() -> str:
    return str(Path(__file__).resolve().parents[3])


def sandbox_env(folder: str) -> dict[str, str]:
    """The whole environment of a learner's process: nothing of the grader's is passed on."""
    return {"PATH": os.environ.get("PATH", os.defpath), "HOME": folder, "TMPDIR": folder,
            "MPLCONFIGDIR": os.path.join(folder, ".matplotlib"), "MPLBACKEND": "Agg",
            "PYTHONPATH": _package_parent(), "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "MOE_COURSE_GRADING": "1", "NBGRADER_EXECUTION": "autograde",
            "TQDM_DISABLE": "1", "LANG": "C.UTF-8"}


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
        ready = self._receive("ready", Limits().startup)
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



# -- the zygote's side ---------------------------------------------------------------------


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, 0 without Landlock."""
    return walls.landlock_abi()


def _child(sock: Any, fds: list[int], request: dict[str, Any]) -> None:
    """In a fresh fork of the zygote: become a worker for one job (never returns)."""
    try:
        sock.close()  # learner code must never reach the zygote's control socket
        os.setsid()
        for target, fd in zip((0, 1, 2, RESULT_FD, INPUTS_FD),
                              (fds[0], fds[1], fds[1], fds[2], fds[3]), strict=True):
            os.dup2(fd, target)
        os.closerange(INPUTS_FD + 1, 1 << 16)
        os.chdir(request["folder"])
        os.environ.clear()
        os.environ.update(request["env"])
        import tempfile

        tempfile.tempdir = None
        for sig in (signal.SIGCHLD, signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        from .worker import main

        main([str(RESULT_FD), str(INPUTS_FD)])
    finally:
        os._exit(70)


def zygote_main(sock_fd: int) -> None:
    """Serve fork requests on a SOCK_SEQPACKET socket: a JSON request with four file
    descriptors (job, log, result pipe, inputs pipe) -> "pid N"; later "exit N CODE" when it
    ends."""
    import json
    import select
    import socket

    import matplotlib
    import torch

    torch.set_num_threads(1)
    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401  -- what the notebooks import, paid once

    from .. import registry, runner  # noqa: F401

    sock = socket.socket(fileno=sock_fd)
    if sys.platform.startswith("linux"):
        walls.libc().prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: orphans are reaped here
    sock.sendall(f"ready {landlock_abi()}".encode())
    children: set[int] = set()
    while True:
        readable, _, _ = select.select([sock], [], [], 0.05)
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if pid in children:
                children.discard(pid)
                sock.sendall(f"exit {pid} {os.waitstatus_to_exitcode(status)}".encode())
        if not readable:
            continue
        data, fds, _, _ = socket.recv_fds(sock, 1 << 16, 4)
        if not data:
            for pid in children:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except OSError:
                    pass
            os._exit(0)
        pid = os.fork()
        if pid == 0:
            _child(sock, fds, json.loads(data))
        for fd in fds:
            os.close(fd)
        children.add(pid)
        sock.sendall(f"pid {pid}".encode())


