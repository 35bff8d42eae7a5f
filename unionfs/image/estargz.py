"""eStargz layers (containerd/stargz-snapshotter docs/estargz.md), both ways.

An eStargz blob is an ordinary gzip'd tar that any runtime pulls and extracts, built so a
reader can also fetch single files by HTTP range: every regular file's content (each chunk
of a big file) starts a fresh gzip member, a table of contents ``stargz.index.json`` is the
last tar entry (its own member), and a 51-byte empty gzip member at the very end (the
footer) holds the TOC's offset in its extra field.  Each TOC entry of a regular file or
chunk gives the member's ``offset`` in the blob, the ``chunkOffset``/``chunkSize`` in the
file, and the ``chunkDigest`` (sha256 of the chunk's bytes), so every byte fetched lazily is
checked.  The layer descriptor carries the TOC's digest
(``containerd.io/snapshot/stargz/toc.digest``) and the uncompressed size
(``io.containers.estargz.uncompressed-size``).

The diff_id of an eStargz layer is the sha256 of its uncompressed stream, TOC entry
included, so a converted image has new diff_ids and a new config (as ``ctr-remote
convert --estargz`` gives).
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import shutil
import struct
import tarfile
import tempfile
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import BinaryIO, Iterator

from .model import ImageError

TOC_NAME = "stargz.index.json"
FOOTER_SIZE = 51
LEGACY_FOOTER_SIZE = 47
TOC_DIGEST_ANNOTATION = "containerd.io/snapshot/stargz/toc.digest"
UNCOMPRESSED_SIZE_ANNOTATION = "io.containers.estargz.uncompressed-size"
DEFAULT_CHUNK_SIZE = 4 << 20     # the Go writer's default
PREFETCH_LANDMARK = ".prefetch.landmark"        # files before this entry are fetched first (the spec's prefetch)
NO_PREFETCH_LANDMARK = ".no.prefetch.landmark"  # the image says: prefetch nothing
LANDMARK_CONTENT = b"\x0f"                      # either landmark file holds this one byte
MAX_TOC = 64 << 20               # a TOC bigger than this is refused, not parsed
MAX_CHUNK = 256 << 20            # a chunk is decompressed in memory: no honest writer makes them this big
_BLOCK = 512

_TYPES = {tarfile.DIRTYPE: "dir", tarfile.REGTYPE: "reg", tarfile.AREGTYPE: "reg", tarfile.CONTTYPE: "reg",
          tarfile.SYMTYPE: "symlink", tarfile.LNKTYPE: "hardlink", tarfile.CHRTYPE: "char",
          tarfile.BLKTYPE: "block", tarfile.FIFOTYPE: "fifo"}


@dataclass(frozen=True)
class Written:
    """What :func:`write` made: the blob's digest and size, and what goes in the config and descriptor."""

    digest: str
    size: int
    diff_id: str
    uncompressed_size: int
    toc_digest: str

    def annotations(self) -> dict[str, str]:
        return {TOC_DIGEST_ANNOTATION: self.toc_digest, UNCOMPRESSED_SIZE_ANNOTATION: str(self.uncompressed_size)}


class _Out:
    """The blob being written: gzip members one after another, both streams hashed and counted."""

    def __init__(self, out: BinaryIO, level: int) -> None:
        self.out, self.level = out, level
        self.blob, self.tar = hashlib.sha256(), hashlib.sha256()
        self.offset = self.tar_size = 0
        self.gz: zlib._Compress | None = None   # type: ignore[name-defined]

    def _emit(self, data: bytes) -> None:
        if data:
            self.out.write(data)
            self.blob.update(data)
            self.offset += len(data)

    def write(self, data: bytes) -> None:
        if self.gz is None:
            self.gz = zlib.compressobj(self.level, zlib.DEFLATED, 31)   # wbits 31: a gzip member
        self.tar.update(data)
        self.tar_size += len(data)
        self._emit(self.gz.compress(data))

    def close_member(self) -> None:
        if self.gz is not None:
            self._emit(self.gz.flush())
            self.gz = None

    def raw(self, data: bytes) -> None:
        self.close_member()
        self._emit(data)


