"""An image that lists the same layer twice (Docker's old builders wrote identical empty layers for steps
that changed nothing; a layer can also come back higher up): it loads, mounts with exactly the view kernel
overlayfs gives over copies of the repeated layers, runs, saves in both formats and reloads."""
from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from container_images import busybox_layer, mounted_snapshot, ok, run
from helpers import diff_snapshots, force_unmount, is_mounted, overlay_mount, snapshot, unionfs_cmd
from image_archives import Img, d, docker_save_legacy, f, layer_tar, sha

EMPTY = layer_tar([])
L1 = layer_tar([d("d"), f("d/one", b"L1"), f("f", b"L1"), f(".wh.g"), d("o"), f("o/.wh..wh..opq"), f("o/x", b"L1")])
L2 = layer_tar([d("d"), f("d/two", b"L2"), f("f", b"L2"), f("g", b"L2"), f("h", b"L2"), d("o"), f("o/y", b"L2")])


@pytest.fixture
def mnt(tmp_path):
    m = tmp_path / "mnt"
    m.mkdir()
    yield m
    for p in (m, tmp_path / "oracle"):
        if is_mounted(p):
            subprocess.run(unionfs_cmd("umount", str(p)), capture_output=True, timeout=30)
            if is_mounted(p):
                force_unmount(p)


def test_repeated_layers_mount_as_kernel_overlayfs_over_copies(tmp_path, mnt):
    """Base first: EMPTY, L1, EMPTY, L2, L1.  The top L1 re-applies its content, whiteout and opaque dir over
    L2 (f is L1's, g is hidden, o/y is hidden)."""
    store = tmp_path / "store"
    archive = tmp_path / "rep.tar"
    docker_save_legacy(archive, [Img([EMPTY, L1, EMPTY, L2, L1], ["rep:1"])])
    out = run(store, "load", str(archive))
    assert out.returncode == 0 and "2 extracted" not in out.stderr, out.stderr
    info = json.loads(ok(store, "inspect", "rep:1"))[0]
    assert info["RootFS"]["Layers"] == [sha(EMPTY), sha(L1), sha(EMPTY), sha(L2), sha(L1)]
    ours = mounted_snapshot(store, "rep:1", mnt)
    layer = {x: store / "layers" / sha(x)[7:] / "root" for x in (EMPTY, L1, L2)}
    copies = tmp_path / "copies"
    copies.mkdir()
    for name, src in (("L1", layer[L1]), ("EMPTY", layer[EMPTY])):
        subprocess.run(["cp", "-a", str(src), str(copies / name)], check=True, timeout=60)
    oracle = tmp_path / "oracle"
    oracle.mkdir()
    with overlay_mount(oracle, [layer[L1], layer[L2], copies / "EMPTY", copies / "L1", layer[EMPTY]]):
        theirs = snapshot(oracle, skip_unstatable=True)
    assert diff_snapshots(ours, theirs) == []
    assert (ours["f"][5], "g" in ours, "o/y" in ours, "h" in ours) == (sha(b"L1")[7:], False, False, True)
    # the kernel's own LowerDir in inspect names each directory once (it refuses one twice: ELOOP)
    lower = info["GraphDriver"]["Data"]["LowerDir"].split(":")
    assert lower == [str(layer[L1]), str(layer[L2]), str(layer[EMPTY])]


@pytest.mark.skipif(not os.path.exists("/bin/busybox") or not (shutil.which("crun") or shutil.which("runc")),
                    reason="busybox-static and crun are needed (scripts/setup --test installs them)")
def test_repeated_layers_run_save_reload(tmp_path):
    store = tmp_path / "store"
    archive = tmp_path / "rep.tar"
    docker_save_legacy(archive, [Img([busybox_layer(), EMPTY, L1, EMPTY, L2, L1], ["rep:1"])])
    ok(store, "load", str(archive))
    r = run(store, "run", "--rm", "rep:1", "sh", "-c", "cat /f /d/one /d/two /h; ls /o; test ! -e /g")
    assert (r.returncode, r.stdout) == (0, "L1L1L2L2x\n"), r.stderr
    image_id = json.loads(ok(store, "inspect", "rep:1"))[0]["Id"]
    for fmt, out in (("docker", tmp_path / "rep-saved.tar"), ("oci", tmp_path / "rep-oci")):
        ok(store, "save", "rep:1", "-o", str(out), "--format", fmt)
        fresh = tmp_path / f"fresh-{fmt}"
        ok(fresh, "load", str(out), *(["--tag", "rep:1"] if fmt == "oci" else []))
        again = json.loads(ok(fresh, "inspect", "rep:1"))[0]
        assert again["Id"] == image_id and len(again["RootFS"]["Layers"]) == 6
        r = run(fresh, "run", "--rm", "rep:1", "cat", "/f")
        assert (r.returncode, r.stdout) == (0, "L1"), r.stderr


@pytest.mark.skipif(not __import__("registry_server").have_registry(),
                    reason="docker-registry is needed (scripts/setup --test installs it)")
def test_repeated_layers_push_and_pull(tmp_path, mnt):
    from registry_server import Registry
    store, other = tmp_path / "store", tmp_path / "other"
    archive = tmp_path / "rep.tar"
    docker_save_legacy(archive, [Img([EMPTY, L1, EMPTY, L2, L1], ["rep:1"])])
    ok(store, "load", str(archive))
    view = mounted_snapshot(store, "rep:1", mnt)
    env = dict(os.environ, UNIONFS_CONFIG_DIR=str(tmp_path / "cfg"), DOCKER_CONFIG=str(tmp_path / "docker"))
    with Registry(tmp_path / "registry") as registry:
        ref = f"{registry.host}/team/rep:1"
        for root, args in ((store, ("push", "rep:1", ref)), (other, ("pull", ref))):
            r = subprocess.run(unionfs_cmd("--root", str(root), *args, "--insecure"), capture_output=True,
                               text=True, timeout=120, env=env, stdin=subprocess.DEVNULL)
            assert r.returncode == 0, r.stderr
    mine, theirs = (json.loads(ok(root, "inspect", name))[0] for root, name in ((store, "rep:1"), (other, ref)))
    assert theirs["Id"] == mine["Id"] and theirs["RootFS"]["Layers"] == mine["RootFS"]["Layers"]
    assert diff_snapshots(mounted_snapshot(other, ref, mnt), view) == []
