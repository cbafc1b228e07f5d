"""nbgrader commands as forks of one process that has already imported nbgrader.

`python -m nbgrader ...` spends about 3 CPU-seconds importing nbgrader (SQLAlchemy, alembic,
nbconvert) before it does anything; a test that runs nbgrader once per student pays that
every time (40 times for the adversarial table). Here one server process imports it once
and forks a child per command. The child is what `python -m nbgrader` would be: a fresh
process (its own session, address-space cap, cwd and environment of the server) that
parses the command line and runs the app, and its kernels are started by it as usual. Only
the import is shared; nothing nbgrader creates at run time is (the parent never builds an
app, a gradebook or a kernel).

    with NbgraderForks(root, env) as forks:
        status = forks.run(["autograde", "ps1", "--student", "s1", "--force"], timeout=150)

`status` is the command's exit status, or None when it ran past `timeout` (its session is
killed; kernels it started in a session of their own are the caller's to find).

Run as a script, this file is the server: one JSON request a line on stdin
(`{"args": [...], "timeout": s, "memory": bytes, "log": path}`), one JSON reply a line on
stdout (`{"status": int | null}`).
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path


class NbgraderForks:
    """A fork server for nbgrader commands run in `root` with `env` (see the module)."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root, self.env = root, env
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> NbgraderForks:
        self.process = subprocess.Popen([sys.executable, __file__], cwd=self.root,
                                        env=self.env, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)
        return self

    def run(self, args: list[str], timeout: float, memory: int | None = None,
            log: Path | None = None) -> int | None:
        """Run `nbgrader *args` in a fresh fork; its exit status, or None on timeout."""
        assert self.process is not None and self.process.stdin and self.process.stdout
        request = {"args": args, "timeout": timeout, "memory": memory,
                   "log": str(log) if log else os.devnull}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        reply = self.process.stdout.readline()
        if not reply:
            raise RuntimeError(f"the nbgrader fork server ended (status "
                               f"{self.process.wait()}) while running nbgrader {args}")
        return json.loads(reply)["status"]

    def __exit__(self, *exc: object) -> None:
        assert self.process is not None
        self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _child(args: list[str], memory: int | None, log: str) -> None:
    """In the fork: become `python -m nbgrader *args` and never return."""
    status = 1
    try:
        os.setsid()
        if memory:
            resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        sys.argv = ["nbgrader", *args]
        from nbgrader.apps.nbgraderapp import main

        try:
            main()
            status = 0
        except SystemExit as done:
            status = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except BaseException:  # noqa: BLE001 (reported in the log, as the exit status)
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def _wait(pid: int, timeout: float) -> int | None:
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            try:
                os.killpg(pid, signal.SIGKILL)  # the fork leads its own session
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)
            return None
        time.sleep(0.05)


def serve() -> None:
    import nbgrader.apps.nbgraderapp  # noqa: F401 (the import every fork shares)

    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # nothing but replies on the reply pipe
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request["args"], request["memory"], request["log"])
        status = _wait(pid, request["timeout"])
        replies.write(json.dumps({"status": status}) + "\n")
        replies.flush()


if __name__ == "__main__":
    serve()
