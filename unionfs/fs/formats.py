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

An extracted image layer marks each directory its tar only implies (a parent of an
entry, with no entry of its own) with ``trusted.overlay.unionfs.implied``
(``user.overlay.`` when rootless): such a directory has no attributes of its own, and
the merged view takes them from the layer below that has it (:func:`is_implied`).  The
name is in overlayfs's private namespace so that kernel overlayfs over the store's
layers hides it too (it ignores names it does not know), and a layer's own xattrs of
that name arrive escaped (``trusted.overlay.overlay.``), so a tar cannot forge it.

This module owns bytes and names only: it must not decide union rules, and it makes
syscalls only through :mod:`sys` on fds it is given.
"""
from __future__ import annotations

import enum
import os
import stat
import sys
from dataclasses import dataclass

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
    METACOPY = "metacopy"  # a regular file whose data is still the lower one's (metacopy=on)
    IMPLIED = "unionfs.implied"  # ours: a directory an image layer only implies


TRUSTED_PREFIX = "trusted.overlay."
USER_PREFIX = "user.overlay."
FUSE_OVERLAYFS_PREFIX = "user.fuseoverlayfs."
UNIONFS_PREFIX = "trusted.unionfs."
UNIONFS_USER_PREFIX = "user.unionfs."
# Owner, mode and type kept in an xattr where they cannot be kept on the file (a user's store):
# containers/storage's name (its force_mask; fuse-overlayfs >= 1.14 writes it for xattr_permissions=2),
# fuse-overlayfs's privileged one (xattr_permissions=1) and its older user one (=2 before 1.14).
# fuse-overlayfs reads a lower layer by the name its root carries, in this order.
OVERRIDE_CONTAINERS = "user.containers.override_stat"
OVERRIDE_PRIVILEGED = "security.fuseoverlayfs.override_stat"
OVERRIDE_FUSE_OVERLAYFS = FUSE_OVERLAYFS_PREFIX + "override_stat"
OVERRIDE_NAMES = (OVERRIDE_PRIVILEGED, OVERRIDE_CONTAINERS, OVERRIDE_FUSE_OVERLAYFS)
META_NAMES = (UNIONFS_PREFIX + "origin", UNIONFS_USER_PREFIX + "origin")  # our per-inode UpperMeta
PRIVATE_PREFIXES = (TRUSTED_PREFIX, USER_PREFIX, FUSE_OVERLAYFS_PREFIX, UNIONFS_PREFIX, UNIONFS_USER_PREFIX,
                    OVERRIDE_CONTAINERS, OVERRIDE_PRIVILEGED)
# A layer may carry overlay xattrs of its own, escaped one level ("nesting").
ESCAPE = "overlay."

OPAQUE_NAMES = (TRUSTED_PREFIX + "opaque", USER_PREFIX + "opaque", FUSE_OVERLAYFS_PREFIX + "opaque")
XWHITEOUT_NAMES = (TRUSTED_PREFIX + "whiteout", USER_PREFIX + "whiteout")
REDIRECT_NAMES = (TRUSTED_PREFIX + "redirect", USER_PREFIX + "redirect")
# Only trusted.: the kernel refuses metacopy with userxattr, and so do we (one getxattr per lookup).
METACOPY_NAMES = (TRUSTED_PREFIX + "metacopy",)
# What kernel 6.x writes as overlay.metacopy when fs-verity is off: an empty value.  With a
# verity digest it is ``struct ovl_metacopy`` (version 0, len, flags, digest algo, digest), which
# we read as a mark too and never write.
METACOPY_VALUE = b""


IMPLIED_NAMES = (TRUSTED_PREFIX + Xattr.IMPLIED.value, USER_PREFIX + Xattr.IMPLIED.value)


def meta_xattr_name(style: "Style") -> str:
    """The xattr holding an upper inode's :class:`UpperMeta` in this style."""
    return META_NAMES[0] if style is Style.OVERLAY else META_NAMES[1]


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


