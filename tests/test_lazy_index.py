"""Lazy mounts of ordinary gzip and zstd layers through an index (``unionfs index --push``): an image umoci
built (whiteouts, opaque dirs, hard links, xattrs) pushed by skopeo as plain gzip, and a zstd layer of many
frames made by the zstd tool; the index found through the tag-schema fallback of Debian's docker-registry;
the lazy mount equals the whole pull; one small file costs a fraction of the image; a corrupted span fails
that read alone; an index of another image is refused; skopeo still copies the image as before."""
from __future__ import annotations

import hashlib
import http.client
import http.server
import json
import os
import re
import shutil
import subprocess
import threading

import httpx
import pytest

from helpers import diff_snapshots, snapshot
from podman_env import HAVE_PODMAN, Podman
from registry_server import Registry, have_registry
from test_estargz import lazy_mount, mounted
from test_image_interop import _w, umoci_image  # noqa: F401  (the module-scoped fixture)
from test_registry_interop import registry_rootfs, sh
from test_registry_pull_push import ok, one_line_error, run

pytestmark = pytest.mark.skipif(not (have_registry() and shutil.which("umoci") and shutil.which("skopeo")),
                                reason="docker-registry, umoci and skopeo are needed (scripts/setup --test)")

BIG = 3 << 20


@pytest.fixture(scope="module")
def big_image(tmp_path_factory, umoci_image):  # noqa: F811
    """umoci's four-layer image (whiteouts, hard links, xattrs), an opaque /srv and a whiteout (umoci insert),
    and a last layer of two incompressible 3 MiB files and a small one; (layout, its rootfs as umoci unpacks it)."""
    layout, rootfs, _, _ = umoci_image
    base = tmp_path_factory.mktemp("bigimg")
    lay, bundle = base / "oci", base / "bundle"
    shutil.copytree(layout, lay)
    _w(base / "srv", "only", b"the opaque dir's one file\n")
    sh("umoci", "insert", "--image", f"{lay}:app", "--opaque", str(base / "srv"), "/srv")
    sh("umoci", "insert", "--image", f"{lay}:app", "--whiteout", "/usr/lib/libb.so")
    sh("umoci", "unpack", "--image", f"{lay}:app", str(bundle))
    r = bundle / "rootfs"
    _w(r, "opt/big1", os.urandom(BIG))
    _w(r, "opt/big2", os.urandom(BIG))
    _w(r, "opt/small.txt", b"small and cheap\n")
    sh("umoci", "repack", "--refresh-bundle", "--image", f"{lay}:app", str(bundle))
    final = base / "final"
    sh("umoci", "unpack", "--image", f"{lay}:app", str(final))
    assert sorted(os.listdir(final / "rootfs/srv")) == ["only"] and not (final / "rootfs/usr/lib/libb.so").exists()
    return lay, final / "rootfs"


def _blob_gets(reg: Registry) -> list[str]:
    return [x for x in reg.access_log() if x.startswith("GET ") and "/blobs/" in x]


def lazy_dirs(store):
    return [p for p in (store / "layers").iterdir() if (p / "lazy.index").exists()]


def local(store) -> dict[str, tuple[int, int]]:
    from unionfs.registry.indexed import local_bytes
    return {json.loads((p / "lazy.json").read_text())["digest"]: local_bytes(str(p)) for p in lazy_dirs(store)}


