"""Random access into ordinary gzip and zstd layer blobs, through an index made once (as SOCI's zTOC).

A plain gzip'd tar cannot be entered in the middle: the deflate decoder needs the state at that
point (a bit offset and the 32 KiB window before it).  :func:`build` reads a blob once and keeps

- *checkpoints*: for gzip, every ``spacing`` bytes (4 MiB) of uncompressed data, the decoder's
  state, made and later used by ``indexed_gzip`` (zran: a compressed offset, its bit, the window;
  measured against ``rapidgzip`` and hand-made zlib, see README "Lazy images"); for zstd, the
  start of the first frame after each ``spacing`` bytes (frames decode on their own, so a
  multi-frame layer such as zstd:chunked or ``pzstd`` output is indexable; a layer of one frame
  is not, and is pulled whole);
- *spans*: the blob cut into pieces of ``span`` compressed bytes, each with its sha256, so every
  byte fetched by range is checked before it is decompressed;
- the *file table*: each tar member's header as :mod:`tarfile` read it (name, type, size, mode,
  owners, times, link target, device, PAX records with xattrs) and where its data starts in the
  uncompressed stream, in tar order (``.wh.`` whiteouts and opaque markers are members too).

:func:`encode` / :func:`decode` are the format both ways (gzip'd JSON, one document per layer,
the windows as base64); :func:`decode` checks every field, as for anything from a registry.
:class:`Reader` decompresses a range of the uncompressed stream from the nearest checkpoint
before it, asking a ``fetch`` callback for the compressed bytes (the caller fetches and checks
spans).
"""
from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import struct
import tarfile
from dataclasses import dataclass
from typing import BinaryIO, Callable

import indexed_gzip
import zstandard

from .compression import DECOMPRESS_ERRORS, HashingReader, check_diff_id, corrupt, decompressed, detect
from .extract import open_stream
from .model import ImageError

ARTIFACT_TYPE = "application/vnd.unionfs.lazy.index.v1+json"        # the referrer manifest's artifactType
LAYER_MEDIA_TYPE = "application/vnd.unionfs.lazy.index.layer.v1+json+gzip"   # one blob per indexed layer
LAYER_ANNOTATION = "io.unionfs.lazy.layer.digest"                     # on each blob: the layer it indexes
VERSION = 1
SPACING = 4 << 20        # uncompressed bytes between checkpoints
SPAN = 512 << 10         # compressed bytes per verified span
MAX_INDEX = 64 << 20     # an index blob (uncompressed) bigger than this is refused
_READBUF = 64 << 10      # indexed_gzip reads compressed data in pieces of this size
_MEMBER_FIELDS = ("name", "type", "size", "mode", "uid", "gid", "uname", "gname", "mtime", "linkname",
                  "devmajor", "devminor")


class NotIndexable(ImageError):
    """A blob that cannot be entered in the middle (zstd in one frame, or no gzip/zstd at all)."""


@dataclass(frozen=True)
class Member:
    """One tar member: its header, and where its data starts in the uncompressed stream."""
    info: tarfile.TarInfo
    data_offset: int
    header_offset: int         # its first header block (PAX or GNU long-name headers included)


@dataclass(frozen=True)
class LayerIndex:
    layer: str                    # the blob's digest
    diff_id: str
    compression: str              # "gzip" or "zstd"
    blob_size: int
    size: int                     # of the uncompressed stream
    spans: list[tuple[int, str]]  # (compressed offset, sha256 hex): span i ends where span i+1 starts
    gzip_index: bytes             # indexed_gzip's export (gzip), empty for zstd
    frames: list[tuple[int, int]]  # zstd: (compressed, uncompressed) offsets of checkpoint frames
    members: list[Member]

    def span_end(self, i: int) -> int:
        return self.spans[i + 1][0] if i + 1 < len(self.spans) else self.blob_size


# --- building ----------------------------------------------------------------------------

def _members(stream: BinaryIO, what: str) -> list[Member]:
    out = []
    try:
        with open_stream(stream) as tar:
            for ti in tar:
                if ti.issparse():
                    raise NotIndexable(f"{what}: {ti.name!r} is a GNU sparse member")
                out.append(Member(ti, ti.offset_data, ti.offset))
    except tarfile.TarError as e:
        raise ImageError(f"{what}: not a tar archive ({e})") from None
    return out


