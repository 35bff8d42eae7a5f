"""What the image subcommands do: ``tag``, ``rmi``, and mounting an image read-only.

``load``, ``save`` and the reports (``images``, ``inspect``, ``history``) live in
their own modules; the command line only parses arguments.  Nothing here knows
containers: ``rmi`` is told who uses an image by its caller.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

from ..fuse.daemon import build_config, daemons_holding, has_option, mount, with_fsname
from .model import ImageError, Reference
from .store import Store


def lower_stack(store: Store, image_id: str, what: str) -> list[str]:
    """The image's layer directories, topmost first: a lower stack, as overlayfs's lowerdir lists it."""
    image = store.image(image_id)
    if not image.layers:
        raise ImageError(f"{what}: the image has no layers to mount")
    return store.lower_dirs([ly.diff_id for ly in image.layers])


def store_options(options: list[str], name: str) -> list[str]:
    """The options of a mount of the store's images and containers: :func:`with_fsname`, and in a
    user's store ``xattr_permissions=2``: its files record their image owners, modes and types in
    ``user.containers.override_stat`` (:mod:`unionfs.image.extract`), and the mount shows those."""
    options = with_fsname(options, name)
    if os.geteuid() != 0 and not has_option(options, "xattr_permissions"):
        options.append("xattr_permissions=2")
    return options


def mount_image(store: Store, name: str, mountpoint: str, options: list[str], foreground: bool = False,
                log_file: str | None = None, fill=None, background: bool = True) -> int:
    """Mount an image's layers read-only on ``mountpoint``; ``fill``: the hook of its lazy layers."""
    lower = lower_stack(store, store.resolve(name), name)
    cfg = build_config(mountpoint, lower, None, None, store_options(options, name), foreground, log_file)
    cfg.fill = fill
    cfg.background = getattr(fill, "background", None) if background else None
    return mount(cfg)


def tag(store: Store, source: str, target: str) -> None:
    dst = Reference.parse(target)
    with store.locked():
        tags = store.tags()
        tags[str(dst)] = store.resolve(source)
        store.set_tags(tags)


@dataclass
class Removed:
    untagged: list[str] = field(default_factory=list)
    deleted: str | None = None


def rmi(store: Store, name: str, force: bool, users: Callable[[str], list[str]]) -> Removed:
    """Remove a name, or the image with its last name (and the layers no other image uses).

    ``users(image_id)`` names the containers of an image: an image in use, or mounted
    (a daemon holds one of the layers it would take along), stays.  Docker's rules: by
    tag, only that tag goes while the image has others; by id, an image with several
    tags needs ``force``.  The caller holds the store's lock.
    """
    image_id = store.resolve(name)
    tags = store.tags()
    mine = sorted(t for t, i in tags.items() if i == image_id)
    by_tag = None
    try:
        ref = str(Reference.parse(name))
        by_tag = ref if tags.get(ref) == image_id else None
    except ImageError:
        pass
    if by_tag and len(mine) > 1:   # only a name goes; the image keeps its others
        del tags[by_tag]
        store.set_tags(tags)
        return Removed([by_tag])
    if not by_tag and len(mine) > 1 and not force:
        raise ImageError(f"{name}: image is tagged {', '.join(mine)}; remove the tags, or use -f")
    in_use = users(image_id)
    if in_use:
        raise ImageError(f"{name}: in use by container(s) {', '.join(in_use)}")
    others = set()
    for other in store.image_ids():
        if other != image_id:
            others.update(ly.diff_id for ly in store.image(other).layers)
    doomed = [store.layer_dir(ly.diff_id) for ly in store.image(image_id).layers if ly.diff_id not in others]
    busy = daemons_holding(doomed)
    if busy:
        raise ImageError(f"{name}: mounted (unionfs daemon pid {sorted(set(busy.values()))[0]}); unmount first")
    store.remove_image(image_id)
    store.gc()
    return Removed(mine, image_id)
