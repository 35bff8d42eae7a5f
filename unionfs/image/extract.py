"""Layer tar -> directory, as a rootfs needs it, refusing hostile archives.

Python's ``tarfile`` extraction (and its PEP 706 filters) cannot be used: the
filters strip setuid/setgid/sticky bits and resolve paths through the host's
symlinks.  So members are read with ``tarfile`` in streaming mode and written
here one by one with fd-relative calls from :mod:`unionfs.fs.sys`: every parent
is opened one component at a time from the layer root with
``O_NOFOLLOW|O_DIRECTORY``, and every final component is created with
``O_EXCL``/``O_NOFOLLOW``, so nothing is ever written through a symlink and
nothing outside the layer directory is touched.

OCI whiteouts (``.wh.NAME``, ``.wh..wh..opq``) are applied after the last
member, because the opaque marker "applies regardless of its order in the tar"
and a whiteout "only applies to lower layers": they become overlayfs's own
format (:func:`unionfs.fs.formats.make_whiteout` / ``mark_opaque``), so kernel
overlayfs can mount the extracted layers too.  Directory modes and mtimes are
set last, deepest first, after everything inside them was written.

A directory the tar only implies (``a/`` of an entry ``a/b`` without an entry ``a/``
of its own; also the layer root without ``./``) is made 0755 and marked
(:func:`unionfs.fs.formats.mark_implied`): the layer is shared by every image that
uses it, so it cannot carry the attributes of the directory below it in one image;
the merged view takes them from there, as ``umoci unpack`` and containerd keep an
existing directory when a layer only implies it.
"""
from __future__ import annotations

import base64
import errno
import logging
import math
import os
import stat
import tarfile
import urllib.parse
from dataclasses import dataclass
from typing import BinaryIO, Callable

from ..fs import formats
from ..fs import sys as ovl
from .compression import DECOMPRESS_ERRORS, HashingReader, corrupt, decompressed
from .model import ImageError, quote

log = logging.getLogger("unionfs.image.extract")

MAX_MEMBER_SIZE = 1 << 40          # 1 TiB: no honest layer has a bigger file
MAX_DIR_CACHE = 512
MAX_TRAILING = 1 << 20             # bytes after the end-of-archive blocks: record padding, not content
# Bounds on a member's header (what the kernel, Go's archive/tar and a sane rootfs can hold).
MAX_PATH = 4096                    # bytes of a member name or a symlink target (PATH_MAX)
MAX_COMPONENT = 255                # bytes of one name (NAME_MAX)
MAX_ID = (1 << 32) - 2             # uid/gid: 32 bits, and (uid_t)-1 means "no change" to chown
MAX_MTIME = 9_000_000_000          # seconds either side of 1970: the ns count must fit in 64 bits
MAX_DEV = (1 << 32) - 1
MAX_PAX_HEADER = 1 << 20           # an extended header is read into memory whole: no honest one is this big
MAX_XATTR_NAME = 255
MAX_XATTR_VALUE = 64 << 10         # XATTR_SIZE_MAX


# What tarfile raises on a malformed header (a bad number in a PAX record or sparse map, bad UTF-8, ...).
HEADER_ERRORS: tuple[type[BaseException], ...] = (
    tarfile.TarError, *DECOMPRESS_ERRORS, UnicodeError, ValueError, OverflowError, MemoryError)


class HostileLayer(ImageError):
    """The layer tries to leave its directory or to create what it must not."""


@dataclass(frozen=True)
class Extracted:
    diff_id: str        # sha256 of the uncompressed tar, as read
    digest: str         # sha256 of the blob as shipped
    blob_size: int
    tar_size: int
    compression: str
    entries: int


def _split(name: str, what: str) -> tuple[bytes, ...]:
    """A member name -> path components below the layer root; ``..`` and absolute paths refused."""
    b = check_path(name, what, "path")
    if b.startswith(b"/"):
        raise HostileLayer(f"{what}: absolute path {quote(name)}")
    parts = tuple(p for p in b.split(b"/") if p not in (b"", b"."))
    if b".." in parts:
        raise HostileLayer(f"{what}: path {quote(name)} leaves the layer ('..')")
    for p in parts:
        if len(p) > MAX_COMPONENT:
            raise ImageError(f"{what}: path {quote(name)}: a component is longer than {MAX_COMPONENT} bytes")
    return parts


