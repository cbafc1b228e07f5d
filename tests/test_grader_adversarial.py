"""Adversarial submissions: what each grader makes of notebooks written to break it.

Each case is a submission of notebook 01 built here from the release: the solution in every
answer cell, then one answer cell changed. The pytest grader grades all of them (and three
honest controls) in one `moe-course grade --jobs 2` run, and every case must get its correct
points, the run must end within its limits, the other submissions must be unaffected, and
the output folder must hold exactly the gradebook, well formed, with nothing added. The
same notebooks then go through nbgrader autograde in a temporary course (slow), and the
tests assert what nbgrader actually does, which is what the README's table reports; a test
keeps that table and `CASES` in agreement. Spawned `sleep` processes still alive after a
case are killed by pid before the next one.

nbgrader has no limits of its own, so it runs here with an address-space cap (6 GiB) set
from outside and a 10 s cell timeout; the fork bomb is bounded (200 children that sleep
27 s) so that it cannot take this machine down without a grader to stop it.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import nbformat
import pytest
from nbgrader_course import graded_only
from nbgrader_forks import NbgraderForks
from test_grader import (
    NB01,
    ROOT,
    jupyter_env,
    nbgrader_course,
    nbgrader_scores,
    read_grades,
    run_grade,
    solution_sources,
    submission,
    write_submission,
)

from moe_course.grading import EXERCISES

E, S, D = "ex01_expert", "ex01_softmax_gate", "ex01_dense_moe"
TIMEOUT = 10  # seconds per cell and per exercise's checks, for both graders
MEMORY_MB = 1536  # address space of a learner's process under the pytest grader
# Argument of the `sleep` processes that spawning cases start (about 27 s): unique to this
# test process, so that runs of this file elsewhere on the machine are not counted here.
SLEEPER = f"27.{os.getpid():07d}"


@dataclass(frozen=True)
class Case:
    name: str  # the student id of the case's submission
    what: str  # what the submission does, as the README's table says it
    edits: dict[str, str] | None  # answer cell -> source (None: the untouched release)
    ours: tuple[int, int, int]  # points from the pytest grader: Expert, softmax_gate, dense_moe
    nbgrader: tuple[int, int, int] | str  # what nbgrader autograde gave, or what happened
    nbgrader_else: tuple[int, int, int] | None = None  # another outcome seen, load-dependent
    meta: tuple[str, ...] = ()  # answer cells whose metadata is made a tests cell's


SOL = solution_sources(NB01)
WRONG_SOFTMAX = "def softmax_gate(x, w_gate):\n    return torch.softmax(x @ w_gate, dim=0)\n"
WRONG_DENSE = ("def dense_moe(x, experts, w_gate):\n    gates = softmax_gate(x, w_gate)\n"
               "    return torch.zeros_like(x), gates\n")

STEAL = ("import json\n\ndef _steal(path, gid='ex01_dense_moe'):\n"
         "    nb = json.load(open(path))\n"
         "    for cell in nb['cells']:\n"
         "        if cell.get('metadata', {}).get('nbgrader', {}).get('grade_id') == gid:\n"
         "            src = cell['source']\n"
         "            exec(''.join(src) if isinstance(src, list) else src, globals())\n\n")
FIND_VIA_PROC = (
    "import os\nfound = None\nfor pid in os.listdir('/proc'):\n    if not pid.isdigit():\n"
    "        continue\n    texts = []\n    for name in ('cmdline', 'environ'):\n        try:\n"
    "            texts.append(open(f'/proc/{pid}/{name}', 'rb').read().decode(errors='replace')"
    ")\n        except OSError:\n            pass\n    try:\n"
    "        texts.append(os.readlink(f'/proc/{pid}/cwd'))\n    except OSError:\n"
    "        pass\n    for text in texts:\n        for part in text.replace('\\0', ' ').split():\n"
    "            part = part.split('=', 1)[-1]\n            if '/submitted' in part:\n"
    "                found = part.split('/submitted')[0] + '/submitted'\n"
    "            elif os.path.isdir(os.path.join(part, 'submitted')):\n"
    "                found = os.path.join(part, 'submitted')\n"
    "if found:\n    _steal(os.path.join(found, 'correct', '__NB__', 'experts_and_gating.ipynb'))\n")
SOLUTIONS = (
    "import glob, os, moe_course\nrepo = os.path.dirname(os.path.dirname(moe_course.__file__))\n"
    "for path in glob.glob(os.path.join(repo, 'solutions', '__NB__', '*.ipynb')):\n"
    "    _steal(path)\n")
HANGS = ("\nimport signal\n\ndef warm_up():\n    signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
         "    while True:\n        pass\n")
SWALLOWS = ("\nimport time\n\ndef settle():\n    while True:\n        try:\n"
            "            time.sleep(0.05)\n        except BaseException:\n            pass\n")
METADATA = (
    "\nimport os\nfor target in ['__CORRECT__', '__OUT__', '__SUID__']:\n    try:\n"
    "        fd = os.open(target, os.O_RDONLY)\n    except OSError:\n        continue\n"
    "    for change in (lambda: os.fchmod(fd, 0o6777), lambda: os.fchown(fd, 4242, 4242),\n"
    "                   lambda: os.utime(fd, (0, 0)), lambda: os.chmod(target, 0o6777),\n"
    "                   lambda: os.utime(target, (0, 0))):\n        try:\n"
    "            change()\n        except OSError:\n            pass\n")
FLAGS = (
    "\nimport fcntl, os, struct\nfor target in ['__CORRECT__', '__OUT__', '__SUID__']:\n"
    "    try:\n        fd = os.open(target, os.O_RDONLY)\n    except OSError:\n        continue\n"
    "    for change in (lambda: os.setxattr(fd, 'user.pwned', b'1'),\n"
    "                   lambda: os.setxattr(fd, 'security.capability', bytes(20)),\n"
    "                   lambda: fcntl.ioctl(fd, 0x40086602, struct.pack('l', 0x10))):\n"
    "        try:\n            change()\n        except OSError:\n            pass\n")
UNIX_OUT = (
    "\nimport socket\nfor address in ['__SOCK__', '\\0__ABSTRACT__']:\n    try:\n"
    "        s = socket.socket(socket.AF_UNIX)\n        s.settimeout(2)\n"
    "        s.connect(address)\n        s.sendall(b'pwned')\n    except OSError:\n        pass\n")
C_SOCKET_OUT = (
    "\nimport ctypes, struct\nlibc = ctypes.CDLL(None)\nfor name in [b'__SOCK__', "
    "b'\\0__ABSTRACT__']:\n    fd = libc.socket(1, 1, 0)\n    if fd >= 0:\n"
    "        addr = struct.pack('H108s', 1, name)\n"
    "        if libc.connect(fd, addr, 2 + len(name)) == 0:\n"
    "            libc.send(fd, b'pwned', 5, 0)\ntry:\n    import zmq\n"
    "    push = zmq.Context.instance().socket(zmq.PUSH)\n"
    "    push.connect('ipc://__SOCK__')\n    push.send(b'pwned', zmq.NOBLOCK)\n"
    "except Exception:\n    pass\n")
TCP_OUT = ("\nimport socket\ntry:\n    socket.create_connection(('127.0.0.1', __PORT__), "
           "timeout=2).sendall(b'pwned')\nexcept OSError:\n    pass\n")
CASES = [
    Case("correct", "control: the solution", {}, (2, 1, 2), (2, 1, 2)),
    Case("blank", "control: the release, untouched", None, (0, 0, 0), (0, 0, 0)),
    Case("loop_in_function", "an infinite loop inside a function",
         {D: "def dense_moe(x, experts, w_gate):\n    while True:\n        pass\n"},
         (2, 1, 0), (2, 1, 0)),
    Case("swallowed_interrupt", "a top-level loop that swallows KeyboardInterrupt",
         {D: SOL[D] + "\nimport time\nwhile True:\n    try:\n        time.sleep(0.05)\n"
                      "    except BaseException:\n        pass\n"},
         (2, 1, 0), (0, 0, 0)),
    Case("memory_bomb", "a memory bomb (512 MiB more per step, until it fails)",
         {D: "def dense_moe(x, experts, w_gate):\n    hog = []\n    while True:\n"
             "        hog.append(torch.ones(2 ** 27))\n"},
         (2, 1, 0), (2, 1, 0)),
    Case("os_exit_at_import", "`os._exit(0)` at import (in an answer cell)",
         {E: SOL[E] + "\nimport os\nos._exit(0)\n"}, (0, 1, 2), (0, 0, 0)),
    Case("sys_exit_at_import", "`sys.exit()` at import (in an answer cell)",
         {S: SOL[S] + "\nimport sys\nsys.exit('bye')\n"}, (2, 1, 2), (2, 1, 2)),
    Case("exit_in_function", "`os._exit` inside a checked function",
         {D: "import os\n\ndef dense_moe(x, experts, w_gate):\n    os._exit(3)\n"},
         (2, 1, 0), (0, 0, 0)),
    Case("fork_bomb", "a fork bomb (200 forks, each child sleeping 27 s)",
         {E: SOL[E] + "\nimport os\nforked = 0\ntry:\n    for _ in range(200):\n"
                      "        if os.fork() == 0:\n"
                      f"            os.execv('/bin/sleep', ['sleep', '{SLEEPER}'])\n"
                      "        forked += 1\nexcept OSError:\n    pass\n"
                      "print(f'started {forked} processes')\n"},
         (2, 1, 2), (2, 1, 2)),
    Case("spawn_past_audit", "subprocesses after disabling `sys.audit`",
         {E: SOL[E] + "\nimport subprocess, sys\nsys.audit = lambda *args: None\nstarted = 0\n"
                      "try:\n    for _ in range(50):\n"
                      f"        subprocess.Popen(['/bin/sleep', '{SLEEPER}'])\n"
                      "        started += 1\nexcept OSError:\n    pass\n"
                      "print(f'started {started} processes')\n"},
         (2, 1, 2), (2, 1, 2)),
    Case("background_writer", "a background process that writes a file 3 s later",
         {E: SOL[E] + "\nimport subprocess, sys\nsubprocess.Popen([sys.executable, '-c', "
                      "\"import time; time.sleep(3); open('__CANARY__', 'w').write('late')\"],"
                      " start_new_session=True)\n"},
         (2, 1, 2), (2, 1, 2)),
    Case("writes_gradebook", "writing grades.csv, the output folder and another submission",
         {S: SOL[S] + "\nfor target in ['__OUT__/grades.csv', '__OUT__/grades.json', "
                      "'__OUT__/feedback/mallory.md', '__VICTIM__', '__CANARY__']:\n"
                      "    try:\n        with open(target, 'w') as f:\n"
                      "            f.write('mallory,01_experts_and_gating,ex01_expert,999,2\\n')\n"
                      "    except OSError:\n        pass\ntry:\n"
                      "    torch.save(torch.ones(1), '__OUT__/evil.pt')\nexcept Exception:\n"
                      "    pass\n"},
         (2, 1, 2), (2, 1, 2)),
    Case("patches_torch", "monkeypatching `torch.testing.assert_close`, `torch.allclose`, "
                          "`torch.equal`, `torch.isclose` (and a wrong softmax_gate)",
         {S: WRONG_SOFTMAX + "\nimport torch.testing\n"
                             "torch.testing.assert_close = lambda *args, **kwargs: None\n"
                             "torch.allclose = lambda *args, **kwargs: True\n"
                             "torch.equal = lambda *args, **kwargs: True\n"
                             "torch.isclose = lambda a, b, *args, **kwargs: torch.ones("
                             "torch.broadcast_shapes(a.shape, b.shape), dtype=torch.bool)\n"},
         (2, 0, 0), (2, 1, 2)),
    Case("patches_checks", "monkeypatching `moe_course` and the registry's checks (and a "
                           "wrong dense_moe)",
         {D: WRONG_DENSE + "\nimport dataclasses\nimport moe_course.grading as grading\n"
                           "import moe_course.routing\n"
                           "check = lambda *args, **kwargs: print('all checks passed')\n"
                           "grading.check = grading.runner.check = check\n"
                           "grading.probe.close = lambda *args, **kwargs: True\n"
                           "moe_course.routing.dense_moe = dense_moe\n"
                           "grading.EXERCISES['ex01_dense_moe'] = dataclasses.replace("
                           "grading.EXERCISES['ex01_dense_moe'], visible=(), hidden=())\n"},
         (2, 1, 0), (2, 1, 2)),
    Case("lying_objects", "a tensor subclass and an object whose `__eq__` lies",
         {D: "class Liar(torch.Tensor):\n    def __eq__(self, other):\n        return True\n\n"
             "    __hash__ = torch.Tensor.__hash__\n\n\nclass AlwaysEqual:\n"
             "    def __eq__(self, other):\n        return True\n\n\n"
             "def dense_moe(x, experts, w_gate):\n"
             "    return torch.zeros(x.shape).as_subclass(Liar), AlwaysEqual()\n"},
         (2, 1, 0), (2, 1, 0)),
    Case("print_flood", "printing 300 MB",
         {E: SOL[E] + "\nfor _ in range(300):\n    print('x' * 1_000_000)\n"},
         (2, 1, 2), (2, 1, 2), (0, 0, 0)),
    Case("syntax_error", "a syntax error", {E: "class Expert(nn.Module:\n    pass\n"},
         (0, 1, 2), (0, 1, 2)),
    Case("missing_name", "a missing name (dense_moe renamed)",
         {D: SOL[D].replace("def dense_moe(", "def dense_mixture(")}, (2, 1, 0), (2, 1, 0)),
    Case("wrong_signature", "a wrong signature (Expert takes a third argument)",
         {E: SOL[E].replace("def __init__(self, d_model, d_hidden):",
                            "def __init__(self, d_model, d_hidden, dropout):")},
         (0, 1, 2), (0, 1, 2)),
    Case("nan_outputs", "NaN outputs",
         {D: "def dense_moe(x, experts, w_gate):\n    gates = softmax_gate(x, w_gate)\n"
             "    return torch.full_like(x, float('nan')), gates\n"},
         (2, 1, 0), (2, 1, 0)),
    Case("calls_reference", "calling the reference (`moe_course.gating.softmax_gate`)",
         {S: "import moe_course.gating\n\ndef softmax_gate(x, w_gate):\n"
             "    return moe_course.gating.softmax_gate(x, w_gate)\n"},
         (2, 0, 2), (2, 0, 2)),
    Case("copies_reference", "calling a copy of the reference's function object",
         {S: "import types\nimport moe_course.gating\n_ref = moe_course.gating.softmax_gate\n"
             "_copy = types.FunctionType(_ref.__code__, _ref.__globals__, 'softmax_gate')\n\n"
             "def softmax_gate(x, w_gate):\n    return _copy(x, w_gate)\n"},
         (2, 0, 2), (2, 0, 2)),
    Case("steals_a_file", "reading another student's notebook and running its answer",
         {D: STEAL + "_steal('__CORRECT__')\n"}, (2, 1, 0), (2, 1, 2)),
    Case("steals_via_proc", "finding the class's folder in other processes' `/proc` "
                            "(cmdline, environ, cwd) and running another student's answer",
         {D: STEAL + FIND_VIA_PROC.replace("__NB__", NB01)}, (2, 1, 0), (2, 1, 2)),
    Case("reads_solutions", "running the instructor's answer from the course repository's "
                            "`solutions/`",
         {D: STEAL + SOLUTIONS.replace("__NB__", NB01)}, (2, 1, 0), (2, 1, 2)),
    Case("reads_root_only", "running an answer read from a root-only (0600) file of the "
                            "grader's",
         {D: STEAL + "_steal('__SECRET__')\n"}, (2, 1, 0), (2, 1, 2)),
    Case("changes_metadata", "`fchmod`/`fchown`/`utime` (through an `O_RDONLY` descriptor "
                             "and by path) on another notebook, the output folder and a "
                             "root-owned program",
         {E: SOL[E] + METADATA}, (2, 1, 2), (2, 1, 2)),
    Case("sets_flags", "`setxattr` (a file capability too) and the immutable flag (`ioctl`) "
                       "on the same three",
         {E: SOL[E] + FLAGS}, (2, 1, 2), (2, 1, 2)),
    Case("unix_socket_out", "connecting to a path and an abstract unix socket outside",
         {E: SOL[E] + UNIX_OUT}, (2, 1, 2), (2, 1, 2)),
    Case("c_socket_out", "the same from C (libc through ctypes, and zmq over `ipc://`)",
         {E: SOL[E] + C_SOCKET_OUT}, (2, 1, 2), (2, 1, 2)),
    Case("tcp_out", "connecting to a TCP listener on the grader's 127.0.0.1",
         {E: SOL[E] + TCP_OUT}, (2, 1, 2), (2, 1, 2)),
    Case("hang_called_again", "a helper that ignores SIGINT and loops forever, called "
                              "again by the next two answer cells",
         {E: SOL[E] + HANGS, S: SOL[S] + "\nwarm_up()\n", D: SOL[D] + "\nwarm_up()\n"},
         (2, 1, 2), (0, 0, 0)),
    Case("hang_swallowed", "a helper that swallows KeyboardInterrupt in a loop, called "
                           "again by the next two answer cells",
         {E: SOL[E] + SWALLOWS, S: SOL[S] + "\nsettle()\n", D: SOL[D] + "\nsettle()\n"},
         (2, 1, 2), (0, 0, 0)),
    Case("raises_interrupt", "`raise KeyboardInterrupt` inside a checked function",
         {D: "def dense_moe(x, experts, w_gate):\n    raise KeyboardInterrupt\n"},
         (2, 1, 0), (2, 1, 0)),
    Case("interrupt_at_import", "`raise KeyboardInterrupt` at import (in an answer cell)",
         {S: SOL[S] + "\nraise KeyboardInterrupt('not the grader')\n"}, (2, 1, 2), (2, 1, 2)),
    Case("huge_int", "returning `10**100000`",
         {D: "def dense_moe(x, experts, w_gate):\n    return 10 ** 100000\n"},
         (2, 1, 0), (2, 1, 0)),
    Case("huge_int_nested", "returning a tensor and `-(10**5000)`",
         {D: "def dense_moe(x, experts, w_gate):\n    return torch.zeros_like(x), "
             "-(10 ** 5000)\n"}, (2, 1, 0), (2, 1, 0)),
    Case("tampered_answer", "an answer cell's metadata changed to `grade: true, solution: "
                            "false` (a tests cell)", {}, (2, 1, 0), (0, 0, 0), meta=(D,)),
    Case("tampered_two", "two answer cells' metadata changed the same way", {}, (0, 1, 0),
         (0, 0, 0), meta=(E, D)),
    Case("victim", "control: the solution, which writes_gradebook tries to overwrite", {},
         (2, 1, 2), (0, 0, 0)),
]
BY_NAME = {case.name: case for case in CASES}


class World:
    """What the cases aim at outside their sandbox: the output folder, the other students'
    notebooks, a canary folder, a root-only file holding an answer, a root-owned program,
    and listeners on a path unix socket, an abstract one and TCP on 127.0.0.1 that count
    every connection made to them."""

    def __init__(self, tmp: Path, out: Path, submitted: Path) -> None:
        self.tmp, self.out, self.submitted = tmp, out, submitted
        self.canaries = tmp / "canaries"
        self.canaries.mkdir()
        self.secret = tmp / "secret" / "answer.ipynb"
        self.secret.parent.mkdir()
        nbformat.write(submission(NB01), self.secret)
        self.secret.chmod(0o600)
        self.program = tmp / "program"
        self.program.mkdir()
        self.program = self.program / "tool"
        self.program.write_text("#!/bin/sh\necho hello\n")
        self.program.chmod(0o755)
        self.connections: list[str] = []
        self.abstract = f"moe-adversarial-{os.getpid()}-{tmp.name}"
        self.socket_path = str(tmp / "ipc.sock")
        self._servers = []
        for family, address in ((socket.AF_UNIX, self.socket_path),
                                (socket.AF_UNIX, "\0" + self.abstract),
                                (socket.AF_INET, ("127.0.0.1", 0))):
            server = socket.socket(family, socket.SOCK_STREAM)
            server.bind(address)
            server.listen(64)
            self._servers.append(server)
            threading.Thread(target=self._accept, args=(server,), daemon=True).start()
        self.port = self._servers[2].getsockname()[1]

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            self.connections.append(str(server.getsockname()))
            conn.close()

    def close(self) -> None:
        for server in self._servers:
            server.close()

    def fill(self, case: Case) -> dict[str, str]:
        return {"__OUT__": str(self.out), "__CANARY__": str(self.canaries / f"{case.name}.txt"),
                "__VICTIM__": str(self.notebook("victim")),
                "__CORRECT__": str(self.notebook("correct")), "__SECRET__": str(self.secret),
                "__SUID__": str(self.program), "__SOCK__": self.socket_path,
                "__ABSTRACT__": self.abstract, "__PORT__": str(self.port)}

    def notebook(self, student: str) -> Path:
        return self.submitted / student / NB01 / "experts_and_gating.ipynb"

    def fingerprint(self) -> dict[str, tuple]:
        """Mode, owner, times, extended attributes and inode flags of what the metadata cases
        aim at (of the output folder, whose contents the grader changes, only whether its
        times are recent: the cases set them to 1970)."""
        found = {}
        for path in (self.notebook("correct"), self.out, self.program):
            st = os.stat(path)
            times = st.st_mtime_ns if path.is_file() else (st.st_mtime_ns > 10 ** 18
                                                            and st.st_atime_ns > 10 ** 18)
            found[str(path)] = (st.st_mode, st.st_uid, st.st_gid, times,
                                sorted(os.listxattr(path)), _inode_flags(path))
        return found


def _inode_flags(path: Path) -> int:
    """The inode flags (FS_IOC_GETFLAGS), 0 where the file system has none."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return struct.unpack("l", fcntl.ioctl(fd, 0x80086601, struct.pack("l", 0)))[0]
    except OSError:
        return 0
    finally:
        os.close(fd)


