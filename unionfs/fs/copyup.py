"""Copy-up: the first change to a lower object brings it into the upper layer.

Order, as in overlayfs's ``copy_up.c``: parent directories first; then the
object is built under a temporary name in the work dir with its data, owner,
mode, xattrs and times (data before xattrs, because writing data would drop
``security.capability``; chown before chmod, because chown clears setuid), and
only then renamed into place.  A crash at any moment leaves either no upper
copy (the lower one still shows) or a complete one; temporary names left in the
work dir are removed at the next mount.

A lower file with several hard links is copied up once, into the work dir's
index (named after its inode number), and every name of it that gets copied up
later is a hard link to that one upper inode: writes through one name show
through all of them, as with overlayfs ``index=on``.
"""
from __future__ import annotations

import errno
import logging
import os
import stat
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import formats
from . import sys as ovl
from .inodes import Node
from .union import index_name

if TYPE_CHECKING:
    from .writable import WritableUnion

log = logging.getLogger("unionfs.copyup")


@dataclass
class CopyUpCtx:
    """One copy-up in progress: what is copied, from where, to where."""

    node: Node
    lower_fd: int          # the directory holding the object in its lower layer
    lower_name: bytes
    st: os.stat_result
    upper_parent_fd: int
    temp: bytes
    truncate: bool         # opened with O_TRUNC: the data would be thrown away, copy none
    index: bool            # a lower hard link: goes through the index


def copy_xattrs(src_fd: int, src_name: bytes | None, dst_fd: int, dst_name: bytes | None) -> None:
    """Copy every xattr but overlay-private ones; only security.* failures are fatal (as overlayfs)."""
    for name in ovl.listxattr_at(src_fd, src_name):
        if formats.is_private_xattr(name):
            continue
        try:
            value = ovl.getxattr_at(src_fd, src_name, name)
            ovl.setxattr_at(dst_fd, dst_name, name, value)
        except OSError as e:
            if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP) and not name.startswith("security."):
                log.debug("xattr %s not copied: %s", name, e)
                continue
            if e.errno == errno.ENODATA:
                continue
            raise


def _set_owner_mode_times(fd: int, name: bytes | None, st: os.stat_result) -> None:
    """chown, then chmod (chown clears setuid), then times; on fd (name None) or a name in fd."""
    if name is None:
        ovl.fchown(fd, st.st_uid, st.st_gid)
        ovl.fchmod(fd, stat.S_IMODE(st.st_mode))
        ovl.futimens(fd, (st.st_atime_ns, st.st_mtime_ns))
        return
    ovl.chown_at(fd, name, st.st_uid, st.st_gid)
    if not stat.S_ISLNK(st.st_mode):
        ovl.chmod_at(fd, name, stat.S_IMODE(st.st_mode))
    ovl.utime_at(fd, name, (st.st_atime_ns, st.st_mtime_ns))


