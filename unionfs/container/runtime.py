"""The OCI runtime binary (crun, else runc): found on PATH, called one subcommand at a time.

``create``/``start``/``kill``/``delete``/``exec`` as the runtime-spec's operations; the
runtime's own errors go to a JSON log of ours (``--log``), apart from the container's
stderr, so a command that cannot be found or run maps to docker's 127 or 126.

Cgroups: crun refuses a host with the hybrid cgroup layout (cgroup v1 controllers
plus a cgroup2 ``unified`` mount: "cgroups in hybrid mode not supported").  There
we run crun in a private mount namespace where a tmpfs hides
``/sys/fs/cgroup/unified``, with ``--cgroup-manager=disabled`` (no resource limits
are applied to the container; runc copes with hybrid hosts by itself).
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import signal
import subprocess
import threading
from dataclasses import dataclass
from typing import Callable

from ..errors import UsageError
from .model import ContainerError
from .subids import SubIds, usable

RUNTIMES = ("crun", "runc")

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
UNIFIED = "/sys/fs/cgroup/unified"


class RuntimeMissing(UsageError):
    pass


def find_runtime(name: str | None) -> str:
    """The runtime binary: ``name`` (a name on PATH or a path), else crun, else runc."""
    if name:
        path = shutil.which(name)
        if path is None:
            raise RuntimeMissing(f"OCI runtime {name!r} not found: apt-get install crun (or runc), "
                                 "or give --runtime PATH")
        return path
    for n in RUNTIMES:
        path = shutil.which(n)
        if path:
            return path
    raise RuntimeMissing("no OCI runtime found (crun or runc): apt-get install crun")


def cgroup_layout() -> str:
    """``unified`` (cgroup v2 only), ``hybrid`` (v1 controllers plus a v2 ``unified`` mount) or ``legacy``."""
    fstypes = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            fstypes[fields[4]] = fields[sep + 1]
    if fstypes.get("/sys/fs/cgroup") == "cgroup2":
        return "unified"
    if fstypes.get(UNIFIED) == "cgroup2":
        return "hybrid"
    return "legacy"


# --- running ------------------------------------------------------------------

def _private_cgroup_view() -> None:
    """In the runtime's child, before exec: a mount namespace of its own where the cgroup2
    ``unified`` mount of a hybrid host is hidden (crun then sees a plain cgroup v1 host)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for what, rc in (("unshare(CLONE_NEWNS)", lambda: libc.unshare(CLONE_NEWNS)),
                     ("mount --make-rprivate /", lambda: libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None)),
                     (f"mount tmpfs on {UNIFIED}", lambda: libc.mount(b"tmpfs", UNIFIED.encode(), b"tmpfs", 0,
                                                                       b"mode=755"))):
        if rc() != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")


def runtime_command(runtime: str, args: list[str], layout: str) -> tuple[list[str], bool]:
    """(argv for ``RUNTIME args...``, whether to hide the unified cgroup mount first)."""
    name = os.path.basename(runtime)
    if name.startswith("crun") and layout == "hybrid":
        return [runtime, "--cgroup-manager=disabled", *args], True
    return [runtime, *args], False


class _Mapper:
    """Maps a child's new user namespace with the user's subordinate ids: the child unshares and says
    its pid; ``newuidmap``/``newgidmap`` (setuid helpers: a user may not write such maps) map it from
    here, in a thread, while Popen waits for the child's exec; then the child goes on."""

    def __init__(self, sub: SubIds, uid: int, gid: int) -> None:
        self.sub, self.uid, self.gid = sub, uid, gid
        self.ready_r, self.ready_w = os.pipe()
        self.go_r, self.go_w = os.pipe()
        self.error = ""
        self.thread = threading.Thread(target=self._map, daemon=True)
        self.thread.start()

    def _map(self) -> None:
        ok = False
        try:
            pid = os.read(self.ready_r, 32).decode()
            if not pid.isdigit():
                return
            for tool, triples in (("newuidmap", self.sub.uid_map(self.uid)), ("newgidmap", self.sub.gid_map(self.gid))):
                r = subprocess.run([tool, pid, *map(str, triples)], capture_output=True, text=True, timeout=30)
                if r.returncode != 0:
                    self.error = f"{tool}: {r.stderr.strip() or r.returncode}"
                    return
            ok = True
        finally:
            os.write(self.go_w, b"1" if ok else b"0")

    def in_child(self) -> None:
        """In the child before exec: a user namespace, mapped by the parent."""
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(CLONE_NEWUSER) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"unshare(CLONE_NEWUSER): {os.strerror(err)}")
        os.write(self.ready_w, str(os.getpid()).encode())
        if os.read(self.go_r, 1) != b"1":
            raise OSError(errno.EPERM, "the user namespace could not be mapped (newuidmap)")

    def done(self) -> None:
        """In the parent once the child exec'd (or failed): no end stays open, the thread ends."""
        for fd in (self.ready_w, self.go_r):
            os.close(fd)
        self.thread.join(timeout=60)
        for fd in (self.ready_r, self.go_w):
            os.close(fd)
        if self.error:
            raise ContainerError(f"cannot map the container's user namespace: {self.error}")


