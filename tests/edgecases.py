"""The edge cases POSIX and overlay test suites (pjdfstest, unionmount-testsuite) live on, as
operations applied to kernel overlayfs and to unionfs over the same lower layers, each result
(a value or an errno) compared.

A :class:`Pair` holds the two mount points; :meth:`Pair.run` applies one operation to both and
records any difference, so one test reports every difference it finds at once.  The cases are
generated over every kind of object an overlay has (lower, upper, copied-up, redirected,
whited-out, missing), each case on names of its own so that cases never disturb each other.
"""
from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import helpers
from difftest import renameat2

RENAME_NOREPLACE, RENAME_EXCHANGE, RENAME_WHITEOUT = 1, 2, 4
NAME_MAX = 255
USER, OTHER = 1000, 1001


def outcome(fn, *args):
    try:
        return ("ok", fn(*args))
    except OSError as e:
        return ("err", errno.errorcode.get(e.errno, e.errno))


def view(path: str) -> tuple | None:
    """What a user sees of one entry: type, mode, owner, size, link count (None: absent)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    size = None if stat.S_ISDIR(st.st_mode) else st.st_size
    nlink = st.st_nlink if not stat.S_ISDIR(st.st_mode) else None
    return stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, size, nlink


def tree(path: str) -> dict[str, tuple | None] | None:
    """Every entry below ``path`` (names that cannot be looked up left out), with its data."""
    if not os.path.isdir(path) or os.path.islink(path):
        return None
    out: dict[str, tuple | None] = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            v = view(p)
            if v is None:
                continue  # kernel overlayfs lists whiteouts of unmerged dirs
            if stat.S_ISREG(v[0]):
                with open(p, "rb") as f:
                    v = v + (f.read(),)
            elif stat.S_ISLNK(v[0]):
                v = v + (os.readlink(p),)
            out[os.path.relpath(p, path)] = v
    return out


def as_user(uid: int, gid: int, fn, *args) -> str:
    """Run ``fn(*args)`` in a child as ``uid``:``gid``; the errno name it ended with ('ok' if none)."""
    code = helpers.as_user(uid, fn, *args, gid=gid)
    return "ok" if code == 0 else errno.errorcode.get(code, str(code))


@dataclass
class Pair:
    """Kernel overlayfs and unionfs over the same layers; every difference is recorded."""

    kernel: Path
    ours: Path
    diffs: list[str] = field(default_factory=list)
    count: int = 0

    def run(self, label: str, fn, *args):
        """``fn(root, *args)`` on both mounts (kernel first); returns the kernel's outcome."""
        want = outcome(fn, str(self.kernel), *args)
        got = outcome(fn, str(self.ours), *args)
        self.count += 1
        if got != want:
            self.diffs.append(f"{label}: kernel {want!r}, unionfs {got!r}")
        return want

    def both(self, fn, *args) -> None:
        """Preparation through both mounts; it must succeed on both."""
        for root in (self.kernel, self.ours):
            fn(str(root), *args)

    def check(self) -> None:
        assert not self.diffs, f"{len(self.diffs)} of {self.count} results differ from kernel overlayfs:\n" + \
            "\n".join(self.diffs)


def _mknod_at(path: str, mode: int) -> None:
    os.mknod(path, mode | 0o644)


# --- names -------------------------------------------------------------------------

def names_lower(lower: Path) -> None:
    (lower / "n").mkdir()
    for n in (252, 253, 254, 255):
        (lower / "n" / ("L" * n)).write_bytes(b"long")
    (lower / "n" / ("D" * 255)).mkdir()
    (lower / "n" / ("D" * 255) / "f").write_bytes(b"in a long dir")


