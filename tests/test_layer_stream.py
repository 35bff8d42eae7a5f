"""Where a layer's tar stream ends, by Go's archive/tar rules (what docker, podman, containerd,
skopeo and umoci accept), and what may follow the end.

Go reads a header, then the member's data, then its padding: the stream may end inside the
padding (umoci 0.4.7's ``insert`` layers do; tests/test_image_corpus.py has the real ones),
but not inside a header or the data.  After a zero block comes another or nothing.  Trailing
bytes after the end blocks count in the diff_id and are never read as members; more than
1 MiB of them is refused (it is work, not padding: 8 MiB of zeros are 8 KB gzipped).
"""
from __future__ import annotations

import gzip
import json
import os
import subprocess

import pytest

from helpers import unionfs_cmd
from image_archives import Img, d, f, layer_tar, oci_layout, sha, store_listing

CONTENT = [d("etc"), f("etc/a", b"a" * 700), f("etc/b", b"bbb")]   # b's data ends 3 bytes into its block


def load(tmp_path, layer: bytes, compression: str | None = None):
    layout = tmp_path / "layout"
    oci_layout(layout, [Img([layer], ["t:1"], compression=compression)])
    store = tmp_path / "store"
    r = subprocess.run(unionfs_cmd("--root", str(store), "load", str(layout), "--tag", "t:1"), capture_output=True,
                       text=True, timeout=120, stdin=subprocess.DEVNULL)
    return store, r


def accepted(tmp_path, layer: bytes, compression: str | None = None):
    store, r = load(tmp_path, layer, compression)
    assert r.returncode == 0, r.stderr
    info = json.loads(subprocess.run(unionfs_cmd("--root", str(store), "inspect", "t:1"), capture_output=True,
                                     text=True, timeout=60).stdout)[0]
    assert info["RootFS"]["Layers"] == [sha(layer)]     # every byte counts in the diff_id
    (root,) = (store / "layers").iterdir()
    assert (root / "root/etc/a").read_bytes() == b"a" * 700 and (root / "root/etc/b").read_bytes() == b"bbb"


def refused(tmp_path, layer: bytes, message: str, compression: str | None = None):
    store, r = load(tmp_path, layer, compression)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    if store.exists():   # nothing kept: only the store's empty skeleton
        assert all(os.path.isdir(store / k) or k == "lock" for k in store_listing(store)), store_listing(store)


FULL = layer_tar(CONTENT)
BARE = layer_tar(CONTENT, end_blocks=False)         # stops at the end of b's padded block
DATA_END = len(BARE) - 512 + 3                       # right after b's data


@pytest.mark.parametrize("how", [None, "gzip"])
@pytest.mark.parametrize("cut", ["at-data-end", "inside-padding", "at-block", "one-zero-block", "two-zero-blocks"])
def test_ends_go_accepts(tmp_path, how, cut):
    layer = {"at-data-end": BARE[:DATA_END], "inside-padding": BARE[:DATA_END + 100], "at-block": BARE,
             "one-zero-block": BARE + bytes(512), "two-zero-blocks": BARE + bytes(1024)}[cut]
    accepted(tmp_path, layer, how)


@pytest.mark.parametrize("layer,message", [
    (BARE[:DATA_END - 1], "unexpected end of data"),                     # b's data cut short
    (BARE[:1024 + 600], "unexpected end of data"),                       # a's data cut short
    (BARE[:len(BARE) - 1024 + 100], "truncated header"),                 # b's header cut short
    (BARE + bytes(512) + b"x" * 512, "a zero block followed by data"),
    (BARE + bytes(512) + b"\0" * 100, "truncated end-of-archive block"),
], ids=["data-short", "first-data-short", "header-short", "zero-then-data", "zero-then-partial"])
def test_ends_go_refuses(tmp_path, layer, message):
    refused(tmp_path, layer, message)


def test_trailing_bytes_are_hashed_not_parsed(tmp_path):
    """GNU tar pads to its 10 KiB record; other tools more. A tar member's header in the trailing
    bytes is not a member (Go stops at the end blocks)."""
    layer = FULL + bytes(64 << 10) + layer_tar([f("etc/sneaky", b"x")])
    accepted(tmp_path, layer)
    (root,) = (tmp_path / "store/layers").iterdir()
    assert not (root / "root/etc/sneaky").exists()


def test_a_mib_of_trailing_zeros_at_most(tmp_path):
    layer = FULL + bytes(8 << 20)
    assert len(gzip.compress(layer)) < 64 << 10
    refused(tmp_path, layer, "more than 1 MiB of data after the end of the tar archive", "gzip")
