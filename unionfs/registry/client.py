"""A client for the OCI distribution API (``/v2/``), on httpx.

One :class:`Client` talks to one repository of one registry.  It finds the
endpoint (HTTPS, or for an insecure registry HTTPS without verification and then
plain HTTP, as Docker does), authenticates as the registry asks (anonymous,
basic, bearer token: :mod:`.auth`), and maps every error the registry sends
(``{"errors": [{"code": ..., "message": ...}]}``, 429 rate limits, TLS and
connection failures) to one :class:`RegistryError` line.  Blobs are streamed to
files with their sha256 checked as they arrive; downloads resume with ``Range``.
"""
from __future__ import annotations

import hashlib
import os
import ssl
import threading
import time
from typing import BinaryIO, Callable, Iterator
from urllib.parse import urlencode

import httpx

from .. import __version__
from ..image.model import INDEX_TYPES, MANIFEST_TYPES, ImageError, quote
from .auth import Challenge, Credentials, find_credentials, parse_challenge, registry_settings

MEDIA_DOCKER_SCHEMA1 = ("application/vnd.docker.distribution.manifest.v1+json",
                        "application/vnd.docker.distribution.manifest.v1+prettyjws")
ACCEPT = ", ".join((*MANIFEST_TYPES, *INDEX_TYPES))
MAX_MANIFEST = 4 << 20     # distribution refuses manifests above 4 MiB; so do we
MAX_SMALL_BODY = 1 << 20   # /v2/, token, error and upload answers: no honest one is bigger
MAX_REDIRECTS = 10
CHUNK = 1 << 20
HUB_ENDPOINT = "registry-1.docker.io"
ENV_TIMEOUT = "UNIONFS_REGISTRY_TIMEOUT"   # seconds a connection may stay silent (default 60)


def read_timeout() -> float:
    try:
        return max(0.1, float(os.environ.get(ENV_TIMEOUT) or 60.0))
    except ValueError:
        raise ImageError(f"{ENV_TIMEOUT}={os.environ[ENV_TIMEOUT]!r}: not a number of seconds") from None


class RegistryError(ImageError):
    """The registry refused, or could not be reached: one line for the user, exit status 2."""


class Cancelled(Exception):
    """Another download of the same pull failed; this one stops."""


_ERROR_WORDS = {
    "UNAUTHORIZED": "unauthorized: authentication required",
    "DENIED": "denied: requested access to the resource is denied",
    "MANIFEST_UNKNOWN": "manifest unknown",
    "NAME_UNKNOWN": "repository name not known to registry",
    "BLOB_UNKNOWN": "blob unknown to registry",
    "TOOMANYREQUESTS": "too many requests",
}


def _error_line(resp: httpx.Response) -> str:
    """The registry's reason for a failed request, in one line."""
    code = message = ""
    try:
        body = resp.json()
        errors = body.get("errors") if isinstance(body, dict) else None
        if isinstance(errors, list) and errors and isinstance(errors[0], dict):
            code = str(errors[0].get("code") or "")
            message = str(errors[0].get("message") or "")
    except (ValueError, UnicodeDecodeError, httpx.ResponseNotRead):
        pass
    if resp.status_code == 429 or code == "TOOMANYREQUESTS":
        retry = resp.headers.get("Retry-After")
        return ("rate limited by the registry (429 toomanyrequests)" + (f": {message}" if message else "")
                + (f"; retry after {retry} s" if retry else "; retry later"))
    if code:
        name = code.lower().replace("_", " ")
        words = message or _ERROR_WORDS.get(code, name)
        text = words if words.lower().startswith(name) else f"{name}: {words}"   # as docker says it
    elif resp.status_code == 401:
        text = "unauthorized: authentication required"
    elif resp.status_code == 404:
        text = "not found (404)"
    else:
        text = f"HTTP {resp.status_code} {resp.reason_phrase}".strip()
    return " ".join(text.split())


