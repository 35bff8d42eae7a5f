"""A hostile registry on loopback (a small http.server playing each trick), and what pull must do: one
line, exit status 2, within the subprocess's bound (nothing may hang), and nothing recorded in the store.
Also: a blob substitution refused by load leaves the original image to push and pull back byte-identical."""
from __future__ import annotations

import base64
import gzip
import http.server
import json
import os
import resource
import subprocess
import threading
import time

import pytest

from helpers import unionfs_cmd
from image_archives import Img, d, docker_save_legacy, f, layer_tar, sha, store_listing
from registry_server import Registry, have_registry

LAYER = gzip.compress(layer_tar([d("etc"), f("etc/os-release", b"ID=remote\n")]), mtime=0)
CONFIG = Img([layer_tar([d("etc"), f("etc/os-release", b"ID=remote\n")])], []).config_bytes()
MANIFEST = json.dumps({
    "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha(CONFIG), "size": len(CONFIG)},
    "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": sha(LAYER),
                "size": len(LAYER)}]}).encode()
GIB = 1 << 30


class HostileRegistry:
    """Serves one image as ``evil/app:1``, with the trick ``mode`` applied; records each request."""

    def __init__(self, mode: str, host: str = "127.0.0.1") -> None:
        self.mode = mode
        self.requests: list[tuple[str, str, str | None]] = []
        self.stop = threading.Event()
        self.token_host: "HostileRegistry | None" = None
        reg = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def send(self, status, body=b"", ctype="application/json", headers=(), length=None):
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body) if length is None else length))
                for k, v in headers:
                    self.send_header(k, v)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def endless(self, status, ctype, length=None):
                """Zeros until the client goes away (or the test ends): 1 GiB announced, or (``length`` -1) not
                announced, ending only when the connection closes."""
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                if length is None:
                    self.send_header("Content-Length", str(GIB))
                else:   # no length: the body ends when the connection closes
                    self.send_header("Connection", "close")
                self.end_headers()
                try:
                    sent = 0
                    while not reg.stop.is_set() and sent < GIB:
                        self.wfile.write(b"\0" * 65536)
                        sent += 65536
                except OSError:
                    pass
                self.close_connection = True

            def do_GET(self):
                reg.requests.append((self.command, self.path, self.headers.get("Authorization")))
                mode, path = reg.mode, self.path
                if path.startswith("/token"):
                    return self.send(200, b'{"token": "t"}')
                if path == "/v2/":
                    if mode == "upload-elsewhere" and not self.headers.get("Authorization"):
                        return self.send(401, b"{}", headers=[("WWW-Authenticate", 'Basic realm="evil"')])
                    if mode == "realm-other-host":
                        realm = f"http://{reg.token_host.host}/token"
                        return self.send(401, b"{}", headers=[("WWW-Authenticate",
                                                               f'Bearer realm="{realm}",service="evil"')])
                    if mode == "huge-v2":
                        return self.endless(200, "application/json")
                    return self.send(200, b"{}")
                if "/manifests/" in path:
                    if mode == "huge-manifest":
                        return self.endless(200, "application/vnd.oci.image.manifest.v1+json")
                    if mode == "huge-manifest-unannounced":
                        return self.endless(200, "application/vnd.oci.image.manifest.v1+json", length=-1)
                    if mode == "redirect-loop":
                        return self.send(302, headers=[("Location", path)])
                    if mode == "html":
                        return self.send(200, b"<html><body>login</body></html>", ctype="text/html")
                    if mode == "schema1":
                        return self.send(200, MANIFEST,
                                         ctype="application/vnd.docker.distribution.manifest.v1+prettyjws")
                    if mode == "stall-manifest":
                        self.send_response(200)
                        self.send_header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
                        self.send_header("Content-Length", str(len(MANIFEST)))
                        self.end_headers()
                        self.wfile.write(MANIFEST[:20])
                        self.wfile.flush()
                        reg.stop.wait(60)
                        self.close_connection = True
                        return
                    if mode == "index-bad-platform" and path.endswith("/manifests/1"):
                        index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                                 "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                                                "digest": sha(MANIFEST), "size": len(MANIFEST), "platform": "linux"}]}
                        return self.send(200, json.dumps(index).encode(),
                                         ctype="application/vnd.oci.image.index.v1+json")
                    if mode == "trickle-manifest":   # a byte every 0.2 s: each read is quick, the whole is not
                        self.send_response(200)
                        self.send_header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
                        self.send_header("Content-Length", str(len(MANIFEST)))
                        self.end_headers()
                        try:
                            for i in range(len(MANIFEST)):
                                if reg.stop.wait(0.2):
                                    break
                                self.wfile.write(MANIFEST[i:i + 1])
                                self.wfile.flush()
                        except OSError:
                            pass
                        self.close_connection = True
                        return
                    if mode == "huge-error":
                        return self.endless(404, "application/json")
                    return self.send(200, MANIFEST, ctype="application/vnd.oci.image.manifest.v1+json")
                if path.endswith("/blobs/" + sha(CONFIG)):
                    return self.send(200, CONFIG, ctype="application/octet-stream")
                if path.endswith("/blobs/" + sha(LAYER)):
                    if mode == "bad-blob":
                        evil = bytearray(LAYER)
                        evil[len(evil) // 2] ^= 0xFF
                        return self.send(200, bytes(evil), ctype="application/octet-stream")
                    if mode == "stall-blob":
                        self.send_response(200)
                        self.send_header("Content-Length", str(len(LAYER)))
                        self.end_headers()
                        self.wfile.write(LAYER[:len(LAYER) // 2])
                        self.wfile.flush()
                        reg.stop.wait(60)
                        self.close_connection = True
                        return
                    if mode == "long-blob":
                        return self.endless(200, "application/octet-stream")
                    return self.send(200, LAYER, ctype="application/octet-stream")
                return self.send(404, b'{"errors": [{"code": "BLOB_UNKNOWN", "message": "no"}]}')

            do_HEAD = do_GET

            def do_POST(self):
                reg.requests.append((self.command, self.path, self.headers.get("Authorization")))
                if reg.mode == "upload-elsewhere" and "/blobs/uploads/" in self.path:
                    return self.send(202, headers=[("Location", f"http://{reg.token_host.host}/upload/1")])
                return self.send(404, b"{}")

            def do_PUT(self):
                reg.requests.append((self.command, self.path, self.headers.get("Authorization")))
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                return self.send(400, b'{"errors": [{"code": "DENIED", "message": "no uploads here"}]}')

            do_PATCH = do_PUT

        self.server = http.server.ThreadingHTTPServer((host, 0), Handler)
        self.server.daemon_threads = True
        self.host = f"{host}:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "HostileRegistry":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()


def pull(tmp_path, store, host, extra_env=None):
    env = dict(os.environ, UNIONFS_CONFIG_DIR=str(tmp_path / "cfg"), DOCKER_CONFIG=str(tmp_path / "docker"),
               UNIONFS_REGISTRY_TIMEOUT="2", **(extra_env or {}))
    return subprocess.run(unionfs_cmd("--root", str(store), "pull", f"{host}/evil/app:1", "--insecure"),
                          capture_output=True, text=True, timeout=90, stdin=subprocess.DEVNULL, env=env,
                          preexec_fn=_bounded_memory)


MEMORY = 512 << 20   # the pull may map this much (a body read whole into memory would need a gigabyte)


def _bounded_memory():
    resource.setrlimit(resource.RLIMIT_DATA, (MEMORY, MEMORY))


@pytest.fixture
def store(tmp_path):
    """A store that already holds an image, so 'nothing recorded' means something."""
    root = tmp_path / "store"
    archive = tmp_path / "good.tar"
    docker_save_legacy(archive, [Img([layer_tar([f("good", b"good")])], ["good:1"])])
    r = subprocess.run(unionfs_cmd("--root", str(root), "load", str(archive)), capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    return root


def refused(r, store, before, *words):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    errs = [x for x in r.stderr.splitlines() if x.startswith("unionfs:")]
    assert len(errs) == 1 and "Traceback" not in r.stderr, r.stderr
    assert len(errs[0]) < 500, errs[0]
    for w in words:
        assert w in errs[0], (w, errs[0])
    after = {k: v for k, v in store_listing(store).items() if not k.startswith("downloads/")}
    assert after == before, sorted(set(after) ^ set(before))
    assert [p for p in os.listdir(store / "downloads/sha256") if not p.endswith(".partial")] == []


CASES = {
    "huge-manifest": "manifest larger than 4194304 bytes (the registry announces 1073741824)",
    "huge-manifest-unannounced": "manifest larger than 4194304 bytes",
    "huge-v2": "larger than 1048576 bytes",
    "huge-error": "not found (404)",
    "redirect-loop": "more than 10 redirects",
    "html": "not JSON",
    "index-bad-platform": "platform is a string, not an object",
    "schema1": "schema 1 manifests are not supported",
    "stall-manifest": "the registry stopped answering (nothing for 2 s",
    "stall-blob": "the registry stopped answering (nothing for 2 s",
    "trickle-manifest": "the registry sends too slowly (not done after 6 s",
    "bad-blob": f"blob {sha(LAYER)} does not match its digest",
    "long-blob": f"sent more than the {len(LAYER)} bytes",
}


@pytest.mark.parametrize("mode", sorted(CASES))
def test_hostile_registry(tmp_path, store, mode):
    before = {k: v for k, v in store_listing(store).items() if not k.startswith("downloads/")}
    with HostileRegistry(mode) as reg:
        r = pull(tmp_path, store, reg.host)
    refused(r, store, before, CASES[mode])


def test_the_friendly_twin_pulls(tmp_path, store):
    """The same server without a trick: the image pulls (so the cases above fail for their trick alone)."""
    with HostileRegistry("none") as reg:
        r = pull(tmp_path, store, reg.host)
    assert r.returncode == 0, r.stderr


def test_token_realm_on_another_host_gets_no_credentials(tmp_path, store):
    """A registry over plain HTTP naming a token realm on another host: the credentials are not sent there;
    without credentials the anonymous token is fetched as usual."""
    docker = tmp_path / "docker"
    docker.mkdir()
    before = {k: v for k, v in store_listing(store).items() if not k.startswith("downloads/")}
    with HostileRegistry("none", host="127.0.0.2") as other, HostileRegistry("realm-other-host") as reg:
        reg.token_host = other
        (docker / "config.json").write_text(json.dumps(
            {"auths": {reg.host: {"auth": base64.b64encode(b"alice:secret").decode()}}}))
        r = pull(tmp_path, store, reg.host)
        refused(r, store, before, "another host over plain HTTP: not sending the credentials there")
        assert not [q for q in other.requests if q[2]], other.requests
        (docker / "config.json").unlink()
        r = pull(tmp_path, store, reg.host)
        assert r.returncode == 0, r.stderr
        assert [q for q in other.requests if q[1].startswith("/token")] and not [q for q in other.requests if q[2]]


# --- the blob substitution, end to end through a real registry ------------------------------------------

@pytest.mark.skipif(not have_registry(), reason="docker-registry is needed (scripts/setup --test installs it)")
def test_substitution_refused_then_original_pushes_and_pulls_back(tmp_path, store):
    good = Img([layer_tar([f("good", b"good")])], ["good:1"])
    evil = tmp_path / "evil.tar"
    docker_save_legacy(evil, [Img([layer_tar([f("good", b"evil")])], ["good:1"], config=good.config_bytes())])
    r = subprocess.run(unionfs_cmd("--root", str(store), "load", str(evil)), capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "does not match the config's diff_id" in r.stderr, r.stderr
    with Registry(tmp_path / "registry") as registry:
        env = dict(os.environ, UNIONFS_CONFIG_DIR=str(tmp_path / "cfg"), DOCKER_CONFIG=str(tmp_path / "docker"))
        ref = f"{registry.host}/team/good:1"
        r = subprocess.run(unionfs_cmd("--root", str(store), "push", "good:1", ref, "--insecure"),
                           capture_output=True, text=True, timeout=120, env=env)
        assert r.returncode == 0, r.stderr
        other = tmp_path / "other"
        r = subprocess.run(unionfs_cmd("--root", str(other), "pull", ref, "--insecure"), capture_output=True,
                           text=True, timeout=120, env=env)
        assert r.returncode == 0, r.stderr
    layer = sha(good.layers[0])[7:]
    for root in (store, other):
        assert (root / "layers" / layer / "root/good").read_bytes() == b"good"
    mine, theirs = (json.loads((root / "images" / (sha(good.config_bytes())[7:] + ".json")).read_bytes())
                    for root in (store, other))
    assert mine["layers"] == theirs["layers"] and mine["manifest"] == theirs["manifest"]
    assert (store / "blobs/sha256" / mine["manifest"][7:]).read_bytes() == \
        (other / "blobs/sha256" / theirs["manifest"][7:]).read_bytes()


@pytest.mark.parametrize("config", [
    b"[" * 5000 + b"]" * 5000,
    b'{"registries": [1]}',
    b'{"registries": {"HOST": {"ca_file": 5}}}',
    b'{"auths": "x"}',
])
def test_malformed_client_config(tmp_path, store, config):
    """Our own config file, hand-edited into nonsense: one line (the pull never starts)."""
    before = {k: v for k, v in store_listing(store).items() if not k.startswith("downloads/")}
    with HostileRegistry("none") as reg:
        (tmp_path / "cfg").mkdir()
        (tmp_path / "cfg/config.json").write_bytes(config.replace(b"HOST", reg.host.encode()))
        r = pull(tmp_path, store, reg.host)
        logout = subprocess.run(unionfs_cmd("logout", reg.host), capture_output=True, text=True, timeout=60,
                                env=dict(os.environ, UNIONFS_CONFIG_DIR=str(tmp_path / "cfg")))
    if b"auths" in config:   # a pull only reads the auths it can use; logout must rewrite them
        assert logout.returncode == 2 and "auths is not an object" in logout.stderr, logout.stderr
    else:
        refused(r, store, before, "config.json")


def test_damaged_record_is_neither_saved_nor_pushed(tmp_path, store):
    """A record pairing a layer with another layer's (genuine, digest-correct) blob, as the substitution
    used to leave behind: save --format oci and push check each blob against its diff_id before sending."""
    layout = tmp_path / "two"
    a, b = layer_tar([f("a", b"a")]), layer_tar([f("b", b"b")])
    from image_archives import oci_layout
    oci_layout(layout, [Img([a], ["a"], compression="gzip"), Img([b], ["b"], compression="gzip")])
    r = subprocess.run(unionfs_cmd("--root", str(store), "load", str(layout)), capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    ids = {json.loads(p.read_bytes())["layers"][0]["diff_id"]: p for p in (store / "images").iterdir()}
    rec_a, rec_b = (json.loads(ids[sha(x)].read_bytes()) for x in (a, b))
    rec_a["layers"][0].update(digest=rec_b["layers"][0]["digest"], size=rec_b["layers"][0]["size"])
    manifest = json.loads((store / "blobs/sha256" / rec_a["manifest"][7:]).read_bytes())   # consistent with it
    manifest["layers"][0].update(digest=rec_b["layers"][0]["digest"], size=rec_b["layers"][0]["size"])
    raw = json.dumps(manifest).encode()
    (store / "blobs/sha256" / sha(raw)[7:]).write_bytes(raw)
    rec_a["manifest"] = sha(raw)
    ids[sha(a)].write_text(json.dumps(rec_a))
    name = rec_a["id"]
    r = subprocess.run(unionfs_cmd("--root", str(store), "save", name, "--format", "oci", "-o",
                                   str(tmp_path / "o")), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "does not match the config's diff_id" in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()
    with HostileRegistry("none") as reg:
        r = subprocess.run(unionfs_cmd("--root", str(store), "push", name, f"{reg.host}/evil/a:1", "--insecure"),
                           capture_output=True, text=True, timeout=60,
                           env=dict(os.environ, UNIONFS_CONFIG_DIR=str(tmp_path / "cfg")))
        assert not [q for q in reg.requests if q[0] not in ("GET", "HEAD")], reg.requests
    assert r.returncode == 2 and "does not match the config's diff_id" in r.stderr, r.stderr


def test_upload_location_on_another_host_gets_no_credentials(tmp_path, store):
    """A registry (basic auth, plain HTTP) that sends the upload to another host: the blob goes there
    without the Authorization header."""
    docker = tmp_path / "docker"
    docker.mkdir()
    with HostileRegistry("none", host="127.0.0.2") as other, HostileRegistry("upload-elsewhere") as reg:
        reg.token_host = other
        (docker / "config.json").write_text(json.dumps(
            {"auths": {reg.host: {"auth": base64.b64encode(b"alice:secret").decode()}}}))
        env = dict(os.environ, UNIONFS_CONFIG_DIR=str(tmp_path / "cfg"), DOCKER_CONFIG=str(docker))
        r = subprocess.run(unionfs_cmd("--root", str(store), "push", "good:1", f"{reg.host}/evil/app:1",
                                       "--insecure"), capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 2 and "no uploads here" in r.stderr, r.stderr
    assert [q for q in reg.requests if q[0] == "POST" and q[2]], reg.requests    # the registry got them
    assert [q for q in other.requests if q[0] == "PUT"] and not [q for q in other.requests if q[2]], other.requests
