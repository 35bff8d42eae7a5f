"""The image model: immutable values parsed (and validated) from OCI/Docker JSON.

Like go-containerregistry's ``pkg/v1``: an :class:`Image` is its config (by
digest, the image id) plus its layers ordered base first; a :class:`Layer` has
two names, the ``digest`` of the blob as shipped (maybe compressed) and the
``diff_id`` of the uncompressed tar, which is what the store keys layers by.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import UsageError


class ImageError(UsageError):
    """Bad input (an archive, a reference, a missing image): one line for the user, exit status 2."""


DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
HEX_RE = re.compile(r"^[0-9a-f]{1,64}$")
# Docker's grammar (distribution/reference), lower-case path components; an optional registry host[:port].
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_HOST = r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*(?::[0-9]+)?)"
REPO_RE = re.compile(rf"^(?:{_HOST}/)?{_COMPONENT}(?:/{_COMPONENT})*$")
TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")

MEDIA_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
MEDIA_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MEDIA_DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
MANIFEST_TYPES = (MEDIA_OCI_MANIFEST, MEDIA_DOCKER_MANIFEST)
INDEX_TYPES = (MEDIA_OCI_INDEX, MEDIA_DOCKER_LIST)


MAX_JSON = 8 << 20      # manifests, configs, indexes, manifest.json: containerd refuses manifests above 4 MiB
MAX_JSON_DEPTH = 64     # no honest image document nests deeper; json's decoder would recurse ~1000 deep
MAX_QUOTE = 100         # characters of an outside name an error message quotes
MAX_LAYERS = 500        # layers of one image (Docker's overlay2 stops at 125); each is a directory fd when mounted
MAX_IMAGES = 1000       # images (index or manifest.json entries) in one archive


def quote(value: Any, limit: int = MAX_QUOTE) -> str:
    """An outside name for an error message: ``repr`` (so newlines and NULs show as escapes), capped."""
    if isinstance(value, bytes):
        value = os.fsdecode(value)
    if not isinstance(value, str):
        return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else _json_type(value)
    text = value
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def check_digest(value: Any, what: str) -> str:
    """A ``sha256:<64 hex>`` digest; other algorithms and malformed values are refused."""
    if not isinstance(value, str) or not DIGEST_RE.match(value):
        raise ImageError(f"{what}: not a sha256 digest: {quote(value, 80)}")
    return value


DOCKER_HUB = "docker.io"


@dataclass(frozen=True)
class Reference:
    """Docker's reference grammar: ``[registry[:port]/]repository[:tag][@sha256:digest]``.

    ``repository`` is the familiar name, as Docker shows it: the registry host stays in it
    unless it is ``docker.io``, and ``library/`` is dropped for official single-name images.
    The tag defaults to ``latest`` unless a digest is given alone (then ``tag`` is None).
    """

    repository: str
    tag: str | None = "latest"
    digest: str | None = None

    @classmethod
    def parse(cls, text: str, allow_digest: bool = False) -> "Reference":
        if not isinstance(text, str):
            raise ImageError(f"image reference {quote(text)}: not a string")
        name, digest = text, None
        if "@" in text:
            if not allow_digest:
                raise ImageError(f"{quote(text)}: references by digest (@sha256:...) are not supported here; "
                                 "use repo:tag or an id")
            name, _, digest = text.partition("@")
            if not DIGEST_RE.match(digest):
                raise ImageError(f"{quote(text)}: invalid digest {quote(digest)}: expected sha256: and "
                                 "64 lower-case hex digits")
        repo, tag = name, None
        colon = name.rfind(":")
        if colon != -1 and "/" not in name[colon + 1:]:
            repo, tag = name[:colon], name[colon + 1:]
            if not TAG_RE.match(tag):
                raise ImageError(f"{quote(text)}: invalid tag {quote(tag)}: use up to 128 of A-Z a-z 0-9 _ . -, "
                                 "not starting with . or -")
        if tag is None and digest is None:
            tag = "latest"
        for prefix in ("docker.io/", "index.docker.io/"):
            if repo.startswith(prefix):
                rest = repo[len(prefix):]
                # docker.io/host.name/x stays spelled out: without the prefix it would name another registry
                repo = DOCKER_HUB + "/" + rest if "/" in rest and _is_domain(rest.split("/", 1)[0]) else rest
                break
        if repo.startswith("library/") and repo.count("/") == 1:
            repo = repo[len("library/"):]
        if not repo or len(repo) > 255 or not REPO_RE.match(repo):
            raise ImageError(f"{quote(text)}: invalid repository name {quote(repo)}: lower-case letters, digits and "
                             "separators (. _ -), components separated by /")
        return cls(repo, tag, digest)

    @property
    def registry(self) -> str:
        """The registry's host[:port] (``docker.io`` by default)."""
        first, slash, _ = self.repository.partition("/")
        return first if slash and _is_domain(first) else DOCKER_HUB

    @property
    def path(self) -> str:
        """The repository as the registry knows it (``library/alpine`` on Docker Hub)."""
        first, slash, rest = self.repository.partition("/")
        if slash and _is_domain(first):
            return rest
        return self.repository if slash else "library/" + self.repository

    @property
    def tagged(self) -> str:
        return f"{self.repository}:{self.tag or 'latest'}"

    def __str__(self) -> str:
        return self.repository + (f":{self.tag}" if self.tag else "") + (f"@{self.digest}" if self.digest else "")


