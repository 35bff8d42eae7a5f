"""The build context: ``.dockerignore``, and the files a COPY/ADD names, read without leaving the context.

``.dockerignore`` as moby's ``patternmatcher``: one pattern a line, ``#`` in column 1
a comment, each pattern cleaned (``filepath.Clean``, a leading ``/`` dropped), ``*``
``?`` ``[...]`` as Go's ``filepath.Match``, ``**`` any number of directories, ``!``
an exception, the last matching line wins, and a pattern that matches a directory
excludes what is below it.

Sources are resolved one component at a time from a directory fd of the context
(:mod:`unionfs.fs.sys`): a symlink on the way is followed only while it stays in
the context, so nothing outside it is ever read; a path that leaves it is an error.
Inside a copied directory symlinks are copied as symlinks.
"""
from __future__ import annotations

import fnmatch
import functools
import hashlib
import os
import posixpath
import re
import stat
from dataclasses import dataclass, field
from typing import BinaryIO, Callable, Iterator

from ..errors import UsageError
from ..fs import sys as ovl
from . import paths

# Xattrs that travel with a copied file (BuildKit's rule: not security.* or system.*, except the capability).
def keep_xattr(name: str) -> bool:
    return not name.startswith(("security.", "system.", "trusted.")) or name == "security.capability"


class ContextError(UsageError):
    pass


# --- .dockerignore --------------------------------------------------------------------

@dataclass(frozen=True)
class Pattern:
    regex: re.Pattern
    exclusion: bool     # a ``!`` line: re-includes


def _compile(pattern: str) -> re.Pattern:
    out, i = [], 0
    while i < len(pattern):
        ch = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):
                out.append("(?:.*/)?")
                i += 1
            else:
                out.append(".*")
            continue
        if ch == "*":
            out.append("[^/]*")
        elif ch == "?":
            out.append("[^/]")
        elif ch == "[":
            j = pattern.find("]", i + 1)
            if j < 0:
                raise ContextError(f".dockerignore: bad pattern {pattern!r}: unterminated [")
            body = pattern[i + 1:j]
            if body.startswith("^"):
                body = "!" + body[1:]
            out.append(fnmatch.translate("[" + body + "]")[4:-3])
            i = j
        elif ch == "\\" and i + 1 < len(pattern):
            i += 1
            out.append(re.escape(pattern[i]))
        else:
            out.append(re.escape(ch))
        i += 1
    return re.compile("".join(out) + r"\Z")


def parse_ignore(text: str) -> list[Pattern]:
    pats = []
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        p = line.strip()
        if not p:
            continue
        excl = p.startswith("!")
        if excl:
            p = p[1:].strip()
        p = posixpath.normpath(p).lstrip("/") if p else p
        if p in ("", "."):
            continue
        pats.append(Pattern(_compile(p), excl))
    return pats


def ignored(patterns: list[Pattern], rel: str) -> bool:
    """Is ``rel`` (a clean path relative to the context) left out? Parents count: the last match wins."""
    parts = rel.split("/")
    result = False
    for pat in patterns:
        hit = any(pat.regex.match("/".join(parts[:n])) for n in range(len(parts), 0, -1))
        if hit:
            result = not pat.exclusion
    return result


# --- the context ------------------------------------------------------------------------

@dataclass(frozen=True)
class Entry:
    """One thing to copy: a path relative to the copied source, its metadata, where to read it."""
    rel: str                 # "" for the source itself
    mode: int                # st_mode (type and permissions)
    uid: int
    gid: int
    size: int
    mtime_ns: int
    link: str = ""
    xattrs: tuple[tuple[str, bytes], ...] = ()
    opener: Callable[[], BinaryIO] | None = None   # a regular file's data
    inode: tuple[int, int] | None = None           # (st_dev, st_ino) of a file with several links


@dataclass
class Source:
    """A resolved COPY source: its base name and its entries (a directory's own entry first)."""
    base: str
    entries: list[Entry] = field(default_factory=list)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.entries[0].mode)


