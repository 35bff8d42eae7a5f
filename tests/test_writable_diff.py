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


def _without_our_xattrs(rec: tuple) -> tuple:
    """Our bookkeeping xattr (origin inode, link count) is visible to the kernel, not to our users."""
    *head, xattrs = rec
    if b"lower=" in xattrs.get("trusted.unionfs.origin", b""):
        head[6] = None  # an indexed inode: its merged link count is ours, the kernel counts the index too
    return (*head, {k: v for k, v in xattrs.items() if not k.startswith("trusted.unionfs.")})


def _hardlinked(snap: dict) -> set[str]:
    return {name for group in snap.get("<hardlinks>", []) for name in group}


def _run_steps(gen: Generator, steps: int, kernel, ours, log: list[str], prefix: str) -> None:
    """The generator's next ``steps`` operations on both mounts, each result compared as it comes."""
    for step in range(steps):
        op, args = gen.next()
        want = apply(str(kernel), op, args)
        got = apply(str(ours), op, args)
        log.append(f"{prefix}{step}: {op}{args} -> {want}")
        assert got == want, "\n".join(log[-20:]) + f"\nunionfs gave {got}"


@pytest.mark.parametrize("seed", range(SEEDS))
def test_random_operations_match_kernel(tmp_path, union_mount, seed):
    top, bottom, up_k, wk_k, up_u, wk_u, ko, ko2 = mkdirs(
        tmp_path, "top", "bottom", "up_k", "wk_k", "up_u", "wk_u", "ko", "ko2")
    initial = build_lower(top, bottom)
    gen = Generator(seed, initial)
    log = []
    with overlay_mount(ko, [top, bottom], up_k, wk_k, KO_OPTS):
        m = union_mount([top, bottom], up_u, wk_u)
        _run_steps(gen, STEPS, ko, m.mnt, log, "")
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


ROUND_SEEDS = int(os.environ.get("UNIONFS_ROUND_SEEDS", "6"))
ROUNDS = int(os.environ.get("UNIONFS_ROUNDS", "4"))
ROUND_STEPS = int(os.environ.get("UNIONFS_ROUND_STEPS", "60"))


@pytest.mark.parametrize("seed", range(ROUND_SEEDS))
def test_stacked_rounds_match_kernel(tmp_path, union_mount, seed):
    """Uppers stacked as lowers, as containers/storage stacks layers: each round's upper dir becomes
    the next round's top lower layer, on each side (its work dir goes, as a committed layer's does).
    Redirects, whiteouts and opaque dirs we wrote, and those the kernel wrote (relative redirects
    among them), must then be followed in lower layers exactly as kernel overlayfs follows them."""
    top, bottom = mkdirs(tmp_path, "top", "bottom")
    # No hard links: which names of a hard-linked inode reach the upper dir differs (the kernel copies
    # up the name a file was opened by; FUSE opens the inode), and the next round sees it.
    gen = Generator(seed, build_lower(top, bottom, hardlinks=False), dir_moves=0.25, without=("link",))
    stacked_rounds(tmp_path, union_mount, gen, [top, bottom], ROUNDS, ROUND_STEPS)


def stacked_rounds(tmp_path, union_mount, gen: Generator, start: list, rounds: int, steps: int,
                   ko_opts: str = KO_OPTS, options: list[str] | None = None, ro_opts: str = "") -> None:
    """``rounds`` rounds of ``steps`` operations of ``gen`` over the lower layers ``start``; kernel
    overlayfs mounted with ``ko_opts`` (``ro_opts`` over lower layers alone), unionfs with ``options``."""
    ours, theirs = list(start), list(start)
    log: list[str] = []
    for rnd in range(rounds):
        up_k, wk_k, up_u, wk_u, ko, ko2 = mkdirs(
            tmp_path, *(f"{n}{rnd}" for n in ("up_k", "wk_k", "up_u", "wk_u", "ko", "ko2")))
        with overlay_mount(ko, theirs, up_k, wk_k, ko_opts):
            m = union_mount(ours, up_u, wk_u, options=options)
            want_tree = snapshot(ko, skip_unstatable=True)
            diff = diff_snapshots(snapshot(m.mnt), want_tree)
            assert diff == [], f"round {rnd} before any change:\n" + "\n".join(diff + log[-60:])
            _run_steps(gen, steps, ko, m.mnt, log, f"{rnd}.")
            want_tree = snapshot(ko, skip_unstatable=True)
            diff = diff_snapshots(snapshot(m.mnt), want_tree)
            assert diff == [], f"round {rnd}:\n" + "\n".join(diff + log[-60:])
            m.stop()
        # Each side's stack read by the other: kernel overlayfs over the layers we wrote, and
        # unionfs over the layers the kernel wrote.
        ours, theirs = [up_u, *ours], [up_k, *theirs]
        shutil.rmtree(wk_u)
        shutil.rmtree(wk_k)
        with overlay_mount(ko2, ours, None, None, ro_opts):
            over_ours = snapshot(ko2, skip_unstatable=True)
        diff = _cross_diff(over_ours, want_tree)
        assert diff == [], f"kernel over our layers, round {rnd}:\n" + "\n".join(diff)
        m = union_mount(theirs)
        diff = _cross_diff(snapshot(m.mnt), want_tree)
        assert diff == [], f"unionfs over the kernel's layers, round {rnd}:\n" + "\n".join(diff)
        m.stop()


def _cross_diff(a: dict, b: dict) -> list[str]:
    """Compare one side's view with the other side's layers read by the first: our bookkeeping
    xattrs aside, and names of hard links aside (each side's hard-link index is its own)."""
    skip = _hardlinked(a) | _hardlinked(b) | {"<hardlinks>"}
    skip |= {k for snap in (a, b) for k, v in snap.items() if k not in skip and v[6] not in (None, 1)}

    def clean(snap: dict) -> dict:
        return {k: _without_our_xattrs(v) for k, v in snap.items() if k not in skip}
    return diff_snapshots(clean(a), clean(b))
