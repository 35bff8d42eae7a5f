"""Mounting: option parsing, the daemon's life cycle, and unmounting.

``mount`` validates everything it can in the calling process, so mistakes get
a one-line error and exit status 2; then it forks the daemon and returns once
the kernel has the mount (the daemon reports readiness, or its error, through a
pipe).  In the foreground the same code runs in the calling process.

Owns fuse-overlayfs's ``-o`` options, the pidfiles, the trio loop and unmounting.
It must not decide what the filesystem means: it opens the union with
:func:`unionfs.fs.mount.open_union` and hands it to the adapter.
"""
from __future__ import annotations

import contextlib
import faulthandler
import logging
import logging.handlers
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

from ..background import spawn
from ..errors import UsageError
from ..fs import formats
from ..fs.idmap import IdMap

log = logging.getLogger("unionfs.daemon")

# FUSE options we pass through to the kernel/libfuse as given.
PASSTHROUGH = {"allow_other", "allow_root", "default_permissions", "ro", "rw", "debug", "suid", "nosuid", "dev",
               "nodev", "exec", "noexec", "atime", "noatime", "relatime", "dirsync", "sync", "async", "auto_unmount"}
PASSTHROUGH_VALUE = {"fsname", "subtype", "max_read", "blksize"}
# Ours, accepted as -o options for overlayfs familiarity.
OURS = {"lowerdir", "upperdir", "workdir"}
# fuse-overlayfs's options (and FUSE ones libfuse 3 or pyfuse3 lack) that change nothing here, and why
# (README, "unionfs as podman's mount_program").
NO_OP = {
    "threaded": "one trio loop serves every request",
    "fast_ino": "inode numbers come from the layers' own inodes",
    "ino32_t": "inode numbers are the layer files' own (32-bit on ext4)",
    "xino": "inode numbers are always as overlayfs's xino=on",
    "redirect_dir": "directory renames always record trusted.overlay.redirect (as redirect_dir=on)",
    "timeout": "the kernel caches lower entries for a day, upper ones for a second",
    "kernel_cache": "file pages are always kept (keep_cache)",
    "max_write": "requests already carry up to 1 MiB (libfuse 3.14's buffer, max_pages 256)",
    "diratime": "FUSE does not update atimes", "nodiratime": "FUSE does not update atimes",
    "splice_move": "pyfuse3 does not splice", "splice_read": "pyfuse3 does not splice",
    "splice_write": "pyfuse3 does not splice", "no_splice_move": "pyfuse3 does not splice",
    "no_splice_read": "pyfuse3 does not splice", "no_splice_write": "pyfuse3 does not splice",
}
# The kernel's writeback cache: small writes gather in the page cache and reach the daemon as
# few big WRITE requests (README, "Writes and the writeback cache").
WRITEBACK_DEFAULT = True
# libfuse mounts nosuid,nodev and for the mounting user alone; as root we mount with these unless
# told otherwise (the option named beside each), as fuse-overlayfs does: a rootfs needs setuid
# binaries, device nodes, and users other than root.
ROOT_DEFAULTS = {"allow_other": "allow_root", "suid": "nosuid", "dev": "nodev"}
DIED = "the daemon died before the mount was ready"


@dataclass
class MountConfig:
    mountpoint: str
    lower: list[str]
    upper: str | None = None
    work: str | None = None
    fuse_options: set[str] = field(default_factory=set)
    foreground: bool = False
    log_file: str | None = None
    debug: bool = False
    fsync: bool = True            # volatile, fsync=0: fsync(2) and copy-ups do not wait for the disk
    idmap: IdMap = IdMap()        # uidmapping, gidmapping, squash_to_*
    acl: bool = True              # noacl: the kernel neither caches nor enforces POSIX ACLs
    xattrs: bool = True           # noxattrs=1: no extended attributes at all (EOPNOTSUPP)
    static_nlink: bool = False    # static_nlink: every directory has st_nlink 1
    override: str | None = None   # xattr_permissions=1|2: the xattr recording owners, modes and types
    metacopy: bool = False        # metacopy=on: chmod, chown, utimes, xattrs copy no data (fs/metacopy.py)
    max_inodes: int | None = None  # max_inodes=N: the inode budget (None: the adapter's default)
    writeback: bool = WRITEBACK_DEFAULT   # writeback=0|1: the kernel's writeback cache (README)
    fill: Callable[[int, int, int], None] | None = None   # lazy layers: see union.Fill
    background: Callable[[], None] | None = None         # run in a thread of the daemon once mounted


