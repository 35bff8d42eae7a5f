"""Debian's podman on a private store, for tests: nothing touches the host's containers or images.

Two kinds of store: the ``vfs`` driver (no mount program: for load, save, build and run as an
oracle), or the ``overlay`` driver mounting through a mount_program (unionfs or fuse-overlayfs,
side by side).  This host's workarounds are applied (crun in a private mount namespace, ulimits
without CAP_SYS_RESOURCE); every podman process is waited for with a timeout.  Also: what
podman's results look like, normalized so two mount programs compare.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import pytest

from helpers import unmount_all_below

UNIONFS = str(Path(sys.executable).with_name("unionfs"))   # the venv's entry point, as podman will call it
FUSE_OVERLAYFS = "/usr/bin/fuse-overlayfs"
TIMEOUT = 180
HAVE_PODMAN = bool(shutil.which("podman"))
needs_podman = pytest.mark.skipif(not HAVE_PODMAN, reason="podman is needed (scripts/setup --test installs it)")

# crun 1.8 refuses this host's hybrid cgroup layout: give it a private mount namespace with a tmpfs over
# the cgroup2 mount (see unionfs/container/runtime.py); a host without it needs nothing.
RUNTIME_WRAPPER = """#!/bin/sh
exec unshare -m sh -c 'if mountpoint -q /sys/fs/cgroup/unified; then mount -t tmpfs none /sys/fs/cgroup/unified; fi
exec crun "$@"' crun "$@"
"""
# No CAP_SYS_RESOURCE in this sandbox: podman's default ulimits would fail to apply.
CONTAINERS_CONF = """[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
"""
STORAGE_CONF = """[storage]
driver = "{driver}"
graphroot = "{base}/root"
runroot = "{runroot}"
"""
MOUNT_PROGRAM_CONF = """[storage.options.overlay]
mount_program = "{program}"
"""


class Podman:
    """``podman`` on a store of its own under ``base``: vfs, or overlay with every mount through ``program``.

    Called as ``podman(*args)``: the CompletedProcess, asserted to succeed unless ``check=False``;
    ``run(*args)``: its stdout.  ``host_network`` (the default with a mount program) runs and creates
    containers with ``--network host``, so no network namespace needs setting up.
    """

    def __init__(self, base: Path, program: str | None = None, host_network: bool | None = None) -> None:
        self.base, self.program = Path(base), program
        self.base.mkdir(parents=True, exist_ok=True)
        # vfs: podman wants a runroot under 50 characters; with a mount program, the containers'
        # shm mounts live there and must stay in the test's own tree (their removal needs it).
        self.runroot = str(self.base / "run") if program else tempfile.mkdtemp(prefix="unionfs-pm-")
        self.host_network = program is not None if host_network is None else host_network
        self.use_program(program)
        (self.base / "containers.conf").write_text(CONTAINERS_CONF)
        wrapper = self.base / "crun-wrapper"
        wrapper.write_text(RUNTIME_WRAPPER)
        wrapper.chmod(0o755)
        self.env = dict(os.environ, CONTAINERS_CONF=str(self.base / "containers.conf"),
                        CONTAINERS_STORAGE_CONF=str(self.base / "storage.conf"), TMPDIR=str(self.base))
        self.runtime = str(wrapper)
        self.seq = 0

    def __call__(self, *args: str, check: bool = True, input: str | None = None,
                 timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
        argv = ["podman", "--runtime", self.runtime, *args]
        if self.host_network and args and args[0] in ("run", "create") and "--network" not in args:
            argv[4:4] = ["--network", "host"]
        r = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=timeout, input=input,
                           stdin=None if input is not None else subprocess.DEVNULL, cwd=self.base)
        if check:
            assert r.returncode == 0, f"{' '.join(argv)} ({self.program or 'vfs'}): {r.returncode}\n{r.stdout}\n{r.stderr}"
        return r

    def run(self, *args: str, timeout: float = TIMEOUT) -> str:
        return self(*args, timeout=timeout).stdout

    def use_program(self, program: str | None) -> None:
        """Mount through ``program`` from now on (containers/storage reads storage.conf at every start)."""
        self.program = program
        conf = STORAGE_CONF.format(driver="overlay" if program else "vfs", base=self.base, runroot=self.runroot)
        if program:
            conf += MOUNT_PROGRAM_CONF.format(program=program)
        (self.base / "storage.conf").write_text(conf)

    def sh(self, image: str, script: str, *run_options: str, keep: bool = False) -> str:
        """The output of ``sh -c SCRIPT`` in a new container; the container is removed unless ``keep``.
        It is left running until read: podman waits 20 s (conmon's timeout) for a short-lived one here."""
        self.seq += 1
        name = next((run_options[i + 1] for i, o in enumerate(run_options) if o == "--name"), f"sh{self.seq}")
        if "--name" not in run_options:
            run_options += ("--name", name)
        self("run", "-d", *run_options, image, "sh", "-c", f"{script}\necho END; exec sleep 600")
        deadline = time.monotonic() + TIMEOUT
        while not (logs := self("logs", name).stdout).endswith("END\n"):
            assert time.monotonic() < deadline, f"{name}: no END in its output: {logs!r}"
            time.sleep(0.1)
        if not keep:
            self("rm", "-f", "-t", "0", name)
        return logs[:-len("END\n")]

    def cleanup(self) -> None:
        """Containers, their mounts and podman's own leftovers, however the test ended."""
        for args in (["rm", "-fa", "-t", "0"], ["unmount", "-a", "-f"]):
            try:
                subprocess.run(["podman", "--runtime", self.runtime, *args], env=self.env, capture_output=True,
                               timeout=TIMEOUT, stdin=subprocess.DEVNULL)
            except subprocess.TimeoutExpired:
                pass
        unmount_all_below(self.base)
        unmount_all_below(Path(self.runroot))

    def close(self) -> None:
        """cleanup(), then the private store itself.  (Not ``podman system reset``, which also removes
        the host's networks.)"""
        self.cleanup()
        shutil.rmtree(self.base, ignore_errors=True)
        shutil.rmtree(self.runroot, ignore_errors=True)



# What podman mounts over in every container; with --uidmap crun cannot create them itself.
MOUNT_TARGETS = ("etc/hosts", "etc/hostname", "etc/resolv.conf", "run/.containerenv")


def write_image(path: Path, tag: str) -> None:
    """A docker-archive of two layers: busybox with users root and app (uid 1000), then the mount
    targets, a hard-linked pair and a file of another owner."""
    from container_images import busybox_layer
    from image_archives import Img, config, d, docker_save_legacy, f, hard, layer_tar, sha
    base = busybox_layer()
    top = layer_tar([d("etc"), d("run"), *(f(n) for n in MOUNT_TARGETS), d("srv"),
                     f("srv/data", b"data\n"), hard("srv/data-link", "srv/data"),
                     f("srv/owned", b"x", 0o640, uid=1000, gid=2000)])
    cfg = config([sha(base), sha(top)], [{"created_by": "busybox"}, {"created_by": "mount targets"}],
                 Env=["PATH=/bin"], Cmd=["sh"])   # buildah wants a history entry per layer
    docker_save_legacy(path, [Img([base, top], [tag], config=cfg)])


@pytest.fixture
def podmans(tmp_path):
    """{"unionfs": Podman, "fuse-overlayfs": Podman}, each with bb:1 (busybox, users root and app) loaded."""
    archive = tmp_path / "bb.tar"
    write_image(archive, "bb:1")
    out = {}
    try:
        for name, program in (("unionfs", UNIONFS), ("fuse-overlayfs", FUSE_OVERLAYFS)):
            p = out[name] = Podman(tmp_path / name, program)
            p("load", "-i", str(archive))
        yield out
    finally:
        for p in out.values():
            p.close()


def tar_members(data: bytes, skip: tuple[str, ...] = ()) -> dict[str, tuple]:
    """A tar's members without times: type, mode, owner, data hash or link target. A hard link counts
    as the file it names (fuse-overlayfs breaks lower hard links on copy-up; we keep them)."""
    out: dict[str, tuple] = {}
    content: dict[str, str] = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for m in tar:
            name = m.name.lstrip("./").rstrip("/") or "."
            if name in skip:
                continue
            if m.isreg():
                content[name] = hashlib.sha256(tar.extractfile(m).read()).hexdigest()
                what = content[name]
            elif m.islnk():
                what = content.get(m.linkname.lstrip("./"), m.linkname)
            elif m.issym():
                what = m.linkname
            else:
                what = (m.devmajor, m.devminor) if m.ischr() or m.isblk() else None
            kind = tarfile.REGTYPE if m.islnk() else m.type
            xattrs = {k: v for k, v in m.pax_headers.items() if k.startswith("SCHILY.xattr.")}
            out[name] = (kind, oct(m.mode), m.uid, m.gid, what, xattrs)
    return out


def image_layers(podman: Podman, image: str) -> list[dict[str, tuple]]:
    """The layers of an image as ``podman save`` writes them (docker-archive), as tar_members."""
    dest = podman.base / f"save-{image.replace('/', '_').replace(':', '_')}.tar"
    podman("save", "--format", "docker-archive", "-o", str(dest), image)
    with tarfile.open(dest) as tar:
        manifest = json.load(tar.extractfile("manifest.json"))
        layers = [tar_members(tar.extractfile(name).read()) for name in manifest[0]["Layers"]]
    dest.unlink()
    return layers


def requirements_missing() -> str | None:
    for tool in ("podman", "crun", "fuse-overlayfs"):
        if shutil.which(tool) is None:
            return f"{tool} is needed (scripts/setup --test installs it)"
    return None
