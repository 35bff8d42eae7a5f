"""eStargz: ``convert --estargz`` and ``push --estargz`` of an image umoci built, read back by outside tools
(skopeo copies it from a real registry, umoci unpacks it to the original tree, Python's gzip reads the blob
as one stream), and by range: footer and TOC by two HTTP range requests, every chunk checked."""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import shutil
import tarfile
import time

import httpx
import pytest

from helpers import diff_snapshots, is_mounted, snapshot
from podman_env import HAVE_PODMAN, Podman
from registry_server import Registry, have_registry
from test_image_interop import umoci_image  # noqa: F401  (the module-scoped fixture)
from test_registry_interop import registry_rootfs, sh
from test_registry_pull_push import ok, one_line_error, pushed_digest, run

from unionfs.image import estargz

pytestmark = pytest.mark.skipif(not (have_registry() and shutil.which("umoci") and shutil.which("skopeo")),
                                reason="docker-registry, umoci and skopeo are needed (scripts/setup --test)")

TOC = estargz.TOC_NAME


def without_toc(snap: dict) -> dict:
    return {k: v for k, v in snap.items() if k != TOC}


def test_writer_keeps_every_member_and_chunks_verify():
    """The blob is one gzip stream to any reader; its tar holds the original members in order, then the TOC."""
    src = io.BytesIO()
    big = bytes(range(256)) * 300   # 76800 bytes: 5 chunks of 16 KiB
    with tarfile.open(fileobj=src, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, kind in (("etc", tarfile.DIRTYPE), ("etc/fifo", tarfile.FIFOTYPE)):
            ti = tarfile.TarInfo(name)
            ti.type = kind
            t.addfile(ti)
        ti = tarfile.TarInfo("etc/big")
        ti.size, ti.mode, ti.uid, ti.pax_headers = len(big), 0o4755, 7, {"SCHILY.xattr.user.k": "v"}
        t.addfile(ti, io.BytesIO(big))
        ln = tarfile.TarInfo("etc/hard")
        ln.type, ln.linkname = tarfile.LNKTYPE, "etc/big"
        t.addfile(ln)
        t.addfile(tarfile.TarInfo("etc/.wh.gone"), io.BytesIO(b""))
    src.seek(0)
    out = io.BytesIO()
    w = estargz.write(src, out, chunk_size=16384)
    blob = out.getvalue()
    assert "sha256:" + hashlib.sha256(blob).hexdigest() == w.digest and len(blob) == w.size
    plain = gzip.decompress(blob)
    assert "sha256:" + hashlib.sha256(plain).hexdigest() == w.diff_id and len(plain) == w.uncompressed_size
    members = tarfile.open(fileobj=io.BytesIO(plain)).getmembers()
    assert [m.name for m in members] == ["etc", "etc/fifo", "etc/big", "etc/hard", "etc/.wh.gone", TOC]
    b = members[2]
    assert (b.mode, b.uid, b.pax_headers.get("SCHILY.xattr.user.k")) == (0o4755, 7, "v")
    toc = estargz.read_toc_member(blob[estargz.parse_footer(blob[-51:]):-51], "t")
    assert "sha256:" + hashlib.sha256(toc).hexdigest() == w.toc_digest
    entries = {e.name: e for e in estargz.parse_toc(toc, "t")}
    assert entries["etc/big"].xattrs == {"user.k": b"v"} and len(entries["etc/big"].chunks) == 5
    assert entries["etc/hard"].type == "hardlink" and entries["etc/hard"].link == "etc/big"
    assert b"".join(estargz.read_chunk(blob[c.offset:], c, "t") for c in entries["etc/big"].chunks) == big
    c = entries["etc/big"].chunks[2]
    damaged = gzip.compress(b"x" * c.size)
    with pytest.raises(Exception, match="chunkDigest"):
        estargz.read_chunk(damaged, c, "t")


def test_push_estargz_skopeo_umoci_and_ranges(tmp_path, umoci_image):  # noqa: F811
    layout, rootfs, docker_archive, _ = umoci_image
    expected = snapshot(rootfs)
    store = tmp_path / "store"
    ok(run(tmp_path, "--root", str(store), "load", str(docker_archive)))
    # convert: a new image in the store whose mount is the original tree plus the TOC file
    ok(run(tmp_path, "--root", str(store), "convert", "--estargz", "--chunk-size", "16384",
           "interop/app:docker", "lazy/app:esgz"))
    got = mounted(tmp_path, store, "lazy/app:esgz", times=False)   # umoci's rootfs: times differ
    assert TOC in got
    assert not diff_snapshots(expected, without_toc(got)), "\n".join(diff_snapshots(expected, without_toc(got)))
    one_line_error(run(tmp_path, "--root", str(store), "convert", "--estargz", "no/such:1", "x:1"), "no/such")

    with Registry(tmp_path / "reg") as reg:
        out = f"{reg.host}/lazy/app:1"
        one_line_error(run(tmp_path, "--root", str(store), "push", "--estargz", "interop/app:docker", "--insecure"),
                       "REFERENCE")
        digest = pushed_digest(ok(run(tmp_path, "--root", str(store), "push", "--estargz", "interop/app:docker",
                                      out, "--insecure")))
        manifest = json.loads(sh("skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{out}"))
        assert sh("skopeo", "inspect", "--format", "{{.Digest}}", "--tls-verify=false", f"docker://{out}").strip() == digest
        layers = manifest["layers"]
        assert len(layers) == 4 and all(ly["mediaType"].endswith("tar+gzip") for ly in layers)
        cfg = json.loads(sh("skopeo", "inspect", "--config", "--tls-verify=false", f"docker://{out}"))
        assert cfg["config"]["Cmd"] == ["/bin/app"]

        # skopeo copies it out and umoci unpacks it (checking each diff_id) to the original tree
        again = without_toc(registry_rootfs(out, tmp_path))
        assert not diff_snapshots(expected, again), "\n".join(diff_snapshots(expected, again))

        # by range, as a lazy reader: the footer, then the TOC, then each chunk, checked
        url = f"http://{reg.host}/v2/lazy/app/blobs/"
        chunks = 0
        with httpx.Client() as http:
            for ly in layers:
                ann = ly["annotations"]
                size = ly["size"]
                r = http.get(url + ly["digest"], headers={"Range": f"bytes={size - 51}-{size - 1}"})
                assert r.status_code == 206 and len(r.content) == 51
                toc_at = estargz.parse_footer(r.content)
                r = http.get(url + ly["digest"], headers={"Range": f"bytes={toc_at}-{size - 52}"})
                assert r.status_code == 206
                toc = estargz.read_toc_member(r.content, ly["digest"])
                assert "sha256:" + hashlib.sha256(toc).hexdigest() == ann[estargz.TOC_DIGEST_ANNOTATION]
                blob = reg.blob_file(ly["digest"]).read_bytes()
                assert int(ann[estargz.UNCOMPRESSED_SIZE_ANNOTATION]) == len(gzip.decompress(blob))
                for e in estargz.parse_toc(toc, ly["digest"]):
                    data = b"".join(estargz.read_chunk(blob[c.offset:], c, e.name) for c in e.chunks)
                    chunks += len(e.chunks)
                    assert e.type != "reg" or "sha256:" + hashlib.sha256(data).hexdigest() == e.digest
        assert chunks >= 8   # liba.so (70000 bytes) alone is 5 chunks


def mounted(tmp_path, store, name, *opts, times=True):
    mnt = tmp_path / f"mnt-{store.name}"
    mnt.mkdir(exist_ok=True)
    ok(run(tmp_path, "--root", str(store), "mount", *opts, name, str(mnt)))
    try:
        return snapshot(mnt, with_times=times)
    finally:
        ok(run(tmp_path, "umount", str(mnt)))
        assert not is_mounted(mnt)


@contextlib.contextmanager
def lazy_mount(tmp_path, store, ref, mnt, log_file):
    """``mount --no-fill`` of a lazy image (only what is read is fetched), its daemon logging to ``log_file``."""
    mnt.mkdir()
    ok(run(tmp_path, "--root", str(store), "mount", "--no-fill", ref, str(mnt), "--log", str(log_file)))
    try:
        yield
    finally:
        ok(run(tmp_path, "umount", str(mnt)))


def _blob_gets(reg: Registry) -> list[str]:
    return [x for x in reg.access_log() if x.startswith("GET ") and "/blobs/" in x]


def test_lazy_pull_mount_equals_whole_pull_and_fails_reads_alone(tmp_path, umoci_image):  # noqa: F811
    """pull --lazy fetches footers and TOCs only; the mount equals the whole pull's; each chunk is fetched once;
    a corrupted chunk or a stopped registry fails that read with EIO, the rest of the mount keeps serving."""
    _, _, docker_archive, _ = umoci_image
    src, whole, lazy = tmp_path / "src", tmp_path / "whole", tmp_path / "lazy"
    ok(run(tmp_path, "--root", str(src), "load", str(docker_archive)))
    ok(run(tmp_path, "--root", str(src), "convert", "--estargz", "--chunk-size", "16384",
           "interop/app:docker", "lazy/app:esgz"))
    with Registry(tmp_path / "reg") as reg:
        ref = f"{reg.host}/lazy/app:1"
        ok(run(tmp_path, "--root", str(src), "push", "lazy/app:esgz", ref, "--insecure"))
        ok(run(tmp_path, "--root", str(whole), "pull", ref, "--insecure"))
        expected = mounted(tmp_path, whole, ref)

        before = len(_blob_gets(reg))
        ok(run(tmp_path, "--root", str(lazy), "pull", "--lazy", "--whole-below", "0", ref, "--insecure"))
        layer_dirs = [p for p in (lazy / "layers").iterdir() if (p / "lazy.json").exists()]
        assert len(layer_dirs) == 4
        # config + (footer, TOC) per layer: no blob fetched whole
        assert len(_blob_gets(reg)) - before == 1 + 2 * 4, _blob_gets(reg)[before:]
        before = len(_blob_gets(reg))
        got = mounted(tmp_path, lazy, ref, "--no-fill")
        assert not diff_snapshots(expected, got), "\n".join(diff_snapshots(expected, got))
        fetched = sum(len((p / "lazy-present").read_text().split()) for p in layer_dirs)
        report = ok(run(tmp_path, "--root", str(lazy), "images")).stdout
        assert report.count("bytes local (") == 4 and ref in report, report
        assert fetched == len(_blob_gets(reg)) - before and fetched >= 8
        again = mounted(tmp_path, lazy, ref, "--no-fill")   # a second mount reads the cache: no request at all
        assert again == got and len(_blob_gets(reg)) - before == fetched

        # a chunk changed under us in the registry: that read fails, others work, the retry succeeds
        fresh = tmp_path / "fresh"
        ok(run(tmp_path, "--root", str(fresh), "pull", "--lazy", "--whole-below", "0", ref, "--insecure"))
        manifest = json.loads(sh("skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{ref}"))
        first = manifest["layers"][0]["digest"]
        toc = estargz.parse_toc(next(p / "lazy.toc" for p in (fresh / "layers").iterdir()
                                     if json.loads((p / "lazy.json").read_text())["digest"] == first).read_bytes(), "t")
        lib = next(e for e in toc if e.name == "usr/lib/liba.so")
        blob = reg.blob_file(first)
        original = blob.read_bytes()
        bad = bytearray(original)
        at = lib.chunks[1].offset + 30
        bad[at] ^= 0xFF
        blob.write_bytes(bytes(bad))
        mnt, log_file = tmp_path / "mnt-reads", tmp_path / "daemon.log"
        with lazy_mount(tmp_path, fresh, ref, mnt, log_file):
            with pytest.raises(OSError) as e:
                (mnt / "usr/lib/liba.so").read_bytes()
            assert e.value.errno == 5
            assert (mnt / "etc/hosts").read_bytes() == b"10.0.0.1 app\n"
            assert "usr/lib/liba.so" in log_file.read_text()
            blob.write_bytes(original)
            assert (mnt / "usr/lib/liba.so").read_bytes() == b"a" * 70000
            reg.stop()   # gone: what is local still reads, the rest fails alone
            assert (mnt / "usr/lib/liba.so").read_bytes() == b"a" * 70000
            with pytest.raises(OSError) as e:
                (mnt / "etc/passwd").read_bytes()
            assert e.value.errno == 5
            assert (mnt / "etc/hosts").read_bytes() == b"10.0.0.1 app\n"
            reg.start()
            assert (mnt / "etc/passwd").read_bytes().startswith(b"root:x:0:0:")
            # what reads fetched, in order, is what the background fill takes first next time
            from unionfs.image.store import Store
            from unionfs.registry.lazy import LazyFill
            from unionfs.registry.lazy_blob import ACCESS_FILE
            dirs = [str(p) for p in (fresh / "layers").iterdir() if (p / ACCESS_FILE).exists()]
            accessed = [json.loads(x) for d in dirs for x in open(os.path.join(d, ACCESS_FILE))]
            assert "usr/lib/liba.so" in accessed and "etc/hosts" in accessed and "etc/passwd" in accessed
            fill = LazyFill(Store(str(fresh)), dirs)
            fill._index()
            for layer in fill._layers:
                order = [e.name for e in layer.fill_order()]
                assert order[:len(layer.accessed)] == list(layer.accessed)


def test_background_fill_makes_the_layer_ordinary(tmp_path, umoci_image):  # noqa: F811
    """With the background fill, every lazy layer becomes whole, is checked against its digest and diff_id,
    and is an ordinary stored layer: the registry can go, the mount stays whole, push sends the kept blob."""
    _, _, docker_archive, _ = umoci_image
    src, lazy = tmp_path / "src", tmp_path / "lazy"
    ok(run(tmp_path, "--root", str(src), "load", str(docker_archive)))
    ok(run(tmp_path, "--root", str(src), "convert", "--estargz", "--chunk-size", "16384",
           "interop/app:docker", "lazy/app:esgz"))
    expected = mounted(tmp_path, src, "lazy/app:esgz")
    with Registry(tmp_path / "reg") as reg:
        ref = f"{reg.host}/lazy/app:1"
        ok(run(tmp_path, "--root", str(src), "push", "lazy/app:esgz", ref, "--insecure"))
        ok(run(tmp_path, "--root", str(lazy), "pull", "--lazy", "--whole-below", "0", ref, "--insecure"))
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        ok(run(tmp_path, "--root", str(lazy), "mount", ref, str(mnt), "--log", str(tmp_path / "d.log")))
        try:
            layers = [p for p in (lazy / "layers").iterdir() if (p / "lazy.json").exists()]
            assert len(layers) == 4
            deadline = time.monotonic() + 120   # a bound on waiting, not a measurement
            while any((p / "lazy.json").exists() for p in layers) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert all((p / "lazy.done").exists() for p in layers), (tmp_path / "d.log").read_text()
            reg.stop()
            got = snapshot(mnt, with_times=True)
        finally:
            ok(run(tmp_path, "umount", str(mnt)))
        assert not diff_snapshots(expected, got), "\n".join(diff_snapshots(expected, got))
        assert mounted(tmp_path, lazy, ref) == got   # no hook now: ordinary layers
        reg.start()
        other = f"{reg.host}/lazy/copy:1"
        ok(run(tmp_path, "--root", str(lazy), "push", ref, other, "--insecure"))
        sh("skopeo", "copy", "-q", "--src-tls-verify=false", f"docker://{other}", f"oci:{tmp_path / 'back'}:c")


@pytest.mark.skipif(not os.path.exists("/bin/busybox") or not (shutil.which("crun") or shutil.which("runc")),
                    reason="busybox-static and crun or runc are needed")
def test_run_and_create_lazy(tmp_path):
    """run --lazy REF: the container starts from the TOCs, reads (and copies up) content on demand."""
    from container_images import busybox_image
    src, lazy = tmp_path / "src", tmp_path / "lazy"
    busybox_image(tmp_path / "bb.tar", "bb:1")
    ok(run(tmp_path, "--root", str(src), "load", str(tmp_path / "bb.tar")))
    ok(run(tmp_path, "--root", str(src), "convert", "--estargz", "--chunk-size", "65536", "bb:1", "bb:esgz"))
    with Registry(tmp_path / "reg") as reg:
        ref = f"{reg.host}/lazy/bb:1"
        ok(run(tmp_path, "--root", str(src), "push", "bb:esgz", ref, "--insecure"))
        r = ok(run(tmp_path, "--root", str(lazy), "run", "--rm", "--user", "0", "--lazy", "--whole-below", "0", "--insecure",
                   ref, "sh", "-c", "echo started; echo more >> /etc/passwd; head -1 /etc/passwd; tail -1 /etc/passwd"))
        out = r.stdout.splitlines()
        assert out[0] == "started" and out[1].startswith("root:x:0:0:") and out[2] == "more", r.stdout
        layer = next(p for p in (lazy / "layers").iterdir() if (p / "lazy.json").exists() or (p / "lazy.done").exists())
        assert (layer / "lazy.toc").exists()
        cid = ok(run(tmp_path, "--root", str(lazy), "create", "--lazy", "--insecure", ref)).stdout.strip()
        ok(run(tmp_path, "--root", str(lazy), "rm", cid))
        if HAVE_PODMAN:   # podman pulls the eStargz image from the registry and runs it as any image
            pm = Podman(tmp_path / "podman")
            try:
                pm("pull", "-q", "--tls-verify=false", ref)
                assert pm.sh(ref, "head -1 /etc/passwd; echo $GREETING").splitlines() == \
                    [out[1], "hello"]
            finally:
                pm.close()


def test_lazy_pull_refuses_a_toc_that_is_not_the_manifests(tmp_path):
    """A TOC whose digest is not the annotation's, or a layer that is no eStargz blob: one line, exit 2,
    and the store keeps nothing of the image."""
    src, lazy = tmp_path / "src", tmp_path / "lazy"
    from container_images import BASE, APP
    from image_archives import Img, docker_save_legacy
    docker_save_legacy(tmp_path / "a.tar", [Img([BASE, APP], ["app:1"])])
    ok(run(tmp_path, "--root", str(src), "load", str(tmp_path / "a.tar")))
    ok(run(tmp_path, "--root", str(src), "convert", "--estargz", "app:1", "app:esgz"))
    with Registry(tmp_path / "reg") as reg:
        ref = f"{reg.host}/lazy/app:1"
        ok(run(tmp_path, "--root", str(src), "push", "app:esgz", ref, "--insecure"))
        manifest = json.loads(sh("skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{ref}"))
        bad = json.loads(json.dumps(manifest))
        bad["layers"][1]["annotations"][estargz.TOC_DIGEST_ANNOTATION] = "sha256:" + "0" * 64
        r = httpx.put(f"http://{reg.host}/v2/lazy/app/manifests/bad", content=json.dumps(bad).encode(),
                      headers={"Content-Type": bad["mediaType"]})
        assert r.status_code == 201, r.text
        one_line_error(run(tmp_path, "--root", str(lazy), "pull", "--lazy", "--whole-below", "0",
                           f"{reg.host}/lazy/app:bad", "--insecure"), "TOC digest")
        assert not list((lazy / "images").iterdir()) and not list((lazy / "layers").iterdir())
        # an ordinary gzip layer, with no TOC annotation: pulled whole, the image as usual
        ok(run(tmp_path, "--root", str(src), "push", "app:1", f"{reg.host}/lazy/plain:1", "--insecure"))
        r = ok(run(tmp_path, "--root", str(lazy), "pull", "--lazy", f"{reg.host}/lazy/plain:1", "--insecure"))
        assert "2 pulled whole" in r.stderr
        assert not [p for p in (lazy / "layers").iterdir() if (p / "lazy.json").exists()]
