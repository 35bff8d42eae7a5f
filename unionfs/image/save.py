"""``unionfs save``: images from the store to a ``docker save`` archive or an OCI image layout.

The sinks mirror the sources (:mod:`.docker_archive`, :mod:`.oci_layout`):

* ``docker`` (the default): a tar in the form skopeo's ``docker-archive:`` and Docker
  before 25 write: ``manifest.json`` (``Config``, ``RepoTags``, ``Layers``),
  ``<config hex>.json``, and each layer once as an *uncompressed* ``<diff_id hex>.tar``;
* ``oci``: an OCI image layout (``oci-layout``, ``index.json``, ``blobs/sha256/``), as a
  directory, or as a tar when the output name ends in ``.tar``.  Layer blobs are
  written as kept in the store (gzip, zstd or plain, with the matching media type);
  bzip2/xz blobs, which OCI has no media type for, are written uncompressed.
  ``index.json`` names each image by its tag (``org.opencontainers.image.ref.name``,
  as skopeo and umoci read it) and by its full name (``io.containerd.image.name``,
  as Docker writes it).

Every byte written is checked on the way: a layer against its diff_id (and its
blob digest when copied as is), so a damaged store is never exported silently.
Output appears by one ``rename(2)`` once complete; on any error nothing is left.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import uuid
from dataclasses import dataclass
from typing import BinaryIO, Callable

from .compression import HashingReader, check_blob, decompressed, detect
from .model import MEDIA_OCI_CONFIG, MEDIA_OCI_INDEX, MEDIA_OCI_LAYER, MEDIA_OCI_MANIFEST, Image, ImageError, \
    Layer, Reference
from .store import Store

OCI_LAYER_MEDIA = {"plain": MEDIA_OCI_LAYER, "gzip": MEDIA_OCI_LAYER + "+gzip", "zstd": MEDIA_OCI_LAYER + "+zstd"}
FORMATS = ("docker", "oci")


def _json(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def blob_path(store: Store, digest: str) -> str:
    return store.path("blobs", "sha256", digest.split(":", 1)[1])


def blob_compression(store: Store, layer: Layer) -> str | None:
    """How the layer's blob in the store is compressed (by its magic bytes); None if the blob is not kept."""
    try:
        with open(blob_path(store, layer.digest), "rb") as f:
            return detect(f.read(6))
    except FileNotFoundError:
        return None


def layer_descriptor(store: Store, layer: Layer) -> dict:
    """The OCI descriptor of a layer as :func:`save` writes it."""
    kind = blob_compression(store, layer)
    if kind is None:   # not kept: guess from how it was described
        kind = "gzip" if "gzip" in layer.media_type else "zstd" if "zstd" in layer.media_type else "plain"
    if kind in OCI_LAYER_MEDIA:
        return {"mediaType": OCI_LAYER_MEDIA[kind], "digest": layer.digest, "size": layer.size}
    return {"mediaType": MEDIA_OCI_LAYER, "digest": layer.diff_id, "size": _tar_size(store, layer)}


def _tar_size(store: Store, layer: Layer) -> int:
    return int(store.layer_info(layer.diff_id)["size"])


def image_manifest(store: Store, config_digest: str, config_size: int, layers: list[Layer] | tuple[Layer, ...]) -> bytes:
    return _json({"schemaVersion": 2, "mediaType": MEDIA_OCI_MANIFEST,
                  "config": {"mediaType": MEDIA_OCI_CONFIG, "digest": config_digest, "size": config_size},
                  "layers": [layer_descriptor(store, ly) for ly in layers]})


# --- layer streams ------------------------------------------------------------------

class _Checked(io.RawIOBase):
    """Reads ``size`` bytes from a stream, then insists it ended there and hashed to ``expect``."""

    def __init__(self, stream: HashingReader, size: int, expect: str, what: str) -> None:
        self.stream, self.left, self.expect, self.what = stream, size, expect, what

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if self.left <= 0:
            return b""
        n = self.left if n < 0 else min(n, self.left)
        data = self.stream.read(n)
        self.left -= len(data)
        if not data and self.left:
            raise ImageError(f"{self.what}: shorter than recorded ({self.left} bytes missing): store damaged?")
        if self.left == 0:
            if self.stream.read(1):
                raise ImageError(f"{self.what}: longer than recorded: store damaged?")
            if self.stream.digest != self.expect:
                raise ImageError(f"{self.what}: does not match {self.expect} (got {self.stream.digest}): "
                                 "store damaged?")
        return data

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)


def _open_blob(store: Store, img_name: str, layer: Layer) -> BinaryIO:
    try:
        return open(blob_path(store, layer.digest), "rb")
    except FileNotFoundError:
        raise ImageError(f"{img_name}: layer {layer.diff_id[:19]}: its blob is not in the store (kept since "
                         "images are loaded by this version): load or pull the image again") from None


def _uncompressed(store: Store, img_name: str, layer: Layer) -> tuple[BinaryIO, int, Callable[[], None]]:
    """(the layer as a plain tar, verified against its diff_id, its size, close)."""
    f = _open_blob(store, img_name, layer)
    _, stream = decompressed(HashingReader(f))
    tar = HashingReader(stream)  # type: ignore[arg-type]
    size = _tar_size(store, layer)
    return _Checked(tar, size, layer.diff_id, f"{img_name}: layer {layer.diff_id[:19]}"), size, f.close  # type: ignore[return-value]


