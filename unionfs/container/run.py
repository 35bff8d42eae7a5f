"""``unionfs run``: a new container of an image, set up as docker sets one up, run under our supervisor.

1. The container is created (its writable layer) and its run configuration recorded.
2. The supervisor (:mod:`.lifecycle`) mounts it on ``containers/<id>/rootfs`` with
   ``suid,dev,allow_other`` and calls :func:`prepare` with the mounted view: the user
   is resolved in its /etc/passwd and /etc/group, volumes are created (and a new one
   filled with what the image has at its mount point), /etc/hosts, /etc/hostname and
   /etc/resolv.conf are written in the record dir (bind-mounted: never in the
   layers), and the bundle's ``config.json`` is written (:mod:`.spec`).
3. It runs in the foreground (our stdio, our exit status) or detached (``-d``: the
   supervisor is a background process, the output goes to ``container.log``).
"""
from __future__ import annotations

import json
import os
import shutil
import stat

from ..fs import formats
from ..fs import sys as ovl
from ..image.store import Store
from . import model, volumes
from .lifecycle import Attach, RunConfig, detach, supervise
from .model import Container, ContainerError
from .mounting import image_lower
from .runtime import find_runtime
from .spec import INIT_PATH, Mount, RunOptions, bind, describe, process_spec, runtime_spec, stop_signal, tmpfs_mount

TINI = ("tini-static",)     # --init: a static tini (the image may have no libc), on the container's /dev


def _image_config(store: Store, c: Container) -> dict:
    return json.loads(store.blob(c.image)).get("config") or {}


def etc_files(c: Container, hostname: str) -> list[dict]:
    """/etc/hosts, /etc/hostname, /etc/resolv.conf of the container: files in its record dir, bind-mounted."""
    d = c.file("etc")
    os.makedirs(d, exist_ok=True)
    files = {
        "hostname": f"{hostname}\n",
        "hosts": f"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{hostname}\n",
    }
    try:
        with open("/etc/resolv.conf") as f:
            files["resolv.conf"] = f.read()
    except OSError:
        files["resolv.conf"] = ""
    out = []
    for name, text in files.items():
        path = os.path.join(d, name)
        with open(path, "w") as f:
            f.write(text)
        out.append(bind(path, f"/etc/{name}"))
    return out


ETC_FILES = ("/etc/hostname", "/etc/hosts", "/etc/resolv.conf")


def _mirror_dir(fd: int, name: bytes, st) -> None:
    """Give a directory of the init layer the owner and mode the image's has: its own as root; in a
    user's store recorded in the override, as the store's layers have them (image.extract)."""
    if os.geteuid() == 0:
        ovl.chown_at(fd, name, st.uid, st.gid)
        ovl.chmod_at(fd, name, st.mode & 0o7777)
        return
    ovl.setxattr_at(fd, name, formats.OVERRIDE_CONTAINERS,
                    formats.Override(st.uid, st.gid, st.mode & 0o7777, stat.S_IFDIR).encode())
    ovl.chmod_at(fd, name, formats.stored_perm(stat.S_IFDIR, st.mode))


