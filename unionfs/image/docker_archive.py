"""``docker save`` archives, both ways: read in both forms real tools write, written in the legacy one.

* Legacy (Docker < 25, skopeo ``docker-archive:``): ``manifest.json`` lists, per image,
  ``Config`` (``<id>.json``), ``RepoTags`` and ``Layers`` (``<v1id>/layer.tar`` or
  ``<hex>.tar``, uncompressed; a layer shared with an earlier one may be a symlink to it),
  plus ``repositories`` (ignored: manifest.json says the same).
* Docker >= 25: an OCI layout (``oci-layout``, ``index.json``, ``blobs/sha256/...``) and a
  ``manifest.json`` whose ``Config`` and ``Layers`` name ``blobs/sha256/<hex>`` files.

When a file's name is its digest (``blobs/sha256/<hex>``, ``<hex>.json``) it is checked
against it; layers are always checked against the config's diff_ids when extracted.

Writing (:func:`write`, ``unionfs save``'s default): the form skopeo's ``docker-archive:`` and
Docker before 25 write: ``manifest.json`` (``Config``, ``RepoTags``, ``Layers``),
``<config hex>.json``, and each layer once as an *uncompressed* ``<diff_id hex>.tar``.

It reads and writes named files only through :mod:`.archive`; where the output goes and how it
appears atomically is :mod:`.save`'s.
"""
from __future__ import annotations

import re

from . import oci_layout
from .archive import Archive, Sink, SourceImage, SourceLayer
from .model import MAX_IMAGES, MEDIA_DOCKER_LAYER, ImageError, Layer, Reference, dump_json, field_of, parse_json
from .store import Store
from .streams import Selected, add_layer_once, uncompressed

_DIGEST_NAME = re.compile(r"^(?:blobs/sha256/([0-9a-f]{64})|([0-9a-f]{64})\.json)$")


def is_docker_archive(archive: Archive) -> bool:
    return archive.exists("manifest.json")


def _digest_of_name(name: str) -> str | None:
    m = _DIGEST_NAME.match(name)
    if not m:
        return None
    return "sha256:" + (m.group(1) or m.group(2))


def _oci_manifests(archive: Archive) -> dict[str, tuple[str, bytes]]:
    """Docker >= 25: config digest -> (manifest digest, manifest bytes), from the OCI index."""
    if not oci_layout.is_layout(archive):
        return {}
    out = {}
    for img in oci_layout.read(archive):
        if img.config_digest and img.manifest is not None and img.manifest_digest:
            out[img.config_digest] = (img.manifest_digest, img.manifest)
    return out


def read(archive: Archive) -> list[SourceImage]:
    where = f"{archive.path}: manifest.json"
    entries = parse_json(archive.read_small("manifest.json", "manifest.json"), where)
    if not isinstance(entries, list) or not entries:
        raise ImageError(f"{where}: expected a non-empty list of images")
    if len(entries) > MAX_IMAGES:
        raise ImageError(f"{where}: {len(entries)} images, more than {MAX_IMAGES}")
    manifests = _oci_manifests(archive)
    out = []
    for e in entries:
        if not isinstance(e, dict) or not isinstance(e.get("Config"), str) or not isinstance(e.get("Layers"), list):
            raise ImageError(f"{where}: an entry lacks Config or Layers")
        layers = []
        for name in e["Layers"]:
            if not isinstance(name, str):
                raise ImageError(f"{where}: layer name is not a string")
            layers.append(SourceLayer(name, _digest_of_name(name), MEDIA_DOCKER_LAYER))
        tags = tuple(Reference.parse(t) for t in field_of(e, "RepoTags", list, where, []))   # null: untagged
        config_digest = _digest_of_name(e["Config"])
        manifest_digest, manifest = manifests.get(config_digest or "", (None, None))
        out.append(SourceImage(e["Config"], config_digest, tuple(layers), tags, manifest, manifest_digest))
    return out


def write(store: Store, images: list[Selected], sink: Sink) -> None:
    """Write the images as one archive."""
    manifest = []
    for sel in images:
        cfg_name = sel.image.id[7:] + ".json"
        if not sink.has(cfg_name):
            sink.add(cfg_name, store.blob(sel.image.id))
        manifest.append({"Config": cfg_name, "RepoTags": list(sel.tags),
                         "Layers": [_add_layer(store, sink, sel, ly) for ly in sel.image.layers]})
    sink.add("manifest.json", dump_json(manifest))


def _add_layer(store: Store, sink: Sink, sel: Selected, layer: Layer) -> str:
    """A layer as ``<diff_id hex>.tar``, uncompressed (once, if images share it): its name."""
    name = layer.diff_id[7:] + ".tar"
    add_layer_once(sink, name, uncompressed, store, sel.name, layer)
    return name
