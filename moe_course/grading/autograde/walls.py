"""The walls around learner code, installed in the learner's process before any of it runs.

Learner code is arbitrary Python and native code (ctypes, a C extension, a compiled
library), so every wall that matters is the kernel's, not Python's; the audit hook only turns
the common refusals into readable errors. In the order `install` applies them:

1. **Identity** (`drop_identity`). A grader running as root hands the learner a uid and gid of
   its own (``setgroups``, ``setresgid``, ``setresuid``), unless the Python installation is
   not readable by other users (a Python under ``/root``); then the user namespace below is
   what takes root's powers away.
2. **Namespaces** (`enter_namespaces`): ``unshare(CLONE_NEWUSER | CLONE_NEWNET |
   CLONE_NEWIPC | CLONE_NEWUTS)``. In the new user namespace the process holds no capability
   in the machine's namespace (no reading or changing other users' files, no setting file
   capabilities or immutable flags), and it then drops the capabilities it got inside
   (``capset``). The network namespace has only its own loopback, brought up with
   ``ioctl(SIOCSIFFLAGS)``: TCP on 127.0.0.1 works between the learner's threads (gloo), and
   nothing outside is reachable, abstract unix sockets included. The IPC namespace hides
   the machine's System V and POSIX message queues and shared memory.
3. **Landlock** (`landlock`, ABI 1 to 7): reads only from an allow-list (`read_paths`: the
   Python installation, site-packages, the course package without the rest of its
   repository, the submission's folder, ``/proc/self``, a few device files), writes,
   removals, links and renames only inside the sandbox folder, no ``execve``, no device
   ioctls (ABI 5), TCP only where there is no private network namespace (ABI 4), no signals
   and no abstract unix sockets to processes outside (ABI 6 scopes). A rule that fails to
   apply is counted (`landlock_rules_failed`), never a reason to drop the rest.
4. **seccomp** (`seccomp`): a BPF filter that refuses new processes (``fork``, ``vfork``,
   ``clone`` without ``CLONE_THREAD``, ``clone3``, ``execve``, ``execveat``), access to
   other processes (``ptrace``, ``process_vm_readv``/``writev``, ``pidfd_getfd``,
   ``pidfd_send_signal``, ``process_madvise``, ``kcmp``), metadata changes Landlock does not
   cover (``chmod``, ``fchmod``, ``fchmodat``, ``fchmodat2``, ``chown``, ``fchown``,
   ``lchown``, ``fchownat``, ``utime``, ``utimes``, ``futimesat``, ``utimensat``, the
   ``*setxattr``/``*removexattr`` family, ``ioctl(FS_IOC_SETFLAGS)`` and
   ``ioctl(FS_IOC_FSSETXATTR)``), every socket family but ``AF_INET``/``AF_INET6`` (so path
   and abstract unix sockets, netlink, packet and vsock sockets are refused, also from C),
   ``io_uring_*`` (which would run system calls past this filter), namespace and mount
   changes (``unshare``, ``setns``, ``mount``, ``umount2``, ``pivot_root``, ``chroot``),
   identity changes (``set*uid``, ``set*gid``, ``setgroups``, ``capset``), and ``bpf``,
   ``perf_event_open``, ``userfaultfd``, the keyring calls, ``open_by_handle_at``; other
   architectures' system calls (x32, i386) are refused outright.

`install` returns what is up as a flat dict of ints and bools, which the worker reports;
`survey` installs the same walls in a throw-away child of the grader, so that the grader
can say up front which walls are down on this machine (`down`).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import platform
import stat
import struct
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

# -- named constants of the Linux ABI ---------------------------------------------------------
CLONE_THREAD = 0x00010000
CLONE_NEWUTS, CLONE_NEWIPC = 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000
PR_SET_DUMPABLE, PR_SET_SECCOMP, PR_SET_NO_NEW_PRIVS = 4, 22, 38
SECCOMP_MODE_FILTER = 2
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
CAPABILITY_VERSION_3 = 0x20080522
AF_INET, AF_INET6 = 2, 10
FS_IOC_SETFLAGS, FS_IOC32_SETFLAGS, FS_IOC_FSSETXATTR = 0x40086602, 0x40046602, 0x401C5820
TIOCSTI = 0x5412  # push characters into a terminal's input

LANDLOCK_CREATE_RULESET, LANDLOCK_ADD_RULE, LANDLOCK_RESTRICT_SELF = 444, 445, 446
LANDLOCK_CREATE_RULESET_VERSION = 1
LANDLOCK_RULE_PATH_BENEATH = 1
FS_EXECUTE, FS_WRITE_FILE, FS_READ_FILE, FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
FS_REMOVE_DIR, FS_REMOVE_FILE, FS_MAKE_CHAR, FS_MAKE_DIR = 1 << 4, 1 << 5, 1 << 6, 1 << 7
FS_MAKE_REG, FS_MAKE_SOCK, FS_MAKE_FIFO, FS_MAKE_BLOCK = 1 << 8, 1 << 9, 1 << 10, 1 << 11
FS_MAKE_SYM, FS_REFER, FS_TRUNCATE, FS_IOCTL_DEV = 1 << 12, 1 << 13, 1 << 14, 1 << 15
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1
LANDLOCK_FS_BY_ABI = {1: (1 << 13) - 1, 2: FS_REFER, 3: FS_TRUNCATE, 5: FS_IOCTL_DEV}
READ = FS_READ_FILE | FS_READ_DIR

# Architecture -> (AUDIT_ARCH value, system call numbers).
SYSCALLS: dict[str, tuple[int, dict[str, int]]] = {
    "x86_64": (0xC000003E, {
        "ioctl": 16, "socket": 41, "clone": 56, "fork": 57, "vfork": 58, "execve": 59,
        "chmod": 90, "fchmod": 91, "chown": 92, "fchown": 93, "lchown": 94, "ptrace": 101,
        "setuid": 105, "setgid": 106, "setreuid": 113, "setregid": 114, "setgroups": 116,
        "setresuid": 117, "setresgid": 119, "setfsuid": 122, "setfsgid": 123, "capset": 126,
        "utime": 132, "mknod": 133, "pivot_root": 155, "chroot": 161, "mount": 165,
        "umount2": 166, "setxattr": 188, "lsetxattr": 189, "fsetxattr": 190,
        "removexattr": 197, "lremovexattr": 198, "fremovexattr": 199, "utimes": 235,
        "add_key": 248, "request_key": 249, "keyctl": 250, "mknodat": 259, "fchownat": 260,
        "futimesat": 261, "fchmodat": 268, "unshare": 272, "utimensat": 280,
        "perf_event_open": 298, "open_by_handle_at": 304, "setns": 308,
        "process_vm_readv": 310, "process_vm_writev": 311, "kcmp": 312, "bpf": 321,
        "execveat": 322, "userfaultfd": 323, "pidfd_send_signal": 424, "io_uring_setup": 425,
        "io_uring_enter": 426, "io_uring_register": 427, "clone3": 435, "pidfd_getfd": 438,
        "process_madvise": 440, "fchmodat2": 452, "setxattrat": 463, "removexattrat": 466}),
    "aarch64": (0xC00000B7, {
        "ioctl": 29, "socket": 198, "clone": 220, "execve": 221, "fchmod": 52,
        "fchmodat": 53, "fchownat": 54, "fchown": 55, "ptrace": 117, "setuid": 146,
        "setgid": 144, "setreuid": 145, "setregid": 143, "setgroups": 159, "setresuid": 147,
        "setresgid": 149, "setfsuid": 151, "setfsgid": 152, "capset": 91, "pivot_root": 41,
        "chroot": 51, "mount": 40, "umount2": 39, "setxattr": 5, "lsetxattr": 6,
        "fsetxattr": 7, "removexattr": 14, "lremovexattr": 15, "fremovexattr": 16,
        "add_key": 217, "request_key": 218, "keyctl": 219, "mknodat": 33, "unshare": 97,
        "utimensat": 88, "perf_event_open": 241, "open_by_handle_at": 265, "setns": 268,
        "process_vm_readv": 270, "process_vm_writev": 271, "kcmp": 272, "bpf": 280,
        "execveat": 281, "userfaultfd": 282, "pidfd_send_signal": 424, "io_uring_setup": 425,
        "io_uring_enter": 426, "io_uring_register": 427, "clone3": 435, "pidfd_getfd": 438,
        "process_madvise": 440, "fchmodat2": 452, "setxattrat": 463, "removexattrat": 466}),
}
REFUSED = (  # refused outright with EPERM (where the architecture has them)
    "fork", "vfork", "execve", "execveat",  # new programs and processes
    "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd", "pidfd_send_signal",
    "process_madvise", "kcmp",  # other processes
    "chmod", "fchmod", "fchmodat", "fchmodat2", "chown", "fchown", "lchown", "fchownat",
    "utime", "utimes", "futimesat", "utimensat", "setxattr", "lsetxattr", "fsetxattr",
    "setxattrat", "removexattr", "lremovexattr", "fremovexattr", "removexattrat",
    "mknod", "mknodat",  # metadata and special files
    "io_uring_setup", "io_uring_enter", "io_uring_register",  # system calls past the filter
    "unshare", "setns", "mount", "umount2", "pivot_root", "chroot",  # namespaces, mounts
    "setuid", "setgid", "setreuid", "setregid", "setresuid", "setresgid", "setfsuid",
    "setfsgid", "setgroups", "capset",  # identity
    "bpf", "perf_event_open", "userfaultfd", "add_key", "request_key", "keyctl",
    "open_by_handle_at",
)
REFUSED_IOCTLS = (FS_IOC_SETFLAGS, FS_IOC32_SETFLAGS, FS_IOC_FSSETXATTR, TIOCSTI)
ALLOWED_SOCKETS = (AF_INET, AF_INET6)

WALLS = ("own_uid", "user_namespace", "net_namespace", "ipc_namespace", "landlock",
         "landlock_reads", "landlock_scopes", "landlock_rules_failed", "seccomp", "audit_hook")


def libc() -> Any:
    lib = ctypes.CDLL(None, use_errno=True)
    lib.syscall.restype = ctypes.c_long
    lib.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                          ctypes.c_ulong]
    return lib


def landlock_abi(lib: Any | None = None) -> int:
    """The kernel's Landlock ABI version, 0 without Landlock."""
    if not sys.platform.startswith("linux"):
        return 0
    try:
        lib = lib or libc()
        return max(0, int(lib.syscall(LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0),
                                      ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION))))
    except (OSError, AttributeError):
        return 0