class CopyUp:
    def __init__(self, union: "WritableUnion") -> None:
        self.u = union

    def dir_chain(self, node: Node) -> None:
        """Make sure directory ``node`` and all its ancestors exist in the upper layer."""
        chain: list[Node] = []
        n: Node | None = node
        while n is not None and n.parent is not None and not self.u.in_upper(n):
            chain.append(n)
            n = n.parent
        for d in reversed(chain):
            self.one(d)

    def __call__(self, node: Node, truncate: bool = False) -> None:
        """Copy ``node`` up (with its parents) unless it is already in the upper layer."""
        if self.u.in_upper(node):
            return
        if node.parent is not None:
            self.dir_chain(node.parent)
        self.one(node, truncate)

    def one(self, node: Node, truncate: bool = False) -> None:
        u = self.u
        lower = node.top
        lower_fd, lower_name = u.locate_in(node, lower)
        st = ovl.lstat_at(lower_fd, lower_name)
        parent = node.parent
        assert parent is not None
        upper_parent_fd = u.stack.dir_fd(0, parent)
        pstat = ovl.fstat(upper_parent_fd)
        index = stat.S_ISREG(st.st_mode) and st.st_nlink > 1
        ctx = CopyUpCtx(node, lower_fd, lower_name, st, upper_parent_fd, u.temp_name(), truncate, index)
        log.debug("copy up %r", node)
        if index and u.index_has(node.ino):
            self._link_up(ctx)
        elif stat.S_ISDIR(st.st_mode):
            self._dir(ctx)
        else:
            self._nondir(ctx)
        # The rename into the parent changed its times; a copy-up must not show.
        ovl.futimens(upper_parent_fd, (pstat.st_atime_ns, pstat.st_mtime_ns))
        u.changed.add(node.ino)  # a merged dir's link count, a file's ctime: tell the kernel
        u.dirty_dirs.add(parent.ino)  # its entry there is no longer immutable
        if stat.S_ISDIR(st.st_mode):
            node.layers = (0,) + tuple(node.layers)
            if node.paths is not None:
                node.paths = (None,) + node.paths
        else:
            node.layers = (0,)
            node.indexed = index
            u.reopen_readers(node)

    def _link_up(self, c: CopyUpCtx) -> None:
        """Another name of this inode was copied up already: this one becomes a link to it.

        The name moves from the lower layers' count to the real link count.  The link is made
        in the work dir and marked ``pending`` in the same xattr write that moves the count,
        so that a crash before the rename into place can be undone at the next mount.
        """
        u = self.u
        ino, iname = c.node.ino, index_name(c.node.ino)
        meta = u._upper_meta(u.index_fd, iname)
        lower_links = max(0, (meta.lower_links or 0) - 1) if meta is not None else 0
        ovl.link_at(u.index_fd, iname, u.work_fd, c.temp)
        try:
            u.write_meta(u.index_fd, iname, ino, lower_links, pending=c.temp)
            ovl.rename_at(u.work_fd, c.temp, c.upper_parent_fd, c.node.name, ovl.RENAME_NOREPLACE)
        except BaseException:
            if ovl.exists_at(u.work_fd, c.temp):  # not in place: the count goes back as it was
                u.write_meta(u.index_fd, iname, ino, meta.lower_links if meta is not None else None)
                ovl.unlink_at(u.work_fd, c.temp)
            raise
        u.write_meta(u.index_fd, iname, ino, lower_links)

    def _dir(self, c: CopyUpCtx) -> None:
        u = self.u
        ovl.mkdir_at(u.work_fd, c.temp, 0o700)
        try:
            fd = ovl.open_dir_at(u.work_fd, c.temp)
            try:
                src = ovl.open_dir_at(c.lower_fd, c.lower_name)
                try:
                    copy_xattrs(src, None, fd, None)
                finally:
                    os.close(src)
                if c.node.redirect is not None:
                    u.set_redirect(fd, c.node.redirect)
                _set_owner_mode_times(fd, None, c.st)
            finally:
                os.close(fd)
            ovl.rename_at(u.work_fd, c.temp, c.upper_parent_fd, c.node.name, ovl.RENAME_NOREPLACE)
        except BaseException:
            ovl.remove_tree_at(u.work_fd, c.temp)
            raise

    def _nondir(self, c: CopyUpCtx) -> None:
        u, st = self.u, c.st
        mode = st.st_mode
        try:
            if stat.S_ISREG(mode):
                dst = ovl.open_at(u.work_fd, c.temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    if not c.truncate and st.st_size:
                        src = ovl.open_at(c.lower_fd, c.lower_name, os.O_RDONLY)
                        try:
                            ovl.copy_file_range_all(src, dst, st.st_size)
                        finally:
                            os.close(src)
                    if u.fsync:
                        ovl.fsync(dst)
                finally:
                    os.close(dst)
            elif stat.S_ISLNK(mode):
                ovl.symlink_at(ovl.readlink_at(c.lower_fd, c.lower_name), u.work_fd, c.temp)
            else:  # fifo, socket, device: the same kind of node, never a regular file
                ovl.mknod_at(u.work_fd, c.temp, stat.S_IFMT(mode) | 0o600, st.st_rdev)
            copy_xattrs(c.lower_fd, c.lower_name, u.work_fd, c.temp)
            _set_owner_mode_times(u.work_fd, c.temp, st)
            if c.index:
                # Counted as a name in place already: a crash before the rename gives it back.
                u.write_meta(u.work_fd, c.temp, c.node.ino, st.st_nlink - 1, pending=c.temp)
                ovl.link_at(u.work_fd, c.temp, u.index_fd, index_name(c.node.ino))
            else:
                u.write_meta(u.work_fd, c.temp, c.node.ino)
            ovl.rename_at(u.work_fd, c.temp, c.upper_parent_fd, c.node.name, ovl.RENAME_NOREPLACE)
            if c.index:
                u.write_meta(u.index_fd, index_name(c.node.ino), c.node.ino, st.st_nlink - 1)
        except BaseException:
            try:
                if c.index and ovl.exists_at(u.work_fd, c.temp) and u.index_has(c.node.ino) and \
                        ovl.lstat_at(u.index_fd, index_name(c.node.ino)).st_ino == \
                        ovl.lstat_at(u.work_fd, c.temp).st_ino:
                    ovl.unlink_at(u.index_fd, index_name(c.node.ino))  # no name of it is in place
                ovl.unlink_at(u.work_fd, c.temp)
            except OSError:
                pass
            raise
