"""Reading a merged view by path, without FUSE or through a mount point.

``diff`` and ``commit`` need three things of a container: its upper dir (read
directly, fd-relative), the image alone (the lower layers: what existed before),
and the merged view (what the container sees).  Two implementations give the
same answers:

* :class:`UnionView` runs the union rules in this process (``unionfs.fs.union``),
  over layer directories: the image alone (read-only), or the image plus the
  container's writable layer (:class:`unionfs.fs.writable.WritableUnion`, which
  takes the upper dir's lock, so only while the container is not mounted);
* :class:`MountView` reads a mounted container through its mount point, one name
  at a time from a directory fd, never following a symlink.

Paths are ``bytes`` relative to the root, ``b""`` being the root itself.
Overlay/unionfs bookkeeping xattrs are never returned.
"""
from __future__ import annotations

import errno
import os
import stat
from collections import OrderedDict
from dataclasses import dataclass
from typing import BinaryIO

from ..fs import formats
from ..fs import sys as ovl
from ..fs.mount import open_union
from ..fs.union import Union


@dataclass(frozen=True)
class Stat:
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    ino: int
    nlink: int
    rdev: int

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


def _public(names: list[str]) -> list[str]:
    """Bookkeeping xattrs of any overlay or of unionfs never leave a layer (nor do escaped ones)."""
    return sorted(n for n in names if not n.startswith(formats.PRIVATE_PREFIXES))


def split(path: bytes) -> list[bytes]:
    return [p for p in path.split(b"/") if p]


class UnionView:
    """The union rules in plain Python over layer directories (``lower`` topmost first)."""

    def __init__(self, lower: list[str], upper: str | None = None, work: str | None = None) -> None:
        self.u: Union = open_union(lower, upper, work)   # an upper dir a mount is using is refused
        if os.geteuid() != 0:   # a user's store: owners and modes as recorded (see image.commands.store_options)
            self.u.override = formats.OVERRIDE_CONTAINERS
        self._nodes: dict[bytes, object] = {b"": self.u.root}

    def close(self) -> None:
        self.u.close()

    def __enter__(self) -> "UnionView":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _node(self, path: bytes):
        node = self._nodes.get(path)
        if node is not None:
            return node
        head, _, name = path.rpartition(b"/")
        parent = self._node(head)
        if parent is None or not parent.is_dir:
            return None
        try:
            node = self.u.lookup(parent, name)
        except (FileNotFoundError, NotADirectoryError):
            return None
        self._nodes[path] = node
        return node

    def stat(self, path: bytes) -> Stat | None:
        node = self._node(path)
        if node is None:
            return None
        a = self.u.getattr(node)
        return Stat(a.mode, a.uid, a.gid, a.size, a.mtime_ns, a.ino, a.nlink, a.rdev)

    def listdir(self, path: bytes) -> list[bytes]:
        node = self._node(path)
        if node is None:
            raise FileNotFoundError(errno.ENOENT, "no such directory", path)
        return self.u.list_names(node)

    def readlink(self, path: bytes) -> bytes:
        return self.u.readlink(self._node(path))

    def xattrs(self, path: bytes) -> dict[str, bytes]:
        node = self._node(path)
        out = {}
        for n in _public(self.u.listxattr(node)):
            try:
                out[n] = self.u.getxattr(node, n)
            except OSError as e:
                if e.errno not in (errno.ENODATA, errno.ENOTSUP):
                    raise
        return out

    def open(self, path: bytes) -> BinaryIO:
        f = self.u.open(self._node(path), os.O_RDONLY)
        try:
            return os.fdopen(os.dup(f.fd), "rb")
        finally:
            self.u.release(f)


class MountView:
    """A mounted tree, read through its mount point with fd-relative calls (symlinks never followed)."""

    MAX_FDS = 256

    def __init__(self, root: str) -> None:
        self.root_fd = os.open(root, ovl.O_DIR & ~os.O_NOFOLLOW)
        self._dirs: OrderedDict[bytes, int] = OrderedDict()

    def close(self) -> None:
        for fd in self._dirs.values():
            os.close(fd)
        self._dirs.clear()
        os.close(self.root_fd)

    def __enter__(self) -> "MountView":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _dir(self, path: bytes) -> int:
        if not path:
            return self.root_fd
        fd = self._dirs.get(path)
        if fd is not None:
            self._dirs.move_to_end(path)
            return fd
        fd = ovl.open_beneath(self.root_fd, path)
        self._dirs[path] = fd
        if len(self._dirs) > self.MAX_FDS:
            os.close(self._dirs.popitem(last=False)[1])
        return fd

    def _at(self, path: bytes) -> tuple[int, bytes | None]:
        head, _, name = path.rpartition(b"/")
        return (self._dir(head), name) if path else (self.root_fd, None)

    def stat(self, path: bytes) -> Stat | None:
        try:
            fd, name = self._at(path)
            st = ovl.fstat(fd) if name is None else ovl.lstat_at(fd, name)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as e:
            if e.errno == errno.ELOOP:   # a symlink where a directory of the path would be
                return None
            raise
        return Stat(st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, st.st_ino, st.st_nlink,
                    st.st_rdev)

    def listdir(self, path: bytes) -> list[bytes]:
        with ovl.scandir(self._dir(path)) as it:
            return [os.fsencode(e.name) for e in it]

    def readlink(self, path: bytes) -> bytes:
        fd, name = self._at(path)
        return ovl.readlink_at(fd, name)

    def xattrs(self, path: bytes) -> dict[str, bytes]:
        fd, name = self._at(path)
        out = {}
        for n in _public(ovl.listxattr_at(fd, name)):
            v = ovl.getxattr_or_none(fd, name, n)
            if v is not None:
                out[n] = v
        return out

    def open(self, path: bytes) -> BinaryIO:
        fd, name = self._at(path)
        return os.fdopen(ovl.open_at(fd, name, os.O_RDONLY), "rb")
