"""The union: path resolution and the read side of the merged view, in plain Python.

This module knows the overlay rules and nothing of FUSE: lookups resolve top
down, directories merge until an opaque one, the first non-directory hides
everything below, whiteouts hide names below their layer.  Everything raises
``OSError`` with the errno a caller should see; the FUSE adapter
(:mod:`unionfs.fs.operations`) only translates.
"""
from __future__ import annotations

import errno
import logging
import os
import stat
from dataclasses import dataclass

from . import formats
from . import sys as ovl
from .inodes import ROOT_INO, InodeTable, Node
from .layers import LayerStack

log = logging.getLogger("unionfs.union")


@dataclass(slots=True)
class Attr:
    """Attributes of a merged-view object, as the kernel should see them."""

    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    size: int
    blksize: int
    blocks: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int


def _check_name(name: bytes) -> None:
    if len(name) > 255:
        raise OSError(errno.ENAMETOOLONG, "name too long")
    if b"/" in name or not name:
        raise OSError(errno.EINVAL, "invalid name")


class Union:
    def __init__(self, stack: LayerStack) -> None:
        self.stack = stack
        self.inodes = InodeTable(stack.devs)
        self.readonly = stack.upper is None
        root_layers, root_xwh = self._root_layers()
        self.root = Node(ROOT_INO, None, b"", root_layers, stat.S_IFDIR, root_xwh)
        self.inodes.add_root(self.root)

    def _root_layers(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        layers: list[int] = []
        xwh: list[int] = []
        for layer in self.stack.layers:
            layers.append(layer.index)
            kind = self._dir_kind(layer.fd, None)
            if kind is formats.DirKind.XWHITEOUTS:
                xwh.append(layer.index)
            if kind is formats.DirKind.OPAQUE:
                break
        return tuple(layers), tuple(xwh)

    def close(self) -> None:
        self.stack.close()

    # --- resolution ---------------------------------------------------------------

    def _dir_kind(self, pfd: int, name: bytes | None) -> formats.DirKind:
        """Opaque markers of directory ``name`` in ``pfd`` (the dir ``pfd`` itself if name is None)."""
        names = ovl.listxattr_at(pfd, name)
        values = {}
        for xname in formats.OPAQUE_NAMES:
            if xname in names:
                v = ovl.getxattr_or_none(pfd, name, xname)
                if v is not None:
                    values[xname] = v
        kind = formats.dir_kind_from_xattrs(values)
        if kind is formats.DirKind.OPAQUE:
            return kind
        try:
            if name is None:
                opq = ovl.exists_at(pfd, formats.WH_OPAQUE)
            else:
                fd = ovl.open_dir_at(pfd, name)
                try:
                    opq = ovl.exists_at(fd, formats.WH_OPAQUE)
                finally:
                    os.close(fd)
        except OSError:
            opq = False
        return formats.DirKind.OPAQUE if opq else kind

    def _is_whiteout(self, index: int, parent: Node, pfd: int, name: bytes, st: os.stat_result) -> bool:
        if formats.is_chardev_whiteout(st):
            return True
        if index in parent.xwh and formats.may_be_xwhiteout(st):
            for xname in formats.XWHITEOUT_NAMES:
                if ovl.getxattr_or_none(pfd, name, xname) is not None:
                    return True
        return False

    def resolve(self, parent: Node, name: bytes) -> Node | None:
        """Resolve ``name`` in directory ``parent`` across the layers; None if it does not exist.

        The returned node is not yet in the inode table (see :meth:`lookup`).
        """
        if formats.is_oci_marker(name):
            return None
        layers: list[int] = []
        xwh: list[int] = []
        top: os.stat_result | None = None
        origin: os.stat_result | None = None
        for index in parent.layers:
            pfd = self.stack.dir_fd(index, parent)
            try:
                st = ovl.lstat_at(pfd, name)
            except (FileNotFoundError, NotADirectoryError):
                st = None
            if st is not None:
                if self._is_whiteout(index, parent, pfd, name, st):
                    break
                is_dir = stat.S_ISDIR(st.st_mode)
                if top is None:
                    top = st
                elif not is_dir:
                    break  # a non-directory below a directory is hidden
                layers.append(index)
                if origin is None and not self.stack.is_upper(index):
                    origin = st
                if not is_dir:
                    break
                kind = self._dir_kind(pfd, name)
                if kind is formats.DirKind.XWHITEOUTS:
                    xwh.append(index)
                if kind is formats.DirKind.OPAQUE:
                    break
            if self.stack.layers[index].oci_whiteouts and len(name) + 4 <= 255 and \
                    ovl.exists_at(pfd, formats.WH_PREFIX + name):
                break
        if top is None:
            return None
        origin = origin or top
        ino = self.inodes.ino_for(origin.st_dev, origin.st_ino)
        return Node(ino, parent, name, tuple(layers), top.st_mode, tuple(xwh))

    def lookup(self, parent: Node, name: bytes) -> Node:
        """Resolve and enter into the inode table; the caller counts the kernel's lookup."""
        if not parent.is_dir:
            raise OSError(errno.ENOTDIR, "not a directory")
        if name == b".":
            return parent
        if name == b"..":
            return parent.parent or parent
        _check_name(name)
        node = self.resolve(parent, name)
        if node is None:
            raise OSError(errno.ENOENT, "no such file or directory")
        return self.inodes.remember(node)

    # --- attributes ---------------------------------------------------------------

    def real_stat(self, node: Node) -> os.stat_result:
        """stat of the topmost real instance of ``node``."""
        if node.is_dir:
            return ovl.fstat(self.stack.dir_fd(node.top, node))
        return ovl.lstat_at(self.stack.parent_fd(node.top, node), node.name)

    def getattr(self, node: Node) -> Attr:
        return self.attr_from_stat(node, self.real_stat(node))

    def attr_from_stat(self, node: Node, st: os.stat_result) -> Attr:
        nlink = st.st_nlink
        if node.is_dir and len(node.layers) > 1:
            nlink = 1  # as overlayfs: a merged directory's link count is not worth counting
        return Attr(node.ino, st.st_mode, nlink, st.st_uid, st.st_gid, st.st_rdev, st.st_size,
                    st.st_blksize, st.st_blocks, st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns)

    def readlink(self, node: Node) -> bytes:
        if not stat.S_ISLNK(node.mode):
            raise OSError(errno.EINVAL, "not a symlink")
        return ovl.readlink_at(self.stack.parent_fd(node.top, node), node.name)

    def statfs(self) -> os.statvfs_result:
        return ovl.statvfs(self.stack.layers[0].fd)

    def access(self, node: Node, mode: int, uid: int, gids: list[int]) -> None:
        """access(2) for callers when the kernel does not check permissions itself."""
        if mode == os.F_OK:
            return
        st = self.real_stat(node)
        if mode & os.W_OK and self.readonly:
            raise OSError(errno.EROFS, "read-only file system")
        if uid == 0:
            if mode & os.X_OK and not stat.S_ISDIR(st.st_mode) and not st.st_mode & 0o111:
                raise OSError(errno.EACCES, "permission denied")
            return
        if uid == st.st_uid:
            bits = (st.st_mode >> 6) & 7
        elif st.st_gid in gids:
            bits = (st.st_mode >> 3) & 7
        else:
            bits = st.st_mode & 7
        if mode & ~bits & 7:
            raise OSError(errno.EACCES, "permission denied")

    # --- xattrs -----------------------------------------------------------------

    def _xattr_target(self, node: Node) -> tuple[int, bytes | None]:
        if node.is_dir:
            return self.stack.dir_fd(node.top, node), None
        return self.stack.parent_fd(node.top, node), node.name

    def getxattr(self, node: Node, name: str) -> bytes:
        stored = formats.escape_xattr(name)
        if formats.is_private_xattr(stored):
            raise OSError(errno.ENODATA, "no such attribute")
        fd, real = self._xattr_target(node)
        return ovl.getxattr_at(fd, real, stored)

    def listxattr(self, node: Node) -> list[str]:
        fd, real = self._xattr_target(node)
        return formats.visible_xattrs(ovl.listxattr_at(fd, real))

    # --- directories ------------------------------------------------------------

    def list_names(self, node: Node) -> list[bytes]:
        """The merged listing of directory ``node``: deduplicated, whiteouts and markers removed.

        Names come topmost layer first, each layer in its own order.
        """
        if not node.is_dir:
            raise OSError(errno.ENOTDIR, "not a directory")
        seen: set[bytes] = set()
        hidden: set[bytes] = set()  # whiteouts of layers above the one being read
        out: list[bytes] = []
        fsencode = os.fsencode
        for index in node.layers:
            fd = self.stack.dir_fd(index, node)
            oci = self.stack.layers[index].oci_whiteouts
            xwh = index in node.xwh
            layer_hidden: list[bytes] = []
            with ovl.scandir(fd) as it:
                for de in it:
                    name = fsencode(de.name)
                    if name in seen or name in hidden:
                        continue
                    if oci and name.startswith(formats.WH_PREFIX):
                        target = formats.oci_whiteout_target(name)
                        if target is not None:
                            layer_hidden.append(target)
                        continue
                    if not (de.is_dir(follow_symlinks=False) or de.is_symlink()):
                        is_file = de.is_file(follow_symlinks=False)
                        if not is_file or xwh:
                            st = de.stat(follow_symlinks=False)
                            if formats.is_chardev_whiteout(st) or (
                                    xwh and is_file and self._is_whiteout(index, node, fd, name, st)):
                                layer_hidden.append(name)
                                continue
                    seen.add(name)
                    out.append(name)
            hidden.update(layer_hidden)
        return out

    # --- data ------------------------------------------------------------------

    def open(self, node: Node, flags: int) -> int:
        """A real fd for reading ``node`` (the writable layer overrides this for writes)."""
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise OSError(errno.EROFS, "read-only file system")
        if node.is_dir:
            raise OSError(errno.EISDIR, "is a directory")
        flags &= ~(os.O_CREAT | os.O_EXCL | os.O_NOCTTY)
        return ovl.open_at(self.stack.parent_fd(node.top, node), node.name, flags | os.O_RDONLY)
