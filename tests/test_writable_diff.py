"""Differential test: random operations on kernel overlayfs (index=on,redirect_dir=on) and on unionfs."""
from __future__ import annotations

import os

import pytest

from difftest import Generator, apply, build_lower
from helpers import diff_snapshots, mkdirs, overlay_mount, snapshot

SEEDS = int(os.environ.get("UNIONFS_DIFF_SEEDS", "24"))
STEPS = int(os.environ.get("UNIONFS_DIFF_STEPS", "120"))
KO_OPTS = "index=on,redirect_dir=on"


def _without_our_xattrs(rec: tuple) -> tuple:
    """Our bookkeeping xattr (origin inode, link count) is visible to the kernel, not to our users."""
    *head, xattrs = rec
    if b"lower=" in xattrs.get("trusted.unionfs.origin", b""):
        head[6] = None  # an indexed inode: its merged link count is ours, the kernel counts the index too
    return (*head, {k: v for k, v in xattrs.items() if not k.startswith("trusted.unionfs.")})


def _hardlinked(snap: dict) -> set[str]:
    return {name for group in snap.get("<hardlinks>", []) for name in group}


@pytest.mark.parametrize("seed", range(SEEDS))
def test_random_operations_match_kernel(tmp_path, union_mount, seed):
    top, bottom, up_k, wk_k, up_u, wk_u, ko, ko2, wk2 = mkdirs(
        tmp_path, "top", "bottom", "up_k", "wk_k", "up_u", "wk_u", "ko", "ko2", "wk2")
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
    # Kernel overlayfs over our upper dir shows our tree (our hard-link index is ours alone:
    # names of lower hard links not copied up are left out of that comparison).
    with overlay_mount(ko2, [top, bottom], up_u, wk2, "redirect_dir=on,index=off"):
        over_ours = snapshot(ko2, skip_unstatable=True)
    lower_links = {p for p in theirs if not os.path.lexists(up_u / p) and any(
        os.path.isfile(layer / p) and not os.path.islink(layer / p) and os.lstat(layer / p).st_nlink > 1
        for layer in (top, bottom))}
    skip = _hardlinked(theirs) | lower_links | {"<hardlinks>"}
    a = {k: _without_our_xattrs(v) for k, v in over_ours.items() if k not in skip}
    indexed = {k for k, v in a.items() if v[6] is None}
    b = {k: _without_our_xattrs(v) for k, v in theirs.items() if k not in skip}
    b = {k: (v[:6] + (None,) + v[7:]) if k in indexed else v for k, v in b.items()}
    assert diff_snapshots(a, b) == []
