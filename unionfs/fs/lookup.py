"""Lookup: how a name resolves down the layers (overlayfs's ``namei.c``), in plain Python.

Lookups resolve top down, directories merge until an opaque one, the first
non-directory hides everything below, whiteouts (of every form
:mod:`formats` reads) hide names below their layer, and ``overlay.redirect``
sends the walk of the layers below elsewhere.  Owns the merged inode's
identity (its number after its origin) and where a node lives in each layer.
Mixed into :class:`~unionfs.fs.union.Union` (``self`` is that union: its stack
and inode table); it must not write to a layer, build attributes or know FUSE.
"""
from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass

from . import formats
from . import sys as ovl
from .formats import UpperMeta
from .inodes import Node


@dataclass(slots=True)
class _Lookup:
    """One name's lookup down the layers (overlayfs's ``ovl_lookup_data``)."""

    first: bytes                  # the name asked for
    name: bytes = b""             # what the next layer looks up: a name in the parent, or b"/a/path"
    is_dir: bool = False          # the topmost instance is a directory
    stop: bool = False            # nothing below counts
    redirect: bytes | None = None  # the last redirect read, as stored (None: ``name`` is still ``first``)
    metacopy: bool = False        # the topmost instance is a metacopy file: its data is further down
    data: bool = False            # ... and a layer below had the data

    def __post_init__(self) -> None:
        self.name = self.first


def _check_redirect(target: bytes) -> None:
    """overlayfs refuses (EINVAL) an absolute redirect with an empty element and a relative one with a slash."""
    if target[:1] == b"/":
        if any(not part for part in target[1:].split(b"/")):
            raise OSError(errno.EINVAL, "invalid redirect")
    elif b"/" in target:
        raise OSError(errno.EINVAL, "invalid redirect")