def test_gzip_index_pushed_found_and_served_lazily(tmp_path, big_image):
    layout, rootfs = big_image
    with Registry(tmp_path / "reg") as reg:
        ref = f"{reg.host}/idx/app:1"
        sh("skopeo", "copy", "-q", "--dest-tls-verify=false", f"oci:{layout}:app", f"docker://{ref}")
        manifest = sh("skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{ref}").encode()
        mdigest = "sha256:" + hashlib.sha256(manifest).hexdigest()
        layers = json.loads(manifest)["layers"]
        assert len(layers) == 7 and all(ly["mediaType"].endswith("+gzip") for ly in layers)

        # with no index, --lazy pulls plain gzip layers whole
        plain = tmp_path / "plain"
        r = ok(run(tmp_path, "--root", str(plain), "pull", "--lazy", "--whole-below", "0", ref, "--insecure"))
        assert "0 lazy, 7 pulled whole" in r.stderr, r.stderr

        r = ok(run(tmp_path, "index", "--push", "--spacing", "262144", "--span", "65536", ref, "--insecure"))
        art = r.stdout.strip()
        assert art.startswith("sha256:") and "fallback tag" in r.stderr, r.stderr
        # the fallback tag names an OCI index listing the artifact, which refers to the image's manifest
        listing = json.loads(sh("skopeo", "inspect", "--raw", "--tls-verify=false",
                                f"docker://{reg.host}/idx/app:{mdigest.replace(':', '-')}"))
        assert [(d["digest"], d["artifactType"]) for d in listing["manifests"]] == \
            [(art, "application/vnd.unionfs.lazy.index.v1+json")]
        with httpx.Client() as http:
            got = http.get(f"http://{reg.host}/v2/idx/app/manifests/{art}",
                           headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}).json()
        assert got["subject"]["digest"] == mdigest and len(got["layers"]) == 7
        # pushed again: the same artifact, listed once
        assert ok(run(tmp_path, "index", "--push", "--spacing", "262144", "--span", "65536", ref,
                      "--insecure")).stdout.strip() == art

        # outside tools still take the image as before
        again = registry_rootfs(ref, tmp_path)
        assert not diff_snapshots(snapshot(rootfs), again), "\n".join(diff_snapshots(snapshot(rootfs), again))

        whole = tmp_path / "whole"
        ok(run(tmp_path, "--root", str(whole), "pull", ref, "--insecure"))
        gets = len(_blob_gets(reg))
        expected = mounted(tmp_path, whole, ref)
        # the image as stored (pulled whole) is indexed from the store's blobs: the same index
        r = ok(run(tmp_path, "--root", str(whole), "index", "--push", "--spacing", "262144", "--span", "65536", ref,
                   "--insecure"))
        assert r.stdout.strip() == art
        assert len(_blob_gets(reg)) == gets, "indexed from the store, not the registry"

        lazy = tmp_path / "lazy"
        r = ok(run(tmp_path, "--root", str(lazy), "pull", "--lazy", "--whole-below", "0", ref, "--insecure"))
        assert "7 lazy, 0 pulled whole" in r.stderr, r.stderr
        assert all(have == 0 for have, _ in local(lazy).values())
        got = mounted(tmp_path, lazy, ref, "--no-fill")
        assert not diff_snapshots(expected, got), "\n".join(diff_snapshots(expected, got))
        assert "bytes local (" in ok(run(tmp_path, "--root", str(lazy), "images")).stdout

        # one small file: a fraction of the image is fetched
        fresh = tmp_path / "fresh"
        ok(run(tmp_path, "--root", str(fresh), "pull", "--lazy", "--whole-below", "0", ref, "--insecure"))
        mnt, log_file = tmp_path / "mnt", tmp_path / "daemon.log"
        with lazy_mount(tmp_path, fresh, ref, mnt, log_file):
            assert (mnt / "opt/small.txt").read_bytes() == b"small and cheap\n"
            have = sum(h for h, _ in local(fresh).values())
            total = sum(ly["size"] for ly in layers)
            assert have <= total // 8, (have, total)

            # a span changed under us: that read fails alone, the retry after the repair succeeds
            big = layers[-1]["digest"]
            blob = reg.blob_file(big)
            original = blob.read_bytes()
            bad = bytearray(original)
            at = len(original) - 200_000   # in big2's data
            bad[at] ^= 0xFF
            blob.write_bytes(bytes(bad))
            with pytest.raises(OSError) as e:
                (mnt / "opt/big2").read_bytes()
            assert e.value.errno == 5
            assert (mnt / "etc/hosts").read_bytes() == b"10.0.0.1 app\n"
            assert big in log_file.read_text()
            blob.write_bytes(original)
            assert (mnt / "opt/big2").read_bytes() == (rootfs / "opt/big2").read_bytes()
            reg.stop()   # gone: what is local still reads, the rest fails alone, until it is back
            assert (mnt / "opt/big2").read_bytes() == (rootfs / "opt/big2").read_bytes()
            with pytest.raises(OSError) as e:
                (mnt / "opt/big1").read_bytes()
            assert e.value.errno == 5
            reg.start()
            gets = len(_blob_gets(reg))
            assert (mnt / "opt/big1").read_bytes() == (rootfs / "opt/big1").read_bytes()
            # 48 spans of 64 KiB, fetched in runs as the checkpoints estimate them, not one request per span
            assert len(_blob_gets(reg)) - gets <= 12, _blob_gets(reg)[gets:]


