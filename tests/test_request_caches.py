"""Answers kept to save requests or syscalls must never show a stale view: the xattr names of
lower-only objects, and day-long negative entries in lower-only directories; requests declined
once (FSYNC on a mount that syncs nothing) must lose nothing."""
from __future__ import annotations

import errno
import os
import re
import subprocess

import pytest

from helpers import UnionMount, overlay_mount, unionfs_cmd, user_xattrs


def _lower(tmp_path):
    low = tmp_path / "low"
    (low / "dir").mkdir(parents=True)
    (low / "dir" / "tagged").write_text("t\n")
    os.setxattr(low / "dir" / "tagged", "user.colour", b"blue")
    (low / "dir" / "plain").write_text("p\n")
    os.setxattr(low / "dir", "user.dir", b"d")
    return low


def _stack(tmp_path):
    """The lower layer, and an empty upper and work dir."""
    up, work = tmp_path / "up", tmp_path / "work"
    up.mkdir()
    work.mkdir()
    return _lower(tmp_path), up, work


def _users(root):
    return {n: {k: v for k, v in user_xattrs(str(root / "dir" / n)).items() if k.startswith("user.")}
            for n in ("tagged", "plain", "")}


def _missing(path, name):
    with pytest.raises(OSError) as e:
        os.getxattr(path, name, follow_symlinks=False)
    assert e.value.errno == errno.ENODATA


def test_xattr_names_of_lower_objects_then_changed_through_the_mount(tmp_path, union_mount):
    low, up, work = _stack(tmp_path)
    m = union_mount([low], up, work)
    tagged, plain, d = m.mnt / "dir" / "tagged", m.mnt / "dir" / "plain", m.mnt / "dir"
    for _ in range(2):   # the second round is answered from the kept names
        _missing(tagged, "security.selinux")
        assert os.getxattr(tagged, "user.colour") == b"blue"
        _missing(plain, "user.colour")
        assert os.getxattr(d, "user.dir") == b"d"
        _missing(d, "user.other")
    os.setxattr(plain, "user.colour", b"red")      # a copy-up: no longer lower-only
    os.setxattr(tagged, "user.colour", b"green")
    os.removexattr(d, "user.dir")
    os.setxattr(d, "user.other", b"o")
    assert os.getxattr(plain, "user.colour") == b"red"
    assert os.getxattr(tagged, "user.colour") == b"green"
    _missing(d, "user.dir")
    assert os.getxattr(d, "user.other") == b"o"
    # the same as kernel overlayfs on the same layers (user names: it shows our private ones too)
    ovl = tmp_path / "ovl"
    ovl.mkdir()
    m.stop()
    with overlay_mount(ovl, [low], up, work):
        expected = _users(ovl)
    m2 = union_mount([low], up, work)
    assert _users(m2.mnt) == expected


def test_a_name_missing_from_a_lower_only_dir_appears_when_made_through_the_mount(tmp_path, union_mount):
    low, up, work = _stack(tmp_path)
    m = union_mount([low], up, work)
    d = m.mnt / "dir"
    for name in ("new", "dir2", "moved", "hard", "sym"):
        assert not os.path.lexists(d / name)   # negative entries, kept a day
    (d / "new").write_text("n\n")
    os.mkdir(d / "dir2")
    os.rename(d / "plain", d / "moved")
    os.link(d / "tagged", d / "hard")
    os.symlink("tagged", d / "sym")
    assert (d / "new").read_text() == "n\n" and (d / "moved").read_text() == "p\n"
    assert os.path.isdir(d / "dir2") and os.readlink(d / "sym") == "tagged"
    assert os.stat(d / "hard").st_ino == os.stat(d / "tagged").st_ino
    assert not os.path.lexists(d / "plain")
    os.unlink(d / "new")
    assert not os.path.lexists(d / "new")
    (d / "new").write_text("again\n")
    assert (d / "new").read_text() == "again\n"


XNAMES = ("security.capability", "system.posix_acl_access", "user.a")


def _xattrs(path) -> dict:
    out = {}
    for name in XNAMES:
        try:
            out[name] = os.getxattr(path, name, follow_symlinks=False)
        except OSError as e:
            out[name] = e.errno
    return out


def _append(path, data: bytes) -> None:
    # 0644: the mode a umask leaves alone (a default ACL makes the kernel skip the umask, and we
    # apply it: a difference of its own, not this test's)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        for _ in range(3):
            os.write(fd, data)   # each write(2) makes the kernel ask for security.capability
    finally:
        os.close(fd)


def _xattr_story(root) -> list:
    """Kept xattr names of upper objects: made, written (the kernel asks before each write), given a
    capability by setcap, written again (which drops it), chowned, removed and made again at the
    same name under a default ACL (the upper filesystem may give the new file the old one's number)."""
    import subprocess
    seen = []
    d = root / "d"
    d.mkdir()
    f = d / "f"
    _append(f, b"one")
    seen.append(_xattrs(f))
    subprocess.run(["setcap", "cap_net_raw+ep", str(f)], check=True, timeout=30)
    seen.append(_xattrs(f))
    _append(f, b"two")                       # a write drops the capability
    seen.append(_xattrs(f))
    subprocess.run(["setcap", "cap_net_raw+ep", str(f)], check=True, timeout=30)
    os.chown(f, 1, 1)                        # so does a chown
    seen.append(_xattrs(f))
    os.setxattr(f, "user.a", b"x")
    seen.append(_xattrs(f))
    subprocess.run(["setfacl", "-d", "-m", "u:1:rwx", str(d)], check=True, timeout=30)
    for _ in range(3):                       # a new object, maybe at the old number, with an inherited ACL
        os.unlink(f)
        _append(f, b"new")
        seen.append(_xattrs(f))
    capped = root / "capped"                 # from the lower layer, then copied up by a write
    seen.append(_xattrs(capped))
    _append(capped, b"more")
    seen.append(_xattrs(capped))
    return seen