def footer(toc_offset: int) -> bytes:
    """The 51-byte eStargz footer: an empty gzip member whose extra field says where the TOC is."""
    payload = b"%016xSTARGZ" % toc_offset
    extra = b"SG" + struct.pack("<H", len(payload)) + payload
    return (b"\x1f\x8b\x08\x04\x00\x00\x00\x00\x00\xff" + struct.pack("<H", len(extra)) + extra
            + b"\x01\x00\x00\xff\xff" + b"\x00" * 8)


def parse_footer(data: bytes) -> int:
    """The TOC offset from a blob's last 51 bytes (eStargz) or 47 bytes (legacy stargz)."""
    if len(data) >= FOOTER_SIZE:
        tail = data[-FOOTER_SIZE:]
        if tail[:4] == b"\x1f\x8b\x08\x04" and struct.unpack("<H", tail[10:12])[0] == 26 and tail[12:16] == b"SG\x16\x00":
            return _hex_offset(tail[16:38])
    if len(data) >= LEGACY_FOOTER_SIZE:
        tail = data[-LEGACY_FOOTER_SIZE:]
        if tail[:4] == b"\x1f\x8b\x08\x04" and struct.unpack("<H", tail[10:12])[0] == 22:
            return _hex_offset(tail[12:34])
    raise ImageError("not an eStargz blob: no stargz footer at its end")


def _hex_offset(payload: bytes) -> int:
    if not payload.endswith(b"STARGZ"):
        raise ImageError("not an eStargz blob: its footer lacks the STARGZ mark")
    try:
        return int(payload[:16], 16)
    except ValueError:
        raise ImageError(f"eStargz footer: bad TOC offset {payload[:16]!r}") from None


def _modtime(ti: tarfile.TarInfo) -> str | None:
    """RFC 3339 in UTC, with the PAX header's fraction of a second when there is one (Go parses both)."""
    if not ti.mtime:
        return None
    text = ti.pax_headers.get("mtime") or ""
    secs, _, frac = text.partition(".")
    whole = int(secs) if secs.lstrip("-").isdigit() else int(ti.mtime)
    frac = frac if frac.isdigit() else ""
    stamp = datetime.fromtimestamp(whole, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{stamp}.{frac}Z" if frac else stamp + "Z"


_RFC3339 = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d)")


def parse_modtime(text: str | None) -> float:
    """Seconds since 1970 from a TOC ``modtime``, the fraction kept as the tar's PAX header had it."""
    m = _RFC3339.fullmatch(text) if isinstance(text, str) else None
    if m is None:
        return 0
    try:
        whole = int(datetime.fromisoformat(m[1] + ("+00:00" if m[3] == "Z" else m[3])).timestamp())
    except ValueError:
        return 0
    return float(f"{whole}.{m[2]}") if m[2] else whole


def clean_name(name: str) -> str:
    """An entry's name as the TOC keys it: no leading ``./`` or ``/``, no trailing ``/``."""
    while name.startswith("./"):
        name = name[2:]
    return name.strip("/")


def _entry(ti: tarfile.TarInfo) -> dict:
    kind = _TYPES.get(ti.type)
    if kind is None:
        raise ImageError(f"{ti.name}: tar entry type {ti.type!r} has no eStargz form")
    ent: dict = {"name": clean_name(ti.name), "type": kind, "mode": ti.mode, "uid": ti.uid, "gid": ti.gid}
    if ti.uname:
        ent["userName"] = ti.uname
    if ti.gname:
        ent["groupName"] = ti.gname
    mt = _modtime(ti)
    if mt:
        ent["modtime"] = mt
    if kind in ("symlink", "hardlink"):
        ent["linkName"] = clean_name(ti.linkname) if kind == "hardlink" else ti.linkname
    if kind in ("char", "block"):
        ent["devMajor"], ent["devMinor"] = ti.devmajor, ti.devminor
    xattrs = {k[len("SCHILY.xattr."):]: base64.b64encode(v.encode("utf-8", "surrogateescape")).decode()
              for k, v in ti.pax_headers.items() if k.startswith("SCHILY.xattr.")}
    if xattrs:
        ent["xattrs"] = xattrs
    return ent


