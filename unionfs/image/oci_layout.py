"""The OCI image layout (image-spec ``image-layout.md``), as a directory or a tar, both ways.

``oci-layout`` + ``index.json`` + ``blobs/<alg>/<hex>``.

Reading: the index may point at manifests or at nested indexes (multi-platform images); for
those we pick the manifest for this machine's platform.  Every blob read is checked against its
digest before it is parsed.

Writing (:func:`write`, for ``unionfs save --format oci``): layer blobs as kept in the store
(gzip, zstd or plain, with the matching media type); bzip2/xz blobs, which OCI has no media type
for, uncompressed.  ``index.json`` names each image by its tag
(``org.opencontainers.image.ref.name``, as skopeo and umoci read it) and by its full name
(``io.containerd.image.name``, as Docker writes it).  The OCI manifest of a stored image
(:func:`image_manifest`, also for ``commit``) is made here.

It reads and writes named files only through :mod:`.archive`; where the output goes and how it
appears atomically is :mod:`.save`'s.
"""
from __future__ import annotations

import hashlib

from . import platform
from .archive import Archive, Sink, SourceImage, SourceLayer
from .model import (INDEX_TYPES, MANIFEST_TYPES, MAX_IMAGES, MEDIA_OCI_CONFIG, MEDIA_OCI_INDEX, MEDIA_OCI_LAYER,
                    MEDIA_OCI_MANIFEST, ImageError, Layer, Reference, check_descriptor, dump_json, field_of, layer_media,
                    parse_json, parse_manifest, quote)
from .store import Store
from .streams import Selected, add_layer_once, as_shipped, blob_compression, tar_size, uncompressed

REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"
LAYER_MEDIA = {"plain": MEDIA_OCI_LAYER, "gzip": MEDIA_OCI_LAYER + "+gzip", "zstd": MEDIA_OCI_LAYER + "+zstd"}


def blob_name(digest: str) -> str:
    alg, hexpart = digest.split(":", 1)
    return f"blobs/{alg}/{hexpart}"


def is_layout(archive: Archive) -> bool:
    return archive.exists("oci-layout") and archive.exists("index.json")


MAX_INDEX_DEPTH = 5


def resolve_manifest(archive: Archive, desc: dict, where: str) -> tuple[str, bytes]:
    """Follow a descriptor (through nested indexes) to an image manifest: (digest, bytes), verified."""
    for _ in range(MAX_INDEX_DEPTH):
        digest = check_descriptor(desc, where)["digest"]
        data = archive.read_verified(blob_name(digest), digest, "manifest")
        doc = parse_json(data, f"{archive.path}: manifest {digest}")
        if not isinstance(doc, dict):
            raise ImageError(f"{archive.path}: manifest {digest}: not a JSON object")
        media = desc.get("mediaType") or field_of(doc, "mediaType", str, f"{archive.path}: manifest {digest}")
        if media in INDEX_TYPES or (media is None and "manifests" in doc):
            desc = platform.pick(doc, platform.host(), where, any_single=True)
            continue
        if media is not None and media not in MANIFEST_TYPES:
            raise ImageError(f"{where}: unsupported manifest type {quote(media)}")
        return digest, data
    raise ImageError(f"{where}: image indexes nested too deeply")


def image_from_manifest(archive: Archive, digest: str, data: bytes, tags: tuple[Reference, ...] = (),
                        ref_names: tuple[str, ...] = ()) -> SourceImage:
    config, layers = parse_manifest(data, f"{archive.path}: manifest {digest}")
    out = []
    for d in layers:
        out.append(SourceLayer(blob_name(d["digest"]), d["digest"], layer_media(d, archive.path)))
    return SourceImage(blob_name(config["digest"]), config["digest"], tuple(out), tags, data, digest, ref_names)