def check_path(name: str, what: str, kind: str) -> bytes:
    """A member name or link target as bytes: no NUL byte, at most MAX_PATH bytes."""
    b = os.fsencode(name)
    if b"\0" in b:
        raise ImageError(f"{what}: {kind} {quote(name)} holds a NUL byte")
    if len(b) > MAX_PATH:
        raise ImageError(f"{what}: {kind} {quote(name)} is longer than {MAX_PATH} bytes")
    return b


def check_member(member: tarfile.TarInfo, what: str) -> None:
    """The header fields the extractor hands to syscalls, each within what the kernel takes.

    A tar header can hold an mtime of 1e30, a base-256 uid of 2^40 or -5, a PAX path with a
    NUL byte; refused here in one line rather than as an OverflowError or ValueError later.
    """
    name = quote(member.name)
    if member.linkname:
        check_path(member.linkname, what, f"{name}: link target")
    mtime = member.mtime
    if not isinstance(mtime, (int, float)) or not math.isfinite(mtime) or abs(mtime) > MAX_MTIME:
        raise ImageError(f"{what}: {name}: mtime {quote(mtime)} is out of range")
    for field, value in (("uid", member.uid), ("gid", member.gid)):
        if not isinstance(value, int) or not 0 <= value <= MAX_ID:
            raise ImageError(f"{what}: {name}: {field} {quote(value)} is out of range (0 to {MAX_ID})")
    if member.size < 0:
        raise ImageError(f"{what}: {name}: negative size {member.size}")
    if member.ischr() or member.isblk():
        for field, value in (("major", member.devmajor), ("minor", member.devminor)):
            if not 0 <= value <= MAX_DEV:
                raise ImageError(f"{what}: {name}: device {field} {value} is out of range")


def check_header_block(info: tarfile.TarInfo) -> None:
    """An extended header (PAX, GNU long name) is read into memory whole: refuse absurd sizes first."""
    if info.type in (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
                     tarfile.GNUTYPE_LONGLINK) and info.size > MAX_PAX_HEADER:
        raise tarfile.HeaderError(f"extended header of {info.size} bytes (at most {MAX_PAX_HEADER})")


def _show(parts: tuple[bytes, ...]) -> str:
    return quote(os.fsdecode(b"/".join(parts)) or "/")