def name_cases(pair: Pair) -> None:
    """Every call that makes, finds or removes a name, at 255 bytes (legal) and 256 (ENAMETOOLONG),
    in a merged dir, also next to lower names of 252-255 bytes (no `.wh.` name can exist for them)."""
    j = os.path.join
    for n in (255, 256):
        for c, (what, fn) in enumerate([
            ("open O_CREAT", lambda r, p: os.close(os.open(j(r, p), os.O_CREAT | os.O_WRONLY, 0o644))),
            ("open O_CREAT|O_EXCL", lambda r, p: os.close(os.open(j(r, p), os.O_CREAT | os.O_EXCL | os.O_RDWR))),
            ("mkdir", lambda r, p: os.mkdir(j(r, p))),
            ("mkfifo", lambda r, p: os.mkfifo(j(r, p))),
            ("mknod S_IFREG", lambda r, p: _mknod_at(j(r, p), stat.S_IFREG)),
            ("mknod S_IFCHR 1/3", lambda r, p: os.mknod(j(r, p), stat.S_IFCHR | 0o600, os.makedev(1, 3))),
            ("symlink", lambda r, p: os.symlink("target", j(r, p))),
            ("link", lambda r, p: os.link(j(r, "n/" + "L" * 252), j(r, p))),
            ("rename to", lambda r, p: os.rename(j(r, "n/" + "L" * 253), j(r, p))),
        ]):
            name = "n/" + chr(ord("a") + c) * n
            pair.run(f"{what} of a {n}-byte name", fn, name)
            pair.run(f"lstat after {what} of a {n}-byte name", lambda r, p: view(j(r, p)), name)
            pair.run(f"rename from a {n}-byte name after {what}", lambda r, p: os.rename(j(r, p), j(r, p[:-1] + "Z")), name)
    long = "n/" + "L" * 255
    pair.run("lstat of a lower 255-byte name", lambda r: view(j(r, long)))
    pair.run("write to a lower 255-byte name", lambda r: os.truncate(j(r, long), 1))
    pair.run("unlink a lower 254-byte name", lambda r: os.unlink(j(r, "n/" + "L" * 254)))
    pair.run("recreate it", lambda r: os.close(os.open(j(r, "n/" + "L" * 254), os.O_CREAT | os.O_WRONLY)))
    pair.run("rename a lower 255-byte dir", lambda r: os.rename(j(r, "n/" + "D" * 255), j(r, "n/" + "E" * 255)))
    pair.run("its file", lambda r: tree(j(r, "n/" + "E" * 255)))
    pair.run("rmdir over the old 255-byte name", lambda r: os.rmdir(j(r, "n/" + "D" * 255)))
    pair.run("mkdir at the old 255-byte name", lambda r: os.mkdir(j(r, "n/" + "D" * 255)))
    pair.run("listing", lambda r: sorted(os.listdir(j(r, "n"))))


# --- paths near PATH_MAX ------------------------------------------------------------------

DEEP = 17  # components of 240 bytes: about 4,100 bytes below the layer root


