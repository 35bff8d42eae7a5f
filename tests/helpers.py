"""Test helpers: real mounts (unionfs and kernel overlayfs) that always clean up, and tree snapshots."""
from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

MOUNT_TIMEOUT = 20.0


def is_mounted(path: str | os.PathLike) -> bool:
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4].encode().decode("unicode_escape") == real for line in f)


def force_unmount(path: str | os.PathLike) -> None:
    """Last resort: abort the FUSE connection (so nothing blocks) and detach the mount."""
    real = os.path.realpath(path)
    try:
        dev = None
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if fields[4].encode().decode("unicode_escape") == real:
                    dev = fields[2]
        if dev is not None:
            minor = dev.split(":")[1]
            abort = f"/sys/fs/fuse/connections/{minor}/abort"
            if os.path.exists(abort):
                with open(abort, "w") as f:
                    f.write("1")
    except OSError:
        pass
    subprocess.run(["umount", "-l", real], capture_output=True, timeout=30)


@contextmanager
def program_mount(program: str, opts: str, mnt: Path, cwd: Path | None = None):
    """Mount with ``PROGRAM -o OPTS MNT`` as podman does (unionfs or fuse-overlayfs); always unmounted
    with ``fusermount3 -u``, as podman does, and forced off if that left it."""
    r = subprocess.run([program, "-o", opts, str(mnt)], capture_output=True, text=True, timeout=60, cwd=cwd,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0 and is_mounted(mnt), (program, opts, r.stderr)
    try:
        yield mnt
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, timeout=30)
        if is_mounted(mnt):
            force_unmount(mnt)


def unmount_all_below(base: str | os.PathLike) -> list[str]:
    """Force-unmount every mount at or below ``base``; returns their paths (for a stale-mount check)."""
    prefix = str(base)
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split()[4] for line in f if line.split()[4].startswith(prefix)]
    for mp in sorted(mounts, reverse=True):
        force_unmount(mp)
    return mounts


def unionfs_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "unionfs", *args]


