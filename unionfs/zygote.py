"""The warm daemon ("zygote"): a process that has pyfuse3, trio and all of unionfs imported and
runs each ``unionfs`` mount or umount in a fork of itself, so a mount costs no imports (0.2 s cold).
The fork is made ahead of the request (a *spare*, which rehearses a mount's first steps while it
waits), and a mount program's worker becomes the mount daemon itself: no fork is left on a mount's way.

The caller (:mod:`unionfs.entry`) connects to a unix socket, sends its argv, environment and umask,
and passes its cwd and stdio as fds (SCM_RIGHTS); the fork takes them on, joins the caller's cgroups
and resource limits, and runs the very code the caller would have run (:func:`unionfs.cli.main`),
writing to the caller's own stdout and stderr; the caller exits with the status sent back.  So a
relative path, a log file, an error message and the exit status are the same either way.

One zygote serves one identity: the socket's name is a hash of everything a process's rights and
view of the world come from (uid, gids, groups, capabilities, seccomp, LSM label, namespaces, the
interpreter and this package's path); it lives in a directory only its user can enter
(``/run/unionfs/zygote`` as root, else ``$XDG_RUNTIME_DIR/unionfs/zygote``; ``$UNIONFS_ZYGOTE_DIR``
overrides), and both ends check the other's uid (SO_PEERCRED).  It is started in the background by
the first mount that found none, and exits after ``$UNIONFS_ZYGOTE_IDLE`` seconds (default 600)
without a request, or when a source file of unionfs changed since it started (inotify).
``UNIONFS_ZYGOTE=0`` turns it off: every command runs in its own process, as before.

The client half (:func:`run`, :func:`start`) imports only what Python has loaded at start-up.
"""
from __future__ import annotations

import _socket   # the client half: socket.py would import selectors and enum (5 ms)
import marshal
import os
import stat
import struct
import sys

ENV_OFF = "UNIONFS_ZYGOTE"
ENV_DIR = "UNIONFS_ZYGOTE_DIR"
ENV_IDLE = "UNIONFS_ZYGOTE_IDLE"
IDLE = 600.0
PACKAGE = os.path.dirname(os.path.abspath(__file__))
_STATUS_FIELDS = (b"Uid:", b"Gid:", b"Groups:", b"CapInh:", b"CapPrm:", b"CapEff:", b"CapBnd:", b"CapAmb:",
                  b"NoNewPrivs:", b"Seccomp:", b"Seccomp_filters:")
_NAMESPACES = ("mnt", "pid", "pid_for_children", "user", "net", "ipc", "uts", "cgroup", "time")
_ACCEPTED = b"A"
_TAKE_TIMEOUT = 10.0
_MAX_REQUEST = 16 << 20
# The next spare is forked this long after a request was answered, not at once: its fork and rehearsal
# would compete for the CPU with the new mount daemon's first requests (and the caller's next steps).
_SPARE_AFTER = 0.05


def enabled() -> bool:
    return os.environ.get(ENV_OFF, "1").lower() not in ("0", "off", "no", "false")


def identity() -> bytes:
    """What makes two processes alike for a mount: same rights, same view, same code."""
    parts = [sys.executable.encode(), PACKAGE.encode()]
    with open("/proc/self/status", "rb") as f:
        parts += [line.strip() for line in f if line.startswith(_STATUS_FIELDS)]
    for ns in _NAMESPACES:
        try:
            parts.append(os.readlink(f"/proc/self/ns/{ns}").encode())
        except OSError:
            parts.append(b"-")
    try:
        with open("/proc/self/attr/current", "rb") as f:
            parts.append(f.read().strip())
    except OSError:
        parts.append(b"-")
    return b"\n".join(parts)


def directory() -> str | None:
    """Where the sockets live; None for a user without a runtime directory of their own (a shared
    /tmp would let others swap the directory under us)."""
    if os.environ.get(ENV_DIR):
        return os.environ[ENV_DIR]
    if os.geteuid() == 0:
        return "/run/unionfs/zygote"
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return runtime + "/unionfs/zygote" if runtime else None


