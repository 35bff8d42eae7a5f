"""Lazy gzip and zstd layers: an ordinary layer blob served by range through its index.

``unionfs index REFERENCE`` builds, for each gzip or multi-frame zstd layer of an image in a
registry, the index of :mod:`unionfs.image.seekable` (checkpoints, per-span sha256, the file
table) and with ``--push`` puts it beside the image as an artifact referring to the image
manifest (:mod:`.referrers`).  ``pull --lazy`` looks for it (referrers API, then the fallback
tag), checks it belongs to this image (subject, layer digests, sizes and diff_ids), and records
each indexed layer as a tree of holes from the file table, as eStargz layers are.

:class:`IndexedFill` is the daemon's fill hook for such layers: a read of a placeholder
decompresses the chunks (1 MiB of the file) it covers from the nearest checkpoint; the decoder
asks for compressed bytes, which come from ``lazy-blob`` when present, else by range requests
(the spans a chunk will take, estimated from the checkpoints, one request per run of missing
spans), each span checked against its sha256 before use (``lazy-spans`` records them, shared by
every mount).  A span that cannot be had fails that read alone with EIO, logged once.  As for
eStargz (:class:`.lazy_blob.FillState`), the hook runs on the adapter's threads: a span in flight
is fetched once, a piece decoded once (one decode at a time per layer: the decoder is not
thread-safe), no lock is held over a download.
The background fill takes the prefetch files first (the image's recorded list, or those before a
``.prefetch.landmark`` in the file table), then the files earlier reads fetched and the remaining
spans between reads, checks the whole blob against its digest and diff_id, writes what is still a
hole from it, and makes the layer an ordinary one; ``complete`` does it at once for push and save.
"""
from __future__ import annotations

import bisect
import errno
import gzip
import hashlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field

import zstandard

from ..fs import sys as ovl
from ..image import estargz, seekable
from ..image.compression import check_blob
from ..image.extract import _ns, open_stream
from ..image.lazy_layer import materialize_members
from ..image.model import MEDIA_OCI_MANIFEST, ImageError, Layer, Reference
from ..image.store import Store, now_iso
from .client import Client, RegistryError
from .lazy_blob import (BLOB_FILE, DONE_FILE, IDLE, LAZY_FILE, FillState, Marks, client_for, get_range,
                        pwrite_all, pwrite_file, read_access)
from .pull import RemoteImage, download_path, fetch_image, fetch_to_downloads
from .referrers import Blob, find_artifact, push_artifact

log = logging.getLogger("unionfs.registry.indexed")

INDEX_FILE = "lazy.index"     # the layer's index blob, as fetched
SPANS_FILE = "lazy-spans"     # offsets of the blob's spans in lazy-blob, each checked
FILLED_FILE = "lazy-filled"   # stream offsets of the file chunks written into their placeholders
CHUNK = 1 << 20               # a read fills the placeholder by pieces of this many bytes of the file


def is_indexed(layer_dir: str) -> bool:
    """A lazy layer served through an index (not eStargz's TOC); also once it became whole."""
    for name in (LAZY_FILE, DONE_FILE):   # the background fill may rename it meanwhile
        try:
            with open(os.path.join(layer_dir, name)) as f:
                return json.load(f).get("format") == "index"
        except FileNotFoundError:
            continue
    return False


# --- making and finding the index -----------------------------------------------------------

@dataclass(frozen=True)
class Indexed:
    layer: Layer
    index: seekable.LayerIndex | None
    why_not: str = ""             # when the layer cannot be indexed (one zstd frame, ...)


@dataclass(frozen=True)
class Subject:
    """The image manifest an index refers to."""
    media: str
    digest: str
    size: int

    def descriptor(self) -> dict:
        return {"mediaType": self.media, "digest": self.digest, "size": self.size}


def index_image(store: Store, ref: Reference, client: Client, platform: str | None = None,
                spacing: int = seekable.SPACING, span: int = seekable.SPAN, log=None) -> tuple[Subject, list[Indexed]]:
    """The index of every layer of ``ref`` in its registry: blobs the store keeps are read there,
    others downloaded (into the store's downloads, verified, as by ``pull``)."""
    r = fetch_image(client, ref, platform)
    store.ensure()
    return Subject(r.media, r.manifest_digest, len(r.manifest)), \
        index_layers(store, r.layers, str(ref), spacing, span, log, client)