def test_background_fill_makes_an_indexed_layer_ordinary(tmp_path, big_image):
    layout, rootfs = big_image
    with Registry(tmp_path / "reg") as reg:
        ref = f"{reg.host}/idx/app:1"
        sh("skopeo", "copy", "-q", "--dest-tls-verify=false", f"oci:{layout}:app", f"docker://{ref}")
        ok(run(tmp_path, "index", "--push", "--spacing", "262144", ref, "--insecure"))
        lazy = tmp_path / "lazy"
        ok(run(tmp_path, "--root", str(lazy), "pull", "--lazy", ref, "--insecure"))   # small layers whole
        dirs = lazy_dirs(lazy)
        assert len(dirs) == 1
        # a recorded prefetch list (run --record-prefetch) orders the fill of an indexed layer too: its file first
        from unionfs.image import prefetch, seekable
        from unionfs.image.store import Store
        prefetch.save(Store(str(lazy)), Store(str(lazy)).resolve(ref), ["opt/small.txt"])
        ix = seekable.decode((dirs[0] / "lazy.index").read_bytes(), "t")
        (small,) = [m.data_offset for m in ix.members if m.info.name.endswith("opt/small.txt")]
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        ok(run(tmp_path, "--root", str(lazy), "mount", ref, str(mnt), "--log", str(tmp_path / "d.log")))
        try:
            import time
            deadline = time.monotonic() + 120   # a bound on waiting, not a measurement
            while (dirs[0] / "lazy.json").exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            assert (dirs[0] / "lazy.done").exists(), (tmp_path / "d.log").read_text()
            assert (dirs[0] / "lazy-filled").read_text().split()[0] == str(small)
            reg.stop()
            got = snapshot(mnt)
        finally:
            ok(run(tmp_path, "umount", str(mnt)))
        assert not diff_snapshots(snapshot(rootfs), got), "\n".join(diff_snapshots(snapshot(rootfs), got))


def test_an_index_of_another_image_is_refused(tmp_path, big_image, umoci_image):  # noqa: F811
    layout, _ = big_image
    small_layout = umoci_image[0]
    with Registry(tmp_path / "reg") as reg:
        a, b = f"{reg.host}/idx/app:a", f"{reg.host}/idx/app:b"
        sh("skopeo", "copy", "-q", "--dest-tls-verify=false", f"oci:{layout}:app", f"docker://{a}")
        sh("skopeo", "copy", "-q", "--dest-tls-verify=false", f"oci:{small_layout}:app", f"docker://{b}")
        ok(run(tmp_path, "index", "--push", a, "--insecure"))
        digest = {}
        for ref in (a, b):
            raw = sh("skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{ref}").encode()
            digest[ref] = "sha256:" + hashlib.sha256(raw).hexdigest()
        with httpx.Client() as http:   # a's referrer list put under b's fallback tag
            url = f"http://{reg.host}/v2/idx/app/manifests/"
            listing = http.get(url + digest[a].replace(":", "-"),
                               headers={"Accept": "application/vnd.oci.image.index.v1+json"}).content
            put = http.put(url + digest[b].replace(":", "-"), content=listing,
                           headers={"Content-Type": "application/vnd.oci.image.index.v1+json"})
            assert put.status_code == 201, put.text
        lazy = tmp_path / "lazy"
        one_line_error(run(tmp_path, "--root", str(lazy), "pull", "--lazy", "--whole-below", "0", b, "--insecure"),
                       "refers to", digest[a], digest[b])
        assert not (lazy / "images").exists() or not list((lazy / "images").iterdir())

        # an index of a's own layers whose file table lies (a mode): a read of that file checks its header
        # in the blob and fails with EIO (the tree shows the lie until then: README "Lazy images")
        from unionfs.image import seekable
        from unionfs.registry.client import Client
        from unionfs.registry.referrers import Blob, find_artifact, push_artifact
        with Client(reg.host, "idx/app", actions=("pull", "push"), insecure=True) as client:
            _, art = find_artifact(client, digest[a], seekable.ARTIFACT_TYPE)
            blobs = []
            for d in art["layers"]:
                ix = seekable.decode(client.get_small_blob(d["digest"]), "t")
                for m in ix.members:
                    if m.info.name == "opt/small.txt":
                        m.info.mode = 0o4755
                blobs.append(Blob(d["mediaType"], seekable.encode(ix), d["annotations"]))
            push_artifact(client, art["subject"], seekable.ARTIFACT_TYPE, blobs)
        ok(run(tmp_path, "--root", str(lazy), "pull", "--lazy", "--whole-below", "0", a, "--insecure"))
        mnt, log_file = tmp_path / "mnt", tmp_path / "d.log"
        with lazy_mount(tmp_path, lazy, a, mnt, log_file):
            with pytest.raises(OSError) as e:
                (mnt / "opt/small.txt").read_bytes()
            assert e.value.errno == 5
            assert "does not describe" in log_file.read_text()
            assert (mnt / "etc/hosts").read_bytes() == b"10.0.0.1 app\n"