def _private_dir(create: bool) -> str | None:
    """The zygote directory if it is ours and closed to everybody else (made so with ``create``)."""
    d = directory()
    if d is None:
        return None
    if create:
        try:
            os.makedirs(d, mode=0o700, exist_ok=True)
        except OSError:
            return None
    try:
        st = os.lstat(d)
    except OSError:
        return None
    if not (stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and st.st_mode & 0o077 == 0):
        return None
    return d


def _base(ident: bytes) -> str:
    """A name for ``ident`` (both ends compare the identity itself: a checksum is enough, and cheap)."""
    import binascii
    return "".join(f"{binascii.crc32(ident, seed):08x}" for seed in (0, 0x9E3779B9, 0x7F4A7C15))


def _peer(sock) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end."""
    return struct.unpack("3i", sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, struct.calcsize("3i")))


# --- the client ---------------------------------------------------------------------------------

def run(argv: list[str]) -> int | None:
    """Run ``unionfs ARGV`` in the warm daemon; its exit status, or None when no zygote took it
    (none running, a stale one, a stdio fd closed): then nothing was done and the caller runs it."""
    d = _private_dir(create=False)
    if d is None:
        return None
    ident = identity()
    std = [0, 1, 2]
    try:
        for fd in std:
            os.fstat(fd)
    except OSError:
        return None   # a closed stdio fd cannot be passed on
    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    cwd = -1
    try:
        try:
            s.connect(f"{d}/{_base(ident)}.sock")
        except OSError:
            return None
        if _peer(s)[1] != os.geteuid():
            return None
        umask = os.umask(0o022)
        os.umask(umask)
        request = marshal.dumps((ident, argv, dict(os.environ), umask))
        try:
            cwd = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            s.sendmsg([struct.pack("I", len(request))],
                      [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, struct.pack("4i", cwd, *std))])
            s.sendall(request)
            s.shutdown(_socket.SHUT_WR)
        except OSError:
            return None
        reply = b""
        s.settimeout(_TAKE_TIMEOUT)   # a wedged (stopped, swapped-out) zygote must not hang the caller
        while not reply.endswith(b"\n"):
            try:
                chunk = s.recv(64)
            except TimeoutError:
                if not reply:
                    return None   # not taken: the worker, if it ever comes, finds us gone and does nothing
                continue
            except OSError:
                break
            if not chunk:
                break
            if not reply:
                s.settimeout(None)   # taken: as long as the command takes
            reply += chunk
        if not reply.startswith(_ACCEPTED):
            return None   # refused (stale, another identity) or gone before taking it: nothing was done
        status = reply[1:].strip()
        if not status.lstrip(b"-").isdigit():
            sys.stderr.write("unionfs: the warm daemon's worker ended without an exit status\n")
            return 1
        return int(status)
    finally:
        if cwd >= 0:
            os.close(cwd)
        s.close()


def start() -> None:
    """Start a zygote for this identity in the background (it exits at once if one already runs)."""
    d = _private_dir(create=True)
    if d is None:
        return
    from .background import spawn
    path = f"{d}/{_base(identity())}.sock"
    env = dict(os.environ)
    root = os.path.dirname(PACKAGE)
    env["PYTHONPATH"] = root + (":" + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")

    def body(tell) -> None:
        tell("ok")
        os.execve(sys.executable, [sys.executable, "-m", "unionfs.zygote", path], env)
    spawn(body, chdir="/")


# --- the zygote -----------------------------------------------------------------------------------

def _preload() -> None:
    """What a mount and an umount import, loaded once (no threads started: we fork)."""
    import resource  # noqa: F401   (the worker copies the caller's limits)

    import pyfuse3  # noqa: F401
    import trio  # noqa: F401

    from . import cli  # noqa: F401
    from .container import commands  # noqa: F401
    from .fs import mount, upper, writable  # noqa: F401
    from .fuse import daemon, operations  # noqa: F401
    cli.parser()   # built once (cached), with the parsers' own imports
    cli.mount_program_parser()
    trio.run(_warm_trio)   # a first run sets up what every later one reuses: the daemon's loop starts sooner


async def _warm_trio() -> None:
    """What the mount daemon's loop does first (daemon._serve): a nursery, a signal receiver."""
    import signal

    import trio
    async with trio.open_nursery():
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM):
            await trio.sleep(0)


