"""Answers kept to save requests or syscalls must never show a stale view: the xattr names of
lower-only objects, and day-long negative entries in lower-only directories."""
from __future__ import annotations

import errno
import os

import pytest

from helpers import overlay_mount, user_xattrs


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
