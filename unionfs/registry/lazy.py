"""Lazy images: ``pull --lazy`` records an image with its eStargz layers as trees of holes, and
the mount daemon fills file content on first read, chunk by chunk, by HTTP range requests.

``pull --lazy`` fetches the manifest and config; for each eStargz layer (the TOC digest
annotation) the 51-byte footer and the TOC (two range requests), checks the TOC against the
annotation's digest, and materializes the tree (:mod:`unionfs.image.lazy_layer`) as an
ordinary store layer plus ``lazy.json`` (where the blob is) and ``lazy.toc``.  Gzip and zstd
layers with a pushed index are recorded by :mod:`.indexed`; layers with neither, and layers
smaller than ``whole_below``, are pulled whole as by ``pull``.

:class:`LazyFill` is the hook the daemon calls before each read of a lower file
(``fs.union.Union.fill``): a read of a placeholder fetches the compressed extent of each chunk
it covers that is not yet local, checks it against the TOC's ``chunkDigest``, writes it into
the placeholder and records its offset in ``lazy-present`` (shared by every mount of the
layer, so nothing is fetched twice).  A chunk that cannot be fetched or does not verify fails
that read alone with ``EIO``, logged once per layer and range; the next read tries again.
:func:`fill_for` gives an image's hook: a :class:`LazyFill` for its eStargz layers, an
:class:`.indexed.IndexedFill` for its indexed ones, :class:`Fills` for both; how much of each is
local (:func:`local_shares`) and :func:`make_local` serve both kinds alike.
"""
from __future__ import annotations

import bisect
import errno
import hashlib
import json
import logging
import os
import sys
from dataclasses import dataclass, field

from ..fs import sys as ovl
from ..image import estargz, prefetch
from ..image.lazy_layer import materialize
from ..image.compression import check_blob
from ..image.load import add_layer_blob
from ..image.model import ImageError, Layer, Reference
from ..image.store import Store, now_iso
from .client import Client, RegistryError
from . import indexed
from .lazy_blob import BLOB_FILE, DONE_FILE, LAZY_FILE, FillState, Marks, get_range, read_access
from .lazy_blob import pwrite_all as _pwrite_all, pwrite_file as _pwrite_file
from .pull import download_path, fetch_image, fetch_to_downloads, record

log = logging.getLogger("unionfs.registry.lazy")

TOC_FILE = "lazy.toc"
PRESENT_FILE = "lazy-present"
HEAD_MARK = -1                # in lazy-present: the blob's bytes before the first chunk are here
WHOLE_BELOW = 2 << 20     # layers smaller than this are fetched whole at once


@dataclass(frozen=True)
class LazyPulled:
    image_id: str
    lazy_layers: int
    whole_layers: int
    reused_layers: int
    fetched_bytes: int


def fetch_toc(client: Client, desc: dict) -> tuple[bytes, int, bytes]:
    """(TOC, its offset, the blob's bytes from there to the end) of an eStargz layer by two range
    requests, the TOC checked against the descriptor's annotation."""
    digest, size = desc["digest"], int(desc["size"])
    what = f"{client.where}: layer {digest}"
    if size < estargz.FOOTER_SIZE:
        raise RegistryError(f"{what}: too small for an eStargz blob")
    foot = get_range(client, digest, size - estargz.FOOTER_SIZE, size)
    toc_at = estargz.parse_footer(foot)
    if not 0 <= toc_at < size - estargz.FOOTER_SIZE:
        raise RegistryError(f"{what}: the footer's TOC offset {toc_at} is outside the blob")
    if size - estargz.FOOTER_SIZE - toc_at > estargz.MAX_TOC + (1 << 20):
        raise RegistryError(f"{what}: the TOC would be {size - estargz.FOOTER_SIZE - toc_at} bytes, "
                            f"more than {estargz.MAX_TOC}")
    member = get_range(client, digest, toc_at, size - estargz.FOOTER_SIZE)
    toc = estargz.read_toc_member(member, what)
    want = desc["annotations"][estargz.TOC_DIGEST_ANNOTATION]
    if "sha256:" + hashlib.sha256(toc).hexdigest() != want:
        raise RegistryError(f"{what}: the TOC does not match the manifest's TOC digest {want}")
    return toc, toc_at, member + foot