def deep_lower(lower: Path) -> None:
    fd = os.open(lower, os.O_RDONLY | os.O_DIRECTORY)
    for i in range(DEEP):
        name = (chr(ord("a") + i) * 240)
        os.mkdir(name, dir_fd=fd)
        nfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nfd
    with open(os.open("leaf", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "wb") as f:
        f.write(b"deep")
    os.close(fd)


def _deep_fd(root: str, depth: int) -> int:
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for i in range(depth):
        nfd = os.open(chr(ord("a") + i) * 240, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nfd
    return fd


def _at_deep(root: str, fn) -> object:
    fd = _deep_fd(root, DEEP)
    try:
        return fn(fd)
    finally:
        os.close(fd)


def deep_cases(pair: Pair) -> None:
    """Paths of about 4,100 bytes (past PATH_MAX from the mount point, reached with *at calls):
    copy-up of the whole chain, new entries and renames at the bottom, and whole paths that are too long."""
    comps = "/".join(chr(ord("a") + i) * 240 for i in range(DEEP))
    pair.run("open of the whole path", lambda r: os.open(os.path.join(r, comps, "leaf"), os.O_RDONLY))
    half = "/".join(chr(ord("a") + i) * 240 for i in range(15))  # about 3,600 bytes: under PATH_MAX
    pair.run("stat of a 3,600-byte path", lambda r: view(os.path.join(r, half)))
    pair.run("mkdir at a 3,600-byte path", lambda r: os.mkdir(os.path.join(r, half, "x" * 200)))
    pair.run("read the deep leaf", lambda r: _at_deep(r, lambda fd: open(
        os.open("leaf", os.O_RDONLY, dir_fd=fd), "rb").read()))

    def append(fd):
        wfd = os.open("leaf", os.O_WRONLY | os.O_APPEND, dir_fd=fd)
        try:
            return os.write(wfd, b"+more")
        finally:
            os.close(wfd)
    pair.run("append to the deep leaf (copy-up of the chain)", lambda r: _at_deep(r, append))
    pair.run("read it back", lambda r: _at_deep(r, lambda fd: open(
        os.open("leaf", os.O_RDONLY, dir_fd=fd), "rb").read()))
    pair.run("mkdir at the bottom", lambda r: _at_deep(r, lambda fd: os.mkdir("new", dir_fd=fd)))
    pair.run("rename at the bottom", lambda r: _at_deep(r, lambda fd: os.rename("leaf", "moved", src_dir_fd=fd,
                                                                                   dst_dir_fd=fd)))
    pair.run("rename a deep dir up to the root", lambda r: _at_deep(r, lambda fd: os.rename(
        "new", os.path.join(r, "from-deep"), src_dir_fd=fd)))
    pair.run("listing at the bottom", lambda r: _at_deep(r, lambda fd: sorted(os.listdir(fd))))

    def rename_mid(r):
        fd = _deep_fd(r, 8)
        try:
            os.rename(chr(ord("a") + 8) * 240, "moved-mid", src_dir_fd=fd, dst_dir_fd=fd)
            return sorted(os.listdir(fd))
        finally:
            os.close(fd)
    pair.run("rename a populated dir half-way down", rename_mid)


# --- open flags -----------------------------------------------------------------------------

ACCESS = (("RDONLY", os.O_RDONLY), ("WRONLY", os.O_WRONLY), ("RDWR", os.O_RDWR))
EXTRA = (("", 0), ("TRUNC", os.O_TRUNC), ("CREAT", os.O_CREAT), ("CREAT|EXCL", os.O_CREAT | os.O_EXCL),
         ("CREAT|TRUNC", os.O_CREAT | os.O_TRUNC), ("APPEND|TRUNC", os.O_APPEND | os.O_TRUNC),
         ("NOFOLLOW", os.O_NOFOLLOW), ("NOFOLLOW|TRUNC", os.O_NOFOLLOW | os.O_TRUNC),
         ("DIRECTORY", os.O_DIRECTORY), ("DIRECTORY|CREAT", os.O_DIRECTORY | os.O_CREAT))
# What each open is tried on: made in the lower layer, or through the mount first.
TARGETS = ("lower", "upper", "copied", "sym-lower", "sym-dangling", "sym-dir", "dir", "fifo", "missing", "whiteout")


def open_lower(lower: Path) -> None:
    (lower / "o").mkdir()
    for k in range(len(ACCESS) * len(EXTRA)):
        (lower / "o" / f"lower{k}").write_bytes(b"lower data")
        (lower / "o" / f"copied{k}").write_bytes(b"lower data")
        (lower / "o" / f"target{k}").write_bytes(b"symlink target")
        os.symlink(f"target{k}", lower / "o" / f"sym-lower{k}")
        os.symlink(f"nowhere{k}", lower / "o" / f"sym-dangling{k}")
        os.symlink(f"dir{k}", lower / "o" / f"sym-dir{k}")
        (lower / "o" / f"dir{k}").mkdir()
        os.mkfifo(lower / "o" / f"fifo{k}")
        (lower / "o" / f"whiteout{k}").write_bytes(b"deleted")


def _open_case(root: str, name: str, flags: int):
    p = os.path.join(root, "o", name)
    fd = os.open(p, flags | os.O_NONBLOCK, 0o640)
    try:
        st = os.fstat(fd)
        data = None
        if stat.S_ISREG(st.st_mode) and flags & os.O_ACCMODE != os.O_WRONLY:
            data = os.pread(fd, 100, 0)
        if stat.S_ISREG(st.st_mode) and flags & os.O_ACCMODE != os.O_RDONLY:
            os.write(fd, b"W")
        return stat.S_IFMT(st.st_mode), st.st_size, data
    finally:
        os.close(fd)


def open_cases(pair: Pair) -> None:
    """Every access mode with O_TRUNC, O_CREAT, O_EXCL, O_APPEND, O_NOFOLLOW, O_DIRECTORY, on every
    kind of target, then what the file holds afterwards; and O_TMPFILE."""
    j = os.path.join
    k = 0
    for _, acc in ACCESS:
        for _, extra in EXTRA:
            pair.both(lambda r: os.truncate(j(r, "o", f"copied{k}"), 5))  # copy-up
            pair.both(lambda r: open(j(r, "o", f"upper{k}"), "wb").write(b"upper data"))
            pair.both(lambda r: os.unlink(j(r, "o", f"whiteout{k}")))
            k += 1
    k = 0
    for aname, acc in ACCESS:
        for ename, extra in EXTRA:
            for target in TARGETS:
                name = f"{target}{k}"
                label = f"open({target}, O_{aname}{'|O_' + ename if ename else ''})"
                pair.run(label, _open_case, name, acc | extra)
                pair.run(label + " then", lambda r: view(j(r, "o", name)))
                if target.startswith("sym"):
                    pair.run(label + " then the target", lambda r: view(j(r, "o", os.readlink(j(r, "o", name)))))
            k += 1
    pair.run("open(dir, O_TMPFILE|O_RDWR)", lambda r: os.close(os.open(j(r, "o"), os.O_TMPFILE | os.O_RDWR, 0o600)))


# --- permissions as other users -------------------------------------------------------------

def perm_lower(lower: Path) -> None:
    p = lower / "p"
    p.mkdir()
    (p / "sticky").mkdir()
    os.chmod(p / "sticky", 0o1777)
    for owner in (0, USER, OTHER):
        f = p / "sticky" / f"of{owner}"
        f.write_bytes(b"x")
        os.chown(f, owner, owner)
        os.chmod(f, 0o666)
        d = p / "sticky" / f"dir{owner}"
        d.mkdir()
        os.chown(d, owner, owner)
        os.chmod(d, 0o777)
    (p / "sgid").mkdir()
    os.chown(p / "sgid", 0, 4242)
    os.chmod(p / "sgid", 0o2777)
    (p / "sgid" / "sub").mkdir()
    os.chown(p / "sgid" / "sub", 0, 4242)
    os.chmod(p / "sgid" / "sub", 0o2777)
    for n, mode in (("suid", 0o4755), ("sgid-x", 0o2755), ("sgid-nox", 0o2644), ("both", 0o6777), ("plain", 0o755)):
        for who in ("root", "user"):
            f = p / f"{n}-{who}"
            f.write_bytes(b"#!/bin/sh\n")
            os.chown(f, 0 if who == "root" else USER, 0 if who == "root" else USER)
            os.chmod(f, mode)
    (p / "ro").mkdir()
    os.chmod(p / "ro", 0o755)
    (p / "ro" / "f").write_bytes(b"f")
    (p / "mine").mkdir()
    os.chown(p / "mine", USER, USER)
    (p / "mine" / "f").write_bytes(b"root's file in a user's dir")
    os.chmod(p / "mine" / "f", 0o644)


def perm_cases(pair: Pair) -> None:
    """The sticky bit (unlink, rename, rmdir, rename over), setgid dirs (group and bit inherited by new
    entries), chown and chmod clearing setuid/setgid, and the DAC checks of each call as another user."""
    j = os.path.join
    s = "p/sticky"

    def user(uid, gid, fn, *args):
        return lambda r: as_user(uid, gid, fn, *[a(r) if callable(a) else a for a in args])

    for actor in (USER, OTHER):
        for owner in (0, USER, OTHER):
            tag = f"uid {actor} on uid {owner}'s"
            pair.run(f"{tag} file: rename in a sticky dir", user(
                actor, actor, os.rename, lambda r: j(r, s, f"of{owner}"), lambda r: j(r, s, f"of{owner}-by{actor}")))
            pair.run(f"{tag} file: unlink in a sticky dir", user(actor, actor, os.unlink, lambda r: j(r, s, f"of{owner}")))
            pair.run(f"{tag} dir: rmdir in a sticky dir", user(actor, actor, os.rmdir, lambda r: j(r, s, f"dir{owner}")))
        pair.run(f"uid {actor}: create in a sticky dir", user(
            actor, actor, lambda p: os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o644)), lambda r: j(r, s, f"new{actor}")))
    pair.run("uid 1001 renames over uid 1000's new file in a sticky dir", user(
        OTHER, OTHER, os.rename, lambda r: j(r, s, "new1001"), lambda r: j(r, s, "new1000")))
    pair.run("sticky dir afterwards", lambda r: tree(j(r, s)))

    # setgid directories: new entries take the dir's group, new dirs its setgid bit
    for what, fn in (("file", lambda p: os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o2755))),
                     ("dir", lambda p: os.mkdir(p, 0o755)), ("fifo", lambda p: os.mkfifo(p, 0o644)),
                     ("symlink", lambda p: os.symlink("x", p))):
        for where in ("p/sgid", "p/sgid/sub"):
            pair.run(f"uid 1000 makes a {what} in {where}", user(USER, USER, fn, lambda r: j(r, where, f"{what}-u")))
            pair.run(f"root makes a {what} in {where}", lambda r: fn(j(r, where, f"{what}-r")))
    pair.run("setgid dir afterwards", lambda r: tree(j(r, "p/sgid")))

    # chown clears setuid/setgid (of a group-executable file); chmod by a non-member clears setgid
    for n in ("suid", "sgid-x", "sgid-nox", "both", "plain"):
        pair.run(f"root chowns {n}-root to 1000", lambda r: os.chown(j(r, "p", f"{n}-root"), USER, -1))
        pair.run(f"then {n}-root", lambda r: view(j(r, "p", f"{n}-root")))
        pair.run(f"uid 1000 chgrps its {n}-user to 1000", user(USER, USER, os.chown, lambda r: j(r, "p", f"{n}-user"),
                                                              -1, USER))
        pair.run(f"uid 1000 chowns its {n}-user to 1001", user(USER, USER, os.chown, lambda r: j(r, "p", f"{n}-user"),
                                                              OTHER, -1))
        pair.run(f"uid 1000 chmods its {n}-user to 2755 (gid 1000 not its group here)", user(
            USER, 4242, os.chmod, lambda r: j(r, "p", f"{n}-user"), 0o2755))
        pair.run(f"then {n}-user", lambda r: view(j(r, "p", f"{n}-user")))

    # DAC checks of calls a suite probes one by one
    for mode, mname in ((os.R_OK, "R_OK"), (os.W_OK, "W_OK"), (os.X_OK, "X_OK"), (os.R_OK | os.W_OK, "R_OK|W_OK")):
        for path in ("p/ro/f", "p/ro", "p/sticky", "p/suid-root", "p/mine/f"):
            pair.run(f"uid 1000: access({path}, {mname})", user(USER, USER, _access, lambda r, path=path: j(r, path), mode))
    for label, fn, path in (
            ("unlink in a 0755 root dir", os.unlink, "p/ro/f"),
            ("rename out of a 0755 root dir", lambda p: os.rename(p, p + "2"), "p/ro/f"),
            ("link into a 0755 root dir", lambda p: os.link(p, p + "-link"), "p/ro/f"),
            ("symlink in a 0755 root dir", lambda p: os.symlink("x", p + "-sym"), "p/ro/f"),
            ("utime (explicit) of a root file", lambda p: os.utime(p, (5, 5)), "p/ro/f"),
            ("utime (now) of a root 0644 file", lambda p: os.utime(p), "p/ro/f"),
            ("chmod of a root file", lambda p: os.chmod(p, 0o777), "p/ro/f"),
            ("truncate of a root 0644 file", lambda p: os.truncate(p, 0), "p/ro/f"),
            ("unlink root's file in own dir", os.unlink, "p/mine/f"),
            ("rename of own dir's root file", lambda p: os.rename(p, p + "2"), "p/mine/f"),
            ("setxattr user.* on a root file", lambda p: os.setxattr(p, "user.x", b"1"), "p/ro/f"),
            ("setxattr trusted.* on a root file", lambda p: os.setxattr(p, "trusted.x", b"1"), "p/ro/f")):
        pair.run(f"uid 1000: {label}", user(USER, USER, fn, lambda r, path=path: j(r, path)))
    pair.run("files afterwards", lambda r: tree(j(r, "p/mine")))


