"""Guards around a learner's code while a check runs.

- `reference_guard(*references)`: while active, *running* the code of a reference trips a
  wire, however the code was reached. The guard does not touch the reference objects: it
  watches what runs. A profiler (`sys.setprofile` in the checking thread, CPython's
  `_PyEval_SetProfile` through `ctypes.pythonapi` in every other thread, and in each thread
  started while the guard is active) sees every Python frame that starts, and its code
  object is compared with the references' code objects by content (`code_fingerprint`:
  bytecode, constants, names, argument counts and flags; not its name, file or line).
  So the function itself, an alias taken earlier, a wrapper or subclass, a copy made with
  `types.FunctionType(ref.__code__, ...)`, one found through `gc`, the fresh functions of
  `importlib.reload(moe_course.gating)` and those of a copy of the module file imported
  under another name all trip. A class's methods (`Expert.__init__`, `Expert.forward`,
  ...) are its code. Code that differs (renamed local names, an edited docstring) is not
  the reference's code but source pasted by hand: plagiarism, for the similarity report
  (`moe_course.grading.autograde.similarity`), not a grader bypass.

  References of *other* exercises are not guarded: using `moe_course.softmax_gate` inside
  a learner's `dense_moe` is fine.

  Tampering fails the check with a message that names it: changing the profiler
  (`sys.setprofile` or CPython's C entry points, which raise the same audit event), raw
  memory access through `ctypes` (`from_address`, foreign calls), or starting a process
  (which the profiler cannot follow) while the guard is active; a profiler found
  missing at the end; and, for every later check, an audit hook added by code other than
  the grader's (reading a frame's code raises an audit event, so such a hook would run
  inside the profiler, where nothing is watched). These are seen by an audit hook (PEP 578)
  installed when this module is imported; audit hooks cannot be removed. A hook added
  before this module was imported is not seen: the sandbox imports it first, a notebook
  kernel when its first cell imports `check`.
- `quiet()`: no warnings and nothing on stderr while a check runs (nbgrader scores a tests
  cell that writes to stderr as failed), and the global RNG restored afterwards.
"""

from __future__ import annotations

import _thread
import contextlib
import ctypes
import hashlib
import inspect
import io
import sys
import threading
import types
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch


class ReferenceCalled(Exception):
    """Raised by a tripped reference implementation."""


@dataclass
class GuardState:
    """What happened while a guard was active."""

    calls: list[str] = field(default_factory=list)  # reference code that started running
    tampering: list[str] = field(default_factory=list)  # what tried to blind the guard
    codes: dict[bytes, str] = field(default_factory=dict)  # fingerprint -> qualified name

    @property
    def tripped(self) -> bool:
        return bool(self.calls or self.tampering)


# Taken at import, before any learner code runs: rebinding `sys.setprofile` later changes
# nothing here.
_setprofile, _getprofile = sys.setprofile, sys.getprofile
_get_ident = threading.get_ident
_STARTERS = tuple(getattr(_thread, name) for name in ("start_new_thread", "start_new",
                                                      "start_joinable_thread")
                  if hasattr(_thread, name))
_PROCESS_EVENTS = frozenset({"os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.exec",
                             "os.system", "subprocess.Popen", "pty.spawn"})
_RAW_MEMORY_EVENTS = frozenset({"ctypes.cdata", "ctypes.call_function"})

_ACTIVE: list[GuardState] = []  # active guards, outermost first
_LENGTHS: set[int] = set()  # bytecode lengths of the guarded code: a cheap first filter
_SEEN: dict[int, bytes] = {}  # id(code) -> its fingerprint if it is guarded, else b""
_KEEP: list[types.CodeType] = []  # the codes in _SEEN, alive so that no id is reused
_OWN = [0]  # > 0 while this module itself changes profilers or calls ctypes
_OUTER: dict[str, Any] = {}  # the outermost guard's thread and the profiler it replaced
_FOREIGN_HOOKS: list[str] = []  # audit hooks added by code other than the grader's


# ----------------------------------------------------------------------------------------
# Which code is a reference's


