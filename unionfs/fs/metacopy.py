"""Metadata-only copy-up, as overlayfs's ``metacopy=on`` (``Documentation/filesystems/overlayfs.rst``,
"Metadata only copy up"; ``fs/overlayfs/copy_up.c``).

A chmod, chown, utimes or xattr change of a lower regular file copies no data: the upper inode is
built (in the work dir, linked into place, as any copy-up of a file) with the lower file's owner, mode,
times, xattrs and size, but no data blocks (sparse), and carries ``overlay.metacopy`` (empty: what
kernel 6.x writes without fs-verity) and ``overlay.origin``.  It has the path of the lower instance
it was copied from, so it needs no redirect: a lookup meets that instance next (and, if it is a
metacopy file too, follows its redirect on).  A rename or a link of a metacopy file sets an
absolute ``overlay.redirect`` to that lower path, as ``ovl_set_redirect`` does (xattrs are the
inode's, so every name of it finds the data).  Lookup (:mod:`lookup`) follows such files down to
their data exactly as ``ovl_lookup`` does, in the upper layer and in lower layers the kernel wrote;
the node's layers are then ``(attributes, data)``.

The first open for write, or a truncate, copies the data up (:func:`copy_data_up`): into the upper
inode in place, as ``ovl_copy_up_meta_inode_data`` does, so that every hard link of it sees the
data; ``overlay.metacopy`` goes only once the data is complete (and on disk, unless the mount is
volatile), so a crash at any moment leaves either a metacopy file whose lower data still shows, or
the whole copy.

Not metadata-only (the data is copied as before): lower hard links (they go through the index),
empty files (no data to share), opens with ``O_TRUNC``.  No FUSE here; the writable union decides
when (:mod:`writable`), the copy-up builds the entry (:mod:`copyup`).
"""
from __future__ import annotations

import logging
import os
import stat
from typing import Protocol

from . import formats
from . import sys as ovl
from .inodes import Node
from .upper import Upper

log = logging.getLogger("unionfs.metacopy")


class WritableUnion(Protocol):
    """What this module uses of :class:`~unionfs.fs.writable.WritableUnion` (which imports it)."""

    upper: Upper
    changed: set[int]

    @property
    def copy_up(self): ...
    def locate(self, node: Node) -> tuple[int, bytes | None]: ...
    def locate_data(self, node: Node) -> tuple[int, bytes | None]: ...
    def layer_path(self, node: Node, index: int) -> bytes: ...
    def lower_path(self, node: Node) -> bytes: ...
    def reopen_readers(self, node: Node) -> None: ...


def wanted(st: os.stat_result, index: bytes | None, truncate: bool) -> bool:
    """May this copy-up leave the data below? Only a single-link regular file with data."""
    return stat.S_ISREG(st.st_mode) and st.st_size > 0 and index is None and not truncate


def data_where(node: Node) -> tuple[int, bytes | None]:
    """The layer holding ``node``'s data now, and its path there when that is not the node's
    own name (b"/path" from the layer's root, or another name in the parent)."""
    where = node.paths[-1] if node.paths is not None else None
    return node.layers[-1], where


def mark(up: Upper, fd: int, name: bytes) -> None:
    """Mark the upper inode being built as metadata only.  No redirect: it has the path of the
    lower instance it was copied from, which a lookup meets next (and that one's own redirect, if it
    is a metacopy file too, leads on), as the kernel's copy-up does."""
    ovl.setxattr_at(fd, name, up.metacopy_xattr, formats.METACOPY_VALUE)


def copied_up(node: Node, data: tuple[int, bytes | None]) -> None:
    """``node`` now has its attributes in the upper layer and its data still at ``data``."""
    layer, where = data
    node.layers = (0, layer)
    node.paths = None if where is None else (None, where)


def pin_data(w: WritableUnion, node: Node) -> None:
    """Before a metacopy file gets a name elsewhere (rename, link): an absolute redirect to where
    lower layers have it (the path it was copied up from), as overlayfs sets one
    (``ovl_set_redirect``), so every name of the inode finds its data; and this mount's own note of
    the data's place, from the layer's root."""
    assert node.parent is not None
    layer, where = data_where(node)
    if where is None or where[:1] != b"/":
        base = w.layer_path(node.parent, layer)
        name = where if where is not None else node.name
        node.paths = (None, b"/" + (base + b"/" + name if base else name))
    path = node.redirect if node.redirect is not None else w.lower_path(node)
    fd, real = w.locate(node)
    ovl.setxattr_at(fd, real, w.upper.redirect_xattr, b"/" + path)
    node.redirect = path


def copy_data_up(w: WritableUnion, node: Node, keep_data: bool = True) -> None:
    """The first write (or truncate) of a metacopy file: its data into the upper inode, then the
    mark goes.  ``keep_data`` False: the data would be truncated away, copy none."""
    fd, name = w.locate(node)
    assert name is not None
    dfd, dname = w.locate_data(node)
    assert dname is not None
    st = ovl.lstat_at(fd, name)
    caps = ovl.getxattr_or_none(fd, name, "security.capability")  # writing data drops it
    dst = ovl.open_at(fd, name, os.O_WRONLY)
    try:
        if keep_data:
            w.copy_up.copy_data(dfd, dname, dst, st.st_size)
        else:
            ovl.ftruncate(dst, 0)
        w.upper.sync_data(dst)   # the data on disk before the mark goes
        ovl.futimens(dst, (st.st_atime_ns, st.st_mtime_ns))  # copying is not a change the user made
    finally:
        os.close(dst)
    if caps is not None and ovl.getxattr_or_none(fd, name, "security.capability") is None:
        ovl.setxattr_at(fd, name, "security.capability", caps)
    for x in formats.METACOPY_NAMES:   # last: from now on the upper inode has the data
        if ovl.getxattr_or_none(fd, name, x) is not None:
            ovl.removexattr_at(fd, name, x)
    log.debug("metacopy data up %r", node)
    node.layers = (0,)
    node.paths = None
    w.changed.add(node.ino)
    w.reopen_readers(node)