class Context:
    """A context directory opened once; every read is relative to its fd."""

    def __init__(self, path: str, ignore_text: str | None = None) -> None:
        try:
            self.fd = os.open(path, ovl.O_DIR & ~os.O_NOFOLLOW)
        except OSError as e:
            raise ContextError(f"build context {path}: {e.strerror}") from None
        self.path = path
        self._fds: list[int] = []
        if ignore_text is None:
            try:
                fd = ovl.open_at(self.fd, b".dockerignore", os.O_RDONLY)
                with os.fdopen(fd, "rb") as f:
                    ignore_text = f.read().decode("utf-8", "replace")
            except FileNotFoundError:
                ignore_text = ""
        self.patterns = parse_ignore(ignore_text)

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
        os.close(self.fd)

    def __enter__(self) -> "Context":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _real(self, rel: str, what: str) -> list[str]:
        """``rel`` with its symlinks followed, only while they stay inside the context."""
        def readlink(p: str) -> str | None:
            head, _, name = p.rpartition("/")
            dfd = ovl.open_beneath(self.fd, os.fsencode(head))
            try:
                st = ovl.lstat_at(dfd, os.fsencode(name))
                return os.fsdecode(ovl.readlink_at(dfd, os.fsencode(name))) if stat.S_ISLNK(st.st_mode) else None
            finally:
                os.close(dfd)
        try:
            return paths.resolve(rel, readlink, clamp=False)
        except paths.Escape as e:
            raise ContextError(f"{what}: {rel}: outside the build context"
                               f"{' (through a symlink)' if e.via_link else ''}") from None
        except (FileNotFoundError, NotADirectoryError):
            raise ContextError(f"{what}: {rel}: no such file or directory in the build context") from None
        except OSError as e:
            raise ContextError(f"{what}: {rel}: {e.strerror}") from None

    def _open_dir(self, parts: list[str]) -> int:
        return ovl.open_beneath(self.fd, os.fsencode("/".join(parts)))

    def glob(self, pattern: str, what: str) -> list[str]:
        """Context paths matching a COPY source (Go ``filepath.Match`` per component), sorted."""
        clean = posixpath.normpath("/" + pattern).lstrip("/")
        if pattern.replace("\\", "/").strip("/").split("/")[0] == ".." or posixpath.normpath(pattern).startswith("../"):
            raise ContextError(f"{what}: {pattern}: outside the build context")
        if not any(c in clean for c in "*?["):
            return [clean]
        found = [""]
        for comp in [c for c in clean.split("/") if c]:
            nxt = []
            for base in found:
                try:
                    real = self._real(base, what)
                    dfd = self._open_dir(real)
                except (ContextError, OSError):
                    continue
                try:
                    with ovl.scandir(dfd) as it:
                        names = sorted(e.name for e in it)
                finally:
                    os.close(dfd)
                if any(c in comp for c in "*?["):
                    nxt += [posixpath.join(base, n) for n in names if _compile(comp).match(n)]
                elif comp in names:
                    nxt.append(posixpath.join(base, comp))
            found = nxt
        found = [p for p in found if not ignored(self.patterns, p)]
        if not found:
            raise ContextError(f"{what}: {pattern}: no source files were specified (nothing matches)")
        return found

    def source(self, rel: str, what: str) -> Source:
        """A source path (followed inside the context) with every entry below it that .dockerignore keeps."""
        real = self._real(rel, what) if rel not in ("", ".") else []
        real_rel = "/".join(real)
        if real_rel and ignored(self.patterns, real_rel):
            raise ContextError(f"{what}: {rel}: excluded by .dockerignore")
        parent = self._open_dir(real[:-1]) if real else os.dup(self.fd)
        self._fds.append(parent)
        name = os.fsencode(real[-1]) if real else None
        src = Source(real[-1] if real else "")
        top = self._entry(parent, name, "")
        src.entries.append(top)
        if stat.S_ISDIR(top.mode):
            dfd = ovl.open_beneath(parent, name or b"")
            self._fds.append(dfd)
            src.entries += list(self._walk(dfd, real_rel, ""))
        return src

    def _entry(self, dfd: int, name: bytes | None, rel: str) -> Entry:
        st = ovl.fstat(dfd) if name is None else ovl.lstat_at(dfd, name)
        link = os.fsdecode(ovl.readlink_at(dfd, name)) if stat.S_ISLNK(st.st_mode) else ""
        xs = []
        if not stat.S_ISLNK(st.st_mode):
            for n in sorted(ovl.listxattr_at(dfd, name)):
                if keep_xattr(n):
                    v = ovl.getxattr_or_none(dfd, name, n)
                    if v is not None:
                        xs.append((n, v))
        opener = None
        if stat.S_ISREG(st.st_mode):
            opener = functools.partial(_open_file, dfd, name)
        inode = (st.st_dev, st.st_ino) if stat.S_ISREG(st.st_mode) and st.st_nlink > 1 else None
        return Entry(rel, st.st_mode, st.st_uid, st.st_gid, st.st_size if stat.S_ISREG(st.st_mode) else 0,
                     st.st_mtime_ns, link, tuple(xs), opener, inode)

    def _walk(self, dfd: int, ctx_rel: str, rel: str) -> Iterator[Entry]:
        with ovl.scandir(dfd) as it:
            names = sorted(os.fsencode(e.name) for e in it)
        for n in names:
            sub_rel = posixpath.join(rel, os.fsdecode(n))
            full = posixpath.join(ctx_rel, sub_rel)
            e = self._entry(dfd, n, sub_rel)
            if stat.S_ISDIR(e.mode):
                if ignored(self.patterns, full) and not self._has_exception_below(full):
                    continue
                child = ovl.open_dir_at(dfd, n)
                self._fds.append(child)
                inner = list(self._walk(child, ctx_rel, sub_rel))
                if ignored(self.patterns, full) and not inner:
                    continue
                yield e
                yield from inner
            elif not ignored(self.patterns, full):
                yield e

    def _has_exception_below(self, rel: str) -> bool:
        """Could a ``!`` line re-include something below an excluded directory? (Then it is walked.)"""
        return any(p.exclusion for p in self.patterns)



def _open_file(dfd: int, name: bytes) -> BinaryIO:
    return os.fdopen(ovl.open_at(dfd, name, os.O_RDONLY), "rb")


def hash_entries(entries: list[Entry]) -> str:
    """What makes a COPY source the same for the cache (BuildKit's rule): names, types, modes, owners, sizes,
    contents, link targets and xattrs; never times."""
    h = hashlib.sha256()
    for e in entries:
        h.update(repr((e.rel, e.mode, e.uid, e.gid, e.size, e.link, e.xattrs)).encode())
        if e.opener is not None:
            with e.opener() as f:
                fh = hashlib.sha256()
                while chunk := f.read(1 << 20):
                    fh.update(chunk)
            h.update(fh.digest())
    return h.hexdigest()