def is_implied(xattr_names: list[str]) -> bool:
    """Is this layer directory only implied by its layer's tar (from the names of its xattrs)?"""
    return any(n in IMPLIED_NAMES for n in xattr_names)


def may_be_metacopy(st: os.stat_result) -> bool:
    """Only regular files with data can be metacopy files (an empty one has no data to find)."""
    return stat.S_ISREG(st.st_mode) and st.st_size > 0


def is_metacopy_at(dirfd: int, name: bytes | None) -> bool:
    """Does this regular file carry ``trusted.overlay.metacopy``, as ``ovl_check_metacopy_xattr`` asks?"""
    from . import sys as ovl
    if name is None:
        return any(ovl.getxattr_or_none(dirfd, None, x) is not None for x in METACOPY_NAMES)
    for x in METACOPY_NAMES:   # asked of every lower file a lookup finds: no generator
        if ovl.has_xattr_at(dirfd, name, x):
            return True
    return False


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
    return name.startswith((FUSE_OVERLAYFS_PREFIX, UNIONFS_PREFIX, UNIONFS_USER_PREFIX)) or name in OVERRIDE_NAMES


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
        # 0600, not 0000: without CAP_DAC_OVERRIDE a user.* xattr is set and read only with the
        # file's write and read permission, and kernel overlayfs (userxattr) reads it with its mounter's.
        fd = ovl.open_at(dirfd, name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        ovl.setxattr_at(dirfd, name, USER_PREFIX + Xattr.WHITEOUT.value, b"y")
        mark_xwhiteouts(dirfd, style)
    else:
        ovl.mknod_at(dirfd, name, stat.S_IFCHR | 0o000, 0)


def mark_xwhiteouts(dirfd: int, style: Style) -> None:
    """Mark ``dirfd`` as holding xattr whiteouts (``opaque=x``), unless it is opaque already;
    needed wherever one lands, also one made elsewhere and renamed in."""
    from . import sys as ovl
    if style is not Style.XWHITEOUT:
        return
    cur = ovl.getxattr_or_none(dirfd, None, USER_PREFIX + Xattr.OPAQUE.value)
    if cur not in (b"y", b"x"):
        ovl.setxattr_at(dirfd, None, USER_PREFIX + Xattr.OPAQUE.value, b"x")


def mark_opaque(dirfd: int, style: Style) -> None:
    """Mark the directory ``dirfd`` opaque: nothing of lower layers shows below it."""
    from . import sys as ovl
    ovl.setxattr_at(dirfd, None, style.prefix + Xattr.OPAQUE.value, b"y")


def mark_implied(dirfd: int, style: Style) -> None:
    """Mark the layer directory ``dirfd`` as only implied by its tar: its attributes are not its own."""
    from . import sys as ovl
    ovl.setxattr_at(dirfd, None, style.prefix + Xattr.IMPLIED.value, b"y")


def is_whiteout_at(dirfd: int, name: bytes, st: os.stat_result) -> bool:
    """Is this entry a whiteout in any overlay form (for readers that do not track dir kinds)?"""
    from . import sys as ovl
    if is_chardev_whiteout(st):
        return True
    if may_be_xwhiteout(st):
        return any(ovl.getxattr_or_none(dirfd, name, x) is not None for x in XWHITEOUT_NAMES)
    return False


# --- overlayfs file handles: `overlay.origin` and the names of index entries -------------------

FH_MAGIC = 0xFB
FH_VERSION = 0
FH_FLAG_BIG_ENDIAN = 1 << 0
FH_FLAG_ANY_ENDIAN = 1 << 1
FH_FLAG_PATH_UPPER = 1 << 2
_FH_HEADER = 5 + 16  # version, magic, len, flags, type; uuid


@dataclass(frozen=True)
class OverlayFh:
    """overlayfs's ``struct ovl_fb``: a real file handle and the uuid of its filesystem.

    Stored as is in ``overlay.origin`` (the lower inode an upper one was copied up from); the
    hex of it names that inode's entry in ``WORK/index`` (``ovl_get_index_name``).
    """

    type: int
    fid: bytes
    uuid: bytes = bytes(16)
    flags: int = FH_FLAG_BIG_ENDIAN if sys.byteorder == "big" else 0

    def encode(self) -> bytes:
        return bytes((FH_VERSION, FH_MAGIC, _FH_HEADER + len(self.fid), self.flags, self.type)) + \
            self.uuid + self.fid

    @classmethod
    def decode(cls, raw: bytes | None) -> "OverlayFh | None":
        """None for anything overlayfs would call invalid or "origin unknown" (``ovl_check_fb_len``)."""
        if not raw or len(raw) < _FH_HEADER or raw[1] != FH_MAGIC or raw[2] != len(raw):
            return None
        if raw[0] > FH_VERSION:
            return None
        return cls(type=raw[4], fid=bytes(raw[_FH_HEADER:]), uuid=bytes(raw[5:21]), flags=raw[3])

    def index_name(self) -> bytes:
        return self.encode().hex().encode()

    @classmethod
    def from_index_name(cls, name: bytes) -> "OverlayFh | None":
        if len(name) < 2 * _FH_HEADER or len(name) % 2:
            return None
        try:
            return cls.decode(bytes.fromhex(name.decode("ascii")))
        except (ValueError, UnicodeDecodeError):
            return None


def is_index_temp(name: bytes) -> bool:
    """Leftovers of an index entry being made (overlayfs's and ours start with '#')."""
    return name.startswith(b"#")


# --- link counts of indexed inodes: `overlay.nlink` ------------------------------------------

def encode_nlink(diff: int, base: str = "U") -> bytes:
    """The merged link count relative to the upper inode's (``U``) or the lower one's (``L``)."""
    return b"%s%+d" % (base.encode(), diff)


def decode_nlink(raw: bytes | None) -> tuple[str, int] | None:
    """``b"U+1"`` -> ("U", 1); None if absent or malformed (overlayfs then falls back too)."""
    if not raw or len(raw) < 3 or raw[:1] not in (b"U", b"L") or raw[1:2] not in (b"+", b"-"):
        return None
    try:
        return raw[:1].decode(), int(raw[1:])
    except ValueError:
        return None


# --- our own bookkeeping: `unionfs.origin` ---------------------------------------------------

@dataclass(slots=True)
class UpperMeta:
    """What an upper non-directory remembers of its past, beside overlayfs's own xattrs.

    ``ino``: its number in the merged view (that of the object it was copied up from).
    ``origin_nlink``: for an indexed inode, the link count of its lower inode (constant, since
    lower layers never change), so that an ``L``-relative ``overlay.nlink`` can be read rootless.
    ``lower_links``/``pending``: the form before the kernel's index format (migrated at mount).
    """

    ino: int | None = None
    origin_nlink: int | None = None
    lower_links: int | None = None
    pending: bytes | None = None

    def encode(self, legacy: bool = False) -> bytes:
        """``legacy``: the form before the kernel's index format (``lower=``), for the migration."""
        value = b"ino=%d" % (self.ino or 0)
        if legacy:
            if self.lower_links is not None:
                value += b";lower=%d" % self.lower_links
        elif self.origin_nlink is not None:
            value += b";onlink=%d" % self.origin_nlink
        return value

    @classmethod
    def decode(cls, raw: bytes | None) -> "UpperMeta | None":
        if raw is None:
            return None
        meta = cls()
        for item in raw.split(b";"):
            k, _, v = item.partition(b"=")
            try:
                if k == b"ino":
                    meta.ino = int(v)
                elif k == b"onlink":
                    meta.origin_nlink = int(v)
                elif k == b"lower":
                    meta.lower_links = int(v)
                elif k == b"pending":
                    meta.pending = v
            except ValueError:
                continue
        return meta


# --- owners, modes and types in an xattr: `user.containers.override_stat` ----------------------

_OVERRIDE_TYPES = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink",
                   stat.S_IFIFO: "pipe", stat.S_IFSOCK: "socket"}
