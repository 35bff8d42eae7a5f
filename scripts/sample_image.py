"""Build a small sample image as ``docker save`` would write it (Docker >= 25 form: an OCI layout
plus manifest.json in one tar), with gzip layers and OCI whiteouts, from bytes only.

Usage: python scripts/sample_image.py FILE.tar   (a few KiB; the same bytes every time)
"""
import gzip
import hashlib
import io
import json
import sys
import tarfile

MTIME = 1_700_000_000


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def layer(entries: list[tuple]) -> bytes:
    """entries: (name, data or None for a directory or "->target" for a symlink, mode)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data, mode in entries:
            ti = tarfile.TarInfo(name)
            ti.mtime, ti.mode = MTIME, mode
            if data is None:
                ti.type = tarfile.DIRTYPE
                tf.addfile(ti)
            elif isinstance(data, str) and data.startswith("->"):
                ti.type, ti.linkname = tarfile.SYMTYPE, data[2:]
                tf.addfile(ti)
            else:
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


BASE = layer([
    ("etc", None, 0o755), ("etc/os-release", b'NAME="Sample Linux"\nVERSION="1.0"\n', 0o644),
    ("etc/motd", b"Welcome to the base layer\n", 0o644),
    ("bin", None, 0o755), ("bin/hello", b"#!/bin/sh\necho hello from the base layer\n", 0o755),
    ("bin/hi", "->/bin/hello", 0o777),
    ("var/cache", None, 0o755), ("var/cache/old.db", b"stale cache\n", 0o644),
    ("var/cache/index", b"stale index\n", 0o644),
    ("usr/share/doc", None, 0o755), ("usr/share/doc/readme", b"base docs\n", 0o644),
])
UPDATE = layer([
    ("etc/os-release", b'NAME="Sample Linux"\nVERSION="1.1"\n', 0o644),
    ("etc/.wh.motd", b"", 0o644),                              # deleted in this layer
    ("var/cache", None, 0o755), ("var/cache/.wh..wh..opq", b"", 0o644),   # cache replaced wholesale
    ("var/cache/fresh.db", b"fresh cache\n", 0o644),
    ("usr/share/doc/changelog", b"1.1: fixed things\n", 0o644),
])
APP = layer([
    ("app", None, 0o755), ("app/main.py", b"print('hello from the app layer')\n", 0o755),
    ("etc/app.conf", b"port=8080\n", 0o644),
    ("usr/share/doc/.wh.readme", b"", 0o644),
])
HISTORY = [("ADD base.tar /", "the base system"), ("RUN update", ""), ("ENV APP_PORT=8080", None),
           ("COPY app /app", "")]


def build(out: str) -> None:
    layers = [BASE, UPDATE, APP]
    history = []
    for i, (by, comment) in enumerate(HISTORY):
        h = {"created": f"2024-05-01T12:00:0{i}Z", "created_by": by}
        if comment is None:
            h["empty_layer"] = True
        elif comment:
            h["comment"] = comment
        history.append(h)
    config = json.dumps({
        "created": "2024-05-01T12:00:03Z", "author": "unionfs demo", "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/bin:/usr/bin", "APP_PORT=8080"], "Cmd": ["/app/main.py"], "WorkingDir": "/app",
                   "ExposedPorts": {"8080/tcp": {}}, "Labels": {"org.opencontainers.image.title": "sample"}},
        "rootfs": {"type": "layers", "diff_ids": [sha(x) for x in layers]},
        "history": history,
    }, indent=2).encode()
    blobs = {sha(config): config}
    descs = []
    for x in layers:
        z = gzip.compress(x, mtime=0)
        blobs[sha(z)] = z
        descs.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": sha(z), "size": len(z)})
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                      "digest": sha(config), "size": len(config)},
                           "layers": descs}).encode()
    blobs[sha(manifest)] = manifest
    files = {f"blobs/sha256/{d[7:]}": data for d, data in blobs.items()}
    files["oci-layout"] = b'{"imageLayoutVersion": "1.0.0"}'
    files["index.json"] = json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": sha(manifest), "size": len(manifest),
        "annotations": {"io.containerd.image.name": "docker.io/library/sample:1.1",
                        "org.opencontainers.image.ref.name": "1.1"}}]}).encode()
    files["manifest.json"] = json.dumps([{"Config": f"blobs/sha256/{sha(config)[7:]}", "RepoTags": ["sample:1.1"],
                                          "Layers": [f"blobs/sha256/{d['digest'][7:]}" for d in descs]}]).encode()
    with tarfile.open(out, "w") as tf:
        for name in sorted(files):
            ti = tarfile.TarInfo(name)
            ti.size, ti.mtime = len(files[name]), MTIME
            tf.addfile(ti, io.BytesIO(files[name]))


if __name__ == "__main__":
    build(sys.argv[1])
