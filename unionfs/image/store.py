"""The local image store: content-addressed, shared layers, atomic writes, one writer at a time.

Layout of ``ROOT`` (``/var/lib/unionfs`` for root, ``$XDG_DATA_HOME/unionfs`` otherwise)::

    lock                          flock(2): held by whoever writes (load, tag, rmi, mount --writable)
    layers/<hex>/root/            an extracted layer, keyed by its diff_id, shared by every image using it
    layers/<hex>/layer.json       {diff_id, size, whiteout_style, entries, ...}
    blobs/sha256/<hex>            image configs, manifests and layer blobs, keyed by digest (the bytes as loaded)
    images/<hex>.json             an image: its manifest digest and layers (<hex> of the id, the config digest)
    repositories.json             tags: {"repo:tag": "sha256:<id>"}
    containers/<id>/              writable layers (upper/, work/) and container.json naming the image
    tmp/                          work in progress; emptied whenever the lock is taken
    downloads/sha256/<hex>[.partial]  blobs being pulled: kept across failed pulls so a pull resumes

Every file appears by ``rename(2)`` from a temporary name, and a layer directory is
renamed into ``layers/`` only after its diff_id was verified; an image record is
written after all its layers, and tags last.  Readers need no lock.  A writer that
dies leaves only ``tmp/`` entries and unreferenced layers, both removed by the next
writer when it takes the lock, so nothing is ever half-registered.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import sys
import time
import uuid
from contextlib import contextmanager
from typing import Iterator

from .model import Config, Image, ImageError, Layer, Reference, quote

ENV_ROOT = "UNIONFS_ROOT"


def default_root() -> str:
    if os.environ.get(ENV_ROOT):
        return os.environ[ENV_ROOT]
    if os.geteuid() == 0:
        return "/var/lib/unionfs"
    data = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(data, "unionfs")


def _hex(digest: str) -> str:
    return digest.split(":", 1)[1]


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class Store:
    def __init__(self, root: str | None = None) -> None:
        self.root = os.path.abspath(root or default_root())
        self._lock_fd: int | None = None

    def path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    # --- set-up and locking ----------------------------------------------------

    def exists(self) -> bool:
        return os.path.isdir(self.path("layers"))

    def ensure(self) -> None:
        """Create the layout (idempotent). The root is private: layers hold setuid files owned by others."""
        if os.path.exists(self.root) and not os.path.isdir(self.root):
            raise ImageError(f"store {self.root}: not a directory")
        try:
            os.makedirs(self.root, mode=0o700, exist_ok=True)
            for d in ("layers", "blobs/sha256", "images", "containers", "tmp", "downloads/sha256"):
                os.makedirs(self.path(d), mode=0o700, exist_ok=True)
        except OSError as e:
            raise ImageError(f"store {self.root}: {e.strerror}") from None

    @contextmanager
    def locked(self) -> Iterator["Store"]:
        """Hold the store's write lock; on entry, clean up after a writer that died."""
        self.ensure()
        fd = os.open(self.path("lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(f"unionfs: waiting for another unionfs writing to {self.root}", file=sys.stderr)
                fcntl.flock(fd, fcntl.LOCK_EX)
            self._lock_fd = fd
            self.cleanup()
            yield self
        finally:
            self._lock_fd = None
            os.close(fd)  # releases the lock

    def _require_lock(self) -> None:
        assert self._lock_fd is not None, "store writes need the lock"

    def cleanup(self) -> None:
        """Remove work in progress and unreferenced layers (after a writer died or an import failed)."""
        for name in os.listdir(self.path("tmp")):
            p = self.path("tmp", name)
            if os.path.isdir(p) and not os.path.islink(p):
                _rmtree(p)
            else:
                os.unlink(p)   # an atomic write or a blob copy that never got renamed
        self.gc()

    # --- atomic files ----------------------------------------------------------

    def _write_atomic(self, path: str, data: bytes) -> None:
        self._require_lock()
        tmp = self.path("tmp", f"file-{uuid.uuid4().hex}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)

    def _read_json(self, path: str, default=None):
        try:
            with open(path, "rb") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            if default is not None:
                return default
            raise

    def new_tmp_dir(self, prefix: str) -> str:
        self._require_lock()
        p = self.path("tmp", f"{prefix}-{uuid.uuid4().hex}")
        os.mkdir(p, 0o700)
        return p

    def free_bytes(self) -> int:
        st = os.statvfs(self.path("tmp"))
        return st.f_bavail * st.f_frsize

    # --- layers ------------------------------------------------------------------

    def layer_dir(self, diff_id: str) -> str:
        return self.path("layers", _hex(diff_id))

    def layer_root(self, diff_id: str) -> str:
        return os.path.join(self.layer_dir(diff_id), "root")

    def has_layer(self, diff_id: str) -> bool:
        return os.path.exists(os.path.join(self.layer_dir(diff_id), "layer.json"))

    def layer_info(self, diff_id: str) -> dict:
        try:
            return self._read_json(os.path.join(self.layer_dir(diff_id), "layer.json"))
        except FileNotFoundError:
            raise ImageError(f"store {self.root}: layer {diff_id} is missing (store damaged?)") from None

    def commit_layer(self, tmp_dir: str, diff_id: str, info: dict) -> None:
        """Register an extracted, verified layer: ``tmp_dir`` holds ``root/``; one rename makes it visible."""
        self._require_lock()
        with open(os.path.join(tmp_dir, "layer.json"), "w") as f:
            json.dump(info, f, indent=1)
        try:
            os.rename(tmp_dir, self.layer_dir(diff_id))
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            _rmtree(tmp_dir)  # already there (same content, by its diff_id)

    def lower_dirs(self, diff_ids: list[str] | tuple[str, ...]) -> list[str]:
        """An image's layer directories as a lower stack, topmost first, each directory once.

        Images may list a layer twice (Docker's old builders wrote the same empty layer for steps
        that changed nothing); a directory is not allowed twice in a stack (kernel overlayfs:
        "conflicting lowerdir path", ELOOP), so only its topmost occurrence is kept.  That is exact:
        whatever the lower occurrence holds (entries, whiteouts, opaque markers) the upper one
        already applied to everything below it, and extracted layers carry no redirects.  For base-first
        L1, L2, L1 the stack is L1:L2 (L1's content wins over L2's), not L2:L1.
        """
        return [self.layer_root(d) for d in dict.fromkeys(reversed(diff_ids))]

    def layer_ids(self) -> list[str]:
        return ["sha256:" + n for n in os.listdir(self.path("layers")) if len(n) == 64]

    # --- blobs, images, tags -------------------------------------------------------

    def put_blob(self, digest: str, data: bytes) -> None:
        p = self.path("blobs", "sha256", _hex(digest))
        if not os.path.exists(p):
            self._write_atomic(p, data)

    def blob_path(self, digest: str) -> str:
        return self.path("blobs", "sha256", _hex(digest))

    def has_blob(self, digest: str) -> bool:
        return os.path.exists(self.blob_path(digest))

    def put_blob_file(self, digest: str, path: str) -> None:
        """Move a verified blob file (in tmp/ or downloads/, same filesystem) into ``blobs/``."""
        self._require_lock()
        if self.has_blob(digest):
            os.unlink(path)
        else:
            os.rename(path, self.blob_path(digest))

    def blob(self, digest: str) -> bytes:
        with open(self.path("blobs", "sha256", _hex(digest)), "rb") as f:
            return f.read()

    def put_image(self, image_id: str, manifest_digest: str, layers: list[Layer],
                  repo_digests: list[str] | tuple[str, ...] = ()) -> bool:
        """Write an image record, or add ``repo_digests`` (``repo@sha256:...``) to the one there.

        A record is immutable once written: the same id is the same config, so the same diff_ids,
        and its layer blobs were verified against them; a later load or pull of that id (maybe with
        other compression) changes nothing but the repo digests.  Only a record whose blobs are
        gone (written by an older unionfs, which kept none) is replaced.  True if written anew."""
        path = self.path("images", _hex(image_id) + ".json")
        try:
            old = self._read_json(path)
        except FileNotFoundError:
            old = None
        if old is not None and all(self.has_blob(d["digest"]) for d in old["layers"]) \
                and self.has_blob(old["manifest"]):
            record = dict(old, repo_digests=sorted(set(old.get("repo_digests", [])) | set(repo_digests)))
            if record != old:
                self._write_atomic(path, json.dumps(record, indent=1).encode())
            return False
        kept = old.get("repo_digests", []) if old is not None else []
        record = {"id": image_id, "manifest": manifest_digest, "layers": [ly.to_json() for ly in layers],
                  "loaded": now_iso(), "repo_digests": sorted(set(kept) | set(repo_digests))}
        self._write_atomic(path, json.dumps(record, indent=1).encode())
        return True

    def verified_blob(self, diff_id: str, digest: str) -> bool:
        """Is ``digest`` a blob in the store already known to hold layer ``diff_id``?  (The blob the
        layer was extracted from, a plain tar, or a blob an image record lists for it.)"""
        if not self.has_blob(digest) or not self.has_layer(diff_id):
            return False
        if digest == diff_id or self.layer_info(diff_id).get("digest") == digest:
            return True
        for image_id in self.image_ids():
            rec = self._read_json(self.path("images", _hex(image_id) + ".json"))
            if any(d["diff_id"] == diff_id and d["digest"] == digest for d in rec["layers"]):
                return True
        return False

    def image_ids(self) -> list[str]:
        if not self.exists():
            return []
        return sorted("sha256:" + n[:-5] for n in os.listdir(self.path("images")) if n.endswith(".json"))

    def image(self, image_id: str) -> Image:
        rec = self._read_json(self.path("images", _hex(image_id) + ".json"))
        config = Config.parse(self.blob(image_id), f"config of {image_id}")
        layers = tuple(Layer.from_json(d) for d in rec["layers"])
        tags = tuple(sorted(t for t, i in self.tags().items() if i == image_id))
        sizes = tuple(int(self.layer_info(ly.diff_id).get("size", 0)) for ly in layers)
        return Image(image_id, rec["manifest"], layers, config, tags, sizes, tuple(rec.get("repo_digests", ())))

    def tags(self) -> dict[str, str]:
        if not self.exists():
            return {}
        return self._read_json(self.path("repositories.json"), {})

    def set_tags(self, tags: dict[str, str]) -> None:
        self._write_atomic(self.path("repositories.json"), json.dumps(tags, indent=1, sort_keys=True).encode())

    def resolve(self, name: str) -> str:
        """An image id from ``repo[:tag]``, a full id (``sha256:...`` or hex) or a unique id prefix."""
        ids = self.image_ids()
        text = name[len("sha256:"):] if name.startswith("sha256:") else name
        ref = None
        try:
            ref = Reference.parse(name)
        except ImageError:
            pass
        if ref is not None:
            found = self.tags().get(str(ref))
            if found:
                return found
        if text and all(c in "0123456789abcdef" for c in text):
            matches = [i for i in ids if _hex(i).startswith(text)]
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                raise ImageError(f"{quote(name)}: ambiguous id prefix ({len(matches)} images match)")
        if ref is None:
            Reference.parse(name)  # raises the precise reason
        raise ImageError(f"{quote(name)}: no such image")

    def remove_image(self, image_id: str) -> None:
        self._require_lock()
        self.set_tags({t: i for t, i in self.tags().items() if i != image_id})
        os.unlink(self.path("images", _hex(image_id) + ".json"))
        with contextlib.suppress(FileNotFoundError):   # its prefetch list (image.prefetch), if recorded
            os.unlink(self.path("images", _hex(image_id) + ".prefetch"))

    # --- garbage collection ----------------------------------------------------------

    def referenced(self) -> tuple[set[str], set[str]]:
        """(diff_ids, blob digests) that some image uses."""
        layers, blobs = set(), set()
        for image_id in self.image_ids():
            rec = self._read_json(self.path("images", _hex(image_id) + ".json"))
            blobs.update((image_id, rec["manifest"]))
            blobs.update(d["digest"] for d in rec["layers"])   # layer blobs as shipped, for push
            layers.update(d["diff_id"] for d in rec["layers"])
        return layers, blobs

    def gc(self) -> list[str]:
        """Remove layers and blobs no image references; each is unregistered by one rename first."""
        self._require_lock()
        used_layers, used_blobs = self.referenced()
        removed = []
        for diff_id in self.layer_ids():
            if diff_id not in used_layers:
                self.discard(self.layer_dir(diff_id))
                removed.append(diff_id)
        for name in os.listdir(self.path("blobs", "sha256")):
            if "sha256:" + name not in used_blobs:
                os.unlink(self.path("blobs", "sha256", name))
        return removed

    def discard(self, path: str) -> None:
        """Remove a tree of the store: unregistered by one rename into ``tmp/`` first, so a crash
        midway leaves only ``tmp/`` (cleaned by the next writer), never half a layer or container."""
        self._require_lock()
        doomed = self.path("tmp", f"gc-{uuid.uuid4().hex}")
        os.rename(path, doomed)
        _rmtree(doomed)


def _rmtree(path: str) -> None:
    """Remove a tree (symlinks are removed, never followed); as non-root, make dirs writable first."""
    def onerror(func, p, exc_info):
        if isinstance(exc_info[1], PermissionError) and os.geteuid() != 0:
            parent = os.path.dirname(p)
            os.chmod(parent, 0o700)
            func(p)
        else:
            raise exc_info[1]
    shutil.rmtree(path, onerror=onerror)