def write(tar: BinaryIO, out: BinaryIO, chunk_size: int = DEFAULT_CHUNK_SIZE, level: int = 6,
          prefetch: list[str] | None = None) -> Written:
    """Write the uncompressed layer tar ``tar`` to ``out`` as an eStargz blob.

    Every member keeps its metadata (PAX headers, xattrs, hard links, devices, whiteouts as
    ``.wh.`` files); the original tar's end-of-archive blocks make way for the TOC entry.
    With ``prefetch`` (a recorded access order; ``[]``: this layer has none of it), the
    regular files named come first in that order, each after its parent directories' entries
    (and their opaque markers), then ``.prefetch.landmark``, then the rest in their order, as
    ``ctr-remote optimize`` writes a layer; ``[]`` puts ``.no.prefetch.landmark`` first."""
    if chunk_size <= 0:
        raise ImageError(f"eStargz chunk size {chunk_size}: must be positive")
    w = _Out(out, level)
    entries: list[dict] = []
    try:
        src = tarfile.open(fileobj=tar, mode="r|", format=tarfile.PAX_FORMAT)
        if prefetch is None:
            for ti in src:
                if not _is_toc(ti):
                    _member(w, ti, src.extractfile(ti) if ti.isreg() else None, entries, chunk_size)  # type: ignore[arg-type]
        else:
            _reordered(w, src, prefetch, entries, chunk_size)
    except (tarfile.TarError, EOFError, zlib.error) as e:
        raise ImageError(f"layer tar: {e}") from None
    w.close_member()
    toc_offset = w.offset
    toc = json.dumps({"version": 1, "entries": entries}, separators=(",", ":")).encode()
    head = tarfile.TarInfo(TOC_NAME)
    head.size, head.mode, head.type = len(toc), 0o644, tarfile.REGTYPE
    w.write(head.tobuf(tarfile.USTAR_FORMAT))
    w.write(toc + b"\0" * (-len(toc) % _BLOCK) + b"\0" * (2 * _BLOCK))
    w.raw(footer(toc_offset))
    return Written("sha256:" + w.blob.hexdigest(), w.offset, "sha256:" + w.tar.hexdigest(), w.tar_size,
                   "sha256:" + hashlib.sha256(toc).hexdigest())


def _is_toc(ti: tarfile.TarInfo, landmarks: bool = False) -> bool:
    """An eStargz layer converted again: its old TOC goes (and its landmarks, when a new order comes)."""
    return clean_name(ti.name) in ((TOC_NAME, PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK) if landmarks else (TOC_NAME,))