def _sources() -> dict[str, int]:
    out = {}
    for m in list(sys.modules.values()):
        f = getattr(m, "__file__", None)
        if f and f.startswith(PACKAGE):
            try:
                out[f] = os.stat(f).st_mtime_ns
            except OSError:
                out[f] = -1
    return out


class _Changes:
    """Has a source file of unionfs changed since the zygote started?  inotify on the package's
    directories, watching from before the imports: one read per request (a stat of every loaded
    module cost a mount 2 ms in a zygote woken from its sleep).  Without inotify: those stats."""

    # IN_MODIFY IN_ATTRIB IN_CLOSE_WRITE IN_MOVED_FROM IN_MOVED_TO IN_CREATE IN_DELETE IN_DELETE_SELF IN_MOVE_SELF
    _WATCH = 0x002 | 0x004 | 0x008 | 0x040 | 0x080 | 0x100 | 0x200 | 0x400 | 0x800
    _GONE = 0x400 | 0x800 | 0x4000 | 0x8000   # the directory deleted or moved, the queue overflowed, a watch gone

    def __init__(self) -> None:
        self.fd = -1
        self.stamp: dict[str, int] | None = None
        try:
            import ctypes
            libc = ctypes.CDLL(None, use_errno=True)
            fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        except (OSError, AttributeError):
            return
        if fd < 0:
            return
        for d, subdirs, _ in os.walk(PACKAGE):
            subdirs[:] = [x for x in subdirs if x != "__pycache__"]
            if libc.inotify_add_watch(fd, os.fsencode(d), self._WATCH) < 0:
                os.close(fd)
                return
        self.fd = fd

    def start(self) -> None:
        """Once everything is imported: the fallback's stamp."""
        if self.fd < 0:
            self.stamp = _sources()

    def changed(self) -> bool:
        if self.fd < 0:
            return _sources() != self.stamp
        try:
            data = os.read(self.fd, 1 << 16)
        except BlockingIOError:
            return False
        while data:   # struct inotify_event: wd, mask, cookie, len, then name (NUL padded)
            _wd, mask, _cookie, size = struct.unpack_from("iIII", data)
            name = data[16:16 + size].rstrip(b"\0")
            if mask & self._GONE or name.endswith(b".py"):
                return True
            data = data[16 + size:]
        return False


def _receive(conn) -> tuple[bytes, list[int]]:
    import socket
    head, fds, _, _ = socket.recv_fds(conn, 4, 4)
    if len(head) != 4 or len(fds) != 4:
        for fd in fds:
            os.close(fd)
        raise ValueError("a bad request")
    (size,) = struct.unpack("I", head)
    if size > _MAX_REQUEST:
        raise ValueError("a request too big")
    data = bytearray()
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ValueError("a short request")
        data += chunk
    return bytes(data), fds


