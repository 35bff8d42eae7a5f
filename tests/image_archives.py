"""Building image archives for tests: layer tars, docker-save (both forms) and OCI layouts, in Python.

Everything is built from bytes, so a test can make any archive a real tool would
write, and any hostile or broken one it must refuse.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import stat
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import zstandard


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Entry:
    name: str
    data: bytes = b""
    type: bytes = tarfile.REGTYPE
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: int = 1_600_000_000
    linkname: str = ""
    devmajor: int = 0
    devminor: int = 0
    pax: dict = field(default_factory=dict)
    size: int | None = None  # override the header's size (hostile archives)


def f(name, data=b"", mode=0o644, **kw) -> Entry:
    return Entry(name, data, tarfile.REGTYPE, mode, **kw)


def d(name, mode=0o755, **kw) -> Entry:
    return Entry(name, b"", tarfile.DIRTYPE, mode, **kw)


def sym(name, target, **kw) -> Entry:
    return Entry(name, b"", tarfile.SYMTYPE, 0o777, linkname=target, **kw)


def hard(name, target, **kw) -> Entry:
    return Entry(name, b"", tarfile.LNKTYPE, 0o644, linkname=target, **kw)


def layer_tar(entries: list[Entry], end_blocks: bool = True) -> bytes:
    """An uncompressed layer tar (PAX format); without the end-of-archive blocks if asked."""
    buf = io.BytesIO()
    tf = tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT)
    for e in entries:
        ti = tarfile.TarInfo(e.name)
        ti.type, ti.mode, ti.uid, ti.gid, ti.mtime = e.type, e.mode, e.uid, e.gid, e.mtime
        ti.linkname, ti.devmajor, ti.devminor = e.linkname, e.devmajor, e.devminor
        ti.pax_headers = dict(e.pax)
        if e.size is not None:  # a header that lies about the size: written by hand
            ti.size = e.size
            tf.fileobj.write(ti.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape"))
            tf.fileobj.write(e.data)
            tf.offset += tarfile.BLOCKSIZE + len(e.data)
            continue
        ti.size = len(e.data) if e.type == tarfile.REGTYPE else 0
        tf.addfile(ti, io.BytesIO(e.data) if e.type == tarfile.REGTYPE else None)
    if end_blocks:
        tf.close()
        return buf.getvalue()
    return buf.getvalue()  # no close(): no zero blocks, no record padding (as umoci 0.4.7 writes)


def compress(data: bytes, how: str | None) -> bytes:
    if how == "gzip":
        return gzip.compress(data, mtime=0)
    if how == "zstd":
        return zstandard.ZstdCompressor().compress(data)
    return data


def config(diff_ids: list[str], history: list[dict] | None = None, **cfg) -> bytes:
    c = {
        "created": "2024-01-02T03:04:05.123456789Z", "author": "tests", "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/usr/bin:/bin"], "Cmd": ["/bin/sh"], "WorkingDir": "/", **cfg},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    if history is not None:
        c["history"] = history
    return json.dumps(c).encode()


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    ti.mode = 0o644
    tf.addfile(ti, io.BytesIO(data))


def _add_symlink(tf: tarfile.TarFile, name: str, target: str) -> None:
    ti = tarfile.TarInfo(name)
    ti.type = tarfile.SYMTYPE
    ti.linkname = target
    tf.addfile(ti)


@dataclass
class Img:
    layers: list[bytes]                   # uncompressed layer tars, base first
    tags: list[str]
    compression: str | None = None        # for OCI layouts
    config: bytes | None = None           # default: built from the layers
    history: list[dict] | None = None

    def diff_ids(self) -> list[str]:
        return [sha(layer) for layer in self.layers]

    def config_bytes(self) -> bytes:
        return self.config if self.config is not None else config(self.diff_ids(), self.history)


def docker_save_legacy(path: Path, images: list[Img], symlink_shared: bool = True, mutate=None) -> None:
    """Docker < 25's ``docker save``: <v1id>/layer.tar (a layer seen before is a symlink to it),
    <config hex>.json, manifest.json, repositories.  ``mutate(manifest)`` may change (or return a
    replacement for) the manifest.json document before it is written (hostile archives)."""
    seen: dict[str, str] = {}
    manifest, repos = [], {}
    with tarfile.open(path, "w") as tf:
        for img in images:
            cfg = img.config_bytes()
            names = []
            for i, layer in enumerate(img.layers):
                v1 = hashlib.sha256(cfg + str(i).encode()).hexdigest()
                diff = sha(layer)
                _add(tf, f"{v1}/VERSION", b"1.0")
                if diff in seen and symlink_shared:
                    _add_symlink(tf, f"{v1}/layer.tar", f"../{seen[diff]}/layer.tar")
                else:
                    _add(tf, f"{v1}/layer.tar", layer)
                    seen.setdefault(diff, v1)
                names.append(f"{v1}/layer.tar")
            _add(tf, sha(cfg)[7:] + ".json", cfg)
            manifest.append({"Config": sha(cfg)[7:] + ".json", "RepoTags": img.tags, "Layers": names})
            for t in img.tags:
                repo, _, tag = t.rpartition(":")
                repos.setdefault(repo, {})[tag] = names[-1].split("/")[0]
        if mutate is not None:
            changed = mutate(manifest)
            manifest = manifest if changed is None else changed
        _add(tf, "manifest.json", manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode())
        _add(tf, "repositories", json.dumps(repos).encode())


def oci_layout(target: Path | None, images: list[Img], tar_path: Path | None = None, docker25: bool = False,
               ref_names: bool = True) -> dict[str, bytes]:
    """An OCI image layout as a directory (``target``) or a tar (``tar_path``); with ``docker25`` also
    Docker >= 25's manifest.json and full names in annotations.  Returns the files written."""
    files: dict[str, bytes] = {"oci-layout": b'{"imageLayoutVersion": "1.0.0"}'}
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": []}
    docker_manifest = []
    for img in images:
        cfg = img.config_bytes()
        files[f"blobs/sha256/{sha(cfg)[7:]}"] = cfg
        descs = []
        for layer in img.layers:
            blob = compress(layer, img.compression)
            files[f"blobs/sha256/{sha(blob)[7:]}"] = blob
            media = "application/vnd.oci.image.layer.v1.tar" + {"gzip": "+gzip", "zstd": "+zstd", None: ""}[img.compression]
            descs.append({"mediaType": media, "digest": sha(blob), "size": len(blob)})
        m = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha(cfg),
                                   "size": len(cfg)},
                        "layers": descs}).encode()
        files[f"blobs/sha256/{sha(m)[7:]}"] = m
        for t in img.tags or [None]:
            desc = {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": sha(m), "size": len(m)}
            if t and ref_names:
                if docker25:
                    desc["annotations"] = {"io.containerd.image.name": "docker.io/library/" + t,
                                           "org.opencontainers.image.ref.name": t.rpartition(":")[2]}
                else:
                    desc["annotations"] = {"org.opencontainers.image.ref.name": t}
            index["manifests"].append(desc)
        docker_manifest.append({"Config": f"blobs/sha256/{sha(cfg)[7:]}", "RepoTags": img.tags,
                                "Layers": [f"blobs/sha256/{x['digest'][7:]}" for x in descs]})
    files["index.json"] = json.dumps(index).encode()
    if docker25:
        files["manifest.json"] = json.dumps(docker_manifest).encode()
    write_files(files, target, tar_path)
    return files


def write_files(files: dict[str, bytes], target: Path | None = None, tar_path: Path | None = None) -> None:
    """Files (as :func:`oci_layout` returns them) as a directory and/or a tar."""
    if target is not None:
        for name, data in files.items():
            p = target / name
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
    if tar_path is not None:
        with tarfile.open(tar_path, "w") as tf:
            for name, data in files.items():
                _add(tf, name, data)


def store_listing(root: Path) -> dict[str, tuple]:
    """Everything in a store, byte for byte (types, modes, owners, sizes, contents, links, xattrs, mtimes)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode):
                data = hashlib.sha256(open(p, "rb").read()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                data = os.readlink(p)
            else:
                data = st.st_rdev
            try:
                xattrs = {n: os.getxattr(p, n, follow_symlinks=False) for n in os.listxattr(p, follow_symlinks=False)}
            except OSError:
                xattrs = {}
            out[os.path.relpath(p, root)] = (st.st_mode, st.st_uid, st.st_gid, st.st_size, data, xattrs,
                                            st.st_mtime_ns if not stat.S_ISDIR(st.st_mode) else None)
        dirnames[:] = [x for x in dirnames if not os.path.islink(os.path.join(dirpath, x))]
    return out
