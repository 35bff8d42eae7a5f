"""The pyfuse3 adapter: maps FUSE requests onto :class:`~unionfs.fs.union.Union`.

Thin on purpose.  Its jobs: inode numbers <-> nodes, file and directory
handles, the kernel's lookup counts, and errors: an ``OSError`` becomes a ``FUSEError`` with the same errno, and any other
exception is logged and answered with EIO, because pyfuse3 ends its main loop
(and hangs the mount) on anything but ``FUSEError``.  It decides nothing
itself: how long the kernel may cache an entry is the union's answer.
"""
from __future__ import annotations

import errno
import functools
import logging
import os
import queue
import stat
import threading
from dataclasses import dataclass, field
from typing import Callable

import pyfuse3
import trio

from ..fs import sys as sysmod
from ..fs.copyup import DataCopy
from ..fs.readdir import DirCache, Listing
from ..fs.idmap import IdMap
from ..fs.inodes import ROOT_INO, Node
from ..fs.union import Attr, OpenFile, Union

log = logging.getLogger("unionfs.ops")

# Nodes kept for the kernel before it is asked to forget old lower-only ones: about 200 bytes
# each, so ~40 MB (README, "Memory").
MAX_INODES = 200_000


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
        finally:
            if self.union.changed or self.union.dirty_dirs:
                self._invalidate_changed()

    return wrapper


@dataclass
class DirHandle:
    node: Node
    listing: Listing | None = None
    served: bool = False


@dataclass
class Handles:
    files: dict[int, OpenFile] = field(default_factory=dict)
    dirs: dict[int, DirHandle] = field(default_factory=dict)
    next_fh: int = 1

    def add(self, table: dict, handle) -> int:
        fh = self.next_fh
        self.next_fh += 1
        table[fh] = handle
        return fh


class Shedder:
    """Tells the kernel to forget names, from a thread of its own.

    An invalidation waits for the kernel to lock the directory, which a request we have not
    answered yet may hold: from the trio thread that could deadlock, so a worker sends them
    (pyfuse3's ``invalidate_entry_async`` does the same, but logs every ENOENT, has no way
    to stop before the session goes, and takes one queue item per name).
    """

    def __init__(self) -> None:
        self._queue: "queue.SimpleQueue[list[tuple[int, bytes]] | None]" = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.sent = 0

    def forget(self, names: list[tuple[int, bytes]]) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="shed", daemon=True)
            self._thread.start()
        self._queue.put(names)

    def _run(self) -> None:
        invalidate = pyfuse3.invalidate_entry
        while (batch := self._queue.get()) is not None:
            for parent, name in batch:
                try:
                    invalidate(parent, name)
                except OSError:
                    pass   # the kernel forgot it already (ENOENT), or the mount is going
                self.sent += 1

    def close(self) -> None:
        """Stop before the FUSE session is destroyed (names still queued are dropped)."""
        if self._thread is not None:
            while True:
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break
            self._queue.put(None)
            self._thread.join(timeout=5)
            self._thread = None


