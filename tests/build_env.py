"""Helpers of the build tests: a busybox base image made by umoci, loaded into our store and into a private
podman store (the oracle: ``podman build --isolation chroot``), and the two results side by side."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from helpers import unionfs_cmd, unmount_all_below

APPLETS = ("sh", "echo", "cat", "ls", "id", "mkdir", "rm", "mv", "touch", "chmod", "ln", "printf", "mkfifo", "cp",
           "true", "false", "sleep", "test", "[")
# What podman's chroot isolation leaves in every image it runs a RUN in (mount points for its bind mounts).
PODMAN_ARTIFACTS = {"etc/hostname", "etc/hosts", "etc/resolv.conf", "run"}


def sh(*args: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, **kw)
    assert r.returncode == 0, (args, r.stdout, r.stderr)
    return r


def make_base(work: Path) -> Path:
    """An OCI layout ``work/oci:bb`` made by umoci: busybox, users root/app, groups root/app/staff."""
    oci, bundle = work / "oci", work / "bundle"
    sh("umoci", "init", "--layout", str(oci))
    sh("umoci", "new", "--image", f"{oci}:bb")
    sh("umoci", "config", "--image", f"{oci}:bb", "--config.cmd", "sh", "--config.env",
       "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "--config.workingdir", "/root")
    sh("umoci", "unpack", "--image", f"{oci}:bb", str(bundle))
    root = bundle / "rootfs"
    for d in ("bin", "root", "tmp", "dev", "proc", "sys", "etc", "home/app"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2("/bin/busybox", root / "bin/busybox")
    for a in APPLETS:
        os.symlink("busybox", root / "bin" / a)
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n")
    (root / "etc/group").write_text("root:x:0:\napp:x:1000:\nstaff:x:50:\n")
    os.chown(root / "home/app", 1000, 1000)
    os.chmod(root / "tmp", 0o1777)
    sh("umoci", "repack", "--image", f"{oci}:bb", str(bundle))
    return oci


class Podman:
    """podman with a private vfs store below ``base``."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.prefix = ["podman", "--root", str(base / "root"), "--runroot", str(base / "run"), "--storage-driver",
                       "vfs", "--cgroup-manager", "cgroupfs", "--events-backend", "file"]

    def __call__(self, *args: str, timeout: float = 300) -> str:
        return sh(*self.prefix, *args, timeout=timeout).stdout

    def load_oci(self, oci: Path, ref: str, name: str) -> None:
        sh("skopeo", "copy", "-q", f"oci:{oci}:{ref}",
           f"containers-storage:[vfs@{self.base / 'root'}+{self.base / 'run'}]localhost/{name}")

    def build(self, context: Path, dockerfile: Path, tag: str, *build_args: str) -> str:
        extra = [a for kv in build_args for a in ("--build-arg", kv)]
        return self("build", "--isolation", "chroot", "--format", "docker", "-f", str(dockerfile), "-t", tag,
                    *extra, str(context), timeout=600)

    def config(self, tag: str) -> dict:
        out = sh("skopeo", "inspect", "--raw", "--config",
                 f"containers-storage:[vfs@{self.base / 'root'}+{self.base / 'run'}]localhost/{tag}").stdout
        return json.loads(out)

    def mount(self, tag: str) -> str:
        return self("image", "mount", tag).strip()

    def close(self) -> None:
        subprocess.run([*self.prefix, "image", "unmount", "--all"], capture_output=True, timeout=60)
        unmount_all_below(self.base)
        shutil.rmtree(self.base, ignore_errors=True)


def unionfs(store: Path, *args: str, timeout: float = 300, input: str | None = None, env=None):
    return subprocess.run(unionfs_cmd("--root", str(store), *args), capture_output=True, text=True, timeout=timeout,
                          input=input, stdin=None if input is not None else subprocess.DEVNULL, env=env)


def ok(store: Path, *args: str, **kw) -> str:
    r = unionfs(store, *args, **kw)
    assert r.returncode == 0, (args, r.stdout, r.stderr)
    return r.stdout


def our_config(store: Path, ref: str) -> dict:
    image_id = json.loads(ok(store, "inspect", ref))[0]["Id"]
    with open(store / "blobs/sha256" / image_id.split(":")[1], "rb") as f:
        return json.loads(f.read())


CONFIG_FIELDS = ("User", "Env", "Cmd", "Entrypoint", "WorkingDir", "ExposedPorts", "Volumes", "Labels", "StopSignal",
                 "Healthcheck", "OnBuild", "Shell")


def config_fields(cfg: dict) -> dict:
    """The fields a Dockerfile sets, without podman's own label and with empty values dropped."""
    inner = dict(cfg.get("config") or {})
    out = {}
    for k in CONFIG_FIELDS:
        v = inner.get(k)
        if k == "Labels" and v:
            v = {a: b for a, b in v.items() if a != "io.buildah.version"}
        if v not in (None, [], {}, ""):
            out[k] = v
    return out
