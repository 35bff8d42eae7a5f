"""The upper layer's on-disk bookkeeping: everything we keep beside the merged tree.

Owns the work dir (its lock, its preparation and cleaning at mount, the
temporary names built in ``work/``), the kernel's hard-link index
(``index/<hex of the origin's file handle>`` with ``overlay.origin`` and
``overlay.nlink``, as overlayfs ``index=on``; the older names by inode number
and their parser), our per-inode ``unionfs.origin`` meta xattr, and the marks a
copy-up leaves (``overlay.impure``, ``overlay.redirect``).  The byte formats
themselves are :mod:`formats`'; the namespace rules (whiteouts, renames, when
to copy up) are :mod:`writable`'s and :mod:`copyup`'s.  No FUSE here, and no
view of the merged tree: it is given layer fds and names.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import time
from dataclasses import dataclass

from ..errors import UsageError
from . import formats
from . import sys as ovl
from .formats import OverlayFh, UpperMeta
from .inodes import InodeTable, Node
from .layers import LayerError, LayerStack, open_directory

log = logging.getLogger("unionfs.upper")

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


# umount(2) returns before the daemon has read of it and closed its fds (a Python process on a
# loaded machine: tens of ms, at times a second or more), so a mount of the same dirs right after
# (podman's restart, unionmount-testsuite's remounts) waits this long for the lock to go.
LOCK_WAIT = 3.0


def _lock(fd: int, what: str, path: str) -> None:
    """flock(2) ``fd`` for the mount, waiting up to LOCK_WAIT for a mount that is going away."""
    deadline = time.monotonic() + LOCK_WAIT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise UsageError(f"{what} {path} is in use by another mount") from None
        time.sleep(0.01)


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
            _lock(fd, what, path)
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


class Upper:
    """The work dir and index of one writable layer, opened for the life of a mount."""

    def __init__(self, stack: LayerStack, lock: UpperLock, inodes: InodeTable,
                 style: formats.Style | None = None, fsync: bool = True) -> None:
        self.stack = stack
        self.inodes = inodes
        self.lock = lock
        self.style = style or formats.Style.default()
        self.fsync = fsync
        self.meta_xattr = formats.meta_xattr_name(self.style)
        self.redirect_xattr = self.style.prefix + formats.Xattr.REDIRECT.value
        self.origin_xattr = self.style.prefix + formats.Xattr.ORIGIN.value
        self.nlink_xattr = self.style.prefix + formats.Xattr.NLINK.value
        self.impure_xattr = self.style.prefix + formats.Xattr.IMPURE.value
        self.metacopy_xattr = self.style.prefix + formats.Xattr.METACOPY.value
        self._index_names: dict[int, bytes] = {}          # merged ino -> its index entry
        self._lower_index: dict[tuple[int, int], bytes] = {}  # lower (dev, ino) -> index name
        self._layer_uuid: dict[int, bytes] = {}
        # Rootless, a copied-up symlink or device has no xattr to keep its number in: this mount
        # remembers it (upper (dev, ino) -> merged ino), or the kernel would meet two inodes for it.
        self.unmarked: dict[tuple[int, int], int] = {}
        self.work_fd = ovl.open_dir_at(lock.work_fd, WORK_TEMP)
        self.index_fd = ovl.open_dir_at(lock.work_fd, WORK_INDEX)
        self._temp_seq = 0
        self._tmpfile = True      # until the filesystem says it has no O_TMPFILE

    def close(self) -> None:
        os.close(self.work_fd)
        os.close(self.index_fd)
        self.lock.close()

    def fds(self) -> set[int]:
        return {self.work_fd, self.index_fd, self.lock.work_fd, self.lock.upper_fd}

    def clean_work(self) -> None:
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
            meta = self.meta(self.work_fd, name) if stat.S_ISREG(st.st_mode) and st.st_nlink > 1 else None
            if meta is not None and meta.pending == name and meta.lower_links is not None:
                # The form before the kernel's: this link was counted as in place already.
                meta.lower_links += 1
                ovl.setxattr_at(self.work_fd, name, self.meta_xattr, meta.encode(legacy=True))
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
            self.migrate_legacy(legacy)

    def migrate_legacy(self, names: list[bytes]) -> None:
        """Index entries named by inode number, with the count in ``unionfs.origin`` (``lower=N``:
        names still only below): find each one's lower inode, then give it the kernel's name and
        xattrs.  One walk of the lower layers, once per work dir."""
        wanted: dict[int, bytes] = {}
        for name in names:
            meta = self.meta(self.index_fd, name)
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
                    meta = self.meta(self.index_fd, old)
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

    def temp_name(self) -> bytes:
        self._temp_seq += 1
        return b"#%x.%x" % (os.getpid(), self._temp_seq)

    def new_file(self) -> tuple[int, bytes | None]:
        """A new, empty regular file (mode 0600) for a copy-up, open for writing, and its name in
        the work dir: None for an O_TMPFILE file (no name until :meth:`place`, nothing to clean
        after a crash), a temp name where the filesystem has no O_TMPFILE."""
        if self._tmpfile:
            fd = ovl.open_tmpfile(self.work_fd)
            if fd is not None:
                return fd, None
            log.info("the upper filesystem has no O_TMPFILE: copy-ups use named temporary files")
            self._tmpfile = False
        temp = self.temp_name()
        return ovl.open_at(self.work_fd, temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), temp

    def sync_data(self, fd: int) -> None:
        """A copy-up's data on the disk before its name appears (the kernel's ``vfs_fsync`` of the
        copy when ``ovl_should_sync``); nothing with ``volatile`` or ``fsync=0``.

        fdatasync(2), not fsync(2): for a new file it writes the data and all the metadata needed
        to read it back, the size and block map included (only timestamps and the like may wait),
        so after a crash the name that the later link or rename gives it never shows a short or
        empty file, which is all the kernel's fsync is there for.  The owner, mode, times and
        xattrs are set after it in either case (the kernel sets them after its fsync too) and
        reach the disk with the journal commit that holds the link or rename.  On ext4 both cost
        the same journal commit here (7 bytes: 0.17 ms either way; 64 MiB: 39 against 41 ms)."""
        if self.fsync:
            ovl.fsync(fd, datasync=True)

    def place(self, fd: int, temp: bytes | None, dirfd: int, name: bytes) -> None:
        """Give a :meth:`new_file` its name ``name`` in ``dirfd``, failing if the name is taken."""
        if temp is None:
            ovl.link_tmpfile(fd, dirfd, name)
        else:
            ovl.rename_at(self.work_fd, temp, dirfd, name, ovl.RENAME_NOREPLACE)

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
            meta = self.meta(self.index_fd, iname)  # the form before the kernel's
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
        meta = self.meta(self.index_fd, iname)
        if meta is not None and meta.origin_nlink is not None:
            return meta.origin_nlink
        st = self.decode_origin(iname)
        return st.st_nlink if st is not None else None

    def decode_origin(self, iname: bytes) -> os.stat_result | None:
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

    def meta(self, pfd: int, name: bytes) -> UpperMeta | None:
        return UpperMeta.decode(ovl.getxattr_or_none(pfd, name, self.meta_xattr))

    def remember_unmarked(self, pfd: int, name: bytes, ino: int) -> None:
        """The merged number of a copy-up that cannot carry it (see ``unmarked``)."""
        st = ovl.lstat_at(pfd, name)
        self.unmarked[(st.st_dev, st.st_ino)] = ino

    def write_meta(self, fd: int, name: bytes | None, ino: int, origin_nlink: int | None = None) -> None:
        ovl.setxattr_at(fd, name, self.meta_xattr, UpperMeta(ino, origin_nlink).encode())

    def mark_impure(self, dirfd: int) -> None:
        """overlayfs marks a directory holding copied-up entries with an origin (its readdir then
        numbers them as stat does)."""
        if ovl.getxattr_or_none(dirfd, None, self.impure_xattr) != b"y":
            ovl.setxattr_at(dirfd, None, self.impure_xattr, b"y")

    def set_redirect(self, dirfd: int, lower_path: bytes) -> None:
        ovl.setxattr_at(dirfd, None, self.redirect_xattr, b"/" + lower_path)


def index_name(ino: int) -> bytes:
    """Name of an inode's index entry before we wrote the kernel's format (and where a lower
    filesystem gives no file handles)."""
    return b"%x" % ino


def in_upper(node: Node) -> bool:
    """Is ``node`` in the writable layer (layer 0)?  The root always is."""
    return node.parent is None or node.layers[0] == 0


def parse_index_name(name: bytes) -> int | None:
    """The inode number an index entry of the older form is named by; None for any other name."""
    try:
        return int(name, 16)
    except ValueError:
        return None