def _access(path: str, mode: int) -> None:
    if not os.access(path, mode):
        raise PermissionError(errno.EACCES, "access denied", path)


# --- link counts and times ---------------------------------------------------------------

OLD = 1_000_000_000  # the times of every lower entry here, and of entries a case prepares


def _create(p: str) -> None:
    os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o644))


# label, what the case prepares through the mount (relative to its dir; then given OLD times),
# the paths whose times and link counts are watched, the call.
TIME_CASES = [
    ("create in a lower dir", None, [".", "f"], lambda d: _create(d + "/new")),
    ("link a lower hard link", None, [".", "f", "hl"], lambda d: os.link(d + "/f", d + "/hl2")),
    ("unlink a lower hard link", None, [".", "f"], lambda d: os.unlink(d + "/hl")),
    ("mkdir in a lower dir", None, ["."], lambda d: os.mkdir(d + "/new")),
    ("rmdir a lower dir", None, ["."], lambda d: os.rmdir(d + "/sub")),
    ("rename a file to a lower subdir", None, [".", "sub", "f"], lambda d: os.rename(d + "/f", d + "/sub/g")),
    ("rename a dir into a lower subdir", None, [".", "sub", "sub2"], lambda d: os.rename(d + "/sub2", d + "/sub/s")),
    ("rename over a lower file", None, [".", "f", "hl"], lambda d: os.rename(d + "/hl", d + "/f")),
    ("write a lower file", None, [".", "f"], lambda d: open(d + "/f", "ab").write(b"more")),
    ("read a lower file", None, [".", "f"], lambda d: open(d + "/f", "rb").read()),
    ("chmod a lower file", None, [".", "f"], lambda d: os.chmod(d + "/f", 0o600)),
    ("listdir a lower dir", None, [".", "sub"], lambda d: sorted(os.listdir(d + "/sub"))),
    ("truncate an upper file", ["new"], [".", "new"], lambda d: os.truncate(d + "/new", 3)),
    ("rename an upper file", ["new"], [".", "new"], lambda d: os.rename(d + "/new", d + "/new2")),
    ("link an upper file", ["new"], [".", "new"], lambda d: os.link(d + "/new", d + "/new2")),
    ("unlink in a copied-up dir", ["new"], [".", "f"], lambda d: os.unlink(d + "/f")),
    ("mkdir in a copied-up dir", ["new"], ["."], lambda d: os.mkdir(d + "/new-dir")),
]


