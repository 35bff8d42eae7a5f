"""The fd-relative xattr reads of fs/sys.py (getxattrat/listxattrat where the kernel has them) give
what the xattr package reads through /proc/self/fd: values of every size (a big one, on tmpfs, is
read past the fast path's buffer), many names, symlinks not followed, missing names and files,
and the same again with the fast path off (a kernel before 6.13)."""
from __future__ import annotations

import errno
import os
import tempfile

import pytest
import xattr

from unionfs.fs import sys as ovl


@pytest.fixture
def place():
    """A directory on tmpfs (values larger than a block, unlike ext4) with files carrying xattrs."""
    d = tempfile.mkdtemp(dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    try:
        os.mknod(os.path.join(d, "plain"), 0o644 | 0o100000)
        f = os.path.join(d, "tagged")
        os.mknod(f, 0o644 | 0o100000)
        try:
            os.setxattr(f, "user.big", os.urandom(9000))
        except OSError as e:
            pytest.skip(f"no big user xattrs here: {e}")
        os.setxattr(f, "user.empty", b"")
        for i in range(300):   # a name list longer than the fast path's buffer
            os.setxattr(f, f"user.name-{i:03d}-" + "n" * 10, b"%d" % i)
        os.symlink("tagged", os.path.join(d, "link"))
        os.mkdir(os.path.join(d, "sub"))
        os.setxattr(os.path.join(d, "sub"), "user.dir", b"d")
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            yield d, fd
        finally:
            os.close(fd)
    finally:
        import shutil
        shutil.rmtree(d)


def _package(d, name, attr=None):
    """What the xattr package reads (never following a symlink)."""
    path = os.path.join(d, name)
    if attr is None:
        return sorted(xattr.listxattr(path, symlink=True))
    try:
        return xattr.getxattr(path, attr, symlink=True)
    except OSError as e:
        if e.errno == errno.ENODATA:
            return None
        raise


@pytest.mark.parametrize("fast", [True, False])
def test_reads_match_the_xattr_package(place, monkeypatch, fast):
    d, fd = place
    if not fast:
        monkeypatch.setattr(ovl, "_getxattrat", [False])
        monkeypatch.setattr(ovl, "_listxattrat", [False])
    for name in ("plain", "tagged", "link", "sub"):
        assert sorted(ovl.listxattr_at(fd, name.encode())) == _package(d, name), name
        for attr in ("user.big", "user.empty", "user.name-007-nnnnnnnnnn", "user.dir", "user.none"):
            assert ovl.getxattr_or_none(fd, name.encode(), attr) == _package(d, name, attr), (name, attr)
            assert ovl.has_xattr_at(fd, name.encode(), attr) == (_package(d, name, attr) is not None)
    sub = os.open(os.path.join(d, "sub"), os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert ovl.listxattr_at(sub, None) == ["user.dir"]   # the directory itself
    finally:
        os.close(sub)
    assert len(ovl.listxattr_at(fd, b"tagged")) == 302
    with pytest.raises(FileNotFoundError):
        ovl.listxattr_at(fd, b"missing")
    with pytest.raises(FileNotFoundError):
        ovl.getxattr_or_none(fd, b"missing", "user.big")
    with pytest.raises(OSError):
        ovl.getxattr_or_none(fd, b"../escape", "user.big")   # a name, never a path