def index_stored(store: Store, name: str, spacing: int = seekable.SPACING, span: int = seekable.SPAN,
                 log=None) -> tuple[Subject, list[Indexed]]:
    """The index of every layer of an image in the store, from the blobs it keeps."""
    image = store.image(store.resolve(name))
    manifest = store.blob(image.manifest_digest)
    try:
        media = json.loads(manifest).get("mediaType") or MEDIA_OCI_MANIFEST
    except (ValueError, AttributeError):
        media = MEDIA_OCI_MANIFEST
    return Subject(media, image.manifest_digest, len(manifest)), \
        index_layers(store, list(image.layers), name, spacing, span, log, None)


def index_layers(store: Store, layers: list[Layer], where: str, spacing: int, span: int, log,
                 client: Client | None) -> list[Indexed]:
    out = []
    for ly in dict.fromkeys(layers):
        what = f"{where}: layer {ly.digest}"
        path = store.blob_path(ly.digest)
        if not os.path.exists(path):
            if client is None:
                raise ImageError(f"{what}: the store keeps no blob of it (a lazy or an old layer): "
                                 "index the image in its registry")
            fetch_to_downloads(store, client, ly.digest, ly.size)
            path = download_path(store, ly.digest)
        try:
            out.append(Indexed(ly, seekable.build(path, ly.digest, ly.diff_id, what, spacing, span)))
        except seekable.NotIndexable as e:
            out.append(Indexed(ly, None, str(e)))
        if log:
            x = out[-1]
            log(f"{ly.digest[7:19]}: " + (x.why_not.rpartition(": ")[2] if x.index is None else
                f"{x.index.compression}, {len(x.index.members)} entries, "
                f"{len(x.index.gzip_index) if x.index.compression == 'gzip' else len(x.index.frames)} "
                f"{'bytes of checkpoints' if x.index.compression == 'gzip' else 'checkpoint frames'}, "
                f"{len(x.index.spans)} spans"))
    return out


def push_index(client: Client, subject: Subject, indexed: list[Indexed]) -> tuple[str, bool]:
    """The indexes as one artifact referring to the image manifest; (its digest, referrers API used)."""
    blobs = [Blob(seekable.LAYER_MEDIA_TYPE, seekable.encode(x.index), {seekable.LAYER_ANNOTATION: x.layer.digest})
             for x in indexed if x.index is not None]
    if not blobs:
        raise ImageError(f"{client.where}: no layer can be indexed (gzip, or zstd in several frames)")
    try:
        client.get_manifest(subject.digest)
    except RegistryError as e:
        raise RegistryError(f"{client.where}: the image manifest {subject.digest} is not there (push the image "
                            f"first): {e}") from None
    return push_artifact(client, subject.descriptor(), seekable.ARTIFACT_TYPE, blobs)


def find_indexes(client: Client, r: RemoteImage, where: str) -> dict[str, tuple[seekable.LayerIndex, bytes]]:
    """The pushed index of each layer of ``r`` that has one: {layer digest: (index, its blob)}.
    An index that is not this image's (another subject, layers, sizes or diff_ids) is refused."""
    found = find_artifact(client, r.manifest_digest, seekable.ARTIFACT_TYPE)
    if found is None:
        return {}
    digest, manifest = found
    layers = {ly.digest: ly for ly in r.layers}
    out = {}
    for desc in manifest["layers"]:
        if not isinstance(desc, dict) or desc.get("mediaType") != seekable.LAYER_MEDIA_TYPE:
            continue
        layer = (desc.get("annotations") or {}).get(seekable.LAYER_ANNOTATION)
        what = f"{where}: lazy index {digest}"
        if layer not in layers:
            raise RegistryError(f"{what} indexes layer {layer}, which is not one of this image's")
        data = client.get_small_blob(desc.get("digest") or "", seekable.MAX_INDEX)
        ix = seekable.decode(data, what)
        ly = layers[layer]
        if (ix.layer, ix.diff_id, ix.blob_size) != (ly.digest, ly.diff_id, ly.size):
            raise RegistryError(f"{what}: its index of layer {ly.digest} describes another blob "
                                f"({ix.layer}, {ix.blob_size} bytes)")
        out[layer] = (ix, data)
    return out


