"""Copy-up of file data: holes stay holes, and a big file's data is copied in a thread while other
requests go on: readers of it and of other files get the right bytes all along, two writers
racing to copy up the same file get one copy-up with both their writes, and nothing is left in
the work dir.  Through real mounts; the timing of it is measured in scripts/bench ("readers' worst
wait in copy-up"), not here."""
from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest

from unionfs.fs.copyup import COPY_OFF_LOOP

MiB = 1 << 20


def _sparse(path: Path, size: int, pieces: list[tuple[int, bytes]]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        for off, data in pieces:
            os.pwrite(fd, data, off)
    finally:
        os.close(fd)


def _allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


@pytest.mark.parametrize("size", [COPY_OFF_LOOP * 8, COPY_OFF_LOOP // 2 + 12345], ids=["in-thread", "on-loop"])
def test_copy_up_keeps_holes_and_content(layers, union_mount, size):
    (lower,) = layers(1)
    up, wk = layers(2, prefix="rw")
    pieces = [(0, b"head" * 1024), (size // 3, os.urandom(65536)), (size - 1, b"Z")]
    _sparse(lower / "sparse", size, pieces)
    _sparse(lower / "hole-at-end", size, [(0, b"only the start")])
    want = (lower / "sparse").read_bytes() + b"!"
    m = union_mount([lower], up, wk)
    for name in ("sparse", "hole-at-end"):
        with open(m.mnt / name, "ab") as f:
            f.write(b"!")
    assert (m.mnt / "sparse").read_bytes() == want
    m.stop()
    assert (up / "sparse").read_bytes() == want
    assert (up / "hole-at-end").read_bytes() == b"only the start" + bytes(size - 14) + b"!"
    for name in ("sparse", "hole-at-end"):
        # As sparse as the lower file (a page or two more for the appended byte), not `size` bytes.
        assert _allocated(up / name) <= _allocated(lower / name) + 16384, name
        assert _allocated(up / name) < size // 2, name
    assert not os.listdir(wk / "work")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_readers_and_writers_during_a_big_copy_up(layers, union_mount):
    (lower,) = layers(1)
    up, wk = layers(2, prefix="rw")
    big = os.urandom(MiB) * 48 + os.urandom(MiB)   # 49 MiB: its data is copied in a thread
    (lower / "big").write_bytes(big)
    small = {f"s{i}": os.urandom(3000 + i) for i in range(40)}
    for name, data in small.items():
        (lower / name).write_bytes(data)
    m = union_mount([lower], up, wk)
    early = open(m.mnt / "big", "rb")   # open before the copy-up: follows the file up after it
    errors: list[str] = []
    start = threading.Barrier(5)

    def writer(mark: bytes) -> None:
        start.wait()
        with open(m.mnt / "big", "ab") as f:   # both race to copy it up
            f.write(mark)

    def read_big_fresh() -> None:
        start.wait()
        for _ in range(3):
            with open(m.mnt / "big", "rb") as f:
                head = f.read(len(big))
            if head != big[:len(head)] or len(head) < len(big):
                errors.append("a fresh reader of big read other bytes")

    def read_small() -> None:
        start.wait()
        for _ in range(5):
            for name, data in small.items():
                if (m.mnt / name).read_bytes() != data:
                    errors.append(f"{name} read other bytes")

    def read_early() -> None:
        start.wait()
        if _sha(early.read(len(big))) != _sha(big):
            errors.append("the reader opened before the copy-up read other bytes")

    threads = [threading.Thread(target=writer, args=(b"<one>",)), threading.Thread(target=writer, args=(b"<two>",)),
               threading.Thread(target=read_big_fresh), threading.Thread(target=read_small),
               threading.Thread(target=read_early)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    early.close()
    assert not errors, errors
    got = (m.mnt / "big").read_bytes()
    assert got[:len(big)] == big and sorted([got[len(big):len(big) + 5], got[len(big) + 5:]]) == [b"<one>", b"<two>"]
    m.stop()
    assert (up / "big").read_bytes() == got
    assert (lower / "big").read_bytes() == big
    assert not os.listdir(wk / "work")   # the racing writer's copy went, or was never made