def _transport_error(e: Exception, where: str, insecure_hint: bool) -> RegistryError:
    if isinstance(e, httpx.TooManyRedirects):
        return RegistryError(f"{where}: more than {MAX_REDIRECTS} redirects (a redirect loop?)")
    if isinstance(e, httpx.TimeoutException) and not isinstance(e, httpx.ConnectTimeout):
        return RegistryError(f"{where}: the registry stopped answering (nothing for {read_timeout():g} s; "
                             f"{ENV_TIMEOUT} sets the limit)")
    reason = str(e)[:300] or e.__class__.__name__
    cause = e.__context__ or e.__cause__
    while cause is not None and not isinstance(cause, ssl.SSLError):
        cause = cause.__context__ or cause.__cause__
    if isinstance(cause, ssl.SSLError) or "SSL" in reason or "certificate" in reason:
        hint = "; for a registry with its own CA give --ca-file (or SSL_CERT_FILE), for a test registry --insecure"
        return RegistryError(f"{where}: TLS: {' '.join(reason.split())}" + (hint if insecure_hint else ""))
    dns = isinstance(cause := (e.__context__ or e.__cause__), OSError) and cause.errno in (-2, -3, -5) \
        or "Name or service not known" in reason
    hint = " (a plain-HTTP registry needs --insecure)" if insecure_hint and not dns else ""
    return RegistryError(f"{where}: cannot connect: {' '.join(reason.split())}{hint}")


SMALL_BODY_WINDOWS = 3   # a manifest, config or error answer arrives within 3 timeouts, however it trickles


def _check_deadline(deadline: float, what: str) -> None:
    if time.monotonic() > deadline:
        raise RegistryError(f"{what}: the registry sends too slowly (not done after "
                            f"{SMALL_BODY_WINDOWS * read_timeout():g} s; {ENV_TIMEOUT} sets the limit)")


def _content_length(resp: httpx.Response) -> int:
    try:
        return int(resp.headers.get("Content-Length") or 0)
    except ValueError:
        return 0


def _body_within(resp: httpx.Response, limit: int, what: str, too_big: str, cut: bool = False) -> bytes:
    """A streamed body as it arrives, within ``limit`` bytes and the read deadline: more is refused
    (``what: too_big``), or with ``cut`` dropped.  The caller closes the stream."""
    data = bytearray()
    deadline = time.monotonic() + SMALL_BODY_WINDOWS * read_timeout()
    for chunk in resp.iter_bytes():
        data += chunk
        _check_deadline(deadline, what)
        if len(data) > limit:
            if cut:
                del data[limit:]
                break
            raise RegistryError(f"{what}: {too_big}")
    return bytes(data)


