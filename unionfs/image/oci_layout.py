"""Reading an OCI image layout (image-spec ``image-layout.md``), as a directory or a tar.

``oci-layout`` + ``index.json`` + ``blobs/<alg>/<hex>``.  The index may point at
manifests or at nested indexes (multi-platform images); for those we pick the
manifest for this machine's platform.  Every blob read is checked against its
digest before it is parsed.
"""
from __future__ import annotations

import json

from .archive import Archive, SourceImage, SourceLayer
from . import platform
from .model import INDEX_TYPES, MANIFEST_TYPES, ImageError, Reference, check_digest, parse_json, parse_manifest

REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"

def blob_name(digest: str) -> str:
    alg, hexpart = digest.split(":", 1)
    return f"blobs/{alg}/{hexpart}"


def is_layout(archive: Archive) -> bool:
    return archive.exists("oci-layout") and archive.exists("index.json")


def resolve_manifest(archive: Archive, desc: dict, where: str, depth: int = 0) -> tuple[str, bytes]:
    """Follow a descriptor (through nested indexes) to an image manifest: (digest, bytes), verified."""
    digest = check_digest(desc.get("digest"), where)
    data = archive.read_verified(blob_name(digest), digest, "manifest")
    media = desc.get("mediaType") or parse_json(data, where).get("mediaType")
    if media in INDEX_TYPES or (media is None and "manifests" in parse_json(data, where)):
        if depth > 4:
            raise ImageError(f"{where}: image indexes nested too deeply")
        desc = platform.pick(parse_json(data, where), platform.host(), where, any_single=True)
        return resolve_manifest(archive, desc, where, depth + 1)
    if media is not None and media not in MANIFEST_TYPES:
        raise ImageError(f"{where}: unsupported manifest type {media!r}")
    return digest, data


def image_from_manifest(archive: Archive, digest: str, data: bytes, tags: tuple[Reference, ...] = (),
                        ref_names: tuple[str, ...] = ()) -> SourceImage:
    config, layers = parse_manifest(data, f"{archive.path}: manifest {digest}")
    out = []
    for d in layers:
        media = d.get("mediaType") or ""
        if "tar" not in media or "encrypted" in media:
            raise ImageError(f"{archive.path}: layer {d['digest']}: unsupported media type {media!r}")
        out.append(SourceLayer(blob_name(d["digest"]), d["digest"], media))
    return SourceImage(blob_name(config["digest"]), config["digest"], tuple(out), tags, data, digest, ref_names)


def read(archive: Archive) -> list[SourceImage]:
    where = f"{archive.path}: index.json"
    try:
        layout = json.loads(archive.read_small("oci-layout", "oci-layout file"))
    except ValueError:
        raise ImageError(f"{archive.path}: oci-layout is not JSON") from None
    if not isinstance(layout, dict) or not str(layout.get("imageLayoutVersion", "")).startswith("1."):
        raise ImageError(f"{archive.path}: unsupported OCI layout version {layout!r}")
    index = parse_json(archive.read_small("index.json", "index"), where)
    if not isinstance(index, dict) or not isinstance(index.get("manifests"), list):
        raise ImageError(f"{where}: no manifests")
    by_digest: dict[str, tuple[bytes, list[Reference], list[str]]] = {}
    for desc in index["manifests"]:
        if not isinstance(desc, dict):
            raise ImageError(f"{where}: descriptor is not an object")
        digest, data = resolve_manifest(archive, desc, where)
        _, tags, bare = by_digest.setdefault(digest, (data, [], []))
        ann = desc.get("annotations") or {}
        name = ann.get(CONTAINERD_NAME) or ann.get(REF_NAME)
        if name:
            if ":" in name or "/" in name:   # a full reference (Docker >= 25 writes these)
                tags.append(Reference.parse(name))
            else:                            # a bare tag (skopeo, umoci): the repository is not known
                bare.append(name)
    return [image_from_manifest(archive, d, data, tuple(dict.fromkeys(tags)), tuple(bare))
            for d, (data, tags, bare) in by_digest.items()]
