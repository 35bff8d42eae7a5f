"""push and pull against a real registry on loopback (Debian's docker-registry, plain HTTP):
round trips that mount to identical trees, by tag and by digest, platform choice, chunked uploads,
cross-repository mounts, resumed downloads, corrupt blobs, and the registry's errors as one line."""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess

import httpx
import pytest

from helpers import diff_snapshots, is_mounted, snapshot, unionfs_cmd
from image_archives import Img, d, f, hard, layer_tar, oci_layout, sha, store_listing, sym
from registry_server import CuttingProxy, Registry, have_registry

pytestmark = pytest.mark.skipif(not have_registry(), reason="docker-registry, openssl and htpasswd are needed "
                                "(scripts/setup --test installs them)")

BASE = layer_tar([d("etc"), f("etc/os-release", b"ID=base\n"), f("etc/gone", b"gone"), d("usr/bin"),
                  f("usr/bin/tool", b"#!/bin/sh\n" + os.urandom(40000).hex().encode(), 0o755),
                  f("usr/bin/suid", b"s", 0o4755), hard("usr/bin/tool2", "usr/bin/tool"),
                  sym("usr/bin/link", "tool"), d("var/cache"), f("var/cache/a", b"a")])
APP = layer_tar([f("etc/os-release", b"ID=app\n"), f("etc/.wh.gone"), d("var/cache"), f("var/cache/.wh..wh..opq"),
                 f("var/cache/b", b"b"), f("app", b"app", 0o700, uid=1000, gid=1000,
                                               pax={"SCHILY.xattr.user.note": "hi"})])
BIG = layer_tar([f("big.bin", os.urandom(600_000))])   # incompressible: the resume test cuts it mid-way


def env_for(tmp_path):
    env = dict(os.environ, UNIONFS_CONFIG_DIR=str(tmp_path / "cfg"), DOCKER_CONFIG=str(tmp_path / "docker"))
    env.pop("SSL_CERT_FILE", None)
    return env


def run(tmp_path, *args, env=None):
    return subprocess.run(unionfs_cmd(*args), capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL, env=env or env_for(tmp_path))


def ok(r):
    assert r.returncode == 0, r.stderr
    return r


def one_line_error(r, *words):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    errs = [x for x in r.stderr.splitlines() if x.startswith("unionfs:")]
    assert len(errs) == 1 and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in errs[0], (w, errs[0])
    return errs[0]


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    with Registry(tmp_path_factory.mktemp("registry")) as reg:
        yield reg


def local_image(tmp_path, store, layers=(BASE, APP), name="app:1", compression="gzip"):
    layout = tmp_path / f"layout-{name.replace(':', '-').replace('/', '-')}"
    oci_layout(layout, [Img(list(layers), ["x"], compression=compression)])
    ok(run(tmp_path, "--root", str(store), "load", str(layout), "--tag", name))
    return json.loads(ok(run(tmp_path, "--root", str(store), "inspect", name)).stdout)[0]


def mounted(tmp_path, store, name):
    mnt = tmp_path / f"mnt-{store.name}"
    mnt.mkdir(exist_ok=True)
    ok(run(tmp_path, "--root", str(store), "mount", name, str(mnt)))
    try:
        return snapshot(mnt)
    finally:
        ok(run(tmp_path, "umount", str(mnt)))
        assert not is_mounted(mnt)


def pushed_digest(r) -> str:
    line = r.stdout.strip().splitlines()[-1]
    assert " digest: sha256:" in line, r.stdout
    return line.split("digest: ")[1].split()[0]


