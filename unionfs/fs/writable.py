"""The writable union: every change lands in the upper dir, lower layers stay untouched.

Owns opening for write, data, attributes, xattrs and the names of hard-linked
upper files; new entries, removal and rename are :mod:`dirops`', copying up is
:mod:`copyup`'s, the work dir and index are :mod:`upper`'s.  It must not speak
FUSE (the adapter translates) nor write a format :mod:`formats` does not define.

Namespace changes follow overlayfs (``dir.c``) with ``index=on,redirect_dir=on``:

* removing a name that exists in a lower layer leaves a whiteout; otherwise the
  upper entry is simply removed;
* a directory created where a lower one was removed is marked opaque;
* renaming a directory that has lower parts copies up only the directory and
  records where it came from (``overlay.redirect``), instead of copying the
  tree (EXDEV in overlayfs without redirect_dir, and in fuse-overlayfs);
* replacing an existing upper entry is done by building the new one in the
  work dir and swapping it in with one ``renameat2``, so each step is atomic.

The upper dir is written in overlayfs's own format (char 0/0 whiteouts,
``trusted.overlay.opaque``/``redirect``), so kernel overlayfs mounted over it
shows the same tree.  The work dir is the kernel's too: ``WORK/work`` for
temporary entries, ``WORK/index`` for copied-up lower hard links, each named by
the hex of its origin's file handle, with ``overlay.origin`` and ``overlay.nlink``
as overlayfs ``index=on`` writes them, so kernel overlayfs accepts our upper and
work dirs and we accept its own.  Beside those we keep one private xattr per
copied-up inode (``trusted.unionfs.origin``: its merged inode number).
"""
from __future__ import annotations

import errno
import logging
import os
import stat

from . import formats, metacopy
from . import sys as ovl
from .copyup import CopyUp
from .dirops import DirOps
from .formats import OverlayFh, UpperMeta
from .inodes import Node
from .layers import LayerStack
from .union import Attr, OpenFile, Union
from .upper import Upper, UpperLock, in_upper, index_name

log = logging.getLogger("unionfs.writable")


