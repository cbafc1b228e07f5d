"""The learner's side of the pytest grader: run one submission's cells and probes, walled in.

`moe_course.grading.autograde.sandbox` starts a worker for each sandboxed run, in its own
session, working folder and minimal environment: forked by the zygote (`zygote`), or
spawned as ``python -m moe_course.grading.autograde.worker RESULT_FD INPUTS_FD``. The
worker (`_Run`), in named steps:

1. `_read_job`: its job from stdin with `torch.load(weights_only=True)`: the notebook's code
   cells, where each exercise is checked (at its tests cell), the resource limits
   (`apply_limits`), the uid a root grader hands it and the learner functions that hung in
   an earlier sandbox. Not the probes' inputs: at a probe, inside the exercise's guard, it
   asks for that probe's inputs (an `INPUTS` frame) and reads them from `INPUTS_FD`
   (`_probe_inputs`);
2. `prepare`: takes the assignment's exercises from the registry. The references are left
   untouched: `run_probes` runs an exercise's whole step under `guard.reference_guard`,
   which trips on any *execution* of the exercise's reference code, however the learner
   reached it (an alias, a stored copy, `importlib.reload`, `gc`, `types.FunctionType`);
3. `wall_in`: `walls.install` (own uid, namespaces, Landlock, seccomp: see `walls`) and an
   audit hook that turns the common refusals into readable errors;
4. `run`: the steps in order, reporting each (`protocol`): `run_cell` compiles and executes a
   cell in one `__main__` namespace (an error, `SystemExit` or `KeyboardInterrupt` ends the
   cell, not the run, as in IPython); `run_probes` calls `run_probe` on the learner's object
   for each visible and hidden probe, and its `DONE` frame says whether the guard saw the
   reference run in another thread, or saw its profiler tampered with. A watch thread
   (`_watch`) reports where the learner's code is when a step nears its time limit; a
   function it hung in is made to raise `HangSkipped` from then on (`_skip_hanging`);
5. ends with `os._exit`.

Nothing it reports is trusted: the grader judges every output against the reference in its
own process, and only loads frames with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import builtins
import io
import os
import shlex
import signal
import sys
import types
from collections.abc import Callable
from typing import Any

from . import walls as kernel_walls
from .protocol import (
    CELL,
    CELL_STEP,
    DONE,
    END,
    FRAME_HEADER,
    HANG,
    INPUTS,
    INPUTS_FD,
    PROBE,
    READY,
    START,
)

# ----------------------------------------------------------------------------------------
# Walls: the kernel's (identity, namespaces, Landlock, seccomp) live in `autograde.walls`;
# the audit hook below only turns the common refusals into readable errors.

def install_walls(folder: str, submission: str | None = None,
                  ids: tuple[int, int] | None = None) -> dict[str, Any]:
    """Install what the platform offers of the kernel's walls (`walls.install`), then the
    audit hook; what is up, as `walls.WALLS` names it."""
    walls = kernel_walls.install(folder, submission, ids)
    sys.addaudithook(kernel_walls.audit_hook(folder, bool(walls.get("net_namespace"))))
    walls["audit_hook"] = True
    return walls


def apply_limits(limits: dict[str, int]) -> None:
    """Lower this process's resource limits (never raising a hard limit)."""
    import resource

    def cap(which: int, soft: int, hard: int | None = None) -> None:
        hard = soft if hard is None else hard
        _, current = resource.getrlimit(which)
        if current != resource.RLIM_INFINITY:
            soft, hard = min(soft, current), min(hard, current)
        resource.setrlimit(which, (soft, hard))

    used = resource.getrusage(resource.RUSAGE_SELF)
    cpu = int(used.ru_utime + used.ru_stime) + 1 + limits["cpu_s"]
    cap(resource.RLIMIT_AS, limits["memory_mb"] << 20)
    cap(resource.RLIMIT_FSIZE, limits["file_mb"] << 20)
    cap(resource.RLIMIT_CORE, 0)
    cap(resource.RLIMIT_NOFILE, limits.get("open_files", 256))
    cap(resource.RLIMIT_CPU, cpu, cpu + 5)  # SIGXCPU first, SIGKILL 5 s later
    if limits.get("nproc"):
        cap(resource.RLIMIT_NPROC, limits["nproc"])


