"""Hostile and broken archives: each refused with a clear one-line message, the store unchanged,
nothing written outside the layer directory."""
from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile

import pytest

from helpers import unionfs_cmd
from image_archives import (Entry, Img, d, docker_save_legacy, f, hard, layer_tar, oci_layout, sha, store_listing,
                            sym)


def run(*args):
    return subprocess.run(unionfs_cmd(*args), capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


@pytest.fixture
def store(tmp_path):
    """A store that already holds one good image, so 'unchanged' means something."""
    root = tmp_path / "store"
    good = tmp_path / "good.tar"
    docker_save_legacy(good, [Img([layer_tar([d("etc"), f("etc/os-release", b"ID=good\n")])], ["good:1"])])
    r = run("--root", str(root), "load", str(good))
    assert r.returncode == 0, r.stderr
    return root


def refused(store, archive, message):
    before = store_listing(store)
    r = run("--root", str(store), "load", str(archive))
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    after = store_listing(store)
    assert after == before, sorted(set(after.items()) ^ set(before.items()))
    return r.stderr


OUTSIDE = "/tmp/unionfs-hostile-canary"


@pytest.mark.parametrize("case,entries,message", [
    ("dotdot", [f("etc/../../escape", b"x")], "leaves the layer"),
    ("dotdot-dir", [d("a"), f("../" * 8 + OUTSIDE.lstrip("/"), b"x")], "leaves the layer"),
    ("absolute", [f(OUTSIDE, b"x")], "absolute path"),
    ("hardlink-outside", [hard("pw", "../../../../etc/passwd")], "leaves the layer"),
    ("hardlink-absolute", [hard("pw", "/etc/passwd")], "absolute path"),
    ("hardlink-not-in-layer", [hard("pw", "etc/passwd")], "not a file extracted earlier"),
    ("hardlink-to-dir", [d("dir"), hard("pw", "dir")], "not a file extracted earlier"),
    ("through-symlink", [sym("evil", "/tmp"), f("evil/unionfs-hostile-canary", b"pwned")], "is a symlink"),
    ("through-symlink-deep", [d("a"), sym("a/b", "../../../../tmp"), f("a/b/unionfs-hostile-canary", b"x")],
     "is a symlink"),
    ("symlink-then-dir", [sym("evil", "/tmp"), d("evil/unionfs-hostile-canary")], "is a symlink"),
    ("absurd-size", [Entry("big", b"x" * 512, size=1 << 50)], "claims"),
    ("bare-wh", [d("etc"), f("etc/.wh.", b"")], "not a valid whiteout"),
    ("wh-dotdot", [f(".wh...", b"")], "not a valid whiteout"),
])
def test_hostile_layer_refused(store, tmp_path, case, entries, message):
    if os.path.lexists(OUTSIDE):
        os.unlink(OUTSIDE)
    archive = tmp_path / f"{case}.tar"
    docker_save_legacy(archive, [Img([layer_tar(entries)], [f"evil:{case}"])])
    refused(store, archive, message)
    assert not os.path.lexists(OUTSIDE)
    assert not os.path.exists("/tmp/escape")


def test_truncated_layer(store, tmp_path):
    layer = layer_tar([f("a", b"a" * 5000), f("b", b"b" * 5000)])
    cut = layer[:2048]
    archive = tmp_path / "cut.tar"
    docker_save_legacy(archive, [Img([cut], ["evil:cut"], config=None)])
    refused(store, archive, "corrupt or truncated")


def test_garbage_header_mid_tar(store, tmp_path):
    """tarfile would stop quietly at a bad header after the first; Go (and we) refuse it."""
    layer = layer_tar([f("a", b"a")], end_blocks=False) + b"\x07" * 512 + layer_tar([f("b", b"b")])
    archive = tmp_path / "garbage.tar"
    docker_save_legacy(archive, [Img([layer], ["evil:garbage"])])
    refused(store, archive, "invalid tar header")


def test_diff_id_mismatch(store, tmp_path):
    layer = layer_tar([f("a", b"a")])
    img = Img([layer], ["evil:diffid"])
    img.config = json.dumps({"rootfs": {"type": "layers", "diff_ids": [sha(b"something else")]}}).encode()
    archive = tmp_path / "diffid.tar"
    docker_save_legacy(archive, [img])
    refused(store, archive, "does not match the config's diff_id")


def test_layer_digest_mismatch(store, tmp_path):
    layout = tmp_path / "layout"
    files = oci_layout(layout, [Img([layer_tar([f("a", b"a")])], ["x"], compression="gzip")])
    blob = next(n for n, data in files.items() if data[:2] == b"\x1f\x8b")
    (layout / blob).write_bytes(__import__("gzip").compress(layer_tar([f("a", b"evil")])))
    refused(store, layout, "does not match its digest")


def test_config_digest_mismatch(store, tmp_path):
    archive = tmp_path / "d25.tar"
    files = oci_layout(None, [Img([layer_tar([f("a", b"a")])], ["evil:cfg"])], docker25=True)
    cfg_name = json.loads(files["manifest.json"])[0]["Config"]
    files[cfg_name] = files[cfg_name].replace(b'"tests"', b'"evil!"')
    with tarfile.open(archive, "w") as tf:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    refused(store, archive, "does not match its digest")


def test_layer_count_mismatch(store, tmp_path):
    img = Img([layer_tar([f("a", b"a")]), layer_tar([f("b", b"b")])], ["evil:count"])
    img.config = json.dumps({"rootfs": {"type": "layers", "diff_ids": [sha(img.layers[0])]}}).encode()
    archive = tmp_path / "count.tar"
    docker_save_legacy(archive, [img])
    refused(store, archive, "lists 1 diff_ids")


def test_member_symlink_leaving_archive(store, tmp_path):
    archive = tmp_path / "link.tar"
    cfg = Img([layer_tar([])], []).config_bytes()
    with tarfile.open(archive, "w") as tf:
        for name, data in {"manifest.json": json.dumps([{"Config": "c.json", "RepoTags": ["evil:link"],
                                                          "Layers": ["l/layer.tar"]}]).encode(),
                           "c.json": cfg}.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
        ti = tarfile.TarInfo("l/layer.tar")
        ti.type, ti.linkname = tarfile.SYMTYPE, "../../../etc/passwd"
        tf.addfile(ti)
    refused(store, archive, "links outside the archive")


@pytest.mark.parametrize("content,message", [
    (b"not a tar at all" * 100, "not a readable tar archive"),
    (b"", "not a readable tar archive"),
])
def test_not_an_archive(store, tmp_path, content, message):
    p = tmp_path / "junk"
    p.write_bytes(content)
    refused(store, p, message)


def test_neither_format(store, tmp_path):
    p = tmp_path / "plain.tar"
    with tarfile.open(p, "w") as tf:
        ti = tarfile.TarInfo("hello")
        tf.addfile(ti, io.BytesIO(b""))
    refused(store, p, "neither a docker save archive")


def test_bad_tag_in_archive(store, tmp_path):
    archive = tmp_path / "tag.tar"
    docker_save_legacy(archive, [Img([layer_tar([f("a", b"a")])], ["Evil:x"])])
    refused(store, archive, "invalid repository name")


def test_device_nodes_refused_without_root(tmp_path):
    """As non-root, device nodes are refused (simulated with the extractor's flag)."""
    from unionfs.fs.formats import Style
    from unionfs.image.extract import HostileLayer, extract_layer
    layer = layer_tar([Entry("dev/null", type=tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666)])
    root = tmp_path / "root"
    root.mkdir()
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(HostileLayer, match="only root may create device nodes"):
            extract_layer(io.BytesIO(layer), fd, what="layer", style=Style.XWHITEOUT, devices=False, space=1 << 30)
        # ... and the same layer extracts as root
        for p in sorted(root.rglob("*"), reverse=True):
            p.rmdir() if p.is_dir() else p.unlink()
        ex = extract_layer(io.BytesIO(layer), fd, what="layer", style=Style.OVERLAY, devices=True, space=1 << 30)
    finally:
        os.close(fd)
    assert ex.diff_id == sha(layer)
    st = os.lstat(root / "dev/null")
    assert os.major(st.st_rdev) == 1 and os.minor(st.st_rdev) == 3


def test_interrupted_import_leaves_nothing_registered(store, tmp_path):
    """A load killed in the middle of extracting: no image, tag or layer appears; the next writer cleans up."""
    layers = [layer_tar([f(f"f{i}", b"x" * 100) for i in range(50)]), layer_tar([f("g", b"g")])]
    archive = tmp_path / "big.tar"
    docker_save_legacy(archive, [Img(layers, ["killed:1"])])
    before = store_listing(store)
    script = ("import os, signal, sys\n"
              "from unionfs.image import extract\n"
              "orig = extract.LayerWriter.add\n"
              "def add(self, m, t):\n"
              "    orig(self, m, t)\n"
              "    if self.entries == 20: os.kill(os.getpid(), signal.SIGKILL)\n"
              "extract.LayerWriter.add = add\n"
              "from unionfs.cli import main\n"
              "sys.exit(main(sys.argv[1:]))\n")
    r = subprocess.run([*unionfs_cmd()[:1], "-c", script, "--root", str(store), "load", str(archive)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == -9, r.stderr
    after = store_listing(store)
    new = sorted(set(after) - set(before))
    assert new and all(p.startswith("tmp/") for p in new), new    # only work in progress
    r = run("--root", str(store), "images")
    assert "killed" not in r.stdout
    assert run("--root", str(store), "tag", "good:1", "good:2").returncode == 0   # the next writer
    after = store_listing(store)
    assert not [p for p in after if p.startswith("tmp/")]
    assert {p for p in after if p.startswith("layers/")} == {p for p in before if p.startswith("layers/")}