def add_layer(store: Store, client: Client, ly: Layer, ix: seekable.LayerIndex, data: bytes, what: str) -> None:
    """Record an indexed layer in the store: its tree of holes, its index, an empty blob file."""
    tmp = store.new_tmp_dir("lazy")
    root = os.path.join(tmp, "root")
    os.mkdir(root, 0o755)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        n = materialize_members((m.info for m in ix.members), fd, what)
    finally:
        os.close(fd)
    with open(os.path.join(tmp, INDEX_FILE), "wb") as f:
        f.write(data)
    with open(os.path.join(tmp, LAZY_FILE), "w") as f:
        json.dump({"format": "index", "registry": client.registry, "repository": client.repository,
                   "digest": ly.digest, "size": ly.size, "insecure": client.insecure, "ca_file": client.ca_file}, f)
    for name in (SPANS_FILE, FILLED_FILE):
        open(os.path.join(tmp, name), "w").close()
    with open(os.path.join(tmp, BLOB_FILE), "wb") as f:
        f.truncate(ly.size)
    store.commit_layer(tmp, ly.diff_id, {
        "diff_id": ly.diff_id, "digest": ly.digest, "size": ix.size, "blob_size": ly.size,
        "compression": ix.compression, "entries": n, "whiteout_style": "overlay", "extracted": now_iso(),
        "lazy": True})


def _load(layer_dir: str) -> tuple[dict, seekable.LayerIndex]:
    with open(os.path.join(layer_dir, LAZY_FILE)) as f:
        source = json.load(f)
    with open(os.path.join(layer_dir, INDEX_FILE), "rb") as f:
        return source, seekable.decode(f.read(), layer_dir)


def local_bytes(layer_dir: str) -> tuple[int, int]:
    """(bytes of the layer's blob that are local, the blob's size), from ``lazy-spans``."""
    _, ix = _load(layer_dir)
    starts = [o for o, _ in ix.spans]
    have = Marks(os.path.join(layer_dir, SPANS_FILE))
    have.reload()
    return sum(ix.span_end(i) - o for i, o in enumerate(starts) if o in have), ix.blob_size


# --- filling on read (runs in the mount daemon) ---------------------------------------------

