"""A container's changes as an OCI layer tar (image-spec ``layer.md``, "changesets").

Given the :class:`unionfs.container.diff.Changes` and the merged view, write:

* every added or changed path with its content and metadata as the merged view
  shows it (type, mode with setuid/setgid/sticky, numeric uid/gid, mtime in whole
  seconds, symlink target, device numbers; no user/group names, no atime/ctime);
* ``dir/.wh.name`` (an empty regular file, mode 0, mtime 0) for a deleted path, except
  below an opaque directory, whose marker hides it already;
* ``dir/.wh..wh..opq`` right after a directory that hides everything the image
  has below it (opaque, or renamed: then its whole merged content follows);
* files that are hard links of one another in the merged view (same inode
  number), as tar hard links to the first of them in the tar;
* xattrs as PAX ``SCHILY.xattr.NAME`` records, overlay/unionfs bookkeeping never.

The output is deterministic: members sorted by path (parents first, then names
byte by byte), xattrs by name, PAX format, nothing taken from the clock or the
host's user database.  So the same changes give the same bytes, the same diff_id.
Sockets cannot be in a tar and are left out (reported through ``skipped``).
"""
from __future__ import annotations

import hashlib
import os
import stat
import tarfile
from dataclasses import dataclass, field
from typing import BinaryIO

from ..fs import formats
from .diff import DELETED, Changes, sort_key
from .view import split


class HashingWriter:
    """A write-only stream that hashes (sha256) and counts what goes through it."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.hash = hashlib.sha256()
        self.count = 0

    def write(self, data) -> int:
        self.raw.write(data)
        self.hash.update(data)
        self.count += len(data)
        return len(data)

    def tell(self) -> int:
        return self.count

    def flush(self) -> None:
        self.raw.flush()

    @property
    def digest(self) -> str:
        return "sha256:" + self.hash.hexdigest()


@dataclass
class Written:
    diff_id: str
    size: int
    entries: int
    skipped: list[str] = field(default_factory=list)


def _name(parts: list[bytes]) -> str:
    return os.fsdecode(b"/".join(parts))


def _pax_value(value: bytes) -> str:
    return value.decode("utf-8", "surrogateescape")


def write_changeset(changes: Changes, view, out: BinaryIO, clamp_mtime: int | None = None) -> Written:
    """Write the layer tar of ``changes`` (read from ``view``, the merged view) to ``out``; ``clamp_mtime``
    (``SOURCE_DATE_EPOCH`` of a build) caps every mtime, so the same changes made later give the same tar."""
    members: list[tuple[list[bytes], bytes, bool]] = []   # (sort key, path, is a whiteout)
    for kind, path in changes.sorted():
        parts = sort_key(path)
        if kind == DELETED:
            if path.rpartition(b"/")[0] in changes.replaced:
                continue   # the opaque marker hides it already (and overlayfs lists whiteouts in opaque dirs)
            members.append((parts[:-1] + [formats.WH_PREFIX + parts[-1]], path, True))
        else:
            members.append((parts, path, False))
    for path in changes.replaced:
        members.append((split(path) + [formats.WH_OPAQUE], path, True))
    members.sort(key=lambda m: m[0])

    w = HashingWriter(out)
    tf = tarfile.open(fileobj=w, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8", errors="surrogateescape")
    first_of_inode: dict[int, str] = {}
    skipped: list[str] = []
    count = 0
    for key, path, marker in members:
        name = _name(key)
        if marker:
            ti = tarfile.TarInfo(name)
            ti.type, ti.mode, ti.mtime, ti.size = tarfile.REGTYPE, 0, 0, 0
            tf.addfile(ti)
            count += 1
            continue
        st = view.stat(path)
        if st is None:   # gone meanwhile (a mounted container still in use)
            skipped.append(f"/{name}: vanished while committing")
            continue
        ti = tarfile.TarInfo(name)
        ti.mode = stat.S_IMODE(st.mode)
        ti.uid, ti.gid = st.uid, st.gid
        ti.mtime = st.mtime_ns // 1_000_000_000
        if clamp_mtime is not None:
            ti.mtime = min(ti.mtime, clamp_mtime)
        xattrs = view.xattrs(path)
        if xattrs:
            ti.pax_headers = {"SCHILY.xattr." + k: _pax_value(v) for k, v in sorted(xattrs.items())}
        fmt = stat.S_IFMT(st.mode)
        data = None
        if fmt == stat.S_IFDIR:
            ti.type = tarfile.DIRTYPE
        elif fmt == stat.S_IFLNK:
            ti.type = tarfile.SYMTYPE
            ti.linkname = os.fsdecode(view.readlink(path))
        elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
            ti.type = tarfile.CHRTYPE if fmt == stat.S_IFCHR else tarfile.BLKTYPE
            ti.devmajor, ti.devminor = os.major(st.rdev), os.minor(st.rdev)
        elif fmt == stat.S_IFIFO:
            ti.type = tarfile.FIFOTYPE
        elif fmt == stat.S_IFREG:
            if st.nlink > 1 and st.ino in first_of_inode:
                ti.type = tarfile.LNKTYPE
                ti.linkname = first_of_inode[st.ino]
            else:
                if st.nlink > 1:
                    first_of_inode[st.ino] = name
                ti.type = tarfile.REGTYPE
                ti.size = st.size
                data = view.open(path)
        else:
            skipped.append(f"/{name}: a socket cannot be stored in a layer")
            continue
        try:
            tf.addfile(ti, data)
        finally:
            if data is not None:
                data.close()
        count += 1
    tf.close()
    return Written(w.digest, w.count, count, skipped)