def test_push_pull_mount_round_trip(tmp_path, registry):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    info = local_image(tmp_path, a)
    ref = f"{registry.host}/team/app:v1"
    r = ok(run(tmp_path, "--root", str(a), "push", "app:1", ref, "--insecure"))
    digest = pushed_digest(r)
    assert digest == info["Metadata"]["ManifestDigest"]   # the manifest as loaded, byte for byte
    assert r.stderr.count(": Pushed") == 3                  # two layers and the config

    r = ok(run(tmp_path, "--root", str(b), "pull", ref, "--insecure"))
    assert f"Digest: {digest}" in r.stdout and r.stdout.strip().endswith(ref)
    pulled = json.loads(ok(run(tmp_path, "--root", str(b), "inspect", ref)).stdout)[0]
    assert pulled["Id"] == info["Id"] and pulled["RootFS"] == info["RootFS"]
    assert pulled["RepoDigests"] == [f"{registry.host}/team/app@{digest}"]
    assert pulled["RepoTags"] == [ref]
    rows = ok(run(tmp_path, "--root", str(b), "images")).stdout.splitlines()
    assert rows[1].split()[:3] == [f"{registry.host}/team/app", "v1", info["Id"][7:19]]
    # what the push recorded on the source side
    src = json.loads(ok(run(tmp_path, "--root", str(a), "inspect", "app:1")).stdout)[0]
    assert src["RepoDigests"] == [f"{registry.host}/team/app@{digest}"]

    expected = mounted(tmp_path, a, "app:1")
    got = mounted(tmp_path, b, ref)
    assert not diff_snapshots(expected, got), "\n".join(diff_snapshots(expected, got))
    assert expected["app"][2:4] == (1000, 1000) and "etc/gone" not in got and "var/cache/a" not in got
    assert len(expected) > 10

    # by digest: the same image, untagged, known by its repo digest
    r = ok(run(tmp_path, "--root", str(c), "pull", f"{registry.host}/team/app@{digest}", "--insecure"))
    byd = json.loads(ok(run(tmp_path, "--root", str(c), "inspect", info["Id"])).stdout)[0]
    assert byd["RepoTags"] == [] and byd["RepoDigests"] == [f"{registry.host}/team/app@{digest}"]
    rows = ok(run(tmp_path, "--root", str(c), "images")).stdout.splitlines()
    assert rows[1].split()[:3] == [f"{registry.host}/team/app", "<none>", info["Id"][7:19]]

    # pulling again fetches no blob: the layers are in the store
    before = len(registry.access_log())
    r = ok(run(tmp_path, "--root", str(b), "pull", ref, "--insecure"))
    assert "Image is up to date" in r.stdout and "0 pulled, 2 already" in r.stderr
    new = registry.access_log()[before:]
    assert not [x for x in new if "/blobs/sha256:" in x and x.startswith("GET") and info["Id"][7:] not in x], new


def test_push_again_skips_blobs_and_mounts_across_repositories(tmp_path, registry):
    a, b = tmp_path / "a", tmp_path / "b"
    local_image(tmp_path, a, (BASE, APP, layer_tar([f("x", b"mount test")])))
    ref = f"{registry.host}/mnt/src:1"
    d1 = pushed_digest(ok(run(tmp_path, "--root", str(a), "push", "app:1", ref, "--insecure")))
    r = ok(run(tmp_path, "--root", str(a), "push", "app:1", ref, "--insecure"))
    assert r.stderr.count("Layer already exists") == 4 and ": Pushed" not in r.stderr
    assert pushed_digest(r) == d1

    # The image came from mnt/src: pushing it to mnt/dst mounts its blobs rather than uploading them.
    ok(run(tmp_path, "--root", str(b), "pull", ref, "--insecure"))
    before = len(registry.access_log())
    r = ok(run(tmp_path, "--root", str(b), "push", ref, f"{registry.host}/mnt/dst:2", "--insecure"))
    assert r.stderr.count("Mounted from mnt/src") == 4, r.stderr
    new = registry.access_log()[before:]
    mounts = [x for x in new if x.startswith("POST /v2/mnt/dst/blobs/uploads/?") and "from=mnt%2Fsrc" in x
              and "mount=sha256" in x]
    assert len(mounts) == 4 and all(x.endswith(" 201") for x in mounts), new
    assert not [x for x in new if x.startswith(("PUT /v2/mnt/dst/blobs", "PATCH"))], new
    assert pushed_digest(r) == d1


def test_chunked_upload(tmp_path, registry):
    a, b = tmp_path / "a", tmp_path / "b"
    info = local_image(tmp_path, a, (BASE, APP), compression=None)   # uncompressed: ~90 kB of layers
    ref = f"{registry.host}/chunked/app:c"
    before = len(registry.access_log())
    ok(run(tmp_path, "--root", str(a), "push", "app:1", ref, "--insecure", "--chunk-size", "16384"))
    patches = [x for x in registry.access_log()[before:] if x.startswith("PATCH ")]
    assert len(patches) >= len(BASE) // 16384, patches
    assert all(x.endswith(" 202") for x in patches)
    ok(run(tmp_path, "--root", str(b), "pull", ref, "--insecure"))
    assert json.loads(ok(run(tmp_path, "--root", str(b), "inspect", ref)).stdout)[0]["Id"] == info["Id"]
    assert (b / "layers" / sha(BASE)[7:] / "root/usr/bin/suid").stat().st_mode & 0o7777 == 0o4755


def _put(registry, path, data, media):
    r = httpx.put(f"http://{registry.host}{path}", content=data, headers={"Content-Type": media})
    assert r.status_code == 201, r.text


