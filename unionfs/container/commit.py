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

import hashlib
import json
import os
import posixpath
import shlex
from dataclasses import dataclass

from ..image.load import add_layer_blob
from ..image.model import MEDIA_OCI_LAYER, ImageError, Layer, Reference
from ..image.save import image_manifest
from ..image.store import Store, now_iso
from . import model
from .changeset import write_changeset
from .commands import views
from .diff import changes
from .model import ContainerError

INSTRUCTIONS = ("CMD", "ENTRYPOINT", "ENV", "WORKDIR", "USER", "EXPOSE", "LABEL", "VOLUME")


@dataclass(frozen=True)
class Committed:
    image_id: str
    diff_id: str
    tag: str | None
    entries: int
    size: int
    skipped: tuple[str, ...]


# --- --change: Dockerfile instructions, as docker commit takes them -------------------

def _json_or_shell(text: str, what: str) -> list[str]:
    s = text.strip()
    if s.startswith("["):
        try:
            v = json.loads(s)
        except ValueError:
            v = None
        if isinstance(v, list) and all(isinstance(x, str) for x in v):
            return v
    if not s:
        raise ContainerError(f"--change {what}: needs an argument")
    return ["/bin/sh", "-c", s]


def _pairs(text: str, what: str) -> list[tuple[str, str]]:
    """``k=v k2="v 2"`` (or the legacy ``k v`` form for ENV/LABEL)."""
    try:
        words = shlex.split(text)
    except ValueError as e:
        raise ContainerError(f"--change {what}: {e}") from None
    if not words:
        raise ContainerError(f"--change {what}: needs an argument")
    if "=" not in words[0]:
        k, _, v = text.strip().partition(" ")
        return [(k, v.strip())]
    out = []
    for w in words:
        k, eq, v = w.partition("=")
        if not eq or not k:
            raise ContainerError(f"--change {what}: {w!r} is not KEY=VALUE")
        out.append((k, v))
    return out


def apply_change(cfg: dict, line: str) -> None:
    """Apply one Dockerfile instruction (CMD, ENTRYPOINT, ENV, WORKDIR, USER, EXPOSE, LABEL, VOLUME) to ``cfg``."""
    word, _, rest = line.strip().partition(" ")
    op = word.upper()
    rest = rest.strip()
    if op not in INSTRUCTIONS:
        raise ContainerError(f"--change {line!r}: unknown instruction {word!r} "
                             f"(supported: {', '.join(INSTRUCTIONS)})")
    if op == "CMD":
        cfg["Cmd"] = _json_or_shell(rest, op)
    elif op == "ENTRYPOINT":
        cfg["Entrypoint"] = _json_or_shell(rest, op)
    elif op == "ENV":
        env = list(cfg.get("Env") or [])
        for k, v in _pairs(rest, op):
            env = [e for e in env if e.partition("=")[0] != k] + [f"{k}={v}"]
        cfg["Env"] = env
    elif op == "LABEL":
        labels = dict(cfg.get("Labels") or {})
        labels.update(_pairs(rest, op))
        cfg["Labels"] = labels
    elif op == "WORKDIR":
        if not rest:
            raise ContainerError("--change WORKDIR: needs a path")
        cfg["WorkingDir"] = posixpath.normpath(posixpath.join(cfg.get("WorkingDir") or "/", rest))
    elif op == "USER":
        if not rest:
            raise ContainerError("--change USER: needs a user")
        cfg["User"] = rest
    elif op == "EXPOSE":
        ports = dict(cfg.get("ExposedPorts") or {})
        for p in rest.split():
            num, _, proto = p.partition("/")
            if not num.isdigit() or proto not in ("", "tcp", "udp", "sctp"):
                raise ContainerError(f"--change EXPOSE: {p!r} is not PORT[/tcp|udp|sctp]")
            ports[f"{int(num)}/{proto or 'tcp'}"] = {}
        if not ports:
            raise ContainerError("--change EXPOSE: needs a port")
        cfg["ExposedPorts"] = ports
    elif op == "VOLUME":
        vols = dict(cfg.get("Volumes") or {})
        s = rest.strip()
        paths = json.loads(s) if s.startswith("[") and _is_str_list(s) else s.split()
        if not paths:
            raise ContainerError("--change VOLUME: needs a path")
        for p in paths:
            vols[p] = {}
        cfg["Volumes"] = vols


