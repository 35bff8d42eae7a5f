"""The changes in a container's writable layer, as ``docker diff`` shows them.

Computed from the upper dir, read directly (fd-relative, no symlink followed),
and classified against the image alone (``lower``) and the container's merged
view (``merged``), both :mod:`unionfs.container.view` objects:

* ``A path``: added, nothing of that name in the image;
* ``C path``: exists in the image and changed: copied up (data, metadata or
  xattrs), replaced by something else, or a directory containing changes (every
  directory of the upper dir is there because something below it changed, and
  the parents of every change are listed, as Docker does);
* ``D path``: deleted (a whiteout, or an entry the image has below a directory
  that now hides its lower contents).

Three things an upper dir says that a naive walk would miss:

* an opaque directory (``overlay.opaque=y``) hides all the image has below it:
  whatever the image has there and the merged view lacks is ``D``; what the
  directory holds now is ``A`` or, where the image had the same name, ``C``;
* a renamed directory (``overlay.redirect=/old/path``) has its contents at the
  old path of the lower layers.  OCI has no renames: it is ``D old`` and ``A new``
  (or ``C new``) with *every* entry below it, read from the merged view (a naive
  diff of that subtree), and like an opaque dir it hides the image's ``new``;
* a lower file with several hard links is copied up once into the work dir's
  index: its other names, untouched in the upper dir, show the new data in the
  merged view, so they are ``C`` too (found by inode number, only when the index
  is not empty).

:class:`Changes` keeps, besides the list, which directories replace the image's
(``replaced``): ``commit`` writes them with an opaque marker.
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field

from ..fs import formats
from ..fs import sys as ovl
from ..fs import upper as upper_dir
from .view import split

ADDED, CHANGED, DELETED = "A", "C", "D"


def join(parent: bytes, name: bytes) -> bytes:
    return parent + b"/" + name if parent else name


def sort_key(path: bytes) -> list[bytes]:
    """Parents before children, names in byte order: the order of ``diff`` and of the layer tar."""
    return split(path)


@dataclass
class Changes:
    kinds: dict[bytes, str] = field(default_factory=dict)     # path -> A | C | D
    replaced: set[bytes] = field(default_factory=set)         # dirs hiding all the image has below them

    def add(self, path: bytes, kind: str) -> None:
        self.kinds.setdefault(path, kind)

    def sorted(self) -> list[tuple[str, bytes]]:
        return [(self.kinds[p], p) for p in sorted(self.kinds, key=sort_key)]

    def lines(self) -> list[str]:
        return [f"{k} /{os.fsdecode(p)}" for k, p in self.sorted()]


class _Walker:
    def __init__(self, lower, merged) -> None:
        self.lower = lower
        self.merged = merged
        self.out = Changes()
        self.redirects: list[bytes] = []

    def classify(self, path: bytes) -> None:
        self.out.add(path, CHANGED if self.lower.stat(path) is not None else ADDED)

    def hidden_lower(self, path: bytes) -> None:
        """The image's entries below ``path`` that the merged view no longer has: deleted."""
        st = self.lower.stat(path)
        if st is None or not st.is_dir:
            return
        now = set(self.merged.listdir(path)) if self._merged_is_dir(path) else set()
        for name in self.lower.listdir(path):
            if name not in now:
                self.out.add(join(path, name), DELETED)

    def _merged_is_dir(self, path: bytes) -> bool:
        st = self.merged.stat(path)
        return st is not None and st.is_dir

    def walk_upper(self, ufd: int, path: bytes, below_replaced: bool) -> None:
        with ovl.scandir(ufd) as it:
            names = sorted(os.fsencode(e.name) for e in it)
        for name in names:
            p = join(path, name)
            st = ovl.lstat_at(ufd, name)
            if formats.is_whiteout_at(ufd, name, st):
                if not below_replaced and self.lower.stat(p) is not None:
                    self.out.add(p, DELETED)
                continue
            if formats.is_oci_marker(name):
                continue   # never written by the writable layer; never part of the view
            self.classify(p)
            if not stat.S_ISDIR(st.st_mode):
                continue
            redirect = None
            for x in formats.REDIRECT_NAMES:
                redirect = redirect or ovl.getxattr_or_none(ufd, name, x)
            if redirect:
                target = redirect.strip(b"/") if redirect.startswith(b"/") else join(path, redirect)
                self.redirects.append(target)
                self.out.replaced.add(p)
                self.hidden_lower(p)
                self.walk_merged(p)
                continue
            values = {x: v for x in formats.OPAQUE_NAMES if (v := ovl.getxattr_or_none(ufd, name, x)) is not None}
            opaque = formats.dir_kind_from_xattrs(values) is formats.DirKind.OPAQUE
            if opaque and not below_replaced:
                self.out.replaced.add(p)
                self.hidden_lower(p)
            cfd = ovl.open_dir_at(ufd, name)
            try:
                self.walk_upper(cfd, p, below_replaced or opaque)
            finally:
                os.close(cfd)

    def walk_merged(self, path: bytes) -> None:
        """Everything below ``path`` in the merged view (a renamed directory: OCI cannot say "moved")."""
        for name in sorted(self.merged.listdir(path)):
            p = join(path, name)
            self.classify(p)
            st = self.merged.stat(p)
            if st is not None and st.is_dir:
                self.walk_merged(p)

    def redirect_origins(self) -> None:
        for target in self.redirects:
            head = target.rpartition(b"/")[0]
            if self.lower.stat(target) is not None and self.merged.stat(target) is None and \
                    (not head or self._merged_is_dir(head)):
                self.out.add(target, DELETED)

    def indexed_links(self, inos: set[int]) -> None:
        """Image names of hard-linked files copied up through another name show the new data: changed."""
        stack = [b""]
        while stack:
            d = stack.pop()
            for name in self.lower.listdir(d):
                p = join(d, name)
                st = self.lower.stat(p)
                if st is None:
                    continue
                if st.is_dir:
                    stack.append(p)
                elif st.nlink > 1 and p not in self.out.kinds:
                    m = self.merged.stat(p)
                    if m is not None and not m.is_dir and m.ino in inos:
                        self.out.add(p, CHANGED)

    def parents(self) -> None:
        for p in list(self.out.kinds):
            parts = split(p)
            for i in range(1, len(parts)):
                anc = b"/".join(parts[:i])
                if anc not in self.out.kinds:
                    self.classify(anc)