def split_lowerdir(value: str) -> list[str]:
    """Split overlayfs's ``lowerdir=top:...:bottom``, honouring ``\\:`` escapes."""
    parts, cur, i = [], "", 0
    while i < len(value):
        c = value[i]
        if c == "\\" and i + 1 < len(value):
            cur += value[i + 1]
            i += 2
            continue
        if c == ":":
            parts.append(cur)
            cur = ""
        else:
            cur += c
        i += 1
    parts.append(cur)
    if any(p == "" for p in parts):
        raise UsageError(f"lowerdir: empty layer in {value!r}")
    return parts


def split_options(values: list[str]) -> dict[str, str | None]:
    """``-o a,b=c -o d`` -> {a: None, b: c, d: None}.  A comma inside double quotes is part of the
    value (podman's ``context="system_u:object_r:container_file_t:s0:c1,c2"``); empty items are
    skipped (podman writes ``workdir=W,,volatile``)."""
    out: dict[str, str | None] = {}
    for value in values:
        for item in re.findall(r'(?:[^,"]|"[^"]*")+', value):
            k, sep, v = item.partition("=")
            out[k] = v if sep else None
    return out


def has_option(options: list[str], key: str) -> bool:
    """Does one of the ``-o`` values (each a comma-separated list) set ``key=``?"""
    return any(o.startswith(key + "=") or f",{key}=" in o for o in options)


def with_fsname(options: list[str], name: str) -> list[str]:
    """``options`` plus ``fsname=NAME`` unless one is given: ``df`` and ``mount`` then show what is mounted."""
    options = list(options)
    if not has_option(options, "fsname"):
        options.append(f"fsname={name}")
    return options


def _flag(k: str, v: str | None) -> bool:
    """fuse-overlayfs's ``%d`` options: ``noxattrs=1``; a bare name means 1."""
    if v is None:
        return True
    if v.strip().isdigit():
        return int(v) != 0
    raise UsageError(f"mount option {k}={v}: want a number")


def _number(k: str, v: str | None) -> int:
    if v is None or not v.isdigit():
        raise UsageError(f"mount option {k} needs a number: {k}=N")
    return int(v)


def _selinux_enabled() -> bool:
    return os.path.exists("/sys/fs/selinux/enforce")


