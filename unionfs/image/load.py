"""``unionfs load``: from a source (docker save archive or OCI layout) into the store.

The whole import holds the store's lock.  Phase 1 verifies and extracts every
layer the store lacks into ``tmp/`` and renames each into ``layers/`` only once
its diff_id matched; phase 2 writes configs, manifests, image records, and
then the tags in one rename.  If anything fails, the layers this import added
(which no image references yet) are removed again before the lock is released.

Each layer blob is kept as shipped in ``blobs/`` (so ``push`` can send it unchanged).
:func:`add_layer_blob` and :func:`register_image` are shared with ``unionfs pull``
(:mod:`unionfs.registry.pull`), whose source is a blob downloaded from a registry;
:func:`add_layer_tar` and :func:`register_config` with ``commit`` and ``build``, whose source is a
layer tar and a config they made.  It reads sources only through :mod:`.archive` and the format
modules, and never decides what an image's config holds (that is :mod:`.mutate`).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import uuid
from dataclasses import dataclass
from typing import Callable

from ..fs.formats import Style
from . import docker_archive, oci_layout
from .archive import Archive, SourceImage, SourceLayer, open_archive
from .compression import check_blob, check_diff_id
from .extract import extract_layer
from .model import MEDIA_DOCKER_MANIFEST, MEDIA_OCI_LAYER, Config, ImageError, Layer, Reference, dump_json
from .store import Store, now_iso


@dataclass(frozen=True)
class Loaded:
    image_id: str
    tags: tuple[str, ...]
    new_layers: int
    reused_layers: int
    ref_names: tuple[str, ...] = ()


def progress_enabled() -> bool:
    """A progress bar only for a person watching: a terminal on stderr, and not under CI."""
    return sys.stderr.isatty() and not os.environ.get("CI")


def read_source(archive: Archive) -> list[SourceImage]:
    if docker_archive.is_docker_archive(archive):
        return docker_archive.read(archive)
    if oci_layout.is_layout(archive):
        return oci_layout.read(archive)
    raise ImageError(f"{archive.path}: neither a docker save archive (manifest.json) nor an OCI image layout "
                     "(oci-layout, index.json)")


def load(store: Store, path: str, tag: Reference | None = None, progress: bool | None = None) -> list[Loaded]:
    if progress is None:
        progress = progress_enabled()
    with open_archive(path) as archive:
        sources = read_source(archive)
        if tag is not None and len(sources) != 1:
            raise ImageError(f"{path}: holds {len(sources)} images; --tag needs exactly one")
        with store.locked():
            try:
                return _load_locked(store, archive, sources, tag, progress)
            except BaseException:
                store.cleanup()  # its tmp/ dirs, and layers no image came to reference
                raise


def _load_locked(store: Store, archive: Archive, sources: list[SourceImage], tag: Reference | None,
                 progress: bool) -> list[Loaded]:
    prepared = []
    for src in sources:
        config_bytes = archive.read_verified(src.config_name, src.config_digest, "image config")
        image_id = "sha256:" + hashlib.sha256(config_bytes).hexdigest()
        config = Config.parse(config_bytes, f"{archive.path}: config {image_id}")
        if len(config.diff_ids) != len(src.layers):
            raise ImageError(f"{archive.path}: image {image_id[7:19]} has {len(src.layers)} layers but its config "
                             f"lists {len(config.diff_ids)} diff_ids")
        prepared.append((src, config_bytes, image_id, config))

    todo: dict[str, SourceLayer] = {}
    for src, _, _, config in prepared:
        for sl, diff_id in zip(src.layers, config.diff_ids):
            if not store.has_layer(diff_id):
                todo.setdefault(diff_id, sl)
    bar = None
    if progress and todo:
        from tqdm import tqdm
        bar = tqdm(total=2 * sum(archive.size(sl.name) for sl in todo.values()), unit="B", unit_scale=True,
                   unit_divisor=1024, desc="extracting", file=sys.stderr, leave=False)
    # (diff_id, the source's blob) -> (digest, blob size), each verified against the diff_id
    blobs: dict[tuple[str, str], tuple[str, int]] = {}
    try:
        for diff_id, sl in todo.items():
            blobs[(diff_id, _blob_key(sl))] = _add_layer(store, archive, sl, diff_id, bar.update if bar else None)
    finally:
        if bar is not None:
            bar.close()

    planned = []   # every blob is checked before the first record is written: a refused load changes nothing
    for src, config_bytes, image_id, config in prepared:
        layers = []
        for sl, diff_id in zip(src.layers, config.diff_ids):
            key = (diff_id, _blob_key(sl))
            if key not in blobs:   # the layer is in the store: its blob as shipped is kept (for push), verified
                blobs[key] = _add_blob_of_stored_layer(store, archive, sl, diff_id)
            digest, size = blobs[key]
            layers.append(Layer(diff_id, digest, sl.media_type, size))
        planned.append(layers)

    results = []
    tags = store.tags()
    for (src, config_bytes, image_id, config), layers in zip(prepared, planned):
        manifest, manifest_digest = src.manifest, src.manifest_digest
        if manifest is None or manifest_digest is None:
            manifest = _docker_manifest(image_id, len(config_bytes), layers)
            manifest_digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
        register_image(store, image_id, config_bytes, manifest, manifest_digest, layers)
        names = list(src.tags) + ([tag] if tag is not None else [])
        for ref in names:
            tags[str(ref)] = image_id
        new = sum(1 for d in config.diff_ids if d in todo)
        results.append(Loaded(image_id, tuple(str(r) for r in dict.fromkeys(names)), new,
                              len(config.diff_ids) - new, src.ref_names))
    store.set_tags(tags)   # last: an image appears under its names only when everything is in place
    return results


def _blob_key(sl: SourceLayer) -> str:
    return sl.digest or sl.name


def _add_blob_of_stored_layer(store: Store, archive: Archive, sl: SourceLayer, diff_id: str) -> tuple[str, int]:
    """The blob of a layer the store has already extracted: kept only once checked against the
    diff_id it claims (else an archive could ship other bytes under a stored layer's name)."""
    if sl.digest is not None and store.verified_blob(diff_id, sl.digest):
        return sl.digest, os.path.getsize(store.blob_path(sl.digest))
    what = f"{archive.path}: layer {sl.name}"
    tmp, digest, size = _copy_blob(store, archive, sl, None)   # verified against sl.digest, if any
    check_blob(tmp, digest, diff_id, what)
    store.put_blob_file(digest, tmp)
    return digest, size


def register_image(store: Store, image_id: str, config_bytes: bytes, manifest: bytes, manifest_digest: str,
                   layers: list[Layer], repo_digests: tuple[str, ...] = ()) -> None:
    """Write an image whose layers (and layer blobs) are in the store: config, manifest, then its record.
    Tags are the caller's last step."""
    for ly in layers:
        assert store.has_layer(ly.diff_id), ly.diff_id
    store.put_blob(image_id, config_bytes)
    store.put_blob(manifest_digest, manifest)
    store.put_image(image_id, manifest_digest, layers, repo_digests)


def register_config(store: Store, cfg: dict, layers: list[Layer]) -> str:
    """Record an image of a new config ``cfg`` (commit, build) whose layers are in the store: its id."""
    config_bytes = dump_json(cfg)
    image_id = "sha256:" + hashlib.sha256(config_bytes).hexdigest()
    manifest = oci_layout.image_manifest(store, image_id, len(config_bytes), layers)
    manifest_digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    register_image(store, image_id, config_bytes, manifest, manifest_digest, layers)
    return image_id


def add_layer_tar(store: Store, tar_path: str, diff_id: str, size: int, what: str) -> Layer:
    """An uncompressed layer tar we wrote (commit, build; hashed on the way) becomes a layer of the
    store, extracted exactly as a loaded one and checked against that diff_id; the tar is its blob."""
    if not store.has_layer(diff_id):
        add_layer_blob(store, tar_path, None, diff_id, what)
    store.put_blob_file(diff_id, tar_path)   # the uncompressed tar is the layer's blob
    return Layer(diff_id, diff_id, MEDIA_OCI_LAYER, size)


def _copy_blob(store: Store, archive: Archive, sl: SourceLayer, on_read) -> tuple[str, str, int]:
    """Copy a layer blob from the archive into ``tmp/`` (a file the extractor and push can use),
    checked against its digest when the archive names one: (path, digest, size)."""
    if not archive.exists(sl.name):
        raise ImageError(f"{archive.path}: layer {sl.name}: missing from the archive")
    path = store.path("tmp", f"blob-{uuid.uuid4().hex}")
    h, n = hashlib.sha256(), 0
    with archive.open(sl.name) as src, open(path, "xb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
            h.update(chunk)
            n += len(chunk)
            if on_read:
                on_read(len(chunk))
    digest = "sha256:" + h.hexdigest()
    if sl.digest is not None and digest != sl.digest:
        raise ImageError(f"{archive.path}: layer {sl.name}: does not match its digest "
                         f"(expected {sl.digest}, got {digest})")
    return path, digest, n


def _file_digest(path: str) -> tuple[str, int]:
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            n += len(chunk)
    return "sha256:" + h.hexdigest(), n


def _add_layer(store: Store, archive: Archive, sl: SourceLayer, diff_id: str, on_read) -> tuple[str, int]:
    what = f"{archive.path}: layer {sl.name}"
    blob, digest, _ = _copy_blob(store, archive, sl, on_read)   # verified against sl.digest, if any
    digest, size = add_layer_blob(store, blob, digest, diff_id, what, on_read, checked=True)
    store.put_blob_file(digest, blob)
    return digest, size


def add_layer_blob(store: Store, blob_path: str, digest: str | None, diff_id: str, what: str,
                   on_read: Callable[[int], None] | None = None, checked: bool = False) -> tuple[str, int]:
    """Extract a layer blob file into the store as layer ``diff_id``: the blob is checked against
    ``digest`` (when known) before a byte of it is used, and the tar against ``diff_id`` while it is
    extracted; only then is the layer renamed into place.  Returns (digest, blob size); the blob
    file is left where it is.  ``checked``: the caller hashed the file already."""
    if digest is not None and not checked:  # verify the blob before a single byte of it is used
        actual, _ = _file_digest(blob_path)
        if actual != digest:
            raise ImageError(f"{what}: does not match its digest (expected {digest}, got {actual})")
    tmp = store.new_tmp_dir("layer")
    root = os.path.join(tmp, "root")
    os.mkdir(root, 0o755)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    style = Style.default()
    try:
        with open(blob_path, "rb") as blob:
            ex = extract_layer(blob, fd, what=what, style=style, devices=os.geteuid() == 0,
                               space=max(0, store.free_bytes() - (64 << 20)), on_read=on_read)
    finally:
        os.close(fd)
    if digest is not None and ex.digest != digest:
        raise ImageError(f"{what}: does not match its digest (expected {digest}, got {ex.digest})")
    check_diff_id(ex.diff_id, diff_id, what)
    store.commit_layer(tmp, diff_id, {
        "diff_id": diff_id, "digest": ex.digest, "size": ex.tar_size, "blob_size": ex.blob_size,
        "compression": ex.compression, "entries": ex.entries, "whiteout_style": style.value,
        "extracted": now_iso()})
    return ex.digest, ex.blob_size


def _docker_manifest(image_id: str, config_size: int, layers: list[Layer]) -> bytes:
    """A Docker v2 manifest for a source that ships none (docker save's legacy form)."""
    m = {"schemaVersion": 2, "mediaType": MEDIA_DOCKER_MANIFEST,
         "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "size": config_size,
                    "digest": image_id},
         "layers": [{"mediaType": ly.media_type, "size": ly.size, "digest": ly.digest} for ly in layers]}
    return json.dumps(m, indent=3).encode()