def times_lower(lower: Path) -> None:
    t = lower / "t"
    t.mkdir()
    for k in range(len(TIME_CASES)):
        d = t / f"c{k}"
        d.mkdir()
        (d / "f").write_bytes(b"f")
        os.link(d / "f", d / "hl")
        (d / "sub").mkdir()
        (d / "sub2").mkdir()
    for p in [t, *t.rglob("*")]:
        os.utime(p, (OLD, OLD), follow_symlinks=False)


def _changes(root: str, case: str, prepared: list[str] | None, paths: list[str], fn) -> tuple:
    """Which of atime/mtime/ctime of ``paths`` the call changed, and their link counts after.

    Entries the case prepared (new, or their dir copied up) get OLD atime and mtime first; their
    ctime is not compared: it is the moment they were made, maybe the same clock tick as the call."""
    d = os.path.join(root, case)
    if prepared:
        for p in prepared:
            _create(os.path.join(d, p))
        for p in (".", *prepared):
            os.utime(os.path.join(d, p), (OLD, OLD))

    def stamp(p):
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            return None
        return st.st_atime_ns, st.st_mtime_ns, None if prepared else st.st_ctime_ns
    full = [os.path.join(d, p) for p in paths]
    before = [stamp(p) for p in full]
    result = outcome(fn, d)
    after = [stamp(p) for p in full]
    changed = tuple(None if a is None or b is None else tuple(x != y for x, y in zip(a, b))
                    for a, b in zip(before, after))
    nlinks = tuple(os.lstat(p).st_nlink if os.path.lexists(p) and not os.path.isdir(p) else None for p in full)
    return result, changed, nlinks


