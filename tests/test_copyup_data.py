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


def test_copy_up_without_o_tmpfile_builds_named_temps(tmp_path):
    """An upper filesystem without O_TMPFILE (FUSE, NFS; none here, so open_tmpfile is made to say
    so): copy-ups build named temps in work/ and rename them, on the loop and in the thread, single
    files and a hard link through the index, with the same upper tree as O_TMPFILE copy-ups, and
    nothing left in work/."""
    from inject import InjectedMount

    lower = tmp_path / "lower"
    lower.mkdir()
    (lower / "small").write_bytes(b"small data")
    os.chmod(lower / "small", 0o640)
    os.setxattr(lower / "small", "user.note", b"kept")
    big = os.urandom(COPY_OFF_LOOP * 9 + 12345)   # over two 4 MiB write-out chunks, and a tail
    (lower / "big").write_bytes(big)
    (lower / "linked").write_bytes(b"one inode")
    os.link(lower / "linked", lower / "other name")
    trees = []
    for kind in ("named temps", "O_TMPFILE"):
        upper, work, mnt = (tmp_path / kind / n for n in ("upper", "work", "mnt"))
        for d in (upper, work, mnt):
            d.mkdir(parents=True)
        spec = {"faults": [{"target": "unionfs.fs.sys:open_tmpfile", "returns": None, "when": "always"}]
                if kind == "named temps" else []}
        m = InjectedMount(mnt, [lower], upper, work, log=tmp_path / f"{kind}.log", spec=spec)
        m.start()
        try:
            os.chmod(mnt / "small", 0o600)                   # a copy-up on the loop
            with open(mnt / "big", "ab") as f:                # its data in the thread
                f.write(b"!")
            with open(mnt / "linked", "ab") as f:             # through the index
                f.write(b" and more")
            assert (mnt / "small").read_bytes() == b"small data"
            assert os.getxattr(mnt / "small", "user.note") == b"kept"
            assert (mnt / "big").read_bytes() == big + b"!"
            assert (mnt / "other name").read_bytes() == b"one inode and more"
            assert os.stat(mnt / "linked").st_nlink == 2
        finally:
            m.stop()
        assert m.log_errors() == []
        assert ("no O_TMPFILE" in m.log.read_text()) == (kind == "named temps")
        assert os.listdir(work / "work") == []
        trees.append({
            name: (oct(st.st_mode), st.st_nlink, (upper / name).read_bytes(), sorted(os.listxattr(upper / name)))
            for name in sorted(os.listdir(upper)) for st in [os.lstat(upper / name)]})
        trees[-1]["index"] = sorted((n, os.lstat(work / "index" / n).st_nlink) for n in os.listdir(work / "index"))
    assert trees[0] == trees[1]
    assert set(trees[0]) == {"small", "big", "linked", "index"}
    assert trees[0]["small"][0] == oct(0o100600) and trees[0]["small"][2] == b"small data"
    assert trees[0]["big"][2] == big + b"!"
    assert [n for _, n in trees[0]["index"]] == [2]   # the index entry and "linked"
