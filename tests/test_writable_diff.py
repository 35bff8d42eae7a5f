"""Differential test: random operations on kernel overlayfs (index=on,redirect_dir=on) and on unionfs."""
from __future__ import annotations

import os
import shutil

import pytest

from difftest import (Generator, apply, build_lower, fuse_overlayfs, inode_numbers, kernel_numbers_over, kernel_over,
                      run_sequence)
from helpers import diff_snapshots, mkdirs, overlay_mount, snapshot

SEEDS = int(os.environ.get("UNIONFS_DIFF_SEEDS", "24"))
STEPS = int(os.environ.get("UNIONFS_DIFF_STEPS", "120"))
KO_OPTS = "index=on,redirect_dir=on"


@pytest.mark.parametrize("seed", range(SEEDS))
def test_random_operations_match_kernel(tmp_path, union_mount, seed):
    top, bottom, up_k, wk_k, up_u, wk_u, ko, ko2 = mkdirs(
        tmp_path, "top", "bottom", "up_k", "wk_k", "up_u", "wk_u", "ko", "ko2")
    initial = build_lower(top, bottom)
    gen = Generator(seed, initial)
    log = []
    with overlay_mount(ko, [top, bottom], up_k, wk_k, KO_OPTS):
        m = union_mount([top, bottom], up_u, wk_u)
        for step in range(STEPS):
            op, args = gen.next()
            want = apply(str(ko), op, args)
            got = apply(str(m.mnt), op, args)
            log.append(f"{step}: {op}{args} -> {want}")
            assert got == want, "\n".join(log[-15:]) + f"\nunionfs gave {got}"
        theirs = snapshot(ko, skip_unstatable=True)
        ours = snapshot(m.mnt)
        assert diff_snapshots(ours, theirs) == [], "\n".join(log)
        # The same upper dir, mounted again: the same tree.
        m.stop()
        m2 = union_mount([top, bottom], up_u, wk_u)
        assert diff_snapshots(snapshot(m2.mnt), theirs) == [], "after remount"
        m2.stop()
    # Our mount over the upper and work dir kernel overlayfs wrote (its index, its work/work).
    mk = union_mount([top, bottom], up_k, wk_k)
    assert diff_snapshots(snapshot(mk.mnt), theirs) == [], "unionfs over kernel overlayfs's upper and work dir"
    mk.stop()
    # Kernel overlayfs with index=on over our upper *and work* dir accepts them and shows our tree:
    # link counts and hard-link groups included (our index is the kernel's).
    over_ours = kernel_over(ko2, [top, bottom], up_u, wk_u, KO_OPTS)
    assert diff_snapshots(over_ours, theirs) == [], "kernel overlayfs over our upper and work dir"
    # And we read what it left there (its index, its work/work, the xattrs it adds at mount).
    m3 = union_mount([top, bottom], up_u, wk_u)
    assert diff_snapshots(snapshot(m3.mnt), theirs) == [], "after kernel overlayfs mounted our dirs"
    # Both number every object alike (copy-ups carry overlay.origin, their dirs overlay.impure).
    ours_ino = inode_numbers(m3.mnt)
    m3.stop()
    kernel_ino = kernel_numbers_over(ko2, [top, bottom], up_u, wk_u, KO_OPTS)
    assert {p: (n, kernel_ino.get(p)) for p, n in ours_ino.items() if n != kernel_ino.get(p)} == {}


@pytest.mark.skipif(shutil.which("fuse-overlayfs") is None, reason="fuse-overlayfs is not installed")
@pytest.mark.parametrize("seed", range(4))
def test_mount_over_what_fuse_overlayfs_wrote(tmp_path, union_mount, seed):
    """Switching mount_program on existing storage: fuse-overlayfs's upper and work dir, mounted by
    us, show what fuse-overlayfs itself shows when it mounts them again."""
    top, bottom, up, wk, fo, fo2 = mkdirs(tmp_path, "top", "bottom", "up", "wk", "fo", "fo2")
    initial = build_lower(top, bottom)
    with fuse_overlayfs(fo, [top, bottom], up, wk):
        run_sequence(fo, seed, initial, STEPS)
    with fuse_overlayfs(fo2, [top, bottom], up, wk):
        theirs = snapshot(fo2, skip_unstatable=True)
    m = union_mount([top, bottom], up, wk)
    ours = snapshot(m.mnt)
    # fuse-overlayfs counts the links of an upper file by the names it has looked up (a fifo with
    # three names in the upper dir, all shown, has st_nlink 2 there); the real count is ours.
    assert diff_snapshots(_no_nlink(ours), _no_nlink(theirs)) == []
    assert ours["<hardlinks>"] == theirs["<hardlinks>"]
    m.stop()
    with fuse_overlayfs(fo2, [top, bottom], up, wk):  # and fuse-overlayfs still takes them back
        assert diff_snapshots(_no_nlink(snapshot(fo2, skip_unstatable=True)), _no_nlink(theirs)) == []


def _no_nlink(snap: dict) -> dict:
    return {k: v if k.startswith("<") else v[:6] + (None,) + v[7:] for k, v in snap.items()}