def init_layer(store: Store, c: Container, config: dict, opts: RunOptions) -> None:
    """Docker's "init layer": a lower layer of the container's own, above the image's, holding the mount
    points the runtime needs and the image lacks (/etc/hosts, volume and bind targets), so the runtime
    never creates them in the writable layer and ``diff``/``commit`` never show them.

    An existing parent is copied with its owner, mode and mtime (the merged directory looks as in the
    image); nothing is made below a symlink or over anything the image has."""
    from .view import UnionView, split
    targets = [(p, True) for p in ETC_FILES]
    for m in opts.mounts:
        targets.append((m.destination, m.type == "bind" and os.path.isfile(m.source)))
    targets += [(os.path.normpath(p), False) for p in (config.get("Volumes") or {})]
    root = c.file("init")
    os.makedirs(root, mode=0o755, exist_ok=True)
    mirrored: list[tuple[bytes, int]] = []
    with UnionView(image_lower(store, c.image)) as view:
        root_fd = os.open(root, ovl.O_DIR)
        try:
            for path, is_file in targets:
                parts = split(os.fsencode(path))
                if not parts or view.stat(b"/".join(parts)) is not None:
                    continue
                fd = os.dup(root_fd)
                try:
                    for i, name in enumerate(parts):
                        rel = b"/".join(parts[:i + 1])
                        last = i == len(parts) - 1
                        st = view.stat(rel)
                        if st is not None and not st.is_dir:
                            break                     # below a symlink or a file: leave it to the runtime
                        if not ovl.exists_at(fd, name):
                            if last and is_file:
                                os.close(ovl.open_at(fd, name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
                                break
                            ovl.mkdir_at(fd, name, 0o755)
                            if st is not None:
                                _mirror_dir(fd, name, st)
                                mirrored.append((rel, st.mtime_ns))
                        if last:
                            break
                        nfd = ovl.open_dir_at(fd, name)
                        os.close(fd)
                        fd = nfd
                finally:
                    os.close(fd)
            for rel, mtime in sorted(mirrored, key=lambda r: -r[0].count(b"/")):   # after their children
                head, _, name = rel.rpartition(b"/")
                pfd = ovl.open_beneath(root_fd, head)
                try:
                    ovl.utime_at(pfd, name, (mtime, mtime))
                finally:
                    os.close(pfd)
        finally:
            os.close(root_fd)


def _depth(m: Mount) -> int:
    return m.destination.rstrip("/").count("/")


def resolve_mounts(store: Store, c: Container, opts: RunOptions, config: dict, root_fd: int) -> list[dict]:
    """The user's mounts and the image's VOLUME paths as runtime-spec mounts, parents first; volumes created
    (and filled) as needed and recorded on the container, so none is removed while it is used."""
    given = {m.destination for m in opts.mounts}
    wanted = list(opts.mounts) + [Mount("volume", os.path.normpath(p)) for p in sorted(config.get("Volumes") or {})
                                  if os.path.normpath(p) not in given and os.path.normpath(p) != "/"]
    out: list[dict] = []
    names: list[str] = []
    with store.locked():
        for m in sorted(wanted, key=_depth):
            if m.type == "bind":
                if not os.path.exists(m.source):
                    if "create" not in m.options:
                        raise ContainerError(f"bind source path does not exist: {m.source}")
                    os.makedirs(m.source, exist_ok=True)     # -v creates a missing host directory, as docker
                out.append(bind(m.source, m.destination, m.readonly))
            elif m.type == "volume":
                v, new = volumes.create(store, m.source or None)
                names.append(v.name)
                if new:
                    volumes.fill_from_image(root_fd, m.destination, v)
                out.append(bind(v.data, m.destination, m.readonly))
            else:
                out.append(tmpfs_mount(m.destination, m.options, m.readonly))
        rec = model.resolve(store, c.id)
        rec.volumes = names
        model.save(rec)
        c.volumes = names
    return out


def init_mount() -> dict:
    for name in TINI:
        path = shutil.which(name)
        if path:
            return bind(path, INIT_PATH, readonly=True)
    raise ContainerError("--init needs a static tini: apt-get install tini")


def prepare(store: Store, c: Container, config: dict, opts: RunOptions) -> None:
    """Write the bundle of a new container from its mounted rootfs (see the module docstring)."""
    hostname = opts.hostname or c.short_id
    root_fd = os.open(c.rootfs, ovl.O_DIR & ~os.O_NOFOLLOW)
    try:
        process = process_spec(config, root_fd, opts, hostname)
        mounts = resolve_mounts(store, c, opts, config, root_fd)
    finally:
        os.close(root_fd)
    given = {m["destination"] for m in mounts}
    mounts = mounts + [m for m in etc_files(c, hostname) if m["destination"] not in given]   # after volumes
    if opts.init:
        mounts.append(init_mount())
    spec = runtime_spec(process, c.rootfs, hostname, opts, mounts)
    os.makedirs(c.bundle, mode=0o700, exist_ok=True)
    tmp = os.path.join(c.bundle, "config.json.tmp")
    with open(tmp, "w") as f:
        json.dump(spec, f, indent=1)
    os.rename(tmp, os.path.join(c.bundle, "config.json"))
    cfg = RunConfig.load(c)
    cfg.command = describe(process["args"])
    cfg.save(c)


def run(store: Store, image: str, opts: RunOptions, name: str | None = None, remove: bool = False,
        detached: bool = False, runtime: str | None = None, record_prefetch: bool = False) -> int:
    """``docker run``: the container's exit status in the foreground; with ``detached``, 0 once it runs
    (the id is printed).  Failures to start raise :class:`.lifecycle.RunFailed` with docker's code."""
    runtime_path = find_runtime(runtime)            # before anything is created
    if opts.init:
        init_mount()
    from .commands import create
    c: Container = create(store, image, name)
    if record_prefetch:   # the container's mount records what the run reads (image.prefetch)
        from ..image.prefetch import RECORD_FLAG
        open(c.file(RECORD_FLAG), "w").close()
    return run_container(store, c, opts, remove, detached, runtime_path)


def run_container(store: Store, c: Container, opts: RunOptions, remove: bool = False, detached: bool = False,
                  runtime: str | None = None) -> int:
    """Run ``opts`` in an existing, never-run container (``run``; a Dockerfile's ``RUN`` on a container
    of the previous step): in the foreground its exit status, with our stdio."""
    try:
        runtime_path = find_runtime(runtime)
        config = _image_config(store, c)
        RunConfig(runtime_path, stop_signal(config), opts.tty, opts.interactive, remove).save(c)
        init_layer(store, c, config, opts)
    except BaseException:
        if remove:
            with store.locked():
                model.remove(store, c)
        raise

    def setup() -> None:
        prepare(store, c, config, opts)
    if detached:
        detach(store, c, setup)
        print(c.id, flush=True)
        return 0
    return supervise(store, c, Attach(True, opts.interactive), prepare=setup)

def options(command: list[str], *, env: list[str], env_files: list[str], volumes_: list[str], mounts: list[str],
            tmpfs: list[str], entrypoint: str | None, workdir: str | None, user: str | None,
            hostname: str | None, network: str, read_only: bool, cap_add: list[str], cap_drop: list[str],
            privileged: bool, init: bool, tty: bool, interactive: bool) -> RunOptions:
    """``docker run``'s flags as :class:`RunOptions` (each checked: a mistake is one line, nothing created)."""
    from .spec import NETWORKS, parse_caps, parse_entrypoint, parse_env, read_env_file
    if network not in NETWORKS:
        raise ContainerError(f"--network {network}: only none or host")
    if hostname is not None and not hostname:
        raise ContainerError("--hostname: empty")
    if workdir is not None and not workdir.startswith("/"):
        raise ContainerError(f"the working directory {workdir!r} is invalid: it needs to be an absolute path")
    file_env = [e for path in env_files for e in read_env_file(path)]
    ms = ([volumes.parse_volume(v) for v in volumes_] + [volumes.parse_mount(m) for m in mounts]
          + [volumes.parse_tmpfs(t) for t in tmpfs])
    seen: set[str] = set()
    for m in ms:
        if m.destination in seen:
            raise ContainerError(f"duplicate mount point: {m.destination}")
        seen.add(m.destination)
    return RunOptions(command=list(command), entrypoint=None if entrypoint is None else parse_entrypoint(entrypoint),
                      env=parse_env(file_env + list(env)), workdir=workdir, user=user, hostname=hostname, mounts=ms,
                      read_only=read_only, network=network, cap_add=parse_caps(cap_add), cap_drop=parse_caps(cap_drop),
                      privileged=privileged, init=init, tty=tty, interactive=interactive)


def start(store: Store, name: str, attach: bool = False, interactive: bool = False, runtime: str | None = None) -> int:
    """``start``: a stopped container again, with the bundle it was run with; a container made by ``create``
    gets one now, from the image's config alone (as ``docker create`` + ``docker start``)."""
    from .lifecycle import start as start_again
    c = model.resolve(store, name)
    if os.path.exists(os.path.join(c.bundle, "config.json")):
        return start_again(store, name, attach, interactive, None)
    opts = RunOptions()
    config = _image_config(store, c)
    if not os.path.exists(c.file("run.json")):
        RunConfig(find_runtime(runtime), stop_signal(config)).save(c)
    init_layer(store, c, config, opts)
    return start_again(store, name, attach, interactive, lambda: prepare(store, c, config, opts))