def test_xattr_names_of_upper_objects_follow_every_change(tmp_path, union_mount):
    import subprocess
    low = tmp_path / "low"
    low.mkdir()
    (low / "capped").write_bytes(b"lower\n")
    subprocess.run(["setcap", "cap_net_raw+ep", str(low / "capped")], check=True, timeout=30)
    up, work, kup, kwork = (tmp_path / n for n in ("up", "work", "kup", "kwork"))
    for p in (up, work, kup, kwork):
        p.mkdir()
    m = union_mount([low], up, work)
    ours = _xattr_story(m.mnt)
    m.stop()
    ovl = tmp_path / "ovl"
    ovl.mkdir()
    with overlay_mount(ovl, [low], kup, kwork, extra="index=on,redirect_dir=on"):
        theirs = _xattr_story(ovl)
    assert ours == theirs
    assert isinstance(ours[1]["security.capability"], bytes)   # the story did set one
    assert isinstance(ours[-2]["security.capability"], bytes)


_CHANGES = {   # each copies a lower file with a capability up, and none of them drops it on overlayfs
    "chown": lambda p: os.chown(p, 0, 0),
    "chmod": lambda p: os.chmod(p, 0o750),
    "utimes": lambda p: os.utime(p, (1, 2)),
    "setxattr": lambda p: os.setxattr(p, "user.x", b"1"),
    "open_rw": lambda p: os.close(os.open(p, os.O_RDWR)),
}


def _capabilities_after_copy_up(root) -> dict:
    out = {}
    for name, change in _CHANGES.items():
        try:
            change(root / name)
            out[name] = "ok"
        except OSError as e:
            out[name] = errno.errorcode[e.errno]
        out[name] = (out[name], _xattrs(root / name)["security.capability"], os.lstat(root / name).st_mode)
    return out


@pytest.mark.parametrize("options", [[], ["metacopy=on"]], ids=["copy", "metacopy"])
def test_copy_up_keeps_security_capability(tmp_path, union_mount, options):
    """Our copy-up chowned after copying the xattrs, and a chown drops security.capability: every
    copy-up lost it, and a chown failed with ENODATA (the kernel asks to remove the capability it
    was told of, which the copy-up had already dropped)."""
    low = tmp_path / "low"
    low.mkdir()
    for name in _CHANGES:
        (low / name).write_bytes(b"#!/bin/sh\n")
        os.chmod(low / name, 0o755)
        subprocess.run(["setcap", "cap_net_raw+ep", str(low / name)], check=True, timeout=30)
    up, work, kup, kwork, ovl = (tmp_path / n for n in ("up", "work", "kup", "kwork", "ovl"))
    for p in (up, work, kup, kwork, ovl):
        p.mkdir()
    m = union_mount([low], up, work, options=options)
    ours = _capabilities_after_copy_up(m.mnt)
    m.stop()
    extra = ",".join(["index=on,redirect_dir=on"] + options)
    with overlay_mount(ovl, [low], kup, kwork, extra=extra):
        theirs = _capabilities_after_copy_up(ovl)
    assert ours == theirs
    assert isinstance(ours["chmod"][1], bytes)


class _Debugged(UnionMount):
    """A daemon with libfuse's debug output (one line per request) in a file of its own."""

    def spawn(self, args):
        self.debug = self.mnt.parent / f"{self.mnt.name}.debug"
        with open(self.debug, "wb") as out:
            return subprocess.Popen(unionfs_cmd(*args), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=out)

    def opcodes(self, name: str) -> int:
        return len(re.findall(rf"opcode: {name} ".encode(), self.debug.read_bytes()))


@pytest.mark.parametrize("options, sent", [([], 3), (["volatile"], 1), (["fsync=0"], 1)])
def test_fsync_sent_once_where_nothing_syncs(tmp_path, options, sent):
    """With volatile or fsync=0 the first FSYNC and FSYNCDIR are answered ENOSYS, so the kernel
    answers the later fsync(2) calls itself; each still succeeds and writes the cached data back."""
    low, up, work = _stack(tmp_path)
    (tmp_path / "mnt").mkdir()
    m = _Debugged(tmp_path / "mnt", [low], up, work, options=[*options, "debug"])
    m.start()
    try:
        fd = os.open(m.mnt / "dir" / "new", os.O_CREAT | os.O_WRONLY, 0o644)
        d = os.open(m.mnt / "dir", os.O_RDONLY | os.O_DIRECTORY)
        try:
            for i in range(3):
                os.pwrite(fd, b"%d" % i, i)
                os.fsync(fd)
                os.fsync(d)
        finally:
            os.close(fd)
            os.close(d)
        assert (up / "dir" / "new").read_bytes() == b"012"   # written back before each fsync returned
    finally:
        m.stop()
    assert (m.opcodes("FSYNC"), m.opcodes("FSYNCDIR")) == (sent, sent)
