"""A stored layer read back for export, verified on the way out: as kept, or as a plain tar.

Owns what both writers (:mod:`.oci_layout`, :mod:`.docker_archive`) need of the store: a layer's
blob as shipped (checked against its diff_id first and its digest while copied) or decompressed
(checked against its diff_id while copied), and writing it once into a sink.  It knows no format's
names or manifests, and never writes to the store.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import BinaryIO, Callable

from .archive import Sink
from .compression import HashingReader, check_blob, decompressed, detect
from .model import Image, ImageError, Layer
from .store import Store

Opened = tuple[BinaryIO, int, Callable[[], None]]   # (stream, its size, close)


@dataclass(frozen=True)
class Selected:
    """An image to write."""
    image: Image
    tags: tuple[str, ...]   # the names to write it under
    name: str               # as the user gave it


def blob_compression(store: Store, layer: Layer) -> str | None:
    """How the layer's blob in the store is compressed (by its magic bytes); None if the blob is not kept."""
    try:
        with open(store.blob_path(layer.digest), "rb") as f:
            return detect(f.read(6))
    except FileNotFoundError:
        return None


def tar_size(store: Store, layer: Layer) -> int:
    """The size of the layer as a plain tar (recorded when it was extracted)."""
    return int(store.layer_info(layer.diff_id)["size"])


class _Checked(io.RawIOBase):
    """Reads ``size`` bytes from a stream, then insists it ended there and hashed to ``expect``."""

    def __init__(self, stream: HashingReader, size: int, expect: str, what: str) -> None:
        self.stream, self.left, self.expect, self.what = stream, size, expect, what

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if self.left <= 0:
            return b""
        n = self.left if n < 0 else min(n, self.left)
        data = self.stream.read(n)
        self.left -= len(data)
        if not data and self.left:
            raise ImageError(f"{self.what}: shorter than recorded ({self.left} bytes missing): store damaged?")
        if self.left == 0:
            if self.stream.read(1):
                raise ImageError(f"{self.what}: longer than recorded: store damaged?")
            if self.stream.digest != self.expect:
                raise ImageError(f"{self.what}: does not match {self.expect} (got {self.stream.digest}): "
                                 "store damaged?")
        return data

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)


def _open_blob(store: Store, img_name: str, layer: Layer) -> BinaryIO:
    try:
        return open(store.blob_path(layer.digest), "rb")
    except FileNotFoundError:
        raise ImageError(f"{img_name}: layer {layer.diff_id[:19]}: its blob is not in the store (kept since "
                         "images are loaded by this version): load or pull the image again") from None


def uncompressed(store: Store, img_name: str, layer: Layer) -> Opened:
    """The layer as a plain tar, verified against its diff_id while read."""
    f = _open_blob(store, img_name, layer)
    _, stream = decompressed(HashingReader(f))
    tar = HashingReader(stream)  # type: ignore[arg-type]
    size = tar_size(store, layer)
    return _Checked(tar, size, layer.diff_id, f"{img_name}: layer {layer.diff_id[:19]}"), size, f.close  # type: ignore[return-value]


def as_shipped(store: Store, img_name: str, layer: Layer) -> Opened:
    """The blob as kept, checked against its diff_id first and its digest as it is read."""
    f = _open_blob(store, img_name, layer)
    try:
        check_blob(store.blob_path(layer.digest), layer.digest, layer.diff_id,
                   f"{img_name}: layer blob {layer.digest[:19]} (store damaged?)")
    except BaseException:
        f.close()
        raise
    return _Checked(HashingReader(f), layer.size, layer.digest, f"{img_name}: layer blob {layer.digest[:19]}"), \
        layer.size, f.close  # type: ignore[return-value]


def add_layer_once(sink: Sink, name: str, opener: Callable[[Store, str, Layer], Opened], store: Store,
                   image_name: str, layer: Layer) -> None:
    """Add a layer under ``name`` unless an image written before shared it."""
    if sink.has(name):
        return
    stream, size, close = opener(store, image_name, layer)
    try:
        sink.add(name, stream, size)
    finally:
        close()
