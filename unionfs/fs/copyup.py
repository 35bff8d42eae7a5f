"""Copy-up: the first change to a lower object brings it into the upper layer.

Order, as in overlayfs's ``copy_up.c``: parent directories first; then the
object is built in the work dir with its data, owner, mode, xattrs and times
(data, then owner, then xattrs, because writing data and chown drop
``security.capability``; chown before chmod, because chown clears setuid), and only then given its name.
A regular file is an O_TMPFILE file, filled and marked through its fd and linked
straight to its name, as ``ovl_copy_up_tmpfile`` does (a named temp and a rename
where the upper filesystem has no O_TMPFILE); directories, symlinks and devices
are built under a temporary name and renamed into place.  A crash at any moment
leaves either no upper copy (the lower one still shows) or a complete one;
temporary names left in the work dir are removed at the next mount, and an
O_TMPFILE file never had one.  The data reaches the disk before the name
(:meth:`Upper.sync_data`) unless the mount is ``volatile``.

A lower file with several hard links is copied up once, into the work dir's
index, exactly as overlayfs ``index=on`` does it: built in ``work/``, with
``overlay.origin`` (the lower inode's file handle) and ``overlay.nlink``, linked
(or renamed) to ``index/<hex of that handle>``, then linked to its name ("link-up").  Every
name of it copied up later is another link of that one upper inode, so writes
through one name show through all of them, in our mount and in the kernel's.

It works on the read-side :class:`~unionfs.fs.union.Union` (where the object is)
and :class:`~unionfs.fs.upper.Upper` (the work dir and index); it must not decide
when to copy up (the writable union does) nor know FUSE.
"""
from __future__ import annotations

import errno
import logging
import os
import stat
from dataclasses import dataclass
from typing import Callable

from . import formats, metacopy
from . import sys as ovl
from .formats import OverlayFh
from .inodes import Node
from .union import Union
from .upper import Upper, in_upper

log = logging.getLogger("unionfs.copyup")


@dataclass
class CopyUpCtx:
    """One copy-up in progress: what is copied, from where, to where."""

    node: Node
    lower_fd: int          # the directory holding the object in its lower layer
    lower_name: bytes
    st: os.stat_result
    upper_parent_fd: int
    temp: bytes            # a name in the work dir to build it under (dirs, special files)
    truncate: bool         # opened with O_TRUNC: the data would be thrown away, copy none
    index: bytes | None    # a lower hard link: the name of its index entry
    origin: OverlayFh | None = None  # what overlay.origin will say (dirs and single-link files)
    data: tuple[int, bytes] | None = None  # where the data is read from (a lower metacopy file's is below)
    meta: bool = False     # metadata only: the data stays below (metacopy=on, :mod:`metacopy`)
    job: DataCopy | None = None   # a DataCopy whose file holds the data already


# A file this big has its data copied by DataCopy.run, which the adapter runs in a thread: below it
# the hop to a thread (~0.15 ms) costs more than the copy holds up other requests.
COPY_OFF_LOOP = 1 << 20


@dataclass(eq=False)
class DataCopy:
    """A regular lower file's data, copied into a new file of the work dir ahead of its copy-up.

    :meth:`run` blocks and touches only its own descriptors (any thread may run it); the copy-up
    then takes the filled file (``dst``, still open) instead of copying, if the lower file is still
    the one copied.  :meth:`CopyUp.discard` closes ``dst`` in any case."""

    ino: int
    lower: tuple[int, int, int, int]   # st_dev, st_ino, st_size, st_mtime_ns of the lower file
    temp: bytes | None   # the file's name in the work dir; None: an O_TMPFILE file, no name yet
    src: int
    dst: int
    fsync: bool
    sparse: bool         # may have holes (worth SEEK_DATA probing)
    done: bool = False   # the data is in ``dst`` (run returned)
    used: bool = False   # a copy-up gave ``dst`` its name

    def run(self) -> None:
        try:
            ovl.copy_data(self.src, self.dst, self.lower[2], self.sparse, writeback=self.fsync)
            if self.fsync:
                ovl.fsync(self.dst, datasync=True)   # see Upper.sync_data
            self.done = True
        finally:
            os.close(self.src)


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def may_have_holes(st: os.stat_result) -> bool:
    """Fewer blocks than bytes: worth probing for holes (SEEK_DATA).  A file whose blocks cover its
    size is copied in one copy_file_range with no probing (ext4's inline data, 0 blocks, probes).
    Blocks preallocated past the end can hide a hole: that one is copied as zeros, the same bytes."""
    return st.st_blocks * 512 < st.st_size


