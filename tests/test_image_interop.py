"""Interop: images nobody on the project wrote.

umoci builds an OCI image in layers that add, change, delete and replace files and
directories (so it writes real ``.wh.`` whiteouts); skopeo converts it to a docker
archive and an OCI archive.  We load each, mount it by name, and the merged view must
equal ``umoci unpack``'s rootfs: names, types, modes, owners, sizes, contents, link
targets, xattrs, hard-link groups.  Kernel overlayfs over the store's layer
directories must show the same tree.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from helpers import diff_snapshots, is_mounted, overlay_mount, snapshot, unionfs_cmd

pytestmark = pytest.mark.skipif(not (shutil.which("umoci") and shutil.which("skopeo")),
                                reason="umoci and skopeo are needed (scripts/setup --test installs them)")


def sh(*args, **kw):
    return subprocess.run(args, check=True, capture_output=True, text=True, timeout=120, **kw)


def run(*args):
    return subprocess.run(unionfs_cmd(*args), capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def _w(root: Path, rel: str, data: bytes, mode: int = 0o644, owner: tuple[int, int] = (0, 0)) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    os.chown(p, *owner)
    os.chmod(p, mode)


def _rm(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    else:
        p.unlink()


@pytest.fixture(scope="module")
def umoci_image(tmp_path_factory):
    """An OCI layout built by umoci in four layers; returns (layout, final rootfs, docker archive, oci archive)."""
    base = tmp_path_factory.mktemp("umoci")
    layout, bundle = base / "oci", base / "bundle"
    sh("umoci", "init", "--layout", str(layout))
    sh("umoci", "new", "--image", f"{layout}:app")
    sh("umoci", "config", "--image", f"{layout}:app", "--config.env", "GREETING=hello",
       "--config.cmd", "/bin/app", "--config.workingdir", "/srv", "--config.user", "1000:1000",
       "--config.exposedports", "8080/tcp", "--config.label", "org.example=yes", "--author", "interop test")
    sh("umoci", "unpack", "--image", f"{layout}:app", str(bundle))
    r = bundle / "rootfs"

    # layer 1: a small rootfs with every file type worth having
    _w(r, "etc/passwd", b"root:x:0:0::/root:/bin/sh\n")
    _w(r, "etc/group", b"root:x:0:\n")
    _w(r, "etc/hosts", b"127.0.0.1 localhost\n")
    os.setxattr(r / "etc/hosts", "user.origin", b"layer1")
    _w(r, "usr/bin/app", b"#!/bin/sh\necho app\n", 0o755)
    _w(r, "usr/bin/suid", b"suid", 0o4755)
    _w(r, "usr/bin/sgid", b"sgid", 0o2755, (0, 50))
    _w(r, "usr/lib/liba.so", b"a" * 70000)
    _w(r, "usr/lib/libb.so", b"b" * 100)
    os.link(r / "usr/lib/liba.so", r / "usr/lib/liba.so.1")
    os.symlink("liba.so.1", r / "usr/lib/liba-link.so")
    os.symlink("/etc/passwd", r / "abs-link")
    _w(r, "home/user/notes", b"mine", 0o600, (1000, 1000))
    (r / "home/user").chmod(0o700)
    os.chown(r / "home/user", 1000, 1000)
    (r / "tmp").mkdir(mode=0o1777)
    (r / "tmp").chmod(0o1777)
    os.mkfifo(r / "fifo")
    (r / "dev").mkdir()
    os.mknod(r / "dev/null", 0o666 | 0o020000, os.makedev(1, 3))
    _w(r, "gone/a", b"a")
    _w(r, "gone/sub/b", b"b")
    _w(r, "dir2file/x", b"x")
    _w(r, "file2dir", b"file")
    _w(r, "srv/data/1", b"1")
    _w(r, "srv/data/2", b"2")
    sh("umoci", "repack", "--refresh-bundle", "--image", f"{layout}:app", str(bundle))

    # layer 2: change, delete, replace
    _w(r, "etc/passwd", b"root:x:0:0::/root:/bin/sh\napp:x:1000:1000::/srv:/bin/app\n")
    _rm(r / "etc/group")
    _rm(r / "gone")
    _rm(r / "dir2file")
    _w(r, "dir2file", b"now a file")
    _rm(r / "file2dir")
    _w(r, "file2dir/inner", b"now a dir")
    os.chmod(r / "usr/lib/libb.so", 0o600)
    _rm(r / "srv/data/1")
    _w(r, "srv/data/3", b"3")
    sh("umoci", "repack", "--refresh-bundle", "--image", f"{layout}:app", str(bundle))

    # layer 3: recreate a deleted dir, empty a dir, replace a symlink by a dir, change an xattr
    _w(r, "gone/new", b"back")
    for p in (r / "srv/data").iterdir():
        _rm(p)
    _rm(r / "usr/lib/liba-link.so")
    (r / "usr/lib/liba-link.so").mkdir()
    os.setxattr(r / "etc/hosts", "user.origin", b"layer3")
    _w(r, "etc/hosts", b"10.0.0.1 app\n", 0o644)
    sh("umoci", "repack", "--refresh-bundle", "--image", f"{layout}:app", str(bundle))

    # layer 4: a symlink where a file was, a deep new tree
    _rm(r / "usr/bin/app")
    os.symlink("/usr/local/bin/app", r / "usr/bin/app")
    _w(r, "usr/local/bin/app", b"#!/bin/sh\necho new app\n", 0o755)
    _w(r, "a/b/c/d/e/f", b"deep")
    sh("umoci", "repack", "--refresh-bundle", "--image", f"{layout}:app", str(bundle))

    final = base / "final"
    sh("umoci", "unpack", "--image", f"{layout}:app", str(final))
    docker = base / "app-docker.tar"
    ociarc = base / "app-oci.tar"
    sh("skopeo", "copy", "-q", f"oci:{layout}:app", f"docker-archive:{docker}:interop/app:docker")
    sh("skopeo", "copy", "-q", f"oci:{layout}:app", f"oci-archive:{ociarc}:app")
    return layout, final / "rootfs", docker, ociarc


def _whiteouts_in(layout: Path) -> int:
    """How many .wh. entries umoci wrote (the test is only worth something if there are some)."""
    import tarfile
    index = json.loads((layout / "index.json").read_text())
    m = json.loads((layout / "blobs/sha256" / index["manifests"][0]["digest"][7:]).read_text())
    n = 0
    for layer in m["layers"]:
        with tarfile.open(layout / "blobs/sha256" / layer["digest"][7:]) as tf:
            n += sum(os.path.basename(x.name).startswith(".wh.") for x in tf)
    return n


def _mounted_view(store: Path, name: str, mnt: Path) -> dict:
    mnt.mkdir(exist_ok=True)
    r = run("--root", str(store), "mount", name, str(mnt))
    assert r.returncode == 0, r.stderr
    try:
        return snapshot(mnt)
    finally:
        assert run("umount", str(mnt)).returncode == 0
        assert not is_mounted(mnt)


def test_umoci_wrote_whiteouts(umoci_image):
    layout, *_ = umoci_image
    assert _whiteouts_in(layout) >= 5


@pytest.mark.parametrize("source", ["oci-dir", "docker-archive", "oci-archive"])
def test_mounted_image_equals_umoci_unpack(umoci_image, tmp_path, source):
    layout, rootfs, docker, ociarc = umoci_image
    store = tmp_path / "store"
    path, tag = {"oci-dir": (layout, ["--tag", "interop/app:oci"]),
                 "docker-archive": (docker, []),
                 "oci-archive": (ociarc, ["--tag", "interop/app:oci"])}[source]
    r = run("--root", str(store), "load", str(path), *tag)
    assert r.returncode == 0, r.stderr
    name = "interop/app:docker" if source == "docker-archive" else "interop/app:oci"
    assert f"Loaded image: {name}" in r.stdout
    expected = snapshot(rootfs)
    got = _mounted_view(store, name, tmp_path / "mnt")
    assert not diff_snapshots(expected, got), "\n".join(diff_snapshots(expected, got))
    assert len(expected) > 30

    # The store's layers are in overlayfs's own format: the kernel shows the same tree.
    info = json.loads(run("--root", str(store), "inspect", name).stdout)[0]
    lower = [Path(p) for p in info["GraphDriver"]["Data"]["LowerDir"].split(":")]
    assert len(lower) == 4
    kmnt = tmp_path / "kmnt"
    kmnt.mkdir()
    with overlay_mount(kmnt, lower):
        kernel = snapshot(kmnt)
    assert not diff_snapshots(expected, kernel), "\n".join(diff_snapshots(expected, kernel))

    # What umoci config set comes through.
    cfg = info["Config"]
    assert "GREETING=hello" in cfg["Env"] and cfg["Cmd"] == ["/bin/app"] and cfg["WorkingDir"] == "/srv"
    assert cfg["User"] == "1000:1000" and "8080/tcp" in cfg["ExposedPorts"]
    assert cfg["Labels"] == {"org.example": "yes"}
    assert info["Author"] == "interop test"


def test_docker_and_oci_forms_share_layers(umoci_image, tmp_path):
    """skopeo's docker archive has uncompressed layers and the OCI layout gzip ones: same diff_ids,
    so the second load extracts nothing and both images use the same layer directories."""
    layout, rootfs, docker, _ = umoci_image
    store = tmp_path / "store"
    r1 = run("--root", str(store), "load", str(layout), "--tag", "interop/app:oci")
    assert "4 extracted, 0 already" in r1.stderr, r1.stderr
    layer_dirs = sorted(os.listdir(store / "layers"))
    mtimes = {d: os.stat(store / "layers" / d / "root").st_mtime_ns for d in layer_dirs}
    r2 = run("--root", str(store), "load", str(docker))
    assert r2.returncode == 0 and "0 extracted, 4 already" in r2.stderr, r2.stderr
    assert sorted(os.listdir(store / "layers")) == layer_dirs
    assert {d: os.stat(store / "layers" / d / "root").st_mtime_ns for d in layer_dirs} == mtimes
    a = json.loads(run("--root", str(store), "inspect", "interop/app:oci").stdout)[0]
    b = json.loads(run("--root", str(store), "inspect", "interop/app:docker").stdout)[0]
    assert a["RootFS"]["Layers"] == b["RootFS"]["Layers"]
    images = run("--root", str(store), "images").stdout
    assert "interop/app" in images and "docker" in images and "oci" in images
    hist = run("--root", str(store), "history", "interop/app:oci").stdout.splitlines()
    assert len(hist) == 1 + 4 + 1 and "umoci config" in hist[-1]  # newest first: the config entry last