@pytest.mark.skipif(not shutil.which("zstd"), reason="the zstd tool is needed")
def test_zstd_layers_in_frames_are_indexed_and_one_frame_is_pulled_whole(tmp_path, big_image):
    """A zstd layer of many frames (the zstd tool, one frame per 256 KiB of tar) is served lazily; a layer of
    one zstd frame (skopeo --dest-compress-format zstd) cannot be entered in the middle and is pulled whole."""
    layout, rootfs = big_image
    lay = tmp_path / "oci"
    shutil.copytree(layout, lay)
    index = json.loads((lay / "index.json").read_text())
    mdesc = next(m for m in index["manifests"] if m["annotations"]["org.opencontainers.image.ref.name"] == "app")
    blobs = lay / "blobs/sha256"
    manifest = json.loads((blobs / mdesc["digest"][7:]).read_text())
    last = manifest["layers"][-1]
    tar = tmp_path / "layer.tar"
    tar.write_bytes(subprocess.run(["gzip", "-dc", str(blobs / last["digest"][7:])], capture_output=True,
                                   check=True).stdout)
    pieces = tmp_path / "pieces"
    pieces.mkdir()
    sh("split", "-b", "262144", "-d", "-a", "4", str(tar), str(pieces / "p"))
    frames = b"".join(subprocess.run(["zstd", "-q", "-c", str(p)], capture_output=True, check=True).stdout
                      for p in sorted(pieces.iterdir()))
    digest = hashlib.sha256(frames).hexdigest()
    (blobs / digest).write_bytes(frames)
    last.update(mediaType="application/vnd.oci.image.layer.v1.tar+zstd", digest="sha256:" + digest, size=len(frames))
    data = json.dumps(manifest).encode()
    mdesc.update(digest="sha256:" + hashlib.sha256(data).hexdigest(), size=len(data))
    (blobs / mdesc["digest"][7:]).write_bytes(data)
    (lay / "index.json").write_text(json.dumps(index))
    with Registry(tmp_path / "reg") as reg:
        ref, one = f"{reg.host}/idx/zst:1", f"{reg.host}/idx/zst:one"
        sh("skopeo", "copy", "-q", "--dest-tls-verify=false", f"oci:{lay}:app", f"docker://{ref}")
        r = ok(run(tmp_path, "index", "--push", "--spacing", "262144", "--span", "65536", ref, "--insecure"))
        assert "zstd" in r.stderr, r.stderr
        lazy = tmp_path / "lazy"
        r = ok(run(tmp_path, "--root", str(lazy), "pull", "--lazy", ref, "--insecure"))
        assert "1 lazy, 6 pulled whole" in r.stderr, r.stderr
        whole = tmp_path / "whole"
        ok(run(tmp_path, "--root", str(whole), "pull", ref, "--insecure"))
        expected = mounted(tmp_path, whole, ref)
        assert mounted(tmp_path, lazy, ref, "--no-fill") == expected

        # through a layout, as skopeo would otherwise reuse the gzip blobs the registry already has
        sh("skopeo", "copy", "-q", "--dest-compress-format", "zstd", f"oci:{layout}:app", f"oci:{tmp_path / 'z1'}:app")
        sh("skopeo", "copy", "-q", "--dest-tls-verify=false", f"oci:{tmp_path / 'z1'}:app", f"docker://{one}")
        r = run(tmp_path, "index", "--push", one, "--insecure")
        one_line_error(r, "no layer can be indexed")
        assert "one frame" in r.stderr, r.stderr
        r = ok(run(tmp_path, "--root", str(tmp_path / "one"), "pull", "--lazy", one, "--insecure"))
        assert "0 lazy, 7 pulled whole" in r.stderr, r.stderr


