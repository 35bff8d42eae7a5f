"""Images as named files, a directory or a tar, both ways: read by name with blobs verified by
digest (:class:`Archive`), written by name (:class:`Sink`).

Both formats (OCI layout, docker save) are a set of named files; this module gives them one
interface each way, and the description of an image found in a source, :class:`SourceImage`.
In a tar, members that are symlinks or hard links to other members (``docker save`` writes
``<id>/layer.tar`` as symlinks) are resolved inside the archive only.  It knows no format's
file names or JSON: that is :mod:`.oci_layout` and :mod:`.docker_archive`.
"""
from __future__ import annotations

import hashlib
import io
import os
import posixpath
import shutil
import stat
import tarfile
from dataclasses import dataclass, field
from typing import BinaryIO

from ..fs import sys as ovl
from .compression import DECOMPRESS_ERRORS
from .model import MAX_JSON, ImageError, Reference, quote

MAX_MEMBERS = 1 << 16   # files in an archive (docker save: 3 per layer); more is no image
MAX_NAME = 4096         # characters of a member name (PATH_MAX)


@dataclass(frozen=True)
class SourceLayer:
    name: str               # file in the archive
    digest: str | None      # expected digest of the blob, when the format names one
    media_type: str


@dataclass(frozen=True)
class SourceImage:
    config_name: str
    config_digest: str | None          # expected; the id is computed from the bytes either way
    layers: tuple[SourceLayer, ...]
    tags: tuple[Reference, ...]
    manifest: bytes | None = None      # the OCI/Docker manifest as shipped, if the source has one
    manifest_digest: str | None = None
    ref_names: tuple[str, ...] = field(default=())   # bare tags from OCI ref.name annotations


def _norm(name: str) -> str:
    return posixpath.normpath("/" + name).lstrip("/")


def _safe(name: str, where: str) -> str:
    if not isinstance(name, str) or len(name) > MAX_NAME or "\0" in name:
        raise ImageError(f"{where}: refers to an impossible file name {quote(name)}")
    if name.startswith("/") or ".." in name.split("/"):
        raise ImageError(f"{where}: refers to {quote(name)} outside the archive")
    return _norm(name)