def index_inodes(work: str | None) -> set[int]:
    """Inode numbers of the merged view whose data lives in the work dir's hard-link index.

    Entries are named by their origin's file handle (the kernel's form): the number is the one we
    keep in ``unionfs.origin``; entries of the form before it were named by the number itself.
    """
    if not work:
        return set()
    try:
        fd = os.open(os.path.join(work, os.fsdecode(upper_dir.WORK_INDEX)), ovl.O_DIR & ~os.O_NOFOLLOW)
    except (FileNotFoundError, NotADirectoryError):
        return set()
    out = set()
    try:
        for n in os.listdir(fd):
            name = os.fsencode(n)
            meta = None
            for attr in formats.META_NAMES:
                meta = formats.UpperMeta.decode(ovl.getxattr_or_none(fd, name, attr))
                if meta is not None:
                    break
            fh = formats.OverlayFh.from_index_name(name)
            if meta is not None and meta.ino is not None:
                out.add(meta.ino)
            elif fh is not None:
                # Indexed by kernel overlayfs: numbered after the lower inode its handle names (the
                # layers share the upper dir's filesystem in a store; root only).
                try:
                    ofd = ovl.open_by_handle_at(fd, fh.type, fh.fid)
                except OSError:
                    continue
                try:
                    out.add(os.fstat(ofd).st_ino)
                finally:
                    os.close(ofd)
            else:
                ino = upper_dir.parse_index_name(name)
                if ino is not None:
                    out.add(ino)
    finally:
        os.close(fd)
    return out


def changes(upper: str, work: str | None, lower, merged) -> Changes:
    """The changes of the writable layer ``upper`` (with its ``work`` dir) over ``lower``, seen as ``merged``."""
    w = _Walker(lower, merged)
    ufd = os.open(upper, ovl.O_DIR & ~os.O_NOFOLLOW)
    try:
        values = {x: v for x in formats.OPAQUE_NAMES if (v := ovl.getxattr_or_none(ufd, None, x)) is not None}
        root_opaque = formats.dir_kind_from_xattrs(values) is formats.DirKind.OPAQUE
        if root_opaque:
            w.out.replaced.add(b"")
            w.hidden_lower(b"")
        w.walk_upper(ufd, b"", root_opaque)
    finally:
        os.close(ufd)
    w.redirect_origins()
    inos = index_inodes(work)
    if inos:
        w.indexed_links(inos)
    w.parents()
    return w.out