def _member(w: "_Out", ti: tarfile.TarInfo, data: BinaryIO | None, entries: list[dict], chunk_size: int) -> None:
    ent = _entry(ti)
    w.write(ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
    if ent["type"] == "reg":
        ent["size"] = ti.size
        entries.extend(_write_content(w, data, ti.size, ent, chunk_size))  # type: ignore[arg-type]
        if ti.size % _BLOCK:
            w.write(b"\0" * (_BLOCK - ti.size % _BLOCK))
    else:
        entries.append(ent)


def _landmark(name: str) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mode, ti.type = len(LANDMARK_CONTENT), 0o644, tarfile.REGTYPE
    return ti


def _reordered(w: "_Out", src: tarfile.TarFile, prefetch: list[str], entries: list[dict], chunk_size: int) -> None:
    """The members with the prefetch files first (contents spooled to a temporary file meanwhile).
    A name the layer holds more than once keeps its place: moving it would change which one wins."""
    with tempfile.TemporaryFile() as spool:
        members: list[tuple[tarfile.TarInfo, int]] = []
        for ti in src:
            if _is_toc(ti, landmarks=True):
                continue
            at = spool.tell()
            if ti.isreg():
                shutil.copyfileobj(src.extractfile(ti), spool)   # type: ignore[arg-type]
            members.append((ti, at))
        count: dict[str, int] = {}
        for ti, _ in members:
            count[clean_name(ti.name)] = count.get(clean_name(ti.name), 0) + 1
        index = {clean_name(ti.name): i for i, (ti, _) in enumerate(members)}
        first: list[int] = []
        chosen: set[int] = set()

        def take(i: int) -> None:
            if i not in chosen:
                chosen.add(i)
                first.append(i)
        for name in dict.fromkeys(clean_name(n) for n in prefetch):
            i = index.get(name)
            if i is None or count[name] > 1 or not members[i][0].isreg():
                continue
            parts = name.split("/")
            for k in range(1, len(parts)):   # its directories' entries first, with their opaque markers
                d = "/".join(parts[:k])
                for n in (d, d + "/" + ".wh..wh..opq"):
                    j = index.get(n)
                    if j is not None and count[n] == 1 and (n != d or members[j][0].isdir()):
                        take(j)
            take(i)

        def emit(i: int) -> None:
            ti, at = members[i]
            spool.seek(at)
            _member(w, ti, spool if ti.isreg() else None, entries, chunk_size)   # type: ignore[arg-type]
        if not any(members[i][0].isreg() for i in first):
            _member(w, _landmark(NO_PREFETCH_LANDMARK), io.BytesIO(LANDMARK_CONTENT), entries, chunk_size)
            first = []
        else:
            for i in first:
                emit(i)
            _member(w, _landmark(PREFETCH_LANDMARK), io.BytesIO(LANDMARK_CONTENT), entries, chunk_size)
        done = set(first)
        for i in range(len(members)):
            if i not in done:
                emit(i)


def _write_content(w: _Out, data: BinaryIO, size: int, ent: dict, chunk_size: int) -> Iterator[dict]:
    """The file's content, each chunk in a gzip member of its own; its TOC entries (the file, then chunks)."""
    whole = hashlib.sha256()
    done = 0
    chunks = []
    while done < size:
        n = min(chunk_size, size - done)
        w.close_member()
        offset = w.offset
        chunk = data.read(n)
        if len(chunk) != n:
            raise ImageError(f"{ent['name']}: the layer tar ends inside the file")
        w.write(chunk)
        whole.update(chunk)
        part = ent if done == 0 else {"name": ent["name"], "type": "chunk"}
        part.update(offset=offset, chunkOffset=done, chunkSize=n, chunkDigest="sha256:" + hashlib.sha256(chunk).hexdigest())
        chunks.append(part)
        done += n
    ent["digest"] = "sha256:" + whole.hexdigest()
    return chunks or [ent]


# --- reading ------------------------------------------------------------------------

@dataclass
class Chunk:
    """One range of a file's content: where its gzip member starts in the blob, and its digest."""

    offset: int          # of the gzip member in the blob
    file_offset: int     # chunkOffset
    size: int
    digest: str


@dataclass
class Entry:
    """A TOC entry of a file, with its chunks in order (regular files only)."""

    name: str
    type: str
    mode: int = 0
    uid: int = 0
    gid: int = 0
    size: int = 0
    modtime: str | None = None
    link: str = ""
    dev: tuple[int, int] = (0, 0)
    xattrs: dict[str, bytes] = field(default_factory=dict)
    digest: str | None = None
    chunks: list[Chunk] = field(default_factory=list)


def parse_toc(data: bytes, what: str) -> list[Entry]:
    """The TOC's entries, chunks folded into their files, every field checked for its type."""
    try:
        doc = json.loads(data)
    except ValueError as e:
        raise ImageError(f"{what}: TOC is not JSON ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("entries"), list):
        raise ImageError(f"{what}: TOC has no entries")
    out: list[Entry] = []
    files: dict[str, Entry] = {}
    for raw in doc["entries"]:
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str) or not isinstance(raw.get("type"), str):
            raise ImageError(f"{what}: TOC entry without a name and type")
        kind, name = raw["type"], clean_name(raw["name"])
        ints = {k: raw.get(k, 0) for k in ("mode", "uid", "gid", "size", "offset", "chunkOffset", "chunkSize",
                                           "devMajor", "devMinor")}
        if any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in ints.values()):
            raise ImageError(f"{what}: TOC entry {name!r} has a field that is not a non-negative integer")
        if kind in ("reg", "chunk"):
            ent = files.get(name) if kind == "chunk" else None
            if kind == "chunk" and ent is None:
                raise ImageError(f"{what}: TOC chunk of {name!r} before its file")
            if kind == "reg":
                ent = Entry(name, "reg", ints["mode"], ints["uid"], ints["gid"], ints["size"], raw.get("modtime"),
                            xattrs=_xattrs(raw, what), digest=raw.get("digest"))
                files[name] = ent
                out.append(ent)
            assert ent is not None
            if ent.size:
                size = ints["chunkSize"] or ent.size - ints["chunkOffset"]
                if not 0 < size <= MAX_CHUNK:
                    raise ImageError(f"{what}: TOC chunk of {name!r} is {size} bytes (at most {MAX_CHUNK})")
                cd = raw.get("chunkDigest")
                if not isinstance(cd, str) or not cd.startswith("sha256:"):
                    raise ImageError(f"{what}: TOC chunk of {name!r} has no sha256 chunkDigest")
                ent.chunks.append(Chunk(ints["offset"], ints["chunkOffset"], size, cd))
            continue
        if kind not in ("dir", "symlink", "hardlink", "char", "block", "fifo"):
            raise ImageError(f"{what}: TOC entry {name!r} of unknown type {kind!r}")
        link = raw.get("linkName", "")
        if not isinstance(link, str):
            raise ImageError(f"{what}: TOC entry {name!r}: linkName is not a string")
        out.append(Entry(name, kind, ints["mode"], ints["uid"], ints["gid"], 0, raw.get("modtime"),
                         clean_name(link) if kind == "hardlink" else link, (ints["devMajor"], ints["devMinor"]),
                         _xattrs(raw, what)))
    for ent in files.values():   # the chunks tile the file, in order
        pos = 0
        for c in ent.chunks:
            if c.file_offset != pos:
                raise ImageError(f"{what}: TOC chunks of {ent.name!r} do not tile the file")
            pos += c.size
        if pos != ent.size:
            raise ImageError(f"{what}: TOC chunks of {ent.name!r} cover {pos} of its {ent.size} bytes")
    return out