@dataclass
class _Layer:
    dir: str
    source: dict
    ix: seekable.LayerIndex
    spans: Marks
    filled: Marks
    starts: list[int]
    fill: "IndexedFill"
    client: Client | None = None
    failed: set[tuple[int, int]] = field(default_factory=set)
    reader: seekable.Reader | None = None
    points: list[tuple[int, int]] | None = None   # (uncompressed, compressed) offsets of the checkpoints
    decode: threading.Lock = field(default_factory=threading.Lock)   # the Reader is not thread-safe
    demand: bool = True                           # whether the decode under way is a read's (for blob_bytes)
    accessed: dict[str, None] = field(default_factory=dict)   # ordered: ACCESS_FILE as read and appended
    prefetch: list[str] = field(default_factory=list)         # the image's prefetch files

    @property
    def digest(self) -> str:
        return self.source["digest"]

    def get_spans(self, i: int, j: int) -> None:
        """Spans ``i..j-1`` into lazy-blob, fetched by one range request, each checked against its
        sha256 before any is kept; EIO if they cannot be (logged once per range).  The caller
        has claimed them (:meth:`IndexedFill._get_spans`): no lock is held meanwhile."""
        start, end = self.starts[i], self.ix.span_end(j - 1)
        try:
            with self.fill._connecting:
                if self.client is None:
                    self.client = client_for(self.source)
                client = self.client
            data = get_range(client, self.digest, start, end)
            with self.fill._lock:
                self.fill.fetched += len(data)
            for k in range(i, j):
                piece = data[self.starts[k] - start:self.ix.span_end(k) - start]
                if hashlib.sha256(piece).hexdigest() != self.ix.spans[k][1]:
                    raise ImageError(f"bytes {self.starts[k]}-{self.ix.span_end(k) - 1} do not match the "
                                     "index's sha256 of the span")
            pwrite_file(os.path.join(self.dir, BLOB_FILE), data, start)
        except (ImageError, OSError) as e:
            with self.fill._lock:
                first = (start, end) not in self.failed
                self.failed.add((start, end))
            if first:
                log.error("lazy layer %s: bytes %d-%d: %s", self.digest, start, end - 1, e)
            raise OSError(errno.EIO, "lazy fetch failed") from None
        for k in range(i, j):
            self.spans.add(self.starts[k])

    def estimate(self, start: int, end: int) -> tuple[int, int]:
        """The spans (``lo..hi-1``) decoding bytes ``start..end-1`` of the uncompressed stream will
        take, as the checkpoints around them estimate it (fetched first, in runs, rather than one
        per span as the decoder asks; it asks for any the estimate missed)."""
        pts = self.points or []
        if not pts:
            return 0, 0
        us = [u for u, _ in pts]
        first = pts[max(0, bisect.bisect_right(us, start) - 1)][1]
        j = max(0, bisect.bisect_right(us, end) - 1)
        (bu, bc), (nu, nc) = pts[j], pts[j + 1] if j + 1 < len(pts) else (self.ix.size, self.ix.blob_size)
        last = min(self.ix.blob_size, bc + (end - bu) * (nc - bc) // max(1, nu - bu) + 1)
        lo = bisect.bisect_right(self.starts, max(0, first - 1)) - 1
        hi = bisect.bisect_right(self.starts, max(first, last) - 1)
        return max(lo, 0), hi

    def blob_bytes(self, start: int, end: int) -> bytes:
        """Compressed bytes for the decoder (under ``decode``): the spans they lie in, fetched if not yet local."""
        i = max(0, bisect.bisect_right(self.starts, start) - 1)
        k = i
        while k < len(self.starts) and self.starts[k] < end:
            k += 1
        self.fill._get_spans(self, i, k, self.demand)
        if any(self.starts[x] not in self.spans for x in range(i, k)):   # another's fetch failed
            raise OSError(errno.EIO, "lazy fetch failed")
        with open(os.path.join(self.dir, BLOB_FILE), "rb") as f:
            return os.pread(f.fileno(), end - start, start)

    def read(self, offset: int, size: int, demand: bool) -> bytes:
        """Bytes of the uncompressed stream, decoded from the nearest checkpoint (one decode at a time)."""
        with self.decode:
            self.demand = demand
            return self.reader.read(offset, size)


@dataclass
class _File:
    layer: _Layer
    member: seekable.Member
    path: bytes
    wfd: int = -1
    checked: bool = False        # its header read from the blob matched the index

    @property
    def name(self) -> str:
        return os.fsdecode(self.path)

    def pieces(self) -> int:
        return (self.member.info.size + CHUNK - 1) // CHUNK


def _landmark_names(ix: seekable.LayerIndex) -> list[str]:
    """The regular files before a ``.prefetch.landmark`` in the file table (none without one), as
    eStargz's landmark says for a TOC (an eStargz layer is gzip, and so can be indexed too)."""
    names = [os.fsdecode(_clean(m.info.name)) for m in ix.members]
    if estargz.PREFETCH_LANDMARK not in names:
        return []
    at = names.index(estargz.PREFETCH_LANDMARK)
    return [n for n, m in zip(names[:at], ix.members) if m.info.isreg() and m.info.size]


class IndexedFill(FillState):
    """The daemon's ``fill(fd, offset, size)`` hook for the indexed layers of one mount.

    As :class:`.lazy.LazyFill`: called on the adapter's threads, one fetch per span (a read wanting
    spans another fetch has in flight waits for it), one decode of a piece at a time per layer, the
    background fill standing aside while any read is fetching; the prefetch files first."""

    def __init__(self, store: Store, layer_dirs: list[str], recorded: dict[str, list[str]] | None = None) -> None:
        super().__init__(store, layer_dirs, recorded)
        self._files: dict[tuple[int, int], _File] | None = None
        self._by_name: dict[tuple[str, str], _File] = {}
        self._layers: list[_Layer] = []

    def _index(self) -> dict[tuple[int, int], _File]:
        files: dict[tuple[int, int], _File] = {}
        for d in self.layer_dirs:
            source, ix = _load(d)
            layer = _Layer(d, source, ix, Marks(os.path.join(d, SPANS_FILE)), Marks(os.path.join(d, FILLED_FILE)),
                           [o for o, _ in ix.spans], self, prefetch=self.recorded.get(d) or _landmark_names(ix))
            layer.reader = seekable.Reader(ix, layer.blob_bytes)
            layer.points = layer.reader.points()
            layer.spans.reload()
            layer.filled.reload()
            layer.accessed.update(read_access(d))
            self._layers.append(layer)
            last = {}
            for m in ix.members:   # a name given twice in the layer: the last one is the file
                last[_clean(m.info.name)] = m
            root = os.open(os.path.join(d, "root"), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                for name, m in last.items():
                    if not m.info.isreg() or not m.info.size:
                        continue
                    try:
                        st = ovl.fstat(fd := ovl.open_beneath(root, name, os.O_RDONLY))
                        os.close(fd)
                    except OSError:
                        continue   # whited out within the layer
                    if st.st_size == m.info.size:
                        files[(st.st_dev, st.st_ino)] = f = _File(layer, m, name)
                        self._by_name[(d, f.name)] = f
            finally:
                os.close(root)
        return files

    def _missing(self, fd: int, offset: int, size: int) -> tuple[_File | None, list[int]]:
        """(the placeholder open as ``fd``, its pieces the range covers that are not filled), under the lock."""
        if self._files is None:
            self._files = self._index()
        st = os.fstat(fd)
        f = self._files.get((st.st_dev, st.st_ino))
        if f is None:
            return None, []
        base, end = f.member.data_offset, min(offset + size, f.member.info.size)
        todo = [k for k in range(offset // CHUNK, (end + CHUNK - 1) // CHUNK) if base + k * CHUNK not in f.layer.filled]
        if todo:
            f.layer.filled.reload()
            todo = [k for k in todo if base + k * CHUNK not in f.layer.filled]
        return f, todo

    def _fetch(self, f: _File, k: int) -> None:
        self._piece(f, k, demand=True)

    def _piece(self, f: _File, k: int, demand: bool) -> None:
        """Make piece ``k`` of the file local: decode it, or wait for the decode of it going on."""
        at = f.member.data_offset + k * CHUNK
        key = (f.layer.dir, -1 - at)   # beside the spans' keys (their offsets are >= 0)

        def have() -> bool:
            if at not in f.layer.filled:
                f.layer.filled.reload()
            return at in f.layer.filled
        ev = self._claim(key, have, demand)
        if ev is None:
            return
        try:
            self._fill_piece(f, k, demand)
        finally:
            self._release(key, ev)

    def _get_spans(self, layer: _Layer, lo: int, hi: int, demand: bool) -> None:
        """Spans ``lo..hi-1`` local: those missing fetched in one request per run of them no other
        fetch has in flight; for the others, that fetch waited for (a read whose span it failed to
        get tries itself, for its own EIO; the background leaves it to the next read)."""
        while True:
            mine: list[int] = []
            theirs: list[threading.Event] = []
            with self._lock:
                layer.spans.reload()
                for k in range(lo, hi):
                    key = (layer.dir, layer.starts[k])
                    if layer.starts[k] in layer.spans:
                        continue
                    if demand:
                        self.last_read = time.monotonic()
                    if key in self._inflight:
                        theirs.append(self._inflight[key])
                    else:
                        self._inflight[key] = threading.Event()
                        mine.append(k)
            try:
                for i, j in _runs(mine):
                    layer.get_spans(i, j)
            finally:
                for k in mine:
                    key = (layer.dir, layer.starts[k])
                    self._release(key, self._inflight[key])
            if not theirs:
                return
            for ev in theirs:
                ev.wait()
            if not demand:
                return
            layer.spans.reload()
            if all(layer.starts[k] in layer.spans for k in range(lo, hi)):
                return

    def _fill_piece(self, f: _File, k: int, demand: bool) -> None:
        layer, m = f.layer, f.member
        at = m.data_offset + k * CHUNK
        n = min(CHUNK, m.info.size - k * CHUNK)
        try:
            if f.checked is False:   # the file's own header in the blob first: the index's word is checked
                self._get_spans(layer, *layer.estimate(m.header_offset, at + n if k == 0 else m.data_offset), demand)
                head = layer.read(m.header_offset, m.data_offset - m.header_offset, demand)
                if not seekable.header_matches(head, m):
                    raise ImageError("the index does not describe the blob's header of this file")
                f.checked = True
            self._get_spans(layer, *layer.estimate(at, at + n), demand)
            data = layer.read(at, n, demand)
        except OSError as e:
            if e.errno == errno.EIO:
                raise
            raise self._broken(layer, f, e) from None
        except Exception as e:   # the decoder: data that passed the span digests yet does not decode
            raise self._broken(layer, f, e) from None
        self._write(f, data, k * CHUNK)
        layer.filled.add(at)

    def _broken(self, layer: _Layer, f: _File, e: Exception) -> OSError:
        log.error("lazy layer %s: %s: %s: %s", layer.digest, f.member.info.name, e.__class__.__name__, e)
        return OSError(errno.EIO, "lazy decode failed")

    def _write(self, f: _File, data: bytes, pos: int) -> None:
        try:
            with self._lock:
                if f.wfd < 0:
                    root = os.open(os.path.join(f.layer.dir, "root"), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                    try:
                        f.wfd = ovl.open_beneath(root, f.path, os.O_WRONLY)
                    finally:
                        os.close(root)
            pwrite_all(f.wfd, data, pos)
            ns = _ns(f.member.info)
            os.utime(f.wfd, ns=(ns, ns))   # writing content is no change: the times stay the layer's
            os.fdatasync(f.wfd)
        except OSError as e:
            log.error("lazy layer %s: cannot write %s: %s", f.layer.digest, f.member.info.name, e)
            raise OSError(errno.EIO, "lazy fill failed") from None

    # --- the background fill -------------------------------------------------------------

    # the background fill and complete() (FillState's): the layers, each's prefetch files and the rest
    def _lazy_layers(self) -> list[_Layer]:
        with self._lock:
            if self._files is None:
                self._files = self._index()
        return self._layers

    def _prefetch_layer(self, layer: _Layer) -> None:
        self._files_first(layer, layer.prefetch, 0)

    def _fill_whole(self, layer: _Layer) -> None:
        """Between reads, the files earlier reads fetched (``lazy-access``) and every missing span in
        blob order; the whole blob checked against its digest and diff_id, what is still a hole
        written from it; then the layer is an ordinary stored layer."""
        self._fill_layer(layer)

    def _local_bytes(self, layer_dir: str) -> tuple[int, int]:
        return local_bytes(layer_dir)

    def _files_first(self, layer: _Layer, names, idle: float) -> None:
        for name in names:
            f = self._by_name.get((layer.dir, name))
            for k in range(f.pieces() if f is not None else 0):
                self._wait_idle(idle)
                self._piece(f, k, demand=False)

    def _fill_layer(self, layer: _Layer) -> None:
        self._files_first(layer, list(layer.accessed), IDLE)
        for i in range(len(layer.starts)):
            self._wait_idle()
            self._get_spans(layer, i, i + 1, demand=False)
        layer.spans.reload()
        missing = sum(s not in layer.spans for s in layer.starts)
        if missing:   # a fetch a read was making failed: the next mount goes on
            raise OSError(errno.EIO, f"{missing} spans not fetched")
        blob = os.path.join(layer.dir, BLOB_FILE)
        diff_id = "sha256:" + os.path.basename(layer.dir)
        check_blob(blob, layer.digest, diff_id, f"lazy layer {layer.digest}")
        by_offset = {f.member.data_offset: f for f in (self._files or {}).values() if f.layer is layer}
        with open(blob, "rb") as raw:
            stream = gzip.GzipFile(fileobj=raw) if layer.ix.compression == "gzip" else \
                zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
            with open_stream(stream) as tar:
                n = -1
                for n, ti in enumerate(tar):   # the file table is the blob's, header by header
                    if n >= len(layer.ix.members) or not seekable.same_member(ti, layer.ix.members[n]):
                        raise ImageError(f"lazy layer {layer.digest}: the index does not describe the blob "
                                         f"(member {n}, {ti.name!r}): the layer stays lazy")
                    f = by_offset.get(ti.offset_data)
                    if f is None:
                        continue
                    src = tar.extractfile(ti)
                    for k in range((ti.size + CHUNK - 1) // CHUNK):
                        data = src.read(CHUNK)
                        layer.filled.reload()
                        if ti.offset_data + k * CHUNK not in layer.filled:   # a read may write it too: the same bytes
                            self._write(f, data, k * CHUNK)
                            layer.filled.add(ti.offset_data + k * CHUNK)
        if n + 1 != len(layer.ix.members):
            raise ImageError(f"lazy layer {layer.digest}: the index lists {len(layer.ix.members)} members, "
                             f"the blob {n + 1}: the layer stays lazy")
        with self.store.locked():
            if not os.path.exists(os.path.join(layer.dir, LAZY_FILE)):
                return   # another mount's fill (or a push) completed it meanwhile
            os.link(blob, blob + ".keep")
            self.store.put_blob_file(layer.digest, blob + ".keep")
            os.rename(os.path.join(layer.dir, LAZY_FILE), os.path.join(layer.dir, DONE_FILE))
        log.info("lazy layer %s: complete (%d bytes fetched by this mount)", layer.digest, self.fetched)


def _runs(ks: list[int]) -> list[tuple[int, int]]:
    """Sorted indices as ``(first, last + 1)`` runs of consecutive ones."""
    out: list[tuple[int, int]] = []
    for k in ks:
        if out and out[-1][1] == k:
            out[-1] = (out[-1][0], k + 1)
        else:
            out.append((k, k + 1))
    return out


def _clean(name: str) -> bytes:
    while name.startswith("./"):
        name = name[2:]
    return os.fsencode(name.strip("/"))
