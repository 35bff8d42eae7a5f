"""Interop through a registry: skopeo pushes an image umoci built, unionfs pulls and mounts it (equal to
``umoci unpack``'s rootfs); what unionfs pushes, skopeo inspects and copies back, and umoci unpacks equal."""
from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from helpers import diff_snapshots, snapshot
from registry_server import Registry, have_registry
from test_image_interop import umoci_image  # noqa: F401  (the module-scoped fixture)
from test_registry_pull_push import mounted, ok, pushed_digest, run

pytestmark = pytest.mark.skipif(not (have_registry() and shutil.which("umoci") and shutil.which("skopeo")),
                                reason="docker-registry, umoci and skopeo are needed (scripts/setup --test)")


def sh(*args):
    r = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


def registry_rootfs(ref: str, tmp_path) -> dict:
    """What a registry holds at ``ref``, as outside tools read it: skopeo copies it to an OCI layout and
    umoci unpacks it (checking every diff_id); the rootfs's snapshot."""
    back = tmp_path / "back"
    sh("skopeo", "copy", "-q", "--src-tls-verify=false", f"docker://{ref}", f"oci:{back}:copy")
    bundle = tmp_path / "bundle"
    sh("umoci", "unpack", "--image", f"{back}:copy", str(bundle))
    return snapshot(bundle / "rootfs")


def test_skopeo_push_unionfs_pull_and_back(tmp_path, umoci_image):  # noqa: F811
    layout, rootfs, docker_archive, _ = umoci_image
    expected = snapshot(rootfs)
    with Registry(tmp_path / "reg") as reg:
        # skopeo pushes umoci's image; unionfs pulls it and mounts it
        sh("skopeo", "copy", "-q", "--dest-tls-verify=false", f"oci:{layout}:app", f"docker://{reg.host}/interop/app:1")
        store = tmp_path / "store"
        ref = f"{reg.host}/interop/app:1"
        ok(run(tmp_path, "--root", str(store), "pull", ref, "--insecure"))
        got = mounted(tmp_path, store, ref)
        assert not diff_snapshots(expected, got), "\n".join(diff_snapshots(expected, got))
        seen = json.loads(sh("skopeo", "inspect", "--tls-verify=false", f"docker://{ref}"))
        info = json.loads(ok(run(tmp_path, "--root", str(store), "inspect", ref)).stdout)[0]
        assert info["RepoDigests"] == [f"{reg.host}/interop/app@{seen['Digest']}"]

        # unionfs pushes an image loaded from skopeo's docker archive (a manifest unionfs wrote itself);
        # skopeo reads it back, and umoci unpacks skopeo's copy to the same tree
        src = tmp_path / "src"
        ok(run(tmp_path, "--root", str(src), "load", str(docker_archive)))
        out = f"{reg.host}/interop/pushed:2"
        digest = pushed_digest(ok(run(tmp_path, "--root", str(src), "push", "interop/app:docker", out,
                                      "--insecure", "--chunk-size", "65536")))
        seen = json.loads(sh("skopeo", "inspect", "--tls-verify=false", f"docker://{out}"))
        assert seen["Digest"] == digest and len(seen["Layers"]) == 4
        cfg = json.loads(sh("skopeo", "inspect", "--config", "--tls-verify=false", f"docker://{out}"))
        assert cfg["config"]["Cmd"] == ["/bin/app"]
        again = registry_rootfs(out, tmp_path)
        assert not diff_snapshots(expected, again), "\n".join(diff_snapshots(expected, again))
