"""What the container subcommands do: ``create``, ``ps``, ``rm``, ``mount`` and ``umount`` (of a
container, an image or layer directories: which one a name means is decided here), ``diff``.

``commit`` and ``run`` live in their own modules; the command line only parses arguments.  No
union rules here: a container's view is :mod:`.view`'s, its changes :mod:`.diff`'s.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

from ..fuse.daemon import build_config, has_option, is_mountpoint, mount, split_lowerdir, umount, with_fsname
from ..image.commands import mount_image, rmi as remove_image
from ..image.report import human_ago, human_size, table
from ..errors import UsageError
from ..image.store import Store
from . import model
from .diff import Changes, changes
from .model import Container, ContainerError
from .mounting import image_lower, mount_container
from .view import MountView, UnionView


def create(store: Store, image: str, name: str | None = None) -> Container:
    with store.locked():
        image_lower(store, store.resolve(image))
        return model.create(store, image, name)


def create_and_mount(store: Store, image: str, mountpoint: str, options: list[str], foreground: bool = False,
                     log_file: str | None = None) -> int:
    """``mount --writable IMAGE``: a new container of ``image``, mounted; removed again if the mount fails."""
    if not os.path.isdir(mountpoint):
        raise ContainerError(f"mount point {mountpoint}: no such directory")
    c = create(store, image)
    print(f"container {c.id}", flush=True)
    try:
        return mount_container(store, c, mountpoint, with_fsname(options, image), foreground, log_file)
    except BaseException:
        with store.locked():
            model.remove(store, c)
        raise


def ps_table(store: Store, no_trunc: bool = False, quiet: bool = False, all_: bool = False) -> str:
    """Running containers (with ``all_``, every one): STATUS as docker's (Up ..., Exited (N) ..., Created)."""
    from .lifecycle import RunConfig, read_state, status_text
    rows = []
    states = {c.id: read_state(c) for c in model.containers(store)}
    cs = [c for c in model.containers(store) if all_ or states[c.id].running]
    if quiet:
        return "\n".join(c.id if no_trunc else c.short_id for c in cs)
    from ..registry.lazy import local_shares   # images of pull --lazy: how much is local
    tags = store.tags()
    lazy: list[str] = []
    for c in cs:
        names = sorted(t for t, i in tags.items() if i == c.image)
        image = c.image_ref if c.image_ref and c.image_ref in names else (names[0] if names else c.image[7:19])
        state = model.mounted_at(c)
        mounted = "-" if state is None else (state.mountpoint or f"yes (unionfs pid {state.pid})")
        size = model.upper_size(c)
        try:
            img = store.image(c.image)
            seen: dict[str, int] = {}
            for ly, n in zip(img.layers, img.layer_sizes):
                seen.setdefault(ly.diff_id, n)
            virtual = size + sum(seen.values())
        except (OSError, ValueError):
            img, virtual = None, size
        try:
            command = RunConfig.load(c).command
        except ContainerError:
            command = ""
        if not no_trunc and len(command) > 20:
            command = command[:19] + "…"
        rows.append([c.id if no_trunc else c.short_id, image, command, human_ago(c.created),
                     status_text(states[c.id]), mounted, f"{human_size(size)} (virtual {human_size(virtual)})",
                     c.name])
        lazy.extend(f"{c.id if no_trunc else c.short_id}  {s.digest[7:19]}  {s.text()}"
                    for s in (local_shares(store, img.config.diff_ids) if img else ()))
    out = table(["CONTAINER ID", "IMAGE", "COMMAND", "CREATED", "STATUS", "MOUNTED", "SIZE", "NAMES"], rows)
    return out + "\n\n" + "\n".join(["CONTAINER     LAZY LAYER    LOCAL", *lazy]) if lazy else out


def remove(store: Store, names: list[str], force: bool = False, volumes: bool = False) -> list[str]:
    """Remove containers; a running or mounted one only with ``force`` (killed, unmounted first); with
    ``volumes``, their anonymous volumes too. Returns what went."""
    from .lifecycle import force_stop, read_state
    from .volumes import remove_anonymous
    targets = [model.resolve(store, n) for n in names]   # all or nothing: every name must resolve
    for c in targets:
        if read_state(c).running:
            if not force:
                raise ContainerError(f"{c.name or c.short_id}: the container is running: stop it first, "
                                     "or use --force")
    for c in targets:
        force_stop(c)          # its supervisor unmounts it (not under the lock: it takes the lock to finish)
    done = []
    with store.locked():
        for c in [t for t in (model.find(store, c.id) for c in targets) if t is not None]:
            state = model.mounted_at(c)
            if state is not None:
                where = state.mountpoint or f"by unionfs pid {state.pid}"
                if not force:
                    raise ContainerError(f"{c.name or c.short_id}: mounted on {where}; unmount it first, or use --force")
                if not state.mountpoint:
                    raise ContainerError(f"{c.name or c.short_id}: mounted {where} at a place not recorded; "
                                         "unmount it by its mount point first")
                umount(state.mountpoint)
                if model.mounted_at(c) is not None:
                    raise ContainerError(f"{c.name or c.short_id}: still mounted on {state.mountpoint}")
            if volumes:
                remove_anonymous(store, c)
            model.remove(store, c)
            done.append(c.name or c.id)
        done += [c.name or c.id for c in targets if c.name not in done and c.id not in done]   # gone by --rm
    return done


