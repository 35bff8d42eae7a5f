"""Permissions with ``-o allow_other`` (and default_permissions, always on): an unprivileged user gets
exactly what kernel overlayfs gives it over the same layers: no reading a 0600 root file, no writing
where the mode forbids it, the sticky bit, and setuid/setgid cleared when a non-owner writes."""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from helpers import as_user, overlay_mount
from stacks import write

USER = 1000


def _read(p):
    with open(p, "rb") as f:
        f.read()


def _append(p):
    with open(p, "ab") as f:
        f.write(b"more")


def _create(p):
    with open(p, "xb") as f:
        f.write(b"new")


def _open_dirs_to_others(tmp_path: Path) -> None:
    for p in (tmp_path, *tmp_path.parents):  # pytest's temp dirs are private: let uid 1000 through
        if p == Path("/tmp") or p == Path("/"):
            break
        os.chmod(p, 0o755)


ACTIONS = [
    ("read a 0600 root file", _read, "secret", errno.EACCES),
    ("read a 0644 root file", _read, "public", 0),
    ("append to a 0644 root file", _append, "public", errno.EACCES),
    ("truncate a 0644 root file", lambda p: os.truncate(p, 0), "public", errno.EACCES),
    ("chmod a root file", lambda p: os.chmod(p, 0o777), "public", errno.EPERM),
    ("create in a 0755 root dir", _create, "rodir/new", errno.EACCES),
    ("unlink in a 0755 root dir", os.unlink, "rodir/f", errno.EACCES),
    ("rename out of a 0755 root dir", lambda p: os.rename(p, p.parent.parent / "tmp/stolen"), "rodir/f", errno.EACCES),
    ("mkdir in a 0755 root dir", os.mkdir, "rodir/sub", errno.EACCES),
    ("list a 0700 root dir", os.listdir, "private", errno.EACCES),
    ("create in a 1777 dir", _create, "tmp/mine", 0),
    ("unlink another user's file in a 1777 dir", os.unlink, "tmp/others", errno.EPERM),
    ("rename another user's file in a 1777 dir", lambda p: os.rename(p, p.parent / "x"), "tmp/others", errno.EPERM),
    ("append to a 0666 file of another user", _append, "tmp/others", 0),
    ("append to a 04777 root file", _append, "suid", 0),
    ("append to a 02777 root file", _append, "sgid", 0),
    ("append to a 06777 root file", _append, "both", 0),
    ("write to own 04777 file", _append, "mine-suid", 0),
    ("root appends to a 04755 file", None, "root-suid", 0),
    ("utime of a root file", lambda p: os.utime(p, (1, 1)), "public", errno.EPERM),
    ("touch (now) of a 0666 file of another user", lambda p: os.utime(p), "tmp/others", 0),
]


def _build(lower: Path) -> None:
    write(lower, "secret", b"root only", 0o600)
    write(lower, "public", b"everyone reads", 0o644)
    write(lower, "rodir/f", b"f", 0o644)
    os.chmod(lower / "rodir", 0o755)
    write(lower, "private/f", b"f", 0o644)
    os.chmod(lower / "private", 0o700)
    write(lower, "tmp/others", b"of uid 2000", 0o666, uid=2000, gid=2000)
    os.chmod(lower / "tmp", 0o1777)
    for name, mode in (("suid", 0o4777), ("sgid", 0o2777), ("both", 0o6777)):
        write(lower, name, b"x", 0o777)
        os.chmod(lower / name, mode)
    write(lower, "root-suid", b"x", 0o755)
    os.chmod(lower / "root-suid", 0o4755)
    write(lower, "mine-suid", b"x", 0o777, uid=USER, gid=USER)
    os.chmod(lower / "mine-suid", 0o4777)


def _run_all(root: Path) -> dict:
    out = {}
    for what, fn, rel, _ in ACTIONS:
        if fn is None:
            _append(root / rel)      # as root (CAP_FSETID): the bit stays
            out[what] = 0
            continue
        out[what] = as_user(USER, fn, root / rel)
    for name in ("suid", "sgid", "both", "mine-suid", "root-suid", "tmp/others", "public"):
        st = os.lstat(root / name)
        out[f"mode of {name}"] = oct(stat.S_IMODE(st.st_mode))
    out["tree"] = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    return out


def test_unprivileged_user_gets_what_kernel_overlayfs_gives(tmp_path, layers, union_mount):
    _open_dirs_to_others(tmp_path)
    (lower,) = layers(1)
    _build(lower)
    up, wk, kup, kwk = layers(4, prefix="rw")
    m = union_mount([lower], up, wk, options=["allow_other"])
    ours = _run_all(m.mnt)
    ko = tmp_path / "ko"
    ko.mkdir()
    with overlay_mount(ko, [lower], kup, kwk):
        theirs = _run_all(ko)
    # the expectations stated, then compared with the kernel's answers
    for what, _, _, want in ACTIONS:
        assert ours[what] == want, (what, os.strerror(ours[what]) if ours[what] else 0)
    assert ours["mode of suid"] == oct(0o777) and ours["mode of sgid"] == oct(0o777)
    assert ours["mode of both"] == oct(0o777)
    assert ours["mode of mine-suid"] == oct(0o777)   # Linux clears it for any writer without CAP_FSETID
    assert ours["mode of root-suid"] == oct(0o4755)
    assert ours == theirs
