"""``unionfs push``: an image from the store to a registry, blobs as they were loaded or pulled.

The store keeps every layer blob as shipped (``blobs/sha256/<digest>``), so the
manifest pushed is the manifest the image came with, byte for byte, and the
pushed digest is the one it had (``docker push`` of a pulled image does the same).
For each blob (layers, then the config): ``HEAD`` first and skip it if the
registry has it; else a cross-repository mount from a repository of the same
registry the image came from or went to (its RepoDigests); else an upload,
monolithic (one ``PUT``) or in chunks (``PATCH``es and a closing ``PUT``).
The manifest goes last, under the tag.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass

from ..image.compression import check_blob
from ..image.model import MEDIA_OCI_MANIFEST, ImageError, Reference, parse_manifest
from ..image.store import Store
from .client import Client, RegistryError


@dataclass(frozen=True)
class Pushed:
    digest: str
    size: int
    uploaded: int       # blobs sent
    skipped: int        # blobs the registry had
    mounted: int        # blobs mounted from another repository


def target_reference(store: Store, name: str, target: str | None) -> Reference:
    """Where to push: REFERENCE, or the image's own name (which must then be a tag in the store)."""
    if target is not None:
        return Reference.parse(target)
    image_id = store.resolve(name)   # "no such image", precisely
    try:
        ref = Reference.parse(name)
    except ImageError:
        ref = None
    if ref is None or store.tags().get(ref.tagged) != image_id:
        raise ImageError(f"{name}: an image id names no repository: give a REFERENCE to push to")
    return ref


def push(store: Store, name: str, ref: Reference, client: Client, chunk_size: int | None = None,
         log=None) -> Pushed:
    log = log or (lambda msg: print(msg, file=sys.stderr))
    image = store.image(store.resolve(name))
    manifest = store.blob(image.manifest_digest)
    for digest, data in ((image.manifest_digest, manifest), (image.id, store.blob(image.id))):
        if "sha256:" + hashlib.sha256(data).hexdigest() != digest:   # verified before anything is sent
            raise ImageError(f"{name}: the store's blob {digest} does not match its digest (store damaged?)")
    config_desc, layer_descs = parse_manifest(manifest, f"{name}: manifest {image.manifest_digest}")
    try:
        media = json.loads(manifest).get("mediaType") or MEDIA_OCI_MANIFEST
    except ValueError:
        media = MEDIA_OCI_MANIFEST
    if [d["digest"] for d in layer_descs] != [ly.digest for ly in image.layers]:
        raise ImageError(f"{name}: the stored manifest does not list the image's layers (store damaged?)")
    sources = [Reference.parse(rd.split("@")[0]) for rd in image.repo_digests]
    mount_from = [r.path for r in sources if r.registry == ref.registry and r.path != ref.path]

    uploaded = skipped = mounted = 0
    for desc in [*layer_descs, config_desc]:
        digest, size = desc["digest"], int(desc.get("size") or 0)
        short = digest[7:19]
        if client.blob_exists(digest):
            log(f"{short}: Layer already exists")
            skipped += 1
            continue
        location = None
        for repo in dict.fromkeys(mount_from):
            done, location = client.mount_blob(digest, repo)
            if done:
                log(f"{short}: Mounted from {repo}")
                mounted += 1
                break
        else:
            path = store.blob_path(digest)
            if not os.path.exists(path):
                raise RegistryError(f"{name}: blob {digest} is not in the store (the image was loaded by an older "
                                    "unionfs, which kept no layer blobs): rmi it and load or pull it again")
            if os.path.getsize(path) != size:
                raise RegistryError(f"{name}: the store's blob {digest} is {os.path.getsize(path)} bytes, "
                                    f"the manifest says {size} (store damaged?)")
            for ly in image.layers:
                if ly.digest == digest:   # what the store records is sent only once checked again
                    check_blob(path, digest, ly.diff_id, f"{name}: the store's blob {digest} (store damaged?)")
                    break
            client.upload(location or client.start_upload(), path, digest, size, chunk_size)
            log(f"{short}: Pushed")
            uploaded += 1
    digest = client.put_manifest(ref.tag or "latest", manifest, media)
    with store.locked():
        if image.id in store.image_ids():
            store.put_image(image.id, image.manifest_digest, list(image.layers), (f"{ref.repository}@{digest}",))
    return Pushed(digest, len(manifest), uploaded, skipped, mounted)
