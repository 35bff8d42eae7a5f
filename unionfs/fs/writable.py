"""The writable layer: every change lands in the upper dir, lower layers stay untouched.

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
import fcntl
import logging
import os
import stat
from dataclasses import dataclass

from ..errors import UsageError
from . import formats
from . import sys as ovl
from .copyup import CopyUp
from .inodes import Node
from .layers import LayerError, LayerStack, open_directory
from .formats import OverlayFh, UpperMeta
from .union import OpenFile, Union, index_name

log = logging.getLogger("unionfs.writable")

WORK_MARKER = b".unionfs-work"
WORK_TEMP = b"work"
WORK_INDEX = b"index"


@dataclass
class UpperLock:
    """fds holding flock(2) locks on the upper and work dirs for the life of the mount."""

    work_fd: int
    upper_fd: int

    def close(self) -> None:
        os.close(self.work_fd)


def prepare_upper(stack: LayerStack, work: str) -> UpperLock:
    """Check and lock the work dir, clean what a previous mount left in it."""
    upper = stack.upper
    assert upper is not None
    try:
        wfd = open_directory(work, "work dir")
    except LayerError as e:
        raise UsageError(str(e)) from None
    try:
        wst = os.fstat(wfd)
        if wst.st_dev != upper.dev:
            raise UsageError(f"work dir {work} must be on the same filesystem as the upper dir {upper.path}")
        if (wst.st_dev, wst.st_ino) == (os.fstat(upper.fd).st_dev, os.fstat(upper.fd).st_ino):
            raise UsageError("the work dir and the upper dir must be different directories")
        for fd, what, path in ((upper.fd, "upper dir", upper.path), (wfd, "work dir", work)):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise UsageError(f"{what} {path} is in use by another mount") from None
        with os.scandir(wfd) as it:
            names = {os.fsencode(e.name) for e in it}
        if names and WORK_MARKER not in names and not names <= {WORK_TEMP, WORK_INDEX}:
            # What kernel overlayfs or fuse-overlayfs left (work/, index/) is a work dir as ours is.
            raise UsageError(f"work dir {work} is not empty and not a unionfs work dir (nor an overlayfs one)")
        if WORK_MARKER not in names:
            os.close(ovl.open_at(wfd, WORK_MARKER, os.O_WRONLY | os.O_CREAT, 0o600))
        for sub in (WORK_TEMP, WORK_INDEX):
            if not ovl.exists_at(wfd, sub):
                ovl.mkdir_at(wfd, sub, 0o700)
    except BaseException:
        os.close(wfd)
        raise
    return UpperLock(wfd, upper.fd)


class WritableUnion(Union):
    def __init__(self, stack: LayerStack, lock: UpperLock, style: formats.Style | None = None,
                 fsync: bool = True) -> None:
        super().__init__(stack)
        self.readonly = False
        self.lock = lock
        self.style = style or formats.Style.default()
        self.fsync = fsync
        self.meta_xattr = ("trusted.unionfs." if self.style is formats.Style.OVERLAY else "user.unionfs.") + "origin"
        self.redirect_xattr = self.style.prefix + formats.Xattr.REDIRECT.value
        self.origin_xattr = self.style.prefix + formats.Xattr.ORIGIN.value
        self.nlink_xattr = self.style.prefix + formats.Xattr.NLINK.value
        self.impure_xattr = self.style.prefix + formats.Xattr.IMPURE.value
        self._index_names: dict[int, bytes] = {}          # merged ino -> its index entry
        self._lower_index: dict[tuple[int, int], bytes] = {}  # lower (dev, ino) -> index name
        self._layer_uuid: dict[int, bytes] = {}
        self._aliases: dict[int, list[tuple[Node, bytes]]] = {}  # names of upper-only hard links
        # Rootless, a copied-up symlink or device has no xattr to keep its number in: this mount
        # remembers it (upper (dev, ino) -> merged ino), or the kernel would meet two inodes for it.
        self._unmarked: dict[tuple[int, int], int] = {}
        self.work_fd = ovl.open_dir_at(lock.work_fd, WORK_TEMP)
        self.index_fd = ovl.open_dir_at(lock.work_fd, WORK_INDEX)
        self._temp_seq = 0
        self._euid, self._egid = os.geteuid(), os.getegid()
        self._open: dict[int, set[OpenFile]] = {}
        self.copy_up = CopyUp(self)
        self._clean_work()

    def _clean_work(self) -> None:
        """Drop what an interrupted operation left in the work dir: never part of the view.

        Index entries are checked as overlayfs checks them at mount (``ovl_indexdir_cleanup``):
        ``#`` leftovers and entries no name uses any more go; a count left relative to the lower
        inode by an interrupted link-up is made relative to the upper one again.  Entries of the
        form before the kernel's (named by inode number) are renamed to it.
        """
        with os.scandir(self.work_fd) as it:
            leftovers = [os.fsencode(e.name) for e in it]
        for name in leftovers:
            log.info("removing leftover %r from the work dir", name)
            st = ovl.lstat_at(self.work_fd, name)
            meta = self._upper_meta(self.work_fd, name) if stat.S_ISREG(st.st_mode) and st.st_nlink > 1 else None
            if meta is not None and meta.pending == name and meta.lower_links is not None:
                # The form before the kernel's: this link was counted as in place already.
                meta.lower_links += 1
                ovl.setxattr_at(self.work_fd, name, self.meta_xattr, _legacy_meta(meta))
            ovl.remove_tree_at(self.work_fd, name)
        with os.scandir(self.index_fd) as it:
            entries = [os.fsencode(e.name) for e in it]
        legacy = []
        for name in entries:
            if formats.is_index_temp(name):
                log.info("removing leftover %r from the index", name)
                ovl.remove_tree_at(self.index_fd, name)
                continue
            st = ovl.lstat_at(self.index_fd, name)
            if stat.S_ISDIR(st.st_mode) or formats.is_chardev_whiteout(st):
                continue  # overlayfs's directory and whiteout entries (nfs_export): not ours to judge
            if OverlayFh.from_index_name(name) is None:
                legacy.append(name)
                continue
            raw = formats.decode_nlink(ovl.getxattr_or_none(self.index_fd, name, self.nlink_xattr))
            merged = self.merged_nlink(name, st)
            if merged is None and st.st_nlink > 1:
                continue  # no count of its own: overlayfs falls back to the real one, and so do we
            if merged is None or merged <= 0:
                log.info("removing index entry %r: no name left", name)
                ovl.unlink_at(self.index_fd, name)
            elif raw is not None and raw[0] == "L":
                self.set_nlink(name, merged, st.st_nlink)
        if legacy:
            self._migrate_legacy(legacy)

    def _migrate_legacy(self, names: list[bytes]) -> None:
        """Index entries named by inode number, with the count in ``unionfs.origin`` (``lower=N``:
        names still only below): find each one's lower inode, then give it the kernel's name and
        xattrs.  One walk of the lower layers, once per work dir."""
        wanted: dict[int, bytes] = {}
        for name in names:
            meta = self._upper_meta(self.index_fd, name)
            if meta is None or meta.lower_links is None:
                continue
            if ovl.lstat_at(self.index_fd, name).st_nlink - 1 + meta.lower_links <= 0:
                log.info("removing index entry %r: no name left", name)
                ovl.unlink_at(self.index_fd, name)
                continue
            wanted[meta.ino if meta.ino is not None else int(name, 16)] = name
        for layer in self.stack.layers:
            if not wanted or self.stack.is_upper(layer.index):
                continue
            for dirpath, _dirs, files, dfd in os.fwalk(layer.path, follow_symlinks=False):
                for f in files:
                    fname = os.fsencode(f)
                    st = ovl.lstat_at(dfd, fname)
                    ino = self.inodes.ino_for(st.st_dev, st.st_ino)
                    if not stat.S_ISREG(st.st_mode) or st.st_nlink < 2 or ino not in wanted:
                        continue
                    new = self.lower_index_name(layer.index, dfd, fname, st)
                    if new is None or new == index_name(ino):
                        continue
                    old = wanted.pop(ino)
                    meta = self._upper_meta(self.index_fd, old)
                    assert meta is not None and meta.lower_links is not None
                    real = ovl.lstat_at(self.index_fd, old).st_nlink
                    fh = OverlayFh.from_index_name(new)
                    assert fh is not None
                    ovl.setxattr_at(self.index_fd, old, self.origin_xattr, fh.encode())
                    self.set_nlink(old, real - 1 + meta.lower_links, real)
                    self.write_meta(self.index_fd, old, ino, st.st_nlink)
                    ovl.rename_at(self.index_fd, old, self.index_fd, new, ovl.RENAME_NOREPLACE)
                    log.info("index entry %r is now %r (the kernel's form)", old, new)
        for ino, name in wanted.items():
            log.warning("index entry %r: no lower hard link with inode %d, left in the old form", name, ino)

    def close(self) -> None:
        os.close(self.work_fd)
        os.close(self.index_fd)
        self.lock.close()
        super().close()

    def fds(self) -> set[int]:
        return super().fds() | {self.work_fd, self.index_fd, self.lock.work_fd, self.lock.upper_fd}

    # --- bookkeeping -------------------------------------------------------------

    def temp_name(self) -> bytes:
        self._temp_seq += 1
        return b"#%x.%x" % (os.getpid(), self._temp_seq)

    def in_upper(self, node: Node) -> bool:
        return node.parent is None or node.layers[0] == 0

    # --- the index: overlayfs's names and xattrs ------------------------------------------

    def origin_fh(self, layer: int, pfd: int, name: bytes) -> OverlayFh | None:
        """The overlayfs file handle of a lower object (``ovl_encode_real_fh``); None where its
        filesystem gives no handles."""
        try:
            htype, handle = ovl.name_to_handle_at(pfd, name)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOTSUP, errno.EOVERFLOW, errno.ENOSYS):
                raise
            return None
        uuid = self._layer_uuid.get(layer)
        if uuid is None:
            uuid = self._layer_uuid[layer] = ovl.fs_uuid(self.stack.layers[layer].fd)
        return OverlayFh(type=htype, fid=handle, uuid=uuid)

    def lower_index_name(self, layer: int, pfd: int, name: bytes, st: os.stat_result) -> bytes:
        """The index entry a lower inode would have: the hex of its overlayfs file handle (the old
        inode-number name where its filesystem gives no handles)."""
        key = (st.st_dev, st.st_ino)
        iname = self._lower_index.get(key)
        if iname is None:
            fh = self.origin_fh(layer, pfd, name)
            iname = fh.index_name() if fh is not None else index_name(self.inodes.ino_for(*key))
            self._lower_index[key] = iname
        return iname

    def indexable(self, st: os.stat_result) -> bool:
        """Is this lower object copied up through the index? Every non-directory with several links,
        as in overlayfs (``ovl_need_index``); rootless, only regular files (no user.* xattrs on
        symlinks and devices)."""
        return not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1 and self.may_mark(st)

    def may_mark(self, st: os.stat_result) -> bool:
        """Can overlay xattrs go on this kind of object? (``user.*`` ones only on files and dirs.)"""
        return self.style is formats.Style.OVERLAY or stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)

    def index_stat(self, iname: bytes) -> os.stat_result | None:
        """The index entry, if it is one we can use (not a directory or a whiteout of overlayfs's)."""
        try:
            st = ovl.lstat_at(self.index_fd, iname)
        except FileNotFoundError:
            return None
        return None if stat.S_ISDIR(st.st_mode) or formats.is_chardev_whiteout(st) else st

    def index_entry(self, node: Node) -> bytes:
        return self._index_names.get(node.ino) or index_name(node.ino)

    def remember_index(self, ino: int, iname: bytes) -> None:
        self._index_names[ino] = iname

    def merged_nlink(self, iname: bytes, st: os.stat_result) -> int | None:
        """The merged link count of an indexed inode (``ovl_get_nlink``); None without one."""
        rel = formats.decode_nlink(ovl.getxattr_or_none(self.index_fd, iname, self.nlink_xattr))
        if rel is None:
            meta = self._upper_meta(self.index_fd, iname)  # the form before the kernel's
            if meta is not None and meta.lower_links is not None:
                return st.st_nlink - 1 + meta.lower_links
            return None
        base, diff = rel
        if base == "U":
            return st.st_nlink + diff
        lower = self.origin_nlink(iname)
        return None if lower is None else lower + diff

    def set_nlink(self, iname: bytes, merged: int, real: int | None = None, base: str = "U") -> None:
        """Store the merged count relative to the real one (``U``) or to the lower inode's (``L``)."""
        if base == "U":
            diff = merged - (real if real is not None else ovl.lstat_at(self.index_fd, iname).st_nlink)
        else:
            lower = self.origin_nlink(iname)
            assert lower is not None
            diff = merged - lower
        ovl.setxattr_at(self.index_fd, iname, self.nlink_xattr, formats.encode_nlink(diff, base))

    def origin_nlink(self, iname: bytes) -> int | None:
        meta = self._upper_meta(self.index_fd, iname)
        if meta is not None and meta.origin_nlink is not None:
            return meta.origin_nlink
        st = self._decode_origin(iname)
        return st.st_nlink if st is not None else None

    def _decode_origin(self, iname: bytes) -> os.stat_result | None:
        """The lower inode an index entry of overlayfs's stands for, by its file handle (root only)."""
        fh = OverlayFh.from_index_name(iname)
        if fh is None:
            return None
        for layer in self.stack.layers:
            if self.stack.is_upper(layer.index):
                continue
            try:
                fd = ovl.open_by_handle_at(layer.fd, fh.type, fh.fid)
            except OSError:
                continue
            try:
                return ovl.fstat(fd)
            finally:
                os.close(fd)
        return None

    def _identify(self, top, top_at, origin, meta):
        layer, pfd, name = top_at
        if not stat.S_ISDIR(top.st_mode) and top.st_nlink > 1:
            if self.stack.is_upper(layer):
                # A name of an indexed inode is a link of the index entry named after its origin.
                fh = OverlayFh.decode(ovl.getxattr_or_none(pfd, name, self.origin_xattr))
                iname = fh.index_name() if fh is not None else None
                if iname is None and meta is not None and meta.lower_links is not None and meta.ino is not None:
                    iname = index_name(meta.ino)  # the form before the kernel's
                ist = self.index_stat(iname) if iname is not None else None
                if ist is not None and ist.st_ino == top.st_ino:
                    if meta is not None and meta.ino is not None:
                        ino = meta.ino
                    else:  # indexed by kernel overlayfs: numbered after its origin, as there
                        o = self._decode_origin(iname)
                        ino = self.inodes.ino_for(*((o.st_dev, o.st_ino) if o else (top.st_dev, top.st_ino)))
                    self.remember_index(ino, iname)
                    return ino, True
            else:
                iname = self.lower_index_name(layer, pfd, name, top)
                if iname is not None and self.index_stat(iname) is not None:
                    ino = self.inodes.ino_for(top.st_dev, top.st_ino)
                    self.remember_index(ino, iname)
                    return ino, True
        if meta is None and self.stack.is_upper(layer) and self._unmarked:
            ino = self._unmarked.get((top.st_dev, top.st_ino))
            if ino is not None:
                return ino, False
        return super()._identify(top, top_at, origin, meta)

    def _upper_meta(self, pfd: int, name: bytes) -> UpperMeta | None:
        return UpperMeta.decode(ovl.getxattr_or_none(pfd, name, self.meta_xattr))

    def write_meta(self, fd: int, name: bytes | None, ino: int, origin_nlink: int | None = None) -> None:
        ovl.setxattr_at(fd, name, self.meta_xattr, UpperMeta(ino, origin_nlink).encode())

    def remember_unmarked(self, pfd: int, name: bytes, ino: int) -> None:
        """The merged number of a copy-up that cannot carry it (see ``_unmarked``)."""
        st = ovl.lstat_at(pfd, name)
        self._unmarked[(st.st_dev, st.st_ino)] = ino

    def mark_impure(self, dirfd: int) -> None:
        """overlayfs marks a directory holding copied-up entries with an origin (its readdir then
        numbers them as stat does)."""
        if ovl.getxattr_or_none(dirfd, None, self.impure_xattr) != b"y":
            ovl.setxattr_at(dirfd, None, self.impure_xattr, b"y")

    def set_redirect(self, dirfd: int, lower_path: bytes) -> None:
        ovl.setxattr_at(dirfd, None, self.redirect_xattr, b"/" + lower_path)

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
            merged = self.merged_nlink(self.index_entry(node), st)
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
        st = self.index_stat(iname)
        merged = self.merged_nlink(iname, st) if st is not None else None
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
            pfd = self.stack.dir_fd(index, parent)
            try:
                st = ovl.lstat_at(pfd, name)
            except (FileNotFoundError, NotADirectoryError):
                st = None
            if st is not None:
                return not self._is_whiteout(index, parent, pfd, name, st)
            if self._oci_whiteout_at(index, pfd, name):
                return False
        return False

    def _upper_entry(self, parent: Node, name: bytes) -> os.stat_result | None:
        try:
            return ovl.lstat_at(self.stack.dir_fd(0, parent), name)
        except FileNotFoundError:
            return None

    def _owner(self, parent: Node, uid: int, gid: int) -> tuple[int, int, bool]:
        """Owner of a new entry, with BSD group semantics under a setgid directory."""
        pst = self.real_stat(parent)
        if pst.st_mode & stat.S_ISGID:
            return uid, pst.st_gid, True
        return uid, gid, False

    # --- files -------------------------------------------------------------------

    def open(self, node: Node, flags: int) -> OpenFile:
        if node.is_dir:
            raise OSError(errno.EISDIR, "is a directory")
        write = bool(flags & (os.O_WRONLY | os.O_RDWR))
        if write or flags & os.O_TRUNC:
            was_upper = self.in_upper(node)
            self.copy_up(node, truncate=bool(flags & os.O_TRUNC))
            fd = self._open_real(node, os.O_RDWR if write else os.O_RDONLY)
            if flags & os.O_TRUNC and (was_upper or node.indexed):
                # A copy-up that linked an indexed inode copied its data.  O_RDONLY|O_TRUNC
                # truncates too, as on Linux: through a descriptor of its own.
                self._truncate_real(node, fd if write else None)
            f = OpenFile(node, fd, writable=write)
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
        return ovl.pwrite(f.fd, data, off)

    def fsync_file(self, f: OpenFile, datasync: bool) -> None:
        if self.fsync:   # off for a volatile mount (podman's run --rm and build)
            ovl.fsync(f.fd, datasync)

    def release(self, f: OpenFile) -> None:
        files = self._open.get(f.node.ino)
        if files is not None:
            files.discard(f)
            if not files:
                del self._open[f.node.ino]
        os.close(f.fd)

    def create(self, parent: Node, name: bytes, mode: int, flags: int, uid: int, gid: int) -> OpenFile:
        node, fd = self._make(parent, name, stat.S_IFREG | stat.S_IMODE(mode), uid, gid, keep_open=flags)
        assert fd is not None
        f = OpenFile(node, fd, writable=True)
        self._open.setdefault(node.ino, set()).add(f)
        return f

    # --- new entries ---------------------------------------------------------------

    def mknod(self, parent: Node, name: bytes, mode: int, rdev: int, uid: int, gid: int) -> Node:
        return self._make(parent, name, mode, uid, gid, rdev=rdev)[0]

    def mkdir(self, parent: Node, name: bytes, mode: int, uid: int, gid: int) -> Node:
        return self._make(parent, name, stat.S_IFDIR | stat.S_IMODE(mode), uid, gid)[0]

    def symlink(self, parent: Node, name: bytes, target: bytes, uid: int, gid: int) -> Node:
        return self._make(parent, name, stat.S_IFLNK | 0o777, uid, gid, target=target)[0]

    def _check_new(self, parent: Node, name: bytes) -> tuple[bool, bool]:
        """Refuse a name that exists; say whether a whiteout holds it and whether lower layers do."""
        if not parent.is_dir:
            raise OSError(errno.ENOTDIR, "not a directory")
        if len(name) > 255:
            raise OSError(errno.ENAMETOOLONG, "name too long")
        if formats.is_oci_marker(name):
            # `.wh.` names are whiteouts in image layers: such a file could never be committed.
            raise OSError(errno.EINVAL, "names starting with .wh. are reserved for whiteouts")
        upper = self._upper_entry(parent, name) if self.in_upper(parent) else None
        if upper is not None:
            if not formats.is_whiteout_at(self.stack.dir_fd(0, parent), name, upper):
                raise OSError(errno.EEXIST, "file exists")
            return True, True
        if self.lower_exists(parent, name):
            raise OSError(errno.EEXIST, "file exists")
        return False, False

    def _make(self, parent: Node, name: bytes, mode: int, uid: int, gid: int, rdev: int = 0,
              target: bytes | None = None, keep_open: int | None = None) -> tuple[Node, int | None]:
        """Create an entry in the upper layer. With ``keep_open`` (flags), a regular file's fd is returned."""
        over_whiteout, _ = self._check_new(parent, name)
        self.dirty_dirs.add(parent.ino)
        self.copy_up.dir_chain(parent)
        pfd = self.stack.dir_fd(0, parent)
        uid, gid, sgid_parent = self._owner(parent, uid, gid)
        kind = stat.S_IFMT(mode)
        perm = stat.S_IMODE(mode)
        if kind == stat.S_IFDIR and sgid_parent:
            perm |= stat.S_ISGID
        # A directory where a lower one was removed is opaque (the whiteout says so).
        opaque = kind == stat.S_IFDIR and over_whiteout
        if not over_whiteout and uid == self._euid and (gid == self._egid or sgid_parent):
            # Created by the daemon's own user (root in a container), the entry has its owner and
            # mode from the creating syscall itself, as overlayfs creates in place: atomic as is.
            fd, st = self._make_in_place(pfd, name, kind, perm, rdev, target)
        else:
            fd, st = self._make_in_work_dir(pfd, name, kind, perm, uid, gid, rdev, target, opaque)
        if fd is not None and keep_open is None:
            os.close(fd)
            fd = None
        # Nothing of this name exists below (checked above), so the new entry is all there is.
        self._unmarked.pop((st.st_dev, st.st_ino), None)  # a number reused: not the copy-up's any more
        node = Node(self.inodes.ino_for(st.st_dev, st.st_ino), parent, name, (0,), st.st_mode)
        old = self.inodes.find(node.ino)
        if old is not None:
            # The upper filesystem reused the number of a removed entry the kernel has not
            # forgotten yet.
            self.inodes.reuse(old, parent, name)
        return self.inodes.remember(node), fd

    @staticmethod
    def _make_in_place(pfd: int, name: bytes, kind: int, perm: int, rdev: int,
                       target: bytes | None) -> tuple[int | None, os.stat_result]:
        fd: int | None = None
        if kind == stat.S_IFDIR:
            ovl.mkdir_at(pfd, name, perm)
        elif kind == stat.S_IFLNK:
            ovl.symlink_at(target or b"", pfd, name)
        elif kind == stat.S_IFREG:
            fd = ovl.open_at(pfd, name, os.O_RDWR | os.O_CREAT | os.O_EXCL, perm)
        else:
            ovl.mknod_at(pfd, name, kind | perm, rdev)
        st = ovl.fstat(fd) if fd is not None else ovl.lstat_at(pfd, name)
        if kind != stat.S_IFLNK and stat.S_IMODE(st.st_mode) != perm:
            ovl.chmod_at(pfd, name, perm)  # a umask (outside the daemon, which runs without one)
            st = ovl.fstat(fd) if fd is not None else ovl.lstat_at(pfd, name)
        return fd, st

    def _make_in_work_dir(self, pfd: int, name: bytes, kind: int, perm: int, uid: int, gid: int, rdev: int,
                          target: bytes | None, opaque: bool) -> tuple[int | None, os.stat_result]:
        """Built in the work dir with its owner and mode, then renamed into place: a crash never
        leaves a new entry with the daemon's owner or a half-set mode (and a whiteout it replaces
        goes in the same rename)."""
        where, tname = self.work_fd, self.temp_name()
        fd: int | None = None
        try:
            if kind == stat.S_IFDIR:
                ovl.mkdir_at(where, tname, 0o700)
                dfd = ovl.open_dir_at(where, tname)
                try:
                    if opaque:
                        formats.mark_opaque(dfd, self.style)
                    ovl.fchown(dfd, uid, gid)
                    ovl.fchmod(dfd, perm)
                    st = ovl.fstat(dfd)
                finally:
                    os.close(dfd)
            elif kind == stat.S_IFLNK:
                ovl.symlink_at(target or b"", where, tname)
                ovl.chown_at(where, tname, uid, gid)
                st = ovl.lstat_at(where, tname)
            elif kind == stat.S_IFREG:
                fd = ovl.open_at(where, tname, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
                ovl.fchown(fd, uid, gid)
                ovl.fchmod(fd, perm)
                st = ovl.fstat(fd)
            else:
                ovl.mknod_at(where, tname, kind | 0o600, rdev)
                ovl.chown_at(where, tname, uid, gid)
                ovl.chmod_at(where, tname, perm)
                st = ovl.lstat_at(where, tname)
            self._swap_in(where, tname, pfd, name, kind == stat.S_IFDIR)
        except BaseException:
            if fd is not None:
                os.close(fd)
            ovl.remove_tree_at(where, tname)
            raise
        return fd, st

    def _swap_in(self, wfd: int, tname: bytes, pfd: int, name: bytes, is_dir: bool) -> None:
        """Atomically put work/tname at pfd/name, replacing a whiteout there if any."""
        if self._exists(pfd, name):
            if is_dir:
                ovl.rename_at(wfd, tname, pfd, name, ovl.RENAME_EXCHANGE)
                ovl.remove_tree_at(wfd, tname)  # the whiteout, now in the work dir
            else:
                ovl.rename_at(wfd, tname, pfd, name)
        else:
            ovl.rename_at(wfd, tname, pfd, name, ovl.RENAME_NOREPLACE)

    @staticmethod
    def _exists(fd: int, name: bytes) -> bool:
        return ovl.exists_at(fd, name)

    def link(self, node: Node, parent: Node, name: bytes) -> Node:
        if node.is_dir:
            raise OSError(errno.EPERM, "hard link to a directory")
        self._check_new(parent, name)
        self.dirty_dirs.add(parent.ino)
        self.copy_up(node)  # a lower hard link goes through the index
        self.copy_up.dir_chain(parent)
        pfd = self.stack.dir_fd(0, parent)
        sfd, sname = self.locate(node)
        if ovl.getxattr_or_none(sfd, sname, self.origin_xattr) is not None:
            self.mark_impure(pfd)  # as overlayfs: a name with an origin makes its directory impure
        if self._upper_entry(parent, name) is not None:
            tname = self.temp_name()
            ovl.link_at(sfd, sname, self.work_fd, tname)
            self._swap_in(self.work_fd, tname, pfd, name, False)
        else:
            ovl.link_at(sfd, sname, pfd, name)
        if not node.indexed:
            # Several names, no index (as in overlayfs): remember them, to reach the inode by another
            # if the one we use goes.
            aliases = self._aliases.setdefault(node.ino, [])
            for entry in ((node.parent, node.name), (parent, name)):
                if entry not in aliases:
                    aliases.append(entry)
        return node

    # --- removal ---------------------------------------------------------------------

    def unlink(self, parent: Node, name: bytes) -> None:
        node = self.lookup(parent, name)
        if node.is_dir:
            raise OSError(errno.EISDIR, "is a directory")
        self._remove(parent, name, node)

    def rmdir(self, parent: Node, name: bytes) -> None:
        node = self.lookup(parent, name)
        if not node.is_dir:
            raise OSError(errno.ENOTDIR, "not a directory")
        if self.list_names(node):
            raise OSError(errno.ENOTEMPTY, "directory not empty")
        self._remove(parent, name, node)
        self.stack.forget_fd(node.ino)

    def _remove(self, parent: Node, name: bytes, node: Node) -> None:
        self.dirty_dirs.add(parent.ino)
        self._link_up(node)
        real = self._real_if_linked(node)
        self.copy_up.dir_chain(parent)
        pfd = self.stack.dir_fd(0, parent)
        whiteout = self.lower_exists(parent, name)
        upper = self._upper_entry(parent, name)
        if whiteout:
            if upper is not None:
                tname = self.temp_name()
                formats.make_whiteout(self.work_fd, tname, self.style)
                ovl.rename_at(self.work_fd, tname, pfd, name, ovl.RENAME_EXCHANGE)
                ovl.remove_tree_at(self.work_fd, tname)
            else:
                formats.make_whiteout(pfd, name, self.style)
            self._whiteouts_in(parent, pfd)
        elif upper is not None:
            if stat.S_ISDIR(upper.st_mode):
                try:
                    ovl.rmdir_at(pfd, name)
                except OSError as e:
                    if e.errno != errno.ENOTEMPTY:
                        raise
                    tname = self.temp_name()  # only whiteouts left inside: move away, then clean
                    ovl.rename_at(pfd, name, self.work_fd, tname)
                    ovl.remove_tree_at(self.work_fd, tname)
            else:
                ovl.unlink_at(pfd, name)
        last = self._name_removed(node) if node.indexed else real is None or real.st_nlink < 2
        if last and node.ino in self._open and not node.is_dir:
            node.unlinked = True
        elif not last:
            self._relocate(node, parent, name, real)

    def _real_if_linked(self, node: Node) -> os.stat_result | None:
        """The real inode of an upper non-directory with several names, before one of them goes."""
        if node.is_dir or node.indexed or not self.in_upper(node):
            return None
        try:
            st = self.real_stat(node)
        except OSError:
            return None
        return st if st.st_nlink > 1 else None

    # --- rename ----------------------------------------------------------------------

    def rename(self, old_parent: Node, old_name: bytes, new_parent: Node, new_name: bytes, flags: int) -> None:
        if flags & ~(ovl.RENAME_EXCHANGE | ovl.RENAME_NOREPLACE):
            # As overlayfs: RENAME_WHITEOUT (and anything newer) is not for a union's users.
            raise OSError(errno.EINVAL, "unsupported rename flags")
        node = self.lookup(old_parent, old_name)
        target = self.resolve(new_parent, new_name)
        if target is not None:
            target = self.inodes.remember(target)
        exchange = bool(flags & ovl.RENAME_EXCHANGE)
        if flags & ovl.RENAME_NOREPLACE and target is not None:
            raise OSError(errno.EEXIST, "file exists")
        if exchange and target is None:
            raise OSError(errno.ENOENT, "no such file or directory")
        if formats.is_oci_marker(new_name):
            raise OSError(errno.EINVAL, "names starting with .wh. are reserved for whiteouts")
        if target is node:
            if old_parent is new_parent and old_name == new_name:
                return
        if target is not None and not exchange:
            if node.is_dir and not target.is_dir:
                raise OSError(errno.ENOTDIR, "not a directory")
            if target.is_dir and not node.is_dir:
                raise OSError(errno.EISDIR, "is a directory")
            if target.is_dir and self.list_names(target):
                raise OSError(errno.ENOTEMPTY, "directory not empty")
        target_real = None
        if target is not None and not exchange and target is not node:
            self._link_up(target)
            target_real = self._real_if_linked(target)
        self.dirty_dirs.update((old_parent.ino, new_parent.ino))
        self.copy_up.dir_chain(old_parent)
        self.copy_up.dir_chain(new_parent)
        self._prepare_move(node, new_parent)
        if exchange:
            self._prepare_move(target, old_parent)
        elif target is not None and target.is_dir:
            self._empty_upper_dir(new_parent, new_name)
        ofd = self.stack.dir_fd(0, old_parent)
        nfd = self.stack.dir_fd(0, new_parent)
        if old_parent is not new_parent:
            # As overlayfs: a directory that gets an entry with an origin is marked impure.
            if ovl.getxattr_or_none(ofd, old_name, self.origin_xattr) is not None:
                self.mark_impure(nfd)
            if exchange and ovl.getxattr_or_none(nfd, new_name, self.origin_xattr) is not None:
                self.mark_impure(ofd)
        if exchange:
            ovl.rename_at(ofd, old_name, nfd, new_name, ovl.RENAME_EXCHANGE)
        else:
            whiteout = self.lower_exists(old_parent, old_name)
            dest = self._upper_entry(new_parent, new_name)
            if node.is_dir and dest is not None and not stat.S_ISDIR(dest.st_mode):
                # A directory onto a whiteout: swap them, the whiteout lands at the old name.
                ovl.rename_at(ofd, old_name, nfd, new_name, ovl.RENAME_EXCHANGE)
                if not whiteout:
                    ovl.unlink_at(ofd, old_name)
            elif whiteout:
                self._rename_whiteout(ofd, old_name, nfd, new_name)
            else:
                ovl.rename_at(ofd, old_name, nfd, new_name)
            if whiteout:
                self._whiteouts_in(old_parent, ofd)
            if target is not None and target is not node and not target.is_dir:
                last = self._name_removed(target) if target.indexed else \
                    target_real is None or target_real.st_nlink < 2
                if last and target.ino in self._open:
                    target.unlinked = True
                elif not last:
                    self._relocate(target, new_parent, new_name, target_real)
        self.inodes.move(node, new_parent, new_name)
        if exchange and target is not None:
            self.inodes.move(target, old_parent, old_name)

    def _rename_whiteout(self, ofd: int, old: bytes, nfd: int, new: bytes) -> None:
        if self.style is not formats.Style.XWHITEOUT:
            try:
                ovl.rename_at(ofd, old, nfd, new, ovl.RENAME_WHITEOUT)
                return
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.EPERM, errno.EOPNOTSUPP):
                    raise
        ovl.rename_at(ofd, old, nfd, new)
        formats.make_whiteout(ofd, old, self.style)

    def _prepare_move(self, node: Node, new_parent: Node) -> None:
        """Copy up what moves; a directory with lower parts records where it came from."""
        if not node.is_dir:
            self.copy_up(node)
            return
        has_lower = any(not self.stack.is_upper(i) for i in node.layers)
        if has_lower:
            lower_path = node.redirect if node.redirect is not None else self.lower_path(node)
            self._pin_lower_paths(node)
            self.copy_up(node)
            fd = self.stack.dir_fd(0, node)
            if node.redirect is None:
                self.set_redirect(fd, lower_path)
                node.redirect = lower_path
        elif any(not self.stack.is_upper(i) for i in new_parent.layers):
            # A pure upper directory moving into a merged one: lower entries of the
            # same name must not merge into it.
            formats.mark_opaque(self.stack.dir_fd(0, node), self.style)

    def _pin_lower_paths(self, node: Node) -> None:
        """A directory about to move keeps its lower dirs: from now on they are named from each
        layer's root, not through its (new) parent."""
        node.paths = tuple(None if self.stack.is_upper(i) else b"/" + self.layer_path(node, i)
                           for i in node.layers)

    def _empty_upper_dir(self, parent: Node, name: bytes) -> None:
        """Before renaming over an (empty) merged dir, drop its upper copy's whiteouts."""
        upper = self._upper_entry(parent, name)
        if upper is None or not stat.S_ISDIR(upper.st_mode):
            return
        pfd = self.stack.dir_fd(0, parent)
        try:
            ovl.rmdir_at(pfd, name)
            if self.lower_exists(parent, name):
                formats.make_whiteout(pfd, name, self.style)
                self._whiteouts_in(parent, pfd)
        except OSError as e:
            if e.errno != errno.ENOTEMPTY:
                raise
            tname = self.temp_name()
            formats.make_whiteout(self.work_fd, tname, self.style)
            ovl.rename_at(self.work_fd, tname, pfd, name, ovl.RENAME_EXCHANGE)
            ovl.remove_tree_at(self.work_fd, tname)
            self._whiteouts_in(parent, pfd)

    def _whiteouts_in(self, parent: Node, pfd: int) -> None:
        """Rootless, an upper dir that got an xattr whiteout is marked so, and its node looks for them."""
        if self.style is formats.Style.XWHITEOUT:
            formats.mark_xwhiteouts(pfd, self.style)
            if 0 not in parent.xwh:
                parent.xwh = (0, *parent.xwh)

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
                self._truncate_real(node, None, size)
        if mode is None and uid is None and gid is None and atime_ns is None and mtime_ns is None:
            return
        self.copy_up(node)
        fd, name = self.locate(node)
        if uid is not None or gid is not None:
            ovl.chown_at(fd, name, -1 if uid is None else uid, -1 if gid is None else gid) if name is not None \
                else ovl.fchown(fd, -1 if uid is None else uid, -1 if gid is None else gid)
        if mode is not None:
            if stat.S_ISLNK(node.mode):
                raise OSError(errno.EOPNOTSUPP, "symlinks have no mode")
            ovl.chmod_at(fd, name, stat.S_IMODE(mode)) if name is not None else ovl.fchmod(fd, stat.S_IMODE(mode))
        if atime_ns is not None or mtime_ns is not None:
            if atime_ns is None or mtime_ns is None:
                st = ovl.fstat(fd) if name is None else ovl.lstat_at(fd, name)
                atime_ns = st.st_atime_ns if atime_ns is None else atime_ns
                mtime_ns = st.st_mtime_ns if mtime_ns is None else mtime_ns
            ovl.utime_at(fd, name, (atime_ns, mtime_ns)) if name is not None else ovl.futimens(fd, (atime_ns, mtime_ns))

    def setxattr(self, node: Node, name: str, value: bytes) -> None:
        stored = formats.escape_xattr(name)
        if formats.is_private_xattr(stored):
            raise OSError(errno.EPERM, "reserved attribute")
        self.copy_up(node)
        fd, real = self.locate(node)
        ovl.setxattr_at(fd, real, stored, value)

    def removexattr(self, node: Node, name: str) -> None:
        stored = formats.escape_xattr(name)
        if formats.is_private_xattr(stored):
            raise OSError(errno.ENODATA, "no such attribute")
        if not self.in_upper(node):
            self.getxattr(node, name)  # ENODATA without a needless copy-up
        self.copy_up(node)
        fd, real = self.locate(node)
        ovl.removexattr_at(fd, real, stored)

    def fsyncdir(self, node: Node, datasync: bool) -> None:
        if self.fsync and self.in_upper(node):
            ovl.fsync(self.stack.dir_fd(0, node), datasync)

    def statfs(self) -> os.statvfs_result:
        return ovl.statvfs(self.stack.layers[0].fd)


def _legacy_meta(meta: UpperMeta) -> bytes:
    """``unionfs.origin`` in the form before the kernel's index format, for the migration."""
    value = b"ino=%d" % (meta.ino or 0)
    if meta.lower_links is not None:
        value += b";lower=%d" % meta.lower_links
    return value
