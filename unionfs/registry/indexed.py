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
every mount).  A span that cannot be had fails that read alone with EIO, logged once.
The background fill fetches the remaining spans between reads, checks the whole blob against its
digest and diff_id, writes what is still a hole from it, and makes the layer an ordinary one.
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
from ..image import seekable
from ..image.compression import check_blob
from ..image.extract import _ns, open_stream
from ..image.lazy_layer import materialize_members
from ..image.model import MEDIA_OCI_MANIFEST, ImageError, Layer, Reference
from ..image.store import Store, now_iso
from .client import Client, RegistryError
from .lazy_blob import BLOB_FILE, DONE_FILE, IDLE, LAZY_FILE, client_for, get_range, pwrite_all, pwrite_file
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
    have = _Marks(os.path.join(layer_dir, SPANS_FILE))
    have.reload()
    return sum(ix.span_end(i) - o for i, o in enumerate(starts) if o in have), ix.blob_size


# --- filling on read (runs in the mount daemon) ---------------------------------------------

class _Marks:
    """A set of offsets kept in a file that only grows, shared by every mount of the layer."""

    def __init__(self, path: str) -> None:
        self.path, self.seen, self.size = path, set(), 0

    def reload(self) -> None:
        if os.path.getsize(self.path) != self.size:
            with open(self.path, "rb") as f:
                f.seek(self.size)
                tail = f.read()
            cut = tail.rfind(b"\n") + 1
            self.seen.update(int(x) for x in tail[:cut].split())
            self.size += cut

    def add(self, offset: int) -> None:
        with open(self.path, "a") as f:
            f.write(f"{offset}\n")
        self.seen.add(offset)

    def __contains__(self, offset: int) -> bool:
        return offset in self.seen


