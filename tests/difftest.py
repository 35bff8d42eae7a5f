"""Random operations applied to two mounts, with every result (value or errno) compared."""
from __future__ import annotations

import ctypes
import errno
import os
import random
import stat
from pathlib import Path

_libc = ctypes.CDLL(None, use_errno=True)
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2


def renameat2(a: str, b: str, flags: int) -> None:
    if _libc.renameat2(-100, a.encode(), -100, b.encode(), ctypes.c_uint(flags)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def _stat_view(st: os.stat_result) -> tuple:
    return (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
            st.st_size if not stat.S_ISDIR(st.st_mode) else None, st.st_nlink)


NB = os.O_NONBLOCK  # a FIFO in the pool must never block an open


class Ops:
    """Each op takes a root and returns a comparable result; OSError becomes ('err', errno)."""

    @staticmethod
    def _write(r, p, data, flags, mode=0o644):
        fd = os.open(os.path.join(r, p), flags | NB, mode)
        try:
            return os.write(fd, data)
        finally:
            os.close(fd)

    @staticmethod
    def write_new(r, p, data):
        return Ops._write(r, p, data, os.O_WRONLY | os.O_CREAT | os.O_EXCL)

    @staticmethod
    def append(r, p, data):
        return Ops._write(r, p, data, os.O_WRONLY | os.O_APPEND)

    @staticmethod
    def overwrite(r, p, data):
        return Ops._write(r, p, data, os.O_WRONLY | os.O_TRUNC)

    @staticmethod
    def pwrite(r, p, off, data):
        fd = os.open(os.path.join(r, p), os.O_RDWR | NB)
        try:
            return os.pwrite(fd, data, off)
        finally:
            os.close(fd)

    @staticmethod
    def truncate(r, p, size):
        if stat.S_ISFIFO(os.lstat(os.path.join(r, p)).st_mode):
            return "fifo"
        os.truncate(os.path.join(r, p), size)

    @staticmethod
    def read(r, p):
        fd = os.open(os.path.join(r, p), os.O_RDONLY | NB)
        try:
            if stat.S_ISFIFO(os.fstat(fd).st_mode):
                return "fifo"
            return os.read(fd, 1 << 20)
        finally:
            os.close(fd)

    @staticmethod
    def mkdir(r, p, mode):
        os.mkdir(os.path.join(r, p), mode)

    @staticmethod
    def rmdir(r, p):
        os.rmdir(os.path.join(r, p))

    @staticmethod
    def unlink(r, p):
        os.unlink(os.path.join(r, p))

    @staticmethod
    def rename(r, a, b):
        os.rename(os.path.join(r, a), os.path.join(r, b))

    @staticmethod
    def rename_noreplace(r, a, b):
        renameat2(os.path.join(r, a), os.path.join(r, b), RENAME_NOREPLACE)

    @staticmethod
    def rename_exchange(r, a, b):
        renameat2(os.path.join(r, a), os.path.join(r, b), RENAME_EXCHANGE)

    @staticmethod
    def symlink(r, target, p):
        os.symlink(target, os.path.join(r, p))

    @staticmethod
    def link(r, a, b):
        os.link(os.path.join(r, a), os.path.join(r, b), follow_symlinks=False)

    @staticmethod
    def mkfifo(r, p):
        os.mkfifo(os.path.join(r, p), 0o640)

    @staticmethod
    def chmod(r, p, mode):
        if os.path.islink(os.path.join(r, p)):
            return "link"
        os.chmod(os.path.join(r, p), mode)

    @staticmethod
    def chown(r, p, uid, gid):
        os.chown(os.path.join(r, p), uid, gid, follow_symlinks=False)

    @staticmethod
    def utime(r, p, ns):
        os.utime(os.path.join(r, p), ns=ns, follow_symlinks=False)
        st = os.lstat(os.path.join(r, p))
        return st.st_mtime_ns

    @staticmethod
    def setxattr(r, p, name, value):
        os.setxattr(os.path.join(r, p), name, value, follow_symlinks=False)

    @staticmethod
    def removexattr(r, p, name):
        os.removexattr(os.path.join(r, p), name, follow_symlinks=False)

    @staticmethod
    def getxattrs(r, p):
        full = os.path.join(r, p)
        return sorted((n, os.getxattr(full, n, follow_symlinks=False))
                      for n in os.listxattr(full, follow_symlinks=False) if n.startswith("user."))

    @staticmethod
    def lstat(r, p):
        return _stat_view(os.lstat(os.path.join(r, p)))

    @staticmethod
    def listdir(r, p):
        full = os.path.join(r, p)
        # kernel overlayfs lists whiteouts of unmerged dirs; count only what can be looked up
        return sorted(n for n in os.listdir(full) if os.path.lexists(os.path.join(full, n)))

    @staticmethod
    def open_unlink_write(r, p, data):
        """Write through a handle whose name was removed meanwhile."""
        fd = os.open(os.path.join(r, p), os.O_RDWR | NB)
        try:
            if stat.S_ISFIFO(os.fstat(fd).st_mode):
                return "fifo"
            os.unlink(os.path.join(r, p))
            os.pwrite(fd, data, 0)
            return os.pread(fd, 100, 0), os.fstat(fd).st_nlink
        finally:
            os.close(fd)


def apply(root: str, op: str, args: tuple):
    try:
        return ("ok", getattr(Ops, op)(root, *args))
    except OSError as e:
        return ("err", errno.errorcode.get(e.errno, e.errno))


class Generator:
    """Random but reproducible operations over a pool of names that exist in lower, upper, or nowhere.

    With ``dir_moves``, that share of the operations moves directories: a known directory to a
    new name (in any directory, also deeper in itself), onto another one, or back where an
    earlier move took it from.
    """

    def __init__(self, seed: int, initial: list[str], dir_moves: float = 0.0, without: tuple[str, ...] = (),
                 more: tuple[str, ...] = ()) -> None:
        self.rng = random.Random(seed)
        self.more = list(more)  # extra draws of these operations (metacopy: the metadata changes)
        self.dir_moves = dir_moves
        self.without = without
        self.moved: list[tuple[str, str]] = []  # (new, old) of earlier directory moves
        self.paths = list(initial)
        self.dirs = [""] + [p for p in initial if p.endswith("/")]
        self.paths = [p.rstrip("/") for p in self.paths]
        self.dirs = [d.rstrip("/") for d in self.dirs]
        self.n = 0

    def _path(self) -> str:
        if self.rng.random() < 0.25:
            self.n += 1
            d = self.rng.choice(self.dirs)
            return os.path.join(d, f"n{self.n}") if d else f"n{self.n}"
        return self.rng.choice(self.paths)

    def _data(self) -> bytes:
        return bytes(self.rng.choice(b"abcxyz") for _ in range(self.rng.randint(0, 40)))

    def _dir_move(self) -> tuple[str, tuple]:
        r = self.rng
        roll = r.random()
        if self.moved and roll < 0.3:
            new, old = self.moved.pop(r.randrange(len(self.moved)))
            return "rename", (new, old)
        src = r.choice([d for d in self.dirs if d] or ["a"])
        if roll < 0.5:
            dst = r.choice([d for d in self.dirs if d] or ["e"])
        else:
            self.n += 1
            d = r.choice(self.dirs)
            dst = os.path.join(d, f"m{self.n}") if d else f"m{self.n}"
        self.moved.append((dst, src))
        for p in (src, dst):
            if p not in self.paths:
                self.paths.append(p)
            if p not in self.dirs:
                self.dirs.append(p)
        return "rename", (src, dst)

    def next(self) -> tuple[str, tuple]:
        r = self.rng
        if self.dir_moves and r.random() < self.dir_moves:
            return self._dir_move()
        op = r.choice(["write_new", "append", "overwrite", "pwrite", "truncate", "read", "read", "mkdir",
                       "rmdir", "unlink", "unlink", "rename", "rename", "rename", "rename_noreplace",
                       "rename_exchange", "symlink", "link", "link", "mkfifo", "chmod", "chown", "utime",
                       "setxattr", "removexattr", "getxattrs", "lstat", "lstat", "listdir", "listdir",
                       "open_unlink_write"] + self.more)
        while op in self.without:
            op = r.choice(["read", "lstat", "listdir", "rename", "unlink", "mkdir", "write_new"])
        p = self._path()
        if op in ("write_new", "append", "overwrite", "open_unlink_write"):
            args = (p, self._data())
        elif op == "pwrite":
            args = (p, r.randint(0, 30), self._data())
        elif op == "truncate":
            args = (p, r.choice([0, 1, 5, 100]))
        elif op == "mkdir":
            args = (p, r.choice([0o755, 0o700, 0o2775]))
        elif op in ("rename", "rename_noreplace", "rename_exchange", "link"):
            args = (p, self._path())
        elif op == "symlink":
            args = (r.choice(["f1", "../a/f2", "nowhere", "a"]), p)
        elif op == "chmod":
            args = (p, r.choice([0o644, 0o600, 0o4755, 0o1777, 0o2755]))
        elif op == "chown":
            args = (p, r.choice([0, 1000, 1001]), r.choice([0, 1000, 1001]))
        elif op == "utime":
            args = (p, (r.randint(1, 10**18), r.randint(1, 10**18)))
        elif op == "setxattr":
            args = (p, r.choice(["user.a", "user.b"]), self._data())
        elif op == "removexattr":
            args = (p, r.choice(["user.a", "user.b", "user.lower"]))
        else:
            args = (p,)
        for a in args:
            if isinstance(a, str) and a not in self.paths and not a.startswith(("f1", "../", "nowhere")) and a != "a":
                self.paths.append(a)
                if op == "mkdir" or (op in ("rename", "rename_noreplace") and a in self.dirs):
                    self.dirs.append(a)
        return op, args


def build_lower(top: Path, bottom: Path, hardlinks: bool = True) -> list[str]:
    """Two lower layers with merged dirs, a whiteout, an opaque dir, hard links, special files."""
    def w(base: Path, rel: str, data: bytes = b"", mode: int = 0o644) -> None:
        p = base / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        os.chmod(p, mode)

    w(bottom, "f1", b"bottom f1")
    w(bottom, "a/f2", b"bottom a/f2")
    w(bottom, "a/b/f3", b"deep")
    w(bottom, "a/b/c/f4", b"deeper")
    w(bottom, "gone", b"whited out above")
    w(bottom, "opq/old", b"hidden by opaque")
    w(bottom, "exe", b"#!/bin/sh\n", 0o4755)
    os.setxattr(bottom / "f1", "user.lower", b"x")
    os.setxattr(bottom / "a", "user.lower", b"dir")
    if hardlinks:
        os.link(bottom / "f1", bottom / "hl")
        os.link(bottom / "f1", bottom / "a/hl2")
    os.mkfifo(bottom / "fifo", 0o644)
    os.symlink("f1", bottom / "sym")
    (bottom / "e").mkdir()
    os.chmod(bottom / "a", 0o2775)
    os.chown(bottom / "a/f2", 1000, 1000)
    w(top, "a/top", b"top file in merged dir")
    w(top, "d/only-top", b"t")
    os.mknod(top / "gone", 0o600 | stat.S_IFCHR, 0)
    (top / "opq").mkdir()
    os.setxattr(top / "opq", "trusted.overlay.opaque", b"y")
    w(top, "opq/new", b"new")
    w(top, "f5", b"top f5")
    paths = []
    for base in (bottom, top):
        for dirpath, dirnames, filenames in os.walk(base):
            rel = os.path.relpath(dirpath, base)
            for n in dirnames:
                paths.append(os.path.normpath(os.path.join(rel, n)) + "/")
            for n in filenames:
                paths.append(os.path.normpath(os.path.join(rel, n)))
    return sorted(set(paths))


def without_private_xattrs(snap: dict) -> dict:
    """Our bookkeeping xattr (``trusted.unionfs.*``, rootless ``user.unionfs.*``) shows through kernel
    overlayfs, not through us."""
    out = {}
    for k, rec in snap.items():
        if k.startswith("<"):
            out[k] = rec
            continue
        *head, xattrs = rec
        out[k] = (*head, {n: v for n, v in xattrs.items() if not n.startswith(("trusted.unionfs.", "user.unionfs."))})
    return out


def kernel_over(mnt: Path, lower: list[Path], upper: Path, work: Path, opts: str) -> dict:
    """Kernel overlayfs mounted over an upper *and work* dir (ours): what it shows."""
    from helpers import overlay_mount, snapshot
    with overlay_mount(mnt, lower, upper, work, opts):
        return without_private_xattrs(snapshot(mnt, skip_unstatable=True))


def fuse_overlayfs(mnt: Path, lower: list[Path], upper: Path, work: Path):
    """fuse-overlayfs mounted (a context manager), always unmounted afterwards."""
    from helpers import program_mount
    opts = "lowerdir=" + ":".join(str(p) for p in lower) + f",upperdir={upper},workdir={work}"
    return program_mount("fuse-overlayfs", opts, mnt)


def run_sequence(root: Path, seed: int, initial: list[str], steps: int) -> None:
    """The random operations of ``seed`` applied to one mount, results ignored (a writer, not a test)."""
    gen = Generator(seed, initial)
    for _ in range(steps):
        op, args = gen.next()
        apply(str(root), op, args)


def inode_numbers(root: Path) -> dict[str, tuple[int, int]]:
    """(st_ino, d_ino) of every name below ``root``: what a mount numbers its objects."""
    out = {}
    stack = [""]
    while stack:
        rel = stack.pop()
        with os.scandir(os.path.join(root, rel)) as it:
            for e in it:
                p = os.path.join(rel, e.name)
                try:
                    st = os.lstat(os.path.join(root, p))
                except FileNotFoundError:
                    continue  # kernel overlayfs lists whiteouts of unmerged dirs
                out[p] = (st.st_ino, e.inode())
                if stat.S_ISDIR(st.st_mode):
                    stack.append(p)
    return out


def kernel_numbers_over(mnt: Path, lower: list[Path], upper: Path, work: Path, opts: str) -> dict:
    from helpers import overlay_mount
    with overlay_mount(mnt, lower, upper, work, opts):
        return inode_numbers(mnt)
