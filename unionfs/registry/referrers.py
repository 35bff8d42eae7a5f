"""Artifacts that refer to an image manifest (OCI distribution spec 1.1 "referrers"), both ways.

An artifact is an OCI image manifest with an ``artifactType``, the empty config, its blobs as
``layers`` and the image manifest as its ``subject``.  A registry that knows the referrers API
answers ``OCI-Subject`` to the manifest's PUT and lists it under ``/v2/<name>/referrers/<digest>``;
for the others (Debian's docker-registry, distribution 2.x) the spec's tag-schema fallback: the
tag ``sha256-<hex of the subject>`` names an image index listing the referrers, which the pusher
reads, extends and puts back.  Lookups try the API first, then the tag.  Plain clients (podman,
skopeo) never look at either, so the image pulls as before.
"""
from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass

from ..image.model import MEDIA_OCI_INDEX, MEDIA_OCI_MANIFEST, check_digest, parse_json
from .client import ACCEPT, Client, RegistryError, small_response

EMPTY_MEDIA_TYPE = "application/vnd.oci.empty.v1+json"
EMPTY = b"{}"
MAX_LIST = 4 << 20


@dataclass(frozen=True)
class Blob:
    media_type: str
    data: bytes
    annotations: dict[str, str]

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.data).hexdigest()


def fallback_tag(digest: str) -> str:
    return digest.replace(":", "-", 1)


def _descriptor(media: str, data: bytes, **extra) -> dict:
    return {"mediaType": media, "digest": "sha256:" + hashlib.sha256(data).hexdigest(), "size": len(data), **extra}


def _put_blob(client: Client, digest: str, data: bytes) -> None:
    if client.blob_exists(digest):
        return
    with tempfile.NamedTemporaryFile(prefix="unionfs-artifact-") as f:
        f.write(data)
        f.flush()
        client.upload(client.start_upload(), f.name, digest, len(data))


def _get_optional(client: Client, path: str, what: str) -> bytes | None:
    """A small JSON answer, or None for a 404 (no such tag, or no referrers API)."""
    resp = small_response(client._send("GET", path, headers={"Accept": ACCEPT}, stream=True), what, MAX_LIST)
    if resp.status_code in (404, 400, 405):   # 400/405: registries without the API answer so too
        return None
    if resp.status_code != 200:
        raise client._fail(resp, what)
    return resp.content


def push_artifact(client: Client, subject: dict, artifact_type: str, blobs: list[Blob]) -> tuple[str, bool]:
    """Push an artifact referring to ``subject`` (a manifest descriptor); (its digest, whether the
    registry's referrers API took it, else the fallback tag was updated)."""
    _put_blob(client, "sha256:" + hashlib.sha256(EMPTY).hexdigest(), EMPTY)
    for b in blobs:
        _put_blob(client, b.digest, b.data)
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": MEDIA_OCI_MANIFEST, "artifactType": artifact_type,
        "config": _descriptor(EMPTY_MEDIA_TYPE, EMPTY),
        "layers": [_descriptor(b.media_type, b.data, annotations=b.annotations) for b in blobs],
        "subject": {k: subject[k] for k in ("mediaType", "digest", "size")},
    }, separators=(",", ":")).encode()
    digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    what = f"push {client.where}@{digest}"
    resp = client._send("PUT", f"/v2/{client.repository}/manifests/{digest}",
                        headers={"Content-Type": MEDIA_OCI_MANIFEST}, body=lambda: manifest)
    if resp.status_code not in (200, 201):
        raise client._fail(resp, f"{what}: artifact manifest")
    if resp.headers.get("OCI-Subject") == subject["digest"]:
        return digest, True
    tag = fallback_tag(subject["digest"])
    old = _get_optional(client, f"/v2/{client.repository}/manifests/{tag}", f"{client.where}:{tag}")
    listed: list = []
    if old is not None:
        doc = parse_json(old, f"{client.where}:{tag}")
        listed = doc.get("manifests") if isinstance(doc, dict) and isinstance(doc.get("manifests"), list) else []
    entry = _descriptor(MEDIA_OCI_MANIFEST, manifest, artifactType=artifact_type)
    listed = [d for d in listed if isinstance(d, dict) and d.get("digest") != digest] + [entry]
    index = json.dumps({"schemaVersion": 2, "mediaType": MEDIA_OCI_INDEX, "manifests": listed},
                       separators=(",", ":")).encode()
    client.put_manifest(tag, index, MEDIA_OCI_INDEX)
    return digest, False


def find_artifact(client: Client, subject_digest: str, artifact_type: str) -> tuple[str, dict] | None:
    """The newest artifact of ``artifact_type`` referring to ``subject_digest``: (its digest, its
    manifest), checked to refer to that subject; None when there is none."""
    where = f"{client.where}@{subject_digest}"
    listing = _get_optional(client, f"/v2/{client.repository}/referrers/{subject_digest}?artifactType={artifact_type}",
                            f"{where}: referrers")
    if listing is None:
        listing = _get_optional(client, f"/v2/{client.repository}/manifests/{fallback_tag(subject_digest)}",
                                f"{client.where}:{fallback_tag(subject_digest)}")
    if listing is None:
        return None
    doc = parse_json(listing, f"{where}: referrers")
    found = [d for d in (doc.get("manifests") or []) if isinstance(d, dict) and d.get("artifactType") == artifact_type] \
        if isinstance(doc, dict) and isinstance(doc.get("manifests"), list) else None
    if found is None:
        raise RegistryError(f"{where}: the referrers list is not an image index")
    if not found:
        return None
    digest = check_digest(found[-1].get("digest"), f"{where}: referrers")
    data, _, _ = client.get_manifest(digest)
    manifest = parse_json(data, f"{client.where}@{digest}: artifact")
    if not isinstance(manifest, dict) or manifest.get("artifactType") != artifact_type \
            or not isinstance(manifest.get("layers"), list):
        raise RegistryError(f"{client.where}@{digest}: not a {artifact_type} artifact")
    subject = manifest.get("subject")
    got = subject.get("digest") if isinstance(subject, dict) else None
    if got != subject_digest:
        raise RegistryError(f"{client.where}@{digest}: the artifact refers to {got}, not to the image "
                            f"manifest {subject_digest}")
    return digest, manifest