def _is_estargz(desc: dict) -> bool:
    ann = desc.get("annotations")
    return isinstance(ann, dict) and isinstance(ann.get(estargz.TOC_DIGEST_ANNOTATION), str) \
        and "gzip" in (desc.get("mediaType") or "")


def pull_lazy(store: Store, ref: Reference, client: Client, platform: str | None = None,
              whole_below: int = WHOLE_BELOW, log=None) -> LazyPulled:
    say = log or (lambda msg: print(msg, file=sys.stderr))
    where = str(ref)
    r = fetch_image(client, ref, platform)
    image_id, descs, layers = r.image_id, r.descs, r.layers
    store.ensure()
    lazy = whole = reused = fetched = 0
    wanted = [ly for d, ly in zip(descs, layers)
              if not _is_estargz(d) and ly.size >= whole_below and not store.has_layer(ly.diff_id)]
    indexes = indexed.find_indexes(client, r, where) if wanted else {}   # gzip/zstd layers by their index
    with store.locked():
        try:
            for d, ly in zip(descs, layers):
                if store.has_layer(ly.diff_id):
                    reused += 1
                    continue
                if _is_estargz(d) and ly.size >= whole_below:
                    toc, toc_at, tail = fetch_toc(client, d)
                    fetched += len(tail)
                    _add_lazy_layer(store, client, d, ly, toc, toc_at, tail, f"{where}: layer {ly.digest}")
                    say(f"{ly.digest[7:19]}: TOC fetched ({len(toc)} bytes), content on demand")
                    lazy += 1
                    continue
                if ly.digest in indexes and ly.size >= whole_below:
                    ix, data = indexes[ly.digest]
                    indexed.add_layer(store, client, ly, ix, data, f"{where}: layer {ly.digest}")
                    say(f"{ly.digest[7:19]}: index found ({len(ix.members)} entries), content on demand")
                    lazy += 1
                    continue
                fetched += fetch_to_downloads(store, client, ly.digest, ly.size) or 0
                path = download_path(store, ly.digest)
                try:
                    add_layer_blob(store, path, ly.digest, ly.diff_id, f"{where}: layer {ly.digest}")
                except ImageError:
                    os.unlink(path)
                    raise
                store.put_blob_file(ly.digest, path)
                say(f"{ly.digest[7:19]}: Pull complete")
                whole += 1
            record(store, ref, r, layers)
        except BaseException:
            store.cleanup()
            raise
    return LazyPulled(image_id, lazy, whole, reused, fetched)


def _add_lazy_layer(store: Store, client: Client, desc: dict, ly: Layer, toc: bytes, toc_at: int,
                    tail: bytes, what: str) -> None:
    entries = estargz.parse_toc(toc, what)
    tmp = store.new_tmp_dir("lazy")
    root = os.path.join(tmp, "root")
    os.mkdir(root, 0o755)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        n = materialize(entries, toc, fd, what)
    finally:
        os.close(fd)
    with open(os.path.join(tmp, TOC_FILE), "wb") as f:
        f.write(toc)
    with open(os.path.join(tmp, LAZY_FILE), "w") as f:
        json.dump({"registry": client.registry, "repository": client.repository, "digest": ly.digest,
                   "size": ly.size, "toc_offset": toc_at, "insecure": client.insecure, "ca_file": client.ca_file}, f)
    open(os.path.join(tmp, PRESENT_FILE), "w").close()
    with open(os.path.join(tmp, BLOB_FILE), "wb") as f:   # the blob as it arrives, holes where it has not
        f.truncate(ly.size)
        f.seek(toc_at)
        f.write(tail)
    size = int((desc.get("annotations") or {}).get(estargz.UNCOMPRESSED_SIZE_ANNOTATION) or 0)
    store.commit_layer(tmp, ly.diff_id, {
        "diff_id": ly.diff_id, "digest": ly.digest, "size": size, "blob_size": ly.size, "compression": "gzip",
        "entries": n, "whiteout_style": "overlay", "extracted": now_iso(), "lazy": True})


