"""A container's life: a supervisor of ours runs it, and ``ps``/``logs``/``stop``/``kill``/``wait``/``exec``
read and act on what it records.

The supervisor is the ``unionfs`` process of ``run`` (in the foreground) or a
double-forked one (``-d``, ``start``).  It mounts the container on its rootfs, asks
the runtime to ``create`` it (errors: docker's 125/126/127), is the child subreaper
of the container's init (so it ``waitpid``s it and gets its exact status), records
``state.json``, ``start``s it, copies a detached container's output into
``container.log``, and when init exits: ``delete``s it in the runtime, unmounts, and
records the exit code (with ``--rm``: removes it and its anonymous volumes).

``state.json`` (written atomically)::

    {"Status": "running"|"exited"|"created", "Pid": <init's host pid>, "ExitCode": N,
     "StartedAt": ..., "FinishedAt": ..., "Supervisor": {"Pid", "StartTime", "BootId"}, "Error": ...}

A record that says running is believed only while its supervisor lives (pid, start
time in /proc, boot id): after a supervisor crash or a reboot the container reads as
exited (255), and ``start`` first clears what was left (the runtime's container,
its mount), so a container is never wedged.
"""
from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Callable

from ..fs import sys as ovl
from ..background import spawn
from ..errors import UsageError, one_line
from ..fuse.daemon import is_mountpoint, umount
from ..image.store import Store, now_iso
from . import model, subids
from .model import Container, ContainerError
from .mounting import mount_container
from .runtime import Runtime, exit_code_of_failure
from .terminal import ConsoleSocket, follow_winsize, pump, raw_terminal

PR_SET_CHILD_SUBREAPER = 36
KILL_WAIT = 30.0        # after SIGKILL, how long the supervisor gets to clean up before we give up waiting


class RunFailed(ContainerError):
    """The container could not be started: ``code`` is docker's (125 ours, 126 not invocable, 127 not found)."""

    def __init__(self, message: str, code: int = 125) -> None:
        super().__init__(message)
        self.code = code


def docker_status(call: Callable[[], int]) -> int:
    """run and exec exit as docker's: the command's status, 125 when unionfs failed, 126/127 from the runtime."""
    try:
        return call()
    except UsageError as e:   # RunFailed among them, with docker's code
        print("unionfs: " + one_line(e), file=sys.stderr)
        return e.code if isinstance(e, RunFailed) else 125


@dataclass
class RunConfig:
    """How a container is run, kept beside its bundle (``run.json``) for ``start``, ``stop``, ``exec``."""
    runtime: str
    stop_signal: int = int(signal.SIGTERM)
    tty: bool = False
    interactive: bool = False
    auto_remove: bool = False
    command: str = ""

    @classmethod
    def load(cls, c: Container) -> "RunConfig":
        try:
            with open(c.file("run.json"), "rb") as f:
                rec = json.load(f)
        except (OSError, ValueError):
            raise ContainerError(f"{c.name or c.short_id}: was never run (no run configuration); "
                                 "create it with unionfs run") from None
        return cls(**{k: rec[k] for k in cls.__dataclass_fields__ if k in rec})

    def save(self, c: Container) -> None:
        _write_json(c.file("run.json"), asdict(self))


@dataclass
class State:
    status: str = "created"       # created | running | exited
    pid: int = 0
    exit_code: int = 0
    started_at: str = ""
    finished_at: str = ""
    error: str = ""
    supervisor: dict = field(default_factory=dict)

    def to_record(self) -> dict:
        return {"Status": self.status, "Pid": self.pid, "ExitCode": self.exit_code, "StartedAt": self.started_at,
                "FinishedAt": self.finished_at, "Error": self.error, "Supervisor": self.supervisor}

    @classmethod
    def from_record(cls, rec: dict) -> "State":
        return cls(str(rec.get("Status") or "created"), int(rec.get("Pid") or 0), int(rec.get("ExitCode") or 0),
                   str(rec.get("StartedAt") or ""), str(rec.get("FinishedAt") or ""), str(rec.get("Error") or ""),
                   dict(rec.get("Supervisor") or {}))

    @property
    def running(self) -> bool:
        return self.status == "running"