def build_config(mountpoint: str, lower: list[str], upper: str | None, work: str | None,
                 options: list[str], foreground: bool, log_file: str | None = None) -> MountConfig:
    opts = split_options(options)
    fuse: set[str] = {"default_permissions"}
    fsync, acl, xattrs, static_nlink, meta = True, True, True, False, False
    override: str | None = None
    max_inodes: int | None = None
    writeback = WRITEBACK_DEFAULT
    ids: dict[str, object] = {}
    for k, v in opts.items():
        if k == "lowerdir":
            if not v:
                raise UsageError("mount option lowerdir needs directories: lowerdir=TOP:...:BOTTOM")
            if lower:
                raise UsageError("give the lower layers once: --lower or -o lowerdir")
            lower = split_lowerdir(v or "")
        elif k in ("upperdir", "workdir"):
            if not v:   # a bare or empty one would silently give a read-only mount
                raise UsageError(f"mount option {k} needs a directory: {k}=DIR")
            upper, work = (v, work) if k == "upperdir" else (upper, v)
        elif k in PASSTHROUGH and v is None:
            fuse.add(k)
        elif k in PASSTHROUGH_VALUE and v:
            fuse.add(f"{k}={v}")
        elif k == "volatile" and v is None:
            fsync = False
        elif k in ("fsync", "sync") and v is not None:   # fuse-overlayfs spells it fsync=0
            fsync = fsync and _flag(k, v)
        elif k in ("uidmapping", "gidmapping") and v:
            ids[k] = v
        elif k == "squash_to_root" and v is None:
            ids[k] = True
        elif k in ("squash_to_uid", "squash_to_gid"):
            ids[k] = _number(k, v)
        elif k == "noacl" and v is None:
            acl = False
        elif k == "noxattrs":
            xattrs = not _flag(k, v)
        elif k == "static_nlink" and v is None:
            static_nlink = True
        elif k == "metacopy" and v in ("on", "off"):
            meta = v == "on"
        elif k == "metacopy":
            raise UsageError(f"metacopy={v or ''}: give metacopy=on or metacopy=off")
        elif k == "max_inodes":
            max_inodes = _number(k, v)
        elif k == "writeback":   # fuse-overlayfs's writeback=0|1
            writeback = _flag(k, v)
        elif k == "xattr_permissions":
            if v not in (None, "0", "1", "2"):
                raise UsageError(f"xattr_permissions={v}: want 0, 1 (security.fuseoverlayfs.override_stat) "
                                 "or 2 (user.containers.override_stat)")
            override = formats.override_name(int(v or "1")) if v != "0" else None
            if override == formats.OVERRIDE_PRIVILEGED and os.geteuid() != 0:
                raise UsageError("xattr_permissions=1 records owners in security.* xattrs, which only root may "
                                 "write: use xattr_permissions=2")
        elif k == "context" and v:
            if _selinux_enabled():   # without SELinux the kernel would refuse the mount
                fuse.add(f"context={v}")
        elif k == "plugins":
            raise UsageError("plugins= (fuse-overlayfs's lazy-loading plugins) is not supported")
        elif k in NO_OP:
            pass
        else:
            raise UsageError(f"unknown mount option {k!r}")
    if not lower:
        raise UsageError("no lower layers: give --lower TOP:...:BOTTOM or -o lowerdir=...")
    if not os.path.exists(mountpoint):
        raise UsageError(f"mount point {mountpoint}: no such directory")
    if not os.path.isdir(mountpoint):
        raise UsageError(f"mount point {mountpoint}: not a directory")
    if (upper is None) != (work is None):
        raise UsageError("an upper dir needs a work dir and the other way round (--upper and --work)")
    if upper is None:
        fuse.add("ro")
    if "ro" in fuse:
        fuse.discard("rw")
    if "allow_root" in fuse and "allow_other" in fuse:
        raise UsageError("allow_root and allow_other exclude each other")
    if os.geteuid() == 0:
        fuse |= {opt for opt, unless in ROOT_DEFAULTS.items() if unless not in fuse}
    elif override is not None and not ("allow_other" in fuse or "allow_root" in fuse):
        # A user's mount with recorded owners, for the user alone: the user is root of it ("fakeroot"),
        # so the kernel must not check the recorded owners against the user's own id; with nobody else
        # let in, there is nobody else to check.  With others let in (a container's subordinate ids),
        # the kernel checks everyone against the owners shown, as for root's mounts.
        fuse.discard("default_permissions")
    if not any(o.startswith("fsname=") for o in fuse):
        fuse.add("fsname=unionfs")
    if not any(o.startswith("subtype=") for o in fuse):
        fuse.add("subtype=unionfs")
    try:
        idmap = IdMap.from_options(**ids)   # type: ignore[arg-type]
    except ValueError as e:
        raise UsageError(str(e)) from None
    return MountConfig(os.path.abspath(mountpoint), lower, upper, work, fuse, foreground, log_file,
                       debug="debug" in fuse, fsync=fsync, idmap=idmap, acl=acl, xattrs=xattrs,
                       static_nlink=static_nlink, override=override, metacopy=meta, max_inodes=max_inodes,
                       writeback=writeback)


# --- running -----------------------------------------------------------------

def _pidfile_dir() -> str:
    return "/run/unionfs" if os.geteuid() == 0 else os.environ.get("XDG_RUNTIME_DIR", "/tmp") + "/unionfs"


def _pidfile(mountpoint: str) -> str:
    base = _pidfile_dir()
    os.makedirs(base, exist_ok=True)
    return os.path.join(base, os.path.realpath(mountpoint).strip("/").replace("/", "%") + ".pid")


def _running(pid: int) -> bool:
    """Is ``pid`` still running?  A zombie is not: the daemon has exited, and its parent (maybe a
    subreaper, maybe an init that reaps late) has not yet collected it."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rpartition(b")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in (b"Z", b"X")


def _wait_exited(pid: int, timeout: float) -> bool:
    """Wait until ``pid`` has exited (its upper dir's lock is free then); False after ``timeout``.
    A pidfd wakes us the moment it exits; polling the state is the fallback (an old kernel)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    except OSError:
        deadline = time.monotonic() + timeout
        while _running(pid):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.002)
        return True
    try:
        import select
        poll = select.poll()
        poll.register(fd, select.POLLIN)
        return bool(poll.poll(timeout * 1000)) or not _running(pid)
    finally:
        os.close(fd)


