"""A COPY/ADD/WORKDIR layer written directly as a tar, from what is copied and the image it lands on.

No mount is needed to add files: the layer holds every copied entry, and every
parent directory of the destination as the image has it (what a copy-up would
put in an upper dir) or, where the image has none, a new ``0755`` directory.  The
tar is deterministic (PAX, sorted, numeric owners, xattrs as ``SCHILY.xattr.``)
and becomes a layer of the store exactly as a loaded one
(:func:`unionfs.image.load.add_layer_tar`).
"""
from __future__ import annotations

import os
import stat
import tarfile
from dataclasses import dataclass
from typing import BinaryIO, Callable

from ..container.changeset import HashingWriter
from ..container.view import UnionView
from . import paths


@dataclass(frozen=True)
class Member:
    path: str                 # below the root, no leading "/"
    mode: int                 # st_mode
    uid: int
    gid: int
    mtime: int                # seconds
    link: str = ""            # a symlink's target, or a hard link's first path (with hardlink=True)
    xattrs: tuple[tuple[str, bytes], ...] = ()
    opener: Callable[[], BinaryIO] | None = None
    size: int = 0
    hardlink: bool = False
    rdev: int = 0


class ImageTree:
    """An image's merged view by path, for parents and ``COPY --from`` (symlinks resolved inside the image)."""

    def __init__(self, lower: list[str]) -> None:
        self.view = UnionView(lower) if lower else None

    def close(self) -> None:
        if self.view is not None:
            self.view.close()

    def stat(self, path: str):
        if self.view is None:
            return None
        if not path:
            return self.view.stat(b"")
        return self.view.stat(os.fsencode(path))

    def resolve(self, path: str, follow_last: bool = True) -> str:
        """``path`` with every symlink resolved as in a chroot of the image (``..`` stops at the root)."""
        def readlink(p: str) -> str | None:
            st = self.stat(p)
            return os.fsdecode(self.view.readlink(os.fsencode(p))) if st is not None and stat.S_ISLNK(st.mode) \
                else None
        return "/".join(paths.resolve(path, readlink, clamp=True, follow_last=follow_last))

    def member(self, path: str, as_path: str | None = None) -> Member:
        """The image's entry at ``path`` (resolved already) as a tar member named ``as_path``."""
        b = os.fsencode(path)
        st = self.view.stat(b)
        link = os.fsdecode(self.view.readlink(b)) if stat.S_ISLNK(st.mode) else ""
        xattrs = tuple(sorted(self.view.xattrs(b).items())) if not stat.S_ISLNK(st.mode) else ()
        opener = (lambda v=self.view, b=b: v.open(b)) if stat.S_ISREG(st.mode) else None
        return Member(as_path if as_path is not None else path, st.mode, st.uid, st.gid, st.mtime_ns // 10**9,
                      link, xattrs, opener, st.size if stat.S_ISREG(st.mode) else 0, rdev=st.rdev)

    def walk(self, path: str) -> list[tuple[str, Member]]:
        """Every entry below ``path`` as (path relative to it, member), parents first, names sorted."""
        out = []
        stack = [""]
        while stack:
            rel = stack.pop()
            full = f"{path}/{rel}".strip("/") if rel else path
            names = sorted(self.view.listdir(os.fsencode(full)))
            subdirs = []
            for n in names:
                r = f"{rel}/{os.fsdecode(n)}" if rel else os.fsdecode(n)
                f = f"{path}/{r}".strip("/") if path else r
                m = self.member(f)
                out.append((r, m))
                if stat.S_ISDIR(m.mode):
                    subdirs.append(r)
            stack += reversed(subdirs)
        return out


def _sort_key(path: str) -> list[bytes]:
    return [os.fsencode(p) for p in path.split("/") if p]


def write_tar(members: list[Member], out: BinaryIO, clamp: int | None = None) -> tuple[str, int]:
    """Write ``members`` (the last of each path wins) as a layer tar: (diff_id, size)."""
    by_path: dict[str, Member] = {}
    for m in members:
        by_path[m.path.strip("/")] = m
    written: set[str] = set()   # regular files in the tar so far: what a hard link can point to
    w = HashingWriter(out)
    tf = tarfile.open(fileobj=w, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8", errors="surrogateescape")
    for path in sorted(by_path, key=_sort_key):
        if not path:
            continue
        m = by_path[path]
        ti = tarfile.TarInfo(path)
        ti.mode = stat.S_IMODE(m.mode)
        ti.uid, ti.gid = m.uid, m.gid
        ti.mtime = m.mtime if clamp is None else min(m.mtime, clamp)
        if m.xattrs:
            ti.pax_headers = {"SCHILY.xattr." + k: v.decode("utf-8", "surrogateescape") for k, v in m.xattrs}
        fmt = stat.S_IFMT(m.mode)
        data = None
        if m.hardlink and m.link.strip("/") in written:
            ti.type, ti.linkname = tarfile.LNKTYPE, m.link.strip("/")
        elif m.hardlink or fmt == stat.S_IFREG:   # (a link whose first name was replaced: a file of its own)
            ti.type, ti.size = tarfile.REGTYPE, m.size
            data = m.opener() if m.opener is not None else None
            written.add(path)
        elif fmt == stat.S_IFDIR:
            ti.type = tarfile.DIRTYPE
        elif fmt == stat.S_IFLNK:
            ti.type, ti.linkname = tarfile.SYMTYPE, m.link
        elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
            ti.type = tarfile.CHRTYPE if fmt == stat.S_IFCHR else tarfile.BLKTYPE
            ti.devmajor, ti.devminor = os.major(m.rdev), os.minor(m.rdev)
        elif fmt == stat.S_IFIFO:
            ti.type = tarfile.FIFOTYPE
        else:
            continue   # sockets cannot be in a tar
        try:
            tf.addfile(ti, data)
        finally:
            if data is not None:
                data.close()
    tf.close()
    return w.digest, w.count