def test_multi_platform_index(tmp_path, registry):
    """An OCI index with two platforms: the host's by default, another with --platform."""
    a = tmp_path / "a"
    amd = local_image(tmp_path, a, (BASE,), "plat:amd64")
    other_cfg = json.dumps({"architecture": "arm64", "os": "linux", "variant": "v8",
                            "rootfs": {"type": "layers", "diff_ids": [sha(APP)]}}).encode()
    blob = gzip.compress(APP, mtime=0)
    repo = "multi/app"
    ok(run(tmp_path, "--root", str(a), "push", "plat:amd64", f"{registry.host}/{repo}:amd64", "--insecure"))
    for data in (other_cfg, blob):   # the arm64 image, by hand, monolithic uploads
        loc = httpx.post(f"http://{registry.host}/v2/{repo}/blobs/uploads/").headers["Location"]
        u = httpx.URL(f"http://{registry.host}").join(loc).copy_merge_params({"digest": sha(data)})
        assert httpx.put(u, content=data).status_code == 201
    arm = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                      "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha(other_cfg),
                                 "size": len(other_cfg)},
                      "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": sha(blob),
                                  "size": len(blob)}]}).encode()
    _put(registry, f"/v2/{repo}/manifests/arm", arm, "application/vnd.oci.image.manifest.v1+json")
    amd_manifest = (a / "blobs/sha256" / amd["Metadata"]["ManifestDigest"][7:]).read_bytes()
    index = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": sha(arm), "size": len(arm),
         "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": sha(amd_manifest),
         "size": len(amd_manifest), "platform": {"os": "linux", "architecture": "amd64"}}]}).encode()
    _put(registry, f"/v2/{repo}/manifests/multi", index, "application/vnd.oci.image.index.v1+json")

    host = subprocess.run(["uname", "-m"], capture_output=True, text=True).stdout.strip()
    b = tmp_path / "b"
    ref = f"{registry.host}/{repo}:multi"
    if host == "x86_64":
        ok(run(tmp_path, "--root", str(b), "pull", ref, "--insecure"))
        got = json.loads(ok(run(tmp_path, "--root", str(b), "inspect", ref)).stdout)[0]
        assert got["Id"] == amd["Id"] and got["RepoDigests"] == [f"{registry.host}/{repo}@{sha(index)}"]
    ok(run(tmp_path, "--root", str(b), "pull", "--platform", "linux/arm64", ref, "--insecure"))
    got = json.loads(ok(run(tmp_path, "--root", str(b), "inspect", ref)).stdout)[0]
    assert got["Id"] == sha(other_cfg) and got["Architecture"] == "arm64"
    assert got["Metadata"]["ManifestDigest"] == sha(arm)
    one_line_error(run(tmp_path, "--root", str(b), "pull", "--platform", "linux/s390x", ref, "--insecure"),
                   "no image for linux/s390x", "linux/amd64", "linux/arm64/v8")


def test_interrupted_pull_resumes(tmp_path, registry):
    a, b = tmp_path / "a", tmp_path / "b"
    local_image(tmp_path, a, (BASE, APP, BIG))
    ref_path = "resume/app:1"
    ok(run(tmp_path, "--root", str(a), "push", "app:1", f"{registry.host}/{ref_path}", "--insecure"))
    manifest = json.loads((a / "blobs/sha256" / json.loads(
        ok(run(tmp_path, "--root", str(a), "inspect", "app:1")).stdout)[0]["Metadata"]["ManifestDigest"][7:]
        ).read_bytes())
    big, small = manifest["layers"][2], manifest["layers"][:2]
    with CuttingProxy(registry.port) as proxy:
        ref = f"{proxy.host}/{ref_path}"
        proxy.cut_digest, proxy.cut_after = big["digest"], 250_000
        r = run(tmp_path, "--root", str(b), "pull", ref, "--insecure")
        one_line_error(r, big["digest"])
        partial = b / "downloads/sha256" / (big["digest"][7:] + ".partial")
        assert partial.exists() and 0 < partial.stat().st_size <= 250_000
        have = partial.stat().st_size
        for s in small:   # the other layers finished and were verified: kept for the next pull
            assert (b / "downloads/sha256" / s["digest"][7:]).exists()
        listing = {k: v for k, v in store_listing(b).items() if not k.startswith("downloads")}
        assert not [k for k in listing if k.startswith(("layers/", "images/", "blobs/sha256/"))], listing
        assert "repositories.json" not in listing

        proxy.requests.clear()
        ok(run(tmp_path, "--root", str(b), "pull", ref, "--insecure"))
        gets = proxy.blob_gets()
        assert (big["digest"], f"bytes={have}-") in gets, gets
        assert not [g for g in gets if g[0] in {s["digest"] for s in small}], gets   # not fetched again
    assert os.listdir(b / "downloads/sha256") == []   # everything moved into the store
    info = json.loads(ok(run(tmp_path, "--root", str(b), "inspect", ref)).stdout)[0]
    assert info["RootFS"]["Layers"] == [sha(BASE), sha(APP), sha(BIG)]
    assert hashlib.sha256((b / "blobs/sha256" / big["digest"][7:]).read_bytes()).hexdigest() == big["digest"][7:]


