"""COPY and ADD: sources (the context, a stage, an image, a heredoc, a local tar) -> layer members.

Docker's rules: a directory copies its contents; a file goes to ``DEST/base`` when
DEST ends in ``/`` or is a directory, else to DEST; several sources (or a wildcard
matching several) need a DEST ending in ``/``; missing destination directories
are made (``0755``, owned by ``--chown`` or root); the destination is resolved with
the image's symlinks as in a chroot.  Files from the context belong to root unless
``--chown``; from a stage or an image they keep their owners.  ``--chmod`` sets the
permission bits of everything copied.  ADD extracts a local tar (plain, gzip,
bzip2 or xz: told by content, not by name) into DEST; owners come from the tar.
"""
from __future__ import annotations

import io
import os
import posixpath
import stat
import tarfile
from dataclasses import dataclass, field

from ..errors import UsageError
from .context import Entry, Source, keep_xattr
from .layer import ImageTree, Member


class CopyError(UsageError):
    pass


@dataclass
class Plan:
    members: list[Member] = field(default_factory=list)
    closers: list = field(default_factory=list)   # open tar files, closed once the layer is written
    links: dict = field(default_factory=dict)      # inode -> the first path it was copied to

    def close(self) -> None:
        for c in self.closers:
            c.close()
        self.closers.clear()


def image_source(tree: ImageTree, path: str, what: str) -> Source:
    """A ``COPY --from`` source: an image's path (symlinks followed inside it) and what is below it."""
    real = tree.resolve(path)
    st = tree.stat(real)
    if st is None:
        raise CopyError(f"{what}: {path}: no such file or directory in the source image")
    src = Source(posixpath.basename(real))
    src.entries.append(_entry("", tree.member(real)))
    if stat.S_ISDIR(st.mode):
        src.entries += [_entry(rel, m) for rel, m in tree.walk(real)]
    return src


def _entry(rel: str, m: Member) -> Entry:
    return Entry(rel, m.mode, m.uid, m.gid, m.size, m.mtime * 10**9, m.link, m.xattrs, m.opener)


def heredoc_source(name: str, content: str) -> Source:
    data = content.encode()
    return Source(name, [Entry("", stat.S_IFREG | 0o644, 0, 0, len(data), 0, "", (), lambda: io.BytesIO(data))])


def _archive(e: Entry) -> tarfile.TarFile | None:
    """A local tar archive (any compression tarfile reads, told by content), or None."""
    if e.opener is None or e.size == 0:
        return None
    f = e.opener()
    try:
        return tarfile.open(fileobj=f, mode="r:*")
    except (tarfile.TarError, EOFError, OSError, ValueError):
        f.close()
        return None


def plan(sources: list[Source], dest: str, workdir: str, tree: ImageTree, *, what: str, many: bool,
         chown: tuple[int, int] | None, chmod: int | None, keep_owner: bool, now: int,
         extract: bool = False) -> Plan:
    """The members of one COPY/ADD layer: destination parents, then every copied entry."""
    out = Plan()
    dest_abs = dest if dest.startswith("/") else posixpath.join(workdir or "/", dest)
    dir_dest = dest.endswith("/") or dest in (".", "..") or dest.endswith("/.")
    if (many or len(sources) > 1) and not dir_dest:
        raise CopyError(f"{what}: with more than one source the destination must be a directory ending in /")
    real_dest = tree.resolve(posixpath.normpath(dest_abs).lstrip("/"))
    st = tree.stat(real_dest) if real_dest else tree.stat("")
    if st is not None and stat.S_ISDIR(st.mode):
        dir_dest = True

    def owner(uid: int, gid: int) -> tuple[int, int]:
        if chown is not None:
            return chown
        return (uid, gid) if keep_owner else (0, 0)

    def mode_of(mode: int) -> int:
        if chmod is not None and not stat.S_ISLNK(mode):
            return stat.S_IFMT(mode) | chmod
        return mode

    made: set[str] = set()

    def parents(path: str) -> None:
        """Every directory above ``path`` (and ``path`` itself when it is one we make) into the layer."""
        parts = [p for p in path.split("/") if p]
        for n in range(1, len(parts) + 1):
            p = "/".join(parts[:n])
            if p in made:
                continue
            made.add(p)
            ist = tree.stat(p)
            if ist is None:
                uid, gid = chown if chown is not None else (0, 0)
                out.members.append(Member(p, stat.S_IFDIR | 0o755, uid, gid, now))
            elif stat.S_ISDIR(ist.mode):
                out.members.append(tree.member(p))
            else:
                raise CopyError(f"{what}: /{p} is not a directory in the image")

    if not sources:   # WORKDIR: only the directories
        parents(real_dest)
    for src in sources:
        top = src.entries[0]
        archive = _archive(top) if extract and stat.S_ISREG(top.mode) else None
        if archive is not None:
            out.closers.append(archive)
            parents(real_dest)
            extract_archive(archive, real_dest, out, chown, what)
            continue
        if src.is_dir:
            target = real_dest
            parents(target)
            for e in src.entries[1:]:
                _put(out, posixpath.join(target, e.rel), e, owner, mode_of)
            continue
        if dir_dest:
            target = posixpath.join(real_dest, src.base) if real_dest else src.base
        else:
            parent, name = posixpath.split(posixpath.normpath(dest_abs).lstrip("/"))
            parent = tree.resolve(parent)
            target = posixpath.join(parent, name) if parent else name
        parents(posixpath.dirname(target))
        tst = tree.stat(target)
        if tst is not None and stat.S_ISDIR(tst.mode) and not stat.S_ISDIR(top.mode):
            raise CopyError(f"{what}: cannot overwrite the directory /{target} with a file")
        _put(out, target, top, owner, mode_of)
    return out