def small_response(resp: httpx.Response, what: str, limit: int = MAX_SMALL_BODY,
                   cut: bool = False) -> httpx.Response:
    """A streamed answer read whole, but never more than ``limit`` bytes (a registry could send a
    gigabyte as an error page): more is refused, or with ``cut`` dropped.  The stream is closed."""
    try:
        data = _body_within(resp, limit, what, f"the answer is larger than {limit} bytes", cut)
    finally:
        resp.close()
    headers = [(k, v) for k, v in resp.headers.multi_items()
               if k.lower() not in ("content-encoding", "content-length")]   # what is kept is decoded
    out = httpx.Response(resp.status_code, headers=headers, content=data, request=resp.request)
    out.extensions = resp.extensions
    return out


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Client:
    """The distribution API for ``registry/repository``, with ``actions`` (``pull``, ``push``) in its scope."""

    def __init__(self, registry: str, repository: str, *, actions: tuple[str, ...] = ("pull",),
                 insecure: bool = False, ca_file: str | None = None,
                 credentials: Credentials | None = None) -> None:
        self.registry = registry
        self.repository = repository
        settings = registry_settings(registry)
        self.insecure = insecure or bool(settings.get("insecure"))
        self.ca_file = ca_file or settings.get("ca_file")
        self.credentials = credentials if credentials is not None else find_credentials(registry)
        self.scopes = {f"repository:{repository}:{','.join(actions)}"}
        self.endpoint = HUB_ENDPOINT if registry == "docker.io" else registry
        self.base = ""
        self.http: httpx.Client | None = None
        self._challenge: Challenge | None = None
        self._token: tuple[str, float] | None = None       # (token, expiry)
        self._lock = threading.Lock()

    @property
    def where(self) -> str:
        return f"{self.registry}/{self.repository}"

    # --- connection and authentication ------------------------------------------------

    def _make_http(self, verify) -> httpx.Client:
        timeout = read_timeout()
        return httpx.Client(verify=verify, follow_redirects=True, max_redirects=MAX_REDIRECTS, http2=False,
                            timeout=httpx.Timeout(timeout, connect=min(15.0, timeout)),
                            limits=httpx.Limits(max_connections=8, max_keepalive_connections=8),
                            headers={"User-Agent": f"unionfs/{__version__} httpx/{httpx.__version__}"})

    def connect(self) -> "Client":
        """Find the endpoint and how to authenticate: ``GET /v2/``."""
        if self.insecure:
            attempts = [("https", False), ("http", False)]
        elif self.ca_file:
            try:
                attempts = [("https", ssl.create_default_context(cafile=self.ca_file))]
            except (OSError, ssl.SSLError) as e:
                raise RegistryError(f"--ca-file {self.ca_file}: {getattr(e, 'strerror', None) or e}") from None
        else:
            attempts = [("https", True)]
        last: Exception | None = None
        for scheme, verify in attempts:
            http = self._make_http(verify)
            try:
                resp = small_response(http.send(http.build_request("GET", f"{scheme}://{self.endpoint}/v2/"),
                                                stream=True), f"{self.registry}: GET /v2/")
            except httpx.HTTPError as e:
                http.close()
                last = e
                continue
            except BaseException:
                http.close()
                raise
            self.http, self.base = http, f"{scheme}://{self.endpoint}"
            if resp.status_code == 401:
                self._challenge = parse_challenge(resp.headers.get("WWW-Authenticate"))
                if self._challenge is None or self._challenge.scheme not in ("basic", "bearer"):
                    raise RegistryError(f"{self.registry}: unsupported authentication "
                                        f"{resp.headers.get('WWW-Authenticate')!r}")
            elif resp.status_code != 200:
                raise RegistryError(f"{self.registry}: not a registry (GET /v2/ answered {_error_line(resp)})")
            return self
        assert last is not None
        raise _transport_error(last, self.registry, not self.insecure)

    def close(self) -> None:
        if self.http is not None:
            self.http.close()

    def __enter__(self) -> "Client":
        return self.connect()

    def __exit__(self, *exc) -> None:
        self.close()

    def add_scope(self, scope: str) -> None:
        with self._lock:
            if scope not in self.scopes:
                self.scopes.add(scope)
                self._token = None

    def check_login(self) -> None:
        """Prove the credentials, as ``docker login`` does: a token with no scope, then ``GET /v2/`` with it."""
        self.scopes.clear()
        try:
            self._auth_header()
            resp = self._send("GET", "/v2/")
        except RegistryError as e:
            raise RegistryError(f"login {self.registry}: {str(e).split(': ', 1)[-1]}") from None
        if resp.status_code != 200:
            raise self._fail(resp, f"login {self.registry}")

    def _auth_header(self) -> dict[str, str]:
        ch = self._challenge
        if ch is None:
            return {}
        if ch.scheme == "basic":
            if self.credentials is None:
                raise RegistryError(f"{self.registry}: unauthorized: authentication required "
                                    f"(unionfs login {self.registry})")
            return {"Authorization": self.credentials.basic()}
        with self._lock:
            if self._token is None or self._token[1] < time.monotonic():
                self._token = self._fetch_token(ch)
            return {"Authorization": f"Bearer {self._token[0]}"}

    def _fetch_token(self, ch: Challenge) -> tuple[str, float]:
        """The Docker token protocol: ``GET realm?service=...&scope=...`` (with basic credentials, if any)."""
        realm = ch.params.get("realm")
        if not realm:
            raise RegistryError(f"{self.registry}: bearer challenge without a realm")
        query = []
        if ch.params.get("service"):
            query.append(("service", ch.params["service"]))
        query += [("scope", s) for s in sorted(self.scopes)]
        url = realm + ("&" if "?" in realm else "?") + urlencode(query)
        headers = {"Authorization": self.credentials.basic()} if self.credentials else {}
        if headers and not self._may_send_credentials(realm):
            raise RegistryError(f"{self.registry}: the registry sends us to log in at {quote(realm)}, another host "
                                "over plain HTTP: not sending the credentials there")
        assert self.http is not None
        try:
            resp = small_response(self.http.send(self.http.build_request("GET", url, headers=headers), stream=True),
                                  f"{self.registry}: token server")
        except httpx.HTTPError as e:
            raise _transport_error(e, f"{self.registry}: token server {realm}", False) from None
        if resp.status_code != 200:
            raise RegistryError(f"{self.registry}: token server: {_error_line(resp)}")
        try:
            body = resp.json()
            token = body.get("token") or body.get("access_token")
            expires = float(body.get("expires_in") or 60)
        except (ValueError, AttributeError, TypeError):
            token = None
        if not isinstance(token, str) or not token:
            raise RegistryError(f"{self.registry}: token server answered without a token")
        return token, time.monotonic() + max(10.0, expires - 10.0)

    def _may_send_credentials(self, realm: str) -> bool:
        """Credentials go to the registry's own host, or to another (a token realm, an upload location)
        over HTTPS only (Docker sends them to any realm; a registry reached over plain HTTP could then
        send them anywhere in clear)."""
        try:
            url = httpx.URL(realm)
        except (httpx.InvalidURL, ValueError):
            return False
        return url.scheme == "https" or url.host == httpx.URL(self.base or f"http://{self.endpoint}").host

    # --- requests -----------------------------------------------------------------------

    def url(self, path: str) -> str:
        return path if path.startswith(("http://", "https://")) else self.base + path

    def _send(self, method: str, path: str, *, headers: dict | None = None,
              body: Callable[[], bytes | Iterator[bytes]] | None = None, stream: bool = False,
              params: dict | None = None) -> httpx.Response:
        """One request, authenticated; after a 401, authenticate again (the challenge may say a new
        scope) and retry once.  ``body`` makes the request body, so a retry can send it again."""
        assert self.http is not None, "connect() first"
        for attempt in (0, 1):
            hdrs = dict(headers or {})
            url = httpx.URL(self.url(path))
            if self._may_send_credentials(str(url)):   # not to another host (an upload Location) in clear
                hdrs.update(self._auth_header())
            if params:   # keep the query an upload Location carries (_state=...)
                url = url.copy_merge_params(params)
            req = self.http.build_request(method, url, headers=hdrs, content=body() if body else None)
            try:
                resp = self.http.send(req, stream=True)
                if not stream:
                    resp = small_response(resp, f"{self.where}: {method} {quote(url.path)}")
            except httpx.HTTPError as e:
                raise _transport_error(e, self.where, False) from None
            if resp.status_code != 401 or attempt == 1:
                return resp
            ch = parse_challenge(resp.headers.get("WWW-Authenticate"))
            if ch is None or (self._challenge is not None and ch.scheme == "basic" and self._challenge == ch):
                return resp   # credentials were sent and refused: nothing to retry
            resp.close()
            if ch.scheme == "bearer" and ch.params.get("scope"):
                for s in ch.params["scope"].split(" "):
                    self.add_scope(s)
            with self._lock:
                self._challenge, self._token = ch, None
        raise AssertionError

    def _fail(self, resp: httpx.Response, what: str) -> RegistryError:
        if resp.is_stream_consumed is False:
            try:
                resp = small_response(resp, what, limit=64 << 10, cut=True)
            except (httpx.HTTPError, httpx.StreamError, RegistryError):
                pass
        line = _error_line(resp)
        if resp.status_code == 401 and self.credentials is not None:
            line += f" (credentials from {self.credentials.source} were refused)"
        elif resp.status_code == 401:
            line += f" (unionfs login {self.registry})"
        return RegistryError(f"{what}: {line}")

    # --- manifests ------------------------------------------------------------------------

    def get_manifest(self, ref: str) -> tuple[bytes, str, str]:
        """A manifest or index by tag or digest: (bytes, media type, digest), the digest verified."""
        what = f"{self.where}{'@' if ref.startswith('sha256:') else ':'}{ref}"
        resp = self._send("GET", f"/v2/{self.repository}/manifests/{ref}", headers={"Accept": ACCEPT},
                          stream=True)
        data = self._read_bounded(resp, MAX_MANIFEST, what, "manifest larger than")
        digest = _sha256(data)
        if ref.startswith("sha256:") and digest != ref:
            raise RegistryError(f"{what}: manifest does not match its digest (got {digest})")
        header = resp.headers.get("Docker-Content-Digest", "")
        if header.startswith("sha256:") and header != digest:
            raise RegistryError(f"{what}: manifest does not match the registry's Docker-Content-Digest "
                                f"(expected {header}, got {digest})")
        media = resp.headers.get("Content-Type", "").split(";")[0].strip()
        if media in MEDIA_DOCKER_SCHEMA1:
            raise RegistryError(f"{what}: Docker schema 1 manifests are not supported (deprecated since 2017)")
        return data, media, digest

    def put_manifest(self, ref: str, data: bytes, media_type: str) -> str:
        what = f"{self.where}:{ref}"
        resp = self._send("PUT", f"/v2/{self.repository}/manifests/{ref}", headers={"Content-Type": media_type},
                          body=lambda: data)
        if resp.status_code not in (200, 201):
            raise self._fail(resp, f"push {what}: manifest")
        digest = _sha256(data)
        header = resp.headers.get("Docker-Content-Digest", "")
        if header.startswith("sha256:") and header != digest:
            raise RegistryError(f"push {what}: the registry stored the manifest as {header}, not {digest}")
        return digest

    # --- blobs --------------------------------------------------------------------------

    def blob_exists(self, digest: str) -> bool:
        resp = self._send("HEAD", f"/v2/{self.repository}/blobs/{digest}")
        if resp.status_code == 200:
            return True
        if resp.status_code == 404:
            return False
        raise self._fail(resp, f"{self.where}: blob {digest}")

    def _read_bounded(self, resp: httpx.Response, limit: int, what: str, too_big: str) -> bytes:
        """The whole body of a 200 answer, refusing more than ``limit`` bytes (by Content-Length before
        reading, else as it arrives); the response is closed."""
        try:
            if resp.status_code != 200:
                raise self._fail(resp, what)
            if _content_length(resp) > limit:
                raise RegistryError(f"{what}: {too_big} {limit} bytes (the registry announces "
                                    f"{_content_length(resp)})")
            return _body_within(resp, limit, what, f"{too_big} {limit} bytes")
        except httpx.HTTPError as e:
            raise _transport_error(e, what, False) from None
        finally:
            resp.close()

    def get_small_blob(self, digest: str, limit: int = 64 << 20) -> bytes:
        """A config blob, verified against its digest."""
        what = f"{self.where}: blob {digest}"
        resp = self._send("GET", f"/v2/{self.repository}/blobs/{digest}", stream=True)
        data = self._read_bounded(resp, limit, what, "larger than")
        if _sha256(data) != digest:
            raise RegistryError(f"{what}: does not match its digest (got {_sha256(data)})")
        return data

    def fetch_blob(self, digest: str, out: BinaryIO, offset: int, size: int | None,
                   on_data: Callable[[bytes], None], on_restart: Callable[[], None],
                   cancelled: threading.Event | None = None) -> int:
        """Append the blob's bytes from ``offset`` on to ``out`` (a file positioned at ``offset``),
        passing each chunk to ``on_data`` (which hashes it).  When the registry ignores the
        ``Range`` and sends everything, ``out`` is truncated and ``on_restart`` called first.
        Returns the offset the registry's data started at, or -1 for "416: start again"."""
        what = f"{self.where}: blob {digest}"
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        resp = self._send("GET", f"/v2/{self.repository}/blobs/{digest}", headers=headers, stream=True)
        try:
            if resp.status_code == 416 and offset:
                return -1   # the partial file is no prefix of the blob: start again
            if resp.status_code not in (200, 206):
                raise self._fail(resp, what)
            start = offset if resp.status_code == 206 else 0
            if start != offset:
                out.seek(0)
                out.truncate()
                on_restart()
            got = start
            for chunk in resp.iter_raw():   # as received (no re-chunking: a cut keeps what arrived)
                if cancelled is not None and cancelled.is_set():
                    raise Cancelled()
                got += len(chunk)
                if size is not None and got > size:
                    raise RegistryError(f"{what}: the registry sent more than the {size} bytes the manifest says")
                out.write(chunk)
                on_data(chunk)
            return start
        except httpx.HTTPError as e:
            raise _transport_error(e, what, False) from None
        finally:
            resp.close()

    # --- uploads ----------------------------------------------------------------------------

    def mount_blob(self, digest: str, source_repo: str) -> tuple[bool, str | None]:
        """Cross-repository mount: (True, None) when mounted; else (False, upload location) when the
        registry opened an upload session instead."""
        self.add_scope(f"repository:{source_repo}:pull")
        resp = self._send("POST", f"/v2/{self.repository}/blobs/uploads/",
                          params={"mount": digest, "from": source_repo}, body=lambda: b"")
        if resp.status_code == 201:
            return True, None
        if resp.status_code == 202:
            return False, resp.headers.get("Location")
        raise self._fail(resp, f"push {self.where}: mount {digest} from {source_repo}")

    def start_upload(self) -> str:
        resp = self._send("POST", f"/v2/{self.repository}/blobs/uploads/", body=lambda: b"")
        if resp.status_code != 202 or not resp.headers.get("Location"):
            raise self._fail(resp, f"push {self.where}: start upload")
        return resp.headers["Location"]

    def _location(self, base: str, loc: str | None) -> str:
        if not loc:
            raise RegistryError(f"push {self.where}: the registry gave no upload location")
        return str(httpx.URL(self.url(base)).join(loc))

    def upload(self, location: str, path: str, digest: str, size: int, chunk_size: int | None = None,
               on_bytes: Callable[[int], None] | None = None) -> None:
        """Upload a blob file: one ``PUT`` (monolithic), or ``PATCH`` chunks of ``chunk_size`` and a
        closing ``PUT``.  The registry checks the digest; so do we, on the way out."""
        what = f"push {self.where}: blob {digest}"
        location = self._location("/", location)
        if chunk_size and size > chunk_size:
            with open(path, "rb") as f:
                offset = 0
                while offset < size:
                    data = f.read(chunk_size)
                    if not data:
                        raise RegistryError(f"{what}: {path} is shorter than {size} bytes")
                    end = offset + len(data) - 1
                    resp = self._send("PATCH", location, body=lambda d=data: d,
                                      headers={"Content-Type": "application/octet-stream",
                                               "Content-Range": f"{offset}-{end}",
                                               "Content-Length": str(len(data))})
                    if resp.status_code != 202:
                        raise self._fail(resp, what)
                    location = self._location(location, resp.headers.get("Location"))
                    offset += len(data)
                    if on_bytes:
                        on_bytes(len(data))
            resp = self._send("PUT", location, params={"digest": digest}, body=lambda: b"",
                              headers={"Content-Length": "0"})
        else:
            def body() -> Iterator[bytes]:
                h = hashlib.sha256()
                with open(path, "rb") as f:
                    while chunk := f.read(CHUNK):
                        h.update(chunk)
                        if on_bytes:
                            on_bytes(len(chunk))
                        yield chunk
                if "sha256:" + h.hexdigest() != digest:
                    raise RegistryError(f"{what}: the store's copy {path} no longer matches its digest")
            resp = self._send("PUT", location, params={"digest": digest}, body=body,
                              headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)})
        if resp.status_code != 201:
            raise self._fail(resp, what)