class Archive:
    """Named files of an image source."""

    path: str

    def _size_of(self, name: str) -> int | None:
        """The size of the regular file ``name``; None if there is none."""
        raise NotImplementedError

    def exists(self, name: str) -> bool:
        return self._size_of(name) is not None

    def size(self, name: str) -> int:
        return self._size_of(name) or 0

    def open(self, name: str) -> BinaryIO:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def read_small(self, name: str, what: str) -> bytes:
        if not self.exists(name):
            raise ImageError(f"{self.path}: {what} {quote(name)} is missing")
        if self.size(name) > MAX_JSON:
            raise ImageError(f"{self.path}: {what} {quote(name)} is implausibly large ({self.size(name)} bytes, "
                             f"at most {MAX_JSON})")
        with self.open(name) as f:
            return f.read(MAX_JSON + 1)

    def read_verified(self, name: str, digest: str | None, what: str) -> bytes:
        """A small file, checked against ``digest`` before anyone parses it."""
        data = self.read_small(name, what)
        if digest is not None:
            actual = "sha256:" + hashlib.sha256(data).hexdigest()
            if actual != digest:
                raise ImageError(f"{self.path}: {what} {quote(name)} does not match its digest "
                                 f"(expected {digest}, got {actual})")
        return data

    def __enter__(self) -> "Archive":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class DirArchive(Archive):
    """A directory (an OCI layout); files are opened beneath it without following symlinks."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _size_of(self, name: str) -> int | None:
        try:
            fd = ovl.open_beneath(self.fd, os.fsencode(_safe(name, self.path)), os.O_RDONLY)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
        return st.st_size if stat.S_ISREG(st.st_mode) else None

    def open(self, name: str) -> BinaryIO:
        fd = ovl.open_beneath(self.fd, os.fsencode(_safe(name, self.path)), os.O_RDONLY)
        return os.fdopen(fd, "rb")


class TarArchive(Archive):
    """A tar file (docker save, OCI layout as tar), maybe gzip-compressed."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self.tar = tarfile.open(path, "r:*")
        except (tarfile.TarError, *DECOMPRESS_ERRORS, ValueError, OverflowError) as e:
            why = e.strerror if isinstance(e, OSError) and e.strerror else "no tar header found"
            raise ImageError(f"{path}: not a readable tar archive or image layout directory ({why})") from None
        self.members: dict[str, tarfile.TarInfo] = {}
        try:
            for m in self.tar:   # an index of names only: the members' data is read when used
                if len(self.members) >= MAX_MEMBERS:
                    raise ImageError(f"{path}: more than {MAX_MEMBERS} files: not an image archive")
                if len(m.name) > MAX_NAME or "\0" in m.name:
                    raise ImageError(f"{path}: member name {quote(m.name)}: too long or holds a NUL byte")
                self.members[_norm(m.name)] = m
        except (tarfile.TarError, *DECOMPRESS_ERRORS, ValueError, OverflowError) as e:
            self.tar.close()
            raise ImageError(f"{path}: not a readable tar archive ({e.__class__.__name__}: {str(e)[:200]})") from None
        except BaseException:
            self.tar.close()
            raise
        self.tar.members = []   # the index above is all we keep

    def close(self) -> None:
        self.tar.close()

    def _resolve(self, name: str) -> tarfile.TarInfo | None:
        """The regular member ``name`` names, following links between members (inside the archive only)."""
        name = _safe(name, self.path)
        for _ in range(16):
            m = self.members.get(name)
            if m is None or m.isreg():
                return m
            if m.issym():
                target = m.linkname if m.linkname.startswith("/") else posixpath.join(posixpath.dirname(name), m.linkname)
                target = posixpath.normpath("/" + target) if target.startswith("/") else posixpath.normpath(target)
                if target.startswith(("/", "../")) or target == "..":
                    raise ImageError(f"{self.path}: member {quote(name)} links outside the archive "
                                     f"({quote(m.linkname)})")
                name = target
            elif m.islnk():
                name = _safe(m.linkname, self.path)
            else:
                return None
        raise ImageError(f"{self.path}: member {quote(name)}: too many levels of links")

    def _size_of(self, name: str) -> int | None:
        m = self._resolve(name)
        return m.size if m else None

    def open(self, name: str) -> BinaryIO:
        m = self._resolve(name)
        if m is None:
            raise ImageError(f"{self.path}: {quote(name)} is missing")
        f = self.tar.extractfile(m)
        assert f is not None
        return f  # type: ignore[return-value]


def open_archive(path: str) -> Archive:
    if not os.path.exists(path):
        raise ImageError(f"{path}: no such file or directory")
    if os.path.isdir(path):
        return DirArchive(path)
    return TarArchive(path)


class Sink:
    """Named files of an image being written; the caller makes it appear atomically."""

    def has(self, name: str) -> bool:
        raise NotImplementedError

    def add(self, name: str, data: bytes | BinaryIO, size: int | None = None) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class TarSink(Sink):
    """A new tar file (PAX, members 0644 with mtime 0), synced when closed."""

    def __init__(self, path: str) -> None:
        self.f = open(path, "xb")
        self.tf = tarfile.open(fileobj=self.f, mode="w", format=tarfile.PAX_FORMAT)
        self.names: set[str] = set()

    def has(self, name: str) -> bool:
        return name in self.names

    def add(self, name: str, data: bytes | BinaryIO, size: int | None = None) -> None:
        ti = tarfile.TarInfo(name)
        ti.mode, ti.mtime = 0o644, 0
        if isinstance(data, bytes):
            ti.size = len(data)
            data = io.BytesIO(data)
        else:
            ti.size = size or 0
        self.tf.addfile(ti, data)
        self.names.add(name)

    def close(self) -> None:
        self.tf.close()
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()


class DirSink(Sink):
    """A new directory; each file synced as written."""

    def __init__(self, path: str) -> None:
        self.root = path
        os.mkdir(path, 0o755)

    def has(self, name: str) -> bool:
        return os.path.exists(os.path.join(self.root, name))

    def add(self, name: str, data: bytes | BinaryIO, size: int | None = None) -> None:
        p = os.path.join(self.root, name)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "xb") as out:
            if isinstance(data, bytes):
                out.write(data)
            else:
                shutil.copyfileobj(data, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
