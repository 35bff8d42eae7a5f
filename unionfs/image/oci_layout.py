"""Reading an OCI image layout (image-spec ``image-layout.md``), as a directory or a tar.

``oci-layout`` + ``index.json`` + ``blobs/<alg>/<hex>``.  The index may point at
manifests or at nested indexes (multi-platform images); for those we pick the
manifest for this machine's platform.  Every blob read is checked against its
digest before it is parsed.
"""
from __future__ import annotations

from . import platform
from .archive import Archive, SourceImage, SourceLayer
from .model import (INDEX_TYPES, MANIFEST_TYPES, MAX_IMAGES, ImageError, Reference, check_descriptor, field_of,
                    parse_json, parse_manifest, quote)

REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"

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
        media = d.get("mediaType") or ""
        if "tar" not in media or "encrypted" in media:
            raise ImageError(f"{archive.path}: layer {d['digest']}: unsupported media type {quote(media)}")
        out.append(SourceLayer(blob_name(d["digest"]), d["digest"], media))
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