# -- 1. identity --------------------------------------------------------------------------------

def sandbox_ids(counter: int) -> tuple[int, int]:
    """A uid and gid for one sandbox of a root grader: unused by any account (above 10^9),
    distinct for the sandboxes alive at once (this grader's pid, a counter)."""
    value = 1_000_000_000 + ((os.getpid() & 0x3FFFFF) << 8 | (counter & 0xFF))
    return value, value


def python_paths() -> list[str]:
    """What a sandbox must read to run Python: the installation, site-packages, the package."""
    import site

    return [sys.base_prefix, sys.prefix, *getattr(site, "getsitepackages", list)(),
            str(Path(__file__).resolve().parents[2])]


def readable_by_others(paths: Iterable[str]) -> bool:
    """Whether any user can reach and read `paths` (o+x on every folder above, o+r on them)."""
    for path in paths:
        current = Path(path).resolve()
        if not current.exists():
            continue
        if not current.stat().st_mode & stat.S_IROTH:
            return False
        for folder in (current, *current.parents):
            if folder.is_dir() and not folder.stat().st_mode & stat.S_IXOTH:
                return False
    return True


def drop_identity(uid: int, gid: int) -> bool:
    """As root: become `uid`/`gid` with no supplementary groups (and stay dumpable, so that
    the process may still read its own /proc/self). False when not root."""
    if os.geteuid() != 0:
        return False
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    libc().prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)
    return os.geteuid() == uid and os.getuid() == uid