# ----------------------------------------------------------------------------------------
# Running cells and probes.


class _Sink(io.TextIOBase):
    """Python-level stdout/stderr while learner code runs: counts characters, keeps none."""

    def __init__(self, fd: int) -> None:
        self.chars = 0
        self._fd = fd

    def write(self, text: str) -> int:
        n = len(text)
        self.chars += n
        return n

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd  # C-level writes go to the bounded log file

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"


def _first_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.strip().split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe_exception(exc: BaseException) -> str:
    """`Type: first line of the message`, without calling anything a learner could hang."""
    name = type(exc).__name__
    try:
        if isinstance(exc, SyntaxError):
            return _first_line(f"{name}: {exc.msg} (line {exc.lineno})")
        message = str(exc)
    except Exception:
        message = "<unprintable message>"
    return _first_line(f"{name}: {message}" if message else name)


class _IPythonStub:
    """What a transformed magic calls. `%%writefile` writes its file (in the sandbox folder),
    `%time`, `%timeit`, `%%time`, `%%timeit`, `%%capture` run their code once, `%run` runs a
    file; other magics do nothing, and shell escapes fail (the sandbox starts no process)."""

    def __init__(self, namespace: dict[str, Any]) -> None:
        self._ns = namespace

    def _run(self, code: str) -> None:
        exec(compile(code, "<magic>", "exec"), self._ns)

    def run_line_magic(self, name: str, line: str, *args: Any) -> None:
        if name in ("time", "timeit"):
            self._run(line)
        elif name == "run":
            path = shlex.split(line)[-1]
            with open(path, encoding="utf-8") as f:
                self._run(f.read())

    def run_cell_magic(self, name: str, line: str, cell: str) -> None:
        if name in ("time", "timeit", "capture", "prun"):
            self._run(cell)
        elif name in ("writefile", "file"):
            words = shlex.split(line)
            append = any(w in ("-a", "--append") for w in words)
            path = [w for w in words if not w.startswith("-")][-1]
            with open(path, "a" if append else "w", encoding="utf-8") as f:
                f.write(cell)

    def system(self, cmd: str) -> None:
        raise PermissionError("the grader's sandbox runs no shell commands")

    getoutput = system


def _transform(source: str) -> str:
    if any(line.lstrip().startswith(("%", "!")) for line in source.splitlines()):
        from IPython.core.inputtransformer2 import TransformerManager

        return TransformerManager().transform_cell(source)
    return source


def _namespace() -> dict[str, Any]:
    main = types.ModuleType("__main__")
    sys.modules["__main__"] = main
    ns = main.__dict__
    ns["__builtins__"] = builtins
    ns["get_ipython"] = lambda: _IPythonStub(ns)
    ns["display"] = lambda *objs, **kwargs: [print(repr(o)) for o in objs] and None
    return ns


class _Interrupted(BaseException):
    """The grader's SIGINT arrived while the worker itself (not learner code) was running."""


class HangSkipped(TimeoutError):
    """A call of a learner function that ran past the time limit before: not run again."""


def _stub(fn: types.FunctionType, message: str) -> None:
    """Make `fn` (in place, so every alias sees it) raise HangSkipped instead of running."""
    free = fn.__code__.co_freevars
    lines = ["def outer():", *(f"    {v} = None" for v in free),
             "    def stub(*args, **kwargs):",
             *([f"        {', '.join(free)}"] if free else []),
             f"        raise HangSkipped({message!r})", "    return stub"]
    source = "\n".join(lines) + "\n"
    scope: dict[str, Any] = {"HangSkipped": HangSkipped}
    exec(compile(source, "<hang stub>", "exec"), scope)
    stub = scope["outer"]().__code__
    fn.__globals__.setdefault("HangSkipped", HangSkipped)
    fn.__code__ = stub.replace(co_name=fn.__code__.co_name)


