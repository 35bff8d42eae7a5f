"""Symlink resolution one component at a time, for the two roots a build reads: the context and an image.

The context refuses to be left (a symlink or ``..`` out of it is an error); an
image is resolved as in a chroot (``..`` stops at its root, absolute targets start
there), as runtimes and builders resolve a destination inside a rootfs.
"""
from __future__ import annotations

import errno
from typing import Callable

MAX_LINKS = 40


class Escape(Exception):
    """The path leaves its root (only when not clamped)."""

    def __init__(self, via_link: bool) -> None:
        super().__init__("outside the root")
        self.via_link = via_link


def resolve(path: str, readlink: Callable[[str], str | None], *, clamp: bool, follow_last: bool = True) -> list[str]:
    """The components of ``path`` with every symlink replaced by its target; ``readlink(p)`` gives the
    target of ``p`` if it is a symlink, else None (it may raise FileNotFoundError)."""
    parts = [p for p in path.split("/") if p and p != "."]
    done: list[str] = []
    hops = 0
    while parts:
        p = parts.pop(0)
        if p == "..":
            if done:
                done.pop()
            elif not clamp:
                raise Escape(hops > 0)
            continue
        target = readlink("/".join(done + [p])) if parts or follow_last else None
        if target is None:
            done.append(p)
            continue
        hops += 1
        if hops > MAX_LINKS:
            raise OSError(errno.ELOOP, "too many levels of symbolic links", path)
        if target.startswith("/"):
            if not clamp:
                raise Escape(True)
            done = []
        parts = [x for x in target.split("/") if x and x != "."] + parts
    return done