class WritableUnion(DirOps, Union):
    """The union with its writable layer: files, attributes and the names a change touches;
    new entries, removal and rename are :class:`DirOps`'."""

    def __init__(self, stack: LayerStack, lock: UpperLock, style: formats.Style | None = None,
                 fsync: bool = True, metacopy: bool = False) -> None:
        super().__init__(stack)
        self.readonly = False
        self.upper = Upper(stack, lock, self.inodes, style, fsync)
        self.metacopy_on = metacopy  # chmod, chown, utimes, xattrs of a lower file copy no data (:mod:`metacopy`)
        self.index_fd = self.upper.index_fd  # Union.locate reads indexed files there
        self._aliases: dict[int, list[tuple[Node, bytes]]] = {}  # names of upper-only hard links
        self._euid, self._egid = os.geteuid(), os.getegid()
        self.page_cache_writes = False  # the adapter's writeback cache: writes come as whole pages
        self._open: dict[int, set[OpenFile]] = {}
        # Under the writeback cache: the mtime the kernel last sent for an open file (by inode), which
        # its later WRITEs keep (see :meth:`write`); dropped when the file's last handle closes.
        self._kernel_mtime: dict[int, int] = {}
        self.copy_up = CopyUp(self, self.upper, self.reopen_readers)
        self.upper.clean_work()

    def close(self) -> None:
        self.upper.close()
        super().close()

    def fds(self) -> set[int]:
        return super().fds() | self.upper.fds()

    in_upper = staticmethod(in_upper)

    def _identify(self, top, top_at, origin, meta):
        layer, pfd, name = top_at
        if not stat.S_ISDIR(top.st_mode) and top.st_nlink > 1:
            if self.stack.is_upper(layer):
                # A name of an indexed inode is a link of the index entry named after its origin.
                fh = OverlayFh.decode(ovl.getxattr_or_none(pfd, name, self.upper.origin_xattr))
                iname = fh.index_name() if fh is not None else None
                if iname is None and meta is not None and meta.lower_links is not None and meta.ino is not None:
                    iname = index_name(meta.ino)  # the form before the kernel's
                ist = self.upper.index_stat(iname) if iname is not None else None
                if ist is not None and ist.st_ino == top.st_ino:
                    if meta is not None and meta.ino is not None:
                        ino = meta.ino
                    else:  # indexed by kernel overlayfs: numbered after its origin, as there
                        o = self.upper.decode_origin(iname)
                        ino = self.inodes.ino_for(*((o.st_dev, o.st_ino) if o else (top.st_dev, top.st_ino)))
                    self.upper.remember_index(ino, iname)
                    return ino, True
            else:
                iname = self.upper.lower_index_name(layer, pfd, name, top)
                if iname is not None and self.upper.index_stat(iname) is not None:
                    ino = self.inodes.ino_for(top.st_dev, top.st_ino)
                    self.upper.remember_index(ino, iname)
                    return ino, True
        if meta is None and self.stack.is_upper(layer) and self.upper.unmarked:
            ino = self.upper.unmarked.get((top.st_dev, top.st_ino))
            if ino is not None:
                return ino, False
        return super()._identify(top, top_at, origin, meta)

    def _upper_meta(self, pfd: int, name: bytes) -> UpperMeta | None:
        return self.upper.meta(pfd, name)

    def index_entry(self, node: Node) -> bytes:
        return self.upper.index_entry(node)

    def _xattr_source(self, node: Node) -> tuple[int, bytes | None]:
        # A file open for writing is the upper one: its fd answers without a path walk.
        for f in self._open.get(node.ino, ()):
            if f.writable:
                return f.fd, None
        return super()._xattr_source(node)

    def reopen_readers(self, node: Node) -> None:
        """Open handles of a file that was just copied up now read the upper copy."""
        for f in self._open.get(node.ino, ()):
            if not f.writable:
                fd = self._open_real(node, os.O_RDONLY)
                os.close(f.fd)
                f.fd = fd

    def attr_from_stat(self, node, st):
        a = super().attr_from_stat(node, st)
        if node.indexed and not node.unlinked:
            merged = self.upper.merged_nlink(self.index_entry(node), st)
            if merged is not None:
                a.nlink = merged
        return a

    def real_stat(self, node: Node) -> os.stat_result:
        if node.unlinked:
            for f in self._open.get(node.ino, ()):
                return ovl.fstat(f.fd)
            raise OSError(errno.ENOENT, "deleted")
        return super().real_stat(node)

    def _name_removed(self, node: Node) -> bool:
        """After an upper name of an indexed inode went: was it the last? Then its index entry goes."""
        iname = self.index_entry(node)
        st = self.upper.index_stat(iname)
        merged = self.upper.merged_nlink(iname, st) if st is not None else None
        if merged is None or merged > 0:
            return False
        ovl.unlink_at(self.index_fd, iname)
        node.indexed = False
        return True

    def lookup_attr(self, parent: Node, name: bytes, mask: int | None = None, attr: bool = True):
        node, a = super().lookup_attr(parent, name, mask, attr)
        if not node.is_dir and not node.indexed and (node.ino in self._aliases or (
                a is not None and a.nlink > 1 and self.in_upper(node))):
            aliases = self._aliases.setdefault(node.ino, [])
            if (parent, name) not in aliases:
                aliases.append((parent, name))  # another name of a hard-linked upper file
        return node, a

    def _relocate(self, node: Node, parent: Node, name: bytes, real: os.stat_result | None) -> None:
        """The name a hard-linked upper file was reached by went, and other names remain: reach it by
        another name of it this mount has seen (kernel overlayfs keeps no extra link for these, and
        neither do we, so that both count the same)."""
        if node.indexed or node.parent is not parent or node.name != name or real is None or real.st_nlink < 2:
            return
        for p, n in self._aliases.get(node.ino, []):
            if p is parent and n == name:
                continue
            try:
                st = ovl.lstat_at(self.stack.dir_fd(0, p), n)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == (real.st_dev, real.st_ino):
                self.inodes.move(node, p, n)
                return
        if node.ino in self._open:
            node.unlinked = True  # reached through its open files until a lookup finds another name

    def _link_up(self, node: Node) -> None:
        """Before a name of a lower hard link goes, bring that name up (through the index), so that
        removing it is one atomic change of the real link count."""
        if not node.is_dir and not self.in_upper(node) and (node.indexed or self.real_stat(node).st_nlink > 1):
            self.copy_up(node)

    def lower_exists(self, parent: Node, name: bytes) -> bool:
        """Does ``name`` show from the lower layers below ``parent``? Then removing it needs a whiteout."""
        for index in parent.layers:
            if self.stack.is_upper(index):
                continue
            pfd, st, whited_out = self._probe(index, parent, name)
            if st is not None:
                return not self._is_whiteout(index, parent, pfd, name, st)
            if whited_out:
                return False
        return False

    def _upper_entry(self, parent: Node, name: bytes) -> os.stat_result | None:
        try:
            return ovl.lstat_at(self.stack.dir_fd(0, parent), name)
        except FileNotFoundError:
            return None

    def _owner(self, parent: Node, uid: int, gid: int) -> tuple[int, int, bool]:
        """Owner of a new entry, with BSD group semantics under a setgid directory."""
        pst = self.getattr(parent)   # as shown: an override's setgid bit and group count
        if pst.mode & stat.S_ISGID:
            return uid, pst.gid, True
        return uid, gid, False

    # --- files -------------------------------------------------------------------

    def open(self, node: Node, flags: int) -> OpenFile:
        if node.is_dir:
            raise OSError(errno.EISDIR, "is a directory")
        write = bool(flags & (os.O_WRONLY | os.O_RDWR))
        if write or flags & os.O_TRUNC:
            was_upper = self.in_upper(node)
            self.copy_up(node, truncate=bool(flags & os.O_TRUNC))
            if self.is_metacopy(node):
                metacopy.copy_data_up(self, node, keep_data=not flags & os.O_TRUNC)
            # With the writeback cache the kernel reads the pages a partial write fills through
            # this fd: those reads must not touch the atime (overlayfs's write reads nothing).
            fd = self._open_real(node, os.O_RDWR if write else os.O_RDONLY, noatime=write and self.page_cache_writes)
            if flags & os.O_TRUNC and (was_upper or node.indexed):
                # A copy-up that linked an indexed inode copied its data.  O_RDONLY|O_TRUNC
                # truncates too, as on Linux: through a descriptor of its own.
                self._truncate_real(node, fd if write else None)
            f = OpenFile(node, fd, writable=write)
            if write and self.page_cache_writes and node.ino not in self._kernel_mtime:
                self._kernel_mtime[node.ino] = ovl.fstat(fd).st_mtime_ns   # what the kernel has (see write)
        else:
            f = OpenFile(node, self._open_real(node, os.O_RDONLY), writable=False)
        self._open.setdefault(node.ino, set()).add(f)
        return f

    def _truncate_real(self, node: Node, fd: int | None, size: int = 0) -> None:
        """Truncate the upper copy of ``node``: through ``fd``, or a write descriptor opened for it."""
        if fd is not None:
            ovl.ftruncate(fd, size)
            return
        wfd = self._open_real(node, os.O_WRONLY | os.O_NONBLOCK)
        try:
            ovl.ftruncate(wfd, size)
        finally:
            os.close(wfd)

    def write(self, f: OpenFile, off: int, data: bytes) -> int:
        if not f.writable:
            raise OSError(errno.EBADF, "not open for writing")
        written = ovl.pwrite(f.fd, data, off)
        # Under the writeback cache the kernel owns the mtime and sends it in a SETATTR, but it
        # writes its pages back asynchronously, so a WRITE may be handled after that SETATTR: the
        # write puts back the mtime the kernel has (the file's at open or create, then the last one
        # it sent), or the disk would hold a later one than the mount showed.  One futimens, no
        # fstat.  (A WRITE that left the write's own time instead made the kernel send a SETATTR of
        # its times at nearly every close of a new file here: ext4's fine-grained timestamps on
        # Linux 6.13+; one request more than a syscall.)
        mtime = self._kernel_mtime.get(f.node.ino) if self.page_cache_writes else None
        if mtime is not None:
            ovl.set_mtime(f.fd, mtime)
        return written

    @staticmethod
    def _times(st: os.stat_result, atime_ns: int | None, mtime_ns: int | None) -> tuple[int, int]:
        """The times a SETATTR gives a file that has ``st``: None keeps that one as it is."""
        return (st.st_atime_ns if atime_ns is None else atime_ns, st.st_mtime_ns if mtime_ns is None else mtime_ns)

    def _kept_mtime(self, node: Node, mtime_ns: int) -> None:
        """The kernel (under the writeback cache) set this mtime on an open file: later writes keep it."""
        if self.page_cache_writes and node.ino in self._open:
            self._kernel_mtime[node.ino] = mtime_ns

    def fsync_file(self, f: OpenFile, datasync: bool) -> None:
        if self.upper.fsync:   # off for a volatile mount (podman's run --rm and build)
            ovl.fsync(f.fd, datasync)

    def release(self, f: OpenFile) -> None:
        files = self._open.get(f.node.ino)
        if files is not None:
            files.discard(f)
            if not files:
                del self._open[f.node.ino]
                self._kernel_mtime.pop(f.node.ino, None)
        os.close(f.fd)

    def open_attr(self, f: OpenFile) -> Attr:
        """The attributes of an open file's object, from its descriptor (no path walk); for a file
        just created, the mtime its WRITEs keep (see :meth:`write`)."""
        st = ovl.fstat(f.fd)
        if f.writable and self.page_cache_writes:
            self._kernel_mtime.setdefault(f.node.ino, st.st_mtime_ns)
        return self.attr_from_stat(f.node, st)

    def create(self, parent: Node, name: bytes, mode: int, flags: int, uid: int, gid: int) -> OpenFile:
        node, fd = self._make(parent, name, stat.S_IFREG | stat.S_IMODE(mode), uid, gid, keep_open=flags)
        assert fd is not None
        f = OpenFile(node, fd, writable=True)
        self._open.setdefault(node.ino, set()).add(f)
        return f

    # --- attributes --------------------------------------------------------------------

    def setattr(self, node: Node, f: OpenFile | None, mode: int | None = None, uid: int | None = None,
                gid: int | None = None, size: int | None = None, atime_ns: int | None = None,
                mtime_ns: int | None = None) -> None:
        if size is not None:
            if node.is_dir:
                raise OSError(errno.EISDIR, "is a directory")
            if f is not None and f.writable:
                ovl.ftruncate(f.fd, size)
            else:
                self.copy_up(node, truncate=size == 0)
                if self.is_metacopy(node):
                    metacopy.copy_data_up(self, node, keep_data=size != 0)
                self._truncate_real(node, None, size)
        if mode is None and uid is None and gid is None:
            if atime_ns is not None or mtime_ns is not None:
                self._set_times(node, f, atime_ns, mtime_ns)
            return
        self.copy_up(node, meta=self.metacopy_on)
        fd, name = self.locate(node)
        self.forget_xattrs(node)   # a recorded owner is an xattr, and the upper fs drops capabilities on chown
        if self.override is not None and (uid is not None or gid is not None or mode is not None):
            self._record_override(node, fd, name, uid, gid, mode)
            uid = gid = mode = None
        if uid is not None or gid is not None:
            ovl.chown_at(fd, name, -1 if uid is None else uid, -1 if gid is None else gid) if name is not None \
                else ovl.fchown(fd, -1 if uid is None else uid, -1 if gid is None else gid)
        if mode is not None:
            if stat.S_ISLNK(node.mode):
                raise OSError(errno.EOPNOTSUPP, "symlinks have no mode")
            ovl.chmod_at(fd, name, stat.S_IMODE(mode)) if name is not None else ovl.fchmod(fd, stat.S_IMODE(mode))
        if atime_ns is not None or mtime_ns is not None:
            st = ovl.fstat(fd) if name is None else ovl.lstat_at(fd, name)
            times = self._times(st, atime_ns, mtime_ns)
            ovl.utime_at(fd, name, times) if name is not None else ovl.futimens(fd, times)
            self._kept_mtime(node, times[1])

    def _set_times(self, node: Node, f: OpenFile | None, atime_ns: int | None, mtime_ns: int | None) -> None:
        """utimensat, and the writeback cache's own times: after its writes (through the open file,
        which may have lost its name), and after each unlink, rename and link of a regular file the
        kernel sends the mtime it keeps, unchanged, with a new ctime.  Those change nothing here:
        no copy-up for them, and nothing set on a whiteout or a new file now at a removed name."""
        if f is None or not f.writable:   # a read-only one may be a lower file's
            f = next((o for o in self._open.get(node.ino, ()) if o.writable), None) if node.unlinked else None
            if f is None and node.unlinked:
                return   # removed, and no file of it open for writing: nothing to set
        if f is not None:
            st = ovl.fstat(f.fd)
        else:
            try:
                st = self.real_stat(node)
            except FileNotFoundError:
                return   # removed meanwhile: the kernel's last times of it
            if stat.S_IFMT(st.st_mode) != stat.S_IFMT(node.mode):
                return   # removed, a whiteout in its place
        times = self._times(st, atime_ns, mtime_ns)
        self._kept_mtime(node, times[1])
        if atime_ns is None and mtime_ns == st.st_mtime_ns:
            return   # the time it has: ctime alone would change, and the kernel keeps that itself
        if f is not None:
            ovl.futimens(f.fd, times)
            return
        self.copy_up(node, meta=self.metacopy_on)
        fd, name = self.locate(node)
        ovl.utime_at(fd, name, times) if name is not None else ovl.futimens(fd, times)

    def _record_override(self, node: Node, fd: int, name: bytes | None, uid: int | None, gid: int | None,
                         mode: int | None) -> None:
        """chown/chmod under ``xattr_permissions``: the new owner and mode go in the upper file's
        override (the caller is root of the mount: any owner may be given).  A symlink (or a real
        fifo or device) can carry none: only what it already shows is accepted."""
        shown = self.getattr(node)
        new = formats.Override(shown.uid if uid is None else uid, shown.gid if gid is None else gid,
                               stat.S_IMODE(shown.mode if mode is None else mode), stat.S_IFMT(shown.mode),
                               shown.rdev if stat.S_ISCHR(shown.mode) or stat.S_ISBLK(shown.mode) else 0)
        real = ovl.fstat(fd) if name is None else ovl.lstat_at(fd, name)
        if not (stat.S_ISREG(real.st_mode) or stat.S_ISDIR(real.st_mode)):
            if (new.uid, new.gid) != (shown.uid, shown.gid) or (mode is not None and not stat.S_ISLNK(node.mode)):
                raise OSError(errno.EPERM, "no owner or mode can be recorded on this kind of file")
            return
        if name is None:
            ovl.fsetxattr(fd, self.override, new.encode())
        else:
            ovl.setxattr_at(fd, name, self.override, new.encode())
        if self._euid != 0 and mode is not None:   # the file's own mode follows, read-write for the user
            perm = formats.stored_perm(stat.S_IFMT(real.st_mode), new.perm)
            ovl.chmod_at(fd, name, perm) if name is not None else ovl.fchmod(fd, perm)

    def setxattr(self, node: Node, name: str, value: bytes) -> None:
        stored = self._stored_xattr(name, errno.EPERM)
        self.copy_up(node, meta=self.metacopy_on)
        fd, real = self.locate(node)
        ovl.setxattr_at(fd, real, stored, value)
        self.forget_xattrs(node)

    def removexattr(self, node: Node, name: str) -> None:
        stored = self._stored_xattr(name)
        if not self.in_upper(node):
            self.getxattr(node, name)  # ENODATA without a needless copy-up
        self.copy_up(node, meta=self.metacopy_on)
        fd, real = self.locate(node)
        ovl.removexattr_at(fd, real, stored)
        self.forget_xattrs(node)

    def fsyncdir(self, node: Node, datasync: bool) -> None:
        if self.upper.fsync and self.in_upper(node):
            ovl.fsync(self.stack.dir_fd(0, node), datasync)

    def statfs(self) -> os.statvfs_result:
        return ovl.statvfs(self.stack.layers[0].fd)