# -- 2. namespaces ------------------------------------------------------------------------------

def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _loopback_up() -> None:
    import fcntl
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        request = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s.fileno(), SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(s.fileno(), SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))


def _drop_capabilities(lib: Any) -> None:
    header = struct.pack("=Ii", CAPABILITY_VERSION_3, 0)
    data = bytes(24)  # effective, permitted, inheritable: two 32-bit words each, all zero
    nr = {"x86_64": 126, "aarch64": 91}.get(platform.machine())
    if nr is None or lib.syscall(nr, ctypes.c_char_p(header), ctypes.c_char_p(data)) != 0:
        raise OSError(ctypes.get_errno(), "capset")


def enter_namespaces() -> dict[str, bool]:
    """New user, network, IPC and UTS namespaces, mapped to the current uid and gid, the
    loopback up, every capability dropped again. Each False where the kernel refused."""
    done = {"user_namespace": False, "net_namespace": False, "ipc_namespace": False}
    if not sys.platform.startswith("linux"):
        return done
    lib = libc()
    uid, gid = os.geteuid(), os.getegid()
    if lib.unshare(CLONE_NEWUSER) != 0:
        return done
    inside = 1000 if uid == 0 else uid  # root's powers stay outside: uid 0 maps to a user
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"{inside} {uid} 1\n")
    _write("/proc/self/gid_map", f"{1000 if gid == 0 else gid} {gid} 1\n")
    done["user_namespace"] = True
    if lib.unshare(CLONE_NEWNET) == 0:
        try:
            _loopback_up()
            done["net_namespace"] = True
        except OSError:
            pass
    done["ipc_namespace"] = lib.unshare(CLONE_NEWIPC | CLONE_NEWUTS) == 0
    _drop_capabilities(lib)
    return done