def _put(out: Plan, path: str, e: Entry, owner, mode_of) -> None:
    """One copied entry; the later names of a hard-linked file become tar hard links to its first."""
    uid, gid = owner(e.uid, e.gid)
    first = out.links.setdefault(e.inode, path) if e.inode is not None else path
    out.members.append(Member(path, mode_of(e.mode), uid, gid, e.mtime_ns // 10**9,
                              first if first != path else e.link, e.xattrs, e.opener, e.size,
                              hardlink=first != path))


def extract_archive(tf: tarfile.TarFile, dest: str, out: Plan, chown: tuple[int, int] | None, what: str) -> None:
    """ADD of a local archive: its members below ``dest``; none may leave it, hard links only to earlier files."""
    try:
        members = tf.getmembers()
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        raise CopyError(f"{what}: a broken archive: {e}") from None
    seen: set[str] = set()
    for m in members:
        name = posixpath.normpath("/" + m.name).lstrip("/")
        if ".." in m.name.split("/") or not name:
            if not name:
                continue
            raise CopyError(f"{what}: the archive's member {m.name!r} leaves its directory")
        path = posixpath.join(dest, name) if dest else name
        uid, gid = chown if chown is not None else (m.uid, m.gid)
        xattrs = tuple(sorted((k[len("SCHILY.xattr."):], v.encode("utf-8", "surrogateescape"))
                              for k, v in m.pax_headers.items()
                              if k.startswith("SCHILY.xattr.") and keep_xattr(k[len("SCHILY.xattr."):])))
        seen.add(name)
        if m.islnk():
            target = posixpath.normpath("/" + m.linkname).lstrip("/")
            if target not in seen or ".." in m.linkname.split("/"):
                raise CopyError(f"{what}: the archive's hard link {m.name!r} points to {m.linkname!r}, "
                                "not to an earlier file of the archive")
            out.members.append(Member(path, stat.S_IFREG | m.mode, uid, gid, int(m.mtime),
                                      posixpath.join(dest, target) if dest else target, xattrs,
                                      lambda tf=tf, m=m: tf.extractfile(m), m.size, hardlink=True))
            continue
        kind = {tarfile.DIRTYPE: stat.S_IFDIR, tarfile.SYMTYPE: stat.S_IFLNK, tarfile.FIFOTYPE: stat.S_IFIFO,
                tarfile.CHRTYPE: stat.S_IFCHR, tarfile.BLKTYPE: stat.S_IFBLK}.get(m.type, stat.S_IFREG)
        opener = (lambda tf=tf, m=m: tf.extractfile(m)) if m.isreg() else None
        rdev = os.makedev(m.devmajor, m.devminor) if m.ischr() or m.isblk() else 0
        out.members.append(Member(path, kind | m.mode, uid, gid, int(m.mtime), m.linkname if m.issym() else "",
                                  xattrs, opener, m.size if m.isreg() else 0, rdev=rdev))
