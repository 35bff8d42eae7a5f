"""Volumes: where a container's persistent data lives, outside its layers (docker's local driver layout).

::

    ROOT/volumes/<name>/_data          what the container sees at the mount point
    ROOT/volumes/<name>/volume.json    {Name, CreatedAt, Anonymous}

A named volume (``-v NAME:/path``) is created on first use; an anonymous one (a
64-hex name) for ``-v /path`` and for each of the image's ``VOLUME`` paths.  A new,
empty volume is filled with what the image has at its mount point (owners, modes,
xattrs, links), as docker does.  A volume some container uses (running or not)
cannot be removed; ``--rm`` and ``rm -v`` remove a container's anonymous volumes.

The runtime bind-mounts ``_data`` inside the container's mount namespace, over the
FUSE rootfs: what is written there never passes through the union, so ``diff`` and
``commit`` never see it (only the mount point's directory, if the image lacked it).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import uuid
from dataclasses import dataclass

from ..fs import sys as ovl
from ..image.store import Store, now_iso
from . import model
from .model import ContainerError
from .spec import Mount

VOLUME_NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]*$")


@dataclass
class Volume:
    name: str
    created: str
    anonymous: bool
    dir: str

    @property
    def data(self) -> str:
        return os.path.join(self.dir, "_data")

    def to_record(self) -> dict:
        return {"Name": self.name, "CreatedAt": self.created, "Anonymous": self.anonymous}

    def inspect(self) -> dict:
        return {"CreatedAt": self.created, "Driver": "local", "Labels": {} if not self.anonymous else
                {"com.docker.volume.anonymous": ""}, "Mountpoint": self.data, "Name": self.name,
                "Options": {}, "Scope": "local"}


# --- parsing -v, --mount, --tmpfs -------------------------------------------------

def _check_destination(dst: str, what: str) -> str:
    if not dst.startswith("/"):
        raise ContainerError(f"{what}: the mount destination {dst!r} is not an absolute path")
    dst = os.path.normpath(dst)
    if dst == "/":
        raise ContainerError(f"{what}: cannot mount over the container's root")
    return dst


def _is_path(src: str) -> bool:
    return src.startswith(("/", "./", "../", "~")) or src in (".", "..")


def parse_volume(value: str) -> Mount:
    """``-v SRC:DST[:ro|rw]``: SRC a host path (bind) or a volume name; ``-v DST``: an anonymous volume."""
    parts = value.split(":")
    if len(parts) == 1:
        return Mount("volume", _check_destination(parts[0], f"-v {value}"))
    if len(parts) > 3:
        raise ContainerError(f"-v {value}: give SRC:DST[:OPTIONS]")
    src, dst = parts[0], parts[1]
    opts = parts[2].split(",") if len(parts) == 3 else []
    readonly = False
    for o in opts:
        if o == "ro":
            readonly = True
        elif o not in ("rw", "z", "Z", "nocopy", ""):
            raise ContainerError(f"-v {value}: unknown option {o!r} (ro or rw)")
    dst = _check_destination(dst, f"-v {value}")
    if not src:
        raise ContainerError(f"-v {value}: empty source")
    if _is_path(src):
        return Mount("bind", dst, os.path.abspath(os.path.expanduser(src)), readonly, ["create"])
    check_volume_name(src)
    return Mount("volume", dst, src, readonly)


def parse_mount(value: str) -> Mount:
    """``--mount type=bind|volume|tmpfs,source=...,target=...[,readonly][,tmpfs-size=N][,tmpfs-mode=M]``."""
    fields: dict[str, str] = {}
    for item in value.split(","):
        k, eq, v = item.partition("=")
        k = k.strip().lower()
        if not k:
            continue
        fields[k] = v if eq else "true"
    kind = fields.pop("type", "volume")
    src = fields.pop("source", fields.pop("src", ""))
    dst = fields.pop("target", fields.pop("destination", fields.pop("dst", "")))
    ro = fields.pop("readonly", fields.pop("ro", "false")).lower() in ("true", "1", "yes")
    if not dst:
        raise ContainerError(f"--mount {value}: a target= is needed")
    dst = _check_destination(dst, f"--mount {value}")
    options = []
    if kind == "tmpfs":
        if src:
            raise ContainerError(f"--mount {value}: a tmpfs has no source")
        if "tmpfs-size" in fields:
            options.append(f"size={fields.pop('tmpfs-size')}")
        if "tmpfs-mode" in fields:
            mode = fields.pop("tmpfs-mode")
            if not re.fullmatch(r"0?[0-7]{1,4}", mode):
                raise ContainerError(f"--mount {value}: tmpfs-mode must be an octal mode like 1777")
            options.append(f"mode={int(mode, 8):o}")
    elif kind == "bind":
        if not src:
            raise ContainerError(f"--mount {value}: a bind mount needs a source=")
        src = os.path.abspath(os.path.expanduser(src))
        if not os.path.exists(src):
            raise ContainerError(f"--mount {value}: bind source path does not exist: {src}")
    elif kind == "volume":
        if src:
            check_volume_name(src)
    else:
        raise ContainerError(f"--mount {value}: type must be bind, volume or tmpfs")
    fields.pop("volume-nocopy", None)
    fields.pop("bind-propagation", None)
    if fields:
        raise ContainerError(f"--mount {value}: unknown field(s) {', '.join(sorted(fields))}")
    return Mount(kind, dst, src, ro, options)


def parse_tmpfs(value: str) -> Mount:
    dst, _, opts = value.partition(":")
    return Mount("tmpfs", _check_destination(dst, f"--tmpfs {value}"), "", False,
                 [o for o in opts.split(",") if o])


def check_volume_name(name: str) -> str:
    if not VOLUME_NAME_RE.match(name) or len(name) > 255:
        raise ContainerError(f"{name!r}: invalid volume name: use a-z A-Z 0-9 _ . -, starting with a letter or "
                             "digit (or give a host path starting with / for a bind mount)")
    return name


# --- the volume store ------------------------------------------------------------

def _dir(store: Store, name: str) -> str:
    return store.path("volumes", name)


def get(store: Store, name: str) -> Volume | None:
    d = _dir(store, check_volume_name(name))
    try:
        with open(os.path.join(d, "volume.json"), "rb") as f:
            rec = json.load(f)
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return None
    return Volume(name, str(rec.get("CreatedAt") or ""), bool(rec.get("Anonymous")), d)


def resolve(store: Store, name: str) -> Volume:
    v = get(store, name)
    if v is None:
        raise ContainerError(f"{name}: no such volume")
    return v


def all_volumes(store: Store) -> list[Volume]:
    try:
        names = sorted(os.listdir(store.path("volumes")))
    except FileNotFoundError:
        return []
    return [v for v in (get(store, n) for n in names if VOLUME_NAME_RE.match(n)) if v is not None]


def create(store: Store, name: str | None = None) -> tuple[Volume, bool]:
    """(the volume, whether it is new).  The caller holds the store's lock.  Appears whole, by one rename."""
    anonymous = name is None
    name = uuid.uuid4().hex + uuid.uuid4().hex if name is None else check_volume_name(name)
    v = get(store, name)
    if v is not None:
        return v, False
    os.makedirs(store.path("volumes"), exist_ok=True)
    tmp = store.new_tmp_dir("volume")
    os.mkdir(os.path.join(tmp, "_data"), 0o755)
    v = Volume(name, now_iso(), anonymous, _dir(store, name))
    with open(os.path.join(tmp, "volume.json"), "w") as f:
        json.dump(v.to_record(), f, indent=1)
    os.rename(tmp, v.dir)
    return v, True


