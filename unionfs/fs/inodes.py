"""The inode table: merged-view objects, their inode numbers, and the kernel's lookup counts.

Inode numbers follow kernel overlayfs: a merged object is numbered after its
*origin*, the real inode it was first found as (the topmost lower instance, or
the upper one for objects created through the mount).  When every layer is on
one filesystem the number is the real st_ino itself; otherwise the layer
filesystem's index goes in the top byte (overlayfs's ``xino``).  So numbers are
unique across the view, identical for hard links, unchanged by copy-up and the
same after a remount.

A node stays in the table while the kernel holds lookups on it or while one of
its children is in the table (a child's path goes through its parent), which is
how the kernel's own dentry tree pins parents.

The kernel keeps every entry it was told about (a ``find`` over a million files
leaves a million lookups) until memory pressure makes it forget them, so with
``max_nodes`` the table also picks *old* directories for the kernel to forget
(:meth:`InodeTable.overflow`): the adapter invalidates their names, the kernel
drops the unused dentries of each subtree and sends FORGET, and the nodes go.
Only directories the caller says may be re-resolved at will (lower-only ones)
are picked.

It must not make syscalls or know the overlay rules: it is given real (dev, ino) pairs.
"""
from __future__ import annotations

import errno
import logging
import stat
from collections import deque
from typing import Callable

log = logging.getLogger("unionfs.inodes")

ROOT_INO = 1
_XINO_SHIFT = 56
_FALLBACK_BASE = 1 << 63


class _Rare:
    """The fields of a node that most nodes leave at their defaults, kept apart (see :class:`Node`)."""

    __slots__ = ("xwh", "redirect", "indexed", "unlinked", "attr_layer", "paths")

    def __init__(self) -> None:
        self.xwh: tuple[int, ...] = ()
        self.redirect: bytes | None = None
        self.indexed = False
        self.unlinked = False
        self.attr_layer: int | None = None
        self.paths: tuple[bytes | None, ...] | None = None


def _rare(field: str, default):
    """A property of Node kept in its ``_rare`` record, made only when a value is not ``default``."""

    def get(self):
        r = self._rare
        return default if r is None else getattr(r, field)

    def set(self, value) -> None:
        r = self._rare
        if r is None:
            if value == default:
                return
            r = self._rare = _Rare()
        setattr(r, field, value)

    return property(get, set)


class Node:
    """One object of the merged view.

    ``layers`` lists, topmost first, the layers holding this object: for a
    directory every layer it merges (stopping at an opaque one), for anything
    else the one layer it comes from.  ``parent``/``name`` give its path, which
    is the same in every layer (for a hard link: one of its names).

    A million of these may live at once (one per entry the kernel holds), so the fields most
    nodes leave at their defaults live in a separate record made on the first other value:
    96 bytes a node instead of 136.
    """

    __slots__ = ("ino", "parent", "name", "layers", "mode", "lookups", "children", "_rare")

    def __init__(self, ino: int, parent: "Node | None", name: bytes, layers: tuple[int, ...], mode: int,
                 xwh: tuple[int, ...] = (), redirect: bytes | None = None) -> None:
        self.ino = ino
        self.parent = parent
        self.name = name
        self.layers = layers
        self.mode = mode
        self.lookups = 0
        self.children = 0
        self._rare: _Rare | None = None
        if xwh or redirect is not None:
            self.xwh = xwh
            self.redirect = redirect

    xwh = _rare("xwh", ())              # layers in which this dir may hold xattr whiteouts
    redirect = _rare("redirect", None)  # the upper dir's redirect, absolute, no leading slash (oi->redirect)
    indexed = _rare("indexed", False)   # a hard-linked lower file copied up: its data lives in the index
    unlinked = _rare("unlinked", False)  # removed while open: attributes come from an open fd
    attr_layer = _rare("attr_layer", None)  # a dir only implied by its top layers: the layer of its attributes
    # Where a directory is in each of its layers, parallel to ``layers``, when that is not
    # ``name`` in the parent's directory of the same layer: a name there (a relative redirect)
    # or b"/path" from the layer's root (an absolute redirect, or pinned by a rename).
    # None (for the whole tuple or one layer): ``name``.
    paths = _rare("paths", None)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def top(self) -> int:
        return self.layers[0]

    def where(self, index: int) -> bytes:
        """This directory's name in its parent's dir of layer ``index``, or b"/path" from that layer's root."""
        if self.paths is not None and index in self.layers:
            w = self.paths[self.layers.index(index)]
            if w is not None:
                return w
        return self.name

    def path(self) -> bytes:
        """Path from the root of the merged view, as stored in the layers (no leading slash)."""
        parts: list[bytes] = []
        node: Node | None = self
        while node is not None and node.parent is not None:
            parts.append(node.name)
            node = node.parent
        return b"/".join(reversed(parts))

    def __repr__(self) -> str:
        return f"Node({self.ino}, {self.path()!r}, layers={self.layers}, mode={self.mode:o})"