class UnionMount:
    """A unionfs daemon in the foreground, as a child process, logging to a file."""

    def __init__(self, mnt: Path, lower: list[Path], upper: Path | None = None, work: Path | None = None,
                 options: list[str] | None = None, log: Path | None = None) -> None:
        self.mnt, self.lower, self.upper, self.work = Path(mnt), lower, upper, work
        self.options = options or []
        self.log = Path(log) if log else self.mnt.parent / f"{self.mnt.name}.log"
        self.proc: subprocess.Popen | None = None

    def mount_args(self) -> list[str]:
        """``unionfs`` arguments for this mount, in the foreground with a log."""
        args = ["mount", "-f", "--log", str(self.log), "--lower", ":".join(str(p) for p in self.lower)]
        if self.upper is not None:
            args += ["--upper", str(self.upper), "--work", str(self.work)]
        for o in self.options:
            args += ["-o", o]
        args.append(str(self.mnt))
        return args

    def spawn(self, args: list[str]) -> subprocess.Popen:
        """Start the daemon (a subclass may start it another way, e.g. with faults injected)."""
        return subprocess.Popen(unionfs_cmd(*args), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)

    def start(self) -> "UnionMount":
        self.proc = self.spawn(self.mount_args())
        return self.wait_mounted()

    def wait_mounted(self) -> "UnionMount":
        """Wait for the daemon in ``self.proc`` to have the mount up; never forever."""
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while not is_mounted(self.mnt):
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode()
                raise RuntimeError(f"unionfs exited with {self.proc.returncode}: {err}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("unionfs did not mount in time")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        """Unmount and wait for the daemon; escalate to kill and abort, never hang."""
        if self.proc is None:
            return
        if is_mounted(self.mnt):
            subprocess.run(["fusermount3", "-u", str(self.mnt)], capture_output=True, timeout=30)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=15)
        if is_mounted(self.mnt):
            force_unmount(self.mnt)
        if self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None

    def log_errors(self) -> list[str]:
        if not self.log.exists():
            return []
        return [line for line in self.log.read_text(errors="replace").splitlines()
                if " ERROR " in line or "Traceback" in line or "internal error" in line]

    def __enter__(self) -> "UnionMount":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@contextmanager
def overlay_mount(mnt: Path, lower: list[Path], upper: Path | None = None, work: Path | None = None,
                  extra: str = ""):
    """Kernel overlayfs, the semantic oracle."""
    opts = "lowerdir=" + ":".join(str(p) for p in lower)
    if upper is not None:
        opts += f",upperdir={upper},workdir={work}"
    if extra:
        opts += "," + extra
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(mnt)], check=True,
                   capture_output=True, timeout=30)
    try:
        yield mnt
    finally:
        # A busy mount (a reference dropped a moment late) is tried again before it is detached:
        # a detached overlay keeps its upper dir marked in use, and an index=on mount that
        # stacks that dir as a lower layer is refused.
        for attempt in range(20):
            subprocess.run(["umount", str(mnt)], capture_output=True, timeout=30)
            if not is_mounted(mnt):
                break
            time.sleep(0.05 * (attempt + 1))
        if is_mounted(mnt):
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)


def user_xattrs(path: str) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    out = {}
    for n in names:
        if n.startswith(("user.", "trusted.")):
            try:
                out[n] = os.getxattr(path, n, follow_symlinks=False)
            except OSError as e:
                out[n] = f"errno {e.errno}".encode()
    return out


def snapshot(root: str | os.PathLike, with_times: bool = False, skip_unstatable: bool = False) -> dict:
    """Everything a user can see of a tree: names, types, modes, owners, sizes, data, links, xattrs,
    and hard-link groups (as sets of names, not inode numbers, so two mounts compare)."""
    root = os.fspath(root)
    out: dict[str, tuple] = {}
    by_ino: dict[int, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            try:
                st = os.lstat(p)
            except FileNotFoundError:
                if skip_unstatable:  # kernel overlayfs lists whiteouts of unmerged dirs (a known quirk)
                    continue
                raise
            mode = st.st_mode
            if stat.S_ISREG(mode):
                with open(p, "rb") as f:
                    data = hashlib.sha256(f.read()).hexdigest()
            elif stat.S_ISLNK(mode):
                data = os.readlink(p)
            elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
                data = st.st_rdev
            else:
                data = None
            nlink = st.st_nlink if not stat.S_ISDIR(mode) else None
            rec = [stat.S_IFMT(mode), stat.S_IMODE(mode), st.st_uid, st.st_gid,
                   st.st_size if not stat.S_ISDIR(mode) else None, data, nlink, user_xattrs(p)]
            if with_times:
                rec.append(st.st_mtime_ns)
            out[rel] = tuple(rec)
            if not stat.S_ISDIR(mode):
                by_ino.setdefault(st.st_ino, []).append(rel)
        dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
    out["<hardlinks>"] = sorted(sorted(v) for v in by_ino.values() if len(v) > 1)
    return out


def diff_snapshots(a: dict, b: dict) -> list[str]:
    lines = []
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            lines.append(f"{k}: {a.get(k)!r} != {b.get(k)!r}")
    return lines


def as_user(uid: int, fn, *args, gid: int | None = None) -> int:
    """Run fn(*args) in a child process as ``uid`` (and group ``gid``, by default the same number);
    returns its errno (0 for success)."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.setgroups([])
            os.setgid(uid if gid is None else gid)
            os.setuid(uid)
            fn(*args)
        except OSError as e:
            code = e.errno or 255
        except BaseException:
            code = 254
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def mkdirs(base: Path, *names: str) -> list[Path]:
    """Create ``base/name`` for each name; returns the paths in order."""
    out = []
    for n in names:
        p = base / n
        p.mkdir()
        out.append(p)
    return out
