"""On-disk formats of whiteouts, opaque directories and overlay-private xattrs, both directions.

What we read (every form found in the wild):

=========================  ===========================================  =============================
form                       whiteout of ``dir/name``                     opaque ``dir``
=========================  ===========================================  =============================
overlay (kernel)           char device 0/0 ``dir/name``                 ``trusted.overlay.opaque=y``
overlay userxattr          char device 0/0                              ``user.overlay.opaque=y``
overlay xattr-whiteout     empty file + ``overlay.whiteout`` xattr,     ``overlay.opaque=y``
                           inside a dir with ``overlay.opaque=x``
fuse-overlayfs             ``dir/.wh.name``                             ``user.fuseoverlayfs.opaque=y``
OCI layer (extracted)      ``dir/.wh.name``                             ``dir/.wh..wh..opq``
=========================  ===========================================  =============================

What we write in an upper dir: the kernel's own format (char 0/0 and
``trusted.overlay.*``), or ``user.overlay.*`` in userxattr mode, so that kernel
overlayfs mounted over our upper dir shows the same merged view.

The OCI ``.wh.`` names (tar changesets) are translated by :func:`oci_whiteout_name`
and friends, used by image extraction and commit.
"""
from __future__ import annotations

import enum
import os
import stat

WH_PREFIX = b".wh."
WH_OPAQUE = b".wh..wh..opq"


class Xattr(enum.Enum):
    """Overlay-private xattrs, by role; the namespace is chosen by the mount (trusted or user)."""

    OPAQUE = "opaque"
    WHITEOUT = "whiteout"
    REDIRECT = "redirect"
    ORIGIN = "origin"
    IMPURE = "impure"
    NLINK = "nlink"


TRUSTED_PREFIX = "trusted.overlay."
USER_PREFIX = "user.overlay."
FUSE_OVERLAYFS_PREFIX = "user.fuseoverlayfs."
UNIONFS_PREFIX = "trusted.unionfs."
UNIONFS_USER_PREFIX = "user.unionfs."
PRIVATE_PREFIXES = (TRUSTED_PREFIX, USER_PREFIX, FUSE_OVERLAYFS_PREFIX, UNIONFS_PREFIX, UNIONFS_USER_PREFIX)
# A layer may carry overlay xattrs of its own, escaped one level ("nesting").
ESCAPE = "overlay."

OPAQUE_NAMES = (TRUSTED_PREFIX + "opaque", USER_PREFIX + "opaque", FUSE_OVERLAYFS_PREFIX + "opaque")
XWHITEOUT_NAMES = (TRUSTED_PREFIX + "whiteout", USER_PREFIX + "whiteout")
REDIRECT_NAMES = (TRUSTED_PREFIX + "redirect", USER_PREFIX + "redirect")


def xattr_name(role: Xattr, userxattr: bool = False) -> str:
    return (USER_PREFIX if userxattr else TRUSTED_PREFIX) + role.value


class DirKind(enum.Enum):
    """What a directory's own markers say about the layers below it."""

    PLAIN = "plain"        # merge with lower layers
    OPAQUE = "opaque"      # hide everything below
    XWHITEOUTS = "x"       # merge, and zero-size files may be xattr whiteouts


def dir_kind_from_xattrs(values: dict[str, bytes]) -> DirKind:
    """Classify a directory from its (already read) opaque xattr values."""
    x = False
    for name in OPAQUE_NAMES:
        v = values.get(name)
        if v is None:
            continue
        if v[:1] == b"y":
            return DirKind.OPAQUE
        if v[:1] == b"x":
            x = True
    return DirKind.XWHITEOUTS if x else DirKind.PLAIN


def is_chardev_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def may_be_xwhiteout(st: os.stat_result) -> bool:
    """Only zero-size regular files can be xattr whiteouts; the xattr must be checked."""
    return stat.S_ISREG(st.st_mode) and st.st_size == 0


def oci_whiteout_target(name: bytes) -> bytes | None:
    """``.wh.foo`` -> ``foo``; ``None`` for ordinary names and for the opaque marker."""
    if name.startswith(WH_PREFIX) and name != WH_OPAQUE and len(name) > len(WH_PREFIX):
        return name[len(WH_PREFIX):]
    return None


def oci_whiteout_name(name: bytes) -> bytes:
    return WH_PREFIX + name


NAME_MAX = 255