def copy_xattrs(src_fd: int, src_name: bytes | None, dst_fd: int, dst_name: bytes | None) -> None:
    """Copy every xattr but overlay-private ones (a recorded owner and mode, ``override_stat``, goes
    along: the copy stands for the same file); only security.* failures are fatal (as overlayfs)."""
    for name in ovl.listxattr_at(src_fd, src_name):
        if formats.is_private_xattr(name) and name not in formats.OVERRIDE_NAMES:
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


def _set_owner(fd: int, name: bytes | None, st: os.stat_result) -> None:
    """chown, on fd (name None) or a name in fd: before the xattrs, because a chown drops
    ``security.capability`` (even to the same owner), and before chmod, because it clears setuid
    (the kernel's copy-up sets the owner with notify_change, which drops neither)."""
    if name is None:
        ovl.fchown(fd, st.st_uid, st.st_gid)
    else:
        ovl.chown_at(fd, name, st.st_uid, st.st_gid)


def _set_mode_times(fd: int, name: bytes | None, st: os.stat_result) -> None:
    """chmod, then times; on fd (name None) or a name in fd."""
    if name is None:
        ovl.fchmod(fd, stat.S_IMODE(st.st_mode))
        ovl.futimens(fd, (st.st_atime_ns, st.st_mtime_ns))
        return
    if not stat.S_ISLNK(st.st_mode):
        ovl.chmod_at(fd, name, stat.S_IMODE(st.st_mode))
    ovl.utime_at(fd, name, (st.st_atime_ns, st.st_mtime_ns))