# -- 3. Landlock --------------------------------------------------------------------------------

def course_repository() -> Path | None:
    """The folder holding the installed course package when it is a source checkout (its
    solutions/ and the rest must stay unreadable); None for an installed wheel."""
    parent = Path(__file__).resolve().parents[3]
    if any((parent / marker).exists() for marker in ("pyproject.toml", ".git", "solutions")):
        return parent
    return None


def read_paths(folder: str, submission: str | None = None) -> list[str]:
    """What learner code may read besides its sandbox folder: the Python installation, every
    folder on sys.path, the course package (not the repository around it), the submission's
    folder, shared libraries, this process's /proc entry and a few devices.

    A candidate that is the course repository, or holds it or the sandbox folder, is left
    out (a wheel-installed course has its package inside site-packages, which stays in)."""
    import site

    package = Path(__file__).resolve().parents[2]
    repo = course_repository()
    candidates = [sys.base_prefix, sys.prefix, sys.exec_prefix, *sys.path,
                  *getattr(site, "getsitepackages", list)(), str(package),
                  "/usr/lib", "/usr/lib64", "/usr/local/lib", "/usr/share", "/lib", "/lib64",
                  "/etc/ld.so.cache", "/etc/localtime", "/etc/nsswitch.conf", "/etc/passwd",
                  "/etc/group", "/etc/hosts", "/etc/matplotlibrc", "/dev/urandom", "/dev/random",
                  "/dev/zero", "/proc/self", "/proc/cpuinfo", "/proc/meminfo",
                  "/sys/devices/system/cpu", "/sys/fs/cgroup/cpu.max"]
    if submission:
        candidates.append(str(Path(submission).parent))
    guarded = [Path(folder).resolve(), *([repo] if repo else [])]
    paths: list[str] = []
    for candidate in candidates:
        if not candidate:
            continue
        path = Path(candidate).resolve()
        if not path.exists() or str(path) in paths:
            continue
        if any(g == path or path in g.parents for g in guarded):
            continue
        paths.append(str(path))
    return paths


def open_rules(folder: str, reads: Iterable[str]) -> list[tuple[str, int, int | None]]:
    """(path, wanted access, an O_PATH descriptor or None) for each Landlock rule, opened
    while the process still has the identity it started with, so that a rule never fails
    because the sandbox's own uid cannot look at a path (it cannot read it either way)."""
    opened = []
    for path, access in [(folder, -1), (os.devnull, FS_WRITE_FILE | READ | FS_TRUNCATE),
                         *((path, READ) for path in reads)]:
        try:
            fd: int | None = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError as exc:
            print(f"Landlock rule for {path} not applied: {exc.strerror}", file=sys.stderr)
            fd = None
        opened.append((path, access, fd))
    return opened