def times_cases(pair: Pair) -> None:
    """Times of parents and targets after each call (changed or not: the two sides' clocks give
    nothing else to compare), and link counts, on lower, upper and copied-up objects, each case
    in a directory of its own."""
    for k, (label, prepared, paths, fn) in enumerate(TIME_CASES):
        pair.run(f"{label}: changed times and link counts", _changes, f"t/c{k}", prepared, paths, fn)


# --- rename in every combination ----------------------------------------------------------

# kinds: how an object of each kind is made (in the lower layer, then through the mount)
KINDS = ("missing", "lower-file", "upper-file", "copied-file", "whiteout", "lower-dir", "lower-empty-dir",
         "upper-dir", "upper-empty-dir", "redirected-dir", "opaque-dir", "lower-symlink")
FLAGS = (("", 0), ("NOREPLACE", RENAME_NOREPLACE), ("EXCHANGE", RENAME_EXCHANGE), ("WHITEOUT", RENAME_WHITEOUT))


def _cases():
    k = 0
    for src in KINDS:
        for dst in KINDS:
            for fname, flags in FLAGS:
                for cross in (False, True):
                    yield k, src, dst, fname, flags, cross
                    k += 1


def rename_lower(lower: Path) -> None:
    r = lower / "r"
    r.mkdir()
    for k, src, dst, _, _, cross in _cases():
        a = r / f"c{k}"
        b = r / f"c{k}x" if cross else a
        a.mkdir(exist_ok=True)
        b.mkdir(exist_ok=True)
        for d, kind, name in ((a, src, "s"), (b, dst, "t")):
            if kind in ("lower-file", "copied-file", "whiteout"):
                (d / name).write_bytes(kind.encode())
            elif kind in ("lower-dir", "redirected-dir", "opaque-dir"):
                (d / (name + "-orig" if kind == "redirected-dir" else name)).mkdir()
                (d / (name + "-orig" if kind == "redirected-dir" else name) / "inside").write_bytes(b"in")
            elif kind == "lower-empty-dir":
                (d / name).mkdir()
            elif kind == "lower-symlink":
                os.symlink("s", d / name)