def read(archive: Archive) -> list[SourceImage]:
    where = f"{archive.path}: index.json"
    layout = parse_json(archive.read_small("oci-layout", "oci-layout file"), f"{archive.path}: oci-layout")
    version = layout.get("imageLayoutVersion") if isinstance(layout, dict) else None
    if not isinstance(version, str) or not version.startswith("1."):
        raise ImageError(f"{archive.path}: unsupported OCI layout version {quote(version)}")
    index = parse_json(archive.read_small("index.json", "index"), where)
    if not isinstance(index, dict) or not isinstance(index.get("manifests"), list):
        raise ImageError(f"{where}: no manifests")
    if len(index["manifests"]) > MAX_IMAGES:
        raise ImageError(f"{where}: {len(index['manifests'])} manifests, more than {MAX_IMAGES}")
    by_digest: dict[str, tuple[bytes, list[Reference], list[str]]] = {}
    for desc in index["manifests"]:
        check_descriptor(desc, where)   # annotations included: all checked before anything is read
    for desc in index["manifests"]:
        digest, data = resolve_manifest(archive, desc, where)
        _, tags, bare = by_digest.setdefault(digest, (data, [], []))
        ann = desc.get("annotations") or {}
        name = ann.get(CONTAINERD_NAME) or ann.get(REF_NAME)
        if name:
            if ":" in name or "/" in name:   # a full reference (Docker >= 25 writes these)
                tags.append(Reference.parse(name))
            elif len(name) <= 128 and name.isprintable():   # a bare tag (skopeo, umoci): no repository known
                bare.append(name)
            else:
                raise ImageError(f"{where}: ref name {quote(name)} is neither a tag nor an image reference")
    return [image_from_manifest(archive, d, data, tuple(dict.fromkeys(tags)), tuple(bare))
            for d, (data, tags, bare) in by_digest.items()]


# --- writing -------------------------------------------------------------------------

def layer_descriptor(store: Store, layer: Layer) -> dict:
    """The OCI descriptor of a stored layer as :func:`write` writes it."""
    kind = blob_compression(store, layer)
    if kind is None:   # not kept: guess from how it was described
        kind = "gzip" if "gzip" in layer.media_type else "zstd" if "zstd" in layer.media_type else "plain"
    if kind in LAYER_MEDIA:
        return {"mediaType": LAYER_MEDIA[kind], "digest": layer.digest, "size": layer.size}
    return {"mediaType": MEDIA_OCI_LAYER, "digest": layer.diff_id, "size": tar_size(store, layer)}


def _manifest(config_digest: str, config_size: int, layer_descs: list[dict]) -> bytes:
    return dump_json({"schemaVersion": 2, "mediaType": MEDIA_OCI_MANIFEST,
                      "config": {"mediaType": MEDIA_OCI_CONFIG, "digest": config_digest, "size": config_size},
                      "layers": layer_descs})


def image_manifest(store: Store, config_digest: str, config_size: int,
                   layers: list[Layer] | tuple[Layer, ...]) -> bytes:
    """The OCI manifest of an image whose layers are in the store."""
    return _manifest(config_digest, config_size, [layer_descriptor(store, ly) for ly in layers])


def _add_blob_once(sink: Sink, data: bytes, digest: str) -> None:
    if not sink.has(blob_name(digest)):
        sink.add(blob_name(digest), data)


def write(store: Store, images: list[Selected], sink: Sink) -> None:
    """Write the images as one layout."""
    sink.add("oci-layout", dump_json({"imageLayoutVersion": "1.0.0"}))
    index: dict = {"schemaVersion": 2, "mediaType": MEDIA_OCI_INDEX, "manifests": []}
    for sel in images:
        descs = [_add_layer(store, sink, sel, ly) for ly in sel.image.layers]
        config = store.blob(sel.image.id)
        _add_blob_once(sink, config, sel.image.id)
        manifest = _manifest(sel.image.id, len(config), descs)
        mdigest = "sha256:" + hashlib.sha256(manifest).hexdigest()
        _add_blob_once(sink, manifest, mdigest)
        mdesc = {"mediaType": MEDIA_OCI_MANIFEST, "digest": mdigest, "size": len(manifest)}
        for t in sel.tags or (None,):
            d = dict(mdesc)
            if t:
                d["annotations"] = {CONTAINERD_NAME: t, REF_NAME: t.rpartition(":")[2]}
            index["manifests"].append(d)
    sink.add("index.json", dump_json(index))


def _add_layer(store: Store, sink: Sink, sel: Selected, layer: Layer) -> dict:
    """A layer's blob as kept (uncompressed if OCI has no media type for it), once: its descriptor."""
    desc = layer_descriptor(store, layer)
    opener = as_shipped if desc["digest"] == layer.digest else uncompressed
    add_layer_once(sink, blob_name(desc["digest"]), opener, store, sel.name, layer)
    return desc
