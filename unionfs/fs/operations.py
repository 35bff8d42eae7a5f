"""The pyfuse3 adapter: maps FUSE requests onto :class:`~unionfs.fs.union.Union`.

Thin on purpose.  Its jobs: inode numbers <-> nodes, file and directory
handles, the kernel's lookup counts, cache timeouts, and errors: an
``OSError`` becomes a ``FUSEError`` with the same errno, and any other
exception is logged and answered with EIO, because pyfuse3 ends its main loop
(and hangs the mount) on anything but ``FUSEError``.
"""
from __future__ import annotations

import errno
import functools
import logging
import os
import stat
from dataclasses import dataclass, field

import pyfuse3

from .inodes import ROOT_INO, Node
from .union import Attr, Union

log = logging.getLogger("unionfs.ops")

# Lower layers never change under us and we are the only writer of the upper,
# so the kernel may keep what we tell it.  Entries that live only in lower layers
# are immutable; upper entries get a shorter life as a guard against anything
# (another process on the upper dir) we did not do ourselves.
LOWER_TIMEOUT = 86400.0
UPPER_TIMEOUT = 1.0


def _guard(fn):
    """Turn OSError into FUSEError; log anything else and answer EIO (never kill the loop)."""

    @functools.wraps(fn)
    async def wrapper(self, *args, **kwargs):
        try:
            return await fn(self, *args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        except Exception:
            log.exception("internal error in %s%r", fn.__name__, args)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


@dataclass
class FileHandle:
    node: Node
    fd: int


@dataclass
class DirHandle:
    node: Node
    names: list[bytes] | None = None
    served: bool = False


@dataclass
class Handles:
    files: dict[int, FileHandle] = field(default_factory=dict)
    dirs: dict[int, DirHandle] = field(default_factory=dict)
    next_fh: int = 1

    def add(self, table: dict, handle) -> int:
        fh = self.next_fh
        self.next_fh += 1
        table[fh] = handle
        return fh


class Operations(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False

    def __init__(self, union: Union) -> None:
        super().__init__()
        self.union = union
        self.inodes = union.inodes
        self.handles = Handles()

    # --- helpers ---------------------------------------------------------------

    def _timeout(self, node: Node) -> float:
        if self.union.readonly or not self.union.stack.is_upper(node.top):
            return LOWER_TIMEOUT
        return UPPER_TIMEOUT

    def _entry(self, node: Node, attr: Attr) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = attr.ino
        e.generation = 0
        e.entry_timeout = e.attr_timeout = self._timeout(node)
        e.st_mode = attr.mode
        e.st_nlink = attr.nlink
        e.st_uid = attr.uid
        e.st_gid = attr.gid
        e.st_rdev = attr.rdev
        e.st_size = attr.size
        e.st_blksize = attr.blksize
        e.st_blocks = attr.blocks
        e.st_atime_ns = attr.atime_ns
        e.st_mtime_ns = attr.mtime_ns
        e.st_ctime_ns = attr.ctime_ns
        return e

    def _negative(self) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = 0
        e.entry_timeout = LOWER_TIMEOUT if self.union.readonly else UPPER_TIMEOUT
        return e

    # --- lookups and attributes ---------------------------------------------------

    @_guard
    async def lookup(self, parent_inode, name, ctx=None):
        parent = self.inodes.get(parent_inode)
        try:
            node = self.union.lookup(parent, name)
        except FileNotFoundError:
            return self._negative()
        entry = self._entry(node, self.union.getattr(node))
        self.inodes.lookup(node)  # the kernel counts '.' and '..' lookups too (NFS export path)
        return entry

    def forget(self, inode_list):
        try:
            for ino, n in inode_list:
                self.inodes.forget(ino, n)
        except Exception:
            log.exception("internal error in forget")

    @_guard
    async def getattr(self, inode, ctx=None):
        node = self.inodes.get(inode)
        return self._entry(node, self.union.getattr(node))

    @_guard
    async def readlink(self, inode, ctx):
        return self.union.readlink(self.inodes.get(inode))

    @_guard
    async def access(self, inode, mode, ctx):
        self.union.access(self.inodes.get(inode), mode, ctx.uid, [ctx.gid, *pyfuse3.get_sup_groups(ctx.pid)])

    @_guard
    async def statfs(self, ctx):
        v = self.union.statfs()
        s = pyfuse3.StatvfsData()
        s.f_bsize, s.f_frsize = v.f_bsize, v.f_frsize
        s.f_blocks, s.f_bfree, s.f_bavail = v.f_blocks, v.f_bfree, v.f_bavail
        s.f_files, s.f_ffree, s.f_favail = v.f_files, v.f_ffree, v.f_favail
        s.f_namemax = v.f_namemax
        return s

    # --- xattrs ----------------------------------------------------------------

    @_guard
    async def getxattr(self, inode, name, ctx):
        try:
            return self.union.getxattr(self.inodes.get(inode), os.fsdecode(name))
        except OSError as e:
            if e.errno == errno.ENODATA:
                raise pyfuse3.FUSEError(pyfuse3.ENOATTR) from None
            raise

    @_guard
    async def listxattr(self, inode, ctx):
        return [os.fsencode(n) for n in self.union.listxattr(self.inodes.get(inode))]

    # --- directories -----------------------------------------------------------

    @_guard
    async def opendir(self, inode, ctx):
        node = self.inodes.get(inode)
        if not node.is_dir:
            raise OSError(errno.ENOTDIR, "not a directory")
        return self.handles.add(self.handles.dirs, DirHandle(node))

    @_guard
    async def readdir(self, fh, start_id, token):
        h = self.handles.dirs[fh]
        node = h.node
        if h.names is None or (start_id == 0 and h.served):
            # A listing is a snapshot per open handle (rebuilt on rewinddir), so
            # offsets stay valid however lookups and changes interleave.
            h.names = self.union.list_names(node)
        h.served = True
        names = h.names
        for off in range(start_id, len(names) + 2):
            if off == 0:
                name, child = b".", node
            elif off == 1:
                name, child = b"..", node.parent or node
            else:
                name = names[off - 2]
                try:
                    child = self.union.lookup(node, name)
                except FileNotFoundError:
                    continue  # gone since the snapshot
            entry = self._entry(child, self.union.getattr(child))
            if not pyfuse3.readdir_reply(token, name, entry, off + 1):
                break
            if off >= 2:
                self.inodes.lookup(child)

    @_guard
    async def releasedir(self, fh):
        del self.handles.dirs[fh]

    # --- files -----------------------------------------------------------------

    @_guard
    async def open(self, inode, flags, ctx):
        node = self.inodes.get(inode)
        fd = self.union.open(node, flags)
        fh = self.handles.add(self.handles.files, FileHandle(node, fd))
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    @_guard
    async def read(self, fh, off, size):
        return os.pread(self.handles.files[fh].fd, size, off)

    @_guard
    async def release(self, fh):
        h = self.handles.files.pop(fh)
        os.close(h.fd)

    # --- changes: a stack without an upper layer is read-only --------------------

    async def _erofs(self, *args, **kwargs):
        raise pyfuse3.FUSEError(errno.EROFS)

    setattr = mknod = mkdir = unlink = rmdir = symlink = rename = link = create = _erofs
    setxattr = removexattr = write = _erofs
