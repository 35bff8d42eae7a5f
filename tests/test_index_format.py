"""The work dir's hard-link index in the kernel's own format, byte for byte, both ways.

Kernel overlayfs (index=on) and unionfs copy up the same lower hard link; the index entries they
write must have the same names and the same ``overlay.origin``/``overlay.nlink``, on a filesystem
with a uuid (tmpfs) and on one without (this machine's ext4).  An index of the form unionfs wrote
before (entries named by inode number) is migrated at mount, after which the kernel accepts it.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from container_images import store  # noqa: F401
from difftest import kernel_over
from helpers import diff_snapshots, mkdirs, overlay_mount, snapshot

KO_OPTS = "index=on,redirect_dir=on"


def _xattrs(path) -> dict[str, bytes]:
    return {n: os.getxattr(path, n, follow_symlinks=False) for n in os.listxattr(path, follow_symlinks=False)
            if n.startswith("trusted.overlay.")}


def _index(work) -> dict[str, dict[str, bytes]]:
    return {n: _xattrs(work / "index" / n) for n in os.listdir(work / "index")}


def _lower(lower) -> None:
    (lower / "d").mkdir()
    (lower / "a").write_bytes(b"linked")
    os.link(lower / "a", lower / "b")
    os.link(lower / "a", lower / "d/c")


@pytest.fixture(params=["ext4", "tmpfs"])
def base(request, tmp_path):
    if request.param == "ext4":
        yield tmp_path
        return
    where = tmp_path / "tmpfs"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(where)], check=True, timeout=30)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], timeout=30)


def test_index_entries_are_the_kernels_byte_for_byte(base, union_mount):
    lower, up_k, wk_k, up_u, wk_u, ko, ko2 = mkdirs(base, "lower", "up_k", "wk_k", "up_u", "wk_u", "ko", "ko2")
    _lower(lower)
    with overlay_mount(ko, [lower], up_k, wk_k, KO_OPTS):
        with open(ko / "a", "ab") as f:
            f.write(b"+")
        theirs = snapshot(ko)
    m = union_mount([lower], up_u, wk_u)
    with open(m.mnt / "a", "ab") as f:
        f.write(b"+")
    assert diff_snapshots(snapshot(m.mnt), theirs) == []
    m.stop()
    kernel_index, our_index = _index(wk_k), _index(wk_u)
    assert len(kernel_index) == 1
    assert our_index == kernel_index                          # names, origin, nlink
    assert _xattrs(up_u / "a") == _xattrs(up_k / "a")
    assert os.lstat(up_u / "a").st_nlink == os.lstat(up_k / "a").st_nlink == 2
    assert diff_snapshots(kernel_over(ko2, [lower], up_u, wk_u, KO_OPTS), theirs) == []


def test_index_of_the_old_form_is_migrated(tmp_path, union_mount):
    """Before the kernel's format, an entry was named by the hex of the merged inode number and kept
    the names still only in the lower layers in ``trusted.unionfs.origin`` (``lower=N``)."""
    lower, up, wk, ko, ko2, up_k, wk_k = mkdirs(tmp_path, "lower", "up", "wk", "ko", "ko2", "up_k", "wk_k")
    _lower(lower)
    ino = os.lstat(lower / "a").st_ino
    (wk / ".unionfs-work").touch()
    (wk / "work").mkdir()
    (wk / "index").mkdir()
    (up / "a").write_bytes(b"linked+")
    os.setxattr(up / "a", "trusted.unionfs.origin", b"ino=%d;lower=2" % ino)
    os.link(up / "a", wk / "index" / ("%x" % ino))
    with overlay_mount(ko, [lower], up_k, wk_k, KO_OPTS):  # the same change, made by the kernel
        with open(ko / "a", "ab") as f:
            f.write(b"+")
        theirs = snapshot(ko)
    m = union_mount([lower], up, wk)
    assert diff_snapshots(snapshot(m.mnt), theirs) == []
    assert os.lstat(m.mnt / "b").st_ino == os.lstat(m.mnt / "a").st_ino == ino
    m.stop()
    assert _index(wk) == _index(wk_k)
    assert diff_snapshots(kernel_over(ko2, [lower], up, wk, KO_OPTS), theirs) == []


def test_upper_hard_links_are_not_indexed_and_stay_reachable(tmp_path, union_mount):
    """A file made in the upper layer and linked: no index entry (overlayfs makes none, and counts
    the real links), and when the name we reached it by goes, the other name still answers."""
    lower, up, wk, ko = mkdirs(tmp_path, "lower", "up", "wk", "ko")
    (lower / "plain").write_bytes(b"one link")
    m = union_mount([lower], up, wk)
    (m.mnt / "new").write_bytes(b"new")
    os.link(m.mnt / "new", m.mnt / "new2")
    os.link(m.mnt / "plain", m.mnt / "plain2")          # a lower file with one link: copied up, not indexed
    fd = os.open(m.mnt / "new2", os.O_RDONLY)
    try:
        os.unlink(m.mnt / "new")                         # the name the inode was first known by
        assert os.fstat(fd).st_nlink == 1
        assert os.stat(m.mnt / "new2").st_nlink == 1     # served from the kernel's cached dentry
    finally:
        os.close(fd)
    os.chmod(m.mnt / "new2", 0o600)
    assert os.listdir(wk / "index") == []
    view = snapshot(m.mnt)
    m.stop()
    assert view["plain"][6] == view["plain2"][6] == 2
    assert diff_snapshots(kernel_over(ko, [lower], up, wk, KO_OPTS), view) == []


def test_container_written_by_kernel_overlayfs(store, tmp_path):  # noqa: F811
    """Switching mount_program on existing storage: a container changed through kernel overlayfs
    (index=on, its own index and work/work) has the same diff as one changed through us, and our
    mount shows what the kernel showed, hard links of the image included."""
    import glob
    import json

    from container_images import change_everything, mkdirs as cmkdirs, ok
    from test_container_workflow import EXPECTED_DIFF

    cid = ok(store, "create", "app:1", "--name", "k").strip()
    record = json.loads(open(glob.glob(str(store / "containers" / (cid[:12] + "*") / "container.json"))[0]).read())
    lower = json.loads(ok(store, "inspect", "app:1"))[0]["GraphDriver"]["Data"]["LowerDir"].split(":")
    ko, m = cmkdirs(tmp_path, "ko", "m")
    with overlay_mount(ko, [Path(p) for p in lower], Path(record["Upper"]), Path(record["Work"]), KO_OPTS):
        change_everything(ko)
        theirs = snapshot(ko, skip_unstatable=True)
    assert os.listdir(Path(record["Work"]) / "index")      # the kernel indexed the image's hard link
    assert ok(store, "diff", "k") == EXPECTED_DIFF
    ok(store, "mount", "k", str(m))
    try:
        assert diff_snapshots(snapshot(m), theirs) == []
    finally:
        ok(store, "umount", str(m))


def test_hard_linked_symlinks_and_fifos_are_indexed_too(tmp_path, union_mount):
    """overlayfs indexes every lower non-directory with several links, not only regular files."""
    lower, up_k, wk_k, up_u, wk_u, ko, ko2 = mkdirs(tmp_path, "lower", "up_k", "wk_k", "up_u", "wk_u", "ko", "ko2")
    os.symlink("target", lower / "s")
    os.link(lower / "s", lower / "s2", follow_symlinks=False)
    os.mkfifo(lower / "p")
    os.link(lower / "p", lower / "p2")

    def change(root):
        os.chown(root / "s", 1000, 1000, follow_symlinks=False)
        os.chmod(root / "p", 0o600)
        os.link(root / "p2", root / "p3")
        return snapshot(root)

    with overlay_mount(ko, [lower], up_k, wk_k, KO_OPTS):
        theirs = change(ko)
    m = union_mount([lower], up_u, wk_u)
    assert diff_snapshots(change(m.mnt), theirs) == []
    m.stop()
    assert theirs["s2"][2] == 1000 and theirs["p3"][6] == 3
    assert _index(wk_u) == _index(wk_k) and len(_index(wk_k)) == 2
    assert diff_snapshots(kernel_over(ko2, [lower], up_u, wk_u, KO_OPTS), theirs) == []
    m2 = union_mount([lower], up_k, wk_k)                  # and what the kernel wrote, through us
    assert diff_snapshots(snapshot(m2.mnt), theirs) == []


def test_upper_hard_link_reachable_by_a_name_looked_up_after_a_remount(tmp_path, union_mount):
    lower, up, wk = mkdirs(tmp_path, "lower", "up", "wk")
    (up / "a1").write_bytes(b"x")
    os.link(up / "a1", up / "a2")
    m = union_mount([lower], up, wk)
    os.stat(m.mnt / "a2")
    os.stat(m.mnt / "a1")                                # the inode is now reached by a1
    os.unlink(m.mnt / "a1")
    assert os.stat(m.mnt / "a2").st_nlink == 1           # the kernel's cached a2, the same inode
    os.chmod(m.mnt / "a2", 0o640)
    assert os.stat(up / "a2").st_mode & 0o777 == 0o640
