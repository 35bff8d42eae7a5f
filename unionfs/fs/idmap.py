"""Owner shifting between the layers and the merged view: fuse-overlayfs's ``uidmapping``,
``gidmapping`` and ``squash_to_*`` options, with its meaning.

containers/storage passes ``uidmapping=C:H:S[:C:H:S...]`` when a container runs in a user
namespace (``podman run --uidmap``) on a mount program: the layers keep the image's ids
unshifted (container ids ``C..C+S-1``) while the container's processes are host ids
``H..H+S-1``.  So an owner ``C+k`` read from a layer shows as ``H+k``, and a caller ``H+k``
who creates or chowns writes ``C+k``.  An id no range covers shows as the kernel's overflow id
(65534), as in fuse-overlayfs.  ``squash_to_uid``/``squash_to_gid``/``squash_to_root`` make
every entry show that owner; what is written is unchanged by them.

Plain arithmetic on ids: the adapter applies it at the FUSE boundary; it must not touch a layer.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class IdRange:
    """``count`` ids from ``inside`` (as stored in the layers) shown as ids from ``outside``."""

    inside: int
    outside: int
    count: int


def parse_ranges(text: str) -> tuple[IdRange, ...]:
    """``C:H:S[:C:H:S...]`` -> ranges.  Empty items are skipped, as fuse-overlayfs's strtok does
    (containers/storage writes ``uidmapping=:0:100000:65536``)."""
    items = [s for s in text.split(":") if s]
    if not items or len(items) % 3 or not all(s.isdigit() for s in items):
        raise ValueError(f"invalid id mapping {text!r}: want CONTAINER:HOST:COUNT triples joined by ':'")
    nums = [int(s) for s in items]
    ranges = tuple(IdRange(*nums[i:i + 3]) for i in range(0, len(nums), 3))
    if any(r.count == 0 or r.inside + r.count > 2**32 or r.outside + r.count > 2**32 for r in ranges):
        raise ValueError(f"invalid id mapping {text!r}: an empty range or ids beyond 32 bits")
    return ranges


def _overflow(kind: str) -> int:
    try:
        with open(f"/proc/sys/kernel/overflow{kind}") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 65534


@dataclass(frozen=True)
class IdShift:
    """One direction's map (uids or gids) and its squash."""

    ranges: tuple[IdRange, ...] = ()
    squash: int | None = None
    overflow: int = 65534

    def shown(self, stored: int) -> int:
        """The owner the merged view shows for an owner stored in a layer."""
        if self.squash is not None:
            return self.squash
        return self._through(stored, inward=False)

    def stored(self, shown: int) -> int:
        """The owner to write to the upper layer for a caller's (or a chown's) id."""
        return self._through(shown, inward=True)

    def _through(self, id_: int, inward: bool) -> int:
        if not self.ranges:
            return id_
        for r in self.ranges:
            src, dst = (r.outside, r.inside) if inward else (r.inside, r.outside)
            if src <= id_ < src + r.count:
                return dst + id_ - src
        return self.overflow


@dataclass(frozen=True)
class IdMap:
    """Both directions' maps; the default one changes nothing."""

    uid: IdShift = IdShift()
    gid: IdShift = IdShift()

    @classmethod
    def from_options(cls, uidmapping: str | None = None, gidmapping: str | None = None,
                     squash_to_root: bool = False, squash_to_uid: int | None = None,
                     squash_to_gid: int | None = None) -> "IdMap":
        """The map the options ask for."""
        uid = IdShift(parse_ranges(uidmapping) if uidmapping else (),
                      squash_to_uid if squash_to_uid is not None else (0 if squash_to_root else None),
                      _overflow("uid"))
        gid = IdShift(parse_ranges(gidmapping) if gidmapping else (),
                      squash_to_gid if squash_to_gid is not None else (0 if squash_to_root else None),
                      _overflow("gid"))
        return cls(uid, gid)
