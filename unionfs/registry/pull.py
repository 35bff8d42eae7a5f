"""``unionfs pull``: a registry image into the store, verified, resumable, atomic.

1. The manifest by tag or digest (an OCI index or Docker manifest list picks the
   platform: ``--platform``, by default this host's), then the config blob;
   each is checked against its digest before it is parsed.
2. The layers the store lacks (by diff_id) are downloaded in parallel, without the
   store's lock, into ``downloads/sha256/<hex>.partial``: each chunk is hashed as it
   is written, an interrupted download continues with ``Range`` where it stopped,
   and only a blob whose sha256 matched becomes ``downloads/sha256/<hex>``.  A blob
   that does not match is deleted: the pull fails with a digest error.
3. Under the lock, the load pipeline (:func:`unionfs.image.load.add_layer_blob`,
   :func:`~unionfs.image.load.register_image`) extracts each layer, checking its
   diff_id while it streams, moves the blob into ``blobs/`` and registers the image,
   tags last.  A failure removes what this pull added; completed downloads stay,
   so the next pull fetches only what is still missing.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ..image.compression import check_blob
from ..image.load import add_layer_blob, progress_enabled, register_image
from ..image import platform as platforms
from ..image.model import (INDEX_TYPES, Config, ImageError, Layer, Reference, check_digest, field_of, layer_media,
                           parse_json, parse_manifest)
from ..image.store import Store
from .client import Cancelled, Client, RegistryError

PARALLEL = 3   # as Docker's max-concurrent-downloads


@dataclass(frozen=True)
class Pulled:
    image_id: str
    reference: str              # what the image is tagged as ("" when pulled by digest only)
    repo_digest: str            # repo@sha256:<digest of what the reference named>
    new_layers: int
    reused_layers: int
    fetched_bytes: int


def resolve(client: Client, ref: Reference, platform: platforms.Platform) -> tuple[str, bytes, str, str]:
    """(digest the reference names, manifest bytes, manifest digest, media type), following an index."""
    where = str(ref)
    data, media, top = client.get_manifest(ref.digest or ref.tag or "latest")
    digest = top
    for _ in range(4):
        doc = parse_json(data, f"{where}: manifest")
        if not isinstance(doc, dict):
            raise RegistryError(f"{where}: manifest is not a JSON object")
        media = field_of(doc, "mediaType", str, f"{where}: manifest") or media
        if media not in INDEX_TYPES and "manifests" not in doc:
            break
        desc = platforms.pick(doc, platform, where)
        digest = check_digest(desc.get("digest"), f"{where}: index")
        data, media, _ = client.get_manifest(digest)
    else:
        raise RegistryError(f"{where}: image indexes nested too deeply")
    return top, data, digest, media


@dataclass(frozen=True)
class RemoteImage:
    """What a reference names in a registry, checked: the manifest (through an index, by platform),
    its layers' media types, the config, and that the config's diff_ids line up with the layers."""
    top: str            # the digest the reference names (an index or the manifest)
    manifest: bytes
    manifest_digest: str
    media: str
    config_bytes: bytes
    image_id: str
    config: Config
    descs: list[dict]
    layers: list[Layer]


def fetch_image(client: Client, ref: Reference, platform: str | None) -> RemoteImage:
    """The manifest and config of ``ref`` (``pull`` and ``pull --lazy`` share this), no layer yet."""
    plat = platforms.parse(platform)
    where = str(ref)
    top, manifest, manifest_digest, media = resolve(client, ref, plat)
    config_desc, layer_descs = parse_manifest(manifest, f"{where}: manifest {manifest_digest}")
    for d in layer_descs:
        layer_media(d, where)
    config_bytes = client.get_small_blob(config_desc["digest"])
    image_id = config_desc["digest"]
    config = Config.parse(config_bytes, f"{where}: config {image_id}")
    if len(config.diff_ids) != len(layer_descs):
        raise RegistryError(f"{where}: the manifest has {len(layer_descs)} layers but the config lists "
                            f"{len(config.diff_ids)} diff_ids")
    if platform is not None and (config.os, config.architecture) != (plat.os, plat.architecture):
        raise RegistryError(f"{where}: the image is for {config.os}/{config.architecture}, not {platform}")
    layers = [Layer(diff_id, d["digest"], d.get("mediaType") or "", int(d.get("size") or 0))
              for d, diff_id in zip(layer_descs, config.diff_ids)]
    return RemoteImage(top, manifest, manifest_digest, media, config_bytes, image_id, config, layer_descs, layers)


def record(store: Store, ref: Reference, r: RemoteImage, layers: list[Layer]) -> str:
    """A pulled image into the store (its layers are there): the record, then its tag, last.
    Returns its repo digest (``repo@sha256:`` of what the reference named)."""
    repo_digest = f"{ref.repository}@{r.top}"
    register_image(store, r.image_id, r.config_bytes, r.manifest, r.manifest_digest, layers, (repo_digest,))
    if ref.tag:
        tags = store.tags()
        tags[ref.tagged] = r.image_id
        store.set_tags(tags)
    return repo_digest


def pull(store: Store, ref: Reference, client: Client, platform: str | None = None,
         progress: bool | None = None, log=None) -> Pulled:
    if progress is None:
        progress = progress_enabled()
    log = log or (lambda msg: print(msg, file=sys.stderr))
    where = str(ref)
    r = fetch_image(client, ref, platform)
    image_id, layers = r.image_id, r.layers
    store.ensure()

    # Layers the store lacks, and blobs of layers it has but not as this blob: each is recorded
    # under its layer only once checked against the diff_id.
    wanted = {ly.diff_id: ly for ly in layers if not store.verified_blob(ly.diff_id, ly.digest)}
    fetched = _download_all(store, client, list(wanted.values()), progress, log)

    with store.locked():
        try:
            new = 0
            for ly in dict.fromkeys(layers):   # a layer listed twice is fetched and checked once
                if store.has_layer(ly.diff_id):   # (another pull may have added it meanwhile)
                    if store.verified_blob(ly.diff_id, ly.digest):
                        continue
                    path = download_path(store, ly.digest)
                    if not os.path.exists(path):
                        fetched += _download_all(store, client, [ly], progress, log)
                    try:
                        check_blob(path, ly.digest, ly.diff_id, f"{where}: layer {ly.digest}")
                    except ImageError:
                        os.unlink(path)
                        raise
                    store.put_blob_file(ly.digest, path)
                    continue
                # Removed since we looked (an rmi), or new: fetch now, under the lock.
                if ly.diff_id not in wanted:
                    fetched += _download_all(store, client, [ly], progress, log)
                path = download_path(store, ly.digest)
                try:
                    add_layer_blob(store, path, ly.digest, ly.diff_id, f"{where}: layer {ly.digest}", checked=True)
                except ImageError:
                    os.unlink(path)   # verified by digest, yet its content is not the config's diff_id
                    raise
                store.put_blob_file(ly.digest, path)
                new += 1
            repo_digest = record(store, ref, r, layers)
        except BaseException:
            store.cleanup()
            raise
    return Pulled(image_id, ref.tagged if ref.tag else "", repo_digest, new, len(layers) - new, fetched)


def download_path(store: Store, digest: str) -> str:
    return store.path("downloads", "sha256", digest.split(":", 1)[1])


def _download_all(store: Store, client: Client, layers: list[Layer], progress: bool, log) -> int:
    """Download blobs in parallel; wait for all (finished ones stay for the next pull), then raise
    the first failure.  Returns the bytes fetched from the registry."""
    if not layers:
        return 0
    cancelled = threading.Event()
    bars = []
    if progress:
        from tqdm import tqdm
        bars = [tqdm(total=ly.size, unit="B", unit_scale=True, unit_divisor=1024, position=i, leave=False,
                     desc=ly.digest[7:19], file=sys.stderr) for i, ly in enumerate(layers)]
    try:
        with ThreadPoolExecutor(max_workers=min(PARALLEL, len(layers)), thread_name_prefix="pull") as pool:
            futures = [pool.submit(fetch_to_downloads, store, client, ly.digest, ly.size,
                                   bars[i].update if bars else None, cancelled)
                       for i, ly in enumerate(layers)]
            errors: list[BaseException] = []
            total = 0
            for ly, fut in zip(layers, futures):
                try:
                    total += fut.result()
                    log(f"{ly.digest[7:19]}: Pull complete")
                except Cancelled:
                    continue
                except BaseException as e:   # noqa: B902 - re-raised below
                    errors.append(e)
                    if not isinstance(e, RegistryError):
                        cancelled.set()   # KeyboardInterrupt and the like: stop the others too
    except KeyboardInterrupt:
        cancelled.set()
        raise
    finally:
        for b in bars:
            b.close()
    if errors:
        raise errors[0]
    return total


def fetch_to_downloads(store: Store, client: Client, digest: str, size: int | None, on_bytes=None,
                       cancelled: threading.Event | None = None) -> int:
    """Download one blob into ``downloads/``, resuming a partial file, checked against its digest.
    Concurrent pulls of the same blob take turns (flock on the partial file).  Returns bytes fetched."""
    final = download_path(store, digest)
    part = final + ".partial"
    if os.path.exists(final):
        return 0
    fd = os.open(part, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "r+b") as out:
        fcntl.flock(out.fileno(), fcntl.LOCK_EX)
        if os.path.exists(final):   # another pull finished it while we waited
            try:
                if os.path.getsize(part) == 0:
                    os.unlink(part)   # the empty one we created after its rename
            except FileNotFoundError:
                pass
            return 0
        h = hashlib.sha256()
        offset = 0
        while chunk := out.read(1 << 20):   # what an earlier pull left: hash it, continue after it
            h.update(chunk)
            offset += len(chunk)
        if size is not None and offset > size:
            out.seek(0)
            out.truncate()
            h, offset = hashlib.sha256(), 0
        fetched = 0
        state = {"h": h}

        def on_data(chunk: bytes) -> None:
            nonlocal fetched
            state["h"].update(chunk)
            fetched += len(chunk)
            if on_bytes:
                on_bytes(len(chunk))

        def on_restart() -> None:
            state["h"] = hashlib.sha256()

        if on_bytes and offset:
            on_bytes(offset)
        if size is None or offset < size:
            start = client.fetch_blob(digest, out, offset, size, on_data, on_restart, cancelled)
            if start == -1:   # the registry says our partial file is no prefix of the blob
                out.seek(0)
                out.truncate()
                on_restart()
                client.fetch_blob(digest, out, 0, size, on_data, on_restart, cancelled)
        out.flush()
        actual = "sha256:" + state["h"].hexdigest()
        length = os.fstat(out.fileno()).st_size
        if actual != digest or (size is not None and length != size):
            os.unlink(part)   # a corrupt blob is not worth resuming
            raise RegistryError(f"{client.where}: blob {digest} does not match its digest "
                                f"(got {actual}, {length} bytes); nothing was stored")
        os.fsync(out.fileno())
        os.rename(part, final)
    return fetched