def landlock(rules: list[tuple[str, int, int | None]], private_network: bool
             ) -> tuple[int, int, bool]:
    """Enforce Landlock with `open_rules`'s rules (access -1: everything but execute);
    (ABI in force or 0, rules that failed to apply, reads walled). Closes the descriptors."""
    lib = libc()
    abi = landlock_abi(lib)
    try:
        if abi < 1:
            return 0, 0, False
        fs = sum(bits for version, bits in LANDLOCK_FS_BY_ABI.items() if version <= abi)
        net = (NET_BIND_TCP | NET_CONNECT_TCP) if abi >= 4 and not private_network else 0
        scoped = (SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL) if abi >= 6 else 0
        size = 8 if abi < 4 else 16 if abi < 6 else 24
        attr = ctypes.create_string_buffer(struct.pack("=QQQ", fs, net, scoped)[:size], size)
        ruleset = lib.syscall(LANDLOCK_CREATE_RULESET, attr, ctypes.c_size_t(size),
                              ctypes.c_uint32(0))
        if ruleset < 0:
            return 0, 0, False
        try:
            failed = _add_rules(lib, ruleset, rules, fs)
            if lib.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
                return 0, failed, False
            if lib.syscall(LANDLOCK_RESTRICT_SELF, ctypes.c_int(ruleset),
                           ctypes.c_uint32(0)) != 0:
                return 0, failed, False
        finally:
            os.close(ruleset)
        return int(abi), failed, True
    finally:
        for _, _, fd in rules:
            if fd is not None:
                os.close(fd)


_FOLDER_ONLY = (FS_READ_DIR | FS_REMOVE_DIR | FS_REMOVE_FILE | FS_MAKE_CHAR | FS_MAKE_DIR
                | FS_MAKE_REG | FS_MAKE_SOCK | FS_MAKE_FIFO | FS_MAKE_BLOCK | FS_MAKE_SYM
                | FS_REFER)


def _add_rules(lib: Any, ruleset: int, rules: list[tuple[str, int, int | None]],
               fs: int) -> int:
    """Add each rule on its own: one that fails is counted and reported, the rest stay."""
    failed = 0
    for path, access, fd in rules:
        if fd is None:
            failed += 1
            continue
        access = fs & ~FS_EXECUTE if access == -1 else access
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            access &= ~_FOLDER_ONLY
        rule = ctypes.create_string_buffer(struct.pack("=Qi", access & fs, fd), 12)
        if lib.syscall(LANDLOCK_ADD_RULE, ctypes.c_int(ruleset),
                       ctypes.c_int(LANDLOCK_RULE_PATH_BENEATH), rule, ctypes.c_uint32(0)):
            failed += 1
            print(f"Landlock rule for {path} not applied: "
                  f"{os.strerror(ctypes.get_errno())}", file=sys.stderr)
    return failed


# -- 4. seccomp ---------------------------------------------------------------------------------

