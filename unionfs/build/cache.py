"""The build cache, as Docker's: (parent image, the step as substituted) -> the step's image.

A key is the sha256 of the parent image id and the step's parts (for COPY/ADD the
sources' content hash, for RUN the command, the build args in scope and the
network), never a time.  ``ROOT/build-cache/<key>`` holds the image id (and its parent's), written
by rename after the image was registered; an entry whose image is gone is a miss.
Every step's image stays in the store (untagged), so a hit after a miss elsewhere
still finds its image: the cache is readable from any step on.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid

from ..errors import UsageError
from ..image.store import Store


def key(parent: str | None, parts) -> str:
    return hashlib.sha256(json.dumps([parent or "scratch", parts], sort_keys=True).encode()).hexdigest()


def _dir(store: Store) -> str:
    return store.path("build-cache")


def lookup(store: Store, k: str) -> str | None:
    try:
        with open(os.path.join(_dir(store), k)) as f:
            image_id = f.readline().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        store.image(image_id)
    except (OSError, ValueError, UsageError):
        return None
    return image_id


def record(store: Store, k: str, image_id: str, parent: str | None) -> None:
    """Remember ``image_id`` for key ``k``, and the image it was built on (the caller holds the store's lock;
    the image is registered)."""
    d = _dir(store)
    os.makedirs(d, mode=0o700, exist_ok=True)
    tmp = os.path.join(d, f".{k}.{uuid.uuid4().hex}")
    with open(tmp, "w") as f:
        f.write(f"{image_id}\n{parent or ''}\n")
    os.rename(tmp, os.path.join(d, k))


def intermediates(store: Store) -> set[str]:
    """The images of build steps that a later step built on (``images`` hides them unless tagged, like docker)."""
    d = _dir(store)
    parents = set()
    try:
        names = os.listdir(d)
    except FileNotFoundError:
        return set()
    for n in names:
        if n.startswith("."):
            continue
        try:
            with open(os.path.join(d, n)) as f:
                f.readline()
                parents.add(f.readline().strip())
        except OSError:
            continue
    return parents