def daemons_holding(paths: list[str]) -> dict[str, int]:
    """Which of ``paths`` (layer or upper dirs) a running unionfs daemon holds open: {path: pid}.

    A daemon keeps fds on its layers' directories for the life of the mount, so its
    pidfile and /proc tell what an ``rmi`` or ``rm`` would pull from under a mount.
    """
    found: dict[str, int] = {}
    try:
        pidfiles = os.listdir(_pidfile_dir())
    except OSError:
        return found
    prefixes = [p.rstrip("/") + "/" for p in paths]
    for pf in pidfiles:
        try:
            pid = int(open(os.path.join(_pidfile_dir(), pf)).read())
            fds = os.listdir(f"/proc/{pid}/fd")
        except (OSError, ValueError):
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}") + "/"
            except OSError:
                continue
            for pre, p in zip(prefixes, paths):
                if target.startswith(pre):
                    found[p] = pid
    return found


def _setup_logging(cfg: MountConfig) -> None:
    level = logging.DEBUG if cfg.debug else logging.INFO
    handler: logging.Handler
    if cfg.log_file:
        handler = logging.FileHandler(cfg.log_file)
    elif cfg.foreground:
        handler = logging.StreamHandler(sys.stderr)
    elif os.path.exists("/dev/log"):
        handler = logging.handlers.SysLogHandler("/dev/log")
        level = logging.WARNING
    else:
        handler = logging.NullHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


# The kernel sends FUSE reads no larger than the mount's read-ahead window, 128 KiB by default
# (the INIT reply can only shrink it; sysfs can widen it).
# Every request costs the daemon the same ~20 us whatever its size, so a 1 MiB window (the most a
# request can carry with libfuse's 1 MiB buffers) makes a sequential read send 8 times fewer.
READ_AHEAD_KB = 1024


def _widen_read_ahead(mountpoint: str) -> None:
    """Set our mount's read-ahead window (root only, best effort: a window is not a semantic)."""
    dev = None
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                sep = fields.index("-")
                point = _mountinfo_path(fields[4])
                if point == mountpoint and fields[sep + 1].startswith("fuse"):
                    dev = fields[2]   # the last one: the newest mount on that path, ours
        if dev is not None:
            with open(f"/sys/class/bdi/{dev}/read_ahead_kb", "w") as f:
                f.write(str(READ_AHEAD_KB))
    except (OSError, ValueError) as e:
        log.debug("cannot widen the read-ahead window of %s: %s", mountpoint, e)


def _serve(cfg: MountConfig, union, ready) -> None:
    """Mount and run the FUSE loop until unmounted or signalled. ``ready(msg)`` reports the outcome."""
    import pyfuse3
    import trio

    from .operations import Operations

    real_mountpoint = os.path.realpath(cfg.mountpoint)  # before mounting (see below)
    ops = Operations(union, after_init=lambda: _widen_read_ahead(real_mountpoint), idmap=cfg.idmap,
                     acl=cfg.acl, xattrs=cfg.xattrs, static_nlink=cfg.static_nlink,
                     fakeroot="default_permissions" not in cfg.fuse_options, writeback=cfg.writeback,
                     **({"max_inodes": cfg.max_inodes} if cfg.max_inodes is not None else {}))
    os.umask(0)  # modes of new entries come from the caller, already masked by the kernel
    pidfile = _pidfile(cfg.mountpoint)  # before mounting: resolving the path afterwards would ask ourselves
    try:
        pyfuse3.init(ops, cfg.mountpoint, cfg.fuse_options)
    except RuntimeError as e:
        union.close()
        ready(f"cannot mount on {cfg.mountpoint}: {e}")
        return
    with open(pidfile, "w") as f:
        f.write(f"{os.getpid()}\n")
    ready(None)
    log.info("mounted %s on %s (%s)", ":".join(cfg.lower), cfg.mountpoint, ",".join(sorted(cfg.fuse_options)))
    if cfg.background is not None:
        import threading
        threading.Thread(target=cfg.background, name="background", daemon=True).start()
    terminated = False

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            async def on_signals() -> None:
                nonlocal terminated
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for _ in signals:
                        terminated = True
                        pyfuse3.terminate()
                        return
            nursery.start_soon(on_signals)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    except BaseException:
        log.exception("FUSE loop failed")
        ops.close()
        pyfuse3.close(unmount=False)
        raise
    else:
        # After an unmount the session is already gone; after a signal, unmount ourselves.
        ops.close()
        pyfuse3.close(unmount=terminated)
        log.info("unmounted %s", cfg.mountpoint)
    finally:
        union.close()
        with contextlib.suppress(OSError):
            os.unlink(pidfile)