def is_lazy(store: Store, diff_id: str) -> bool:
    return os.path.exists(os.path.join(store.layer_dir(diff_id), LAZY_FILE))


# --- filling on read (runs in the mount daemon) -----------------------------------------

@dataclass
class _File:
    layer: "_LazyLayer"
    entry: estargz.Entry
    path: bytes              # below the layer root
    wfd: int = -1

    @property
    def name(self) -> str:
        return self.entry.name


@dataclass
class _LazyLayer:
    dir: str
    source: dict
    ends: list[int]                      # sorted member offsets, then the TOC offset: a chunk's extent ends at the next
    entries: list[estargz.Entry] = field(default_factory=list)
    present: Marks = field(init=False)   # chunk offsets (and HEAD_MARK) local: lazy-present
    client: Client | None = None
    failed: set[tuple[int, int]] = field(default_factory=set)
    accessed: dict[str, None] = field(default_factory=dict)   # ordered: ACCESS_FILE as read and appended
    prefetch: list[str] = field(default_factory=list)         # the image's prefetch files (its landmark)

    def fill_order(self) -> list[estargz.Entry]:
        """The entries in the order reads first wanted them (this and earlier mounts), then TOC order."""
        rank = {name: i for i, name in enumerate(self.accessed)}
        return sorted(self.entries, key=lambda e: rank.get(e.name, len(rank)))

    def __post_init__(self) -> None:
        self.present = Marks(os.path.join(self.dir, PRESENT_FILE))

    def connect(self) -> Client:
        if self.client is None:
            s = self.source
            self.client = Client(s["registry"], s["repository"], insecure=s["insecure"], ca_file=s["ca_file"]).connect()
        return self.client


