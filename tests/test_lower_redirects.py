"""Redirects, whiteouts and opaque dirs in lower layers, as former upper dirs carry them: each
stack is read by kernel overlayfs and by unionfs, and the trees and the answers for chosen paths
(errno included) must be the same.  The stacks hold what the random rounds only reach by luck:
chains of redirects across layers, a redirect met half-way down an absolute path, an opaque
ancestor that an absolute redirect below it overrides, redirects to files, whiteouts or nothing,
and redirects the kernel refuses."""
from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from helpers import diff_snapshots, mkdirs, overlay_mount, snapshot

R = "trusted.overlay.redirect"
O = "trusted.overlay.opaque"

# Each stack: its layers, topmost first; a layer is a list of (kind, path, extra):
# ("d", path, {xattr: value}) a dir, ("f", path, data) a file, ("w", path, None) a whiteout.
STACKS = {
    "relative redirect to a sibling whited out above": [
        [("d", "new", {R: b"old"}), ("w", "old", None)],
        [("f", "old/f", b"old f"), ("d", "old/sub", {}), ("f", "old/sub/g", b"g")],
    ],
    "relative redirect, then back again in the next layer": [
        [("d", "a/b", {R: b"m"}), ("f", "a/b/top", b"top")],
        [("d", "a/m", {R: b"b"}), ("w", "a/b", None), ("f", "a/m/mid", b"mid")],
        [("f", "a/b/bottom", b"bottom"), ("f", "a/m/hidden", b"not reached")],
    ],
    "absolute redirect through a dir renamed in a lower layer": [
        [("d", "x", {R: b"/a/b"})],
        [("d", "a", {R: b"/z"}), ("w", "z", None), ("f", "a/b/mid", b"mid")],
        [("f", "z/b/f", b"deep"), ("f", "z/other", b"o")],
    ],
    "absolute redirect below an opaque ancestor goes on": [
        [("d", "x", {R: b"/a/b"})],
        [("d", "a", {O: b"y"}), ("d", "a/b", {R: b"/q"}), ("f", "a/b/mid", b"mid")],
        [("f", "q/f", b"q"), ("f", "a/b/g", b"hidden by the opaque a"), ("f", "a/h", b"hidden too")],
    ],
    "an opaque ancestor on an absolute path stops it": [
        [("d", "x", {R: b"/a/b"})],
        [("d", "a", {O: b"y"}), ("f", "a/b/mid", b"mid")],
        [("f", "a/b/g", b"hidden by the opaque a")],
    ],
    "an opaque dir's own redirect is not followed": [
        [("d", "x", {R: b"/y", O: b"y"}), ("f", "x/f", b"f")],
        [("f", "y/g", b"not shown")],
    ],
    "redirect to a file, to a whiteout and to nothing": [
        [("d", "to-file", {R: b"/file"}), ("d", "to-wh", {R: b"/gone"}), ("d", "to-none", {R: b"/none"}),
         ("f", "to-none/keep", b"k")],
        [("f", "file", b"a file"), ("w", "gone", None), ("d", "file2", {})],
        [("f", "gone/f", b"whited out")],
    ],
    "redirect half-way down a path to a non-dir": [
        [("d", "x", {R: b"/a/b/c"})],
        [("f", "a/b", b"a file where a dir was")],
        [("f", "a/b/c/f", b"below the file")],
    ],
    "a redirect on a file and on the bottom layer are ignored": [
        [("f", "file", b"f"), ("d", "d", {})],
        [("d", "d", {R: b"/e"}), ("f", "d/f", b"bottom")],
    ],
    "chains: renamed, renamed again, and moved into another renamed dir": [
        [("d", "p2", {R: b"/p1"}), ("d", "p2/c2", {R: b"/c1"}), ("w", "p1", None), ("w", "c1", None)],
        [("d", "p1", {R: b"/p0"}), ("d", "c1", {R: b"/p0/c0"}), ("w", "p0", None)],
        [("f", "p0/f", b"p0"), ("f", "p0/c0/g", b"c0")],
    ],
}

# Redirects the kernel refuses: the lookup fails with EINVAL (a relative one with a slash, an
# absolute one with an empty element) or, through '..', finds nothing.
BAD = {
    "relative with a slash": b"a/b",
    "absolute with an empty element": b"/a//b",
    "dot-dot": b"/../escape",
}


def _build(layer: Path, entries) -> None:
    for kind, rel, extra in entries:
        p = layer / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if kind == "d":
            p.mkdir(exist_ok=True)
            for k, v in extra.items():
                os.setxattr(p, k, v)
        elif kind == "f":
            p.write_bytes(extra)
        else:
            os.mknod(p, 0o600 | 0o020000, os.makedev(0, 0))


def _answer(path: str):
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            return sorted(os.listdir(path))
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        return errno.errorcode[e.errno]


def _layers(tmp_path: Path, spec) -> list[Path]:
    layers = mkdirs(tmp_path, *(f"l{i}" for i in range(len(spec))))
    for layer, entries in zip(layers, spec):
        _build(layer, entries)
    return layers


@pytest.mark.parametrize("name", list(STACKS))
def test_lower_redirects_match_kernel(tmp_path, union_mount, name):
    layers = _layers(tmp_path, STACKS[name])
    (ko,) = mkdirs(tmp_path, "ko")
    probes = sorted({rel for entries in STACKS[name] for _, rel, _ in entries} |
                    {os.path.join(rel, "f") for entries in STACKS[name] for _, rel, _ in entries})
    with overlay_mount(ko, layers, extra="redirect_dir=on"):
        theirs = snapshot(ko, skip_unstatable=True)
        want = {p: _answer(os.path.join(ko, p)) for p in probes}
    m = union_mount(layers)
    assert diff_snapshots(snapshot(m.mnt), theirs) == []
    assert {p: _answer(os.path.join(m.mnt, p)) for p in probes} == want


@pytest.mark.parametrize("bad", list(BAD))
def test_refused_redirects_match_kernel(tmp_path, union_mount, bad):
    spec = [[("d", "x", {R: BAD[bad]}), ("f", "ok", b"ok")], [("f", "a/b/f", b"f"), ("f", "escape", b"e")]]
    layers = _layers(tmp_path, spec)
    (ko,) = mkdirs(tmp_path, "ko")
    with overlay_mount(ko, layers, extra="redirect_dir=on"):
        want = [_answer(os.path.join(ko, p)) for p in ("x", "ok")]
    m = union_mount(layers)
    assert [_answer(os.path.join(m.mnt, p)) for p in ("x", "ok")] == want
