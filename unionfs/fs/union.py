"""The union: the read side of the merged view (lookup, attributes, xattrs, data), in plain Python.

This module knows the overlay rules and nothing of FUSE; how a name resolves
down the layers is :mod:`lookup`'s, how a directory lists is :mod:`readdir`'s.  Everything raises
``OSError`` with the errno a caller should see; the FUSE adapter
(:mod:`unionfs.fuse.operations`) only translates.  It also answers what the
kernel may cache (:meth:`Union.immutable`, :meth:`Union.cache_timeout`).  It must
not write to a layer: the writable side is :mod:`writable` and its helpers.
"""
from __future__ import annotations

import errno
import logging
import os
import stat
from dataclasses import dataclass
from typing import Callable, Protocol

from . import formats
from . import sys as ovl
from .inodes import ROOT_INO, InodeTable, Node
from .layers import LayerStack
from .lookup import Lookup
from .readdir import merged_names

log = logging.getLogger("unionfs.union")

# Lower layers never change under us and we are the only writer of the upper,
# so the kernel may keep what we tell it.  Entries that live only in lower layers
# are immutable; upper entries get a shorter life as a guard against anything
# (another process on the upper dir) we did not do ourselves.
LOWER_TIMEOUT = 86400.0
UPPER_TIMEOUT = 1.0
# Objects whose xattr names are kept (by inode number), to answer getxattr of a name they
# lack without a syscall; cleared whole when full.
XATTR_NAMES_KEPT = 100_000
_NO_NAMES: frozenset[str] = frozenset()


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


class Fill(Protocol):
    """A lazy layer's content arrives on first read (:mod:`unionfs.registry.lazy`)."""

    def __call__(self, fd: int, offset: int, size: int) -> None:
        """Make bytes ``offset..offset+size`` of the lower file open as ``fd`` present before they
        are read (may wait on the network, so the adapter calls it off its loop); OSError fails the read."""

    def pending(self, fd: int, offset: int, size: int) -> bool:
        """Whether ``__call__`` would have to fetch (or wait for a fetch): quick, no network."""