def _zstd_frames(path: str, spacing: int, what: str) -> list[tuple[int, int]]:
    """(compressed, uncompressed) offsets of the first frame after each ``spacing`` bytes."""
    frames: list[tuple[int, int]] = []
    cpos = upos = last = 0
    with open(path, "rb") as f:
        pending = b""
        while True:
            if not pending:
                pending = f.read(1 << 20)
                if not pending:
                    break
            if not frames or upos - last >= spacing:
                frames.append((cpos, upos))
                last = upos
            d = zstandard.ZstdDecompressor().decompressobj()
            while True:
                upos += len(d.decompress(pending))
                if d.eof:
                    cpos += len(pending) - len(d.unused_data)
                    pending = d.unused_data
                    break
                cpos += len(pending)
                pending = f.read(1 << 20)
                if not pending:
                    raise ImageError(f"{what}: truncated zstd frame at byte {cpos}")
    return frames


def build(path: str, digest: str, diff_id: str, what: str, spacing: int = SPACING, span: int = SPAN) -> LayerIndex:
    """The index of the layer blob at ``path``, checked against its digest and diff_id as it is read."""
    with open(path, "rb") as f:
        kind = detect(f.read(6))
    try:
        if kind == "gzip":
            g = indexed_gzip.IndexedGzipFile(path, spacing=spacing, readbuf_size=_READBUF)
            try:
                g.build_full_index()
                out = io.BytesIO()
                g.export_index(fileobj=out)
            finally:
                g.close()
            ckpt, frames = gzip.compress(out.getvalue(), 6, mtime=0), []
        elif kind == "zstd":
            ckpt, frames = b"", _zstd_frames(path, spacing, what)
            if len(frames) < 2:
                raise NotIndexable(f"{what}: zstd in one frame cannot be entered in the middle (pulled whole)")
        else:
            raise NotIndexable(f"{what}: a {kind} layer (only gzip and zstd are indexed)")
        spans = []
        with open(path, "rb") as f:
            raw = HashingReader(f)
            while piece := raw.read(span):
                spans.append((raw.count - len(piece), hashlib.sha256(piece).hexdigest()))
            blob_size = raw.count
        if raw.digest != digest:
            raise ImageError(f"{what}: does not match its digest (expected {digest}, got {raw.digest})")
        with open(path, "rb") as f:
            _, stream = decompressed(HashingReader(f))
            tar = HashingReader(stream)  # type: ignore[arg-type]
            members = _members(tar, what)  # type: ignore[arg-type]
            tar.drain()
    except DECOMPRESS_ERRORS as e:
        raise corrupt(what, e) from None
    check_diff_id(tar.digest, diff_id, what)
    return LayerIndex(digest, diff_id, kind, blob_size, tar.count, spans, ckpt, frames, members)


# --- the format, both ways ---------------------------------------------------------------

def _member_doc(m: Member) -> dict:
    ti = m.info
    doc = {k: getattr(ti, k) for k in _MEMBER_FIELDS}
    doc["type"] = ti.type.decode("latin-1")
    doc["offset"] = m.data_offset
    doc["header"] = m.header_offset
    if ti.pax_headers:
        doc["pax"] = dict(ti.pax_headers)
    return doc


def same_member(ti: tarfile.TarInfo, m: Member) -> bool:
    """Whether a member read from the blob is the one the index describes (header and offsets)."""
    return _member_doc(Member(ti, ti.offset_data, ti.offset)) == _member_doc(m)


def header_matches(head: bytes, m: Member) -> bool:
    """Whether the uncompressed bytes from ``m.header_offset`` to its data are the header the index
    describes (a read checks the file table so for the files it fills, before the background fill
    checks every member)."""
    if m.data_offset - m.header_offset != len(head):
        return False
    try:
        with open_stream(io.BytesIO(head + bytes(1024))) as t:
            ti = t.next()
    except tarfile.TarError:
        return False
    if ti is None or ti.offset_data != len(head):
        return False
    return _member_doc(Member(ti, m.data_offset, m.header_offset)) == _member_doc(m)


def encode(ix: LayerIndex) -> bytes:
    doc = {"version": VERSION, "layer": ix.layer, "diff_id": ix.diff_id, "compression": ix.compression,
           "blob_size": ix.blob_size, "size": ix.size, "spans": [list(s) for s in ix.spans],
           "gzip_index": base64.b64encode(ix.gzip_index).decode(), "frames": [list(f) for f in ix.frames],
           "members": [_member_doc(m) for m in ix.members]}
    return gzip.compress(json.dumps(doc, separators=(",", ":")).encode(), 6, mtime=0)


def _typed(doc: dict, key: str, kind, what: str):
    v = doc.get(key)
    if not isinstance(v, kind) or isinstance(v, bool) and kind is not bool:
        raise ImageError(f"{what}: field {key!r} is missing or not a {getattr(kind, '__name__', kind)}")
    return v