def _make_through_mount(root: str, d: str, kind: str, name: str) -> None:
    p = os.path.join(root, d, name)
    if kind == "upper-file":
        with open(p, "wb") as f:
            f.write(b"upper")
    elif kind == "copied-file":
        os.chmod(p, 0o600)
    elif kind == "whiteout":
        os.unlink(p)
    elif kind == "upper-dir":
        os.mkdir(p)
        with open(os.path.join(p, "new-inside"), "wb") as f:
            f.write(b"new")
    elif kind == "upper-empty-dir":
        os.mkdir(p)
    elif kind == "redirected-dir":
        os.rename(p + "-orig", p)
    elif kind == "opaque-dir":
        os.unlink(os.path.join(p, "inside"))
        os.rmdir(p)
        os.mkdir(p)
        with open(os.path.join(p, "opaque-inside"), "wb") as f:
            f.write(b"o")


def rename_cases(pair: Pair) -> None:
    """rename(2) and renameat2(2) with each flag, from each kind of object to each kind, in one dir
    and across dirs, then the tree of both dirs."""
    j = os.path.join
    for k, src, dst, _, _, cross in _cases():
        a, b = f"r/c{k}", (f"r/c{k}x" if cross else f"r/c{k}")
        pair.both(_make_through_mount, a, src, "s")
        pair.both(_make_through_mount, b, dst, "t")
    for k, src, dst, fname, flags, cross in _cases():
        a, b = f"r/c{k}", (f"r/c{k}x" if cross else f"r/c{k}")
        label = f"rename{'at2 ' + fname if fname else ''} {src} -> {dst}{' (other dir)' if cross else ''}"
        pair.run(label, lambda r: renameat2(j(r, a, "s"), j(r, b, "t"), flags))
        pair.run(label + ": then", lambda r: (tree(j(r, a)), tree(j(r, b)) if cross else None))