class _Run:
    """One job, in named steps: read it, set up reporting, prepare the grader's side, wall
    the process in, then run each step (a cell, or an exercise's probes) and report."""

    def __init__(self, out_fd: int, in_fd: int = INPUTS_FD) -> None:
        import threading

        import torch

        torch.set_num_threads(1)
        self.out_fd, self.in_fd = out_fd, in_fd
        self.load = torch.load
        self.write, self.exit_now, self.save = os.write, os._exit, torch.save
        self.frames = sys._current_frames
        self.main_thread = threading.get_ident()
        self.lock = threading.Lock()
        self.job = self._read_job(torch.load)
        self.nonce, self.folder = self.job["nonce"], self.job["folder"]
        self.in_learner = [False]
        self.sigint = [False]  # the grader's SIGINT came during the current step
        self.step: list[Any] = [None, 0.0]  # the step running now, and since when
        self.sampled: dict[int, list[list[Any]]] = {}  # step -> where it hung
        self.hanging = {tuple(h) for h in self.job.get("hanging", [])}
        self.cell_errors: dict[str, str] = {}

    @staticmethod
    def _read_job(load: Callable[..., Any]) -> dict[str, Any]:
        with io.FileIO(0, closefd=False) as stdin:
            job = load(io.BytesIO(stdin.readall()), weights_only=True)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)  # the job (nonce included) cannot be read again
        os.close(null)
        return job

    def send(self, message: dict[str, Any]) -> None:
        buffer = io.BytesIO()
        self.save({**message, "nonce": self.nonce}, buffer)
        data = buffer.getvalue()
        payload = FRAME_HEADER.pack(len(data)) + data
        with self.lock:
            while payload:
                try:
                    payload = payload[self.write(self.out_fd, payload):]
                except InterruptedError:
                    continue
                except OSError:
                    self.exit_now(3)  # the result pipe is gone: nothing more to report

    def prepare(self) -> None:
        """Imports and the registry's exercises (taken before any learner code runs, so
        that a cell that rewrites the registry changes nothing). No reference is touched:
        the guard of `run_probes` watches what runs."""
        import matplotlib

        matplotlib.use("Agg")
        from ..guard import reference_guard
        from ..registry import exercises_for
        from ..runner import run_probe

        self.run_probe, self.reference_guard = run_probe, reference_guard
        self.exercises = {ex.grade_id: ex for ex in exercises_for(self.job["assignment"])
                          if ex.kind != "written"}
        self.probes = {gid: tuple(ex.visible + ex.hidden)
                       for gid, ex in self.exercises.items()}

    def _on_sigint(self, signum: int, frame: Any) -> None:
        self.sigint[0] = True
        if self.in_learner[0]:
            raise KeyboardInterrupt
        raise _Interrupted

    def wall_in(self) -> dict[str, Any]:
        signal.signal(signal.SIGINT, self._on_sigint)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a full log fails writes, not us
        sys.path[0] = self.folder  # like a kernel: files written next to the notebook import
        ids = self.job.get("ids")
        return install_walls(self.folder, self.job.get("submission"),
                             tuple(ids) if ids else None)

    def _watch(self) -> None:
        """A thread: when a step nears the time limit, report where the learner's code is
        (the grader interrupts it then, and may have to kill it)."""
        import time

        timeout = float(self.job["limits"].get("timeout", 60.0))
        while True:
            time.sleep(min(0.1, timeout / 20))
            k, since = self.step
            if k is None or k in self.sampled or time.monotonic() - since < timeout * 0.9:
                continue
            frame = self.frames().get(self.main_thread)
            where: list[list[Any]] = []
            while frame is not None:
                code = frame.f_code
                if code.co_filename.startswith("<cell "):
                    where.append([code.co_filename[6:-1], code.co_name, code.co_firstlineno])
                frame = frame.f_back
            where.reverse()
            self.sampled[k] = where
            try:
                self.send({"type": HANG, "step": k, "where": where})
            except Exception:
                pass

    def _skip_hanging(self, ns: dict[str, Any]) -> None:
        """Learner functions that hung before raise HangSkipped instead of running again."""
        for value in list(ns.values()):
            candidates = [value]
            if isinstance(value, type):
                candidates = list(vars(value).values())
            for fn in candidates:
                fn = getattr(fn, "__func__", fn)
                fn = getattr(fn, "__wrapped__", fn)
                if not isinstance(fn, types.FunctionType):
                    continue
                code = fn.__code__
                key = (code.co_filename[6:-1], code.co_name, code.co_firstlineno)
                if code.co_filename.startswith("<cell ") and key in self.hanging:
                    _stub(fn, f"{code.co_name} (cell {key[0]}) ran past the grader's time "
                              "limit earlier, so the grader does not run it again")

    def _learned_hang(self, k: int, ns: dict[str, Any]) -> None:
        """After step `k` was interrupted: the innermost learner function it hung in (if
        any) is skipped from now on."""
        where = self.sampled.get(k) or []
        functions = [w for w in where if w[1] != "<module>"]
        if functions:
            self.hanging.add(tuple(functions[-1]))
            self._skip_hanging(ns)

    def run_cell(self, k: int, step: dict[str, Any], ns: dict[str, Any]) -> None:
        error = None
        try:
            self.in_learner[0] = True
            code = compile(_transform(step["source"]), f"<cell {step['index']}>", "exec")
            exec(code, ns)
        except BaseException as exc:  # noqa: B036 -- SystemExit too ends only the cell
            error = describe_exception(exc)
        finally:
            self.in_learner[0] = False
        _close_figures()
        if error and step.get("grade_id"):
            self.cell_errors[step["grade_id"]] = error
        self.send({"type": CELL, "step": k, "error": error})

    def run_probes(self, k: int, step: dict[str, Any], ns: dict[str, Any]) -> None:
        """Each probe of the step's exercise, all under the exercise's guard: each probe's
        inputs arrive only inside it, on request (`_probe_inputs`), so learner code never
        holds them while the reference may run, in this thread or any other."""
        exercise = self.exercises[step["grade_id"]]
        obj = ns.get(exercise.symbol, _MISSING)
        self.skip_rest: str | None = None
        with self.reference_guard(*exercise.references) as guard:
            for probe in self.probes[exercise.grade_id]:
                outputs, error = self._run_probe(k, exercise, probe, obj)
                try:
                    self.send({"type": PROBE, "step": k, "probe": probe.name,
                               "outputs": bounded(outputs), "error": error})
                except Exception as exc:  # outputs that torch.save cannot write
                    self.send({"type": PROBE, "step": k, "probe": probe.name,
                               "outputs": None, "error": f"its result could not be sent to "
                                                         f"the grader ({describe_exception(exc)})"})
        self.send({"type": DONE, "step": k, "tripped": _tripped(exercise, guard)})

    def _run_probe(self, k: int, exercise: Any, probe: Any, obj: Any
                   ) -> tuple[Any, str | None]:
        """One probe: (outputs, None) or (None, what went wrong)."""
        if self.skip_rest is not None:
            return None, self.skip_rest
        if obj is _MISSING:
            return None, _missing(exercise, self.cell_errors.get(exercise.grade_id))
        self.in_learner[0] = True
        try:
            inputs = self._probe_inputs(k, probe.name)
            return self.run_probe(exercise, probe, obj, inputs), None
        except KeyboardInterrupt as exc:
            if self.sigint[0]:  # the grader's, at the time limit
                self.skip_rest = "not run: an earlier check ran past the time limit"
                return None, "interrupted: it ran past the grader's time limit"
            return None, _probe_error(exercise, exc)  # raised by the learner's own code
        except BaseException as exc:  # noqa: B036 -- CheckFailure, SystemExit, ...
            return None, _probe_error(exercise, exc)
        finally:
            self.in_learner[0] = False

    def _probe_inputs(self, k: int, name: str) -> Any:
        """Ask the grader for probe `name`'s inputs and read them (a frame on `in_fd`)."""
        self.send({"type": INPUTS, "step": k, "probe": name})
        (size,) = FRAME_HEADER.unpack(_read_exactly(self.in_fd, FRAME_HEADER.size))
        return self.load(io.BytesIO(_read_exactly(self.in_fd, size)), weights_only=True)

    def run(self) -> None:
        import threading
        import time

        apply_limits(self.job["limits"])
        self.prepare()
        walls = self.wall_in()
        self.send({"type": READY, "walls": walls})
        threading.Thread(target=self._watch, daemon=True, name="grader-watch").start()
        sys.stdout, sys.stderr = _Sink(1), _Sink(2)
        ns = _namespace()
        steps = self.job["steps"]
        for k in self.job["run"]:
            step = steps[k]
            self.sigint[0] = False
            self.step[:] = [k, time.monotonic()]
            self.send({"type": START, "step": k})
            if step["kind"] == CELL_STEP:
                self.run_cell(k, step, ns)
            else:
                self.run_probes(k, step, ns)
            self.step[:] = [None, 0.0]
            if self.sigint[0]:
                self._learned_hang(k, ns)
            if self.hanging:
                self._skip_hanging(ns)
        self.send({"type": END})
        self.exit_now(0)