class CopyUp:
    """Copies nodes of ``union`` up into its writable layer ``upper``; ``reopen`` is told of each
    copied file, so that open readers move to the copy."""

    def __init__(self, union: Union, upper: Upper, reopen: Callable[[Node], None]) -> None:
        self.u = union
        self.up = upper
        self.reopen = reopen
        self.data_copies: dict[int, DataCopy] = {}   # by inode number, until discarded

    def data_copy(self, node: Node) -> DataCopy | None:
        """Start a copy-up's data copy to run apart (see DataCopy), if ``node`` needs a copy-up of
        at least COPY_OFF_LOOP bytes; None if not, or if one is under way."""
        if (in_upper(node) or node.is_dir or node.ino in self.data_copies or self.u.fill is not None
                or len(node.layers) > 1):   # a lower metacopy file's data is further down: on the loop
            return None   # a lazy layer's fill is the union's to run, not a thread's
        lower_fd, lower_name = self.u.locate_in(node, node.top)
        st = ovl.lstat_at(lower_fd, lower_name)
        if not stat.S_ISREG(st.st_mode) or st.st_size < COPY_OFF_LOOP:
            return None
        src = ovl.open_at(lower_fd, lower_name, os.O_RDONLY, noatime=True)
        try:
            dst, temp = self.up.new_file()
        except BaseException:
            os.close(src)
            raise
        job = self.data_copies[node.ino] = DataCopy(node.ino, _identity(st), temp, src, dst, self.up.fsync,
                                                    may_have_holes(st))
        return job

    def discard(self, job: DataCopy) -> None:
        """The data copy is over: its file goes unless a copy-up took it."""
        if self.data_copies.get(job.ino) is job:
            del self.data_copies[job.ino]
        os.close(job.dst)
        if not job.used and job.temp is not None:
            try:
                ovl.unlink_at(self.up.work_fd, job.temp)
            except FileNotFoundError:
                pass

    def copy_data(self, src_dirfd: int, src_name: bytes, dst: int, size: int, sparse: bool = True) -> None:
        """The data of a lower file into ``dst`` (a copy-up, or a metacopy file's first write);
        ``sparse`` False: its blocks cover its size, no holes to look for.  With an fsync to
        follow, the disk writes each chunk while the next is copied."""
        src = ovl.open_at(src_dirfd, src_name, os.O_RDONLY, noatime=True)
        try:
            if self.u.fill is not None:   # a lazy layer's content first (union.Fill)
                self.u.fill(src, 0, size)
                sparse = True   # the fill wrote what it fetched: blocks say nothing of the image's holes
            ovl.copy_data(src, dst, size, sparse, writeback=self.up.fsync)
        finally:
            os.close(src)

    def dir_chain(self, node: Node) -> None:
        """Make sure directory ``node`` and all its ancestors exist in the upper layer."""
        chain: list[Node] = []
        n: Node | None = node
        while n is not None and n.parent is not None and not in_upper(n):
            chain.append(n)
            n = n.parent
        for d in reversed(chain):
            self.one(d)

    def __call__(self, node: Node, truncate: bool = False, meta: bool = False) -> None:
        """Copy ``node`` up (with its parents) unless it is already in the upper layer; ``meta``:
        a regular file's metadata only, where :func:`metacopy.wanted` allows it."""
        if in_upper(node):
            return
        if node.parent is not None:
            self.dir_chain(node.parent)
        self.one(node, truncate, meta)

    def one(self, node: Node, truncate: bool = False, meta: bool = False) -> None:
        u, up = self.u, self.up
        lower = node.attr_layer if node.attr_layer is not None else node.top  # a dir's real attributes
        lower_fd, lower_name = u.locate_in(node, lower)
        st = ovl.lstat_at(lower_fd, lower_name)
        parent = node.parent
        assert parent is not None
        upper_parent_fd = u.stack.dir_fd(0, parent)
        pstat = ovl.fstat(upper_parent_fd)
        index = up.lower_index_name(lower, lower_fd, lower_name, st) if up.indexable(st) else None
        ctx = CopyUpCtx(node, lower_fd, lower_name, st, upper_parent_fd, b"", truncate, index)
        if stat.S_ISREG(st.st_mode):
            ctx.data = u.locate_data(node)  # type: ignore[assignment]
            ctx.meta = meta and metacopy.wanted(st, index, truncate)
        job = self.data_copies.get(node.ino)
        if (job is not None and job.done and not job.used and not truncate and not ctx.meta
                and job.lower == _identity(st)):
            ctx.job = job
            job.used = True   # from here on the copy-up's: given its name, or removed on failure
        log.debug("copy up %r", node)
        if index is not None and up.index_stat(index) is not None:
            self._link_up(ctx)
        else:
            if index is None and (stat.S_ISDIR(st.st_mode) or st.st_nlink == 1) and up.may_mark(st):
                # As overlayfs: the copy remembers its origin (a hard link that is not indexed would
                # not), its parent is marked as holding such entries, and the kernel numbers it as we do.
                ctx.origin = up.origin_fh(lower, lower_fd, lower_name)
                if ctx.origin is not None:
                    up.mark_impure(upper_parent_fd)
            if stat.S_ISDIR(st.st_mode):
                self._dir(ctx)
            else:
                self._nondir(ctx)
        # The link or rename into the parent changed its times; a copy-up must not show.
        ovl.futimens(upper_parent_fd, (pstat.st_atime_ns, pstat.st_mtime_ns))
        u.changed.add(node.ino)  # a merged dir's link count, a file's ctime: tell the kernel
        u.dirty_dirs.add(parent.ino)  # its entry there is no longer immutable
        if stat.S_ISDIR(st.st_mode):
            node.layers = (0,) + tuple(node.layers)
            node.attr_layer = None
            if node.paths is not None:
                node.paths = (None,) + node.paths
        else:
            # The data stays below: ours (meta), or an index entry kernel overlayfs made metadata only.
            below = ctx.meta or (index is not None and formats.is_metacopy_at(up.index_fd, index))
            data = metacopy.data_where(node)
            node.layers = (0,)
            node.paths = None
            if below:
                metacopy.copied_up(node, data)
            node.indexed = index is not None
            if index is not None:
                up.remember_index(node.ino, index)
            self.reopen(node)

    def _link_up(self, c: CopyUpCtx) -> None:
        """Another name of this inode was copied up already: this one becomes a link to it.

        As ``ovl_link_up``: the merged count is first stored relative to the lower inode's (which
        never changes), then the name is linked, then the count is made relative to the upper
        inode's again; a crash anywhere leaves the right count, whether the link was made or not.
        """
        up = self.up
        iname = c.index
        assert iname is not None
        st = ovl.lstat_at(up.index_fd, iname)
        merged = up.merged_nlink(iname, st)
        if merged is None:
            merged = c.st.st_nlink
        up.mark_impure(c.upper_parent_fd)
        if up.origin_nlink(iname) is None:
            up.write_meta(up.index_fd, iname, c.node.ino, c.st.st_nlink)
        up.set_nlink(iname, merged, base="L")
        ovl.link_at(up.index_fd, iname, c.upper_parent_fd, c.node.name)
        up.set_nlink(iname, merged, st.st_nlink + 1)

    def _dir(self, c: CopyUpCtx) -> None:
        up = self.up
        c.temp = up.temp_name()
        ovl.mkdir_at(up.work_fd, c.temp, 0o700)
        try:
            fd = ovl.open_dir_at(up.work_fd, c.temp)
            try:
                _set_owner(fd, None, c.st)
                src = ovl.open_dir_at(c.lower_fd, c.lower_name)
                try:
                    copy_xattrs(src, None, fd, None)
                finally:
                    os.close(src)
                if c.node.redirect is not None:
                    up.set_redirect(fd, c.node.redirect)
                if c.origin is not None:
                    ovl.setxattr_at(fd, None, up.origin_xattr, c.origin.encode())
                _set_mode_times(fd, None, c.st)
            finally:
                os.close(fd)
            ovl.rename_at(up.work_fd, c.temp, c.upper_parent_fd, c.node.name, ovl.RENAME_NOREPLACE)
        except BaseException:
            ovl.remove_tree_at(up.work_fd, c.temp)
            raise

    def _nondir(self, c: CopyUpCtx) -> None:
        if stat.S_ISREG(c.st.st_mode):
            self._file(c)
        else:
            self._special(c)
        if c.index is not None:
            # In the index it shows through every lower name already (same data, same count); now
            # this name moves up.
            self._link_up(c)

    def _file(self, c: CopyUpCtx) -> None:
        """A regular file, built on an fd as ``ovl_copy_up_tmpfile``: an O_TMPFILE file in the work
        dir (a named temp where the filesystem has none), data, xattrs, owner, mode, times, our
        marks, all through the fd, then linked straight to its name (or its index entry): no rename,
        and a crash before the link leaves nothing to clean."""
        up, st = self.up, c.st
        if c.job is not None:
            fd, temp = c.job.dst, c.job.temp   # a DataCopy's file, data and fsync done; discard closes it
        else:
            fd, temp = up.new_file()
        try:
            if c.job is None:
                if c.meta:  # sparse, the lower size, as the kernel's; no data to wait for
                    ovl.ftruncate(fd, st.st_size)
                elif not c.truncate and st.st_size:
                    src = c.data or (c.lower_fd, c.lower_name)
                    # A lower metacopy file's data is elsewhere: its blocks say nothing of that one's.
                    sparse = src != (c.lower_fd, c.lower_name) or may_have_holes(st)
                    self.copy_data(*src, fd, st.st_size, sparse)
                if not c.meta and st.st_size and not c.truncate:   # nothing to wait for, as the kernel's
                    up.sync_data(fd)
            _set_owner(fd, None, st)
            copy_xattrs(c.lower_fd, c.lower_name, fd, None)
            _set_mode_times(fd, None, st)
            if c.meta:
                metacopy.mark(up, fd, None)
            self._marks(c, fd, None)
            up.place(fd, temp, *self._destination(c))
        except BaseException:
            if temp is not None:   # a named temp (a used DataCopy's too: discard leaves it to us)
                try:
                    ovl.unlink_at(up.work_fd, temp)
                except OSError:
                    pass
            raise
        finally:
            if c.job is None:
                os.close(fd)

    def _special(self, c: CopyUpCtx) -> None:
        """A symlink, fifo, socket or device: built under a temporary name in the work dir (no
        O_TMPFILE for these), renamed into place."""
        up, st = self.up, c.st
        mode = st.st_mode
        c.temp = up.temp_name()
        try:
            if stat.S_ISLNK(mode):
                ovl.symlink_at(ovl.readlink_at(c.lower_fd, c.lower_name), up.work_fd, c.temp)
            else:  # fifo, socket, device: the same kind of node, never a regular file
                ovl.mknod_at(up.work_fd, c.temp, stat.S_IFMT(mode) | 0o600, st.st_rdev)
            _set_owner(up.work_fd, c.temp, st)
            copy_xattrs(c.lower_fd, c.lower_name, up.work_fd, c.temp)
            _set_mode_times(up.work_fd, c.temp, st)
            self._marks(c, up.work_fd, c.temp)
            ovl.rename_at(up.work_fd, c.temp, *self._destination(c), ovl.RENAME_NOREPLACE)
            if c.index is None and not up.may_mark(st):
                up.remember_unmarked(c.upper_parent_fd, c.node.name, c.node.ino)
        except BaseException:
            try:
                ovl.unlink_at(up.work_fd, c.temp)
            except OSError:
                pass
            raise

    def _marks(self, c: CopyUpCtx, fd: int, name: bytes | None) -> None:
        """The xattrs a copy-up leaves on its new object (``name`` in ``fd``, or ``fd`` itself):
        ``overlay.origin``, the index entry's ``overlay.nlink``, and our meta xattr (the merged
        inode number) where the object can carry one (rootless, a symlink or device cannot)."""
        up, st = self.up, c.st
        if c.index is not None:
            fh = OverlayFh.from_index_name(c.index)
            if fh is not None:
                ovl.setxattr_at(fd, name, up.origin_xattr, fh.encode())
            # The index entry alone stands for all N lower names: "U+(N-1)", as overlayfs.
            ovl.setxattr_at(fd, name, up.nlink_xattr, formats.encode_nlink(st.st_nlink - 1))
            up.write_meta(fd, name, c.node.ino, st.st_nlink)
            return
        if c.origin is not None:
            ovl.setxattr_at(fd, name, up.origin_xattr, c.origin.encode())
        if up.may_mark(st):
            up.write_meta(fd, name, c.node.ino)

    def _destination(self, c: CopyUpCtx) -> tuple[int, bytes]:
        """Where the new object goes: its index entry (a lower hard link), else its name."""
        if c.index is not None:
            return self.up.index_fd, c.index
        return c.upper_parent_fd, c.node.name