def _is_domain(component: str) -> bool:
    """Docker's rule: a first path component is a registry if it has a dot or a port, is localhost,
    or has upper-case letters (repositories cannot)."""
    return "." in component or ":" in component or component == "localhost" or component != component.lower()


@dataclass(frozen=True)
class Layer:
    """One layer of an image. ``size`` is the blob's size as shipped."""

    diff_id: str
    digest: str
    media_type: str
    size: int

    def to_json(self) -> dict:
        return {"diff_id": self.diff_id, "digest": self.digest, "media_type": self.media_type, "size": self.size}

    @classmethod
    def from_json(cls, d: dict) -> "Layer":
        return cls(d["diff_id"], d["digest"], d["media_type"], int(d["size"]))


@dataclass(frozen=True)
class History:
    created: str | None
    created_by: str
    author: str
    comment: str
    empty_layer: bool


@dataclass(frozen=True)
class Config:
    """The parts of an image config (OCI image-spec config.md) that we show or use."""

    created: str | None
    author: str
    architecture: str
    os: str
    config: dict          # Env, Cmd, Entrypoint, WorkingDir, User, ExposedPorts, Volumes, Labels, ...
    diff_ids: tuple[str, ...]
    history: tuple[History, ...]

    @classmethod
    def parse(cls, raw: bytes, what: str = "image config") -> "Config":
        d = parse_json(raw, what)
        if not isinstance(d, dict):
            raise ImageError(f"{what}: not a JSON object")
        rootfs = d.get("rootfs")
        if not isinstance(rootfs, dict) or rootfs.get("type") != "layers" or not isinstance(rootfs.get("diff_ids"), list):
            raise ImageError(f"{what}: no rootfs of type 'layers' with diff_ids")
        if len(rootfs["diff_ids"]) > MAX_LAYERS:
            raise ImageError(f"{what}: {len(rootfs['diff_ids'])} layers, more than the {MAX_LAYERS} an image may have")
        diff_ids = tuple(check_digest(x, f"{what}: rootfs.diff_ids") for x in rootfs["diff_ids"])
        hist = []
        for h in field_of(d, "history", list, what) or []:
            if not isinstance(h, dict):
                raise ImageError(f"{what}: history entry is not an object")
            hist.append(History(_str(h.get("created")) or None, _str(h.get("created_by")), _str(h.get("author")),
                                _str(h.get("comment")), bool(h.get("empty_layer", False))))
        if hist and sum(not h.empty_layer for h in hist) != len(diff_ids):
            hist = []  # inconsistent history: ignore it rather than show wrong sizes
        cfg = field_of(d, "config", dict, what, {})
        _check_run_config(cfg, f"{what}: config")
        return cls(_str(d.get("created")) or None, _str(d.get("author")), _str(d.get("architecture")),
                   _str(d.get("os")), cfg, diff_ids, tuple(hist))


_STR_LISTS = ("Env", "Cmd", "Entrypoint", "Shell", "OnBuild")
_STRINGS = ("WorkingDir", "User", "StopSignal", "Hostname", "Domainname")
_OBJECTS = ("ExposedPorts", "Volumes")


def _check_run_config(cfg: dict, what: str) -> None:
    """The fields ``run``, ``commit`` and ``inspect`` use have the types the spec gives them."""
    for key in _STR_LISTS:
        for item in field_of(cfg, key, list, what, []):
            if not isinstance(item, str):
                raise ImageError(f"{what}: {key} holds {_json_type(item)}, not only strings")
    for key in _STRINGS:
        field_of(cfg, key, str, what)
    for key in _OBJECTS:
        field_of(cfg, key, dict, what)
    str_map(cfg, "Labels", what)


def _str(v: Any) -> str:
    return v if isinstance(v, str) else ""


@dataclass(frozen=True)
class Image:
    """A stored image: ``id`` is the digest of the config bytes exactly as stored."""

    id: str
    manifest_digest: str
    layers: tuple[Layer, ...]
    config: Config
    repo_tags: tuple[str, ...] = field(default=())
    layer_sizes: tuple[int, ...] = field(default=())   # uncompressed, from the store's layer records
    repo_digests: tuple[str, ...] = field(default=())  # repo@sha256:<manifest digest>, from pulls and pushes

    @property
    def size(self) -> int:
        """Uncompressed size of all layers, as ``docker images`` shows it."""
        return sum(self.layer_sizes)