class LazyFill(FillState):
    """The daemon's ``fill(fd, offset, size)`` hook for the eStargz layers of one mount.

    Called on threads (the adapter runs a read that must fetch off its loop), so other requests
    and reads of local content go on while a chunk downloads; one fetch per chunk, the background
    fill standing aside while any read is fetching (:class:`.lazy_blob.FillState`)."""

    def __init__(self, store: Store, layer_dirs: list[str], recorded: dict[str, list[str]] | None = None) -> None:
        super().__init__(store, layer_dirs, recorded)
        self._files: dict[tuple[int, int], _File] | None = None
        self._placeholders: dict[tuple[str, str], _File] | None = None   # by (layer dir, name)
        self._layers: list[_LazyLayer] = []

    def _index(self) -> dict[tuple[int, int], _File]:
        files: dict[tuple[int, int], _File] = {}
        for d in self.layer_dirs:
            with open(os.path.join(d, LAZY_FILE)) as f:
                source = json.load(f)
            with open(os.path.join(d, TOC_FILE), "rb") as f:
                entries = estargz.parse_toc(f.read(), d)
            offsets = sorted({c.offset for e in entries for c in e.chunks})
            layer = _LazyLayer(d, source, offsets + [int(source["toc_offset"])], entries,
                               prefetch=self.recorded.get(d) or estargz.prefetch_names(entries))
            self._layers.append(layer)
            root = os.open(os.path.join(d, "root"), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                for e in entries:
                    if e.type != "reg" or not e.chunks:
                        continue
                    try:
                        st = ovl.fstat(fd := ovl.open_beneath(root, os.fsencode(e.name), os.O_RDONLY))
                        os.close(fd)
                    except OSError:
                        continue   # whited out within the layer, or replaced by a later entry
                    if st.st_size == e.size:
                        files[(st.st_dev, st.st_ino)] = _File(layer, e, os.fsencode(e.name))
            finally:
                os.close(root)
            layer.present.reload()
            layer.accessed.update(read_access(d))
        return files

    def _missing(self, fd: int, offset: int, size: int) -> tuple[_File | None, list[estargz.Chunk]]:
        """(the placeholder open as ``fd``, the chunks of the range not local), under the lock."""
        if self._files is None:
            self._files = self._index()
        if not self._files:
            return None, []
        st = os.fstat(fd)
        f = self._files.get((st.st_dev, st.st_ino))
        if f is None:
            return None, []
        end = min(offset + size, f.entry.size)
        todo = [c for c in f.entry.chunks if c.file_offset < end and c.file_offset + c.size > offset]
        if all(c.offset in f.layer.present for c in todo):
            return f, []
        f.layer.present.reload()
        return f, [c for c in todo if c.offset not in f.layer.present]

    def _fetch(self, f: _File, c: estargz.Chunk) -> None:
        self._get(f.layer, f, c, f.entry.name, demand=True)

    def _get(self, layer: _LazyLayer, f: "_File | None", c: estargz.Chunk, name: str, demand: bool) -> None:
        """Make one chunk local: fetch it, or wait for the fetch of it already going on.
        A demand read whose chunk another fetch failed tries once itself (its own EIO)."""
        key = (layer.dir, c.offset)
        ev = self._claim(key, lambda: c.offset in layer.present, demand)
        if ev is None:
            return
        try:
            data, chunk = self._download(layer, c, name)
            self._keep(layer, f, c, data, chunk)
        finally:
            self._release(key, ev)

    def _download(self, layer: _LazyLayer, c: estargz.Chunk, name: str) -> tuple[bytes, bytes]:
        """(compressed extent, the chunk's bytes) fetched and verified; any failure is EIO, logged once."""
        i = bisect.bisect_right(layer.ends, c.offset)
        stop = layer.ends[i] if i < len(layer.ends) else int(layer.source["size"])
        digest = layer.source["digest"]
        try:
            with self._connecting:
                client = layer.connect()
            data = get_range(client, digest, c.offset, stop)
            with self._lock:
                self.fetched += len(data)
            return data, estargz.read_chunk(data, c, f"layer {digest}: {name}")
        except (ImageError, OSError) as e:
            key = (c.offset, stop)
            with self._lock:
                first = key not in layer.failed
                layer.failed.add(key)
            if first:
                log.error("lazy layer %s: bytes %d-%d (%s): %s", digest, c.offset, stop - 1, name, e)
            raise OSError(errno.EIO, "lazy fetch failed") from None

    def _keep(self, layer: _LazyLayer, f: _File | None, c: estargz.Chunk, data: bytes, chunk: bytes) -> None:
        """Write a verified extent into the blob file and its chunk into the placeholder; mark it present."""
        try:
            _pwrite_file(os.path.join(layer.dir, BLOB_FILE), data, c.offset)
            if f is not None:
                with self._lock:
                    if f.wfd < 0:
                        root = os.open(os.path.join(layer.dir, "root"), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                        try:
                            f.wfd = ovl.open_beneath(root, f.path, os.O_WRONLY)
                        finally:
                            os.close(root)
                _pwrite_all(f.wfd, chunk, c.file_offset)
                ns = int(round(estargz.parse_modtime(f.entry.modtime) * 1_000_000_000))
                os.utime(f.wfd, ns=(ns, ns))   # writing content is no change: the times stay the layer's
                os.fdatasync(f.wfd)
        except OSError as e:
            log.error("lazy layer %s: cannot write %s: %s", layer.source["digest"], f.entry.name if f else "", e)
            raise OSError(errno.EIO, "lazy fill failed") from None
        with self._lock:
            layer.present.add(c.offset)

    # --- the background fill -------------------------------------------------------------

    # the background fill and complete() (FillState's): the layers, each's prefetch files and the rest
    def _lazy_layers(self) -> list[_LazyLayer]:
        with self._lock:
            if self._files is None:
                self._files = self._index()
            if self._placeholders is None:
                self._placeholders = {(f.layer.dir, f.entry.name): f for f in self._files.values()}
        return self._layers

    def _prefetch_layer(self, layer: _LazyLayer) -> None:
        by_name = {e.name: e for e in layer.entries}
        for name in layer.prefetch:
            e = by_name.get(name)
            for c in e.chunks if e is not None else ():
                self._wait_idle(0)   # at once, but after any read's fetch
                with self._lock:
                    layer.present.reload()
                self._get(layer, self._placeholders.get((layer.dir, name)), c, name, demand=False)

    def _fill_whole(self, layer: _LazyLayer) -> None:
        """Every chunk not yet local, between reads, in the recorded access order and TOC order; the
        whole blob checked against its digest and diff_id; then the layer is an ordinary stored layer."""
        self._fill_layer(layer, self._placeholders)

    def _local_bytes(self, layer_dir: str) -> tuple[int, int]:
        return local_bytes(layer_dir)

    def _fill_layer(self, layer: _LazyLayer, placeholders: dict) -> None:
        digest = layer.source["digest"]
        with self._lock:
            layer.present.reload()
            head = HEAD_MARK not in layer.present and layer.ends[0] > 0
        with self._connecting:
            client = layer.connect()
        if head:
            data = get_range(client, digest, 0, layer.ends[0])
            _pwrite_file(os.path.join(layer.dir, BLOB_FILE), data, 0)
            with self._lock:
                self.fetched += len(data)
                layer.present.add(HEAD_MARK)
        for e in layer.fill_order():
            for c in e.chunks:
                self._wait_idle()
                with self._lock:
                    layer.present.reload()
                # a file the layer itself replaced has no placeholder: its bytes are part of the blob
                self._get(layer, placeholders.get((layer.dir, e.name)), c, e.name, demand=False)
        with self._lock:
            missing = [c for e in layer.entries for c in e.chunks if c.offset not in layer.present]
        if missing:   # a fetch another fill of ours was making failed: the next mount goes on
            raise OSError(errno.EIO, f"{len(missing)} chunks not fetched")
        blob = os.path.join(layer.dir, BLOB_FILE)
        diff_id = "sha256:" + os.path.basename(layer.dir)
        check_blob(blob, digest, diff_id, f"lazy layer {digest}")   # ImageError: logged by the caller
        with self.store.locked():
            if not os.path.exists(os.path.join(layer.dir, LAZY_FILE)):
                return   # another mount's fill (or a push) completed it meanwhile
            os.link(blob, blob + ".keep")
            self.store.put_blob_file(digest, blob + ".keep")
            os.rename(os.path.join(layer.dir, LAZY_FILE), os.path.join(layer.dir, DONE_FILE))
        log.info("lazy layer %s: complete (%d bytes fetched by this mount)", digest, self.fetched)


def local_bytes(layer_dir: str) -> tuple[int, int]:
    """(bytes of the layer's blob that are local, the blob's size), from what ``lazy-present`` records."""
    if indexed.is_indexed(layer_dir):
        return indexed.local_bytes(layer_dir)
    with open(os.path.join(layer_dir, LAZY_FILE)) as f:
        source = json.load(f)
    with open(os.path.join(layer_dir, TOC_FILE), "rb") as f:
        entries = estargz.parse_toc(f.read(), layer_dir)
    size, toc_at = int(source["size"]), int(source["toc_offset"])
    ends = sorted({c.offset for e in entries for c in e.chunks}) + [toc_at]
    with open(os.path.join(layer_dir, PRESENT_FILE), "rb") as f:
        present = {int(x) for x in f.read().split()}
    have = size - toc_at + (ends[0] if HEAD_MARK in present else 0)
    have += sum(ends[i + 1] - off for i, off in enumerate(ends[:-1]) if off in present)
    return have, size


@dataclass(frozen=True)
class LocalShare:
    """How much of one lazy layer's blob is local (for ``images``, ``ps`` and ``inspect``)."""
    digest: str
    local: int
    size: int

    @property
    def percent(self) -> int:
        return 100 * self.local // max(self.size, 1)

    def text(self) -> str:
        return f"{self.local} of {self.size} bytes local ({self.percent}%)"


def local_shares(store: Store, diff_ids) -> list[LocalShare]:
    """The layers among ``diff_ids`` still lazy (a filled one is an ordinary layer and not listed)."""
    out = []
    for diff_id in dict.fromkeys(diff_ids):
        d = store.layer_dir(diff_id)
        try:
            with open(os.path.join(d, LAZY_FILE)) as f:
                digest = json.load(f)["digest"]
            have, size = local_bytes(d)
        except (FileNotFoundError, ValueError):
            continue   # not lazy, or completed meanwhile
        out.append(LocalShare(digest, have, size))
    return out


def lazy_report(store: Store) -> str:
    """The lazy layers of every image, with how much of each is local (for ``unionfs images``)."""
    rows = []
    tags: dict[str, list[str]] = {}
    for tag, image_id in store.tags().items():
        tags.setdefault(image_id, []).append(tag)
    for image_id in store.image_ids():
        name = ",".join(sorted(tags.get(image_id, []))) or image_id[7:19]
        for share in local_shares(store, store.image(image_id).config.diff_ids):
            rows.append(f"{share.digest[7:19]}  {name}  {share.text()}")
    return "\n".join(["LAZY LAYER    IMAGE  LOCAL", *rows]) if rows else ""


def lazy_inspect(store: Store, diff_ids) -> list[dict]:
    """``inspect``'s ``LazyLayers``: each layer not yet local, bytes and percent."""
    return [{"Digest": s.digest, "LocalBytes": s.local, "Size": s.size, "LocalPercent": s.percent}
            for s in local_shares(store, diff_ids)]


def make_local(store: Store, names, say) -> None:
    """Fetch the rest of every lazy layer of the images ``names``, so their blobs are all local."""
    if not store.exists():
        return
    for name in names:
        fill = fill_for(store, store.image(store.resolve(name)).config.diff_ids)   # any order will do
        if fill is not None:
            fill.complete(say)


class Fills:
    """The fill hooks of an image whose lazy layers come in both formats (eStargz, indexed): each
    call goes to every one (a hook ignores the fds of layers it does not serve)."""

    def __init__(self, *fills) -> None:
        self.fills = fills
        for fill in fills:
            fill.peers = fills   # each background fill stands aside for the others' reads too

    def pending(self, fd: int, offset: int, size: int) -> bool:
        return any(fill.pending(fd, offset, size) for fill in self.fills)

    def __call__(self, fd: int, offset: int, size: int) -> None:
        for fill in self.fills:
            fill(fd, offset, size)

    def background(self) -> None:
        for fill in self.fills:   # every kind's prefetch files before any kind's rest
            fill.prefetch_all()
        for fill in self.fills:
            fill.fill_all()

    def complete(self, say) -> None:
        for fill in self.fills:
            fill.complete(say)


def fill_for(store: Store, diff_ids: list[str] | tuple[str, ...],
             image_id: str | None = None) -> LazyFill | indexed.IndexedFill | Fills | None:
    """The fill hook for an image's layers (eStargz by TOC, gzip/zstd by index), or None when every
    layer is whole.  With ``image_id``, the image's recorded prefetch list (``run --record-prefetch``)
    goes first, else each layer's landmark."""
    lazy = [d for d in dict.fromkeys(diff_ids) if is_lazy(store, d)]
    if not lazy:
        return None
    paths = prefetch.load(store, image_id) if image_id else None
    shares = prefetch.by_layer(store, diff_ids, paths) if paths else {}
    recorded = {store.layer_dir(d): shares[d] for d in lazy if shares.get(d)}
    by_index = [store.layer_dir(d) for d in lazy if indexed.is_indexed(store.layer_dir(d))]
    by_toc = [store.layer_dir(d) for d in lazy if store.layer_dir(d) not in by_index]
    fills = ([LazyFill(store, by_toc, recorded)] if by_toc else []) + \
        ([indexed.IndexedFill(store, by_index, recorded)] if by_index else [])
    return fills[0] if len(fills) == 1 else Fills(*fills)