def _count(doc: dict, key: str, what: str) -> int:
    v = _typed(doc, key, int, what)
    if v < 0:
        raise ImageError(f"{what}: field {key!r} is negative")
    return v


def _member(doc, what: str) -> Member:
    if not isinstance(doc, dict):
        raise ImageError(f"{what}: a member is not an object")
    ti = tarfile.TarInfo(_typed(doc, "name", str, what))
    kind = _typed(doc, "type", str, what)
    if len(kind) != 1:
        raise ImageError(f"{what}: member type {kind!r}")
    ti.type = kind.encode("latin-1")
    for k in ("size", "mode", "uid", "gid", "devmajor", "devminor"):
        setattr(ti, k, _count(doc, k, what))
    ti.uname, ti.gname, ti.linkname = (_typed(doc, k, str, what) for k in ("uname", "gname", "linkname"))
    mtime = doc.get("mtime")
    if not isinstance(mtime, (int, float)) or isinstance(mtime, bool):
        raise ImageError(f"{what}: member mtime is not a number")
    ti.mtime = mtime
    pax = doc.get("pax", {})
    if not isinstance(pax, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in pax.items()):
        raise ImageError(f"{what}: member pax records are not strings")
    ti.pax_headers = pax
    data, head = _count(doc, "offset", what), _count(doc, "header", what)
    if not head < data or data - head > 1 << 20:
        raise ImageError(f"{what}: member {ti.name!r}: its header is not before its data")
    return Member(ti, data, head)


def gzip_points(packed: bytes, blob_size: int, what: str) -> list[tuple[int, int]]:
    """The (uncompressed, compressed) offsets of indexed_gzip's checkpoints (zran's GZIDX, version 0
    or 1), checked before its C parser sees them: the sizes, points in order within the blob, bits
    0-7, the length that many points take."""
    try:
        raw = gzip.decompress(packed)
    except (OSError, EOFError) as e:
        raise ImageError(f"{what}: the gzip checkpoints do not decompress ({e})") from None
    head = struct.Struct("<5sBBQQIII")
    if len(raw) < head.size:
        raise ImageError(f"{what}: the gzip checkpoints are truncated")
    magic, version, _, csize, _, spacing, window, npoints = head.unpack_from(raw)
    if magic != b"GZIDX" or version > 1 or csize != blob_size or window < 32768 or spacing < window \
            or npoints < 1:
        raise ImageError(f"{what}: the gzip checkpoints are not an index of this blob")
    point = struct.Struct("<QQBB" if version else "<QQB")
    at, last, windows, points = head.size, -1, 0, []
    for _ in range(npoints):
        if at + point.size > len(raw):
            raise ImageError(f"{what}: the gzip checkpoints are truncated")
        cmp_offset, uncmp_offset, bits, *flag = point.unpack_from(raw, at)
        at += point.size
        # zran's own last point can share the one before's uncompressed offset (the stream's end, after
        # the last block): in order means compressed offsets rising, uncompressed ones never falling
        if cmp_offset <= last or cmp_offset > blob_size or bits > 7 or points and uncmp_offset < points[-1][0]:
            raise ImageError(f"{what}: a gzip checkpoint is out of order or outside the blob")
        last = cmp_offset
        windows += 1 if (flag[0] if flag else cmp_offset > 0 or bits) else 0
        points.append((uncmp_offset, cmp_offset))
    if len(raw) - at > windows * window:
        raise ImageError(f"{what}: the gzip checkpoints have trailing data")
    return points


