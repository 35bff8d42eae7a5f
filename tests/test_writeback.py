"""Writes with the kernel's writeback cache (on by default) and without it (``writeback=0``): the same
bytes, sizes and times as kernel overlayfs over the same lower layer, for the cases the cache
changes: O_APPEND placed by the kernel, partial pages the kernel fills by reading first, mmap
writes, truncation under an open file, explicit times set while dirty; and the size and mtime the
kernel kept reach the upper file.  (Setuid clearing and ``touch`` by a non-owner under the cache:
tests/test_permissions.py, which runs with the default.)"""
from __future__ import annotations

import mmap
import os
from pathlib import Path

import pytest

from helpers import overlay_mount

OLD = 1_000_000_000 * 1_000_000   # the lower files' times, long ago (ns)
RAND = bytes((i * 7919 + 13) % 251 for i in range(10_000))


def _lower(lower: Path) -> None:
    for name in ("append", "partial", "mmap", "trunc", "times", "wronly"):
        (lower / name).write_bytes(RAND)
        os.utime(lower / name, ns=(OLD, OLD))


def _append_two_fds(root: Path) -> None:
    a = os.open(root / "append", os.O_WRONLY | os.O_APPEND)
    b = os.open(root / "append", os.O_WRONLY | os.O_APPEND)
    try:
        for i in range(50):
            os.write(a if i % 2 else b, f"<{i}:{'x' * (i * 37 % 300)}>".encode())
            if i == 20:
                os.pwrite(a, b"PWRITE-IGNORES-OFFSET", 0)   # O_APPEND: Linux appends it anyway
    finally:
        os.close(a)
        os.close(b)
    with open(root / "new-append", "ab") as f:   # a new file, appended to after reopening
        f.write(b"first")
    with open(root / "new-append", "ab") as f:
        f.write(b"+second")


def _partial_pages(root: Path) -> None:
    fd = os.open(root / "partial", os.O_WRONLY)
    try:
        os.pwrite(fd, b"abc", 5000)             # inside a page: the rest of it comes from the file
        os.pwrite(fd, b"0123456789", 4091)      # across a page boundary
        os.pwrite(fd, b"end", 20_000)           # past the end: a gap of zeros
    finally:
        os.close(fd)


def _mmap_write(root: Path) -> None:
    with open(root / "mmap", "r+b") as f:
        with mmap.mmap(f.fileno(), 0) as m:
            m[100:105] = b"MMAP1"
            m[6000:6005] = b"MMAP2"
            m.flush()
    with open(root / "mmap", "r+b") as f:   # the pages written back, then changed again and unmapped
        m = mmap.mmap(f.fileno(), 0)
    m[9000:9003] = b"END"
    m.close()


def _truncate_open(root: Path) -> None:
    fd = os.open(root / "trunc", os.O_RDWR)
    try:
        os.write(fd, b"head")
        os.ftruncate(fd, 3000)
        os.pwrite(fd, b"tail", 5000)
        os.truncate(root / "trunc", 4500)       # by name, the file still open and dirty
    finally:
        os.close(fd)


def _times_while_dirty(root: Path) -> None:
    fd = os.open(root / "times", os.O_WRONLY)
    try:
        os.write(fd, b"dirty")
        os.utime(root / "times", ns=(100_000_000_123, 200_000_000_456))   # the kernel must not overwrite it
    finally:
        os.close(fd)
    with open(root / "wronly", "wb") as f:   # O_WRONLY|O_TRUNC: a write open the kernel may read through
        f.write(RAND[:1234])


def _run(root: Path) -> dict:
    _append_two_fds(root)
    _partial_pages(root)
    _mmap_write(root)
    _truncate_open(root)
    _times_while_dirty(root)
    out = {}
    for name in ("append", "new-append", "partial", "mmap", "trunc", "times", "wronly"):
        st = os.stat(root / name)
        out[name] = ((root / name).read_bytes(), st.st_size, st.st_mtime_ns if name == "times" else
                     st.st_mtime_ns > OLD)
    return out


@pytest.mark.parametrize("writeback", ["writeback=1", "writeback=0"])
def test_writes_match_kernel_overlayfs(tmp_path, layers, union_mount, writeback):
    (lower,) = layers(1)
    _lower(lower)
    up, wk, kup, kwk = layers(4, prefix="rw")
    m = union_mount([lower], up, wk, options=[writeback])
    ours = _run(m.mnt)
    seen = {n: os.stat(m.mnt / n) for n in ours}
    m.stop()
    ko = tmp_path / "ko"
    ko.mkdir()
    with overlay_mount(ko, [lower], kup, kwk, extra="index=on,redirect_dir=on"):
        theirs = _run(ko)
    assert ours == theirs
    assert ours["times"][2] == 200_000_000_456
    for name, st in seen.items():
        # What the mount showed (the kernel's size and mtime, under the cache) is what reached the disk.
        real = os.stat(up / name)
        assert (real.st_size, real.st_mtime_ns) == (st.st_size, st.st_mtime_ns), name
    assert (lower / "append").read_bytes() == RAND   # the lower layer untouched