def users(store: Store, name: str) -> list[model.Container]:
    return [c for c in model.containers(store) if name in c.volumes]


def remove(store: Store, names: list[str], force: bool = False) -> list[str]:
    """Remove volumes no container uses (all named ones must exist, unless ``force``)."""
    done = []
    with store.locked():
        targets = []
        for n in names:
            v = get(store, n)
            if v is None:
                if force:
                    continue
                raise ContainerError(f"{n}: no such volume")
            held = users(store, n)
            if held:
                raise ContainerError(f"{n}: volume is in use by container(s) "
                                     f"{', '.join(c.name or c.short_id for c in held)}")
            targets.append(v)
        for v in targets:
            store.discard(v.dir)
            done.append(v.name)
    return done


def prune(store: Store, all_: bool = False) -> list[str]:
    """Remove unused anonymous volumes (with ``all_``, unused named ones too), as ``docker volume prune``."""
    with store.locked():
        used = {n for c in model.containers(store) for n in c.volumes}
        gone = [v for v in all_volumes(store) if v.name not in used and (all_ or v.anonymous)]
        for v in gone:
            store.discard(v.dir)
    return [v.name for v in gone]


def remove_anonymous(store: Store, c: model.Container) -> None:
    """A removed container's anonymous volumes go with it (``--rm``, ``rm -v``); the caller holds the lock."""
    others = {n for o in model.containers(store) if o.id != c.id for n in o.volumes}
    for n in c.volumes:
        v = get(store, n)
        if v is not None and v.anonymous and n not in others:
            store.discard(v.dir)


def ls_table(store: Store, quiet: bool = False) -> str:
    from ..image.report import table
    vs = all_volumes(store)
    if quiet:
        return "\n".join(v.name for v in vs)
    return table(["DRIVER", "VOLUME NAME"], [["local", v.name] for v in vs])


def fill_from_image(rootfs_fd: int, path: str, v: Volume) -> None:
    """Copy what the container's view has at ``path`` into a new, empty volume (docker's copy-up of a volume):
    read through the mounted rootfs without following a symlink out of it, owners, modes and xattrs kept."""
    try:
        src = ovl.open_beneath(rootfs_fd, os.fsencode(path.lstrip("/")))
    except OSError:
        return                       # nothing there (or not a directory): the volume stays empty
    try:
        if os.listdir(v.data):
            return
        st = os.fstat(src)
        os.chown(v.data, st.st_uid, st.st_gid)
        os.chmod(v.data, st.st_mode & 0o7777)
        r = subprocess.run(["cp", "-a", "--no-dereference", f"/proc/self/fd/{src}/.", v.data + "/"],
                           pass_fds=(src,), capture_output=True, text=True)
        if r.returncode != 0:
            raise ContainerError(f"filling volume {v.name} from the image's {path}: "
                                 f"{r.stderr.strip().splitlines()[-1] if r.stderr.strip() else 'cp failed'}")
    finally:
        os.close(src)
