"""A container's lower stack and its mount: what ``mount``, ``run``'s supervisor and ``diff`` share.

The stack is the container's init layer (the mount points ``run`` made), if any, over the image's
layers; the mount adds the writable layer and the fill hook of lazy layers, and records where it is
mounted.  It knows nothing of the container lifecycle (:mod:`.lifecycle` imports it, not the
other way round) nor of the command line.
"""
from __future__ import annotations

import os

from ..fuse.daemon import build_config, mount, with_fsname
from ..image.commands import lower_stack
from ..image.store import Store
from . import model
from .model import Container, ContainerError


def image_lower(store: Store, image_id: str) -> list[str]:
    """The image's layer directories, topmost first (as a lower stack)."""
    return lower_stack(store, image_id, f"image {image_id[7:19]}")


def container_lower(store: Store, c: Container) -> list[str]:
    """A container's lower stack: its init layer (mount points made by ``run``), if any, over the image's."""
    init = c.file("init")
    return ([init] if os.path.isdir(init) else []) + image_lower(store, c.image)


def mount_container(store: Store, c: Container, mountpoint: str, options: list[str], foreground: bool = False,
                    log_file: str | None = None) -> int:
    """Mount a container's view (its image and its writable layer) on ``mountpoint``."""
    state = model.mounted_at(c)
    if state is not None:
        raise ContainerError(f"{c.name or c.short_id}: already mounted on "
                             f"{state.mountpoint or f'(unionfs pid {state.pid})'}")
    options = with_fsname(options, c.name or c.short_id)
    with store.locked():
        c = model.resolve(store, c.id)   # still there now that we hold the lock
        cfg = build_config(mountpoint, container_lower(store, c), c.upper, c.work, options, foreground, log_file)
        from ..registry.lazy import fill_for   # lazy layers (pull --lazy): content on first read
        cfg.fill = fill_for(store, store.image(store.resolve(c.image)).config.diff_ids)
        cfg.background = getattr(cfg.fill, "background", None)
        c.mountpoint = cfg.mountpoint
        model.save(c)
    # Not under the lock: the daemon is forked from this process and would inherit (and keep) it.
    return mount(cfg)
