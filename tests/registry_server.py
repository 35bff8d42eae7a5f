"""A real registry on loopback for tests: Debian's ``docker-registry`` (the CNCF distribution registry),
with optional htpasswd basic auth, TLS (a self-signed certificate) or bearer tokens (a token server
here), plus a counting proxy that can cut a blob download short.  Everything stops at teardown."""
from __future__ import annotations

import base64
import http.client
import http.server
import json
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
import urllib.parse
from pathlib import Path

REGISTRY_BIN = "/usr/bin/docker-registry"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_cert(directory: Path, name: str = "tls") -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (and its key), made by openssl."""
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def htpasswd(path: Path, user: str, password: str) -> Path:
    out = subprocess.run(["htpasswd", "-Bbn", user, password], check=True, capture_output=True, text=True, timeout=30)
    path.write_text(out.stdout.strip() + "\n")
    return path


class Registry:
    """``docker-registry serve`` on a free 127.0.0.1 port, its storage under ``base``."""

    def __init__(self, base: Path, *, users: dict[str, str] | None = None, tls: bool = False,
                 token: "TokenServer | None" = None) -> None:
        self.base = Path(base)
        self.base.mkdir(parents=True, exist_ok=True)
        self.data = self.base / "data"
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.users = users
        self.cert = self.key = None
        if tls:
            self.cert, self.key = make_cert(self.base)
        self.token = token
        self.log = self.base / "registry.log"
        self.proc: subprocess.Popen | None = None

    def config(self) -> dict:
        cfg: dict = {
            "version": 0.1,
            "log": {"level": "warn"},
            "storage": {"filesystem": {"rootdirectory": str(self.data)}, "delete": {"enabled": True},
                        "maintenance": {"uploadpurging": {"enabled": False}}},
            "http": {"addr": self.host, "secret": "unionfs-tests"},
        }
        if self.cert:
            cfg["http"]["tls"] = {"certificate": str(self.cert), "key": str(self.key)}
        if self.users:
            path = self.base / "htpasswd"
            path.write_text("".join(htpasswd(self.base / f"h-{u}", u, p).read_text() for u, p in self.users.items()))
            cfg["auth"] = {"htpasswd": {"realm": "unionfs-tests", "path": str(path)}}
        if self.token:
            cfg["auth"] = {"token": {"realm": self.token.url, "service": self.token.service,
                                     "issuer": self.token.issuer, "rootcertbundle": str(self.token.cert)}}
        return cfg

    def start(self) -> "Registry":
        cfg = self.base / "config.yml"
        cfg.write_text(json.dumps(self.config(), indent=1))   # JSON is YAML
        self.proc = subprocess.Popen([REGISTRY_BIN, "serve", str(cfg)], stdout=open(self.log, "wb"),
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"docker-registry exited: {self.log.read_text()[-2000:]}")
            try:
                if self.cert:
                    conn = http.client.HTTPSConnection("127.0.0.1", self.port, timeout=2,
                                                       context=ssl._create_unverified_context())
                else:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/v2/")
                status = conn.getresponse().status
                conn.close()
                if status in (200, 401):
                    return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("docker-registry did not answer /v2/ in time")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def blob_file(self, digest: str) -> Path:
        hexd = digest.split(":", 1)[1]
        return self.data / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"

    def access_log(self) -> list[str]:
        """Request lines (``GET /v2/... 200``) the registry served so far."""
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            if '"' in line and " HTTP/1.1\" " in line:
                req = line.split('"')[1]
                status = line.split('"')[2].split()[0]
                out.append(f"{req.rsplit(' ', 1)[0]} {status}")
        return out

    def __enter__(self) -> "Registry":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class _Proxy(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class CuttingProxy:
    """A plain-HTTP forwarding proxy in front of a registry, recording each request (method, path, Range),
    that can cut the response for one blob after ``cut_after`` bytes (a network failure mid-download),
    or hold the next GET of ``hold_digest`` (a slow link, in flight until ``release`` is set)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.requests: list[tuple[str, str, str | None]] = []
        self.cut_digest: str | None = None
        self.cut_after = 0
        self.hold_digest: str | None = None
        self.held = threading.Event()      # set when the held request has arrived
        self.release = threading.Event()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _forward(self):
                proxy.requests.append((self.command, self.path, self.headers.get("Range")))
                if proxy.hold_digest is not None and self.command == "GET" and \
                        self.path.endswith("/blobs/" + proxy.hold_digest):
                    proxy.hold_digest = None   # only once
                    proxy.held.set()
                    proxy.release.wait(120)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                up = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                up.request(self.command, self.path, body=body, headers=headers)
                resp = up.getresponse()
                cut = proxy.cut_digest is not None and self.command == "GET" and \
                    self.path.endswith("/blobs/" + proxy.cut_digest)
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in ("connection", "transfer-encoding", "keep-alive"):
                        self.send_header(k, v)
                self.send_header("Connection", "close")
                self.end_headers()
                data = resp.read()
                if cut:
                    proxy.cut_digest = None   # only once
                    self.wfile.write(data[:proxy.cut_after])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                elif self.command != "HEAD":
                    self.wfile.write(data)
                self.close_connection = True
                up.close()

            do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = _forward

        self.server = _Proxy(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.host = f"127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def blob_gets(self) -> list[tuple[str, str | None]]:
        return [(p.rsplit("/", 1)[1], rng) for m, p, rng in self.requests if m == "GET" and "/blobs/" in p]

    def __enter__(self) -> "CuttingProxy":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


class TokenServer:
    """A Docker token server (``GET /token?service=&scope=``) issuing RS256 JWTs with an x5c header that the
    registry's ``auth: token`` checks against ``cert``; with ``users``, it wants basic auth."""

    def __init__(self, base: Path, users: dict[str, str] | None = None) -> None:
        self.cert, self.key = make_cert(Path(base), "token")
        self.service, self.issuer = "unionfs-test-registry", "unionfs-test-issuer"
        self.users = users
        self.requests: list[dict] = []
        der = subprocess.run(["openssl", "x509", "-in", str(self.cert), "-outform", "DER"], check=True,
                             capture_output=True, timeout=30).stdout
        self.x5c = base64.b64encode(der).decode()
        ts = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_GET(self):
                q = urllib.parse.urlparse(self.path)
                params = urllib.parse.parse_qs(q.query)
                auth = self.headers.get("Authorization", "")
                user = None
                if auth.startswith("Basic "):
                    u, _, p = base64.b64decode(auth[6:]).decode().partition(":")
                    if ts.users is not None and ts.users.get(u) != p:
                        return self._send(401, {"errors": [{"code": "UNAUTHORIZED", "message": "bad credentials"}]})
                    user = u
                ts.requests.append({"user": user, "scope": params.get("scope", []), "service": params.get("service")})
                if ts.users is not None and user is None:
                    return self._send(401, {"errors": [{"code": "UNAUTHORIZED", "message": "login first"}]})
                access = []
                for s in params.get("scope", []):
                    kind, name, actions = s.split(":")
                    access.append({"type": kind, "name": name, "actions": actions.split(",")})
                self._send(200, {"token": ts.jwt(user or "", access), "expires_in": 300})

            def _send(self, status, body):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = _Proxy(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/token"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def jwt(self, subject: str, access: list[dict]) -> str:
        def b64(d: bytes) -> str:
            return base64.urlsafe_b64encode(d).rstrip(b"=").decode()
        now = int(time.time())
        header = {"alg": "RS256", "typ": "JWT", "x5c": [self.x5c]}
        claims = {"iss": self.issuer, "sub": subject, "aud": self.service, "exp": now + 300, "nbf": now - 10,
                  "iat": now, "jti": os.urandom(8).hex(), "access": access}
        signing = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
        sig = subprocess.run(["openssl", "dgst", "-sha256", "-sign", str(self.key)], input=signing.encode(),
                             check=True, capture_output=True, timeout=30).stdout
        return f"{signing}.{b64(sig)}"

    def __enter__(self) -> "TokenServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def have_registry() -> bool:
    return os.path.exists(REGISTRY_BIN) and bool(shutil.which("openssl")) and bool(shutil.which("htpasswd"))