@dataclass
class _Layer:
    dir: str
    source: dict
    ix: seekable.LayerIndex
    spans: _Marks
    filled: _Marks
    starts: list[int]
    fill: "IndexedFill"
    client: Client | None = None
    failed: set[tuple[int, int]] = field(default_factory=set)
    reader: seekable.Reader | None = None
    points: list[tuple[int, int]] | None = None   # (uncompressed, compressed) offsets of the checkpoints

    @property
    def digest(self) -> str:
        return self.source["digest"]

    def connect(self) -> Client:
        if self.client is None:
            self.client = client_for(self.source)
        return self.client

    def get_spans(self, i: int, j: int) -> None:
        """Spans ``i..j-1`` into lazy-blob, fetched by one range request, each checked against its
        sha256 before any is kept; EIO if they cannot be (logged once per range)."""
        start, end = self.starts[i], self.ix.span_end(j - 1)
        try:
            data = get_range(self.connect(), self.digest, start, end)
            self.fill.fetched += len(data)
            for k in range(i, j):
                piece = data[self.starts[k] - start:self.ix.span_end(k) - start]
                if hashlib.sha256(piece).hexdigest() != self.ix.spans[k][1]:
                    raise ImageError(f"bytes {self.starts[k]}-{self.ix.span_end(k) - 1} do not match the "
                                     "index's sha256 of the span")
            pwrite_file(os.path.join(self.dir, BLOB_FILE), data, start)
        except (ImageError, OSError) as e:
            if (start, end) not in self.failed:
                self.failed.add((start, end))
                log.error("lazy layer %s: bytes %d-%d: %s", self.digest, start, end - 1, e)
            raise OSError(errno.EIO, "lazy fetch failed") from None
        for k in range(i, j):
            self.spans.add(self.starts[k])

    def prefetch(self, start: int, end: int) -> None:
        """Before decoding bytes ``start..end-1`` of the uncompressed stream, the spans that will take,
        as the checkpoints around them estimate it, in one range request per run of missing spans
        (rather than one per span as the decoder asks; it asks for any the estimate missed)."""
        if self.points is None:
            self.points = self.reader.points() if self.reader else []
        pts = self.points
        if not pts:
            return
        us = [u for u, _ in pts]
        first = pts[max(0, bisect.bisect_right(us, start) - 1)][1]
        j = max(0, bisect.bisect_right(us, end) - 1)
        (bu, bc), (nu, nc) = pts[j], pts[j + 1] if j + 1 < len(pts) else (self.ix.size, self.ix.blob_size)
        last = min(self.ix.blob_size, bc + (end - bu) * (nc - bc) // max(1, nu - bu) + 1)
        lo = bisect.bisect_right(self.starts, max(0, first - 1)) - 1
        hi = bisect.bisect_right(self.starts, max(first, last) - 1)
        self.spans.reload()
        k = lo
        while k < hi:
            if self.starts[k] in self.spans:
                k += 1
                continue
            run_end = k
            while run_end < hi and self.starts[run_end] not in self.spans:
                run_end += 1
            self.get_spans(k, run_end)
            k = run_end

    def blob_bytes(self, start: int, end: int) -> bytes:
        """Compressed bytes for the decoder: the spans they lie in, fetched if not yet local."""
        i = bisect.bisect_right(self.starts, start) - 1
        while i < len(self.starts) and self.starts[i] < end:
            if self.starts[i] not in self.spans:
                self.spans.reload()
                if self.starts[i] not in self.spans:
                    self.get_spans(i, i + 1)
            i += 1
        with open(os.path.join(self.dir, BLOB_FILE), "rb") as f:
            return os.pread(f.fileno(), end - start, start)


@dataclass
class _File:
    layer: _Layer
    member: seekable.Member
    path: bytes
    wfd: int = -1
    checked: bool = False        # its header read from the blob matched the index


class IndexedFill:
    """The daemon's ``fill(fd, offset, size)`` hook for the indexed layers of one mount."""

    def __init__(self, store: Store, layer_dirs: list[str]) -> None:
        self.store = store
        self.layer_dirs = layer_dirs
        self._files: dict[tuple[int, int], _File] | None = None
        self._layers: list[_Layer] = []
        self._lock = threading.Lock()
        self.last_read = time.monotonic()
        self.fetched = 0

    def _index(self) -> dict[tuple[int, int], _File]:
        files: dict[tuple[int, int], _File] = {}
        for d in self.layer_dirs:
            source, ix = _load(d)
            layer = _Layer(d, source, ix, _Marks(os.path.join(d, SPANS_FILE)), _Marks(os.path.join(d, FILLED_FILE)),
                           [o for o, _ in ix.spans], self)
            layer.spans.reload()
            layer.filled.reload()
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
                        files[(st.st_dev, st.st_ino)] = _File(layer, m, name)
            finally:
                os.close(root)
        return files

    def __call__(self, fd: int, offset: int, size: int) -> None:
        with self._lock:
            if self._files is None:
                self._files = self._index()
            st = os.fstat(fd)
            f = self._files.get((st.st_dev, st.st_ino))
            if f is None:
                return
            base, total = f.member.data_offset, f.member.info.size
            end = min(offset + size, total)
            for k in range(offset // CHUNK, (end + CHUNK - 1) // CHUNK):
                if base + k * CHUNK not in f.layer.filled:
                    f.layer.filled.reload()
                    if base + k * CHUNK not in f.layer.filled:
                        self.last_read = time.monotonic()
                        self._fill_chunk(f, k)

    def _fill_chunk(self, f: _File, k: int) -> None:
        layer, m = f.layer, f.member
        at = m.data_offset + k * CHUNK
        n = min(CHUNK, m.info.size - k * CHUNK)
        if layer.reader is None:
            layer.reader = seekable.Reader(layer.ix, layer.blob_bytes)
        try:
            if f.checked is False:   # the file's own header in the blob first: the index's word is checked
                layer.prefetch(m.header_offset, at + n if k == 0 else m.data_offset)
                head = layer.reader.read(m.header_offset, m.data_offset - m.header_offset)
                if not seekable.header_matches(head, m):
                    raise ImageError("the index does not describe the blob's header of this file")
                f.checked = True
            layer.prefetch(at, at + n)
            data = layer.reader.read(at, n)
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

    def background(self) -> None:
        """Fetch every span not yet local between reads, check the whole blob against its digest and
        diff_id, write what is still a hole from it; then the layer is an ordinary stored layer."""
        with self._lock:
            if self._files is None:
                self._files = self._index()
        for layer in self._layers:
            try:
                self._fill_layer(layer)
            except OSError:
                log.warning("lazy layer %s: background fill stopped; the next mount continues", layer.digest)
            except ImageError as e:
                log.error("%s", e)
            except Exception:
                log.exception("lazy layer %s: background fill failed", layer.digest)

    def _fill_layer(self, layer: _Layer) -> None:
        for i, start in enumerate(layer.starts):
            while (quiet := time.monotonic() - self.last_read) < IDLE:
                time.sleep(IDLE - quiet)
            with self._lock:
                layer.spans.reload()
                if start not in layer.spans:
                    layer.get_spans(i, i + 1)
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
                        with self._lock:
                            layer.filled.reload()
                            if ti.offset_data + k * CHUNK not in layer.filled:
                                self._write(f, data, k * CHUNK)
                                layer.filled.add(ti.offset_data + k * CHUNK)
        if n + 1 != len(layer.ix.members):
            raise ImageError(f"lazy layer {layer.digest}: the index lists {len(layer.ix.members)} members, "
                             f"the blob {n + 1}: the layer stays lazy")
        with self.store.locked():
            os.link(blob, blob + ".keep")
            self.store.put_blob_file(layer.digest, blob + ".keep")
            os.rename(os.path.join(layer.dir, LAZY_FILE), os.path.join(layer.dir, DONE_FILE))
        log.info("lazy layer %s: complete (%d bytes fetched by this mount)", layer.digest, self.fetched)


def _clean(name: str) -> bytes:
    while name.startswith("./"):
        name = name[2:]
    return os.fsencode(name.strip("/"))