def _write_json(path: str, rec: dict) -> None:
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    with open(tmp, "w") as f:
        json.dump(rec, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _start_time(pid: int) -> int:
    """A live process's start time (clock ticks since boot): with the pid, it names one process for good;
    -1 if there is none (or only a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return -1 if fields[0] in ("Z", "X") else int(fields[19])
    except (OSError, IndexError, ValueError):
        return -1


def _me() -> dict:
    return {"Pid": os.getpid(), "StartTime": _start_time(os.getpid()), "BootId": _boot_id()}


def _alive(sup: dict) -> bool:
    pid = int(sup.get("Pid") or 0)
    return pid > 0 and sup.get("BootId") == _boot_id() and _start_time(pid) == sup.get("StartTime")


def read_state(c: Container) -> State:
    """The recorded state, corrected: "running" only while the supervisor that wrote it lives."""
    try:
        with open(c.file("state.json"), "rb") as f:
            st = State.from_record(json.load(f))
    except (OSError, ValueError):
        return State()
    if st.running and not _alive(st.supervisor):
        st.status, st.exit_code = "exited", 255
        st.error = st.error or "the unionfs supervisor stopped (crash or reboot) while the container ran"
    return st


def write_state(c: Container, st: State) -> None:
    _write_json(c.file("state.json"), st.to_record())


def status_text(st: State) -> str:
    """``Up 3 minutes``, ``Exited (0) 2 seconds ago``, ``Created``: as docker ps shows it."""
    from ..image.report import human_ago
    if st.running:
        return "Up " + human_ago(st.started_at).removesuffix(" ago")
    if st.status == "exited":
        return f"Exited ({st.exit_code}) {human_ago(st.finished_at or st.started_at)}"
    return "Created"


# --- the supervisor ------------------------------------------------------------------

@dataclass
class Attach:
    """Where the container's stdio go: ours (``run``, ``start -a``) or the log (detached)."""
    attached: bool
    stdin: bool            # -i: our stdin reaches the container


class _Log:
    """``container.log``: one JSON record per line of output, ``{"stream", "log", "time"}``, as docker's
    json-file driver; bytes that are not UTF-8 survive (surrogate escapes)."""

    def __init__(self, path: str) -> None:
        self.f = open(path, "ab", buffering=0)
        self.lock = threading.Lock()
        self.partial: dict[str, bytes] = {}

    def write(self, stream: str, data: bytes) -> None:
        with self.lock:
            data = self.partial.pop(stream, b"") + data
            *lines, rest = data.split(b"\n")
            for line in lines:
                self._record(stream, line + b"\n")
            if rest:
                self.partial[stream] = rest

    def _record(self, stream: str, data: bytes) -> None:
        rec = {"stream": stream, "log": data.decode("utf-8", "surrogateescape"), "time": now_iso()}
        self.f.write((json.dumps(rec) + "\n").encode())

    def close(self) -> None:
        with self.lock:
            for stream, rest in self.partial.items():
                self._record(stream, rest)
            self.partial.clear()
            self.f.close()


def _drain(fd: int, write) -> None:
    with os.fdopen(fd, "rb", buffering=0) as f:
        while True:
            data = f.read(65536)
            if not data:
                return
            write(data)


def _write_all(fd: int, data: bytes) -> None:
    while data:
        try:
            n = os.write(fd, data)
        except BlockingIOError:
            time.sleep(0.01)
            continue
        data = data[n:]


def _set_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise RunFailed(f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(ctypes.get_errno())}")


def _rootfs_options() -> list[str]:
    """How ``run`` mounts the container's rootfs.  Rootless, owners shift as the container's user
    namespace maps them (:mod:`.runtime`): recorded owner 0 shows as the user (root inside), k as the
    user's k-th subordinate id.  With subordinate ids the container's processes are several host ids:
    ``allow_other`` (``user_allow_other``), and the kernel checks them against the shown owners; with
    the user alone every process is the user: no allow_other, which fusermount3 refuses without
    ``user_allow_other`` in /etc/fuse.conf."""
    if os.geteuid() == 0:
        return ["suid,dev,allow_other"]
    uid, gid = os.geteuid(), os.getegid()
    sub = subids.usable(uid)
    if sub is not None:
        return ["allow_other," + sub.mount_options(uid, gid)]
    return [f"uidmapping=0:{uid}:1,gidmapping=0:{gid}:1"]


def make_workdir(rootfs: str, cwd: str) -> None:
    """Docker creates a missing working directory (owned by root) through the container's own view."""
    root_fd = os.open(rootfs, ovl.O_DIR & ~os.O_NOFOLLOW)
    try:
        fd = os.dup(root_fd)
        for part in [p for p in os.fsencode(cwd).split(b"/") if p]:
            try:
                nfd = ovl.open_dir_at(fd, part)
            except FileNotFoundError:
                ovl.mkdir_at(fd, part, 0o755)
                nfd = ovl.open_dir_at(fd, part)
            except OSError:
                break     # a symlink or a file there: the runtime says what it thinks of it
            os.close(fd)
            fd = nfd
        os.close(fd)
    finally:
        os.close(root_fd)


def unmount_rootfs(c: Container) -> None:
    for attempt in range(50):
        if not is_mountpoint(c.rootfs):
            return
        try:
            umount(c.rootfs)
            return
        except UsageError as e:
            if "busy" not in str(e) or attempt == 49:
                raise
            time.sleep(0.1)


def _clear_leftovers(c: Container, rt: Runtime) -> None:
    """What a crashed supervisor or a reboot left: the runtime's container, the rootfs mount."""
    rt.delete(c.runtime_id)
    if is_mountpoint(c.rootfs):
        unmount_rootfs(c)


def supervise(store: Store, c: Container, io: Attach, started=None, prepare=None) -> int:
    """Run the container (already given a bundle and run.json) to its end; returns its exit code.

    ``prepare()`` runs once the rootfs is mounted (``run`` writes the bundle there); ``started()`` is
    called once the container runs.  What keeps it from starting is raised after the cleanup.  The
    caller must not hold the store's lock (the mount's daemon is forked from here).
    """
    cfg = RunConfig.load(c)
    rt = Runtime(cfg.runtime, c.file("runtime.log"))
    if read_state(c).running:
        raise RunFailed(f"{c.name or c.short_id}: is already running")
    _clear_leftovers(c, rt)
    try:
        os.unlink(rt.log)
    except FileNotFoundError:
        pass
    code = 125
    st = State("exited", 0, 125, now_iso(), "", "", _me())
    log: _Log | None = None
    console: ConsoleSocket | None = None
    try:
        os.makedirs(c.rootfs, mode=0o755, exist_ok=True)
        mount_container(store, c, c.rootfs, _rootfs_options())
        if prepare is not None:
            prepare()
        with open(os.path.join(c.bundle, "config.json"), "rb") as f:
            spec = json.load(f)
        make_workdir(c.rootfs, spec["process"].get("cwd") or "/")
        _set_subreaper()
        if cfg.tty:
            console = ConsoleSocket()
        if not io.attached:
            log = _Log(c.file("container.log"))
        pid, outputs = _create(rt, c, io, console)
        master = console.receive() if console else None
        stop_ev = threading.Event()
        threads = _copiers(io, outputs, master, log, stop_ev)
        st = State("running", pid, 0, now_iso(), "", "", _me())
        write_state(c, st)
        r = rt.call(["start", c.runtime_id])
        if r.returncode != 0:
            msg = rt.errors() or r.stderr.strip() or "start failed"
            raise RunFailed(msg, exit_code_of_failure(msg))
        if started is not None:
            started()
        for t in threads:
            t.start()
        interactive_tty = master is not None and io.attached and io.stdin
        with raw_terminal(0 if interactive_tty else None), \
                follow_winsize(0 if master is not None and io.attached else None, master):
            code = _wait(pid, forward=io.attached and not interactive_tty)   # raw: ^C is a byte
        stop_ev.set()
        for t in threads:
            t.join(timeout=5)
        if master is not None:
            os.close(master)
        return code
    except RunFailed as e:
        code = e.code                   # recorded as its exit code, as docker does for 126/127
        raise
    finally:
        if console is not None:
            console.close()
        if log is not None:
            log.close()
        try:
            rt.delete(c.runtime_id)
        finally:
            try:
                unmount_rootfs(c)
            finally:
                st.status, st.exit_code, st.finished_at = "exited", code, now_iso()
                if os.path.isdir(c.dir):
                    write_state(c, st)
                if cfg.auto_remove:
                    _auto_remove(store, c)


def _create(rt: Runtime, c: Container, io: Attach,
            console: ConsoleSocket | None) -> tuple[int, dict[str, int]]:
    """``RUNTIME create``: the container's init, waiting to be started, with our stdio (attached) or pipes
    (detached).  Returns (init's pid, the read ends of the output pipes by stream)."""
    pidfile = c.file("init.pid")
    args = ["create", "--bundle", c.bundle, "--pid-file", pidfile]
    if console is not None:
        args += ["--console-socket", console.path]
    devnull = os.open(os.devnull, os.O_RDWR)
    pipes: dict[str, tuple[int, int]] = {}
    if io.attached:
        fds = (0 if io.stdin else devnull, 1, 2)
    else:
        pipes = {"stdout": os.pipe(), "stderr": os.pipe()}
        fds = (devnull, pipes["stdout"][1], pipes["stderr"][1])
    try:
        rc = rt.popen(args + [c.runtime_id], stdin=fds[0], stdout=fds[1], stderr=fds[2]).wait()
    finally:
        os.close(devnull)
        for _, w in pipes.values():
            os.close(w)
    if rc != 0:
        for r, _ in pipes.values():
            os.close(r)
        msg = rt.errors() or f"{os.path.basename(rt.path)} create failed (status {rc})"
        raise RunFailed(msg, exit_code_of_failure(msg))
    with open(pidfile) as f:
        return int(f.read().strip()), {stream: r for stream, (r, _) in pipes.items()}


def _copiers(io: Attach, outputs: dict[str, int], master: int | None, log: "_Log | None",
             stop: threading.Event) -> list[threading.Thread]:
    """Threads (not started) copying the container's output to the log, and its terminal to and from ours."""
    threads = [threading.Thread(target=_drain, args=(r, lambda d, s=stream: log.write(s, d)), daemon=True)
               for stream, r in outputs.items()]
    if master is not None:
        out = (lambda d: _write_all(1, d)) if io.attached else (lambda d: log.write("stdout", d))
        threads.append(threading.Thread(target=pump, args=(master, 0 if io.attached and io.stdin else None,
                                                           out, stop), daemon=True))
    return threads


def _wait(pid: int, forward: bool) -> int:
    """Wait for the container's init (our child, as subreaper); signals to us go to it (docker's sig-proxy)."""
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
    old = {}
    if threading.current_thread() is threading.main_thread():
        for s in sigs:
            handler = (lambda n, _f: _kill(pid, n)) if forward else signal.SIG_IGN
            old[s] = signal.signal(s, handler)
    try:
        while True:
            try:
                _, status = os.waitpid(pid, 0)
                break
            except InterruptedError:
                continue
            except ChildProcessError:
                return 255
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _auto_remove(store: Store, c: Container) -> None:
    from .volumes import remove_anonymous
    with store.locked():
        if model.mounted_at(c) is None and os.path.isdir(c.dir):
            remove_anonymous(store, c)
            model.remove(store, c)


def detach(store: Store, c: Container, prepare=None) -> None:
    """Start the container under a supervisor of its own (a double-forked, session-leading process); returns
    once it runs, or raises what kept it from starting."""
    def supervisor(tell) -> None:
        try:
            supervise(store, c, Attach(False, False), lambda: tell("ok"), prepare)
        except BaseException as err:      # told after the cleanup (--rm done), so the caller sees it done
            code = err.code if isinstance(err, RunFailed) else 125
            tell(f"{code} {' '.join(str(err).splitlines()) or type(err).__name__}")   # unless started
            raise
    answer = spawn(supervisor, chdir="/")   # pin no directory of the caller's
    if answer == "ok":
        return
    code, _, msg = answer.partition(" ")
    if not code.isdigit():
        raise RunFailed("the container's supervisor died before the container started")
    raise RunFailed(msg, int(code))


# --- the commands on a container -----------------------------------------------------

def start(store: Store, name: str, attach: bool = False, interactive: bool = False, prepare=None) -> int:
    c = model.resolve(store, name)
    if read_state(c).running:
        return 0                  # docker: starting a running container is a no-op
    if attach:
        return supervise(store, c, Attach(True, interactive), prepare=prepare)
    detach(store, c, prepare)
    return 0


def wait(store: Store, name: str, poll: float = 0.1) -> int:
    """Until the container is not running; its exit code."""
    c = model.resolve(store, name)
    while True:
        st = read_state(c)
        if not st.running:
            return st.exit_code
        time.sleep(poll)


def _wait_stopped(c: Container, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not read_state(c).running:
            return True
        time.sleep(0.05)
    return not read_state(c).running


def kill(store: Store, name: str, sig: int = signal.SIGKILL) -> Container:
    c = model.resolve(store, name)
    st = read_state(c)
    if not st.running:
        raise ContainerError(f"{name}: is not running")
    _kill(st.pid, sig)
    return c


def stop(store: Store, name: str, timeout: float | None = None) -> Container:
    """The image's StopSignal, then SIGKILL after ``timeout`` seconds (10 by default), as docker stop."""
    c = model.resolve(store, name)
    st = read_state(c)
    if not st.running:
        return c
    cfg = RunConfig.load(c)
    _kill(st.pid, cfg.stop_signal)
    if not _wait_stopped(c, 10.0 if timeout is None else timeout):
        _kill(st.pid, signal.SIGKILL)
        if not _wait_stopped(c, KILL_WAIT):
            raise ContainerError(f"{name}: did not stop after SIGKILL")
    return c


def restart(store: Store, name: str, timeout: float | None = None) -> None:
    stop(store, name, timeout)
    start(store, name)


def force_stop(c: Container) -> None:
    """``rm -f`` of a running container: SIGKILL and let its supervisor clean up."""
    st = read_state(c)
    if st.running:
        _kill(st.pid, signal.SIGKILL)
        if not _wait_stopped(c, KILL_WAIT):
            raise ContainerError(f"{c.name or c.short_id}: did not stop after SIGKILL")


def logs(store: Store, name: str, follow: bool = False, tail: int | None = None) -> None:
    """The container's output as it was written: stdout records to our stdout, stderr to our stderr."""
    c = model.resolve(store, name)
    path = c.file("container.log")
    outs = {"stdout": sys.stdout.buffer, "stderr": sys.stderr.buffer}
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        if not follow:
            return
        f = None
    if f is not None and tail is not None:
        lines = f.readlines()
        start_at = max(0, len(lines) - tail) if tail >= 0 else 0
        for line in lines[start_at:]:
            _emit(line, outs)
    buf = b""
    while True:
        if f is None:
            try:
                f = open(path, "rb")
            except FileNotFoundError:
                f = None
        chunk = f.read() if f is not None else b""
        if chunk:
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                _emit(line, outs)
            continue
        if not follow or not read_state(c).running:
            if follow and f is not None:     # the last lines written before it stopped
                rest = f.read()
                for line in (buf + rest).split(b"\n"):
                    _emit(line, outs)
            if f is not None:
                f.close()
            return
        time.sleep(0.1)


def _emit(line: bytes, outs) -> None:
    if not line.strip():
        return
    try:
        rec = json.loads(line)
        data = str(rec["log"]).encode("utf-8", "surrogateescape")
        out = outs.get(rec.get("stream"), outs["stdout"])
    except (ValueError, KeyError, TypeError):
        return
    out.write(data)
    out.flush()


def exec_in(store: Store, name: str, args: list[str], env: list[str], user: str | None, workdir: str | None,
            tty: bool, interactive: bool) -> int:
    """``exec``: another process in a running container, with its environment, user and directory unless
    overridden; its exit status (126/127 when it cannot be run)."""
    from .spec import exec_process
    c = model.resolve(store, name)
    st = read_state(c)
    if not st.running:
        raise RunFailed(f"{name}: is not running", 125)
    cfg = RunConfig.load(c)
    with open(os.path.join(c.bundle, "config.json"), "rb") as f:
        spec = json.load(f)
    root_fd = os.open(c.rootfs, ovl.O_DIR & ~os.O_NOFOLLOW)
    try:
        proc = exec_process(spec["process"], root_fd, args, env, user, workdir, tty)
    finally:
        os.close(root_fd)
    tmp = c.file(f"exec-{uuid.uuid4().hex}.json")
    log = c.file(f"exec-{uuid.uuid4().hex}.log")
    rt = Runtime(cfg.runtime, log)
    _write_json(tmp, proc)
    console = ConsoleSocket() if tty else None
    try:
        cmd = ["exec", "--process", tmp]
        if console:
            cmd += ["--console-socket", console.path]
        p = rt.popen(cmd + [c.runtime_id], stdin=0 if interactive and not tty else subprocess.DEVNULL)
        if console:
            master = console.receive()
            stop_ev = threading.Event()
            t = threading.Thread(target=pump, args=(master, 0 if interactive else None,
                                                    lambda d: _write_all(1, d), stop_ev), daemon=True)
            with raw_terminal(0 if interactive else None), follow_winsize(0, master):
                t.start()
                code = p.wait()
            stop_ev.set()
            t.join(timeout=5)
            os.close(master)
        else:
            code = p.wait()
        msg = rt.errors()
        if msg:
            raise RunFailed(msg, exit_code_of_failure(msg))
        return 128 - code if code < 0 else code
    finally:
        if console:
            console.close()
        for p_ in (tmp, log):
            try:
                os.unlink(p_)
            except FileNotFoundError:
                pass