def _as_shipped(store: Store, img_name: str, layer: Layer) -> tuple[BinaryIO, int, Callable[[], None]]:
    """(the blob as kept, checked against its diff_id first and its digest as it is copied, its size, close)."""
    f = _open_blob(store, img_name, layer)
    try:
        check_blob(blob_path(store, layer.digest), layer.digest, layer.diff_id,
                   f"{img_name}: layer blob {layer.digest[:19]} (store damaged?)")
    except BaseException:
        f.close()
        raise
    return _Checked(HashingReader(f), layer.size, layer.digest, f"{img_name}: layer blob {layer.digest[:19]}"), \
        layer.size, f.close  # type: ignore[return-value]


# --- sinks -------------------------------------------------------------------------

class _TarSink:
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


class _DirSink:
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

    def close(self) -> None:
        pass


# --- save ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Selected:
    image: Image
    tags: tuple[str, ...]   # the names to write it under
    name: str               # as the user gave it


def select(store: Store, names: list[str]) -> list[Selected]:
    """Images by name: a tag saves that tag, an id saves the image under all its tags (as docker save)."""
    out: list[Selected] = []
    for name in names:
        image_id = store.resolve(name)
        image = store.image(image_id)
        tags: tuple[str, ...] = image.repo_tags
        try:
            ref = str(Reference.parse(name))
            if store.tags().get(ref) == image_id:
                tags = (ref,)
        except ImageError:
            pass
        for s in out:
            if s.image.id == image_id:
                out[out.index(s)] = Selected(image, tuple(dict.fromkeys(s.tags + tags)), s.name)
                break
        else:
            out.append(Selected(image, tags, name))
    return out


def _write_docker(store: Store, sel: list[Selected], sink) -> None:
    manifest = []
    for s in sel:
        layers = []
        for ly in s.image.layers:
            name = ly.diff_id[7:] + ".tar"
            _add_layer_once(sink, name, _uncompressed, store, s.name, ly)
            layers.append(name)
        cfg_name = s.image.id[7:] + ".json"
        if not sink.has(cfg_name):
            sink.add(cfg_name, store.blob(s.image.id))
        manifest.append({"Config": cfg_name, "RepoTags": list(s.tags), "Layers": layers})
    sink.add("manifest.json", _json(manifest))


def _add_layer_once(sink, name: str, opener, store: Store, image_name: str, ly: Layer) -> None:
    """Add a layer blob under ``name`` unless an image written before shared it."""
    if sink.has(name):
        return
    stream, size, close = opener(store, image_name, ly)
    try:
        sink.add(name, stream, size)
    finally:
        close()


def _write_oci(store: Store, sel: list[Selected], sink) -> None:
    sink.add("oci-layout", _json({"imageLayoutVersion": "1.0.0"}))
    index = {"schemaVersion": 2, "mediaType": MEDIA_OCI_INDEX, "manifests": []}
    for s in sel:
        descs = []
        for ly in s.image.layers:
            desc = layer_descriptor(store, ly)
            name = "blobs/sha256/" + desc["digest"][7:]
            opener = _as_shipped if desc["digest"] == ly.digest else _uncompressed
            _add_layer_once(sink, name, opener, store, s.name, ly)
            descs.append(desc)
        config = store.blob(s.image.id)
        if not sink.has("blobs/sha256/" + s.image.id[7:]):
            sink.add("blobs/sha256/" + s.image.id[7:], config)
        manifest = _json({"schemaVersion": 2, "mediaType": MEDIA_OCI_MANIFEST,
                          "config": {"mediaType": MEDIA_OCI_CONFIG, "digest": s.image.id, "size": len(config)},
                          "layers": descs})
        mdigest = "sha256:" + hashlib.sha256(manifest).hexdigest()
        if not sink.has("blobs/sha256/" + mdigest[7:]):
            sink.add("blobs/sha256/" + mdigest[7:], manifest)
        mdesc = {"mediaType": MEDIA_OCI_MANIFEST, "digest": mdigest, "size": len(manifest)}
        for t in s.tags or (None,):
            d = dict(mdesc)
            if t:
                d["annotations"] = {"io.containerd.image.name": t,
                                    "org.opencontainers.image.ref.name": t.rpartition(":")[2]}
            index["manifests"].append(d)
    sink.add("index.json", _json(index))


def save(store: Store, names: list[str], output: str, fmt: str = "docker") -> list[Selected]:
    if fmt not in FORMATS:
        raise ImageError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
    sel = select(store, names)
    out = os.path.abspath(output)
    as_dir = fmt == "oci" and not out.endswith(".tar")
    parent = os.path.dirname(out)
    if not os.path.isdir(parent):
        raise ImageError(f"{output}: directory {parent} does not exist")
    if os.path.isdir(out) and not os.path.islink(out):
        if not as_dir or os.listdir(out):
            raise ImageError(f"{output}: is a directory" + (" and not empty" if as_dir else ""))
    elif os.path.lexists(out) and as_dir:
        raise ImageError(f"{output}: exists and is not a directory")
    tmp = os.path.join(parent, f".{os.path.basename(out)}.unionfs-{uuid.uuid4().hex[:12]}")
    try:
        sink = _DirSink(tmp) if as_dir else _TarSink(tmp)
        try:
            (_write_docker if fmt == "docker" else _write_oci)(store, sel, sink)
        finally:
            sink.close()
        if as_dir and os.path.isdir(out):
            os.rmdir(out)
        os.rename(tmp, out)
    except OSError as e:
        _remove(tmp)
        raise ImageError(f"{output}: {e.strerror or e}") from None
    except BaseException:
        _remove(tmp)
        raise
    return sel


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.unlink(path)