def dump_json(doc: Any) -> bytes:
    """A document as written to a blob or an archive: compact, as Docker and skopeo write it."""
    return json.dumps(doc, separators=(",", ":")).encode()


def parse_json(raw: bytes, what: str, limit: int = MAX_JSON) -> Any:
    """A JSON document from outside, bounded in size and nesting depth before anyone walks it."""
    if len(raw) > limit:
        raise ImageError(f"{what}: implausibly large for JSON ({len(raw)} bytes, at most {limit})")
    try:
        doc = json.loads(raw)
    except RecursionError:
        raise ImageError(f"{what}: JSON nested more than {MAX_JSON_DEPTH} levels deep") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ImageError(f"{what}: not JSON ({str(e)[:200]})") from None
    _check_depth(doc, what)
    return doc


def _check_depth(doc: Any, what: str) -> None:
    """Refuse documents nested deeper than MAX_JSON_DEPTH (iteratively: the walk itself must not recurse)."""
    stack = [(doc, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            children = value.values()
        elif isinstance(value, list):
            children = value
        else:
            continue
        if depth > MAX_JSON_DEPTH:
            raise ImageError(f"{what}: JSON nested more than {MAX_JSON_DEPTH} levels deep")
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))


_TYPE_WORDS = {str: "a string", int: "an integer", list: "a list", dict: "an object", bool: "true or false"}


def field_of(doc: dict, key: str, kind: type, what: str, default: Any = None) -> Any:
    """``doc[key]`` when it is of type ``kind``; ``default`` when absent or null; else one-line ImageError.
    (bool is no int here: JSON ``true`` is not a size.)"""
    value = doc.get(key)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ImageError(f"{what}: {key} is {_json_type(value)}, not {_TYPE_WORDS.get(kind, kind.__name__)}")
    return value


def _json_type(value: Any) -> str:
    for kind in (bool, str, int, list, dict):
        if isinstance(value, kind):
            return _TYPE_WORDS[kind]
    return "a number" if isinstance(value, float) else "null" if value is None else type(value).__name__


def str_map(doc: dict, key: str, what: str) -> dict[str, str]:
    """An object of strings (annotations, labels): absent or null is empty."""
    value = field_of(doc, key, dict, what, {})
    for k, v in value.items():
        if not isinstance(v, str):
            raise ImageError(f"{what}: {key}[{quote(k)}] is {_json_type(v)}, not a string")
    return value


def parse_manifest(raw: bytes, what: str = "manifest") -> tuple[dict, list[dict]]:
    """An OCI/Docker v2 manifest -> (config descriptor, layer descriptors), validated."""
    m = parse_json(raw, what)
    if not isinstance(m, dict) or not isinstance(m.get("config"), dict) or not isinstance(m.get("layers"), list):
        raise ImageError(f"{what}: not an image manifest (no config and layers)")
    field_of(m, "mediaType", str, what)
    if len(m["layers"]) > MAX_LAYERS:
        raise ImageError(f"{what}: {len(m['layers'])} layers, more than the {MAX_LAYERS} an image may have")
    for desc in [m["config"], *m["layers"]]:
        check_descriptor(desc, what)
    return m["config"], m["layers"]


def layer_media(desc: dict, where: str) -> str:
    """A layer descriptor's media type, if it is one we can use: a tar (maybe compressed), not encrypted."""
    media = desc.get("mediaType") or ""
    if "tar" not in media or "encrypted" in media:
        raise ImageError(f"{where}: layer {desc['digest']}: unsupported media type {quote(media)}")
    return media


MAX_BLOB_SIZE = 1 << 42   # 4 TiB: a descriptor claiming more is not an image


def check_descriptor(desc: Any, what: str) -> dict:
    """An OCI descriptor: an object with a sha256 digest, a size that is a non-negative integer, and
    (when present) a string mediaType, an object platform and string annotations."""
    if not isinstance(desc, dict):
        raise ImageError(f"{what}: descriptor is not an object")
    check_digest(desc.get("digest"), what)
    size = field_of(desc, "size", int, f"{what}: descriptor {desc['digest']}", 0)
    if not 0 <= size <= MAX_BLOB_SIZE:
        raise ImageError(f"{what}: bad size {size} in descriptor {desc['digest']}")
    field_of(desc, "mediaType", str, f"{what}: descriptor {desc['digest']}")
    field_of(desc, "platform", dict, f"{what}: descriptor {desc['digest']}")
    str_map(desc, "annotations", f"{what}: descriptor {desc['digest']}")
    return desc