def decode(blob: bytes, what: str) -> LayerIndex:
    """An index blob, every field checked (it comes from a registry)."""
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(blob)) as g:
            raw = g.read(MAX_INDEX + 1)
        if len(raw) > MAX_INDEX:
            raise ImageError(f"{what}: the index is bigger than {MAX_INDEX} bytes")
        doc = json.loads(raw)
    except (OSError, EOFError, ValueError) as e:
        raise ImageError(f"{what}: not an index ({e.__class__.__name__}: {e})") from None
    if not isinstance(doc, dict) or doc.get("version") != VERSION:
        raise ImageError(f"{what}: not a version {VERSION} index")
    kind = _typed(doc, "compression", str, what)
    if kind not in ("gzip", "zstd"):
        raise ImageError(f"{what}: compression {kind!r}")
    blob_size = _count(doc, "blob_size", what)
    spans = _typed(doc, "spans", list, what)
    offsets = []
    for s in spans:
        if not (isinstance(s, list) and len(s) == 2 and isinstance(s[0], int) and isinstance(s[1], str)
                and len(s[1]) == 64):
            raise ImageError(f"{what}: a span is not [offset, sha256]")
        offsets.append(s[0])
    if not spans or offsets[0] != 0 or any(b <= a for a, b in zip(offsets, offsets[1:])) or offsets[-1] >= blob_size:
        raise ImageError(f"{what}: the spans do not cut the blob in order")
    frames = _typed(doc, "frames", list, what)
    if not all(isinstance(f, list) and len(f) == 2 and all(isinstance(x, int) and x >= 0 for x in f) for f in frames):
        raise ImageError(f"{what}: a frame is not [offset, offset]")
    try:
        ckpt = base64.b64decode(_typed(doc, "gzip_index", str, what), validate=True)
    except ValueError:
        raise ImageError(f"{what}: gzip_index is not base64") from None
    if kind == "gzip":
        gzip_points(ckpt, blob_size, what)
    elif not frames or frames[0] != [0, 0] or any(b[0] <= a[0] or b[1] < a[1] or b[0] >= blob_size
                                                  for a, b in zip(frames, frames[1:])):
        raise ImageError(f"{what}: the zstd checkpoints do not start at 0 and go forward within the blob")
    members = [_member(m, what) for m in _typed(doc, "members", list, what)]
    return LayerIndex(_typed(doc, "layer", str, what), _typed(doc, "diff_id", str, what), kind, blob_size,
                      _count(doc, "size", what), [(o, h) for o, h in spans], ckpt,
                      [(c, u) for c, u in frames], members)


# --- reading -----------------------------------------------------------------------------

class _BlobFile(io.RawIOBase):
    """The compressed blob as a file, its bytes asked of ``fetch(start, end)`` as the decoder reads."""

    def __init__(self, size: int, fetch: Callable[[int, int], bytes]) -> None:
        self.size, self.fetch, self.pos = size, fetch, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = offset + (0, self.pos, self.size)[whence]
        return self.pos

    def readinto(self, b) -> int:
        end = min(self.pos + len(b), self.size)
        if end <= self.pos:
            return 0
        data = self.fetch(self.pos, end)
        b[:len(data)] = data
        self.pos += len(data)
        return len(data)


class Reader:
    """Bytes of a layer's uncompressed stream, decompressed from the nearest checkpoint before them.
    Not thread-safe (the caller holds its lock); after a failed read the decoder is made anew."""

    def __init__(self, ix: LayerIndex, fetch: Callable[[int, int], bytes]) -> None:
        self.ix = ix
        self.file = _BlobFile(ix.blob_size, fetch)
        self._gz: indexed_gzip.IndexedGzipFile | None = None

    def points(self) -> list[tuple[int, int]]:
        """(uncompressed, compressed) offsets where decoding can start, in order."""
        if self.ix.compression == "gzip":
            return gzip_points(self.ix.gzip_index, self.ix.blob_size, self.ix.layer)
        return [(u, c) for c, u in self.ix.frames]

    def _gzip(self) -> indexed_gzip.IndexedGzipFile:
        if self._gz is None:
            g = indexed_gzip.IndexedGzipFile(fileobj=self.file, auto_build=False, readbuf_size=_READBUF,
                                             buffer_size=_READBUF, skip_crc_check=True)   # the spans are checked instead
            g.import_index(fileobj=io.BytesIO(gzip.decompress(self.ix.gzip_index)))
            self._gz = g
        return self._gz

    def read(self, offset: int, size: int) -> bytes:
        try:
            if self.ix.compression == "gzip":
                g = self._gzip()
                g.seek(offset)
                data = g.read(size)
            else:
                data = self._zstd(offset, size)
        except Exception:   # a fetch that failed, or data that does not decode: the next read starts anew
            if self._gz is not None:
                self._gz.close()
                self._gz = None
            raise
        if len(data) != size:
            raise ImageError(f"layer {self.ix.layer}: {len(data)} bytes at {offset}, not {size}")
        return data

    def _zstd(self, offset: int, size: int) -> bytes:
        frames = self.ix.frames
        i = max(k for k, (_, u) in enumerate(frames) if u <= offset)
        cpos, upos = frames[i]
        out = bytearray()
        d = zstandard.ZstdDecompressor().decompressobj()
        while upos + len(out) < offset + size and cpos < self.ix.blob_size:
            piece = self.file.fetch(cpos, min(cpos + _READBUF, self.ix.blob_size))
            cpos += len(piece)
            while piece:
                out += d.decompress(piece)
                if not d.eof:
                    break
                piece = d.unused_data
                d = zstandard.ZstdDecompressor().decompressobj()
            if offset > upos:   # what lies before the range goes as it comes
                cut = min(len(out), offset - upos)
                del out[:cut]
                upos += cut
        skip = offset - upos
        return bytes(out[skip:skip + size])