def code_fingerprint(code: types.CodeType) -> bytes:
    """A digest of what `code` computes: bytecode, constants (nested code by its own
    fingerprint), global and local names, argument counts and flags; not its name, file,
    line numbers or line table, so a copy compiled from a copied file matches.

    >>> def f(x):
    ...     return x + 1
    >>> g = types.FunctionType(f.__code__.replace(co_name="g", co_filename="elsewhere.py",
    ...                                           co_firstlineno=99), {})
    >>> code_fingerprint(f.__code__) == code_fingerprint(g.__code__)
    True
    >>> def h(x):
    ...     return x + 2
    >>> code_fingerprint(f.__code__) == code_fingerprint(h.__code__)
    False
    """
    digest = hashlib.blake2b(digest_size=16)
    digest.update(code.co_code)
    digest.update(repr((code.co_names, code.co_varnames, code.co_freevars, code.co_cellvars,
                        code.co_argcount, code.co_posonlyargcount, code.co_kwonlyargcount,
                        code.co_flags)).encode())
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            digest.update(b"code" + code_fingerprint(const))
        else:
            digest.update(repr((type(const).__name__, const)).encode())
    return digest.digest()


def _functions(obj: Any) -> Iterator[types.FunctionType]:
    obj = inspect.unwrap(obj) if callable(obj) and not isinstance(obj, type) else obj
    if isinstance(obj, types.FunctionType):
        yield obj
    elif isinstance(obj, types.MethodType):
        yield from _functions(obj.__func__)
    elif isinstance(obj, (staticmethod, classmethod)):
        yield from _functions(obj.__func__)
    elif isinstance(obj, property):
        for part in (obj.fget, obj.fset, obj.fdel):
            if part is not None:
                yield from _functions(part)
    elif isinstance(obj, type):
        for value in vars(obj).values():
            if isinstance(value, (types.FunctionType, staticmethod, classmethod, property)):
                yield from _functions(value)


def _nested(code: types.CodeType) -> Iterator[types.CodeType]:
    """`code` and the functions defined inside it. Comprehensions, generator expressions and
    lambdas are left out: tiny and generic, a learner's own may compile to the same code."""
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType) and not const.co_name.startswith("<"):
            yield from _nested(const)


def reference_codes(references: Iterable[Any]) -> dict[bytes, str]:
    """Fingerprints of the code objects of `references` (functions, methods of classes,
    functions defined inside them), each with a readable name.

    >>> from moe_course import experts
    >>> sorted(reference_codes([experts.Expert]).values())
    ['Expert.__init__', 'Expert.forward']
    """
    found: dict[bytes, str] = {}
    for reference in references:
        if reference is None:
            continue
        for fn in _functions(reference):
            for code in _nested(fn.__code__):
                found.setdefault(code_fingerprint(code), code.co_qualname
                                 if hasattr(code, "co_qualname") else fn.__qualname__)
    return found


def _match(code: types.CodeType) -> bytes:
    """The fingerprint of `code` if it is a guarded reference's code, else b""."""
    found = _SEEN.get(id(code))
    if found is None:
        found = b""
        if len(code.co_code) in _LENGTHS:
            fingerprint = code_fingerprint(code)
            if any(fingerprint in state.codes for state in _ACTIVE):
                found = fingerprint
        _SEEN[id(code)] = found
        _KEEP.append(code)
    return found


def _record(fingerprint: bytes) -> str:
    """Record a call of the guarded code `fingerprint` in the innermost guard that owns it."""
    for state in reversed(_ACTIVE):
        if fingerprint in state.codes:
            state.calls.append(state.codes[fingerprint])
            return state.codes[fingerprint]
    return "code"


def _tamper(what: str) -> None:
    for state in _ACTIVE:
        state.tampering.append(what)


# ----------------------------------------------------------------------------------------
# The profilers: Python's in the checking thread, a C one (through ctypes) in the others