_OVERRIDE_KINDS = {v: k for k, v in _OVERRIDE_TYPES.items()}


def override_name(level: int) -> str:
    """The xattr ``xattr_permissions=level`` writes: 1 fuse-overlayfs's privileged one (security.*, root
    only), 2 containers/storage's (what fuse-overlayfs >= 1.14 writes; every name is read)."""
    return OVERRIDE_PRIVILEGED if level == 1 else OVERRIDE_CONTAINERS


@dataclass(frozen=True)
class Override:
    """What a stored file stands for when its own owner, mode or type cannot say it (a user cannot
    chown or mknod): containers/storage's ``idtools.Stat``, as fuse-overlayfs reads it.

    ``mode`` holds the permission bits with setuid/setgid/sticky, and the file type when the
    value names one (``kind``: ``S_IFCHR`` etc., None for the old three-field form, where the
    stored file's own type counts).  ``rdev`` only for devices.
    """

    uid: int
    gid: int
    perm: int
    kind: int | None = None
    rdev: int = 0

    def encode(self) -> bytes:
        """``UID:GID:MODE[:TYPE]``, MODE four octal digits, TYPE ``file``, ``dir``, ``symlink``, ``pipe``,
        ``socket``, ``block-MAJOR-MINOR`` or ``char-MAJOR-MINOR`` (``FormatContainersOverrideXattrDevice``)."""
        value = "%d:%d:%04o" % (self.uid, self.gid, self.perm & 0o7777)
        if self.kind in (stat.S_IFCHR, stat.S_IFBLK):
            value += ":%s-%d-%d" % ("char" if self.kind == stat.S_IFCHR else "block",
                                    os.major(self.rdev), os.minor(self.rdev))
        elif self.kind is not None:
            value += ":" + _OVERRIDE_TYPES[self.kind]
        return value.encode()

    @classmethod
    def decode(cls, raw: bytes | None) -> "Override | None":
        """None when absent or malformed (``parseOverrideXattr`` refuses those too); fields after the
        type, and parts after a device's numbers, are ignored (forward compatible, as there)."""
        if not raw:
            return None
        try:
            fields = raw.decode("ascii").split(":")
            if len(fields) < 3 or not all(f.isdigit() for f in fields[:3]):
                return None
            uid, gid, perm = int(fields[0]), int(fields[1]), int(fields[2], 8)
            if uid >= 1 << 32 or gid >= 1 << 32 or perm >= 1 << 32:
                return None
            if len(fields) == 3:
                return cls(uid, gid, perm & 0o7777)
            typ = fields[3]
            for prefix, kind in (("char", stat.S_IFCHR), ("block", stat.S_IFBLK)):
                if typ.startswith(prefix):
                    parts = typ.split("-")
                    if len(parts) < 3 or parts[0] != prefix or not (parts[1].isdigit() and parts[2].isdigit()):
                        return None
                    return cls(uid, gid, perm & 0o7777, kind, os.makedev(int(parts[1]), int(parts[2])))
            for name, kind in _OVERRIDE_KINDS.items():
                if typ.startswith(name):   # HasPrefix, as containers/storage
                    return cls(uid, gid, perm & 0o7777, kind)
        except (UnicodeDecodeError, ValueError, OverflowError):
            return None
        return None

    def mode(self, real_mode: int) -> int:
        """The mode shown: the stored file's type unless the value names one, and the value's permissions."""
        kind = self.kind if self.kind is not None else stat.S_IFMT(real_mode)
        return kind | (self.perm & 0o7777)


def stored_perm(kind: int, perm: int) -> int:
    """The permissions a file of a user's store has itself: what its mode says for group and others,
    always read-write (and searchable) for the user, who must read, change and copy up every file;
    setuid/setgid/sticky only in the override, never on a file the user owns for real."""
    return (perm & 0o777) | (0o700 if kind == stat.S_IFDIR else 0o600)


def stored_kind(kind: int) -> int:
    """What a user can create for an object of type ``kind``: devices and fifos become regular files
    (their type lives in the override; user.* xattrs can go on regular files and directories only)."""
    return stat.S_IFREG if kind in (stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK) else kind
