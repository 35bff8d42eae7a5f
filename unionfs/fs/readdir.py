"""readdir: the merged listing of a directory, and the listings kept between readdir calls.

Owns how layers' entries merge into one listing (deduplicated, topmost first,
whiteouts and markers dropped) and the cache that makes a warm walk cost one
reply per entry.  It must not resolve names (that is ``union``) nor speak FUSE.

pyfuse3 always answers READDIRPLUS, which carries every entry's attributes, and
it has no way to let the kernel cache directory contents: every ``opendir`` of a
warm walk comes back to us.  We keep each directory's merged listing, and for
each entry that can never change under us (it lives only in lower layers) its
node and ready-made reply.  Everything else is resolved afresh when served.  A
listing is dropped whenever its directory changes through the mount (the union
reports such directories), and the whole cache is bounded in bytes (an
estimate of what its names, masks and ready replies hold), least recently used
listings going first; the newest listing stays whatever its size.
"""
from __future__ import annotations

import errno
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

from . import formats
from . import sys as ovl
from .inodes import Node
from .layers import LayerStack

MAX_BYTES = 20 << 20
# What the cache holds, in bytes, beyond each name's own bytes object: per name its list slots
# (name, mask, cached); per ready reply, the (node, entry) tuple, the EntryAttributes and the node
# it keeps alive.  Measured with tracemalloc on CPython 3.11 (README, "Memory").
NAME_BYTES = 33 + 3 * 8
REPLY_BYTES = 64 + 200 + 128


@dataclass(slots=True)
class Listing:
    names: list[bytes]
    # per name: the layers holding it (see Union.list_names), to resolve it without probing the rest
    masks: list[int]
    # per name: (node, entry attributes) once resolved, when immutable; None otherwise
    cached: list = field(default_factory=list)
    size: int = 0   # bytes accounted to this listing (see NAME_BYTES, REPLY_BYTES)

    def __post_init__(self) -> None:
        if not self.cached:
            self.cached = [None] * len(self.names)


class DirCache:
    def __init__(self, max_bytes: int = MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self._listings: "OrderedDict[int, Listing]" = OrderedDict()
        self._entries = 0
        self.bytes = 0

    def current(self, ino: int, listing: Listing) -> bool:
        """Is ``listing`` still what the directory holds (nothing changed it since)?"""
        return self._listings.get(ino) is listing

    def get(self, ino: int) -> Listing | None:
        listing = self._listings.get(ino)
        if listing is not None:
            self._listings.move_to_end(ino)
        return listing

    def listing(self, node: Node, list_names: Callable[[Node, list[int]], list[bytes]]) -> Listing:
        """The kept listing of ``node``, made by ``list_names`` (``Union.list_names``) when there is none."""
        listing = self.get(node.ino)
        if listing is None:
            masks: list[int] = []
            names = list_names(node, masks)
            listing = self.put(node, names, masks)
        return listing

    def put(self, node: Node, names: list[bytes], masks: list[int]) -> Listing:
        self.drop(node.ino)
        listing = Listing(names, masks)
        listing.size = sum(map(len, names)) + NAME_BYTES * len(names)
        self._listings[node.ino] = listing
        self._entries += len(names)
        self.bytes += listing.size
        self._trim()
        return listing

    def keep(self, ino: int, listing: Listing, i: int, reply: tuple) -> None:
        """Keep the ready reply of entry ``i`` of directory ``ino``'s ``listing``; it counts towards
        the bound while the listing is in the cache (one no longer there lives as long as its handles)."""
        if listing.cached[i] is None and self._listings.get(ino) is listing:
            listing.size += REPLY_BYTES
            self.bytes += REPLY_BYTES
            if self.bytes > self.max_bytes:
                self._trim()
        listing.cached[i] = reply

    def _trim(self) -> None:
        while self.bytes > self.max_bytes and len(self._listings) > 1:
            _, old = self._listings.popitem(last=False)
            self._entries -= len(old.names)
            self.bytes -= old.size

    def drop(self, ino: int) -> None:
        old = self._listings.pop(ino, None)
        if old is not None:
            self._entries -= len(old.names)
            self.bytes -= old.size

    def __len__(self) -> int:
        return self._entries


def merged_names(stack: LayerStack, node: Node, is_whiteout: Callable[[int, Node, int, bytes, os.stat_result], bool],
             masks: list[int] | None = None) -> list[bytes]:
    """The merged listing of directory ``node``: deduplicated, whiteouts and markers removed.

    Names come topmost layer first, each layer in its own order.  With ``masks`` (a list),
    it is filled in parallel with the names: for each, the layers holding it (bit per layer
    index) above any whiteout, for ``Union.resolve``.  ``is_whiteout`` judges a
file that may be an xattr whiteout (``Union._is_whiteout``).
    """
    if not node.is_dir:
        raise OSError(errno.ENOTDIR, "not a directory")
    where: dict[bytes, int] = {}  # name -> position in out
    hidden: set[bytes] = set()  # whiteouts of layers above the one being read
    out: list[bytes] = []
    bits: list[int] = []
    fsencode = os.fsencode
    for index in node.layers:
        fd = stack.dir_fd(index, node)
        oci = stack.layers[index].oci_whiteouts
        xwh = index in node.xwh
        bit = 1 << index
        layer_hidden: list[bytes] = []
        with ovl.scandir(fd) as it:
            for de in it:
                name = fsencode(de.name)
                if name in hidden:
                    continue
                if oci and name.startswith(formats.WH_PREFIX):
                    target = formats.oci_whiteout_target(name)
                    if target is not None:
                        layer_hidden.append(target)
                    continue
                if not (de.is_dir(follow_symlinks=False) or de.is_symlink()):
                    is_file = de.is_file(follow_symlinks=False)
                    if not is_file or xwh:
                        st = de.stat(follow_symlinks=False)
                        if formats.is_chardev_whiteout(st) or (
                                xwh and is_file and is_whiteout(index, node, fd, name, st)):
                            layer_hidden.append(name)
                            continue
                pos = where.get(name)
                if pos is None:
                    where[name] = len(out)
                    out.append(name)
                    bits.append(bit)
                else:
                    bits[pos] |= bit
        hidden.update(layer_hidden)
    if masks is not None:
        masks[:] = bits
    return out