def _is_str_list(s: str) -> bool:
    try:
        v = json.loads(s)
    except ValueError:
        return False
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def new_config(base: dict, diff_id: str, created_by: str, message: str, author: str | None,
               changes_: list[str]) -> dict:
    cfg = json.loads(json.dumps(base))   # a deep copy; unknown fields are kept
    created = now_iso()
    inner = dict(cfg.get("config") or {})
    for line in changes_:
        apply_change(inner, line)
    cfg["config"] = inner
    cfg["created"] = created
    if author:
        cfg["author"] = author
    else:
        cfg.pop("author", None)
    rootfs = dict(cfg.get("rootfs") or {"type": "layers", "diff_ids": []})
    base_ids = list(rootfs.get("diff_ids") or [])
    rootfs["diff_ids"] = base_ids + [diff_id]
    cfg["rootfs"] = rootfs
    history = [h for h in (cfg.get("history") or []) if isinstance(h, dict)]
    if sum(not h.get("empty_layer", False) for h in history) != len(base_ids):
        # No history, or one that does not match the layers: one plain entry per layer, so ours lines up.
        history = [{"created": base.get("created") or created, "created_by": ""} for _ in base_ids]
    entry = {"created": created, "created_by": created_by}
    if author:
        entry["author"] = author
    if message:
        entry["comment"] = message
    cfg["history"] = history + [entry]
    for k in ("container", "container_config"):   # Docker's: about the container a base was built in
        cfg.pop(k, None)
    return cfg


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
        tmp = store.new_tmp_dir("commit")
        tar_path = os.path.join(tmp, "layer.tar")
        with views(store, c) as (image_view, merged):
            ch = changes(c.upper, c.work, image_view, merged)
            with open(tar_path, "xb") as out:
                written = write_changeset(ch, merged, out)
                out.flush()
                os.fsync(out.fileno())
        diff_id = written.diff_id
        if not store.has_layer(diff_id):
            _add_layer(store, tar_path, diff_id, f"commit of {c.name or c.short_id}")
        blob = store.path("blobs", "sha256", diff_id[7:])
        if os.path.exists(blob):
            os.unlink(tar_path)
        else:
            os.rename(tar_path, blob)
        layers = list(image.layers) + [Layer(diff_id, diff_id, MEDIA_OCI_LAYER, written.size)]
        cfg = new_config(base, diff_id, f"unionfs commit {c.short_id}", message, author, change)
        config_bytes = json.dumps(cfg, indent=None, separators=(",", ":")).encode()
        image_id = "sha256:" + hashlib.sha256(config_bytes).hexdigest()
        manifest = image_manifest(store, image_id, len(config_bytes), layers)
        manifest_digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
        store.put_blob(image_id, config_bytes)
        store.put_blob(manifest_digest, manifest)
        store.put_image(image_id, manifest_digest, layers)
        if tag is not None:
            tags = store.tags()
            tags[str(tag)] = image_id
            store.set_tags(tags)
    return Committed(image_id, diff_id, str(tag) if tag else None, written.entries, written.size,
                     tuple(written.skipped))


def _add_layer(store: Store, tar_path: str, diff_id: str, what: str) -> None:
    """Extract the committed tar exactly as load does, checked against the diff_id we hashed."""
    try:
        add_layer_blob(store, tar_path, None, diff_id, what)
    except ImageError as e:
        raise ContainerError(str(e)) from None