class Lookup:
    """Resolution of names down a union's layers; the union supplies ``stack``, ``inodes``, ``root``
    and the ``_tuples``/``_modes`` interning tables (see ``Union.__init__``)."""

    def _dir_kind(self, index: int, pfd: int, name: bytes | None, oci_opaque: bool = True
                  ) -> tuple[formats.DirKind, list[str]]:
        """Opaque markers of directory ``name`` in ``pfd`` (the dir ``pfd`` itself if name is None),
        and the names of its xattrs (one listxattr answers most questions about a directory).
        Without ``oci_opaque`` (the last layer of a walk) no ``.wh..wh..opq`` is looked for unless a
        redirect could lead the walk on: it would hide nothing."""
        names = ovl.listxattr_at(pfd, name)
        values = {}
        for xname in formats.OPAQUE_NAMES:
            if xname in names:
                v = ovl.getxattr_or_none(pfd, name, xname)
                if v is not None:
                    values[xname] = v
        kind = formats.dir_kind_from_xattrs(values)
        if kind is formats.DirKind.OPAQUE or not self.stack.layers[index].oci_whiteouts or (
                not oci_opaque and not any(x in formats.REDIRECT_NAMES for x in names)):
            return kind, names
        try:
            if name is None:
                opq = ovl.exists_at(pfd, formats.WH_OPAQUE)
            elif not self.stack.is_upper(index):
                opq = ovl.exists_beneath(pfd, name + b"/" + formats.WH_OPAQUE)
            else:
                fd = ovl.open_dir_at(pfd, name)
                try:
                    opq = ovl.exists_at(fd, formats.WH_OPAQUE)
                finally:
                    os.close(fd)
        except OSError:
            opq = False
        return (formats.DirKind.OPAQUE if opq else kind), names

    def _is_whiteout(self, index: int, parent: Node, pfd: int, name: bytes, st: os.stat_result) -> bool:
        if formats.is_chardev_whiteout(st):
            return True
        if index in parent.xwh and formats.may_be_xwhiteout(st):
            for xname in formats.XWHITEOUT_NAMES:
                if ovl.getxattr_or_none(pfd, name, xname) is not None:
                    return True
        return False

    def resolve(self, parent: Node, name: bytes, mask: int | None = None) -> Node | None:
        """Resolve ``name`` in directory ``parent`` across the layers; None if it does not exist.

        ``mask``, from a listing of ``parent`` that is still current, says in which layers the
        name is (whiteouts already applied): the others need no syscall.  The returned node is
        not yet in the inode table (see :meth:`lookup`).
        """
        found = self._resolve(parent, name, mask)
        return found[0] if found is not None else None

    def _resolve(self, parent: Node, name: bytes, mask: int | None) -> tuple[Node, os.stat_result] | None:
        """:meth:`resolve`, with the stat of the topmost instance it made on the way.

        The walk down the layers is overlayfs's (``namei.c``, ``ovl_lookup``): in each layer of the
        parent the name is looked up; a directory's redirect, in any layer, changes what is looked
        up below it (a relative one: another name in the parent; an absolute one: a path walked
        from the root of every layer below, whose own redirects, whiteouts and opaque dirs count).
        """
        if formats.is_oci_marker(name):
            return None
        d = _Lookup(name)
        found: list[tuple[int, bytes | None, os.stat_result]] = []
        xwh: list[int] = []
        meta: UpperMeta | None = None
        redirect: bytes | None = None
        top_at: tuple[int, int, bytes] = (0, -1, name)   # layer, directory fd, name of the top instance
        attr: tuple[int, os.stat_result] | None = None  # a directory's topmost instance that is not implied
        bottom = len(self.stack.layers) - 1
        candidates = parent.layers
        from_root = False
        i = 0
        while i < len(candidates) and not d.stop:
            index = candidates[i]
            i += 1
            if mask is not None and d.redirect is None and not (mask >> index) & 1:
                continue
            # A `.wh.` probe in the last layer of the walk would hide nothing: none is made there.
            more = i < len(candidates)
            hit = self._lookup_layer(index, parent, d, index == bottom, mask is None and more, more)
            upper = self.stack.is_upper(index)
            if hit is not None:
                where, pfd, real, st, kind, implied = hit
                if not found:
                    top_at = (index, pfd, real)
                found.append((index, None if where == name or upper else where, st))
                if upper and not stat.S_ISDIR(st.st_mode):
                    meta = self._upper_meta(pfd, real)
                if stat.S_ISDIR(st.st_mode) and attr is None and not implied:
                    attr = (index, st)
                if kind is formats.DirKind.XWHITEOUTS:
                    xwh.append(index)
                if kind is formats.DirKind.OPAQUE and attr is None and d.redirect is None:
                    attr = self._real_dir_below(parent, name, list(candidates[i:]))
                if upper and d.redirect is not None:
                    redirect = self._absolute_redirect(parent, d.redirect)
            if d.stop:
                break
            if d.name[:1] == b"/" and not from_root:
                # An absolute redirect: every layer below this one, from its root.
                from_root = True
                candidates = [j for j in self.root.layers if j > index]
                i = 0
        if not found:
            return None
        if d.metacopy:
            if not d.data:  # as overlayfs: "metacopy with no lower data found"
                raise OSError(errno.EIO, "metacopy file without its lower data")
            found = [found[0], found[-1]]  # where the attributes are, and where the data is
        top = found[0][2]
        origin = None
        for index, _, st in found:
            if not self.stack.is_upper(index):
                origin = st
                break
        ino, indexed = self._identify(top, top_at, origin, meta)
        # A million nodes share a handful of distinct layer tuples: keep one of each.
        layer_tuple = (found[0][0],) if len(found) == 1 else tuple([f[0] for f in found])
        layer_tuple = self._tuples.setdefault(layer_tuple, layer_tuple)
        attr_layer = None
        if attr is not None and attr[0] != layer_tuple[0] and d.redirect is None:
            attr_layer, top = attr  # a directory only implied by the layers above: attributes from below
        mode = self._modes.setdefault(top.st_mode, top.st_mode)
        node = Node(ino, parent, name, layer_tuple, mode, tuple(xwh) if xwh else (), redirect)
        for f in found:
            if f[1] is not None:
                node.paths = tuple([f[1] for f in found])
                break
        if indexed:
            node.indexed = True
        if attr_layer is not None:
            node.attr_layer = attr_layer
        return node, top

    def _real_dir_below(self, parent: Node, name: bytes, below: list[int]) -> tuple[int, os.stat_result] | None:
        """The directory an implied, opaque one stands on: its own opaque marker hides what
        is below it, not the directory itself (as ``umoci unpack`` empties it and keeps it)."""
        for index in below:
            pfd, st, whited_out = self._probe(index, parent, name)
            if st is None:
                if whited_out:
                    return None
                continue
            if self._is_whiteout(index, parent, pfd, name, st) or not stat.S_ISDIR(st.st_mode):
                return None
            if not formats.is_implied(ovl.listxattr_at(pfd, name)):
                return index, st
        return None

    def _lookup_layer(self, index: int, parent: Node, d: "_Lookup", bottom: bool, oci_probe: bool,
                      more: bool = True
                      ) -> tuple[bytes, int, bytes, os.stat_result, formats.DirKind | None, bool] | None:
        """Look ``d.name`` up in layer ``index`` (overlayfs's ``ovl_lookup_layer``).

        Returns where it is (a name in the parent's dir, or b"/path"), the dir fd and name of the
        entry, its stat, its directory kind and whether it is a directory the layer only implies;
        None if this layer does not have it.
        """
        if d.name[:1] != b"/":
            pfd, real = self.stack.dir_fd(index, parent), d.name
            hit = self._lookup_single(index, pfd, real, d, 0, b"", bottom, index in parent.xwh, more=more)
            if not d.stop and oci_probe and d.redirect is None and self._oci_whiteout_at(index, pfd, real):
                d.stop = True  # a `.wh.` entry (OCI, fuse-overlayfs) hides what lower layers have of it
            if hit is None:
                return None
            return real, pfd, real, *hit
        comps = d.name[1:].split(b"/")
        fd = self.stack.layers[index].fd
        walked: list[bytes] = []
        for k, comp in enumerate(comps):
            last = k == len(comps) - 1
            post = b"".join(b"/" + c for c in comps[k + 1:])
            prelen = len(d.name) - len(post) - len(comp)
            hit = self._lookup_single(index, fd, comp, d, prelen, post, bottom, True, last)
            if hit is None:
                return None
            walked.append(comp)
            if last:
                return b"/" + b"/".join(walked), fd, comp, *hit
            try:
                fd = self.stack.path_fd(index, b"/".join(walked))
            except (FileNotFoundError, NotADirectoryError):
                return None
        return None

    def _lookup_single(self, index: int, pfd: int, name: bytes, d: "_Lookup", prelen: int, post: bytes,
                       bottom: bool, xwh_dir: bool, last: bool = True, more: bool = True
                       ) -> tuple[os.stat_result, formats.DirKind | None, bool] | None:
        """One path element in one layer (overlayfs's ``ovl_lookup_single``): whiteouts and
        non-directories stop the walk, opaque dirs stop it below, a redirect rewrites ``d.name``.
        Returns its stat, its directory kind and whether the layer only implies the directory."""
        if name in (b".", b".."):
            raise OSError(errno.EACCES, "redirect through . or ..")
        try:
            st = ovl.lstat_at(pfd, name)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as e:
            if e.errno == errno.ENAMETOOLONG:
                return None
            raise
        if formats.is_chardev_whiteout(st) or (
                xwh_dir and formats.may_be_xwhiteout(st) and formats.is_whiteout_at(pfd, name, st)):
            d.stop = True
            return None
        if not stat.S_ISDIR(st.st_mode):
            if d.is_dir or not last or (d.metacopy and not stat.S_ISREG(st.st_mode)):
                d.stop = True  # a non-directory below a directory is hidden, data must be a file
                return None
            if not bottom and formats.may_be_metacopy(st) and formats.is_metacopy_at(pfd, name):
                # As ovl_lookup with metacopy: the data is below, at the same path or the redirect.
                d.metacopy = True
                target = self._read_redirect(pfd, name)
                if target is not None:
                    _check_redirect(target)
                    d.name = target if target[:1] == b"/" else d.name[:prelen] + target
                    d.redirect = target
                return st, None, False
            d.stop = True
            d.data = d.metacopy
            return st, None, False
        if last:
            d.is_dir = True
        # In the last layer of the walk an OCI opaque marker hides nothing (unless a redirect
        # leads on below, which an opaque dir does not follow): not looked for there.
        kind, xnames = self._dir_kind(index, pfd, name, oci_opaque=more)
        implied = formats.is_implied(xnames)
        if kind is formats.DirKind.OPAQUE:
            d.stop = True
            return st, kind, implied
        if not bottom and any(x in formats.REDIRECT_NAMES for x in xnames):
            target = self._read_redirect(pfd, name)
            if target is not None:
                _check_redirect(target)
                if target[:1] == b"/":
                    d.stop = False  # an ancestor on the walk may have been opaque: this goes on
                    d.name = target + post
                else:
                    d.name = d.name[:prelen] + target + post
                d.redirect = target
        return st, kind, implied

    def _probe(self, index: int, parent: Node, name: bytes) -> tuple[int, os.stat_result | None, bool]:
        """``name`` in layer ``index`` under ``parent``: the directory's fd there, the entry's lstat
        (None where there is none), and whether a ``.wh.`` entry whites it out there."""
        pfd = self.stack.dir_fd(index, parent)
        try:
            return pfd, ovl.lstat_at(pfd, name), False
        except (FileNotFoundError, NotADirectoryError):
            return pfd, None, self._oci_whiteout_at(index, pfd, name)

    def _oci_whiteout_at(self, index: int, pfd: int, name: bytes) -> bool:
        """Does layer ``index`` white ``name`` out with a ``.wh.`` entry in ``pfd``?"""
        if not self.stack.layers[index].oci_whiteouts:
            return False
        probe = formats.oci_whiteout_probe(name)
        return probe is not None and ovl.exists_at(pfd, probe)

    # Hooks for the writable layer; a read-only stack has no upper metadata or index.
    def _upper_meta(self, pfd: int, name: bytes) -> "UpperMeta | None":
        return None

    def _read_redirect(self, pfd: int, name: bytes) -> bytes | None:
        for prefix in (formats.TRUSTED_PREFIX, formats.USER_PREFIX):
            v = ovl.getxattr_or_none(pfd, name, prefix + formats.Xattr.REDIRECT.value)
            if v:
                return v
        return None

    def _identify(self, top: os.stat_result, top_at: tuple[int, int, bytes], origin: os.stat_result | None,
                  meta: "UpperMeta | None") -> tuple[int, bool]:
        """The merged inode number of a resolved object, and whether its data lives in the index."""
        if meta is not None and meta.ino is not None:
            return meta.ino, False
        o = origin or top
        return self.inodes.ino_for(o.st_dev, o.st_ino), False

    def index_entry(self, node: Node) -> bytes:
        """Name of an indexed node's entry in the index dir (only a writable union has one)."""
        raise OSError(errno.EROFS, "no index")

    def _absolute_redirect(self, parent: Node, target: bytes) -> bytes:
        """overlayfs redirects are absolute (``/a/b``) or a name in the same parent."""
        if target.startswith(b"/"):
            return target.strip(b"/")
        base = self.lower_path(parent)
        return base + b"/" + target if base else target

    def lower_path(self, node: Node) -> bytes:
        """Where ``node`` lives in the lower layers (its path, unless it or a parent was renamed)."""
        parts: list[bytes] = []
        n: Node | None = node
        while n is not None and n.parent is not None:
            if n.redirect is not None:
                parts.append(n.redirect)
                break
            parts.append(n.name)
            n = n.parent
        return b"/".join(reversed(parts))

    def locate_in(self, node: Node, index: int) -> tuple[int, bytes]:
        """Where ``node`` is in layer ``index``: (fd of the directory holding it, its name there)."""
        where = node.where(index)  # a metacopy file's data may be elsewhere too
        if where[:1] == b"/":
            head, _, tail = where[1:].rpartition(b"/")
            return self.stack.path_fd(index, head), tail
        return self.stack.parent_fd(index, node), where

    def layer_path(self, node: Node, index: int) -> bytes:
        """The path of directory ``node`` from the root of layer ``index`` (one of its layers)."""
        parts: list[bytes] = []
        n: Node | None = node
        while n is not None and n.parent is not None:
            where = n.where(index)
            if where[:1] == b"/":
                parts.append(where[1:])
                break
            parts.append(where)
            n = n.parent
        return b"/".join(reversed(parts))