def _profile(frame: Any, event: str, arg: Any) -> None:
    if event == "call":
        fingerprint = _match(frame.f_code)
        if fingerprint:
            name = _record(fingerprint)
            _OUTER["raised"] = True
            # Raising from a profiler removes it (CPython does): expected, not tampering.
            raise ReferenceCalled(f"moe_course's reference {name} was called")
    elif event == "c_return" and arg in _STARTERS:
        _profile_other_threads()  # the new thread has its state: profile it before it runs


_PyTrace_CALL, _PyTrace_C_RETURN = 0, 6
_STARTER_IDS = frozenset(id(f) for f in _STARTERS)


def _c_profile(obj: Any, frame: Any, what: int, arg: Any) -> int:
    # Another thread: it cannot be stopped from here, so the call is recorded and the check
    # fails once it is over. Must never raise (ctypes would print to stderr).
    try:
        if what == _PyTrace_CALL:
            fingerprint = _match(frame.f_code)
            if fingerprint:
                _record(fingerprint)
        elif what == _PyTrace_C_RETURN and arg in _STARTER_IDS:
            _profile_other_threads()
    except BaseException:  # noqa: B036, S110 -- nothing may escape a C callback
        pass
    return 0


def _c_api() -> dict[str, Any] | None:
    """CPython's thread-state functions, resolved now (walls may forbid `dlsym` later)."""
    try:
        api = ctypes.pythonapi
        found = {name: getattr(api, name) for name in (
            "_PyEval_SetProfile", "PyInterpreterState_Get", "PyInterpreterState_ThreadHead",
            "PyThreadState_Next", "PyThreadState_Get")}
    except (AttributeError, OSError):
        return None
    found["_PyEval_SetProfile"].argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    found["_PyEval_SetProfile"].restype = ctypes.c_int
    for name in ("PyInterpreterState_Get", "PyThreadState_Get"):
        found[name].argtypes, found[name].restype = [], ctypes.c_void_p
    for name in ("PyInterpreterState_ThreadHead", "PyThreadState_Next"):
        found[name].argtypes, found[name].restype = [ctypes.c_void_p], ctypes.c_void_p
    tracefunc = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.py_object, ctypes.c_int,
                                 ctypes.c_void_p)
    found["callback"] = tracefunc(_c_profile)
    found["pointer"] = ctypes.cast(found["callback"], ctypes.c_void_p).value
    return found


_C = _c_api() if sys.implementation.name == "cpython" else None


def _other_threads() -> list[int]:
    if _C is None:
        return []
    skip = {_C["PyThreadState_Get"](), _OUTER.get("tstate")}
    found, state = [], _C["PyInterpreterState_ThreadHead"](_C["PyInterpreterState_Get"]())
    while state:
        if state not in skip:
            found.append(state)
        state = _C["PyThreadState_Next"](state)
    return found


def _profile_other_threads(on: bool = True) -> None:
    """Set (or clear) the C profiler of every thread but this one."""
    if _C is None:
        if on and hasattr(threading, "setprofile_all_threads"):  # Python >= 3.12
            _OWN[0] += 1
            try:
                threading.setprofile_all_threads(_profile)
            finally:
                _OWN[0] -= 1
        return
    _OWN[0] += 1
    try:
        for state in _other_threads():
            _C["_PyEval_SetProfile"](state, _C["pointer"] if on else None, None)
    finally:
        _OWN[0] -= 1


def _grader_code(code: Any) -> bool:
    """Whether `code` belongs to the grader's own modules: a function, a method of a class
    or a function nested in one (by identity: a file or module name can be forged, a code
    object cannot)."""
    def codes(value: Any) -> Iterator[types.CodeType]:
        if isinstance(value, type):
            for member in list(vars(value).values()):
                if not isinstance(member, type):
                    yield from codes(member)
            return
        for fn in _functions(value) if not isinstance(value, types.ModuleType) else ():
            stack = [fn.__code__]
            while stack:
                found = stack.pop()
                yield found
                stack += [c for c in found.co_consts if isinstance(c, types.CodeType)]

    for name, module in list(sys.modules.items()):
        if name.startswith("moe_course.grading") and module is not None:
            for value in list(vars(module).values()):
                try:
                    if any(found is code for found in codes(value)):
                        return True
                except Exception:  # noqa: S112 -- an odd global: not the caller
                    continue
    return False