def test_corrupt_blob_on_registry_fails_and_store_is_unchanged(tmp_path, registry):
    a, b = tmp_path / "a", tmp_path / "b"
    local_image(tmp_path, a, (BASE, layer_tar([f("corrupt-me", b"c" * 5000)])))
    ref = f"{registry.host}/corrupt/app:1"
    ok(run(tmp_path, "--root", str(a), "push", "app:1", ref, "--insecure"))
    # b already holds another image that shares the base layer
    local_image(tmp_path, b, (BASE,), "base:1")
    manifest = json.loads((a / "blobs/sha256" / json.loads(
        ok(run(tmp_path, "--root", str(a), "inspect", "app:1")).stdout)[0]["Metadata"]["ManifestDigest"][7:]
        ).read_bytes())
    victim = registry.blob_file(manifest["layers"][1]["digest"])
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    before = store_listing(b)
    err = one_line_error(run(tmp_path, "--root", str(b), "pull", ref, "--insecure"),
                         manifest["layers"][1]["digest"], "does not match its digest")
    assert "nothing was stored" in err
    assert store_listing(b) == before, "a failed pull changed the store"
    assert not os.listdir(b / "downloads/sha256")   # a corrupt download is not kept for resuming


def test_registry_errors_are_one_line(tmp_path, registry):
    s = str(tmp_path / "s")
    one_line_error(run(tmp_path, "--root", s, "pull", f"{registry.host}/nope/none:1", "--insecure"),
                   "manifest unknown")
    local_image(tmp_path, tmp_path / "s")
    ok(run(tmp_path, "--root", s, "push", "app:1", f"{registry.host}/errs/app:1", "--insecure"))
    one_line_error(run(tmp_path, "--root", s, "pull", f"{registry.host}/errs/app:nope", "--insecure"),
                   "errs/app:nope", "manifest unknown")
    one_line_error(run(tmp_path, "--root", s, "pull", f"{registry.host}/errs/app@sha256:" + "0" * 64, "--insecure"),
                   "manifest unknown")
    # malformed references
    for bad, why in [("Bad/Name", "invalid repository name"), ("app:-x", "invalid tag"),
                     ("app@sha256:abc", "invalid digest"), ("app@md5:" + "0" * 32, "invalid digest"),
                     ("host:5000/", "invalid repository name")]:
        one_line_error(run(tmp_path, "--root", s, "pull", bad), why)
    one_line_error(run(tmp_path, "--root", s, "pull", "--platform", "linux", "x:1"), "--platform")
    # plain HTTP without --insecure: TLS fails, with a hint
    one_line_error(run(tmp_path, "--root", s, "pull", f"{registry.host}/errs/app:1"), "--insecure")
    # nothing listens
    from registry_server import free_port
    one_line_error(run(tmp_path, "--root", s, "pull", f"127.0.0.1:{free_port()}/x/y:1", "--insecure"),
                   "cannot connect")
    # push: an id names no repository; an unknown image
    one_line_error(run(tmp_path, "--root", s, "push", "nosuch:1", "--insecure"), "no such image")
    ids = ok(run(tmp_path, "--root", s, "images", "--no-trunc")).stdout.splitlines()[1].split()[2]
    one_line_error(run(tmp_path, "--root", s, "push", ids[7:19], "--insecure"), "give a REFERENCE")


def test_rate_limit_is_one_line(tmp_path):
    """429 from a registry (here a stub: the real one has no rate limits) reads as one line with Retry-After."""
    import http.server
    import threading

    class H(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            if self.path == "/v2/":
                body, status = b"{}", 200
            else:
                body, status = json.dumps({"errors": [{"code": "TOOMANYREQUESTS",
                                                       "message": "You have reached your pull rate limit."}]}).encode(), 429
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            if status == 429:
                self.send_header("Retry-After", "30")
            self.end_headers()
            self.wfile.write(body)

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        err = one_line_error(run(tmp_path, "--root", str(tmp_path / "s"), "pull",
                                 f"127.0.0.1:{srv.server_address[1]}/x/y:1", "--insecure"),
                             "rate limited", "pull rate limit", "retry after 30 s")
        assert "429" in err
    finally:
        srv.shutdown()
        srv.server_close()
