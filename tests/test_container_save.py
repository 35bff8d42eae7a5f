"""save: a committed image written as a docker archive and as an OCI layout loads back into unionfs and
is read by skopeo and umoci (independent implementations of the specs) as the same tree."""
from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
from container_images import change_everything, mkdirs, mounted_snapshot, ok, run, store  # noqa: F401
from helpers import diff_snapshots, snapshot

TOOLS = shutil.which("umoci") and shutil.which("skopeo")


@pytest.fixture
def committed(store, tmp_path):
    """app:2 = app:1 plus a container's changes of every kind; returns (store, the container's view)."""
    ok(store, "create", "app:1", "--name", "c")
    (m,) = mkdirs(tmp_path, "m")
    ok(store, "mount", "c", str(m))
    change_everything(m)
    view = snapshot(m)
    ok(store, "umount", str(m))
    ok(store, "commit", "c", "app:2")
    return store, view


@pytest.mark.parametrize("fmt,out", [("docker", "app.tar"), ("oci", "layout"), ("oci", "layout.tar")])
def test_save_load_round_trip(committed, tmp_path, fmt, out):
    store, view = committed
    target = tmp_path / out
    ok(store, "save", "app:2", "-o", str(target), "--format", fmt)
    other = tmp_path / "other-store"
    r = ok(other, "load", str(target))
    assert r.strip() == "Loaded image: app:2"
    a = json.loads(ok(store, "inspect", "app:2"))[0]
    b = json.loads(ok(other, "inspect", "app:2"))[0]
    assert a["Id"] == b["Id"] and a["RootFS"] == b["RootFS"]     # the config bytes travel unchanged
    (mnt,) = mkdirs(tmp_path, "mnt")
    assert diff_snapshots(view, mounted_snapshot(other, "app:2", mnt)) == []


def test_save_mistakes_leave_nothing(committed, tmp_path):
    store, _ = committed
    (tmp_path / "full").mkdir()
    (tmp_path / "full/x").write_text("x")
    for args, msg in [(["save", "nope:1", "-o", str(tmp_path / "a.tar")], "no such image"),
                      (["save", "app:2", "-o", str(tmp_path / "no/such/dir.tar")], "does not exist"),
                      (["save", "app:2", "--format", "oci", "-o", str(tmp_path / "full")], "not empty"),
                      (["save", "app:2", "-o", str(tmp_path / "full")], "is a directory")]:
        r = run(store, *args)
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    assert sorted(os.listdir(tmp_path)) == ["app.tar", "full", "m", "store"]
    assert os.listdir(tmp_path / "full") == ["x"]


@pytest.mark.skipif(not TOOLS, reason="umoci and skopeo are needed (scripts/setup --test installs them)")
def test_skopeo_and_umoci_read_what_save_writes(committed, tmp_path):
    store, view = committed
    info = json.loads(ok(store, "inspect", "app:2"))[0]
    ok(store, "save", "app:2", "-o", str(tmp_path / "d.tar"))
    ok(store, "save", "app:2", "--format", "oci", "-o", str(tmp_path / "layout"))

    def sh(*args):
        r = subprocess.run(args, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, (args, r.stderr)
        return r.stdout

    docker = json.loads(sh("skopeo", "inspect", f"docker-archive:{tmp_path / 'd.tar'}"))
    assert docker["Layers"] == info["RootFS"]["Layers"]          # uncompressed: blob digest = diff_id
    raw = json.loads(sh("skopeo", "inspect", "--config", "--raw", f"docker-archive:{tmp_path / 'd.tar'}"))
    assert raw["rootfs"]["diff_ids"] == info["RootFS"]["Layers"]
    oci = json.loads(sh("skopeo", "inspect", f"oci:{tmp_path / 'layout'}:2"))
    assert len(oci["Layers"]) == 3 and oci["Env"] == info["Config"]["Env"]
    # skopeo copies it (reading and checking every blob) into an OCI layout of its own, which we load
    sh("skopeo", "copy", f"docker-archive:{tmp_path / 'd.tar'}", f"oci:{tmp_path / 'copied'}:2")
    other = tmp_path / "other-store"
    ok(other, "load", str(tmp_path / "copied"), "--tag", "copied:2")
    (mnt,) = mkdirs(tmp_path, "mnt")
    assert diff_snapshots(view, mounted_snapshot(other, "copied:2", mnt)) == []
    # umoci applies the layers itself, whiteouts and opaque markers included
    sh("umoci", "unpack", "--image", f"{tmp_path / 'layout'}:2", str(tmp_path / "bundle"))
    assert diff_snapshots(view, snapshot(tmp_path / "bundle/rootfs")) == []