class InodeTable:
    def __init__(self, devs: list[int], max_nodes: int | None = None) -> None:
        # devs: the distinct st_dev of the layers, topmost first; index 0 keeps raw inode numbers.
        self._dev_index = {d: i for i, d in enumerate(devs)}
        self._nodes: dict[int, Node] = {}
        # Shedding (see the module docstring): directories' numbers in the order they entered
        # (numbers, not nodes: a forgotten node must not stay alive here), about how many of
        # them are in the table, and how many nodes the kernel was asked to forget and has not yet.
        self.max_nodes = max_nodes
        self._order: deque[int] = deque()
        self._dirs = 0
        self._pending = 0
        self._idle_until = 0
        self.peak = 0
        self._fallback: dict[tuple[int, int], int] = {}
        # FUSE generation numbers of inode numbers given to a second object (0 when absent).
        self.generations: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._nodes)

    def ino_for(self, dev: int, real_ino: int) -> int:
        idx = self._dev_index.get(dev)
        if idx is not None and real_ino < (1 << _XINO_SHIFT):
            ino = real_ino | (idx << _XINO_SHIFT)
            if ino != ROOT_INO and ino != 0:
                return ino
        key = (dev, real_ino)
        ino = self._fallback.get(key)
        if ino is None:
            ino = _FALLBACK_BASE | (len(self._fallback) + 1)
            self._fallback[key] = ino
        return ino

    def get(self, ino: int) -> Node:
        try:
            return self._nodes[ino]
        except KeyError:
            raise OSError(errno.ESTALE, "stale inode") from None

    def find(self, ino: int) -> Node | None:
        return self._nodes.get(ino)

    def add_root(self, node: Node) -> None:
        node.lookups = 1 << 62  # never forgotten
        self._nodes[node.ino] = node

    def remember(self, node: Node) -> Node:
        """Enter a freshly resolved node, or return the one already known under its number.

        The known node is refreshed from the new resolution (its layers may have
        changed by a copy-up done by another name), but keeps its identity.
        """
        old = self._nodes.get(node.ino)
        if old is node:
            return node  # a readdir serving a cached entry: nothing to refresh
        if old is not None:
            old.layers, old.mode, old.xwh, old.redirect = node.layers, node.mode, node.xwh, node.redirect
            old.indexed, old.attr_layer = node.indexed, node.attr_layer
            old.paths = node.paths
            if not old.is_dir and (old.parent is not node.parent or old.name != node.name):
                # Another name of a hard-linked file: the name just resolved is certainly valid
                # now, the one we had may be gone.
                self._reparent(old, node.parent, node.name)
            return old
        self._nodes[node.ino] = node
        if node.parent is not None:
            node.parent.children += 1
        if self.max_nodes is not None and stat.S_ISDIR(node.mode):
            order = self._order
            order.append(node.ino)
            self._dirs += 1
            if len(order) > 2 * self._dirs + 1024:   # numbers of directories forgotten since pile up
                self._order = order = deque(dict.fromkeys(ino for ino in order if ino in self._nodes))
                self._dirs = len(order)
        if len(self._nodes) > self.peak:
            self.peak = len(self._nodes)
        return node

    def overflow(self, sheddable: Callable[[Node], bool]) -> list[Node]:
        """Old directories for the kernel to forget, when the table is over ``max_nodes``; else [].

        A directory, not its files: one invalidation makes the kernel drop the directory's
        whole unused subtree, and a FORGET (batched) comes back for each node of it.  Until
        those arrive, the nodes of the subtrees asked for count as gone (``_pending``); a
        directory the kernel keeps (someone's cwd) may be asked again later.
        """
        limit = self.max_nodes
        if limit is None or len(self._nodes) - self._pending <= max(limit, self._idle_until):
            return []
        want = len(self._nodes) - self._pending - limit + limit // 10
        order, nodes = self._order, self._nodes
        out: list[Node] = []
        got = 0
        for _ in range(len(order)):
            if got >= want:
                break
            ino = order.popleft()
            node = nodes.get(ino)
            if node is None:
                continue
            order.append(ino)   # it may be asked again if the kernel keeps it
            if node.children and node.parent is not None and node.lookups and sheddable(node):
                out.append(node)
                got += node.children + 1
        self._pending = min(self._pending + got, limit // 2)
        # Nothing to shed (all of it upper, or in use): look again only once the table has grown.
        self._idle_until = 0 if out else len(self._nodes) + limit // 10
        return out

    def _reparent(self, node: Node, parent: Node | None, name: bytes) -> None:
        if node.parent is not None:
            node.parent.children -= 1
        if parent is not None:
            parent.children += 1
        node.parent, node.name = parent, name

    def reuse(self, node: Node, parent: Node, name: bytes) -> None:
        """The upper filesystem gave a removed object's number to a new one at parent/name.

        The kernel may still hold an inode for the removed object (an open or current
        directory, a FORGET in flight).  A new generation makes it drop that inode instead of
        taking the new object for the old one; the node (and its lookup count, which covers
        both kernel inodes) now stands for the new object.
        """
        self.generations[node.ino] = self.generations.get(node.ino, 0) + 1
        self.move(node, parent, name)
        node.unlinked = False

    def move(self, node: Node, parent: Node, name: bytes) -> None:
        """A rename through the mount: same object, new path."""
        old_parent = node.parent
        self._reparent(node, parent, name)
        if old_parent is not None:
            self._maybe_drop(old_parent)

    def lookup(self, node: Node, n: int = 1) -> None:
        node.lookups += n

    def forget(self, ino: int, n: int) -> None:
        node = self._nodes.get(ino)
        if node is None or ino == ROOT_INO:
            return
        node.lookups = max(0, node.lookups - n)
        self._maybe_drop(node)

    def _maybe_drop(self, node: Node) -> None:
        while node is not None and node.lookups == 0 and node.children == 0 and node.ino != ROOT_INO:
            if self._nodes.get(node.ino) is not node:
                return
            del self._nodes[node.ino]
            if self._pending:
                self._pending -= 1
            if self.max_nodes is not None and stat.S_ISDIR(node.mode):
                self._dirs -= 1
            parent = node.parent
            if parent is None:
                return
            parent.children -= 1
            node = parent