def _join_cgroups(pid: int) -> None:
    """Into the caller's cgroups (v2 and each v1 hierarchy), as a process it started would be."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            theirs = f.read().splitlines()
        with open("/proc/self/cgroup") as f:
            ours = set(f.read().splitlines())
    except OSError:
        return
    for line in theirs:
        if line in ours:
            continue
        _, controllers, path = line.split(":", 2)
        base = "/sys/fs/cgroup" if not controllers else "/sys/fs/cgroup/" + controllers.removeprefix("name=")
        try:
            with open(f"{base}{path}/cgroup.procs", "w") as f:
                f.write("0")
        except OSError:
            pass


def _copy_limits(pid: int) -> None:
    import resource
    for name in dir(resource):
        if name.startswith("RLIMIT_"):
            r = getattr(resource, name)
            try:
                limits = resource.prlimit(pid, r)
                if resource.getrlimit(r) != limits:
                    resource.setrlimit(r, limits)
            except (OSError, ValueError):
                pass


def _work(conn, peer_pid: int, ident: bytes, channel=None) -> None:
    """In the fork: become the caller (cwd, stdio, environment, umask, cgroups, limits), run its command.
    A mount program's command ends by starting the mount daemon: this process becomes that daemon
    (``channel``, the zygote's line to us, closed once the caller has its answer)."""
    try:
        request, fds = _receive(conn)
        their_ident, argv, env, umask = marshal.loads(request)
    except (OSError, ValueError, EOFError, TypeError):
        return
    if their_ident != ident:
        return
    conn.sendall(_ACCEPTED)   # the caller gone (timed out): EPIPE, and nothing is done
    # A process group of our own: nothing sent to the zygote's reaches this command or the mount
    # daemon it starts.  In the zygote's session (no terminal, its leader gone), as that daemon must be.
    os.setpgid(0, 0)
    from . import background
    background.detached()
    cwd, *std = fds
    os.fchdir(cwd)
    os.close(cwd)
    for fd, target in zip(std, (0, 1, 2)):
        os.dup2(fd, target)
        os.close(fd)
    for k in [k for k in os.environ if k not in env]:   # only the differences: a fork's pages stay shared
        del os.environ[k]
    for k, v in env.items():
        if os.environ.get(k) != v:
            os.environ[k] = v
    os.umask(umask)
    _join_cgroups(peer_pid)
    _copy_limits(peer_pid)
    sys.argv = ["unionfs", *argv]
    from .cli import main
    from .routing import is_mount_program_argv
    if is_mount_program_argv(argv):   # its last step is the daemon's spawn, whose answer is its outcome
        err = os.dup(2)
        keep = {conn.fileno(), err} | ({channel.fileno()} if channel is not None else set())
        background.in_place(lambda line: _settle(line, conn, err, channel), frozenset(keep))
    code: int = 1
    try:
        code = main(argv)
    except SystemExit as e:   # argparse: usage errors (2) and --help (0)
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
    except BaseException:
        import traceback
        traceback.print_exc()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except OSError:
            pass
    conn.sendall(f"{code}\n".encode())


def _settle(line: str, conn, err: int, channel) -> None:
    """A mount program's outcome, once this process is its daemon: what ``cli.main`` would have printed
    and returned after ``fuse.daemon.mount``'s spawn told ``line``, to the caller's stderr and to the caller."""
    from .errors import one_line
    from .fuse.daemon import DIED
    code = 0
    line = line.strip()
    if line != "ok":
        code = 2
        try:
            os.write(err, f"unionfs: {one_line(Exception(line or DIED))}\n".encode(errors="backslashreplace"))
        except OSError:
            pass
    os.close(err)
    try:
        conn.sendall(f"{code}\n".encode())
    except OSError:
        pass
    conn.close()
    if channel is not None:
        channel.close()


def _rehearse() -> None:
    """What a mount program's request runs first, run once on nothing that matters (the package's own
    directory, read-only) while the spare waits: the pages it touches are then this fork's own, not
    copied from the zygote's on the request's time (that took a fresh fork 2 ms)."""
    import trio

    from . import cli
    from .fs.mount import open_union
    from .fuse.daemon import build_config
    try:
        args = cli.mount_program_parser().parse_intermixed_args(["-o", f"lowerdir={PACKAGE}", PACKAGE])
        cfg = build_config(args.targets[-1], [], None, None, list(args.options), False)
        open_union(cfg.lower).close()
        trio.run(_warm_trio)
    except Exception:   # a rehearsal: whatever it meets, the request does its own work anyway
        pass


def _spare(channel, ident: bytes, rehearse: bool) -> None:
    """A worker forked ahead of its request (the fork costs a big process 2 ms): it rehearses, waits
    for the zygote to hand it a connection, then serves it.  The zygote gone (EOF): it leaves."""
    import socket
    if rehearse:
        _rehearse()
    try:
        _, fds, _, _ = socket.recv_fds(channel, 1, 1)
    except OSError:
        return
    if len(fds) != 1:
        return
    conn = socket.socket(fileno=fds[0])
    _work(conn, _peer(conn)[0], ident, channel)


def serve(path: str) -> int:
    """The zygote's life: hold the lock, listen, hand each request to a spare worker forked while
    idle (or fork one then), leave when idle or stale."""
    import contextlib
    import fcntl
    import select
    import signal
    import socket
    import time
    base = path.removesuffix(".sock")
    lock = os.open(base + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return 0   # one runs already
    ident = identity()
    if f"{os.path.dirname(path)}/{_base(ident)}.sock" != path:
        return 0   # not started by a process like us
    changes = _Changes()
    _preload()
    changes.start()
    import gc
    gc.freeze()   # what is loaded now stays out of the forks' collections: fewer copy-on-write pages
    idle = float(os.environ.get(ENV_IDLE) or IDLE)
    spare: list = []   # [pid, our end of its channel] while a spare waits
    busy: dict[int, socket.socket] = {}   # the channels of the workers at work, by fd: they close them when done
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def reap() -> None:
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass

    def fork_spare(rehearse: bool = True) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        pid = os.fork()
        if pid == 0:
            try:
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                for fd in (lock, wake_r, wake_w, changes.fd):
                    if fd >= 0:
                        os.close(fd)
                for sock in [listener, ours, *busy.values()]:
                    sock.close()
                _spare(theirs, ident, rehearse)
            finally:
                os._exit(0)
        theirs.close()
        spare[:] = [pid, ours]
        poll.register(ours, select.POLLIN)   # POLLHUP: it died before its request

    signal.signal(signal.SIGCHLD, lambda *_: None)   # wakes the poll below (set_wakeup_fd)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))   # leave no socket behind
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        with_lock_gone = False
        with open(base + ".pid", "w") as f:   # before the socket: whoever reaches it finds our pid
            f.write(f"{os.getpid()}\n")
        if os.path.lexists(path):
            os.unlink(path)   # a dead zygote's: we hold the lock
        listener.bind(path)
        os.chmod(path, 0o600)
        listener.listen(64)
        poll = select.poll()
        poll.register(listener, select.POLLIN)
        poll.register(wake_r, select.POLLIN)
        last = due = time.monotonic()
        while True:
            reap()
            now = time.monotonic()
            if not spare and not busy and now >= due:   # the next request's fork, ahead of it
                fork_spare()
            wait = last + idle if spare or busy else min(last + idle, due)
            events = dict(poll.poll(max(0.0, wait - now) * 1000))
            if not events:
                if time.monotonic() >= last + idle:
                    break
                continue
            if wake_r in events:
                with contextlib.suppress(BlockingIOError):
                    while os.read(wake_r, 512):
                        pass
            for fd in events:   # a channel closed at the other end: a worker done, or a spare dead
                if fd in busy:
                    poll.unregister(fd)
                    busy.pop(fd).close()
                    due = time.monotonic() + _SPARE_AFTER
                elif spare and fd == spare[1].fileno():
                    poll.unregister(fd)
                    spare.pop().close()
                    spare.clear()
            if listener.fileno() not in events:
                continue
            conn, _ = listener.accept()
            last = time.monotonic()
            _pid, uid, _gid = _peer(conn)
            if uid != os.geteuid():
                conn.close()
                continue
            if changes.changed():   # unionfs changed under us: let the caller run the new code
                with_lock_gone = True
                for p in (path, base + ".pid"):
                    os.unlink(p)
                os.close(lock)
                conn.close()
                break
            if not spare:   # the one before still at work (or just done): a fork now, no rehearsal
                fork_spare(rehearse=False)
            _pid, channel = spare
            spare.clear()
            try:
                socket.send_fds(channel, [b"c"], [conn.fileno()])
                busy[channel.fileno()] = channel
            except OSError:   # it died just now: the caller, finding nobody, runs the command itself
                poll.unregister(channel)
                channel.close()
            conn.close()
    finally:
        if not with_lock_gone:
            for p in (path, base + ".pid"):
                try:
                    os.unlink(p)
                except OSError:
                    pass
        listener.close()
    return 0


if __name__ == "__main__":
    sys.exit(serve(sys.argv[1]))
