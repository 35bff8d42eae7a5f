"""A user's subordinate ids (``/etc/subuid``, ``/etc/subgid``) and what a rootless container with
more users than one needs of the host: those ranges, ``newuidmap``/``newgidmap`` (package uidmap)
and ``user_allow_other`` in ``/etc/fuse.conf``.

The container's user namespace maps 0 to the user and 1..N to the first subordinate range, as
rootless podman does.  Its processes are then host ids of that range, which the kernel lets into
a FUSE mount only with ``allow_other`` (only the mounting uid otherwise), and fusermount3 allows
that to a user only with ``user_allow_other``.  Plain file reading; no namespace is made here.
"""
from __future__ import annotations

import pwd
import shutil
from dataclasses import dataclass

SUBUID, SUBGID = "/etc/subuid", "/etc/subgid"
FUSE_CONF = "/etc/fuse.conf"


@dataclass(frozen=True)
class SubIds:
    """The first subordinate range of each kind: ``count`` ids from ``uid``/``gid``."""

    uid: int
    uid_count: int
    gid: int
    gid_count: int

    @property
    def count(self) -> int:
        """Container ids 1..count are mapped (the smaller range decides, for uids and gids alike)."""
        return min(self.uid_count, self.gid_count)

    def uid_map(self, uid: int) -> list[int]:
        """``newuidmap`` triples: container 0 is the user, 1..count the range."""
        return [0, uid, 1, 1, self.uid, self.count]

    def gid_map(self, gid: int) -> list[int]:
        return [0, gid, 1, 1, self.gid, self.count]

    def mount_options(self, uid: int, gid: int) -> str:
        """The rootfs mount's shifting: an owner k stored in the layers shows as the host id that is k inside."""
        m = lambda host, sub: f"0:{host}:1:1:{sub}:{self.count}"  # noqa: E731
        return f"uidmapping={m(uid, self.uid)},gidmapping={m(gid, self.gid)}"


def _first_range(path: str, names: tuple[str, ...]) -> tuple[int, int] | None:
    try:
        with open(path) as f:
            for line in f:
                fields = line.strip().split(":")
                if len(fields) == 3 and fields[0] in names and fields[1].isdigit() and fields[2].isdigit() \
                        and int(fields[2]) > 0:
                    return int(fields[1]), int(fields[2])
    except OSError:
        return None
    return None


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def subids_of(uid: int) -> SubIds | None:
    """The user's first ranges in /etc/subuid and /etc/subgid (by name or number), None without both."""
    names = (user_name(uid), str(uid))
    u, g = _first_range(SUBUID, names), _first_range(SUBGID, names)
    if u is None or g is None:
        return None
    return SubIds(u[0], u[1], g[0], g[1])


def user_allow_other() -> bool:
    try:
        with open(FUSE_CONF) as f:
            return any(line.strip() == "user_allow_other" for line in f)
    except OSError:
        return False


def missing_for_other_users(uid: int) -> str | None:
    """Why a rootless container cannot run as a user other than root (None: it can)."""
    if subids_of(uid) is None:
        return f"no subordinate ids for {user_name(uid)} in {SUBUID} (and {SUBGID})"
    if not (shutil.which("newuidmap") and shutil.which("newgidmap")):
        return "no newuidmap/newgidmap (Debian package uidmap)"
    if not user_allow_other():
        return f"no user_allow_other in {FUSE_CONF} (the container's other users must reach its rootfs mount)"
    return None


def usable(uid: int) -> SubIds | None:
    """The subordinate ids a rootless container of this user maps, when everything they need is there."""
    return subids_of(uid) if missing_for_other_users(uid) is None else None