def _own_user_namespace(uid: int, gid: int) -> None:
    """Rootless, in the runtime's child before exec: a user namespace whose root is the user (the one
    mapping a user may write without newuidmap), so crun runs as root there and the container's root
    is the user: the files of the user's store (the user's own) are root's inside."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWUSER) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare(CLONE_NEWUSER): {os.strerror(err)}")
    for name, value in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(value)


def rootless() -> bool:
    return os.geteuid() != 0


def _join_user_namespace(fd: int) -> None:
    """In the child before exec: into the user namespace of a running container (the user owns it, so
    may; a container's processes of other ids are signalled, entered and deleted only from inside)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWUSER) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns(CLONE_NEWUSER): {os.strerror(err)}")


def _child_setup(hide: bool, ids: tuple[int, int] | None = None, mapper: _Mapper | None = None,
                 join: int | None = None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if join is not None:
        _join_user_namespace(join)
    elif mapper is not None:
        mapper.in_child()
    elif ids is not None:
        _own_user_namespace(*ids)
    if hide:
        _private_cgroup_view()


@dataclass
class Runtime:
    """The OCI runtime binary (crun or runc), one subcommand at a time; its own errors go to ``log``
    (``--log``, JSON), apart from the container's stderr."""
    path: str
    log: str = ""

    @staticmethod
    def _state_root() -> str:
        # Root of a user namespace, crun would use /run/crun: its state stays the user's.
        return os.path.join(os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/unionfs-{os.getuid()}", "unionfs", "runtime")

    def command(self, args: list[str]) -> tuple[list[str], bool]:
        glob = ["--log", self.log, "--log-format", "json"] if self.log else []
        if rootless():
            glob += ["--root", self._state_root()]
        return runtime_command(self.path, glob + args, cgroup_layout())

    def _running_namespace(self, args: list[str]) -> int | None:
        """Rootless: an fd of the user namespace of the container ``args`` name last, if it runs."""
        if not args or args[0] in ("create", "run"):
            return None
        try:
            with open(os.path.join(self._state_root(), os.path.basename(args[-1]), "status")) as f:
                pid = int(json.load(f)["pid"])
            return os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _spawn(self, args: list[str], start: Callable[[list[str], Callable[[], None]], object]):
        """Start the runtime with ``start(argv, preexec)``: rootless, in the running container's user
        namespace, or in a new one with the user's subordinate ids when usable (``subids``), else with
        the user alone as root."""
        argv, hide = self.command(args)
        if not rootless():
            return start(argv, lambda: _child_setup(hide))
        uid, gid = os.getuid(), os.getgid()
        join = self._running_namespace(args)
        sub = usable(uid) if join is None else None
        mapper = _Mapper(sub, uid, gid) if sub is not None else None
        try:
            return start(argv, lambda: _child_setup(hide, (uid, gid), mapper, join))
        finally:
            if mapper is not None:
                mapper.done()
            if join is not None:
                os.close(join)

    def popen(self, args: list[str], **kw) -> subprocess.Popen:
        try:
            return self._spawn(args, lambda argv, setup: subprocess.Popen(argv, preexec_fn=setup, **kw))
        except subprocess.SubprocessError as e:
            raise ContainerError(f"cannot start {os.path.basename(self.path)}: {e}; a private mount namespace "
                                 "is needed on this cgroup-hybrid host (run as root)") from None

    def call(self, args: list[str], timeout: float = 60.0) -> subprocess.CompletedProcess:
        return self._spawn(args, lambda argv, setup: subprocess.run(
            argv, preexec_fn=setup, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL))

    def errors(self) -> str:
        """The runtime's last error message from its log ("" if none)."""
        if not self.log:
            return ""
        msgs = []
        try:
            with open(self.log, encoding="utf-8", errors="replace") as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(rec, dict) and rec.get("level") in ("error", "fatal"):
                        msgs.append(str(rec.get("msg") or ""))
        except OSError:
            return ""
        return msgs[-1] if msgs else ""

    def delete(self, cid: str) -> None:
        self.call(["delete", "--force", cid])

    def kill(self, cid: str, sig: int) -> None:
        self.call(["kill", cid, str(sig)])


def exit_code_of_failure(message: str) -> int:
    """Docker's codes when the command could not be run: 127 not found, 126 not invocable, else 125."""
    m = message.lower()
    if "not found" in m or "no such file" in m:
        return 127
    if "permission denied" in m or "exec format error" in m or "is a directory" in m:
        return 126
    return 125
