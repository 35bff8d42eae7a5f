"""Container records: ``ROOT/containers/<id>/`` of the image store.

One directory per container, renamed into place whole (so a record is never
half-written)::

    containers/<id>/container.json   {Id, Name, Image, ImageRef, Created, Mountpoint, Upper, Work}
    containers/<id>/upper/           the writable layer (overlayfs's format, see unionfs.fs.writable and unionfs.fs.upper)
    containers/<id>/work/            its work dir (temporary files, the hard-link index)
    containers/<id>/rootfs/          where ``unionfs run`` mounts it (made on demand)
    containers/<id>/bundle/          the OCI bundle ``unionfs run`` gives the runtime
    containers/<id>/state.json       run state: Running, Pid, ExitCode, StartedAt... (see lifecycle)
    containers/<id>/container.log    a detached container's output (``logs``)
    containers/<id>/etc/             hosts, hostname, resolv.conf: bind-mounted, never in the layers

This is the record ``mount --writable IMAGE`` has always written, plus ``Name``.
Records written before names existed (or by hand) still read: a missing field
falls back to its default.  ``Mountpoint`` is where the container was last
mounted; whether it *is* mounted is asked of the system each time (a unionfs
daemon holds its upper dir open, see :func:`mounted_at`), never trusted from
the record.
"""
from __future__ import annotations

import json
import os
import random
import re
import uuid
from dataclasses import dataclass, field
from typing import Iterator

from ..errors import UsageError
from ..fs.upper import WORK_INDEX
from ..fuse.daemon import daemons_holding, is_mountpoint
from ..image.store import Store, now_iso

NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}$")   # Docker's rule for container names

_ADJECTIVES = ("brave", "calm", "eager", "fond", "gentle", "happy", "jolly", "keen", "lucid", "merry", "nifty",
               "proud", "quiet", "sharp", "stoic", "tender", "vivid", "witty", "zealous", "bold")
_NOUNS = ("babbage", "curie", "darwin", "euler", "fermi", "gauss", "hopper", "jepsen", "knuth", "lamport",
          "lovelace", "noether", "pascal", "ritchie", "shannon", "thompson", "turing", "wing", "yalow", "zuse")


class ContainerError(UsageError):
    """A mistake about containers (no such container, a name taken, mounted): one line, exit status 2."""


@dataclass
class Container:
    id: str
    name: str
    image: str          # the image id (sha256:...)
    image_ref: str      # the name it was created from, as given
    created: str
    mountpoint: str     # where it was last mounted ("" if never)
    upper: str
    work: str
    dir: str
    volumes: list[str] = field(default_factory=list)   # names of the volumes it mounts (refused to rm)

    @classmethod
    def from_record(cls, store: Store, rec: dict) -> "Container":
        cid = str(rec["Id"])
        d = store.path("containers", cid)
        return cls(cid, str(rec.get("Name") or ""), str(rec.get("Image") or ""), str(rec.get("ImageRef") or ""),
                   str(rec.get("Created") or ""), str(rec.get("Mountpoint") or ""),
                   str(rec.get("Upper") or os.path.join(d, "upper")), str(rec.get("Work") or os.path.join(d, "work")),
                   d, [str(v) for v in rec.get("Volumes") or []])

    def to_record(self) -> dict:
        return {"Id": self.id, "Name": self.name, "Image": self.image, "ImageRef": self.image_ref,
                "Created": self.created, "Mountpoint": self.mountpoint, "Upper": self.upper, "Work": self.work,
                "Volumes": self.volumes}

    @property
    def short_id(self) -> str:
        return self.id[:12]

    @property
    def rootfs(self) -> str:
        return os.path.join(self.dir, "rootfs")

    @property
    def bundle(self) -> str:
        return os.path.join(self.dir, "bundle")

    @property
    def runtime_id(self) -> str:
        """The container's name for the OCI runtime."""
        return f"unionfs-{self.short_id}"

    def file(self, name: str) -> str:
        return os.path.join(self.dir, name)


def _records(store: Store) -> Iterator[dict]:
    if not store.exists():
        return
    for name in sorted(os.listdir(store.path("containers"))):
        try:
            with open(store.path("containers", name, "container.json"), "rb") as f:
                yield json.load(f)
        except (FileNotFoundError, NotADirectoryError, ValueError):
            continue


def containers(store: Store) -> list[Container]:
    """Every container of the store, newest first."""
    out = []
    for rec in _records(store):
        if isinstance(rec, dict) and isinstance(rec.get("Id"), str) and os.path.isdir(store.path("containers", rec["Id"])):
            out.append(Container.from_record(store, rec))
    return sorted(out, key=lambda c: (c.created, c.id), reverse=True)