class Operations(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False
    # The kernel caches POSIX ACLs (one GETXATTR per inode instead of one per `ls -l`) and
    # enforces them, as it does on overlayfs; the upper filesystem applies default ACLs.
    enable_acl = True

    def __init__(self, union: Union, after_init: Callable[[], None] | None = None, idmap: IdMap = IdMap(),
                 acl: bool = True, xattrs: bool = True, static_nlink: bool = False, fakeroot: bool = False,
                 max_inodes: int | None = MAX_INODES, writeback: bool = False) -> None:
        super().__init__()
        # A user's mount with recorded owners (xattr_permissions): the mounting user, the only caller,
        # is root of it: creates root's files and may change every one (the kernel checks nothing).
        self.fakeroot = (os.geteuid(), os.getegid()) if fakeroot else None
        self.union = union
        self.uids, self.gids = idmap.uid, idmap.gid   # owners shown and written (uidmapping, squash_to_*)
        self._same_ids = idmap == IdMap()   # no map: owners shown as stored
        # Read by pyfuse3.init.  The kernel checks permissions itself (default_permissions) wherever it
        # enforces ACLs, so a fakeroot mount has none: its only caller is root of it anyway.
        self.enable_acl = acl and xattrs and not fakeroot
        # Read by pyfuse3.init too.  The kernel then owns size and mtime of open files, sends
        # writes of whole pages (reading the rest first: a write open is read-write on the real
        # file, as it is already), places O_APPEND writes itself (the real fd has no O_APPEND) and
        # sends the times it kept in a SETATTR; suid/sgid clearing still arrives as a SETATTR.
        self.enable_writeback_cache = writeback
        # Whether an fsync(2) of ours reaches the disk: not on a read-only, volatile or fsync=0 mount.
        self._syncs = not union.readonly and union.upper.fsync
        if not union.readonly:
            union.page_cache_writes = writeback
        self.xattrs = xattrs
        self.static_nlink = static_nlink
        self.inodes = union.inodes
        self.handles = Handles()
        self.listings = DirCache()
        self._copying: dict[int, trio.Event] = {}   # inodes whose copy-up's data copy runs in a thread
        self.after_init = after_init
        self.inodes.max_nodes = max_inodes
        self.shedder = Shedder()

    def close(self) -> None:
        """After the FUSE loop ended, before the session goes."""
        self.shedder.close()
        log.info("inode table: %d nodes at the end, %d at most; %d names given back to the kernel",
                 len(self.inodes), self.inodes.peak, self.shedder.sent)

    def init(self) -> None:
        # Runs inside the INIT request, before its reply: the kernel applies the reply's settings
        # afterwards, so what should override them runs once the loop comes round again.
        if self.after_init is not None:
            trio.lowlevel.current_trio_token().run_sync_soon(self.after_init)

    # --- helpers ---------------------------------------------------------------

    def _entry(self, node: Node, attr: Attr) -> pyfuse3.EntryAttributes:
        # Built for every entry of every READDIRPLUS: nothing here that can be skipped is done.
        e = pyfuse3.EntryAttributes()
        e.st_ino = attr.ino
        generations = self.inodes.generations
        if generations:
            e.generation = generations.get(attr.ino, 0)
        e.entry_timeout = e.attr_timeout = self.union.cache_timeout(node)
        e.st_mode = attr.mode
        e.st_nlink = 1 if self.static_nlink and stat.S_ISDIR(attr.mode) else attr.nlink
        if self._same_ids:
            e.st_uid = attr.uid
            e.st_gid = attr.gid
        else:
            e.st_uid = self.uids.shown(attr.uid)
            e.st_gid = self.gids.shown(attr.gid)
        e.st_rdev = attr.rdev
        e.st_size = attr.size
        e.st_blksize = attr.blksize
        e.st_blocks = attr.blocks
        e.st_atime_ns = attr.atime_ns
        e.st_mtime_ns = attr.mtime_ns
        e.st_ctime_ns = attr.ctime_ns
        return e

    def _invalidate_changed(self) -> None:
        """Drop cached listings of changed dirs, and the kernel's cached attributes of inodes that
        changed as a side effect (a copy-up)."""
        dirty = self.union.dirty_dirs
        while dirty:
            self.listings.drop(dirty.pop())
        changed = self.union.changed
        while changed:
            ino = changed.pop()
            if ino == ROOT_INO or self.inodes.find(ino) is None:
                continue
            try:
                pyfuse3.invalidate_inode(ino, attr_only=True)
            except OSError:
                pass  # the kernel no longer knows it: nothing cached

    def _owner(self, ctx) -> tuple[int, int]:
        """The caller's ids as the layers store them."""
        if self.fakeroot is not None:
            return (0 if ctx.uid == self.fakeroot[0] else self.uids.stored(ctx.uid),
                    0 if ctx.gid == self.fakeroot[1] else self.gids.stored(ctx.gid))
        return self.uids.stored(ctx.uid), self.gids.stored(ctx.gid)

    def _no_xattrs(self) -> None:
        if not self.xattrs:   # noxattrs: ENOSYS once, then the kernel answers EOPNOTSUPP itself
            raise pyfuse3.FUSEError(errno.ENOSYS)

    def _shed(self) -> None:
        """Over the inode budget: have the kernel forget old lower-only entries (FORGET frees them)."""
        nodes = self.inodes.overflow(self.union.immutable)
        if nodes:
            self.shedder.forget([(n.parent.ino, n.name) for n in nodes])

    def _negative(self, parent: Node) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = 0
        e.entry_timeout = self.union.negative_timeout(parent)
        return e

    # --- lookups and attributes ---------------------------------------------------

    @_guard
    async def lookup(self, parent_inode, name, ctx=None):
        parent = self.inodes.get(parent_inode)
        try:
            node, attr = self.union.lookup_attr(parent, name)
        except FileNotFoundError:
            return self._negative(parent)
        entry = self._entry(node, attr)
        self.inodes.lookup(node)  # the kernel counts '.' and '..' lookups too (NFS export path)
        if self.inodes.max_nodes is not None and len(self.inodes) > self.inodes.max_nodes:
            self._shed()
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
        gids = [self.gids.stored(g) for g in (ctx.gid, *pyfuse3.get_sup_groups(ctx.pid))]
        uid = self._owner(ctx)[0]
        try:
            self.union.access(self.inodes.get(inode), mode, uid, gids)
        except PermissionError:
            return False
        return True   # pyfuse3 wants the answer, not None (which it takes for "no")

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
        self._no_xattrs()
        node = self.inodes.get(inode)
        # The kernel asks for security.capability before every write(2): answered from the
        # union's kept names, without a decode or a syscall.
        if self.union.lacks_xattr(node, name):
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        try:
            return self.union.getxattr(node, os.fsdecode(name))
        except OSError as e:
            if e.errno == errno.ENODATA:
                raise pyfuse3.FUSEError(pyfuse3.ENOATTR) from None
            raise

    @_guard
    async def listxattr(self, inode, ctx):
        self._no_xattrs()
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
        if h.listing is None or (start_id == 0 and h.served):
            # A listing is a snapshot per open handle (taken again on rewinddir), so offsets
            # stay valid however lookups and changes interleave.
            h.listing = self.listings.listing(node, self.union.list_names)
        h.served = True
        listing = h.listing
        names, cached = listing.names, listing.cached
        # The layer masks hold only while nothing changed the directory since the listing.
        masks = listing.masks if self.listings.current(node.ino, listing) else None
        remember, count, immutable = self.inodes.remember, self.inodes.lookup, self.union.immutable
        keep = self.listings.keep
        for off in range(start_id, len(names) + 2):
            if off >= 2:
                i = off - 2
                hit = cached[i]
                if hit is not None:
                    if hit[0].parent is not node:
                        hit = None   # kept from before the directory was forgotten and looked up again
                    else:
                        child, entry = hit
                        child = remember(child)
                        if child is not hit[0] or not immutable(child):
                            hit = None
                if hit is None:
                    name = names[i]
                    try:
                        child, attr = self.union.lookup_attr(node, name, masks[i] if masks is not None else None)
                    except FileNotFoundError:
                        continue  # gone since the snapshot
                    entry = self._entry(child, attr)
                    if immutable(child):
                        keep(node.ino, listing, i, (child, entry))
                if not pyfuse3.readdir_reply(token, names[i], entry, off + 1):
                    break
                count(child)
            else:
                # The kernel takes only d_ino and d_type from '.' and '..' (it links no dentry for
                # them): no need to stat the directory and its parent on every opendir.
                child = node if off == 0 else (node.parent or node)
                dot = pyfuse3.EntryAttributes()
                dot.st_ino, dot.st_mode = child.ino, child.mode
                if not pyfuse3.readdir_reply(token, b"." if off == 0 else b"..", dot, off + 1):
                    break
        if self.inodes.max_nodes is not None and len(self.inodes) > self.inodes.max_nodes:
            self._shed()

    @_guard
    async def releasedir(self, fh):
        del self.handles.dirs[fh]

    # --- files -----------------------------------------------------------------

    @_guard
    async def open(self, inode, flags, ctx):
        node = self.inodes.get(inode)
        if flags & (os.O_WRONLY | os.O_RDWR) and not flags & os.O_TRUNC:
            await self._prefill(node)
        job = None
        if flags & (os.O_WRONLY | os.O_RDWR) and not flags & os.O_TRUNC and not self.union.readonly:
            job = await self._copy_data_off_loop(node)
        try:
            f = self.union.open(node, flags)
        finally:
            if job is not None:
                self._copy_done(node, job)
        fh = self.handles.add(self.handles.files, f)
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    async def _copy_data_off_loop(self, node: Node) -> DataCopy | None:
        """A big copy-up's data copy runs in a thread, so that other requests keep flowing while it
        does; the copy-up itself (names, xattrs, the rename) stays on the loop.  A second request
        for the same file waits for the first's copy-up to be done."""
        await self._settled(node)
        job = self.union.copy_up.data_copy(node)
        if job is None:
            return None
        log.debug("copy-up of %r: its data in a thread", node)
        self._copying[node.ino] = trio.Event()
        try:
            await trio.to_thread.run_sync(job.run)
        except BaseException:
            self._copy_done(node, job)
            raise
        return job

    def _copy_done(self, node: Node, job: DataCopy) -> None:
        self.union.copy_up.discard(job)
        self._copying.pop(node.ino).set()

    async def _settled(self, node: Node) -> None:
        """Wait while a copy-up of ``node`` runs in a thread (changes to it wait for the copy)."""
        while (busy := self._copying.get(node.ino)) is not None:
            await busy.wait()

    @_guard
    async def read(self, fh, off, size):
        f = self.handles.files[fh]
        job = self.union.slow_read(f, off, size)
        if job is None:
            return self.union.read(f, off, size)
        return await trio.to_thread.run_sync(job)   # a lazy fetch: other requests go on meanwhile

    @_guard
    async def release(self, fh):
        self.union.release(self.handles.files.pop(fh))

    # --- changes ------------------------------------------------------------------
    # A stack without an upper layer is read-only (the mount is ``ro`` too).

    async def _prefill(self, node: Node) -> None:
        """A lazy file about to be copied up: its content fetched on a thread first (the loop goes on)."""
        job = self.union.prefill(node)
        if job is not None:
            await trio.to_thread.run_sync(job)

    def _writable(self):
        if self.union.readonly:
            raise pyfuse3.FUSEError(errno.EROFS)
        return self.union

    def _writable_node(self, inode) -> Node:
        self._writable()
        return self.inodes.get(inode)

    def _new_entry(self, node: Node, attr: Attr | None = None) -> pyfuse3.EntryAttributes:
        """The reply for a node the kernel now holds (its lookup counted); ``attr`` if known already."""
        entry = self._entry(node, self.union.getattr(node) if attr is None else attr)
        self.inodes.lookup(node)
        return entry

    @_guard
    async def setattr(self, inode, attr, fields, fh, ctx):
        u = self._writable()
        node = self.inodes.get(inode)
        await self._settled(node)
        f = self.handles.files.get(fh) if fh is not None else None
        if not (fields.update_size and attr.st_size == 0):
            await self._prefill(node)
        u.setattr(node, f,
                  mode=attr.st_mode if fields.update_mode else None,
                  uid=self.uids.stored(attr.st_uid) if fields.update_uid else None,
                  gid=self.gids.stored(attr.st_gid) if fields.update_gid else None,
                  size=attr.st_size if fields.update_size else None,
                  atime_ns=attr.st_atime_ns if fields.update_atime else None,
                  mtime_ns=attr.st_mtime_ns if fields.update_mtime else None)
        return self._entry(node, self.union.getattr(node))

    @_guard
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        node = self._writable().mknod(self.inodes.get(parent_inode), name, mode, rdev, *self._owner(ctx))
        return self._new_entry(node)

    @_guard
    async def mkdir(self, parent_inode, name, mode, ctx):
        node = self._writable().mkdir(self.inodes.get(parent_inode), name, mode, *self._owner(ctx))
        return self._new_entry(node)

    @_guard
    async def symlink(self, parent_inode, name, target, ctx):
        node = self._writable().symlink(self.inodes.get(parent_inode), name, target, *self._owner(ctx))
        return self._new_entry(node)

    @_guard
    async def link(self, inode, new_parent_inode, new_name, ctx):
        await self._prefill(self._writable_node(inode))
        node = self._writable().link(self.inodes.get(inode), self.inodes.get(new_parent_inode), new_name)
        return self._new_entry(node)

    @_guard
    async def unlink(self, parent_inode, name, ctx):
        self._writable().unlink(self.inodes.get(parent_inode), name)

    @_guard
    async def rmdir(self, parent_inode, name, ctx):
        self._writable().rmdir(self.inodes.get(parent_inode), name)

    @_guard
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        real_flags = flags & ~(pyfuse3.RENAME_EXCHANGE | pyfuse3.RENAME_NOREPLACE)  # the union refuses others
        if flags & pyfuse3.RENAME_EXCHANGE:
            real_flags |= sysmod.RENAME_EXCHANGE
        if flags & pyfuse3.RENAME_NOREPLACE:
            real_flags |= sysmod.RENAME_NOREPLACE
        self._writable().rename(self.inodes.get(parent_inode_old), name_old,
                                self.inodes.get(parent_inode_new), name_new, real_flags)

    @_guard
    async def create(self, parent_inode, name, mode, flags, ctx):
        f = self._writable().create(self.inodes.get(parent_inode), name, mode, flags, *self._owner(ctx))
        fh = self.handles.add(self.handles.files, f)
        return pyfuse3.FileInfo(fh=fh, keep_cache=True), self._new_entry(f.node, self._writable().open_attr(f))

    @_guard
    async def write(self, fh, off, buf):
        return self._writable().write(self.handles.files[fh], off, buf)

    async def flush(self, fh):
        # Nothing to do on close(2): answering ENOSYS once makes the kernel stop sending FLUSH,
        # one request less per close.
        raise pyfuse3.FUSEError(errno.ENOSYS)

    @_guard
    async def fsync(self, fh, datasync):
        if not self._syncs:
            # Nothing would reach the disk: ENOSYS once makes the kernel stop sending FSYNC and
            # answer fsync(2) with success itself, after writing its cached pages and times back
            # to us as always (as fuse-overlayfs does with fsync=0; dpkg in a podman run --rm sent
            # 239 of them).
            raise pyfuse3.FUSEError(errno.ENOSYS)
        self.union.fsync_file(self.handles.files[fh], datasync)

    @_guard
    async def fsyncdir(self, fh, datasync):
        if not self._syncs:
            raise pyfuse3.FUSEError(errno.ENOSYS)   # as fsync: the kernel stops sending FSYNCDIR
        self.union.fsyncdir(self.handles.dirs[fh].node, datasync)

    @_guard
    async def setxattr(self, inode, name, value, ctx):
        self._no_xattrs()
        node = self._writable_node(inode)
        await self._settled(node)
        await self._prefill(node)
        self._writable().setxattr(node, os.fsdecode(name), value)

    @_guard
    async def removexattr(self, inode, name, ctx):
        self._no_xattrs()
        try:
            self._writable().removexattr(self.inodes.get(inode), os.fsdecode(name))
        except OSError as e:
            if e.errno == errno.ENODATA:
                raise pyfuse3.FUSEError(pyfuse3.ENOATTR) from None
            raise
