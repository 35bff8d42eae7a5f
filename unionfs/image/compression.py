"""Layer blobs as streams: decompression chosen by magic bytes, and hashing while reading.

A layer is verified twice on the way in: the blob as shipped against its
``digest`` and the uncompressed tar against its ``diff_id``.  Both hashes are
computed on the streams the extractor reads anyway, so a layer is read once.
"""
from __future__ import annotations

import bz2
import gzip
import hashlib
import lzma
import zlib
from typing import BinaryIO, Callable

import zstandard

from .model import ImageError

MAGIC = {
    b"\x1f\x8b": "gzip",
    b"\x28\xb5\x2f\xfd": "zstd",
    b"BZh": "bzip2",
    b"\xfd7zXZ\x00": "xz",
}


class HashingReader:
    """A read-only stream that hashes (sha256) and counts every byte read through it."""

    def __init__(self, raw: BinaryIO, on_read: Callable[[int], None] | None = None) -> None:
        self.raw = raw
        self.hash = hashlib.sha256()
        self.count = 0
        self.on_read = on_read
        self._peeked = b""

    def peek(self, n: int) -> bytes:
        """The first ``n`` bytes, without consuming them (only before the first read)."""
        while len(self._peeked) < n:
            chunk = self.raw.read(n - len(self._peeked))
            if not chunk:
                break
            self._peeked += chunk
        return self._peeked[:n]

    def read(self, n: int = -1) -> bytes:
        if self._peeked:
            head, self._peeked = (self._peeked, b"") if n < 0 or n >= len(self._peeked) \
                else (self._peeked[:n], self._peeked[n:])
            rest = b"" if n >= 0 and len(head) >= n else self.raw.read(-1 if n < 0 else n - len(head))
            data = head + rest
        else:
            data = self.raw.read(n)
        self.hash.update(data)
        self.count += len(data)
        if self.on_read and data:
            self.on_read(len(data))
        return data

    def readable(self) -> bool:
        return True

    def drain(self) -> None:
        """Read to the end, so the hash covers the whole stream (trailing padding included)."""
        while self.read(1 << 20):
            pass

    @property
    def digest(self) -> str:
        return "sha256:" + self.hash.hexdigest()


def detect(head: bytes) -> str:
    for magic, name in MAGIC.items():
        if head.startswith(magic):
            return name
    if len(head) >= 4 and head[1:4] == b"\x2a\x4d\x18" and head[0] & 0xF0 == 0x50:
        return "zstd"   # a skippable frame first, as pzstd writes
    return "plain"


def decompressed(blob: HashingReader) -> tuple[str, BinaryIO]:
    """(compression name, a stream of the uncompressed bytes of ``blob``)."""
    kind = detect(blob.peek(6))
    if kind == "gzip":
        return kind, gzip.GzipFile(fileobj=blob, mode="rb")  # type: ignore[arg-type]
    if kind == "zstd":
        return kind, zstandard.ZstdDecompressor().stream_reader(blob, read_across_frames=True)  # type: ignore[arg-type]
    if kind == "bzip2":
        return kind, bz2.BZ2File(blob, "rb")  # type: ignore[arg-type]
    if kind == "xz":
        return kind, lzma.LZMAFile(blob, "rb")  # type: ignore[arg-type]
    return kind, blob  # type: ignore[return-value]


DECOMPRESS_ERRORS: tuple[type[BaseException], ...] = (
    OSError, EOFError, zlib.error, zstandard.ZstdError, lzma.LZMAError, gzip.BadGzipFile)


def corrupt(what: str, e: BaseException) -> ImageError:
    return ImageError(f"{what}: corrupt or truncated data ({e.__class__.__name__}: {e})")


def blob_hashes(blob: BinaryIO, what: str) -> tuple[str, str, int]:
    """(digest, diff_id, size) of a layer blob: its sha256 as shipped and of its uncompressed tar,
    read once without extracting anything (a blob is checked against a layer already in the store)."""
    raw = HashingReader(blob)
    try:
        _, stream = decompressed(raw)
        tar = HashingReader(stream)  # type: ignore[arg-type]
        tar.drain()
        raw.drain()
    except DECOMPRESS_ERRORS as e:
        raise corrupt(what, e) from None
    return raw.digest, tar.digest, raw.count


def check_blob(path: str, digest: str | None, diff_id: str, what: str) -> None:
    """A layer blob file is what it claims: its sha256 is ``digest`` (when known) and its uncompressed
    content is ``diff_id``.  For blobs of layers the store has extracted already, and before
    ``save`` or ``push`` send a blob as kept."""
    with open(path, "rb") as f:
        actual, actual_diff_id, _ = blob_hashes(f, what)
    if digest is not None and actual != digest:
        raise ImageError(f"{what}: does not match its digest (expected {digest}, got {actual})")
    check_diff_id(actual_diff_id, diff_id, what)


def check_diff_id(actual: str, diff_id: str, what: str, hint: str = "") -> None:
    """The uncompressed content read (``actual``) is the layer the config names."""
    if actual != diff_id:
        raise ImageError(f"{what}: uncompressed content does not match the config's diff_id "
                         f"(expected {diff_id}, got {actual}{hint})")