def _bpf(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


def seccomp_program(machine: str | None = None) -> list[bytes] | None:
    """The BPF filter of `seccomp` for this architecture, None where it is not known.

    >>> len(seccomp_program("x86_64")) > 100, seccomp_program("sparc") is None
    (True, True)
    """
    known = SYSCALLS.get(machine or platform.machine())
    if known is None:
        return None
    arch, nr = known
    load, jeq, jset, ret = 0x20, 0x15, 0x45, 0x06
    allow = 0x7FFF0000

    def refuse(code: int) -> int:
        return 0x00050000 | code  # SECCOMP_RET_ERRNO

    prog = [_bpf(load, 0, 0, 4), _bpf(jeq, 1, 0, arch), _bpf(ret, 0, 0, refuse(errno.EPERM)),
            _bpf(load, 0, 0, 0), _bpf(jset, 0, 1, 0x40000000),  # x32 system calls
            _bpf(ret, 0, 0, refuse(errno.EPERM)),
            _bpf(jeq, 0, 1, nr["clone3"]), _bpf(ret, 0, 0, refuse(errno.ENOSYS))]  # -> clone
    for name in REFUSED:
        if name in nr:
            prog += [_bpf(jeq, 0, 1, nr[name]), _bpf(ret, 0, 0, refuse(errno.EPERM))]
    # ioctl: refuse the requests that change inode flags (the low 32 bits of args[1])
    body = [_bpf(load, 0, 0, 24)]
    for request in REFUSED_IOCTLS:
        body += [_bpf(jeq, 0, 1, request), _bpf(ret, 0, 0, refuse(errno.EPERM))]
    body += [_bpf(ret, 0, 0, allow)]
    prog += [_bpf(jeq, 0, len(body), nr["ioctl"]), *body]
    # socket: only AF_INET and AF_INET6 (args[0])
    body = [_bpf(load, 0, 0, 16)]
    for family in ALLOWED_SOCKETS:
        body += [_bpf(jeq, 0, 1, family), _bpf(ret, 0, 0, allow)]
    body += [_bpf(ret, 0, 0, refuse(errno.EPERM))]
    prog += [_bpf(jeq, 0, len(body), nr["socket"]), *body]
    # clone: threads only (CLONE_THREAD in args[0])
    prog += [_bpf(jeq, 0, 3, nr["clone"]), _bpf(load, 0, 0, 16),
             _bpf(jset, 1, 0, CLONE_THREAD), _bpf(ret, 0, 0, refuse(errno.EPERM))]
    prog += [_bpf(ret, 0, 0, allow)]
    return prog


def seccomp() -> bool:
    """Install `seccomp_program` (no new privileges first); whether it is in force."""
    prog = seccomp_program()
    if prog is None:
        return False
    lib = libc()
    code = ctypes.create_string_buffer(b"".join(prog))

    class Program(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    program = Program(len(prog), ctypes.addressof(code))
    if lib.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        return False
    return lib.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(program), 0, 0) == 0


# -- 5. the audit hook ---------------------------------------------------------------------------

_DENIED = {  # audit events refused outright, and what to call them
    "os.fork": "new processes", "os.forkpty": "new processes", "os.system": "new processes",
    "os.exec": "new processes", "os.posix_spawn": "new processes", "os.spawn": "new processes",
    "subprocess.Popen": "new processes", "pty.spawn": "new processes",
    "os.killpg": "signals", "signal.pthread_kill": "signals",
    "ctypes.dlopen": "ctypes", "ctypes.dlsym": "ctypes", "ctypes.dlsym/handle": "ctypes",
    "socket.connect": "network access", "socket.bind": "network access",
    "socket.sendto": "network access", "socket.sendmsg": "network access",
}
_PATH_EVENTS = {  # audit events that change the file system, and the argument holding a path
    "os.rename": (0, 1), "os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,),
    "os.symlink": (1,), "os.link": (1,), "os.truncate": (0,), "os.chmod": (0,),
    "os.chown": (0,), "os.utime": (0,), "os.mkfifo": (0,), "os.mknod": (0,),
    "os.chflags": (0,), "os.lchflags": (0,), "os.lchmod": (0,),
}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def audit_hook(folder: str, private_network: bool = False) -> Callable[[str, tuple], None]:
    """A Python audit hook: refuses subprocesses, ctypes, signals, writes and file changes
    outside `folder`, and sockets (unless the network namespace is private) with a readable
    PermissionError. Only a courtesy: the kernel's walls above refuse the same, also to
    native code, which never raises an audit event."""
    root = os.path.realpath(folder)
    allowed = (root, os.devnull)
    me = os.getpid()

    def inside(path: Any) -> bool:
        if isinstance(path, int):
            return True  # an open descriptor: Landlock checked it when it was opened
        real = os.path.realpath(os.fsdecode(path))
        return real in allowed or real.startswith(root + os.sep)

    def hook(event: str, args: tuple) -> None:
        what = _DENIED.get(event)
        if what == "network access" and private_network:
            what = None  # a network namespace of its own: only its loopback is there
        if what is None and event == "os.kill" and args and args[0] not in (0, me):
            what = "signals"
        elif what is None and event == "open" and len(args) >= 3:
            path, mode, flags = args[0], args[1], args[2]
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & _WRITE_FLAGS)
            if writing and path is not None and not inside(path):
                what = f"writing to {os.fsdecode(path)!r}"
        elif what is None and event in _PATH_EVENTS:
            if any(i < len(args) and args[i] is not None and not inside(args[i])
                   for i in _PATH_EVENTS[event]):
                what = f"changing files outside the sandbox folder ({event})"
        elif what is None and event == "object.__setattr__" and args and args[0] is hook:
            what = "changing the grader's audit hook"
        if what is not None:
            raise PermissionError(f"the grader's sandbox does not allow {what}")

    return hook



# -- all of them --------------------------------------------------------------------------------