def mount(cfg: MountConfig) -> int:
    """Mount; in the background unless ``cfg.foreground``. Returns the exit status."""
    if os.geteuid() != 0:
        # libfuse mounts for a user through the setuid fusermount3, with /dev/fuse open: without
        # either it only says "fuse_session_mount failed".
        if not os.access("/dev/fuse", os.R_OK | os.W_OK):
            raise UsageError("no access to /dev/fuse: an unprivileged mount needs it read-write for every "
                             "user (mode 0666, as udev sets it on Debian)")
        if not (os.access("/usr/bin/fusermount3", os.X_OK) or shutil.which("fusermount3")):
            raise UsageError("no fusermount3: an unprivileged mount needs it (Debian package fuse3)")
    from ..fs.mount import open_union   # the union modules: not needed to parse options or unmount
    union = open_union(cfg.lower, cfg.upper, cfg.work, cfg.fsync, cfg.mountpoint, cfg.metacopy)
    union.fill = cfg.fill
    union.override = cfg.override
    if cfg.foreground:
        _setup_logging(cfg)
        faulthandler.enable()
        faulthandler.register(signal.SIGUSR1)
        problem: list[str] = []
        _serve(cfg, union, lambda msg: problem.append(msg) if msg else None)
        if problem:
            raise UsageError(problem[0])
        return 0
    def daemon(tell) -> None:
        try:
            _setup_logging(cfg)
            faulthandler.enable()
            faulthandler.register(signal.SIGUSR1)
            _serve(cfg, union, lambda msg: tell(msg or "ok"))
        except BaseException:
            log.exception("daemon failed")
            raise
    answer = spawn(daemon, keep=union.fds())
    union.close()
    if answer == "ok":
        return 0
    if answer:
        raise UsageError(answer)
    raise UsageError(DIED)


def _mountinfo_path(field: str) -> str:
    """A mount point as /proc/self/mountinfo writes it (space, tab, newline, backslash as octal)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)


def is_mountpoint(path: str) -> bool:
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = _mountinfo_path(line.split()[4])
            if mp == real:
                return True
    return False


def umount(mountpoint: str, timeout: float = 10.0) -> int:
    """Unmount, including a mount whose daemon died ("Transport endpoint is not connected")."""
    # No stat of the mount point itself: with a dead daemon it fails (ENOTCONN).
    real = os.path.join(os.path.realpath(os.path.dirname(os.path.abspath(mountpoint))),
                        os.path.basename(os.path.abspath(mountpoint)))
    if not is_mountpoint(real):
        if not os.path.lexists(mountpoint):
            raise UsageError(f"{mountpoint}: no such directory")
        raise UsageError(f"{mountpoint}: not mounted")
    pidfile = _pidfile(real)
    try:
        pid = int(open(pidfile).read())
    except (OSError, ValueError):
        pid = None
    r = subprocess.run(["fusermount3", "-u", real], capture_output=True, text=True)
    if r.returncode != 0:
        msg = r.stderr.strip()
        if "busy" in msg.lower():
            raise UsageError(f"{mountpoint}: busy (close what uses it, or umount -l)")
        # Dead daemon or not a FUSE mount of ours: detach it.
        r2 = subprocess.run(["umount", "-l", real], capture_output=True, text=True)
        if r2.returncode != 0:
            raise UsageError(f"{mountpoint}: {r2.stderr.strip() or msg}")
    if pid is not None:
        if not _wait_exited(pid, timeout):
            return 0
        try:
            os.unlink(pidfile)  # a killed daemon could not remove its own
        except FileNotFoundError:
            pass
    return 0