def _xattrs(raw: dict, what: str) -> dict[str, bytes]:
    x = raw.get("xattrs") or {}
    if not isinstance(x, dict):
        raise ImageError(f"{what}: TOC xattrs of {raw.get('name')!r} are not an object")
    try:
        return {str(k): base64.b64decode(v, validate=True) for k, v in x.items()}
    except (ValueError, TypeError):
        raise ImageError(f"{what}: TOC xattrs of {raw.get('name')!r} are not base64") from None


def read_toc_member(member: bytes, what: str) -> bytes:
    """The TOC JSON from the blob's bytes between the TOC offset and the footer (a gzip'd tar entry)."""
    try:
        tar = zlib.decompressobj(31).decompress(member, 512 + MAX_TOC + 2 * _BLOCK)
    except zlib.error as e:
        raise ImageError(f"{what}: TOC member is not gzip ({e})") from None
    try:
        ti = tarfile.TarInfo.frombuf(tar[:_BLOCK], "utf-8", "surrogateescape")
    except tarfile.TarError as e:
        raise ImageError(f"{what}: TOC member holds no tar header ({e})") from None
    if clean_name(ti.name) != TOC_NAME or ti.size > MAX_TOC or len(tar) < _BLOCK + ti.size:
        raise ImageError(f"{what}: the entry at the TOC offset is not a whole {TOC_NAME}")
    return tar[_BLOCK:_BLOCK + ti.size]


def read_chunk(member: bytes, chunk: Chunk, what: str) -> bytes:
    """A chunk's bytes from the compressed bytes starting at its member, checked against its digest."""
    try:
        data = zlib.decompressobj(31).decompress(member, chunk.size)
    except zlib.error as e:
        raise ImageError(f"{what}: chunk at {chunk.offset} is not gzip ({e})") from None
    data = data[:chunk.size]
    if len(data) != chunk.size or "sha256:" + hashlib.sha256(data).hexdigest() != chunk.digest:
        raise ImageError(f"{what}: chunk at blob offset {chunk.offset} does not match its chunkDigest {chunk.digest}")
    return data


def prefetch_names(entries: list[Entry]) -> list[str]:
    """The regular files before the TOC's ``.prefetch.landmark`` (none without one, or with
    ``.no.prefetch.landmark``): what a lazy reader fetches first, as the image's writer chose."""
    names = [e.name for e in entries]
    if PREFETCH_LANDMARK not in names:
        return []
    return [e.name for e in entries[:names.index(PREFETCH_LANDMARK)] if e.type == "reg" and e.chunks]