def _audit(event: str, args: tuple) -> None:
    if event == "sys.addaudithook":
        # A hook added by learner code would run inside this module's profiler (reading a
        # frame's code raises an audit event), where nothing is profiled: so it fails every
        # later check, with a message saying why.
        caller = sys._getframe(1)
        if not _grader_code(caller.f_code):
            _FOREIGN_HOOKS.append(f"{caller.f_code.co_filename}:{caller.f_lineno}")
        return
    if not _ACTIVE or _OWN[0]:
        return
    what = None
    if event == "sys.setprofile":
        if _OUTER.get("raised"):
            return  # CPython removes a profiler that raised ReferenceCalled: not tampering
        what = "changing the grader's profiler (sys.setprofile)"
    elif event in _RAW_MEMORY_EVENTS:
        what = f"raw memory access or foreign calls through ctypes ({event})"
    elif event in _PROCESS_EVENTS:
        what = f"starting a process ({event}), which the check cannot follow"
    if what is not None:
        _tamper(what)
        raise PermissionError(f"a check is running: it does not allow {what}")


sys.addaudithook(_audit)


# ----------------------------------------------------------------------------------------
# The guard


def _install() -> None:
    _OUTER["thread"], _OUTER["previous"] = _get_ident(), _getprofile()
    if _C is not None:
        _OWN[0] += 1
        try:
            _OUTER["tstate"] = _C["PyThreadState_Get"]()
        finally:
            _OWN[0] -= 1
    _OWN[0] += 1
    try:
        _setprofile(_profile)
    finally:
        _OWN[0] -= 1
    _profile_other_threads()


def _uninstall(state: GuardState) -> None:
    if _getprofile() is not _profile and not _OUTER.get("raised"):
        _tamper("removing the grader's profiler")
    _OWN[0] += 1
    try:
        _setprofile(_OUTER.pop("previous", None))
    finally:
        _OWN[0] -= 1
    _profile_other_threads(on=False)
    _OUTER.clear()
    _SEEN.clear()
    _KEEP.clear()
    _LENGTHS.clear()


@contextlib.contextmanager
def reference_guard(*references: Any) -> Iterator[GuardState]:
    """While the block runs, running the code of any of `references` (functions or classes;
    `None` is ignored) trips: `ReferenceCalled` is raised in the thread that runs the guard,
    and in any thread the call is recorded in the state (`state.tripped`). Tampering with
    the guard is recorded too (`state.tampering`). Guards nest; the innermost that owns the
    code records the call.
    """
    state = GuardState(codes=reference_codes(references))
    if _FOREIGN_HOOKS:
        state.tampering.append(f"adding an audit hook (sys.addaudithook, at "
                               f"{_FOREIGN_HOOKS[0]}), which would run unwatched")
    outermost = not _ACTIVE
    if not outermost and _OUTER.get("thread") != _get_ident():
        raise RuntimeError("reference_guard: guards nest only in the thread of the outermost")
    _ACTIVE.insert(0 if outermost else len(_ACTIVE), state)
    for reference in references:
        for fn in _functions(reference) if reference is not None else ():
            _LENGTHS.update(len(c.co_code) for c in _nested(fn.__code__))
    _SEEN.clear()
    _KEEP.clear()
    if outermost:
        _install()
    elif _getprofile() is not _profile:
        if not _OUTER.pop("raised", False):
            _tamper("removing the grader's profiler")
        _OWN[0] += 1
        try:  # CPython removed it after it raised ReferenceCalled: watch this block too
            _setprofile(_profile)
        finally:
            _OWN[0] -= 1
    try:
        yield state
    finally:
        if outermost:
            _uninstall(state)
        _ACTIVE.remove(state)
        _SEEN.clear()
        _KEEP.clear()


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence warnings and stderr, and fork the global RNG (seeded 0) for determinism."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")
        stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
        stack.enter_context(torch.random.fork_rng(devices=[]))
        torch.default_generator.manual_seed(0)  # CPU only: no lazy device seeding
        yield