def rmi(store: Store, names: list[str], force: bool = False) -> Iterator[str]:
    """``unionfs rmi``: images by name, each refused while a container uses it; yields what went, as it goes."""
    with store.locked():
        for name in names:
            removed = remove_image(store, name, force,
                                   lambda image_id: [c.short_id for c in model.using(store, image_id)])
            yield from (f"Untagged: {t}" for t in removed.untagged)
            if removed.deleted:
                yield f"Deleted: {removed.deleted}"


def mount_target(store: Store, name: str | None, mountpoint: str, lower: list[str], upper: str | None,
                 work: str | None, options: list[str], writable: bool = False, foreground: bool = False,
                 log_file: str | None = None, background_fill: bool = True) -> int:
    """``unionfs mount``: layer directories (no ``name``), else a container by name or id, else an image
    (read-only; ``writable``: a new container of it).  Mixing the two kinds of source is refused.
    An image with lazy layers fills them in the background unless ``background_fill`` is off."""
    if name is None:
        if writable:
            raise UsageError("--writable needs an IMAGE (for layer directories, give --upper and --work)")
        dirs = [d for value in lower for d in split_lowerdir(value)]
        return mount(build_config(mountpoint, dirs, upper, work, options, foreground, log_file))
    if lower or has_option(options, "lowerdir"):
        raise UsageError("give an IMAGE or CONTAINER, or lower layers (--lower, -o lowerdir=), not both")
    if not writable:
        c = model.find(store, name) if store.exists() else None
        if c is not None:   # a container's name or id first, then an image's
            if upper or work:
                raise UsageError("a container's layers come from the store: no --upper/--work")
            return mount_container(store, c, mountpoint, options, foreground, log_file)
    if upper or work:
        raise UsageError("an image's writable layer comes from the store: use --writable, not --upper/--work")
    if writable:
        return create_and_mount(store, name, mountpoint, options, foreground, log_file)
    from ..registry.lazy import fill_for   # lazy layers (pull --lazy): content on first read
    fill = None
    if store.exists():
        image_id = store.resolve(name)
        fill = fill_for(store, store.image(image_id).config.diff_ids, image_id)
    return mount_image(store, name, mountpoint, options, foreground, log_file, fill, background_fill)


def umount_target(store: Store, target: str) -> int:
    """``unionfs umount``: a mount point, or a container's name or id when no such path exists."""
    if not os.path.lexists(target) and "/" not in target and store.exists():
        return umount_container(store, target)
    return umount(target)


def umount_container(store: Store, name: str) -> int:
    c = model.resolve(store, name)
    state = model.mounted_at(c)
    if state is None:
        raise ContainerError(f"{name}: not mounted")
    if not state.mountpoint:
        raise ContainerError(f"{name}: mounted by unionfs pid {state.pid} at a place not recorded; "
                             "give its mount point")
    return umount(state.mountpoint)


@contextmanager
def views(store: Store, c: Container) -> Iterator[tuple[UnionView, object]]:
    """(the image alone, the container's merged view): through its mount point if mounted."""
    lower = image_lower(store, c.image)
    with UnionView(lower) as image_view:
        state = model.mounted_at(c)
        if state is not None:
            if not state.mountpoint or not is_mountpoint(state.mountpoint):
                raise ContainerError(f"{c.name or c.short_id}: mounted by unionfs pid {state.pid} at a place not "
                                     "recorded; unmount it first")
            with MountView(state.mountpoint) as merged:
                yield image_view, merged
        else:
            with UnionView(lower, c.upper, c.work) as merged:
                yield image_view, merged


def container_changes(store: Store, c: Container) -> Changes:
    with views(store, c) as (image_view, merged):
        return changes(c.upper, c.work, image_view, merged)


def diff_lines(store: Store, name: str) -> list[str]:
    c = model.resolve(store, name)
    return container_changes(store, c).lines()

