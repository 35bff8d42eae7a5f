"""A lazy layer as a directory before its content is here: the tree from the eStargz TOC (or an
index's file table, :func:`materialize_members`) alone.

Every entry of the TOC is written by the extractor's own :class:`.extract.LayerWriter`
(the same checks against hostile names, the same whiteout and opaque conversion to
overlayfs's format, hard links, xattrs, implied directories, owners and modes), except
that a regular file gets its size as a hole (``ftruncate``) instead of its bytes: the
merged view's metadata is the extracted layer's from the first moment, and content is
written into the placeholders chunk by chunk as it is fetched and verified
(:mod:`unionfs.registry.lazy`).  ``stargz.index.json`` itself is written whole, as
extraction of the blob would write it.
"""
from __future__ import annotations

import io
import os
import tarfile
from typing import Iterable

from ..fs import formats
from ..fs import sys as ovl
from . import estargz
from .extract import LayerWriter, _ns

_TAR_TYPES = {"dir": tarfile.DIRTYPE, "reg": tarfile.REGTYPE, "symlink": tarfile.SYMTYPE,
              "hardlink": tarfile.LNKTYPE, "char": tarfile.CHRTYPE, "block": tarfile.BLKTYPE,
              "fifo": tarfile.FIFOTYPE}


class _Placeholders(LayerWriter):
    """A LayerWriter whose regular files are holes of their size (the TOC file excepted)."""

    def __init__(self, *args, toc: bytes | None, **kw) -> None:
        super().__init__(*args, **kw)
        self.toc = toc

    def extractfile(self, member: tarfile.TarInfo) -> io.BytesIO:   # the "tar" the TOC file is read from
        return io.BytesIO(self.toc)

    def _file(self, pfd: int, name: bytes, member: tarfile.TarInfo, tar) -> None:
        if self.toc is not None and member.name == estargz.TOC_NAME:
            return super()._file(pfd, name, member, self)
        fd = ovl.open_at(pfd, name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            ovl.ftruncate(fd, member.size)
            self._set_owner_xattrs(fd, None, member)
            ovl.fchmod(fd, member.mode & 0o7777)
            ovl.futimens(fd, (_ns(member), _ns(member)))
        finally:
            os.close(fd)


def tarinfo(e: estargz.Entry) -> tarfile.TarInfo:
    """The tar header the entry came from (as far as the TOC keeps it)."""
    ti = tarfile.TarInfo(e.name)
    ti.type = _TAR_TYPES[e.type]
    ti.mode, ti.uid, ti.gid, ti.size, ti.mtime = e.mode, e.uid, e.gid, e.size, estargz.parse_modtime(e.modtime)
    ti.linkname = e.link
    ti.devmajor, ti.devminor = e.dev
    ti.pax_headers = {"SCHILY.xattr." + k: v.decode("utf-8", "surrogateescape") for k, v in e.xattrs.items()}
    return ti


def materialize_members(members: Iterable[tarfile.TarInfo], root_fd: int, what: str) -> int:
    """Write the tree of a layer's tar headers (an index's file table, :mod:`.seekable`) below
    ``root_fd``, regular files as holes; returns the number of entries."""
    writer = _Placeholders(root_fd, what, formats.Style.default(), os.geteuid() == 0, 1 << 62, toc=None)
    try:
        for ti in members:
            writer.add(ti, writer)   # type: ignore[arg-type]
        writer.finish()
    finally:
        writer.close()
    return writer.entries


def materialize(entries: list[estargz.Entry], toc: bytes, root_fd: int, what: str) -> int:
    """Write the tree of ``entries`` below ``root_fd``; returns the number of entries."""
    style = formats.Style.default()
    writer = _Placeholders(root_fd, what, style, os.geteuid() == 0, 1 << 62, toc=toc)
    try:
        for e in entries:
            writer.add(tarinfo(e), writer)   # type: ignore[arg-type]
        toc_entry = tarfile.TarInfo(estargz.TOC_NAME)
        toc_entry.size, toc_entry.mode = len(toc), 0o644
        writer.add(toc_entry, writer)   # type: ignore[arg-type]
        writer.finish()
    finally:
        writer.close()
    return writer.entries