def using(store: Store, image_id: str) -> list[Container]:
    """The containers of ``image_id`` (an image cannot be removed while it has any)."""
    return [c for c in containers(store) if c.image == image_id]


def find(store: Store, name: str) -> Container | None:
    """A container by name, full id or unique id prefix (in that order, as Docker does); None if none matches."""
    if not name:
        return None
    all_ = containers(store)
    for c in all_:
        if c.name == name or c.id == name:
            return c
    if re.fullmatch(r"[0-9a-f]{1,64}", name):
        matches = [c for c in all_ if c.id.startswith(name)]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise ContainerError(f"{name}: ambiguous container id prefix ({len(matches)} containers match)")
    return None


def resolve(store: Store, name: str) -> Container:
    c = find(store, name)
    if c is None:
        raise ContainerError(f"{name}: no such container")
    return c


def _generated_name(taken: set[str]) -> str:
    rng = random.SystemRandom()
    for _ in range(100):
        n = f"{rng.choice(_ADJECTIVES)}_{rng.choice(_NOUNS)}"
        if n not in taken:
            return n
    while True:
        n = f"{rng.choice(_ADJECTIVES)}_{rng.choice(_NOUNS)}{rng.randrange(1000)}"
        if n not in taken:
            return n


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise ContainerError(f"{name!r}: invalid container name: use up to 128 of a-z A-Z 0-9 _ . -, "
                             "starting with a letter or digit")
    if re.fullmatch(r"[0-9a-f]{64}", name):
        raise ContainerError(f"{name!r}: a container name cannot look like a full container id")
    return name


def create(store: Store, image_name: str, name: str | None = None, mountpoint: str = "") -> Container:
    """A new container of ``image_name``: fresh ``upper/`` and ``work/``, a record, all in one rename.

    The caller holds the store's lock (so the image cannot go, and names stay unique).
    """
    image_id = store.resolve(image_name)
    taken = {c.name for c in containers(store)}
    if name is not None:
        check_name(name)
        if name in taken:
            raise ContainerError(f"{name}: the container name is already in use")
    else:
        name = _generated_name(taken)
    cid = uuid.uuid4().hex + uuid.uuid4().hex
    tmp = store.new_tmp_dir("container")
    os.mkdir(os.path.join(tmp, "upper"), 0o755)
    os.mkdir(os.path.join(tmp, "work"), 0o700)
    final = store.path("containers", cid)
    c = Container(cid, name, image_id, image_name, now_iso(), mountpoint, os.path.join(final, "upper"),
                  os.path.join(final, "work"), final)
    with open(os.path.join(tmp, "container.json"), "w") as f:
        json.dump(c.to_record(), f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, final)
    return c


def remove(store: Store, c: Container) -> None:
    """Remove a container's record and writable layer (the caller holds the store's lock)."""
    store.discard(c.dir)


def save(c: Container) -> None:
    """Rewrite a container's record atomically (the caller holds the store's lock)."""
    tmp = os.path.join(c.dir, f".container.json.{uuid.uuid4().hex}")
    with open(tmp, "w") as f:
        json.dump(c.to_record(), f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, os.path.join(c.dir, "container.json"))


@dataclass(frozen=True)
class MountState:
    pid: int             # the unionfs daemon serving it
    mountpoint: str      # "" if the daemon's mount point is not the recorded one (unknown)


def mounted_at(c: Container) -> MountState | None:
    """Is a unionfs daemon serving this container's writable layer? Asked of /proc, not of the record.

    A daemon keeps its upper dir open for the life of the mount, so the pid files in
    /run/unionfs and /proc/PID/fd tell; the mount point is the recorded one if it is
    mounted (``/proc/self/mountinfo``).
    """
    busy = daemons_holding([c.upper])
    if not busy:
        return None
    pid = next(iter(busy.values()))
    mp = c.mountpoint if c.mountpoint and is_mountpoint(c.mountpoint) else ""
    return MountState(pid, mp)


def upper_size(c: Container) -> int:
    """Bytes held by the writable layer: regular files of upper/ and of the hard-link index, each inode once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    stack = [p for p in (c.upper, os.path.join(c.work, os.fsdecode(WORK_INDEX))) if os.path.isdir(p)]
    while stack:
        d = stack.pop()
        try:
            it = os.scandir(d)
        except OSError:
            continue
        with it:
            for e in it:
                try:
                    st = e.stat(follow_symlinks=False)
                except OSError:
                    continue
                if e.is_dir(follow_symlinks=False):
                    stack.append(e.path)
                elif e.is_file(follow_symlinks=False) and (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    total += st.st_size
                elif e.is_symlink():
                    total += st.st_size
    return total
