"""A corpus of images made by outside tools, in every mode they have, and their reference trees.

umoci builds the base image in layers of every kind it writes: ``repack`` (a busybox
rootfs with a directory owned by a user, with an xattr), ``insert`` of a file into that
directory (a layer that only implies its parents and stops right after the file's data),
``insert --opaque``, ``insert --whiteout``, an insert below directories no layer has.
skopeo converts it to a docker archive and to OCI layouts and archives with gzip, zstd
and no compression; podman loads it, builds on it (``podman build --isolation chroot``)
and saves both in its three formats.  The reference tree of every item is ``umoci unpack``
of the same image (through ``skopeo copy`` to an OCI layout when it is not one).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from podman_env import Podman
from test_image_interop import _w   # write a file with mode and owner

APPLETS = ("sh", "true", "cat", "echo", "ls", "id", "mkdir", "chmod", "chown", "rm", "touch", "ln")


def sh(*args: str, timeout: float = 300) -> str:
    r = subprocess.run(args, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, (args, r.stdout[-2000:], r.stderr[-3000:])
    return r.stdout


@dataclass(frozen=True)
class Item:
    """One image of the corpus: how unionfs loads it and how skopeo names it."""

    name: str
    path: Path
    transport: str       # skopeo's name of the image: "oci:DIR:TAG", "docker-archive:FILE", ...

    @property
    def tag(self) -> str:
        return f"corpus/{self.name}:1"


def umoci_base(base: Path) -> Path:
    """The umoci-built image ``LAYOUT:app``; returns the layout."""
    layout, bundle = base / "oci", base / "bundle"
    sh("umoci", "init", "--layout", str(layout))
    sh("umoci", "new", "--image", f"{layout}:app")
    sh("umoci", "config", "--image", f"{layout}:app", "--config.cmd", "sh", "--config.env", "PATH=/bin")
    sh("umoci", "unpack", "--image", f"{layout}:app", str(bundle))
    r = bundle / "rootfs"
    # repack: a small rootfs; /home/app belongs to the user and carries an xattr
    (r / "bin").mkdir()
    shutil.copy("/bin/busybox", r / "bin/busybox")
    for a in APPLETS:
        os.symlink("busybox", r / "bin" / a)
    _w(r, "etc/passwd", b"root:x:0:0::/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n")
    _w(r, "etc/group", b"root:x:0:\napp:x:1000:\n")
    _w(r, "etc/gone", b"to be whited out")
    _w(r, "home/app/.profile", b"export A=1\n", 0o600, (1000, 1000))
    (r / "home/app").chmod(0o750)
    os.chown(r / "home/app", 1000, 1000)
    os.setxattr(r / "home/app", "user.who", b"app")
    os.utime(r / "home/app", (1e9, 1e9))
    _w(r, "srv/data/old", b"old", 0o640, (0, 50))
    os.chmod(r / "srv/data", 0o2775)
    os.chown(r / "srv/data", 0, 50)
    _w(r, "usr/lib/liba.so", b"a" * 3000)
    os.link(r / "usr/lib/liba.so", r / "usr/lib/liba.so.1")
    (r / "tmp").mkdir()
    (r / "tmp").chmod(0o1777)
    os.mkfifo(r / "srv/fifo")
    sh("umoci", "repack", "--refresh-bundle", "--image", f"{layout}:app", str(bundle))
    src = base / "src"
    # insert: a file into the user's directory (the layer has no entry for home/ or home/app/)
    _w(src, "notes", b"inserted into an existing directory\n", 0o600, (1000, 1000))
    sh("umoci", "insert", "--image", f"{layout}:app", str(src / "notes"), "/home/app/notes")
    # insert --opaque: /srv/data replaced
    _w(src, "data/new", b"new data\n")
    sh("umoci", "insert", "--image", f"{layout}:app", "--opaque", str(src / "data"), "/srv/data")
    # insert --whiteout
    sh("umoci", "insert", "--image", f"{layout}:app", "--whiteout", "/etc/gone")
    # insert below directories no layer has: they are made root 0755
    _w(src, "tool", b"#!/bin/sh\necho tool\n", 0o755)
    sh("umoci", "insert", "--image", f"{layout}:app", str(src / "tool"), "/opt/vendor/bin/tool")
    return layout


def _gzip_only(layout: Path) -> bool:
    """umoci 0.4.7 reads gzip layers only: other layouts go through skopeo (to gzip) first."""
    for p in (layout / "blobs/sha256").iterdir():
        with open(p, "rb") as fh:
            if fh.read(2) not in (b"\x1f\x8b", b'{"'):
                return False
    return True


def umoci_unpack(transport: str, dest: Path) -> Path:
    """``umoci unpack`` of any image skopeo can read; returns the rootfs."""
    if transport.startswith("oci:") and transport.count(":") == 2 and _gzip_only(Path(transport.split(":")[1])):
        ref = transport[len("oci:"):]
    else:
        layout = dest.with_name(dest.name + "-oci")
        sh("skopeo", "copy", "-q", "--src-tls-verify=false", "--dest-compress-format", "gzip", transport,
           f"oci:{layout}:ref") if transport.startswith("docker:") else \
            sh("skopeo", "copy", "-q", "--dest-compress-format", "gzip", transport, f"oci:{layout}:ref")
        ref = f"{layout}:ref"
    sh("umoci", "unpack", "--image", ref, str(dest))
    return dest / "rootfs"


DOCKERFILE = """\
FROM localhost/corpus/umoci:1
COPY more /home/app/more
RUN ["/bin/sh", "-c", "echo ran > /srv/data/ran && chmod 0700 /srv/data && mkdir -p /var/log/app && rm /usr/lib/liba.so.1"]
"""


def build(base: Path) -> list[Item]:
    """Every item of the corpus, made once."""
    items: list[Item] = []
    layout = umoci_base(base)
    items.append(Item("umoci", layout, f"oci:{layout}:app"))
    docker = base / "skopeo-docker.tar"
    sh("skopeo", "copy", "-q", f"oci:{layout}:app", f"docker-archive:{docker}:localhost/corpus/umoci:1")
    items.append(Item("skopeo-docker-archive", docker, f"docker-archive:{docker}"))
    zstd = base / "skopeo-oci-zstd"
    sh("skopeo", "copy", "-q", "--dest-compress-format", "zstd", f"oci:{layout}:app", f"oci:{zstd}:app")
    items.append(Item("skopeo-oci-zstd", zstd, f"oci:{zstd}:app"))
    plain = base / "skopeo-oci-none"
    sh("skopeo", "copy", "-q", "--dest-oci-accept-uncompressed-layers", f"docker-archive:{docker}",
       f"oci:{plain}:app")
    items.append(Item("skopeo-oci-none", plain, f"oci:{plain}:app"))
    arc = base / "skopeo-oci.tar"
    sh("skopeo", "copy", "-q", f"oci:{layout}:app", f"oci-archive:{arc}:app")
    items.append(Item("skopeo-oci-archive", arc, f"oci-archive:{arc}"))

    pm = Podman(base / "podman")
    try:
        pm.run("load", "-q", "-i", str(docker))
        saved = base / "podman-umoci.tar"
        pm.run("save", "-q", "--format", "docker-archive", "-o", str(saved), "localhost/corpus/umoci:1")
        items.append(Item("podman-save-umoci", saved, f"docker-archive:{saved}"))
        ctx = base / "ctx"
        _w(ctx, "more", b"copied by podman build\n")
        (ctx / "Dockerfile").write_text(DOCKERFILE)
        pm.run("build", "-q", "--isolation", "chroot", "-t", "localhost/corpus/built:1", str(ctx))
        for fmt, out in (("docker-archive", "built-docker.tar"), ("oci-archive", "built-oci.tar"),
                         ("oci-dir", "built-oci-dir")):
            path = base / out
            pm.run("save", "-q", "--format", fmt, "-o", str(path), "localhost/corpus/built:1")
            transport = {"docker-archive": "docker-archive:", "oci-archive": "oci-archive:",
                         "oci-dir": "oci:"}[fmt] + str(path)
            items.append(Item(f"podman-build-{fmt}", path, transport))
    finally:
        pm.close()
    return items


# --- an image's layers in another order -------------------------------------------------

def _blob(layout: Path, digest: str) -> Path:
    return layout / "blobs/sha256" / digest.split(":", 1)[1]


def _put(layout: Path, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    _blob(layout, digest).write_bytes(data)
    return digest


def reorder(layout: Path, tag: str, order: list[int], dest: Path) -> None:
    """A copy of the OCI layout at ``dest`` holding one image ``tag``: the image ``tag`` with its
    layers in ``order`` (indexes, bottom first), its config's diff_ids to match."""
    shutil.copytree(layout, dest)
    index = json.loads((dest / "index.json").read_text())
    desc = next(m for m in index["manifests"] if m["annotations"]["org.opencontainers.image.ref.name"] == tag)
    manifest = json.loads(_blob(dest, desc["digest"]).read_bytes())
    config = json.loads(_blob(dest, manifest["config"]["digest"]).read_bytes())
    manifest["layers"] = [manifest["layers"][i] for i in order]
    config["rootfs"]["diff_ids"] = [config["rootfs"]["diff_ids"][i] for i in order]
    config.pop("history", None)
    cdata = json.dumps(config).encode()
    manifest["config"] = {**manifest["config"], "digest": _put(dest, cdata), "size": len(cdata)}
    mdata = json.dumps(manifest).encode()
    index["manifests"] = [{"mediaType": desc["mediaType"], "digest": _put(dest, mdata), "size": len(mdata),
                           "annotations": {"org.opencontainers.image.ref.name": tag}}]
    (dest / "index.json").write_text(json.dumps(index))


def layer_tars(layout: Path, tag: str) -> list[bytes]:
    """The uncompressed layer tars of ``tag``, bottom first, exactly as stored."""
    import gzip
    index = json.loads((layout / "index.json").read_text())
    desc = next(m for m in index["manifests"] if m["annotations"]["org.opencontainers.image.ref.name"] == tag)
    manifest = json.loads(_blob(layout, desc["digest"]).read_bytes())
    out = []
    for ly in manifest["layers"]:
        data = _blob(layout, ly["digest"]).read_bytes()
        out.append(gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data)
    return out