@pytest.mark.skipif(not os.path.exists("/bin/busybox") or not (shutil.which("crun") or shutil.which("runc")),
                    reason="busybox-static and crun or runc are needed")
def test_run_lazy_through_an_index(tmp_path):
    """run --lazy REF of a plain gzip image with a pushed index: the container reads its shell lazily."""
    from container_images import busybox_image
    lazy = tmp_path / "lazy"
    busybox_image(tmp_path / "bb.tar", "bb:1")
    with Registry(tmp_path / "reg") as reg:
        ref = f"{reg.host}/idx/bb:1"
        sh("skopeo", "copy", "-q", "--dest-compress", "--dest-tls-verify=false", f"docker-archive:{tmp_path / 'bb.tar'}",
           f"docker://{ref}")   # gzip'd by skopeo
        ok(run(tmp_path, "index", "--push", "--spacing", "262144", ref, "--insecure"))
        r = ok(run(tmp_path, "--root", str(lazy), "run", "--rm", "--user", "0", "--lazy", "--whole-below", "0",
                   "--insecure", ref, "sh", "-c", "echo started; head -1 /etc/passwd"))
        assert r.stdout.splitlines()[0] == "started" and r.stdout.splitlines()[1].startswith("root:x:0:0:"), r.stdout
        assert "1 lazy, 0 pulled whole" in r.stderr, r.stderr
        if HAVE_PODMAN:   # podman pulls and runs the image as before: the index is beside it, not in it
            pm = Podman(tmp_path / "podman")
            try:
                pm("pull", "-q", "--tls-verify=false", ref)
                assert pm.sh(ref, "head -1 /etc/passwd").splitlines() == [r.stdout.splitlines()[1]]
            finally:
                pm.close()


def test_index_format_both_ways_and_hostile_indexes_refused(tmp_path):
    """An index of a layer GNU tar and gzip made reads back as it was written; an index whose fields lie about
    the blob (checkpoints, spans, headers) is refused with one line before any C parser sees it."""
    import base64
    import gzip
    import struct
    from unionfs.image import seekable
    from unionfs.image.model import ImageError
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d/big").write_bytes(os.urandom(300_000))
    (src / "d/small").write_text("hi\n")
    os.link(src / "d/small", src / "d/hard")
    os.setxattr(src / "d/small", "user.k", b"v")
    sh("tar", "--xattrs", "--format=pax", "-C", str(src), "-cf", str(tmp_path / "l.tar"), "d")
    plain = (tmp_path / "l.tar").read_bytes()
    sh("gzip", "-k", str(tmp_path / "l.tar"))
    blob = (tmp_path / "l.tar.gz").read_bytes()
    digest, diff_id = ("sha256:" + hashlib.sha256(x).hexdigest() for x in (blob, plain))
    ix = seekable.build(str(tmp_path / "l.tar.gz"), digest, diff_id, "t", spacing=65536, span=4096)
    assert seekable.encode(seekable.decode(seekable.encode(ix), "t")) == seekable.encode(ix)
    small = next(m for m in ix.members if m.info.name == "d/small")
    assert small.info.pax_headers.get("SCHILY.xattr.user.k") == "v"
    assert plain[small.data_offset:small.data_offset + 3] == b"hi\n"
    assert next(m for m in ix.members if m.info.name == "d/hard").info.linkname == "d/small"
    r = seekable.Reader(ix, lambda a, b: blob[a:b])
    big = next(m for m in ix.members if m.info.name == "d/big")
    assert r.read(big.data_offset + 200_000, 5000) == plain[big.data_offset + 200_000:big.data_offset + 205_000]
    with pytest.raises(ImageError, match="digest"):
        seekable.build(str(tmp_path / "l.tar.gz"), "sha256:" + "0" * 64, diff_id, "t")

    doc = json.loads(gzip.decompress(seekable.encode(ix)))

    def refused(change, words):
        d = json.loads(json.dumps(doc))
        change(d)
        with pytest.raises(ImageError, match=words):
            seekable.decode(gzip.compress(json.dumps(d).encode()), "t")

    def gzidx(d, at, fmt, value):
        raw = bytearray(gzip.decompress(base64.b64decode(d["gzip_index"])))
        struct.pack_into(fmt, raw, at, value)
        d["gzip_index"] = base64.b64encode(gzip.compress(bytes(raw))).decode()

    refused(lambda d: gzidx(d, 7, "<Q", len(blob) + 1), "not an index of this blob")
    refused(lambda d: gzidx(d, 35 + 18 * 1 + 16, "<B", 9), "out of order or outside")
    refused(lambda d: d["spans"].reverse(), "do not cut the blob")
    refused(lambda d: d["members"][0].update(header=d["members"][0]["offset"]), "header is not before")
    refused(lambda d: d.update(compression="xz"), "compression")
    refused(lambda d: d["members"][1].update(mode=-1), "negative")
    with pytest.raises(ImageError, match="not an index"):
        seekable.decode(b"not gzip", "t")


