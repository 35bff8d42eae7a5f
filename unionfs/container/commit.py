"""``unionfs commit``: a container's writable layer becomes a new image.

1. The changes (:mod:`unionfs.container.diff`) are written as an OCI changeset
   tar (:mod:`unionfs.container.changeset`) into the store's ``tmp/``, hashed on
   the way: its sha256 is the new layer's diff_id.
2. That tar is extracted with the same extractor ``load`` uses
   (:func:`unionfs.image.extract.extract_layer`, whiteouts in overlayfs's format)
   and registered as layer ``diff_id``: so the new image's layers are exactly
   what loading the tar elsewhere would give, and the image mounts back to the
   container's view.  The tar itself is kept as the layer's blob (uncompressed,
   ``application/vnd.oci.image.layer.v1.tar``, digest = diff_id) for ``save``.
3. The new config is the image's config (unknown fields kept) with the new
   diff_id, a history entry, a new ``created``, ``--author``, ``-m`` as the
   history comment and the ``--change`` instructions applied; its digest is the
   new image id.  A manifest is written and the image recorded; the tag last.

The whole commit holds the store's lock.  A container that is not mounted is
read through the union rules in this process (which also locks its writable
layer against a mount meanwhile); a mounted one is read through its mount point,
so what it sees is what is committed — but nothing stops the processes using it
from changing files while they are read: commit a mounted container when it is
quiet (or unmount it) if you need a consistent snapshot.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

from ..image.load import add_layer_tar, register_config
from ..image.model import Layer, Reference
from ..image.mutate import apply_change, new_config
from ..image.store import Store
from . import model
from .changeset import Written, write_changeset
from .commands import views
from .diff import changes

@dataclass(frozen=True)
class Committed:
    image_id: str
    diff_id: str
    tag: str | None
    entries: int
    size: int
    skipped: tuple[str, ...]


# --- commit -----------------------------------------------------------------

def commit(store: Store, name: str, ref: str | None = None, message: str = "", author: str | None = None,
           change: list[str] | None = None) -> Committed:
    tag = Reference.parse(ref) if ref else None
    change = list(change or [])
    for line in change:   # refuse a bad --change before anything is written
        apply_change({}, line)
    with store.locked():
        c = model.resolve(store, name)
        base = json.loads(store.blob(c.image))
        image = store.image(c.image)
        ly, written = container_layer(store, c)
        layers = list(image.layers) + [ly]
        diff_id = ly.diff_id
        cfg = new_config(base, diff_id, f"unionfs commit {c.short_id}", message, author, change)
        image_id = register_config(store, cfg, layers)
        if tag is not None:
            tags = store.tags()
            tags[str(tag)] = image_id
            store.set_tags(tags)
    return Committed(image_id, diff_id, str(tag) if tag else None, written.entries, written.size,
                     tuple(written.skipped))


def container_layer(store: Store, c: model.Container, skip_empty: bool = False,
                    clamp_mtime: int | None = None) -> tuple[Layer | None, "Written"]:
    """The container's changes as a new layer of the store (the caller holds the lock); with
    ``skip_empty``, None when nothing changed (a build step that adds no layer)."""
    tmp = store.new_tmp_dir("commit")
    tar_path = os.path.join(tmp, "layer.tar")
    with views(store, c) as (image_view, merged):
        ch = changes(c.upper, c.work, image_view, merged)
        if skip_empty and not ch.kinds and not ch.replaced:
            return None, Written("", 0, 0)
        with open(tar_path, "xb") as out:
            written = write_changeset(ch, merged, out, clamp_mtime)
            out.flush()
            os.fsync(out.fileno())
    return add_layer_tar(store, tar_path, written.diff_id, written.size, f"commit of {c.name or c.short_id}"), written
