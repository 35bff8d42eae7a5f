"""``unionfs convert --estargz IMAGE NEW``: a copy of an image with every layer in eStargz form.

Each layer's tar is read from the blob the store kept (checked against its diff_id on the
way), rewritten by :func:`.estargz.write`, and the new image (new diff_ids, so a new
config; history, run config and platform unchanged) is loaded from an OCI layout by the
ordinary :func:`.load.load`, which verifies and extracts every layer as for any import.
The manifest is OCI, each layer ``tar+gzip`` with the TOC digest and uncompressed size
annotations, so registries, podman and skopeo take it as any gzip image and lazy
readers find the TOC.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile

from . import estargz, prefetch
from .compression import DECOMPRESS_ERRORS, HashingReader, check_diff_id, corrupt, decompressed
from .load import load
from .model import MEDIA_OCI_CONFIG, MEDIA_OCI_INDEX, MEDIA_OCI_LAYER, MEDIA_OCI_MANIFEST, ImageError, Reference
from .store import Store


def _json(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _put(blobs: str, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with open(os.path.join(blobs, digest[7:]), "wb") as f:
        f.write(data)
    return digest


def _convert_layer(store: Store, name: str, digest: str, diff_id: str, blobs: str,
                   chunk_size: int, first: list[str] | None) -> estargz.Written:
    path = store.blob_path(digest)
    if not os.path.exists(path):
        raise ImageError(f"{name}: blob {digest} is not in the store (loaded by an older unionfs): "
                         "rmi it and load or pull it again")
    tmp = os.path.join(blobs, "layer.partial")
    what = f"{name}: the store's blob {digest}"
    with open(path, "rb") as f, open(tmp, "wb") as out:
        try:
            _, stream = decompressed(HashingReader(f))
            tar = HashingReader(stream)  # type: ignore[arg-type]
            written = estargz.write(tar, out, chunk_size, prefetch=first)  # type: ignore[arg-type]
            tar.drain()
        except DECOMPRESS_ERRORS as e:
            raise corrupt(what, e) from None
    check_diff_id(tar.digest, diff_id, what, "; store damaged?")
    os.rename(tmp, os.path.join(blobs, written.digest[7:]))
    return written


def convert_estargz(store: Store, name: str, new: str, chunk_size: int = estargz.DEFAULT_CHUNK_SIZE) -> str:
    """Store a copy of image ``name`` with eStargz layers, tagged ``new``; returns its id.  With a
    recorded prefetch list (``run --record-prefetch``), each layer has its files of the list first,
    then the prefetch landmark, and the copy keeps the list."""
    if chunk_size <= 0:
        raise ImageError(f"--chunk-size {chunk_size}: must be positive")
    tag = Reference.parse(new)
    image = store.image(store.resolve(name))
    config = json.loads(store.blob(image.id))
    work = tempfile.mkdtemp(prefix=".convert-", dir=store.path())
    try:
        blobs = os.path.join(work, "blobs", "sha256")
        os.makedirs(blobs)
        done: dict[str, estargz.Written] = {}
        paths = prefetch.load(store, image.id)
        shares = prefetch.by_layer(store, image.config.diff_ids, paths) if paths is not None else None
        for ly in image.layers:
            if ly.diff_id not in done:
                done[ly.diff_id] = _convert_layer(store, name, ly.digest, ly.diff_id, blobs, chunk_size,
                                                  shares[ly.diff_id] if shares is not None else None)
        layers = [done[ly.diff_id] for ly in image.layers]
        config["rootfs"] = {"type": "layers", "diff_ids": [w.diff_id for w in layers]}
        config_bytes = _json(config)
        manifest = _json({"schemaVersion": 2, "mediaType": MEDIA_OCI_MANIFEST,
                          "config": {"mediaType": MEDIA_OCI_CONFIG, "digest": _put(blobs, config_bytes),
                                     "size": len(config_bytes)},
                          "layers": [{"mediaType": MEDIA_OCI_LAYER + "+gzip", "digest": w.digest, "size": w.size,
                                      "annotations": w.annotations()} for w in layers]})
        index = {"schemaVersion": 2, "mediaType": MEDIA_OCI_INDEX,
                 "manifests": [{"mediaType": MEDIA_OCI_MANIFEST, "digest": _put(blobs, manifest),
                                "size": len(manifest)}]}
        with open(os.path.join(work, "index.json"), "wb") as f:
            f.write(_json(index))
        with open(os.path.join(work, "oci-layout"), "wb") as f:
            f.write(_json({"imageLayoutVersion": "1.0.0"}))
        (loaded,) = load(store, work, tag, progress=False)
        if paths is not None:
            prefetch.save(store, loaded.image_id, paths)
        return loaded.image_id
    finally:
        shutil.rmtree(work, ignore_errors=True)