class ReferrersProxy:
    """Distribution spec 1.1's referrers API in front of Debian's docker-registry 2.8, which has none (a mock:
    no registry with the API can run here): a manifest PUT with a ``subject`` is answered ``OCI-Subject`` and
    listed under ``/v2/<name>/referrers/<digest>``; everything else goes to the registry unchanged."""

    def __init__(self, upstream_port: int) -> None:
        self.listed: dict[str, list[dict]] = {}
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _reply(self, status, headers, body):
                self.send_response(status)
                for k, v in headers:
                    if k.lower() not in ("connection", "transfer-encoding", "keep-alive", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "close")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)
                self.close_connection = True

            def _handle(self):
                m = re.fullmatch(r"/v2/(.+)/referrers/(sha256:[0-9a-f]{64})(\?.*)?", self.path)
                if m and self.command == "GET":
                    body = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                                       "manifests": proxy.listed.get(m.group(2), [])}).encode()
                    return self._reply(200, [("Content-Type", "application/vnd.oci.image.index.v1+json")], body)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                up = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=30)
                up.request(self.command, self.path, body=body,
                           headers={k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")})
                resp = up.getresponse()
                headers, data = resp.getheaders(), resp.read()
                up.close()
                if self.command == "PUT" and "/manifests/" in self.path and resp.status == 201:
                    doc = json.loads(body)
                    if "subject" in doc:
                        proxy.listed.setdefault(doc["subject"]["digest"], []).append(
                            {"mediaType": doc["mediaType"], "digest": "sha256:" + hashlib.sha256(body).hexdigest(),
                             "size": len(body), "artifactType": doc["artifactType"]})
                        headers = [*headers, ("OCI-Subject", doc["subject"]["digest"])]
                self._reply(resp.status, headers, data)

            do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = _handle

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_referrers_api_used_where_the_registry_has_it(tmp_path, umoci_image):  # noqa: F811
    """With the referrers API, the index is pushed and found through it, and no fallback tag is written."""
    layout = umoci_image[0]
    with Registry(tmp_path / "reg") as reg:
        proxy = ReferrersProxy(reg.port)
        try:
            ref = f"{proxy.host}/idx/app:1"
            sh("skopeo", "copy", "-q", "--dest-tls-verify=false", f"oci:{layout}:app", f"docker://{ref}")
            r = ok(run(tmp_path, "index", "--push", ref, "--insecure"))
            assert "the referrers API" in r.stderr, r.stderr
            [(subject, listed)] = proxy.listed.items()
            assert [d["digest"] for d in listed] == [r.stdout.strip()]
            tags = json.loads(sh("skopeo", "list-tags", "--tls-verify=false", f"docker://{ref.rsplit(':', 1)[0]}"))
            assert tags["Tags"] == ["1"]   # no sha256-<hex> tag
            lazy = tmp_path / "lazy"
            r = ok(run(tmp_path, "--root", str(lazy), "pull", "--lazy", "--whole-below", "0", ref, "--insecure"))
            assert "4 lazy, 0 pulled whole" in r.stderr, r.stderr
            got = mounted(tmp_path, lazy, ref, "--no-fill")
            whole = tmp_path / "whole"
            ok(run(tmp_path, "--root", str(whole), "pull", ref, "--insecure"))
            assert got == mounted(tmp_path, whole, ref)
        finally:
            proxy.close()