def oci_whiteout_probe(name: bytes) -> bytes | None:
    """The ``.wh.`` name that would white ``name`` out, or None when no such entry can exist
    (a name of more than NAME_MAX - 4 bytes): probing for it would fail with ENAMETOOLONG."""
    if len(name) + len(WH_PREFIX) > NAME_MAX:
        return None
    return WH_PREFIX + name


def is_oci_marker(name: bytes) -> bool:
    """Any ``.wh.`` entry: never shown in the merged view."""
    return name.startswith(WH_PREFIX)


# --- xattrs as seen through the merged view -----------------------------------------

def is_private_xattr(name: str) -> bool:
    """Overlay/fuse-overlayfs/unionfs bookkeeping xattrs, hidden from the merged view.

    Escaped names (``trusted.overlay.overlay.X``) are not private: they show as
    ``trusted.overlay.X``.
    """
    for prefix in (TRUSTED_PREFIX, USER_PREFIX):
        if name.startswith(prefix):
            return not name.startswith(prefix + ESCAPE)
    return name.startswith((FUSE_OVERLAYFS_PREFIX, UNIONFS_PREFIX, UNIONFS_USER_PREFIX))


def unescape_xattr(name: str) -> str:
    """Layer name -> merged-view name (``trusted.overlay.overlay.X`` -> ``trusted.overlay.X``)."""
    for prefix in (TRUSTED_PREFIX, USER_PREFIX):
        if name.startswith(prefix + ESCAPE):
            return prefix + name[len(prefix) + len(ESCAPE):]
    return name


def escape_xattr(name: str) -> str:
    """Merged-view name -> layer name; inverse of :func:`unescape_xattr`."""
    for prefix in (TRUSTED_PREFIX, USER_PREFIX):
        if name.startswith(prefix):
            return prefix + ESCAPE + name[len(prefix):]
    return name


def visible_xattrs(names: list[str]) -> list[str]:
    return [unescape_xattr(n) for n in names if not is_private_xattr(n)]


# --- writing whiteouts and opaque markers --------------------------------------------

class Style(enum.Enum):
    """How we write whiteouts and opaque markers into an upper dir or an extracted layer."""

    OVERLAY = "overlay"        # char 0/0, trusted.overlay.* : the kernel's own format (needs root)
    USERXATTR = "userxattr"    # char 0/0, user.overlay.*    : overlayfs -o userxattr (needs CAP_MKNOD)
    XWHITEOUT = "xwhiteout"    # empty file + user.overlay.whiteout, parent user.overlay.opaque=x: rootless

    @property
    def prefix(self) -> str:
        return TRUSTED_PREFIX if self is Style.OVERLAY else USER_PREFIX

    @classmethod
    def default(cls) -> "Style":
        return cls.OVERLAY if os.geteuid() == 0 else cls.XWHITEOUT


def make_whiteout(dirfd: int, name: bytes, style: Style) -> None:
    """Create a whiteout for ``name`` in the directory ``dirfd`` (``name`` must not exist)."""
    from . import sys as ovl
    if style is Style.XWHITEOUT:
        fd = ovl.open_at(dirfd, name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o000)
        os.close(fd)
        ovl.setxattr_at(dirfd, name, USER_PREFIX + Xattr.WHITEOUT.value, b"y")
        cur = ovl.getxattr_or_none(dirfd, None, USER_PREFIX + Xattr.OPAQUE.value)
        if cur != b"y":
            ovl.setxattr_at(dirfd, None, USER_PREFIX + Xattr.OPAQUE.value, b"x")
    else:
        ovl.mknod_at(dirfd, name, stat.S_IFCHR | 0o000, 0)


def mark_opaque(dirfd: int, style: Style) -> None:
    """Mark the directory ``dirfd`` opaque: nothing of lower layers shows below it."""
    from . import sys as ovl
    ovl.setxattr_at(dirfd, None, style.prefix + Xattr.OPAQUE.value, b"y")


def is_whiteout_at(dirfd: int, name: bytes, st: os.stat_result) -> bool:
    """Is this entry a whiteout in any overlay form (for readers that do not track dir kinds)?"""
    from . import sys as ovl
    if is_chardev_whiteout(st):
        return True
    if may_be_xwhiteout(st):
        return any(ovl.getxattr_or_none(dirfd, name, x) is not None for x in XWHITEOUT_NAMES)
    return False