class LayerWriter:
    """Writes the members of one layer tar below ``root_fd``."""

    def __init__(self, root_fd: int, what: str, style: formats.Style, devices: bool, space: int) -> None:
        self.root_fd = root_fd
        self.what = what
        self.style = style
        self.devices = devices              # may we create device nodes (root)?
        self.owners = os.geteuid() == 0     # may we chown?
        self.space = space                  # bytes we may write in all
        self.written = 0
        self.entries = 0
        self._dirs: dict[tuple[bytes, ...], int] = {}
        self._dir_attrs: dict[tuple[bytes, ...], tuple[int, int]] = {}   # path -> (mode, mtime_ns)
        self._dir_children: dict[tuple[bytes, ...], set[bytes]] = {}    # the tree of _dir_attrs' paths
        self._whiteouts: set[tuple[tuple[bytes, ...], bytes]] = set()
        self._opaque: set[tuple[bytes, ...]] = set()
        self._implied: set[tuple[bytes, ...]] = {()}   # dirs made as parents, with no entry of their own

    def close(self) -> None:
        for fd in self._dirs.values():
            os.close(fd)
        self._dirs.clear()

    def _trim(self) -> None:
        """Keep at most MAX_DIR_CACHE directory fds; only between steps, when no fd is borrowed."""
        if len(self._dirs) > MAX_DIR_CACHE:
            self.close()

    # --- walking -------------------------------------------------------------

    def _existing_dir(self, parts: tuple[bytes, ...]) -> int | None:
        """:meth:`_dir` of a directory the tar made, or None where a later member replaced it."""
        try:
            return self._dir(parts, create=False)
        except (FileNotFoundError, ImageError):
            return None

    def _dir(self, parts: tuple[bytes, ...], create: bool = True) -> int:
        """An fd of the directory ``parts`` (borrowed from the cache), opened without following links."""
        # The deepest cached ancestor, then one component at a time (a loop: layers nest thousands deep).
        known = len(parts)
        while known and parts[:known] not in self._dirs:
            known -= 1
        fd = self._dirs[parts[:known]] if known else self.root_fd
        owned = False   # fd is an intermediate opened here and not cached: close it once past it
        for depth in range(known + 1, len(parts) + 1):
            try:
                child = self._open_child(fd, parts[:depth], create)
            finally:
                if owned:
                    os.close(fd)
            fd = child
            owned = depth < len(parts) and len(self._dirs) >= MAX_DIR_CACHE
            if not owned:
                self._dirs[parts[:depth]] = fd
        return fd

    def _open_child(self, parent: int, parts: tuple[bytes, ...], create: bool) -> int:
        name = parts[-1]
        try:
            fd = ovl.open_dir_at(parent, name)
        except FileNotFoundError:
            if not create:
                raise
            ovl.mkdir_at(parent, name, 0o755)   # parents a tar does not list, as Docker makes them
            fd = ovl.open_dir_at(parent, name)
            self._implied.add(parts)
            self._in_tree(parts)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR) and stat.S_ISLNK(ovl.lstat_at(parent, name).st_mode):
                raise HostileLayer(f"{self.what}: {_show(parts)} is a symlink; refusing to write through it") from None
            if e.errno == errno.ENOTDIR:
                raise ImageError(f"{self.what}: {_show(parts)} is not a directory but has entries below it") from None
            raise
        return fd

    def _forget(self, parts: tuple[bytes, ...]) -> None:
        """Drop cached fds and records at or below the directory ``parts`` (it is being replaced).
        The cost is the size of that subtree, so a tar replacing directories over and over stays linear."""
        n = len(parts)
        for p in [p for p in self._dirs if p[:n] == parts]:   # at most MAX_DIR_CACHE
            os.close(self._dirs.pop(p))
        self._dir_children.get(parts[:-1], set()).discard(parts[-1])
        stack = [parts]
        while stack:
            p = stack.pop()
            self._dir_attrs.pop(p, None)
            self._implied.discard(p)
            stack.extend(p + (c,) for c in self._dir_children.pop(p, ()))

    def _in_tree(self, parts: tuple[bytes, ...]) -> None:
        """Record ``parts`` in the tree of directories we keep records of (so :meth:`_forget` finds them)."""
        for i in range(len(parts), 0, -1):
            kids = self._dir_children.setdefault(parts[:i - 1], set())
            if parts[i - 1] in kids:
                break
            kids.add(parts[i - 1])

    def _set_dir_attrs(self, parts: tuple[bytes, ...], member: tarfile.TarInfo) -> None:
        """Remember a directory's mode and mtime, applied in :meth:`finish`; it has an entry of its own."""
        self._dir_attrs[parts] = (member.mode, _ns(member))
        self._implied.discard(parts)
        self._in_tree(parts)

    # --- members -------------------------------------------------------------

    def add(self, member: tarfile.TarInfo, tar: tarfile.TarFile) -> None:
        self._trim()
        parts = _split(member.name, self.what)
        check_member(member, self.what)
        self.entries += 1
        if parts and parts[-1].startswith(formats.WH_PREFIX):
            self._add_whiteout(parts)
            return
        if member.size > MAX_MEMBER_SIZE or (member.isreg() and self.written + member.size > self.space):
            raise HostileLayer(f"{self.what}: {quote(member.name)} claims {member.size} bytes, more than the store "
                               f"can hold ({self.space - self.written} bytes free)")
        if not parts:  # the layer root itself ("./")
            if member.isdir():
                self._set_owner_xattrs(self.root_fd, None, member)
                self._set_dir_attrs((), member)
                return
            raise HostileLayer(f"{self.what}: the layer root is not a directory")
        pfd = self._dir(parts[:-1])
        name = parts[-1]
        try:
            st = ovl.lstat_at(pfd, name)
        except FileNotFoundError:
            st = None
        if st is not None:
            if member.isdir() and stat.S_ISDIR(st.st_mode):
                fd = self._dir(parts)
                self._set_owner_xattrs(fd, None, member)
                self._set_dir_attrs(parts, member)
                return
            # A later entry of the same name replaces the earlier one, as tar does.
            if stat.S_ISDIR(st.st_mode):
                self._forget(parts)
            ovl.remove_tree_at(pfd, name)
        if member.isreg():
            self._file(pfd, name, member, tar)
        elif member.isdir():
            ovl.mkdir_at(pfd, name, 0o700)
            fd = self._dir(parts)
            self._set_owner_xattrs(fd, None, member)
            self._set_dir_attrs(parts, member)
            return
        elif member.issym():
            ovl.symlink_at(os.fsencode(member.linkname), pfd, name)
            self._set_owner_xattrs(pfd, name, member)
            ovl.utime_at(pfd, name, (_ns(member), _ns(member)))
        elif member.islnk():
            self._hardlink(parts, pfd, name, member)
        elif member.ischr() or member.isblk() or member.isfifo():
            kind = stat.S_IFIFO if member.isfifo() else stat.S_IFCHR if member.ischr() else stat.S_IFBLK
            dev = 0 if member.isfifo() else os.makedev(member.devmajor, member.devminor)
            if not self.owners:
                # A user's store: an empty regular file, its type and numbers in the override
                # (a user can neither mknod a device nor put a user.* xattr on a fifo).
                fd = ovl.open_at(pfd, name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    self._set_owner_xattrs(fd, None, member, kind, dev)
                    ovl.fchmod(fd, formats.stored_perm(stat.S_IFREG, member.mode))
                    ovl.futimens(fd, (_ns(member), _ns(member)))
                finally:
                    os.close(fd)
                return
            if not member.isfifo() and not self.devices:
                raise HostileLayer(f"{self.what}: device node {quote(member.name)}: only root may create device nodes")
            ovl.mknod_at(pfd, name, kind | 0o600, dev)
            self._set_owner_xattrs(pfd, name, member)
            ovl.chmod_at(pfd, name, member.mode & 0o7777)
            ovl.utime_at(pfd, name, (_ns(member), _ns(member)))
        else:
            raise ImageError(f"{self.what}: {quote(member.name)}: unsupported tar entry type {member.type!r}")

    def _file(self, pfd: int, name: bytes, member: tarfile.TarInfo, tar: tarfile.TarFile) -> None:
        fd = ovl.open_at(pfd, name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            src = tar.extractfile(member)
            assert src is not None
            while True:
                chunk = src.read(1 << 20)
                if not chunk:
                    break
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
            self.written += member.size
            self._set_owner_xattrs(fd, None, member)
            ovl.fchmod(fd, self._mode(stat.S_IFREG, member.mode))   # after chown, which clears setuid/setgid
            ovl.futimens(fd, (_ns(member), _ns(member)))
        finally:
            os.close(fd)

    def _hardlink(self, parts: tuple[bytes, ...], pfd: int, name: bytes, member: tarfile.TarInfo) -> None:
        # Everything below the layer root was extracted from this layer (the directory starts empty and
        # whiteouts come last), so a non-directory there is "a file extracted earlier from this layer".
        target = _split(member.linkname, self.what)
        try:
            tfd = self._dir(target[:-1], create=False) if target else None
            st = ovl.lstat_at(tfd, target[-1]) if tfd is not None else None
        except (FileNotFoundError, NotADirectoryError, ImageError):
            st = None
        if st is None or stat.S_ISDIR(st.st_mode):
            raise HostileLayer(f"{self.what}: hard link {quote(member.name)} -> {quote(member.linkname)}: "
                               "the target is not a file extracted earlier from this layer")
        ovl.link_at(tfd, target[-1], pfd, name)

    def _mode(self, kind: int, mode: int) -> int:
        """The mode the stored file gets: the member's as root; in a user's store read-write for the
        user, with setuid/setgid/sticky in the override only (:func:`formats.stored_perm`)."""
        return mode & 0o7777 if self.owners else formats.stored_perm(kind, mode)

    def _set_owner_xattrs(self, fd: int, name: bytes | None, member: tarfile.TarInfo,
                          kind: int | None = None, rdev: int = 0) -> None:
        """Owner (numeric) and xattrs; ``name`` None means ``fd`` itself.  As root the owner is the
        file's own; a user cannot chown, so a regular file or directory (or what stands for a device,
        ``kind``) records owner, mode and type in ``user.containers.override_stat``, as
        containers/storage's ``force_mask`` does, for mounts with ``xattr_permissions=2``.
        A symlink can carry no user.* xattr: its owner is not kept."""
        if self.owners:
            if name is None:
                ovl.fchown(fd, member.uid, member.gid)
            else:
                ovl.chown_at(fd, name, member.uid, member.gid)
        elif name is None:
            kind = kind if kind is not None else stat.S_IFDIR if member.isdir() else stat.S_IFREG
            ovl.fsetxattr(fd, formats.OVERRIDE_CONTAINERS,
                          formats.Override(member.uid, member.gid, member.mode & 0o7777, kind, rdev).encode())
        for attr, value in _xattrs(member, self.what):
            try:
                if name is None:
                    ovl.fsetxattr(fd, attr, value)
                else:
                    ovl.setxattr_at(fd, name, attr, value)
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
                    raise
                log.warning("%s: %s: xattr %s not kept: %s", self.what, member.name, attr, e.strerror)

    # --- whiteouts -----------------------------------------------------------

    def _add_whiteout(self, parts: tuple[bytes, ...]) -> None:
        name = parts[-1]
        if name != formats.WH_OPAQUE:
            target = formats.oci_whiteout_target(name)
            if target is None or target in (b".", b".."):
                raise ImageError(f"{self.what}: {_show(parts)} is not a valid whiteout (nothing after '.wh.')")
        try:
            self._dir(parts[:-1])  # the directory exists in this layer, even if the tar lists nothing else in it
        except ImageError:
            # A non-directory (or symlink) of this layer stands where the whiteout's directory would be:
            # it hides all below it already, and nothing is written through it.  umoci 0.4.7 writes
            # `dir2file` then `dir2file/.wh.x` when a directory became a file.
            log.debug("%s: whiteout %s below a non-directory ignored", self.what, _show(parts))
            return
        if name == formats.WH_OPAQUE:
            self._opaque.add(parts[:-1])
            return
        self._whiteouts.add((parts[:-1], target))

    def finish(self) -> None:
        """Apply whiteouts and opaque markers, then directory modes and mtimes (deepest first)."""
        for parts in sorted(self._opaque):
            self._trim()
            fd = self._existing_dir(parts)
            if fd is not None:   # else replaced by a non-directory later in the tar: nothing to mark
                formats.mark_opaque(fd, self.style)
        for parent, target in sorted(self._whiteouts):
            self._trim()
            pfd = self._existing_dir(parent)
            if pfd is None:
                continue
            try:
                st = ovl.lstat_at(pfd, target)
            except FileNotFoundError:
                formats.make_whiteout(pfd, target, self.style)
                continue
            # The same layer also has this name: the entry stays.  A directory must still hide
            # what lower layers have below it, so it becomes opaque, and is a new one: the
            # attributes of the one it replaces are not its own.
            if stat.S_ISDIR(st.st_mode):
                formats.mark_opaque(self._dir(parent + (target,), create=False), self.style)
                self._implied.discard(parent + (target,))
        for parts in sorted(self._implied):
            fd = self._existing_dir(parts)
            if fd is None:
                continue
            formats.mark_implied(fd, self.style)
            ovl.fchmod(fd, 0o755)   # whatever the umask: where no layer has it, it shows as Docker makes it
        for parts in sorted(self._dir_attrs, key=len, reverse=True):
            mode, ns = self._dir_attrs[parts]
            self._trim()
            fd = self._existing_dir(parts)
            if fd is None:
                continue
            ovl.fchmod(fd, self._mode(stat.S_IFDIR, mode))
            ovl.futimens(fd, (ns, ns))


class _StrictTarInfo(tarfile.TarInfo):
    """Headers read as Go's archive/tar reads them.

    ``tarfile`` silently ends an archive at a corrupt or truncated header after the
    first; Go refuses it.  Both accept a tar that simply stops at a header boundary
    without the end-of-archive blocks.  A zero block ends the archive in ``tarfile``
    whatever follows; in Go only when the next block is zero too or absent.
    """

    @classmethod
    def fromtarfile(cls, tf):  # type: ignore[override]
        buf = tf.fileobj.read(tarfile.BLOCKSIZE)
        if not buf:  # the stream ends at a header boundary: the end of the archive (also for a 0-byte layer)
            raise tarfile.EOFHeaderError("end of file")  # type: ignore[attr-defined]
        if buf == _ZERO_BLOCK:
            second = tf.fileobj.read(tarfile.BLOCKSIZE)
            if second and second != _ZERO_BLOCK:
                raise tarfile.SubsequentHeaderError(  # type: ignore[attr-defined]
                    "invalid tar header: a zero block followed by data" if len(second) == tarfile.BLOCKSIZE
                    else "truncated end-of-archive block")
            raise tarfile.EOFHeaderError("end of archive")  # type: ignore[attr-defined]
        try:
            obj = cls.frombuf(buf, tf.encoding, tf.errors)
        except (tarfile.InvalidHeaderError, tarfile.TruncatedHeaderError) as e:  # type: ignore[attr-defined]
            raise tarfile.SubsequentHeaderError(f"invalid tar header: {e}") from None  # type: ignore[attr-defined]
        check_header_block(obj)
        obj.offset = tf.fileobj.tell() - tarfile.BLOCKSIZE
        return obj._proc_member(tf)


_ZERO_BLOCK = bytes(tarfile.BLOCKSIZE)


class _GoTarFile(tarfile.TarFile):
    """A streaming ``TarFile`` that moves between members as Go's archive/tar does.

    ``tarfile`` skips to the padded end of a member before reading on, and calls the
    archive truncated when the stream ends inside the padding.  Go reads the rest of
    the member's data (which must all be there) and then the padding, where the end
    of the stream is a clean end of the archive: ``umoci insert`` (0.4.7) writes layers
    that stop right after the last file's data.
    """

    def next(self):  # type: ignore[override]
        if self.firstmember is None and not self._loaded and self.offset and self.offset != self.fileobj.tell():
            last = self._last
            data_end = min(self.offset, last.offset_data + last.size) if last is not None else self.offset
            if self.fileobj.tell() < data_end and self.fileobj.seek(data_end) < data_end:
                raise tarfile.ReadError("unexpected end of data")  # the member's data is cut short
            if self.fileobj.seek(self.offset) < self.offset:
                self._loaded = True  # the stream ends inside the padding: the archive ends here
                return None
        member = super().next()
        self._last = member
        return member

    _last: tarfile.TarInfo | None = None


def open_stream(stream) -> tarfile.TarFile:
    """A layer's tar read as a stream, member by member, exactly as extraction reads it (Go's
    rules for headers and for the end of the archive): for indexes of layers (:mod:`.seekable`)."""
    return _GoTarFile.open(fileobj=stream, mode="r|", tarinfo=_StrictTarInfo)  # type: ignore[call-overload]


def _trailing(tf: tarfile.TarFile, what: str) -> int:
    """Read (and so hash) what follows the end of the archive: at most :data:`MAX_TRAILING` bytes.

    Go's reader stops at the end blocks and its users (containerd, docker) hash the rest of
    the stream unread, so trailing bytes belong to the diff_id but are never members.  Tar
    tools pad to their record size (GNU tar: 10 KiB); more than a MiB is not padding but
    work (5 GiB of zeros compress to 5 MB), and is refused.
    """
    n = 0
    while chunk := tf.fileobj.read(1 << 16):
        n += len(chunk)
        if n > MAX_TRAILING:
            raise ImageError(f"{what}: more than {MAX_TRAILING >> 20} MiB of data after the end of the tar archive")
    return n


def _ns(member: tarfile.TarInfo) -> int:
    return int(round(member.mtime * 1_000_000_000))


def _xattrs(member: tarfile.TarInfo, what: str) -> list[tuple[str, bytes]]:
    """xattrs from PAX headers (``SCHILY.xattr.*``, ``LIBARCHIVE.xattr.*``), made safe for a layer.

    A layer's own overlay xattrs are escaped one level (as overlayfs does for nested
    overlays), so they show as themselves instead of acting as whiteouts or opaque
    markers; other unionfs/fuse-overlayfs bookkeeping names are dropped.
    """
    out = []
    for key, value in member.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            attr, raw = key[len("SCHILY.xattr."):], value.encode("utf-8", "surrogateescape")
        elif key.startswith("LIBARCHIVE.xattr."):
            attr = urllib.parse.unquote(key[len("LIBARCHIVE.xattr."):])
            try:
                raw = base64.b64decode(value + "=" * (-len(value) % 4))
            except ValueError:
                continue
        else:
            continue
        check_xattr(member, attr, raw, what)
        if attr.startswith((formats.TRUSTED_PREFIX, formats.USER_PREFIX)):
            attr = formats.escape_xattr(attr)
        elif formats.is_private_xattr(attr):
            continue
        out.append((attr, raw))
    return out


def check_xattr(member: tarfile.TarInfo, attr: str, value: bytes, what: str) -> None:
    """An xattr from a PAX header: a name the kernel takes (no NUL, at most 255 bytes), a bounded value."""
    b = os.fsencode(attr)
    if not b or b"\0" in b or len(b) > MAX_XATTR_NAME or len(value) > MAX_XATTR_VALUE:
        raise ImageError(f"{what}: {quote(member.name)}: xattr {quote(attr)} ({len(value)} bytes): not a valid xattr")


def extract_layer(blob: BinaryIO, root_fd: int, *, what: str, style: formats.Style, devices: bool,
                  space: int, on_read: Callable[[int], None] | None = None) -> Extracted:
    """Extract one layer blob (gzip, zstd, bzip2, xz or plain tar) below ``root_fd``.

    Returns the hashes of what was read; the caller compares them with the expected
    digest and diff_id before the directory is used.  The whole stream is read, also
    after the tar's end, so the hashes cover every byte.
    """
    raw = HashingReader(blob, on_read)
    writer = LayerWriter(root_fd, what, style, devices, space)
    try:
        try:
            kind, stream = decompressed(raw)
            tar_in = HashingReader(stream)  # type: ignore[arg-type]
            # A tar that ends without the two zero blocks, or inside its last member's padding
            # (umoci 0.4.7), ends cleanly here, as in Go.
            tf = open_stream(tar_in)
        except HEADER_ERRORS as e:   # tarfile reads the first header when it opens the stream
            raise corrupt(what, e) from None
        while True:
            try:
                member = tf.next()
            except HEADER_ERRORS as e:
                raise corrupt(what, e) from None
            if member is None:
                break
            tf.members.clear()  # streaming: keep no index of members in memory
            try:
                writer.add(member, tf)
            except ImageError:
                raise
            except (tarfile.TarError, *DECOMPRESS_ERRORS[1:], EOFError) as e:
                raise corrupt(what, e) from None
            except OSError as e:
                raise ImageError(f"{what}: {quote(member.name)}: {e.strerror or e}") from None
        try:
            writer.finish()
        except OSError as e:
            raise ImageError(f"{what}: applying whiteouts: {e.strerror or e}") from None
        try:
            _trailing(tf, what)
            tar_in.drain()
            raw.drain()
        except DECOMPRESS_ERRORS as e:
            raise corrupt(what, e) from None
    finally:
        writer.close()
    return Extracted(tar_in.digest, raw.digest, raw.count, tar_in.count, kind, writer.entries)
