"""Directory listings kept between readdir calls, so a warm walk costs one reply per entry.

pyfuse3 always answers READDIRPLUS, which carries every entry's attributes, and
it has no way to let the kernel cache directory contents: every ``opendir`` of a
warm walk comes back to us.  We keep each directory's merged listing, and for
each entry that can never change under us (it lives only in lower layers) its
node and ready-made reply.  Everything else is resolved afresh when served.  A
listing is dropped whenever its directory changes through the mount (the union
reports such directories), and the whole cache is bounded by a number of
entries, least recently used listings going first.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from .inodes import Node

MAX_ENTRIES = 200_000


@dataclass(slots=True)
class Listing:
    names: list[bytes]
    # per name: the layers holding it (see Union.list_names), to resolve it without probing the rest
    masks: list[int]
    # per name: (node, entry attributes) once resolved, when immutable; None otherwise
    cached: list = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.cached:
            self.cached = [None] * len(self.names)


class DirCache:
    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self.max_entries = max_entries
        self._listings: "OrderedDict[int, Listing]" = OrderedDict()
        self._entries = 0

    def current(self, ino: int, listing: Listing) -> bool:
        """Is ``listing`` still what the directory holds (nothing changed it since)?"""
        return self._listings.get(ino) is listing

    def get(self, ino: int) -> Listing | None:
        listing = self._listings.get(ino)
        if listing is not None:
            self._listings.move_to_end(ino)
        return listing

    def put(self, node: Node, names: list[bytes], masks: list[int]) -> Listing:
        self.drop(node.ino)
        listing = Listing(names, masks)
        self._listings[node.ino] = listing
        self._entries += len(names)
        while self._entries > self.max_entries and len(self._listings) > 1:
            _, old = self._listings.popitem(last=False)
            self._entries -= len(old.names)
        return listing

    def drop(self, ino: int) -> None:
        old = self._listings.pop(ino, None)
        if old is not None:
            self._entries -= len(old.names)

    def __len__(self) -> int:
        return self._entries