def bounded(value: Any, depth: int = 0) -> Any:
    """Outputs that the grader can read back: an int beyond 64 bits becomes a description
    (which every judge refuses as a wrong value), so does anything nested too deeply.

    >>> bounded({"n": 10 ** 30, "ok": [1, 2.5]})["n"]["type"]
    'int'
    """
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        if -(1 << 63) <= value < (1 << 63):
            return value
        return {"kind": "object", "type": "int",
                "repr": f"an integer of {value.bit_length()} bits"}
    if depth > 8:
        return {"kind": "object", "type": "nesting", "repr": "too deeply nested"}
    if isinstance(value, dict):
        return {k: bounded(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(bounded(v, depth + 1) for v in value) \
            if type(value) in (list, tuple) else [bounded(v, depth + 1) for v in value]
    return value


def main(argv: list[str] | None = None) -> None:
    """Entry point: ``python -m moe_course.grading.autograde.worker RESULT_FD INPUTS_FD``."""
    argv = sys.argv[1:] if argv is None else argv
    _Run(int(argv[0]), int(argv[1])).run()


_MISSING = object()


def _missing(exercise: Any, cell_error: str | None) -> str:
    why = (f"; its answer cell raised {cell_error}" if cell_error else
           f" (define it in the answer cell {exercise.grade_id}, and keep its name)")
    return f"your notebook does not define {exercise.symbol}{why}"


def _tripped(exercise: Any, guard: Any) -> str | None:
    """Why the exercise's guard fails the whole step, if it does: tampering with it, or the
    reference run in another thread (in the checking thread `run_probe` already said so)."""
    if guard.tampering:
        return (f"your {exercise.symbol} tampered with the grader's guard while its checks "
                f"ran: {guard.tampering[0]}")
    if guard.calls:
        return (f"your {exercise.symbol} uses moe_course's own {exercise.symbol} (in another "
                "thread): implement it yourself")
    return None


def _read_exactly(fd: int, n: int) -> bytes:
    chunks, left = [], n
    while left:
        try:
            chunk = os.read(fd, left)
        except InterruptedError:
            continue
        if not chunk:
            raise EOFError("the grader closed the inputs pipe")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _probe_error(exercise: Any, exc: BaseException) -> str:
    from ..probe import CheckFailure  # imported by `prepare` already, before learner code

    message = getattr(exc, "message", None)
    if isinstance(exc, CheckFailure) and isinstance(message, str):
        return message  # also NotImplementedYet: its message says what happened
    return f"your {exercise.symbol} raised {describe_exception(exc)}"


def _close_figures() -> None:
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None:
        try:
            pyplot.close("all")
        except Exception:
            pass


if __name__ == "__main__":
    # Run as the package module, not as __main__: the guard knows the walls' audit hook
    # for the grader's by its code, found in the moe_course.grading modules.
    from moe_course.grading.autograde import worker, zygote

    if sys.argv[1:2] == ["--zygote"]:
        zygote.zygote_main(int(sys.argv[2]))
    else:
        worker.main()