def install(folder: str, submission: str | None = None, ids: tuple[int, int] | None = None
            ) -> dict[str, Any]:
    """Identity, namespaces, Landlock and seccomp, in that order, as far as the kernel allows.

    `ids` is the uid and gid a root grader hands this sandbox (None: keep the identity).
    Returns every wall of `WALLS` but the audit hook, which the worker adds.
    """
    walls: dict[str, Any] = dict.fromkeys(WALLS, False)
    walls.update(landlock=0, landlock_rules_failed=0)
    if not sys.platform.startswith("linux"):
        return walls
    rules = open_rules(folder, read_paths(folder, submission))  # before anything changes
    if ids is not None:
        try:
            walls["own_uid"] = drop_identity(*ids)
        except OSError:
            walls["own_uid"] = False
    try:
        walls.update(enter_namespaces())
    except OSError:
        pass
    try:
        abi, failed, fenced = landlock(rules, walls["net_namespace"])
        walls.update(landlock=abi, landlock_rules_failed=failed, landlock_reads=fenced,
                     landlock_scopes=abi >= 6)
    except OSError:
        pass
    try:
        walls["seccomp"] = seccomp()
    except OSError:
        pass
    return walls


def down(walls: dict[str, Any], root: bool) -> list[str]:
    """What a walls dict lacks, in words (empty: every wall is up).

    >>> down({"own_uid": False, "user_namespace": True, "net_namespace": True,
    ...       "ipc_namespace": True, "landlock": 6, "landlock_reads": True,
    ...       "landlock_scopes": True, "landlock_rules_failed": 0, "seccomp": True,
    ...       "audit_hook": True}, root=False)
    []
    """
    missing = []
    if root and not walls.get("own_uid") and not walls.get("user_namespace"):
        missing.append("learner code runs as root (neither an own uid nor a user namespace)")
    elif root and not walls.get("own_uid"):
        missing.append("no own uid (the Python installation is not readable by other users): "
                       "root's powers are taken by the user namespace alone")
    for key, what in (("user_namespace", "no user namespace"),
                      ("net_namespace", "no network namespace (TCP is walled by Landlock "
                                        "ABI 4+ only, other protocols by nothing)"),
                      ("ipc_namespace", "no IPC namespace"),
                      ("seccomp", "no seccomp filter (processes, metadata changes and unix "
                                  "sockets are refused by the audit hook only, which native "
                                  "code passes)"),
                      ("audit_hook", "no audit hook")):
        if not walls.get(key):
            missing.append(what)
    if not walls.get("landlock"):
        missing.append("no Landlock (reads and writes are not walled)")
    else:
        if not walls.get("landlock_reads"):
            missing.append("Landlock reads are not walled")
        if not walls.get("landlock_scopes"):
            missing.append(f"Landlock ABI {walls['landlock']} < 6: signals to processes "
                           "outside are not walled by Landlock")
        if walls.get("landlock_rules_failed"):
            missing.append(f"{walls['landlock_rules_failed']} Landlock rules failed to apply "
                           "(less is readable; the rest of Landlock holds)")
    return missing


def fewer(got: dict[str, Any], announced: dict[str, Any]) -> list[str]:
    """The walls `got` lacks that `announced` has: a sandbox never runs with fewer walls than
    the grader said up front.

    >>> fewer({"seccomp": False, "landlock": 3}, {"seccomp": True, "landlock": 6})
    ['landlock', 'seccomp']
    """
    lost = []
    for key in sorted(set(got) | set(announced)):
        if key == "landlock_rules_failed":
            if int(got.get(key, 0)) > int(announced.get(key, 0)):
                lost.append(key)
        elif int(got.get(key, 0)) < int(announced.get(key, 0)):
            lost.append(key)
    return lost


def survey(folder: str, ids: tuple[int, int] | None) -> dict[str, Any]:
    """The walls a sandbox gets on this machine: `install` run in a throw-away child."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_fd)
            walls = install(folder, None, ids)
            walls["audit_hook"] = hasattr(sys, "addaudithook")
            os.write(write_fd, json.dumps(walls).encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    try:
        walls = json.loads(data)
    except ValueError:
        walls = {}
    return {key: walls.get(key, 0 if key.startswith("landlock") and key != "landlock_reads"
                           and key != "landlock_scopes" else False) for key in WALLS}