def _clear_immutable(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        flags = struct.unpack("l", fcntl.ioctl(fd, 0x80086601, struct.pack("l", 0)))[0]
        fcntl.ioctl(fd, 0x40086602, struct.pack("l", flags & ~0x10))
    except OSError:
        pass
    finally:
        os.close(fd)


def _notebook(case: Case, fill: dict[str, str]):
    if case.edits is None:
        return graded_only(submission(NB01, solved=set()))
    edits = {}
    for gid, source in case.edits.items():
        for key, value in fill.items():
            source = source.replace(key, value)
        edits[gid] = source
    nb = graded_only(submission(NB01, edits=edits))
    for cell in nb.cells:
        grading = cell.metadata.get("nbgrader", {})
        if grading.get("grade_id") in case.meta:
            grading.update(grade=True, solution=False, points=grading.get("points", 1))
    return nb


def _build(world: World) -> dict[str, Path]:
    """Write every case's submission under submitted/<case>/01_.../; return their paths."""
    return {case.name: write_submission(world.submitted, case.name, NB01, _notebook(
        case, world.fill(case))) for case in CASES}


def _sleepers() -> list[int]:
    """Pids of the `sleep 27.1828` processes that the spawning cases try to start."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if cmdline[:2] == [b"sleep", SLEEPER.encode()] or cmdline[1:3] == [
                    b"sleep", SLEEPER.encode()]:
                found.append(int(entry))
    return found


def _kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# -- the pytest grader ----------------------------------------------------------------------

TREE = ["a b", "a_b", os.fsdecode(b"caf\xe9")]  # more students: names that collide or are not UTF-8


def _tree_attacks(world: World) -> None:
    """A class tree built to stop a run: students whose names sanitise alike or are not
    UTF-8, a notebook symlinked to a file outside the tree, a student folder symlinked to
    another's."""
    for student in TREE:
        write_submission(world.submitted, student, NB01, submission(NB01))
    linked = world.submitted / "linked" / NB01
    linked.mkdir(parents=True)
    (linked / "experts_and_gating.ipynb").symlink_to(world.secret)
    (world.submitted / "alias").symlink_to(world.submitted / "correct")


@pytest.fixture(scope="module")
def graded(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One `moe-course grade --jobs 2` run over every case (as root, as the tests run)."""
    tmp = tmp_path_factory.mktemp("adversarial")
    out = tmp / "grades"
    out.mkdir()
    world = World(tmp, out, tmp / "submitted")
    paths = _build(world)
    _tree_attacks(world)
    victim_bytes = paths["victim"].read_bytes()
    before = world.fingerprint()
    status, seconds, log = run_grade([tmp / "submitted"], out, "--jobs", "2", "--timeout",
                                     str(TIMEOUT), "--memory", str(MEMORY_MB))
    time.sleep(4)  # anything left behind would write now (the background writer waits 3 s)
    world.close()
    changed = before != world.fingerprint()
    for path in (world.notebook("correct"), out, world.program):
        _clear_immutable(path)  # so that the temporary folder can be removed
    return {"status": status, "seconds": seconds, "log": log, "out": out,
            "canaries": world.canaries, "victim": paths["victim"],
            "victim_bytes": victim_bytes, "sleepers": _sleepers(),
            "report": json.loads((out / "grades.json").read_text()),
            "changed": changed, "connections": world.connections}


@pytest.mark.slow
@pytest.mark.xdist_group("adversarial")
@pytest.mark.parametrize("name", [case.name for case in CASES])
def test_each_case_gets_its_correct_points(graded: dict, name: str) -> None:
    grades = read_grades(graded["out"])
    got = tuple(grades[(name, NB01, gid)][0] for gid in (E, S, D))
    assert got == BY_NAME[name].ours, (name, got, _messages(graded, name))


def _messages(graded: dict, name: str) -> dict:
    (sub,) = [s for s in graded["report"]["submissions"] if s["student"] == name]
    return {"cells": sub["cell_errors"], "checks": {e["exercise"]: [
        c["message"] for c in e["checks"] if not c["passed"]] for e in sub["exercises"]}}


@pytest.mark.slow
@pytest.mark.xdist_group("adversarial")
def test_the_run_ends_within_its_limits_and_says_why(graded: dict) -> None:
    assert graded["status"] == 1, graded["log"][-3000:]  # 1: two symlinks were not graded
    assert not graded["report"]["complete"] and not graded["report"]["errors"]
    # Every wall is up; the own uid only while the Python installation is readable by other
    # users (on this machine it is under /root, whose mode others change): without it the
    # user namespace takes root's powers, and the grader said so.
    isolation = graded["report"]["isolation"]
    assert [w for w in graded["report"]["walls_down"] if not w.startswith("no own uid")] == []
    assert isolation["user_namespace"] and isolation["landlock"] >= 6 and isolation["seccomp"]
    workers = [{e["worker"] for e in sub["exercises"]} for sub in graded["report"]["submissions"]]
    assert all(len(w) == 1 for w in workers), workers  # each notebook ran on one worker, once
    assert set().union(*workers) == {"gw0", "gw1"}
    assert graded["seconds"] < 300, graded["seconds"]
    why = {name: json.dumps(_messages(graded, name)) for name in BY_NAME}
    assert "time limit" in why["loop_in_function"]
    assert "could not be interrupted" in why["swallowed_interrupt"]
    assert "exit status 0" in why["os_exit_at_import"]
    assert "exit status 3" in why["exit_in_function"]
    assert "memory" in why["memory_bomb"]
    softmax_checks = len(EXERCISES[S].visible + EXERCISES[S].hidden)
    assert why["calls_reference"].count("implement it yourself") == softmax_checks  # every one
    assert "implement it yourself" in why["copies_reference"]
    assert "does not define dense_moe" in why["missing_name"]
    assert "SyntaxError" in why["syntax_error"]
    assert "NaN" in why["nan_outputs"]
    for name in ("hang_called_again", "hang_swallowed"):
        assert "does not run it again" in why[name], why[name]
    assert "raised KeyboardInterrupt" in why["raises_interrupt"]
    assert "KeyboardInterrupt: not the grader" in why["interrupt_at_import"]
    for name in ("raises_interrupt", "interrupt_at_import", "huge_int", "huge_int_nested"):
        assert "time limit" not in why[name] and "protocol" not in why[name], why[name]
    assert "integer of" in why["huge_int"] and "integer of" in why["huge_int_nested"]
    checks = {gid: len(EXERCISES[gid].visible + EXERCISES[gid].hidden) for gid in (E, D)}
    assert why["tampered_answer"].count("tampering") == checks[D]  # every dense_moe check
    assert why["tampered_two"].count("tampering") == checks[E] + checks[D]  # and Expert's


@pytest.mark.slow
@pytest.mark.xdist_group("adversarial")
def test_learner_code_reaches_nothing_outside(graded: dict) -> None:
    """No metadata change (mode, owner, times, xattrs, inode flags) landed, and no
    connection reached the listeners on a path or abstract unix socket or on TCP."""
    assert not graded["changed"]
    assert graded["connections"] == []


@pytest.mark.slow
@pytest.mark.xdist_group("adversarial")
def test_a_bad_tree_costs_nobody_their_gradebook(graded: dict) -> None:
    """Names that sanitise alike get two feedback pages, a name that is not UTF-8 is graded
    under an escaped name, and each symlink is listed as skipped, with its reason."""
    report = graded["report"]
    students = {s["student"] for s in report["submissions"]}
    assert {"a b", "a_b", "caf\\xe9"} <= students
    grades = read_grades(graded["out"])
    for student in ("a b", "a_b", "caf\\xe9"):
        assert [grades[(student, NB01, gid)][0] for gid in (E, S, D)] == [2, 1, 2]
    pages = [p.read_text() for p in (graded["out"] / "feedback").glob("*/*.md")]
    assert sum("feedback for a b" in p for p in pages) == 1
    assert sum("feedback for a_b" in p for p in pages) == 1
    skipped = {Path(s["path"]).name: s["reason"] for s in report["skipped"]}
    assert sorted(skipped) == ["alias", "experts_and_gating.ipynb"], skipped
    assert all("symlink" in reason for reason in skipped.values())
    assert "linked" not in students and "alias" not in students


@pytest.mark.slow
@pytest.mark.xdist_group("adversarial")
def test_nothing_is_written_outside_the_sandboxes(graded: dict) -> None:
    out = graded["out"]
    assert sorted(p.name for p in out.iterdir()) == ["feedback", "grades.csv", "grades.json"]
    from moe_course.grading.autograde.grade import printable, safe_name

    assert sorted(p.name for p in (out / "feedback").iterdir()) == sorted(
        safe_name(n) for n in [*BY_NAME, *map(printable, TREE)])
    assert len(read_grades(out)) == 3 * (len(CASES) + len(TREE))  # no row for "mallory"
    assert list(graded["canaries"].iterdir()) == []
    assert graded["victim"].read_bytes() == graded["victim_bytes"]
    assert graded["sleepers"] == []


@pytest.mark.slow
@pytest.mark.xdist_group("adversarial")
def test_feedback_shows_hidden_checks_only_as_passed_or_failed(graded: dict) -> None:
    page = (graded["out"] / "feedback" / "blank" / f"{NB01}.md").read_text()
    assert "hidden check 1: failed" in page and "not implemented yet" in page
    assert "raised NotImplementedYet" not in page  # the check's own message, not wrapped
    for gid in (E, S, D):
        visible = [p.name for p in EXERCISES[gid].visible]
        for probe in EXERCISES[gid].hidden:
            # A hidden name inside a visible one could not be told from a leak: none is.
            assert not any(probe.name in name for name in visible), (probe.name, visible)
            assert probe.name not in page


# -- nbgrader autograde on the same notebooks -----------------------------------------------

@pytest.fixture(scope="module")
def autograded(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """nbgrader autograde, one student at a time in CASES order, each with a 150 s limit."""
    tmp = tmp_path_factory.mktemp("nbgrader-adversarial")
    root, env = nbgrader_course(tmp, [NB01], timeout=TIMEOUT)
    out = tmp / "exports"
    out.mkdir()
    world = World(tmp, out, root / "submitted")
    paths = _build(world)
    victim_bytes = paths["victim"].read_bytes()
    before = world.fingerprint()

    outcome: dict[str, tuple | str] = {}
    seconds: dict[str, float] = {}
    sleepers: dict[str, int] = {}  # spawned processes still alive after the case's run
    logs = tmp / "logs"
    logs.mkdir()
    # Each case is one `nbgrader autograde` process in its own session, forked from a
    # process that imported nbgrader once (`tests/nbgrader_forks.py`: 3 s less per case).
    # nbgrader sets no limits: a 6 GiB address-space cap stands in for a container's.
    with NbgraderForks(root, env) as forks:
        for case in CASES:
            start = time.perf_counter()
            status = forks.run(["autograde", NB01, "--student", case.name, "--force"],
                               timeout=150, memory=6 << 30, log=logs / f"{case.name}.log")
            if status is None:
                outcome[case.name] = "hang"
                _kill_kernels(root)
            else:
                scores = nbgrader_scores(root, NB01, case.name)
                outcome[case.name] = "not graded" if scores is None else tuple(
                    int(scores[gid]) for gid in (E, S, D))
            seconds[case.name] = time.perf_counter() - start
            alive = _sleepers()
            sleepers[case.name] = len(alive)
            _kill(alive)
    slowest = sorted(seconds.items(), key=lambda item: -item[1])[:8]
    print(f"nbgrader autograde, {len(CASES)} cases in {sum(seconds.values()):.0f} s; slowest: "
          + ", ".join(f"{name} {s:.1f} s" for name, s in slowest))
    time.sleep(4)  # the background writer waits 3 s
    started = {}  # what the spawning cases printed in their autograded notebooks
    for name in ("fork_bomb", "spawn_past_audit"):
        graded = root / "autograded" / name / NB01 / paths[name].name
        found = graded.exists() and re.search(r"started (\d+) processes", graded.read_text())
        started[name] = int(found[1]) if found else None
    changed = before != world.fingerprint()
    for path in (world.notebook("correct"), out, world.program):
        _clear_immutable(path)  # so that the temporary folder can be removed
    world.close()
    return {"outcome": outcome, "seconds": seconds, "out": out, "canaries": world.canaries,
            "victim_changed": paths["victim"].read_bytes() != victim_bytes,
            "started": started, "sleepers": {name: n for name, n in sleepers.items() if n},
            "changed": changed, "connections": world.connections}


def _kill_kernels(root: Path) -> None:
    """Kernels that nbgrader left running for a timed-out autograde of this course."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
                cwd = os.readlink(f"/proc/{entry}/cwd")
            except OSError:
                continue
            if b"ipykernel_launcher" in cmdline and cwd.startswith(str(root)):
                _kill([int(entry)])


@pytest.mark.slow
@pytest.mark.xdist_group("adversarial-nbgrader")
@pytest.mark.parametrize("name", [case.name for case in CASES])
def test_nbgrader_does_what_the_readme_says(autograded: dict, name: str) -> None:
    case = BY_NAME[name]
    assert autograded["outcome"][name] in (case.nbgrader, case.nbgrader_else), (
        name, autograded["outcome"][name], autograded["seconds"][name])


@pytest.mark.slow
@pytest.mark.xdist_group("adversarial-nbgrader")
def test_nbgrader_lets_submissions_write_and_spawn(autograded: dict) -> None:
    """What the table's notes say: under nbgrader, files outside the notebook get written,
    another submission is overwritten, every process the spawning cases ask for starts (they
    end with the kernel's process group), and one that starts its own session outlives it."""
    written = sorted(p.name for p in autograded["canaries"].iterdir())
    assert written == ["background_writer.txt", "writes_gradebook.txt"]
    assert sorted(p.name for p in autograded["out"].iterdir()) == ["evil.pt", "grades.csv",
                                                                   "grades.json"]
    assert autograded["victim_changed"]
    assert autograded["started"] == {"fork_bomb": 200, "spawn_past_audit": 50}
    assert autograded["sleepers"] == {}
    assert autograded["changed"]  # modes, owners, times, xattrs or flags outside
    assert len(autograded["connections"]) >= 3  # path, abstract and TCP


# -- the README's table ---------------------------------------------------------------------

def _cell(points: tuple | str, otherwise: tuple | None = None) -> str:
    text = " / ".join(map(str, points)) if isinstance(points, tuple) else points
    return text if otherwise is None else f"{text} or {_cell(otherwise)}"


def test_readme_table_matches_the_cases() -> None:
    """Each case is a row `| name | what | pytest grader | nbgrader | ... |` in the README's
    grading section, with the points (Expert / softmax_gate / dense_moe) the tests assert."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Grading with the pytest grader"):]
    rows = {m[1]: [c.strip() for c in m[2].split("|")]
            for m in re.finditer(r"^\| `(\w+)` \|(.*)\|$", section, re.MULTILINE)}
    assert sorted(rows) == sorted(BY_NAME)
    for case in CASES:
        what, ours, theirs = rows[case.name][:3]
        assert (what, ours, theirs) == (case.what, _cell(case.ours),
                                        _cell(case.nbgrader, case.nbgrader_else)), case.name


# -- a grader that is not root ----------------------------------------------------------------

NON_ROOT = ["correct", "blank", "steals_a_file", "steals_via_proc", "reads_solutions",
            "reads_root_only", "writes_gradebook", "changes_metadata", "sets_flags",
            "unix_socket_out", "c_socket_out", "tcp_out", "fork_bomb"]


@pytest.mark.slow
def test_a_grader_that_is_not_root_walls_learners_in_the_same(tmp_path: Path) -> None:
    """The grader as uid 1000 with no capability (in a user namespace made by `unshare
    --user --map-user=1000`: outside it, its files are still root's, so only the walls keep
    a learner from the root-only file and the others' notebooks): no own uid per sandbox,
    the sandboxes nest their own namespaces, and every case gets the root run's points."""
    out = tmp_path / "grades"
    out.mkdir()
    world = World(tmp_path, out, tmp_path / "submitted")
    for case in CASES:
        if case.name in NON_ROOT:
            write_submission(world.submitted, case.name, NB01, _notebook(case, world.fill(case)))
    before = world.fingerprint()
    done = subprocess.run(
        ["unshare", "--user", "--map-user=1000", "--map-group=1000", "--",
         sys.executable, "-m", "moe_course.cli", "grade", str(world.submitted), "--out",
         str(out), "--jobs", "2", "--timeout", str(TIMEOUT), "--memory", str(MEMORY_MB),
         "--require-isolation"],
        cwd=ROOT, capture_output=True, text=True, env=jupyter_env(tmp_path / "env"))
    world.close()
    changed = before != world.fingerprint()
    for path in (world.notebook("correct"), out, world.program):
        _clear_immutable(path)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    report = json.loads((out / "grades.json").read_text())
    assert report["isolation"]["own_uid"] is False and report["walls_down"] == []
    assert report["isolation"]["user_namespace"] and report["isolation"]["landlock"] >= 6
    grades = read_grades(out)
    for name in NON_ROOT:
        got = tuple(grades[(name, NB01, gid)][0] for gid in (E, S, D))
        assert got == BY_NAME[name].ours, (name, got)
    assert not changed and world.connections == []
    assert sorted(p.name for p in out.iterdir()) == ["feedback", "grades.csv", "grades.json"]
    assert list(world.canaries.iterdir()) == []
