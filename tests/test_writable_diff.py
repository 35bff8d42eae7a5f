"""Differential test: random operations on kernel overlayfs (index=on,redirect_dir=on) and on unionfs."""
from __future__ import annotations

import os

import pytest

from difftest import Generator, apply, build_lower, kernel_over
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
    # Kernel overlayfs with index=on over our upper *and work* dir accepts them and shows our tree:
    # link counts and hard-link groups included (our index is the kernel's).
    over_ours = kernel_over(ko2, [top, bottom], up_u, wk_u, KO_OPTS)
    assert diff_snapshots(over_ours, theirs) == [], "kernel overlayfs over our upper and work dir"
    # And we read what it left there (its index, its work/work, the xattrs it adds at mount).
    m3 = union_mount([top, bottom], up_u, wk_u)
    assert diff_snapshots(snapshot(m3.mnt), theirs) == [], "after kernel overlayfs mounted our dirs"