class Union(Lookup):
    """The merged view of a layer stack, read-only; resolution is :class:`Lookup`'s."""

    # ``xattr_permissions``: the xattr holding each entry's owner, mode and type (None: the files' own)
    override: str | None = None

    def __init__(self, stack: LayerStack) -> None:
        self.stack = stack
        self.store_uid, self.store_gid = os.geteuid(), os.getegid()
        self.fill: Fill | None = None   # set by the daemon for lazy layers (unionfs.registry.lazy)
        self.inodes = InodeTable(stack.devs)
        self.readonly = stack.upper is None
        self._upper_at_0 = self.stack.is_upper(0)   # immutable() asks it of every entry
        self.index_fd = -1  # the writable layer's index dir
        # Filled by changes made through the mount, drained by the FUSE adapter after each
        # request: inodes whose attributes changed as a side effect, and directories whose
        # listing changed.
        self.changed: set[int] = set()
        self.dirty_dirs: set[int] = set()
        self._tuples: dict[tuple[int, ...], tuple[int, ...]] = {}
        self._modes: dict[int, int] = {}
        # xattr names by inode number, with the layer tuple they were read for (:meth:`xattr_names`),
        # and the stored spelling of names asked for (:meth:`lacks_xattr`; "" for a private one).
        self._xattr_names: dict[int, tuple[tuple[int, ...], frozenset[str]]] = {}
        self._stored_names: dict[bytes, str] = {}
        root_layers, root_xwh = self._root_layers()
        self.root = Node(ROOT_INO, None, b"", root_layers, stat.S_IFDIR, root_xwh)
        self.root.attr_layer = next((ly.index for ly in self.stack.layers
                                     if not formats.is_implied(ovl.listxattr_at(ly.fd, None))), None)
        self.inodes.add_root(self.root)

    def _root_layers(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        layers: list[int] = []
        xwh: list[int] = []
        for layer in self.stack.layers:
            layers.append(layer.index)
            kind, _ = self._dir_kind(layer.index, layer.fd, None)
            if kind is formats.DirKind.XWHITEOUTS:
                xwh.append(layer.index)
            if kind is formats.DirKind.OPAQUE:
                break
        return tuple(layers), tuple(xwh)

    def close(self) -> None:
        self.stack.close()

    def fds(self) -> set[int]:
        """Every fd this union holds (a forked daemon closes all others)."""
        return self.stack.fds()

    # --- what the kernel may cache --------------------------------------------------

    def immutable(self, node: Node) -> bool:
        """Nothing but a copy-up (which drops the listing and tells the kernel) can change this
        node's attributes: it lives in lower layers only, or the whole stack is read-only."""
        if self.readonly:
            return True
        return not ((node.layers[0] == 0 and self._upper_at_0) or node.indexed)

    def cache_timeout(self, node: Node) -> float:
        """How long the kernel may keep this node's entry and attributes."""
        return LOWER_TIMEOUT if self.immutable(node) else UPPER_TIMEOUT

    def negative_timeout(self, parent: Node) -> float:
        """How long the kernel may remember that a name does not exist in ``parent``.

        In a lower-only directory, as long as its lower entries: only a change through the
        mount can add the name, and the kernel turns its own negative dentry positive then."""
        return LOWER_TIMEOUT if self.immutable(parent) else UPPER_TIMEOUT

    def lookup(self, parent: Node, name: bytes, mask: int | None = None) -> Node:
        """Resolve and enter into the inode table; the caller counts the kernel's lookup."""
        return self.lookup_attr(parent, name, mask, attr=False)[0]

    def lookup_attr(self, parent: Node, name: bytes, mask: int | None = None,
                    attr: bool = True) -> tuple[Node, Attr | None]:
        """:meth:`lookup` and the node's attributes, from the stat the resolution already made."""
        if not parent.is_dir:
            raise OSError(errno.ENOTDIR, "not a directory")
        if name in (b".", b".."):
            node = parent if name == b"." else (parent.parent or parent)
            return node, self.getattr(node) if attr else None
        _check_name(name)
        found = self._resolve(parent, name, mask)
        if found is None:
            raise OSError(errno.ENOENT, "no such file or directory")
        node = self.inodes.remember(found[0])
        if not attr:
            return node, None
        if node.indexed or node.unlinked:  # the data, and its count, live elsewhere
            return node, self.getattr(node)
        return node, self.attr_from_stat(node, found[1])

    # --- attributes ---------------------------------------------------------------

    def locate(self, node: Node) -> tuple[int, bytes | None]:
        """Where the topmost real instance of ``node`` is: (directory fd, name), or (dir fd, None) for a dir."""
        if node.is_dir:
            # A directory's attributes and xattrs come from its topmost layer that has it for real.
            layer = node.attr_layer if node.attr_layer is not None and not self.stack.is_upper(node.top) \
                else node.top
            return self.stack.dir_fd(layer, node), None
        if node.indexed:
            return self.index_fd, self.index_entry(node)
        return self.stack.parent_fd(node.top, node), node.name

    def locate_data(self, node: Node) -> tuple[int, bytes | None]:
        """Where the data of ``node`` is: a metacopy file's (``overlay.metacopy``) is in the lower
        layer its lookup found it in (the last of its layers); anything else's is where it is."""
        if not node.is_dir:
            if len(node.layers) > 1:
                return self.locate_in(node, node.layers[-1])
            if node.indexed and not self.stack.is_upper(node.top) and formats.is_metacopy_at(
                    self.index_fd, self.index_entry(node)):
                return self.locate_in(node, node.top)  # kernel overlayfs indexed it metadata only
        return self.locate(node)

    @staticmethod
    def is_metacopy(node: Node) -> bool:
        """Does this node's data still live below its attributes (an upper metacopy file)?"""
        return not node.is_dir and len(node.layers) > 1

    def real_stat(self, node: Node) -> os.stat_result:
        """stat of the topmost real instance of ``node``."""
        fd, name = self.locate(node)
        return ovl.fstat(fd) if name is None else ovl.lstat_at(fd, name)

    def getattr(self, node: Node) -> Attr:
        return self.attr_from_stat(node, self.real_stat(node))

    def attr_from_stat(self, node: Node, st: os.stat_result) -> Attr:
        nlink = st.st_nlink
        blocks = st.st_blocks
        if len(node.layers) > 1:
            if node.is_dir:
                nlink = 1  # as overlayfs: a merged directory's link count is not worth counting
            else:  # a metacopy file, as ovl_getattr: the blocks of the data, not of the empty upper inode
                fd, name = self.locate_data(node)
                blocks = ovl.lstat_at(fd, name).st_blocks if name is not None else blocks
        a = Attr(node.ino, st.st_mode, nlink, st.st_uid, st.st_gid, st.st_rdev, st.st_size,
                 st.st_blksize, blocks, st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns)
        if self.override is not None:
            self._apply_override(node, a, st)
        return a

    def read_override(self, node: Node, st: os.stat_result) -> formats.Override | None:
        """The owner, mode and type recorded for ``node`` (only regular files and directories can
        carry one: no user.* xattr goes on a symlink or a device)."""
        if self.override is None or not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            return None
        try:
            fd, name = self.locate(node)
            raw = ovl.getxattr_or_none(fd, name, self.override)
            if raw is None:   # another tool's name (fuse-overlayfs's, containers/storage's)?
                names = ovl.listxattr_at(fd, name)
                other = next((n for n in formats.OVERRIDE_NAMES if n in names), None)
                raw = ovl.getxattr_or_none(fd, name, other) if other is not None else None
            return formats.Override.decode(raw)
        except FileNotFoundError:   # an unlinked file still open
            return None

    def _apply_override(self, node: Node, a: Attr, st: os.stat_result) -> None:
        """``xattr_permissions``: show the recorded owner, mode and type; an entry without a record
        that the store's own user owns shows as root's (that user is root of a user's store)."""
        ov = self.read_override(node, st)
        if ov is None:
            if a.uid == self.store_uid:
                a.uid = 0
            if a.gid == self.store_gid:
                a.gid = 0
            return
        a.uid, a.gid, a.mode = ov.uid, ov.gid, ov.mode(st.st_mode)
        if stat.S_ISCHR(a.mode) or stat.S_ISBLK(a.mode):
            a.rdev, a.size = ov.rdev, 0

    def readlink(self, node: Node) -> bytes:
        if not stat.S_ISLNK(node.mode):
            raise OSError(errno.EINVAL, "not a symlink")
        fd, name = self.locate(node)
        return ovl.readlink_at(fd, name)

    def statfs(self) -> os.statvfs_result:
        return ovl.statvfs(self.stack.layers[0].fd)

    def access(self, node: Node, mode: int, uid: int, gids: list[int]) -> None:
        """access(2) for callers when the kernel does not check permissions itself."""
        if mode == os.F_OK:
            return
        st = self.getattr(node)   # the owner and mode shown (an override's too)
        if mode & os.W_OK and self.readonly:
            raise OSError(errno.EROFS, "read-only file system")
        if uid == 0:
            if mode & os.X_OK and not stat.S_ISDIR(st.mode) and not st.mode & 0o111:
                raise OSError(errno.EACCES, "permission denied")
            return
        if uid == st.uid:
            bits = (st.mode >> 6) & 7
        elif st.gid in gids:
            bits = (st.mode >> 3) & 7
        else:
            bits = st.mode & 7
        if mode & ~bits & 7:
            raise OSError(errno.EACCES, "permission denied")

    # --- xattrs -----------------------------------------------------------------

    def getxattr(self, node: Node, name: str) -> bytes:
        stored = self._stored_xattr(name)
        if stored not in self.xattr_names(node):
            raise OSError(errno.ENODATA, "no such attribute")
        fd, real = self.locate(node)
        return ovl.getxattr_at(fd, real, stored)

    def lacks_xattr(self, node: Node, name: bytes) -> bool:
        """Known without a syscall that ``node`` shows no xattr ``name`` (the kernel asks for
        security.capability before every write(2), and `ls -l` for security.selinux and the ACLs)?"""
        kept = self._xattr_names.get(node.ino)
        if kept is None or kept[0] is not node.layers:
            return False
        stored = self._stored_names.get(name)
        if stored is None:
            if len(self._stored_names) >= 1024:
                self._stored_names.clear()
            try:
                stored = self._stored_xattr(os.fsdecode(name))
            except OSError:
                stored = ""   # ours or overlayfs's: never shown
            self._stored_names[name] = stored
        return stored not in kept[1]

    def xattr_names(self, node: Node) -> frozenset[str]:
        """The xattr names ``node``'s real instance has (as stored, private ones too), kept per inode.

        Kept as long as the node's layers are the ones it had (a copy-up, a metacopy, a new
        resolution gives a new tuple) and nothing dropped them (:meth:`forget_xattrs`: setxattr,
        removexattr, a new object by that number).  What a change through the mount removes behind
        our back (the upper filesystem drops security.capability on a write or chown) leaves a name
        too many here, which only costs the real getxattr that answers ENODATA."""
        kept = self._xattr_names.get(node.ino)
        if kept is not None and kept[0] is node.layers:
            return kept[1]
        fd, real = self._xattr_source(node)
        names = frozenset(ovl.listxattr_at(fd, real)) or _NO_NAMES
        if len(self._xattr_names) >= XATTR_NAMES_KEPT:
            self._xattr_names.clear()
        self._xattr_names[node.ino] = (node.layers, names)
        return names

    def _xattr_source(self, node: Node) -> tuple[int, bytes | None]:
        """Where to read ``node``'s xattrs (the writable union prefers a file it has open for writing)."""
        return self.locate(node)

    def forget_xattrs(self, node: Node) -> None:
        """``node``'s xattr names changed (or its number is another object's now): read them again."""
        self._xattr_names.pop(node.ino, None)

    @staticmethod
    def _stored_xattr(name: str, refused: int = errno.ENODATA) -> str:
        """The name an xattr the user named is stored under; ours and overlayfs's are ``refused``."""
        stored = formats.escape_xattr(name)
        if formats.is_private_xattr(stored):
            raise OSError(refused, "reserved attribute" if refused == errno.EPERM else "no such attribute")
        return stored

    def listxattr(self, node: Node) -> list[str]:
        fd, real = self.locate(node)
        return formats.visible_xattrs(ovl.listxattr_at(fd, real))

    # --- directories ------------------------------------------------------------

    def list_names(self, node: Node, masks: list[int] | None = None) -> list[bytes]:
        """The merged listing of directory ``node`` (see :func:`readdir.merged_names`)."""
        return merged_names(self.stack, node, self._is_whiteout, masks)

    # --- data ------------------------------------------------------------------

    def open(self, node: Node, flags: int) -> "OpenFile":
        """Open ``node`` for reading (the writable layer overrides this for writes)."""
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise OSError(errno.EROFS, "read-only file system")
        if node.is_dir:
            raise OSError(errno.EISDIR, "is a directory")
        return OpenFile(node, self._open_real(node, os.O_RDONLY), writable=False)

    def _open_real(self, node: Node, flags: int, noatime: bool = False) -> int:
        if flags & (os.O_WRONLY | os.O_RDWR):
            fd, name = self.locate(node)
            lower = False
        else:
            fd, name = self.locate_data(node)
            lower = fd != self.index_fd and not self.stack.is_upper(node.layers[-1])
        flags &= ~(os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_APPEND | os.O_TRUNC)
        # Reading a lower file leaves its atime alone, as overlayfs (non-standard behaviour (a)).
        assert name is not None
        return ovl.open_at(fd, name, flags, noatime=lower or noatime)

    def read(self, f: "OpenFile", off: int, size: int) -> bytes:
        if self.fill is not None and not f.writable:
            self.fill(f.fd, off, size)
        return os.pread(f.fd, size, off)

    def slow_read(self, f: "OpenFile", off: int, size: int) -> Callable[[], bytes] | None:
        """The read as a job for a thread when it must first fetch lazy content, else None (read at
        once).  The job reads a duplicate of the fd: a copy-up meanwhile may close the handle's own."""
        fill = self.fill
        if fill is None or f.writable or not fill.pending(f.fd, off, size):
            return None
        fd = os.dup(f.fd)

        def job() -> bytes:
            try:
                fill(fd, off, size)
                return os.pread(fd, size, off)
            finally:
                os.close(fd)
        return job

    def prefill(self, node: Node) -> Callable[[], None] | None:
        """Before a change that copies ``node`` up: fetching its lazy content as a job for a thread,
        so the copy-up then finds it local and holds up nothing; None when nothing is to fetch."""
        fill = self.fill
        if fill is None or self.readonly or not stat.S_ISREG(node.mode):
            return None
        try:
            fd = self._open_real(node, os.O_RDONLY)
        except OSError:
            return None   # the change itself will say why
        try:
            size = ovl.fstat(fd).st_size
            if not fill.pending(fd, 0, size):
                os.close(fd)
                return None
        except BaseException:
            os.close(fd)
            raise

        def job() -> None:
            try:
                fill(fd, 0, size)
            finally:
                os.close(fd)
        return job

    def release(self, f: "OpenFile") -> None:
        os.close(f.fd)


@dataclass(eq=False)
class OpenFile:
    """An open file of the merged view: the real fd behind it follows the node's copy-up."""

    node: Node
    fd: int
    writable: bool
